"""Pieces shared by the ring and all-to-all strategies: argument checks, seeds, communication."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..spec import AttnCall, check_call, check_cu_seqlens_values, check_varlen_meta

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
# communication


def global_rank(group: dist.ProcessGroup | None, group_rank: int) -> int:
    return group_rank if group is None else dist.get_global_rank(group, group_rank)


class RingPeers:
    """The neighbours of this rank on the ring ``0 -> 1 -> ... -> W-1 -> 0`` of ``group``."""

    def __init__(self, group: dist.ProcessGroup | None, world: int, rank: int):
        self.group, self.world = group, world
        self.next = global_rank(group, (rank + 1) % world)
        self.prev = global_rank(group, (rank - 1) % world)

    def exchange(self, tensors: Sequence[torch.Tensor]) -> tuple[list[torch.Tensor], list]:
        """Start sending ``tensors`` to the next rank and receiving their like from the previous
        one; returns the receive buffers and the requests to wait on."""
        recv = [torch.empty_like(t) for t in tensors]
        ops = [dist.P2POp(dist.isend, t, self.next, self.group) for t in tensors]
        ops += [dist.P2POp(dist.irecv, r, self.prev, self.group) for r in recv]
        return recv, dist.batch_isend_irecv(ops)


def wait_all(reqs: list) -> None:
    for r in reqs:
        r.wait()
