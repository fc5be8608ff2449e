"""Pieces shared by the ring and all-to-all stages: argument checks, seeds, the process grid, communication."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..spec import AttnCall, check_call, check_cu_seqlens_values, check_varlen_meta
from .shard import check_ulysses_size, group_world_rank

_M64 = (1 << 64) - 1


def mix_seed(*vals: int) -> int:
    """A 62-bit seed from integers (splitmix64 steps): independent dropout streams for the
    pieces of one call, derived from its one base seed."""
    h = 0
    for v in vals:
        h = (h ^ (int(v) & _M64)) & _M64
        h = (h + 0x9E3779B97F4A7C15) & _M64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _M64
        h ^= h >> 31
    return h >> 2


def seed_tensor(seed: int) -> torch.Tensor:
    return torch.tensor(seed, dtype=torch.int64)


def check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    varlen: bool,
    names: tuple[str, str, str],
    return_attn_probs: bool,
    fn: str,
    **options,
) -> AttnCall:
    """The common checks (:func:`flashtile.spec.check_call`; ``options``: its scalar options),
    then what context parallelism does not offer."""
    spec = check_call(q, k, v, varlen=varlen, names=names, **options)
    if return_attn_probs and spec.dropout_p > 0:
        raise NotImplementedError(
            f"{fn}: return_attn_probs=True with dropout_p > 0 (the materialised attention probabilities) is not "
            "available for context-parallel attention; use dropout_p=0.0 or flash_attn_func on the full sequence"
        )
    return spec


def check_varlen_cu(
    q: torch.Tensor,
    k: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    world: int,
) -> tuple[list[int], list[int]]:
    """Check the global ``cu_seqlens`` against the local shards (``W`` times shorter); return them on the host."""
    check_varlen_meta(cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, q.device)
    # cu_seqlens describe the full (global) batch: W times the tokens of this rank's shard.
    check_cu_seqlens_values(cu_seqlens_q, "cu_seqlens_q", q.shape[0] * world, max_seqlen_q, "max_seqlen_q")
    check_cu_seqlens_values(cu_seqlens_k, "cu_seqlens_k", k.shape[0] * world, max_seqlen_k, "max_seqlen_k")
    return cu_seqlens_q.tolist(), cu_seqlens_k.tolist()


# ----------------------------------------------------------------------------------------------
# the process grid and its communication


def global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


class RingPeers:
    """The neighbours of this rank on a ring of ranks of ``group``: ``ring[i]`` sends to
    ``ring[i + 1]`` (group ranks, cyclic); this rank is ``ring[index]``."""

    def __init__(self, group: dist.ProcessGroup | None, ring: Sequence[int], index: int):
        self.group, self.world = group, len(ring)
        self.next = global_rank(group, ring[(index + 1) % len(ring)])
        self.prev = global_rank(group, ring[(index - 1) % len(ring)])

    def exchange(
        self, tensors: Sequence[torch.Tensor], into: Sequence[torch.Tensor] | None = None
    ) -> tuple[list[torch.Tensor], list]:
        """Start sending ``tensors`` to the next rank and receiving their like from the previous
        one, into ``into`` (preallocated buffers, e.g. one of two alternating sets) or new
        tensors; returns the receive buffers and the requests to wait on.

        Reusing a buffer is safe once the requests of the exchange that last used it were waited
        on and the compute that read it was enqueued before this call: NCCL orders its stream
        after the current stream at every operation, and gloo completes before ``wait``
        returns."""
        recv = list(into) if into is not None else [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in recv]
        return recv, dist.batch_isend_irecv(ops)


def wait_all(reqs: list) -> None:
    for r in reqs:
        r.wait()


@dataclass(frozen=True)
class Grid:
    """The 2-D process grid ``ulysses x ring`` over the ``world`` ranks of ``group``.

    Group rank ``g`` sits at ring position ``r = g // ulysses`` and Ulysses position
    ``u = g % ulysses``: the Ulysses subgroups are runs of consecutive ranks (on one node when
    ``ulysses`` divides the GPUs per node and the group is the world in node order), and the ring
    joins the ranks of equal ``u`` across them. No process group is created: the all-to-all runs on
    ``group`` with zero-sized pieces for the ranks outside this rank's subgroup, and the ring's
    point-to-point operations name their peers on ``group``; so any group works (also one that
    is not the default group) and nothing outside it has to take part.
    """

    group: dist.ProcessGroup | None
    world: int
    rank: int
    ulysses: int
    ring: int

    @property
    def r(self) -> int:
        """This rank's position on its ring (= its Ulysses subgroup's index)."""
        return self.rank // self.ulysses

    @property
    def u(self) -> int:
        """This rank's position in its Ulysses subgroup (= its ring's index)."""
        return self.rank % self.ulysses

    @property
    def members(self) -> tuple[int, ...]:
        """Group ranks of this rank's Ulysses subgroup, in order."""
        return tuple(range(self.r * self.ulysses, (self.r + 1) * self.ulysses))

    @property
    def a2a_splits(self) -> list[int] | None:
        """``all_to_all_single`` split sizes (one row per member) that keep the exchange inside
        this rank's Ulysses subgroup; None when the subgroup is the whole group."""
        if self.ring == 1:
            return None
        return [1 if g // self.ulysses == self.r else 0 for g in range(self.world)]

    def ring_peers(self) -> RingPeers:
        return RingPeers(self.group, [self.u + i * self.ulysses for i in range(self.ring)], self.r)


_GRIDS: dict[tuple, Grid] = {}


def process_grid(
    group: dist.ProcessGroup | None, ulysses_size: int, device: torch.device, fn: str, *, check: bool = True
) -> Grid:
    """The :class:`Grid` of ``group`` with ``ulysses_size`` (cached per group and size).

    The first use of a (group, size) pair with ``check`` gathers every rank's ``ulysses_size``
    over the group (one small collective on ``device``, once) and raises on disagreement, which
    would otherwise pair mismatched communications and hang. Raises ValueError if
    ``ulysses_size`` does not divide the group's size."""
    world, rank = group_world_rank(group)
    check_ulysses_size(ulysses_size, world, fn)
    key = (group, world, rank, ulysses_size, check)
    grid = _GRIDS.get(key)
    if grid is not None:
        return grid
    if check and world > 1:
        mine = torch.tensor([ulysses_size], dtype=torch.int64, device=device)
        every = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(every, mine, group=group)
        sizes = [int(x) for x in torch.cat(every).tolist()]
        if len(set(sizes)) > 1:
            raise ValueError(
                f"{fn}: the ranks of the process group passed different ulysses_size values (by group rank: "
                f"{sizes}); every rank must call with the same group and ulysses_size"
            )
    grid = Grid(group, world, rank, ulysses_size, world // ulysses_size)
    _GRIDS[key] = grid
    return grid
