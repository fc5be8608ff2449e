"""Triton kernels for calls with mods (``score_mod`` / ``block_mask``), and the Triton versions of
:mod:`flashtile.masks`' mods, written beside the Python ones.

A mod reaches the kernels as a ``tl.constexpr`` JIT function inlined at its call site, with three
generic arguments (a captured tensor's pointer, a stride, a scalar: ``masks._twin``):
``mask(b, h, q, kv, A0, A1, A2) -> bool`` and ``score(s, b, h, q, kv, A0, A1, A2) -> s`` with
broadcastable ``q`` / ``kv`` positions (``(BLOCK_M, 1)`` / ``(1, BLOCK_N)``, or transposed in the
dK/dV pass), ``b`` / ``h`` scalars (``h`` the query head) and ``s`` the fp32 scaled scores
(natural units: ``softmax_scale * q.k``).

The kernels follow the built-in Triton kernels' structure (``backends/triton/fwd.py`` / ``bwd.py``):

* forward: one program per (batch x head, query block of ``BLOCK_M`` rows), by default heads
  fastest and the last query blocks first (causal-like masks: the heaviest programs start first;
  ``GRID`` 1 / 2: query blocks fastest, FlexAttention's order). It walks the block mask's *full*
  key blocks (no mask evaluation, no bounds checks when the sequence lengths are multiples of the
  block mask's block: ``EVEN``) and its *partial* ones (``mask`` evaluated), full first unless
  ``PARTIAL_FIRST`` (FlexAttention's order); each block-mask block is visited in
  ``MASK_BLOCK // BLOCK_N`` steps of one flat,
  software-pipelined loop (``num_stages``), the key block's index read from the block mask's
  list one step ahead (a loop-carried ``blk``: when this step's index load fed only this step's
  K/V loads, Triton 3.6's pipeliner made it an indirect async copy with a stage of its own, which
  left K/V two buffers and a full wait at every step; DUMP=dir scripts/flex_compile_check.py
  writes the TTGIR). Empty blocks are never visited. Without a block mask: every key block,
  unmasked, and a bounds-checked ragged end. Online softmax in base 2 (``exp2(s * c - m)``, one
  FMA).
* backward: ``delta = rowsum(dO * O)`` (the Triton backend's ``_bwd_preprocess``); a dK/dV pass, one program
  per (batch x kv head, key block) over the query heads of its group and the block mask's
  transposed (per key block) lists; a dQ pass, one program per (batch x head, query block) over
  the same lists as the forward. No atomics for dQ / dK / dV (bitwise reproducible). The
  gradient of a captured tensor (ALiBi slopes, a bias table) is reduced in the dQ pass, where a
  program owns one (batch, head): per program partial sums in registers, added into an fp32
  buffer with a few atomics (``*_grad`` / ``*_grad_end`` below).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..triton.common import _block_ptrs as _tile_ptrs
from ..triton.common import _load_block as _load_tile
from ..triton.common import _mm, _mma

# fmt: off

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


# ----------------------------------------------------------------------------------------------
# the mods (Triton versions of flashtile.masks')


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
    # positions converted once per row / column (exact below 2^24): per score one FADD and one FFMA
    # with |.| folded in, not an integer subtract, abs and conversion
    d = q.to(tl.float32) - kv.to(tl.float32)
    return s - slope * tl.abs(d)


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


# ----------------------------------------------------------------------------------------------
# the score mods' derivatives, written beside them.
#
# ``score_bwd(ds, s, b, h, q, kv, A0, A1, A2) -> ds_in``: the gradient of the score before the mod
# from that of the score after it (``s``: the score before the mod).
# ``score_grad(g0, g1, ds, b, h, q, kv, A0, A1, A2, m0, n0, G0, BM, BN) -> (g0, g1)``: the captured
# tensor's gradient from the tile ``ds`` (d loss / d score after the mod, 0 where not visible) of
# rows ``m0 + i`` and keys ``n0 + j`` (``q`` / ``kv``: their clamped positions): partial sums kept
# in the two fp32 scalars (g0, g1) of the program, or added into the fp32 buffer ``G0`` (laid out
# like the tensor); ``score_grad_end(g0, g1, b, h, A0, A1, A2, G0)`` adds the partial sums into G0
# once per program. Mods without a captured tensor: ``no_grad`` / ``no_grad_end``.


@triton.jit
def no_score_bwd(ds, s, b, h, q, kv, A0, A1, A2):
    return ds


@triton.jit
def no_grad(g0, g1, ds, b, h, q, kv, A0, A1, A2, m0, n0, G0, BM: tl.constexpr, BN: tl.constexpr):
    return g0, g1


@triton.jit
def no_grad_end(g0, g1, b, h, A0, A1, A2, G0):
    pass


alibi_bwd = no_score_bwd
relative_bias_bwd = no_score_bwd


@triton.jit
def softcap_bwd(ds, s, b, h, q, kv, A0, A1, A2):
    x = s / A2
    t = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
    return ds * (1.0 - t * t)


@triton.jit
def alibi_grad(g0, g1, ds, b, h, q, kv, A0, A1, A2, m0, n0, G0, BM: tl.constexpr, BN: tl.constexpr):
    """d score / d slope = -|q - kv|: one sum per program (batch, head)."""
    d = q - kv
    dist = tl.where(d >= 0, d, -d).to(tl.float32)
    return g0 - tl.sum(tl.sum(ds * dist, 1), 0), g1


@triton.jit
def alibi_grad_end(g0, g1, b, h, A0, A1, A2, G0):
    tl.atomic_add(G0 + b * A1 + h, g0, sem="relaxed")


@triton.jit
def relative_bias_grad(g0, g1, ds, b, h, q, kv, A0, A1, A2, m0, n0, G0, BM: tl.constexpr, BN: tl.constexpr):
    """table[h, clamp(q - kv, -m, m) + m]: the two clamped ends are two running sums (g0: distance
    <= -m, g1: >= m), a tile wholly in one (most tiles of a long sequence) adds its sum; a tile with
    distances inside (-m, m) reduces its diagonals (one gather of the tile skewed by rows, summed
    over the rows) and adds the BM + BN - 1 sums with one vector of atomics."""
    lo = m0 - n0 - (BN - 1)  # the tile's smallest and largest distances
    hi = m0 + (BM - 1) - n0
    if lo >= A2:
        g1 += tl.sum(tl.sum(ds, 1), 0)
    elif hi <= -A2:
        g0 += tl.sum(tl.sum(ds, 1), 0)
    else:
        d = q - kv
        g0 += tl.sum(tl.sum(tl.where(d <= -A2, ds, 0.0), 1), 0)
        g1 += tl.sum(tl.sum(tl.where(d >= A2, ds, 0.0), 1), 0)
        W: tl.constexpr = 2 * (BM if BM > BN else BN)
        i = tl.arange(0, BM)[:, None]
        u = tl.arange(0, W)[None, :]  # diagonal u: distance lo + u, j = i + BN - 1 - u
        j = i + (BN - 1) - u
        ok = (j >= 0) & (j < BN)
        sk = tl.gather(ds, tl.minimum(tl.maximum(j, 0), BN - 1), 1)
        diag = tl.sum(tl.where(ok, sk, 0.0), 0)
        dist = lo + tl.arange(0, W)
        inner = (dist > -A2) & (dist < A2) & (tl.arange(0, W) < BM + BN - 1)
        tl.atomic_add(G0 + h * A1 + dist + A2, diag, mask=inner, sem="relaxed")
    return g0, g1


@triton.jit
def relative_bias_grad_end(g0, g1, b, h, A0, A1, A2, G0):
    tl.atomic_add(G0 + h * A1, g0, sem="relaxed")
    tl.atomic_add(G0 + h * A1 + 2 * A2, g1, sem="relaxed")


# ----------------------------------------------------------------------------------------------
# shared pieces


@triton.jit
def _mods(qk, b, h, rr, cc, seqlen_r, seqlen_c, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2,
          MASK_MOD: tl.constexpr, SCORE_MOD: tl.constexpr, HAS_SCORE: tl.constexpr, APPLY_MASK: tl.constexpr,
          BOUNDS: tl.constexpr):
    """(s, t): the visible, modified scores of a q.k tile, -inf where hidden (s), and the scores
    before the score mod (t, natural units; with a score mod only). rr / cc: broadcastable query /
    key positions (transposed tiles: keys along dim 0). With a score mod s is in natural units;
    without one s is the raw q.k (the base-2 scale is applied with the softmax's subtraction, one
    FMA: see _base2)."""
    if HAS_SCORE:
        t = qk * qk_scale
    else:
        t = qk
    s = t
    if HAS_SCORE or APPLY_MASK:
        if BOUNDS:  # positions clamped into the sequences for the mods' lookups
            qi = tl.minimum(rr, seqlen_r - 1)
            ki = tl.minimum(cc, seqlen_c - 1)
        else:
            qi = rr
            ki = cc
        if HAS_SCORE:
            s = SCORE_MOD(t, b, h, qi, ki, SA0, SA1, SA2)
        if APPLY_MASK:
            vis = MASK_MOD(b, h, qi, ki, MA0, MA1, MA2)
            if BOUNDS:
                vis = vis & (cc < seqlen_c) & (rr < seqlen_r)
            s = tl.where(vis, s, float("-inf"))
        elif BOUNDS:
            s = tl.where((cc < seqlen_c) & (rr < seqlen_r), s, float("-inf"))
    elif BOUNDS:
        s = tl.where((cc < seqlen_c) & (rr < seqlen_r), s, float("-inf"))
    return s, t


@triton.jit
def _base2(qk_scale, HAS_SCORE: tl.constexpr):
    """Factor from _mods' scores to base 2: log2(e) after a score mod (which sees natural units),
    else the q.k scale (the host folds log2(e) into it)."""
    if HAS_SCORE:
        return LOG2E
    else:
        return qk_scale


@triton.jit
def _list(NUM, IDX, b, h, blk, sb, sh, sn, isb, ish, isn, BM_B: tl.constexpr, BM_H: tl.constexpr):
    """(count, pointer to the indices) of block ``blk``'s list in a block mask (B / H may be 1)."""
    bb = b * BM_B
    hb = h * BM_H
    num = tl.load(NUM + bb * sb + hb * sh + blk * sn)
    idx = IDX + bb.to(tl.int64) * isb + hb * ish + blk * isn
    return num, idx


