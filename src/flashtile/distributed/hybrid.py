"""2-D context parallelism: all-to-all over heads inside groups, zigzag ring across them.

The ``W`` ranks of ``group`` form a grid of ``ulysses_size x ring_size`` (``U x R = W``); group
rank ``g`` is Ulysses member ``u = g % U`` of ring position ``r = g // U`` (see
:class:`flashtile.distributed._common.Grid`). Every rank holds its shard of the sequence with all
heads, in the layout of :func:`flashtile.distributed.shard` (the same for every ``U``; see
:mod:`flashtile.distributed.shard` for why it is also the ring positions' zigzag). One call:

1. **all-to-all** inside each Ulysses subgroup (the ``U`` consecutive ranks of a ring position):
   the subgroup's shards together are the ring position's shard of the sequence, and each member
   gets it for ``1 / U`` of the heads (``nheads / U`` query heads, ``nheads_k / U`` k/v heads);
2. **ring** across the ``R`` ring positions of equal ``u``: the k/v blocks of the ring position's
   shard travel around with point-to-point sends overlapped with the attention of the block in
   hand, partial states merged by log-sum-exp (:mod:`flashtile.distributed.ring`); with
   ``R = 1`` this is one ordinary attention call on the whole sequence;
3. **all-to-all** back: each rank gets the output (and lse) of its own shard for all heads.

The backward runs the same stages in reverse (the ring's backward, then the transposed
all-to-alls). Ring attention is the edge case ``U = 1`` (no all-to-all) and Ulysses the edge case
``U = W`` (a ring of one position): :func:`flashtile.distributed.ring_flash_attn_func` and
:func:`flashtile.distributed.ulysses_flash_attn_func` are this function with those sizes.

Per rank and call, the all-to-alls move ``2 (q, out) + 2 hk/h (k, v)`` times the shard's
activations, ``(U - 1) / U`` of them off the rank; the ring moves k/v (``hk / U`` heads of the ring
position's ``S / R`` tokens) ``R - 1`` times in the forward and k/v plus float32 dk/dv in the
backward, each hop hidden behind one block of attention when the block is long enough (see
``benchmarks/NOTES.md``, "2-D context parallelism", for the scaling model).

Options (all ranks pass the same): exactly those of :func:`flashtile.flash_attn_func` on the full
sequence, on global positions, with these limits when ``ring_size > 1``: ``alibi_slopes`` raises
NotImplementedError (the backends align ALiBi to each call's corner; use ``ulysses_size = W``),
and the varlen forms take no mask or causal with equal query/key lengths per sequence (other
windows raise NotImplementedError; the dense form takes any window). ``return_attn_probs=True``
returns ``(out, softmax_lse, None)``, the lse of this rank's shard; not with dropout.
``learnable_sink`` (float32 ``(nheads,)``, the same on every rank, as a replicated parameter):
each rank attends with its Ulysses member's heads' entries and its gradient holds its rows'
contribution to those entries (zeros elsewhere): summed over the group, as a data-parallel
all-reduce does for any replicated parameter, it is the single-process gradient.

Requirements: ``nheads`` divisible by ``ulysses_size``; for zigzag, the (global) sequence length
divisible by ``2 x ring_size x ulysses_size`` (2 chunks per rank; ``ring_size x ulysses_size`` for
contiguous), per sequence for varlen. GQA with ``nheads_k`` not divisible by ``ulysses_size``
(e.g. 8 k/v heads and ``U = 16``, or 2 and ``U = 4``): each k/v head is replicated
``lcm(nheads_k, U) / nheads_k`` times before the all-to-all (the smallest count that divides),
which keeps query head ``i`` on k/v head ``i // (nheads / nheads_k)``; the gradients of the
replicas are summed back. The ring then carries the replicas too: prefer ``U <= nheads_k``.

Dropout: each rank's calls get their own seeds (derived from one base seed drawn from torch's
generator, the Ulysses member and the ring step), so the pattern differs from single-process
``flash_attn_func`` but has the same distribution.
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
from ._common import check_inputs, check_varlen_cu, mix_seed, process_grid, seed_tensor
from .ring import _build_calls, _Ring, _RingAttention
from .shard import check_layout, check_ulysses_size, group_world_rank, num_chunks
from .ulysses import _Resharder

_Window = Sequence[int]


def context_parallel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup | None,
    ulysses_size: int,
    layout: str,
    alibi_slopes: torch.Tensor | None,
    return_attn_probs: bool,
    learnable_sink: torch.Tensor | None = None,
    cu_seqlens_q: torch.Tensor | None = None,
    cu_seqlens_k: torch.Tensor | None = None,
    max_seqlen_q: int = 0,
    max_seqlen_k: int = 0,
    names: tuple[str, str, str] = ("q", "k", "v"),
    fn: str = "hybrid_flash_attn_func",
    check_grid: bool = True,
    **options,
):
    """The one implementation behind the ring, Ulysses and 2-D functions (see the module
    docstring); ``options``: flash_attn_func's scalar options. ``check_grid``: check once per
    (group, ulysses_size) that every rank passed the same ``ulysses_size`` (the ring and Ulysses
    functions imply it)."""
    varlen = cu_seqlens_q is not None
    spec = check_inputs(q, k, v, varlen=varlen, names=names, return_attn_probs=return_attn_probs, fn=fn, **options)
    check_layout(layout)
    world, _ = group_world_rank(group)
    n_u = check_ulysses_size(ulysses_size, world, fn)
    n_r = world // n_u
    h, hk = q.shape[-2], k.shape[-2]
    if h % n_u:
        raise ValueError(
            f"{fn}: the number of heads of {names[0]} ({h}) must be divisible by ulysses_size ({n_u}"
            f"{', the group size' if n_r == 1 else ''}): each member of a Ulysses subgroup attends with "
            "1 / ulysses_size of the heads"
        )
    if alibi_slopes is not None and n_r > 1:
        raise NotImplementedError(
            f"{fn}: alibi_slopes is not supported with a ring (ring_size = {n_r} > 1: the backends align ALiBi to "
            "each call's bottom-right corner, not to global positions); use ulysses_size = the group size "
            "(ulysses_flash_attn_func), which sees the whole sequence"
        )
    n = num_chunks(layout, world)
    grid_desc = f"{n_r} ring position(s) x {n_u} Ulysses member(s)"
    if varlen:
        cuq, cuk = check_varlen_cu(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, world)
        for cu, nm in ((cuq, "cu_seqlens_q"), (cuk, "cu_seqlens_k")):
            for i, (a, b) in enumerate(zip(cu[:-1], cu[1:], strict=True)):
                if (b - a) % n:
                    raise ValueError(
                        f"{fn}: sequence {i} of {nm} has length {b - a}, not divisible by {n} (layout {layout!r} "
                        f"cuts every sequence into {n} chunks for {world} ranks = {grid_desc})"
                    )
        lengths_q, lengths_k = tuple(cuq), tuple(cuk)
    else:
        nslots = n // world
        for x, nm in ((q, names[0]), (k, names[1])):
            if x.shape[1] % nslots:
                raise ValueError(
                    f"{fn}: the local sequence length of {nm} ({x.shape[1]}) must be divisible by {nslots}: with "
                    f"layout {layout!r} each rank holds {nslots} chunk(s), so the whole sequence must be divisible "
                    f"by {n} = 2 x ring_size x ulysses_size ({grid_desc})"
                )
        lengths_q, lengths_k = q.shape[1] * world, k.shape[1] * world
    grid = process_grid(group, n_u, q.device, fn, check=check_grid)
    batch = len(cuq) - 1 if varlen else q.shape[0]
    alibi = check_alibi(alibi_slopes, batch, h, q.device)
    sink = check_sink(learnable_sink, h, q.device)
    hl = h // n_u
    if alibi is not None:
        alibi = alibi[:, grid.u * hl : (grid.u + 1) * hl].contiguous()
    if sink is not None:  # this member's heads; a view, so the gradient lands in those entries of the caller's tensor
        sink = sink[grid.u * hl : (grid.u + 1) * hl]
    if hk % n_u:  # GQA with too few k/v heads: replicate them to the smallest count that divides
        rep = math.lcm(hk, n_u) // hk
        k, v = k.repeat_interleave(rep, dim=-2), v.repeat_interleave(rep, dim=-2)

    # 1. all-to-all: this rank's shard, all heads -> the ring position's shard, this member's heads
    seq_dim, head_dim = (0, 1) if varlen else (1, 2)
    rq = _Resharder(grid, layout, lengths_q, q.device)
    rk = rq if lengths_k == lengths_q else _Resharder(grid, layout, lengths_k, q.device)
    qh = rq.heads(q, seq_dim, head_dim)
    kh, vh = rk.heads(k, seq_dim, head_dim), rk.heads(v, seq_dim, head_dim)
    if varlen:
        qh, kh, vh = qh.unsqueeze(0), kh.unsqueeze(0), vh.unsqueeze(0)

    # 2. attention over the whole sequence: one call (R = 1) or the ring across the R positions
    base_seed = int(draw_seed(q.device)) if spec.dropout_p > 0 else None
    if n_r == 1:
        # Members hold different heads but would index the dropout mask by local head: one stream each.
        seed = None if base_seed is None else seed_tensor(mix_seed(base_seed, grid.u))
        lens = dict(cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=int(max_seqlen_q),
                    max_seqlen_k=int(max_seqlen_k)) if varlen else {}  # fmt: skip
        call = dataclasses.replace(spec, alibi_slopes=alibi, learnable_sink=sink, seed=seed, **lens)
        backend = dispatch.choose(Problem.of(qh, kh, call), call)
        out, lse = attention(qh, kh, vh, call, backend)
    else:
        if varlen:
            lq, lk = max_seqlen_q // n_r, max_seqlen_k // n_r
            dense, var = None, (cuq, cuk)
            # what a piece uses (the pieces carry their own cu_seqlens: a placeholder here)
            shape = dataclasses.replace(spec, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
        else:
            lq, lk = qh.shape[1], kh.shape[1]
            dense, var, shape = (lengths_q, lengths_k), None, spec
        problem = Problem(batch=batch, seqlen_q=lq, seqlen_k=lk, nheads=qh.shape[-2], nheads_k=kh.shape[-2],
                          headdim=q.shape[-1], dtype=q.dtype, device=q.device)  # fmt: skip
        backend = dispatch.choose(problem, shape)
        ring_seed = base_seed if base_seed is None or n_u == 1 else mix_seed(base_seed, grid.u)
        calls = _build_calls(spec, layout, n_r, grid.r, ring_seed, q.device, dense, var)
        ring = _Ring(grid.ring_peers(), n_r, grid.r, backend, calls)
        out, lse = _RingAttention.apply(qh, kh, vh, sink, ring)

    # 3. all-to-all back: this rank's shard, all heads
    out = rq.seq(out.squeeze(0), 0, 1) if varlen else rq.seq(out, 1, 2)
    if not return_attn_probs:
        return out
    # lse (B, H / U, S / R) of the ring position's shard -> (B, H, S / W) of this rank's shard
    lse = rq.seq(lse.squeeze(0), 1, 0) if varlen else rq.seq(lse, 2, 1)
    return out, lse, None


# ----------------------------------------------------------------------------------------------
# public functions


def hybrid_flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    ulysses_size: int = 1,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: _Window = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    learnable_sink: torch.Tensor | None = None,
    layout: str = "zigzag",
):
    """2-D context-parallel attention (Ulysses all-to-all inside groups of ``ulysses_size`` ranks,
    zigzag ring across them): :func:`flashtile.flash_attn_func` on a sequence sharded over the ranks
    of ``group`` (None: the default group) with :func:`flashtile.distributed.shard`.

    Args:
        q: this rank's shard ``(batch, seqlen_q / W, nheads, headdim)``, ``nheads`` divisible by
            ``ulysses_size``.
        k, v: ``(batch, seqlen_k / W, nheads_k, headdim)`` (GQA: see the module docstring).
        group: the process group of ``W = ulysses_size x ring_size`` ranks.
        ulysses_size: ranks per Ulysses subgroup (consecutive group ranks), dividing ``W``; 1 is
            ring attention, ``W`` is Ulysses. Every rank passes the same value (checked on the
            first call with a group and size).
        layout: ``"zigzag"`` (balanced causal work) or ``"contiguous"``; the sharding of
            :func:`flashtile.distributed.shard`, the same for every ``ulysses_size``.
        Other options: as :func:`flashtile.flash_attn_func` on the full sequence (limits with a
        ring, ``learnable_sink`` and dropout: see the module docstring).

    Returns:
        out ``(batch, seqlen_q / W, nheads, headdim)``; with ``return_attn_probs=True``,
        ``(out, softmax_lse (batch, nheads, seqlen_q / W), None)``.
    """
    return context_parallel(
        q, k, v, group=group, ulysses_size=ulysses_size, layout=layout, dropout_p=dropout_p,
        softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, deterministic=deterministic, return_attn_probs=return_attn_probs,
        learnable_sink=learnable_sink,
    )  # fmt: skip


def hybrid_flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    ulysses_size: int = 1,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: _Window = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    learnable_sink: torch.Tensor | None = None,
    layout: str = "zigzag",
):
    """:func:`hybrid_flash_attn_func` with ``qkv (batch, seqlen / W, 3, nheads, headdim)`` (this
    rank's shard); the gradient flows back to ``qkv``."""
    q, k, v = unbind_packed(qkv, "qkv", 3, 2)
    return context_parallel(
        q, k, v, group=group, ulysses_size=ulysses_size, layout=layout, dropout_p=dropout_p,
        softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, deterministic=deterministic, return_attn_probs=return_attn_probs,
        learnable_sink=learnable_sink, names=("qkv[:, :, 0]", "qkv[:, :, 1]", "qkv[:, :, 2]"),
        fn="hybrid_flash_attn_qkvpacked_func",
    )  # fmt: skip


def hybrid_flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    group: dist.ProcessGroup | None = None,
    ulysses_size: int = 1,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: _Window = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    learnable_sink: torch.Tensor | None = None,
    layout: str = "zigzag",
):
    """2-D context-parallel attention on a packed batch of variable-length sequences, every one
    sharded on its own (:func:`flashtile.distributed.shard` with ``cu_seqlens``; lengths
    divisible by ``2W`` for zigzag, ``W`` for contiguous).

    Args:
        q: ``(total_q / W, nheads, headdim)``, this rank's shard of the packed queries.
        k, v: ``(total_k / W, nheads_k, headdim)``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)``: the **global** cumulative lengths,
            the same on every rank.
        max_seqlen_q, max_seqlen_k: the global longest lengths.
        Other arguments: see :func:`hybrid_flash_attn_func`. With ``ring_size > 1`` the mask is
        none, or causal with equal query and key lengths per sequence.

    Returns:
        out ``(total_q / W, nheads, headdim)``; with ``return_attn_probs=True``,
        ``(out, softmax_lse (nheads, total_q / W), None)``.
    """
    return context_parallel(
        q, k, v, group=group, ulysses_size=ulysses_size, layout=layout, dropout_p=dropout_p,
        softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, deterministic=deterministic, return_attn_probs=return_attn_probs,
        learnable_sink=learnable_sink, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, fn="hybrid_flash_attn_varlen_func",
    )  # fmt: skip


def hybrid_flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    group: dist.ProcessGroup | None = None,
    ulysses_size: int = 1,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: _Window = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    learnable_sink: torch.Tensor | None = None,
    layout: str = "zigzag",
):
    """:func:`hybrid_flash_attn_varlen_func` with ``qkv (total / W, 3, nheads, headdim)`` and one
    (global) ``cu_seqlens``."""
    q, k, v = unbind_packed(qkv, "qkv", 3, 1)
    return context_parallel(
        q, k, v, group=group, ulysses_size=ulysses_size, layout=layout, dropout_p=dropout_p,
        softmax_scale=softmax_scale, causal=causal, window_size=window_size, softcap=softcap,
        alibi_slopes=alibi_slopes, deterministic=deterministic, return_attn_probs=return_attn_probs,
        learnable_sink=learnable_sink, cu_seqlens_q=cu_seqlens, cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, names=("qkv[:, 0]", "qkv[:, 1]", "qkv[:, 2]"),
        fn="hybrid_flash_attn_varlen_qkvpacked_func",
    )  # fmt: skip
