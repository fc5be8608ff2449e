"""Forward attention kernel, plus the small @triton.jit helpers the backward shares.

One kernel serves every option through constexpr switches. Scores live in base 2: the
host folds ``log2(e)`` into the scale (and into the softcap / ALiBi constants), so the
online softmax uses ``exp2`` and the stored lse is converted back to natural log.

For one block of query rows the visible key columns split into three runs of key blocks
(see ``_block_range``): masked blocks below, unmasked blocks, masked blocks above. Only
the masked runs pay for mask arithmetic; key blocks outside the window are never visited.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.random import philox_impl

# ---------------------------------------------------------------------------------------
# helpers (inlined into the kernels)
# ---------------------------------------------------------------------------------------


@triton.jit
def _mm(a, b, UPCAST: tl.constexpr):
    """a @ b in fp32. UPCAST: fp32 operands with IEEE products (fp32 inputs, and bf16 under
    the interpreter, whose bf16 dot is wrong)."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr):
    """acc + a @ b in fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc)


@triton.jit
def _tanh(x):
    # tanh(x) = sign(x) * (1 - e) / (1 + e), e = exp(-2|x|): no overflow, no cancellation near 0
    e = tl.exp2(-2.8853900817779268 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _scores(qk, rr, cc, off, qk_scale, cap_out, slope2, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Base-2 scores from raw q.k products; rr / cc are broadcastable row / column indices.

    Returns (s, t) with t = tanh(...) when HAS_SOFTCAP (needed by the backward), else s.
    Plain: s = qk * scale * log2e. Softcap: s = cap * log2e * tanh(qk * scale / cap).
    ALiBi adds -slope * log2e * |i + off - j|.
    """
    if HAS_SOFTCAP:
        t = _tanh(qk * qk_scale)
        s = t * cap_out
    else:
        s = qk * qk_scale
        t = s
    if HAS_ALIBI:
        dist = rr + off - cc
        s = s - slope2 * tl.abs(dist).to(tl.float32)
    return s, t


@triton.jit
def _visible(rr, cc, off, seqlen_r, seqlen_c, wl, wr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr):
    """Visibility of (row, col) pairs: in range, and inside the window (bottom-right aligned)."""
    m = (rr < seqlen_r) & (cc < seqlen_c)
    if HAS_WR:
        m = m & (cc <= rr + off + wr)
    if HAS_WL:
        m = m & (cc >= rr + off - wl)
    return m


@triton.jit
def _keep(seed_lo, seed_hi, rr, cc, bh, thresh):
    """Dropout keep mask: Philox-4x32-10 word 0 of counter (col, row, bh, 0), key (lo, hi);
    keep iff word >> 8 >= thresh (see flashtile.rng)."""
    z = (rr + cc) * 0
    c0 = (cc + z).to(tl.uint32, bitcast=True)
    c1 = (rr + z).to(tl.uint32, bitcast=True)
    c2 = (z + bh).to(tl.uint32, bitcast=True)
    c3 = z.to(tl.uint32, bitcast=True)
    k0 = seed_lo.to(tl.uint32, bitcast=True)
    k1 = seed_hi.to(tl.uint32, bitcast=True)
    r0, _, _, _ = philox_impl(c0, c1, c2, c3, k0, k1, 10)
    return (r0 >> 8).to(tl.int32) >= thresh


@triton.jit
def _block_range(r_lo, r_hi, n_cols, off, wl, wr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, BLOCK: tl.constexpr):
    """Column blocks to visit for rows [r_lo, r_hi) (r_hi > r_lo), as block indices
    nb_lo <= fu_lo <= fu_hi <= nb_hi: [nb_lo, fu_lo) and [fu_hi, nb_hi) need masks, [fu_lo, fu_hi)
    is visible to every row. Row i sees columns [i + off - wl, i + off + wr] (unbounded sides
    when the HAS_ flag is off), clipped to [0, n_cols).

    The backward's dK/dV pass calls it with rows and columns swapped (off -> -off, wl <-> wr).
    """
    lo = r_lo * 0
    full_lo = r_lo * 0
    hi = n_cols + r_lo * 0
    full_hi = n_cols + r_lo * 0
    if HAS_WL:
        lo = tl.maximum(r_lo + off - wl, 0)
        full_lo = tl.maximum(r_hi - 1 + off - wl, 0)
    if HAS_WR:
        hi = tl.minimum(r_hi + off + wr, n_cols)
        full_hi = tl.minimum(r_lo + off + wr + 1, n_cols)
    nb_lo = lo // BLOCK
    nb_hi = (hi + BLOCK - 1) // BLOCK
    empty = hi <= lo
    nb_lo = tl.where(empty, 0, nb_lo)
    nb_hi = tl.where(empty, 0, nb_hi)
    fu_lo = (full_lo + BLOCK - 1) // BLOCK
    fu_hi = full_hi // BLOCK
    fu_lo = tl.minimum(tl.maximum(fu_lo, nb_lo), nb_hi)
    fu_hi = tl.minimum(tl.maximum(fu_hi, fu_lo), nb_hi)
    return nb_lo, fu_lo, fu_hi, nb_hi


