"""V^T for the FP8 kernel in one pass: a Triton-language transpose of the 1-byte V with the keys of
each 32-key chunk reordered (dense) and zero padding, instead of torch's strided copy (~180-200 us
for 32 MiB on the H200, i.e. 6-20% of an FP8 forward). Plain ``triton.language``: no Gluon, so it
also runs under Triton's interpreter (tests). See :func:`.launch.transpose_v` for the layout."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._ints import cdiv, next_power_of_2


def key_perm32() -> list[int]:
    """The FP8 kernel's key order within each 32-key chunk of a dense V^T (``fwd_fp8._p_operand``):
    position ``k = 16h + 4c + 2x + e`` holds key ``16h + 8x + 2c + e``."""
    return [16 * (k // 16) + 8 * ((k // 2) % 2) + 2 * ((k // 4) % 4) + k % 2 for k in range(32)]


@triton.jit
def _vt_kernel(V, VT, S, SP, stride_vb, stride_vs, stride_vh, stride_tb, stride_th, stride_td,
               D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr, PERM: tl.constexpr):  # fmt: skip
    """VT[b, h, d, pos] = V[b, key(pos), h, d] for pos < SP (0 where key(pos) >= S); key(pos) is
    pos, or with PERM its 32-chunk reordering (:func:`key_perm32`). Bytes (uint8 views)."""
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    pos = pid * BLOCK_S + tl.arange(0, BLOCK_S)
    if PERM:
        k = pos % 32
        key = pos - k + 16 * (k // 16) + 8 * ((k // 2) % 2) + 2 * ((k // 4) % 4) + k % 2
    else:
        key = pos
    d = tl.arange(0, BLOCK_D)
    src = V + b.to(tl.int64) * stride_vb + h * stride_vh + key.to(tl.int64)[:, None] * stride_vs + d[None, :]
    x = tl.load(src, mask=(key < S)[:, None] & (d < D)[None, :], other=0)
    dst = VT + b.to(tl.int64) * stride_tb + h.to(tl.int64) * stride_th + d.to(tl.int64)[:, None] * stride_td
    tl.store(dst + pos[None, :], tl.trans(x), mask=(d < D)[:, None] & (pos < SP)[None, :])


def transpose_v_kernel(v: torch.Tensor, varlen: bool) -> torch.Tensor:
    """The kernel version of :func:`.launch.transpose_v` (same result; V's head dim contiguous)."""
    if v.stride(-1) != 1:
        v = v.contiguous()
    raw = v.view(torch.uint8) if v.dtype.itemsize == 1 else v
    B, S, Hk, D = raw.shape
    sp = (S + 15) // 16 * 16 if varlen else (S + 31) // 32 * 32
    vt = torch.empty((B, Hk, D, sp), dtype=raw.dtype, device=v.device)
    if B and Hk and D and sp:
        block_s = 64
        _vt_kernel[(cdiv(sp, block_s), Hk, B)](
            raw, vt, S, sp, raw.stride(0), raw.stride(1), raw.stride(2), vt.stride(0), vt.stride(1), vt.stride(2),
            D=D, BLOCK_D=max(16, next_power_of_2(D)), BLOCK_S=block_s, PERM=not varlen, num_warps=4,
        )  # fmt: skip
    if varlen:
        vt = vt[0]
    return vt.view(v.dtype) if v.dtype.itemsize == 1 else vt


__all__ = ["key_perm32", "transpose_v_kernel"]
