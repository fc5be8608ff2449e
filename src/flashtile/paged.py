"""Paged KV caches: ``cache (num_blocks, page_block_size, nheads_k, headdim)`` plus an int32
``block_table (batch, max_blocks_per_seq)``; token ``p`` of sequence ``i`` lives at
``cache[block_table[i, p // page_block_size], p % page_block_size]``. Any page size works."""

from __future__ import annotations

import torch


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
