"""FP8 (e4m3) attention: quantisation helpers for users, and the one upcast path for backends
without FP8 kernels.

FP8 calls (flash-attn 3's API): ``flash_attn_func`` / ``flash_attn_varlen_func`` /
``flash_attn_with_kvcache`` accept ``torch.float8_e4m3fn`` q, k, v with optional float32
descales ``q_descale``, ``k_descale``, ``v_descale`` of shape ``(batch, nheads_k)`` (``None``
means 1): the call computes attention on the dequantised inputs ``x.float() * x_descale[b, hk]``
(query head ``h`` uses the entry of its KV head ``h // (nheads // nheads_k)``; varlen: ``b`` is
the sequence) and returns the output in bfloat16 (flash-attn 3's output dtype for FP8 inputs)
and the lse of the dequantised scores. Forward only: a backward through an FP8 call raises.

Backends that declare ``torch.float8_e4m3fn`` in their ``Capabilities.dtypes`` (the ``hopper``
kernels) get the FP8 tensors and the descales; every other backend is handed the dequantised
inputs by :func:`run_upcast` (called from :mod:`flashtile.ops`, once for all of them): slower
(an extra read and write of q, k, v in the wider dtype), exact up to the compute dtype.

Helpers to produce FP8 inputs: :func:`quantize` (per-tensor or per-(batch, KV head) scales) and
:func:`rotate_qk` (incoherent processing: a random orthogonal rotation of q and k along the head
dim, ``(q R)(k R)^T = q k^T``, which spreads outliers over all channels before quantisation; for
power-of-two head dims a randomised Walsh-Hadamard transform in O(d log d), otherwise a random
orthogonal matrix).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import torch

#: The FP8 format the API accepts (flash-attn 3's forward format).
FP8_DTYPE = torch.float8_e4m3fn
#: Largest finite e4m3 value.
FP8_MAX = 448.0
#: The dtype an FP8 call's output has.
OUT_DTYPE = torch.bfloat16
_DESCALES = ("q_descale", "k_descale", "v_descale")


def is_fp8(dtype: torch.dtype) -> bool:
    return dtype == FP8_DTYPE


def serves_fp8(capabilities) -> bool:
    """Whether a backend's kernels take FP8 inputs themselves (else :func:`run_upcast` does)."""
    return FP8_DTYPE in capabilities.dtypes


