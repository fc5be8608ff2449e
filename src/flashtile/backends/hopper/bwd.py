"""Gluon backward attention kernel for Hopper (sm_90): one program per key block keeps dK and dV
in registers (fp32 wgmma accumulators) and loops over the query blocks (and, under GQA, the
query heads of its KV head) that see it; Q and dO tiles arrive by TMA through a multi-stage
mbarrier ring; ``warpgroup_mma`` (wgmma) computes the five products; dQ partials are added into
an fp32 buffer with atomics.

Kernels only: the host side (descriptors, preprocess, dQ conversion, deterministic mode) is
:mod:`.launch_bwd`. Importing this module needs Triton >= 3.6 with Gluon.

Semantics are the forward's (:mod:`.fwd`): query ``i`` sees key ``j`` when
``i + off - wl <= j <= i + off + wr`` (``off = seqlen_k - seqlen_q``), scores in base 2
(``qk_scale`` / ``cap_out`` from the host), lse in natural log with ``-inf`` on rows that see no
key (their P, hence every gradient they feed, is exactly 0). With ``delta = rowsum(dO * O)``
(preprocess) and ``t = tanh(q.k * scale / cap)`` under softcap::

    dV = P^T dO,  dP = dO V^T,  dS = P * (dP - delta) [* (1 - t^2)],  dK = scale * dS^T Q,
    dQ = scale * dS K  (the scale of dQ is applied by the host's conversion).

Orientation: ``attn_bwd`` (the plain kernel, head dims 192/256) computes ``S = Q K^T`` and
``dP = dO V^T`` with queries along the wgmma M dimension, writes P and dS to shared memory and
reads them back transposed for ``dV += P^T dO`` / ``dK += dS^T Q``. ``attn_bwd_ws`` with ``SWAP``
(the default at head dims 64-128, FA3's ``SdP_swapAB``) computes the *transposed* tiles
``S^T = K Q^T`` and ``dP^T = V dO^T`` (keys along M), so that P^T and dS^T feed dV and dK straight
from registers (wgmma's register A operand); only dS^T goes to shared memory, for ``dQ = dS K``.

Warps: the plain kernel runs 8 warps (two warpgroups) in one partition; with ``BLOCK_N = 64``
the warpgroups split the N dimension of every product (warps ``[4, 2]``), the loads of the query
block ``NUM_STAGES`` ahead issued by the same warps once every warp is done with the slot. The ws
kernel adds a worker warpgroup for the TMA loads and the dQ reductions (see
:func:`attn_bwd_ws`).
"""

from __future__ import annotations

from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .fwd import _block_range, _store_rows, _store_rows_smem, _tile_coords, _tma_load, _visible
from .sched import TAIL_BITS as _SCHED_TAIL_BITS

LOG2E: gl.constexpr = gl.constexpr(1.4426950408889634)
TWO_LOG2E: gl.constexpr = gl.constexpr(2.8853900817779268)  # exp(2x) = exp2(this * x)
_NO_SPECIALIZE = ["stride_dqb", "stride_dqs", "stride_dqh", "stride_dkb", "stride_dks", "stride_dkh",
                  "stride_lb", "stride_lh", "seqlen_q", "seqlen_k", "group", "window_left", "window_right"]


#: NBAR (``HopperBwdConfig.nbar``): the ws kernel's dQ hand-off on two hardware named barriers instead of
#: the ``dq_full`` / ``dq_empty`` mbarriers (see :func:`attn_bwd_ws`). Ids: Triton 3.6 gives the
#: default partition barrier 0, the warp-specialize entry / exit barrier 1 and worker partition ``k``
#: barrier ``2 + k`` (the compiled ws kernel uses 0, 1 and 2); 14 and 15 are free. Every compute
#: (8 warps) and worker (4 warps) thread takes part: 384 threads.
NBAR_FULL: gl.constexpr = gl.constexpr(14)
NBAR_EMPTY: gl.constexpr = gl.constexpr(15)
NBAR_THREADS: gl.constexpr = gl.constexpr(32 * (8 + 4))


def _nbar_asm(op: str, bar: gl.constexpr) -> gl.constexpr:
    """``bar.<op> id, 384`` (a dummy output: inline_asm_elementwise needs one)."""
    return gl.constexpr(f"bar.{op} {bar.value}, {NBAR_THREADS.value};\n\tmov.b32 $0, $1;")


#: NBAR = 2: also the ring's "slot empty" releases, slot ``s`` on named barrier ``NBAR_RING_END -
#: NUM_STAGES + s`` (ids 12 and 13 at two stages; ``s`` in a register: ``bar.<op> $r, 384``).
NBAR_RING_END: gl.constexpr = gl.constexpr(14)
NBAR_RING_MIN: gl.constexpr = gl.constexpr(3)  # (0, 1, 2: Triton's own, see above)
_NBAR_ARRIVE_RING: gl.constexpr = gl.constexpr(f"bar.arrive $1, {NBAR_THREADS.value};\n\tmov.b32 $0, $1;")
_NBAR_SYNC_RING: gl.constexpr = gl.constexpr(f"bar.sync $1, {NBAR_THREADS.value};\n\tmov.b32 $0, $1;")
_NBAR_ARRIVE_FULL: gl.constexpr = _nbar_asm("arrive", NBAR_FULL)
_NBAR_SYNC_FULL: gl.constexpr = _nbar_asm("sync", NBAR_FULL)
_NBAR_ARRIVE_EMPTY: gl.constexpr = _nbar_asm("arrive", NBAR_EMPTY)
_NBAR_SYNC_EMPTY: gl.constexpr = _nbar_asm("sync", NBAR_EMPTY)


@gluon.jit
def _named_barrier(ASM: gl.constexpr, NW: gl.constexpr):
    """Run the named-barrier instruction ``ASM`` (``bar.arrive`` / ``bar.sync`` with immediate id and
    thread count) once in every thread of this ``NW``-warp partition: an elementwise inline asm over a
    tensor of one element a thread (a barrier counts arrivals per warp, so each warp executes it
    once, converged). Not pure: kept and not moved across the partition's shared-memory accesses
    (an LLVM ``asm sideeffect``; ptxas orders memory around ``bar``); the PTX shows it in place."""
    lay: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
    gl.inline_asm_elementwise(ASM, "=r,r", [gl.zeros([32 * NW], gl.int32, lay)], dtype=gl.int32, is_pure=False, pack=1)


@gluon.jit
def _ring_barrier(ASM: gl.constexpr, stage, NUM_STAGES: gl.constexpr, NW: gl.constexpr):
    """``NBAR = 2``: run ``ASM`` (:data:`_NBAR_ARRIVE_RING` / :data:`_NBAR_SYNC_RING`) on ring slot
    ``stage``'s named barrier, once in every thread of this ``NW``-warp partition (as
    :func:`_named_barrier`; the id a warp-uniform register)."""
    lay: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
    bar_id = gl.zeros([32 * NW], gl.int32, lay) + (NBAR_RING_END - NUM_STAGES + stage)
    gl.inline_asm_elementwise(ASM, "=r,r", [bar_id], dtype=gl.int32, is_pure=False, pack=1)


