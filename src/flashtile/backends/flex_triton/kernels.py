"""Triton forward kernel for calls with mods (``score_mod`` / ``block_mask``), and the Triton
versions of :mod:`flashtile.masks`' mods, written beside the Python ones.

A mod reaches the kernel as a ``tl.constexpr`` JIT function inlined at its call site, with three
generic arguments (a captured tensor's pointer, a stride, a scalar: see ``launch.MOD_TRITON``):
``mask(b, h, q, kv, A0, A1, A2) -> bool`` and ``score(s, b, h, q, kv, A0, A1, A2) -> s`` with
``q (BLOCK_M, 1)`` and ``kv (1, BLOCK_N)`` positions (clamped into the sequence), ``b`` / ``h``
scalars (``h`` the query head) and ``s`` the fp32 scaled scores.

One program per (query block, batch x head): it walks the key blocks the block mask lists for
its query block, the partial ones with ``mask`` and the full ones without (no block mask: every
key block, no mask), each with ``score`` applied, in an online softmax (lse in natural log; rows
that see no key: out 0, lse -inf).
"""

from __future__ import annotations

import triton
import triton.language as tl

# fmt: off

LOG2E = 1.4426950408889634


@triton.jit
def no_mask(b, h, q, kv, A0, A1, A2):
    return (q >= 0) & (kv >= 0)


@triton.jit
def no_score(s, b, h, q, kv, A0, A1, A2):
    return s


@triton.jit
def causal(b, h, q, kv, A0, A1, A2):
    return q >= kv


@triton.jit
def sliding_window(b, h, q, kv, A0, A1, A2):
    d = q - kv
    return (d >= 0) & (d <= A2)


@triton.jit
def document(b, h, q, kv, A0, A1, A2):
    same = tl.load(A0 + b * A1 + q) == tl.load(A0 + b * A1 + kv)
    return same & ((q >= kv) | (A2 == 0))


@triton.jit
def prefix_lm(b, h, q, kv, A0, A1, A2):
    return (kv < A2) | (q >= kv)


@triton.jit
def prefix_lm_per_row(b, h, q, kv, A0, A1, A2):
    return (kv < tl.load(A0 + b)) | (q >= kv)


@triton.jit
def chunked(b, h, q, kv, A0, A1, A2):
    same = (q // A1) == (kv // A1)
    return same & ((q >= kv) | (A2 == 0))


@triton.jit
def bidirectional_blocks(b, h, q, kv, A0, A1, A2):
    bq = tl.load(A0 + b * A1 + q)
    bk = tl.load(A0 + b * A1 + kv)
    return (q >= kv) | ((bq >= 0) & (bq == bk))


@triton.jit
def alibi(s, b, h, q, kv, A0, A1, A2):
    slope = tl.load(A0 + b * A1 + h).to(tl.float32)
    d = q - kv
    return s - slope * tl.where(d >= 0, d, -d).to(tl.float32)


@triton.jit
def softcap(s, b, h, q, kv, A0, A1, A2):
    x = s / A2
    t = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)  # tanh(x)
    return A2 * t


@triton.jit
def relative_bias(s, b, h, q, kv, A0, A1, A2):
    d = q - kv
    d = tl.minimum(tl.maximum(d, -A2), A2) + A2
    return s + tl.load(A0 + h * A1 + d).to(tl.float32)


