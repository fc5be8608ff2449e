"""Split-KV attention over a KV cache (decoding and chunked prefill), straight from the cache.

The cache is read in place: paged ``(num_blocks, page, Hk, D)`` with a block table, or dense
``(B_cache, S_cache, Hk, D)`` seen as one page of ``S_cache`` tokens per row (its block table
is ``cache_batch_idx``). Any page size works: each key's address is
``block_table[b, p // page] * stride_blk + (p % page) * stride_tok``.

Grid: ``(B * Hk, num_splits, row blocks)``. The ``G = H / Hk`` query heads that share a KV head
are packed into the rows of one program (row ``r`` = query ``r // G``, head ``kh * G + r % G``),
so each KV head is read once per split. Each split covers a contiguous piece of the row's key
range and writes a partial ``(out, lse)``; ``_merge_kernel`` combines the pieces by
log-sum-exp (the rule of :func:`flashtile.merge.merge_states`, fused into one launch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...spec import AttnSpec
from .fwd import _mm, _mma, _tanh

LOG2E = 1.4426950408889634  # host side only: kernels may not read non-constexpr globals


@triton.jit
def _decode_kernel(
    Q, K, V, BT, SEQK, LEFTPAD, SLOPES, O, LSE,
    stride_qb, stride_qs, stride_qh,
    stride_kblk, stride_kt, stride_kh,
    stride_vblk, stride_vt, stride_vh,
    stride_btb,
    stride_os, stride_ob, stride_oq, stride_oh,
    stride_ls, stride_lb, stride_lh,
    stride_ab,
    seqlen_q, page, chunk, Hk, G,
    qk_scale, cap_out, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    UPCAST: tl.constexpr, KV_MODE: tl.constexpr,
):  # fmt: skip
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    pid_m = tl.program_id(2)
    b = pid_bh // Hk
    kh = pid_bh % Hk

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < seqlen_q * G
    t = rows // G
    head = kh * G + rows % G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM

    q = tl.load(
        Q + b * stride_qb + t[:, None] * stride_qs + head[:, None] * stride_qh + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )  # fmt: skip

    lp = tl.load(LEFTPAD + b)
    n_keys = tl.load(SEQK + b) - lp  # keys of this row, numbered from 0 at leftpad
    off = n_keys - seqlen_q  # key column aligned with query 0
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_keys)
    t_min = pid_m * BLOCK_M // G
    t_max = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, seqlen_q - 1)
    if HAS_WR:
        hi = tl.minimum(hi, t_max + off + window_right + 1)
    if HAS_WL:
        # stay on whole key blocks (aligned pages); the mask drops the columns before the window
        lo = tl.maximum(lo, t_min + off - window_left) // BLOCK_N * BLOCK_N
    if HAS_ALIBI:
        slope = tl.load(SLOPES + b * stride_ab + head, mask=row_ok, other=0.0) * 1.4426950408889634  # log2(e)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        pos = cols + lp
        if KV_MODE == 0:  # dense: the row's one "page" holds every position
            blk = tl.load(BT + b * stride_btb).to(tl.int64)
            tok = pos
        elif KV_MODE == 1:  # pages hold whole key blocks: one block id per tile, contiguous rows
            blk = tl.load(BT + b * stride_btb + j0 // page).to(tl.int64)
            tok = pos % page
        else:  # any page size: a block id per key
            blk = tl.load(BT + b * stride_btb + pos // page, mask=col_ok, other=0).to(tl.int64)
            blk = blk[:, None]
            tok = pos % page
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(K + blk * stride_kblk + tok[:, None] * stride_kt + kh * stride_kh + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # fmt: skip
        qk = _mm(q, tl.trans(k), UPCAST)
        if HAS_SOFTCAP:
            s = _tanh(qk * qk_scale) * cap_out
        else:
            s = qk * qk_scale
        if HAS_ALIBI:
            dist = tl.abs(t[:, None] + off - cols[None, :]).to(tl.float32)
            s = s - slope[:, None] * dist
        vis = col_ok[None, :] & row_ok[:, None]
        if HAS_WR:
            vis = vis & (cols[None, :] <= t[:, None] + off + window_right)
        if HAS_WL:
            vis = vis & (cols[None, :] >= t[:, None] + off - window_left)
        s = tl.where(vis, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(V + blk * stride_vblk + tok[:, None] * stride_vt + kh * stride_vh + offs_d[None, :],
                    mask=kv_mask, other=0.0)  # fmt: skip
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
        m_i = m_new

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)  # ln(2)
    tl.store(
        O + split * stride_os + b * stride_ob + t[:, None] * stride_oq + head[:, None] * stride_oh + offs_d[None, :],
        out, mask=row_ok[:, None] & d_ok[None, :],
    )  # fmt: skip
    tl.store(LSE + split * stride_ls + b * stride_lb + head * stride_lh + t, lse, mask=row_ok)


@triton.jit
def _merge_kernel(
    O, LSE, OUT, LSE_OUT, splits,
    stride_os, stride_ob, stride_oq, stride_oh,
    stride_ls, stride_lb, stride_lh,
    stride_ub, stride_uq, stride_uh,
    stride_mb, stride_mh,
    H, Sq,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One (batch, query, head) row: out = sum_i exp(lse_i - lse) out_i, lse = logsumexp_i lse_i."""
    pid = tl.program_id(0)
    hh = pid % H
    t = (pid // H) % Sq
    b = pid // (H * Sq)
    si = tl.arange(0, BLOCK_S)
    s_ok = si < splits
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    lse = tl.load(LSE + si * stride_ls + b * stride_lb + hh * stride_lh + t, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)
    tot = tl.sum(w, 0)
    o = tl.load(O + si[:, None] * stride_os + b * stride_ob + t * stride_oq + hh * stride_oh + offs_d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    out = tl.sum(w[:, None] * o, 0) / tl.where(tot == 0.0, 1.0, tot)
    tl.store(OUT + b * stride_ub + t * stride_uq + hh * stride_uh + offs_d, out.to(OUT.dtype.element_ty), mask=d_ok)
    tl.store(LSE_OUT + b * stride_mb + hh * stride_mh + t, tl.where(tot == 0.0, float("-inf"), m_safe + tl.log(tot)))


def _interpret() -> bool:
    return type(_decode_kernel).__name__ == "InterpretedFunction"


def choose_splits(batch: int, hk: int, row_blocks: int, max_keys: int, device: torch.device) -> int:
    """Enough programs to fill the device about twice, each with at least 256 keys, at most 64 pieces."""
    if device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    programs = max(1, batch * hk * row_blocks)
    return max(1, min(triton.cdiv(2 * sms, programs), triton.cdiv(max(max_keys, 1), 256), 64))


def decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seqlens_k: torch.Tensor,
    leftpad: torch.Tensor,
    spec: AttnSpec,
    *,
    alibi_slopes: torch.Tensor | None,
    max_keys: int,
    num_splits: int = 0,
    dense: bool = False,
    has_leftpad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q (B, Sq, H, D)`` over the cache; returns (out like q, lse (B, H, Sq) fp32).

    ``block_table`` int32 ``(B, max_blocks)`` into the first dim of the cache ``(nblk, page, Hk, D)``;
    row ``b``'s keys are cache positions ``[leftpad[b], seqlens_k[b])`` (int32 ``(B,)`` each).
    ``max_keys`` bounds ``seqlens_k - leftpad`` (sizes the splits). ``dense``: one page per row
    (``block_table`` holds cache rows); ``has_leftpad=False`` promises ``leftpad == 0``, which lets
    pages that are multiples of the key block be read one block id per tile.
    """
    B, Sq, H, D = q.shape
    Hk = k_cache.shape[2]
    G = H // Hk
    interp = _interpret()
    block_m = 16 if Sq * G <= 16 else (32 if interp else 64)
    block_n = 32 if interp else (64 if D > 128 else 128)
    block_d = max(16, triton.next_power_of_2(D))
    row_blocks = triton.cdiv(Sq * G, block_m)
    splits = num_splits if num_splits > 0 else choose_splits(B, Hk, row_blocks, max_keys, q.device)
    chunk = triton.cdiv(max(max_keys, 1), splits)
    chunk = triton.cdiv(chunk, block_n) * block_n  # whole key blocks per piece
    splits = max(1, triton.cdiv(max(max_keys, 1), chunk))
    page = k_cache.shape[1]
    kv_mode = 0 if dense else (1 if not has_leftpad and page % block_n == 0 else 2)
    o = torch.empty((splits, B, Sq, H, D), dtype=torch.float32, device=q.device)
    lse = torch.empty((splits, B, H, Sq), dtype=torch.float32, device=q.device)
    if spec.softcap > 0:
        qk_scale, cap_out = spec.softmax_scale / spec.softcap, spec.softcap * LOG2E
    else:
        qk_scale, cap_out = spec.softmax_scale * LOG2E, 0.0
    num_warps = 4
    with torch.cuda.device(q.device) if q.is_cuda else _Null():
        _decode_kernel[(B * Hk, splits, row_blocks)](
            q, k_cache, v_cache, block_table, seqlens_k, leftpad, alibi_slopes, o, lse,
            q.stride(0), q.stride(1), q.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            block_table.stride(0),
            o.stride(0), o.stride(1), o.stride(2), o.stride(3),
            lse.stride(0), lse.stride(1), lse.stride(2),
            alibi_slopes.stride(0) if alibi_slopes is not None else 0,
            Sq, page, chunk, Hk, G,
            qk_scale, cap_out, spec.window_left, spec.window_right,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=block_m, BLOCK_N=block_n,
            HAS_SOFTCAP=spec.softcap > 0, HAS_ALIBI=alibi_slopes is not None,
            HAS_WL=spec.window_left >= 0, HAS_WR=spec.window_right >= 0,
            UPCAST=q.dtype == torch.float32 or (interp and q.dtype == torch.bfloat16), KV_MODE=kv_mode,
            num_warps=num_warps, num_stages=2,
        )  # fmt: skip
        if splits == 1:
            return o[0].to(q.dtype), lse[0]
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        lse_m = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
        _merge_kernel[(B * Sq * H,)](
            o, lse, out, lse_m, splits,
            o.stride(0), o.stride(1), o.stride(2), o.stride(3),
            lse.stride(0), lse.stride(1), lse.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            lse_m.stride(0), lse_m.stride(1),
            H, Sq, HEAD_DIM=D, BLOCK_S=max(2, triton.next_power_of_2(splits)), BLOCK_D=block_d,
        )  # fmt: skip
    return out, lse_m


class _Null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False