@builtin
def _tma_add(tensor_desc, coord, src, _semantic=None):
    """TMA reduce-add of the shared-memory tile ``src`` into the tensor of ``tensor_desc`` at
    ``coord`` (``cp.reduce.async.bulk.tensor ... .add``, sm_90; completes in the bulk group, wait
    with ``tma.store_wait``). Triton 3.6's Gluon has the IR op but no Python wrapper (later
    releases call it ``tma.async_atomic_add``)."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, tensor_desc.handle, coord, src.handle)


@gluon.jit
def _tma_reduce_tile(desc, buf, b, row, head, IS_VARLEN: gl.constexpr):
    """Add the fp32 ``[rows, D]`` tile ``buf`` into the rows ``row ..`` (of batch ``b``; varlen: a
    global row index) of head ``head`` of the tensor of ``desc`` by TMA."""
    view = buf._reinterpret(desc.dtype, desc.block_type.shape, desc.layout)
    if IS_VARLEN:
        _tma_add(desc, [row, head, 0], view)
    else:
        _tma_add(desc, [b, row, head, 0], view)


@gluon.jit
def _tanh_fast(x):
    """tanh(x) = 1 - 2 / (1 + exp(2x)) with an approximate division (``div.full.f32``): few
    instructions and registers (the backward is register-bound at head dim 256). Exact limits
    (exp2 overflows to inf: t = 1; underflows to 0: t = -1); otherwise the absolute error is
    below ~5e-7 (2 ulp of a value <= 2, no cancellation worse than that), i.e. ~2e-5 in the
    base-2 score for softcap 30: P off by ~1e-5 relative, far below bf16/fp16 resolution."""
    return 1.0 - gl.fdiv(2.0, 1.0 + gl.exp2(TWO_LOG2E * x))


@gluon.jit
def _red_v4(base, x, row0, col0, stride_s, BLOCK_R: gl.constexpr, BLOCK_C: gl.constexpr, num_warps: gl.constexpr):
    """Add the fp32 tile ``x`` ``[BLOCK_R, BLOCK_C]`` into rows ``row0 ..``, columns ``col0 ..`` at
    ``base`` (row stride ``stride_s``) with vector reductions ``red.global.add.v4.f32`` (sm_90):
    ``x`` goes through shared memory into a layout where each thread holds 4 consecutive columns,
    so a warp's reduction covers whole 32-byte sectors, a quarter of the scalar requests."""
    TPR: gl.constexpr = BLOCK_C // 4 if BLOCK_C // 4 < 32 else 32
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [32 // TPR, TPR], [num_warps, 1], [1, 0])
    xb = gl.convert_layout(x, layout)
    r = gl.arange(0, BLOCK_R, layout=gl.SliceLayout(1, layout))
    c = col0 + gl.arange(0, BLOCK_C, layout=gl.SliceLayout(0, layout))
    ptrs = base + gl.expand_dims((row0 + r).to(gl.int64) * stride_s, 1) + gl.expand_dims(c, 0)
    gl.inline_asm_elementwise(
        "red.relaxed.gpu.global.add.v4.f32 [$4], {$8, $9, $10, $11};\n\tmov.b32 $0, 0;\n\tmov.b32 $1, 0;"
        "\n\tmov.b32 $2, 0;\n\tmov.b32 $3, 0;",
        "=r,=r,=r,=r,l,l,l,l,f,f,f,f", [ptrs.to(gl.int64), xb], dtype=gl.int32, is_pure=False, pack=4)


@gluon.jit
def _mod_positions(qrows, keys, seqlen_q, seqlen_k, QAX: gl.constexpr):
    """The query / key positions a flex mod sees on a score tile: ``qrows`` / ``keys`` clamped into
    the sequences (the mods' lookups stay in bounds) and expanded so that a per-query vector lies
    along axis ``QAX`` (0: the transposed tile ``S^T``)."""
    qi = gl.expand_dims(gl.minimum(qrows, seqlen_q - 1), QAX)
    ki = gl.expand_dims(gl.minimum(keys, seqlen_k - 1), 1 - QAX)
    return qi, ki


@gluon.jit
def _mask_mod_tile(MASK_MOD: gl.constexpr, b, h, qrows, keys, seqlen_q, seqlen_k, MA0, MA1, MA2,
                   QAX: gl.constexpr):
    """The visibility of a score tile under a flex ``mask_mod`` (a ``@triton.jit`` function of
    ``flex_triton.kernels``, ``(b, h, q, kv, A0, A1, A2) -> bool``, compiled here with Gluon's
    semantics): ``qrows`` / ``keys`` are the tile's query / key positions in slices of its layout,
    ``QAX`` the axis a per-query vector is expanded on (0: the transposed tile ``S^T``). The mod
    sees positions clamped into the sequences (its captured tensors are read in bounds); keys past
    ``seqlen_k`` are hidden (rows past ``seqlen_q`` have P = 0 from their lse)."""
    qi, ki = _mod_positions(qrows, keys, seqlen_q, seqlen_k, QAX)
    return MASK_MOD(b, h, qi, ki, MA0, MA1, MA2) & gl.expand_dims(keys < seqlen_k, 1 - QAX)


@gluon.jit
def _score_mod_tile(SCORE_MOD: gl.constexpr, x, b, h, qrows, keys, seqlen_q, seqlen_k, SA0, SA1, SA2,
                    QAX: gl.constexpr):
    """A flex ``score_mod`` (a ``@triton.jit`` function of ``flex_triton.kernels``, ``(s, b, h, q,
    kv, A0, A1, A2) -> s``) on the natural-unit score tile ``x``, query / key positions laid out as
    in :func:`_mask_mod_tile` (clamped into the sequences: its lookups stay in bounds)."""
    qi, ki = _mod_positions(qrows, keys, seqlen_q, seqlen_k, QAX)
    return SCORE_MOD(x, b, h, qi, ki, SA0, SA1, SA2)


@gluon.jit
def _list_block(BL_IDX, j, LIST_SUBS: gl.constexpr):
    """Block-list mode: the query block (of ``BLOCK_M`` rows) of step ``j`` of a program's list at
    ``BL_IDX`` (block-mask query blocks, ``LIST_SUBS`` steps of ``BLOCK_M`` rows each)."""
    li = j // LIST_SUBS
    return gl.load(BL_IDX + li) * LIST_SUBS + (j - li * LIST_SUBS)


@gluon.jit
def _step_block(i, g, mb_lo, n_mb, BL_IDX, LIST_SUBS: gl.constexpr):
    """The query block (of ``BLOCK_M`` rows) of loop iteration ``i`` of query head ``g`` of the
    group: ``mb_lo + i - g * n_mb``, or with ``LIST_SUBS`` (block-list mode) step ``i - g * n_mb``
    of the program's list (:func:`_list_block`)."""
    if LIST_SUBS:
        blk = _list_block(BL_IDX, i - g * n_mb, LIST_SUBS)
    else:
        blk = mb_lo + i - g * n_mb
    return blk


@gluon.jit
def _bwd_p(s, lse2, keys, m0, masked, seqlen_k, off, window_left, window_right, qk_scale, cap_out,
           HAS_WL: gl.constexpr, HAS_WR: gl.constexpr, HAS_SOFTCAP: gl.constexpr, BLOCK_M: gl.constexpr,
           qry_layout: gl.constexpr, TRANS: gl.constexpr = False, MASK_MOD: gl.constexpr = None,
           b=None, h=None, seqlen_q=None, MA0=None, MA1=None, MA2=None, FOLDED: gl.constexpr = False,
           SCORE_MOD: gl.constexpr = None, SA0=None, SA1=None, SA2=None, sm_scale=None):
    """P = exp2(score - lse) of a ``[BLOCK_M, keys]`` tile from the raw ``S = Q K^T`` (the forward's
    score: base 2, softcap, visibility masks when ``masked``; rows past the sequence or seeing no
    key have ``lse2 = +inf``: P = 0). ``TRANS``: the tile is ``S^T = K Q^T`` (``[keys, BLOCK_M]``,
    lse along the columns) and so is the result. Returns ``(p, t)``: ``t = tanh`` of the softcap
    (for dS's ``1 - t^2``), or ``p`` again without softcap (unused). ``MASK_MOD`` (block-list
    mode, a flex block mask's ``mask_mod``): the masked tiles evaluate it (:func:`_mask_mod_tile`)
    instead of the causal / window rule. ``FOLDED`` (no softcap): ``s`` already holds ``S - lse /
    scale`` (the accumulator started from the stats, see ``HopperBwdConfig.fold``): P = exp2(score).
    ``SCORE_MOD`` (block-list mode, no softcap; arguments ``SA0..2``): a flex score mod ADDITIVE in
    the score (``mod(x) = x + bias(b, h, q, kv)``, derivative 1: ALiBi, a bias table; the host
    checks), applied as the forward does to the natural-unit score ``sm_scale * S`` (the forward's
    lse includes it); additive, so it also holds for the folded ``S - lse / scale`` (the mod sees
    ``sm_scale * S - lse`` in natural log units and adds the same bias)."""
    QAX: gl.constexpr = 0 if TRANS else 1  # the axis expand_dims adds to a per-query vector
    if HAS_SOFTCAP:
        t = _tanh_fast(s * qk_scale)
        s2 = t * cap_out
    elif SCORE_MOD is None:
        s2 = s * qk_scale
    else:
        s2 = _score_mod_tile(SCORE_MOD, s * sm_scale, b, h, m0 + gl.arange(0, BLOCK_M, layout=qry_layout), keys,
                             seqlen_q, seqlen_k, SA0, SA1, SA2, QAX) * LOG2E
    if masked:
        qrows = m0 + gl.arange(0, BLOCK_M, layout=qry_layout)
        if MASK_MOD is None:
            vis = _visible(gl.expand_dims(keys, 1 - QAX), gl.expand_dims(qrows, QAX), seqlen_k, off, window_left,
                           window_right, HAS_WL, HAS_WR)
        else:
            vis = _mask_mod_tile(MASK_MOD, b, h, qrows, keys, seqlen_q, seqlen_k, MA0, MA1, MA2, QAX)
        s2 = gl.where(vis, s2, float("-inf"))
    if FOLDED:
        p = gl.exp2(s2)
    else:
        p = gl.exp2(s2 - gl.expand_dims(lse2, QAX))
    if HAS_SOFTCAP:
        return p, t
    return p, p


@gluon.jit
def _issue_q_do(q_desc, do_desc, q_bufs, do_bufs, q_bars, do_bars, i, b, hk, group, q_start, mb_lo, n_mb,
                BLOCK_M: gl.constexpr, NUM_STAGES: gl.constexpr, IS_VARLEN: gl.constexpr):
    """Start the TMA loads of the Q and dO tiles of loop iteration ``i`` (query head
    ``hk * group + i // n_mb``, query block ``mb_lo + i % n_mb``) into ring slot ``i % NUM_STAGES``."""
    stage = i % NUM_STAGES
    g = i // n_mb
    row = q_start + (mb_lo + i - g * n_mb) * BLOCK_M
    h = hk * group + g
    q_bar = q_bars.index(stage)
    do_bar = do_bars.index(stage)
    mbarrier.expect(q_bar, q_desc.block_type.nbytes)
    _tma_load(q_desc, q_bar, q_bufs.index(stage), b, row, h, IS_VARLEN)
    mbarrier.expect(do_bar, do_desc.block_type.nbytes)
    _tma_load(do_desc, do_bar, do_bufs.index(stage), b, row, h, IS_VARLEN)


@gluon.jit
def _store_dkdv(DK, DV, kv_off, dk, dv, sm_scale, ep_k, ep_v, row0, n_rows, stride_s, HEAD_DIM: gl.constexpr,
                BLOCK_R: gl.constexpr, BLOCK_D: gl.constexpr, layout: gl.constexpr, NW: gl.constexpr,
                EPI: gl.constexpr):
    """The backward's epilogue: dV and ``sm_scale * dK`` (fp32 ``[BLOCK_R, BLOCK_D]`` in ``layout``) in the
    inputs' dtype at rows ``row0 ..`` (``< n_rows``) of ``DV + kv_off`` / ``DK + kv_off``; with ``EPI``
    through the shared tiles ``ep_v`` then ``ep_k`` (:func:`_store_rows_smem`; the same tile twice is
    fine), else straight from ``layout`` (:func:`_store_rows`)."""
    dtype: gl.constexpr = DK.dtype.element_ty
    if EPI:
        VEC: gl.constexpr = 128 // dtype.primitive_bitwidth
        kv_off = kv_off // VEC * VEC  # (a multiple of VEC already; spelled so that the stores vectorise:
        # multiple_of on a function's argument is dropped, as on a scalar)
        _store_rows_smem(DV + kv_off, dv.to(dtype), ep_v, row0, n_rows, stride_s, HEAD_DIM, BLOCK_R, BLOCK_D, NW)
        _store_rows_smem(DK + kv_off, (dk * sm_scale).to(dtype), ep_k, row0, n_rows, stride_s, HEAD_DIM, BLOCK_R,
                         BLOCK_D, NW)
    else:
        _store_rows(DV + kv_off, dv.to(dtype), row0, n_rows, stride_s, HEAD_DIM, BLOCK_R, BLOCK_D, layout)
        _store_rows(DK + kv_off, (dk * sm_scale).to(dtype), row0, n_rows, stride_s, HEAD_DIM, BLOCK_R, BLOCK_D,
                    layout)


@gluon.jit(do_not_specialize=_NO_SPECIALIZE)
def attn_bwd(
    q_desc, k_desc, v_desc, do_desc, DQ, DK, DV, LSE, DELTA, CU_Q, CU_K,
    stride_dqb, stride_dqs, stride_dqh, stride_dkb, stride_dks, stride_dkh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, group, qk_scale, cap_out, sm_scale, window_left, window_right,
    HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    NUM_STAGES: gl.constexpr, HAS_WL: gl.constexpr, HAS_WR: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
    IS_VARLEN: gl.constexpr, ATOMIC_DQ: gl.constexpr, DQ_CHUNK: gl.constexpr, RED_VEC: gl.constexpr,
    num_warps: gl.constexpr, LPT: gl.constexpr = False, EPI: gl.constexpr = False,
):
    """Grid ``(cdiv(max_seqlen_k, BLOCK_N), Hk, B or nseq)``, ``num_warps = 8``; with ``LPT``
    ``(Hk, B or nseq, cdiv(max_seqlen_k, BLOCK_N))``: key block 0 of every head first (under a causal
    mask the heaviest: longest-first scheduling, a shorter tail). ``EPI``: dV and dK stored through V's
    and K's tiles after the loop (:func:`_store_rows_smem`).

    q_desc / do_desc: ``[BLOCK_M, BLOCK_D]`` tiles of q / dout; k_desc / v_desc:
    ``[BLOCK_N, BLOCK_D]`` tiles (4-D dense, 3-D varlen descriptors, as the forward's). DK / DV
    like k (contiguous, ``stride_dk*`` shared by both), written whole (zeros for keys no query
    sees). DQ: fp32 ``(B, Sq + BLOCK_M, H, BLOCK_D)`` zeroed buffer (varlen ``total_q + BLOCK_M``
    rows), ``ATOMIC_DQ``: the unscaled dS K is added into it with relaxed atomics, whole query
    blocks without masks (rows past a sequence's end add exact zeros, into the spare rows or the
    next sequence's); else dQ is left to another kernel. LSE (natural log) and
    DELTA share the strides ``stride_lb`` / ``stride_lh`` (varlen: one row of ``total_q``)."""
    pid_n, hk, b, q_start, k_start, seqlen_q, seqlen_k = _tile_coords(CU_Q, CU_K, seqlen_q, seqlen_k, False,
                                                                      IS_VARLEN, LPT)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen_k:
        return
    dtype: gl.constexpr = q_desc.dtype
    off = seqlen_k - seqlen_q

    # S and dP: queries along M (BLOCK_M = 64: the two warpgroups split the keys; 128: the rows);
    # dK and dV: keys along M (BLOCK_N = 128: 64 keys per warpgroup; 64: they split the head dim);
    # dQ: queries along M, split as S.
    SM: gl.constexpr = BLOCK_M // 16 if BLOCK_M // 16 < num_warps else num_warps
    SN: gl.constexpr = num_warps // SM
    KM: gl.constexpr = BLOCK_N // 16 if BLOCK_N // 16 < num_warps else num_warps
    KN: gl.constexpr = num_warps // KM
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[SM, SN],
                                                       instr_shape=[16, BLOCK_N // SN, 16])
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[KM, KN],
                                                        instr_shape=[16, BLOCK_D // KN, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[SM, SN],
                                                        instr_shape=[16, DQ_CHUNK // SN, 16])
    # dP = dO V^T is issued right after S (overlapping the softmax) unless registers are short:
    # softcap at head dims >= 128 issues it after P (its accumulator is not live during the
    # softmax; ptxas spilled 16-52 bytes otherwise)
    EARLY_DP: gl.constexpr = not (HAS_SOFTCAP and BLOCK_D >= 128)
    qry_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    key_layout: gl.constexpr = gl.SliceLayout(0, s_layout)

    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=q_desc.layout.swizzle_byte_width,
                                                     element_bitwidth=dtype.primitive_bitwidth, rank=2)
    ps_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, BLOCK_N], dtype)
    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_D], smem_layout)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_D], smem_layout)
    q_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, BLOCK_D], smem_layout)
    do_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, BLOCK_D], smem_layout)
    p_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_N], ps_layout)
    ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, BLOCK_N], ps_layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    q_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    do_bars = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for st in gl.static_range(NUM_STAGES):
        mbarrier.init(q_bars.index(st), count=1)
        mbarrier.init(do_bars.index(st), count=1)

    # query blocks that see this key block: the forward's rule with rows and columns swapped
    c_hi = gl.minimum(n0 + BLOCK_N, seqlen_k)
    mb_lo, fu_lo, fu_hi, mb_hi = _block_range(n0, c_hi, seqlen_q, -off, window_right, window_left,
                                              HAS_WR, HAS_WL, BLOCK_M)
    if n0 + BLOCK_N > seqlen_k:
        # ragged key block: its rows past seqlen_k are zeros (dense) or the next sequence's keys
        # (varlen), which must not reach dQ: every query block takes the masked path
        fu_hi = fu_lo
    n_mb = mb_hi - mb_lo
    total = n_mb * group

    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    _tma_load(k_desc, kv_bar, k_smem, b, k_start + n0, hk, IS_VARLEN)
    _tma_load(v_desc, kv_bar, v_smem, b, k_start + n0, hk, IS_VARLEN)
    for st in gl.static_range(NUM_STAGES):
        if st < total:
            _issue_q_do(q_desc, do_desc, q_bufs, do_bufs, q_bars, do_bars, st, b, hk, group, q_start, mb_lo, n_mb,
                        BLOCK_M, NUM_STAGES, IS_VARLEN)

    keys = n0 + gl.arange(0, BLOCK_N, layout=key_layout)
    dk = gl.zeros([BLOCK_N, BLOCK_D], gl.float32, kv_layout)
    dv = gl.zeros([BLOCK_N, BLOCK_D], gl.float32, kv_layout)
    mbarrier.wait(kv_bar, 0)

    for i in range(total):
        stage = i % NUM_STAGES
        phase = (i // NUM_STAGES) & 1
        g = i // n_mb
        blk = mb_lo + i - g * n_mb
        h = hk * group + g
        m0 = blk * BLOCK_M
        q_buf = q_bufs.index(stage)
        do_buf = do_bufs.index(stage)

        # lse (base 2, +inf on rows that see no key: P = 0 there) and delta of the block's rows
        qrows = m0 + gl.arange(0, BLOCK_M, layout=qry_layout)
        qok = qrows < seqlen_q
        lrow = b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + (q_start + qrows)
        lse = gl.load(LSE + lrow, mask=qok, other=float("-inf"))
        lse2 = gl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
        delta = gl.load(DELTA + lrow, mask=qok, other=0.0)

        mbarrier.wait(q_bars.index(stage), phase)
        s = warpgroup_mma(q_buf, k_smem.permute((1, 0)), gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout),
                          use_acc=False, is_async=True)
        if EARLY_DP:
            mbarrier.wait(do_bars.index(stage), phase)
            dp = warpgroup_mma(do_buf, v_smem.permute((1, 0)), gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout),
                               use_acc=False, is_async=True)
            s = warpgroup_mma_wait(1, deps=(s,))
        else:
            s = warpgroup_mma_wait(0, deps=(s,))

        p, t = _bwd_p(s, lse2, keys, m0, (blk < fu_lo) | (blk >= fu_hi), seqlen_k, off, window_left, window_right,
                      qk_scale, cap_out, HAS_WL, HAS_WR, HAS_SOFTCAP, BLOCK_M, qry_layout)
        p_smem.store(p.to(dtype))
        fence_async_shared()
        gl.thread_barrier()  # all of P is in shared memory before either warpgroup reads it
        if not EARLY_DP:
            mbarrier.wait(do_bars.index(stage), phase)
        dv = warpgroup_mma(p_smem.permute((1, 0)), do_buf, dv, is_async=True)
        if HAS_SOFTCAP:
            p = p * (1.0 - t * t)  # tanh' folded into P now: t need not stay live until dS
        if EARLY_DP:
            dp = warpgroup_mma_wait(1, deps=(dp,))  # groups retire in order: dP done, dV may still run
        else:
            dp = warpgroup_mma(do_buf, v_smem.permute((1, 0)), gl.zeros([BLOCK_M, BLOCK_N], gl.float32, s_layout),
                               use_acc=False, is_async=True)
            dp = warpgroup_mma_wait(0, deps=(dp,))
        ds = p * (dp - gl.expand_dims(delta, 1))
        ds_smem.store(ds.to(dtype))
        fence_async_shared()
        gl.thread_barrier()
        dk = warpgroup_mma(ds_smem.permute((1, 0)), q_buf, dk, is_async=True)
        if ATOMIC_DQ:
            # dQ = dS K in column chunks of DQ_CHUNK (fewer live registers for the atomics)
            # no row mask (a masked atomic is a branch per element): DQ has BLOCK_M spare rows past
            # the last one, and rows past seqlen_q add exact zeros (their P, hence dS, is 0)
            base = DQ + (b.to(gl.int64) * stride_dqb + h.to(gl.int64) * stride_dqh)
            qr = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, dq_layout))
            for c in gl.static_range(BLOCK_D // DQ_CHUNK):
                dq0 = gl.zeros([BLOCK_M, DQ_CHUNK], gl.float32, dq_layout)
                if BLOCK_D == DQ_CHUNK:
                    dq = warpgroup_mma(ds_smem, k_smem, dq0, use_acc=False, is_async=True)
                else:
                    dq = warpgroup_mma(ds_smem, k_smem.slice(c * DQ_CHUNK, DQ_CHUNK, dim=1), dq0, use_acc=False,
                                       is_async=True)
                dq = warpgroup_mma_wait(0, deps=(dq,))
                if RED_VEC == 4:
                    _red_v4(base, dq, q_start + m0, c * DQ_CHUNK, stride_dqs, BLOCK_M, DQ_CHUNK, num_warps)
                else:
                    qc = c * DQ_CHUNK + gl.arange(0, DQ_CHUNK, layout=gl.SliceLayout(0, dq_layout))
                    ptrs = base + gl.expand_dims((q_start + qr).to(gl.int64) * stride_dqs, 1) + gl.expand_dims(qc, 0)
                    if BLOCK_D > 128:
                        # the row mask is not needed (spare rows, see above) but its form is the one
                        # ptxas fits in 255 registers at head dim 256 (unmasked: 28-32 bytes spilled)
                        gl.atomic_add(ptrs, dq, mask=gl.expand_dims(qr < seqlen_q, 1), sem="relaxed")
                    else:
                        gl.atomic_add(ptrs, dq, sem="relaxed")
            dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
        else:
            dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
        # every warp is done with this ring slot (and with P, dS) before they are overwritten
        gl.thread_barrier()
        nxt = i + NUM_STAGES
        if nxt < total:
            _issue_q_do(q_desc, do_desc, q_bufs, do_bufs, q_bars, do_bars, nxt, b, hk, group, q_start, mb_lo, n_mb,
                        BLOCK_M, NUM_STAGES, IS_VARLEN)

    mbarrier.invalidate(kv_bar)
    for st in gl.static_range(NUM_STAGES):
        mbarrier.invalidate(q_bars.index(st))
        mbarrier.invalidate(do_bars.index(st))
    kv_off = b.to(gl.int64) * stride_dkb + hk.to(gl.int64) * stride_dkh
    # (EPI: through K's and V's tiles: no wgmma reads them any more, no load refills them)
    _store_dkdv(DK, DV, kv_off, dk, dv, sm_scale, k_smem, v_smem, k_start + n0, seqlen_k - n0, stride_dks, HEAD_DIM,
                BLOCK_N, BLOCK_D, kv_layout, num_warps, EPI)


# ---------------------------------------------------------------------------------------
# warp-specialised backward (FA3's shape): 2 compute warpgroups + 1 worker warpgroup
# ---------------------------------------------------------------------------------------


@gluon.jit
def _issue_slot(q_desc, do_desc, q_bufs, do_bufs, ld_full, i, b, hk, group, q_start, mb_lo, n_mb,
                BLOCK_M: gl.constexpr, NUM_STAGES: gl.constexpr, IS_VARLEN: gl.constexpr, BL_IDX=None,
                LIST_SUBS: gl.constexpr = 0, ring_i=None):
    """Worker: TMA loads of the Q and dO tiles of iteration ``i`` into ring slot ``ring_i % NUM_STAGES``
    (``ring_i``: the ring's iteration count, ``i`` unless the ring goes on across tiles), both
    completing on that slot's ``ld_full`` barrier."""
    if ring_i is None:
        ring_i = i
    stage = ring_i % NUM_STAGES
    g = i // n_mb
    row = q_start + _step_block(i, g, mb_lo, n_mb, BL_IDX, LIST_SUBS) * BLOCK_M
    h = hk * group + g
    bar = ld_full.index(stage)
    mbarrier.expect(bar, q_desc.block_type.nbytes + do_desc.block_type.nbytes)
    _tma_load(q_desc, bar, q_bufs.index(stage), b, row, h, IS_VARLEN)
    _tma_load(do_desc, bar, do_bufs.index(stage), b, row, h, IS_VARLEN)


@gluon.jit
def _put_stats(st_smem, i, lse2, delta, stat_mul, NUM_STAGES: gl.constexpr, FOLD: gl.constexpr):
    """Worker: store iteration ``i``'s lse (base 2) and delta rows into its ring slot's two rows of
    ``st_smem`` (``[2 * NUM_STAGES, BLOCK_M]``); with ``FOLD`` as the score accumulators' starting
    values: ``lse2 * stat_mul`` (``stat_mul = -1 / qk_scale``: ``-lse / scale``) and ``-delta``."""
    stage = i % NUM_STAGES
    if FOLD:
        st_smem.index(2 * stage).store(lse2 * stat_mul)
        st_smem.index(2 * stage + 1).store(-delta)
    else:
        st_smem.index(2 * stage).store(lse2)
        st_smem.index(2 * stage + 1).store(delta)


@gluon.jit
def _red_smem_v4(base, dq_smem, row0, stride_s, BLOCK_M: gl.constexpr, BLOCK_D: gl.constexpr,
                 ROWS: gl.constexpr, WARPS: gl.constexpr, NUM_TILES: gl.constexpr):
    """Worker: add the sum of the ``NUM_TILES`` (1 or 2) fp32 ``[BLOCK_M, BLOCK_D]`` tiles in
    ``dq_smem`` (``[NUM_TILES, BLOCK_M, BLOCK_D]``) into rows ``row0 ..`` at ``base`` (row stride
    ``stride_s``) with ``red.global.add.v4.f32``, ``ROWS`` rows at a time (4 consecutive columns a
    thread: whole 32-byte sectors per warp request)."""
    TPR: gl.constexpr = BLOCK_D // 4 if BLOCK_D // 4 < 32 else 32
    layout: gl.constexpr = gl.BlockedLayout([1, 4], [32 // TPR, TPR], [WARPS, 1], [1, 0])
    c = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, layout))
    r = gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
    for p in gl.static_range(BLOCK_M // ROWS):
        x = dq_smem.index(0).slice(p * ROWS, ROWS, dim=0).load(layout)
        if NUM_TILES == 2:
            x += dq_smem.index(1).slice(p * ROWS, ROWS, dim=0).load(layout)
        ptrs = base + gl.expand_dims((row0 + p * ROWS + r).to(gl.int64) * stride_s, 1) + gl.expand_dims(c, 0)
        gl.inline_asm_elementwise(
            "red.relaxed.gpu.global.add.v4.f32 [$4], {$8, $9, $10, $11};\n\tmov.b32 $0, 0;\n\tmov.b32 $1, 0;"
            "\n\tmov.b32 $2, 0;\n\tmov.b32 $3, 0;",
            "=r,=r,=r,=r,l,l,l,l,f,f,f,f", [ptrs.to(gl.int64), x], dtype=gl.int32, is_pure=False, pack=4)


@gluon.jit
def _bwd_ws_worker(q_desc, k_desc, v_desc, do_desc, k_smem, v_smem, q_bufs, do_bufs, dq_smem,
                   kv_bar, ld_full, ld_empty, dq_full, dq_empty, DQ, b, hk, group, q_start, k_start, n0,
                   mb_lo, n_mb, total, stride_dqb, stride_dqs, stride_dqh,
                   BLOCK_M: gl.constexpr, BLOCK_D: gl.constexpr, NUM_STAGES: gl.constexpr,
                   IS_VARLEN: gl.constexpr, ATOMIC_DQ: gl.constexpr, RED_ROWS: gl.constexpr,
                   WORKER_WARPS: gl.constexpr, NUM_TILES: gl.constexpr, dq_desc, DQ_TMA: gl.constexpr,
                   BL_IDX, LIST_SUBS: gl.constexpr, LSE, DELTA, st_smem, seqlen_q, stride_lb, stride_lh, stat_mul,
                   STAT_RING: gl.constexpr, FOLD: gl.constexpr, NBAR: gl.constexpr = 0,
                   it0=0, tcount=0, kv_empty=None, PERSIST: gl.constexpr = False):
    """The worker warpgroup: every TMA load (K and V once, then Q / dO of each iteration into the
    ring, a slot refilled once the compute warpgroups released it), and the dQ reductions: each
    iteration's dQ tile, left in ``dq_smem`` by the compute warpgroups, is added into the fp32
    accumulator in global memory while they go on with the next query block: with
    ``red.global.add.v4.f32`` from registers, or (``DQ_TMA``) by TMA reduce-adds of the whole tile
    (``dq_desc``), the worker waiting only until the TMA unit has read the tile. Block-list mode
    (``LIST_SUBS``): the query blocks of the program's list at ``BL_IDX``. ``STAT_RING``: each slot's
    lse and delta rows too (:func:`_put_stats`), loaded before the dQ reduction and stored after
    it (their latency under it), then a second arrival on the slot's ``ld_full``. ``NBAR``: the dQ
    hand-off on named barriers (``bar.sync`` full, ``bar.arrive`` empty; see :func:`attn_bwd_ws`);
    ``NBAR = 2``: also ``bar.sync`` on the slot's named barrier before refilling it, in place of the
    ``ld_empty`` wait.

    ``PERSIST`` (:func:`attn_bwd_ws_persistent`: one call per tile of the program): the ring and the dQ
    hand-off go on across tiles, so slots, phases and parities follow the program's iteration count
    ``it0 + i`` (``it0``: iterations of its earlier tiles); the tile's first slots are refilled only once
    the compute warps released them (their iterations of the tile before), and K / V only once they
    arrived on ``kv_empty`` (phase of tile ``tcount - 1``)."""
    st_layout: gl.constexpr = gl.BlockedLayout([1], [32], [WORKER_WARPS], [0])
    if PERSIST:
        if tcount > 0:
            mbarrier.wait(kv_empty, (tcount - 1) & 1)
    mbarrier.expect(kv_bar, k_desc.block_type.nbytes + v_desc.block_type.nbytes)
    _tma_load(k_desc, kv_bar, k_smem, b, k_start + n0, hk, IS_VARLEN)
    _tma_load(v_desc, kv_bar, v_smem, b, k_start + n0, hk, IS_VARLEN)
    for st in gl.static_range(NUM_STAGES):
        if st < total:
            gst = it0 + st  # (the ring's iteration: it0 = 0 unless PERSIST)
            if PERSIST:
                if gst >= NUM_STAGES:  # the slot's iteration gst - NUM_STAGES (an earlier tile's) released
                    mbarrier.wait(ld_empty.index(gst % NUM_STAGES), (gst // NUM_STAGES - 1) & 1)
            _issue_slot(q_desc, do_desc, q_bufs, do_bufs, ld_full, st, b, hk, group, q_start, mb_lo, n_mb,
                        BLOCK_M, NUM_STAGES, IS_VARLEN, BL_IDX, LIST_SUBS, gst)
            if STAT_RING:
                lse2, delta = _lse_delta(LSE, DELTA, st, b, hk, group, q_start, mb_lo, n_mb, seqlen_q, stride_lb,
                                         stride_lh, BLOCK_M, st_layout, BL_IDX, LIST_SUBS)
                _put_stats(st_smem, gst, lse2, delta, stat_mul, NUM_STAGES, FOLD)
                mbarrier.arrive(ld_full.index(gst % NUM_STAGES))
    for i in range(total):
        gi = it0 + i
        nxt = i + NUM_STAGES
        if STAT_RING:  # (defined on both paths of the branch below)
            lse2 = gl.zeros([BLOCK_M], gl.float32, st_layout)
            delta = gl.zeros([BLOCK_M], gl.float32, st_layout)
        if nxt < total:
            if NBAR == 2:  # every compute thread is done with slot i % NUM_STAGES (arrived for iteration i)
                _ring_barrier(_NBAR_SYNC_RING, i % NUM_STAGES, NUM_STAGES, WORKER_WARPS)
            else:
                mbarrier.wait(ld_empty.index(gi % NUM_STAGES), (gi // NUM_STAGES) & 1)
            _issue_slot(q_desc, do_desc, q_bufs, do_bufs, ld_full, nxt, b, hk, group, q_start, mb_lo, n_mb,
                        BLOCK_M, NUM_STAGES, IS_VARLEN, BL_IDX, LIST_SUBS, gi + NUM_STAGES)
            if STAT_RING:
                lse2, delta = _lse_delta(LSE, DELTA, nxt, b, hk, group, q_start, mb_lo, n_mb, seqlen_q, stride_lb,
                                         stride_lh, BLOCK_M, st_layout, BL_IDX, LIST_SUBS)
        if ATOMIC_DQ:
            g = i // n_mb
            blk = _step_block(i, g, mb_lo, n_mb, BL_IDX, LIST_SUBS)
            h = hk * group + g
            base = DQ + (b.to(gl.int64) * stride_dqb + h.to(gl.int64) * stride_dqh)
            if NBAR:
                _named_barrier(_NBAR_SYNC_FULL, WORKER_WARPS)  # the compute warps stored tile i
            else:
                mbarrier.wait(dq_full, gi & 1)
            if DQ_TMA:
                for t in gl.static_range(NUM_TILES):
                    _tma_reduce_tile(dq_desc, dq_smem.index(t), b, q_start + blk * BLOCK_M, h, IS_VARLEN)
                tma.store_wait(0)  # the TMA unit has read the tile(s)
            else:
                _red_smem_v4(base, dq_smem, q_start + blk * BLOCK_M, stride_dqs, BLOCK_M, BLOCK_D, RED_ROWS,
                             WORKER_WARPS, NUM_TILES)
            if NBAR:
                if i + 1 < total:  # tile i read: the compute warps may store tile i + 1 (none after the last)
                    _named_barrier(_NBAR_ARRIVE_EMPTY, WORKER_WARPS)
        if STAT_RING:
            if nxt < total:
                _put_stats(st_smem, gi + NUM_STAGES, lse2, delta, stat_mul, NUM_STAGES, FOLD)
                # (after a barrier of the worker's warps)
                mbarrier.arrive(ld_full.index((gi + NUM_STAGES) % NUM_STAGES))
        if ATOMIC_DQ and not NBAR:
            mbarrier.arrive(dq_empty)  # (lowered after a barrier of the worker's warps: all reads done)


@gluon.jit
def _lse_delta(LSE, DELTA, i, b, hk, group, q_start, mb_lo, n_mb, seqlen_q, stride_lb, stride_lh,
               BLOCK_M: gl.constexpr, qry_layout: gl.constexpr, BL_IDX=None, LIST_SUBS: gl.constexpr = 0):
    """lse in base 2 (+inf on rows that see no key and on rows past the sequence: P = 0 there)
    and delta of iteration ``i``'s query rows."""
    g = i // n_mb
    m0 = _step_block(i, g, mb_lo, n_mb, BL_IDX, LIST_SUBS) * BLOCK_M
    h = hk * group + g
    qrows = m0 + gl.arange(0, BLOCK_M, layout=qry_layout)
    qok = qrows < seqlen_q
    lrow = b.to(gl.int64) * stride_lb + h.to(gl.int64) * stride_lh + (q_start + qrows)
    lse = gl.load(LSE + lrow, mask=qok, other=float("-inf"))
    delta = gl.load(DELTA + lrow, mask=qok, other=0.0)
    return gl.where(lse == float("-inf"), float("inf"), lse * LOG2E), delta


@gluon.jit
def _lse_delta_rows(LSE, DELTA, i, b, hk, group, q_start, mb_lo, n_mb, seqlen_q, stride_lb, stride_lh,
                    BLOCK_M: gl.constexpr, NW: gl.constexpr, BL_IDX=None, LIST_SUBS: gl.constexpr = 0):
    """:func:`_lse_delta` of iteration ``i`` in a 1-D layout over ``NW`` warps (a register or two a
    thread), to be staged in shared memory (``SWAP``)."""
    return _lse_delta(LSE, DELTA, i, b, hk, group, q_start, mb_lo, n_mb, seqlen_q, stride_lb, stride_lh, BLOCK_M,
                      gl.BlockedLayout([1], [32], [NW], [0]), BL_IDX, LIST_SUBS)


@gluon.jit
def _score_mma(kv_rows, tile, SWAP: gl.constexpr, KEYS: gl.constexpr, BLOCK_M: gl.constexpr,
               layout: gl.constexpr):
    """Issue (async) the score-shaped product of a query-side ring tile (Q or dO, ``[BLOCK_M, D]``)
    and this partition's key-side rows (K or V, ``[KEYS, D]``): ``S = Q K^T`` ``[BLOCK_M, KEYS]``,
    or with ``SWAP`` its transpose ``K Q^T`` ``[KEYS, BLOCK_M]`` (keys along the wgmma M)."""
    if SWAP:  # (one return: a jit function's returns must share a type, even across a constexpr branch)
        acc = warpgroup_mma(kv_rows, tile.permute((1, 0)), gl.zeros([KEYS, BLOCK_M], gl.float32, layout),
                            use_acc=False, is_async=True)
    else:
        acc = warpgroup_mma(tile, kv_rows.permute((1, 0)), gl.zeros([BLOCK_M, KEYS], gl.float32, layout),
                            use_acc=False, is_async=True)
    return acc


@gluon.jit
def _dq_wait_empty(dq_empty, i, NBAR: gl.constexpr, NW: gl.constexpr):
    """Compute side of the dQ hand-off, before iteration ``i`` stores its tile: the worker is done
    with tile ``i - 1``. mbarrier: phase ``(i & 1) ^ 1`` (the first wait passes at once); ``NBAR``:
    ``bar.sync`` on "empty" from ``i = 1`` on, meeting the worker's ``bar.arrive`` of iteration
    ``i - 1`` (iteration 0 has nothing to wait for and the worker never arrives for it)."""
    if NBAR:
        if i > 0:
            _named_barrier(_NBAR_SYNC_EMPTY, NW)
    else:
        mbarrier.wait(dq_empty, (i & 1) ^ 1)


@gluon.jit
def _dq_put_full(dq_full, NBAR: gl.constexpr, NW: gl.constexpr):
    """Compute side of the dQ hand-off, once this thread's part of the tile is stored (and fenced for
    the TMA): the worker may read it. mbarrier: one arrival (after a barrier of the partition);
    ``NBAR``: ``bar.arrive`` on "full" by every thread, no wait (the worker ``bar.sync`` s there)."""
    if NBAR:
        _named_barrier(_NBAR_ARRIVE_FULL, NW)
    else:
        mbarrier.arrive(dq_full)


@gluon.jit
def _bwd_ws_compute(k_smem, v_smem, q_bufs, do_bufs, p_smem, ds_smem, dq_smem, st_smem,
                    kv_bar, ld_full, ld_empty, dq_full, dq_empty,
                    DK, DV, LSE, DELTA, b, hk, group, q_start, k_start, n0, mb_lo, fu_lo, fu_hi, n_mb, total,
                    seqlen_q, seqlen_k, stride_dkb, stride_dks, stride_dkh, stride_lb, stride_lh,
                    qk_scale, cap_out, sm_scale, window_left, window_right,
                    WG: gl.constexpr, SPLIT: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr,
                    BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, HAS_WL: gl.constexpr,
                    HAS_WR: gl.constexpr, HAS_SOFTCAP: gl.constexpr, ATOMIC_DQ: gl.constexpr,
                    DEFER_DK: gl.constexpr, SWAP: gl.constexpr, DQ_TMA: gl.constexpr,
                    BL_IDX, MA0, MA1, MA2, LIST_SUBS: gl.constexpr, MASK_MOD: gl.constexpr,
                    STAT_RING: gl.constexpr = False, FOLD: gl.constexpr = False, NBAR: gl.constexpr = 0,
                    SA0=None, SA1=None, SA2=None, SCORE_MOD: gl.constexpr = None,
                    it0=0, kv_phase=0, kv_empty=None, PERSIST: gl.constexpr = False, ep_smem=None,
                    EPI: gl.constexpr = False, WS=None, part=0, TAIL: gl.constexpr = False):
    """Compute warps of the ws kernel: for each query block of the ring, the five products and
    the softmax recomputation, dK and dV in registers, the dQ tile left in ``dq_smem`` for the
    worker.

    ``SPLIT=False`` (kernel ``ws``): one partition of 8 warps (two warpgroups) over the whole key
    block; each warpgroup owns ``BLOCK_N / 2`` keys of dK / dV, dQ is split by columns (both read
    all of dS: a barrier of the 8 warps before it). ``SPLIT=True`` (``ws2``): this partition is
    warpgroup ``WG`` alone (4 warps) with keys ``n0 + WG * BLOCK_N / 2 ..``, its own P / dS tiles
    and its own dQ partial (dS over its keys times its K rows, in 64-column chunks), so the two
    warpgroups only meet at the ring and the worker's dQ hand-off, never at a barrier.
    ``DEFER_DK`` (ws, atomic dQ): dK's wgmma is issued after dQ's and dQ is waited for alone, so dK's
    wgmma runs under the dQ hand-off (the tile's stores, the proxy fence, the partition's barrier);
    with ``SWAP`` its register operand (dS^T) stays live until then. ``DQ_TMA``: the worker adds the dQ
    tile by TMA (a proxy fence after the stores).

    ``SWAP`` (FA3's ``SdP_swapAB``): the transposed tiles ``S^T = K Q^T`` and ``dP^T = V dO^T``,
    keys along the wgmma M dimension, each warpgroup its own 64 keys; ``P^T`` and ``dS^T`` then
    feed ``dV += P^T dO`` and ``dK += dS^T Q`` straight from registers (wgmma's register A
    operand: no P tile in shared memory, no barrier for it); only ``dS^T`` is stored, for
    ``dQ = dS K`` (read back transposed). lse and delta lie along the columns (a thread needs 16
    of each at 64 query rows): they are staged in shared memory (``st_smem``, two slots of the
    partition's four rows: the next block's loaded into a register a thread at the top of an
    iteration, stored before its barrier) and read right where they are used; with ``STAT_RING`` the
    worker leaves them in the ring slot beside Q and dO instead (no global load here), and with
    ``FOLD`` they are the starting values of the ``S^T`` / ``dP^T`` accumulators (read before the
    wgmmas are issued: ``P = exp2(scale * acc)``, ``dS = P * acc``).

    Block-list mode (``LIST_SUBS``, see :func:`attn_bwd_ws`): the query blocks come from the
    program's list at ``BL_IDX``; the masked ones evaluate ``MASK_MOD`` (arguments ``MA0..2``);
    ``SCORE_MOD`` (arguments ``SA0..2``), an additive flex score mod, applies to every block
    (:func:`_bwd_p`).

    ``NBAR`` (ws, atomic dQ): the dQ hand-off on named barriers: ``bar.sync`` on "empty" from the
    second iteration on where the ``dq_empty`` wait was, ``bar.arrive`` on "full" (no wait) where
    the ``dq_full`` arrival was, i.e. without that arrival's barrier of the 8 warps (protocol:
    :func:`attn_bwd_ws`). ``NBAR = 2``: also the ring slot's release at the end of the iteration,
    ``bar.arrive`` on the slot's named barrier (only if the worker refills the slot) in place of
    the ``ld_empty`` arrival and its barrier of the 8 warps.

    ``PERSIST`` (:func:`attn_bwd_ws_persistent`, one call per tile): ring slots, phases and the dQ
    hand-off's parities follow the program's iteration count ``it0 + i``; K / V are waited for at
    ``kv_phase`` and released on ``kv_empty`` once the tile's last wgmma retired, before dK / dV are
    stored (so the worker loads the next tile's K / V under the stores).

    ``EPI`` (not ``SPLIT``): dV and dK stored through ``ep_smem`` (:func:`_store_rows_smem`). ``TAIL``
    (persistent): with ``part >= 0`` the unit is part of a split tail tile (:func:`_bwd_unit`) and dK / dV
    are partials, added into that tile's fp32 workspace ``WS + part * 2 * BLOCK_N * BLOCK_D``
    (:func:`_add_dkdv`) instead of stored."""
    dtype: gl.constexpr = q_bufs.dtype
    NW: gl.constexpr = 4 if SPLIT else 8
    KEYS: gl.constexpr = BLOCK_N // 2 if SPLIT else BLOCK_N
    off = seqlen_k - seqlen_q
    SM: gl.constexpr = BLOCK_M // 16 if BLOCK_M // 16 < NW else NW
    SN: gl.constexpr = NW // SM
    KM: gl.constexpr = KEYS // 16 if KEYS // 16 < NW else NW
    KN: gl.constexpr = NW // KM
    # dQ in column chunks with SPLIT (a whole 64 x 128 fp32 partial beside dK and dV spills)
    DQ_CHUNK: gl.constexpr = BLOCK_D if not SPLIT or BLOCK_D <= 64 else 64
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[KM, KN],
                                                        instr_shape=[16, BLOCK_D // KN, 16])
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[SM, SN],
                                                        instr_shape=[16, DQ_CHUNK // SN, 16])
    if SWAP:
        # S^T / dP^T [KEYS, BLOCK_M]: rows split like dK / dV's (KN = 1), so that P^T and dS^T are
        # the A operands of dV / dK without moving between threads
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[KM, KN],
                                                           instr_shape=[16, BLOCK_M // KN, 16])
        a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
        qry_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
        key_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    else:
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[SM, SN],
                                                           instr_shape=[16, KEYS // SN, 16])
        qry_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
        key_layout: gl.constexpr = gl.SliceLayout(0, s_layout)
    EARLY_DP: gl.constexpr = not (HAS_SOFTCAP and BLOCK_D >= 128)
    DEFER: gl.constexpr = DEFER_DK and ATOMIC_DQ and BLOCK_D == DQ_CHUNK
    if SPLIT:
        k_w = k_smem.slice(WG * KEYS, KEYS, dim=0)
        v_w = v_smem.slice(WG * KEYS, KEYS, dim=0)
    else:
        k_w = k_smem
        v_w = v_smem
    p_w = p_smem.index(WG)
    ds_w = ds_smem.index(WG)
    dq_w = dq_smem.index(WG)
    kw0 = n0 + WG * KEYS

    keys = kw0 + gl.arange(0, KEYS, layout=key_layout)
    dk = gl.zeros([KEYS, BLOCK_D], gl.float32, kv_layout)
    dv = gl.zeros([KEYS, BLOCK_D], gl.float32, kv_layout)
    if SWAP and not STAT_RING:
        ST0: gl.constexpr = 4 * WG  # this partition's rows of st_smem: lse, delta of slot 0, then of slot 1
        lse_r, delta_r = _lse_delta_rows(LSE, DELTA, 0, b, hk, group, q_start, mb_lo, n_mb, seqlen_q, stride_lb,
                                         stride_lh, BLOCK_M, NW, BL_IDX, LIST_SUBS)
        st_smem.index(ST0).store(lse_r)
        st_smem.index(ST0 + 1).store(delta_r)
        gl.thread_barrier()
    elif not SWAP:
        lse2, delta = _lse_delta(LSE, DELTA, 0, b, hk, group, q_start, mb_lo, n_mb, seqlen_q, stride_lb, stride_lh,
                                 BLOCK_M, qry_layout, BL_IDX, LIST_SUBS)
    mbarrier.wait(kv_bar, kv_phase)
    for i in range(total):
        gi = it0 + i  # (the ring's iteration: it0 = 0 unless PERSIST)
        stage = gi % NUM_STAGES
        g = i // n_mb
        blk = mb_lo + i - g * n_mb
        q_buf = q_bufs.index(stage)
        do_buf = do_bufs.index(stage)
        masked = (blk < fu_lo) | (blk >= fu_hi)
        if LIST_SUBS:  # block-list mode: blk is the step of the list; its query rows and head
            m0 = _list_block(BL_IDX, blk, LIST_SUBS) * BLOCK_M
            hq = hk * group + g
        mbarrier.wait(ld_full.index(stage), (gi // NUM_STAGES) & 1)
        if FOLD:  # the accumulators start from -lse / scale and -delta (the worker's ring slot)
            acc0 = gl.zeros([KEYS, BLOCK_M], gl.float32, s_layout)
            s_row = gl.expand_dims(st_smem.index(2 * stage).load(qry_layout), 0)
            dp_row = gl.expand_dims(st_smem.index(2 * stage + 1).load(qry_layout), 0)
            # a broadcast, not zeros + row: ptxas keeps an FADD per register for the IEEE 0 + x
            s0, _ = gl.broadcast(s_row, acc0)
            dp0, _ = gl.broadcast(dp_row, acc0)
            s = warpgroup_mma(k_w, q_buf.permute((1, 0)), s0, is_async=True)
            dp = warpgroup_mma(v_w, do_buf.permute((1, 0)), dp0, is_async=True)
        else:
            s = _score_mma(k_w, q_buf, SWAP, KEYS, BLOCK_M, s_layout)
            if EARLY_DP:  # dP under the softmax
                dp = _score_mma(v_w, do_buf, SWAP, KEYS, BLOCK_M, s_layout)
        if SWAP:
            if STAT_RING:
                slot = 2 * stage  # lse and delta in the ring slot, beside Q and dO
            else:
                # the next block's lse and delta (the last iteration reloads its own into the other slot)
                lse_r, delta_r = _lse_delta_rows(LSE, DELTA, gl.minimum(i + 1, total - 1), b, hk, group, q_start,
                                                 mb_lo, n_mb, seqlen_q, stride_lb, stride_lh, BLOCK_M, NW, BL_IDX,
                                                 LIST_SUBS)
                slot = ST0 + 2 * (i & 1)
            if EARLY_DP:
                s = warpgroup_mma_wait(1, deps=(s,))
            else:
                s = warpgroup_mma_wait(0, deps=(s,))
            if FOLD:
                lse2 = 0.0  # (folded into s)
            else:
                lse2 = st_smem.index(slot).load(qry_layout)
            if LIST_SUBS:
                p, t = _bwd_p(s, lse2, keys, m0, masked, seqlen_k, off, window_left, window_right, qk_scale, cap_out,
                              HAS_WL, HAS_WR, HAS_SOFTCAP, BLOCK_M, qry_layout, True, MASK_MOD, b, hq, seqlen_q,
                              MA0, MA1, MA2, FOLDED=FOLD, SCORE_MOD=SCORE_MOD, SA0=SA0, SA1=SA1, SA2=SA2,
                              sm_scale=sm_scale)
            else:
                p, t = _bwd_p(s, lse2, keys, blk * BLOCK_M, masked, seqlen_k, off, window_left, window_right,
                              qk_scale, cap_out, HAS_WL, HAS_WR, HAS_SOFTCAP, BLOCK_M, qry_layout, True,
                              FOLDED=FOLD)
            pa = gl.convert_layout(p.to(dtype), a_layout)
            dv = warpgroup_mma(pa, do_buf, dv, is_async=True)
            if HAS_SOFTCAP:
                p = p * (1.0 - t * t)
            if EARLY_DP:
                dp = warpgroup_mma_wait(1, deps=(dp,))  # groups retire in order: dP done, dV may run
            else:
                dp = _score_mma(v_w, do_buf, SWAP, KEYS, BLOCK_M, s_layout)
                dp = warpgroup_mma_wait(0, deps=(dp,))
            if FOLD:
                ds = (p * dp).to(dtype)  # (dp started from -delta)
            else:
                delta = st_smem.index(slot + 1).load(qry_layout)
                ds = (p * (dp - gl.expand_dims(delta, 0))).to(dtype)
            ds_w.store(ds)
            dsa = gl.convert_layout(ds, a_layout)
            if not DEFER:
                dk = warpgroup_mma(dsa, q_buf, dk, is_async=True)
            if not STAT_RING:
                other = 2 * ST0 + 2 - slot  # the other slot: read after this iteration's barrier
                st_smem.index(other).store(lse_r)
                st_smem.index(other + 1).store(delta_r)
            fence_async_shared()
            gl.thread_barrier()  # (ws) dQ of either warpgroup reads the dS of both
            ds_t = ds_w.permute((1, 0))
        else:
            # the next iteration's lse and delta, loaded under the wgmmas (the last iteration reloads its own)
            lse2_n, delta_n = _lse_delta(LSE, DELTA, gl.minimum(i + 1, total - 1), b, hk, group, q_start, mb_lo,
                                         n_mb, seqlen_q, stride_lb, stride_lh, BLOCK_M, qry_layout, BL_IDX, LIST_SUBS)
            if EARLY_DP:
                s = warpgroup_mma_wait(1, deps=(s,))
            else:
                s = warpgroup_mma_wait(0, deps=(s,))
            p, t = _bwd_p(s, lse2, keys, blk * BLOCK_M, masked, seqlen_k, off, window_left, window_right,
                          qk_scale, cap_out, HAS_WL, HAS_WR, HAS_SOFTCAP, BLOCK_M, qry_layout)
            p_w.store(p.to(dtype))
            fence_async_shared()
            gl.thread_barrier()  # all of P in shared memory before the wgmma reads it (this partition's warps)
            dv = warpgroup_mma(p_w.permute((1, 0)), do_buf, dv, is_async=True)
            if HAS_SOFTCAP:
                p = p * (1.0 - t * t)
            if EARLY_DP:
                dp = warpgroup_mma_wait(1, deps=(dp,))
            else:
                dp = _score_mma(v_w, do_buf, SWAP, KEYS, BLOCK_M, s_layout)
                dp = warpgroup_mma_wait(0, deps=(dp,))
            ds = p * (dp - gl.expand_dims(delta, 1))
            ds_w.store(ds.to(dtype))
            fence_async_shared()
            gl.thread_barrier()  # (ws) dQ of either warpgroup reads the dS of both
            ds_t = ds_w
            if not DEFER:
                dk = warpgroup_mma(ds_w.permute((1, 0)), q_buf, dk, is_async=True)
            lse2 = lse2_n
            delta = delta_n
        # ds_t: dS [BLOCK_M, KEYS] in shared memory (a view); dK has been issued unless DEFER
        if ATOMIC_DQ and BLOCK_D == DQ_CHUNK:
            dq = warpgroup_mma(ds_t, k_w, gl.zeros([BLOCK_M, BLOCK_D], gl.float32, dq_layout), use_acc=False,
                               is_async=True)
            if DEFER:
                if SWAP:  # (dS^T from registers: they stay live until dK's wgmma retired)
                    dk = warpgroup_mma(dsa, q_buf, dk, is_async=True)
                else:
                    dk = warpgroup_mma(ds_w.permute((1, 0)), q_buf, dk, is_async=True)
                _dq_wait_empty(dq_empty, gi, NBAR, NW)  # the worker is done with the previous dQ tile
                if SWAP:
                    dq, dv, pa = warpgroup_mma_wait(1, deps=(dq, dv, pa))  # dV and dQ retired, dK may still run
                else:
                    dq, dv = warpgroup_mma_wait(1, deps=(dq, dv))  # dV and dQ retired, dK may still run
                dq_w.store(dq)
                if DQ_TMA:
                    fence_async_shared()
                _dq_put_full(dq_full, NBAR, NW)
                if SWAP:
                    dk, dsa = warpgroup_mma_wait(0, deps=(dk, dsa))
                else:
                    dk = warpgroup_mma_wait(0, deps=(dk,))
            else:
                _dq_wait_empty(dq_empty, gi, NBAR, NW)  # the worker is done with the previous dQ tile
                if SWAP:
                    dq, dv, dk, pa, dsa = warpgroup_mma_wait(0, deps=(dq, dv, dk, pa, dsa))
                else:
                    dq, dv, dk = warpgroup_mma_wait(0, deps=(dq, dv, dk))
                dq_w.store(dq)
                if DQ_TMA:
                    fence_async_shared()  # generic-proxy stores before the TMA unit reads the tile
                # (mbarrier: lowered after a barrier of the partition, so the whole tile is stored;
                # NBAR: each thread's own stores, the worker's bar.sync waits for all 256 threads)
                _dq_put_full(dq_full, NBAR, NW)
        elif ATOMIC_DQ:
            mbarrier.wait(dq_empty, (gi & 1) ^ 1)  # the worker is done with the previous dQ tiles
            for c in gl.static_range(BLOCK_D // DQ_CHUNK):
                dq = warpgroup_mma(ds_t, k_w.slice(c * DQ_CHUNK, DQ_CHUNK, dim=1),
                                   gl.zeros([BLOCK_M, DQ_CHUNK], gl.float32, dq_layout), use_acc=False, is_async=True)
                dq = warpgroup_mma_wait(0, deps=(dq,))
                dq_w.slice(c * DQ_CHUNK, DQ_CHUNK, dim=1).store(dq)
            if DQ_TMA:
                fence_async_shared()
            mbarrier.arrive(dq_full)  # one of the arrivals the worker waits for
            if SWAP:
                dv, dk, pa, dsa = warpgroup_mma_wait(0, deps=(dv, dk, pa, dsa))
            else:
                dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
        else:
            if SWAP:
                dv, dk, pa, dsa = warpgroup_mma_wait(0, deps=(dv, dk, pa, dsa))
            else:
                dv, dk = warpgroup_mma_wait(0, deps=(dv, dk))
        # Q and dO (and with STAT_RING the stats) of this slot are no longer read by this partition: every
        # wgmma reading them retired above, the stats loaded
        if NBAR == 2:
            if i + NUM_STAGES < total:  # (only where the worker refills the slot: it bar.syncs there)
                _ring_barrier(_NBAR_ARRIVE_RING, stage, NUM_STAGES, NW)
        else:
            mbarrier.arrive(ld_empty.index(stage))  # (lowered after a barrier of the partition)
    if PERSIST:
        mbarrier.arrive(kv_empty)  # every wgmma reading K / V retired (the loop's last wait)
    kv_off = b.to(gl.int64) * stride_dkb + hk.to(gl.int64) * stride_dkh
    gl.static_assert(not EPI or not SPLIT, "epi: the ws kernel's one compute partition")
    if TAIL and part >= 0:
        _add_dkdv(WS + part.to(gl.int64) * (2 * BLOCK_N * BLOCK_D), dk, dv, sm_scale, kw0 - n0, BLOCK_N, BLOCK_D,
                  KEYS, kv_layout)
    else:
        _store_dkdv(DK, DV, kv_off, dk, dv, sm_scale, ep_smem, ep_smem, k_start + kw0, seqlen_k - kw0, stride_dks,
                    HEAD_DIM, KEYS, BLOCK_D, kv_layout, NW, EPI)


@gluon.jit
def _ws_buffers(q_desc, NT: gl.constexpr, KEYS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                BLOCK_D: gl.constexpr, NUM_STAGES: gl.constexpr, SWAP: gl.constexpr, ATOMIC_DQ: gl.constexpr,
                DQ_TMA: gl.constexpr, STAT_RING: gl.constexpr, ST_ROWS: gl.constexpr, EPI: gl.constexpr):
    """Shared memory and mbarriers of the ws kernels (:func:`attn_bwd_ws`, :func:`attn_bwd_ws_persistent`),
    allocated and initialised: ``(k_smem, v_smem, q_bufs, do_bufs, p_smem, ds_smem, dq_smem, st_smem,
    kv_bar, ld_full, ld_empty, dq_full, dq_empty, ep_smem)`` for ``NT`` compute partitions of ``KEYS`` keys
    each and ``ST_ROWS`` rows of staged softmax statistics; ``ep_smem``: with ``EPI`` the dK / dV staging
    tile ``[BLOCK_N, BLOCK_D]`` (:func:`_store_rows_smem`), else ``ds_smem`` again (unused)."""
    dtype: gl.constexpr = q_desc.dtype
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=q_desc.layout.swizzle_byte_width,
                                                     element_bitwidth=dtype.primitive_bitwidth, rank=2)
    if DQ_TMA:
        # dQ tile(s) in the TMA tile layout (128-byte swizzle: the wgmma-layout stores are free of
        # bank conflicts too)
        dq_slayout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=32, rank=2)
    else:
        # dQ tile(s): 16-byte groups of a row permuted by the row index (8 rows a period), so that
        # both the wgmma-layout stores and the 4-column row reads of the worker are free of bank
        # conflicts
        dq_slayout: gl.constexpr = gl.SwizzledSharedLayout(vec=4, per_phase=1, max_phase=8, order=[1, 0])
    k_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_D], smem_layout)
    v_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_D], smem_layout)
    q_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, BLOCK_D], smem_layout)
    do_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_M, BLOCK_D], smem_layout)
    if SWAP:  # dS^T only (P^T stays in registers); p_smem is not read
        ds_smem = gl.allocate_shared_memory(dtype, [NT, KEYS, BLOCK_M],
                                            gl.NVMMASharedLayout.get_default_for([KEYS, BLOCK_M], dtype))
        p_smem = ds_smem
    else:
        ps_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, KEYS], dtype)
        p_smem = gl.allocate_shared_memory(dtype, [NT, BLOCK_M, KEYS], ps_layout)
        ds_smem = gl.allocate_shared_memory(dtype, [NT, BLOCK_M, KEYS], ps_layout)
    dq_smem = gl.allocate_shared_memory(gl.float32, [NT, BLOCK_M if ATOMIC_DQ else 8, BLOCK_D], dq_slayout)
    st_smem = gl.allocate_shared_memory(gl.float32, [ST_ROWS, BLOCK_M],
                                        gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0]))
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ld_full = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    ld_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    dq_full = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    dq_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    mbarrier.init(dq_full, count=NT)  # one arrival per compute partition
    mbarrier.init(dq_empty, count=1)
    for st in gl.static_range(NUM_STAGES):
        mbarrier.init(ld_full.index(st), count=2 if STAT_RING else 1)  # (the TMA's expect, the stats' arrival)
        mbarrier.init(ld_empty.index(st), count=NT)
    if EPI:
        ep_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_D], smem_layout)
    else:
        ep_smem = ds_smem  # (not used: a jit function returns no None inside a tuple)
    return (k_smem, v_smem, q_bufs, do_bufs, p_smem, ds_smem, dq_smem, st_smem, kv_bar, ld_full, ld_empty, dq_full,
            dq_empty, ep_smem)


