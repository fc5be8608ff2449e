"""Forward attention kernel.

One kernel serves every option through constexpr switches; the pieces it shares with the
backward and decode kernels (sequence bounds, pointers, scores, masks, dropout, the online
softmax) are in :mod:`.common`. Scores live in base 2 and the stored lse is in natural log.

For one block of query rows the visible key columns split into three runs of key blocks
(see ``_block_range``): masked blocks below, unmasked blocks, masked blocks above. Only
the masked runs pay for mask arithmetic; key blocks outside the window are never visited.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    LOG2E,
    _alibi_slope,
    _block_id,
    _block_ptrs,
    _block_range,
    _head_ptr,
    _keep,
    _load_block,
    _masked_block,
    _mma,
    _row_ptr,
    _score_tile,
    _seqlens_qk,
    _softmax_end,
    _softmax_sink,
    _softmax_step,
)


@triton.jit
def _fwd_step(
    acc, l_i, m_i, q, k_base, v_base, start_n, rows, offs_n, offs_d,
    stride_ks, stride_vs, seqlen_q, seqlen_k, off, wl, wr,
    qk_scale, cap_out, slope2, bh, seed_lo, seed_hi, thresh,
    MASKED: tl.constexpr, PAD_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    offs_dv, PAD_DV: tl.constexpr, HEAD_DIM_V: tl.constexpr,
):
    """One key block of the online softmax: returns the updated (acc, l_i, m_i). v's head dim is
    HEAD_DIM_V (columns offs_dv)."""
    cols = start_n + offs_n
    kT_ptrs = _block_ptrs(k_base, start_n, offs_n, offs_d, stride_ks, True)
    v_ptrs = _block_ptrs(v_base, start_n, offs_n, offs_dv, stride_vs, False)
    kT = _load_block(kT_ptrs, cols, seqlen_k, offs_d, HEAD_DIM, MASKED, PAD_D, True)
    s, t = _score_tile(q, kT, rows[:, None], cols[None, :], off, seqlen_q, seqlen_k, wl, wr, qk_scale, cap_out,
                       slope2, MASKED, HAS_WL, HAS_WR, HAS_SOFTCAP, HAS_ALIBI, UPCAST)
    p, alpha, l_i, m_new = _softmax_step(s, m_i, l_i, MASKED)
    acc = acc * alpha[:, None]
    if HAS_DROPOUT:
        keep = _keep(seed_lo, seed_hi, rows[:, None], cols[None, :], bh, thresh)
        p = tl.where(keep, p, 0.0)
    v = _load_block(v_ptrs, cols, seqlen_k, offs_dv, HEAD_DIM_V, MASKED, PAD_DV, False)
    acc = _mma(p.to(v.dtype), v, acc, UPCAST)
    return acc, l_i, m_new


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "window_left", "window_right", "thresh", "seed_lo", "seed_hi"])
def _fwd_kernel(
    Q, K, V, O, LSE, ALIBI, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    stride_lb, stride_lh, stride_ab,
    seqlen_q, seqlen_k, nheads, group,
    qk_scale, cap_out, alibi_mul,
    window_left, window_right,
    thresh, drop_scale, seed_lo, seed_hi,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, REVERSE_M: tl.constexpr, UPCAST: tl.constexpr,
    SINK=None, HAS_SINK: tl.constexpr = False, HEAD_DIM_V: tl.constexpr = 0, BLOCK_DV: tl.constexpr = 0,
):
    """Grid (query blocks, nheads, batch or sequences). Writes out and lse (natural log).
    HAS_SINK: SINK holds one fp32 logit per query head, folded into the denominator after the keys.
    HEAD_DIM_V / BLOCK_DV: v's (and out's) head dim and its block, when it differs from q/k's
    (0: the same)."""
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    HD_V: tl.constexpr = HEAD_DIM_V if HEAD_DIM_V > 0 else HEAD_DIM
    BDV: tl.constexpr = BLOCK_DV if BLOCK_DV > 0 else BLOCK_D
    PAD_DV: tl.constexpr = BDV != HD_V
    pid_m = _block_id(REVERSE_M)  # causal: the heaviest query blocks (last rows) start first
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seqlen_q, k_start, seqlen_k = _seqlens_qk(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    hk = h // group
    off = seqlen_k - seqlen_q
    b64 = b.to(tl.int64)
    q_base = _row_ptr(Q, b64, h, q_start + m0, stride_qb, stride_qh, stride_qs)
    o_base = _row_ptr(O, b64, h, q_start + m0, stride_ob, stride_oh, stride_os)
    k_base = _row_ptr(K, b64, hk, k_start, stride_kb, stride_kh, stride_ks)
    v_base = _row_ptr(V, b64, hk, k_start, stride_vb, stride_vh, stride_vs)
    lse_base = _head_ptr(LSE, b64, h, stride_lb, stride_lh) + q_start + m0

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BDV)
    rows = m0 + offs_m
    row_ok = rows < seqlen_q
    q_ptrs = q_base + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)

    slope2 = _alibi_slope(ALIBI, b64, h, stride_ab, alibi_mul, HAS_ALIBI)
    bh = b * nheads + h

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BDV], dtype=tl.float32)

    r_hi = tl.minimum(m0 + BLOCK_M, seqlen_q)
    nb_lo, fu_lo, fu_hi, nb_hi = _block_range(m0, r_hi, seqlen_k, off, window_left, window_right,
                                              HAS_WL, HAS_WR, BLOCK_N)
    # unmasked key blocks: no mask arithmetic, no bounds checks
    for blk in range(fu_lo, fu_hi):
        acc, l_i, m_i = _fwd_step(
            acc, l_i, m_i, q, k_base, v_base, blk * BLOCK_N, rows, offs_n, offs_d,
            stride_ks, stride_vs, seqlen_q, seqlen_k, off, window_left, window_right,
            qk_scale, cap_out, slope2, bh, seed_lo, seed_hi, thresh,
            False, PAD_D, HEAD_DIM, HAS_WL, HAS_WR, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, UPCAST, offs_dv, PAD_DV, HD_V)
    # boundary key blocks (window edges, causal diagonal, ragged end of the keys)
    n_a = fu_lo - nb_lo
    n_masked = n_a + nb_hi - fu_hi
    for i in range(0, n_masked):
        blk = _masked_block(i, n_a, nb_lo, fu_hi)
        acc, l_i, m_i = _fwd_step(
            acc, l_i, m_i, q, k_base, v_base, blk * BLOCK_N, rows, offs_n, offs_d,
            stride_ks, stride_vs, seqlen_q, seqlen_k, off, window_left, window_right,
            qk_scale, cap_out, slope2, bh, seed_lo, seed_hi, thresh,
            True, PAD_D, HEAD_DIM, HAS_WL, HAS_WR, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, UPCAST, offs_dv, PAD_DV, HD_V)

    if HAS_SINK:
        acc, l_i, m_i = _softmax_sink(acc, m_i, l_i, tl.load(SINK + h) * LOG2E)
    out, lse = _softmax_end(acc, m_i, l_i, drop_scale, False)
    tl.store(lse_base + offs_m, lse, mask=row_ok)
    o_ptrs = o_base + offs_m[:, None] * stride_os + offs_dv[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HD_V))
