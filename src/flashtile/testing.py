"""Test support for flashtile: the oracle, flash-attn's tolerance rule, input makers, and the
plain-PyTorch baselines that the tests, ``flashtile check`` and the benchmarks share.

* **The oracle** :func:`attention_ref` materialises the (seqlen_q x seqlen_k) score matrix and
  supports every option of the public API. It runs in two modes: ``upcast=True`` (default)
  computes in float32 (float64 for float64 inputs), the "ref"; ``upcast=False`` computes in the
  input dtype, as a plain PyTorch implementation would, the "pt" baseline.
  :func:`attention_probs_ref` gives its probabilities after dropout.
* **The tolerance rule** (flash-attn's): an implementation's error against "ref" must be at most
  :data:`FWD_FACTOR` (2) times that of "pt" for out and lse, :data:`BWD_FACTOR` (3) times for
  gradients, plus a tiny atol (:func:`tolerance`). The tests use the absolute atols
  :data:`FWD_ATOL` / :data:`BWD_ATOL` / :data:`LSE_ATOL` (:func:`assert_close_to_ref`,
  :func:`compare_with_oracle`); ``flashtile check`` uses a few eps of the dtype, scaled by the
  oracle's magnitude (:func:`eps_atol`).
* **Inputs**: :func:`qkv_inputs`, :func:`make_alibi`, :func:`cu_seqlens`.
* **Baselines for benchmarks**: :func:`standard_attention` (textbook attention that holds the
  whole score matrix) and :func:`attention_flops` (the FLOP count behind every TFLOP/s figure).

Everything here is O(seqlen_q * seqlen_k) in memory: for tests, checks and benchmarks only.
This module imports torch and flashtile's pure helpers only (no pytest).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .mask import alibi_bias, visible

__all__ = [
    "ATOL_EPS",
    "BWD_ATOL",
    "BWD_FACTOR",
    "FWD_ATOL",
    "FWD_FACTOR",
    "LSE_ATOL",
    "MAX_TEST_SCALE",
    "assert_close_to_ref",
    "assert_lse_close",
    "attention_flops",
    "attention_probs_ref",
    "attention_ref",
    "compare_with_oracle",
    "cu_seqlens",
    "eps_atol",
    "make_alibi",
    "mask_from_block_mask",
    "mask_from_mod",
    "max_err",
    "qkv_inputs",
    "standard_attention",
    "tolerance",
]

# ----------------------------------------------------------------------------------------------
# the oracle


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    query_padding_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    upcast: bool = True,
    learnable_sink: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    score_mod: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention in the dense layout.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        k, v: ``(batch, seqlen_k, nheads_k, headdim)``; ``nheads % nheads_k == 0``; v may have its
            own head dim ``headdim_v`` (then so does out).
        query_padding_mask / key_padding_mask: optional bool ``(batch, seqlen)``, True = real token.
            Sequences are taken as right-padded: the causal/window alignment uses each
            sequence's own lengths, exactly as the varlen API does.
        causal, window_size, softcap, alibi_slopes, softmax_scale: as in ``flash_attn_func``.
        dropout_p, dropout_mask: bool keep mask ``(batch, nheads, seqlen_q, seqlen_k)``; kept
            probabilities are scaled by ``1 / (1 - dropout_p)``.
        upcast: compute in float32 (True) or in the input dtype (False).
        learnable_sink: optional ``(nheads,)`` sink logits: one more column of the scores per
            row, without value (its probability is dropped after the softmax, before dropout);
            cast to the compute dtype.
        mask: optional dense bool mask broadcastable to ``(batch, nheads, seqlen_q, seqlen_k)``,
            True = visible (combined with the others): e.g. :func:`mask_from_mod`,
            :func:`mask_from_block_mask`.
        score_mod: optional ``score_mod(score, b, h, q_idx, kv_idx)`` applied to the whole score
            matrix (after scale, softcap and ALiBi, before the masks) with index tensors ``b (batch,
            1, 1, 1)``, ``h (1, nheads, 1, 1)``, ``q_idx (1, 1, seqlen_q, 1)``, ``kv_idx (1, 1, 1,
            seqlen_k)``; positions within each (right-padded) sequence.

    Returns:
        ``(out, lse)``: out ``(batch, seqlen_q, nheads, headdim_v)`` in q's dtype, lse float32
        ``(batch, nheads, seqlen_q)``; rows that see no key give out = 0 and lse = -inf (with a
        sink: lse = the sink).
    """
    dtype_og = q.dtype
    if upcast:
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    g = h // hk
    k = k.repeat_interleave(g, dim=2)
    v = v.repeat_interleave(g, dim=2)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    scores = torch.einsum("bthd,bshd->bhts", q * scale if softcap == 0 else q, k)
    if softcap > 0:
        scores = torch.tanh(scores * (scale / softcap)) * softcap
    rows = torch.arange(sq, device=q.device)
    cols = torch.arange(sk, device=q.device)
    if query_padding_mask is not None or key_padding_mask is not None:
        len_q = query_padding_mask.sum(-1) if query_padding_mask is not None else torch.full((b,), sq)
        len_k = key_padding_mask.sum(-1) if key_padding_mask is not None else torch.full((b,), sk)
        offset = (len_k - len_q).to(q.device).view(b, 1, 1, 1)
    else:
        offset = sk - sq
    if alibi_slopes is not None:
        slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes.unsqueeze(0).expand(b, h)
        scores = scores + alibi_bias(slopes.view(b, h, 1, 1), rows, cols, offset).to(scores.dtype)
    if score_mod is not None:
        idx = dict(dtype=torch.int32, device=q.device)
        bi, hi = torch.arange(b, **idx).view(b, 1, 1, 1), torch.arange(h, **idx).view(1, h, 1, 1)
        qi, ki = torch.arange(sq, **idx).view(1, 1, sq, 1), torch.arange(sk, **idx).view(1, 1, 1, sk)
        scores = score_mod(scores, bi, hi, qi, ki).to(scores.dtype).expand(scores.shape)
    left, right = window_size
    if causal:
        right = 0
    vis = visible(rows, cols, offset, left, right)
    masked = torch.zeros(1, dtype=torch.bool, device=q.device)
    if mask is not None:
        masked = masked | ~mask.to(q.device)
    if vis is not None:
        masked = masked | ~vis
    if key_padding_mask is not None:
        masked = masked | ~key_padding_mask.view(b, 1, 1, sk)
    scores = scores.masked_fill(masked, float("-inf"))
    if learnable_sink is not None:  # the sink column: finite, so every row's max and sum are too
        sink = learnable_sink.to(scores.dtype).view(1, h, 1, 1).expand(b, h, sq, 1)
        ext = torch.cat([scores, sink], dim=-1)
        lse = torch.logsumexp(ext.float(), dim=-1)
        e = torch.exp(ext - ext.amax(dim=-1, keepdim=True))
        p = e[..., :sk] / e.sum(-1, keepdim=True)
    else:
        p, lse = _softmax(scores, sk)
    if dropout_p > 0.0:
        if dropout_mask is None:
            raise ValueError("attention_ref needs dropout_mask when dropout_p > 0")
        p = p.masked_fill(~dropout_mask, 0.0) / (1.0 - dropout_p)
    out = torch.einsum("bhts,bshd->bthd", p.to(v.dtype), v)
    if query_padding_mask is not None:
        out = out.masked_fill(~query_padding_mask.view(b, sq, 1, 1), 0.0)
        lse = lse.masked_fill(~query_padding_mask.view(b, 1, sq), float("-inf"))
    return out.to(dtype_og), lse