# ----------------------------------------------------------------------------------------------
# forward


@triton.jit
def _fwd_step(
    acc, l_i, m_i, q, k_base, v_base, start_n, rows, offs_n, offs_d, b, h,
    stride_ks, stride_vs, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2,
    MASK_MOD: tl.constexpr, SCORE_MOD: tl.constexpr, HAS_SCORE: tl.constexpr, APPLY_MASK: tl.constexpr,
    BOUNDS: tl.constexpr, PAD_D: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
):
    """One key block of the online softmax: returns the updated (acc, l_i, m_i); m_i in base 2."""
    cols = start_n + offs_n
    kT = _load_tile(_tile_ptrs(k_base, start_n, offs_n, offs_d, stride_ks, True), cols, seqlen_k, offs_d, HEAD_DIM,
                    BOUNDS, PAD_D, True)
    qk = _mm(q, kT, UPCAST)
    s, t = _mods(qk, b, h, rows[:, None], cols[None, :], seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2,
                 MASK_MOD, SCORE_MOD, HAS_SCORE, APPLY_MASK, BOUNDS)
    c2 = _base2(qk_scale, HAS_SCORE)
    m_new = tl.maximum(m_i, tl.max(s, 1) * c2)
    if APPLY_MASK or BOUNDS:  # a row without a visible key yet keeps m = -inf: subtract 0 instead
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.exp2(s * c2 - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = _load_tile(_tile_ptrs(v_base, start_n, offs_n, offs_d, stride_vs, False), cols, seqlen_k, offs_d, HEAD_DIM,
                   BOUNDS, PAD_D, False)
    acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)
    return acc, l_i, m_new