@triton.jit
def _block(
    acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n, offs_d, b, h,
    stride_ks, stride_vs, seqlen_q, seqlen_k, qk_scale,
    MA0, MA1, MA2, SA0, SA1, SA2,
    MASK_MOD: tl.constexpr, SCORE_MOD: tl.constexpr, APPLY_MASK: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    cols = start_n + offs_n
    kmask = (cols[None, :] < seqlen_k) & (offs_d[:, None] < HEAD_DIM)
    kT = tl.load(k_base + cols[None, :] * stride_ks + offs_d[:, None], mask=kmask, other=0.0)
    s = tl.dot(q, kT) * qk_scale
    qi = tl.minimum(offs_m, seqlen_q - 1)[:, None]
    ki = tl.minimum(cols, seqlen_k - 1)[None, :]
    s = SCORE_MOD(s, b, h, qi, ki, SA0, SA1, SA2)
    vis = (cols[None, :] < seqlen_k) & (offs_m[:, None] >= 0)
    if APPLY_MASK:
        vis = vis & MASK_MOD(b, h, qi, ki, MA0, MA1, MA2)
    s = tl.where(vis, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2((s - m_safe[:, None]) * 1.4426950408889634)
    alpha = tl.exp2((m_i - m_safe) * 1.4426950408889634)
    l_i = l_i * alpha + tl.sum(p, 1)
    vmask = (cols[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    v = tl.load(v_base + cols[:, None] * stride_vs + offs_d[None, :], mask=vmask, other=0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def flex_fwd(
    Q, K, V, O, LSE,
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    bm_sb, bm_sh, bm_sq, bmi_sb, bmi_sh, bmi_sq, fbm_sb, fbm_sh, fbm_sq, fbmi_sb, fbmi_sh, fbmi_sq,
    seqlen_q, seqlen_k, nheads, groups, n_kv_blocks, qk_scale,
    MA0, MA1, MA2, SA0, SA1, SA2,
    MASK_MOD: tl.constexpr, SCORE_MOD: tl.constexpr, HAS_BLOCK_MASK: tl.constexpr, HAS_FULL: tl.constexpr,
    BM_B: tl.constexpr, BM_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    SUB_N: tl.constexpr, SUB_M: tl.constexpr,
):
    pid_m = tl.program_id(0)  # rows [pid_m * SUB_M, + SUB_M) of query block pid_m * SUB_M // BLOCK_M
    bh = tl.program_id(1)
    b = bh // nheads
    h = bh % nheads
    hk = h // groups
    offs_m = pid_m * SUB_M + tl.arange(0, SUB_M)
    qb = (pid_m * SUB_M) // BLOCK_M
    offs_n = tl.arange(0, SUB_N)  # a key block of the block mask is walked in BLOCK_N // SUB_N steps
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + hk * stride_kh
    v_base = V + b * stride_vb + hk * stride_vh
    qmask = (offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=qmask, other=0.0)
    m_i = tl.full((SUB_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((SUB_M,), tl.float32)
    acc = tl.zeros((SUB_M, BLOCK_D), tl.float32)
    if HAS_BLOCK_MASK:
        bb = b * BM_B
        hb = h * BM_H
        num = tl.load(KV_NUM + bb * bm_sb + hb * bm_sh + qb * bm_sq)
        idx = KV_IDX + bb * bmi_sb + hb * bmi_sh + qb * bmi_sq
        for i in range(0, num):
            start_n = tl.load(idx + i) * BLOCK_N
            for sub in tl.static_range(BLOCK_N // SUB_N):
                acc, l_i, m_i = _block(acc, l_i, m_i, q, k_base, v_base, start_n + sub * SUB_N, offs_m, offs_n,
                                       offs_d, b, h, stride_ks, stride_vs, seqlen_q, seqlen_k, qk_scale,
                                       MA0, MA1, MA2, SA0, SA1, SA2, MASK_MOD, SCORE_MOD, True, HEAD_DIM)
        if HAS_FULL:
            fnum = tl.load(FULL_NUM + bb * fbm_sb + hb * fbm_sh + qb * fbm_sq)
            fidx = FULL_IDX + bb * fbmi_sb + hb * fbmi_sh + qb * fbmi_sq
            for i in range(0, fnum):
                start_n = tl.load(fidx + i) * BLOCK_N
                for sub in tl.static_range(BLOCK_N // SUB_N):
                    acc, l_i, m_i = _block(acc, l_i, m_i, q, k_base, v_base, start_n + sub * SUB_N, offs_m, offs_n,
                                           offs_d, b, h, stride_ks, stride_vs, seqlen_q, seqlen_k, qk_scale,
                                           MA0, MA1, MA2, SA0, SA1, SA2, MASK_MOD, SCORE_MOD, False, HEAD_DIM)
    else:
        for j in range(0, n_kv_blocks * (BLOCK_N // SUB_N)):
            acc, l_i, m_i = _block(acc, l_i, m_i, q, k_base, v_base, j * SUB_N, offs_m, offs_n, offs_d, b, h,
                                   stride_ks, stride_vs, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2,
                                   MASK_MOD, SCORE_MOD, False, HEAD_DIM)
    empty = l_i == 0.0
    inv = tl.where(empty, 0.0, 1.0 / tl.where(empty, 1.0, l_i))
    out = acc * inv[:, None]
    o_base = O + b * stride_ob + h * stride_oh
    tl.store(o_base + offs_m[:, None] * stride_os + offs_d[None, :], out.to(O.dtype.element_ty), mask=qmask)
    lse = tl.where(empty, float("-inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + bh * seqlen_q + offs_m, lse, mask=offs_m < seqlen_q)


# ----------------------------------------------------------------------------------------------
# backward: the score mods' derivatives, written beside them. ``score_bwd(ds, s, b, h, q, kv,
# A0, A1, A2, G0, VIS, GRAD) -> ds_in``: the gradient of the score before the mod from that of the
# score after it (``s``: the score before the mod), adding the captured tensor's gradient into the
# fp32 buffer ``G0`` (laid out like the tensor) when ``GRAD``, over the visible entries ``VIS``.


@triton.jit
def no_score_bwd(ds, s, b, h, q, kv, A0, A1, A2, G0, VIS, GRAD: tl.constexpr):
    return ds


@triton.jit
def alibi_bwd(ds, s, b, h, q, kv, A0, A1, A2, G0, VIS, GRAD: tl.constexpr):
    if GRAD:
        d = q - kv
        dist = tl.where(d >= 0, d, -d).to(tl.float32)
        tl.atomic_add(G0 + b * A1 + h, -tl.sum(tl.sum(tl.where(VIS, ds * dist, 0.0), 1), 0))
    return ds


@triton.jit
def softcap_bwd(ds, s, b, h, q, kv, A0, A1, A2, G0, VIS, GRAD: tl.constexpr):
    x = s / A2
    t = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
    return ds * (1.0 - t * t)


@triton.jit
def relative_bias_bwd(ds, s, b, h, q, kv, A0, A1, A2, G0, VIS, GRAD: tl.constexpr):
    if GRAD:
        d = q - kv
        d = tl.minimum(tl.maximum(d, -A2), A2) + A2
        tl.atomic_add(G0 + h * A1 + d, ds, mask=VIS)
    return ds


@triton.jit
def _bwd_block(
    dk, dv, q_base, do_base, dq_base, lse_base, delta_base, kT, vT, k, start_m, offs_m0, cols, offs_d, b, h,
    stride_qs, stride_dos, stride_dqs, seqlen_q, seqlen_k, qk_scale,
    MA0, MA1, MA2, SA0, SA1, SA2, G0,
    MASK_MOD: tl.constexpr, SCORE_MOD: tl.constexpr, SCORE_BWD: tl.constexpr, GRAD: tl.constexpr,
    APPLY_MASK: tl.constexpr, HEAD_DIM: tl.constexpr,
):
    offs_m = start_m + offs_m0
    rmask = offs_m < seqlen_q
    qmask = rmask[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :], mask=qmask, other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dos + offs_d[None, :], mask=qmask, other=0.0)
    lse = tl.load(lse_base + offs_m, mask=rmask, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse)  # rows without keys: p = 0
    delta = tl.load(delta_base + offs_m, mask=rmask, other=0.0)
    s = tl.dot(q, kT) * qk_scale
    qi = tl.minimum(offs_m, seqlen_q - 1)[:, None]
    ki = tl.minimum(cols, seqlen_k - 1)[None, :]
    sm = SCORE_MOD(s, b, h, qi, ki, SA0, SA1, SA2)
    vis = rmask[:, None] & (cols[None, :] < seqlen_k)
    if APPLY_MASK:
        vis = vis & MASK_MOD(b, h, qi, ki, MA0, MA1, MA2)
    vis = vis != 0  # a plain bool tile (a mod may mix in scalars; atomics' masks need it)
    p = tl.where(vis, tl.exp2((sm - lse[:, None]) * 1.4426950408889634), 0.0)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do)
    dp = tl.dot(do, vT)
    ds = p * (dp - delta[:, None])
    ds = SCORE_BWD(ds, s, b, h, qi, ki, SA0, SA1, SA2, G0, vis, GRAD)
    ds = tl.where(vis, ds, 0.0)
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    dq = tl.dot(ds.to(k.dtype), k) * qk_scale
    tl.atomic_add(dq_base + offs_m[:, None] * stride_dqs + offs_d[None, :], dq, mask=qmask)
    return dk, dv


@triton.jit
def flex_bwd(
    Q, K, V, DO, DQ, DK, DV, LSE, DELTA,
    Q_NUM, Q_IDX, FULL_NUM, FULL_IDX,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh,
    stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    bm_sb, bm_sh, bm_sk, bmi_sb, bmi_sh, bmi_sk, fbm_sb, fbm_sh, fbm_sk, fbmi_sb, fbmi_sh, fbmi_sk,
    seqlen_q, seqlen_k, nheads, nheads_k, groups, n_q_blocks, qk_scale,
    MA0, MA1, MA2, SA0, SA1, SA2, G0,
    MASK_MOD: tl.constexpr, SCORE_MOD: tl.constexpr, SCORE_BWD: tl.constexpr, GRAD: tl.constexpr,
    HAS_BLOCK_MASK: tl.constexpr, HAS_FULL: tl.constexpr, BM_B: tl.constexpr, BM_H: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    SUB_M: tl.constexpr, SUB_N: tl.constexpr,
):
    """One program per (SUB_N keys, batch x kv head): dK / dV for those keys over the query heads
    of the group and the query blocks the block mask lists for their key block (transposed
    lists), dQ added atomically (fp32)."""
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    b = bhk // nheads_k
    hk = bhk % nheads_k
    start_n = pid_n * SUB_N
    kb = start_n // BLOCK_N
    cols = start_n + tl.arange(0, SUB_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_m0 = tl.arange(0, SUB_M)
    kvmask = (cols[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(K + b * stride_kb + hk * stride_kh + cols[:, None] * stride_ks + offs_d[None, :], mask=kvmask,
                other=0.0)
    v = tl.load(V + b * stride_vb + hk * stride_vh + cols[:, None] * stride_vs + offs_d[None, :], mask=kvmask,
                other=0.0)
    kT = tl.trans(k)
    vT = tl.trans(v)
    dk = tl.zeros((SUB_N, BLOCK_D), tl.float32)
    dv = tl.zeros((SUB_N, BLOCK_D), tl.float32)
    for g in range(0, groups):
        h = hk * groups + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        dq_base = DQ + b * stride_dqb + h * stride_dqh
        lse_base = LSE + (b * nheads + h) * seqlen_q
        delta_base = DELTA + (b * nheads + h) * seqlen_q
        if HAS_BLOCK_MASK:
            bb = b * BM_B
            hb = h * BM_H
            num = tl.load(Q_NUM + bb * bm_sb + hb * bm_sh + kb * bm_sk)
            idx = Q_IDX + bb * bmi_sb + hb * bmi_sh + kb * bmi_sk
            for i in range(0, num):
                start_m = tl.load(idx + i) * BLOCK_M
                for sub in tl.static_range(BLOCK_M // SUB_M):
                    dk, dv = _bwd_block(dk, dv, q_base, do_base, dq_base, lse_base, delta_base, kT, vT, k,
                                        start_m + sub * SUB_M, offs_m0, cols, offs_d, b, h, stride_qs, stride_dos,
                                        stride_dqs, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2, G0,
                                        MASK_MOD, SCORE_MOD, SCORE_BWD, GRAD, True, HEAD_DIM)
            if HAS_FULL:
                fnum = tl.load(FULL_NUM + bb * fbm_sb + hb * fbm_sh + kb * fbm_sk)
                fidx = FULL_IDX + bb * fbmi_sb + hb * fbmi_sh + kb * fbmi_sk
                for i in range(0, fnum):
                    start_m = tl.load(fidx + i) * BLOCK_M
                    for sub in tl.static_range(BLOCK_M // SUB_M):
                        dk, dv = _bwd_block(dk, dv, q_base, do_base, dq_base, lse_base, delta_base, kT, vT, k,
                                            start_m + sub * SUB_M, offs_m0, cols, offs_d, b, h, stride_qs,
                                            stride_dos, stride_dqs, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2,
                                            SA0, SA1, SA2, G0, MASK_MOD, SCORE_MOD, SCORE_BWD, GRAD, False,
                                            HEAD_DIM)
        else:
            for j in range(0, n_q_blocks * (BLOCK_M // SUB_M)):
                dk, dv = _bwd_block(dk, dv, q_base, do_base, dq_base, lse_base, delta_base, kT, vT, k, j * SUB_M,
                                    offs_m0, cols, offs_d, b, h, stride_qs, stride_dos, stride_dqs, seqlen_q,
                                    seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2, G0, MASK_MOD, SCORE_MOD,
                                    SCORE_BWD, GRAD, False, HEAD_DIM)
    dk = dk * qk_scale
    tl.store(DK + b * stride_dkb + hk * stride_dkh + cols[:, None] * stride_dks + offs_d[None, :],
             dk.to(DK.dtype.element_ty), mask=kvmask)
    tl.store(DV + b * stride_dvb + hk * stride_dvh + cols[:, None] * stride_dvs + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=kvmask)
