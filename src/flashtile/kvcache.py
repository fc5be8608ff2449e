"""``flash_attn_with_kvcache``: attention of new queries against a (dense or paged) KV cache,
appending the new keys/values in place first. flash-attn 2.8's semantics, any page size.

The keys of batch row ``i`` are the cache positions ``[leftpad_i, cache_seqlens_i + seqlen_new)``
(``leftpad_i = cache_leftpad[i]`` or 0), numbered from 0 at ``leftpad_i``; causal / window /
ALiBi alignment uses ``seqlen_k_i = cache_seqlens_i + seqlen_new - leftpad_i``, so with
``causal=True`` the last query sees every key and query ``t`` sees keys up to
``seqlen_k_i - seqlen_q + t``.

Backends (chosen by :mod:`flashtile.dispatch`): ``triton`` runs the split-KV kernel of
:mod:`flashtile.backends.triton.decode`, which reads the cache in place; ``torch`` gathers each
row's keys and runs the tiled engine (``num_splits > 1``: pieces of the key range computed
separately). Both merge pieces with :func:`flashtile.merge.merge_states`.
"""

from __future__ import annotations

import torch

from . import dispatch
from .backends.torch_tiled import _Seq, forward_seqs
from .interface import flash_attn_varlen_func
from .merge import merge_states
from .paged import cache_index, check_block_table, check_used_blocks, packed_positions
from .rotary import apply_rotary_at, check_rotary_tables
from .spec import Problem, capturing, check_alibi, check_qkv, make_spec


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
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape, got {tuple(k_cache.shape)} "
                         f"and {tuple(v_cache.shape)}")  # fmt: skip
    check_qkv(q, k_cache, v_cache, varlen=False, names=("q", "k_cache", "v_cache"), same_batch=False)