@gluon.jit(do_not_specialize=_NO_SPECIALIZE)
def attn_bwd_ws(
    q_desc, k_desc, v_desc, do_desc, dq_desc, DQ, DK, DV, LSE, DELTA, CU_Q, CU_K,
    stride_dqb, stride_dqs, stride_dqh, stride_dkb, stride_dks, stride_dkh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, group, qk_scale, cap_out, sm_scale, window_left, window_right,
    HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    NUM_STAGES: gl.constexpr, HAS_WL: gl.constexpr, HAS_WR: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
    IS_VARLEN: gl.constexpr, ATOMIC_DQ: gl.constexpr, WORKER_REGS: gl.constexpr, RED_ROWS: gl.constexpr,
    num_warps: gl.constexpr, DEFER_DK: gl.constexpr = False, SPLIT: gl.constexpr = False,
    COMPUTE_REGS: gl.constexpr = 240, SWAP: gl.constexpr = False, DQ_TMA: gl.constexpr = False,
    LPT: gl.constexpr = False, BL_CNT=None, BL_IDX=None, bl_sb=None, bl_sh=None, bl_w=None, MA0=None, MA1=None,
    MA2=None, LIST_SUBS: gl.constexpr = 0, MASK_MOD: gl.constexpr = None, STAT_RING: gl.constexpr = False,
    FOLD: gl.constexpr = False, stat_mul=1.0, NBAR: gl.constexpr = 0, SA0=None, SA1=None, SA2=None,
    SCORE_MOD: gl.constexpr = None, EPI: gl.constexpr = False,
):
    """Warp-specialised backward, same arguments and semantics as :func:`attn_bwd` plus ``dq_desc``
    after ``do_desc`` (None without ``DQ_TMA``; a leading argument, so that a prepared launch passes
    it per call with the per-call accumulator: ``launch_bwd``'s plans) (grid
    ``(cdiv(max_seqlen_k, BLOCK_N), Hk, B or nseq)``), and a worker warpgroup (4 more warps,
    ``WORKER_REGS`` registers) that issues the TMA loads and adds the dQ tiles into ``DQ``.
    ``SPLIT=False`` (``ws``): ``num_warps = 8``, the two compute warpgroups in the default
    partition (they get the rest of the register file). ``SPLIT=True`` (``ws2``): ``num_warps =
    4``, compute warpgroup 0 in the default partition and warpgroup 1 in a worker partition with
    ``COMPUTE_REGS`` registers, each over half of the keys with its own dQ partial; the worker adds
    the two partials (see :func:`_bwd_ws_compute`). ``SWAP``: the transposed score tiles (P^T and
    dS^T as register operands; see :func:`_bwd_ws_compute`). ``DQ_TMA``: the worker adds each dQ
    tile by TMA reduce-add through ``dq_desc`` (fp32 ``[BLOCK_M, BLOCK_D]`` blocks of ``DQ``) instead
    of vector atomics. ``LPT``: the grid order of :func:`attn_bwd`'s ``LPT``. ``EPI`` (not ``SPLIT``):
    dV and dK stored through a staging tile of their own (:func:`_store_rows_smem`).

    Block-list mode (``LIST_SUBS > 0``; a flex block mask with ``BLOCK_SIZE = BLOCK_N``, dense, with
    ``SWAP``, not ``SPLIT`` / ``LPT``): the query blocks of key block ``pid_n`` are those of the
    block mask's transposed lists, merged on the host (``launch_bwd.flex_lists``): list row ``r =
    b * bl_sb + h * bl_sh + pid_n`` (``h`` the group's first query head; ``bl_sh = 0`` or ``group =
    1``) has ``BL_CNT[2r]`` full then ``BL_CNT[2r + 1]`` blocks in all at ``BL_IDX + r * bl_w``, each
    block-mask query block ``LIST_SUBS = BLOCK_SIZE / BLOCK_M`` steps of ``BLOCK_M`` rows; the loads,
    the compute and the dQ reductions walk the same steps (:func:`_step_block`). Full blocks take no
    mask; the others (and every block of a ragged key block) evaluate ``MASK_MOD(b, h, q, kv, MA0,
    MA1, MA2)`` in place of the causal / window rule (``HAS_WL`` / ``HAS_WR`` off). ``SCORE_MOD``
    (block-list mode only, no softcap; arguments ``SA0..2``): a flex score mod whose derivative in
    the score is 1 (an added bias: ALiBi, a bias table), on every block's natural-unit scores
    before the exponent, as the forward's (whose lse includes it); dS is unchanged.

    ``NBAR`` (``HopperBwdConfig.nbar``; ws, not ``SPLIT``, with ``ATOMIC_DQ``, else off): the dQ
    hand-off between the compute warps and the worker on two hardware named barriers of
    ``NBAR_THREADS = 384`` threads (the 256 compute and 128 worker threads; ids ``NBAR_FULL`` /
    ``NBAR_EMPTY``) in place of the ``dq_full`` / ``dq_empty`` mbarriers, whose arrival costs the
    8 compute warps a barrier of their partition each iteration. Protocol, iteration ``i`` of
    ``total``:

    * compute: if ``i > 0``, ``bar.sync EMPTY`` (the worker has read tile ``i - 1``); wait for the
      wgmmas; store tile ``i`` into ``dq_smem`` (``DQ_TMA``: then ``fence.proxy.async``, each
      thread for its own stores); ``bar.arrive FULL`` (no wait).
    * worker: ``bar.sync FULL`` (every compute thread stored and fenced tile ``i``); add the tile
      (TMA reduce-add and ``tma.store_wait(0)``: the TMA unit has read it; or the vector atomics,
      whose shared-memory loads come before them); if ``i + 1 < total``, ``bar.arrive EMPTY``.

    Each barrier sees exactly ``total`` (FULL) and ``total - 1`` (EMPTY) generations, every one
    completed by one side's arrive and the other's sync (a thread arrives on a barrier at most once
    per generation: the two barriers alternate, each side's next arrival on one needs the other's
    completion of the other), and none are left pending at exit, ``total = 0`` included (no
    operation at all). ``bar.arrive`` / ``bar.sync`` order each thread's earlier shared-memory
    accesses before the barrier's completion (the PTX producer / consumer pattern), and the asm is
    not moved across the partition's memory operations (:func:`_named_barrier`).

    ``NBAR = 2`` (same conditions): also the ring's "slot empty" releases, slot ``s`` on named
    barrier ``NBAR_RING_END - NUM_STAGES + s`` (12 and 13 at two stages; ``num_stages <= 11``,
    static_asserted) of the same 384 threads, in place of the ``ld_empty`` mbarriers (left unused;
    the ``ld_full`` side, TMA transaction counts and the stats' arrival, stays on mbarriers).
    Iteration ``i`` of ``total``, slot ``s = i % NUM_STAGES``:

    * compute, at the end of the iteration: if ``i + NUM_STAGES < total``, ``bar.arrive`` on slot
      ``s``'s barrier (no wait). That is after the last ``warpgroup_mma_wait`` of the iteration,
      which retires every wgmma reading ``q_buf`` / ``do_buf`` (S, dP, dV, dK; wgmma reads are
      asynchronous: the release must not come before that wait), and after every read of the
      slot's ``st_smem`` rows (``STAT_RING``: lse / delta, loaded into registers before the wgmmas
      with ``FOLD``, mid-iteration without): the place of the ``ld_empty`` arrival.
    * worker, at iteration ``i``, before refilling the slot with iteration ``nxt = i + NUM_STAGES``
      (only if ``nxt < total``): ``bar.sync`` on slot ``s``'s barrier, then the TMA loads (and with
      ``STAT_RING`` the stats' stores into the slot's ``st_smem`` rows and the second ``ld_full``
      arrival).

    Arrivals and syncs match one to one: both sides act exactly for the iterations ``i`` with
    ``i + NUM_STAGES < total`` (``max(total - NUM_STAGES, 0)`` generations over the slots, none
    when ``total <= NUM_STAGES``, ``total = 0`` included), so nothing is pending at exit. A thread
    never arrives twice in one generation of a slot's barrier: the compute's next arrival on slot
    ``s`` (iteration ``i + NUM_STAGES``) comes after its wait on ``ld_full`` for that iteration,
    whose TMA the worker issues only after its ``bar.sync`` completed the generation of iteration
    ``i``. Deadlock freedom is the mbarrier protocol's (same places, same conditions; the worker's
    sync for ``i`` needs only compute iteration ``i`` done, which needs the worker's iterations
    ``< i``). The 8 compute warps no longer meet at the end of the iteration, but still at the loop
    head: Triton 3.6 puts a barrier of the partition before the ``ld_full`` wait (seen in the PTX /
    SASS of every variant, with or without NBAR), and that barrier is what now orders one
    warpgroup's dQ wgmma reads of ``ds_smem`` (both halves of dS) before the other warpgroup's dS
    stores of the next iteration (the ``ld_empty`` arrival's barrier did too). Check it is there
    after a Triton upgrade."""
    pid_n, hk, b, q_start, k_start, seqlen_q, seqlen_k = _tile_coords(CU_Q, CU_K, seqlen_q, seqlen_k, False,
                                                                      IS_VARLEN, LPT)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen_k:
        return
    off = seqlen_k - seqlen_q
    NT: gl.constexpr = 2 if SPLIT else 1  # compute partitions: P / dS / dQ tiles, and arrivals per barrier
    KEYS: gl.constexpr = BLOCK_N // NT
    # SWAP: lse / delta rows staged for the compute partitions (two slots of two rows each), or
    # (STAT_RING) two rows per ring slot, filled by the worker
    ST_ROWS: gl.constexpr = 2 * NUM_STAGES if STAT_RING else (4 * NT if SWAP else 1)
    (k_smem, v_smem, q_bufs, do_bufs, p_smem, ds_smem, dq_smem, st_smem, kv_bar, ld_full, ld_empty, dq_full,
     dq_empty, ep_smem) = _ws_buffers(q_desc, NT, KEYS, BLOCK_M, BLOCK_N, BLOCK_D, NUM_STAGES, SWAP, ATOMIC_DQ,
                                      DQ_TMA, STAT_RING, ST_ROWS, EPI and not SPLIT)  # fmt: skip

    gl.static_assert(not STAT_RING or (SWAP and not SPLIT), "stat_ring / fold: the ws kernel with swap")
    gl.static_assert(
        not NBAR or (not SPLIT and num_warps == 8 and NBAR_THREADS == 32 * (num_warps + 4)),
        "nbar: the ws kernel (8 compute warps, a 4-warp worker)",
    )
    gl.static_assert(NBAR == 0 or NBAR == 1 or NBAR == 2, "nbar: 0, 1 or 2")
    gl.static_assert(NBAR != 2 or NBAR_RING_END - NUM_STAGES >= NBAR_RING_MIN,
                     "nbar = 2: one named barrier per ring slot, ids 3..13: num_stages <= 11")
    NB: gl.constexpr = NBAR if ATOMIC_DQ else 0  # (no hand-off without atomic dQ)
    gl.static_assert(not FOLD or (STAT_RING and not HAS_SOFTCAP), "fold: with stat_ring, without softcap")
    gl.static_assert(SCORE_MOD is None or (LIST_SUBS > 0 and not HAS_SOFTCAP),
                     "score_mod: block-list mode, without softcap")
    if LIST_SUBS:
        gl.static_assert(SWAP and not SPLIT and not LPT and not IS_VARLEN,
                         "block-list mode: the SWAP ws kernel, dense calls, grid (key blocks, heads, batch)")
        # steps [0, fu_hi) of the list are full blocks, the rest masked; steps per query head n_mb
        row = b * bl_sb + (hk * group) * bl_sh + pid_n
        n_f = gl.load(BL_CNT + 2 * row)
        n_all = gl.load(BL_CNT + 2 * row + 1) * LIST_SUBS
        total = n_all * group
        n_mb = gl.maximum(n_all, 1)  # (the prologue's iteration 0 divides by it when the list is empty)
        BL_IDX = BL_IDX + row.to(gl.int64) * bl_w
        mb_lo = n_f * 0
        fu_lo = n_f * 0
        fu_hi = n_f * LIST_SUBS
        if n0 + BLOCK_N > seqlen_k:
            fu_hi = fu_lo  # ragged key block: every block takes the masked path (keys past the end)
    else:
        c_hi = gl.minimum(n0 + BLOCK_N, seqlen_k)
        mb_lo, fu_lo, fu_hi, mb_hi = _block_range(n0, c_hi, seqlen_q, -off, window_right, window_left,
                                                  HAS_WR, HAS_WL, BLOCK_M)
        if n0 + BLOCK_N > seqlen_k:
            fu_hi = fu_lo  # ragged key block: every query block takes the masked path (see attn_bwd)
        n_mb = mb_hi - mb_lo
        total = n_mb * group
    # (tuples spelled out in the call, one list per partition count: see fwd.attn_fwd_ws)
    if SPLIT:
        gl.warp_specialize([
            (_bwd_ws_compute, (k_smem, v_smem, q_bufs, do_bufs, p_smem, ds_smem, dq_smem, st_smem,
                               kv_bar, ld_full, ld_empty, dq_full, dq_empty,
                               DK, DV, LSE, DELTA, b, hk, group, q_start, k_start, n0, mb_lo, fu_lo, fu_hi, n_mb,
                               total, seqlen_q, seqlen_k, stride_dkb, stride_dks, stride_dkh, stride_lb, stride_lh,
                               qk_scale, cap_out, sm_scale, window_left, window_right,
                               0, True, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR, HAS_SOFTCAP,
                               ATOMIC_DQ, False, SWAP, DQ_TMA, BL_IDX, MA0, MA1, MA2, LIST_SUBS, MASK_MOD)),
            (_bwd_ws_compute, (k_smem, v_smem, q_bufs, do_bufs, p_smem, ds_smem, dq_smem, st_smem,
                               kv_bar, ld_full, ld_empty, dq_full, dq_empty,
                               DK, DV, LSE, DELTA, b, hk, group, q_start, k_start, n0, mb_lo, fu_lo, fu_hi, n_mb,
                               total, seqlen_q, seqlen_k, stride_dkb, stride_dks, stride_dkh, stride_lb, stride_lh,
                               qk_scale, cap_out, sm_scale, window_left, window_right,
                               1, True, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR, HAS_SOFTCAP,
                               ATOMIC_DQ, False, SWAP, DQ_TMA, BL_IDX, MA0, MA1, MA2, LIST_SUBS, MASK_MOD)),
            (_bwd_ws_worker, (q_desc, k_desc, v_desc, do_desc, k_smem, v_smem, q_bufs, do_bufs, dq_smem,
                              kv_bar, ld_full, ld_empty, dq_full, dq_empty, DQ, b, hk, group, q_start, k_start, n0,
                              mb_lo, n_mb, total, stride_dqb, stride_dqs, stride_dqh,
                              BLOCK_M, BLOCK_D, NUM_STAGES, IS_VARLEN, ATOMIC_DQ, RED_ROWS, 4, 2, dq_desc, DQ_TMA,
                              BL_IDX, LIST_SUBS, LSE, DELTA, st_smem, seqlen_q, stride_lb, stride_lh, stat_mul,
                              False, False)),
        ], [4, 4], [COMPUTE_REGS, WORKER_REGS])
    else:
        gl.warp_specialize([
            (_bwd_ws_compute, (k_smem, v_smem, q_bufs, do_bufs, p_smem, ds_smem, dq_smem, st_smem,
                               kv_bar, ld_full, ld_empty, dq_full, dq_empty,
                               DK, DV, LSE, DELTA, b, hk, group, q_start, k_start, n0, mb_lo, fu_lo, fu_hi, n_mb,
                               total, seqlen_q, seqlen_k, stride_dkb, stride_dks, stride_dkh, stride_lb, stride_lh,
                               qk_scale, cap_out, sm_scale, window_left, window_right,
                               0, False, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR, HAS_SOFTCAP,
                               ATOMIC_DQ, DEFER_DK, SWAP, DQ_TMA, BL_IDX, MA0, MA1, MA2, LIST_SUBS, MASK_MOD,
                               STAT_RING, FOLD, NB, SA0, SA1, SA2, SCORE_MOD, 0, 0, None, False, ep_smem, EPI)),
            (_bwd_ws_worker, (q_desc, k_desc, v_desc, do_desc, k_smem, v_smem, q_bufs, do_bufs, dq_smem,
                              kv_bar, ld_full, ld_empty, dq_full, dq_empty, DQ, b, hk, group, q_start, k_start, n0,
                              mb_lo, n_mb, total, stride_dqb, stride_dqs, stride_dqh,
                              BLOCK_M, BLOCK_D, NUM_STAGES, IS_VARLEN, ATOMIC_DQ, RED_ROWS, 4, 1, dq_desc, DQ_TMA,
                              BL_IDX, LIST_SUBS, LSE, DELTA, st_smem, seqlen_q, stride_lb, stride_lh, stat_mul,
                              STAT_RING, FOLD, NB)),
        ], [4], [WORKER_REGS])


