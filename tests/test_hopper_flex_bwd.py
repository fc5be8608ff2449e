"""The flex backward on the Gluon Hopper kernel (``hopper.launch_bwd.flex_backward``, the ws
kernel's block-list mode): the routing of ``flex_triton.launch.backward`` (plain Python), the merged
block-mask lists (``flex_lists``) and the kernel's walk over them emulated in float64 against the
oracle's gradients, and the launch's arguments with the kernel replaced by a recorder. On a Hopper
GPU, the gradients of the real kernel against the oracle (skipped elsewhere)."""

from __future__ import annotations

import pytest
import torch
from conftest import plan_recorders

import flashtile
from flashtile import create_block_mask, masks
from flashtile.backends.flex_triton import launch as FL
from flashtile.backends.hopper import configs
from flashtile.spec import make_call
from flashtile.testing import attention_ref, compare_with_oracle, mask_from_mod, qkv_inputs


def _ids(b, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, s, generator=g) < 0.01).cumsum(-1)


def _blocks(s, span=150):
    pos = torch.arange(s)
    return torch.where((pos // span) % 3 == 1, pos // span, -1)


MASKS = {
    "causal": lambda b, s: masks.causal,
    "sliding_window": lambda b, s: masks.sliding_window(100),
    "document": lambda b, s: masks.document(_ids(b, s)),
    "document_bidir": lambda b, s: masks.document(_ids(1, s, 3)[0], causal=False),
    "prefix_lm": lambda b, s: masks.prefix_lm(170),
    "chunked": lambda b, s: masks.chunked(200),
    "bidirectional_blocks": lambda b, s: masks.bidirectional_blocks(_blocks(s)),
}

_READY = lambda device: None  # noqa: E731  (a Hopper GPU, for the routing tests)


def _call(mm, b, h, sq, sk, d=128, per_head=False, block=128, device="cpu", **kw):
    # (device: create_block_mask's default is CUDA where there is one; these tests' masks index CPU tensors)
    bm = create_block_mask(mm, b, h if per_head else None, sq, sk, BLOCK_SIZE=block, device=device)
    return make_call(headdim=d, block_mask=bm, **kw)


# ----------------------------------------------------------------------------------------------
# routing (flex_triton.launch.gluon_bwd_reason)


def test_routing_serves_mask_mods_and_softcap(monkeypatch):
    monkeypatch.delenv(FL.FLEX_GLUON_ENV, raising=False)
    q, k, _ = qkv_inputs(1, 300, 300, 4, 2, 128, torch.bfloat16, "cpu")
    for name, make in MASKS.items():
        call = _call(make(1, 300), 1, 4, 300, 300)
        assert FL.gluon_bwd_reason(q, k, call, (), _READY) is None, name
    sc = _call(masks.causal, 1, 4, 300, 300, score_mod=masks.softcap(20.0))
    assert FL.gluon_bwd_reason(q, k, sc, (), _READY) is None
    # a block mask without a mask_mod (block-level sparsity only)
    from flashtile.flex import BlockMask

    bm = create_block_mask(masks.causal, 1, None, 300, 300, device="cpu")
    bare = BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, BLOCK_SIZE=128)
    assert bare.mask_mod is None
    assert FL.gluon_bwd_reason(q, k, make_call(headdim=128, block_mask=bare), (), _READY) is None
    for d in (64, 96):
        qd, kd, _ = qkv_inputs(1, 300, 300, 4, 4, d, torch.float16, "cpu")
        assert FL.gluon_bwd_reason(qd, kd, _call(masks.causal, 1, 4, 300, 300, d=d), (), _READY) is None


def test_routing_serves_additive_score_mods_without_captured_gradients(monkeypatch):
    """ALiBi and the bias table (derivative 1 in the score) run on the Gluon backward when no
    captured tensor needs a gradient; with one they stay on the Triton backward."""
    monkeypatch.delenv(FL.FLEX_GLUON_ENV, raising=False)
    assert set(FL._GLUON_ADDITIVE_SCORES) == {"alibi", "relative_bias"}
    assert set(FL._GLUON_ADDITIVE_SCORES) < set(FL._GLUON_SCORE_MODS)
    q, k, _ = qkv_inputs(1, 300, 300, 4, 2, 128, torch.bfloat16, "cpu")
    for sm in (masks.alibi(torch.rand(4)), masks.alibi(torch.rand(1, 4)), masks.relative_bias(torch.randn(4, 31)),
               masks.relative_bias(torch.randn(31))):  # fmt: skip
        call = _call(masks.causal, 1, 4, 300, 300, score_mod=sm)
        assert FL.gluon_bwd_reason(q, k, call, (), _READY) is None
    for sm, t in ((masks.alibi, torch.rand(4, requires_grad=True)),
                  (masks.relative_bias, torch.randn(4, 31, requires_grad=True))):  # fmt: skip
        call = _call(masks.causal, 1, 4, 300, 300, score_mod=sm(t))
        why = FL.gluon_bwd_reason(q, k, call, (t,), _READY)
        assert why is not None and "captured" in why, why


def test_routing_refusals_name_the_reason(monkeypatch):
    monkeypatch.delenv(FL.FLEX_GLUON_ENV, raising=False)
    q, k, _ = qkv_inputs(1, 300, 300, 4, 2, 128, torch.bfloat16, "cpu")
    causal = _call(masks.causal, 1, 4, 300, 300)
    cases = [
        (q, k, make_call(headdim=128, score_mod=masks.softcap(20.0)), (), "no block mask"),
        (q, k, _call(masks.causal, 1, 4, 300, 300, block=64), (), "BLOCK_SIZE"),
        (q, k, _call(lambda b, h, qi, ki: qi >= ki, 1, 4, 300, 300), (), "Triton version"),
        (q, k, _call(masks.causal, 1, 4, 300, 300, score_mod=lambda s, b, h, qi, ki: 2 * s), (), "score_mod"),
        (q, k, causal, (torch.zeros(4),), "captured"),
        (q, k, _call(masks.causal, 1, 4, 300, 300, deterministic=True), (), "deterministic"),
        (q.float(), k.float(), causal, (), "dtype"),
        (q, k, _call(masks.causal, 1, 4, 300, 300, per_head=True), (), "GQA"),
    ]
    for qq, kk, call, cap, needle in cases:
        why = FL.gluon_bwd_reason(qq, kk, call, cap, _READY)
        assert why is not None and needle in why, (needle, why)
    q256, k256, _ = qkv_inputs(1, 300, 300, 4, 4, 256, torch.bfloat16, "cpu")
    assert "head dim" in FL.gluon_bwd_reason(q256, k256, _call(masks.causal, 1, 4, 300, 300, d=256), (), _READY)
    # a per-head block mask without GQA is served
    q4, k4, _ = qkv_inputs(1, 300, 300, 4, 4, 128, torch.bfloat16, "cpu")
    assert FL.gluon_bwd_reason(q4, k4, _call(masks.causal, 1, 4, 300, 300, per_head=True), (), _READY) is None
    # the device check: CPU tensors are never served
    assert FL.gluon_bwd_reason(q, k, causal, ()) is not None
    assert FL.gluon_bwd_reason(q, k, causal, (), lambda dev: "no GPU") == "no GPU"
    # the A/B switch
    monkeypatch.setenv(FL.FLEX_GLUON_ENV, "0")
    assert FL.FLEX_GLUON_ENV in FL.gluon_bwd_reason(q, k, causal, (), _READY)
    monkeypatch.setenv(FL.FLEX_GLUON_ENV, "1")
    assert FL.gluon_bwd_reason(q, k, causal, (), _READY) is None


def test_backward_routes_to_the_gluon_path(monkeypatch):
    """flex_triton.launch.backward hands an accepted call to hopper.launch_bwd.flex_backward."""
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from flashtile.backends.hopper import launch_bwd

    seen = []
    monkeypatch.setattr(FL, "gluon_bwd_reason", lambda q, k, call, captured: None)
    monkeypatch.setattr(launch_bwd, "flex_backward", lambda *a: seen.append(a) or ("dq", "dk", "dv", {}))
    q, k, v = qkv_inputs(1, 130, 130, 2, 2, 64, torch.float16, "cpu")
    call = _call(masks.causal, 1, 2, 130, 130, d=64)
    monkeypatch.setenv(FL.FLEX_GLUON_ENV, "force")  # 130 keys: short rows go to Triton unless forced
    res = FL.backward(q, q, k, v, q, torch.zeros(1, 2, 130), call, ())
    assert res == ("dq", "dk", "dv", {}) and len(seen) == 1 and seen[0][6] is call


def test_row_length_rule():
    """Block masks with short rows stay on the Triton kernels unless forced: fewer than
    MIN_ROW_KEYS keys a query block on average for gathering mask mods and every d64 backward,
    MIN_ROW_KEYS_PLAIN for the others at d >= 96; no block mask (a score mod alone) means full
    rows; the d64 forward is Triton's except for D64_FORWARD_SCORES."""
    from flashtile.backends.hopper import flex as gf

    short = _call(masks.causal, 1, 2, 512, 512).block_mask  # 320 keys a query block on average
    assert not gf.long_rows(short, "auto") and gf.long_rows(short, "force") and gf.long_rows(None, "auto")
    n = 2 * gf.MIN_ROW_KEYS + 256
    bare = _call(masks.causal, 1, 1, n, n).block_mask  # mean (n + 128) / 2 keys a row: just above
    assert gf.long_rows(bare, "auto") and gf.long_rows(bare, "auto", 64, True)
    # a window between the two thresholds: Gluon at d >= 96 (no gather), Triton for the d64 backward
    w = (gf.MIN_ROW_KEYS + gf.MIN_ROW_KEYS_PLAIN) // 2
    win = _call(masks.sliding_window(w), 1, 1, n, n).block_mask
    assert gf.MIN_ROW_KEYS_PLAIN <= FL._row_keys(win) < gf.MIN_ROW_KEYS
    assert gf.long_rows(win, "auto", 128) and gf.long_rows(win, "auto", 128, True)
    assert gf.long_rows(win, "auto", 96, True) and not gf.long_rows(win, "auto", 64, True)
    narrow = _call(masks.sliding_window(gf.MIN_ROW_KEYS_PLAIN // 2), 1, 1, n, n).block_mask
    assert not gf.long_rows(narrow, "auto", 128) and not gf.long_rows(narrow, "auto", 128, True)
    # documents of the same length per row: a gathering mask, so the higher threshold
    ids = torch.arange(n) // w
    doc = _call(masks.document(ids, causal=False), 1, 1, n, n).block_mask
    assert gf.MIN_ROW_KEYS_PLAIN <= FL._row_keys(doc) < gf.MIN_ROW_KEYS
    assert not gf.long_rows(doc, "auto", 128) and not gf.long_rows(doc, "auto", 128, True)
    assert gf.long_rows(doc, "force", 128)
    # the d64 forward: Triton whatever the rows, except the bias-table score mod
    table = torch.randn(2 * n - 1)
    assert not gf.long_rows(bare, "auto", 64) and not gf.long_rows(None, "auto", 64, False, masks.alibi(torch.ones(1)))
    assert gf.long_rows(bare, "auto", 64, False, masks.relative_bias(table)) and gf.long_rows(bare, "force", 64)


# ----------------------------------------------------------------------------------------------
# the merged lists and the kernel's walk, emulated


def _walk_grads(q, k, v, do, out, lse, call, block_m):
    """The Gluon kernel's block-list walk in float64 Python: one program per (batch, KV head,
    128-key block), its steps from flex_lists (full blocks unmasked, the rest through the
    mask_mod on clamped positions, keys past the end hidden), P from the saved lse (rows that see
    no key: lse = -inf, P = 0), dQ summed over the programs as the kernel's reduce-adds."""
    from flashtile.backends.hopper.launch_bwd import flex_lists

    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    group = H // Hk
    bm, scale, cap = call.block_mask, call.softmax_scale, 0.0
    if call.score_mod is not None:
        cap = float(call.score_mod._flashtile_triton[1][2])
    cnt, idx, (sb, sh, w) = flex_lists(bm, q.device)
    cnt, idx = cnt.reshape(-1, 2), idx.reshape(-1, w)
    subs = 128 // block_m
    delta = (do * out).sum(-1)  # (B, Sq, H)
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b in range(B):
        for hk in range(Hk):
            for kb in range(-(-Sk // 128)):
                n0 = kb * 128
                keys = torch.arange(n0, n0 + 128)
                kin = keys < Sk
                kk = torch.where(kin[:, None], k[b, keys.clamp(max=Sk - 1), hk], 0.0)
                vv = torch.where(kin[:, None], v[b, keys.clamp(max=Sk - 1), hk], 0.0)
                row = b * sb + hk * group * sh + kb
                nf, na = int(cnt[row, 0]), int(cnt[row, 1])
                fu_hi = 0 if n0 + 128 > Sk else nf * subs
                for g in range(group):
                    h = hk * group + g
                    for j in range(na * subs):
                        qb = int(idx[row, j // subs]) * subs + j % subs
                        rows = torch.arange(qb * block_m, (qb + 1) * block_m)
                        rin = rows < Sq
                        rc = rows.clamp(max=Sq - 1)
                        qq = torch.where(rin[:, None], q[b, rc, h], 0.0)
                        dd = torch.where(rin[:, None], do[b, rc, h], 0.0)
                        s = scale * (kk @ qq.T)  # S^T: keys x rows
                        if cap > 0:
                            t = torch.tanh(s / cap)
                            s = cap * t
                        if j >= fu_hi:
                            vis = bm.mask_mod(
                                torch.tensor(b), torch.tensor(h), rc[None, :], keys.clamp(max=Sk - 1)[:, None]
                            )
                            vis = torch.as_tensor(vis) & kin[:, None]
                            s = s.masked_fill(~vis, float("-inf"))
                        l2 = torch.where(rin, lse[b, h, rc], float("-inf"))
                        l2 = torch.where(l2 == float("-inf"), float("inf"), l2)
                        p = torch.exp(s - l2[None, :])
                        dv[b, :, hk] += _scatter_keys(p @ dd, keys, Sk)
                        dp = vv @ dd.T
                        ds = p * (dp - torch.where(rin, delta[b, rc, h], 0.0)[None, :])
                        if cap > 0:
                            ds = ds * (1 - t * t)
                        dk[b, :, hk] += _scatter_keys(scale * ds @ qq, keys, Sk)
                        dqt = scale * ds.T @ kk
                        dq[b, rows[rin], h] += dqt[rin]
    return dq, dk, dv


def _scatter_keys(x, keys, sk):
    out = torch.zeros(sk, x.shape[1], dtype=x.dtype)
    inside = keys < sk
    out[keys[inside]] = x[inside]
    return out


def _oracle(q, k, v, do, mm, b, score_mod):
    dense = mask_from_mod(mm, b, None, q.shape[1], k.shape[1])
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = attention_ref(*leaves, mask=dense, score_mod=score_mod)
    grads = torch.autograd.grad(out, leaves, do)
    return out.detach(), lse.detach(), grads


@pytest.mark.parametrize(
    "mask_name, sq, sk, h, hk, d, block_m",
    [
        ("causal", 203, 203, 2, 2, 64, 128),
        ("sliding_window", 300, 300, 2, 1, 128, 64),
        ("document", 389, 389, 2, 2, 128, 64),
        ("document_bidir", 300, 300, 4, 2, 96, 64),
        ("prefix_lm", 113, 203, 2, 2, 128, 64),
        ("prefix_lm", 203, 113, 2, 2, 64, 128),
        ("chunked", 420, 420, 2, 2, 128, 64),
        ("bidirectional_blocks", 500, 500, 3, 1, 64, 128),
    ],
)
def test_walk_matches_the_oracle(mask_name, sq, sk, h, hk, d, block_m):
    """The lists and the walk the kernel's loads, compute and dQ reductions share give the
    oracle's gradients (float64; the oracle's lse is float32), for odd lengths, sq != sk and GQA;
    without GQA the block mask has a head dimension (lists per query head)."""
    torch.manual_seed(0)
    b = 2
    mm = MASKS[mask_name](b, max(sq, sk))
    q, k, v = qkv_inputs(b, sq, sk, h, hk, d, torch.float64, "cpu")
    do = torch.randn_like(q)
    out, lse, (gq, gk, gv) = _oracle(q, k, v, do, mm, b, None)
    call = make_call(headdim=d, block_mask=create_block_mask(mm, b, h if h == hk else None, sq, sk, device="cpu"))
    dq, dk, dv = _walk_grads(q, k, v, do, out, lse, call, block_m)
    for name, a, r in (("dq", dq, gq), ("dk", dk, gk), ("dv", dv, gv)):
        assert torch.allclose(a, r, atol=2e-6, rtol=1e-5), (name, (a - r).abs().max().item())


def test_walk_softcap_and_a_query_row_that_sees_nothing():
    """softcap as the score_mod (the kernel's built-in softcap), and rows that see no key (lse =
    -inf): zero dQ there, no NaN."""
    torch.manual_seed(1)
    b, s, h, d = 1, 260, 2, 64

    def mm(bb, hh, qi, ki):
        return (qi >= ki) & (qi != 5) & (qi != 200)

    q, k, v = qkv_inputs(b, s, s, h, h, d, torch.float64, "cpu")
    do = torch.randn_like(q)
    sc = masks.softcap(3.0)
    out, lse, (gq, gk, gv) = _oracle(q, k, v, do, mm, b, sc)
    assert torch.isinf(lse[0, :, 5]).all() and torch.isinf(lse[0, :, 200]).all()
    call = make_call(headdim=d, block_mask=create_block_mask(mm, b, None, s, s, device="cpu"), score_mod=sc)
    dq, dk, dv = _walk_grads(q, k, v, do, out, lse, call, 128)
    assert torch.isfinite(dq).all() and torch.all(dq[0, 5] == 0) and torch.all(dq[0, 200] == 0)
    for a, r in ((dq, gq), (dk, gk), (dv, gv)):
        assert torch.allclose(a, r, atol=2e-6, rtol=1e-5), (a - r).abs().max().item()


def test_flex_lists_order_and_cache():
    from flashtile.backends.hopper.launch_bwd import flex_lists

    mm = masks.document(_ids(2, 700, 5))
    bm = create_block_mask(mm, 2, None, 700, 700, device="cpu")
    cnt, idx, (sb, sh, w) = flex_lists(bm, torch.device("cpu"))
    nkb = bm.q_num_blocks.shape[-1]
    assert cnt.shape == (2, 1, nkb, 2) and idx.shape[:3] == (2, 1, nkb) and idx.dtype == torch.int32
    assert (sb, sh) == (nkb, 0) and w == idx.shape[-1]
    for bb in range(2):
        for kb in range(nkb):
            nf, na = cnt[bb, 0, kb].tolist()
            full = bm.full_q_indices[bb, 0, kb, : bm.full_q_num_blocks[bb, 0, kb]].tolist()
            part = bm.q_indices[bb, 0, kb, : bm.q_num_blocks[bb, 0, kb]].tolist()
            assert nf == len(full) and na == len(full) + len(part)
            assert idx[bb, 0, kb, :na].tolist() == full + part
    assert flex_lists(bm, torch.device("cpu"))[0] is cnt  # cached per block mask


# ----------------------------------------------------------------------------------------------
# the launch's arguments (kernel replaced by a recorder)


class _Recorder:
    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.calls.append((grid, args, kw))

        return launch


@pytest.fixture
def lb(monkeypatch):
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from flashtile.backends.hopper import launch_bwd

    rec = _Recorder()
    monkeypatch.setattr(launch_bwd, "attn_bwd_ws", rec)
    monkeypatch.setattr(launch_bwd, "attn_bwd", rec)
    monkeypatch.setattr(launch_bwd, "_bwd_preprocess", _Recorder())
    monkeypatch.setattr(launch_bwd, "_descriptor", lambda t, rows, varlen: ("desc", tuple(t.shape), rows, varlen))
    monkeypatch.setattr(launch_bwd, "_convert_dq", lambda acc, dq, scale: dq.zero_())
    return launch_bwd, rec


@pytest.mark.parametrize("d", [64, 96, 128])
def test_flex_backward_arguments(lb, d):
    from flashtile.backends.flex_triton import kernels as K

    launch_bwd, rec = lb
    B, S, H, Hk = 2, 300, 4, 2
    q, k, v = qkv_inputs(B, S, S, H, Hk, d, torch.bfloat16, "cpu")
    mm = masks.document(_ids(B, S))
    call = _call(mm, B, H, S, S, d=d, softmax_scale=0.1)
    dq, dk, dv, extra = launch_bwd.flex_backward(torch.randn_like(q), q, k, v, q, torch.randn(B, H, S), call, ())
    assert extra == {} and dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    cfg = configs.bwd_config(d)
    ((grid, args, kw),) = rec.calls
    assert grid == (-(-S // 128), Hk, B) and not kw["LPT"]
    assert kw["LIST_SUBS"] == 128 // cfg.block_m and kw["MASK_MOD"] is K.document and kw["SWAP"]
    assert not kw["HAS_WL"] and not kw["HAS_WR"] and not kw["HAS_SOFTCAP"] and kw["ATOMIC_DQ"]
    assert kw["MA0"].data_ptr() == mm._flashtile_triton[1][0].data_ptr() and kw["MA1"] == S and kw["MA2"] == 1
    cnt, idx, (sb, sh, w) = launch_bwd.flex_lists(call.block_mask, q.device)
    assert kw["BL_CNT"] is cnt and kw["BL_IDX"] is idx and (kw["bl_sb"], kw["bl_sh"], kw["bl_w"]) == (sb, sh, w)
    # (the ws kernel: dq_desc after do_desc, the dQ accumulator's descriptor with DQ_TMA)
    assert args[4] == ("desc", tuple(args[5].shape), cfg.block_m, False) and args[5].dtype == torch.float32
    assert args[23] == pytest.approx(0.1 * 1.4426950408889634) and args[24] == 0.0 and args[26:28] == (-1, -1)
    # softcap as the score_mod: the kernel's softcap
    sc = _call(masks.causal, B, H, S, S, d=d, softmax_scale=0.1, score_mod=masks.softcap(25.0))
    launch_bwd.flex_backward(torch.randn_like(q), q, k, v, q, torch.randn(B, H, S), sc, ())
    _, args2, kw2 = rec.calls[1]
    assert kw2["HAS_SOFTCAP"] and kw2["MASK_MOD"] is K.causal
    assert args2[23] == pytest.approx(0.1 / 25.0) and args2[24] == pytest.approx(25.0 * 1.4426950408889634)


@pytest.mark.parametrize("d", [64, 128])
def test_flex_backward_passes_additive_score_mods(lb, d):
    """ALiBi / a bias table: SCORE_MOD and SA0..2 as the forward's (the Triton function, the
    captured tensor detached, stride, scalar), the plain scale (natural units inside the kernel:
    no softcap), fold as the config's (the bias adds to the folded score as well)."""
    from flashtile.backends.flex_triton import kernels as K

    launch_bwd, rec = lb
    B, S, H = 1, 300, 4
    q, k, v = qkv_inputs(B, S, S, H, H, d, torch.bfloat16, "cpu")
    slopes, table = torch.rand(H), torch.randn(H, 31)
    cfg = configs.bwd_config(d)
    want = cfg.kernel_consts(d)
    for sm, fn, sa1, sa2 in ((masks.alibi(slopes), K.alibi, 0, 0), (masks.relative_bias(table), K.relative_bias,
                                                                    31, 15)):  # fmt: skip
        call = _call(masks.causal, B, H, S, S, d=d, softmax_scale=0.1, score_mod=sm)
        launch_bwd.flex_backward(torch.randn_like(q), q, k, v, q, torch.randn(B, H, S), call, ())
        _, args, kw = rec.calls[-1]
        assert kw["SCORE_MOD"] is fn and kw["MASK_MOD"] is K.causal and not kw["HAS_SOFTCAP"]
        assert kw["SA0"].data_ptr() == sm._flashtile_triton[1][0].data_ptr() and (kw["SA1"], kw["SA2"]) == (sa1, sa2)
        assert args[23] == pytest.approx(0.1 * 1.4426950408889634) and args[24] == 0.0 and args[25] == 0.1
        assert kw["FOLD"] == want["FOLD"] and kw["STAT_RING"] == want["STAT_RING"]
        if kw["FOLD"]:
            assert kw["stat_mul"] == pytest.approx(-1.0 / (0.1 * 1.4426950408889634))
    # without a score mod: no SCORE_MOD argument at all (the kernel's default, None)
    launch_bwd.flex_backward(torch.randn_like(q), q, k, v, q, torch.randn(B, H, S), _call(masks.causal, B, H, S, S,
                                                                                          d=d), ())  # fmt: skip
    assert "SCORE_MOD" not in rec.calls[-1][2] and "SA0" not in rec.calls[-1][2]


def test_flex_backward_refuses_what_it_cannot_compute(lb):
    launch_bwd, _ = lb
    q, k, v = qkv_inputs(1, 200, 200, 2, 2, 128, torch.bfloat16, "cpu")
    lse = torch.randn(1, 2, 200)
    with pytest.raises(ValueError, match="deterministic"):
        launch_bwd.flex_backward(q, q, k, v, q, lse, _call(masks.causal, 1, 2, 200, 200, deterministic=True), ())
    with pytest.raises(ValueError, match="BLOCK_SIZE"):
        launch_bwd.flex_backward(q, q, k, v, q, lse, _call(masks.causal, 1, 2, 200, 200, block=64), ())

    def other(s, b, h, qi, ki):
        return 2 * s

    other._flashtile_triton = ("no_score", (0, 0, 0))  # a Triton version, not an additive one
    with pytest.raises(ValueError, match="score_mod"):
        launch_bwd.flex_backward(q, q, k, v, q, lse, _call(masks.causal, 1, 2, 200, 200, score_mod=other), ())


# ----------------------------------------------------------------------------------------------
# GPU: the kernel against the oracle (the H200 script benchmarks/gflex_bwd_run.py covers more)


def _gpu_ready() -> bool:
    if not torch.cuda.is_available():
        return False
    q = torch.empty(1, 1, 1, 128, device="cuda", dtype=torch.bfloat16)
    return FL._hopper_ready(q.device) is None


@pytest.mark.gpu
@pytest.mark.skipif(not _gpu_ready(), reason="needs a Hopper GPU with the Gluon backend")
@pytest.mark.parametrize("mask_name, s, h, hk, d", [("document", 1000, 4, 2, 128), ("prefix_lm", 203, 2, 2, 64),
                                                     ("sliding_window", 389, 4, 4, 96)])  # fmt: skip
def test_gpu_flex_backward_matches_the_oracle(mask_name, s, h, hk, d):
    dev = torch.device("cuda")
    mm = MASKS[mask_name](2, s)
    if mask_name == "document":
        mm = masks.document(_ids(2, s).to(dev))
    q, k, v = qkv_inputs(2, s, s, h, hk, d, torch.bfloat16, dev)
    bm = create_block_mask(mm, 2, None, s, s, device=dev)
    call = make_call(headdim=d, block_mask=bm)
    assert FL.gluon_bwd_reason(q, k, call, ()) is None
    dense = mask_from_mod(mm, 2, None, s, s, dev)

    def fn(q, k, v):
        with flashtile.use_backend("flex_triton"):
            out, lse, _ = flashtile.flash_attn_func(q, k, v, block_mask=bm, return_attn_probs=True)
        return out, lse

    def oracle(q, k, v, upcast):
        return attention_ref(q, k, v, mask=dense, upcast=upcast)

    compare_with_oracle(fn, oracle, (q, k, v))


# ----------------------------------------------------------------------------------------------
# backward plans (flex_triton.launch._BWD_PLANS): a repeated call's route and prepared launches


def _flex_recorders(monkeypatch):
    """FL's three backward kernels replaced by recorders (``conftest.plan_recorders``)."""
    log = plan_recorders(monkeypatch, FL, ("_PRE", "_DKDV", "_DQ"))
    monkeypatch.setattr(FL, "_arch", lambda device: "sm90")
    FL._BWD_PLANS.clear()
    return log


def test_backward_plans_repeat_the_first_launch(monkeypatch):
    """The Triton route: a signature's first call records a pending plan, its first reuse prepares
    the three launches, later calls launch them without the route's checks; every call launches
    the same kernels, grids, non-tensor arguments, tensor dtypes and keywords."""
    monkeypatch.setenv(FL.FLEX_GLUON_ENV, "0")
    log = _flex_recorders(monkeypatch)
    reasons = []
    real = FL.gluon_bwd_reason
    monkeypatch.setattr(FL, "gluon_bwd_reason", lambda *a: reasons.append(1) or real(*a))
    q, k, v = qkv_inputs(1, 200, 200, 4, 2, 64, torch.float16, "cpu")
    call = _call(masks.document(_ids(1, 200)), 1, 4, 200, 200, d=64)
    lse = torch.randn(1, 4, 200)
    runs = []
    for _ in range(4):
        n0 = len(log)
        dq, dk, dv, extra = FL.backward(q, q, k, v, q, lse, call, ())
        assert (dq.shape, dk.shape, dv.shape, extra) == (q.shape, k.shape, v.shape, {})
        runs.append(log[n0:])
    strip = [[e[:4] for e in r] for r in runs]
    assert strip[0] == strip[1] == strip[2] == strip[3] and [e[0] for e in runs[0]] == ["_PRE", "_DKDV", "_DQ"]
    assert [e[4] for e in runs[1]] == ["generic"] * 3 and [e[4] for e in runs[3]] == ["prepared"] * 3
    assert len(reasons) == 1  # the first call only: its entry knows the route
    assert len(FL._BWD_PLANS) == 1
    # another block mask object (same mask), another mask_mod, or a captured tensor: not this plan
    other = _call(masks.document(_ids(1, 200)), 1, 4, 200, 200, d=64)
    FL.backward(q, q, k, v, q, lse, other, ())
    assert log[-1][4] == "generic" and len(FL._BWD_PLANS) == 2
    call.block_mask.mask_mod = masks.document(_ids(1, 200, 5))
    FL.backward(q, q, k, v, q, lse, call, ())
    assert log[-1][4] == "generic"


def test_backward_plans_keep_the_gluon_route(monkeypatch):
    """A call routed to the Gluon backward is routed there again without the route's checks."""
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from flashtile.backends.hopper import launch_bwd

    _flex_recorders(monkeypatch)
    reasons, seen = [], []
    monkeypatch.setattr(FL, "gluon_bwd_reason", lambda *a: reasons.append(1))
    monkeypatch.setattr(launch_bwd, "flex_backward", lambda *a: seen.append(a) or ("dq", "dk", "dv", {}))
    monkeypatch.setenv(FL.FLEX_GLUON_ENV, "force")
    q, k, v = qkv_inputs(1, 130, 130, 2, 2, 64, torch.float16, "cpu")
    call = _call(masks.causal, 1, 2, 130, 130, d=64)
    for _ in range(3):
        assert FL.backward(q, q, k, v, q, torch.zeros(1, 2, 130), call, ()) == ("dq", "dk", "dv", {})
    assert len(seen) == 3 and len(reasons) == 1
    monkeypatch.setenv(FL.FLEX_GLUON_ENV, "0")  # the switch is part of the key: routed anew
    FL.backward(q, q, k, v, q, torch.zeros(1, 2, 130), call, ())
    assert len(seen) == 3 and len(reasons) == 2