def _check_indices(
    seqlens: torch.Tensor,
    leftpad: torch.Tensor | None,
    sn: int,
    capacity: int,
    cache_batch_idx: torch.Tensor | None,
    k_cache: torch.Tensor,
    block_table: torch.Tensor | None,
    rotary: tuple[torch.Tensor, torch.Tensor, bool] | None = None,
    sq: int = 0,
    along: bool = False,
) -> None:
    """Every index in range, with a message naming the offender: the cache indices, then the
    rotary positions (new keys at ``seqlens - leftpad + t``, queries there too when ``along``,
    else at ``seqlens - leftpad``). The cache checks run on the device and are read back with
    one host sync; the detailed message is worked out only when something is wrong. Nothing is
    read back while a CUDA graph is being captured."""
    if capturing(seqlens):
        return
    paged = block_table is not None
    page, n_rows = (k_cache.shape[1] if paged else 0), k_cache.shape[0]
    seqlens = seqlens.long()
    lp = torch.zeros_like(seqlens) if leftpad is None else leftpad.long()
    rows = None if cache_batch_idx is None else cache_batch_idx.long()
    checks = [(seqlens < 0) | (seqlens + sn > capacity), (lp < 0) | (lp > seqlens)]
    if rows is not None:
        checks.append((rows < 0) | (rows >= n_rows))
    if paged:
        used = (seqlens + sn + page - 1) // page
        cols = torch.arange(block_table.shape[1], device=block_table.device)
        bad = (cols[None, :] < used[:, None]) & ((block_table < 0) | (block_table >= n_rows))
        checks.append(bad.any(1))
    flags = torch.stack([c.any() for c in checks]).tolist() if seqlens.numel() else []
    if any(flags):
        sl, lpl = seqlens.tolist(), lp.tolist()
        for i in range(len(sl)):
            if sl[i] < 0 or sl[i] + sn > capacity:
                raise ValueError(
                    f"cache_seqlens[{i}] + seqlen_new = {sl[i]} + {sn} exceeds the cache capacity {capacity}"
                    + (" (max_blocks_per_seq * page_block_size)" if paged else " (seqlen_cache)")
                )
            if not 0 <= lpl[i] <= sl[i]:
                raise ValueError(f"cache_leftpad[{i}] = {lpl[i]} must be in [0, cache_seqlens[{i}] = {sl[i]}]")
        if rows is not None and flags[2]:
            raise ValueError(f"cache_batch_idx entries must be in [0, {n_rows}) (rows of k_cache)")
        check_used_blocks(block_table, [n + sn for n in sl], page, n_rows)
        raise AssertionError("unreachable: a range check failed without a message")  # pragma: no cover
    if rotary is not None and seqlens.numel():
        last = int((seqlens - lp).max()) + max(sn - 1, sq - 1 if along else 0, 0)
        _check_rotary_end(last, rotary[0].shape[0])


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
):
    """Attend ``q`` to a KV cache, after appending ``k`` / ``v`` to it in place.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        k_cache, v_cache: dense ``(batch_cache, seqlen_cache, nheads_k, headdim)``, or paged
            ``(num_blocks, page_block_size, nheads_k, headdim)`` when ``block_table`` is given
            (any page size). Updated in place when ``k`` / ``v`` are given.
        k, v: optional new tokens ``(batch, seqlen_new, nheads_k, headdim)``, written at
            positions ``cache_seqlens[i] ..`` of row ``i`` before attending.
        rotary_cos, rotary_sin: optional ``(seqlen_ro, rotary_dim / 2)``: rotary embedding of the
            new k at positions ``cache_seqlens - cache_leftpad + t``, and of q at the same
            positions when ``causal`` or a window is set (else all of q at position
            ``cache_seqlens - cache_leftpad``). ``rotary_interleaved``: GPT-J (True) or NeoX (False).
        cache_seqlens: int or int32 ``(batch,)``: tokens already in the cache per row
            (None = the whole cache).
        cache_batch_idx: int32 ``(batch,)``: the cache row each batch row uses (dense caches).
        cache_leftpad: int32 ``(batch,)``: where each row's keys start in the cache.
        block_table: int32 ``(batch, max_blocks_per_seq)``: cache blocks of each row, in order.
        softmax_scale, causal, window_size, softcap, alibi_slopes: as :func:`flash_attn_func`.
        num_splits: key-range pieces per row computed separately and merged (0 = choose, 1 = no split).
        return_softmax_lse: also return lse float32 ``(batch, nheads, seqlen_q)``.

    Returns:
        out ``(batch, seqlen_q, nheads, headdim)``, or ``(out, lse)``.
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q must be a 4-D tensor (batch, seqlen_q, nheads, headdim), got "
                         f"{tuple(q.shape) if isinstance(q, torch.Tensor) else type(q).__name__}")  # fmt: skip
    _check_cache(q, k_cache, v_cache)
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
        sn = k.shape[1]
    if isinstance(cache_seqlens, torch.Tensor):
        _int32_vec(cache_seqlens, "cache_seqlens", b, dev)
    else:  # None (the whole cache) or one int: checked here, no device work
        n = capacity - sn if cache_seqlens is None else int(cache_seqlens)
        if n < 0 or n + sn > capacity:
            raise ValueError(f"cache_seqlens + seqlen_new = {n} + {sn} exceeds the cache capacity {capacity}")
        cache_seqlens = n
    spec = make_spec(headdim=d, dropout_p=0.0, softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                     softcap=softcap, deterministic=False)  # fmt: skip
    alibi = check_alibi(alibi_slopes, b, h, dev)
    rotary = None
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        rotary = (rotary_cos, rotary_sin, rotary_interleaved)
    problem = Problem(batch=b, seqlen_q=sq, seqlen_k=capacity, nheads=h, nheads_k=hk, headdim=d, dtype=q.dtype,
                      device=dev, varlen=False, has_alibi=alibi is not None)  # fmt: skip
    args = (q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, spec, alibi,
            rotary, capacity, num_splits)  # fmt: skip
    if dispatch.choose(problem, spec) == "triton":
        out, lse = _triton_kvcache(*args)
    else:
        out, lse = _torch_kvcache(*args)
    return (out, lse) if return_softmax_lse else out


def _positions(seqlens: torch.Tensor, leftpad: torch.Tensor | None, n: int, along: bool) -> torch.Tensor:
    """Rotary positions ``(b, n)``: ``seqlens - leftpad (+ t if along)``."""
    base = (seqlens if leftpad is None else seqlens - leftpad).long().view(-1, 1)
    return base + torch.arange(n, device=seqlens.device).view(1, n) if along else base.expand(-1, n)


def _check_rotary_end(last: int, seqlen_ro: int) -> None:
    if last >= seqlen_ro:
        raise ValueError(f"rotary position {last} is out of range of rotary_cos/rotary_sin (seqlen_ro = {seqlen_ro})")


def _triton_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, spec,
                    alibi, rotary, capacity, num_splits):  # fmt: skip
    """The GPU path: the append and attention kernels check every index they use (never reading
    or writing out of bounds) and raise one error flag, read back after both are queued, so the
    host sync overlaps the work; the detailed message is worked out only on error. No read-back
    while a CUDA graph is captured (rows with a bad index then come out NaN)."""
    from .backends.triton.launch_decode import append_kv, decode, error_flag

    b, dev = q.shape[0], q.device
    sn = 0 if k is None else k.shape[1]
    paged = block_table is not None
    seqlens = cache_seqlens if isinstance(cache_seqlens, torch.Tensor) else \
        torch.full((b,), cache_seqlens, dtype=torch.int32, device=dev)  # fmt: skip
    check = not capturing(q)
    has_index_tensors = isinstance(cache_seqlens, torch.Tensor) or cache_batch_idx is not None \
        or cache_leftpad is not None or paged  # fmt: skip
    if rotary is not None:
        check_rotary_tables(rotary[0], rotary[1], q.shape[-1], dev)
        if not has_index_tensors:  # positions known here: seqlens is an int, no leftpad
            _check_rotary_end(cache_seqlens + max(sn - 1, q.shape[1] - 1 if spec.has_window else 0, 0),
                              rotary[0].shape[0])  # fmt: skip
    table = block_table if paged else (None if cache_batch_idx is None else cache_batch_idx.view(b, 1))
    n_index = k_cache.shape[0]
    err = error_flag(dev)
    if k is not None:
        append_kv(k, v, k_cache, v_cache, table, seqlens, cache_leftpad, capacity=capacity, n_index=n_index,
                  dense=not paged, err=err, rotary=rotary)  # fmt: skip
    out, lse = decode(q if q.stride(-1) == 1 else q.contiguous(), k_cache, v_cache, table, seqlens, cache_leftpad,
                      spec, sn=sn, capacity=capacity, n_index=n_index, dense=not paged, err=err,
                      alibi_slopes=alibi, num_splits=num_splits, rotary=rotary)  # fmt: skip
    if check and has_index_tensors:
        code = int(err.item())
        if code:  # this call's, or stale bits of CUDA graph replays on this stream: check by name
            err.zero_()
            _check_indices(seqlens, cache_leftpad, sn, capacity, cache_batch_idx, k_cache, block_table, rotary,
                           q.shape[1], spec.has_window)  # fmt: skip
    return out, lse


def _torch_kvcache(q, k_cache, v_cache, k, v, cache_seqlens, cache_batch_idx, cache_leftpad, block_table, spec,
                   alibi, rotary, capacity, num_splits):  # fmt: skip
    """Any device: append with indexing, gather each row's keys, run the tiled engine."""
    b, sq, h, d = q.shape
    dev = q.device
    sn = 0 if k is None else k.shape[1]
    paged = block_table is not None
    page = k_cache.shape[1] if paged else 0
    cache_rows = torch.arange(b, device=dev) if cache_batch_idx is None else cache_batch_idx.long()
    seqlens = cache_seqlens.long() if isinstance(cache_seqlens, torch.Tensor) else \
        torch.full((b,), cache_seqlens, dtype=torch.long, device=dev)  # fmt: skip
    leftpad = torch.zeros(b, dtype=torch.long, device=dev) if cache_leftpad is None else cache_leftpad.long()
    _check_indices(seqlens, cache_leftpad, sn, capacity, cache_batch_idx, k_cache, block_table)
    # 1. rotary on the new keys, then append them in place.
    if k is not None:
        if rotary is not None:
            k = apply_rotary_at(k, rotary[0], rotary[1], _positions(seqlens, leftpad, sn, True), rotary[2])
        rows = torch.arange(b, device=dev).view(b, 1).expand(b, sn)
        at = seqlens.view(b, 1) + torch.arange(sn, device=dev).view(1, sn)
        i0, i1 = cache_index(rows, at, block_table, cache_rows, page)
        k_cache[i0, i1] = k.to(k_cache.dtype)
        v_cache[i0, i1] = v.to(v_cache.dtype)
    # 2. rotary on q.
    if rotary is not None:
        q = apply_rotary_at(q, rotary[0], rotary[1], _positions(seqlens, leftpad, sq, spec.has_window), rotary[2])
    # 3. gather each row's keys [leftpad, seqlens + sn) into the packed layout.
    lens_k = seqlens + sn - leftpad
    cu_k = torch.zeros(b + 1, dtype=torch.int32, device=dev)
    cu_k[1:] = torch.cumsum(lens_k, 0)
    row_of, pos = packed_positions(lens_k, leftpad)
    i0, i1 = cache_index(row_of, pos, block_table, cache_rows, page)
    kp, vp = k_cache[i0, i1], v_cache[i0, i1]  # (total_k, hk, d)

    splits = 1 if num_splits <= 1 else int(num_splits)
    if splits == 1:
        cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=dev)
        out, lse, _ = flash_attn_varlen_func(
            q.reshape(b * sq, h, d), kp, vp, cu_q, cu_k, sq, int(lens_k.max()) if b else 0,
            softmax_scale=spec.softmax_scale, window_size=(spec.window_left, spec.window_right),
            softcap=spec.softcap, alibi_slopes=alibi, return_attn_probs=True,
        )  # fmt: skip
        return out.view(b, sq, h, d), lse.view(h, b, sq).permute(1, 0, 2).contiguous()
    return _split_attention(q, kp, vp, cu_k.tolist(), spec, alibi, splits)


