"""Context-parallel attention (flashtile.distributed) against single-process attention.

The planner tests are pure (no process group): the calls the ring makes on every (rank,
source) step must tile the global mask exactly once. The parity tests start real gloo groups of
CPU processes (spawn is slow, so each is started once per module): a group of 4 where every
check runs on the whole group (W = 4) and on two groups of 2 (ranks {0, 2} and {1, 3}, so group
ranks differ from global ranks), and a group of 8 for the 2-D grids of 8 ranks (every
factorisation 1x8, 2x4, 4x2, 8x1 on the whole group, and 2x2 on the two groups of 4 even / odd
ranks). Each check compares this rank's out, lse and dq/dk/dv (and the sink's gradient summed
over the group) with the matching shard of single-process ``flash_attn_func`` on the full
sequence, and writes its verdict to a file that the parametrised tests below read.
"""

from __future__ import annotations

import datetime
import json
import os
import time
import traceback
from functools import partial

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import flashtile
from flashtile.distributed import (
    hybrid_flash_attn_func,
    hybrid_flash_attn_qkvpacked_func,
    hybrid_flash_attn_varlen_func,
    hybrid_flash_attn_varlen_qkvpacked_func,
    ring_flash_attn_func,
    ring_flash_attn_qkvpacked_func,
    ring_flash_attn_varlen_func,
    ring_flash_attn_varlen_qkvpacked_func,
    shard,
    shard_cu_seqlens,
    ulysses_flash_attn_func,
    ulysses_flash_attn_qkvpacked_func,
    ulysses_flash_attn_varlen_func,
    ulysses_flash_attn_varlen_qkvpacked_func,
    unshard,
)
from flashtile.distributed.ring import _build_calls, plan_step, plan_varlen_step
from flashtile.distributed.shard import chunk_ids, positions
from flashtile.mask import visible
from flashtile.rng import draw_seed, dropout_mask
from flashtile.spec import make_call
from flashtile.testing import attention_ref, cu_seqlens

# ----------------------------------------------------------------------------------------------
# the planner, without processes


def _global_mask_from_plan(layout, world, sq, sk, left, right):
    """Rebuild the (sq, sk) mask from the pieces of every (rank, source) step; count coverage."""
    from flashtile.distributed.shard import num_chunks

    n = num_chunks(layout, world)
    cover = torch.zeros(sq, sk, dtype=torch.int64)
    for r in range(world):
        pq = positions(sq, world, r, layout)
        for s in range(world):
            pk = positions(sk, world, s, layout)
            for p in plan_step(chunk_ids(layout, world, r), chunk_ids(layout, world, s), sq // n, sk // n,
                               sk - sq, left, right):  # fmt: skip
                nq, nk = p.q_hi - p.q_lo, p.k_hi - p.k_lo
                assert nq > 0 and nk > 0
                m = visible(torch.arange(nq), torch.arange(nk), nk - nq, p.left, p.right)
                m = torch.ones(nq, nk, dtype=torch.bool) if m is None else m
                rows, cols = pq[p.q_lo : p.q_hi], pk[p.k_lo : p.k_hi]
                cover[rows.view(-1, 1), cols.view(1, -1)] += m.long()
    return cover


WINDOWS = [(-1, -1), (-1, 0), (3, 0), (7, 2), (0, 0), (-1, 5), (9, -1), (13, 13), (1, 30), (30, 1)]


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_plan_tiles_the_global_mask_once(layout, world):
    n = 2 * world if layout == "zigzag" else world
    for sq, sk in ((4 * n, 4 * n), (2 * n, 5 * n), (5 * n, 2 * n), (n, n)):
        for left, right in WINDOWS:
            cover = _global_mask_from_plan(layout, world, sq, sk, left, right)
            want = visible(torch.arange(sq), torch.arange(sk), sk - sq, left, right)
            want = torch.ones(sq, sk, dtype=torch.bool) if want is None else want
            assert cover.max() <= 1, (layout, world, sq, sk, left, right)
            assert torch.equal(cover.bool(), want), (layout, world, sq, sk, left, right)


def test_plan_zigzag_causal_is_one_call_per_step():
    for world in (2, 4, 8):
        for r in range(world):
            for s in range(world):
                ps = plan_step(chunk_ids("zigzag", world, r), chunk_ids("zigzag", world, s), 16, 16, 0, -1, 0)
                assert len(ps) == 1
                want = (-1, 0) if r == s else (-1, -1)
                assert (ps[0].left, ps[0].right) == want


