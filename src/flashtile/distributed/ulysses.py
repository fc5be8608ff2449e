"""All-to-all (Ulysses-style) context parallelism: re-shard sequence -> heads, attend, and back.

Each rank holds a shard of the sequence with all heads. One all-to-all gives every rank the
*whole* sequence for ``nheads / W`` of the heads; it runs ordinary single-GPU attention
(:mod:`flashtile.ops`, any backend) on them, and a second all-to-all returns the output to
the sequence shards. Because each rank sees the whole sequence, every option works exactly
as in :func:`flashtile.flash_attn_func`: causal, any window, softcap, ALiBi (the slopes of the
rank's heads), GQA, learnable sinks (``learnable_sink``, float32 ``(nheads,)``, the same tensor
on every rank: each rank uses its heads' entries). Communication is ``O(S * H * D / W)`` per rank per all-to-all,
independent of the mask.

Requirements: ``nheads`` divisible by ``W``. GQA: k/v heads are exchanged as they are when
``nheads_k`` is divisible by ``W``; otherwise each k/v head is repeated
``lcm(nheads_k, W) / nheads_k`` times first (the smallest repetition that divides), which
keeps query head ``i`` on key/value head ``i // (nheads / nheads_k)``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from .. import dispatch
from ..ops import attention
from ..rng import draw_seed
from ..spec import Problem, check_alibi, check_sink, unbind_packed
from ._common import check_inputs, check_varlen_cu, mix_seed, seed_tensor
from .shard import check_layout, group_world_rank, positions, varlen_positions

_Window = Sequence[int]


class _AllToAll(torch.autograd.Function):
    """Split ``x`` into ``W`` pieces along ``scatter_dim``, send piece ``j`` to rank ``j``, and
    concatenate the pieces received (in rank order) along ``gather_dim``."""

    @staticmethod
    def forward(ctx, x, group, scatter_dim, gather_dim):
        ctx.args = (group, scatter_dim, gather_dim)
        return _all_to_all(x, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, grad):
        group, scatter_dim, gather_dim = ctx.args
        return _all_to_all(grad.contiguous(), group, gather_dim, scatter_dim), None, None, None


def _all_to_all(x: torch.Tensor, group, scatter_dim: int, gather_dim: int) -> torch.Tensor:
    world = dist.get_world_size(group)
    if world == 1:
        return x
    send = torch.stack(x.chunk(world, dim=scatter_dim)).contiguous()  # (W, ...): piece j for rank j
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    return torch.cat(recv.unbind(0), dim=gather_dim)


class _Resharder:
    """Moves tensors between "this rank's sequence shard, all heads" and "the whole sequence, this
    rank's heads", in the global token order."""

    def __init__(self, group, world: int, layout: str, seq_positions: list[torch.Tensor]):
        self.group = group
        rank_major = torch.cat(seq_positions)  # global position of each token, in rank-major order
        if torch.equal(rank_major, torch.arange(rank_major.numel(), device=rank_major.device)):
            self.to_rank_major = self.to_global = None  # contiguous layout: already in order
        else:
            self.to_rank_major = rank_major
            self.to_global = torch.argsort(rank_major)

    def heads(self, x: torch.Tensor, seq_dim: int, head_dim: int) -> torch.Tensor:
        """Sequence shard (all heads) -> whole sequence (this rank's heads)."""
        y = _AllToAll.apply(x, self.group, head_dim, seq_dim)
        return y if self.to_global is None else y.index_select(seq_dim, self.to_global)

    def seq(self, x: torch.Tensor, seq_dim: int, head_dim: int) -> torch.Tensor:
        """Whole sequence (this rank's heads) -> sequence shard (all heads)."""
        if self.to_rank_major is not None:
            x = x.index_select(seq_dim, self.to_rank_major)
        return _AllToAll.apply(x, self.group, seq_dim, head_dim)


def _ulysses(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    layout: str,
    alibi_slopes: torch.Tensor | None,
    return_attn_probs: bool,
    learnable_sink: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    names: tuple[str, str, str] = ("q", "k", "v"),
    fn: str = "ulysses_flash_attn_func",
    **options,
):
    varlen = cu_seqlens_q is not None
    spec = check_inputs(q, k, v, varlen=varlen, names=names, return_attn_probs=return_attn_probs, fn=fn, **options)
    check_layout(layout)
    world, rank = group_world_rank(group)
    h, hk = q.shape[-2], k.shape[-2]
    if h % world:
        raise ValueError(f"{fn}: the number of heads of {names[0]} ({h}) must be divisible by the group size ({world})")
    if hk % world:  # GQA with too few k/v heads: repeat them to the smallest count that divides
        rep = math.lcm(hk, world) // hk
        k, v = k.repeat_interleave(rep, dim=-2), v.repeat_interleave(rep, dim=-2)
    seq_dim, head_dim = (0, 1) if varlen else (1, 2)
    if varlen:
        cuq, cuk = check_varlen_cu(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, world)
        pos_q = [varlen_positions(cuq, world, r, layout, q.device) for r in range(world)]
        pos_k = pos_q if cuk == cuq else [varlen_positions(cuk, world, r, layout, q.device) for r in range(world)]
        batch, sq, sk = len(cuq) - 1, max_seqlen_q, max_seqlen_k
    else:
        sq, sk = q.shape[1] * world, k.shape[1] * world
        pos_q = [positions(sq, world, r, layout, q.device) for r in range(world)]
        pos_k = pos_q if sk == sq else [positions(sk, world, r, layout, q.device) for r in range(world)]
        batch = q.shape[0]
    rq = _Resharder(group, world, layout, pos_q)
    rk = rq if pos_k is pos_q else _Resharder(group, world, layout, pos_k)
    hl = h // world
    alibi = check_alibi(alibi_slopes, batch, h, q.device)
    if alibi is not None:
        alibi = alibi[:, rank * hl : (rank + 1) * hl].contiguous()
    sink = check_sink(learnable_sink, h, q.device)
    if sink is not None:  # this rank's heads; a view, so the gradient lands in those entries of the caller's tensor
        sink = sink[rank * hl : (rank + 1) * hl]
    qh = rq.heads(q, seq_dim, head_dim)
    kh, vh = rk.heads(k, seq_dim, head_dim), rk.heads(v, seq_dim, head_dim)
    if varlen:
        qh, kh, vh = qh.unsqueeze(0), kh.unsqueeze(0), vh.unsqueeze(0)
    # Ranks hold different heads but would index the dropout mask by local head: give each its own stream.
    seed = seed_tensor(mix_seed(int(draw_seed(q.device)), rank)) if spec.dropout_p > 0 else None
    lens = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=int(max_seqlen_q),
                max_seqlen_k=int(max_seqlen_k)) if varlen else {}  # fmt: skip
    call = dataclasses.replace(spec, alibi_slopes=alibi, learnable_sink=sink, seed=seed, **lens)
    backend = dispatch.choose(Problem.of(qh, kh, call, vh), call)
    out, lse = attention(qh, kh, vh, call, backend)
    if varlen:
        out = rq.seq(out.squeeze(0), 0, 1)
    else:
        out = rq.seq(out, 1, 2)
    if not return_attn_probs:
        return out
    # lse (B, H / W, S) of the whole sequence -> (B, H, S / W) of this rank's shard.
    lse = rq.seq(lse.squeeze(0), 1, 0) if varlen else rq.seq(lse, 2, 1)
    return out, lse, None


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