# ---------------------------------------------------------------------------------------
# persistent ws backward (HopperBwdConfig.persistent: the d96 / d128 default for dense calls)
# ---------------------------------------------------------------------------------------


@gluon.jit
def _bwd_tile(t, n_kb, n_hk, n_tiles, head_group, seqlen_q, seqlen_k, window_left, window_right,
              HAS_WL: gl.constexpr, HAS_WR: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr):
    """Tile ``t`` of a persistent program: ``(b, hk, n0, mb_lo, fu_lo, fu_hi, n_mb)``, the query-block
    range of :func:`attn_bwd_ws` (a ragged last key block takes the masked path). The (batch, KV head)
    pairs go in groups of ``head_group`` (the last one may be smaller); within a group the key block
    is the slow index and the pair the fast one, so a causal call's long tiles (key block 0) of the
    group's heads come first. ``head_group = 1``: :func:`attn_bwd_ws`'s grid order (key block fastest,
    then the KV head, then the batch)."""
    n_bh = n_tiles // n_kb
    per = head_group * n_kb
    g = t // per
    r = t - g * per
    size = gl.minimum(head_group, n_bh - g * head_group)
    pid_n = r // size
    bh = g * head_group + (r - pid_n * size)
    hk = bh % n_hk
    b = bh // n_hk
    n0 = pid_n * BLOCK_N
    off = seqlen_k - seqlen_q
    c_hi = gl.minimum(n0 + BLOCK_N, seqlen_k)
    mb_lo, fu_lo, fu_hi, mb_hi = _block_range(n0, c_hi, seqlen_q, -off, window_right, window_left,
                                              HAS_WR, HAS_WL, BLOCK_M)
    if n0 + BLOCK_N > seqlen_k:
        fu_hi = fu_lo
    return b, hk, n0, mb_lo, fu_lo, fu_hi, mb_hi - mb_lo