# ---------------------------------------------------------------------------------------
# forward
# ---------------------------------------------------------------------------------------


@triton.jit
def _fwd_step(
    acc, l_i, m_i, q, k_base, v_base, start_n, rows, offs_n, offs_d,
    stride_ks, stride_vs, seqlen_q, seqlen_k, off, wl, wr,
    qk_scale, cap_out, slope2, bh, seed_lo, seed_hi, thresh,
    MASKED: tl.constexpr, PAD_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
):
    """One key block of the online softmax: returns the updated (acc, l_i, m_i)."""
    cols = start_n + offs_n
    kb = k_base + tl.cast(start_n, tl.int64) * stride_ks
    vb = v_base + tl.cast(start_n, tl.int64) * stride_vs
    kT_ptrs = kb + offs_n[None, :] * stride_ks + offs_d[:, None]
    v_ptrs = vb + offs_n[:, None] * stride_vs + offs_d[None, :]
    if MASKED:
        kT = tl.load(kT_ptrs, mask=(cols[None, :] < seqlen_k) & (offs_d[:, None] < HEAD_DIM), other=0.0)
    elif PAD_D:
        kT = tl.load(kT_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
    else:
        kT = tl.load(kT_ptrs)
    qk = _mm(q, kT, UPCAST)
    s, t = _scores(qk, rows[:, None], cols[None, :], off, qk_scale, cap_out, slope2, HAS_SOFTCAP, HAS_ALIBI)
    if MASKED:
        vis = _visible(rows[:, None], cols[None, :], off, seqlen_q, seqlen_k, wl, wr, HAS_WL, HAS_WR)
        s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        # a row that has seen no visible key yet keeps m = -inf: subtract 0 instead (no NaN)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if HAS_DROPOUT:
        keep = _keep(seed_lo, seed_hi, rows[:, None], cols[None, :], bh, thresh)
        p = tl.where(keep, p, 0.0)
    if MASKED:
        v = tl.load(v_ptrs, mask=(cols[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    elif PAD_D:
        v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
    else:
        v = tl.load(v_ptrs)
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
):
    """Grid (query blocks, nheads, batch or sequences). Writes out and lse (natural log)."""
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    pid_m = tl.program_id(0)
    if REVERSE_M:  # causal: the heaviest query blocks (last rows) start first
        pid_m = tl.num_programs(0) - 1 - pid_m
    h = tl.program_id(1)
    b = tl.program_id(2)
    if IS_VARLEN:
        q_start = tl.load(CU_Q + b)
        seqlen_q = tl.load(CU_Q + b + 1) - q_start
        k_start = tl.load(CU_K + b)
        seqlen_k = tl.load(CU_K + b + 1) - k_start
    else:
        q_start = b * 0
        k_start = b * 0
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    hk = h // group
    off = seqlen_k - seqlen_q
    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + (q_start + m0).to(tl.int64) * stride_qs
    o_base = O + b64 * stride_ob + h.to(tl.int64) * stride_oh + (q_start + m0).to(tl.int64) * stride_os
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_ks
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vs
    lse_base = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start + m0

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = m0 + offs_m
    row_ok = rows < seqlen_q
    q_ptrs = q_base + offs_m[:, None] * stride_qs + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)

    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(ALIBI + b64 * stride_ab + h) * alibi_mul
    bh = b * nheads + h

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    r_hi = tl.minimum(m0 + BLOCK_M, seqlen_q)
    nb_lo, fu_lo, fu_hi, nb_hi = _block_range(m0, r_hi, seqlen_k, off, window_left, window_right,
                                              HAS_WL, HAS_WR, BLOCK_N)
    # unmasked key blocks: no mask arithmetic, no bounds checks
    for blk in range(fu_lo, fu_hi):
        acc, l_i, m_i = _fwd_step(
            acc, l_i, m_i, q, k_base, v_base, blk * BLOCK_N, rows, offs_n, offs_d,
            stride_ks, stride_vs, seqlen_q, seqlen_k, off, window_left, window_right,
            qk_scale, cap_out, slope2, bh, seed_lo, seed_hi, thresh,
            False, PAD_D, HEAD_DIM, HAS_WL, HAS_WR, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, UPCAST)
    # boundary key blocks (window edges, causal diagonal, ragged end of the keys)
    n_a = fu_lo - nb_lo
    n_masked = n_a + nb_hi - fu_hi
    for i in range(0, n_masked):
        blk = tl.where(i < n_a, nb_lo + i, fu_hi + i - n_a)
        acc, l_i, m_i = _fwd_step(
            acc, l_i, m_i, q, k_base, v_base, blk * BLOCK_N, rows, offs_n, offs_d,
            stride_ks, stride_vs, seqlen_q, seqlen_k, off, window_left, window_right,
            qk_scale, cap_out, slope2, bh, seed_lo, seed_hi, thresh,
            True, PAD_D, HEAD_DIM, HAS_WL, HAS_WR, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, UPCAST)

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc * (drop_scale / l_safe)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * 0.6931471805599453)
    tl.store(lse_base + offs_m, lse, mask=row_ok)
    o_ptrs = o_base + offs_m[:, None] * stride_os + offs_d[None, :]
    tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
