"""Gluon FP8 (e4m3) forward attention kernel for Hopper: the ``ws`` kernel's design (1 TMA
producer warp, two or three consumer warpgroups taking turns as FA3's ping-pong, K/V ring on
full/empty mbarriers) with both products in FP8 wgmma.

Kernels only (the host side is :mod:`.launch`); the mask, online-softmax, tile-coordinate and
epilogue helpers are :mod:`.fwd`'s, shared with the 16-bit kernels. What differs from ``ws``:

* Q K^T: e4m3 ``warpgroup_mma`` (wgmma k = 32) on Q and K tiles in shared memory, both K-major
  as FP8 wgmma requires (Q ``[rows, D]`` and K ``[keys, D]`` row-major, K read through a
  permuted view, exactly as in the 16-bit kernels). The descales are folded into the score
  scale: ``qk_scale * q_descale[b, hk] * k_descale[b, hk]`` (one multiply per program).
* P V: the unnormalised probabilities ``p = exp2(s - m) <= 1`` are rounded to e4m3 in registers
  (a dot-operand layout with 4 elements per 32-bit register, ``k_width = 4``) and multiplied by
  V^T tiles: FP8 wgmma needs its B operand K-major, i.e. the keys contiguous, which V
  ``(..., keys, D)`` is not. The launcher transposes V once into ``(B, Hk, D, Sk_pad)`` (dense)
  or ``(Hk, D, total_pad)`` (varlen) in global memory, and the producer loads ``[D, BLOCK_N]``
  V^T tiles by TMA; the consumers read them through a permuted ``[BLOCK_N, D]`` view. The row
  sums ``l`` use the unrounded p.

Code-path switches (constexprs from ``configs.FP8Config``, so one benchmark run compares them):
``CVT_ASM`` (P rounded four values at a time by inline ``cvt.rn.satfinite.e4m3x2.f32`` and carried
across the key-block loop as packed int32 words: :func:`_p_pack`), ``ROW_TREE`` (the softmax's row
max, and with 2 its row sum, as register trees: ``fwd._row_reduce``; with 3 the row sum kept as per-lane
partials, reduced across the quad once before the epilogue: ``fwd._row_parts``), ``SKIP_RESCALE`` (the output
rescale branched over by a warp none of whose rows' max rose: :func:`_rescale`), ``EXP_POLY`` (a
quarter or half of the exponentials by a cubic on the FMA pipe, ``fwd._exp2_split``: off by default,
an A/B switch until measured). SASS of the d128
dense unmasked key-block loop (per thread, 64 scores): 641 instructions (909 PRMT in the kernel)
without them, 450 with them (no PRMT), of which 64 FMUL are skipped in most blocks.
* Epilogue: ``o = acc * v_descale[b, hk] / l`` in bfloat16 (flash-attn 3's output dtype for
  FP8), staged through its own bf16 shared buffer (the FP8 Q buffer is half the size) and
  stored by TMA, or by masked stores for a ragged varlen tile.

``attn_fwd_persistent_fp8`` (dense calls; ``configs.FP8Config.persistent``, the default without a right
window at head dims 64 / 128): the same partitions over a host-computed tile list, one program per SM.
The K/V^T ring and the turns run on across tiles, each consumer has two Q buffers (one at head dim 256),
so the producer loads the next tile's Q while this tile's last blocks run, and the output's TMA store
stays in flight until the next epilogue: a tile's start (Q from HBM, ~2100 cycles at d128) and
epilogue no longer sit between two tiles' loops.

The turns (``_turn_wait`` / ``_turn_pass``) are the 16-bit kernels', with 2 consumers. A
descale argument passed as None means 1 (a constexpr: no load). Descales must be positive (the
softmax takes the max of raw scores times the scale). ``warpgroup_mma_wait`` cannot take the 8-bit
P operand as a dependency (Triton 3.6's lowering rejects 8-bit deps), so only the accumulator is
passed; ptxas keeps an in-flight wgmma's operand registers (it reports no wgmma serialisation).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma, warpgroup_mma, warpgroup_mma_wait

from .fwd import (
    _NO_SPECIALIZE,
    _block_range,
    _epilogue,
    _pers_range,
    _pers_tile,
    _pin,
    _row_parts,
    _softmax_block,
    _tile_coords,
    _tma_load,
    _turn_pass,
    _turn_wait,
    _wait_fence,
    _ws_load_kv,
    _ws_producer,
)

_NO_SPECIALIZE_FP8 = _NO_SPECIALIZE + ["sqd_b", "sqd_h", "skd_b", "skd_h", "svd_b", "svd_h"]


@gluon.jit
def _p_operand(p, o_layout: gl.constexpr, PERM_P: gl.constexpr = False):
    """Probabilities ``[SUB_M, BLOCK_N]`` (fp32) rounded to e4m3, as the register A operand of P V.

    ``PERM_P``: the keys are reordered within each 32-key chunk so that the operand is the
    accumulator's own registers: column ``32g + 16h + 4c + 2x + e`` of the operand is column
    ``32g + 16h + 8x + 2c + e`` of P (``vt.key_perm32``), which is how the wgmma
    accumulator layout (2 consecutive columns per thread in each 8-column group) lines up with the
    8-bit A operand layout (4 consecutive k per register); V^T comes with its keys reordered the
    same way (``launch.transpose_v``), so P V is unchanged. Without it the conversion shuffles
    every byte between the threads of a quad (SASS: ~100 SHFL per key block saved)."""
    x = p.to(gl.float8e4nv)
    if PERM_P:
        SUB_M: gl.constexpr = p.shape[0]
        BLOCK_N: gl.constexpr = p.shape[1]
        x = gl.reshape(x, [SUB_M, BLOCK_N // 32, 2, 2, 4, 2])  # (g, h, x, c, e): column 32g + 16h + 8x + 2c + e
        x = gl.permute(x, (0, 1, 2, 4, 3, 5))  # (g, h, c, x, e)
        x = gl.reshape(x, [SUB_M, BLOCK_N])
    return gl.convert_layout(x, gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4))


_CVT_E4M3X4: gl.constexpr = gl.constexpr(
    "{ .reg .b16 lo, hi; cvt.rn.satfinite.e4m3x2.f32 lo, $2, $1; cvt.rn.satfinite.e4m3x2.f32 hi, $4, $3; "
    "mov.b32 $0, {lo, hi}; }")


@gluon.jit
def _p_pack(p, o_layout: gl.constexpr, PERM_P: gl.constexpr, CVT_ASM: gl.constexpr):
    """Probabilities ``[SUB_M, BLOCK_N]`` (fp32) rounded to e4m3 for the next P V, in the form the
    key-block loop carries them: with ``CVT_ASM`` (dense only: needs ``PERM_P``) an int32
    ``[SUB_M, BLOCK_N // 4]`` tensor of packed e4m3x4 words, k = 4q + b in byte b of word q (inline
    PTX: two ``cvt.rn.satfinite.e4m3x2.f32`` per word). Triton carries an 8-bit tensor across a loop
    as one register per byte (unpacked after the conversion, repacked before the wgmma: ~180 PRMT /
    LOP3 / SHF per key block in the d128 SASS); a 32-bit carrier avoids both. Without
    ``CVT_ASM``: :func:`_p_operand` (the 8-bit operand itself). :func:`_p_unpack` gives the operand."""
    if PERM_P and CVT_ASM:
        SUB_M: gl.constexpr = p.shape[0]
        BLOCK_N: gl.constexpr = p.shape[1]
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        # the key order of _p_operand's PERM_P, done on the fp32 values (register renaming), then the
        # operand's register order (a register permutation for 32-bit values)
        y = gl.reshape(p, [SUB_M, BLOCK_N // 32, 2, 2, 4, 2])
        y = gl.permute(y, (0, 1, 2, 4, 3, 5))
        y = gl.convert_layout(gl.reshape(y, [SUB_M, BLOCK_N]), op_layout)
        y = gl.reshape(y, [SUB_M, BLOCK_N // 4, 2, 2])  # (q, i, j): k = 4q + 2i + j
        y0, y1 = gl.split(y)
        v00, v10 = gl.split(y0)
        v01, v11 = gl.split(y1)
        return gl.inline_asm_elementwise(_CVT_E4M3X4, "=r,r,r,r,r", [v00, v01, v10, v11], dtype=gl.int32,
                                         is_pure=True, pack=1)
    else:
        return _p_operand(p, o_layout, PERM_P)


@gluon.jit
def _p_unpack(x, o_layout: gl.constexpr, PERM_P: gl.constexpr, CVT_ASM: gl.constexpr):
    """The e4m3 A operand of P V from :func:`_p_pack`'s carrier (no instructions with ``CVT_ASM``:
    each packed word is the operand's register, the inline ``mov`` folds away)."""
    if PERM_P and CVT_ASM:
        SUB_M: gl.constexpr = x.shape[0]
        BLOCK_N: gl.constexpr = x.shape[1] * 4
        op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=4)
        z = gl.join(x, x)
        z = gl.reshape(gl.join(z, z), [SUB_M, BLOCK_N])  # word q at k = 4q .. 4q + 3
        z = gl.convert_layout(z, op_layout)
        return gl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,r,r,r", [z], dtype=gl.float8e4nv, is_pure=True,
                                         pack=4)
    else:
        return x


