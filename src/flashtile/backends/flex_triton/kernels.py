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