@triton.jit
def _fwd_list(
    acc, l_i, m_i, num, idx, blk, q, k_base, v_base, rows, offs_n, offs_d, b, h,
    stride_ks, stride_vs, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2,
    MASK_MOD: tl.constexpr, SCORE_MOD: tl.constexpr, HAS_SCORE: tl.constexpr, APPLY_MASK: tl.constexpr,
    BOUNDS: tl.constexpr, PAD_D: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
    MASK_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The key blocks of one block-mask list (``num`` blocks at ``idx``, ``blk`` = ``idx[0]``,
    loaded by the caller ahead of time), ``MASK_BLOCK // BLOCK_N`` steps each, one flat loop; the
    next step's index is read one step ahead (see the module docstring)."""
    SUBS: tl.constexpr = MASK_BLOCK // BLOCK_N
    n = num * SUBS
    for i in range(0, n):
        start_n = blk * MASK_BLOCK + (i % SUBS) * BLOCK_N
        blk = tl.load(idx + tl.minimum(i + 1, n - 1) // SUBS)
        acc, l_i, m_i = _fwd_step(
            acc, l_i, m_i, q, k_base, v_base, start_n, rows, offs_n, offs_d, b, h,
            stride_ks, stride_vs, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2,
            MASK_MOD, SCORE_MOD, HAS_SCORE, APPLY_MASK, BOUNDS, PAD_D, HEAD_DIM, UPCAST)
    return acc, l_i, m_i


@triton.jit
def _program(GRID: tl.constexpr):
    """(batch x head, query block) of this program. GRID 0: grid (B*H, query blocks), heads
    fastest, last query blocks first; 1: grid (query blocks, B*H), query blocks fastest in order
    (FlexAttention's order); 2: as 1 with the last query blocks first."""
    if GRID == 0:
        return tl.program_id(0), tl.num_programs(1) - 1 - tl.program_id(1)
    elif GRID == 1:
        return tl.program_id(1), tl.program_id(0)
    else:
        return tl.program_id(1), tl.num_programs(0) - 1 - tl.program_id(0)


@triton.jit
def flex_fwd(
    Q, K, V, O, LSE,
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_ob, stride_os, stride_oh,
    bm_sb, bm_sh, bm_sn, bmi_sb, bmi_sh, bmi_sn, fbm_sb, fbm_sh, fbm_sn, fbmi_sb, fbmi_sh, fbmi_sn,
    seqlen_q, seqlen_k, nheads, groups, qk_scale,
    MA0, MA1, MA2, SA0, SA1, SA2,
    MASK_MOD: tl.constexpr, SCORE_MOD: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SCORE: tl.constexpr,
    HAS_BLOCK_MASK: tl.constexpr, HAS_FULL: tl.constexpr, BM_B: tl.constexpr, BM_H: tl.constexpr,
    MASK_BLOCK: tl.constexpr, EVEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr, GRID: tl.constexpr = 0, PARTIAL_FIRST: tl.constexpr = False,
):
    """Grid: see _program (GRID); BLOCK_M and BLOCK_N divide MASK_BLOCK.
    Writes out and lse (natural log, (B, H, seqlen_q) contiguous). EVEN: both sequence lengths
    are multiples of MASK_BLOCK (with a block mask, of as many blocks as its lists) or of
    BLOCK_M / BLOCK_N (without): no bounds checks. PARTIAL_FIRST: the block mask's partial
    blocks before its full ones (FlexAttention's order; default full first). The lists' counts and
    first indices are read before q, so their latency overlaps q's load."""
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    bh, pid_m = _program(GRID)
    b = bh // nheads
    h = bh % nheads
    hk = h // groups
    m0 = pid_m * BLOCK_M
    b64 = b.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = m0 + offs_m
    q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    if HAS_BLOCK_MASK:
        qb = m0 // MASK_BLOCK
        num, idx = _list(KV_NUM, KV_IDX, b, h, qb, bm_sb, bm_sh, bm_sn, bmi_sb, bmi_sh, bmi_sn, BM_B, BM_H)
        blk = tl.load(idx)
        if HAS_FULL:
            fnum, fidx = _list(FULL_NUM, FULL_IDX, b, h, qb, fbm_sb, fbm_sh, fbm_sn, fbmi_sb, fbmi_sh, fbmi_sn,
                               BM_B, BM_H)
            fblk = tl.load(fidx)
    q = _load_tile(_tile_ptrs(q_base, m0, offs_m, offs_d, stride_qs, False), rows, seqlen_q, offs_d, HEAD_DIM,
                   not EVEN, PAD_D, False)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    if HAS_BLOCK_MASK:
        if PARTIAL_FIRST:  # blocks that need the mask_mod
            acc, l_i, m_i = _fwd_list(
                acc, l_i, m_i, num, idx, blk, q, k_base, v_base, rows, offs_n, offs_d, b, h,
                stride_ks, stride_vs, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2,
                MASK_MOD, SCORE_MOD, HAS_SCORE, HAS_MASK, not EVEN, PAD_D, HEAD_DIM, UPCAST, MASK_BLOCK, BLOCK_N)
        if HAS_FULL:  # full blocks: no mask evaluation
            acc, l_i, m_i = _fwd_list(
                acc, l_i, m_i, fnum, fidx, fblk, q, k_base, v_base, rows, offs_n, offs_d, b, h,
                stride_ks, stride_vs, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2,
                MASK_MOD, SCORE_MOD, HAS_SCORE, False, not EVEN, PAD_D, HEAD_DIM, UPCAST, MASK_BLOCK, BLOCK_N)
        if not PARTIAL_FIRST:
            acc, l_i, m_i = _fwd_list(
                acc, l_i, m_i, num, idx, blk, q, k_base, v_base, rows, offs_n, offs_d, b, h,
                stride_ks, stride_vs, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2,
                MASK_MOD, SCORE_MOD, HAS_SCORE, HAS_MASK, not EVEN, PAD_D, HEAD_DIM, UPCAST, MASK_BLOCK, BLOCK_N)
    else:
        n_even = seqlen_k // BLOCK_N
        for j in range(0, n_even):
            acc, l_i, m_i = _fwd_step(
                acc, l_i, m_i, q, k_base, v_base, j * BLOCK_N, rows, offs_n, offs_d, b, h,
                stride_ks, stride_vs, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2,
                MASK_MOD, SCORE_MOD, HAS_SCORE, False, False, PAD_D, HEAD_DIM, UPCAST)
        for j in range(n_even, tl.cdiv(seqlen_k, BLOCK_N)):  # the ragged end
            acc, l_i, m_i = _fwd_step(
                acc, l_i, m_i, q, k_base, v_base, j * BLOCK_N, rows, offs_n, offs_d, b, h,
                stride_ks, stride_vs, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2,
                MASK_MOD, SCORE_MOD, HAS_SCORE, False, True, PAD_D, HEAD_DIM, UPCAST)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    row_ok = rows < seqlen_q
    o_ptrs = _tile_ptrs(O + b64 * stride_ob + h.to(tl.int64) * stride_oh, m0, offs_m, offs_d, stride_os, False)
    if EVEN and not PAD_D:
        tl.store(o_ptrs, out.to(O.dtype.element_ty))
    else:
        tl.store(o_ptrs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(LSE + bh.to(tl.int64) * seqlen_q + rows, lse, mask=row_ok)


# ----------------------------------------------------------------------------------------------
# backward


@triton.jit
def _lse2(ptrs, mask, BOUNDS: tl.constexpr):
    """Saved lse in base 2, +inf for rows that saw no key (and rows past the end) so that
    exp2(s - lse2) = 0 there."""
    if BOUNDS:
        lse = tl.load(ptrs, mask=mask, other=float("-inf"))
    else:
        lse = tl.load(ptrs)
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _dkdv_step(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, cols, offs_m, offs_d, b, h,
    stride_qs, stride_dos, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2,
    MASK_MOD: tl.constexpr, SCORE_MOD: tl.constexpr, SCORE_BWD: tl.constexpr, HAS_SCORE: tl.constexpr,
    APPLY_MASK: tl.constexpr, BOUNDS: tl.constexpr, PAD_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One block of query rows against this program's keys, transposed (keys along dim 0)."""
    rows = start_m + offs_m
    qT = _load_tile(_tile_ptrs(q_base, start_m, offs_m, offs_d, stride_qs, True), rows, seqlen_q, offs_d, HEAD_DIM,
                    BOUNDS, PAD_D, True)
    do = _load_tile(_tile_ptrs(do_base, start_m, offs_m, offs_d, stride_dos, False), rows, seqlen_q, offs_d,
                    HEAD_DIM, BOUNDS, PAD_D, False)
    row_ok = rows < seqlen_q
    lse2 = _lse2(lse_base + rows, row_ok, BOUNDS)
    if BOUNDS:
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)
    else:
        delta = tl.load(delta_base + rows)
    qkT = _mm(k, qT, UPCAST)
    sT, tT = _mods(qkT, b, h, rows[None, :], cols[:, None], seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1,
                   SA2, MASK_MOD, SCORE_MOD, HAS_SCORE, APPLY_MASK, BOUNDS)
    pT = tl.exp2(sT * _base2(qk_scale, HAS_SCORE) - lse2[None, :])
    dv = _mma(pT.to(do.dtype), do, dv, UPCAST)
    dpT = _mm(v, tl.trans(do), UPCAST)
    dsT = pT * (dpT - delta[None, :])
    if HAS_SCORE:
        dsT = SCORE_BWD(dsT, tT, b, h, rows[None, :], cols[:, None], SA0, SA1, SA2)
    dk = _mma(dsT.to(qT.dtype), tl.trans(qT), dk, UPCAST)
    return dk, dv


@triton.jit
def _dkdv_list(
    dk, dv, num, idx, k, v, q_base, do_base, lse_base, delta_base, cols, offs_m, offs_d, b, h,
    stride_qs, stride_dos, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2,
    MASK_MOD: tl.constexpr, SCORE_MOD: tl.constexpr, SCORE_BWD: tl.constexpr, HAS_SCORE: tl.constexpr,
    APPLY_MASK: tl.constexpr, BOUNDS: tl.constexpr, PAD_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr, MASK_BLOCK: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """The query blocks of one transposed block-mask list (``num`` blocks at ``idx``),
    ``MASK_BLOCK // BLOCK_M`` steps each, one flat loop, the next index read a step ahead (as
    :func:`_fwd_list`)."""
    SUBS: tl.constexpr = MASK_BLOCK // BLOCK_M
    n = num * SUBS
    blk = tl.load(idx)
    for i in range(0, n):
        start_m = blk * MASK_BLOCK + (i % SUBS) * BLOCK_M
        blk = tl.load(idx + tl.minimum(i + 1, n - 1) // SUBS)
        dk, dv = _dkdv_step(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, start_m, cols, offs_m, offs_d, b, h,
            stride_qs, stride_dos, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2,
            MASK_MOD, SCORE_MOD, SCORE_BWD, HAS_SCORE, APPLY_MASK, BOUNDS, PAD_D, HEAD_DIM, UPCAST)
    return dk, dv


@triton.jit
def flex_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    Q_NUM, Q_IDX, FULL_NUM, FULL_IDX,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dkb, stride_dks, stride_dkh, stride_dvb, stride_dvs, stride_dvh,
    bm_sb, bm_sh, bm_sn, bmi_sb, bmi_sh, bmi_sn, fbm_sb, fbm_sh, fbm_sn, fbmi_sb, fbmi_sh, fbmi_sn,
    seqlen_q, seqlen_k, nheads, nheads_k, groups, qk_scale, sm_scale,
    MA0, MA1, MA2, SA0, SA1, SA2,
    MASK_MOD: tl.constexpr, SCORE_MOD: tl.constexpr, SCORE_BWD: tl.constexpr, HAS_MASK: tl.constexpr,
    HAS_SCORE: tl.constexpr, HAS_BLOCK_MASK: tl.constexpr, HAS_FULL: tl.constexpr, BM_B: tl.constexpr,
    BM_H: tl.constexpr, MASK_BLOCK: tl.constexpr, EVEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Grid (batch x kv heads, key blocks of BLOCK_N keys; BLOCK_N and BLOCK_M divide MASK_BLOCK):
    dK / dV of those keys over the query heads of the group and the query blocks the block mask's
    transposed lists name for their key block (full ones first, no mask), BLOCK_M rows a step."""
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    bhk = tl.program_id(0)
    b = bhk // nheads_k
    hk = bhk % nheads_k
    n0 = tl.program_id(1) * BLOCK_N
    b64 = b.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = n0 + offs_n
    k = _load_tile(_tile_ptrs(K + b64 * stride_kb + hk.to(tl.int64) * stride_kh, n0, offs_n, offs_d, stride_ks, False),
                   cols, seqlen_k, offs_d, HEAD_DIM, not EVEN, PAD_D, False)
    v = _load_tile(_tile_ptrs(V + b64 * stride_vb + hk.to(tl.int64) * stride_vh, n0, offs_n, offs_d, stride_vs, False),
                   cols, seqlen_k, offs_d, HEAD_DIM, not EVEN, PAD_D, False)
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    kb = n0 // MASK_BLOCK
    for g in range(0, groups):
        h = hk * groups + g
        q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh
        do_base = DO + b64 * stride_dob + h.to(tl.int64) * stride_doh
        lse_base = LSE + (b * nheads + h).to(tl.int64) * seqlen_q
        delta_base = DELTA + (b * nheads + h).to(tl.int64) * seqlen_q
        if HAS_BLOCK_MASK:
            if HAS_FULL:  # full blocks first: no mask evaluation
                fnum, fidx = _list(FULL_NUM, FULL_IDX, b, h, kb, fbm_sb, fbm_sh, fbm_sn, fbmi_sb, fbmi_sh, fbmi_sn,
                                   BM_B, BM_H)
                dk, dv = _dkdv_list(
                    dk, dv, fnum, fidx, k, v, q_base, do_base, lse_base, delta_base, cols, offs_m, offs_d, b, h,
                    stride_qs, stride_dos, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2,
                    MASK_MOD, SCORE_MOD, SCORE_BWD, HAS_SCORE, False, not EVEN, PAD_D, HEAD_DIM, UPCAST,
                    MASK_BLOCK, BLOCK_M)
            num, idx = _list(Q_NUM, Q_IDX, b, h, kb, bm_sb, bm_sh, bm_sn, bmi_sb, bmi_sh, bmi_sn, BM_B, BM_H)
            dk, dv = _dkdv_list(
                dk, dv, num, idx, k, v, q_base, do_base, lse_base, delta_base, cols, offs_m, offs_d, b, h,
                stride_qs, stride_dos, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2,
                MASK_MOD, SCORE_MOD, SCORE_BWD, HAS_SCORE, HAS_MASK, not EVEN, PAD_D, HEAD_DIM, UPCAST,
                MASK_BLOCK, BLOCK_M)
        else:
            n_even = seqlen_q // BLOCK_M
            for j in range(0, n_even):
                dk, dv = _dkdv_step(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, j * BLOCK_M, cols, offs_m, offs_d, b, h,
                    stride_qs, stride_dos, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2,
                    MASK_MOD, SCORE_MOD, SCORE_BWD, HAS_SCORE, False, False, PAD_D, HEAD_DIM, UPCAST)
            for j in range(n_even, tl.cdiv(seqlen_q, BLOCK_M)):
                dk, dv = _dkdv_step(
                    dk, dv, k, v, q_base, do_base, lse_base, delta_base, j * BLOCK_M, cols, offs_m, offs_d, b, h,
                    stride_qs, stride_dos, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2,
                    MASK_MOD, SCORE_MOD, SCORE_BWD, HAS_SCORE, False, True, PAD_D, HEAD_DIM, UPCAST)
    dk = dk * sm_scale
    dk_ptrs = _tile_ptrs(DK + b64 * stride_dkb + hk.to(tl.int64) * stride_dkh, n0, offs_n, offs_d, stride_dks, False)
    dv_ptrs = _tile_ptrs(DV + b64 * stride_dvb + hk.to(tl.int64) * stride_dvh, n0, offs_n, offs_d, stride_dvs, False)
    if EVEN and not PAD_D:
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty))
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty))
    else:
        kv_mask = (cols[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
        tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_step(
    dq, g0, g1, q, do, lse2, delta, k_base, v_base, start_n, m0, rows, offs_n, offs_d, b, h,
    stride_ks, stride_vs, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2, G0,
    MASK_MOD: tl.constexpr, SCORE_MOD: tl.constexpr, SCORE_BWD: tl.constexpr, SCORE_GRAD: tl.constexpr,
    HAS_SCORE: tl.constexpr, GRAD: tl.constexpr, APPLY_MASK: tl.constexpr, BOUNDS: tl.constexpr,
    PAD_D: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """One key block against this program's query rows: returns the updated (dq, g0, g1)."""
    cols = start_n + offs_n
    kT = _load_tile(_tile_ptrs(k_base, start_n, offs_n, offs_d, stride_ks, True), cols, seqlen_k, offs_d, HEAD_DIM,
                    BOUNDS, PAD_D, True)
    vT = _load_tile(_tile_ptrs(v_base, start_n, offs_n, offs_d, stride_vs, True), cols, seqlen_k, offs_d, HEAD_DIM,
                    BOUNDS, PAD_D, True)
    qk = _mm(q, kT, UPCAST)
    s, t = _mods(qk, b, h, rows[:, None], cols[None, :], seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2,
                 MASK_MOD, SCORE_MOD, HAS_SCORE, APPLY_MASK, BOUNDS)
    p = tl.exp2(s * _base2(qk_scale, HAS_SCORE) - lse2[:, None])
    dp = _mm(do, vT, UPCAST)
    ds = p * (dp - delta[:, None])
    if GRAD:
        if BOUNDS:
            qi = tl.minimum(rows, seqlen_q - 1)[:, None]
            ki = tl.minimum(cols, seqlen_k - 1)[None, :]
        else:
            qi = rows[:, None]
            ki = cols[None, :]
        g0, g1 = SCORE_GRAD(g0, g1, ds, b, h, qi, ki, SA0, SA1, SA2, m0, start_n, G0, BLOCK_M, BLOCK_N)
    if HAS_SCORE:
        ds = SCORE_BWD(ds, t, b, h, rows[:, None], cols[None, :], SA0, SA1, SA2)
    dq = _mma(ds.to(kT.dtype), tl.trans(kT), dq, UPCAST)
    return dq, g0, g1


@triton.jit
def _dq_list(
    dq, g0, g1, num, idx, q, do, lse2, delta, k_base, v_base, m0, rows, offs_n, offs_d, b, h,
    stride_ks, stride_vs, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2, G0,
    MASK_MOD: tl.constexpr, SCORE_MOD: tl.constexpr, SCORE_BWD: tl.constexpr, SCORE_GRAD: tl.constexpr,
    HAS_SCORE: tl.constexpr, GRAD: tl.constexpr, APPLY_MASK: tl.constexpr, BOUNDS: tl.constexpr,
    PAD_D: tl.constexpr, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
    MASK_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """The key blocks of one block-mask list for the dQ pass (as :func:`_fwd_list`)."""
    SUBS: tl.constexpr = MASK_BLOCK // BLOCK_N
    n = num * SUBS
    blk = tl.load(idx)
    for i in range(0, n):
        start_n = blk * MASK_BLOCK + (i % SUBS) * BLOCK_N
        blk = tl.load(idx + tl.minimum(i + 1, n - 1) // SUBS)
        dq, g0, g1 = _dq_step(
            dq, g0, g1, q, do, lse2, delta, k_base, v_base, start_n, m0, rows, offs_n, offs_d, b, h,
            stride_ks, stride_vs, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2, G0,
            MASK_MOD, SCORE_MOD, SCORE_BWD, SCORE_GRAD, HAS_SCORE, GRAD, APPLY_MASK, BOUNDS, PAD_D, HEAD_DIM,
            UPCAST, BLOCK_M, BLOCK_N)
    return dq, g0, g1


@triton.jit
def flex_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA,
    KV_NUM, KV_IDX, FULL_NUM, FULL_IDX,
    stride_qb, stride_qs, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_dob, stride_dos, stride_doh, stride_dqb, stride_dqs, stride_dqh,
    bm_sb, bm_sh, bm_sn, bmi_sb, bmi_sh, bmi_sn, fbm_sb, fbm_sh, fbm_sn, fbmi_sb, fbmi_sh, fbmi_sn,
    seqlen_q, seqlen_k, nheads, groups, qk_scale, sm_scale,
    MA0, MA1, MA2, SA0, SA1, SA2, G0,
    MASK_MOD: tl.constexpr, SCORE_MOD: tl.constexpr, SCORE_BWD: tl.constexpr, SCORE_GRAD: tl.constexpr,
    SCORE_GRAD_END: tl.constexpr, HAS_MASK: tl.constexpr, HAS_SCORE: tl.constexpr, GRAD: tl.constexpr,
    HAS_BLOCK_MASK: tl.constexpr, HAS_FULL: tl.constexpr, BM_B: tl.constexpr, BM_H: tl.constexpr,
    MASK_BLOCK: tl.constexpr, EVEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """Grid (batch x heads, query blocks of BLOCK_M rows), the forward's walk: dQ of those rows,
    and with GRAD the captured tensor's gradient (fp32 buffer G0, a few atomics per program)."""
    PAD_D: tl.constexpr = BLOCK_D != HEAD_DIM
    bh = tl.program_id(0)
    pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
    b = bh // nheads
    h = bh % nheads
    hk = h // groups
    m0 = pid_m * BLOCK_M
    b64 = b.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    rows = m0 + offs_m
    row_ok = rows < seqlen_q
    q = _load_tile(_tile_ptrs(Q + b64 * stride_qb + h.to(tl.int64) * stride_qh, m0, offs_m, offs_d, stride_qs, False),
                   rows, seqlen_q, offs_d, HEAD_DIM, not EVEN, PAD_D, False)
    do = _load_tile(_tile_ptrs(DO + b64 * stride_dob + h.to(tl.int64) * stride_doh, m0, offs_m, offs_d, stride_dos,
                               False), rows, seqlen_q, offs_d, HEAD_DIM, not EVEN, PAD_D, False)
    lse2 = _lse2(LSE + bh.to(tl.int64) * seqlen_q + rows, row_ok, not EVEN)
    if EVEN:
        delta = tl.load(DELTA + bh.to(tl.int64) * seqlen_q + rows)
    else:
        delta = tl.load(DELTA + bh.to(tl.int64) * seqlen_q + rows, mask=row_ok, other=0.0)
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh
    dq = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    g0 = sm_scale * 0.0  # the captured tensor's partial sums (fp32 scalars)
    g1 = sm_scale * 0.0
    if HAS_BLOCK_MASK:
        qb = m0 // MASK_BLOCK
        if HAS_FULL:  # full blocks first: no mask evaluation
            fnum, fidx = _list(FULL_NUM, FULL_IDX, b, h, qb, fbm_sb, fbm_sh, fbm_sn, fbmi_sb, fbmi_sh, fbmi_sn,
                               BM_B, BM_H)
            dq, g0, g1 = _dq_list(
                dq, g0, g1, fnum, fidx, q, do, lse2, delta, k_base, v_base, m0, rows, offs_n, offs_d, b, h,
                stride_ks, stride_vs, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2, G0,
                MASK_MOD, SCORE_MOD, SCORE_BWD, SCORE_GRAD, HAS_SCORE, GRAD, False, not EVEN, PAD_D, HEAD_DIM,
                UPCAST, BLOCK_M, MASK_BLOCK, BLOCK_N)
        num, idx = _list(KV_NUM, KV_IDX, b, h, qb, bm_sb, bm_sh, bm_sn, bmi_sb, bmi_sh, bmi_sn, BM_B, BM_H)
        dq, g0, g1 = _dq_list(
            dq, g0, g1, num, idx, q, do, lse2, delta, k_base, v_base, m0, rows, offs_n, offs_d, b, h,
            stride_ks, stride_vs, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2, G0,
            MASK_MOD, SCORE_MOD, SCORE_BWD, SCORE_GRAD, HAS_SCORE, GRAD, HAS_MASK, not EVEN, PAD_D, HEAD_DIM,
            UPCAST, BLOCK_M, MASK_BLOCK, BLOCK_N)
    else:
        n_even = seqlen_k // BLOCK_N
        for j in range(0, n_even):
            dq, g0, g1 = _dq_step(
                dq, g0, g1, q, do, lse2, delta, k_base, v_base, j * BLOCK_N, m0, rows, offs_n, offs_d, b, h,
                stride_ks, stride_vs, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2, G0,
                MASK_MOD, SCORE_MOD, SCORE_BWD, SCORE_GRAD, HAS_SCORE, GRAD, False, False, PAD_D, HEAD_DIM,
                UPCAST, BLOCK_M, BLOCK_N)
        for j in range(n_even, tl.cdiv(seqlen_k, BLOCK_N)):
            dq, g0, g1 = _dq_step(
                dq, g0, g1, q, do, lse2, delta, k_base, v_base, j * BLOCK_N, m0, rows, offs_n, offs_d, b, h,
                stride_ks, stride_vs, seqlen_q, seqlen_k, qk_scale, MA0, MA1, MA2, SA0, SA1, SA2, G0,
                MASK_MOD, SCORE_MOD, SCORE_BWD, SCORE_GRAD, HAS_SCORE, GRAD, False, True, PAD_D, HEAD_DIM,
                UPCAST, BLOCK_M, BLOCK_N)
    dq = dq * sm_scale
    dq_ptrs = _tile_ptrs(DQ + b64 * stride_dqb + h.to(tl.int64) * stride_dqh, m0, offs_m, offs_d, stride_dqs, False)
    if EVEN and not PAD_D:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty))
    else:
        tl.store(dq_ptrs, dq.to(DQ.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    if GRAD:
        SCORE_GRAD_END(g0, g1, b, h, SA0, SA1, SA2, G0)