def mask_from_mod(mask_mod: Callable, b: int | None, h: int | None, sq: int, sk: int, device="cpu") -> torch.Tensor:
    """A mask_mod as a dense bool ``(b or 1, h or 1, sq, sk)`` mask for :func:`attention_ref`."""
    from .flex import dense_mask

    return dense_mask(mask_mod, b, h, sq, sk, device)


def mask_from_block_mask(block_mask: Any, sq: int, sk: int) -> torch.Tensor:
    """The dense bool ``(B, H, sq, sk)`` mask a block mask defines (FlexAttention's semantics:
    skipped blocks hidden, full blocks visible, partial blocks by ``mask_mod``)."""
    from .flex import BlockMask, dense_mask

    if not hasattr(block_mask, "block_states"):
        block_mask = BlockMask.from_kv_blocks(
            block_mask.kv_num_blocks, block_mask.kv_indices, block_mask.full_kv_num_blocks,
            block_mask.full_kv_indices, tuple(block_mask.BLOCK_SIZE), block_mask.mask_mod,
            tuple(block_mask.seq_lengths),
        )  # fmt: skip
    st = block_mask.block_states()
    bq, bk = block_mask.BLOCK_SIZE
    st = st.repeat_interleave(bq, 2).repeat_interleave(bk, 3)[:, :, :sq, :sk]
    B, H = st.shape[:2]
    mm = block_mask.mask_mod
    part = dense_mask(mm, B, H, sq, sk, st.device) if mm is not None else torch.ones_like(st, dtype=torch.bool)
    return (st == 2) | ((st == 1) & part)


