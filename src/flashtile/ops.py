"""The one autograd path: ``flashtile::attn_fwd`` / ``flashtile::attn_bwd`` custom ops.

Every public function (dense, packed, varlen) and every caller (modules, distributed) ends in
:func:`attention`, which calls the forward op; its registered autograd formula calls the
backward op. Both ops have fake (meta) implementations, so ``torch.compile(fullgraph=True)``
traces through them without a graph break. The backend is chosen before the op (see
:mod:`flashtile.dispatch`) and passed in by name. Outputs are always contiguous.

The op schemas are derived from the fields of :class:`flashtile.spec.AttnCall`: the carrier is
flattened into the op's arguments by :func:`flatten` and rebuilt by :func:`unflatten`, here and
nowhere else, so adding an option to the carrier changes nothing in this file.

Differentiable carrier fields (tensor fields declared with ``metadata={"grad": True}``) get a
gradient: the backward op returns ``(dq, dk, dv)`` and then one tensor per such field, in field
order (the field's gradient from the backend's ``field_grads``, or an empty placeholder when the
call leaves the field None), and the autograd formula routes them to the fields' op inputs.
"""

from __future__ import annotations

import dataclasses

import torch

from .backends import registry
from .spec import AttnCall, check_call_values

#: Schema type of each carrier field type (the annotations are strings).
_SCHEMA_TYPES = {"float": "float", "int": "SymInt", "bool": "bool", "torch.Tensor | None": "Tensor?"}
#: The schema-typed fields (those with ``metadata={"python": True}`` -- score_mod, block_mask --
#: never enter the op: calls that set them take :func:`flashtile.flex.mod_attention`).
_FIELDS = tuple(f for f in dataclasses.fields(AttnCall) if not f.metadata.get("python"))
try:
    _CALL_SCHEMA = ", ".join(f"{_SCHEMA_TYPES[f.type]} {f.name}" for f in _FIELDS)
except KeyError as e:  # pragma: no cover - a developer added a field of a new type
    raise TypeError(f"AttnCall field type {e} has no custom-op schema type: extend ops._SCHEMA_TYPES") from None
#: Indices (in the flattened call) of the tensor fields, saved for backward.
_TENSOR_FIELDS = tuple(i for i, f in enumerate(_FIELDS) if _SCHEMA_TYPES[f.type] == "Tensor?")
#: Indices (in the flattened call) of the differentiable fields, whose gradients attn_bwd returns.
_GRAD_FIELDS = tuple(i for i in _TENSOR_FIELDS if _FIELDS[i].metadata.get("grad", False))


def flatten(call: AttnCall) -> tuple:
    """The carrier as the ops' positional arguments (field order)."""
    return tuple(getattr(call, f.name) for f in _FIELDS)


def unflatten(args: tuple) -> AttnCall:
    """The inverse of :func:`flatten`."""
    return AttnCall(**{f.name: a for f, a in zip(_FIELDS, args, strict=True)})


_lib = torch.library.Library("flashtile", "FRAGMENT")  # kept alive for the module's lifetime
_lib.define(f"attn_fwd(Tensor q, Tensor k, Tensor v, {_CALL_SCHEMA}, str backend) -> (Tensor, Tensor)")
_lib.define(
    f"attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_CALL_SCHEMA}, str backend) "
    f"-> ({', '.join(['Tensor'] * (3 + len(_GRAD_FIELDS)))})"
)


def _placeholder(q: torch.Tensor) -> torch.Tensor:
    """The backward op's output for a differentiable field the call leaves None."""
    return q.new_empty((0,), dtype=torch.float32)


def _fwd_impl(q, k, v, *args):
    call, backend = unflatten(args[:-1]), args[-1]
    check_call_values(q, k, call)
    out, lse = registry()[backend].forward(q, k, v, call)
    return out.contiguous(), lse.contiguous()


def _bwd_impl(dout, q, k, v, out, lse, *args):
    call, backend = unflatten(args[:-1]), args[-1]
    dq, dk, dv, field_grads = registry()[backend].backward(dout, q, k, v, out, lse, call)
    extra = []
    for i in _GRAD_FIELDS:
        name = _FIELDS[i].name
        if args[i] is None:
            extra.append(_placeholder(q))
        elif name not in field_grads:  # pragma: no cover - dispatch only picks backends implementing it
            raise RuntimeError(f"backend {backend!r} returned no gradient for {name}")
        else:
            extra.append(field_grads[name].contiguous())
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), *extra


def _fwd_fake(q, k, v, *args):
    B, S, H, _ = q.shape
    return q.new_empty((*q.shape[:-1], v.shape[-1])), q.new_empty((B, H, S), dtype=torch.float32)


def _bwd_fake(dout, q, k, v, out, lse, *args):
    extra = [_placeholder(q) if args[i] is None else torch.empty_like(args[i]) for i in _GRAD_FIELDS]
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *extra


torch.library.impl("flashtile::attn_fwd", "CompositeExplicitAutograd", lib=_lib)(_fwd_impl)
torch.library.impl("flashtile::attn_bwd", "CompositeExplicitAutograd", lib=_lib)(_bwd_impl)
torch.library.register_fake("flashtile::attn_fwd", _fwd_fake, lib=_lib)
torch.library.register_fake("flashtile::attn_bwd", _bwd_fake, lib=_lib)

attn_fwd = torch.ops.flashtile.attn_fwd.default
attn_bwd = torch.ops.flashtile.attn_bwd.default


def _setup_context(ctx, inputs, output):
    q, k, v, *args = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, *(args[i] for i in _TENSOR_FIELDS))
    ctx.args = [None if i in _TENSOR_FIELDS else a for i, a in enumerate(args)]
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *tensors = ctx.saved_tensors
    args = list(ctx.args)
    for i, t in zip(_TENSOR_FIELDS, tensors, strict=True):
        args[i] = t
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv, *extra = attn_bwd(dout, q, k, v, out, lse, *args)
    grads = [None] * len(args)
    for i, g in zip(_GRAD_FIELDS, extra, strict=True):
        if args[i] is not None and ctx.needs_input_grad[3 + i]:
            grads[i] = g
    return (dq, dk, dv, *grads)


torch.library.register_autograd("flashtile::attn_fwd", _backward, setup_context=_setup_context, lib=_lib)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable ``(out, lse)`` on the internal layout (see :mod:`flashtile.backends.base`)."""
    if call.score_mod is not None or call.block_mask is not None:
        from .flex import mod_attention

        return mod_attention(q, k, v, call, backend)
    return attn_fwd(q, k, v, *flatten(call), backend)


def attention_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    call: AttnCall,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` through the backward op, for callers that drive the backward themselves
    (ring attention passes the global ``out`` / ``lse`` of a longer key range). The gradients of
    differentiable carrier fields (e.g. ``learnable_sink``) are not returned: such callers do not
    pass them yet."""
    if call.score_mod is not None or call.block_mask is not None:
        raise NotImplementedError("attention_backward does not take calls with score_mod / block_mask")
    return tuple(attn_bwd(dout, q, k, v, out, lse, *flatten(call), backend)[:3])
