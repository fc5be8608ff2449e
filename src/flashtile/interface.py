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

  Rows that see no key (the first three above) output 0, and their lse is ``-inf`` (a
  deliberate difference: flash-attn gives ``+inf`` on most of its paths).
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
  (A deliberate difference: flash-attn returns its kernel's internal ``S_dmask`` encoding, or an
  empty tensor without dropout.)
  lse carries no gradient.
* ``learnable_sink``: optional float32 ``(nheads,)`` per-head sink logits (gpt-oss; flash-attn
  4's ``learnable_sink``): each row's softmax denominator gets one more term ``exp(sink_h)``, a
  key without value, so ``p_ij = exp(s_ij - lse_i)`` with ``lse_i = log(sum_j exp(s_ij) +
  exp(sink_h))`` (``s`` after scale, softcap, ALiBi and mask; the sink is neither scaled nor
  capped). The returned lse includes the sink; rows that see no key output 0 with
  ``lse = sink_h``. With dropout the sink is in the denominator before dropout (dropout drops
  keys only). It may require grad (``dsink_h = -sum_{b,i} exp(sink_h - lse_i) * rowsum(dout_i *
  out_i)``). Served by the torch and triton backends.
* ``v`` may have its own head dim (``headdim_v``, e.g. DeepSeek's 192 for q/k and 128 for v,
  forward and backward, every option): the output has v's head dim. Packed ``qkv`` / ``kv``
  inputs have one head dim.
* ``score_mod`` / ``block_mask`` (``flash_attn_func`` and ``flash_attn_varlen_func``):
  FlexAttention's mods, see :mod:`flashtile.flex`: ``score_mod(score, b, h, q_idx, kv_idx)``
  applies after scale, softcap and ALiBi, then the masks (causal / window and the block mask's
  ``mask_mod``) apply. Tensors the score_mod captures get gradients. Served by the torch engine,
  and on CUDA by Triton kernels (``flex_triton``) when every mod comes from
  :mod:`flashtile.masks`; such calls run eagerly under ``torch.compile`` (a graph break).
* dtypes: float16, bfloat16, float32 (all of q, k, v the same); head dim 1 to 512 (the Triton
  backend serves up to 256 and hands larger ones to the torch backend). The last dimension of
  every input must be contiguous.
* FP8 (flash-attn 3's API, forward only): q, k, v may all be ``torch.float8_e4m3fn``, with the
  keyword-only descales ``q_descale``, ``k_descale``, ``v_descale``: float32 ``(batch, nheads_k)``
  (varlen: ``batch`` = number of sequences; anything broadcasting to it, e.g. ``(1, 1)`` for one
  scale), default None = 1. The call attends over the dequantised inputs
  ``x.float() * x_descale[b, hk]`` (query head ``h`` uses its KV head's entry; descales must be
  positive) and returns the output in **bfloat16** (flash-attn 3's output dtype for FP8), lse as
  for other dtypes. The ``hopper`` backend runs both products in FP8 (P rounded to e4m3); every
  other backend dequantises first (slow, exact up to bf16/fp32 rounding). A backward through an
  FP8 call raises. Descales with non-FP8 inputs are an error. Quantisation helpers:
  :mod:`flashtile.fp8`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # flashtile.flex imports torch._dynamo: only for type checkers here
    from .flex import BlockMask

from . import dispatch, fp8
from .backends.base import adopt as _adopt
from .backends.base import recording as _recording
from .backends.torch_tiled import attention_probs
from .ops import _NO_FIELD_GRADS, Memo, _apply, attention, attention_fast, option_types
from .ops import fast_mode as _fast_mode
from .paged import cache_index, check_block_table, check_used_blocks, packed_positions
from .rng import draw_seed
from .spec import (
    SUPPORTED_DTYPES,
    check_alibi,
    check_cu_seqlens_meta,
    check_cu_seqlens_values,
    check_descales,
    check_qkv,
    check_sink,
    check_varlen_meta,
    make_call,
    unbind_packed,
)

_Window = Sequence[int]
_NO_DESCALES = {"q_descale": None, "k_descale": None, "v_descale": None}

# Signature memo of the dense entry points (issue 16). A call without optional tensors, mods or
# dropout, in plain eager mode (ops.fast_mode(), plain tensors), is keyed by everything its checks
# (check_qkv, make_call) and dispatch read: the shapes except batch and sequence lengths (checked
# on a hit: q, k, v the same batch, k and v the same length -- what check_qkv asks of them), the
# dtypes and devices of q, k and v (last strides 1, else no memo), every option with its type (and the types of
# window_size's entries), and dispatch.state(). A hit means the checks pass and dispatch decides
# the same: the call goes straight to ops.attention_fast with the AttnCall and backend of the
# first call. Misses take _run, which records the signature once its checks have passed.
_MEMO = Memo(256)
_Tensor = torch.Tensor
_ZERO_TYPES = (float, int)  # dropout_p's types the memo takes (others, e.g. arrays, take _run's checks)


# The flat path (issue 16): per full signature -- the memo's key plus the shapes and strides of q, k
# and v, i.e. everything the backend's launch plans key on besides the call, which the memo's key
# determines -- the runner the backend's launcher offered (backends.base.OFFERS: it allocates the
# outputs and launches the prepared kernels, checking per call what a prepared launch checks:
# the current device, launch hooks, 16-byte alignment), with the memo's call and backend for calls
# that need autograd. Recorded from a memo hit (the checks passed for that signature and shapes;
# the full shapes make the hit path's relation checks hold). A runner that declines (plans
# cleared) is dropped and the memo's path taken.
_FLAT = Memo(256)
# Runners that serve any key length >= 1 (a runner's ``any_length``: decode-shaped calls whose keys
# grow every call, e.g. Hugging Face's dynamic cache), per signature without k's and v's lengths
# and strides (:func:`_grow_of`); looked up on a _FLAT miss when k and v have one length >= 1.
_GROW = Memo(256)
_grad_enabled = torch.is_grad_enabled


def _memo_key(q, k, v, opts: tuple) -> tuple | None:
    """The signature of a dense call for :data:`_FLAT`, one flat tuple: ``(q, k, v shapes, q, k, v
    strides, dtypes, devices, options, their types, dispatch.state())``; :func:`_memo_of` derives
    the memo's key (see above) from it. None where the memo does not apply."""
    if type(q) is not _Tensor or type(k) is not _Tensor or type(v) is not _Tensor or not _fast_mode():
        return None
    w = opts[3]
    if type(w) is not tuple:
        if type(w) is not list:
            return None
        w = tuple(w)  # a list normalises as the tuple of its entries does (their types are keyed)
        opts = (*opts[:3], w, *opts[4:])
    try:  # unit last strides only (check_qkv lets others through on empty tensors only)
        qt, kt, vt = q.stride(), k.stride(), v.stride()
        if qt[-1] != 1 or kt[-1] != 1 or vt[-1] != 1:
            return None
    except (IndexError, RuntimeError):  # 0-d tensors, layouts without strides: the checks raise
        return None
    d, s, c, _, cap, det = opts  # usual: float dropout_p / softcap, float or None scale, bool causal /
    # deterministic, two int window sides
    types = option_types(opts, w, type(d) is float and (s is None or type(s) is float) and type(c) is bool and
                         type(cap) is float and type(det) is bool and len(w) == 2 and type(w[0]) is int and
                         type(w[1]) is int)  # fmt: skip
    return (q.shape, k.shape, v.shape, qt, kt, vt, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device, opts,
            types, dispatch.state())  # fmt: skip


def _memo_of(full: tuple) -> tuple:
    """The memo's key of a :func:`_memo_key` signature: the shapes without batch and sequence
    lengths, the strides dropped."""
    return (full[0][2:], full[1][2:], full[2][2:], *full[6:])


def _grow_of(full: tuple) -> tuple:
    """The :data:`_GROW` key of a :func:`_memo_key` signature: k's and v's lengths and strides
    dropped (their last strides are 1: the signature says so)."""
    ks, vs = full[1], full[2]
    return (full[0], ks[0], ks[2:], vs[0], vs[2:], full[3], *full[6:])


def _lean(q, k, v, opts: tuple, return_attn_probs: object, *unset):
    """A dense call through the memo: ``(key, None)`` on a miss (record with that key), ``(None,
    result)`` on a hit, ``(None, None)`` where the memo does not apply: dropout (``opts[0]``), or
    any of the optional arguments ``unset`` given (the memo serves calls without them)."""
    for x in unset:  # (identity only: tuple.count's == on a tensor breaks torch.compile's graph)
        if x is not None:
            return None, None
    if type(opts[0]) not in _ZERO_TYPES or opts[0]:
        return None, None
    full = _memo_key(q, k, v, opts)
    if full is None:
        return None, None
    grow = None
    try:
        flat = _FLAT.get(full)
        if flat is None and full[1][1] == full[2][1] and full[1][1] > 0:
            grow = _grow_of(full)
            flat = _GROW.get(grow)
    except (TypeError, ValueError):  # an option that cannot be hashed or compared (Memo.lookup)
        return None, None
    if flat is not None:  # the flat path: the runner the backend's launcher offered (see _FLAT)
        runner, call, backend = flat
        if _grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            out, lse = _apply(q, k, v, call, backend, runner, *_NO_FIELD_GRADS)  # (attention_fast's autograd branch)
            return None, ((out, lse, None) if return_attn_probs else out)
        res = runner(q, k, v, bool(return_attn_probs))  # (without it: the lse goes to a kept buffer)
        if res is not None:
            return None, ((*res, None) if return_attn_probs else res[0])
        if grow is None:  # the runner declined (its plans were cleared): the memo's path below
            del _FLAT[full]
        else:
            del _GROW[grow]
    key, hit = _MEMO.lookup(_memo_of(full))
    if hit is None:
        return key, None
    qs, ks, vs = full[:3]
    if qs[0] != ks[0] or ks[0] != vs[0] or ks[1] != vs[1]:
        return None, None  # the checks raise (the slow path)
    (out, lse), offers = _recording(attention_fast, q, k, v, hit[0], hit[1])
    if offers:
        runner = _adopt(offers, (q, k, v), (out, lse))
        if runner is not None:
            _FLAT.record(full, (runner, hit[0], hit[1]))
            any_length = getattr(runner, "any_length", None)
            if any_length is not None:
                _GROW.record(_grow_of(full), (any_length, hit[0], hit[1]))
    return None, ((out, lse, None) if return_attn_probs else out)


def _remember(key: tuple, call, backend: str) -> None:
    _MEMO.record(key, (call, backend))


def _run(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    alibi_slopes: torch.Tensor | None,
    return_attn_probs: bool,
    learnable_sink: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    names: tuple[str, str, str] = ("q", "k", "v"),
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    score_mod: Callable[..., torch.Tensor] | None = None,
    block_mask: BlockMask | None = None,
    probs: bool = True,
    memo: tuple | None = None,
    **options,
):
    """Every public function's path: validate, build the call (``options``: the scalar options of
    :func:`flashtile.spec.make_call`), dispatch, run the op. ``probs=False``: with
    ``return_attn_probs``, return None instead of materialising the probabilities."""
    varlen = cu_seqlens_q is not None
    check_qkv(q, k, v, varlen=varlen, names=names)
    if varlen:
        batch = check_varlen_meta(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q.device)
        q4, k4, v4 = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
        lens = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=int(max_seqlen_q),
                    max_seqlen_k=int(max_seqlen_k))  # fmt: skip
    else:
        batch, q4, k4, v4, lens = q.shape[0], q, k, v, {}
    alibi = check_alibi(alibi_slopes, batch, q.shape[-2], q.device)
    sink = check_sink(learnable_sink, q.shape[-2], q.device)
    if q_descale is None and k_descale is None and v_descale is None:
        descales = _NO_DESCALES  # what check_descales returns for them (not mutated below)
    else:
        descales = check_descales(q.dtype, batch, k.shape[-2], q.device, q_descale=q_descale, k_descale=k_descale,
                                  v_descale=v_descale)  # fmt: skip
    mods = {}
    if score_mod is not None or block_mask is not None:
        from .flex import builtin_window, check_mods

        sq, sk = (max_seqlen_q, max_seqlen_k) if varlen else (q.shape[1], k.shape[1])
        check_mods(score_mod, block_mask, batch, q.shape[-2], sq, sk, q.device)
        left = builtin_window(score_mod, block_mask, sq, sk, varlen)
        mods = {} if left is not None else dict(score_mod=score_mod, block_mask=block_mask)
    call = make_call(headdim=q.shape[-1], alibi_slopes=alibi, learnable_sink=sink, **lens, **descales, **mods,
                     **options)  # fmt: skip
    if block_mask is not None and not mods:  # a library causal / sliding-window block mask: the built-in window
        wl = left if call.window_left < 0 else call.window_left if left < 0 else min(left, call.window_left)
        call = dataclasses.replace(call, window_left=wl, window_right=0)
    if call.dropout_p > 0:
        call = dataclasses.replace(call, seed=draw_seed(q.device))
    backend = dispatch.choose_for(q4, k4, call, v=v4)
    if memo is not None and not varlen and call.dropout_p == 0 and not mods and descales is _NO_DESCALES and \
            alibi is None and sink is None and q.dtype in SUPPORTED_DTYPES:  # fmt: skip
        _remember(memo, call, backend)  # the checks passed: the signature's later calls skip them
    out, lse = attention(q4, k4, v4, call, backend)
    if varlen:
        out, lse = out.squeeze(0), lse.squeeze(0)
    if not return_attn_probs:
        return out
    if call.dropout_p > 0 and probs and fp8.is_fp8(q.dtype):
        q4, k4, _, call = fp8.dequantize_call(q4, k4, v4, call, torch.float32)
    p = attention_probs(q4, k4, call) if call.dropout_p > 0 and probs else None
    return out, lse, p


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
    learnable_sink: torch.Tensor | None = None,
    *,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    score_mod: Callable[..., torch.Tensor] | None = None,
    block_mask: BlockMask | None = None,
):
    """Exact attention, ``softmax(q k^T * scale + mask) v``, never materialising the scores.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        k: ``(batch, seqlen_k, nheads_k, headdim)``.
        v: ``(batch, seqlen_k, nheads_k, headdim)``.
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs, learnable_sink, q_descale, k_descale, v_descale, score_mod, block_mask: see
            the module docstring.

    Returns:
        out ``(batch, seqlen_q, nheads, headdim)``; with ``return_attn_probs=True``,
        ``(out, softmax_lse (batch, nheads, seqlen_q) float32, attn_probs or None)``.
    """
    memo, res = _lean(q, k, v, (dropout_p, softmax_scale, causal, window_size, softcap, deterministic),
                      return_attn_probs, alibi_slopes, learnable_sink, q_descale, k_descale, v_descale, score_mod,
                      block_mask)  # fmt: skip
    if res is not None:
        return res
    return _run(
        q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_attn_probs=return_attn_probs, learnable_sink=learnable_sink,
        q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
        score_mod=score_mod, block_mask=block_mask, memo=memo,
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
    learnable_sink: torch.Tensor | None = None,
):
    """:func:`flash_attn_func` with q, k, v packed: ``qkv (batch, seqlen, 3, nheads, headdim)``.

    Returns out ``(batch, seqlen, nheads, headdim)`` (and lse, probs as in :func:`flash_attn_func`).
    The gradient flows back to ``qkv``.
    """
    q, k, v = unbind_packed(qkv, "qkv", 3, 2)
    memo, res = _lean(q, k, v, (dropout_p, softmax_scale, causal, window_size, softcap, deterministic),
                      return_attn_probs, alibi_slopes, learnable_sink)  # fmt: skip
    if res is not None:
        return res
    return _run(
        q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_attn_probs=return_attn_probs, learnable_sink=learnable_sink,
        names=("qkv[:, :, 0]", "qkv[:, :, 1]", "qkv[:, :, 2]"), memo=memo,
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
    learnable_sink: torch.Tensor | None = None,
):
    """:func:`flash_attn_func` with k, v packed: q ``(batch, seqlen_q, nheads, headdim)``,
    ``kv (batch, seqlen_k, 2, nheads_k, headdim)``.

    Returns out ``(batch, seqlen_q, nheads, headdim)`` (and lse, probs as in :func:`flash_attn_func`).
    """
    k, v = unbind_packed(kv, "kv", 2, 2)
    memo, res = _lean(q, k, v, (dropout_p, softmax_scale, causal, window_size, softcap, deterministic),
                      return_attn_probs, alibi_slopes, learnable_sink)  # fmt: skip
    if res is not None:
        return res
    return _run(
        q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_attn_probs=return_attn_probs, learnable_sink=learnable_sink,
        names=("q", "kv[:, :, 0]", "kv[:, :, 1]"), memo=memo,
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
    learnable_sink: torch.Tensor | None = None,
    *,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
    score_mod: Callable[..., torch.Tensor] | None = None,
    block_mask: BlockMask | None = None,
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
        learnable_sink: optional float32 ``(nheads,)`` sink logits, see the module docstring.
        q_descale, k_descale, v_descale: FP8 descales ``(batch, nheads_k)``, ``batch`` the number
            of sequences; see the module docstring.
        score_mod, block_mask: see the module docstring; ``b`` is the sequence index and
            ``q_idx`` / ``kv_idx`` positions within the sequence; a block mask's batch dim is 1 or
            the number of sequences, its lengths at least ``max_seqlen_q`` / ``max_seqlen_k``.

    Returns:
        out ``(total_q, nheads, headdim)``; with ``return_attn_probs=True``,
        ``(out, softmax_lse (nheads, total_q) float32, attn_probs or None)``.
    """
    if block_table is not None:
        k, v = _gather_paged(q, k, v, cu_seqlens_k, max_seqlen_k, block_table)
    return _run(
        q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_attn_probs=return_attn_probs, learnable_sink=learnable_sink,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
        q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
        score_mod=score_mod, block_mask=block_mask,
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
    learnable_sink: torch.Tensor | None = None,
):
    """:func:`flash_attn_varlen_func` with ``qkv (total, 3, nheads, headdim)`` and one ``cu_seqlens``."""
    q, k, v = unbind_packed(qkv, "qkv", 3, 1)
    return _run(
        q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_attn_probs=return_attn_probs, learnable_sink=learnable_sink,
        cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
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
    learnable_sink: torch.Tensor | None = None,
):
    """:func:`flash_attn_varlen_func` with q ``(total_q, nheads, headdim)`` and
    ``kv (total_k, 2, nheads_k, headdim)``."""
    k, v = unbind_packed(kv, "kv", 2, 1)
    return _run(
        q, k, v, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
        softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_attn_probs=return_attn_probs, learnable_sink=learnable_sink,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, names=("q", "kv[:, 0]", "kv[:, 1]"),
    )  # fmt: skip
