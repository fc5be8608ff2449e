"""Gluon forward attention kernels for Hopper (sm_90): TMA loads, mbarrier-guarded K/V ring,
``warpgroup_mma`` (wgmma) for both products, online softmax in the wgmma accumulator layout.

Kernels only: the host side (descriptors, grid, configs) is :mod:`.launch`. Importing this
module needs Triton >= 3.6 with Gluon (``triton.experimental.gluon``).

Layouts and semantics
---------------------
Dense calls: q ``(B, Sq, H, D)``, k/v ``(B, Sk, Hk, D)`` through 4-D TMA descriptors with
blocks ``[1, rows, 1, BLOCK_D]``: rows past a batch's sequence end are zero-filled by TMA on
loads and clipped on stores (``BLOCK_D``: ``D`` rounded up to a power of two, as Gluon tiles
are; the extra columns are zero-filled and clipped the same way). Varlen calls: q
``(total_q, H, D)``, k/v ``(total_k, Hk, D)`` (the ``(1, total, H, D)`` internal layout without
its unit batch) through 3-D descriptors with blocks ``[rows, 1, BLOCK_D]`` and ``cu_seqlens``:
a tile near a sequence end reads the next sequence's tokens;
those keys are masked to -inf (their V rows are multiplied by exact zeros), and rows outside the
sequence are never written (masked stores for a ragged last query tile).

Query head ``h`` reads KV head ``h // group``. Query ``i`` sees key ``j`` when
``i + off - wl <= j <= i + off + wr`` (``off = seqlen_k - seqlen_q``: bottom-right alignment;
a missing side is unbounded). Scores are in base 2: ``s = q.k * softmax_scale * log2(e)``, or
with softcap ``s = softcap * log2(e) * tanh(q.k * softmax_scale / softcap)``; the host passes
these two constants as ``qk_scale`` / ``cap_out``. Outputs: o like q, lse float32 natural log
(``(B, H, Sq)``; varlen ``(1, H, total_q)``), ``-inf`` with o = 0 on rows that see no key.

Kernels
-------
The key blocks a query tile visits are one contiguous run, split into masked blocks below the
window, unmasked blocks, and masked blocks at the diagonal / window edge / ragged key end: only
the masked ones pay for mask arithmetic. Every kernel uses 128-row query tiles handled as two
64-row warpgroups (wgmma M = 64 each).

* ``attn_fwd_plain`` (design step A): one program per (query tile, head, batch), 8 warps in one
  partition that also issues the TMA loads; a CTA-wide barrier per key block before a ring slot
  is refilled.
* ``attn_fwd_ws`` (step B, the default): warp-specialised. A 1-warp producer issues every TMA
  load (Q halves, then K/V through full/empty mbarriers); two 4-warp consumer warpgroups each own
  64 query rows and follow FA3's schedule: S_j = Q K_j^T and O += P_{j-1} V_{j-1} are issued on
  the warpgroup's turn (ping-pong through a pair of mbarriers, so one warpgroup's softmax overlaps
  the other's wgmma), and the softmax of S_j runs while P_{j-1} V_{j-1} is still in flight.
* ``attn_fwd_persistent`` (step C, dense calls): the ``ws`` partitions loop over a tile list
  computed on the host (:mod:`.sched`: heaviest tiles first, LPT-balanced over one program per
  SM); the K/V ring and the turns run on across tiles, and each consumer releases its Q buffer
  (``q_empty``) once its output tile is stored, so the next tile's loads overlap the epilogue.
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

LN2: gl.constexpr = gl.constexpr(0.6931471805599453)
LOG2E: gl.constexpr = gl.constexpr(1.4426950408889634)
NEG_2LOG2E: gl.constexpr = gl.constexpr(-2.8853900817779268)  # exp(-2|x|) = exp2(this * |x|)
#: Integer arguments that get no value specialisation (== 1, % 16): one compiled kernel serves
#: every sequence length, window, GQA group and stride, instead of one per divisibility class.
_NO_SPECIALIZE = ["stride_os", "stride_oh", "stride_lb", "stride_lh", "seqlen_q", "seqlen_k", "group",
                  "window_left", "window_right"]
#: the ws kernel's flex arguments (None, so not in the compiled kernel, when FLEX is off)
_FLEX_NO_SPECIALIZE = ["bm_sb", "bm_sh", "bm_nk", "MA1", "MA2", "SA1", "SA2"]


# ---------------------------------------------------------------------------------------
# helpers (inlined)
# ---------------------------------------------------------------------------------------


@gluon.jit
def _tanh(x):
    """tanh through exp2 (no overflow, no cancellation near 0): sign(x) (1 - e) / (1 + e), e = exp(-2|x|)."""
    e = gl.exp2(NEG_2LOG2E * gl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return gl.where(x < 0, -t, t)


@gluon.jit
def _block_range(r_lo, r_hi, n_cols, off, wl, wr, HAS_WL: gl.constexpr, HAS_WR: gl.constexpr,
                 BLOCK: gl.constexpr):
    """Key blocks to visit for query rows ``[r_lo, r_hi)`` (``r_hi > r_lo``), as block indices
    ``nb_lo <= fu_lo <= fu_hi <= nb_hi``: ``[nb_lo, fu_lo)`` and ``[fu_hi, nb_hi)`` need masks,
    ``[fu_lo, fu_hi)`` is visible to every row. Row ``i`` sees columns ``[i + off - wl, i + off + wr]``
    (a side is unbounded when its flag is off), clipped to ``[0, n_cols)``."""
    lo = r_lo * 0
    full_lo = r_lo * 0
    hi = n_cols + r_lo * 0
    full_hi = n_cols + r_lo * 0
    if HAS_WL:
        lo = gl.maximum(r_lo + off - wl, 0)
        full_lo = gl.maximum(r_hi - 1 + off - wl, 0)
    if HAS_WR:
        hi = gl.minimum(r_hi + off + wr, n_cols)
        full_hi = gl.minimum(r_lo + off + wr + 1, n_cols)
    nb_lo = lo // BLOCK
    nb_hi = (hi + BLOCK - 1) // BLOCK
    empty = hi <= lo
    nb_lo = gl.where(empty, 0, nb_lo)
    nb_hi = gl.where(empty, 0, nb_hi)
    fu_lo = (full_lo + BLOCK - 1) // BLOCK
    fu_hi = full_hi // BLOCK
    fu_lo = gl.minimum(gl.maximum(fu_lo, nb_lo), nb_hi)
    fu_hi = gl.minimum(gl.maximum(fu_hi, fu_lo), nb_hi)
    return nb_lo, fu_lo, fu_hi, nb_hi


@gluon.jit
def _tma_load(desc, bar, buf, b, row, head, IS_VARLEN: gl.constexpr):
    """TMA-copy the ``[rows, D]`` tile at token ``row`` (of batch ``b``; varlen: a global token
    index), head ``head`` into the 2-D buffer ``buf``, completing on ``bar``."""
    view = buf._reinterpret(desc.dtype, desc.block_type.shape, desc.layout)
    if IS_VARLEN:
        tma.async_copy_global_to_shared(desc, [row, head, 0], bar, view)
    else:
        tma.async_copy_global_to_shared(desc, [b, row, head, 0], bar, view)


@gluon.jit
def _tma_load_vt(desc, bar, buf, b, row, hk, IS_VARLEN: gl.constexpr):
    """TMA-copy the ``[D, BLOCK_N]`` V^T tile of keys ``row ..`` (of batch ``b``; varlen: global
    token index) of KV head ``hk`` into ``buf``, completing on ``bar`` (the FP8 kernel's V, keys
    contiguous: see ``launch.transpose_v``)."""
    view = buf._reinterpret(desc.dtype, desc.block_type.shape, desc.layout)
    if IS_VARLEN:
        tma.async_copy_global_to_shared(desc, [hk, 0, row], bar, view)
    else:
        tma.async_copy_global_to_shared(desc, [b, hk, 0, row], bar, view)


@gluon.jit
def _tma_store(desc, buf, b, row, head, IS_VARLEN: gl.constexpr):
    view = buf._reinterpret(desc.dtype, desc.block_type.shape, desc.layout)
    if IS_VARLEN:
        tma.async_copy_shared_to_global(desc, [row, head, 0], view)
    else:
        tma.async_copy_shared_to_global(desc, [b, row, head, 0], view)


@gluon.jit
def _store_rows(PTR, x, row0, n_rows, stride_s, HEAD_DIM: gl.constexpr, BLOCK_R: gl.constexpr,
                BLOCK_D: gl.constexpr, layout: gl.constexpr):
    """Store the ``[BLOCK_R, BLOCK_D]`` tile ``x`` (in ``layout``) at rows ``row0 ..`` of a
    row-major tensor at ``PTR`` (row stride ``stride_s``), rows ``< n_rows`` and columns
    ``< HEAD_DIM`` only."""
    r = gl.arange(0, BLOCK_R, layout=gl.SliceLayout(1, layout))
    c = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, layout))
    ptrs = PTR + gl.expand_dims((row0 + r).to(gl.int64) * stride_s, 1) + gl.expand_dims(c, 0)
    mask = gl.expand_dims(r < n_rows, 1) & gl.expand_dims(c < HEAD_DIM, 0)
    gl.store(ptrs, x, mask=mask)


@gluon.jit
def _store_rows_smem(PTR, x, ep, row0, n_rows, stride_s, HEAD_DIM: gl.constexpr, BLOCK_R: gl.constexpr,
                     BLOCK_D: gl.constexpr, NW: gl.constexpr):
    """:func:`_store_rows` through the shared-memory tile ``ep`` (``[BLOCK_R, BLOCK_D]``, free on entry and
    on return; ``NW`` warps, the calling partition's): ``x`` stored there from its (wgmma) layout, read
    back as 16-byte row vectors and written to global memory whole rows a warp, instead of stored from the
    wgmma layout (2-byte stores over 8 rows an instruction: the strides are not specialised, so nothing
    proves two neighbouring columns 4-byte aligned; stop 35 measured ~8 us a 64 KiB dK / dV tile).
    ``PTR`` and ``stride_s``: multiples of 16 bytes (dK / dV, the launcher's contiguous tensors with head
    dims a multiple of 8)."""
    VEC: gl.constexpr = 128 // ep.dtype.primitive_bitwidth
    TC: gl.constexpr = BLOCK_D // VEC  # threads along a row
    layout: gl.constexpr = gl.BlockedLayout([1, VEC], [32 // TC, TC], [NW, 1], [1, 0])
    ep.store(x)
    gl.thread_barrier()  # the whole tile in shared memory
    y = ep.load(layout)
    gl.thread_barrier()  # every thread read its part: the tile may be stored into again
    # (the stride's divisibility spelled out: Triton 3.6 drops multiple_of on a scalar, and the strides
    # are not specialised, so the stores would be 2-byte ones)
    _store_rows(PTR, y, row0, n_rows, stride_s // VEC * VEC, HEAD_DIM, BLOCK_R, BLOCK_D, layout)


@gluon.jit
def _issue_kv(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, stage, blk, b, hk, k_start,
              BLOCK_N: gl.constexpr, IS_VARLEN: gl.constexpr):
    """Start the TMA loads of key block ``blk`` into ring slot ``stage`` (K and V on their own
    barriers, so that Q K^T can start before V has landed)."""
    k_bar = k_bars.index(stage)
    v_bar = v_bars.index(stage)
    row = k_start + blk * BLOCK_N
    mbarrier.expect(k_bar, k_desc.block_type.nbytes)
    _tma_load(k_desc, k_bar, k_bufs.index(stage), b, row, hk, IS_VARLEN)
    mbarrier.expect(v_bar, v_desc.block_type.nbytes)
    _tma_load(v_desc, v_bar, v_bufs.index(stage), b, row, hk, IS_VARLEN)


@gluon.jit
def _halve_cols(x, IS_MAX: gl.constexpr):
    """``[M, N]`` -> ``[M, N / 2]``: the max (or sum) of the two column halves, elementwise. In the
    wgmma accumulator layout the top column bit is a register bit (N >= 16), so this is register
    renaming plus N / 2 independent instructions per row (``_row_reduce``)."""
    M: gl.constexpr = x.shape[0]
    N: gl.constexpr = x.shape[1]
    a, b = gl.split(gl.permute(gl.reshape(x, [M, 2, N // 2]), (0, 2, 1)))
    if IS_MAX:
        return gl.maximum(a, b)
    else:
        return a + b


#: 2^f ~= 1 + f (C1 + f (C2 + f C3)) on [-0.5, 0.5] (least squares, relative error < 1.8e-4; c0 = 1 so
#: that 2^0 is exact)
_EXP2_C1: gl.constexpr = gl.constexpr(0.69331648)
_EXP2_C2: gl.constexpr = gl.constexpr(0.24192413)
_EXP2_C3: gl.constexpr = gl.constexpr(0.05460262)


@gluon.jit
def _exp2_poly(x):
    """``2^x`` for ``x <= 0`` (``-inf`` included) on the FMA / ALU pipes, not the MUFU: ``x`` clamped
    to ``-127`` (gives 0), rounded to the nearest integer ``j`` by the 1.5 * 2^23 trick, ``2^(x - j)``
    by a cubic, ``j`` added to the exponent bits. 9 instructions an element (FA4's offload of part
    of the softmax's exponentials, for a kernel whose MUFU work per score equals its tensor work)."""
    x = gl.maximum(x, -127.0)
    t = x + 12582912.0  # 1.5 * 2^23: the integer nearest x in the low mantissa bits
    f = x - (t - 12582912.0)  # in [-0.5, 0.5]
    p = 1.0 + f * (_EXP2_C1 + f * (_EXP2_C2 + f * _EXP2_C3))
    bits = p.to(gl.int32, bitcast=True) + (t.to(gl.int32, bitcast=True) << 23)
    return bits.to(gl.float32, bitcast=True)


@gluon.jit
def _exp2_split(x, EXP_POLY: gl.constexpr, s_layout: gl.constexpr):
    """``exp2(x)`` of a ``[M, N]`` accumulator-layout tile with ``EXP_POLY`` quarters of its columns
    (1: the last quarter, 2: the last half) by :func:`_exp2_poly` and the rest by the MUFU; the
    column halves are register bits of the layout (as :func:`_halve_cols`): no data movement."""
    M: gl.constexpr = x.shape[0]
    N: gl.constexpr = x.shape[1]
    a, b = gl.split(gl.permute(gl.reshape(x, [M, 2, N // 2]), (0, 2, 1)))
    if EXP_POLY == 2:
        b = _exp2_poly(b)
    else:
        b0, b1 = gl.split(gl.permute(gl.reshape(b, [M, 2, N // 4]), (0, 2, 1)))
        b = gl.reshape(gl.permute(gl.join(gl.exp2(b0), _exp2_poly(b1)), (0, 2, 1)), [M, N // 2])
    y = gl.reshape(gl.permute(gl.join(gl.exp2(a), gl.convert_layout(b, a.type.layout)), (0, 2, 1)), [M, N])
    return gl.convert_layout(y, s_layout)


@gluon.jit
def _row_reduce(x, IS_MAX: gl.constexpr, TREE: gl.constexpr, s_layout: gl.constexpr):
    """Row max (or sum) of ``x`` ``[M, N]`` in the wgmma accumulator layout. ``TREE``: halve the
    columns held in registers first (a tree: depth log2 instead of one dependent chain of N / 4
    instructions per row in each thread, the same instruction count), then Triton's reduction over
    the last 8 columns (2 per thread, 4 lanes). Returns ``[M]`` in ``SliceLayout(1, s_layout)``."""
    if TREE:
        N: gl.constexpr = x.shape[1]
        if N >= 256:
            x = _halve_cols(x, IS_MAX)
        if N >= 128:
            x = _halve_cols(x, IS_MAX)
        if N >= 64:
            x = _halve_cols(x, IS_MAX)
        if N >= 32:
            x = _halve_cols(x, IS_MAX)
        if N >= 16:
            x = _halve_cols(x, IS_MAX)
    if IS_MAX:
        r = gl.max(x, 1)
    else:
        r = gl.sum(x, 1)
    return gl.convert_layout(r, gl.SliceLayout(1, s_layout))  # (the same rows: no data movement)


@gluon.jit
def _row_parts(x):
    """``[M, N]`` (wgmma accumulator layout, ``N >= 8``) -> ``[M, 4]``: each lane's partial row sums over
    the columns it holds (column ``8j + 2t + e`` of a row is register ``(j, e)`` of lane ``t`` of its quad:
    sums over ``j`` and ``e``, within the thread, no shuffles). A running row sum kept this way needs the
    quad's reduction once, at the end (``gl.sum(parts, 1)``), not once per key block (FA3 reduces its row
    sums in ``finalize`` only). The within-thread sums are chains the compiler interleaves with the
    exponentials, as ``gl.sum``'s own."""
    y = gl.reshape(x, [x.shape[0], x.shape[1] // 8, 4, 2])
    return gl.sum(gl.sum(y, 3), 1)


@gluon.jit
def _visible(c2, r2, seqlen_k, off, wl, wr, HAS_WL: gl.constexpr, HAS_WR: gl.constexpr):
    """Whether query row ``r2`` sees key ``c2`` (broadcastable index tensors, any orientation):
    a real key and, with windows, ``r2 + off - wl <= c2 <= r2 + off + wr`` (``off = seqlen_k -
    seqlen_q``: bottom-right aligned). The one statement of the rule for the forward and backward
    kernels."""
    vis = c2 < seqlen_k
    if HAS_WR:
        vis = vis & (c2 <= r2 + (off + wr))
    if HAS_WL:
        vis = vis & (c2 >= r2 + (off - wl))
    return vis


@gluon.jit
def _flex_mods(s, blk, rows, seqlen_k, qk_scale, fx, MOD_MASK: gl.constexpr, HAS_SCORE: gl.constexpr,
               MASK_MOD: gl.constexpr, SCORE_MOD: gl.constexpr, BLOCK_N: gl.constexpr, s_layout: gl.constexpr):
    """FlexAttention mods on a raw score tile ``s`` of key block ``blk`` (``BLOCK_N`` units): the
    ``flex_triton`` kernels' ``@triton.jit`` mods called from Gluon (they compile with the caller's
    Gluon semantic), with query / key positions as ``[M, 1]`` / ``[1, N]`` tensors in ``s``'s layout,
    clamped into the sequences for the mods' lookups (rows past the end are never stored; keys past
    it are hidden by ``_visible``). ``fx = (b, h, seqlen_q, unmask, MA0, MA1, MA2, SA0, SA1, SA2)``;
    ``unmask``: the block is a full one (a tile's first block goes through the masked path)."""
    b, h, seqlen_q, unmask, MA0, MA1, MA2, SA0, SA1, SA2 = fx
    cols = blk * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    qi = gl.expand_dims(gl.minimum(rows, seqlen_q - 1), 1)
    ki = gl.expand_dims(gl.minimum(cols, seqlen_k - 1), 0)
    if HAS_SCORE:
        # the score mod on the tile's two column halves in turn: a mod that gathers per element (a
        # bias table) has half the addresses live at once (the halves are register renames of the
        # wgmma layout, as in _halve_cols: no data movement)
        M: gl.constexpr = s.shape[0]
        N: gl.constexpr = s.shape[1]
        s_lo, s_hi = gl.split(gl.permute(gl.reshape(s * qk_scale, [M, 2, N // 2]), (0, 2, 1)))
        h_layout: gl.constexpr = s_lo.type.layout
        qh = gl.expand_dims(gl.convert_layout(gl.minimum(rows, seqlen_q - 1), gl.SliceLayout(1, h_layout)), 1)
        ch = blk * BLOCK_N + gl.arange(0, N // 2, layout=gl.SliceLayout(0, h_layout))
        s_lo = SCORE_MOD(s_lo, b, h, qh, gl.expand_dims(gl.minimum(ch, seqlen_k - 1), 0), SA0, SA1, SA2)
        s_hi = SCORE_MOD(s_hi, b, h, qh, gl.expand_dims(gl.minimum(ch + N // 2, seqlen_k - 1), 0), SA0, SA1, SA2)
        s = gl.convert_layout(gl.reshape(gl.permute(gl.join(s_lo, s_hi), (0, 2, 1)), [M, N]), s_layout)
    if MOD_MASK:
        vis = MASK_MOD(b, h, qi, ki, MA0, MA1, MA2) | unmask
        s = gl.where(vis, s, float("-inf"))
    return s


@gluon.jit
def _softmax_block(s, m_i, l_i, blk, rows, seqlen_k, off, wl, wr, qk_scale, cap_out,
                   MASKED: gl.constexpr, HAS_WL: gl.constexpr, HAS_WR: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
                   BLOCK_N: gl.constexpr, s_layout: gl.constexpr, ROW_TREE: gl.constexpr = 0,
                   fx=None, MOD_MASK: gl.constexpr = False, HAS_SCORE: gl.constexpr = False,
                   MASK_MOD: gl.constexpr = None, SCORE_MOD: gl.constexpr = None, EXP_POLY: gl.constexpr = 0):
    """Online-softmax update for one block of raw scores ``s = Q K^T`` ``[BLOCK_M, BLOCK_N]``
    (fp32, wgmma accumulator layout). ``m_i`` is the running row max in scaled base-2 units.
    Returns ``(p, alpha, m_new, l_new)``: unnormalised probabilities, the factor to rescale the
    output accumulator by, the new max and row sum. ``ROW_TREE`` (the FP8 kernel's switch; the
    16-bit kernels leave it 0): 1 = the row max as a tree (:func:`_row_reduce`), 2 = the row sum too,
    3 = the row max as a tree and the row sum kept as per-lane partials: ``l_i`` is then ``[M, 4]``
    (:func:`_row_parts`; the caller starts it from ``_row_parts`` of zeros and sums it at the end).
    Flex mods (:func:`_flex_mods`; ``fx`` their runtime arguments): ``HAS_SCORE`` applies
    ``SCORE_MOD`` to the natural-unit scores (``qk_scale`` is then ``softmax_scale``, the max and the
    exponent in base 2 through log2(e)); ``MOD_MASK`` hides what ``MASK_MOD`` hides (a partial
    block of a block mask); ``MASKED`` then adds the key bounds (and the guard of fully hidden rows).
    ``EXP_POLY`` (the FP8 kernel's switch): 1 / 2 quarters of the columns' exponentials on the FMA
    pipe (:func:`_exp2_split`)."""
    if HAS_SCORE or MOD_MASK:
        s = _flex_mods(s, blk, rows, seqlen_k, qk_scale, fx, MOD_MASK, HAS_SCORE, MASK_MOD, SCORE_MOD, BLOCK_N,
                       s_layout)
    if HAS_SCORE:  # s is in natural units after the score mod
        qk_scale = LOG2E
    if HAS_SOFTCAP:
        s = _tanh(s * qk_scale) * cap_out
    if MASKED:
        cols = blk * BLOCK_N + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        vis = _visible(gl.expand_dims(cols, 0), gl.expand_dims(rows, 1), seqlen_k, off, wl, wr, HAS_WL, HAS_WR)
        s = gl.where(vis, s, float("-inf"))
    if ROW_TREE > 0:
        s_max = _row_reduce(s, True, True, s_layout)
    else:
        s_max = gl.max(s, 1)
    if HAS_SOFTCAP:
        m_new = gl.maximum(m_i, s_max)
    else:
        # qk_scale > 0 (checked on the host): the max of raw scores scales to the scaled max
        m_new = gl.maximum(m_i, s_max * qk_scale)
    if MASKED:
        # rows that have seen no visible key keep m = -inf: subtract 0 instead (no NaN)
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    if HAS_SOFTCAP:
        x = s - gl.expand_dims(m_use, 1)
    else:
        x = s * qk_scale - gl.expand_dims(m_use, 1)
    if EXP_POLY > 0:
        p = _exp2_split(x, EXP_POLY, s_layout)
    else:
        p = gl.exp2(x)
    alpha = gl.exp2(m_i - m_use)
    if ROW_TREE == 3:
        l_new = l_i * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, l_i.type.layout)), 1) + _row_parts(p)
    elif ROW_TREE > 1:
        l_new = l_i * alpha + _row_reduce(p, False, True, s_layout)
    else:
        l_new = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_new


@gluon.jit
def _plain_step(acc, l_i, m_i, it, blk, q_smem, k_bufs, v_bufs, k_bars, v_bars, k_desc, v_desc,
                b, hk, k_start, n_total, nb_lo, rows, seqlen_k, off, wl, wr, qk_scale, cap_out,
                MASKED: gl.constexpr, HAS_WL: gl.constexpr, HAS_WR: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
                IS_VARLEN: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                s_layout: gl.constexpr, o_layout: gl.constexpr):
    """One key block of ``attn_fwd_plain``: S = Q K^T, softmax update, O = O * alpha + P V, then
    refill the freed ring slot with the block NUM_STAGES ahead."""
    stage = it % NUM_STAGES
    phase = (it // NUM_STAGES) & 1
    k_buf = k_bufs.index(stage)
    v_buf = v_bufs.index(stage)
    mbarrier.wait(k_bars.index(stage), phase)
    s0 = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout)
    s = warpgroup_mma(q_smem, k_buf.permute((1, 0)), s0, use_acc=False, is_async=True)
    s = warpgroup_mma_wait(0, deps=(s,))
    p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, blk, rows, seqlen_k, off, wl, wr, qk_scale, cap_out,
                                        MASKED, HAS_WL, HAS_WR, HAS_SOFTCAP, BLOCK_N, s_layout)
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
    p_op = gl.convert_layout(p.to(q_smem.dtype), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))
    mbarrier.wait(v_bars.index(stage), phase)
    acc = warpgroup_mma(p_op, v_buf, acc, is_async=True)
    acc = warpgroup_mma_wait(0, deps=(acc,))
    # both warpgroups have finished reading this slot before TMA overwrites it
    gl.thread_barrier()
    nxt = it + NUM_STAGES
    if nxt < n_total:
        _issue_kv(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, stage, nb_lo + nxt, b, hk, k_start,
                  BLOCK_N, IS_VARLEN)
    return acc, l_i, m_i


@gluon.jit
def _epilogue(acc, l_i, m_i, q_smem, o_desc, O, LSE, b, h, m0, q_start, seqlen_q,
              stride_os, stride_oh, stride_lb, stride_lh,
              IS_VARLEN: gl.constexpr, BLOCK_M: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr,
              row_layout: gl.constexpr, o_layout: gl.constexpr, STORE_AHEAD: gl.constexpr = False):
    """Normalise and write one query tile: o (TMA store when the tile may be written whole,
    else masked stores) and lse (natural log; -inf and o = 0 for rows that saw no key).
    ``q_smem`` is reused as the staging buffer of the TMA store. ``STORE_AHEAD`` (dense only; a staging
    buffer of its own, reused tile after tile): the store is left in flight, and the wait for the
    previous one comes before the buffer is written; the caller waits (``tma.store_wait(0)``) at the end."""
    empty = l_i == 0.0
    l_safe = gl.where(empty, 1.0, l_i)
    lse = gl.where(empty, float("-inf"), (m_i + gl.log2(l_safe)) * LN2)
    rows = m0 + gl.arange(0, BLOCK_M, layout=row_layout)
    # int32 offsets: the host checks lse.numel() < 2**31 (keeps 64-bit strides out of the registers)
    lse_ptrs = LSE + (b * stride_lb + h * stride_lh) + (q_start + rows)
    gl.store(lse_ptrs, lse, mask=rows < seqlen_q)
    inv = gl.convert_layout(1.0 / l_safe, gl.SliceLayout(1, o_layout))
    o = (acc * gl.expand_dims(inv, 1)).to(q_smem.dtype)
    if IS_VARLEN:
        if m0 + BLOCK_M <= seqlen_q:
            q_smem.store(o)
            fence_async_shared()
            gl.thread_barrier()
            _tma_store(o_desc, q_smem, b, q_start + m0, h, IS_VARLEN)
            tma.store_wait(0)
        else:  # the sequence's last, partial tile: masked 16-byte row stores through q_smem
            NW: gl.constexpr = o_layout.warps_per_cta[0] * o_layout.warps_per_cta[1]
            base = O + gl.multiple_of(h.to(gl.int64) * stride_oh, 128 // q_smem.dtype.primitive_bitwidth)
            _store_rows_smem(base, o, q_smem, q_start + m0, seqlen_q - m0, stride_os, HEAD_DIM, BLOCK_M, BLOCK_D, NW)
    else:
        if STORE_AHEAD:  # (the previous tile's store out of this buffer: issued by one thread, seen by all)
            tma.store_wait(0)
            gl.thread_barrier()
        q_smem.store(o)
        fence_async_shared()
        gl.thread_barrier()
        _tma_store(o_desc, q_smem, b, m0, h, IS_VARLEN)
        if not STORE_AHEAD:
            tma.store_wait(0)


@gluon.jit
def _tile_coords(CU_Q, CU_K, seqlen_q, seqlen_k, REVERSE_M: gl.constexpr, IS_VARLEN: gl.constexpr,
                 BLOCKS_LAST: gl.constexpr = False):
    """(pid_m, h, b, q_start, k_start, seqlen_q, seqlen_k) of this program (varlen: per sequence).
    Grid ``(blocks, heads, batch)``, or with ``BLOCKS_LAST`` ``(heads, batch, blocks)``: programs
    start in launch order (x fastest), so the block index then varies slowest and every head's
    block 0 starts before any block 1 (longest-first over the whole grid when block 0 is the
    heaviest, as the backward's key blocks under a causal mask)."""
    if BLOCKS_LAST:
        pid_m = gl.program_id(2)
        h = gl.program_id(0)
        b = gl.program_id(1)
    else:
        pid_m = gl.program_id(0)
        h = gl.program_id(1)
        b = gl.program_id(2)
    if REVERSE_M:  # causal / windowed: the heaviest query tiles (last rows) start first
        pid_m = gl.num_programs(2 if BLOCKS_LAST else 0) - 1 - pid_m
    if IS_VARLEN:
        q_start = gl.load(CU_Q + b)
        seqlen_q = gl.load(CU_Q + b + 1) - q_start
        k_start = gl.load(CU_K + b)
        seqlen_k = gl.load(CU_K + b + 1) - k_start
    else:
        q_start = b * 0
        k_start = b * 0
    return pid_m, h, b, q_start, k_start, seqlen_q, seqlen_k


# ---------------------------------------------------------------------------------------
# step A: one partition, 2 warpgroups, K/V ring with TMA
# ---------------------------------------------------------------------------------------


@gluon.jit(do_not_specialize=_NO_SPECIALIZE)
def attn_fwd_plain(
    q_desc, k_desc, v_desc, o_desc, O, LSE, CU_Q, CU_K,
    stride_os, stride_oh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, group, qk_scale, cap_out, window_left, window_right,
    HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    NUM_STAGES: gl.constexpr, HAS_WL: gl.constexpr, HAS_WR: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
    IS_VARLEN: gl.constexpr, REVERSE_M: gl.constexpr, num_warps: gl.constexpr,
):
    """Grid ``(cdiv(max_seqlen_q, BLOCK_M), H, B or nseq)``, ``num_warps = 8``. Writes o and lse."""
    pid_m, h, b, q_start, k_start, seqlen_q, seqlen_k = _tile_coords(CU_Q, CU_K, seqlen_q, seqlen_k,
                                                                     REVERSE_M, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    dtype: gl.constexpr = q_desc.dtype
    hk = h // group
    off = seqlen_k - seqlen_q

    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                       instr_shape=[16, BLOCK_D, 16])
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=q_desc.layout.swizzle_byte_width,
                                                     element_bitwidth=dtype.primitive_bitwidth, rank=2)
    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_D], smem_layout)
    k_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, BLOCK_D], smem_layout)
    v_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, BLOCK_D], smem_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)

    r_hi = gl.minimum(m0 + BLOCK_M, seqlen_q)
    nb_lo, fu_lo, fu_hi, nb_hi = _block_range(m0, r_hi, seqlen_k, off, window_left, window_right,
                                              HAS_WL, HAS_WR, BLOCK_N)
    n_total = nb_hi - nb_lo

    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    _tma_load(q_desc, q_bar, q_smem, b, q_start + m0, h, IS_VARLEN)
    for i in gl.static_range(NUM_STAGES):
        if i < n_total:
            _issue_kv(k_desc, v_desc, k_bufs, v_bufs, k_bars, v_bars, i, nb_lo + i, b, hk, k_start,
                      BLOCK_N, IS_VARLEN)

    rows = m0 + gl.arange(0, BLOCK_M, layout=row_layout)
    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, row_layout)
    l_i = gl.zeros([BLOCK_M], gl.float32, row_layout)
    acc = gl.zeros([BLOCK_M, BLOCK_D], gl.float32, o_layout)
    mbarrier.wait(q_bar, 0)

    it = 0
    for blk in range(nb_lo, fu_lo):
        acc, l_i, m_i = _plain_step(acc, l_i, m_i, it, blk, q_smem, k_bufs, v_bufs, k_bars, v_bars, k_desc, v_desc,
                                    b, hk, k_start, n_total, nb_lo, rows, seqlen_k, off, window_left, window_right,
                                    qk_scale, cap_out, True, HAS_WL, HAS_WR, HAS_SOFTCAP, IS_VARLEN,
                                    BLOCK_M, BLOCK_N, NUM_STAGES, s_layout, o_layout)
        it += 1
    for blk in range(fu_lo, fu_hi):
        acc, l_i, m_i = _plain_step(acc, l_i, m_i, it, blk, q_smem, k_bufs, v_bufs, k_bars, v_bars, k_desc, v_desc,
                                    b, hk, k_start, n_total, nb_lo, rows, seqlen_k, off, window_left, window_right,
                                    qk_scale, cap_out, False, HAS_WL, HAS_WR, HAS_SOFTCAP, IS_VARLEN,
                                    BLOCK_M, BLOCK_N, NUM_STAGES, s_layout, o_layout)
        it += 1
    for blk in range(fu_hi, nb_hi):
        acc, l_i, m_i = _plain_step(acc, l_i, m_i, it, blk, q_smem, k_bufs, v_bufs, k_bars, v_bars, k_desc, v_desc,
                                    b, hk, k_start, n_total, nb_lo, rows, seqlen_k, off, window_left, window_right,
                                    qk_scale, cap_out, True, HAS_WL, HAS_WR, HAS_SOFTCAP, IS_VARLEN,
                                    BLOCK_M, BLOCK_N, NUM_STAGES, s_layout, o_layout)
        it += 1

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))
    _epilogue(acc, l_i, m_i, q_smem, o_desc, O, LSE, b, h, m0, q_start, seqlen_q,
              stride_os, stride_oh, stride_lb, stride_lh,
              IS_VARLEN, BLOCK_M, HEAD_DIM, BLOCK_D, row_layout, o_layout)


# ---------------------------------------------------------------------------------------
# step B: warp specialisation (1 producer warp, 2 consumer warpgroups in ping-pong)
# ---------------------------------------------------------------------------------------


@gluon.jit
def _flex_blk(j, lists, SUBS: gl.constexpr):
    """Key block (``BLOCK_N`` units) of a flex tile's step ``j``: steps ``[0, n1)`` walk the block
    mask's partial list, ``[n1, ..)`` its full list, ``SUBS = MASK_BLOCK // BLOCK_N`` steps per
    block-mask block. ``lists = (idx1, idx2, n1)``: the two lists' index pointers (int32) and n1."""
    idx1, idx2, n1 = lists
    if j < n1:
        e = j
        blk = gl.load(idx1 + e // SUBS)
    else:
        e = j - n1
        blk = gl.load(idx2 + e // SUBS)
    return blk * SUBS + e % SUBS


@gluon.jit
def _flex_next(j, n_total, lists, SUBS: gl.constexpr):
    """``FLEX_PREFETCH``: step ``j``'s list entry (``raw``, the block-mask block) and sub-step, for
    the caller to load one step ahead and turn into the key block (``raw * SUBS + sub``) only when
    it needs it, so that the load's latency runs under the current step's waits and TMA instead of
    before them. One load without a branch (its address picked by a select), masked past
    ``n_total`` (0 there). ``lists = (idx1, idx2, n1, first1, first2)``: as :func:`_flex_blk`'s, and
    both lists' first entries, loaded together with the row's counts."""
    idx1, idx2, n1, first1, first2 = lists
    in1 = j < n1
    e = gl.where(in1, j, j - n1)
    raw = gl.load(gl.where(in1, idx1, idx2) + e // SUBS, mask=j < n_total, other=0)
    return raw, e % SUBS


@gluon.jit
def _ws_load_kv(k_desc, v_desc, k_bufs, v_bufs, k_full, v_full, k_empty, v_empty, b, hk, k_start, nb_lo, n_total,
                it0, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, IS_VARLEN: gl.constexpr,
                V_T: gl.constexpr = False, lists=None, FLEX: gl.constexpr = False, SUBS: gl.constexpr = 1,
                PREFETCH: gl.constexpr = False):
    """Producer: K and V of key blocks ``nb_lo ..`` (``n_total`` of them) into the ring, from ring
    iteration ``it0`` on; a slot is reloaded once both consumers released it (``k_empty`` /
    ``v_empty``). A fresh barrier passes a wait on phase 1, so the first NUM_STAGES loads do not wait.
    ``FLEX``: step ``i`` is the block :func:`_flex_blk` names (``lists``), as the consumers walk them;
    with ``PREFETCH`` step ``i + 1``'s entry is loaded before step ``i``'s waits and TMA
    (:func:`_flex_next`; step 0's came with the counts), so no TMA waits on a list load."""
    if FLEX and PREFETCH:
        raw = gl.where(lists[2] > 0, lists[3], lists[4])  # step 0's entry
        sub = raw * 0
    for i in range(n_total):
        it = it0 + i
        stage = it % NUM_STAGES
        phase = (it // NUM_STAGES) & 1
        if FLEX:
            if PREFETCH:
                row = k_start + (raw * SUBS + sub) * BLOCK_N
                raw, sub = _flex_next(nb_lo + i + 1, nb_lo + n_total, lists, SUBS)
            else:
                row = k_start + _flex_blk(nb_lo + i, lists, SUBS) * BLOCK_N
        else:
            row = k_start + (nb_lo + i) * BLOCK_N
        mbarrier.wait(k_empty.index(stage), phase ^ 1)
        mbarrier.expect(k_full.index(stage), k_desc.block_type.nbytes)
        _tma_load(k_desc, k_full.index(stage), k_bufs.index(stage), b, row, hk, IS_VARLEN)
        mbarrier.wait(v_empty.index(stage), phase ^ 1)
        mbarrier.expect(v_full.index(stage), v_desc.block_type.nbytes)
        if V_T:  # V^T tiles (FP8 kernel)
            _tma_load_vt(v_desc, v_full.index(stage), v_bufs.index(stage), b, row, hk, IS_VARLEN)
        else:
            _tma_load(v_desc, v_full.index(stage), v_bufs.index(stage), b, row, hk, IS_VARLEN)


@gluon.jit
def _ws_producer(q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bars, k_full, v_full, k_empty, v_empty,
                 b, h, hk, q_start, k_start, m0, nb_lo, n_total,
                 SUB_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, IS_VARLEN: gl.constexpr,
                 NUM_CONSUMERS: gl.constexpr, V_T: gl.constexpr = False, lists=None, FLEX: gl.constexpr = False,
                 SUBS: gl.constexpr = 1, PREFETCH: gl.constexpr = False):
    """1 warp: TMA loads of every consumer's Q tile, then K and V (``V_T``: V^T) of every key block."""
    for c in gl.static_range(NUM_CONSUMERS):
        mbarrier.expect(q_bars.index(c), q_desc.block_type.nbytes)
        _tma_load(q_desc, q_bars.index(c), q_bufs.index(c), b, q_start + m0 + c * SUB_M, h, IS_VARLEN)
    _ws_load_kv(k_desc, v_desc, k_bufs, v_bufs, k_full, v_full, k_empty, v_empty, b, hk, k_start, nb_lo, n_total,
                0, BLOCK_N, NUM_STAGES, IS_VARLEN, V_T, lists, FLEX, SUBS, PREFETCH)


@gluon.jit
def _wait_fence(bar, phase, WAIT_FENCE: gl.constexpr):
    """``WAIT_FENCE``: wait again on ``bar``, an mbarrier whose phase ``phase`` has completed and stays
    so (a consumer's Q barrier within its tile), right before ``warpgroup_mma_wait(0)`` of the
    previous block's P V. Its try-wait loop is a basic-block boundary: ptxas schedules a
    ``wgmma.wait_group`` (no register operands) as early as its block allows, and without the
    boundary it lands right after the row max's shuffles (SASS: ``WARPGROUP.DEPBAR.LE gsb0, 0x0``
    before the first ``MUFU.EX2``), so the exponentials wait for P V instead of overlapping it.
    With it the wait follows the last exponential. Costs a try-wait and a branch per key block.
    (Not a K / V ring barrier: those may move on by a phase before this point and never pass.)"""
    if WAIT_FENCE:
        mbarrier.wait(bar, phase)


@gluon.jit
def _pin(x):
    """``x`` unchanged, through a side-effecting inline ``mov``: the values feeding ``x`` are computed before
    this point and the compiler cannot sink them past a later basic-block boundary (:func:`_wait_fence`),
    as it does with values that are only used after it."""
    return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=x.dtype, is_pure=False, pack=1)


@gluon.jit
def _turn_wait(turn, it, CID: gl.constexpr):
    """Wait for consumer ``CID``'s turn at ring iteration ``it``. Turns go round the consumers
    (0, 1, .., N-1, 0, ..), one per key block each; ``turn[c]`` is arrived on by the consumer
    before ``c``. Consumer 0's first wait (parity 1 on a fresh barrier) passes at once."""
    if CID == 0:
        mbarrier.wait(turn.index(0), (it & 1) ^ 1)
    else:
        mbarrier.wait(turn.index(CID), it & 1)


@gluon.jit
def _turn_pass(turn, CID: gl.constexpr, NUM_CONSUMERS: gl.constexpr):
    """Hand the turn to the next consumer warpgroup."""
    mbarrier.arrive(turn.index((CID + 1) % NUM_CONSUMERS))


@gluon.jit
def _ws_block(acc, l_i, m_i, p_op, it, blk, q_smem, k_bufs, v_bufs, k_full, v_full, k_empty, v_empty, turn,
              rows, seqlen_k, off, wl, wr, qk_scale, cap_out,
              CID: gl.constexpr, MASKED: gl.constexpr, HAS_WL: gl.constexpr, HAS_WR: gl.constexpr,
              HAS_SOFTCAP: gl.constexpr, SUB_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
              NUM_CONSUMERS: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr,
              fx=None, MOD_MASK: gl.constexpr = False, HAS_SCORE: gl.constexpr = False,
              MASK_MOD: gl.constexpr = None, SCORE_MOD: gl.constexpr = None,
              q_bar=None, q_phase=0, WAIT_FENCE: gl.constexpr = False):
    """Key block ``blk`` (not a tile's first) of one consumer warpgroup, FA3's schedule: on this
    warpgroup's turn issue S = Q K_blk^T and O += P_prev V_prev, hand the turn to the next
    warpgroup, then run the softmax of S while P_prev V_prev is still on the tensor cores
    (``WAIT_FENCE``: :func:`_wait_fence` on ``q_bar``, the consumer's Q barrier at ``q_phase``,
    keeps it so in the SASS).
    ``it`` counts key blocks over the program's life: it picks the ring slot and phase, and the
    turn (each block takes one turn; all consumers visit the same blocks)."""
    stage = it % NUM_STAGES
    phase = (it // NUM_STAGES) & 1
    pstage = (it - 1) % NUM_STAGES
    pphase = ((it - 1) // NUM_STAGES) & 1
    mbarrier.wait(k_full.index(stage), phase)
    _turn_wait(turn, it, CID)
    s0 = gl.zeros([SUB_M, BLOCK_N], gl.float32, s_layout)
    s = warpgroup_mma(q_smem, k_bufs.index(stage).permute((1, 0)), s0, use_acc=False, is_async=True)
    mbarrier.wait(v_full.index(pstage), pphase)
    acc = warpgroup_mma(p_op, v_bufs.index(pstage), acc, is_async=True)
    _turn_pass(turn, CID, NUM_CONSUMERS)
    s = warpgroup_mma_wait(1, deps=(s,))  # groups retire in order: S is done, P V may still run
    mbarrier.arrive(k_empty.index(stage))
    p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, blk, rows, seqlen_k, off, wl, wr, qk_scale, cap_out,
                                        MASKED, HAS_WL, HAS_WR, HAS_SOFTCAP, BLOCK_N, s_layout, 0,
                                        fx, MOD_MASK, HAS_SCORE, MASK_MOD, SCORE_MOD)
    _wait_fence(q_bar, q_phase, WAIT_FENCE)
    acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))  # p_op's registers live until P V is done
    mbarrier.arrive(v_empty.index(pstage))
    acc = acc * gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
    p_op = gl.convert_layout(p.to(q_smem.dtype), gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))
    return acc, l_i, m_i, p_op


@gluon.jit
def _ws_tile(q_smem, k_bufs, v_bufs, k_full, v_full, k_empty, v_empty, turn, rows, it0,
             nb_lo, fu_lo, fu_hi, nb_hi, seqlen_k, off, wl, wr, qk_scale, cap_out,
             CID: gl.constexpr, BLOCK_D: gl.constexpr, SUB_M: gl.constexpr, BLOCK_N: gl.constexpr,
             NUM_STAGES: gl.constexpr, HAS_WL: gl.constexpr, HAS_WR: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
             NUM_CONSUMERS: gl.constexpr, s_layout: gl.constexpr, o_layout: gl.constexpr,
             fxa=None, lists=None, FLEX: gl.constexpr = False, SUBS: gl.constexpr = 1, BOUNDS: gl.constexpr = False,
             HAS_MASK: gl.constexpr = False, HAS_SCORE: gl.constexpr = False, MASK_MOD: gl.constexpr = None,
             SCORE_MOD: gl.constexpr = None, q_bar=None, q_phase=0, WAIT_FENCE: gl.constexpr = False):
    """One consumer's attention over key blocks ``[nb_lo, nb_hi)`` (ring iterations ``it0 ..``);
    Q is in ``q_smem`` (its barrier ``q_bar`` passed phase ``q_phase``: ``WAIT_FENCE``, see
    :func:`_wait_fence`). Returns the unnormalised ``(acc, l_i, m_i)``.

    ``FLEX`` (a block mask's lists): ``nb_lo .. nb_hi`` count steps, not blocks: ``[0, fu_lo)`` the
    partial list's (``MASK_MOD`` evaluated when ``HAS_MASK``), ``[fu_lo, fu_hi)`` the full list's
    (no mask; key bounds only with ``BOUNDS``), ``fu_hi == nb_hi``; :func:`_flex_blk` names each
    step's key block (``lists``), as the producer walks them. ``fxa = (b, h, seqlen_q, MA0, MA1,
    MA2, SA0, SA1, SA2)``: the mods' arguments."""
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    MOD_MASK: gl.constexpr = FLEX and HAS_MASK
    FULL_MASKED: gl.constexpr = FLEX and BOUNDS  # the middle run's bounds (dense calls: none)
    if FLEX:
        fb, fh, fsq, MA0, MA1, MA2, SA0, SA1, SA2 = fxa
        fx0 = (fb, fh, fsq, fu_lo == 0, MA0, MA1, MA2, SA0, SA1, SA2)  # a first block from the full list
        fx1 = (fb, fh, fsq, False, MA0, MA1, MA2, SA0, SA1, SA2)
        kb0 = _flex_blk(nb_lo, lists, SUBS)
    else:
        fx0 = fxa
        fx1 = fxa
        kb0 = nb_lo
    m_i = gl.full([SUB_M], float("-inf"), gl.float32, row_layout)
    l_i = gl.zeros([SUB_M], gl.float32, row_layout)
    acc = gl.zeros([SUB_M, BLOCK_D], gl.float32, o_layout)
    n_total = nb_hi - nb_lo
    if n_total > 0:
        # first block: S only (always with masks: it may be any of the three kinds)
        stage = it0 % NUM_STAGES
        mbarrier.wait(k_full.index(stage), (it0 // NUM_STAGES) & 1)
        _turn_wait(turn, it0, CID)
        s0 = gl.zeros([SUB_M, BLOCK_N], gl.float32, s_layout)
        s = warpgroup_mma(q_smem, k_bufs.index(stage).permute((1, 0)), s0, use_acc=False, is_async=True)
        _turn_pass(turn, CID, NUM_CONSUMERS)
        s = warpgroup_mma_wait(0, deps=(s,))
        mbarrier.arrive(k_empty.index(stage))
        p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, kb0, rows, seqlen_k, off, wl, wr, qk_scale, cap_out,
                                            True, HAS_WL, HAS_WR, HAS_SOFTCAP, BLOCK_N, s_layout, 0,
                                            fx0, MOD_MASK, HAS_SCORE, MASK_MOD, SCORE_MOD)
        p_op = gl.convert_layout(p.to(q_smem.dtype),
                                 gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2))
        it = it0 + 1
        for blk in range(nb_lo + 1, fu_lo):
            if FLEX:
                kb = _flex_blk(blk, lists, SUBS)
            else:
                kb = blk
            acc, l_i, m_i, p_op = _ws_block(acc, l_i, m_i, p_op, it, kb, q_smem, k_bufs, v_bufs, k_full, v_full,
                                            k_empty, v_empty, turn, rows, seqlen_k, off, wl, wr, qk_scale, cap_out,
                                            CID, True, HAS_WL, HAS_WR, HAS_SOFTCAP, SUB_M, BLOCK_N, NUM_STAGES,
                                            NUM_CONSUMERS, s_layout, o_layout,
                                            fx1, MOD_MASK, HAS_SCORE, MASK_MOD, SCORE_MOD, q_bar, q_phase, WAIT_FENCE)
            it += 1
        for blk in range(gl.maximum(fu_lo, nb_lo + 1), fu_hi):
            if FLEX:
                kb = _flex_blk(blk, lists, SUBS)
            else:
                kb = blk
            acc, l_i, m_i, p_op = _ws_block(acc, l_i, m_i, p_op, it, kb, q_smem, k_bufs, v_bufs, k_full, v_full,
                                            k_empty, v_empty, turn, rows, seqlen_k, off, wl, wr, qk_scale, cap_out,
                                            CID, FULL_MASKED, HAS_WL, HAS_WR, HAS_SOFTCAP, SUB_M, BLOCK_N, NUM_STAGES,
                                            NUM_CONSUMERS, s_layout, o_layout,
                                            fx1, False, HAS_SCORE, MASK_MOD, SCORE_MOD, q_bar, q_phase, WAIT_FENCE)
            it += 1
        if not FLEX:
            for blk in range(gl.maximum(fu_hi, nb_lo + 1), nb_hi):
                acc, l_i, m_i, p_op = _ws_block(acc, l_i, m_i, p_op, it, blk, q_smem, k_bufs, v_bufs, k_full,
                                                v_full, k_empty, v_empty, turn, rows, seqlen_k, off, wl, wr, qk_scale,
                                                cap_out, CID, True, HAS_WL, HAS_WR, HAS_SOFTCAP, SUB_M, BLOCK_N,
                                                NUM_STAGES, NUM_CONSUMERS, s_layout, o_layout,
                                                q_bar=q_bar, q_phase=q_phase, WAIT_FENCE=WAIT_FENCE)
                it += 1
        # the last block's P V
        last = it0 + n_total - 1
        lstage = last % NUM_STAGES
        mbarrier.wait(v_full.index(lstage), (last // NUM_STAGES) & 1)
        acc = warpgroup_mma(p_op, v_bufs.index(lstage), acc, is_async=True)
        acc, p_op = warpgroup_mma_wait(0, deps=(acc, p_op))
        mbarrier.arrive(v_empty.index(lstage))
    return acc, l_i, m_i


@gluon.jit
def _ws_consumer(q_bufs, k_bufs, v_bufs, q_bars, k_full, v_full, k_empty, v_empty, turn,
                 o_desc, O, LSE, b, h, m0, q_start, seqlen_q, seqlen_k, off, wl, wr, qk_scale, cap_out,
                 nb_lo, fu_lo, fu_hi, nb_hi, stride_os, stride_oh, stride_lb, stride_lh,
                 CID: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, SUB_M: gl.constexpr,
                 BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, HAS_WL: gl.constexpr, HAS_WR: gl.constexpr,
                 HAS_SOFTCAP: gl.constexpr, IS_VARLEN: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
                 WAIT_FENCE: gl.constexpr, lists=None, MA0=None, MA1=None, MA2=None, SA0=None, SA1=None, SA2=None,
                 FLEX: gl.constexpr = False, SUBS: gl.constexpr = 1, BOUNDS: gl.constexpr = False,
                 HAS_MASK: gl.constexpr = False, HAS_SCORE: gl.constexpr = False, MASK_MOD: gl.constexpr = None,
                 SCORE_MOD: gl.constexpr = None):
    """One consumer warpgroup (4 warps): query rows ``m0 + CID * SUB_M ..`` of the tile, over the
    key blocks of the whole tile (all consumers see the same blocks, so their turns line up).
    ``FLEX`` and the rest: see :func:`_ws_tile`."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_D, 16])
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    q_smem = q_bufs.index(CID)
    r0 = m0 + CID * SUB_M
    rows = r0 + gl.arange(0, SUB_M, layout=row_layout)
    mbarrier.wait(q_bars.index(CID), 0)
    if FLEX:
        fxa = (b, h, seqlen_q, MA0, MA1, MA2, SA0, SA1, SA2)
    else:
        fxa = None
    acc, l_i, m_i = _ws_tile(q_smem, k_bufs, v_bufs, k_full, v_full, k_empty, v_empty, turn, rows, 0,
                             nb_lo, fu_lo, fu_hi, nb_hi, seqlen_k, off, wl, wr, qk_scale, cap_out,
                             CID, BLOCK_D, SUB_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR, HAS_SOFTCAP,
                             NUM_CONSUMERS, s_layout, o_layout,
                             fxa, lists, FLEX, SUBS, BOUNDS, HAS_MASK, HAS_SCORE, MASK_MOD, SCORE_MOD,
                             q_bars.index(CID), 0, WAIT_FENCE)
    if r0 < seqlen_q:
        _epilogue(acc, l_i, m_i, q_smem, o_desc, O, LSE, b, h, r0, q_start, seqlen_q,
                  stride_os, stride_oh, stride_lb, stride_lh,
                  IS_VARLEN, SUB_M, HEAD_DIM, BLOCK_D, row_layout, o_layout)


@gluon.jit(do_not_specialize=_NO_SPECIALIZE + _FLEX_NO_SPECIALIZE)
def attn_fwd_ws(
    q_desc, k_desc, v_desc, o_desc, O, LSE, CU_Q, CU_K,
    stride_os, stride_oh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, group, qk_scale, cap_out, window_left, window_right,
    HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    NUM_STAGES: gl.constexpr, HAS_WL: gl.constexpr, HAS_WR: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
    IS_VARLEN: gl.constexpr, REVERSE_M: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    NUM_CONSUMERS: gl.constexpr, num_warps: gl.constexpr,
    KV_NUM=None, KV_IDX=None, FULL_NUM=None, FULL_IDX=None, bm_sb=None, bm_sh=None, bm_nk=None,
    MA0=None, MA1=None, MA2=None, SA0=None, SA1=None, SA2=None,
    FLEX: gl.constexpr = False, HAS_FULL: gl.constexpr = False, SUBS: gl.constexpr = 1,
    BOUNDS: gl.constexpr = False, HAS_MASK: gl.constexpr = False, HAS_SCORE: gl.constexpr = False,
    MASK_MOD: gl.constexpr = None, SCORE_MOD: gl.constexpr = None, FLEX_PREFETCH: gl.constexpr = False,
    WAIT_FENCE: gl.constexpr = False,
):
    """Grid ``(cdiv(max_seqlen_q, BLOCK_M), H, B or nseq)``, ``num_warps = 4`` (the default
    partition: consumer 0) + 4 per further consumer (NUM_CONSUMERS = 2 or 3) + 1 (producer)
    warps. q_desc / o_desc have ``BLOCK_M // NUM_CONSUMERS``-row blocks (one per consumer).
    Writes o and lse.

    ``FLEX`` (FlexAttention calls, dense, 2 consumers, no window / softcap flags): the key blocks
    of query tile ``pid_m`` come from a block mask's lists (``BLOCK_M`` = its query block): the
    partial list (``KV_NUM`` / ``KV_IDX``, int32, the mask_mod evaluated when ``HAS_MASK``), then
    with ``HAS_FULL`` the full list (``FULL_NUM`` / ``FULL_IDX``, no mask evaluation), each index
    in key blocks of ``SUBS * BLOCK_N`` keys. Counts at ``b * bm_sb + h * bm_sh + pid_m`` (a stride
    0 where the block mask broadcasts), indices ``bm_nk`` per count (contiguous lists, both of one
    shape). ``HAS_SCORE``: ``SCORE_MOD`` on ``qk_scale * q.k`` (``qk_scale`` then the plain softmax
    scale, natural units), ``MA*`` / ``SA*`` the mods' arguments (``flex_triton.kernels``).
    ``BOUNDS``: a sequence length is not a multiple of the block mask's block (keys past the end
    hidden in every block). ``FLEX_PREFETCH`` (an A/B switch, off by default: the kernel is then
    unchanged): both lists' first entries are loaded with the row's counts instead of after them,
    and the TMA producer loads each next step's entry one step ahead (:func:`_flex_next`), so that
    the producer's TMAs wait on no list load (the consumers' loads are issued before their
    ``k_full`` waits and read after the S wgmma already); the same blocks in the same order."""
    pid_m, h, b, q_start, k_start, seqlen_q, seqlen_k = _tile_coords(CU_Q, CU_K, seqlen_q, seqlen_k,
                                                                     REVERSE_M, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    SUB_M: gl.constexpr = BLOCK_M // NUM_CONSUMERS
    dtype: gl.constexpr = q_desc.dtype
    hk = h // group
    off = seqlen_k - seqlen_q
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=q_desc.layout.swizzle_byte_width,
                                                     element_bitwidth=dtype.primitive_bitwidth, rank=2)
    q_bufs = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS, SUB_M, BLOCK_D], smem_layout)
    k_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, BLOCK_D], smem_layout)
    v_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, BLOCK_D], smem_layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    k_full = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(NUM_CONSUMERS):
        mbarrier.init(q_bars.index(c), count=1)
        mbarrier.init(turn.index(c), count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_full.index(i), count=1)
        mbarrier.init(v_full.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=NUM_CONSUMERS)  # one arrival per consumer warpgroup
        mbarrier.init(v_empty.index(i), count=NUM_CONSUMERS)

    if FLEX:
        gl.static_assert(NUM_CONSUMERS == 2, "flex calls run 2 consumer warpgroups")
        lb = b * bm_sb + h * bm_sh + pid_m
        n1 = gl.load(KV_NUM + lb) * SUBS
        idx1 = KV_IDX + lb.to(gl.int64) * bm_nk
        if HAS_FULL:
            n2 = gl.load(FULL_NUM + lb) * SUBS
            idx2 = FULL_IDX + lb.to(gl.int64) * bm_nk
        else:
            n2 = n1 * 0
            idx2 = idx1
        nb_lo = n1 * 0
        fu_lo = n1
        fu_hi = n1 + n2
        nb_hi = n1 + n2
        lists = (idx1, idx2, n1)
        if FLEX_PREFETCH:
            # the producer's: both lists' first entries, loaded beside the counts, not after them (the
            # producer picks one: a select here becomes a load predicated on the count, dependent again)
            plists = (idx1, idx2, n1, gl.load(idx1), gl.load(idx2))
        else:
            plists = lists
    else:
        r_hi = gl.minimum(m0 + BLOCK_M, seqlen_q)
        nb_lo, fu_lo, fu_hi, nb_hi = _block_range(m0, r_hi, seqlen_k, off, window_left, window_right,
                                                  HAS_WL, HAS_WR, BLOCK_N)
        lists = None
        plists = None
    n_total = nb_hi - nb_lo
    # (tuples are spelled out in the call: a tuple assigned to a variable turns its constexprs into
    # tensors; hence one spelled-out list per consumer count)
    if FLEX:
        gl.warp_specialize([
            (_ws_consumer, (q_bufs, k_bufs, v_bufs, q_bars, k_full, v_full, k_empty, v_empty, turn,
                            o_desc, O, LSE, b, h, m0, q_start, seqlen_q, seqlen_k, off, window_left, window_right,
                            qk_scale, cap_out, nb_lo, fu_lo, fu_hi, nb_hi, stride_os, stride_oh, stride_lb, stride_lh,
                            0, HEAD_DIM, BLOCK_D, SUB_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR, HAS_SOFTCAP, IS_VARLEN,
                            NUM_CONSUMERS, WAIT_FENCE, lists, MA0, MA1, MA2, SA0, SA1, SA2, FLEX, SUBS, BOUNDS,
                            HAS_MASK, HAS_SCORE, MASK_MOD, SCORE_MOD)),
            (_ws_consumer, (q_bufs, k_bufs, v_bufs, q_bars, k_full, v_full, k_empty, v_empty, turn,
                            o_desc, O, LSE, b, h, m0, q_start, seqlen_q, seqlen_k, off, window_left, window_right,
                            qk_scale, cap_out, nb_lo, fu_lo, fu_hi, nb_hi, stride_os, stride_oh, stride_lb, stride_lh,
                            1, HEAD_DIM, BLOCK_D, SUB_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR, HAS_SOFTCAP, IS_VARLEN,
                            NUM_CONSUMERS, WAIT_FENCE, lists, MA0, MA1, MA2, SA0, SA1, SA2, FLEX, SUBS, BOUNDS,
                            HAS_MASK, HAS_SCORE, MASK_MOD, SCORE_MOD)),
            (_ws_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bars, k_full, v_full, k_empty, v_empty,
                            b, h, hk, q_start, k_start, m0, nb_lo, n_total, SUB_M, BLOCK_N, NUM_STAGES, IS_VARLEN,
                            NUM_CONSUMERS, False, plists, FLEX, SUBS, FLEX_PREFETCH)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    elif NUM_CONSUMERS == 3:
        gl.warp_specialize([
            (_ws_consumer, (q_bufs, k_bufs, v_bufs, q_bars, k_full, v_full, k_empty, v_empty, turn,
                            o_desc, O, LSE, b, h, m0, q_start, seqlen_q, seqlen_k, off, window_left, window_right,
                            qk_scale, cap_out, nb_lo, fu_lo, fu_hi, nb_hi, stride_os, stride_oh, stride_lb, stride_lh,
                            0, HEAD_DIM, BLOCK_D, SUB_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR, HAS_SOFTCAP, IS_VARLEN,
                            NUM_CONSUMERS, WAIT_FENCE)),
            (_ws_consumer, (q_bufs, k_bufs, v_bufs, q_bars, k_full, v_full, k_empty, v_empty, turn,
                            o_desc, O, LSE, b, h, m0, q_start, seqlen_q, seqlen_k, off, window_left, window_right,
                            qk_scale, cap_out, nb_lo, fu_lo, fu_hi, nb_hi, stride_os, stride_oh, stride_lb, stride_lh,
                            1, HEAD_DIM, BLOCK_D, SUB_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR, HAS_SOFTCAP, IS_VARLEN,
                            NUM_CONSUMERS, WAIT_FENCE)),
            (_ws_consumer, (q_bufs, k_bufs, v_bufs, q_bars, k_full, v_full, k_empty, v_empty, turn,
                            o_desc, O, LSE, b, h, m0, q_start, seqlen_q, seqlen_k, off, window_left, window_right,
                            qk_scale, cap_out, nb_lo, fu_lo, fu_hi, nb_hi, stride_os, stride_oh, stride_lb, stride_lh,
                            2, HEAD_DIM, BLOCK_D, SUB_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR, HAS_SOFTCAP, IS_VARLEN,
                            NUM_CONSUMERS, WAIT_FENCE)),
            (_ws_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bars, k_full, v_full, k_empty, v_empty,
                            b, h, hk, q_start, k_start, m0, nb_lo, n_total, SUB_M, BLOCK_N, NUM_STAGES, IS_VARLEN,
                            NUM_CONSUMERS)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_ws_consumer, (q_bufs, k_bufs, v_bufs, q_bars, k_full, v_full, k_empty, v_empty, turn,
                            o_desc, O, LSE, b, h, m0, q_start, seqlen_q, seqlen_k, off, window_left, window_right,
                            qk_scale, cap_out, nb_lo, fu_lo, fu_hi, nb_hi, stride_os, stride_oh, stride_lb, stride_lh,
                            0, HEAD_DIM, BLOCK_D, SUB_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR, HAS_SOFTCAP, IS_VARLEN,
                            NUM_CONSUMERS, WAIT_FENCE)),
            (_ws_consumer, (q_bufs, k_bufs, v_bufs, q_bars, k_full, v_full, k_empty, v_empty, turn,
                            o_desc, O, LSE, b, h, m0, q_start, seqlen_q, seqlen_k, off, window_left, window_right,
                            qk_scale, cap_out, nb_lo, fu_lo, fu_hi, nb_hi, stride_os, stride_oh, stride_lb, stride_lh,
                            1, HEAD_DIM, BLOCK_D, SUB_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR, HAS_SOFTCAP, IS_VARLEN,
                            NUM_CONSUMERS, WAIT_FENCE)),
            (_ws_producer, (q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bars, k_full, v_full, k_empty, v_empty,
                            b, h, hk, q_start, k_start, m0, nb_lo, n_total, SUB_M, BLOCK_N, NUM_STAGES, IS_VARLEN,
                            NUM_CONSUMERS)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


# ---------------------------------------------------------------------------------------
# step C: persistent warp-specialised kernel over a host-computed tile schedule (dense only)
# ---------------------------------------------------------------------------------------


@gluon.jit
def _pers_range(OFFS):
    """This program's slice ``[start, end)`` of the persistent kernels' tile list (``OFFS``: one offset per
    program and one past the last)."""
    pid = gl.program_id(0)
    return gl.load(OFFS + pid), gl.load(OFFS + pid + 1)


@gluon.jit
def _pers_tile(TILES, t, n_mb, nheads, seqlen_q, seqlen_k, wl, wr,
               HAS_WL: gl.constexpr, HAS_WR: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """Decode tile ``TILES[t]`` (``(b * nheads + h) * n_mb + m_block``): ``(b, h, m0, key block range)``."""
    code = gl.load(TILES + t)
    m0 = (code % n_mb) * BLOCK_M
    bh = code // n_mb
    h = bh % nheads
    b = bh // nheads
    r_hi = gl.minimum(m0 + BLOCK_M, seqlen_q)
    nb_lo, fu_lo, fu_hi, nb_hi = _block_range(m0, r_hi, seqlen_k, seqlen_k - seqlen_q, wl, wr, HAS_WL, HAS_WR, BLOCK_N)
    return b, h, m0, nb_lo, fu_lo, fu_hi, nb_hi


@gluon.jit
def _pers_producer(TILES, OFFS, q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bars, q_empty,
                   k_full, v_full, k_empty, v_empty, n_mb, nheads, group, seqlen_q, seqlen_k, wl, wr,
                   SUB_M: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                   HAS_WL: gl.constexpr, HAS_WR: gl.constexpr, NUM_CONSUMERS: gl.constexpr):
    """1 warp, for each tile of this program: every consumer's Q share (once the consumers released the
    previous tile's Q buffer, ``q_empty``), then its K/V blocks into the ring; the ring runs on
    across tiles, so the next tile's loads overlap the current tile's last blocks and epilogue."""
    start, end = _pers_range(OFFS)
    it = 0
    for t in range(start, end):
        j = t - start
        b, h, m0, nb_lo, fu_lo, fu_hi, nb_hi = _pers_tile(TILES, t, n_mb, nheads, seqlen_q, seqlen_k, wl, wr,
                                                          HAS_WL, HAS_WR, BLOCK_M, BLOCK_N)
        for c in gl.static_range(NUM_CONSUMERS):
            mbarrier.wait(q_empty.index(c), (j & 1) ^ 1)
            mbarrier.expect(q_bars.index(c), q_desc.block_type.nbytes)
            _tma_load(q_desc, q_bars.index(c), q_bufs.index(c), b, m0 + c * SUB_M, h, False)
        n_total = nb_hi - nb_lo
        _ws_load_kv(k_desc, v_desc, k_bufs, v_bufs, k_full, v_full, k_empty, v_empty, b, h // group, 0, nb_lo,
                    n_total, it, BLOCK_N, NUM_STAGES, False)
        it += n_total


@gluon.jit
def _pers_consumer(TILES, OFFS, q_bufs, k_bufs, v_bufs, q_bars, q_empty, k_full, v_full, k_empty, v_empty, turn,
                   o_desc, O, LSE, n_mb, nheads, seqlen_q, seqlen_k, wl, wr, qk_scale, cap_out,
                   stride_os, stride_oh, stride_lb, stride_lh,
                   CID: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, SUB_M: gl.constexpr,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, HAS_WL: gl.constexpr,
                   HAS_WR: gl.constexpr, HAS_SOFTCAP: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
                   WAIT_FENCE: gl.constexpr = False):
    """One consumer warpgroup over this program's tiles (rows ``m0 + CID * SUB_M ..`` of each)."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_D, 16])
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    q_smem = q_bufs.index(CID)
    start, end = _pers_range(OFFS)
    off = seqlen_k - seqlen_q
    zero = start * 0
    it = 0
    for t in range(start, end):
        j = t - start
        b, h, m0, nb_lo, fu_lo, fu_hi, nb_hi = _pers_tile(TILES, t, n_mb, nheads, seqlen_q, seqlen_k, wl, wr,
                                                          HAS_WL, HAS_WR, BLOCK_M, BLOCK_N)
        r0 = m0 + CID * SUB_M
        rows = r0 + gl.arange(0, SUB_M, layout=row_layout)
        mbarrier.wait(q_bars.index(CID), j & 1)
        acc, l_i, m_i = _ws_tile(q_smem, k_bufs, v_bufs, k_full, v_full, k_empty, v_empty, turn, rows, it,
                                 nb_lo, fu_lo, fu_hi, nb_hi, seqlen_k, off, wl, wr, qk_scale, cap_out,
                                 CID, BLOCK_D, SUB_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR, HAS_SOFTCAP,
                                 NUM_CONSUMERS, s_layout, o_layout,
                                 q_bar=q_bars.index(CID), q_phase=j & 1, WAIT_FENCE=WAIT_FENCE)
        if r0 < seqlen_q:
            _epilogue(acc, l_i, m_i, q_smem, o_desc, O, LSE, b, h, r0, zero, seqlen_q,
                      stride_os, stride_oh, stride_lb, stride_lh,
                      False, SUB_M, HEAD_DIM, BLOCK_D, row_layout, o_layout)
        # Q buffer free (the epilogue's TMA store out of it has completed): next tile's Q may land
        mbarrier.arrive(q_empty.index(CID))
        it += nb_hi - nb_lo


@gluon.jit(do_not_specialize=_NO_SPECIALIZE + ["n_mb", "nheads"])
def attn_fwd_persistent(
    q_desc, k_desc, v_desc, o_desc, O, LSE, TILES, OFFS,
    stride_os, stride_oh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, group, n_mb, nheads, qk_scale, cap_out, window_left, window_right,
    HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    NUM_STAGES: gl.constexpr, HAS_WL: gl.constexpr, HAS_WR: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr, NUM_CONSUMERS: gl.constexpr, num_warps: gl.constexpr,
    WAIT_FENCE: gl.constexpr = False,
):
    """Dense calls only. Grid ``(len(OFFS) - 1,)``: program ``p`` runs the tiles
    ``TILES[OFFS[p]:OFFS[p + 1]]`` (int32 codes ``(b * nheads + h) * n_mb + m_block``, from
    :func:`flashtile.backends.hopper.sched.schedule`), with the partitions of ``attn_fwd_ws``."""
    SUB_M: gl.constexpr = BLOCK_M // NUM_CONSUMERS
    dtype: gl.constexpr = q_desc.dtype
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=q_desc.layout.swizzle_byte_width,
                                                     element_bitwidth=dtype.primitive_bitwidth, rank=2)
    q_bufs = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS, SUB_M, BLOCK_D], smem_layout)
    k_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, BLOCK_D], smem_layout)
    v_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, BLOCK_D], smem_layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    k_full = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(NUM_CONSUMERS):
        mbarrier.init(q_bars.index(c), count=1)
        mbarrier.init(q_empty.index(c), count=1)
        mbarrier.init(turn.index(c), count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_full.index(i), count=1)
        mbarrier.init(v_full.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=NUM_CONSUMERS)  # one arrival per consumer warpgroup
        mbarrier.init(v_empty.index(i), count=NUM_CONSUMERS)
    if NUM_CONSUMERS == 3:
        gl.warp_specialize([
            (_pers_consumer, (TILES, OFFS, q_bufs, k_bufs, v_bufs, q_bars, q_empty, k_full, v_full, k_empty,
                              v_empty, turn, o_desc, O, LSE, n_mb, nheads, seqlen_q, seqlen_k, window_left,
                              window_right, qk_scale, cap_out, stride_os, stride_oh, stride_lb, stride_lh,
                              0, HEAD_DIM, BLOCK_D, SUB_M, BLOCK_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR,
                              HAS_SOFTCAP, NUM_CONSUMERS, WAIT_FENCE)),
            (_pers_consumer, (TILES, OFFS, q_bufs, k_bufs, v_bufs, q_bars, q_empty, k_full, v_full, k_empty,
                              v_empty, turn, o_desc, O, LSE, n_mb, nheads, seqlen_q, seqlen_k, window_left,
                              window_right, qk_scale, cap_out, stride_os, stride_oh, stride_lb, stride_lh,
                              1, HEAD_DIM, BLOCK_D, SUB_M, BLOCK_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR,
                              HAS_SOFTCAP, NUM_CONSUMERS, WAIT_FENCE)),
            (_pers_consumer, (TILES, OFFS, q_bufs, k_bufs, v_bufs, q_bars, q_empty, k_full, v_full, k_empty,
                              v_empty, turn, o_desc, O, LSE, n_mb, nheads, seqlen_q, seqlen_k, window_left,
                              window_right, qk_scale, cap_out, stride_os, stride_oh, stride_lb, stride_lh,
                              2, HEAD_DIM, BLOCK_D, SUB_M, BLOCK_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR,
                              HAS_SOFTCAP, NUM_CONSUMERS, WAIT_FENCE)),
            (_pers_producer, (TILES, OFFS, q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bars, q_empty,
                              k_full, v_full, k_empty, v_empty, n_mb, nheads, group, seqlen_q, seqlen_k,
                              window_left, window_right, SUB_M, BLOCK_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR,
                              NUM_CONSUMERS)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_pers_consumer, (TILES, OFFS, q_bufs, k_bufs, v_bufs, q_bars, q_empty, k_full, v_full, k_empty,
                              v_empty, turn, o_desc, O, LSE, n_mb, nheads, seqlen_q, seqlen_k, window_left,
                              window_right, qk_scale, cap_out, stride_os, stride_oh, stride_lb, stride_lh,
                              0, HEAD_DIM, BLOCK_D, SUB_M, BLOCK_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR,
                              HAS_SOFTCAP, NUM_CONSUMERS, WAIT_FENCE)),
            (_pers_consumer, (TILES, OFFS, q_bufs, k_bufs, v_bufs, q_bars, q_empty, k_full, v_full, k_empty,
                              v_empty, turn, o_desc, O, LSE, n_mb, nheads, seqlen_q, seqlen_k, window_left,
                              window_right, qk_scale, cap_out, stride_os, stride_oh, stride_lb, stride_lh,
                              1, HEAD_DIM, BLOCK_D, SUB_M, BLOCK_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR,
                              HAS_SOFTCAP, NUM_CONSUMERS, WAIT_FENCE)),
            (_pers_producer, (TILES, OFFS, q_desc, k_desc, v_desc, q_bufs, k_bufs, v_bufs, q_bars, q_empty,
                              k_full, v_full, k_empty, v_empty, n_mb, nheads, group, seqlen_q, seqlen_k,
                              window_left, window_right, SUB_M, BLOCK_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR,
                              NUM_CONSUMERS)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