def test_plan_varlen():
    qc, kc = chunk_ids("zigzag", 2, 1), chunk_ids("zigzag", 2, 0)
    # causal, equal lengths: the same slot plan for every sequence (empty ones ignored)
    assert plan_varlen_step(qc, kc, [(8, 8), (0, 0), (16, 16)], 4, -1, 0)
    with pytest.raises(NotImplementedError, match="window_size"):
        plan_varlen_step(qc, kc, [(8, 8), (16, 16)], 4, 3, 0)


def test_merge_two_in_place_matches_merge_two():
    """The ring's in-place merge (on a view of the running state, bf16 piece, rows that saw no
    key on either side) equals merge_two and leaves the rows outside the view alone."""
    from flashtile.merge import merge_two, merge_two_

    g = torch.Generator().manual_seed(5)
    acc_out, acc_lse = torch.randn(2, 12, 3, 8, generator=g), torch.randn(2, 3, 12, generator=g)
    o, lse = torch.randn(2, 5, 3, 8, generator=g).bfloat16(), torch.randn(2, 3, 5, generator=g)
    acc_lse[0, 1, 4:7] = float("-inf")
    lse[0, 1, :3] = float("-inf")  # rows 4 and 5 of the view: empty on both sides
    want_out, want_lse = merge_two(acc_out[:, 4:9], acc_lse[:, :, 4:9], o, lse)
    before = acc_out.clone()
    merge_two_(acc_out[:, 4:9], acc_lse[:, :, 4:9], o, lse)
    torch.testing.assert_close(acc_out[:, 4:9], want_out)
    torch.testing.assert_close(acc_lse[:, :, 4:9], want_lse)
    assert torch.equal(acc_out[:, :4], before[:, :4]) and torch.equal(acc_out[:, 9:], before[:, 9:])
    assert torch.isneginf(acc_lse[0, 1, 4:6]).all() and (acc_out[0, 4:6, 1] == 0).all()


@pytest.mark.parametrize("layout", ["zigzag", "contiguous"])
def test_2d_layout_gathers_the_ring_shard(layout):
    """What a Ulysses subgroup gathers (its members' shards, sorted) is its ring position's shard
    of the ring over W / U positions, dense and varlen: the premise of the 2-D form."""
    from flashtile.distributed.shard import varlen_positions

    cu = [0, 32, 32, 80, 96]  # every length divisible by 2W
    for world in (2, 4, 8):
        s = 16 * world
        for n_u in (u for u in (1, 2, 4, 8) if world % u == 0):
            n_r = world // n_u
            for r in range(n_r):
                members = range(r * n_u, (r + 1) * n_u)
                got = torch.cat([positions(s, world, g, layout) for g in members]).sort().values
                assert torch.equal(got, positions(s, n_r, r, layout)), (world, n_u, r)
                got = torch.cat([varlen_positions(cu, world, g, layout) for g in members]).sort().values
                assert torch.equal(got, varlen_positions(cu, n_r, r, layout)), (world, n_u, r, "varlen")


# ----------------------------------------------------------------------------------------------
# the process group: one spawn of 4 ranks, every check on W = 4 and on two groups of W = 2

#: Measured worst difference over every fp32 check: 1.5e-6 (merge order differs from one pass).
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
LAYOUTS = ("zigzag", "contiguous")


def _close(x, ref, name, tol):
    torch.testing.assert_close(x.detach(), ref.detach(), msg=lambda m: f"{name}: {m}", **tol)


def _inputs(seed, shapes, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g).to(dtype) for s in shapes]


def _sink_leaves(opts):
    """Pops ``learnable_sink`` from ``opts``: ([ref leaf], [local leaf], ref kwarg, local kwarg), all
    empty without a sink."""
    sink = opts.pop("learnable_sink", None)
    if sink is None:
        return [], [], {}, {}
    ref, loc = sink.clone().requires_grad_(), sink.clone().requires_grad_()
    return [ref], [loc], {"learnable_sink": ref}, {"learnable_sink": loc}


def _split_sink_grad(grads, sink):
    """grads of (q, k, v[, sink]) -> [gq, gk, gv, [gsink] or []]."""
    grads = list(grads)
    return grads[:3] + [grads[3:]] if sink else grads + [[]]


#: strategy -> (dense, qkvpacked, varlen, varlen_qkvpacked)
FUNCS = {
    "ring": (ring_flash_attn_func, ring_flash_attn_qkvpacked_func, ring_flash_attn_varlen_func,
             ring_flash_attn_varlen_qkvpacked_func),
    "ulysses": (ulysses_flash_attn_func, ulysses_flash_attn_qkvpacked_func, ulysses_flash_attn_varlen_func,
                ulysses_flash_attn_varlen_qkvpacked_func),
    "hybrid": (hybrid_flash_attn_func, hybrid_flash_attn_qkvpacked_func, hybrid_flash_attn_varlen_func,
               hybrid_flash_attn_varlen_qkvpacked_func),
}  # fmt: skip


