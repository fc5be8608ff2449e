"""Sequence layouts for context parallelism: which tokens of the full sequence a rank holds.

A sequence of length ``S`` is cut into ``n`` equal chunks and each of the ``W`` ranks of the
group holds some of them, concatenated in increasing order ("slots"):

* ``"contiguous"``: ``n = W``; rank ``r`` holds chunk ``r`` (the plain split).
* ``"zigzag"``: ``n = 2W``; rank ``r`` holds chunks ``r`` and ``2W - 1 - r``. Under a causal
  mask every rank then gets the same amount of work (an early chunk, which sees few keys,
  paired with a late one, which sees many)::

      W = 2, S = 8, chunks of 2:   positions  0 1 | 2 3 | 4 5 | 6 7
                                   chunk        0     1     2     3
                                   rank 0 holds 0 1 6 7, rank 1 holds 2 3 4 5

2-D context parallelism (:func:`flashtile.distributed.hybrid_flash_attn_func`, a grid of
``ulysses_size x ring_size = W`` ranks, group rank ``g = r * ulysses_size + u``) needs no layout of
its own: the zigzag over ``W`` ranks *is* the zigzag over the ``ring_size`` ring positions
(chunks ``r`` and ``2 ring_size - 1 - r``, which balance the ring's causal work) with each of
those two chunks cut again into ``ulysses_size`` pieces, piece ``u`` of the first and piece
``ulysses_size - 1 - u`` of the second going to rank ``(r, u)`` (chunk ``r * ulysses_size + u`` and
``2W - 1 - g`` of ``2W``). So what the all-to-all gathers inside a Ulysses subgroup is exactly the
ring position's zigzag shard, and a sequence sharded once serves ring, Ulysses and every 2-D
factorisation; the same holds for ``"contiguous"``. The ``ulysses_size`` argument of
:func:`shard` / :func:`unshard` is therefore only checked (it must divide ``W``).

Varlen (packed) batches: every sequence of ``cu_seqlens`` is cut this way on its own, and a
rank holds its chunks of sequence 0, then of sequence 1, ... back to back. Its shard is then a
packed batch whose ``cu_seqlens`` is the global one divided by ``W`` (see
:func:`shard_cu_seqlens`). Every sequence length must be divisible by ``n`` (0 is allowed).

:func:`shard` cuts a full tensor (the same on every rank) into this rank's shard; :func:`unshard`
all-gathers the shards back into the full tensor on every rank. Both are differentiable.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

LAYOUTS = ("zigzag", "contiguous")


def check_layout(layout: str) -> str:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(repr(x) for x in LAYOUTS)}, got {layout!r}")
    return layout


def check_ulysses_size(ulysses_size: int, world: int, fn: str = "") -> int:
    """``ulysses_size`` must be a positive int dividing the group's size ``world``."""
    where = f"{fn}: " if fn else ""
    if isinstance(ulysses_size, bool) or not isinstance(ulysses_size, int) or ulysses_size < 1:
        raise ValueError(f"{where}ulysses_size must be a positive int, got {ulysses_size!r}")
    if world % ulysses_size:
        raise ValueError(
            f"{where}ulysses_size ({ulysses_size}) must divide the size of the process group ({world}): the grid "
            f"is ulysses_size x ring_size = {world} ranks"
        )
    return ulysses_size


def group_world_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """``(world size, rank)`` of this process in ``group`` (None: the default group)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialised: call torch.distributed.init_process_group first")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(
            f"this process (global rank {dist.get_rank()}) is not a member of the process group passed as group; "
            "every rank must pass a group it belongs to (e.g. the one new_group returned on that rank)"
        )
    return dist.get_world_size(group), rank


def num_chunks(layout: str, world: int) -> int:
    """Chunks a sequence is cut into: ``2W`` (zigzag) or ``W`` (contiguous)."""
    return 2 * world if check_layout(layout) == "zigzag" else world


def chunk_ids(layout: str, world: int, rank: int) -> tuple[int, ...]:
    """The global chunks rank ``rank`` holds, in slot order (increasing)."""
    if check_layout(layout) == "zigzag":
        return (rank, 2 * world - 1 - rank)
    return (rank,)


def _check_divisible(seqlen: int, n: int, layout: str, world: int, what: str) -> int:
    if seqlen % n != 0:
        raise ValueError(
            f"{what} ({seqlen}) must be divisible by {n}: layout {layout!r} cuts it into {n} chunks "
            f"for a group of {world} ranks"
        )
    return seqlen // n


def positions(seqlen: int, world: int, rank: int, layout: str, device: torch.device | str = "cpu") -> torch.Tensor:
    """Global positions (int64) of the tokens rank ``rank`` holds of a sequence of length ``seqlen``."""
    n = num_chunks(layout, world)
    c = _check_divisible(seqlen, n, layout, world, "the sequence length")
    ar = torch.arange(c, device=device)
    return torch.cat([g * c + ar for g in chunk_ids(layout, world, rank)])


def varlen_positions(
    cu_seqlens: list[int], world: int, rank: int, layout: str, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Global packed-token indices (int64) of the tokens rank ``rank`` holds of a varlen batch."""
    parts = []
    for n, (a, b) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:], strict=True)):
        if b - a:
            _check_divisible(b - a, num_chunks(layout, world), layout, world, f"the length of sequence {n}")
            parts.append(a + positions(b - a, world, rank, layout, device))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64, device=device)


