"""Backward attention kernels: preprocess (delta = rowsum(dO * O)), dK/dV pass, dQ pass.

Both main passes recompute P = exp2(s - lse) from the saved lse. The dK/dV pass owns one
block of keys of one key/value head and loops over every query head of its GQA group, so
the group's dK/dV sum stays in registers; the dQ pass owns one block of query rows. By
default no pass uses atomics and the backward is bitwise reproducible. The faster option
(``ATOMIC_DQ``, used only when ``deterministic=False`` and the config asks for it) fuses the
dQ pass into the dK/dV pass, adding dQ tiles into an fp32 buffer with atomics. ``ONE_PASS``
(dense calls whose keys fit in one key block: small calls, issue 16) does the whole backward in
the dK/dV pass, one launch: delta from O and dO per query block, and each dQ tile stored once
(there is no other key block to add to it): no preprocess or dQ launch, no atomics, reproducible.

With dropout, Z the keep mask and r = 1 / (1 - p):
    dV = (P * Z * r)^T dO,  dP = (dO V^T) * Z * r,  dS = P * (dP - delta),
and delta = rowsum(dO * O) = rowsum(P * dP). Softcap multiplies dS by (1 - tanh^2).
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
    _mm,
    _mma,
    _row_ptr,
    _score_tile,
    _seqlens_qk,
    _tile_ptrs,
)


@triton.jit
def _bwd_preprocess(
    O, DO, DELTA,
    stride_ob, stride_os, stride_oh,
    stride_dob, stride_dos, stride_doh,
    stride_db, stride_dh,
    seqlen,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Grid (row blocks, nheads, batch). Varlen runs as one batch over all packed rows."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (rows[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM)
    r64 = rows.to(tl.int64)
    o = tl.load(_head_ptr(O, b, h, stride_ob, stride_oh) + r64[:, None] * stride_os + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(_head_ptr(DO, b, h, stride_dob, stride_doh) + r64[:, None] * stride_dos + offs_d[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(_head_ptr(DELTA, b, h, stride_db, stride_dh) + rows, delta, mask=rows < seqlen)


@triton.jit
def _load_lse2(lse_ptrs, mask):
    """lse in base 2, with +inf for rows that saw no key, so that exp2(s - lse2) = 0 there."""
    lse = tl.load(lse_ptrs, mask=mask, other=float("-inf"))
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _dscores(p, dp, delta, t, HAS_SOFTCAP: tl.constexpr):
    """dS = P * (dP - delta), times tanh' = 1 - t^2 under softcap (t from _scores)."""
    ds = p * (dp - delta)
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    return ds


# ---------------------------------------------------------------------------------------
# dK / dV
# ---------------------------------------------------------------------------------------


@triton.jit
def _store_rows(base, start_m, offs_m, offs_d, stride_s, seqlen, HEAD_DIM: tl.constexpr, x):
    """x into rows ``start_m + offs_m`` (those < seqlen) and columns offs_d (< HEAD_DIM) of base."""
    rows = start_m + offs_m
    tl.store(_block_ptrs(base, start_m, offs_m, offs_d, stride_s, False), x,
             mask=(rows[:, None] < seqlen) & (offs_d[None, :] < HEAD_DIM))  # fmt: skip


