"""``flash_attn_with_kvcache``: attention of new queries against a (dense or paged) KV cache,
appending the new keys/values in place first. flash-attn 2.8's semantics, any page size.

The keys of batch row ``i`` are the cache positions ``[leftpad_i, cache_seqlens_i + seqlen_new)``
(``leftpad_i = cache_leftpad[i]`` or 0), numbered from 0 at ``leftpad_i``; causal / window /
ALiBi alignment uses ``seqlen_k_i = cache_seqlens_i + seqlen_new - leftpad_i``, so with
``causal=True`` the last query sees every key and query ``t`` sees keys up to
``seqlen_k_i - seqlen_q + t``.

Rotary positions are flash-attn's, which are cache indices, leftpad included (not key numbers): new
key ``t`` of row ``i`` is rotated at ``cache_seqlens_i + t``, where it is written; query ``t`` at
``cache_seqlens_i + t`` when the attention is causal or local (a window side >= the cache
capacity counts as unbounded, as flash-attn clamps it), else every query at ``cache_seqlens_i``.

This module validates the call and hands it, as an :class:`~flashtile.spec.AttnCall` and a
:class:`~flashtile.spec.KVCache`, to ``decode`` of the backend :mod:`flashtile.dispatch` picks
among those that declare KV-cache decoding (``Capabilities.decode``).
"""

from __future__ import annotations

import torch

from . import dispatch
from .backends.base import adopt as _adopt
from .backends.base import recording as _recording
from .backends.base import registry
from .fp8 import OUT_DTYPE, compute_dtype, is_fp8
from .ops import Memo, fast_mode, option_types
from .paged import check_block_table, check_rotary_end
from .rotary import check_rotary_tables
from .spec import KVCache, Problem, as_int, check_alibi, check_descales, check_qkv, check_sink, make_call


def _int32_vec(x: object, name: str, b: int, device: torch.device) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be an int32 tensor of shape (batch,) = ({b},), got {type(x).__name__}")
    if x.dtype != torch.int32 or x.shape != (b,):
        raise ValueError(f"{name} must be an int32 tensor of shape (batch,) = ({b},), got {x.dtype} {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} must be on the same device as q ({device}), got {x.device}")
    return x