def _ulysses_size(group, strategy, ulysses):
    """The Ulysses size of a check: 1 for ring, W for Ulysses, ``ulysses`` for hybrid ("W": the group's size)."""
    world = dist.get_world_size(group)
    if strategy != "hybrid":
        return 1 if strategy == "ring" else world
    return world if ulysses == "W" else ulysses


def _fn(strategy, kind, group, ulysses):
    fn = FUNCS[strategy][kind]
    return partial(fn, ulysses_size=_ulysses_size(group, strategy, ulysses)) if strategy == "hybrid" else fn


def _check_sink_grad(gs_l, gs_ref, group, tol, n_u):
    """Each rank's sink gradient holds its rows' part of its Ulysses member's heads' entries
    (``n_u`` = ulysses_size: all heads for ring), zeros elsewhere; summed over the group (as a
    data-parallel all-reduce would) it is the single-process gradient."""
    if not gs_l:
        return
    (g,), (g_ref,) = gs_l, gs_ref
    h, u = g.numel(), dist.get_rank(group) % n_u
    mine = torch.zeros(h, dtype=torch.bool)
    mine[u * h // n_u : (u + 1) * h // n_u] = True
    own = g.clone()
    dist.all_reduce(g, group=group)
    assert bool((own[~mine] == 0).all()) and bool((own[mine] != 0).all())
    _close(g, g_ref, "grad[sink] summed over the group", tol)


def _dense_case(group, strategy, layout, *, b=2, sq=48, sk=None, h=4, hk=4, d=16, dv=None, packed=False,
                dtype=torch.float32, tol=FP32_TOL, ulysses=None, **opts):  # fmt: skip
    sk = sq if sk is None else sk
    dv = d if dv is None else dv  # v's head dim
    n_u = _ulysses_size(group, strategy, ulysses)
    q, k, v, dout = _inputs(sq * 1000 + sk * 10 + hk, [(b, sq, h, d), (b, sk, hk, d), (b, sk, hk, dv), (b, sq, h, dv)],
                            dtype)  # fmt: skip
    sink, sink_l, sk_ref, sk_l = _sink_leaves(opts)
    sh = partial(shard, group=group, layout=layout, ulysses_size=n_u)
    if packed:
        qkv = torch.stack([q, k, v], dim=2).requires_grad_()
        out, lse, _ = flashtile.flash_attn_qkvpacked_func(qkv, return_attn_probs=True, **opts, **sk_ref)
        (g_ref, *gs_ref) = torch.autograd.grad(out, (qkv, *sink), dout)
        qkv_l = sh(qkv.detach()).requires_grad_()
        fn = _fn(strategy, 1, group, ulysses)
        out_l, lse_l, _ = fn(qkv_l, group=group, layout=layout, return_attn_probs=True, **opts, **sk_l)
        (g_l, *gs_l) = torch.autograd.grad(out_l, (qkv_l, *sink_l), sh(dout))
        grads, grads_ref = [g_l], [sh(g_ref)]
    else:
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse, _ = flashtile.flash_attn_func(*leaves, return_attn_probs=True, **opts, **sk_ref)
        *g_ref, gs_ref = _split_sink_grad(torch.autograd.grad(out, [*leaves, *sink], dout), sink)
        loc = [sh(x).requires_grad_() for x in (q, k, v)]
        fn = _fn(strategy, 0, group, ulysses)
        out_l, lse_l, _ = fn(*loc, group=group, layout=layout, return_attn_probs=True, **opts, **sk_l)
        *grads, gs_l = _split_sink_grad(torch.autograd.grad(out_l, [*loc, *sink_l], sh(dout)), sink)
        grads_ref = [sh(x) for x in g_ref]
    full = unshard(out_l.detach(), group, layout, ulysses_size=n_u)  # every collective before the first assert
    _check_sink_grad(gs_l, gs_ref, group, tol, n_u)  # its all-reduce comes before its asserts
    assert out_l.dtype == dtype and lse_l.dtype == torch.float32
    _close(out_l, sh(out), "out", tol)
    _close(lse_l, shard(lse, group, layout, dim=2), "lse", tol)
    for i, (a, r) in enumerate(zip(grads, grads_ref, strict=True)):
        _close(a, r, f"grad[{i}]", tol)
    _close(full, out, "unshard(out)", tol)


def _varlen_case(group, strategy, layout, *, lens_q, lens_k=None, h=4, hk=4, d=16, packed=False, ulysses=None,
                 **opts):  # fmt: skip
    lens_k = lens_q if lens_k is None else lens_k
    n_u = _ulysses_size(group, strategy, ulysses)
    cu_q, cu_k = cu_seqlens(lens_q, "cpu"), cu_seqlens(lens_k, "cpu")
    tq, tk = int(cu_q[-1]), int(cu_k[-1])
    q, k, v, dout = _inputs(tq + 7 * tk, [(tq, h, d), (tk, hk, d), (tk, hk, d), (tq, h, d)])
    mq, mk = max(lens_q), max(lens_k)
    sh_q = partial(shard, group=group, layout=layout, dim=0, cu_seqlens=cu_q, ulysses_size=n_u)
    sh_k = partial(shard, group=group, layout=layout, dim=0, cu_seqlens=cu_k, ulysses_size=n_u)
    sink, sink_l, sk_ref, sk_l = _sink_leaves(opts)
    if packed:
        qkv = torch.stack([q, k, v], dim=1).requires_grad_()
        out, lse, _ = flashtile.flash_attn_varlen_qkvpacked_func(qkv, cu_q, mq, return_attn_probs=True, **opts,
                                                                 **sk_ref)  # fmt: skip
        (g_ref, *gs_ref) = torch.autograd.grad(out, (qkv, *sink), dout)
        qkv_l = sh_q(qkv.detach()).requires_grad_()
        fn = _fn(strategy, 3, group, ulysses)
        out_l, lse_l, _ = fn(qkv_l, cu_q, mq, group=group, layout=layout, return_attn_probs=True, **opts, **sk_l)
        (g_l, *gs_l) = torch.autograd.grad(out_l, (qkv_l, *sink_l), sh_q(dout))
        grads, grads_ref = [g_l], [sh_q(g_ref)]
    else:
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse, _ = flashtile.flash_attn_varlen_func(*leaves, cu_q, cu_k, mq, mk, return_attn_probs=True, **opts,
                                                       **sk_ref)  # fmt: skip
        *g_ref, gs_ref = _split_sink_grad(torch.autograd.grad(out, [*leaves, *sink], dout), sink)
        loc = [sh_q(q).requires_grad_(), sh_k(k).requires_grad_(), sh_k(v).requires_grad_()]
        fn = _fn(strategy, 2, group, ulysses)
        out_l, lse_l, _ = fn(*loc, cu_q, cu_k, mq, mk, group=group, layout=layout, return_attn_probs=True, **opts,
                             **sk_l)  # fmt: skip
        *grads, gs_l = _split_sink_grad(torch.autograd.grad(out_l, [*loc, *sink_l], sh_q(dout)), sink)
        grads_ref = [sh_q(g_ref[0]), sh_k(g_ref[1]), sh_k(g_ref[2])]
    full = unshard(out_l.detach(), group, layout, dim=0, cu_seqlens=cu_q, ulysses_size=n_u)  # collectives first
    _check_sink_grad(gs_l, gs_ref, group, FP32_TOL, n_u)  # its all-reduce comes before its asserts
    _close(out_l, sh_q(out), "out", FP32_TOL)
    _close(lse_l, shard(lse, group, layout, dim=1, cu_seqlens=cu_q), "lse", FP32_TOL)
    for i, (a, r) in enumerate(zip(grads, grads_ref, strict=True)):
        _close(a, r, f"grad[{i}]", FP32_TOL)
    _close(full, out, "unshard(out)", FP32_TOL)
    assert torch.equal(shard_cu_seqlens(cu_q, group), cu_q // dist.get_world_size(group))


def _ring_dropout_case(group, layout, *, b=2, s=32, h=4, hk=2, d=16, p=0.3, causal=True):
    """Dropout: rebuild the global keep mask from the per-call seeds and compare with the oracle."""
    world = dist.get_world_size(group)
    q, k, v, dout = _inputs(99, [(b, s, h, d), (b, s, hk, d), (b, s, hk, d), (b, s, h, d)])
    torch.manual_seed(1234)
    base = int(draw_seed(torch.device("cpu")))
    spec = make_call(headdim=d, dropout_p=p, softmax_scale=None, causal=causal, window_size=(-1, -1), softcap=0.0,
                     deterministic=False)  # fmt: skip
    keep = torch.ones(b, h, s, s, dtype=torch.bool)
    sl = s // world
    for r in range(world):
        calls = _build_calls(spec, layout, world, r, base, torch.device("cpu"), (s, s), None)
        pq = positions(s, world, r, layout)
        for src in range(world):
            pk = positions(s, world, src, layout)
            for c in calls[src]:
                rows, cols = pq[range(sl)[c.q_sel]], pk[range(sl)[c.k_sel]]
                m = dropout_mask(int(c.call.seed), p, b, h, len(rows), len(cols))
                keep[:, :, rows.view(-1, 1), cols.view(1, -1)] = m
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out, _ = attention_ref(*leaves, causal=causal, dropout_p=p, dropout_mask=keep)
    g_ref = torch.autograd.grad(out, leaves, dout)
    loc = [shard(x, group, layout).requires_grad_() for x in (q, k, v)]
    torch.manual_seed(1234)
    out_l = ring_flash_attn_func(*loc, group=group, layout=layout, dropout_p=p, causal=causal)
    grads = torch.autograd.grad(out_l, loc, shard(dout, group, layout))
    _close(out_l, shard(out, group, layout), "out", FP32_TOL)
    for i, (a, r_) in enumerate(zip(grads, g_ref, strict=True)):
        _close(a, shard(r_, group, layout), f"grad[{i}]", FP32_TOL)


def _errors_case(group):
    q = torch.randn(1, 8, 4, 16)
    with pytest.raises(NotImplementedError, match="alibi_slopes"):
        ring_flash_attn_func(q, q, q, group=group, alibi_slopes=torch.ones(4))
    with pytest.raises(NotImplementedError, match="return_attn_probs"):
        ring_flash_attn_func(q, q, q, group=group, dropout_p=0.1, return_attn_probs=True)
    with pytest.raises(ValueError, match="layout"):
        ring_flash_attn_func(q, q, q, group=group, layout="striped")
    with pytest.raises(ValueError, match="divisible"):
        ring_flash_attn_func(q[:, :3], q[:, :3], q[:, :3], group=group)
    with pytest.raises(ValueError, match="heads"):
        ulysses_flash_attn_func(q[:, :, :3], q[:, :, :3], q[:, :, :3], group=group)
    cu = torch.tensor([0, 8 * dist.get_world_size(group)], dtype=torch.int32)
    with pytest.raises(NotImplementedError, match="window_size"):
        t = torch.randn(8, 4, 16)
        ring_flash_attn_varlen_func(t, t, t, cu, cu, int(cu[-1]), int(cu[-1]), group=group, window_size=(3, 0))


def _hybrid_errors_case(group):
    """The 2-D form's own errors (every rank raises the same, so the group stays in step)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    q = torch.randn(1, 8, 4, 16)
    with pytest.raises(ValueError, match="ulysses_size .3. must divide"):
        hybrid_flash_attn_func(q, q, q, group=group, ulysses_size=3)
    with pytest.raises(ValueError, match="positive"):
        hybrid_flash_attn_func(q, q, q, group=group, ulysses_size=0)
    with pytest.raises(ValueError, match="ulysses_size"):
        shard(torch.randn(1, 8 * world, 4, 16), group, ulysses_size=3)
    t3 = torch.randn(1, 8, 3, 16)
    with pytest.raises(ValueError, match=r"heads of q \(3\) must be divisible by ulysses_size \(2"):
        hybrid_flash_attn_func(t3, t3, t3, group=group, ulysses_size=2)
    with pytest.raises(ValueError, match="2 x ring_size x ulysses_size"):
        hybrid_flash_attn_func(q[:, :3], q[:, :3], q[:, :3], group=group, ulysses_size=2)
    if world > 2:  # a ring of 2 positions: ALiBi needs the whole sequence in one call
        with pytest.raises(NotImplementedError, match="alibi_slopes"):
            hybrid_flash_attn_func(q, q, q, group=group, ulysses_size=world // 2, alibi_slopes=torch.ones(4))
    with pytest.raises(ValueError, match="not a member"):  # what new_group returns on the ranks outside it
        hybrid_flash_attn_func(q, q, q, group=dist.GroupMember.NON_GROUP_MEMBER, ulysses_size=1)
    # ranks that disagree on ulysses_size: caught by the grid's one-time check (a fresh cache,
    # so that no rank skips the check)
    from flashtile.distributed import _common

    _common._GRIDS.clear()
    with pytest.raises(ValueError, match="different ulysses_size"):
        hybrid_flash_attn_func(q, q, q, group=group, ulysses_size=1 if rank == 0 else 2)


def _layout_2d_case(group):
    """shard / unshard with ulysses_size: the inverse of each other, and the same layout as without."""
    world = dist.get_world_size(group)
    x = torch.randn(2, 4 * world, 3)
    for n_u in (1, 2, world):
        for lay in LAYOUTS:
            loc = shard(x, group, lay, ulysses_size=n_u)
            assert torch.equal(loc, shard(x, group, lay))
            assert torch.equal(unshard(loc, group, lay, ulysses_size=n_u), x)


def _shard_case(group, layout):
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    x = torch.arange(2 * 8 * world, dtype=torch.float32).view(2, 8 * world)
    loc = shard(x, group, layout)
    xr = x.clone().requires_grad_()  # differentiable both ways
    full = unshard(shard(xr, group, layout), group, layout)
    full.sum().backward()
    assert torch.equal(full, x)
    assert loc.shape == (2, 8)
    want_pos = positions(8 * world, world, rank, layout)
    assert torch.equal(loc[0], want_pos.float())
    if layout == "zigzag":  # chunks r and 2W-1-r
        assert torch.equal(loc[0, :4], torch.arange(rank * 4, (rank + 1) * 4).float())
        assert torch.equal(loc[0, 4:], torch.arange((2 * world - 1 - rank) * 4, (2 * world - rank) * 4).float())
    assert torch.equal(xr.grad.view(-1).bool(), torch.zeros_like(x).index_fill_(1, want_pos, 1).view(-1).bool())


def _checks():
    """(name, fn(group)) of every check run on each group."""
    out = []

    def add(name, fn, **kw):
        out.append((name, partial(fn, **kw)))

    for lay in LAYOUTS:
        for st in ("ring", "ulysses"):
            dense = partial(add, fn=_dense_case, strategy=st, layout=lay)
            varlen = partial(add, fn=_varlen_case, strategy=st, layout=lay)
            for c in (False, True):
                dense(f"{st}-{lay}-causal{int(c)}", causal=c)
                dense(f"{st}-{lay}-causal{int(c)}-gqa", causal=c, hk=2)
                varlen(f"{st}-{lay}-varlen-causal{int(c)}", lens_q=[16, 0, 8, 24], hk=2, causal=c)
            dense(f"{st}-{lay}-mqa-softcap", causal=True, hk=1, softcap=3.0, softmax_scale=0.3)
            dense(f"{st}-{lay}-window", window_size=(7, 2))
            dense(f"{st}-{lay}-window-causal", causal=True, window_size=(5, -1))
            dense(f"{st}-{lay}-sq<sk-causal", sq=24, sk=48, causal=True, b=1)
            dense(f"{st}-{lay}-sq>sk-causal", sq=48, sk=24, causal=True, b=1)
            dense(f"{st}-{lay}-qkvpacked", causal=True, packed=True)
            varlen(f"{st}-{lay}-varlen-qkvpacked", lens_q=[8, 24], causal=True, packed=True)
            varlen(f"{st}-{lay}-varlen-cross", lens_q=[8, 16], lens_k=[24, 8])
        slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
        add(f"ulysses-{lay}-alibi", _dense_case, strategy="ulysses", layout=lay, causal=True, alibi_slopes=slopes)
        add(f"ulysses-{lay}-varlen-window", _varlen_case, strategy="ulysses", layout=lay, lens_q=[16, 24],
            window_size=(4, 1))  # fmt: skip
        sink = torch.tensor([-1.0, 0.5, 2.0, 0.0])
        add(f"ulysses-{lay}-sink-gqa", _dense_case, strategy="ulysses", layout=lay, causal=True, hk=2,
            learnable_sink=sink)  # fmt: skip
        add(f"ulysses-{lay}-sink-alibi-window-packed", _dense_case, strategy="ulysses", layout=lay, packed=True,
            window_size=(7, 2), alibi_slopes=slopes, learnable_sink=sink)  # fmt: skip
        add(f"ulysses-{lay}-varlen-sink", _varlen_case, strategy="ulysses", layout=lay, lens_q=[16, 0, 8, 24], hk=2,
            causal=True, learnable_sink=sink)  # fmt: skip
        add(f"ulysses-{lay}-varlen-qkvpacked-sink", _varlen_case, strategy="ulysses", layout=lay, lens_q=[8, 24],
            causal=True, packed=True, learnable_sink=sink)  # fmt: skip
        add(f"ring-{lay}-sink-gqa", _dense_case, strategy="ring", layout=lay, causal=True, hk=2,
            learnable_sink=sink * 3)  # fmt: skip
        add(f"ring-{lay}-sink-window-softcap-packed", _dense_case, strategy="ring", layout=lay, packed=True,
            window_size=(7, 2), softcap=3.0, learnable_sink=sink)  # fmt: skip
        add(f"ring-{lay}-sink-sq>sk-causal", _dense_case, strategy="ring", layout=lay, sq=48, sk=24, causal=True, b=1,
            learnable_sink=sink)  # fmt: skip
        add(f"ring-{lay}-varlen-sink", _varlen_case, strategy="ring", layout=lay, lens_q=[16, 0, 8, 24], hk=2,
            causal=True, learnable_sink=sink)  # fmt: skip
        add(f"ring-{lay}-varlen-qkvpacked-sink", _varlen_case, strategy="ring", layout=lay, lens_q=[8, 24],
            causal=True, packed=True, learnable_sink=sink)  # fmt: skip
        add(f"ring-{lay}-vdim-sink-gqa", _dense_case, strategy="ring", layout=lay, causal=True, hk=2, d=24, dv=16,
            learnable_sink=sink)  # fmt: skip
        add(f"ulysses-{lay}-vdim-window", _dense_case, strategy="ulysses", layout=lay, window_size=(7, 2), hk=2, d=24,
            dv=40)  # fmt: skip
        add(f"ring-{lay}-dropout", _ring_dropout_case, layout=lay)
        add(f"shard-{lay}", _shard_case, layout=lay)
    add("ring-zigzag-bf16", _dense_case, strategy="ring", layout="zigzag", causal=True, hk=2, dtype=torch.bfloat16,
        tol=dict(atol=2e-2, rtol=2e-2))  # fmt: skip
    # ring with learnable sinks (folded in after the merge; the gradient summed over the group)
    sink = torch.tensor([-1.0, 0.5, 2.0, 0.0])
    add("ring-zigzag-sink-gqa", _dense_case, strategy="ring", layout="zigzag", causal=True, hk=2, learnable_sink=sink)
    add("ring-contiguous-sink-window", _dense_case, strategy="ring", layout="contiguous", window_size=(7, 2),
        learnable_sink=sink)  # fmt: skip
    add("ring-zigzag-varlen-sink", _varlen_case, strategy="ring", layout="zigzag", lens_q=[16, 0, 8, 24], hk=2,
        causal=True, learnable_sink=sink)  # fmt: skip
    # 2-D: ulysses_size 2 is a 2 x 2 grid on W = 4 (and Ulysses on the pairs); 1 and W are the edge cases
    hy = partial(add, fn=_dense_case, strategy="hybrid", ulysses=2)
    hv = partial(add, fn=_varlen_case, strategy="hybrid", ulysses=2)
    for lay in LAYOUTS:
        for c in (False, True):
            hy(f"hybrid2-{lay}-causal{int(c)}-gqa", layout=lay, causal=c, hk=2)
            hv(f"hybrid2-{lay}-varlen-causal{int(c)}", layout=lay, lens_q=[16, 0, 8, 24], hk=2, causal=c)
    hy("hybrid2-zigzag-mqa-softcap", layout="zigzag", causal=True, hk=1, softcap=3.0, softmax_scale=0.3)
    hy("hybrid2-zigzag-window", layout="zigzag", window_size=(7, 2))
    hy("hybrid2-contiguous-window-causal", layout="contiguous", causal=True, window_size=(5, -1))
    hy("hybrid2-zigzag-sq<sk-causal", layout="zigzag", sq=24, sk=48, causal=True, b=1)
    hy("hybrid2-zigzag-qkvpacked-sink", layout="zigzag", causal=True, packed=True, learnable_sink=sink)
    hv("hybrid2-zigzag-varlen-qkvpacked", layout="zigzag", lens_q=[8, 24], causal=True, packed=True)
    hv("hybrid2-zigzag-varlen-cross-sink", layout="zigzag", lens_q=[8, 16], lens_k=[24, 8], learnable_sink=sink)
    hy("hybrid2-zigzag-bf16", layout="zigzag", causal=True, hk=2, dtype=torch.bfloat16, tol=dict(atol=2e-2, rtol=2e-2))
    add("hybrid1-zigzag-causal-gqa", _dense_case, strategy="hybrid", ulysses=1, layout="zigzag", causal=True, hk=2)
    add("hybridW-zigzag-alibi-window", _dense_case, strategy="hybrid", ulysses="W", layout="zigzag",
        window_size=(5, 1), alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625]))  # fmt: skip
    out.append(("layout-2d", _layout_2d_case))
    out.append(("errors", _errors_case))
    out.append(("hybrid-errors", _hybrid_errors_case))
    return out


def _checks_world8():
    """The 2-D grids of 8 ranks: every factorisation on the whole group (h = 8, hk = 2: with
    ulysses_size 4 and 8 the k/v heads are replicated), 2 x 2 on the even / odd halves."""
    out = []
    sink = torch.linspace(-1.0, 1.5, 8)
    for n_u in (1, 2, 4, 8):
        kw = dict(strategy="hybrid", ulysses=n_u, h=8, d=16)
        dense, varlen = partial(_dense_case, **kw), partial(_varlen_case, **kw)
        out.append((f"U{n_u}-zigzag-causal-gqa", partial(dense, layout="zigzag", causal=True, hk=2, b=1, sq=64)))
        out.append((f"U{n_u}-contiguous-window", partial(dense, layout="contiguous", window_size=(9, 3), hk=4, b=1,
                                                         sq=32)))  # fmt: skip
        out.append((f"U{n_u}-zigzag-varlen-causal-sink", partial(varlen, layout="zigzag", lens_q=[32, 0, 16, 48], hk=2,
                                                                 causal=True, learnable_sink=sink)))  # fmt: skip
    return out


CHECKS = _checks()
CHECKS_W8 = _checks_world8()
WORLD = 4


def _suite(name: str, rank: int):
    """(world size, [(W, group, checks)]) of a spawned suite; called inside the worker, after
    init_process_group (every rank creates every subgroup, in the same order)."""
    if name == "w4":
        pairs = (dist.new_group([0, 2]), dist.new_group([1, 3]))
        return [(4, None, CHECKS), (2, pairs[rank % 2], CHECKS)]
    halves = (dist.new_group([0, 2, 4, 6]), dist.new_group([1, 3, 5, 7]))
    return [(8, None, CHECKS_W8), (4, halves[rank % 2], [c for c in CHECKS_W8 if c[0].startswith("U2-")])]


SUITE_WORLD = {"w4": WORLD, "w8": 8}


def _worker(rank: int, init_file: str, out_dir: str, suite: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=SUITE_WORLD[suite],
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    results = {}
    for w, group, checks in _suite(suite, rank):
        for name, fn in checks:
            try:
                with flashtile.use_backend("torch"):
                    fn(group)
                results[f"W{w}-{name}"] = "ok"
            except Exception:
                results[f"W{w}-{name}"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()


DEADLINE_S = 300


def _run_group(tmp, suite: str) -> None:
    ctx = mp.start_processes(_worker, args=(str(tmp / "store"), str(tmp), suite), nprocs=SUITE_WORLD[suite],
                             join=False, start_method="spawn")  # fmt: skip
    t0 = time.time()
    while not ctx.join(timeout=5):
        if time.time() - t0 > DEADLINE_S:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise RuntimeError(f"the process group did not finish in {DEADLINE_S} s")


def _group_results(tmp_path_factory, suite: str) -> dict:
    """Start the suite's group once. Under pytest-xdist the workers share one run: the first to
    create the lock directory runs it, the others wait for its results."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent
    tmp = base / f"flashtile_dist_group_{suite}"
    try:
        tmp.mkdir()
        owner = True
    except FileExistsError:
        owner = False
    done = tmp / "done"
    if owner:
        try:
            _run_group(tmp, suite)
            status = "ok"
        except Exception as e:
            status = f"{type(e).__name__}: {e}"
        (tmp / "done.tmp").write_text(status)
        os.replace(tmp / "done.tmp", done)  # atomic: waiting workers never read half a file
    else:
        t0 = time.time()
        while not done.exists() and time.time() - t0 < DEADLINE_S + 60:
            time.sleep(1)
    status = done.read_text() if done.exists() else "timed out waiting for another worker's group"
    if status != "ok":
        pytest.fail(f"the process group failed: {status}")
    res = {}
    for r in range(SUITE_WORLD[suite]):
        with open(tmp / f"rank{r}.json") as f:
            res[r] = json.load(f)
    return res


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    return _group_results(tmp_path_factory, "w4")


@pytest.fixture(scope="module")
def group8_results(tmp_path_factory):
    return _group_results(tmp_path_factory, "w8")


def _verdict(results: dict, key: str) -> None:
    failures = {r: res.get(key, "not run") for r, res in results.items() if res.get(key) != "ok"}
    assert not failures, "\n".join(f"rank {r}:\n{msg}" for r, msg in failures.items())


@pytest.mark.parametrize("world", [WORLD, 2])
@pytest.mark.parametrize("name", [n for n, _ in CHECKS])
def test_distributed_parity(group_results, world, name):
    _verdict(group_results, f"W{world}-{name}")


@pytest.mark.parametrize(
    "key", [f"W8-{n}" for n, _ in CHECKS_W8] + [f"W4-{n}" for n, _ in CHECKS_W8 if n.startswith("U2-")]
)
def test_hybrid_world8_parity(group8_results, key):
    _verdict(group8_results, key)
