"""Ring attention: context-parallel attention with K/V blocks travelling around the ranks.

Every rank holds a shard of the sequence (see :mod:`flashtile.distributed.shard` for the
layouts). At step ``t`` of ``W``, rank ``r`` attends its queries to the K/V shard of rank
``s = r - t (mod W)`` while that shard is already being passed on to rank ``r + 1``
(``torch.distributed`` point-to-point ops, overlapped with the compute). Each step gives
partial ``(out, lse)`` states that are merged in float32 by log-sum-exp
(:func:`flashtile.merge.merge_two`).

The backward runs the same ring: K/V travel again, and each rank recomputes the gradients of
its blocks with the backend's backward, given the *global* ``(out, lse)`` (so each block's
probabilities are already normalised over the whole sequence, and ``delta = rowsum(dout *
out)`` is the global one); dQ is accumulated locally, dK/dV accumulate in float32 while they
travel with their block and reach their owner after a full turn.

Masks. The backends align causal/window masks to the bottom-right corner of each call, so
the ring cuts every (query chunk x key chunk) block into the one call that reproduces the
global mask: query ``p`` sees key ``t`` (global positions) when
``p + Sk - Sq - left <= t <= p + Sk - Sq + right``. For a block whose diagonal is at offset
``d`` the visible entries form a band; the call takes the band's bounding box (the rows that
see anything, the keys any of them sees) and a window ``(left', right')`` re-aligned to it.
A block entirely visible needs no mask, one entirely hidden is skipped: for the causal mask,
query chunk after key chunk = full, same chunk = causal, before = skipped. Calls on adjacent
full blocks are fused, and with zigzag + causal every step is one call (step 0 is causal on
the whole shard, because the local order of positions is the global order).

Learnable sinks are folded in once per row after the merge (``lse' = logaddexp(lse, sink)``,
``out' = out * exp(lse - lse')``); the blocks' backward then gets the global ``lse'`` and the
sink's gradient is ``-sum_i exp(sink - lse'_i) * rowsum(dout_i * out_i)`` over this rank's rows.

This module holds the ring stage (:class:`_RingAttention`, the planner) of the one
context-parallel implementation, :func:`flashtile.distributed.hybrid.context_parallel`; the
public ring functions are that implementation with ``ulysses_size = 1``.

Semantics of the public functions (every rank of ``group``, None = the default group, calls
with its shard and the same options; ``layout`` is ``"zigzag"`` or ``"contiguous"``, see
:mod:`flashtile.distributed.shard`): ``dropout_p``, ``softmax_scale``, ``causal``,
``window_size`` (any window, dense form), ``softcap``, ``deterministic`` are those of
:func:`flashtile.flash_attn_func` applied to *global* positions: the result is the
single-process call on the full sequence, sharded. ``return_attn_probs=True`` returns
``(out, softmax_lse, None)``, the lse of this rank's queries. ``learnable_sink`` (float32
``(nheads,)``, the same on every rank): its gradient on each rank is its rows' contribution;
summed over the group (the all-reduce of a replicated parameter) it is the single-process
gradient. Not available: ``alibi_slopes`` (the backends align ALiBi to each call's corner, not to
global positions: use the Ulysses functions), and ``return_attn_probs`` together with dropout;
both raise NotImplementedError.

Dropout: each call gets its own seed, derived from one base seed (drawn from torch's
generator like ``flash_attn_func``) and (rank, source rank, call index); the backward reuses
them. The dropout pattern therefore differs from single-process ``flash_attn_func`` (whose
mask is indexed by global positions) but has the same distribution.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..mask import block_fully_visible
from ..merge import merge_two, merge_two_
from ..ops import attention, attention_backward
from ..spec import AttnCall, unbind_packed
from ._common import RingPeers, mix_seed, seed_tensor, wait_all
from .shard import chunk_ids, num_chunks

_Window = Sequence[int]

# ----------------------------------------------------------------------------------------------
# planning: which calls reproduce the global mask on one (query shard x key shard) step


@dataclass(frozen=True)
class Piece:
    """One backend call of a ring step: local query rows ``[q_lo, q_hi)`` against local key
    columns ``[k_lo, k_hi)``, with the window ``(left, right)`` bottom-right aligned on the
    call (``-1`` = unbounded; ``(-1, -1)`` = no mask, ``(-1, 0)`` = causal)."""

    q_lo: int
    q_hi: int
    k_lo: int
    k_hi: int
    left: int = -1
    right: int = -1

    @property
    def full(self) -> bool:
        return self.left < 0 and self.right < 0


def block_call(cq: int, ck: int, d: int, left: int, right: int) -> tuple[int, int, int, int, int, int] | None:
    """The call for a ``cq x ck`` block in which row ``i`` sees key ``j`` when
    ``i + d - left <= j <= i + d + right``: ``(r0, r1, a, b, left', right')`` = rows ``[r0, r1)``,
    keys ``[a, b)`` and the window to give the backend there; None if nothing is visible.

    With ``nq = r1 - r0`` and ``nk = b - a`` the backend aligns row ``i`` of the call with key
    ``i + nk - nq``; the block aligns it with ``i + r0 + d - a``. The difference
    ``delta = b - r1 - d`` moves into the window (``left + delta``, ``right - delta``), and for
    the tight bounding box both stay >= 0.
    """
    if cq <= 0 or ck <= 0:
        return None
    r0 = max(0, -d - right) if right >= 0 else 0  # first row whose band reaches key 0
    r1 = min(cq, ck - d + left) if left >= 0 else cq  # one past the last row whose band starts in the block
    if r0 >= r1:
        return None
    a = max(0, r0 + d - left) if left >= 0 else 0
    b = min(ck, r1 + d + right) if right >= 0 else ck
    delta = b - r1 - d
    wl = left + delta if left >= 0 else -1
    wr = right - delta if right >= 0 else -1
    assert wl >= -1 and wr >= -1 and (left < 0 or wl >= 0) and (right < 0 or wr >= 0), (cq, ck, d, left, right)
    nq, nk = r1 - r0, b - a
    if block_fully_visible(0, nq, 0, nk, nk - nq, wl, wr):
        wl = wr = -1
    return r0, r1, a, b, wl, wr


def _fuse(pieces: list[Piece]) -> list[Piece]:
    """Fuse full pieces side by side (same rows, adjacent keys), then stacked (same keys, adjacent rows)."""

    def run(ps: list[Piece], key, adjacent, join) -> list[Piece]:
        out: list[Piece] = []
        for p in sorted(ps, key=key):
            if out and out[-1].full and p.full and adjacent(out[-1], p):
                out[-1] = join(out[-1], p)
            else:
                out.append(p)
        return out

    pieces = run(
        pieces, lambda p: (p.q_lo, p.q_hi, p.k_lo),
        lambda a, b: (a.q_lo, a.q_hi) == (b.q_lo, b.q_hi) and a.k_hi == b.k_lo,
        lambda a, b: dataclasses.replace(a, k_hi=b.k_hi),
    )  # fmt: skip
    return run(
        pieces, lambda p: (p.k_lo, p.k_hi, p.q_lo),
        lambda a, b: (a.k_lo, a.k_hi) == (b.k_lo, b.k_hi) and a.q_hi == b.q_lo,
        lambda a, b: dataclasses.replace(a, q_hi=b.q_hi),
    )  # fmt: skip


def plan_step(
    q_chunks: Sequence[int],
    k_chunks: Sequence[int],
    cq: int,
    ck: int,
    shift: int,
    left: int,
    right: int,
) -> list[Piece]:
    """The calls for one ring step of one sequence.

    Args:
        q_chunks / k_chunks: the global chunk indices held (in slot order) by the query rank
            and the key rank.
        cq / ck: query / key chunk lengths.
        shift: ``Sk - Sq`` of the whole sequence (0 for self-attention).
        left, right: the global window (``-1`` = unbounded; causal is ``right = 0``).

    Returns:
        Pieces in local coordinates (row ``slot * cq + i`` of the shard is position
        ``q_chunks[slot] * cq + i``), in a fixed order.
    """
    if left == -1 and right == 0 and tuple(q_chunks) == tuple(k_chunks) and cq == ck and shift == 0 and cq > 0:
        # Same positions on both sides, in increasing order: the global causal mask is the
        # local one.
        return [Piece(0, len(q_chunks) * cq, 0, len(k_chunks) * ck, -1, 0)]
    pieces = []
    for iq, gq in enumerate(q_chunks):
        for ik, gk in enumerate(k_chunks):
            c = block_call(cq, ck, gq * cq - gk * ck + shift, left, right)
            if c is not None:
                r0, r1, a, b, wl, wr = c
                pieces.append(Piece(iq * cq + r0, iq * cq + r1, ik * ck + a, ik * ck + b, wl, wr))
    return _fuse(pieces)


def plan_varlen_step(
    q_chunks: Sequence[int],
    k_chunks: Sequence[int],
    lens: Sequence[tuple[int, int]],
    nchunks: int,
    left: int,
    right: int,
) -> list[Piece]:
    """The calls of one ring step of a varlen batch, in *slot* units (``q_lo = 1`` means the
    start of each sequence's second query chunk). Every sequence must give the same plan in
    slot units, or the batch cannot be done with one call per piece (NotImplementedError)."""
    plan = None
    cache: dict[tuple[int, int], tuple] = {}
    for lq, lk in lens:
        cq, ck = lq // nchunks, lk // nchunks
        if cq == 0 or ck == 0:
            continue  # contributes no row or no key to any call
        if (cq, ck) not in cache:
            pieces = plan_step(q_chunks, k_chunks, cq, ck, lk - lq, left, right)
            slots = []
            for p in pieces:
                if p.q_lo % cq or p.q_hi % cq or p.k_lo % ck or p.k_hi % ck:
                    slots = None
                    break
                slots.append(Piece(p.q_lo // cq, p.q_hi // cq, p.k_lo // ck, p.k_hi // ck, p.left, p.right))
            cache[(cq, ck)] = None if slots is None else tuple(slots)
        this = cache[(cq, ck)]
        if this is None or (plan is not None and this != plan):
            raise NotImplementedError(
                f"ring varlen attention: the mask (causal={right == 0 and left < 0}, window_size=({left}, {right})) "
                "does not cut every sequence at chunk boundaries in the same way; supported are no mask, and "
                "causal with equal query/key lengths per sequence. Use the dense form (any window_size) or "
                "ulysses_size = the group size (ulysses_flash_attn_varlen_func)"
            )
        plan = this
    return list(plan or ())


# ----------------------------------------------------------------------------------------------
# the calls of one forward/backward, with their selections on the local tensors


@dataclass
class _Call:
    q_sel: slice | torch.Tensor  # rows of the local q/out (dim 1) and lse (dim 2)
    k_sel: slice | torch.Tensor  # rows of the travelling k/v (dim 1)
    call: AttnCall  # the piece's window, seed and (varlen) cu_seqlens of the selection


def _cut(x: torch.Tensor, sel: slice | torch.Tensor, dim: int) -> torch.Tensor:
    if isinstance(sel, slice):
        return x if sel == slice(None) else x[(slice(None),) * dim + (sel,)]
    return x.index_select(dim, sel)


def _set(acc: torch.Tensor, sel: slice | torch.Tensor, dim: int, val: torch.Tensor) -> None:
    if isinstance(sel, slice):
        acc[(slice(None),) * dim + (sel,)] = val
    else:
        acc.index_copy_(dim, sel, val)


def _add(acc: torch.Tensor, sel: slice | torch.Tensor, dim: int, val: torch.Tensor) -> None:
    if isinstance(sel, slice):
        acc[(slice(None),) * dim + (sel,)] += val
    else:
        acc.index_add_(dim, sel, val.to(acc.dtype))


def _span(cu: list[int], nslots: int, s0: int, s1: int, device) -> tuple[slice | torch.Tensor, torch.Tensor, int]:
    """Rows of slots ``[s0, s1)`` of every sequence of a local varlen shard (``cu`` = local
    cu_seqlens): (selection, cu_seqlens of the selection, its longest sequence)."""
    lens_all = [b - a for a, b in zip(cu[:-1], cu[1:], strict=True)]
    chunk = [n // nslots for n in lens_all]
    lens = [(s1 - s0) * c for c in chunk]
    cu_sel = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32).to(device)
    mx = max(lens, default=0)
    if (s0, s1) == (0, nslots):
        return slice(None), cu_sel, mx
    starts = torch.tensor([a + s0 * c for a, c in zip(cu[:-1], chunk, strict=True)], dtype=torch.int64)
    ln = torch.tensor(lens, dtype=torch.int64)
    total = int(ln.sum())
    idx = torch.repeat_interleave(starts - (ln.cumsum(0) - ln), ln, output_size=total) + torch.arange(total)
    return idx.to(device), cu_sel, mx


@dataclass
class _Ring:
    """Everything one ring call needs besides the tensors: built before the autograd function."""

    peers: RingPeers
    world: int
    rank: int
    backend: str
    calls: list[list[_Call]]  # calls[s] = the calls against the K/V of ring position s


def _build_calls(
    spec: AttnCall,
    layout: str,
    world: int,
    rank: int,
    base_seed: int | None,
    device: torch.device,
    dense: tuple[int, int] | None,
    varlen: tuple[list[int], list[int]] | None,
) -> list[list[_Call]]:
    n = num_chunks(layout, world)
    nslots = n // world
    q_chunks = chunk_ids(layout, world, rank)
    spans: dict[tuple[str, int, int], tuple] = {}  # varlen row selections, shared by the steps

    def span(side: str, lo: int, hi: int) -> tuple:
        if (side, lo, hi) not in spans:
            local = [x // world for x in varlen[0 if side == "q" else 1]]
            spans[(side, lo, hi)] = _span(local, nslots, lo, hi, device)
        return spans[(side, lo, hi)]

    calls = []
    for s in range(world):
        k_chunks = chunk_ids(layout, world, s)
        if dense is not None:
            sq, sk = dense  # global lengths
            pieces = plan_step(q_chunks, k_chunks, sq // n, sk // n, sk - sq, spec.window_left, spec.window_right)
        else:
            cuq, cuk = varlen
            lens = [(b - a, d - c) for a, b, c, d in zip(cuq[:-1], cuq[1:], cuk[:-1], cuk[1:], strict=True)]
            pieces = plan_varlen_step(q_chunks, k_chunks, lens, n, spec.window_left, spec.window_right)
        step = []
        for i, p in enumerate(pieces):
            seed = None if base_seed is None else seed_tensor(mix_seed(base_seed, rank, s, i))
            pspec = dataclasses.replace(spec, window_left=p.left, window_right=p.right, seed=seed)
            if dense is not None:
                qs = slice(None) if (p.q_lo, p.q_hi) == (0, nslots * (dense[0] // n)) else slice(p.q_lo, p.q_hi)
                ks = slice(None) if (p.k_lo, p.k_hi) == (0, nslots * (dense[1] // n)) else slice(p.k_lo, p.k_hi)
                step.append(_Call(qs, ks, pspec))
            else:
                qs, cu_q, mq = span("q", p.q_lo, p.q_hi)
                ks, cu_k, mk = span("k", p.k_lo, p.k_hi)
                lens = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=mq, max_seqlen_k=mk)
                step.append(_Call(qs, ks, dataclasses.replace(pspec, **lens)))
        calls.append(step)
    return calls


def acc_shape(q: torch.Tensor, v: torch.Tensor) -> tuple[int, ...]:
    """The output's shape: q's rows and heads, v's head dim."""
    return (*q.shape[:-1], v.shape[-1])


def _fwd_call(c: _Call, q, k, v, backend: str):
    return attention(_cut(q, c.q_sel, 1), _cut(k, c.k_sel, 1), _cut(v, c.k_sel, 1), c.call, backend)


def _bwd_call(c: _Call, dout, q, k, v, out, lse, backend: str):
    return attention_backward(
        _cut(dout, c.q_sel, 1), _cut(q, c.q_sel, 1), _cut(k, c.k_sel, 1), _cut(v, c.k_sel, 1),
        _cut(out, c.q_sel, 1), _cut(lse, c.q_sel, 2).contiguous(), c.call, backend,
    )  # fmt: skip


def _add_sink(out: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold per-head sink logits into merged float32 ``(out (B, S, H, D), lse (B, H, S))``: one more
    term ``exp(sink_h)`` in every row's denominator (the sink is counted once, after the merge)."""
    new = torch.logaddexp(lse, sink.view(1, -1, 1))
    out.mul_(torch.exp(lse - new).transpose(1, 2).unsqueeze(-1))
    return out, new


class _RingAttention(torch.autograd.Function):
    """Ring attention on the internal layout (q ``(B, Sq_local, H, D)``, k/v ``(B, Sk_local, Hk, D)``,
    varlen with B = 1, ``sink`` None or float32 ``(H,)``): returns ``(out, lse)`` of this rank's
    queries over the whole sequence.

    Overlap: every step posts the exchange of the block it is about to use (to the next rank,
    from the previous one) before enqueueing its attention, so the transfer of block ``t + 1``
    runs on the communication stream while block ``t`` is computed; the wait at the end of the
    step only orders the compute stream after the transfer (no host synchronisation inside the
    loop). Receive buffers are two preallocated sets used in turn (the block being computed on and
    the one arriving); in the backward the travelling dK/dV accumulators alternate the same way.
    """

    @staticmethod
    def forward(ctx, q, k, v, sink, ring: _Ring):
        B, Sq, H, _ = q.shape
        acc_out = acc_lse = None  # float32 running state of the local rows
        kv = [k.contiguous(), v.contiguous()]
        bufs = [[torch.empty_like(x) for x in kv] for _ in range(min(2, ring.world - 1))]
        for t in range(ring.world):
            src = (ring.rank - t) % ring.world
            if t + 1 < ring.world:
                nxt, reqs = ring.peers.exchange(kv, bufs[t % 2])  # pass this block on while computing on it
            for c in ring.calls[src]:
                o, lse = _fwd_call(c, q, kv[0], kv[1], ring.backend)
                if acc_out is None and isinstance(c.q_sel, slice) and c.q_sel == slice(None):  # all rows: no merge
                    acc_out, acc_lse = o.float(), lse.float()
                    continue
                if acc_out is None:
                    acc_out = torch.zeros(acc_shape(q, v), dtype=torch.float32, device=q.device)
                    acc_lse = torch.full((B, H, Sq), float("-inf"), dtype=torch.float32, device=q.device)
                if isinstance(c.q_sel, slice):  # rows of a slice are views: merge in place
                    merge_two_(_cut(acc_out, c.q_sel, 1), _cut(acc_lse, c.q_sel, 2), o, lse)
                    continue
                mo, ml = merge_two(_cut(acc_out, c.q_sel, 1), _cut(acc_lse, c.q_sel, 2), o, lse)
                _set(acc_out, c.q_sel, 1, mo)
                _set(acc_lse, c.q_sel, 2, ml)
            if t + 1 < ring.world:
                wait_all(reqs)
                kv = nxt
        if acc_out is None:  # no key visible to any local row
            acc_out = torch.zeros(acc_shape(q, v), dtype=torch.float32, device=q.device)
            acc_lse = torch.full((B, H, Sq), float("-inf"), dtype=torch.float32, device=q.device)
        if sink is not None:
            acc_out, acc_lse = _add_sink(acc_out, acc_lse, sink.detach())
        out = acc_out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, acc_lse, sink)
        ctx.ring = ring
        ctx.mark_non_differentiable(acc_lse)
        return out, acc_lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, out, lse, sink = ctx.saved_tensors
        ring: _Ring = ctx.ring
        dout = dout.contiguous()
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        kv = [k.contiguous(), v.contiguous()]
        bufs = [[torch.empty_like(x) for x in kv] for _ in range(min(2, ring.world - 1))]
        # dK/dV of the block in hand, float32: two accumulators in turn (one may still be in
        # flight to the next rank while the other fills) and one receive buffer.
        acc = [[torch.empty(x.shape, dtype=torch.float32, device=x.device) for x in kv]
               for _ in range(min(2, ring.world))]  # fmt: skip
        drecv = [torch.empty_like(x) for x in acc[0]] if ring.world > 1 else None
        dkv_reqs = None
        for t in range(ring.world):
            src = (ring.rank - t) % ring.world
            if t + 1 < ring.world:
                nxt, reqs = ring.peers.exchange(kv, bufs[t % 2])
            dk, dv = acc[t % 2]
            fresh = True  # dk / dv hold nothing of this step yet
            for c in ring.calls[src]:
                dq_c, dk_c, dv_c = _bwd_call(c, dout, q, kv[0], kv[1], out, lse, ring.backend)
                _add(dq, c.q_sel, 1, dq_c)
                if fresh and isinstance(c.k_sel, slice) and c.k_sel == slice(None):  # all keys: copy, no zeroing
                    dk.copy_(dk_c)
                    dv.copy_(dv_c)
                else:
                    if fresh:
                        dk.zero_()
                        dv.zero_()
                    _add(dk, c.k_sel, 1, dk_c)
                    _add(dv, c.k_sel, 1, dv_c)
                fresh = False
            if fresh:  # no call against this block
                dk.zero_()
                dv.zero_()
            if dkv_reqs is not None:  # the gradients of this block from the ranks before us
                wait_all(dkv_reqs)
                dk += drecv[0]
                dv += drecv[1]
            if ring.world > 1:  # pass them on; after a full turn they reach the block's owner
                _, dkv_reqs = ring.peers.exchange([dk, dv], drecv)
            if t + 1 < ring.world:
                wait_all(reqs)
                kv = nxt
        if dkv_reqs is not None:
            wait_all(dkv_reqs)
            dk, dv = drecv
        dsink = None
        if sink is not None and ctx.needs_input_grad[3]:
            # d lse_i / d sink = exp(sink - lse_i); dsink = -sum_i exp(sink - lse_i) * rowsum(dout_i * out_i)
            delta = (dout.float() * out.float()).sum(-1).transpose(1, 2)  # (B, H, S)
            dsink = -(torch.exp(sink.view(1, -1, 1) - lse) * delta).sum((0, 2))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dsink, None


# ----------------------------------------------------------------------------------------------
# public functions


def _ring(q, k, v, *, group, fn: str = "ring_flash_attn_func", **kwargs):
    """Ring attention = the 2-D form with ``ulysses_size = 1`` (no all-to-all)."""
    from .hybrid import context_parallel

    return context_parallel(q, k, v, group=group, ulysses_size=1, fn=fn, check_grid=False, **kwargs)


def ring_flash_attn_func(
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
    """Ring attention over the ranks of ``group``: :func:`flashtile.flash_attn_func` on a sequence
    sharded along ``seqlen``.

    Args:
        q: this rank's shard ``(batch, seqlen_q / W, nheads, headdim)``.
        k, v: this rank's shards ``(batch, seqlen_k / W, nheads_k, headdim)`` (GQA: ``nheads_k``
            divides ``nheads``). Each local length must divide into the layout's chunks (2 per
            rank for zigzag).
        group, layout, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
        deterministic, return_attn_probs, learnable_sink: see the module docstring.

    Returns:
        out ``(batch, seqlen_q / W, nheads, headdim)``, this rank's shard of the output; with
        ``return_attn_probs=True``, ``(out, softmax_lse (batch, nheads, seqlen_q / W), None)``.
    """
    return _ring(
        q, k, v, group=group, layout=layout, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_attn_probs=return_attn_probs, learnable_sink=learnable_sink,
    )  # fmt: skip


def ring_flash_attn_qkvpacked_func(
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
    """:func:`ring_flash_attn_func` with ``qkv (batch, seqlen / W, 3, nheads, headdim)`` (this
    rank's shard); the gradient flows back to ``qkv``."""
    q, k, v = unbind_packed(qkv, "qkv", 3, 2)
    return _ring(
        q, k, v, group=group, layout=layout, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_attn_probs=return_attn_probs, learnable_sink=learnable_sink,
        names=("qkv[:, :, 0]", "qkv[:, :, 1]", "qkv[:, :, 2]"),
        fn="ring_flash_attn_qkvpacked_func",
    )  # fmt: skip


def ring_flash_attn_varlen_func(
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
    """Ring attention on a packed batch of variable-length sequences, every one sharded.

    Layout: each sequence of the *global* batch is cut into the layout's ``n`` chunks on its
    own (``n = 2W`` for zigzag, ``W`` for contiguous; every length divisible by ``n``) and this
    rank holds its chunks of sequence 0, then of sequence 1, ... (``flashtile.distributed.shard``
    with ``cu_seqlens`` produces exactly this).

    Args:
        q: ``(total_q / W, nheads, headdim)``, this rank's shard of the packed queries.
        k, v: ``(total_k / W, nheads_k, headdim)``.
        cu_seqlens_q, cu_seqlens_k: int32 ``(batch + 1,)``: the **global** cumulative lengths,
            the same on every rank (this rank's shard has ``cu_seqlens // W``).
        max_seqlen_q, max_seqlen_k: the global longest lengths (upper bounds accepted).
        Other arguments: see the module docstring. Masks: none, or causal with equal query and
        key lengths per sequence (other windows raise NotImplementedError: use the dense
        function, or Ulysses).

    Returns:
        out ``(total_q / W, nheads, headdim)``; with ``return_attn_probs=True``,
        ``(out, softmax_lse (nheads, total_q / W), None)``.
    """
    return _ring(
        q, k, v, group=group, layout=layout, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_attn_probs=return_attn_probs, learnable_sink=learnable_sink, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, fn="ring_flash_attn_varlen_func",
    )  # fmt: skip


def ring_flash_attn_varlen_qkvpacked_func(
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
    """:func:`ring_flash_attn_varlen_func` with ``qkv (total / W, 3, nheads, headdim)`` and one
    (global) ``cu_seqlens``."""
    q, k, v = unbind_packed(qkv, "qkv", 3, 1)
    return _ring(
        q, k, v, group=group, layout=layout, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
        return_attn_probs=return_attn_probs, learnable_sink=learnable_sink, cu_seqlens_q=cu_seqlens,
        cu_seqlens_k=cu_seqlens,
        max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen, names=("qkv[:, 0]", "qkv[:, 1]", "qkv[:, 2]"),
        fn="ring_flash_attn_varlen_qkvpacked_func",
    )  # fmt: skip