def _check_cache(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    """Rank, dtype, device, heads and head dim of the caches against q (their first dim is
    cache rows or pages, not q's batch)."""
    for x, n in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[0] < 1:
            raise ValueError(f"{n} must be a 4-D tensor (batch_cache or num_blocks, seqlen_cache or page_block_size, "
                             f"nheads_k, headdim) with at least one row, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")  # fmt: skip
    if k_cache.shape[:-1] != v_cache.shape[:-1]:
        raise ValueError(f"k_cache and v_cache must have the same shape except the head dim, got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")  # fmt: skip
    check_qkv(q, k_cache, v_cache, varlen=False, names=("q", "k_cache", "v_cache"), same_batch=False)


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
    learnable_sink: torch.Tensor | None = None,
    *,
    q_descale: torch.Tensor | None = None,
    k_descale: torch.Tensor | None = None,
    v_descale: torch.Tensor | None = None,
):
    """Attend ``q`` to a KV cache, after appending ``k`` / ``v`` to it in place.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        k_cache, v_cache: dense ``(batch_cache, seqlen_cache, nheads_k, headdim)``, or paged
            ``(num_blocks, page_block_size, nheads_k, headdim)`` when ``block_table`` is given
            (any page size). Updated in place when ``k`` / ``v`` are given (so they must not
            require grad then, unless under ``torch.no_grad()``).
        k, v: optional new tokens ``(batch, seqlen_new, nheads_k, headdim)``, written at
            positions ``cache_seqlens[i] ..`` of row ``i`` before attending.
        rotary_cos, rotary_sin: optional ``(seqlen_ro, rotary_dim / 2)``: rotary embedding of the
            new k at positions ``cache_seqlens, cache_seqlens + 1, ...`` (their indices in the
            cache, ``cache_leftpad`` included, as in flash-attn), and of q at the same positions
            when ``causal`` or a window is set (else all of q at position ``cache_seqlens``); see
            the module docstring. ``rotary_interleaved``: GPT-J (True) or NeoX (False).
        cache_seqlens: int or int32 ``(batch,)``: tokens already in the cache per row, >= 0
            (None = the whole cache).
        cache_batch_idx: int32 ``(batch,)``: the cache row each batch row uses (dense caches).
        cache_leftpad: int32 ``(batch,)``: where each row's keys start in the cache.
        block_table: int32 ``(batch, max_blocks_per_seq)``: cache blocks of each row, in order.
        softmax_scale, causal, window_size, softcap, alibi_slopes: as :func:`flash_attn_func`.
        num_splits: key-range pieces per row computed separately and merged, an int >= 0 (0 = choose,
            1 = no split).
        return_softmax_lse: also return lse float32 ``(batch, nheads, seqlen_q)``.
        learnable_sink: optional float32 ``(nheads,)`` per-head sink logits (as
            :func:`flash_attn_func`; the lse includes the sink, counted once however many
            ``num_splits``).
        q_descale, k_descale, v_descale: FP8 caches (flash-attn 3's API): with q, the caches and
            k / v all ``torch.float8_e4m3fn``, float32 descales ``(batch, nheads_k)`` (None = 1;
            k_descale / v_descale apply to the cache and the new tokens alike); the output is
            bfloat16. Computed by dequantising the caches (a full copy per call: slow, for
            correctness on every device); the new tokens are appended to the FP8 cache as given
            (rotated ones re-quantised with the row's descale). With ``block_table`` or
            ``cache_batch_idx`` the cache rows are not the batch rows, so k_descale / v_descale
            must then be one per KV head (shape ``(1, nheads_k)`` or an expanded view).

    v_cache (and v) may have their own head dim ``headdim_v`` (e.g. 128 with 192 for q/k); the
    output then has it.

    Returns:
        out ``(batch, seqlen_q, nheads, headdim_v)``, or ``(out, lse)``.
    """
    memo = None
    if rotary_cos is None and rotary_sin is None and cache_batch_idx is None and cache_leftpad is None and \
            block_table is None and alibi_slopes is None and learnable_sink is None and q_descale is None and \
            k_descale is None and v_descale is None:  # fmt: skip
        memo, res = _lean(q, k_cache, v_cache, k, v, cache_seqlens, (softmax_scale, causal, window_size, softcap,
                                                                     num_splits), return_softmax_lse)  # fmt: skip
        if res is not None:
            return res
    return _kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                    block_table, softmax_scale, causal, window_size, softcap, rotary_interleaved, alibi_slopes,
                    num_splits, return_softmax_lse, learnable_sink, q_descale, k_descale, v_descale, memo)  # fmt: skip


