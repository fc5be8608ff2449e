"""@triton.jit pieces shared by the forward, backward and decode kernels (inlined where called).

Scores live in base 2: the host folds ``log2(e)`` into the scale (and into the softcap / ALiBi
constants), so the softmax uses ``exp2`` and a stored lse is converted back to natural log.
Every switch stays a constexpr parameter, so the branches a kernel does not use are removed at
compile time exactly as if the code were written out in the kernel.

Layout of a tensor seen by a program: ``PTR + b * stride_b + h * stride_h + row * stride_s + d``
(head dim contiguous). Row indices are relative to the program's sequence (``start`` from
:func:`_seq_bounds`); ``off = seqlen_k - seqlen_q`` aligns query row i with key column i + off
(bottom-right), so row i sees columns ``[i + off - wl, i + off + wr]``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.random import philox_impl

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)

# ---------------------------------------------------------------------------------------
# math
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
def _tanh(x, FAST: tl.constexpr = False):
    """tanh of an fp32 tensor. FAST (compiled for CUDA only, never under the interpreter): the
    hardware's tanh.approx.f32, one special-function op instead of two (exp2 and a reciprocal)
    and a few fewer ALU ops; max relative error about 2^-11, the same approximation flash-attn's
    softcap uses. The backward asks for it with fp16/bf16 inputs, where it is about fp16's own
    rounding and below bf16's (benchmarks/NOTES.md, "Triton holes")."""
    if FAST and _ASM_TANH:
        return tl.inline_asm_elementwise("tanh.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True,
                                         pack=1)  # fmt: skip
    else:
        # tanh(x) = sign(x) * (1 - e) / (1 + e), e = exp(-2|x|): no overflow, no cancellation near 0
        e = tl.exp2(-2.8853900817779268 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        return tl.where(x < 0, -t, t)


#: inline PTX is usable: the kernels are compiled (not interpreted) and the build is not ROCm.
_ASM_TANH = tl.constexpr(type(_tanh).__name__ != "InterpretedFunction" and torch.version.hip is None)


# ---------------------------------------------------------------------------------------
# per-program prologue: sequence bounds, base pointers, ALiBi slope
# ---------------------------------------------------------------------------------------


@triton.jit
def _block_id(REVERSE: tl.constexpr):
    """This program's row block along grid axis 0; REVERSE (causal): the last blocks, which
    have the most keys to visit, start first."""
    pid = tl.program_id(0)
    if REVERSE:
        pid = tl.num_programs(0) - 1 - pid
    return pid


@triton.jit
def _seq_bounds(CU, b, seqlen, IS_VARLEN: tl.constexpr):
    """(first row, length) of sequence b: from cu_seqlens when IS_VARLEN (packed rows), else
    (0, the batch's common seqlen)."""
    if IS_VARLEN:
        start = tl.load(CU + b)
        seqlen = tl.load(CU + b + 1) - start
    else:
        start = b * 0
    return start, seqlen


@triton.jit
def _seqlens_qk(CU_Q, CU_K, b, seqlen_q, seqlen_k, IS_VARLEN: tl.constexpr):
    """(q_start, seqlen_q, k_start, seqlen_k) of sequence (or batch row) b."""
    q_start, seqlen_q = _seq_bounds(CU_Q, b, seqlen_q, IS_VARLEN)
    k_start, seqlen_k = _seq_bounds(CU_K, b, seqlen_k, IS_VARLEN)
    return q_start, seqlen_q, k_start, seqlen_k


@triton.jit
def _head_ptr(PTR, b, h, stride_b, stride_h):
    """PTR at (batch b, head h), in 64-bit offsets."""
    return PTR + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def _row_ptr(PTR, b, h, row, stride_b, stride_h, stride_s):
    """PTR at (batch b, head h, row), in 64-bit offsets."""
    return _head_ptr(PTR, b, h, stride_b, stride_h) + row.to(tl.int64) * stride_s


@triton.jit
def _tile_ptrs(PTR, b, h, row, offs, offs_d, stride_b, stride_h, stride_s):
    """(rows, head dim) pointers of rows row + offs of (batch b, head h)."""
    return _row_ptr(PTR, b, h, row, stride_b, stride_h, stride_s) + offs[:, None] * stride_s + offs_d[None, :]


@triton.jit
def _alibi_slope(ALIBI, b, h, stride_ab, mul, HAS_ALIBI: tl.constexpr):
    """ALiBi slope of (batch b, head h) times mul (log2(e): scores are in base 2); 0.0 without
    ALiBi. h may be a tensor of heads (one slope each)."""
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(ALIBI + b * stride_ab + h) * mul
    return slope


# ---------------------------------------------------------------------------------------
# blocks of the key (or query) loop
# ---------------------------------------------------------------------------------------


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


@triton.jit
def _masked_block(i, n_a, nb_lo, fu_hi):
    """The i-th masked block of a _block_range: the n_a = fu_lo - nb_lo blocks from nb_lo,
    then those from fu_hi."""
    return tl.where(i < n_a, nb_lo + i, fu_hi + i - n_a)


@triton.jit
def _block_ptrs(base, start, offs, offs_d, stride, TRANS: tl.constexpr):
    """Pointers to rows start + offs of a (rows, head dim) tensor at base; TRANS: laid out
    (head dim, rows)."""
    b = base + tl.cast(start, tl.int64) * stride
    if TRANS:
        return b + offs[None, :] * stride + offs_d[:, None]
    else:
        return b + offs[:, None] * stride + offs_d[None, :]


@triton.jit
def _load_block(ptrs, idx, n, offs_d, HEAD_DIM: tl.constexpr,
                MASKED: tl.constexpr, PAD_D: tl.constexpr, TRANS: tl.constexpr):  # fmt: skip
    """Load a block from _block_ptrs (rows idx). MASKED: rows >= n and padded head-dim columns
    read 0; else only padded columns, if PAD_D (an interior block needs no row bounds)."""
    if TRANS:
        if MASKED:
            x = tl.load(ptrs, mask=(idx[None, :] < n) & (offs_d[:, None] < HEAD_DIM), other=0.0)
        elif PAD_D:
            x = tl.load(ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
        else:
            x = tl.load(ptrs)
    else:
        if MASKED:
            x = tl.load(ptrs, mask=(idx[:, None] < n) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        elif PAD_D:
            x = tl.load(ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        else:
            x = tl.load(ptrs)
    return x


# ---------------------------------------------------------------------------------------
# scores and masks of a tile
# ---------------------------------------------------------------------------------------


@triton.jit
def _scores(qk, rr, cc, off, qk_scale, cap_out, slope2, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
            FAST_TANH: tl.constexpr = False):  # fmt: skip
    """Base-2 scores from raw q.k products; rr / cc are broadcastable row / column indices.

    Returns (s, t) with t = tanh(...) when HAS_SOFTCAP (needed by the backward), else s.
    Plain: s = qk * scale * log2e. Softcap: s = cap * log2e * tanh(qk * scale / cap), with
    _tanh's FAST approximation when FAST_TANH.
    ALiBi adds -slope * log2e * |i + off - j| (slope2 broadcastable to the tile).
    """
    if HAS_SOFTCAP:
        t = _tanh(qk * qk_scale, FAST_TANH)
        s = t * cap_out
    else:
        s = qk * qk_scale
        t = s
    if HAS_ALIBI:
        dist = rr + off - cc
        s = s - slope2 * tl.abs(dist).to(tl.float32)
    return s, t


@triton.jit
def _window(m, rr, cc, off, wl, wr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr):
    """m restricted to the (row, col) pairs inside the window (bottom-right aligned)."""
    if HAS_WR:
        m = m & (cc <= rr + off + wr)
    if HAS_WL:
        m = m & (cc >= rr + off - wl)
    return m


@triton.jit
def _visible(rr, cc, off, seqlen_r, seqlen_c, wl, wr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr):
    """Visibility of (row, col) pairs: in range, and inside the window."""
    return _window((rr < seqlen_r) & (cc < seqlen_c), rr, cc, off, wl, wr, HAS_WL, HAS_WR)


@triton.jit
def _score_tile(a, b, rr, cc, off, seqlen_r, seqlen_c, wl, wr, qk_scale, cap_out, slope2,
                MASKED: tl.constexpr, HAS_WL: tl.constexpr, HAS_WR: tl.constexpr,
                HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, UPCAST: tl.constexpr,
                FAST_TANH: tl.constexpr = False):  # fmt: skip
    """(s, t) of _scores for the q.k products a @ b; MASKED: s = -inf where (rr, cc) is not
    visible (an interior tile needs no mask)."""
    qk = _mm(a, b, UPCAST)
    s, t = _scores(qk, rr, cc, off, qk_scale, cap_out, slope2, HAS_SOFTCAP, HAS_ALIBI, FAST_TANH)
    if MASKED:
        vis = _visible(rr, cc, off, seqlen_r, seqlen_c, wl, wr, HAS_WL, HAS_WR)
        s = tl.where(vis, s, float("-inf"))
    return s, t


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


# ---------------------------------------------------------------------------------------
# online softmax
# ---------------------------------------------------------------------------------------


@triton.jit
def _softmax_step(s, m_i, l_i, MASKED: tl.constexpr):
    """One tile of base-2 scores s (rows along dim 0) into the running (max m_i, sum l_i):
    returns (p, alpha, l_i, m_new); the caller rescales its accumulator by alpha. MASKED: a row
    that has seen no visible key yet keeps m = -inf and subtracts 0 instead (no NaN)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if MASKED:
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_use = m_new
    p = tl.exp2(s - m_use[:, None])
    alpha = tl.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    return p, alpha, l_i, m_new


@triton.jit
def _softmax_sink(acc, m_i, l_i, sink2):
    """Fold a base-2 sink logit (a scalar, or one per row) into the running (acc, l_i, m_i) as one
    more key without value (learnable_sink): returns the updated (acc, l_i, m_i). A row that saw no
    key gets m = sink, l = 1 and keeps acc = 0, so _softmax_end gives it out 0 and lse = sink."""
    m_new = tl.maximum(m_i, sink2)
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.exp2(sink2 - m_new)
    return acc * alpha[:, None], l_i, m_new


@triton.jit
def _softmax_end(acc, m_i, l_i, scale, DIVIDE: tl.constexpr):
    """(out, lse in natural log) from the running (acc, m_i, l_i): out = acc * (scale / l), or
    acc / l when DIVIDE. A row that saw no key keeps acc (zeros) and gets lse = -inf."""
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    if DIVIDE:
        out = acc / l_safe[:, None]
    else:
        out = acc * (scale / l_safe)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    return out, lse
