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

from . import fp8
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


#: tensor-free flattened calls -> their AttnCall: the ops' implementations get one object per option
#: set, as eager calls do from make_call (the Triton launchers plan launches per call object)
_UNFLAT: dict[tuple, AttnCall] = {}
#: argument types -> whether one is a tensor
_UNFLAT_TENSOR: dict[tuple, bool] = {}


def unflatten(args: tuple) -> AttnCall:
    """The inverse of :func:`flatten`."""
    args = tuple(args)
    types = tuple(map(type, args))
    tensor = _UNFLAT_TENSOR.get(types)
    if tensor is None:
        tensor = any(issubclass(t, torch.Tensor) for t in types)
        if len(_UNFLAT_TENSOR) < 256:
            _UNFLAT_TENSOR[types] = tensor
    key = None
    if not tensor and not torch.compiler.is_compiling():
        key = (args, types)  # types too: 1 and 1.0 (and True) are equal keys
        try:
            found = _UNFLAT.get(key)
        except TypeError:  # pragma: no cover - an unhashable value
            found, key = None, None
        if found is not None:
            return found
    call = AttnCall(**{f.name: a for f, a in zip(_FIELDS, args, strict=True)})
    if key is not None:
        if len(_UNFLAT) >= 256:
            _UNFLAT.clear()
        _UNFLAT[key] = call
    return call


_lib = torch.library.Library("flashtile", "FRAGMENT")  # kept alive for the module's lifetime
_lib.define(f"attn_fwd(Tensor q, Tensor k, Tensor v, {_CALL_SCHEMA}, str backend) -> (Tensor, Tensor)")
_lib.define(
    f"attn_bwd(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_CALL_SCHEMA}, str backend) "
    f"-> ({', '.join(['Tensor'] * (3 + len(_GRAD_FIELDS)))})"
)


def _placeholder(q: torch.Tensor) -> torch.Tensor:
    """The backward op's output for a differentiable field the call leaves None."""
    return q.new_empty((0,), dtype=torch.float32)


def _fwd_run(q, k, v, call: AttnCall, backend: str):
    check_call_values(q, k, call)
    be = registry()[backend]
    if fp8.is_fp8(q.dtype) and not fp8.serves_fp8(be.capabilities):
        # FP8 inputs for a backend without FP8 kernels: dequantised here, once for all of them
        out, lse = fp8.run_upcast(be.forward, q, k, v, call)
    else:
        out, lse = be.forward(q, k, v, call)
    return out.contiguous(), lse.contiguous()


def _fwd_impl(q, k, v, *args):
    return _fwd_run(q, k, v, unflatten(args[:-1]), args[-1])


def _bwd_impl(dout, q, k, v, out, lse, *args):
    return _bwd_run(dout, q, k, v, out, lse, unflatten(args[:-1]), args[-1])


def _bwd_run(dout, q, k, v, out, lse, call: AttnCall, backend: str):
    dq, dk, dv, field_grads = registry()[backend].backward(dout, q, k, v, out, lse, call)
    extra = []
    for i in _GRAD_FIELDS:
        name = _FIELDS[i].name
        if getattr(call, name) is None:
            extra.append(_placeholder(q))
        elif name not in field_grads:  # pragma: no cover - dispatch only picks backends implementing it
            raise RuntimeError(f"backend {backend!r} returned no gradient for {name}")
        else:
            extra.append(field_grads[name].contiguous())
    return dq.contiguous(), dk.contiguous(), dv.contiguous(), *extra


def _fwd_fake(q, k, v, *args):
    B, S, H, _ = q.shape
    dtype = fp8.OUT_DTYPE if fp8.is_fp8(q.dtype) else q.dtype
    return q.new_empty((*q.shape[:-1], v.shape[-1]), dtype=dtype), q.new_empty((B, H, S), dtype=torch.float32)


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
    if fp8.is_fp8(q.dtype):
        raise RuntimeError(
            "flashtile: FP8 (float8_e4m3fn) attention is forward only (as in flash-attn 3): there is no "
            "backward through an FP8 call; use bfloat16/float16 inputs to train, or detach the inputs "
            "(and descales) of the FP8 call"
        )
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