def _kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
             block_table, softmax_scale, causal, window_size, softcap, rotary_interleaved, alibi_slopes, num_splits,
             return_softmax_lse, learnable_sink, q_descale, k_descale, v_descale, memo):  # fmt: skip
    """:func:`flash_attn_with_kvcache`'s checks and call; ``memo``: the signature to record once
    the checks have passed (see :func:`_lean`)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor (batch, seqlen_q, nheads, headdim), got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")  # fmt: skip
    _check_cache(q, k_cache, v_cache)
    if is_fp8(q.dtype):
        return _fp8_kvcache(
            q, k_cache, v_cache, k, v, q_descale, k_descale, v_descale, rotary_cos=rotary_cos,
            rotary_sin=rotary_sin, cache_seqlens=cache_seqlens, cache_batch_idx=cache_batch_idx,
            cache_leftpad=cache_leftpad, block_table=block_table, softmax_scale=softmax_scale, causal=causal,
            window_size=window_size, softcap=softcap, rotary_interleaved=rotary_interleaved,
            alibi_slopes=alibi_slopes, num_splits=num_splits, return_softmax_lse=return_softmax_lse,
            learnable_sink=learnable_sink,
        )  # fmt: skip
    if q_descale is not None or k_descale is not None or v_descale is not None:  # (they apply to FP8 only)
        check_descales(q.dtype, q.shape[0], k_cache.shape[2], q.device, q_descale=q_descale, k_descale=k_descale,
                       v_descale=v_descale)  # fmt: skip
    b, sq, h, d = q.shape
    dev = q.device
    paged = block_table is not None
    if paged:
        check_block_table(block_table, b, k_cache.shape[0], dev)
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx cannot be used with block_table (a paged cache)")
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
        if cache_batch_idx is None and k_cache.shape[0] < b:
            raise ValueError(f"k_cache has {k_cache.shape[0]} rows but q has batch {b}; pass cache_batch_idx")
    hk = k_cache.shape[2]
    if cache_batch_idx is not None:
        _int32_vec(cache_batch_idx, "cache_batch_idx", b, dev)
    if cache_leftpad is not None:
        _int32_vec(cache_leftpad, "cache_leftpad", b, dev)
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together (new tokens to append) or both be None")
    sn = 0
    if k is not None:
        check_qkv(q, k, v, varlen=False, names=("q", "k", "v"))
        if k.shape[2] != hk:
            raise ValueError(f"k must have nheads_k = {hk} heads like k_cache, got {k.shape[2]}")
        if v.shape[-1] != v_cache.shape[-1]:
            raise ValueError(f"v must have the head dim of v_cache ({v_cache.shape[-1]}), got {v.shape[-1]}")
        sn = k.shape[1]
        if torch.is_grad_enabled():
            for x, n in ((k_cache, "k_cache"), (v_cache, "v_cache")):
                if x.requires_grad:
                    raise ValueError(
                        f"{n} requires grad, but the new k/v are written into it in place, which autograd does "
                        f"not allow on a tensor that requires grad (and flash_attn_with_kvcache has no backward): "
                        f"pass a cache that does not require grad (e.g. {n}.detach(), which shares its memory) "
                        "or call it under torch.no_grad()"
                    )
    if isinstance(cache_seqlens, torch.Tensor):
        _int32_vec(cache_seqlens, "cache_seqlens", b, dev)
    elif cache_seqlens is None:  # the whole cache: checked here, no device work
        if sn > capacity:
            raise ValueError(f"k has seqlen_new = {sn} new tokens, more than the cache capacity {capacity}")
        cache_seqlens = capacity - sn
    else:  # one int: checked here, no device work
        n = as_int(cache_seqlens, "cache_seqlens", "an int or an int32 tensor of shape (batch,)")
        if n < 0:
            raise ValueError(f"cache_seqlens must be >= 0 (the number of tokens already in the cache), got {n}")
        if n + sn > capacity:
            raise ValueError(f"cache_seqlens + seqlen_new = {n} + {sn} exceeds the cache capacity {capacity}")
        cache_seqlens = n
    num_splits = as_int(num_splits, "num_splits", "an int >= 0 (0 = choose, 1 = no split)")
    if num_splits < 0:
        raise ValueError(f"num_splits must be an int >= 0 (0 = choose, 1 = no split), got {num_splits}")
    call = make_call(headdim=d, softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
                     alibi_slopes=check_alibi(alibi_slopes, b, h, dev),
                     learnable_sink=check_sink(learnable_sink, h, dev))  # fmt: skip
    rotary = None
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        check_rotary_tables(rotary_cos, rotary_sin, d, dev)
        rotary = (rotary_cos, rotary_sin, rotary_interleaved)
    cache = KVCache(k_cache=k_cache, v_cache=v_cache, k_new=k, v_new=v, seqlens=cache_seqlens,
                    batch_idx=cache_batch_idx, leftpad=cache_leftpad, block_table=block_table, rotary=rotary,
                    capacity=capacity, num_splits=num_splits)  # fmt: skip
    if rotary is not None and not cache.has_index_tensors:  # positions known here: seqlens is an int, no leftpad
        along = cache.rotary_along(call)
        check_rotary_end(cache_seqlens + max(sn - 1, sq - 1 if along else 0, 0), rotary_cos.shape[0])
    problem = lambda: Problem(batch=b, seqlen_q=sq, seqlen_k=capacity, nheads=h, nheads_k=hk, headdim=d,  # noqa: E731
                              dtype=q.dtype, device=dev, headdim_v=v_cache.shape[-1])  # fmt: skip
    name = dispatch.choose_for(q, k_cache, call, problem, decode=True, v=v_cache)  # (brings the registry up to date)
    if memo is not None:  # (no rotary, index tensors but the lengths, ALiBi, sink or descales: see _lean)
        _remember(memo, (call, name, capacity, sn, num_splits))  # the checks passed: later calls skip them
    backend = registry()[name]
    out, lse = backend.decode(q, cache, call)
    return (out, lse) if return_softmax_lse else out


# Signature memo (issue 16): a call without rotary tables, index tensors other than the cache
# lengths, ALiBi, sinks or descales, in plain eager mode (ops.fast_mode(), plain tensors), is keyed
# by everything its checks, make_call and dispatch read -- shapes, dtypes and devices of q, the
# caches and the new k / v (last strides 1, else no memo), whether the caches require grad, the cache lengths' kind (an
# int, None, or an int32 tensor's dtype, shape and device), every option with its type (and the
# types of window_size's entries) and dispatch.state() -- except an int cache length's value, which
# is checked on every hit as the checks do (>= 0, room for the new tokens). A hit builds the
# KVCache and calls the backend chosen for the first call; misses take _kvcache, which records the
# signature once its checks have passed.
_MEMO = Memo(256)
_Tensor = torch.Tensor
# The flat path (issue 16), for calls without new tokens: per full signature (the memo's key and
# the strides of q and the caches: with the shapes the memo keys, what the backend's launch plans
# key on besides the call) the runner the backend's launcher offered (backends.base.OFFERS:
# ``runner(q, k_cache, v_cache, lens)`` allocates, launches the prepared kernels and reads the error
# flag as the backend does), and the capacity. Recorded from a memo hit; an int length is checked
# on every call as on a memo hit. A runner that declines (plans cleared) is dropped.
_FLAT = Memo(256)


def _memo_key(q, k_cache, v_cache, k, v, seqlens, opts: tuple) -> tuple | None:
    """The signature of a call for :data:`_FLAT`: ``(memo key (see above), strides of q, k_cache,
    v_cache)``; None where the memo does not apply."""
    T = _Tensor
    if type(q) is not T or type(k_cache) is not T or type(v_cache) is not T or not fast_mode():
        return None
    w = opts[2]
    if k_cache.requires_grad or v_cache.requires_grad:
        return None
    if type(w) is not tuple:
        if type(w) is not list:
            return None
        w = tuple(w)  # a list normalises as the tuple of its entries does (their types are keyed)
        opts = (*opts[:2], w, *opts[3:])
    if k is None and v is None:
        new = None
    elif type(k) is T and type(v) is T:
        new = (k.shape, v.shape, k.dtype, v.dtype, k.device, v.device)
        try:
            if k.stride(-1) != 1 or v.stride(-1) != 1:
                return None
        except (IndexError, RuntimeError):
            return None
    else:
        return None
    ts = type(seqlens)
    if ts is T:
        lens = (seqlens.dtype, seqlens.shape, seqlens.device)
    elif ts is int or seqlens is None:
        lens = ts
    else:
        return None
    try:  # unit last strides only (the checks let others through on empty tensors only)
        qt, kt, vt = q.stride(), k_cache.stride(), v_cache.stride()
        if qt[-1] != 1 or kt[-1] != 1 or vt[-1] != 1:
            return None
    except (IndexError, RuntimeError):  # 0-d tensors, layouts without strides: the checks raise
        return None
    s, c, _, cap, n = opts  # usual: float or None scale, bool causal, float softcap, int num_splits,
    # two int window sides
    types = option_types(opts, w, (s is None or type(s) is float) and type(c) is bool and type(cap) is float and
                         type(n) is int and len(w) == 2 and type(w[0]) is int and type(w[1]) is int)  # fmt: skip
    return ((q.shape, k_cache.shape, v_cache.shape, q.dtype, k_cache.dtype, v_cache.dtype, q.device, k_cache.device,
             v_cache.device, new, lens, opts, types, dispatch.state()), qt, kt, vt)  # fmt: skip


def _lean(q, k_cache, v_cache, k, v, seqlens, opts: tuple, return_softmax_lse: object):
    """A call through the memo: ``(key, None)`` on a miss (record with that key), ``(None,
    result)`` on a hit, ``(None, None)`` where the memo does not apply."""
    full = _memo_key(q, k_cache, v_cache, k, v, seqlens, opts)
    if full is None:
        return None, None
    base = full[0]
    if k is not None:
        full = None
    else:  # (no new tokens: v is None too, see _memo_key) the flat path, see _FLAT
        try:
            flat = _FLAT.get(full)
        except (TypeError, ValueError):  # an option that cannot be hashed or compared (Memo.lookup)
            return None, None
        if flat is not None:
            runner, capacity = flat
            if seqlens is None:
                seqlens = capacity
            elif type(seqlens) is int and (seqlens < 0 or seqlens > capacity):
                return None, None  # the checks raise (the slow path)
            res = runner(q, k_cache, v_cache, seqlens, return_softmax_lse)  # (without it: an lse to drop)
            if res is not None:
                return None, (res if return_softmax_lse else res[0])
            del _FLAT[full]  # the runner declined (its plans were cleared): the memo's path below
    key, hit = _MEMO.lookup(base)
    if hit is None:
        return key, None
    call, name, capacity, sn, num_splits = hit
    if seqlens is None:
        seqlens = capacity - sn
    elif type(seqlens) is int and (seqlens < 0 or seqlens + sn > capacity):
        return None, None  # the checks raise (the slow path)
    cache = _new(KVCache)
    # a frozen dataclass: its fields set as its __init__ sets them (object.__setattr__), in one update
    cache.__dict__.update(k_cache=k_cache, v_cache=v_cache, k_new=k, v_new=v, seqlens=seqlens, batch_idx=None,
                          leftpad=None, block_table=None, rotary=None, capacity=capacity,
                          num_splits=num_splits)  # fmt: skip
    if full is None:
        out, lse = registry()[name].decode(q, cache, call)
    else:
        (out, lse), offers = _recording(registry()[name].decode, q, cache, call)
        if offers:
            runner = _adopt(offers, (q, k_cache, v_cache), (out, lse))
            if runner is not None:
                _FLAT.record(full, (runner, capacity))
    return None, ((out, lse) if return_softmax_lse else out)


_new = object.__new__


def _remember(key: tuple, entry: tuple) -> None:
    _MEMO.record(key, entry)


def _fp8_kvcache(q, k_cache, v_cache, k, v, q_descale, k_descale, v_descale, **options):
    """An FP8 ``flash_attn_with_kvcache`` call on dequantised copies (see its docstring): the
    descales are applied, the call runs in :func:`flashtile.fp8.compute_dtype`, and the copies of
    the caches are written back to the FP8 caches when new tokens were appended (e4m3 -> x descale
    -> bf16/fp32 -> / descale -> e4m3 is exact, so untouched entries keep their bits)."""
    b, hk = q.shape[0], k_cache.shape[2]
    ds = check_descales(q.dtype, b, hk, q.device, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale)
    shared_rows = options["block_table"] is not None or options["cache_batch_idx"] is not None
    for name in ("k_descale", "v_descale"):
        dsc = ds[name]
        if dsc is not None and shared_rows and b > 1 and dsc.stride(0) != 0:
            raise ValueError(f"{name} must be one scale per KV head, shape (1, nheads_k) = (1, {hk}), with "
                             "block_table or cache_batch_idx (cache rows are not batch rows), got "
                             "(batch, nheads_k)")  # fmt: skip
    if k is not None and not (k.dtype == v.dtype == q.dtype):
        raise TypeError(f"k and v must have q's dtype ({q.dtype}), got {k.dtype} and {v.dtype}")
    dtype = compute_dtype(q.device)

    def scale_of(dsc, rows, heads):  # (rows, 1, heads, 1) float32 factors, or None
        if dsc is None:
            return None
        dsc = dsc.float().repeat_interleave(heads // hk, dim=1)
        if dsc.shape[0] != rows:
            dsc = dsc[:1].expand(rows, heads) if shared_rows else torch.cat(
                [dsc, dsc.new_ones(rows - dsc.shape[0], heads)])  # cache rows past the batch: unused
        return dsc.reshape(rows, 1, heads, 1)

    def deq(x, dsc):
        f = scale_of(dsc, x.shape[0], x.shape[2])
        return (x.float() if f is None else x.float() * f).to(dtype)

    kc, vc = deq(k_cache, ds["k_descale"]), deq(v_cache, ds["v_descale"])
    kn = None if k is None else deq(k, ds["k_descale"])
    vn = None if v is None else deq(v, ds["v_descale"])
    res = flash_attn_with_kvcache(deq(q, ds["q_descale"]), kc, vc, kn, vn, **options)
    if k is not None:
        for cache, copy, dsc in ((k_cache, kc, ds["k_descale"]), (v_cache, vc, ds["v_descale"])):
            f = scale_of(dsc, cache.shape[0], hk)
            cache.copy_((copy.float() if f is None else copy.float() / f).to(cache.dtype))
    if options["return_softmax_lse"]:
        return res[0].to(OUT_DTYPE), res[1]
    return res.to(OUT_DTYPE)