#: bits of a tail piece's code (:func:`_tail_code`): its first and end query block within the tile
#: (``sched.TAIL_BITS``, which the host's rule checks the query blocks against)
TAIL_BITS: gl.constexpr = gl.constexpr(_SCHED_TAIL_BITS)


@gluon.jit
def _tail_code(t, sub, t_full, n_split, split_mb):
    """Worker of :func:`attn_bwd_ws_persistent` with ``TAIL``: the unit code of part ``sub`` (0 or 1) of
    ticket ``t`` and whether the ticket has a part after it. Tickets below ``t_full`` are whole tiles
    (code ``t``); ticket ``t_full + p`` (``p < nprog``) is piece ``p`` of the tail: the ``p``-th of
    ``nprog`` equal ranges of the ``n_split * split_mb`` query blocks of the last ``n_split`` tiles
    taken one after another, so it spans the end of one tile and maybe the start of the next (two
    parts). A part's code is ``t_full + (j << 22 | lo << 11 | hi)``: query blocks ``[lo, hi)`` of tile
    ``t_full + j``. Mirrors ``sched.tail_parts``."""
    p = t - t_full
    nprog = gl.num_programs(0)
    w = n_split * split_mb
    a = p * w // nprog
    e = (p + 1) * w // nprog
    j = a // split_mb
    end = (j + 1) * split_mb
    lo = a - j * split_mb
    hi = gl.minimum(e, end) - j * split_mb
    if sub > 0:
        j = j + 1
        lo = lo * 0
        hi = e - end
    code = t_full + ((j << (2 * TAIL_BITS)) | (lo << TAIL_BITS) | hi)
    more = (sub == 0) & (e > end)
    if t < t_full:
        code = t
        more = sub < 0
    return code, more