# Eager fast path (issue 16). In plain eager mode (plain tensors; no torch.compile, functorch
# transform, dispatch mode or profiler) the ops' implementations run directly under the
# autograd.Function below, with the same backward formula: going through the dispatcher costs
# the marshalling of ~17 arguments into and out of C++ per op call, and the autograd kernel torch
# generates for ``register_autograd`` calls ``torch._library.utils.fill_defaults``, which re-reads
# the op's schema once per argument (quadratic in the argument count: ~0.45 ms per call on a
# 2-core CPU). Nothing observable changes: the ops have no autocast or other kernels, and every
# context where the dispatcher matters (tracing, subclasses, modes, the profiler) takes the ops.
_transforms_active = getattr(torch._C, "_are_functorch_transforms_active", None)
_dispatch_stack_len = getattr(torch._C, "_len_torch_dispatch_stack", None)
_profiling = getattr(torch.autograd.profiler, "_is_profiler_enabled", None)
_FAST = _transforms_active is not None and _dispatch_stack_len is not None and isinstance(_profiling, bool)


def _fast_path(*xs: torch.Tensor) -> bool:
    """Whether the eager fast path applies to a call on tensors ``xs``."""
    return (
        _FAST
        and all(type(x) is torch.Tensor for x in xs)
        and not torch.autograd.profiler._is_profiler_enabled
        and not torch.compiler.is_compiling()
        and not _transforms_active()
        and _dispatch_stack_len() == 0
    )


def fast_mode() -> bool:
    """:func:`_fast_path`'s conditions that do not depend on the tensors (the entry points' memos
    check the tensors' types themselves)."""
    return (
        _FAST
        and not torch.autograd.profiler._is_profiler_enabled
        and not torch.compiler.is_compiling()
        and not _transforms_active()
        and _dispatch_stack_len() == 0
    )


#: The entry points' memos' stand-in for the types of their usual options (each entry point says
#: which types are usual for it): a key tells exactly the same calls apart as the tuples of types
#: would, since it is given for those types and no others.
USUAL_TYPES = ("usual option types",)


def option_types(opts: tuple, window: tuple, usual: bool) -> tuple:
    """The types part of a memo key: :data:`USUAL_TYPES` when ``usual`` (the caller checked that
    every option has its usual type), else the types of ``opts`` and of ``window``'s entries (1,
    1.0 and True are equal keys otherwise)."""
    return USUAL_TYPES if usual else (tuple(map(type, opts)), tuple(map(type, window)))


class Memo(dict):
    """A signature memo of an entry point (issue 16): ``key -> entry``, cleared when full."""

    def __init__(self, maxsize: int = 256) -> None:
        super().__init__()
        self.maxsize = maxsize

    def lookup(self, key: tuple | None) -> tuple:
        """``(key, None)`` on a miss (record with that key once the checks passed), ``(None,
        entry)`` on a hit, ``(None, None)`` where the memo does not apply (``key`` None, or a key
        that cannot be hashed or compared: an odd option value)."""
        if key is None:
            return None, None
        try:
            hit = self.get(key)
        except (TypeError, ValueError):
            return None, None
        return (key, None) if hit is None else (None, hit)

    def record(self, key: tuple, entry: tuple) -> None:
        if len(self) >= self.maxsize:
            self.clear()
        self[key] = entry


_NO_FIELD_GRADS = (None,) * len(_GRAD_FIELDS)


