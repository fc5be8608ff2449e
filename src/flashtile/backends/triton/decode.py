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

``_append_kernel`` writes new tokens into the cache first. Rotary embedding is applied inside
both kernels (k as it is written, q as it is loaded). Every index a kernel is handed is
checked before use and reported through an error flag (``ERR_*`` bits below); nothing is
read or written out of bounds, so the host needs at most one read-back per call.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import LOG2E, _alibi_slope, _mm, _mma, _scores, _softmax_end, _softmax_sink, _softmax_step, _window

# Error bits a kernel ORs into ERR[0] when an index it was handed is out of range. The kernels
# never read or write out of bounds: a row with a bad index is skipped (its output is NaN).
ERR_SEQLENS, ERR_LEFTPAD, ERR_ROW, ERR_BLOCK, ERR_ROTARY = 1, 2, 4, 8, 16


@triton.jit
def _row_checks(SEQ, LEFTPAD, BT, b, stride_btb, sn, capacity, n_index,
                HAS_LEFTPAD: tl.constexpr, HAS_BT: tl.constexpr, KV_MODE: tl.constexpr):  # fmt: skip
    """Per batch row: (tokens in the cache before the new ones, leftpad, dense cache row, error bits).
    ``SEQ`` None: every row holds ``capacity`` tokens (dense k / v of one length: no vector to read)."""
    if SEQ is None:
        sl = capacity - sn + b * 0
    else:
        sl = tl.load(SEQ + b)
    code = tl.where((sl < 0) | (sl + sn > capacity), 1, 0)
    if HAS_LEFTPAD:
        lp = tl.load(LEFTPAD + b)
        code = code | tl.where((lp < 0) | (lp > sl), 2, 0)
    else:
        lp = sl * 0
    row = b
    if KV_MODE == 0:
        if HAS_BT:  # cache_batch_idx
            row = tl.load(BT + b * stride_btb)
            code = code | tl.where((row < 0) | (row >= n_index), 4, 0)
    return sl, lp, row, code