@gluon.jit
def _bwd_unit(code, t_full, n_kb, n_hk, n_tiles, head_group, seqlen_q, seqlen_k, window_left, window_right,
              HAS_WL: gl.constexpr, HAS_WR: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
              TAIL: gl.constexpr):
    """A persistent program's unit of work from its code: :func:`_bwd_tile`'s ``(b, hk, n0, mb_lo, fu_lo,
    fu_hi, n_mb)`` plus ``part``: -1 for a whole tile, else (``TAIL``, a code ``>= t_full`` from
    :func:`_tail_code`) the index ``j`` of the tail tile whose query blocks ``[lo, hi)`` it covers (the
    range restricted to them; dK / dV are partials, added into the tail's workspace)."""
    tile = code
    part = code * 0 - 1
    lo = part * 0
    hi = lo
    if TAIL:
        if code >= t_full:
            x = code - t_full
            part = x >> (2 * TAIL_BITS)
            lo = (x >> TAIL_BITS) & ((1 << TAIL_BITS) - 1)
            hi = x & ((1 << TAIL_BITS) - 1)
            tile = t_full + part
    b, hk, n0, mb_lo, fu_lo, fu_hi, n_mb = _bwd_tile(tile, n_kb, n_hk, n_tiles, head_group, seqlen_q, seqlen_k,
                                                     window_left, window_right, HAS_WL, HAS_WR, BLOCK_M, BLOCK_N)
    if TAIL:
        if part >= 0:
            r_lo = mb_lo + lo
            r_hi = mb_lo + hi
            fu_lo = gl.minimum(gl.maximum(fu_lo, r_lo), r_hi)
            fu_hi = gl.minimum(gl.maximum(fu_hi, fu_lo), r_hi)
            mb_lo = r_lo
            n_mb = hi - lo
    return b, hk, n0, mb_lo, fu_lo, fu_hi, n_mb, part