def compute_dtype(device: torch.device) -> torch.dtype:
    """The dtype FP8 inputs are dequantised to for backends without FP8 kernels: bfloat16 on
    GPUs (exact products of e4m3 values and a descale up to bf16 rounding), float32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _seq_ids(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Sequence index of each packed token (no host sync)."""
    pos = torch.arange(total, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return torch.searchsorted(cu_seqlens[1:].contiguous(), pos, right=True).clamp_(max=cu_seqlens.shape[0] - 2)


def dequantize(
    x: torch.Tensor, descale: torch.Tensor | None, cu_seqlens: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``x.float() * descale`` on the internal layout, as ``dtype``: ``x`` dense ``(B, S, H, D)``
    or varlen ``(1, total, H, D)`` (with ``cu_seqlens``); ``descale`` float32 ``(B or nseq, Hk)``
    with ``H`` a multiple of ``Hk`` (query head ``h`` uses column ``h // (H // Hk)``), or None (1)."""
    xf = x.float()
    if descale is not None:
        d = descale.float().repeat_interleave(x.shape[2] // descale.shape[1], dim=1)  # (B, H)
        if cu_seqlens is not None:
            d = d[_seq_ids(cu_seqlens, x.shape[1])].unsqueeze(0)  # (1, total, H)
        else:
            d = d.unsqueeze(1)  # (B, 1, H)
        xf = xf * d.unsqueeze(-1)
    return xf.to(dtype)


def dequantize_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call, dtype: torch.dtype):
    """``(q, k, v, call)`` of an FP8 call as a plain call in ``dtype`` (descales applied and cleared)."""
    qd = dequantize(q, call.q_descale, call.cu_seqlens_q, dtype)
    kd = dequantize(k, call.k_descale, call.cu_seqlens_k, dtype)
    vd = dequantize(v, call.v_descale, call.cu_seqlens_k, dtype)
    return qd, kd, vd, dataclasses.replace(call, **dict.fromkeys(_DESCALES))


def run_upcast(forward: Callable, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call):
    """Run ``forward(q, k, v, call) -> (out, lse)`` of a backend without FP8 kernels on an FP8
    call: dequantise to :func:`compute_dtype`, compute, return out in :data:`OUT_DTYPE`."""
    qd, kd, vd, plain = dequantize_call(q, k, v, call, compute_dtype(q.device))
    out, lse = forward(qd, kd, vd, plain)
    return out.to(OUT_DTYPE), lse


# ---------------------------------------------------------------------------------------
# user helpers: quantisation and incoherent processing
# ---------------------------------------------------------------------------------------


def _amax_per_head(x: torch.Tensor, hk: int, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """float32 ``(batch, hk)``: max |x| over the tokens, head dim and query heads of each (batch
    row or sequence, KV head)."""
    a = x.detach().abs().float().amax(dim=-1)  # (B, S, H) or (total, H)
    if cu_seqlens is None:
        a = a.amax(dim=1)  # (B, H)
    else:
        nseq = cu_seqlens.shape[0] - 1
        ids = _seq_ids(cu_seqlens, a.shape[0])
        out = a.new_zeros((nseq, a.shape[1]))
        a = out.scatter_reduce(0, ids.long().unsqueeze(1).expand_as(a), a, reduce="amax", include_self=True)
    return a.view(a.shape[0], hk, -1).amax(dim=-1)


def quantize_one(
    x: torch.Tensor,
    *,
    nheads_k: int | None = None,
    granularity: str = "head",
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise one of q, k, v to e4m3 with a descale in flash-attn 3's ``(batch, nheads_k)`` shape.

    Args:
        x: ``(batch, seqlen, nheads, headdim)``, or ``(total, nheads, headdim)`` with ``cu_seqlens``.
        nheads_k: the KV head count of the call (q: its query heads share a descale per KV head);
            default ``x``'s own head count.
        granularity: ``"head"`` (one scale per (batch row or sequence, KV head)) or ``"tensor"``
            (one scale, returned expanded to ``(batch, nheads_k)``).
        cu_seqlens: int32 ``(nseq + 1,)`` for packed (varlen) ``x``.

    Returns:
        ``(x_fp8, descale)``: ``x_fp8 = round_e4m3(x / descale)``, descale float32 ``(batch, nheads_k)``
        with ``descale = amax / 448`` (1 where the block is all zeros), so ``x ~= x_fp8.float() * descale``.
    """
    if granularity not in ("head", "tensor"):
        raise ValueError(f"granularity must be 'head' or 'tensor', got {granularity!r}")
    varlen = cu_seqlens is not None
    if x.dim() != (3 if varlen else 4):
        raise ValueError(f"x must be {'(total, nheads, headdim)' if varlen else '(batch, seqlen, nheads, headdim)'}, "
                         f"got shape {tuple(x.shape)}")  # fmt: skip
    h = x.shape[-2]
    hk = h if nheads_k is None else nheads_k
    if hk < 1 or h % hk:
        raise ValueError(f"nheads_k ({nheads_k}) must divide the head count of x ({h})")
    nb = cu_seqlens.shape[0] - 1 if varlen else x.shape[0]
    if granularity == "tensor":
        amax = x.detach().abs().amax().float().reshape(1, 1).expand(nb, hk)
    else:
        amax = _amax_per_head(x, hk, cu_seqlens)
    descale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).contiguous()
    d = descale.repeat_interleave(h // hk, dim=1)  # (nb, H)
    d = d[_seq_ids(cu_seqlens, x.shape[0])] if varlen else d.unsqueeze(1)
    xq = (x.float() / d.unsqueeze(-1)).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return xq, descale


def quantize(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    granularity: str = "head",
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantise bf16/fp16/fp32 q, k, v (the layouts of ``flash_attn_func``, or of
    ``flash_attn_varlen_func`` with ``cu_seqlens_*``) to e4m3 for an FP8 call.

    Returns ``(q8, k8, v8, q_descale, k_descale, v_descale)``, the descales float32
    ``(batch, nheads_k)`` (see :func:`quantize_one`): pass them as the call's keywords.
    """
    hk = k.shape[-2]
    q8, qd = quantize_one(q, nheads_k=hk, granularity=granularity, cu_seqlens=cu_seqlens_q)
    k8, kd = quantize_one(k, nheads_k=hk, granularity=granularity, cu_seqlens=cu_seqlens_k)
    v8, vd = quantize_one(v, nheads_k=hk, granularity=granularity, cu_seqlens=cu_seqlens_k)
    return q8, k8, v8, qd, kd, vd


def hadamard_transform(x: torch.Tensor) -> torch.Tensor:
    """Orthonormal fast Walsh-Hadamard transform along the last dim (a power of two): ``x @ H / sqrt(d)``
    with the Sylvester Hadamard matrix ``H`` (symmetric, ``H H = d I``), in O(d log d), in x's dtype
    computed in float32."""
    d = x.shape[-1]
    if d < 1 or d & (d - 1):
        raise ValueError(f"the Walsh-Hadamard transform needs a power-of-two last dim, got {d}")
    shape = x.shape
    y = x.float().reshape(-1, d)
    h = 1
    while h < d:
        y = y.view(-1, d // (2 * h), 2, h)
        a, b = y[:, :, 0], y[:, :, 1]
        y = torch.stack((a + b, a - b), dim=2)
        h *= 2
    return (y.reshape(shape) / math.sqrt(d)).to(x.dtype)


def random_rotation(
    headdim: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """A random orthogonal ``(headdim, headdim)`` float32 matrix ``R`` (``R R^T = I``): for
    power-of-two head dims the randomised Hadamard ``diag(s) H / sqrt(d)`` with random signs ``s``,
    otherwise the Q factor of a Gaussian matrix (sign-corrected, Haar distributed)."""
    if headdim & (headdim - 1) == 0:
        s = torch.randint(0, 2, (headdim,), generator=generator).float() * 2 - 1
        return hadamard_transform(torch.diag(s)).to(device)
    g = torch.randn(headdim, headdim, generator=generator)
    qm, r = torch.linalg.qr(g)
    return (qm * torch.sign(torch.diagonal(r)).unsqueeze(0)).to(device)


def rotate_qk(
    q: torch.Tensor, k: torch.Tensor, *, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Incoherent processing: ``(q R, k R)`` for one random orthogonal ``R`` along the head dim
    (:func:`random_rotation`), so that ``q k^T`` (and the attention) is unchanged up to rounding
    while outlier channels are spread over all of them: quantise the result with :func:`quantize`.
    Power-of-two head dims use the fast Walsh-Hadamard transform (random signs, then ``H / sqrt(d)``)."""
    d = q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"q and k must have the same head dim, got {d} and {k.shape[-1]}")
    if d & (d - 1) == 0:
        s = (torch.randint(0, 2, (d,), generator=generator).float() * 2 - 1).to(q.device)
        return hadamard_transform(q.float() * s).to(q.dtype), hadamard_transform(k.float() * s).to(k.dtype)
    r = random_rotation(d, generator=generator, device=q.device)
    return (q.float() @ r).to(q.dtype), (k.float() @ r).to(k.dtype)


__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "OUT_DTYPE",
    "dequantize",
    "hadamard_transform",
    "quantize",
    "quantize_one",
    "random_rotation",
    "rotate_qk",
]
