"""All-to-all (Ulysses-style) context parallelism: re-shard sequence -> heads, attend, and back.

Each rank holds a shard of the sequence with all heads. One all-to-all gives every rank the
*whole* sequence for ``nheads / W`` of the heads; it runs ordinary single-GPU attention
(:mod:`flashtile.ops`, any backend) on them, and a second all-to-all returns the output to
the sequence shards. Because each rank sees the whole sequence, every option works exactly
as in :func:`flashtile.flash_attn_func`: causal, any window, softcap, ALiBi (the slopes of the
rank's heads), GQA, learnable sinks (``learnable_sink``, float32 ``(nheads,)``, the same tensor
on every rank: each rank uses its heads' entries). Communication is ``O(S * H * D / W)`` per rank per all-to-all,
independent of the mask.

This module holds the all-to-all stage (:class:`_Resharder`) of the one context-parallel
implementation, :func:`flashtile.distributed.hybrid.context_parallel`; the public Ulysses
functions are that implementation with ``ulysses_size = W`` (a ring of one position).

Requirements: ``nheads`` divisible by ``W``. GQA: k/v heads are exchanged as they are when
``nheads_k`` is divisible by ``W``; otherwise each k/v head is repeated
``lcm(nheads_k, W) / nheads_k`` times first (the smallest repetition that divides), which
keeps query head ``i`` on key/value head ``i // (nheads / nheads_k)``.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..spec import unbind_packed
from ._common import Grid
from .shard import group_world_rank, positions, varlen_positions

_Window = Sequence[int]


class _AllToAll(torch.autograd.Function):
    """Inside this rank's Ulysses subgroup of ``grid`` (``U`` ranks): split ``x`` into ``U`` pieces
    along ``scatter_dim``, send piece ``j`` to member ``j``, and concatenate the pieces received
    (in member order) along ``gather_dim``."""

    @staticmethod
    def forward(ctx, x, grid, scatter_dim, gather_dim):
        ctx.args = (grid, scatter_dim, gather_dim)
        return _all_to_all(x, grid, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        grid, scatter_dim, gather_dim = ctx.args
        return _all_to_all(grad.contiguous(), grid, gather_dim, scatter_dim), None, None, None


def _all_to_all(x: torch.Tensor, grid: Grid, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    n = grid.ulysses
    if n == 1:
        return x
    send = torch.stack(x.chunk(n, dim=scatter_dim)).contiguous()  # (U, ...): piece j for member j
    recv = torch.empty_like(send)
    # One all-to-all over the whole group; the split sizes give every rank outside the subgroup
    # an empty piece (None: the subgroup is the group, equal pieces).
    splits = grid.a2a_splits
    dist.all_to_all_single(recv, send, output_split_sizes=splits, input_split_sizes=splits, group=grid.group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


@functools.lru_cache(maxsize=64)
def _orders(grid: Grid, layout: str, lengths: tuple[int, ...] | int, device: torch.device):
    """``(to_rank_major, to_sorted)`` index tensors on ``device`` (None, None when the gathered
    order is already sorted): the tokens of this rank's Ulysses subgroup, gathered member after
    member, are put into increasing global position (the ring position's shard, see
    :mod:`flashtile.distributed.shard`) by ``index_select(to_sorted)`` and back by
    ``index_select(to_rank_major)``. ``lengths``: the sequence length (dense) or the global
    ``cu_seqlens`` as a tuple (varlen)."""
    if grid.ulysses == 1:
        return None, None
    if isinstance(lengths, int):
        pos = [positions(lengths, grid.world, g, layout) for g in grid.members]
    else:
        pos = [varlen_positions(list(lengths), grid.world, g, layout) for g in grid.members]
    rank_major = torch.cat(pos)  # global position of each gathered token
    if rank_major.numel() < 2 or bool((rank_major[1:] > rank_major[:-1]).all()):
        return None, None
    to_sorted = torch.argsort(rank_major)
    return torch.argsort(to_sorted).to(device), to_sorted.to(device)


class _Resharder:
    """Moves tensors between "this rank's sequence shard, all heads" and "the sequence shard of
    this rank's ring position (its Ulysses subgroup's shards together, in global order), this
    rank's ``1 / U`` of the heads". With ``U = W`` (pure Ulysses) that is the whole sequence."""

    def __init__(self, grid: Grid, layout: str, lengths: tuple[int, ...] | int, device: torch.device):
        self.grid = grid
        self.to_rank_major, self.to_sorted = _orders(grid, layout, lengths, device)

    def heads(self, x: torch.Tensor, seq_dim: int, head_dim: int) -> torch.Tensor:
        """Sequence shard (all heads) -> ring position's shard (this rank's heads)."""
        y = _AllToAll.apply(x, self.grid, head_dim, seq_dim)
        return y if self.to_sorted is None else y.index_select(seq_dim, self.to_sorted)

    def seq(self, x: torch.Tensor, seq_dim: int, head_dim: int) -> torch.Tensor:
        """Ring position's shard (this rank's heads) -> sequence shard (all heads)."""
        if self.to_rank_major is not None:
            x = x.index_select(seq_dim, self.to_rank_major)
        return _AllToAll.apply(x, self.grid, seq_dim, head_dim)