@gluon.jit
def _add_dkdv(WS, dk, dv, sm_scale, row0, BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr, KEYS: gl.constexpr,
              layout: gl.constexpr):
    """A tail part's dK / dV partials (``[KEYS, BLOCK_D]`` fp32 in the wgmma ``layout``, rows ``row0 ..`` of
    the tile) added into its workspace tile ``WS`` (``[2, BLOCK_N, BLOCK_D]`` fp32: dV, then dK already
    scaled by ``sm_scale``) with ``red.global.add.v2.f32`` (a thread's accumulator registers come in
    pairs of neighbouring columns)."""
    r = row0 + gl.arange(0, KEYS, layout=gl.SliceLayout(1, layout))
    c = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, layout))
    offs = gl.expand_dims(r * BLOCK_D, 1) + gl.expand_dims(c, 0)
    for which in gl.static_range(2):
        if which == 0:
            x = dv
        else:
            x = dk * sm_scale
        ptrs = WS + which * (BLOCK_N * BLOCK_D) + offs
        gl.inline_asm_elementwise(
            "red.relaxed.gpu.global.add.v2.f32 [$2], {$4, $5};\n\tmov.b32 $0, 0;\n\tmov.b32 $1, 0;",
            "=r,=r,l,l,f,f", [ptrs.to(gl.int64), x], dtype=gl.int32, is_pure=False, pack=2)


@gluon.jit
def _stamp(TRACE_BUF, TRACE_CAP, k, field: gl.constexpr, value, NW: gl.constexpr):
    """Debug (``TRACE``): field ``field`` of the program's ``k``-th unit (the last row once ``k >=
    TRACE_CAP``), ``TRACE_BUF[(pid * TRACE_CAP + k) * 6 + field] = value`` (int64), or with ``value = None``
    the SM's global timer in ns (``%globaltimer``), written by every thread of the partition (the same
    value)."""
    slot = (gl.program_id(0) * TRACE_CAP + gl.minimum(k, TRACE_CAP - 1)) * 6 + field
    lay: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
    z = gl.full([1], 0, gl.int64, lay)
    if value is None:
        x = gl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,l", [z], dtype=gl.int64, is_pure=False,
                                      pack=1)
    else:
        x = z + value
    gl.store(TRACE_BUF + slot + gl.arange(0, 1, lay), x)


@gluon.jit
def _take_tile(tile_smem, tile_full, tile_empty, k, NW: gl.constexpr):
    """Compute side of the tile hand-off: the index of the program's ``k``-th tile, left in ``tile_smem``
    by the worker (``tile_full``), then released to it (``tile_empty``)."""
    mbarrier.wait(tile_full, k & 1)
    t = gl.max(tile_smem.load(gl.BlockedLayout([1], [32], [NW], [0])), 0)
    mbarrier.arrive(tile_empty)
    return t


@gluon.jit
def _give_tile(tile_smem, tile_full, tile_empty, t, k, WORKER_WARPS: gl.constexpr):
    """Worker side of the tile hand-off: publish ``t`` as the program's ``k``-th tile once the compute
    warps took the ``k - 1``-th."""
    if k > 0:
        mbarrier.wait(tile_empty, (k - 1) & 1)
    tile_smem.store(gl.full([1], t, gl.int32, gl.BlockedLayout([1], [32], [WORKER_WARPS], [0])))
    mbarrier.arrive(tile_full)  # (after a barrier of the worker's warps: the store is done)