@triton.jit
def _dkdv_step(
    dk, dv, k, v, q_base, do_base, dq_base, lse_base, delta_base, start_m, cols, offs_m, offs_d,
    stride_qs, stride_dos, stride_dqs, seqlen_q, seqlen_k, off, wl, wr,
    qk_scale, cap_out, slope2, bh, seed_lo, seed_hi, thresh, drop_scale,
    MASKED: tl.constexpr, PAD_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    offs_dv, PAD_DV: tl.constexpr, HEAD_DIM_V: tl.constexpr, ONE_PASS: tl.constexpr, sm_scale,
):
    """One block of query rows against this program's key block, in transposed orientation
    (keys along dim 0): returns the updated (dk, dv). ATOMIC_DQ: also adds this tile's share
    of dQ (unscaled, fp32) into dq_base with relaxed atomics (not bitwise reproducible).
    ONE_PASS: delta_base is the output O's rows (dO's strides; delta = rowsum(dO * O) here) and
    this tile's dQ, the whole of it, is stored scaled into dq_base (dq's dtype).
    dO, v and dv have v's head dim HEAD_DIM_V (columns offs_dv)."""
    rows = start_m + offs_m
    qT_ptrs = _block_ptrs(q_base, start_m, offs_m, offs_d, stride_qs, True)
    do_ptrs = _block_ptrs(do_base, start_m, offs_m, offs_dv, stride_dos, False)
    qT = _load_block(qT_ptrs, rows, seqlen_q, offs_d, HEAD_DIM, MASKED, PAD_D, True)
    do = _load_block(do_ptrs, rows, seqlen_q, offs_dv, HEAD_DIM_V, MASKED, PAD_DV, False)
    if ONE_PASS:
        o = _load_block(_block_ptrs(delta_base, start_m, offs_m, offs_dv, stride_dos, False), rows, seqlen_q, offs_dv,
                        HEAD_DIM_V, MASKED, PAD_DV, False)  # fmt: skip
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        lse2 = _load_lse2(lse_base + rows, rows < seqlen_q)
    elif MASKED:
        row_ok = rows < seqlen_q
        lse2 = _load_lse2(lse_base + rows, row_ok)
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    else:
        lse2 = _load_lse2(lse_base + rows, rows >= 0)
        delta = tl.load(delta_base + rows)
    if HAS_SOFTCAP:
        # dP first: the tanh tile then lives only through the elementwise code, not across a product
        dpT = _mm(v, tl.trans(do), UPCAST)
    sT, tT = _score_tile(k, qT, rows[None, :], cols[:, None], off, seqlen_q, seqlen_k, wl, wr, qk_scale, cap_out,
                         slope2, MASKED, HAS_WL, HAS_WR, HAS_SOFTCAP, HAS_ALIBI, UPCAST, FAST_TANH=not UPCAST)
    pT = tl.exp2(sT - lse2[None, :])
    if ONE_PASS:
        # the key block's padding keys (>= seqlen_k: zero-filled, so s = 0 where the tile is not
        # MASKED): their dS enters this tile's dQ here (the dQ kernel of three passes masks them), and
        # exp2(0 - lse2) overflows fp16 for rows whose lse < ~-11 (inf * a zero key = NaN in dQ)
        pT = tl.where(cols[:, None] < seqlen_k, pT, 0.0)
    if not HAS_SOFTCAP:
        dpT = _mm(v, tl.trans(do), UPCAST)
    if HAS_DROPOUT:
        keep = _keep(seed_lo, seed_hi, rows[None, :], cols[:, None], bh, thresh)
        pdT = tl.where(keep, pT * drop_scale, 0.0)
        dpT = tl.where(keep, dpT * drop_scale, 0.0)
    else:
        pdT = pT
    dv = _mma(pdT.to(do.dtype), do, dv, UPCAST)
    dsT = _dscores(pT, dpT, delta[None, :], tT, HAS_SOFTCAP).to(qT.dtype)
    dk = _mma(dsT, tl.trans(qT), dk, UPCAST)
    if ONE_PASS:
        dq = _mm(tl.trans(dsT), k, UPCAST) * sm_scale
        _store_rows(dq_base, start_m, offs_m, offs_d, stride_dqs, seqlen_q, HEAD_DIM, dq.to(dq_base.dtype.element_ty))
    elif ATOMIC_DQ:
        dq = _mm(tl.trans(dsT), k, UPCAST)
        dq_ptrs = _block_ptrs(dq_base, start_m, offs_m, offs_d, stride_dqs, False)
        if MASKED:
            tl.atomic_add(dq_ptrs, dq, mask=(rows[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM), sem="relaxed")
        elif PAD_D:
            tl.atomic_add(dq_ptrs, dq, mask=offs_d[None, :] < HEAD_DIM, sem="relaxed")
        else:
            tl.atomic_add(dq_ptrs, dq, sem="relaxed")
    return dk, dv


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "window_left", "window_right", "thresh", "seed_lo", "seed_hi"])
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ, ALIBI, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dkb, stride_dks, stride_dkh,
    stride_dvb, stride_dvs, stride_dvh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh, stride_ab,
    seqlen_q, seqlen_k, nheads, group,
    qk_scale, cap_out, alibi_mul, sm_scale,
    window_left, window_right,
    thresh, drop_scale, seed_lo, seed_hi,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, UPCAST: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    HEAD_DIM_V: tl.constexpr = 0, BLOCK_DV: tl.constexpr = 0, ONE_PASS: tl.constexpr = False,
):
    """Grid (key blocks, nheads_k, batch or sequences). DELTA has LSE's strides. ATOMIC_DQ:
    DQ is a zeroed fp32 buffer that collects the unscaled dQ (the dQ kernel is then skipped).
    HEAD_DIM_V / BLOCK_DV: v's head dim and block when it differs from q/k's (0: the same).
    ONE_PASS (dense calls with seqlen_k <= BLOCK_N: grid (1, nheads_k, batch)): DELTA is the
    output O, with dO's strides; DQ is dq itself (q's dtype), every row of it written here (rows
    of query blocks that see no key get zeros), so no preprocess and no dQ launch."""
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    HD_V: tl.constexpr = HEAD_DIM_V if HEAD_DIM_V > 0 else HEAD_DIM
    BDV: tl.constexpr = BLOCK_DV if BLOCK_DV > 0 else BLOCK_D
    PAD_DV: tl.constexpr = BDV != HD_V
    pid_n = tl.program_id(0)
    hk = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seqlen_q, k_start, seqlen_k = _seqlens_qk(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen_k:
        return
    off = seqlen_k - seqlen_q
    b64 = b.to(tl.int64)
    kv_row0 = (k_start + n0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BDV)
    cols = n0 + offs_n
    kv_mask = (cols[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    v_mask = (cols[:, None] < seqlen_k) & (offs_dv[None, :] < HD_V)
    k = tl.load(_tile_ptrs(K, b64, hk, kv_row0, offs_n, offs_d, stride_kb, stride_kh, stride_ks), mask=kv_mask, other=0.0)
    v = tl.load(_tile_ptrs(V, b64, hk, kv_row0, offs_n, offs_dv, stride_vb, stride_vh, stride_vs), mask=v_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BDV], dtype=tl.float32)

    # query rows that see this key block: the forward's rule with rows and columns swapped
    c_hi = tl.minimum(n0 + BLOCK_N, seqlen_k)
    mb_lo, fu_lo, fu_hi, mb_hi = _block_range(n0, c_hi, seqlen_q, -off, window_right, window_left,
                                              HAS_WR, HAS_WL, BLOCK_M)
    n_a = fu_lo - mb_lo
    n_masked = n_a + mb_hi - fu_hi
    q_row0 = q_start.to(tl.int64)
    for g in range(0, group):
        h = hk * group + g
        q_base = _row_ptr(Q, b64, h, q_row0, stride_qb, stride_qh, stride_qs)
        do_base = _row_ptr(DO, b64, h, q_row0, stride_dob, stride_doh, stride_dos)
        dq_base = _row_ptr(DQ, b64, h, q_row0, stride_dqb, stride_dqh, stride_dqs)
        lse_base = _head_ptr(LSE, b64, h, stride_lb, stride_lh) + q_start
        if ONE_PASS:  # DELTA is O (dO's strides)
            delta_base = _row_ptr(DELTA, b64, h, q_row0, stride_dob, stride_doh, stride_dos)
        else:
            delta_base = _head_ptr(DELTA, b64, h, stride_lb, stride_lh) + q_start
        slope2 = _alibi_slope(ALIBI, b64, h, stride_ab, alibi_mul, HAS_ALIBI)
        bh = b * nheads + h
        for blk in range(fu_lo, fu_hi):
            dk, dv = _dkdv_step(
                dk, dv, k, v, q_base, do_base, dq_base, lse_base, delta_base, blk * BLOCK_M, cols, offs_m, offs_d,
                stride_qs, stride_dos, stride_dqs, seqlen_q, seqlen_k, off, window_left, window_right,
                qk_scale, cap_out, slope2, bh, seed_lo, seed_hi, thresh, drop_scale,
                False, PAD_D, HEAD_DIM, HAS_WL, HAS_WR, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, UPCAST, ATOMIC_DQ,
                offs_dv, PAD_DV, HD_V, ONE_PASS, sm_scale)
        for i in range(0, n_masked):
            blk = _masked_block(i, n_a, mb_lo, fu_hi)
            dk, dv = _dkdv_step(
                dk, dv, k, v, q_base, do_base, dq_base, lse_base, delta_base, blk * BLOCK_M, cols, offs_m, offs_d,
                stride_qs, stride_dos, stride_dqs, seqlen_q, seqlen_k, off, window_left, window_right,
                qk_scale, cap_out, slope2, bh, seed_lo, seed_hi, thresh, drop_scale,
                True, PAD_D, HEAD_DIM, HAS_WL, HAS_WR, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, UPCAST, ATOMIC_DQ,
                offs_dv, PAD_DV, HD_V, ONE_PASS, sm_scale)
        if ONE_PASS:  # query blocks that see no key of the call: dQ = 0 there
            zero = tl.zeros([BLOCK_M, BLOCK_D], dtype=DQ.dtype.element_ty)
            for blk in range(0, mb_lo):
                _store_rows(dq_base, blk * BLOCK_M, offs_m, offs_d, stride_dqs, seqlen_q, HEAD_DIM, zero)
            for blk in range(mb_hi, tl.cdiv(seqlen_q, BLOCK_M)):
                _store_rows(dq_base, blk * BLOCK_M, offs_m, offs_d, stride_dqs, seqlen_q, HEAD_DIM, zero)

    dk = dk * sm_scale
    dk_ptrs = _tile_ptrs(DK, b64, hk, kv_row0, offs_n, offs_d, stride_dkb, stride_dkh, stride_dks)
    dv_ptrs = _tile_ptrs(DV, b64, hk, kv_row0, offs_n, offs_dv, stride_dvb, stride_dvh, stride_dvs)
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=v_mask)


# ---------------------------------------------------------------------------------------
# dQ
# ---------------------------------------------------------------------------------------


@triton.jit
def _dq_step(
    dq, q, do, lse2, delta, k_base, v_base, start_n, rows, offs_n, offs_d,
    stride_ks, stride_vs, seqlen_q, seqlen_k, off, wl, wr,
    qk_scale, cap_out, slope2, bh, seed_lo, seed_hi, thresh, drop_scale,
    MASKED: tl.constexpr, PAD_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, UPCAST: tl.constexpr,
    offs_dv, PAD_DV: tl.constexpr, HEAD_DIM_V: tl.constexpr,
):
    """One key block against this program's query rows: returns the updated dq (v and dO have
    v's head dim HEAD_DIM_V, columns offs_dv)."""
    cols = start_n + offs_n
    kT_ptrs = _block_ptrs(k_base, start_n, offs_n, offs_d, stride_ks, True)
    vT_ptrs = _block_ptrs(v_base, start_n, offs_n, offs_dv, stride_vs, True)
    kT = _load_block(kT_ptrs, cols, seqlen_k, offs_d, HEAD_DIM, MASKED, PAD_D, True)
    vT = _load_block(vT_ptrs, cols, seqlen_k, offs_dv, HEAD_DIM_V, MASKED, PAD_DV, True)
    if HAS_SOFTCAP:
        dp = _mm(do, vT, UPCAST)  # first, as in _dkdv_step
    s, t = _score_tile(q, kT, rows[:, None], cols[None, :], off, seqlen_q, seqlen_k, wl, wr, qk_scale, cap_out,
                       slope2, MASKED, HAS_WL, HAS_WR, HAS_SOFTCAP, HAS_ALIBI, UPCAST, FAST_TANH=not UPCAST)
    p = tl.exp2(s - lse2[:, None])
    if not HAS_SOFTCAP:
        dp = _mm(do, vT, UPCAST)
    if HAS_DROPOUT:
        keep = _keep(seed_lo, seed_hi, rows[:, None], cols[None, :], bh, thresh)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    ds = _dscores(p, dp, delta[:, None], t, HAS_SOFTCAP)
    dq = _mma(ds.to(kT.dtype), tl.trans(kT), dq, UPCAST)
    return dq


@triton.jit(do_not_specialize=["seqlen_q", "seqlen_k", "window_left", "window_right", "thresh", "seed_lo", "seed_hi"])
def _bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, ALIBI, CU_Q, CU_K,
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh,
    stride_dqb, stride_dqs, stride_dqh,
    stride_lb, stride_lh, stride_ab,
    seqlen_q, seqlen_k, nheads, group,
    qk_scale, cap_out, alibi_mul, sm_scale,
    window_left, window_right,
    thresh, drop_scale, seed_lo, seed_hi,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_WL: tl.constexpr, HAS_WR: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, IS_VARLEN: tl.constexpr, REVERSE_M: tl.constexpr, UPCAST: tl.constexpr,
    HEAD_DIM_V: tl.constexpr = 0, BLOCK_DV: tl.constexpr = 0,
):
    """Grid (query blocks, nheads, batch or sequences). HEAD_DIM_V / BLOCK_DV: v's head dim and
    block when it differs from q/k's (0: the same)."""
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    HD_V: tl.constexpr = HEAD_DIM_V if HEAD_DIM_V > 0 else HEAD_DIM
    BDV: tl.constexpr = BLOCK_DV if BLOCK_DV > 0 else BLOCK_D
    PAD_DV: tl.constexpr = BDV != HD_V
    pid_m = _block_id(REVERSE_M)
    h = tl.program_id(1)
    b = tl.program_id(2)
    q_start, seqlen_q, k_start, seqlen_k = _seqlens_qk(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    hk = h // group
    off = seqlen_k - seqlen_q
    b64 = b.to(tl.int64)
    q_row0 = (q_start + m0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BDV)
    rows = m0 + offs_m
    row_ok = rows < seqlen_q
    qd_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(_tile_ptrs(Q, b64, h, q_row0, offs_m, offs_d, stride_qb, stride_qh, stride_qs), mask=qd_mask, other=0.0)
    do = tl.load(_tile_ptrs(DO, b64, h, q_row0, offs_m, offs_dv, stride_dob, stride_doh, stride_dos),
                 mask=row_ok[:, None] & (offs_dv[None, :] < HD_V), other=0.0)
    lrow = b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start + rows  # LSE and DELTA share strides
    lse2 = _load_lse2(LSE + lrow, row_ok)
    delta = tl.load(DELTA + lrow, mask=row_ok, other=0.0)
    k_base = _row_ptr(K, b64, hk, k_start, stride_kb, stride_kh, stride_ks)
    v_base = _row_ptr(V, b64, hk, k_start, stride_vb, stride_vh, stride_vs)
    slope2 = _alibi_slope(ALIBI, b64, h, stride_ab, alibi_mul, HAS_ALIBI)
    bh = b * nheads + h
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    r_hi = tl.minimum(m0 + BLOCK_M, seqlen_q)
    nb_lo, fu_lo, fu_hi, nb_hi = _block_range(m0, r_hi, seqlen_k, off, window_left, window_right,
                                              HAS_WL, HAS_WR, BLOCK_N)
    for blk in range(fu_lo, fu_hi):
        dq = _dq_step(
            dq, q, do, lse2, delta, k_base, v_base, blk * BLOCK_N, rows, offs_n, offs_d,
            stride_ks, stride_vs, seqlen_q, seqlen_k, off, window_left, window_right,
            qk_scale, cap_out, slope2, bh, seed_lo, seed_hi, thresh, drop_scale,
            False, PAD_D, HEAD_DIM, HAS_WL, HAS_WR, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, UPCAST, offs_dv, PAD_DV, HD_V)
    n_a = fu_lo - nb_lo
    n_masked = n_a + nb_hi - fu_hi
    for i in range(0, n_masked):
        blk = _masked_block(i, n_a, nb_lo, fu_hi)
        dq = _dq_step(
            dq, q, do, lse2, delta, k_base, v_base, blk * BLOCK_N, rows, offs_n, offs_d,
            stride_ks, stride_vs, seqlen_q, seqlen_k, off, window_left, window_right,
            qk_scale, cap_out, slope2, bh, seed_lo, seed_hi, thresh, drop_scale,
            True, PAD_D, HEAD_DIM, HAS_WL, HAS_WR, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, UPCAST, offs_dv, PAD_DV, HD_V)

    dq = dq * sm_scale
    dq_ptrs = _tile_ptrs(DQ, b64, h, q_row0, offs_m, offs_d, stride_dqb, stride_dqh, stride_dqs)
    tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=qd_mask)
