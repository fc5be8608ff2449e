"""Tile schedule of the persistent Hopper kernel (design step C), computed on the host.

Pure Python (no torch): CPU tests cover it. A *tile* is one ``block_m``-row query block of one
(batch, head); its code is ``(b * nheads + h) * n_mblocks + m_block``. Its cost is the number of
key blocks the kernel visits for it (:func:`key_blocks`, the twin of ``fwd._block_range``) plus
a fixed per-tile overhead (Q load, epilogue). :func:`schedule` hands the tiles out heaviest first,
each to the program with the least work so far (LPT, longest processing time first): causal and
windowed calls, whose tiles differ in cost by up to ``seqlen / block_n``, end with all programs
finishing together instead of a tail of heavy tiles.
"""

from __future__ import annotations

import functools
import heapq

#: Cost of a tile beyond its key blocks (Q load, pipeline fill, epilogue), in key blocks.
TILE_OVERHEAD = 1
#: Above this many tiles per program, :func:`schedule` deals the heaviest-first list out in a
#: snake (0..G-1, G-1..0, ...) instead of LPT's heap: O(n) with slices, and as balanced when
#: every program gets dozens of tiles.
SNAKE_ABOVE = 32


def block_range(r_lo: int, r_hi: int, n_cols: int, off: int, wl: int, wr: int, block: int) -> tuple[int, int, int, int]:
    """Key blocks for query rows ``[r_lo, r_hi)``: ``(nb_lo, fu_lo, fu_hi, nb_hi)`` with
    ``[nb_lo, fu_lo)`` and ``[fu_hi, nb_hi)`` masked, ``[fu_lo, fu_hi)`` unmasked. Row ``i`` sees
    columns ``[i + off - wl, i + off + wr]`` (``wl`` / ``wr`` < 0: unbounded) within ``[0, n_cols)``.
    Mirrors ``fwd._block_range`` (whose integer division truncates: it differs from ``//`` only on
    negative ``full_hi``, which the clamps make irrelevant)."""
    lo, full_lo, hi, full_hi = 0, 0, n_cols, n_cols
    if wl >= 0:
        lo = max(r_lo + off - wl, 0)
        full_lo = max(r_hi - 1 + off - wl, 0)
    if wr >= 0:
        hi = min(r_hi + off + wr, n_cols)
        full_hi = min(r_lo + off + wr + 1, n_cols)
    if hi <= lo:
        nb_lo = nb_hi = 0
    else:
        nb_lo, nb_hi = lo // block, -(-hi // block)
    fu_lo = -(-full_lo // block)
    fu_hi = full_hi // block  # full_hi < 0 only when no column is fully visible: clamped to fu_lo below
    fu_lo = min(max(fu_lo, nb_lo), nb_hi)
    fu_hi = min(max(fu_hi, fu_lo), nb_hi)
    return nb_lo, fu_lo, fu_hi, nb_hi


def key_blocks(m_block: int, block_m: int, block_n: int, seqlen_q: int, seqlen_k: int, wl: int, wr: int) -> int:
    """Key blocks the kernel visits for query block ``m_block`` (0 when its rows see no key)."""
    r_lo = m_block * block_m
    r_hi = min(r_lo + block_m, seqlen_q)
    nb_lo, _, _, nb_hi = block_range(r_lo, r_hi, seqlen_k, seqlen_k - seqlen_q, wl, wr, block_n)
    return nb_hi - nb_lo


@functools.lru_cache(maxsize=256)
def schedule(
    batch: int, nheads: int, seqlen_q: int, seqlen_k: int, block_m: int, block_n: int, wl: int, wr: int,
    n_programs: int,
) -> tuple[tuple[int, ...], tuple[int, ...]]:  # fmt: skip
    """``(codes, offsets)``: program ``p`` runs the tiles ``codes[offsets[p]:offsets[p + 1]]`` in
    that order (heaviest first). ``n_programs`` is capped at the number of tiles, so every program
    gets at least one; ``len(offsets) == min(n_programs, n_tiles) + 1``.

    Equal-cost tiles keep code order (batch, head, then query block), so programs running at the
    same time work on neighbouring heads."""
    n_mb = -(-seqlen_q // block_m)
    n_tiles = batch * nheads * n_mb
    if n_tiles == 0:
        return (), (0,)
    g = max(1, min(n_programs, n_tiles))
    cost = [key_blocks(m, block_m, block_n, seqlen_q, seqlen_k, wl, wr) + TILE_OVERHEAD for m in range(n_mb)]
    if all(c == cost[0] for c in cost):
        # uniform cost: LPT is round-robin in code order
        per = [list(range(p, n_tiles, g)) for p in range(g)]
    else:
        # heaviest first; ties in code order (the tiles of query block m are m, m + n_mb, ...)
        ordered: list[int] = []
        for m in sorted(range(n_mb), key=lambda m: (-cost[m], m)):
            ordered.extend(range(m, n_tiles, n_mb))
        if n_tiles > SNAKE_ABOVE * g:
            per = []
            for p in range(g):
                fwd, back = ordered[p :: 2 * g], ordered[2 * g - 1 - p :: 2 * g]  # len(fwd) - len(back) in {0, 1}
                merged = [0] * (len(fwd) + len(back))
                merged[0::2], merged[1::2] = fwd, back
                per.append(merged)
        else:
            heap = [(0, p) for p in range(g)]
            per = [[] for _ in range(g)]
            for code in ordered:
                load, p = heapq.heappop(heap)
                per[p].append(code)
                heapq.heappush(heap, (load + cost[code % n_mb], p))
    codes, offsets = [], [0]
    for lst in per:
        codes.extend(lst)
        offsets.append(len(codes))
    return tuple(codes), tuple(offsets)


def makespan(codes: tuple[int, ...], offsets: tuple[int, ...], cost_of) -> int:
    """The largest per-program total cost of a schedule (``cost_of(code)`` gives a tile's cost)."""
    return max((sum(cost_of(c) for c in codes[a:b]) for a, b in zip(offsets[:-1], offsets[1:], strict=True)),
               default=0)  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# The persistent backward's tail (``HopperBwdConfig.tail``): tiles of one cost handed out by a counter
# end in a last round of ``n_tiles % programs`` whole tiles while the other programs idle (2048 tiles on
# 132 SMs: 68 of them run a 16th tile, the makespan 16 tiles against a mean of 15.5). Split, those last
# tiles become one equal piece of their query blocks per program.

#: the tail is split only where its tiles fill at most this share of a round (a fuller round loses
#: little, and the pieces' partial sums and conversion cost about a tenth of a tile)
TAIL_MAX_FILL = 0.8
#: ... and where each piece gets at least this many query blocks (shorter pieces are mostly the fixed
#: cost of a unit: K / V, the ring's fill and drain, the partial dK / dV adds)
TAIL_MIN_BLOCKS = 16
#: bits of a part's first / end query block in its code (the kernel's ``bwd.TAIL_BITS`` is this one)
TAIL_BITS = 11


def tail_split(n_tiles: int, n_programs: int, n_mb: int) -> int:
    """The number of last tiles (in tile order) the persistent backward splits into ``n_programs``
    pieces, for ``n_tiles`` tiles of ``n_mb`` query blocks each; 0: none. Needs a whole first round
    (every program's first ticket a whole tile), a tail filling at most :data:`TAIL_MAX_FILL` of a
    round, pieces of at least :data:`TAIL_MIN_BLOCKS` query blocks, and ``n_mb`` within a code's
    :data:`TAIL_BITS`."""
    if n_programs <= 0 or n_tiles < 2 * n_programs or not 0 < n_mb < 1 << TAIL_BITS:
        return 0
    r = n_tiles % n_programs
    if r == 0 or r > TAIL_MAX_FILL * n_programs or r * n_mb < TAIL_MIN_BLOCKS * n_programs:
        return 0
    return r


def tail_parts(piece: int, n_split: int, n_mb: int, n_programs: int) -> list[tuple[int, int, int]]:
    """The parts ``(j, lo, hi)`` of tail piece ``piece`` (of ``n_programs``): query blocks ``[lo, hi)`` of
    the ``j``-th split tile, one or two of them (``n_split < n_programs``, as :func:`tail_split` gives).
    The twin of the kernel's ``bwd._tail_code``: piece ``p`` covers blocks ``[p * W // P, (p + 1) * W //
    P)`` of the ``W = n_split * n_mb`` blocks of the split tiles taken one after another."""
    w = n_split * n_mb
    a, e = piece * w // n_programs, (piece + 1) * w // n_programs
    j = a // n_mb
    end = (j + 1) * n_mb
    parts = [(j, a - j * n_mb, min(e, end) - j * n_mb)]
    if e > end:
        parts.append((j + 1, 0, e - end))
    return parts