@triton.jit
def _rot_layout(offs_d, ROT_DIM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Rotary pairing of each channel d: (partner channel, cos/sin column, sign of the partner
    term, rotated?). Channels >= ROT_DIM pass through (partner d, sign 0)."""
    in_rot = offs_d < ROT_DIM
    if INTERLEAVED:  # GPT-J: (2c, 2c + 1)
        partner = offs_d ^ 1
        col = offs_d // 2
        sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
    else:  # NeoX: (c, c + ROT_DIM / 2)
        lo = offs_d < ROT_DIM // 2
        partner = tl.where(lo, offs_d + ROT_DIM // 2, offs_d - ROT_DIM // 2)
        col = tl.where(lo, offs_d, offs_d - ROT_DIM // 2)
        sign = tl.where(lo, -1.0, 1.0)
    return tl.where(in_rot, partner, offs_d), tl.where(in_rot, col, 0), tl.where(in_rot, sign, 0.0), in_rot


@triton.jit
def _rotate(x, xp, COS, SIN, stride_ro, pos, col, sign, in_rot, mask):
    """Rows of ``x`` (partner channels ``xp``) rotated to positions ``pos``, in fp32 (the rule
    of :func:`flashtile.rotary.apply_rotary_at`)."""
    cmask = mask & in_rot[None, :]
    c = tl.load(COS + pos[:, None] * stride_ro + col[None, :], mask=cmask, other=1.0).to(tl.float32)
    sn = tl.load(SIN + pos[:, None] * stride_ro + col[None, :], mask=cmask, other=0.0).to(tl.float32)
    return x.to(tl.float32) * c + sign[None, :] * xp.to(tl.float32) * sn


@triton.jit
def _decode_kernel(
    Q, K, V, BT, SEQ, LEFTPAD, SLOPES, O, LSE, ERR, OUT, LSE_OUT, CNT, COS, SIN,
    stride_qb, stride_qs, stride_qh,
    stride_kblk, stride_kt, stride_kh,
    stride_vblk, stride_vt, stride_vh,
    stride_btb, stride_ro, n_ro,
    stride_os, stride_ob, stride_oq, stride_oh,
    stride_ls, stride_lb, stride_lh,
    stride_ab,
    stride_ub, stride_uq, stride_uh, stride_mb, stride_mh,
    seqlen_q, sn, capacity, n_index, page, chunk, Hk, G,
    qk_scale, cap_out, window_left, window_right,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
    HAS_LEFTPAD: tl.constexpr, HAS_BT: tl.constexpr, UPCAST: tl.constexpr, KV_MODE: tl.constexpr,
    ROT_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, ROT_ALONG: tl.constexpr,
    SINK=None, HAS_SINK: tl.constexpr = False, HEAD_DIM_V: tl.constexpr = 0, BLOCK_DV: tl.constexpr = 0,
    MERGE: tl.constexpr = False, MERGE_M: tl.constexpr = 2, SPLIT_CHUNK: tl.constexpr = 1,
    MERGE_FLAT: tl.constexpr = False, MERGE_SYNC_ONLY: tl.constexpr = False,
):  # fmt: skip
    """One (batch row, KV head, key piece, block of packed query rows): the piece's (out, lse).
    ``HEAD_DIM_V`` / ``BLOCK_DV``: v's (and out's) head dim and block when it differs (0: the same).
    ``HAS_SINK`` (with one piece, or with ``MERGE``; split rows without it get the sink in
    ``_merge_kernel``): the fp32 per-head logits SINK join each row's denominator.
    ``MERGE`` (more than one piece): the pieces are merged here, by the last program of each
    (batch row, KV head, row block) group to finish (see :func:`_merge_pieces`), into ``OUT``
    (B, Sq, H, Dv) and ``LSE_OUT`` (B, H, Sq) (strides ``stride_u*`` / ``stride_m*``), counted in
    the int32 ``CNT`` (one per group, zero before the launch and left zero after it); ``MERGE_FLAT``:
    the merge's form (see :func:`_merge_pieces`); ``MERGE_SYNC_ONLY``: a benchmark's probe, the
    counting and the counter reset without the merge (OUT / LSE_OUT not written: a wrong result).
    ``ROT_DIM`` > 0: q is rotated on load to position ``seqlens`` (+ its index when ``ROT_ALONG``),
    flash-attn's (the cache index of the first new token, leftpad included), with the
    (n_ro, ROT_DIM / 2) tables COS / SIN."""
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
    HD_V: tl.constexpr = HEAD_DIM_V if HEAD_DIM_V > 0 else HEAD_DIM
    BDV: tl.constexpr = BLOCK_DV if BLOCK_DV > 0 else BLOCK_D
    offs_dv = tl.arange(0, BDV)
    if BLOCK_D == HEAD_DIM:  # no column mask: lets the loads vectorise
        q_mask = row_ok[:, None]
    else:
        q_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    if BDV == HD_V:
        o_mask = row_ok[:, None]
    else:
        o_mask = row_ok[:, None] & (offs_dv < HD_V)[None, :]
    q_base = Q + b * stride_qb + t[:, None] * stride_qs + head[:, None] * stride_qh
    q = tl.load(q_base + offs_d[None, :], mask=q_mask, other=0.0)

    sl, lp, row, code = _row_checks(SEQ, LEFTPAD, BT, b, stride_btb, sn, capacity, n_index,
                                    HAS_LEFTPAD, HAS_BT, KV_MODE)  # fmt: skip
    if ROT_DIM > 0:
        pos_q = sl + t * 0  # query positions: all at the end of the cache,
        last = sl  # (the row's furthest)
        if ROT_ALONG:  # or one each (causal / windowed)
            pos_q = pos_q + t
            last = last + seqlen_q - 1
        code = code | tl.where((code == 0) & (last >= n_ro), 16, 0)
        partner, col, sign, in_rot = _rot_layout(offs_d, ROT_DIM, INTERLEAVED)
        r_mask = (rows < tl.where(code == 0, seqlen_q * G, 0))[:, None] & (offs_d < HEAD_DIM)[None, :]
        qp = tl.load(q_base + partner[None, :], mask=r_mask, other=0.0)
        q = _rotate(q, qp, COS, SIN, stride_ro, pos_q, col, sign, in_rot, r_mask).to(q.dtype)
    n_keys = tl.where(code == 0, sl + sn - lp, 0)  # keys of this row, numbered from 0 at leftpad
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
    # (rows, 1) slopes; head < H on every row, the padded ones too: no mask needed
    slope2 = _alibi_slope(SLOPES, b, head[:, None], stride_ab, LOG2E, HAS_ALIBI)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BDV], tl.float32)
    bad_blk = code * 0
    k_base = K + kh * stride_kh + offs_d[None, :]
    v_base = V + kh * stride_vh + offs_dv[None, :]
    for j0 in range(lo, hi, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        col_ok = cols < hi
        pos = cols + lp
        if KV_MODE == 0:  # dense: the row's one "page" holds every position
            k_off = row.to(tl.int64) * stride_kblk + pos[:, None] * stride_kt
            v_off = row.to(tl.int64) * stride_vblk + pos[:, None] * stride_vt
        elif KV_MODE == 1:  # pages hold whole key blocks: one block id per tile, contiguous rows
            blk = tl.load(BT + b * stride_btb + j0 // page)
            blk_ok = (blk >= 0) & (blk < n_index)
            bad_blk = bad_blk | tl.where(blk_ok, 0, 8)
            blk = tl.where(blk_ok, blk, 0).to(tl.int64)
            col_ok = cols < tl.where(blk_ok, hi, j0)  # (scalar & vector: the interpreter gets it wrong)
            k_off = blk * stride_kblk + (pos % page)[:, None] * stride_kt
            v_off = blk * stride_vblk + (pos % page)[:, None] * stride_vt
        else:  # any page size: a block id per key
            blk = tl.load(BT + b * stride_btb + pos // page, mask=col_ok, other=0)
            blk_ok = (blk >= 0) & (blk < n_index)
            bad_blk = bad_blk | tl.max(tl.where(blk_ok | ~col_ok, 0, 8), 0)
            col_ok = col_ok & blk_ok
            blk = tl.where(blk_ok, blk, 0).to(tl.int64)[:, None]
            k_off = blk * stride_kblk + (pos % page)[:, None] * stride_kt
            v_off = blk * stride_vblk + (pos % page)[:, None] * stride_vt
        if BLOCK_D == HEAD_DIM:
            kv_mask = col_ok[:, None]
        else:
            kv_mask = col_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
        if BDV == HD_V:
            v_mask = col_ok[:, None]
        else:
            v_mask = col_ok[:, None] & (offs_dv < HD_V)[None, :]
        k = tl.load(k_base + k_off, mask=kv_mask, other=0.0)
        qk = _mm(q, tl.trans(k), UPCAST)
        s, _ = _scores(qk, t[:, None], cols[None, :], off, qk_scale, cap_out, slope2, HAS_SOFTCAP, HAS_ALIBI)
        vis = _window(col_ok[None, :] & row_ok[:, None], t[:, None], cols[None, :], off, window_left, window_right,
                      HAS_WL, HAS_WR)
        s = tl.where(vis, s, float("-inf"))
        p, alpha, l_i, m_i = _softmax_step(s, m_i, l_i, True)
        v = tl.load(v_base + v_off, mask=v_mask, other=0.0)
        acc = _mma(p.to(v.dtype), v, acc * alpha[:, None], UPCAST)

    code = code | bad_blk
    tl.atomic_or(ERR, code, mask=code != 0)
    if HAS_SINK and not MERGE:
        acc, l_i, m_i = _softmax_sink(acc, m_i, l_i, tl.load(SINK + head) * LOG2E)
    out, lse = _softmax_end(acc, m_i, l_i, 1.0, True)
    out = tl.where(code == 0, out, float("nan"))
    lse = tl.where(code == 0, lse, float("nan"))
    o_off = b * stride_ob + t[:, None] * stride_oq + head[:, None] * stride_oh + offs_dv[None, :]
    l_off = b * stride_lb + head * stride_lh + t
    tl.store(O + split * stride_os + o_off, out.to(O.dtype.element_ty), mask=o_mask)
    tl.store(LSE + split * stride_ls + l_off, lse, mask=row_ok)
    if MERGE:
        _merge_pieces(O, LSE, OUT, LSE_OUT, CNT, SINK, b, kh, pid_bh, pid_m,
                      stride_os, stride_ob, stride_oq, stride_oh, stride_ls, stride_lb, stride_lh,
                      stride_ub, stride_uq, stride_uh, stride_mb, stride_mh, seqlen_q, G,
                      HD_V, BDV, BLOCK_M, HAS_SINK, MERGE_M, SPLIT_CHUNK, MERGE_FLAT, MERGE_SYNC_ONLY)  # fmt: skip


@triton.jit
def _merge_pieces(O, LSE, OUT, LSE_OUT, CNT, SINK, b, kh, pid_bh, pid_m,
                  stride_os, stride_ob, stride_oq, stride_oh, stride_ls, stride_lb, stride_lh,
                  stride_ub, stride_uq, stride_uh, stride_mb, stride_mh, seqlen_q, G,
                  HD_V: tl.constexpr, BDV: tl.constexpr, BLOCK_M: tl.constexpr, HAS_SINK: tl.constexpr,
                  MERGE_M: tl.constexpr, SPLIT_CHUNK: tl.constexpr, MERGE_FLAT: tl.constexpr = False,
                  MERGE_SYNC_ONLY: tl.constexpr = False):  # fmt: skip
    """The end of a split :func:`_decode_kernel` program with ``MERGE``: count this piece as done
    in its group's counter; the program that completes the group (whichever split it is) merges
    every piece of the group's rows by log-sum-exp into OUT / LSE_OUT (the rule of
    ``_merge_kernel``: the sink, if any, once here) and resets the counter to 0 for the next launch.

    Memory ordering (the PTX memory model; the pattern of CUTLASS's split-K semaphore): every
    thread's partial stores precede the CTA barrier; the counter's ``atom.add.acq_rel.gpu`` is
    issued by one thread after it, so as a release it orders all of this program's stores before
    the increment at GPU scope (the barrier puts them before it in causality order). The program
    that reads ``splits - 1`` acquired every earlier increment, hence every other piece's stores;
    its threads read the pieces after the barrier through which Triton hands them the atomic's
    result, and read them with ``.cg`` (from L2, never a stale L1 line). Summation order is fixed
    (pieces in index order, in chunks), so the result does not depend on which program merges:
    repeated calls are bitwise equal. The counter is reset with a plain store: no other program
    of this launch touches it any more, and the next launch on the stream starts after this one."""
    n_split = tl.num_programs(1)
    tl.debug_barrier()
    ticket = tl.atomic_add(CNT + pid_bh * tl.num_programs(2) + pid_m, 1, sem="acq_rel", scope="gpu")
    if ticket == n_split - 1:
        tl.store(CNT + pid_bh * tl.num_programs(2) + pid_m, 0)
        if not MERGE_SYNC_ONLY:
            rows = pid_m * BLOCK_M + tl.arange(0, MERGE_M)  # (MERGE_M covers the block's real rows)
            row_ok = rows < seqlen_q * G
            t = rows // G
            head = kh * G + rows % G
            offs_dv = tl.arange(0, BDV)
            l_row = b * stride_lb + head * stride_lh + t  # (MERGE_M,)
            o_row = b * stride_ob + t * stride_oq + head * stride_oh  # (MERGE_M,)
            d_ok = offs_dv < HD_V
            if MERGE_FLAT:
                acc, tot, m = _merge_flat(O, LSE, l_row, o_row, offs_dv, row_ok, d_ok, n_split, stride_os, stride_ls,
                                          MERGE_M, BDV, SPLIT_CHUNK)  # fmt: skip
            else:
                acc, tot, m = _merge_chunked(O, LSE, l_row, o_row, offs_dv, row_ok, d_ok, n_split, stride_os, stride_ls,
                                             MERGE_M, BDV, SPLIT_CHUNK)  # fmt: skip
            if HAS_SINK:
                sink = tl.load(SINK + head)
                m_new = tl.maximum(m, sink)
                m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = tl.exp(m - m_use)
                tot = tot * alpha + tl.exp(sink - m_use)
                acc = acc * alpha[:, None]
                m = m_new
            m_use = tl.where(m == float("-inf"), 0.0, m)
            tot_safe = tl.where(tot == 0.0, 1.0, tot)  # (no key anywhere: out 0, lse -inf)
            lse_fin = tl.where(tot == 0.0, float("-inf"), m_use + tl.log(tot_safe))
            u_ptr = OUT + b * stride_ub + t[:, None] * stride_uq + head[:, None] * stride_uh + offs_dv[None, :]
            m_off = b * stride_mb + head * stride_mh + t
            tl.store(u_ptr, (acc / tot_safe[:, None]).to(OUT.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
            tl.store(LSE_OUT + m_off, lse_fin, mask=row_ok)


@triton.jit
def _merge_chunked(O, LSE, l_row, o_row, offs_dv, row_ok, d_ok, n_split, stride_os, stride_ls,
                   MERGE_M: tl.constexpr, BDV: tl.constexpr, SPLIT_CHUNK: tl.constexpr):  # fmt: skip
    """The pieces of ``MERGE_M`` rows read as ``(SPLIT_CHUNK, MERGE_M, BDV)`` tiles, one per chunk,
    reduced over the pieces with ``tl.max`` / ``tl.sum`` (across warps: shared memory and
    barriers), online log-sum-exp over the chunks. Returns (acc (MERGE_M, BDV), tot, m (MERGE_M,))."""
    m = tl.full([MERGE_M], float("-inf"), tl.float32)
    tot = tl.zeros([MERGE_M], tl.float32)
    acc = tl.zeros([MERGE_M, BDV], tl.float32)
    for s0 in range(0, n_split, SPLIT_CHUNK):  # pieces in chunks, online log-sum-exp over the chunks
        si = s0 + tl.arange(0, SPLIT_CHUNK)
        ok2 = (si < n_split)[:, None] & row_ok[None, :]  # (chunk, rows)
        lse = tl.load(LSE + si[:, None] * stride_ls + l_row[None, :], mask=ok2, other=float("-inf"),
                      cache_modifier=".cg")  # fmt: skip
        o = tl.load(O + si[:, None, None] * stride_os + o_row[None, :, None] + offs_dv[None, None, :],
                    mask=ok2[:, :, None] & d_ok[None, None, :], other=0.0, cache_modifier=".cg")  # fmt: skip
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_use)
        w = tl.exp(lse - m_use[None, :])
        tot = tot * alpha + tl.sum(w, 0)
        acc = acc * alpha[:, None] + tl.sum(w[:, :, None] * o, 0)
        m = m_new
    return acc, tot, m


@triton.jit
def _merge_flat(O, LSE, l_row, o_row, offs_dv, row_ok, d_ok, n_split, stride_os, stride_ls,
                MERGE_M: tl.constexpr, BDV: tl.constexpr, SPLIT_CHUNK: tl.constexpr):  # fmt: skip
    """The rule of :func:`_merge_chunked` with each piece read as its own ``(MERGE_M, BDV)`` tile
    and ``MERGE_M`` lse: a chunk's ``SPLIT_CHUNK`` pieces unrolled, all their loads issued first
    (one memory round trip), then combined elementwise in piece order (max, weights, sums), so no
    reduction across warps: no shared memory, no barrier. Returns (acc, tot, m)."""
    m = tl.full([MERGE_M], float("-inf"), tl.float32)
    tot = tl.zeros([MERGE_M], tl.float32)
    acc = tl.zeros([MERGE_M, BDV], tl.float32)
    o_2d = o_row[:, None] + offs_dv[None, :]
    ok_o = d_ok[None, :]
    for s0 in range(0, n_split, SPLIT_CHUNK):
        lses = ()
        outs = ()
        for i in tl.static_range(SPLIT_CHUNK):  # every load of the chunk first
            here = row_ok & (l_row * 0 + s0 + i < n_split)  # (a vector: the interpreter's scalar & vector is wrong)
            lses = lses + (tl.load(LSE + (s0 + i) * stride_ls + l_row, mask=here, other=float("-inf"),
                                   cache_modifier=".cg"),)  # fmt: skip
            outs = outs + (tl.load(O + (s0 + i) * stride_os + o_2d, mask=ok_o & here[:, None], other=0.0,
                                   cache_modifier=".cg"),)  # fmt: skip
        m_new = m
        for i in tl.static_range(SPLIT_CHUNK):
            m_new = tl.maximum(m_new, lses[i])
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_use)
        tot = tot * alpha
        acc = acc * alpha[:, None]
        for i in tl.static_range(SPLIT_CHUNK):  # in piece order
            w = tl.exp(lses[i] - m_use)
            tot = tot + w
            acc = acc + w[:, None] * outs[i]
        m = m_new
    return acc, tot, m


@triton.jit
def _append_kernel(
    KN, VN, K, V, BT, SEQ, LEFTPAD, ERR, COS, SIN,
    stride_knb, stride_knt, stride_knh,
    stride_vnb, stride_vnt, stride_vnh,
    stride_kblk, stride_kt, stride_kh,
    stride_vblk, stride_vt, stride_vh,
    stride_btb, stride_ro, n_ro,
    sn, capacity, n_index, page, Hk,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr,
    HAS_LEFTPAD: tl.constexpr, HAS_BT: tl.constexpr, KV_MODE: tl.constexpr,
    ROT_DIM: tl.constexpr, INTERLEAVED: tl.constexpr,
    HEAD_DIM_V: tl.constexpr = 0, BLOCK_DV: tl.constexpr = 0,
):  # fmt: skip
    """Write the new tokens ``KN/VN (B, sn, Hk, D)`` at cache positions ``SEQ[b] ..`` of row b
    (``HEAD_DIM_V`` / ``BLOCK_DV``: VN's head dim and block when it differs, 0: the same).
    Grid ``(B * Hk, cdiv(sn, BLOCK_T))``. ``ROT_DIM`` > 0: k is rotated to its position
    ``SEQ[b] + t`` first (its index in the cache, as flash-attn). Nothing is written for a row whose seqlens / leftpad / cache
    row / rotary positions are out of range, nor for a token whose block id is."""
    b = tl.program_id(0) // Hk
    kh = tl.program_id(0) % Hk
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    sl, lp, row, code = _row_checks(SEQ, LEFTPAD, BT, b, stride_btb, sn, capacity, n_index,
                                    HAS_LEFTPAD, HAS_BT, KV_MODE)  # fmt: skip
    if ROT_DIM > 0:
        code = code | tl.where((code == 0) & (sl + sn - 1 >= n_ro), 16, 0)
    ok = t < tl.where(code == 0, sn, 0)
    pos = sl + t
    if KV_MODE == 0:
        blk = tl.zeros([BLOCK_T], tl.int64) + row
        tok = pos
    else:
        blk = tl.load(BT + b * stride_btb + pos // page, mask=ok, other=0)
        blk_ok = (blk >= 0) & (blk < n_index)
        code = code | tl.max(tl.where(blk_ok | ~ok, 0, 8), 0)
        ok = ok & blk_ok
        blk = blk.to(tl.int64)
        tok = pos % page
    offs_d = tl.arange(0, BLOCK_D)
    mask = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    kn_base = KN + b * stride_knb + t[:, None] * stride_knt + kh * stride_knh
    kn = tl.load(kn_base + offs_d[None, :], mask=mask)
    if ROT_DIM > 0:
        partner, col, sign, in_rot = _rot_layout(offs_d, ROT_DIM, INTERLEAVED)
        knp = tl.load(kn_base + partner[None, :], mask=mask)
        kn = _rotate(kn, knp, COS, SIN, stride_ro, sl + t, col, sign, in_rot, mask)
    HD_V: tl.constexpr = HEAD_DIM_V if HEAD_DIM_V > 0 else HEAD_DIM
    BDV: tl.constexpr = BLOCK_DV if BLOCK_DV > 0 else BLOCK_D
    offs_dv = tl.arange(0, BDV)
    mask_v = ok[:, None] & (offs_dv < HD_V)[None, :]
    vn = tl.load(VN + b * stride_vnb + t[:, None] * stride_vnt + kh * stride_vnh + offs_dv[None, :], mask=mask_v)
    tl.store(K + blk[:, None] * stride_kblk + tok[:, None] * stride_kt + kh * stride_kh + offs_d[None, :],
             kn.to(K.dtype.element_ty), mask=mask)  # fmt: skip
    tl.store(V + blk[:, None] * stride_vblk + tok[:, None] * stride_vt + kh * stride_vh + offs_dv[None, :],
             vn.to(V.dtype.element_ty), mask=mask_v)  # fmt: skip
    tl.atomic_or(ERR, code, mask=code != 0)


@triton.jit
def _merge_kernel(
    O, LSE, OUT, LSE_OUT, splits,
    stride_os, stride_ob, stride_oq, stride_oh,
    stride_ls, stride_lb, stride_lh,
    stride_ub, stride_uq, stride_uh,
    stride_mb, stride_mh,
    H, Sq,
    HEAD_DIM: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    SINK=None, HAS_SINK: tl.constexpr = False,
):  # fmt: skip
    """One (batch, query, head) row: out = sum_i exp(lse_i - lse) out_i, lse = logsumexp_i lse_i.
    HAS_SINK: the head's sink logit is one more term of the logsumexp, without value (counted
    once here, the pieces were computed without it)."""
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
    if HAS_SINK:
        sink = tl.load(SINK + hh)
        m = tl.maximum(m, sink)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse - m_safe)
    tot = tl.sum(w, 0)
    if HAS_SINK:
        tot += tl.exp(sink - m_safe)
    o = tl.load(O + si[:, None] * stride_os + b * stride_ob + t * stride_oq + hh * stride_oh + offs_d[None, :],
                mask=s_ok[:, None] & d_ok[None, :], other=0.0)  # fmt: skip
    out = tl.sum(w[:, None] * o, 0) / tl.where(tot == 0.0, 1.0, tot)
    tl.store(OUT + b * stride_ub + t * stride_uq + hh * stride_uh + offs_d, out.to(OUT.dtype.element_ty), mask=d_ok)
    tl.store(LSE_OUT + b * stride_mb + hh * stride_mh + t, tl.where(tot == 0.0, float("-inf"), m_safe + tl.log(tot)))