def _rescale_asm(n: int) -> str:
    """Inline PTX of :func:`_rescale` for ``n`` accumulator registers per thread: operands ``$0..``
    the outputs, ``$n..`` the accumulator, ``$2n..`` each element's alpha (elements 0, 1 are row r,
    2, 3 row r + 8, and so on: the wgmma accumulator layout, 2 rows per thread). The warp votes
    whether any of its rows has alpha != 1; if none has, the multiplies are branched over (labels
    inside ``{ }`` are local to the block, so the string can be inlined several times)."""
    mov = " ".join(f"mov.b32 ${i}, ${n + i};" for i in range(n))
    mul = " ".join(f"mul.f32 ${i}, ${i}, ${2 * n + i};" for i in range(n))
    return ("{ .reg .pred p, q; "
            f"setp.neu.f32 p, ${2 * n}, 0f3F800000; setp.neu.f32 q, ${2 * n + 2}, 0f3F800000; or.pred p, p, q; "
            f"vote.sync.any.pred p, p, 0xffffffff; {mov} @!p bra SKIP; {mul} SKIP: }}")  # fmt: skip


_RESCALE_32: gl.constexpr = gl.constexpr(_rescale_asm(32))
_RESCALE_64: gl.constexpr = gl.constexpr(_rescale_asm(64))
_RESCALE_128: gl.constexpr = gl.constexpr(_rescale_asm(128))
_RESCALE_C32: gl.constexpr = gl.constexpr(",".join(["=f"] * 32 + ["f"] * 64))
_RESCALE_C64: gl.constexpr = gl.constexpr(",".join(["=f"] * 64 + ["f"] * 128))
_RESCALE_C128: gl.constexpr = gl.constexpr(",".join(["=f"] * 128 + ["f"] * 256))


@gluon.jit
def _rescale(acc, alpha, o_layout: gl.constexpr, SKIP_RESCALE: gl.constexpr):
    """``acc * alpha`` (alpha per row). ``SKIP_RESCALE``: a warp whose rows all have alpha == 1
    (no row max rose in this key block: most blocks after the first few) skips the multiplies,
    branching on a warp vote (inline PTX, :func:`_rescale_asm`): the same result, 5 instructions
    instead of BLOCK_D / 2 FMUL per thread when skipped. Not ``is_pure``: the warp-collective vote
    must not be moved or merged by the compiler."""
    a = gl.expand_dims(gl.convert_layout(alpha, gl.SliceLayout(1, o_layout)), 1)
    if SKIP_RESCALE:
        N: gl.constexpr = acc.shape[0] * acc.shape[1] // 128  # accumulator registers per thread
        if N == 32:
            return gl.inline_asm_elementwise(_RESCALE_32, _RESCALE_C32, [acc, a],
                                             dtype=gl.float32, is_pure=False, pack=32)
        elif N == 64:
            return gl.inline_asm_elementwise(_RESCALE_64, _RESCALE_C64, [acc, a],
                                             dtype=gl.float32, is_pure=False, pack=64)
        else:
            return gl.inline_asm_elementwise(_RESCALE_128, _RESCALE_C128, [acc, a],
                                             dtype=gl.float32, is_pure=False, pack=128)
    else:
        return acc * a


@gluon.jit
def _clk(tr, k, field: gl.constexpr):
    """Debug (``TRACE``, :func:`attn_fwd_ws_fp8`): the SM's cycle counter (``%clock64``) into field ``field``
    of key block ``k`` of this consumer's trace, ``tr = (TRACE_BUF, base, cap)`` (``base < 0``: not a traced
    program; a masked store, no branch). Written by every thread of the warpgroup (the same address)."""
    TRACE_BUF, base, cap = tr
    lay: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    z = gl.full([1], 0, gl.int64, lay)
    x = gl.inline_asm_elementwise("mov.u64 $0, %clock64;", "=l,l", [z], dtype=gl.int64, is_pure=False, pack=1)
    slot = (base + gl.minimum(k, cap - 1)) * 8 + field
    gl.store(TRACE_BUF + slot + gl.arange(0, 1, lay), x, mask=(z + base) >= 0)