@gluon.jit
def _bwd_ws_compute_tiles(k_smem, v_smem, q_bufs, do_bufs, p_smem, ds_smem, dq_smem, st_smem,
                          kv_bar, ld_full, ld_empty, dq_full, dq_empty, kv_empty, tile_smem, tile_full, tile_empty,
                          DK, DV, LSE, DELTA, group, seqlen_q, seqlen_k, stride_dkb, stride_dks, stride_dkh,
                          stride_lb, stride_lh, qk_scale, cap_out, sm_scale, window_left, window_right,
                          n_kb, n_hk, n_tiles, head_group,
                          HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, BLOCK_M: gl.constexpr,
                          BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, HAS_WL: gl.constexpr,
                          HAS_WR: gl.constexpr, HAS_SOFTCAP: gl.constexpr, ATOMIC_DQ: gl.constexpr,
                          DQ_TMA: gl.constexpr, FOLD: gl.constexpr, TRACE_BUF, TRACE_CAP, TRACE: gl.constexpr,
                          ep_smem, EPI: gl.constexpr, DEFER_DK: gl.constexpr, WS, t_full, TAIL: gl.constexpr):
    """The compute warps of :func:`attn_bwd_ws_persistent`: :func:`_bwd_ws_compute` once per unit (a tile,
    or with ``TAIL`` a part of a tail tile: :func:`_bwd_unit`) the worker hands over (:func:`_take_tile`;
    a negative code ends the program), the ring's iteration count carried across units."""
    it0 = gl.program_id(0) * 0
    k = gl.program_id(0) * 0
    t = _take_tile(tile_smem, tile_full, tile_empty, k, 8)
    while t >= 0:
        b, hk, n0, mb_lo, fu_lo, fu_hi, n_mb, part = _bwd_unit(t, t_full, n_kb, n_hk, n_tiles, head_group, seqlen_q,
                                                               seqlen_k, window_left, window_right, HAS_WL, HAS_WR,
                                                               BLOCK_M, BLOCK_N, TAIL)
        total = n_mb * group
        zero = b * 0
        if TRACE:
            _stamp(TRACE_BUF, TRACE_CAP, k, 0, t, 8)
            _stamp(TRACE_BUF, TRACE_CAP, k, 1, total, 8)
            _stamp(TRACE_BUF, TRACE_CAP, k, 2, None, 8)
        _bwd_ws_compute(k_smem, v_smem, q_bufs, do_bufs, p_smem, ds_smem, dq_smem, st_smem,
                        kv_bar, ld_full, ld_empty, dq_full, dq_empty,
                        DK, DV, LSE, DELTA, b, hk, group, zero, zero, n0, mb_lo, fu_lo, fu_hi, n_mb,
                        total, seqlen_q, seqlen_k, stride_dkb, stride_dks, stride_dkh, stride_lb, stride_lh,
                        qk_scale, cap_out, sm_scale, window_left, window_right,
                        0, False, HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR, HAS_SOFTCAP,
                        ATOMIC_DQ, DEFER_DK, True, DQ_TMA, None, None, None, None, 0, None,
                        True, FOLD, 0, None, None, None, None,
                        it0, k & 1, kv_empty, True, ep_smem, EPI, WS, part, TAIL)
        if TRACE:
            _stamp(TRACE_BUF, TRACE_CAP, k, 3, None, 8)
        it0 += total
        k += 1
        t = _take_tile(tile_smem, tile_full, tile_empty, k, 8)


@gluon.jit
def _bwd_ws_worker_tiles(q_desc, k_desc, v_desc, do_desc, k_smem, v_smem, q_bufs, do_bufs, dq_smem,
                         kv_bar, ld_full, ld_empty, dq_full, dq_empty, kv_empty, tile_smem, tile_full, tile_empty,
                         TILE_CTR, DQ, group,
                         stride_dqb, stride_dqs, stride_dqh, seqlen_q, seqlen_k, window_left, window_right,
                         n_kb, n_hk, n_tiles, head_group, dq_desc, LSE, DELTA, st_smem, stride_lb, stride_lh,
                         stat_mul, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_D: gl.constexpr,
                         NUM_STAGES: gl.constexpr, HAS_WL: gl.constexpr, HAS_WR: gl.constexpr,
                         ATOMIC_DQ: gl.constexpr, RED_ROWS: gl.constexpr, DQ_TMA: gl.constexpr,
                         FOLD: gl.constexpr, TRACE_BUF, TRACE_CAP, TRACE: gl.constexpr, t_full, n_split,
                         split_mb, TAIL: gl.constexpr):
    """The worker warpgroup of :func:`attn_bwd_ws_persistent`: ticket ``pid`` first, then each one taken
    from the call's counter ``TILE_CTR`` (``nprog + atomic_add(TILE_CTR, 1)``, once the current unit's
    loads and dQ adds are issued); a ticket is a tile, or with ``TAIL`` a piece of the tail of one or two
    parts (:func:`_tail_code`); each unit's code is handed to the compute warps (:func:`_give_tile`),
    then :func:`_bwd_ws_worker` runs once per unit; at the end code -1 tells the compute warps to stop."""
    it0 = gl.program_id(0) * 0
    k = gl.program_id(0) * 0
    t = gl.program_id(0)
    sub = k
    n_codes = n_tiles
    if TAIL:
        n_codes = t_full + gl.num_programs(0)
    while t < n_codes:
        if TAIL:
            code, more = _tail_code(t, sub, t_full, n_split, split_mb)
        else:
            code = t
            more = sub < 0
        _give_tile(tile_smem, tile_full, tile_empty, code, k, 4)
        if TRACE:
            _stamp(TRACE_BUF, TRACE_CAP, k, 4, None, 4)
        b, hk, n0, mb_lo, fu_lo, fu_hi, n_mb, part = _bwd_unit(code, t_full, n_kb, n_hk, n_tiles, head_group,
                                                               seqlen_q, seqlen_k, window_left, window_right, HAS_WL,
                                                               HAS_WR, BLOCK_M, BLOCK_N, TAIL)
        total = n_mb * group
        zero = b * 0
        _bwd_ws_worker(q_desc, k_desc, v_desc, do_desc, k_smem, v_smem, q_bufs, do_bufs, dq_smem,
                       kv_bar, ld_full, ld_empty, dq_full, dq_empty, DQ, b, hk, group, zero, zero, n0,
                       mb_lo, n_mb, total, stride_dqb, stride_dqs, stride_dqh,
                       BLOCK_M, BLOCK_D, NUM_STAGES, False, ATOMIC_DQ, RED_ROWS, 4, 1, dq_desc, DQ_TMA,
                       None, 0, LSE, DELTA, st_smem, seqlen_q, stride_lb, stride_lh, stat_mul,
                       True, FOLD, 0, it0, k, kv_empty, True)
        if TRACE:
            _stamp(TRACE_BUF, TRACE_CAP, k, 5, None, 4)
        it0 += total
        k += 1
        if more:  # the ticket's second part
            sub = sub + 1
        else:
            sub = sub * 0
            # the next ticket, taken once this unit's loads and dQ adds are issued (not when it starts: a
            # program busy with a long tile would hold the one after it while others run out of work)
            t = gl.num_programs(0) + gl.atomic_add(TILE_CTR, 1, sem="relaxed")
    _give_tile(tile_smem, tile_full, tile_empty, k * 0 - 1, k, 4)  # (-1: the compute warps stop)


@gluon.jit(do_not_specialize=_NO_SPECIALIZE + ["n_kb", "n_hk", "n_tiles", "head_group", "t_full", "n_split",
                                                "split_mb"])
def attn_bwd_ws_persistent(
    q_desc, k_desc, v_desc, do_desc, dq_desc, DQ, DK, DV, LSE, DELTA, TILE_CTR, WS, CU_Q, CU_K,
    stride_dqb, stride_dqs, stride_dqh, stride_dkb, stride_dks, stride_dkh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, group, qk_scale, cap_out, sm_scale, window_left, window_right,
    HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    NUM_STAGES: gl.constexpr, HAS_WL: gl.constexpr, HAS_WR: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
    IS_VARLEN: gl.constexpr, ATOMIC_DQ: gl.constexpr, WORKER_REGS: gl.constexpr, RED_ROWS: gl.constexpr,
    num_warps: gl.constexpr, DEFER_DK: gl.constexpr = False, SPLIT: gl.constexpr = False,
    COMPUTE_REGS: gl.constexpr = 240, SWAP: gl.constexpr = False, DQ_TMA: gl.constexpr = False,
    LPT: gl.constexpr = False, STAT_RING: gl.constexpr = False, FOLD: gl.constexpr = False, stat_mul=1.0,
    NBAR: gl.constexpr = 0, n_kb=1, n_hk=1, n_tiles=1, head_group=1, TRACE_BUF=None, TRACE_CAP=1,
    TRACE: gl.constexpr = False, EPI: gl.constexpr = False, t_full=0, n_split=0, split_mb=1,
    TAIL: gl.constexpr = False,
):
    """:func:`attn_bwd_ws` (``SWAP`` with ``STAT_RING``, dense, 8 compute warps, no named barriers,
    no block lists) as a persistent kernel: grid ``(min(n_tiles, SMs),)``; program ``p`` runs the
    tile ``p`` first, then the next free one of the ``n_tiles = n_kb * n_hk * batch`` key-block tiles
    (in the order of :func:`_bwd_tile` with ``head_group``) from the call's counter ``TILE_CTR`` (an int32 zero before
    the launch, advanced by atomic adds): a program that finishes early takes more tiles, as the
    hardware's block scheduler balances one program per tile (causal tiles differ in length). Same
    arguments as :func:`attn_bwd_ws` (those it does not serve must keep their defaults) plus ``TILE_CTR``
    (after ``DELTA``: a leading tensor of the launch plans), ``n_kb`` (key blocks per head), ``n_hk`` (KV
    heads), ``n_tiles`` and ``head_group``. ``TRACE`` (debug, ``launch_bwd.TRACE``): per program and
    tile ``k < TRACE_CAP``, six int64 at ``TRACE_BUF[(pid * TRACE_CAP + k) * 6]``: the tile, its
    iterations, the compute warps' timer when they take it and when they are done with it (dK / dV
    stored), the worker's when it hands it over and when it has issued its loads and dQ adds.

    What changes against one program per tile: the Q / dO ring and the dQ hand-off go on from tile to
    tile (slots and parities from the program's iteration count), and K / V, loaded once per tile,
    are released by the compute warps on ``kv_empty`` after the tile's last wgmma: the worker loads
    the next tile's K / V and first Q / dO slots while the compute warps store the tile's dK / dV,
    and the last dQ reduce-add of a tile runs under the next one's start. No program start, barrier
    initialisation or register reallocation per tile (stop 33's breakdown: ~14 us per program of the
    one-program-per-tile kernel against ~0 for cuDNN's persistent grid).

    ``TAIL`` (calls whose tiles all cost the same, ``HopperBwdConfig.tail``, ``sched.tail_split``): the last
    ``n_split`` tiles (``t_full = n_tiles - n_split`` on) are not handed out whole but as ``nprog`` equal
    pieces of their ``n_split * split_mb`` query blocks (:func:`_tail_code`), so that the programs finish
    together instead of ``n_split`` of them running a last whole tile while the others idle. The parts'
    dK / dV partials are added into ``WS`` (fp32, zeroed, ``[n_split, 2, BLOCK_N, BLOCK_D]``: dV, then dK
    scaled), converted into dK / dV after the kernel (``dq.dkdv_tail``)."""
    gl.static_assert(SWAP and STAT_RING and not SPLIT and not IS_VARLEN and NBAR == 0 and not LPT
                     and num_warps == 8,
                     "persistent: the ws kernel with swap and stat_ring, dense, without nbar / lpt / ws2")
    gl.static_assert(not FOLD or not HAS_SOFTCAP, "fold: without softcap")
    (k_smem, v_smem, q_bufs, do_bufs, p_smem, ds_smem, dq_smem, st_smem, kv_bar, ld_full, ld_empty, dq_full,
     dq_empty, ep_smem) = _ws_buffers(q_desc, 1, BLOCK_N, BLOCK_M, BLOCK_N, BLOCK_D, NUM_STAGES, True, ATOMIC_DQ,
                                      DQ_TMA, True, 2 * NUM_STAGES, EPI)  # fmt: skip
    # the persistent kernel's own: K / V released for the next tile, and the tile hand-off
    kv_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    tile_full = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    tile_empty = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    tile_smem = gl.allocate_shared_memory(gl.int32, [1], gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1,
                                                                                 order=[0]))
    mbarrier.init(kv_empty, count=1)
    mbarrier.init(tile_full, count=1)
    mbarrier.init(tile_empty, count=1)
    gl.warp_specialize([
        (_bwd_ws_compute_tiles, (k_smem, v_smem, q_bufs, do_bufs, ds_smem, ds_smem, dq_smem, st_smem,
                                 kv_bar, ld_full, ld_empty, dq_full, dq_empty, kv_empty, tile_smem, tile_full,
                                 tile_empty, DK, DV, LSE, DELTA, group, seqlen_q, seqlen_k, stride_dkb, stride_dks,
                                 stride_dkh, stride_lb, stride_lh, qk_scale, cap_out, sm_scale, window_left,
                                 window_right, n_kb, n_hk, n_tiles, head_group,
                                 HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR, HAS_SOFTCAP,
                                 ATOMIC_DQ, DQ_TMA, FOLD, TRACE_BUF, TRACE_CAP, TRACE, ep_smem, EPI, DEFER_DK,
                                 WS, t_full, TAIL)),
        (_bwd_ws_worker_tiles, (q_desc, k_desc, v_desc, do_desc, k_smem, v_smem, q_bufs, do_bufs, dq_smem,
                                kv_bar, ld_full, ld_empty, dq_full, dq_empty, kv_empty, tile_smem, tile_full,
                                tile_empty, TILE_CTR, DQ, group,
                                stride_dqb, stride_dqs, stride_dqh, seqlen_q, seqlen_k, window_left, window_right,
                                n_kb, n_hk, n_tiles, head_group, dq_desc, LSE, DELTA, st_smem, stride_lb,
                                stride_lh, stat_mul, BLOCK_M, BLOCK_N, BLOCK_D, NUM_STAGES, HAS_WL, HAS_WR,
                                ATOMIC_DQ, RED_ROWS, DQ_TMA, FOLD, TRACE_BUF, TRACE_CAP, TRACE, t_full, n_split,
                                split_mb, TAIL)),
    ], [4], [WORKER_REGS])