def _split_attention(q, kp, vp, cu_k, spec, alibi, splits):
    """Split each row's keys into ``splits`` pieces, attend to each piece, merge the states."""
    b, sq, h, d = q.shape
    outs, lses = [], []
    for piece in range(splits):
        seqs = []
        for i in range(b):
            n = cu_k[i + 1] - cu_k[i]
            chunk = -(-n // splits) if n else 0
            lo, hi = min(n, piece * chunk), min(n, (piece + 1) * chunk)
            sl = None if alibi is None else alibi[i : i + 1]
            # Keys [lo, hi) of a row with n keys: the diagonal sits at column n - sq - lo of the piece.
            seqs.append(_Seq(row0=i * sq, sq=sq, col0=cu_k[i] + lo, sk=hi - lo, batch=slice(0, 1), bh0=0,
                             slopes=sl, key_offset=n - sq - lo))  # fmt: skip
        # Packed layout: q rows of batch i at [i * sq, (i + 1) * sq), keys as gathered.
        out, lse = forward_seqs(q.reshape(1, b * sq, h, d), kp.unsqueeze(0), vp.unsqueeze(0), spec, seqs)
        outs.append(out.view(b, sq, h, d))
        lses.append(lse.view(h, b, sq).permute(1, 0, 2))
    return merge_states(outs, lses)