@gluon.jit
def _fp8_block(acc, l_i, m_i, p_op, it, blk, q_smem, k_bufs, vt_bufs, k_full, v_full, k_empty, v_empty, turn,
               rows, seqlen_k, off, wl, wr, qk_scale, cap_out,
               CID: gl.constexpr, MASKED: gl.constexpr, HAS_WL: gl.constexpr, HAS_WR: gl.constexpr,
               HAS_SOFTCAP: gl.constexpr, SUB_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
               s_layout: gl.constexpr, o_layout: gl.constexpr, PERM_P: gl.constexpr, CVT_ASM: gl.constexpr,
               ROW_TREE: gl.constexpr, SKIP_RESCALE: gl.constexpr, EXP_POLY: gl.constexpr = 0,
               q_bar=None, WAIT_FENCE: gl.constexpr = False, NUM_CONSUMERS: gl.constexpr = 2, tr=None,
               TRACE: gl.constexpr = False, q_phase=0):
    """Key block ``blk`` (not the tile's first), the ``ws`` schedule: on this warpgroup's turn
    issue S = Q K^T and O += P_prev V_prev (FP8 wgmma both), pass the turn, run the softmax of S
    while P_prev V_prev is still on the tensor cores (``WAIT_FENCE``: :func:`fwd._wait_fence` on
    ``q_bar``, this consumer's Q barrier at ``q_phase``, keeps it so in the SASS). ``it`` counts key
    blocks over the program's life (ring slot, phase and turn)."""
    stage = it % NUM_STAGES
    phase = (it // NUM_STAGES) & 1
    pstage = (it - 1) % NUM_STAGES
    pphase = ((it - 1) // NUM_STAGES) & 1
    if TRACE:
        _clk(tr, it, 4)  # (block start)
    mbarrier.wait(k_full.index(stage), phase)
    if TRACE:
        _clk(tr, it, 5)  # (K ready)
    _turn_wait(turn, it, CID)
    if TRACE:
        _clk(tr, it, 0)  # (turn taken)
    s0 = gl.zeros([SUB_M, BLOCK_N], gl.float32, s_layout)
    s = warpgroup_mma(q_smem, k_bufs.index(stage).permute((1, 0)), s0, use_acc=False, is_async=True)
    if TRACE:
        _clk(tr, it, 6)  # (S issued)
    mbarrier.wait(v_full.index(pstage), pphase)
    acc = warpgroup_mma(_p_unpack(p_op, o_layout, PERM_P, CVT_ASM), vt_bufs.index(pstage).permute((1, 0)), acc,
                        is_async=True)
    _turn_pass(turn, CID, NUM_CONSUMERS)
    if TRACE:
        _clk(tr, it, 7)  # (P V issued, turn passed)
    s = warpgroup_mma_wait(1, deps=(s,))
    if TRACE:
        _clk(tr, it, 1)  # (S ready)
    mbarrier.arrive(k_empty.index(stage))
    p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, blk, rows, seqlen_k, off, wl, wr, qk_scale, cap_out,
                                        MASKED, HAS_WL, HAS_WR, HAS_SOFTCAP, BLOCK_N, s_layout, ROW_TREE,
                                        EXP_POLY=EXP_POLY)
    if TRACE:
        _clk(tr, it, 2)  # (softmax issued)
    if ROW_TREE == 3:  # (the per-lane sums are plain adds: pinned, or LLVM sinks them and their
        l_i = _pin(l_i)  # exponentials past the fence, and the P V wait lands among the exponentials)
    _wait_fence(q_bar, q_phase, WAIT_FENCE)
    acc = warpgroup_mma_wait(0, deps=(acc,))  # (8-bit p_op cannot be a wait dep: see the module doc)
    mbarrier.arrive(v_empty.index(pstage))
    acc = _rescale(acc, alpha, o_layout, SKIP_RESCALE)
    p_op = _p_pack(p, o_layout, PERM_P, CVT_ASM)
    if TRACE:
        _clk(tr, it, 3)  # (P V waited for, O rescaled, P packed)
    return acc, l_i, m_i, p_op


@gluon.jit
def _fp8_scales(QD, KD, VD, sqd_b, sqd_h, skd_b, skd_h, svd_b, svd_h, b, hk, qk_scale):
    """(score scale, v descale) of batch ``b``, KV head ``hk``: q's and k's descales folded into the score
    scale (Q K^T), v's for the output (P V; 1.0 without ``VD``). Loaded at a tile's start, where their
    latency hides under Q's (at the epilogue v's sat on the tile's path)."""
    if QD is not None:
        qk_scale = qk_scale * gl.load(QD + b * sqd_b + hk * sqd_h)
    if KD is not None:
        qk_scale = qk_scale * gl.load(KD + b * skd_b + hk * skd_h)
    v_descale = 1.0
    if VD is not None:
        v_descale = gl.load(VD + b * svd_b + hk * svd_h)
    return qk_scale, v_descale


@gluon.jit
def _fp8_tile(q_smem, q_bar, q_phase, k_bufs, vt_bufs, k_full, v_full, k_empty, v_empty, turn, it0,
              rows, seqlen_k, off, wl, wr, qk_scale, cap_out, nb_lo, fu_lo, fu_hi, nb_hi,
              CID: gl.constexpr, SUB_M: gl.constexpr, BLOCK_D: gl.constexpr, BLOCK_N: gl.constexpr,
              NUM_STAGES: gl.constexpr, HAS_WL: gl.constexpr, HAS_WR: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
              s_layout: gl.constexpr, o_layout: gl.constexpr, row_layout: gl.constexpr, PERM_P: gl.constexpr,
              CVT_ASM: gl.constexpr, ROW_TREE: gl.constexpr, SKIP_RESCALE: gl.constexpr, EXP_POLY: gl.constexpr,
              WAIT_FENCE: gl.constexpr, NUM_CONSUMERS: gl.constexpr, tr=None, TRACE: gl.constexpr = False):
    """One consumer warpgroup's query rows ``rows`` (Q landed in ``q_smem``, ``q_bar`` at ``q_phase``
    completed) over key blocks ``nb_lo .. nb_hi`` (``fu_lo .. fu_hi`` without masks), from ring
    iteration ``it0`` on (each block one ring slot and one turn): (acc, l, m), acc not normalised
    and not yet multiplied by the v descale; acc 0 and l 0 when there is no key block."""
    m_i = gl.full([SUB_M], float("-inf"), gl.float32, row_layout)
    if ROW_TREE == 3:  # the row sums as per-lane partials, reduced once before the epilogue
        l_i = _row_parts(gl.zeros([SUB_M, BLOCK_N], gl.float32, s_layout))
    else:
        l_i = gl.zeros([SUB_M], gl.float32, row_layout)
    acc = gl.zeros([SUB_M, BLOCK_D], gl.float32, o_layout)
    n_total = nb_hi - nb_lo
    if n_total > 0:
        # first block: S only, with masks
        stage0 = it0 % NUM_STAGES
        mbarrier.wait(k_full.index(stage0), (it0 // NUM_STAGES) & 1)
        _turn_wait(turn, it0, CID)
        s0 = gl.zeros([SUB_M, BLOCK_N], gl.float32, s_layout)
        s = warpgroup_mma(q_smem, k_bufs.index(stage0).permute((1, 0)), s0, use_acc=False, is_async=True)
        _turn_pass(turn, CID, NUM_CONSUMERS)
        s = warpgroup_mma_wait(0, deps=(s,))
        mbarrier.arrive(k_empty.index(stage0))
        p, alpha, m_i, l_i = _softmax_block(s, m_i, l_i, nb_lo, rows, seqlen_k, off, wl, wr, qk_scale, cap_out,
                                            True, HAS_WL, HAS_WR, HAS_SOFTCAP, BLOCK_N, s_layout, ROW_TREE,
                                            EXP_POLY=EXP_POLY)
        p_op = _p_pack(p, o_layout, PERM_P, CVT_ASM)
        if TRACE:
            _clk(tr, 0, 2)  # (the first key block's softmax done)
        it = it0 + 1
        for blk in range(nb_lo + 1, fu_lo):
            acc, l_i, m_i, p_op = _fp8_block(acc, l_i, m_i, p_op, it, blk, q_smem, k_bufs, vt_bufs, k_full, v_full,
                                             k_empty, v_empty, turn, rows, seqlen_k, off, wl, wr, qk_scale, cap_out,
                                             CID, True, HAS_WL, HAS_WR, HAS_SOFTCAP, SUB_M, BLOCK_N, NUM_STAGES,
                                             s_layout, o_layout, PERM_P, CVT_ASM, ROW_TREE, SKIP_RESCALE, EXP_POLY,
                                             q_bar, WAIT_FENCE, NUM_CONSUMERS, tr, TRACE, q_phase)
            it += 1
        for blk in range(gl.maximum(fu_lo, nb_lo + 1), fu_hi):
            acc, l_i, m_i, p_op = _fp8_block(acc, l_i, m_i, p_op, it, blk, q_smem, k_bufs, vt_bufs, k_full, v_full,
                                             k_empty, v_empty, turn, rows, seqlen_k, off, wl, wr, qk_scale, cap_out,
                                             CID, False, HAS_WL, HAS_WR, HAS_SOFTCAP, SUB_M, BLOCK_N, NUM_STAGES,
                                             s_layout, o_layout, PERM_P, CVT_ASM, ROW_TREE, SKIP_RESCALE, EXP_POLY,
                                             q_bar, WAIT_FENCE, NUM_CONSUMERS, tr, TRACE, q_phase)
            it += 1
        for blk in range(gl.maximum(fu_hi, nb_lo + 1), nb_hi):
            acc, l_i, m_i, p_op = _fp8_block(acc, l_i, m_i, p_op, it, blk, q_smem, k_bufs, vt_bufs, k_full, v_full,
                                             k_empty, v_empty, turn, rows, seqlen_k, off, wl, wr, qk_scale, cap_out,
                                             CID, True, HAS_WL, HAS_WR, HAS_SOFTCAP, SUB_M, BLOCK_N, NUM_STAGES,
                                             s_layout, o_layout, PERM_P, CVT_ASM, ROW_TREE, SKIP_RESCALE, EXP_POLY,
                                             q_bar, WAIT_FENCE, NUM_CONSUMERS, tr, TRACE, q_phase)
            it += 1
        # the last block's P V
        last = it0 + n_total - 1
        lstage = last % NUM_STAGES
        mbarrier.wait(v_full.index(lstage), (last // NUM_STAGES) & 1)
        acc = warpgroup_mma(_p_unpack(p_op, o_layout, PERM_P, CVT_ASM), vt_bufs.index(lstage).permute((1, 0)), acc,
                            is_async=True)
        acc = warpgroup_mma_wait(0, deps=(acc,))  # (8-bit p_op cannot be a wait dep: see the module doc)
        mbarrier.arrive(v_empty.index(lstage))
        if TRACE:
            _clk(tr, 0, 3)  # (the last P V waited for)
    if ROW_TREE == 3:
        l_row = gl.convert_layout(gl.sum(l_i, 1), row_layout)
    else:
        l_row = l_i
    return acc, l_row, m_i


@gluon.jit
def _fp8_consumer(q_bufs, k_bufs, vt_bufs, o_bufs, q_bars, k_full, v_full, k_empty, v_empty, turn,
                  o_desc, O, LSE, QD, KD, VD, sqd_b, sqd_h, skd_b, skd_h, svd_b, svd_h,
                  b, h, hk, m0, q_start, seqlen_q, seqlen_k, off, wl, wr, qk_scale, cap_out,
                  nb_lo, fu_lo, fu_hi, nb_hi, stride_os, stride_oh, stride_lb, stride_lh,
                  CID: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, SUB_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr, HAS_WL: gl.constexpr, HAS_WR: gl.constexpr,
                  HAS_SOFTCAP: gl.constexpr, IS_VARLEN: gl.constexpr, CVT_ASM: gl.constexpr,
                  ROW_TREE: gl.constexpr, SKIP_RESCALE: gl.constexpr, EXP_POLY: gl.constexpr = 0,
                  WAIT_FENCE: gl.constexpr = False, NUM_CONSUMERS: gl.constexpr = 2, TRACE_BUF=None, TRACE_CAP=1,
                  trace_prog=-1, TRACE: gl.constexpr = False):
    """One consumer warpgroup: query rows ``m0 + CID * SUB_M ..`` over the tile's key blocks. ``TRACE``:
    stamps of each key block (:func:`_clk`) when ``trace_prog >= 0`` (the traced program's index)."""
    tr = None
    if TRACE:  # (base -1 << 30 for an untraced program: its stores are masked off)
        on = (trace_prog >= 0).to(gl.int32)
        tr = (TRACE_BUF, on * (trace_prog * (NUM_CONSUMERS * TRACE_CAP) + CID * TRACE_CAP) - (1 - on) * (1 << 30),
              TRACE_CAP)
        _clk(tr, 0, 0)  # (the tile's stamps in slot 0: consumer start)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_D, 32])
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    PERM_P: gl.constexpr = not IS_VARLEN  # dense key blocks start at multiples of 32: see _p_operand
    qk_scale, v_descale = _fp8_scales(QD, KD, VD, sqd_b, sqd_h, skd_b, skd_h, svd_b, svd_h, b, hk, qk_scale)
    q_smem = q_bufs.index(CID)
    r0 = m0 + CID * SUB_M
    rows = r0 + gl.arange(0, SUB_M, layout=row_layout)
    mbarrier.wait(q_bars.index(CID), 0)
    if TRACE:
        _clk(tr, 0, 1)  # (Q ready, the descales loaded)
    acc, l_row, m_i = _fp8_tile(q_smem, q_bars.index(CID), 0, k_bufs, vt_bufs, k_full, v_full, k_empty, v_empty,
                                turn, 0, rows, seqlen_k, off, wl, wr, qk_scale, cap_out, nb_lo, fu_lo, fu_hi, nb_hi,
                                CID, SUB_M, BLOCK_D, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR, HAS_SOFTCAP, s_layout,
                                o_layout, row_layout, PERM_P, CVT_ASM, ROW_TREE, SKIP_RESCALE, EXP_POLY, WAIT_FENCE,
                                NUM_CONSUMERS, tr, TRACE)
    if VD is not None:
        acc = acc * v_descale
    if r0 < seqlen_q:
        _epilogue(acc, l_row, m_i, o_bufs.index(CID), o_desc, O, LSE, b, h, r0, q_start, seqlen_q,
                  stride_os, stride_oh, stride_lb, stride_lh,
                  IS_VARLEN, SUB_M, HEAD_DIM, BLOCK_D, row_layout, o_layout)
    if TRACE:
        _clk(tr, 0, 4)  # (the epilogue done)


@gluon.jit(do_not_specialize=_NO_SPECIALIZE_FP8)
def attn_fwd_ws_fp8(
    q_desc, k_desc, vt_desc, o_desc, O, LSE, CU_Q, CU_K, QD, KD, VD,
    sqd_b, sqd_h, skd_b, skd_h, svd_b, svd_h,
    stride_os, stride_oh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, group, qk_scale, cap_out, window_left, window_right,
    HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    NUM_STAGES: gl.constexpr, HAS_WL: gl.constexpr, HAS_WR: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
    IS_VARLEN: gl.constexpr, REVERSE_M: gl.constexpr, CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    CVT_ASM: gl.constexpr, ROW_TREE: gl.constexpr, SKIP_RESCALE: gl.constexpr, num_warps: gl.constexpr,
    EXP_POLY: gl.constexpr = 0, WAIT_FENCE: gl.constexpr = False, NUM_CONSUMERS: gl.constexpr = 2,
    TRACE_BUF=None, TRACE_CAP=1, TRACE_PROGS=0, TRACE: gl.constexpr = False,
):
    """Grid ``(cdiv(max_seqlen_q, BLOCK_M), H, B or nseq)``, ``num_warps = 4`` (+ 4 per further
    consumer warpgroup, ``NUM_CONSUMERS`` = 2 or 3, + 1 producer warp in the other partitions).
    q_desc / k_desc: e4m3 ``[rows, D]`` tiles as the 16-bit kernels'; vt_desc:
    e4m3 V^T ``[D, BLOCK_N]`` tiles; o_desc: bf16 ``BLOCK_M // 2``-row tiles. QD / KD / VD:
    float32 descales indexed ``[b * s_b + hk * s_h]``, or None (1). Writes o (bf16) and lse.
    ``TRACE`` (debug, ``launch.FP8_TRACE``, ``benchmarks/fp8_trace.py``): the programs of head 0, batch 0
    with ``pid_m < TRACE_PROGS`` record eight ``%clock64`` stamps per key block after the first and
    consumer, int64 ``TRACE_BUF[((pid_m * NUM_CONSUMERS + c) * TRACE_CAP + it) * 8 + f]``: turn taken (f 0),
    S ready (1), softmax issued (2), P V waited for and P packed (3), block start (4), K ready (5), S issued
    (6), P V issued and the turn passed (7); and in slot ``it = 0`` the tile's: consumer start (0), Q ready
    (1), the first block's softmax done (2), the last P V waited for (3), the epilogue done (4)."""
    pid_m, h, b, q_start, k_start, seqlen_q, seqlen_k = _tile_coords(CU_Q, CU_K, seqlen_q, seqlen_k,
                                                                     REVERSE_M, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    SUB_M: gl.constexpr = BLOCK_M // NUM_CONSUMERS
    dtype: gl.constexpr = q_desc.dtype
    hk = h // group
    off = seqlen_k - seqlen_q
    qk_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=q_desc.layout.swizzle_byte_width,
                                                   element_bitwidth=8, rank=2)
    vt_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=vt_desc.layout.swizzle_byte_width,
                                                   element_bitwidth=8, rank=2)
    o_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=o_desc.layout.swizzle_byte_width,
                                                  element_bitwidth=16, rank=2)
    q_bufs = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS, SUB_M, BLOCK_D], qk_layout)
    k_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, BLOCK_D], qk_layout)
    vt_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_D, BLOCK_N], vt_layout)
    o_bufs = gl.allocate_shared_memory(o_desc.dtype, [NUM_CONSUMERS, SUB_M, BLOCK_D], o_layout)
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

    r_hi = gl.minimum(m0 + BLOCK_M, seqlen_q)
    nb_lo, fu_lo, fu_hi, nb_hi = _block_range(m0, r_hi, seqlen_k, off, window_left, window_right,
                                              HAS_WL, HAS_WR, BLOCK_N)
    n_total = nb_hi - nb_lo
    trace_prog = -1
    if TRACE:
        trace_prog = ((h == 0) & (b == 0) & (pid_m < TRACE_PROGS)).to(gl.int32) * (pid_m + 1) - 1
    # (tuples spelled out per consumer count, as attn_fwd_ws's)
    if NUM_CONSUMERS == 3:
        gl.warp_specialize([
            (_fp8_consumer, (q_bufs, k_bufs, vt_bufs, o_bufs, q_bars, k_full, v_full, k_empty, v_empty, turn,
                             o_desc, O, LSE, QD, KD, VD, sqd_b, sqd_h, skd_b, skd_h, svd_b, svd_h,
                             b, h, hk, m0, q_start, seqlen_q, seqlen_k, off, window_left, window_right, qk_scale,
                             cap_out,
                             nb_lo, fu_lo, fu_hi, nb_hi, stride_os, stride_oh, stride_lb, stride_lh,
                             0, HEAD_DIM, BLOCK_D, SUB_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR, HAS_SOFTCAP, IS_VARLEN,
                             CVT_ASM, ROW_TREE, SKIP_RESCALE, EXP_POLY, WAIT_FENCE,
                             NUM_CONSUMERS, TRACE_BUF, TRACE_CAP, trace_prog, TRACE)),
            (_fp8_consumer, (q_bufs, k_bufs, vt_bufs, o_bufs, q_bars, k_full, v_full, k_empty, v_empty, turn,
                             o_desc, O, LSE, QD, KD, VD, sqd_b, sqd_h, skd_b, skd_h, svd_b, svd_h,
                             b, h, hk, m0, q_start, seqlen_q, seqlen_k, off, window_left, window_right, qk_scale,
                             cap_out,
                             nb_lo, fu_lo, fu_hi, nb_hi, stride_os, stride_oh, stride_lb, stride_lh,
                             1, HEAD_DIM, BLOCK_D, SUB_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR, HAS_SOFTCAP, IS_VARLEN,
                             CVT_ASM, ROW_TREE, SKIP_RESCALE, EXP_POLY, WAIT_FENCE,
                             NUM_CONSUMERS, TRACE_BUF, TRACE_CAP, trace_prog, TRACE)),
            (_fp8_consumer, (q_bufs, k_bufs, vt_bufs, o_bufs, q_bars, k_full, v_full, k_empty, v_empty, turn,
                             o_desc, O, LSE, QD, KD, VD, sqd_b, sqd_h, skd_b, skd_h, svd_b, svd_h,
                             b, h, hk, m0, q_start, seqlen_q, seqlen_k, off, window_left, window_right, qk_scale,
                             cap_out,
                             nb_lo, fu_lo, fu_hi, nb_hi, stride_os, stride_oh, stride_lb, stride_lh,
                             2, HEAD_DIM, BLOCK_D, SUB_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR, HAS_SOFTCAP, IS_VARLEN,
                             CVT_ASM, ROW_TREE, SKIP_RESCALE, EXP_POLY, WAIT_FENCE,
                             NUM_CONSUMERS, TRACE_BUF, TRACE_CAP, trace_prog, TRACE)),
            (_ws_producer, (q_desc, k_desc, vt_desc, q_bufs, k_bufs, vt_bufs, q_bars, k_full, v_full, k_empty, v_empty,
                            b, h, hk, q_start, k_start, m0, nb_lo, n_total, SUB_M, BLOCK_N, NUM_STAGES, IS_VARLEN,
                            NUM_CONSUMERS, True)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_fp8_consumer, (q_bufs, k_bufs, vt_bufs, o_bufs, q_bars, k_full, v_full, k_empty, v_empty, turn,
                             o_desc, O, LSE, QD, KD, VD, sqd_b, sqd_h, skd_b, skd_h, svd_b, svd_h,
                             b, h, hk, m0, q_start, seqlen_q, seqlen_k, off, window_left, window_right, qk_scale,
                             cap_out,
                             nb_lo, fu_lo, fu_hi, nb_hi, stride_os, stride_oh, stride_lb, stride_lh,
                             0, HEAD_DIM, BLOCK_D, SUB_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR, HAS_SOFTCAP, IS_VARLEN,
                             CVT_ASM, ROW_TREE, SKIP_RESCALE, EXP_POLY, WAIT_FENCE,
                             NUM_CONSUMERS, TRACE_BUF, TRACE_CAP, trace_prog, TRACE)),
            (_fp8_consumer, (q_bufs, k_bufs, vt_bufs, o_bufs, q_bars, k_full, v_full, k_empty, v_empty, turn,
                             o_desc, O, LSE, QD, KD, VD, sqd_b, sqd_h, skd_b, skd_h, svd_b, svd_h,
                             b, h, hk, m0, q_start, seqlen_q, seqlen_k, off, window_left, window_right, qk_scale,
                             cap_out,
                             nb_lo, fu_lo, fu_hi, nb_hi, stride_os, stride_oh, stride_lb, stride_lh,
                             1, HEAD_DIM, BLOCK_D, SUB_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR, HAS_SOFTCAP, IS_VARLEN,
                             CVT_ASM, ROW_TREE, SKIP_RESCALE, EXP_POLY, WAIT_FENCE,
                             NUM_CONSUMERS, TRACE_BUF, TRACE_CAP, trace_prog, TRACE)),
            (_ws_producer, (q_desc, k_desc, vt_desc, q_bufs, k_bufs, vt_bufs, q_bars, k_full, v_full, k_empty, v_empty,
                            b, h, hk, q_start, k_start, m0, nb_lo, n_total, SUB_M, BLOCK_N, NUM_STAGES, IS_VARLEN,
                            NUM_CONSUMERS, True)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


# ---------------------------------------------------------------------------------------
# persistent: the ws partitions over a host-computed tile list (dense calls)
# ---------------------------------------------------------------------------------------


@gluon.jit
def _fp8_pers_producer(TILES, OFFS, q_desc, k_desc, vt_desc, q_bufs, k_bufs, vt_bufs, q_bars, q_empty,
                       k_full, v_full, k_empty, v_empty, n_mb, nheads, group, seqlen_q, seqlen_k, wl, wr,
                       SUB_M: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                       HAS_WL: gl.constexpr, HAS_WR: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
                       Q_BUFS: gl.constexpr):
    """1 warp, for each tile of this program: every consumer's Q share into its buffer ``j % Q_BUFS``
    (once that buffer's previous tile released it, ``q_empty``), then the tile's K / V^T blocks into the
    ring, which runs on across tiles. With 2 Q buffers the next tile's Q lands while this one's last
    blocks still run, so no consumer waits for it."""
    start, end = _pers_range(OFFS)
    it = 0
    for t in range(start, end):
        j = t - start
        b, h, m0, nb_lo, fu_lo, fu_hi, nb_hi = _pers_tile(TILES, t, n_mb, nheads, seqlen_q, seqlen_k, wl, wr,
                                                          HAS_WL, HAS_WR, BLOCK_M, BLOCK_N)
        for c in gl.static_range(NUM_CONSUMERS):
            qi = c * Q_BUFS + j % Q_BUFS
            mbarrier.wait(q_empty.index(qi), ((j // Q_BUFS) & 1) ^ 1)
            mbarrier.expect(q_bars.index(qi), q_desc.block_type.nbytes)
            _tma_load(q_desc, q_bars.index(qi), q_bufs.index(qi), b, m0 + c * SUB_M, h, False)
        n_total = nb_hi - nb_lo
        _ws_load_kv(k_desc, vt_desc, k_bufs, vt_bufs, k_full, v_full, k_empty, v_empty, b, h // group, 0, nb_lo,
                    n_total, it, BLOCK_N, NUM_STAGES, False, True)
        it += n_total


@gluon.jit
def _fp8_pers_consumer(TILES, OFFS, q_bufs, k_bufs, vt_bufs, o_bufs, q_bars, q_empty, k_full, v_full, k_empty,
                       v_empty, turn, o_desc, O, LSE, QD, KD, VD, sqd_b, sqd_h, skd_b, skd_h, svd_b, svd_h,
                       n_mb, nheads, group, seqlen_q, seqlen_k, wl, wr, qk_scale0, cap_out,
                       stride_os, stride_oh, stride_lb, stride_lh,
                       CID: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, SUB_M: gl.constexpr,
                       BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, NUM_STAGES: gl.constexpr,
                       HAS_WL: gl.constexpr, HAS_WR: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
                       CVT_ASM: gl.constexpr, ROW_TREE: gl.constexpr, SKIP_RESCALE: gl.constexpr,
                       EXP_POLY: gl.constexpr, WAIT_FENCE: gl.constexpr, NUM_CONSUMERS: gl.constexpr,
                       Q_BUFS: gl.constexpr):
    """One consumer warpgroup over this program's tiles (rows ``m0 + CID * SUB_M ..`` of each), each as
    :func:`_fp8_consumer`'s tile; the ring iteration and the turns run on across tiles, the Q buffer is
    released once the tile's products are waited for, and the output's TMA store is left in flight
    until the next tile's epilogue (``_epilogue``'s ``STORE_AHEAD``)."""
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_N, 32])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BLOCK_D, 32])
    row_layout: gl.constexpr = gl.SliceLayout(1, s_layout)
    start, end = _pers_range(OFFS)
    off = seqlen_k - seqlen_q
    zero = start * 0
    it = 0
    for t in range(start, end):
        j = t - start
        b, h, m0, nb_lo, fu_lo, fu_hi, nb_hi = _pers_tile(TILES, t, n_mb, nheads, seqlen_q, seqlen_k, wl, wr,
                                                          HAS_WL, HAS_WR, BLOCK_M, BLOCK_N)
        hk = h // group
        qk_scale, v_descale = _fp8_scales(QD, KD, VD, sqd_b, sqd_h, skd_b, skd_h, svd_b, svd_h, b, hk, qk_scale0)
        r0 = m0 + CID * SUB_M
        rows = r0 + gl.arange(0, SUB_M, layout=row_layout)
        qi = CID * Q_BUFS + j % Q_BUFS
        q_phase = (j // Q_BUFS) & 1
        mbarrier.wait(q_bars.index(qi), q_phase)
        acc, l_row, m_i = _fp8_tile(q_bufs.index(qi), q_bars.index(qi), q_phase, k_bufs, vt_bufs, k_full, v_full,
                                    k_empty, v_empty, turn, it, rows, seqlen_k, off, wl, wr, qk_scale, cap_out,
                                    nb_lo, fu_lo, fu_hi, nb_hi, CID, SUB_M, BLOCK_D, BLOCK_N, NUM_STAGES, HAS_WL,
                                    HAS_WR, HAS_SOFTCAP, s_layout, o_layout, row_layout, True, CVT_ASM, ROW_TREE,
                                    SKIP_RESCALE, EXP_POLY, WAIT_FENCE, NUM_CONSUMERS)
        mbarrier.arrive(q_empty.index(qi))  # (every product reading this Q was waited for in the tile)
        if VD is not None:
            acc = acc * v_descale
        if r0 < seqlen_q:
            _epilogue(acc, l_row, m_i, o_bufs.index(CID), o_desc, O, LSE, b, h, r0, zero, seqlen_q,
                      stride_os, stride_oh, stride_lb, stride_lh,
                      False, SUB_M, HEAD_DIM, BLOCK_D, row_layout, o_layout, STORE_AHEAD=True)
        it += nb_hi - nb_lo
    tma.store_wait(0)


@gluon.jit(do_not_specialize=_NO_SPECIALIZE_FP8 + ["n_mb", "nheads"])
def attn_fwd_persistent_fp8(
    q_desc, k_desc, vt_desc, o_desc, O, LSE, TILES, OFFS, QD, KD, VD,
    sqd_b, sqd_h, skd_b, skd_h, svd_b, svd_h,
    stride_os, stride_oh, stride_lb, stride_lh,
    seqlen_q, seqlen_k, group, n_mb, nheads, qk_scale, cap_out, window_left, window_right,
    HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    NUM_STAGES: gl.constexpr, HAS_WL: gl.constexpr, HAS_WR: gl.constexpr, HAS_SOFTCAP: gl.constexpr,
    CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
    CVT_ASM: gl.constexpr, ROW_TREE: gl.constexpr, SKIP_RESCALE: gl.constexpr, num_warps: gl.constexpr,
    EXP_POLY: gl.constexpr = 0, WAIT_FENCE: gl.constexpr = False, NUM_CONSUMERS: gl.constexpr = 2,
    Q_BUFS: gl.constexpr = 2,
):
    """Dense calls only. Grid ``(len(OFFS) - 1,)``: program ``p`` runs the tiles ``TILES[OFFS[p]:OFFS[p + 1]]``
    (int32 codes ``(b * nheads + h) * n_mb + m_block``, :func:`flashtile.backends.hopper.sched.schedule`) with
    :func:`attn_fwd_ws_fp8`'s partitions and arguments; ``Q_BUFS`` (1 or 2) Q buffers per consumer."""
    SUB_M: gl.constexpr = BLOCK_M // NUM_CONSUMERS
    dtype: gl.constexpr = q_desc.dtype
    qk_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=q_desc.layout.swizzle_byte_width,
                                                   element_bitwidth=8, rank=2)
    vt_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=vt_desc.layout.swizzle_byte_width,
                                                   element_bitwidth=8, rank=2)
    o_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=o_desc.layout.swizzle_byte_width,
                                                  element_bitwidth=16, rank=2)
    q_bufs = gl.allocate_shared_memory(dtype, [NUM_CONSUMERS * Q_BUFS, SUB_M, BLOCK_D], qk_layout)
    k_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_N, BLOCK_D], qk_layout)
    vt_bufs = gl.allocate_shared_memory(dtype, [NUM_STAGES, BLOCK_D, BLOCK_N], vt_layout)
    o_bufs = gl.allocate_shared_memory(o_desc.dtype, [NUM_CONSUMERS, SUB_M, BLOCK_D], o_layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS * Q_BUFS, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS * Q_BUFS, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [NUM_CONSUMERS, 1], mbarrier.MBarrierLayout())
    k_full = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_full = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [NUM_STAGES, 1], mbarrier.MBarrierLayout())
    for c in gl.static_range(NUM_CONSUMERS * Q_BUFS):
        mbarrier.init(q_bars.index(c), count=1)
        mbarrier.init(q_empty.index(c), count=1)
    for c in gl.static_range(NUM_CONSUMERS):
        mbarrier.init(turn.index(c), count=1)
    for i in gl.static_range(NUM_STAGES):
        mbarrier.init(k_full.index(i), count=1)
        mbarrier.init(v_full.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=NUM_CONSUMERS)  # one arrival per consumer warpgroup
        mbarrier.init(v_empty.index(i), count=NUM_CONSUMERS)
    # (tuples spelled out per consumer count, as attn_fwd_ws_fp8's)
    if NUM_CONSUMERS == 3:
        gl.warp_specialize([
            (_fp8_pers_consumer, (TILES, OFFS, q_bufs, k_bufs, vt_bufs, o_bufs, q_bars, q_empty, k_full, v_full,
                                  k_empty, v_empty, turn, o_desc, O, LSE, QD, KD, VD, sqd_b, sqd_h, skd_b, skd_h,
                                  svd_b, svd_h, n_mb, nheads, group, seqlen_q, seqlen_k, window_left, window_right,
                                  qk_scale, cap_out, stride_os, stride_oh, stride_lb, stride_lh,
                                  0, HEAD_DIM, BLOCK_D, SUB_M, BLOCK_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR,
                                  HAS_SOFTCAP, CVT_ASM, ROW_TREE, SKIP_RESCALE, EXP_POLY, WAIT_FENCE, NUM_CONSUMERS,
                                  Q_BUFS)),
            (_fp8_pers_consumer, (TILES, OFFS, q_bufs, k_bufs, vt_bufs, o_bufs, q_bars, q_empty, k_full, v_full,
                                  k_empty, v_empty, turn, o_desc, O, LSE, QD, KD, VD, sqd_b, sqd_h, skd_b, skd_h,
                                  svd_b, svd_h, n_mb, nheads, group, seqlen_q, seqlen_k, window_left, window_right,
                                  qk_scale, cap_out, stride_os, stride_oh, stride_lb, stride_lh,
                                  1, HEAD_DIM, BLOCK_D, SUB_M, BLOCK_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR,
                                  HAS_SOFTCAP, CVT_ASM, ROW_TREE, SKIP_RESCALE, EXP_POLY, WAIT_FENCE, NUM_CONSUMERS,
                                  Q_BUFS)),
            (_fp8_pers_consumer, (TILES, OFFS, q_bufs, k_bufs, vt_bufs, o_bufs, q_bars, q_empty, k_full, v_full,
                                  k_empty, v_empty, turn, o_desc, O, LSE, QD, KD, VD, sqd_b, sqd_h, skd_b, skd_h,
                                  svd_b, svd_h, n_mb, nheads, group, seqlen_q, seqlen_k, window_left, window_right,
                                  qk_scale, cap_out, stride_os, stride_oh, stride_lb, stride_lh,
                                  2, HEAD_DIM, BLOCK_D, SUB_M, BLOCK_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR,
                                  HAS_SOFTCAP, CVT_ASM, ROW_TREE, SKIP_RESCALE, EXP_POLY, WAIT_FENCE, NUM_CONSUMERS,
                                  Q_BUFS)),
            (_fp8_pers_producer, (TILES, OFFS, q_desc, k_desc, vt_desc, q_bufs, k_bufs, vt_bufs, q_bars, q_empty,
                                  k_full, v_full, k_empty, v_empty, n_mb, nheads, group, seqlen_q, seqlen_k,
                                  window_left, window_right, SUB_M, BLOCK_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR,
                                  NUM_CONSUMERS, Q_BUFS)),
        ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize([
            (_fp8_pers_consumer, (TILES, OFFS, q_bufs, k_bufs, vt_bufs, o_bufs, q_bars, q_empty, k_full, v_full,
                                  k_empty, v_empty, turn, o_desc, O, LSE, QD, KD, VD, sqd_b, sqd_h, skd_b, skd_h,
                                  svd_b, svd_h, n_mb, nheads, group, seqlen_q, seqlen_k, window_left, window_right,
                                  qk_scale, cap_out, stride_os, stride_oh, stride_lb, stride_lh,
                                  0, HEAD_DIM, BLOCK_D, SUB_M, BLOCK_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR,
                                  HAS_SOFTCAP, CVT_ASM, ROW_TREE, SKIP_RESCALE, EXP_POLY, WAIT_FENCE, NUM_CONSUMERS,
                                  Q_BUFS)),
            (_fp8_pers_consumer, (TILES, OFFS, q_bufs, k_bufs, vt_bufs, o_bufs, q_bars, q_empty, k_full, v_full,
                                  k_empty, v_empty, turn, o_desc, O, LSE, QD, KD, VD, sqd_b, sqd_h, skd_b, skd_h,
                                  svd_b, svd_h, n_mb, nheads, group, seqlen_q, seqlen_k, window_left, window_right,
                                  qk_scale, cap_out, stride_os, stride_oh, stride_lb, stride_lh,
                                  1, HEAD_DIM, BLOCK_D, SUB_M, BLOCK_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR,
                                  HAS_SOFTCAP, CVT_ASM, ROW_TREE, SKIP_RESCALE, EXP_POLY, WAIT_FENCE, NUM_CONSUMERS,
                                  Q_BUFS)),
            (_fp8_pers_producer, (TILES, OFFS, q_desc, k_desc, vt_desc, q_bufs, k_bufs, vt_bufs, q_bars, q_empty,
                                  k_full, v_full, k_empty, v_empty, n_mb, nheads, group, seqlen_q, seqlen_k,
                                  window_left, window_right, SUB_M, BLOCK_M, BLOCK_N, NUM_STAGES, HAS_WL, HAS_WR,
                                  NUM_CONSUMERS, Q_BUFS)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
