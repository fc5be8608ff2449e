"""The visibility rule of causal / sliding-window attention, as one pure function.

Query row ``i`` sees key column ``j`` when ``i + off - left <= j <= i + off + right`` with
``off = seqlen_k - seqlen_q`` (bottom-right alignment) and ``-1`` meaning "unbounded".
The reference, the torch engine and the tests all call this; the Triton kernels encode the
same inequalities.
"""

from __future__ import annotations

import torch


def visible(
    rows: torch.Tensor,
    cols: torch.Tensor,
    offset: int | torch.Tensor,
    window_left: int,
    window_right: int,
) -> torch.Tensor | None:
    """Boolean mask ``rows[:, None]`` x ``cols[None, :]`` (broadcasting) of visible pairs, or
    ``None`` when nothing is masked (no window, no causal)."""
    if window_left < 0 and window_right < 0:
        return None
    diag = rows.unsqueeze(-1) + offset  # key column aligned with each query row
    c = cols.unsqueeze(-2)
    m = None
    if window_right >= 0:
        m = c <= diag + window_right
    if window_left >= 0:
        lo = c >= diag - window_left
        m = lo if m is None else m & lo
    return m


def key_range(
    row_start: int, row_end: int, seqlen_k: int, offset: int, window_left: int, window_right: int
) -> tuple[int, int]:
    """Half-open range ``[lo, hi)`` of key columns visible to any row in ``[row_start, row_end)``."""
    lo = 0 if window_left < 0 else max(0, row_start + offset - window_left)
    hi = seqlen_k if window_right < 0 else min(seqlen_k, row_end - 1 + offset + window_right + 1)
    return lo, max(lo, hi)


def block_fully_visible(
    row_start: int, row_end: int, col_start: int, col_end: int, offset: int, window_left: int, window_right: int
) -> bool:
    """True when every pair in the tile is visible, so the tile needs no mask arithmetic."""
    if window_right >= 0 and col_end - 1 > row_start + offset + window_right:
        return False
    if window_left >= 0 and col_start < row_end - 1 + offset - window_left:
        return False
    return True


def alibi_bias(
    slopes: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, offset: int | torch.Tensor
) -> torch.Tensor:
    """``-slope * |i + offset - j|`` for ``slopes`` of shape ``(..., 1, 1)``."""
    dist = (rows.unsqueeze(-1) + offset - cols.unsqueeze(-2)).abs().to(torch.float32)
    return -slopes * dist
