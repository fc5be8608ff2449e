"""The one autograd path: ``flashtile::attn_fwd`` / ``flashtile::attn_bwd`` custom ops.

Every public function (dense, packed, varlen) ends in :func:`attention`, which calls the
forward custom op; its registered autograd formula calls the backward op. Both ops have fake
(meta) implementations, so ``torch.compile(fullgraph=True)`` traces through them without a
graph break. The backend is chosen before the op (see :mod:`flashtile.dispatch`) and passed
in by name. Outputs are always contiguous (the fake implementations promise that).
"""

# No `from __future__ import annotations` here: torch.library infers the op schema from
# the annotations at runtime.
from typing import Optional

import torch

from .backends import registry
from .spec import AttnSpec, capturing, check_cu_seqlens_values


def _spec(
    softmax_scale: float, window_left: int, window_right: int, softcap: float, dropout_p: float, deterministic: bool
) -> AttnSpec:
    return AttnSpec(softmax_scale, window_left, window_right, softcap, dropout_p, deterministic)


def _seed_int(seed: Optional[torch.Tensor]) -> int:
    return 0 if seed is None else int(seed.item())


def _check_varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) -> None:
    if cu_seqlens_q is None:
        return
    if capturing(q):
        return  # values cannot be read during CUDA graph capture; shapes were checked before
    check_cu_seqlens_values(cu_seqlens_q, "cu_seqlens_q", q.shape[1], max_seqlen_q, "max_seqlen_q")
    check_cu_seqlens_values(cu_seqlens_k, "cu_seqlens_k", k.shape[1], max_seqlen_k, "max_seqlen_k")


@torch.library.custom_op("flashtile::attn_fwd", mutates_args=())
def attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    alibi_slopes: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
    deterministic: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_varlen_values(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    spec = _spec(softmax_scale, window_left, window_right, softcap, dropout_p, deterministic)
    out, lse = registry()[backend].forward(
        q, k, v, spec,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        alibi_slopes=alibi_slopes, seed=_seed_int(seed),
    )  # fmt: skip
    return out.contiguous(), lse.contiguous()


@attn_fwd.register_fake
def _attn_fwd_fake(q, k, v, *args):
    B, S, H, _ = q.shape
    return q.new_empty(q.shape), q.new_empty((B, H, S), dtype=torch.float32)


@torch.library.custom_op("flashtile::attn_bwd", mutates_args=())
def attn_bwd(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    cu_seqlens_q: Optional[torch.Tensor],
    cu_seqlens_k: Optional[torch.Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    alibi_slopes: Optional[torch.Tensor],
    seed: Optional[torch.Tensor],
    softmax_scale: float,
    window_left: int,
    window_right: int,
    softcap: float,
    dropout_p: float,
    deterministic: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    spec = _spec(softmax_scale, window_left, window_right, softcap, dropout_p, deterministic)
    dq, dk, dv = registry()[backend].backward(
        dout, q, k, v, out, lse, spec,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        alibi_slopes=alibi_slopes, seed=_seed_int(seed),
    )  # fmt: skip
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@attn_bwd.register_fake
def _attn_bwd_fake(dout, q, k, v, out, lse, *args):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


_ARG_NAMES = (
    "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "alibi_slopes", "seed", "softmax_scale",
    "window_left", "window_right", "softcap", "dropout_p", "deterministic", "backend",
)  # fmt: skip


def _setup_context(ctx, inputs, output):
    q, k, v = inputs[:3]
    out, lse = output
    rest = dict(zip(_ARG_NAMES, inputs[3:], strict=True))
    ctx.save_for_backward(q, k, v, out, lse, rest["cu_seqlens_q"], rest["cu_seqlens_k"], rest["alibi_slopes"],
                          rest["seed"])  # fmt: skip
    ctx.args = {n: rest[n] for n in _ARG_NAMES if n not in ("cu_seqlens_q", "cu_seqlens_k", "alibi_slopes", "seed")}
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_q, cu_k, alibi, seed = ctx.saved_tensors
    a = ctx.args
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    dq, dk, dv = attn_bwd(
        dout, q, k, v, out, lse, cu_q, cu_k, a["max_seqlen_q"], a["max_seqlen_k"], alibi, seed,
        a["softmax_scale"], a["window_left"], a["window_right"], a["softcap"], a["dropout_p"],
        a["deterministic"], a["backend"],
    )  # fmt: skip
    return (dq, dk, dv) + (None,) * len(_ARG_NAMES)


attn_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: AttnSpec,
    backend: str,
    *,
    cu_seqlens_q: Optional[torch.Tensor] = None,
    cu_seqlens_k: Optional[torch.Tensor] = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    alibi_slopes: Optional[torch.Tensor] = None,
    seed: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable attention on the internal layout (see :mod:`flashtile.backends.base`)."""
    return attn_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k), alibi_slopes, seed,
        spec.softmax_scale, spec.window_left, spec.window_right, spec.softcap, spec.dropout_p,
        spec.deterministic, backend,
    )  # fmt: skip