def _softmax(scores: torch.Tensor, sk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row softmax of masked scores and its lse; rows without a key give p = 0, lse = -inf."""
    lse = torch.logsumexp(scores.float(), dim=-1)
    m = scores.amax(dim=-1, keepdim=True) if sk > 0 else scores.new_zeros((*scores.shape[:-1], 1))
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(scores - m)
    denom = p.sum(-1, keepdim=True)
    return p / torch.where(denom == 0, torch.ones_like(denom), denom), lse


def attention_probs_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    **kwargs: Any,
) -> torch.Tensor:
    """The attention probabilities ``(batch, nheads, seqlen_q, seqlen_k)`` after dropout (zeros
    where dropped, kept entries scaled by ``1 / (1 - p)``), such that ``out = probs @ v``.
    Same arguments as :func:`attention_ref`; computed in float32."""
    # Recover P from the reference by running it with v = identity over keys.
    b, sk = k.shape[0], k.shape[1]
    h = q.shape[2]
    hk = k.shape[2]
    eye = torch.eye(sk, dtype=torch.float32, device=q.device)
    v_eye = eye.view(1, sk, 1, sk).expand(b, sk, hk, sk)
    probs, _ = attention_ref(q.float(), k.float(), v_eye, **kwargs)
    return probs.permute(0, 2, 1, 3).reshape(b, h, q.shape[1], sk)


# ----------------------------------------------------------------------------------------------
# baselines for benchmarks


def standard_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = False,
    *,
    layout: str = "bshd",
    softmax_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Textbook attention in plain PyTorch: materialises the (seqlen_q x seqlen_k) scores and
    probabilities, ``softmax(q k^T / sqrt(d)) v``; the memory baseline flashtile avoids.

    Args:
        q, k, v: ``(batch, seqlen, nheads, headdim)`` for ``layout="bshd"`` (flash-attn's layout,
            transposed as views), ``(batch, nheads, seqlen, headdim)`` for ``"bhsd"`` (SDPA's).
            Same number of heads for q, k and v.
        causal: bottom-right aligned causal mask (query ``i`` sees keys ``j <= i + sk - sq``).
        softmax_dtype: compute the softmax in this dtype (e.g. float32 for bf16 inputs); the
            default is the input dtype.

    Returns:
        The output in the input layout and dtype.
    """
    if layout not in ("bshd", "bhsd"):
        raise ValueError(f"layout must be 'bshd' or 'bhsd', got {layout!r}")
    if layout == "bshd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    s = torch.matmul(q * q.shape[-1] ** -0.5, k.transpose(-1, -2))
    if causal:
        sq, sk = s.shape[-2:]
        hidden = torch.ones(sq, sk, dtype=torch.bool, device=s.device).triu(sk - sq + 1)
        s = s.masked_fill(hidden, float("-inf"))
    p = torch.softmax(s if softmax_dtype is None else s.to(softmax_dtype), dim=-1).to(v.dtype)
    out = torch.matmul(p, v)
    return out.transpose(1, 2) if layout == "bshd" else out


#: FLOPs of each pass relative to the forward: the backward does 2.5x the forward's matmul work.
_PASS_FLOPS = {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}


def attention_flops(
    batch: int, nheads: int, seqlen: int, headdim: int, causal: bool = False, mode: str = "fwd"
) -> float:
    """Matmul FLOPs of attention, the convention behind every TFLOP/s figure (flash-attn's):
    forward ``4 * batch * nheads * seqlen**2 * headdim`` (two matmuls), halved when causal;
    ``mode`` ``"bwd"`` is 2.5x the forward, ``"fwd_bwd"`` 3.5x."""
    if mode not in _PASS_FLOPS:
        raise ValueError(f"mode must be one of {', '.join(_PASS_FLOPS)}, got {mode!r}")
    f = 4.0 * batch * nheads * seqlen * seqlen * headdim
    if causal:
        f /= 2
    return f * _PASS_FLOPS[mode]


# ----------------------------------------------------------------------------------------------
# inputs


def qkv_inputs(
    b: int,
    sq: int,
    sk: int,
    h: int,
    hk: int,
    d: int,
    dtype: torch.dtype,
    device: torch.device | str,
    *,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fresh standard-normal q ``(b, sq, h, d)``, k and v ``(b, sk, hk, d)``, drawn in that order
    (from ``generator`` when given, else torch's global generator)."""
    q = torch.randn(b, sq, h, d, dtype=dtype, device=device, generator=generator)
    k = torch.randn(b, sk, hk, d, dtype=dtype, device=device, generator=generator)
    v = torch.randn(b, sk, hk, d, dtype=dtype, device=device, generator=generator)
    return q, k, v


def make_alibi(
    kind: str | None,
    b: int,
    h: int,
    device: torch.device | str,
    *,
    low: float = 0.01,
    width: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor | None:
    """ALiBi slopes: None for ``kind`` None or ``""``, ``"h"`` for shape ``(h,)``, ``"bh"`` for
    ``(b, h)``; float32, uniform in ``[low, low + width)`` (default [0.01, 0.51))."""
    if not kind:
        return None
    shape = (h,) if kind == "h" else (b, h)
    return torch.rand(shape, device=device, dtype=torch.float32, generator=generator) * width + low


def cu_seqlens(lens: Sequence[int], device: torch.device | str) -> torch.Tensor:
    """int32 cu_seqlens ``(len(lens) + 1,)``: 0 and the running sums of the sequence lengths."""
    out = [0]
    for n in lens:
        out.append(out[-1] + int(n))
    return torch.tensor(out, dtype=torch.int32, device=device)


# ----------------------------------------------------------------------------------------------
# the tolerance rule (flash-attn's)

#: Error against the oracle may be this many times the error of "pt" (same dtype): out and lse.
FWD_FACTOR = 2.0
#: The same for gradients.
BWD_FACTOR = 3.0
#: atol added to ``factor * pt_error`` by the tests: forward (out, lse) and backward (dq, dk, dv).
#: fp16/bf16: flash-attn's choice, about twice the rounding step of values of magnitude 1. fp32
#: (measured against the float64 oracle over ~1000 random problems): the worst excess over
#: ``factor * pt_error`` was 2e-6 for out/lse and 1.7e-5 for gradients (gradients that are exactly
#: 0 in the oracle, e.g. with one visible key, where rowsum(dout * out) cancels dout . v; head
#: dim 256).
FWD_ATOL = {torch.float32: 5e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
BWD_ATOL = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
#: lse is float32 for every input dtype, but is computed from scores of the input's precision.
LSE_ATOL = {torch.float32: 5e-6, torch.float16: 1e-3, torch.bfloat16: 1e-3}
#: ``flashtile check``'s atol, in units of the dtype's eps times ``max(1, max|oracle|)``
#: (:func:`eps_atol`): its cases span magnitudes, so its atol scales with them.
ATOL_EPS = 4.0


def tolerance(pt_err: float, factor: float, atol: float) -> float:
    """flash-attn's bound on the error against the oracle: ``factor * pt_err + atol``, where
    ``pt_err`` is the error of the same computation in plain PyTorch in the same dtype. A
    non-finite ``pt_err`` (the baseline overflowed or produced NaN) leaves ``atol`` alone: the
    bound never becomes vacuous."""
    if not math.isfinite(pt_err):
        return atol
    return factor * pt_err + atol


def max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |x - ref|`` computed in float64, where equal infinities count as 0 and NaN (or an
    infinity that ``ref`` does not have at that position) as inf; 0 for empty tensors."""
    if x.numel() == 0:
        return 0.0
    x, ref = x.detach().double(), ref.detach().double()
    d = (x - ref).abs()
    d = torch.where(x == ref, torch.zeros_like(d), d)
    return float(torch.nan_to_num(d, nan=math.inf).max())


def _max_abs(x: torch.Tensor) -> float:
    return x.abs().max().item() if x.numel() else 0.0


def _finite_absmax(x: torch.Tensor) -> float:
    x = x.detach().double()
    x = x[torch.isfinite(x)]
    return float(x.abs().max()) if x.numel() else 0.0


def eps_atol(dtype: torch.dtype, ref: torch.Tensor) -> float:
    """``flashtile check``'s atol: ``ATOL_EPS * eps(dtype) * max(1, max|ref|)`` over the finite
    entries of ``ref``."""
    return ATOL_EPS * torch.finfo(dtype).eps * max(1.0, _finite_absmax(ref))


def _expect(ok: bool | torch.Tensor, message: str) -> None:
    if not ok:
        raise AssertionError(message)


def assert_close_to_ref(
    x: torch.Tensor, ref: torch.Tensor, pt: torch.Tensor, factor: float, atol: float, name: str = "tensor",
    rel: float = 0.0,
) -> None:
    """flash-attn's rule: ``max|x - ref| <= factor * max|pt - ref| + atol`` (compared in fp64),
    plus ``rel * max|ref|`` (roundings the baseline does not make, at the result's magnitude).

    ``ref`` is the fp32 oracle, ``pt`` the same-dtype one. ``x`` must be finite wherever ``ref``
    is (so NaN never passes); non-finite entries of ``ref`` must be matched exactly by ``x``.
    Raises ``AssertionError`` with the numbers when the rule is broken.
    """
    _expect(x.shape == ref.shape == pt.shape, f"{name}: shapes {tuple(x.shape)}, {tuple(ref.shape)}, {tuple(pt.shape)}")
    # one rounding step of x's own format at the result's magnitude: a result stored in fp16/bf16
    # can land one step away from the rounded oracle even when its fp32 value is closer
    step = torch.finfo(x.dtype).eps if x.dtype in (torch.float16, torch.bfloat16) else 0.0
    x, ref, pt = x.detach().double(), ref.detach().double(), pt.detach().double()
    _expect(not torch.isnan(x).any(), f"{name}: contains NaN")
    _expect(not torch.isnan(ref).any(), f"{name}: the oracle contains NaN")
    fin = torch.isfinite(ref)
    if not fin.all():
        _expect(torch.equal(x[~fin], ref[~fin]), f"{name}: non-finite entries differ from the oracle")
        _expect(torch.isfinite(x[fin]).all(), f"{name}: non-finite where the oracle is finite")
        x, ref, pt = x[fin], ref[fin], pt[fin]
    _expect(torch.isfinite(x).all(), f"{name}: non-finite where the oracle is finite")
    pt_ok = torch.isfinite(pt)  # an overflowing baseline must not make the bound vacuous
    pt_err = max_err(pt[pt_ok], ref[pt_ok])
    err = max_err(x, ref)
    bound = tolerance(pt_err, factor, atol) + (step + rel) * _max_abs(ref)
    _expect(err <= bound, f"{name}: max|x - ref| = {err:.3g} > {factor} * {pt_err:.3g} + {atol:.3g}")


def assert_lse_close(lse: torch.Tensor, ref: torch.Tensor, pt: torch.Tensor, atol: float, name: str = "lse") -> None:
    """lse: the ``-inf`` positions (rows that see no key) must match exactly, the finite ones
    follow the forward rule."""
    _expect(lse.dtype == torch.float32, f"{name} must be float32, got {lse.dtype}")
    _expect(lse.shape == ref.shape, f"{name}: shape {tuple(lse.shape)} != {tuple(ref.shape)}")
    _expect(torch.equal(torch.isneginf(lse), torch.isneginf(ref)), f"{name}: -inf positions differ from the oracle")
    fin = torch.isfinite(ref)
    assert_close_to_ref(lse[fin], ref[fin], pt[fin], FWD_FACTOR, atol, name, rel=LSE_BASE2_REL)


#: The kernels compute the lse in base 2 (``scale * log2(e)`` folded into the scores, ALiBi's bias
#: added there, the row max and ``log2`` of the row sum added, times ``ln 2``): a few more fp32
#: roundings at ``|lse| * log2(e)`` than the natural-log baseline (a CI run met 1.5e-5 at |lse| ~ 25,
#: 8 steps of fp32 there, against a bound of 1.3e-5 without this term).
LSE_BASE2_REL = 8 * torch.finfo(torch.float32).eps


#: Largest softmax_scale (times softcap's tanh' <= 1) that any test passes.
MAX_TEST_SCALE = 2.0

#: ``fn(*leaves) -> (out, lse or None)`` and ``oracle(*leaves, upcast) -> (out, lse)``.
AttentionFn = Callable[..., tuple[torch.Tensor, "torch.Tensor | None"]]


def _rounded_out_slack(out: torch.Tensor, oracle: AttentionFn, dout: torch.Tensor, leaves: list[torch.Tensor]) -> float:
    """Both backends, like flash-attn 2/3/4, compute ``delta = rowsum(dout * out)`` from the
    fp16/bf16 ``out`` they returned (the backward's contract: ring attention passes a global
    ``out``, so it cannot be recomputed). That rounding error enters ``ds = p * (dp - delta)``
    and so dq / dk, and where the softmax is saturated it is as large as the gradient itself
    (the same-dtype PyTorch baseline differentiates softmax directly and does not have it).
    The slack is the measured delta error of this very output, times the largest
    ``scale * |k|`` (or ``|q|``) it can be multiplied by.

    fp32: ``out`` is not rounded, but ``dp - delta`` still cancels two fp32 sums of ``d`` products
    computed in different orders (a matrix product for ``dp``, a row sum for ``delta``; the
    fp64 oracle and torch's own softmax backward do not have that difference, and with one key
    torch's gives exactly 0 where ours gives a few fp32 roundings: seen as a rare CI failure at
    sq = sk = 1, d = 128). Their rounding error is bounded by ``eps * sum|dout * out|`` each."""
    if out.dtype == torch.float32:
        eps = torch.finfo(torch.float32).eps
        d_err = 2 * eps * (dout.double() * out.double()).abs().sum(-1).max().item() if out.numel() else 0.0
        big = max(_max_abs(x.detach().double()) for x in leaves)
        return BWD_FACTOR * MAX_TEST_SCALE * d_err * big
    with torch.no_grad():  # the oracle's out before rounding to the input dtype
        exact_out = oracle(*[x.detach().float() for x in leaves], upcast=True)[0]
    d_err = (dout.double() * (out.double() - exact_out.double())).sum(-1).abs().max().item()
    big = max(_max_abs(x.detach().double()) for x in leaves)
    return BWD_FACTOR * MAX_TEST_SCALE * d_err * big


def compare_with_oracle(
    fn: AttentionFn,
    oracle: AttentionFn,
    inputs: Sequence[torch.Tensor],
    *,
    grads: bool = True,
    dout: torch.Tensor | None = None,
) -> dict[str, Any]:
    """Run ``fn(*leaves) -> (out, lse)`` and ``oracle(*leaves, upcast) -> (out, lse)`` on fresh
    leaf copies of ``inputs`` and check out, lse (unless ``fn`` returns None for it) and (when
    ``grads``) the gradient of every input against flash-attn's rule. Returns the tensors.

    "ref" is the oracle with ``upcast=True`` (fp32 math) for fp16/bf16 inputs, and the oracle on
    float64 copies for fp32 inputs (so that fp32 has a baseline error too); "pt" is the oracle
    in the input dtype (``upcast=False``).
    """
    dtype = inputs[0].dtype
    leaves = [x.detach().clone().requires_grad_(grads) for x in inputs]
    hi = torch.float64 if dtype == torch.float32 else dtype
    # inputs of another dtype (fp32 sink logits beside fp16 q) keep theirs, unless fp32 goes to fp64
    ref_leaves = [x.detach().to(hi if x.dtype == dtype else x.dtype).requires_grad_(grads) for x in inputs]
    out, lse = fn(*leaves)
    ref_out, ref_lse = oracle(*ref_leaves, upcast=True)
    pt_out, pt_lse = oracle(*leaves, upcast=False)
    _expect(out.dtype == dtype, f"out dtype {out.dtype} != {dtype}")
    assert_close_to_ref(out, ref_out, pt_out, FWD_FACTOR, FWD_ATOL[dtype], "out")
    if lse is not None:
        assert_lse_close(lse, ref_lse, pt_lse, LSE_ATOL[dtype])
    res = {"out": out, "lse": lse, "ref_out": ref_out, "ref_lse": ref_lse}
    if not grads:
        return res
    if dout is None:
        dout = torch.randn_like(out)
    g = torch.autograd.grad(out, leaves, dout)
    g_ref = torch.autograd.grad(ref_out, ref_leaves, dout.to(hi), allow_unused=True)
    g_pt = torch.autograd.grad(pt_out, leaves, dout, allow_unused=True)
    slack = _rounded_out_slack(out, oracle, dout, leaves)
    for i, (a, r, p) in enumerate(zip(g, g_ref, g_pt, strict=True)):
        r = torch.zeros_like(ref_leaves[i]) if r is None else r
        p = torch.zeros_like(a) if p is None else p
        _expect(a.dtype == inputs[i].dtype and a.shape == inputs[i].shape, f"grad[{i}]: dtype or shape differs")
        assert_close_to_ref(a, r, p, BWD_FACTOR, BWD_ATOL[dtype] + slack, f"grad[{i}]")
    res["grads"], res["ref_grads"] = g, g_ref
    return res


# ----------------------------------------------------------------------------------------------
# FP8 (e4m3) calls: the oracle on dequantised inputs, the error bound, and a reference of the
# FP8 kernel's numerics

#: e4m3 rounding (round to nearest even): relative error <= 2^-4 for normal values (3 stored
#: mantissa bits), absolute error <= 2^-10 for subnormals (below 2^-6, spacing 2^-9).
FP8_REL = 2.0**-4
FP8_SUBNORMAL_ABS = 2.0**-10
#: bfloat16 output rounding: relative error <= 2^-8.
BF16_REL = 2.0**-8


def fp8_dequantized(x: torch.Tensor, descale: torch.Tensor | None, nheads: int | None = None) -> torch.Tensor:
    """float32 ``x.float() * descale[b, hk]`` of a dense FP8 tensor ``(B, S, H, D)``; ``descale``
    ``(B, Hk)`` (or broadcasting to it) or None; query heads share their KV head's entry."""
    xf = x.float()
    if descale is None:
        return xf
    b, _, h, _ = x.shape
    d = descale.float().expand(b, descale.shape[-1]) if descale.dim() == 2 else descale.float().reshape(1, 1)
    d = d.expand(b, d.shape[1]).repeat_interleave(h // d.shape[1], dim=1)
    return xf * d.view(b, 1, h, 1)


#: the FP8 wgmma's accumulation of Q K^T keeps about 14 bits per partial sum: relative error 2^-13 of the
#: running sum's magnitude per 32-wide k-step (e4m3 wgmma K = 32)
FP8_ACC_REL = 2.0**-13


def fp8_score_error_bound(q: torch.Tensor, k: torch.Tensor, softmax_scale: float | None = None) -> torch.Tensor:
    """Bound on the error of each row's scores (natural units) from the FP8 kernels' reduced-precision
    Q K^T accumulation, ``(B, H, Sq)``: ``2^-13 ceil(d / 32) max_j scale sum_i |q_i| |k_ji|`` (one
    rounding per k-step of the running sum, whose magnitude is at most the sum of the products'
    magnitudes). A row's lse moves by at most this much (softcap only shrinks it). Dequantised
    float32 inputs, dense layout ``(B, S, H, D)``, GQA allowed."""
    d = q.shape[-1]
    scale = softmax_scale if softmax_scale is not None else d**-0.5
    kk = k.float().abs().repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    sabs = torch.einsum("bthd,bshd->bhts", q.float().abs(), kk) * scale
    if sabs.shape[-1] == 0:
        return sabs.sum(-1)
    return FP8_ACC_REL * math.ceil(d / 32) * sabs.amax(-1)


def fp8_error_bound(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, quantized_p: bool, **options) -> torch.Tensor:
    """Elementwise bound on ``|out - oracle|`` of an FP8 call, from the dequantised float32 inputs
    (dense layout) and the options of :func:`attention_ref` (padding masks included).

    * Always: the bf16 output rounding, ``2^-8 |o|``, plus the float32 engine's error (``1e-5 max|v|``).
    * ``quantized_p`` (the FP8 kernels, which round the unnormalised probabilities
      ``p = exp(s - m) <= 1`` to e4m3 for the P V product): ``sum_j |dp_j| |v_j| / l`` with
      ``|dp_j| <= 2^-4 p_j`` (normal) or ``2^-10`` (subnormal, ``p_j < 2^-6``); as ``l >= 1``
      this is at most ``2^-4 (P |V|) + 2^-10 sum_{j visible} |v_j| / l``; the second term is
      bounded here by ``2^-9 max|v|`` (independent rounding errors of both signs: their sum grows as
      the square root of the visible keys, and ``l`` grows with them), and the fp8 wgmma's
      reduced-precision accumulation of Q K^T (:func:`fp8_score_error_bound`: scores off by at most
      ``e`` move each softmax weight by a factor within ``exp(+-2e)``, so the output by at most
      ``~2e (P |V|)``) adds ``max(2^-8, 2e) (P |V|)`` (2^-8 before stop 33; at head dim 256, or with
      scores of larger magnitude, ``2e`` exceeds it: the H200 runs flagged such cases by ~1% of the
      bound).
    """
    out, _ = attention_ref(q, k, v, **options)
    vmax = float(v.abs().max()) if v.numel() else 0.0
    bound = BF16_REL * out.abs() + 1e-5 * max(vmax, 1.0)
    if quantized_p:
        pv_abs, _ = attention_ref(q, k, v.abs(), **options)
        e = fp8_score_error_bound(q, k, options.get("softmax_scale"))  # (B, H, Sq)
        acc = (2 * e).clamp(min=2.0**-8).transpose(1, 2).unsqueeze(-1)  # (B, Sq, H, 1), as the output
        bound = bound + (FP8_REL + acc) * pv_abs + 2.0**-9 * vmax
    return bound


def fp8_kernel_emulation(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                         softmax_scale: float | None = None) -> torch.Tensor:
    """The FP8 kernel's numerics in PyTorch, dense layout, float32 dequantised inputs: scores in
    float32, unnormalised probabilities ``exp(s - rowmax)`` rounded to e4m3 for P V, the row sum
    from the unrounded ones (the kernel uses a running max per key block; the row max here is its
    final value). For error studies (``benchmarks/fp8_rmse.py``), not a test oracle."""
    b, sq, h, d = q.shape
    g = h // k.shape[2]
    kk = k.float().repeat_interleave(g, dim=2)
    vv = v.float().repeat_interleave(g, dim=2)
    scale = softmax_scale if softmax_scale is not None else d**-0.5
    s = torch.einsum("bthd,bshd->bhts", q.float(), kk) * scale
    if causal:
        vis = visible(torch.arange(sq), torch.arange(k.shape[1]), k.shape[1] - sq, -1, 0)
        s = s.masked_fill(~vis, float("-inf"))
    m = s.amax(-1, keepdim=True)
    p = torch.exp(s - m)
    l_sum = p.sum(-1, keepdim=True)
    p8 = p.to(torch.float8_e4m3fn).float()
    out = torch.einsum("bhts,bshd->bthd", p8 / l_sum, vv)
    return out.to(torch.bfloat16)