def shard_cu_seqlens(cu_seqlens: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """The ``cu_seqlens`` of this rank's shard of a varlen batch: the global one divided by ``W``."""
    world, _ = group_world_rank(group)
    return cu_seqlens // world


def _global_cu(cu_seqlens: torch.Tensor, full_len: int) -> list[int]:
    """The global ``cu_seqlens`` on the host, checked against the full number of tokens."""
    cu = cu_seqlens.tolist()
    if cu[-1] != full_len:
        raise ValueError(f"cu_seqlens[-1] ({cu[-1]}) must equal the full number of tokens ({full_len})")
    return cu


def _positions_for(
    x: torch.Tensor, dim: int, world: int, rank: int, layout: str, cu_seqlens: torch.Tensor | None, full_len: int
) -> torch.Tensor | None:
    """Indices of rank's tokens along ``dim`` of the full tensor (None for dense: use narrow)."""
    if cu_seqlens is None:
        return None
    return varlen_positions(_global_cu(cu_seqlens, full_len), world, rank, layout, x.device)


def _take(x: torch.Tensor, dim: int, world: int, rank: int, layout: str, cu_seqlens: torch.Tensor | None):
    idx = _positions_for(x, dim, world, rank, layout, cu_seqlens, x.shape[dim])
    if idx is not None:
        return x.index_select(dim, idx)
    c = _check_divisible(x.shape[dim], num_chunks(layout, world), layout, world, f"x.shape[{dim}]")
    parts = [x.narrow(dim, g * c, c) for g in chunk_ids(layout, world, rank)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def shard(
    x: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    layout: str = "zigzag",
    dim: int = 1,
    cu_seqlens: torch.Tensor | None = None,
    ulysses_size: int = 1,
) -> torch.Tensor:
    """This rank's shard of the full tensor ``x`` along the sequence dimension ``dim``.

    Args:
        x: the full tensor, the same on every rank, e.g. ``(batch, seqlen, nheads, headdim)``
            (``dim=1``) or packed ``(total, nheads, headdim)`` with ``cu_seqlens`` (``dim=0``).
        group: the process group (None: the default group).
        layout: ``"zigzag"`` or ``"contiguous"`` (see the module docstring).
        cu_seqlens: for a packed varlen batch, its (global) int32 ``cu_seqlens``; each
            sequence is then sharded on its own.
        ulysses_size: the Ulysses size of the 2-D call the shard is for (must divide ``W``); the
            layout is the same for every value (see the module docstring).

    Returns:
        The shard, of length ``x.shape[dim] // W`` along ``dim``. Differentiable.
    """
    world, rank = group_world_rank(group)
    check_ulysses_size(ulysses_size, world)
    dim = dim % x.dim()
    return _take(x, dim, world, rank, layout, cu_seqlens)


class _Unshard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, layout, dim, cu_seqlens):
        world, rank = group_world_rank(group)
        ctx.args = (group, layout, dim, cu_seqlens)
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x, group=group)
        full_len = x.shape[dim] * world
        if cu_seqlens is not None:
            cu = _global_cu(cu_seqlens, full_len)
            idx = torch.cat([varlen_positions(cu, world, r, layout, x.device) for r in range(world)])
            shape = list(x.shape)
            shape[dim] = full_len
            out = x.new_empty(shape)
            return out.index_copy_(dim, idx, torch.cat(parts, dim))
        n = num_chunks(layout, world)
        c = x.shape[dim] // len(chunk_ids(layout, world, 0))
        chunks: list[torch.Tensor | None] = [None] * n
        for r, p in enumerate(parts):
            for slot, g in enumerate(chunk_ids(layout, world, r)):
                chunks[g] = p.narrow(dim, slot * c, c)
        return torch.cat(chunks, dim)

    @staticmethod
    def backward(ctx, grad):
        group, layout, dim, cu_seqlens = ctx.args
        world, rank = group_world_rank(group)
        return _take(grad, dim, world, rank, layout, cu_seqlens), None, None, None, None


def unshard(
    x: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    layout: str = "zigzag",
    dim: int = 1,
    cu_seqlens: torch.Tensor | None = None,
    ulysses_size: int = 1,
) -> torch.Tensor:
    """Gather every rank's shard back into the full tensor (on every rank): the inverse of :func:`shard`.

    Args as in :func:`shard`; ``x`` is this rank's shard (all ranks' shards have the same
    shape). The gradient of the full result flows back to this rank's shard as the matching
    slice of this rank's gradient (the result is treated as replicated, not summed over ranks).
    """
    check_layout(layout)
    check_ulysses_size(ulysses_size, group_world_rank(group)[0])
    return _Unshard.apply(x, group, layout, dim % x.dim(), cu_seqlens)
