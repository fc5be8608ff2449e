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


__all__ = ["convert_dq", "dq_launch"]
