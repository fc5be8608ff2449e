"""flash-attn 2 compatible functions. The docstrings are the spec.

Layout: ``(batch, seqlen, nheads, headdim)`` (dense) or ``(total_tokens, nheads, headdim)``
(varlen, sequences packed back to back and delimited by int32 ``cu_seqlens``).

Semantics shared by every function:

* ``softmax_scale`` defaults to ``1 / sqrt(headdim)``.
* GQA/MQA: k/v may have fewer heads ``nheads_k`` dividing ``nheads``; query head ``i`` uses
  key/value head ``i // (nheads // nheads_k)``.
* ``causal=True`` applies a causal mask aligned to the bottom-right corner of the score
  matrix. With ``seqlen_q = 2``, ``seqlen_k = 5`` (1 = visible)::

        1 1 1 1 0
        1 1 1 1 1

  and with ``seqlen_q = 5``, ``seqlen_k = 2``::

        0 0
        0 0
        0 0
        1 0
        1 1

  Rows that see no key (the first three above) output 0, and their lse is ``-inf``.
* ``window_size = (left, right)`` (sliding window, ``-1`` = unbounded): query ``i`` sees keys
  ``j`` with ``i + seqlen_k - seqlen_q - left <= j <= i + seqlen_k - seqlen_q + right``.
  ``causal=True`` is ``right = 0``.
* ``softcap > 0``: scores are ``softcap * tanh(softmax_scale * q.k / softcap)``.
* ``alibi_slopes``: float32 ``(nheads,)`` or ``(batch, nheads)``; adds
  ``-slope * |i + seqlen_k - seqlen_q - j|`` to the score (after softcap).
* ``dropout_p``: dropout on the attention probabilities (kept ones scaled by ``1 / (1 - p)``),
  drawn from torch's generator for q's device, so reproducible under ``torch.manual_seed``;
  the backward reuses the forward's mask. Use ``dropout_p=0.0`` for evaluation.
* ``deterministic``: bitwise reproducible backward (the torch backend always is).
* ``return_attn_probs``: also return ``softmax_lse`` (float32 ``(batch, nheads, seqlen_q)``,
  varlen ``(nheads, total_q)``, the log-sum-exp of each row's scaled scores) and
  ``attn_probs``: ``None`` when ``dropout_p == 0``; with dropout, the materialised
  probabilities after dropout ``(batch, nheads, seqlen_q, seqlen_k)`` (varlen: padded to
  ``max_seqlen``), such that ``out = attn_probs @ v``, for testing only (O(seqlen^2) memory).
  lse carries no gradient.
* dtypes: float16, bfloat16, float32 (all of q, k, v the same); head dim 1 to 512 (the Triton
  backend serves up to 256 and hands larger ones to the torch backend). The last dimension of
  every input must be contiguous.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import dispatch
from .ops import attention
from .paged import cache_index, check_block_table, check_used_blocks, packed_positions
from .rng import draw_seed, dropout_mask
from .spec import (
    Problem,
    check_alibi,
    check_call,
    check_cu_seqlens_meta,
    check_cu_seqlens_values,
    check_varlen_meta,
    unbind_packed,
)
from .testing import attention_probs_ref

_Window = Sequence[int]


def _run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    dropout_p: float,
    softmax_scale: float | None,
    causal: bool,
    window_size: _Window,
    softcap: float,
    alibi_slopes: torch.Tensor | None,
    deterministic: bool,
    return_attn_probs: bool,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    names: tuple[str, str, str] = ("q", "k", "v"),
):
    varlen = cu_seqlens_q is not None
    spec = check_call(
        q, k, v, varlen=varlen, names=names, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap, deterministic=deterministic,
    )  # fmt: skip
    if varlen:
        nseq = check_varlen_meta(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q.device)
        batch, sq, sk = nseq, max_seqlen_q, max_seqlen_k
        q4, k4, v4 = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    else:
        batch, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        q4, k4, v4 = q, k, v
    alibi = check_alibi(alibi_slopes, batch, q.shape[-2], q.device)
    problem = Problem(
        batch=batch, seqlen_q=sq, seqlen_k=sk, nheads=q.shape[-2], nheads_k=k.shape[-2], headdim=q.shape[-1],
        dtype=q.dtype, device=q.device, varlen=varlen, has_alibi=alibi is not None,
    )  # fmt: skip
    backend = dispatch.choose(problem, spec)
    seed = draw_seed(q.device) if spec.dropout_p > 0 else None
    out, lse = attention(
        q4, k4, v4, spec, backend, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, alibi_slopes=alibi, seed=seed,
    )  # fmt: skip
    if varlen:
        out, lse = out.squeeze(0), lse.squeeze(0)
    if not return_attn_probs:
        return out
    probs = None
    if spec.dropout_p > 0:
        probs = _attn_probs(q, k, v, spec, alibi, int(seed), cu_seqlens_q, cu_seqlens_k, sq, sk)
    return out, lse, probs


@torch.no_grad()
def _attn_probs(q, k, v, spec, alibi, seed, cu_q, cu_k, max_sq, max_sk) -> torch.Tensor:
    """Materialise the dropped-out probabilities (testing aid, O(seqlen^2))."""
    kw = dict(
        window_size=(spec.window_left, spec.window_right), softcap=spec.softcap,
        softmax_scale=spec.softmax_scale, dropout_p=spec.dropout_p,
    )  # fmt: skip
    h = q.shape[-2]
    if cu_q is None:
        b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        mask = dropout_mask(seed, spec.dropout_p, b, h, sq, sk, q.device)
        return attention_probs_ref(q, k, v, alibi_slopes=alibi, dropout_mask=mask, **kw)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    probs = q.new_zeros((len(cq) - 1, h, max_sq, max_sk), dtype=torch.float32)
    for n in range(len(cq) - 1):
        qs, ks, vs = (x[a:b_].unsqueeze(0) for x, a, b_ in ((q, cq[n], cq[n + 1]), (k, ck[n], ck[n + 1]),
                                                            (v, ck[n], ck[n + 1])))  # fmt: skip
        mask = dropout_mask(seed, spec.dropout_p, 1, h, qs.shape[1], ks.shape[1], q.device, batch_start=n)
        sl = None if alibi is None else alibi[n : n + 1]
        p = attention_probs_ref(qs, ks, vs, alibi_slopes=sl, dropout_mask=mask, **kw)
        probs[n, :, : qs.shape[1], : ks.shape[1]] = p[0]
    return probs


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: _Window = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """Exact attention, ``softmax(q k^T * scale + mask) v``, never materialising the scores.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        k: ``(batch, seqlen_k, nheads_k, headdim)``.
        v: ``(batch, seqlen_k, nheads_k, headdim)``.
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs: see the module docstring.

    Returns:
        out ``(batch, seqlen_q, nheads, headdim)``; with ``return_attn_probs=True``,
        ``(out, softmax_lse (batch, nheads, seqlen_q) float32, attn_probs or None)``.
    """
    return _run(
        q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_attn_probs=return_attn_probs,
    )  # fmt: skip


def flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: _Window = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """:func:`flash_attn_func` with q, k, v packed: ``qkv (batch, seqlen, 3, nheads, headdim)``.

    Returns out ``(batch, seqlen, nheads, headdim)`` (and lse, probs as in :func:`flash_attn_func`).
    The gradient flows back to ``qkv``.
    """
    q, k, v = unbind_packed(qkv, "qkv", 3, 2)
    return _run(
        q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_attn_probs=return_attn_probs, names=("qkv[:, :, 0]", "qkv[:, :, 1]", "qkv[:, :, 2]"),
    )  # fmt: skip


def flash_attn_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: _Window = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """:func:`flash_attn_func` with k, v packed: q ``(batch, seqlen_q, nheads, headdim)``,
    ``kv (batch, seqlen_k, 2, nheads_k, headdim)``.

    Returns out ``(batch, seqlen_q, nheads, headdim)`` (and lse, probs as in :func:`flash_attn_func`).
    """
    k, v = unbind_packed(kv, "kv", 2, 2)
    return _run(
        q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_attn_probs=return_attn_probs, names=("q", "kv[:, :, 0]", "kv[:, :, 1]"),
    )  # fmt: skip


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: _Window = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
):
    """Attention over a batch of variable-length sequences packed without padding.

    Args:
        q: ``(total_q, nheads, headdim)``, sequence ``b`` in rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``.
        k, v: ``(total_k, nheads_k, headdim)``, delimited by ``cu_seqlens_k``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)``, starting at 0, non-decreasing, ending
            at ``total_q`` / ``total_k``. Empty sequences are allowed.
        max_seqlen_q, max_seqlen_k: the longest sequence lengths (upper bounds are accepted).
        Other options: see the module docstring; causal/window alignment uses each sequence's
        own lengths; ``alibi_slopes`` may be ``(batch, nheads)``.
        block_table: optional int32 ``(batch, max_blocks_per_seq)``: k and v are then paged caches
            ``(num_blocks, page_block_size, nheads_k, headdim)`` (any page size) and sequence ``b``'s
            keys are its first ``cu_seqlens_k[b+1] - cu_seqlens_k[b]`` cache tokens (prefill from a
            paged cache).

    Returns:
        out ``(total_q, nheads, headdim)``; with ``return_attn_probs=True``,
        ``(out, softmax_lse (nheads, total_q) float32, attn_probs or None)``.
    """
    if block_table is not None:
        k, v = _gather_paged(q, k, v, cu_seqlens_k, max_seqlen_k, block_table)
    return _run(
        q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_attn_probs=return_attn_probs, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
    )  # fmt: skip


def _gather_paged(q, k_cache, v_cache, cu_seqlens_k, max_seqlen_k, block_table):
    """Validate a paged k/v cache and gather each sequence's keys into the packed layout."""
    for x, n in ((k_cache, "k"), (v_cache, "v")):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{n} must be a paged cache (num_blocks, page_block_size, nheads_k, headdim) when "
                             f"block_table is given, got {tuple(getattr(x, 'shape', ()))}")  # fmt: skip
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k and v caches must have the same shape, got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    nseq = check_cu_seqlens_meta(cu_seqlens_k, "cu_seqlens_k", q.device)
    check_block_table(block_table, nseq, k_cache.shape[0], q.device)
    lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    check_cu_seqlens_values(cu_seqlens_k, "cu_seqlens_k", int(cu_seqlens_k[-1]), max_seqlen_k, "max_seqlen_k")
    page = k_cache.shape[1]
    check_used_blocks(block_table, lens.tolist(), page, k_cache.shape[0])
    rows, pos = packed_positions(lens)
    i0, i1 = cache_index(rows, pos, block_table, None, page)
    return k_cache[i0, i1], v_cache[i0, i1]


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: _Window = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """:func:`flash_attn_varlen_func` with ``qkv (total, 3, nheads, headdim)`` and one ``cu_seqlens``."""
    q, k, v = unbind_packed(qkv, "qkv", 3, 1)
    return _run(
        q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_attn_probs=return_attn_probs, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, names=("qkv[:, 0]", "qkv[:, 1]", "qkv[:, 2]"),
    )  # fmt: skip


def flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: _Window = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """:func:`flash_attn_varlen_func` with q ``(total_q, nheads, headdim)`` and
    ``kv (total_k, 2, nheads_k, headdim)``."""
    k, v = unbind_packed(kv, "kv", 2, 1)
    return _run(
        q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_attn_probs=return_attn_probs, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, names=("q", "kv[:, 0]", "kv[:, 1]"),
    )  # fmt: skip
