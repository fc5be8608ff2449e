"""The Hopper backward's last step in one pass: ``dq = scale * acc[..., :D]`` in q's dtype, from the
fp32 dQ accumulator the Gluon kernel adds into (:mod:`.launch_bwd`). torch did it in two passes
(an in-place scale, then the cast copy: ~3x the bytes of this kernel, ~5% of a 4k-token backward
on the H200). Plain ``triton.language``: it also runs under Triton's interpreter (tests)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._ints import cdiv, next_power_of_2


@triton.jit
def _dq_kernel(ACC, DQ, n_rows, H, scale, stride_ab, stride_as, stride_ah, stride_db, stride_ds, stride_dh,
               D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr):  # fmt: skip
    """Rows ``r = s * H + h`` of batch ``program_id(1)``: ``DQ[b, s, h, :D] = scale * ACC[b, s, h, :D]``."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    b = tl.program_id(1).to(tl.int64)
    s = (r // H).to(tl.int64)
    h = r % H
    d = tl.arange(0, BLOCK_D)
    mask = (r < n_rows)[:, None] & (d < D)[None, :]
    src = ACC + b * stride_ab + (s * stride_as + h * stride_ah)[:, None] + d[None, :]
    x = tl.load(src, mask=mask, other=0.0) * scale
    dst = DQ + b * stride_db + (s * stride_ds + h * stride_dh)[:, None] + d[None, :]
    tl.store(dst, x.to(DQ.dtype.element_ty), mask=mask)


def dq_launch(acc: torch.Tensor, dq: torch.Tensor, scale: float) -> tuple[tuple, tuple, dict]:
    """``(grid, args, kwargs)`` of :func:`_dq_kernel`'s launch for :func:`convert_dq` (``acc`` and
    ``dq`` its first two arguments)."""
    B, S, H, D = dq.shape
    block_r = 64
    return (cdiv(S * H, block_r), B), (
        acc, dq, S * H, H, scale, acc.stride(0), acc.stride(1), acc.stride(2), dq.stride(0), dq.stride(1),
        dq.stride(2),
    ), dict(D=D, BLOCK_D=max(16, next_power_of_2(D)), BLOCK_R=block_r, num_warps=4)  # fmt: skip


def convert_dq(acc: torch.Tensor, dq: torch.Tensor, scale: float, kernel=None) -> None:
    """``dq[b, s, h, :] = scale * acc[b, s, h, :D]`` for ``dq`` ``(B, S, H, D)`` (any strides with a
    contiguous head dim) and ``acc`` fp32 ``(B, >= S, H, >= D)`` with a contiguous head dim.
    ``kernel``: a launch wrapper of :func:`_dq_kernel` (the lean launch), else the kernel itself."""
    if acc.stride(-1) != 1 or dq.stride(-1) != 1:
        raise ValueError("convert_dq: acc and dq need a contiguous last dimension")
    if dq.numel() == 0:
        return
    grid, args, kw = dq_launch(acc, dq, scale)
    (kernel or _dq_kernel)[grid](*args, **kw)


@triton.jit
def _dkdv_tail_kernel(WS, DK, DV, t_full, n_kb, n_hk, seqlen_k, stride_kb, stride_ks, stride_kh, stride_vb,
                      stride_vs, stride_vh, D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                      BLOCK_R: tl.constexpr):  # fmt: skip
    """Split tail tile ``j = program_id(0)`` of the persistent backward (tile ``t_full + j``; key block
    fastest, then the KV head, then the batch): its fp32 sums ``WS[j] = (dV, dK)`` (each ``[BLOCK_N,
    BLOCK_D]``, dK already scaled) into dV / dK's rows of that key block (those ``< seqlen_k``), ``BLOCK_R``
    rows at a time."""
    j = tl.program_id(0)
    t = t_full + j
    bh = t // n_kb
    n0 = (t - bh * n_kb) * BLOCK_N
    hk = (bh % n_hk).to(tl.int64)
    b = (bh // n_hk).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    for r0 in tl.static_range(0, BLOCK_N, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rows = (n0 + r).to(tl.int64)
        mask = (rows < seqlen_k)[:, None] & (d < D)[None, :]
        src = WS + j.to(tl.int64) * (2 * BLOCK_N * BLOCK_D) + r[:, None] * BLOCK_D + d[None, :]
        dv = tl.load(src, mask=mask, other=0.0)
        dk = tl.load(src + BLOCK_N * BLOCK_D, mask=mask, other=0.0)
        tl.store(DV + b * stride_vb + hk * stride_vh + rows[:, None] * stride_vs + d[None, :],
                 dv.to(DV.dtype.element_ty), mask=mask)
        tl.store(DK + b * stride_kb + hk * stride_kh + rows[:, None] * stride_ks + d[None, :],
                 dk.to(DK.dtype.element_ty), mask=mask)


def dkdv_tail_launch(ws: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, t_full: int, n_kb: int,
                     block_n: int) -> tuple[tuple, tuple, dict]:
    """``(grid, args, kwargs)`` of :func:`_dkdv_tail_kernel`'s launch for :func:`dkdv_tail` (``ws``,
    ``dk``, ``dv`` its first three arguments)."""
    n_split, D, Hk = ws.shape[0], dk.shape[-1], dk.shape[2]
    return (n_split,), (
        ws, dk, dv, t_full, n_kb, Hk, dk.shape[1], dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0),
        dv.stride(1), dv.stride(2),
    ), dict(D=D, BLOCK_N=block_n, BLOCK_D=ws.shape[-1], BLOCK_R=16, num_warps=4)  # fmt: skip


def dkdv_tail(ws: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor, t_full: int, n_kb: int, kernel=None) -> None:
    """The persistent backward's split tail (``HopperBwdConfig.tail``) into dK / dV: ``ws`` fp32 ``(n_split,
    2, BLOCK_N, BLOCK_D)`` holds, for tile ``t_full + j`` (``j < n_split``; tile ``t = (b * Hk + hk) * n_kb +
    key block``), the sums of its pieces' dV and (scaled) dK; ``dk`` / ``dv`` ``(B, Sk, Hk, D)`` with a
    contiguous head dim get those rows. ``kernel``: a launch wrapper of the kernel (the lean launch)."""
    if dk.stride(-1) != 1 or dv.stride(-1) != 1 or ws.stride(-1) != 1 or not ws.is_contiguous():
        raise ValueError("dkdv_tail: ws contiguous, dk / dv with a contiguous last dimension")
    if ws.shape[0] == 0:
        return
    grid, args, kw = dkdv_tail_launch(ws, dk, dv, t_full, n_kb, ws.shape[2])
    (kernel or _dkdv_tail_kernel)[grid](*args, **kw)


__all__ = ["convert_dq", "dkdv_tail", "dkdv_tail_launch", "dq_launch"]