def _ulysses(q, k, v, *, group, fn: str = "ulysses_flash_attn_func", **kwargs):
    """Ulysses = the 2-D form with ``ulysses_size`` = the group's size (a ring of one position)."""
    from .hybrid import context_parallel

    world, _ = group_world_rank(group)
    return context_parallel(q, k, v, group=group, ulysses_size=world, fn=fn, check_grid=False, **kwargs)


def ulysses_flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: _Window = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    layout: str = "zigzag",
    learnable_sink: torch.Tensor | None = None,
):
    """All-to-all context-parallel attention: :func:`flashtile.flash_attn_func` on a sequence sharded
    over the ranks of ``group`` (None: the default group) with ``layout``.

    Args:
        q: this rank's shard ``(batch, seqlen_q / W, nheads, headdim)``, ``nheads`` divisible by ``W``.
        k, v: ``(batch, seqlen_k / W, nheads_k, headdim)`` (GQA: see the module docstring).
        layout: how the sequence is sharded (``"zigzag"`` or ``"contiguous"``, see
            :mod:`flashtile.distributed.shard`); the attention is over global positions either way.
        Other options: exactly as :func:`flashtile.flash_attn_func` on the full sequence
        (``alibi_slopes`` ``(nheads,)`` or ``(batch, nheads)`` for all heads). Dropout uses one
        stream per rank, so its pattern differs from the single-process call.
        learnable_sink: optional float32 ``(nheads,)`` sink logits for all heads (the same on every
            rank, as a replicated parameter). Each rank attends with its heads' entries, so its
            gradient holds those entries only (zeros elsewhere): sum it over the group (the
            all-reduce a data-parallel wrapper does for any replicated parameter) to get the
            single-process gradient.

    Returns:
        out ``(batch, seqlen_q / W, nheads, headdim)``; with ``return_attn_probs=True``,
        ``(out, softmax_lse (batch, nheads, seqlen_q / W), None)`` (raises NotImplementedError
        together with dropout).
    """
    return _ulysses(
        q, k, v, group=group, layout=layout, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_attn_probs=return_attn_probs, learnable_sink=learnable_sink,
    )  # fmt: skip


def ulysses_flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: _Window = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    layout: str = "zigzag",
    learnable_sink: torch.Tensor | None = None,
):
    """:func:`ulysses_flash_attn_func` with ``qkv (batch, seqlen / W, 3, nheads, headdim)``."""
    q, k, v = unbind_packed(qkv, "qkv", 3, 2)
    return _ulysses(
        q, k, v, group=group, layout=layout, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_attn_probs=return_attn_probs, learnable_sink=learnable_sink,
        names=("qkv[:, :, 0]", "qkv[:, :, 1]", "qkv[:, :, 2]"),
        fn="ulysses_flash_attn_qkvpacked_func",
    )  # fmt: skip


def ulysses_flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    group: dist.ProcessGroup | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: _Window = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    layout: str = "zigzag",
    learnable_sink: torch.Tensor | None = None,
):
    """All-to-all attention on a packed batch of variable-length sequences, every one sharded (the
    layout of :func:`flashtile.distributed.ring_flash_attn_varlen_func`: each sequence cut into
    the layout's chunks, lengths divisible by their number; ``cu_seqlens_*`` and ``max_seqlen_*``
    are the global ones). Every mask option works. Returns out ``(total_q / W, nheads, headdim)``
    (and ``softmax_lse (nheads, total_q / W)``, None with ``return_attn_probs=True``)."""
    return _ulysses(
        q, k, v, group=group, layout=layout, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_attn_probs=return_attn_probs, learnable_sink=learnable_sink, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, fn="ulysses_flash_attn_varlen_func",
    )  # fmt: skip


def ulysses_flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    group: dist.ProcessGroup | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: _Window = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    layout: str = "zigzag",
    learnable_sink: torch.Tensor | None = None,
):
    """:func:`ulysses_flash_attn_varlen_func` with ``qkv (total / W, 3, nheads, headdim)`` and one
    (global) ``cu_seqlens``."""
    q, k, v = unbind_packed(qkv, "qkv", 3, 1)
    return _ulysses(
        q, k, v, group=group, layout=layout, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_attn_probs=return_attn_probs, learnable_sink=learnable_sink, cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, names=("qkv[:, 0]", "qkv[:, 1]", "qkv[:, 2]"),
        fn="ulysses_flash_attn_varlen_qkvpacked_func",
    )  # fmt: skip
