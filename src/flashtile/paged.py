"""Paged KV caches: ``cache (num_blocks, page_block_size, nheads_k, headdim)`` plus an int32
``block_table (batch, max_blocks_per_seq)``; token ``p`` of sequence ``i`` lives at
``cache[block_table[i, p // page_block_size], p % page_block_size]``. Any page size works."""

from __future__ import annotations

import torch

from .spec import KVCache, capturing


def check_block_table(block_table: object, batch: int, num_blocks: int, device: torch.device) -> torch.Tensor:
    """Shape, dtype and device of ``block_table``."""
    if not isinstance(block_table, torch.Tensor) or block_table.dtype != torch.int32 or block_table.dim() != 2 \
            or block_table.shape[0] != batch:  # fmt: skip
        raise ValueError(f"block_table must be an int32 tensor of shape (batch, max_blocks) with batch = {batch}, "
                         f"got {getattr(block_table, 'dtype', type(block_table).__name__)} "
                         f"{tuple(getattr(block_table, 'shape', ()))}")  # fmt: skip
    if block_table.device != device:
        raise ValueError(f"block_table must be on the same device as q ({device}), got {block_table.device}")
    return block_table


def check_used_blocks(block_table: torch.Tensor, lens: list[int], page: int, num_blocks: int) -> None:
    """Every block a sequence of length ``lens[i]`` uses must be a valid index into the cache."""
    for i, n in enumerate(lens):
        used = (n + page - 1) // page
        if used > block_table.shape[1]:
            raise ValueError(f"sequence {i} needs {used} blocks of {page} tokens but block_table has "
                             f"{block_table.shape[1]} columns")  # fmt: skip
        if used:
            ids = block_table[i, :used]
            if int(ids.min()) < 0 or int(ids.max()) >= num_blocks:
                raise ValueError(f"block_table[{i}] has entries outside [0, {num_blocks}) (blocks of the cache) "
                                 f"among the {used} blocks the sequence uses")  # fmt: skip


def cache_index(
    rows: torch.Tensor, pos: torch.Tensor, block_table: torch.Tensor | None, cache_rows: torch.Tensor | None, page: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, second) cache indices of token ``pos`` of batch row ``rows``: paged when
    ``block_table`` is given, else dense row ``cache_rows[rows]`` (or ``rows``)."""
    if block_table is None:
        return (rows if cache_rows is None else cache_rows[rows]), pos
    return block_table[rows, pos // page].long(), pos % page


def packed_positions(
    lens: torch.Tensor, starts: torch.Tensor | None = None, total: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For sequences of ``lens`` tokens starting at cache position ``starts`` (default 0):
    the (row, position) of every token in the packed order. ``total``: ``lens.sum()`` when
    known (saves a host sync)."""
    total = int(lens.sum()) if total is None else total
    b = lens.numel()
    rows = torch.repeat_interleave(torch.arange(b, device=lens.device), lens, output_size=total)
    first = torch.cumsum(lens, 0) - lens
    pos = torch.arange(total, device=lens.device) - first[rows]
    if starts is not None:
        pos = pos + starts[rows]
    return rows, pos


def check_rotary_end(last: int, seqlen_ro: int) -> None:
    if last >= seqlen_ro:
        raise ValueError(f"rotary position {last} is out of range of rotary_cos/rotary_sin (seqlen_ro = {seqlen_ro})")


def check_cache_indices(cache: KVCache, seqlens: torch.Tensor, *, sq: int = 0, along: bool = False,
                        rotary: bool = False) -> None:
    """Every index of ``cache`` in range (``seqlens``: its ``seqlens`` as a tensor), with a message
    naming the offender: the cache indices, then (``rotary``) the rotary positions, flash-attn's (new
    keys at ``seqlens + t``, queries there too when ``along``, else at ``seqlens``).
    The cache checks run on the device and are read back with one host sync; the detailed message
    is worked out only when something is wrong. Nothing is read back while a CUDA graph is being
    captured."""
    if capturing(seqlens):
        return
    leftpad, sn, capacity, cache_batch_idx = cache.leftpad, cache.seqlen_new, cache.capacity, cache.batch_idx
    k_cache, block_table = cache.k_cache, cache.block_table
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
            if sl[i] < 0:
                raise ValueError(f"cache_seqlens[{i}] = {sl[i]} must be >= 0 (the number of tokens already in "
                                 "the cache)")  # fmt: skip
            if sl[i] + sn > capacity:
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
    if rotary and cache.rotary is not None and seqlens.numel():
        last = int(seqlens.max()) + max(sn - 1, sq - 1 if along else 0, 0)
        check_rotary_end(last, cache.rotary[0].shape[0])