class _Attention(torch.autograd.Function):
    """``attn_fwd`` with ``attn_bwd`` as its backward, for the eager fast path. Inputs: q, k, v,
    the call, the backend name, a runner of the forward or None (the entry points' flat path:
    ``runner(q, k, v)`` gives what :func:`_fwd_run` gives, or None), then the call's
    differentiable fields (for their gradients)."""

    @staticmethod
    def forward(ctx, q, k, v, call, backend, runner, *grad_fields):
        res = None if runner is None else runner(q, k, v)
        out, lse = _fwd_run(q, k, v, call, backend) if res is None else res
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call, ctx.backend = call, backend
        ctx.fields_set = any(f is not None for f in grad_fields)  # else the backward's tail is all None
        ctx.mark_non_differentiable(lse)
        # lse's gradient is never used: without this the engine would allocate and zero-fill
        # one (a memset kernel on the GPU) on every backward
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if dout is None:  # out received no gradient (not materialised, see forward)
            dout = torch.zeros_like(out)
        elif dout.stride(-1) != 1:
            dout = dout.contiguous()
        call = ctx.call
        dq, dk, dv, field_grads = registry()[ctx.backend].backward(dout, q, k, v, out, lse, call)
        if not ctx.fields_set:
            return dq.contiguous(), dk.contiguous(), dv.contiguous(), None, None, None, *_NO_FIELD_GRADS
        need = ctx.needs_input_grad[6:]
        grads = []
        for j, i in enumerate(_GRAD_FIELDS):
            name = _FIELDS[i].name
            if getattr(call, name) is None or not need[j]:
                grads.append(None)
            elif name not in field_grads:  # pragma: no cover - dispatch only picks backends implementing it
                raise RuntimeError(f"backend {ctx.backend!r} returned no gradient for {name}")
            else:
                grads.append(field_grads[name].contiguous())
        return dq.contiguous(), dk.contiguous(), dv.contiguous(), None, None, None, *grads


# ``_Attention.apply`` without ``torch.autograd.Function.apply``'s Python wrapper (argument binding
# for ``setup_context`` functions, which _Attention is not; the functorch check, done by
# _fast_path; the unwrapping of dead functorch wrappers, done here): the C++ apply itself.
_unwrap_if_dead = getattr(getattr(torch._C, "_functorch", None), "unwrap_if_dead", None)
_c_apply = getattr(super(torch.autograd.Function, _Attention), "apply", None)
if _unwrap_if_dead is None or type(_c_apply).__name__ != "builtin_function_or_method" or \
        getattr(_c_apply, "__self__", None) is not _Attention:  # fmt: skip
    _c_apply = None  # pragma: no cover - another torch layout (a Python apply in between): the public apply


def _apply(*args):
    if _c_apply is None:  # pragma: no cover
        return _Attention.apply(*args)
    u = _unwrap_if_dead
    return _c_apply(u(args[0]), u(args[1]), u(args[2]), *args[3:6],
                    *[a if a is None else u(a) for a in args[6:]])  # fmt: skip


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable ``(out, lse)`` on the internal layout (see :mod:`flashtile.backends.base`)."""
    if call.score_mod is not None or call.block_mask is not None:
        from .flex import mod_attention

        return mod_attention(q, k, v, call, backend)
    # FP8 calls take the ops: their descales are tensor fields outside _GRAD_FIELDS, and a backward
    # through them must reach _backward's "forward only" error (and they are large prefills).
    if _fast_path(q, k, v) and not fp8.is_fp8(q.dtype):
        fields = tuple(getattr(call, _FIELDS[i].name) for i in _GRAD_FIELDS)
        if torch.is_grad_enabled() and (
            q.requires_grad or k.requires_grad or v.requires_grad
            or any(f is not None and f.requires_grad for f in fields)
        ):  # fmt: skip
            return _apply(q, k, v, call, backend, None, *fields)
        return _fwd_run(q, k, v, call, backend)
    return attn_fwd(q, k, v, *flatten(call), backend)


def attention_fast(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention` for a call known to take the eager fast path (the entry points' memos:
    plain tensors, :func:`fast_mode`, no score_mod / block_mask, no differentiable field set,
    not FP8, not varlen): the same work without re-deciding it."""
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _apply(q, k, v, call, backend, None, *_NO_FIELD_GRADS)
    out, lse = registry()[backend].forward(q, k, v, call)
    return out.contiguous(), lse.contiguous()


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
