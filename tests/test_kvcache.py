"""flash_attn_with_kvcache: decoding with a cache equals full attention over the sequence."""

from __future__ import annotations

import os

import pytest
import torch

from flashtile import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from flashtile.merge import merge_states, merge_two
from flashtile.rotary import apply_rotary_at, apply_rotary_emb, rotary_cos_sin
from flashtile.testing import FWD_FACTOR, attention_ref, cu_seqlens, make_alibi, max_err, tolerance

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ATOL = 2e-5 if DEV == "cpu" else 2e-3


def _paged_cache(b, capacity, page, hk, d, dtype, gen):
    nblk = -(-capacity // page)
    num_blocks = b * nblk + 3  # spare blocks, so the table is a random subset
    kc = torch.randn(num_blocks, page, hk, d, dtype=dtype, generator=gen).to(DEV)
    vc = torch.randn_like(kc)
    perm = torch.randperm(num_blocks, generator=gen, device="cpu")[: b * nblk]
    return kc, vc, perm.view(b, nblk).to(torch.int32).to(DEV)


def _cache(b, s, hk, d, dtype, gen, paged, page=16):
    """A random cache of ``s`` positions per row: dense, or paged with a shuffled block table."""
    if paged:
        return _paged_cache(b, s, page, hk, d, dtype, gen)
    kc = torch.randn(b, s, hk, d, generator=gen).to(DEV, dtype)
    return kc, torch.randn_like(kc), None


def _decode(q, k, v, *, paged, prefill, page=5, num_splits=1, rotary=None, **kw):
    """Prefill the first `prefill` tokens, then decode one token at a time; returns (out, lse)."""
    b, s, h, d = q.shape
    hk = k.shape[2]
    gen = torch.Generator(device="cpu").manual_seed(1)
    if paged:
        kc, vc, bt = _paged_cache(b, s + 2, page, hk, d, q.dtype, gen)
    else:
        kc = torch.randn(b, s + 2, hk, d, dtype=q.dtype, generator=gen).to(DEV)
        vc, bt = torch.randn_like(kc), None
    rot = {} if rotary is None else dict(rotary_cos=rotary[0], rotary_sin=rotary[1], rotary_interleaved=rotary[2])
    outs, lses = [], []
    steps = [(0, prefill)] + [(t, t + 1) for t in range(prefill, s)]
    for a, e in steps:
        o, lse = flash_attn_with_kvcache(
            q[:, a:e], kc, vc, k[:, a:e], v[:, a:e], cache_seqlens=torch.full((b,), a, dtype=torch.int32, device=DEV),
            block_table=bt, num_splits=num_splits, return_softmax_lse=True, **rot, **kw,
        )  # fmt: skip
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, 1), torch.cat(lses, 2)


def _qkv(b, s, h, hk, d, dtype=torch.float32, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda n: torch.randn(b, s, n, d, generator=g, dtype=dtype).to(DEV)
    return mk(h), mk(hk), mk(hk)


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize(
    "opts",
    [
        dict(causal=True),
        dict(causal=True, window_size=(6, 0)),
        dict(causal=True, softcap=5.0),
        dict(causal=True, alibi=True),
    ],
    ids=["causal", "window", "softcap", "alibi"],
)
def test_decode_equals_full_attention(paged, num_splits, opts):
    b, s, h, hk, d = 2, 29, 4, 2, 16
    q, k, v = _qkv(b, s, h, hk, d)
    opts = dict(opts)
    if opts.pop("alibi", False):
        opts["alibi_slopes"] = make_alibi("bh", b, h, DEV, low=0.0)
    ref_out, ref_lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **opts)
    out, lse = _decode(q, k, v, paged=paged, prefill=7, num_splits=num_splits, **opts)
    torch.testing.assert_close(out, ref_out, atol=ATOL, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=ATOL, rtol=0)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("paged", [False, True])
def test_decode_with_rotary(interleaved, paged):
    b, s, h, hk, d = 2, 21, 4, 1, 16
    q, k, v = _qkv(b, s, h, hk, d, seed=3)
    cos, sin = rotary_cos_sin(64, 8, device=DEV)  # partial rotary: 8 of 16 channels
    qr = apply_rotary_emb(q, cos, sin, interleaved=interleaved)
    kr = apply_rotary_emb(k, cos, sin, interleaved=interleaved)
    ref = flash_attn_func(qr, kr, v, causal=True)
    out, _ = _decode(q, k, v, paged=paged, prefill=4, rotary=(cos, sin, interleaved), causal=True)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("interleaved", [True, False], ids=["gptj", "neox"])
@pytest.mark.parametrize(
    "opts",
    [dict(), dict(causal=True), dict(window_size=(4, 1)), dict(window_size=(40, -1)), dict(causal=True, num_splits=2)],
    ids=["full", "causal", "window", "window>=capacity", "causal-splits"],
)
def test_rotary_positions_with_leftpad_match_flash_attn(opts, interleaved):
    """flash-attn's rotary positions with cache_leftpad: the new keys at cache_seqlens + t (their index
    in the cache, leftpad included), q at cache_seqlens + t when causal or local, else all at
    cache_seqlens (a window side >= the cache capacity is no window, as flash-attn clamps it); the
    causal/window alignment still uses each row's key count cache_seqlens + seqlen_new - leftpad.
    Reference: the oracle over keys/queries rotated by hand at those positions."""
    b, sq, sn, h, hk, d, cap = 3, 3, 3, 4, 2, 16, 24
    g = torch.Generator(device="cpu").manual_seed(9)
    kc = torch.randn(b, cap, hk, d, generator=g).to(DEV)
    vc = torch.randn_like(kc)
    q = torch.randn(b, sq, h, d, generator=g).to(DEV)
    kn, vn = torch.randn(b, sn, hk, d, generator=g).to(DEV), torch.randn(b, sn, hk, d, generator=g).to(DEV)
    seqlens = torch.tensor([10, 17, 6], dtype=torch.int32, device=DEV)
    leftpad = torch.tensor([3, 0, 5], dtype=torch.int32, device=DEV)
    cos, sin = rotary_cos_sin(cap, 6, device=DEV)  # 12 of 16 channels rotated
    k0, v0 = kc.clone(), vc.clone()
    opts = dict(opts)
    mask_opts = dict(causal=opts.get("causal", False), window_size=opts.get("window_size", (-1, -1)))
    along = mask_opts["causal"] or mask_opts["window_size"] == (4, 1)
    out, lse = flash_attn_with_kvcache(q, kc, vc, kn, vn, rotary_cos=cos, rotary_sin=sin,
                                       rotary_interleaved=interleaved, cache_seqlens=seqlens, cache_leftpad=leftpad,
                                       return_softmax_lse=True, **opts)  # fmt: skip
    for i in range(b):
        n, lp = int(seqlens[i]), int(leftpad[i])
        t = torch.arange(sn, device=DEV).view(1, sn)
        knr = apply_rotary_at(kn[i : i + 1], cos, sin, n + t, interleaved)
        keys = torch.cat([k0[i : i + 1, lp:n], knr], 1)  # the row's keys: cache positions [lp, n + sn)
        vals = torch.cat([v0[i : i + 1, lp:n], vn[i : i + 1]], 1)
        pos_q = n + torch.arange(sq, device=DEV).view(1, sq) if along else torch.full((1, sq), n, device=DEV)
        qr = apply_rotary_at(q[i : i + 1], cos, sin, pos_q, interleaved)
        ref_out, ref_lse = attention_ref(qr, keys, vals, **mask_opts)
        torch.testing.assert_close(out[i : i + 1], ref_out, atol=ATOL, rtol=0)
        torch.testing.assert_close(lse[i : i + 1], ref_lse, atol=ATOL, rtol=0)
        torch.testing.assert_close(kc[i, n : n + sn], knr[0], atol=ATOL, rtol=0)
        torch.testing.assert_close(vc[i, n : n + sn], vn[i], atol=0, rtol=0)


def test_rotary_range_is_checked_at_flash_attn_positions():
    """The rotary range check uses the same positions: with leftpad, the last new key of row 0 sits at
    cache_seqlens + seqlen_new - 1 = 12, past a 12-entry table (it fitted at 10 - 6 + 2 before)."""
    b, h, hk, d, sn = 2, 4, 2, 16, 3
    g = torch.Generator(device="cpu").manual_seed(5)
    kc = torch.randn(b, 16, hk, d, generator=g).to(DEV)
    vc = torch.randn_like(kc)
    q, kn, vn = (torch.randn(b, 1, n, d, generator=g).to(DEV) for n in (h, hk, hk))
    kn, vn = kn.expand(b, sn, hk, d).contiguous(), vn.expand(b, sn, hk, d).contiguous()
    seqlens = torch.tensor([10, 4], dtype=torch.int32, device=DEV)
    leftpad = torch.tensor([6, 0], dtype=torch.int32, device=DEV)
    cos, sin = rotary_cos_sin(12, 8, device=DEV)
    with pytest.raises(ValueError, match="rotary position 12 is out of range"):
        flash_attn_with_kvcache(q, kc, vc, kn, vn, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens,
                                cache_leftpad=leftpad)  # fmt: skip
    with pytest.raises(ValueError, match="rotary position 12 is out of range"):  # causal queries alone: 10 .. 12
        flash_attn_with_kvcache(q.expand(b, 3, h, d).contiguous(), kc, vc, rotary_cos=cos, rotary_sin=sin,
                                cache_seqlens=seqlens, cache_leftpad=leftpad, causal=True)  # fmt: skip
    flash_attn_with_kvcache(q, kc, vc, kn, vn, rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens - 1,
                            cache_leftpad=leftpad)  # fmt: skip


def test_rotary_packed_positions_restart_per_sequence():
    """With cu_seqlens, each packed sequence is rotated as if alone (positions from its offset)."""
    cos, sin = rotary_cos_sin(32, 8, device=DEV)
    x = torch.randn(1, 12, 2, 8, generator=torch.Generator().manual_seed(13)).to(DEV)
    cu = torch.tensor([0, 5, 5, 12], dtype=torch.int32, device=DEV)
    got = apply_rotary_emb(x[0], cos, sin, cu_seqlens=cu, max_seqlen=7, seqlen_offsets=3)
    for a, b in ((0, 5), (5, 12)):
        ref = apply_rotary_emb(x[:, a:b], cos, sin, seqlen_offsets=3)[0]
        torch.testing.assert_close(got[a:b], ref)


def test_rotary_matches_complex_formula():
    q, _, _ = _qkv(1, 9, 2, 2, 8, seed=5)
    cos, sin = rotary_cos_sin(16, 8, device=DEV)
    out = apply_rotary_emb(q, cos, sin, interleaved=True)
    # interleaved pairs (2c, 2c+1) as complex numbers rotated by angle pos * inv_freq_c
    z = torch.view_as_complex(q.float().reshape(1, 9, 2, 4, 2).contiguous())
    ang = torch.complex(cos[:9], sin[:9]).view(1, 9, 1, 4)
    expect = torch.view_as_real(z * ang).reshape(1, 9, 2, 8)
    torch.testing.assert_close(out, expect, atol=1e-5, rtol=0)
    # NeoX style: halves paired, and the inverse rotation undoes it
    neox = apply_rotary_emb(q, cos, sin, interleaved=False)
    back = apply_rotary_emb(neox, cos, -sin, interleaved=False)
    torch.testing.assert_close(back, q, atol=1e-5, rtol=0)


def test_non_causal_query_chunk_and_leftpad_and_batch_idx():
    b, s, h, hk, d = 3, 16, 4, 2, 8
    g = torch.Generator(device="cpu").manual_seed(7)
    kc = torch.randn(5, s + 4, hk, d, generator=g).to(DEV)
    vc = torch.randn_like(kc)
    q = torch.randn(b, 3, h, d, generator=g).to(DEV)
    knew = torch.randn(b, 3, hk, d, generator=g).to(DEV)
    vnew = torch.randn(b, 3, hk, d, generator=g).to(DEV)
    seqlens = torch.tensor([5, 9, 12], dtype=torch.int32, device=DEV)
    leftpad = torch.tensor([0, 4, 2], dtype=torch.int32, device=DEV)
    bidx = torch.tensor([4, 0, 2], dtype=torch.int32, device=DEV)
    kc0, vc0 = kc.clone(), vc.clone()
    out, lse = flash_attn_with_kvcache(q, kc, vc, knew, vnew, cache_seqlens=seqlens, cache_leftpad=leftpad,
                                       cache_batch_idx=bidx, causal=True, return_softmax_lse=True)  # fmt: skip
    for i in range(b):
        r, n, lp = int(bidx[i]), int(seqlens[i]), int(leftpad[i])
        # the new tokens landed in the right cache row, at cache_seqlens
        torch.testing.assert_close(kc[r, n : n + 3], knew[i])
        torch.testing.assert_close(vc[r, n : n + 3], vnew[i])
        keys = torch.cat([kc0[r, lp:n], knew[i]])[None]
        vals = torch.cat([vc0[r, lp:n], vnew[i]])[None]
        ro, rl = attention_ref(q[i : i + 1], keys, vals, causal=True)
        torch.testing.assert_close(out[i : i + 1], ro, atol=ATOL, rtol=0)
        torch.testing.assert_close(lse[i : i + 1], rl, atol=ATOL, rtol=0)
    # rows not named in cache_batch_idx are untouched
    torch.testing.assert_close(kc[1], kc0[1])
    torch.testing.assert_close(kc[3], kc0[3])


def test_no_new_tokens_and_int_cache_seqlens():
    b, h, d = 2, 2, 8
    q, k, v = _qkv(b, 11, h, h, d, seed=9)
    out = flash_attn_with_kvcache(q[:, -1:], k, v, cache_seqlens=11)
    ref = flash_attn_func(q[:, -1:], k, v)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_rotary_positions_traced():
    """Under torch.compile (no host check) in-range positions rotate as eagerly and
    out-of-range ones give NaN, never an out-of-bounds read."""
    cos, sin = rotary_cos_sin(8, 8, device=DEV)
    x = torch.randn(2, 3, 2, 8, generator=torch.Generator().manual_seed(5)).to(DEV)
    pos = torch.tensor([[0, 3, 7], [1, 2, 9]], device=DEV)
    traced = torch.compile(apply_rotary_at, fullgraph=True, backend="eager")
    got = traced(x, cos, sin, pos, False)
    torch.testing.assert_close(got[0], apply_rotary_at(x[:1], cos, sin, pos[:1], False)[0])
    assert torch.isnan(got[1, 2]).all() and not torch.isnan(got[1, :2]).any()
    with pytest.raises(ValueError, match="rotary position 9"):
        apply_rotary_at(x, cos, sin, pos, False)


def test_varlen_prefill_from_paged_cache():
    lens = [7, 0, 12, 1]
    h, hk, d, page = 4, 2, 8, 3
    g = torch.Generator(device="cpu").manual_seed(11)
    cu = cu_seqlens(lens, DEV)
    tot = sum(lens)
    q = torch.randn(tot, h, d, generator=g).to(DEV)
    k = torch.randn(tot, hk, d, generator=g).to(DEV)
    v = torch.randn(tot, hk, d, generator=g).to(DEV)
    kc, vc, bt = _paged_cache(len(lens), max(lens), page, hk, d, torch.float32, g)
    for i, n in enumerate(lens):
        for p in range(n):
            kc[bt[i, p // page], p % page] = k[int(cu[i]) + p]
            vc[bt[i, p // page], p % page] = v[int(cu[i]) + p]
    ref = flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens), causal=True)
    out = flash_attn_varlen_func(q, kc, vc, cu, cu, max(lens), max(lens), causal=True, block_table=bt)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_merge_states_matches_full_softmax():
    q, k, v = _qkv(2, 6, 2, 2, 8, seed=13)
    full_o, full_l, _ = flash_attn_func(q, k, v, return_attn_probs=True)
    parts = [flash_attn_func(q, k[:, a:e], v[:, a:e], return_attn_probs=True) for a, e in ((0, 2), (2, 3), (3, 6))]
    o, lse = merge_states([p[0] for p in parts], [p[1] for p in parts])
    torch.testing.assert_close(o, full_o, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, full_l, atol=1e-5, rtol=0)
    o2, l2 = merge_two(parts[0][0], parts[0][1], *merge_states([p[0] for p in parts[1:]], [p[1] for p in parts[1:]]))
    torch.testing.assert_close(o2, full_o, atol=1e-5, rtol=0)
    # an empty piece (lse = -inf everywhere) changes nothing, and two empty pieces give 0 / -inf
    empty_l = torch.full_like(full_l, float("-inf"))
    o3, l3 = merge_two(full_o, full_l, torch.randn_like(full_o), empty_l)
    torch.testing.assert_close(o3, full_o)
    o4, l4 = merge_two(full_o, empty_l, full_o, empty_l)
    assert torch.all(o4 == 0) and torch.all(torch.isneginf(l4))


class TestBadInput:
    def setup_method(self):
        self.q, self.k, self.v = _qkv(2, 1, 4, 2, 8, seed=17)
        self.kc = torch.randn(2, 10, 2, 8, device=DEV)
        self.vc = torch.randn_like(self.kc)

    def test_capacity(self):
        with pytest.raises(ValueError, match="capacity"):
            flash_attn_with_kvcache(self.q, self.kc, self.vc, self.k, self.v, cache_seqlens=10)

    def test_block_table_out_of_range(self):
        kc = torch.randn(4, 4, 2, 8, device=DEV)
        bt = torch.tensor([[0, 1, 2], [3, 9, 0]], dtype=torch.int32, device=DEV)
        with pytest.raises(ValueError, match="block_table"):
            flash_attn_with_kvcache(self.q, kc, kc.clone(), cache_seqlens=6, block_table=bt)

    def test_block_table_dtype(self):
        kc = torch.randn(4, 4, 2, 8, device=DEV)
        bt = torch.zeros(2, 2, dtype=torch.int64, device=DEV)
        with pytest.raises(ValueError, match="block_table must be an int32"):
            flash_attn_with_kvcache(self.q, kc, kc.clone(), cache_seqlens=3, block_table=bt)

    def test_mismatched_page_shapes(self):
        kc = torch.randn(4, 4, 2, 8, device=DEV)
        vc = torch.randn(4, 5, 2, 8, device=DEV)
        bt = torch.zeros(2, 2, dtype=torch.int32, device=DEV)
        with pytest.raises(ValueError, match="same shape"):
            flash_attn_with_kvcache(self.q, kc, vc, cache_seqlens=3, block_table=bt)

    def test_dtype(self):
        with pytest.raises(TypeError, match="k_cache"):
            flash_attn_with_kvcache(self.q, self.kc.double(), self.vc.double(), cache_seqlens=3)

    def test_cache_seqlens_dtype(self):
        with pytest.raises(ValueError, match="cache_seqlens"):
            flash_attn_with_kvcache(self.q, self.kc, self.vc, cache_seqlens=torch.tensor([1, 2], device=DEV))

    def test_batch_idx_range(self):
        with pytest.raises(ValueError, match="cache_batch_idx"):
            flash_attn_with_kvcache(self.q, self.kc, self.vc, cache_seqlens=3,
                                    cache_batch_idx=torch.tensor([0, 5], dtype=torch.int32, device=DEV))  # fmt: skip

    def test_leftpad_range(self):
        with pytest.raises(ValueError, match="cache_leftpad"):
            flash_attn_with_kvcache(self.q, self.kc, self.vc, cache_seqlens=3,
                                    cache_leftpad=torch.tensor([0, 4], dtype=torch.int32, device=DEV))  # fmt: skip

    def test_capacity_tensor_leaves_bad_row_alone(self):
        kc, vc = self.kc.clone(), self.vc.clone()
        seqlens = torch.tensor([3, 10], dtype=torch.int32, device=DEV)
        with pytest.raises(ValueError, match=r"cache_seqlens\[1\] \+ seqlen_new = 10 \+ 1 exceeds"):
            flash_attn_with_kvcache(self.q, kc, vc, self.k, self.v, cache_seqlens=seqlens)
        assert torch.equal(kc[1], self.kc[1]) and torch.equal(vc[1], self.vc[1])

    @pytest.mark.parametrize("seqlens", [-3, "tensor"])
    def test_negative_cache_seqlens(self, seqlens):
        kc, vc = self.kc.clone(), self.vc.clone()
        if seqlens == "tensor":
            seqlens = torch.tensor([2, -3], dtype=torch.int32, device=DEV)
            match = r"^cache_seqlens\[1\] = -3 must be >= 0"
        else:
            match = r"^cache_seqlens must be >= 0 \(the number of tokens already in the cache\), got -3$"
        for new in ((), (self.k, self.v)):
            with pytest.raises(ValueError, match=match):
                flash_attn_with_kvcache(self.q, kc, vc, *new, cache_seqlens=seqlens)
        assert torch.equal(kc[1], self.kc[1]) and torch.equal(vc[1], self.vc[1])  # the bad row is left alone

    @pytest.mark.parametrize("bad", [1.5, 2.0, True, "3"])
    def test_cache_seqlens_int_must_be_an_int(self, bad):
        with pytest.raises(ValueError, match=r"^cache_seqlens must be an int"):
            flash_attn_with_kvcache(self.q, self.kc, self.vc, cache_seqlens=bad)

    @pytest.mark.parametrize("bad", [-1, -8, 1.5, True])
    def test_num_splits_must_be_a_non_negative_int(self, bad):
        with pytest.raises(ValueError, match=r"^num_splits must be an int >= 0 \(0 = choose, 1 = no split\)"):
            flash_attn_with_kvcache(self.q, self.kc, self.vc, cache_seqlens=3, num_splits=bad)

    @pytest.mark.parametrize("which", ["k_cache", "v_cache"])
    def test_cache_requiring_grad_with_new_tokens(self, which):
        """The new k/v are written into the cache in place: a cache that requires grad is refused by name
        (autograd forbids that write); without new tokens, or under no_grad, it is only read."""
        caches = {"k_cache": self.kc.clone(), "v_cache": self.vc.clone()}
        caches[which].requires_grad_()
        with pytest.raises(ValueError, match=rf"^{which} requires grad, but the new k/v are written into it in place"):
            flash_attn_with_kvcache(self.q, caches["k_cache"], caches["v_cache"], self.k, self.v, cache_seqlens=3)
        flash_attn_with_kvcache(self.q, caches["k_cache"], caches["v_cache"], cache_seqlens=3)
        with torch.no_grad():
            flash_attn_with_kvcache(self.q, caches["k_cache"], caches["v_cache"], self.k, self.v, cache_seqlens=3)
        assert torch.equal(caches[which][:, 3].detach(), (self.k if which == "k_cache" else self.v)[:, 0])

    def test_k_without_v(self):
        with pytest.raises(ValueError, match="together"):
            flash_attn_with_kvcache(self.q, self.kc, self.vc, self.k, None, cache_seqlens=3)

    def test_rotary_out_of_range(self):
        cos, sin = rotary_cos_sin(4, 8, device=DEV)
        with pytest.raises(ValueError, match="rotary"):
            flash_attn_with_kvcache(self.q, self.kc, self.vc, self.k, self.v, rotary_cos=cos, rotary_sin=sin,
                                    cache_seqlens=6)  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("num_splits", [0, 1, 4])
def test_decode_low_precision_gpu(dtype, paged, num_splits):
    """bf16/fp16 decode on the GPU: error vs the fp32 oracle within 2x a same-dtype PyTorch implementation."""
    b, s, h, hk, d = 4, 1000, 32, 8, 128
    g = torch.Generator(device="cpu").manual_seed(21)
    q = torch.randn(b, 1, h, d, generator=g).to(DEV, dtype)
    k = torch.randn(b, s, hk, d, generator=g).to(DEV, dtype)
    v = torch.randn(b, s, hk, d, generator=g).to(DEV, dtype)
    seqlens = torch.tensor([1000, 1, 517, 64], dtype=torch.int32, device=DEV)
    if paged:
        page = 16
        kc, vc, bt = _paged_cache(b, s, page, hk, d, dtype, g)
        for i in range(b):
            n = int(seqlens[i])
            for p0 in range(0, n, page):
                m = min(page, n - p0)
                kc[bt[i, p0 // page], :m] = k[i, p0 : p0 + m]
                vc[bt[i, p0 // page], :m] = v[i, p0 : p0 + m]
    else:
        kc, vc, bt = k.clone(), v.clone(), None
    out = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, block_table=bt, num_splits=num_splits, causal=True)
    for i in range(b):
        n = int(seqlens[i])
        ref, _ = attention_ref(q[i : i + 1], k[i : i + 1, :n], v[i : i + 1, :n], causal=True)
        pt, _ = attention_ref(q[i : i + 1], k[i : i + 1, :n], v[i : i + 1, :n], causal=True, upcast=False)
        err, pt_err = max_err(out[i : i + 1], ref), max_err(pt, ref)
        assert err <= tolerance(pt_err, FWD_FACTOR, 1e-3), (i, err, pt_err)


@pytest.mark.parametrize("page", [32, 256])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_decode_pages_of_whole_key_blocks(page, num_splits):
    """Pages that hold whole key blocks take the Triton kernel's one-block-id-per-tile path."""
    b, s, h, hk, d = 2, 75, 2, 1, 16
    q, k, v = _qkv(b, s, h, hk, d, seed=23)
    for opts in (dict(causal=True), dict(causal=True, window_size=(40, 0))):
        ref = flash_attn_func(q, k, v, **opts)
        out, _ = _decode(q, k, v, paged=True, prefill=70, page=page, num_splits=num_splits, **opts)
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("rotary", [False, True])
def test_cuda_graph_replay(paged, rotary):
    """Captured in a CUDA graph (no host read-back), replays equal eager calls; a bad index
    given at replay time gives NaN rows for that sequence, never an out-of-bounds access."""
    b, s, h, hk, d = 3, 300, 8, 2, 64
    g = torch.Generator(device="cpu").manual_seed(31)
    q = torch.randn(b, 1, h, d, generator=g).to(DEV, torch.float16)
    kn = torch.randn(b, 1, hk, d, generator=g).to(DEV, torch.float16)
    vn = torch.randn_like(kn)
    kc, vc, bt = _cache(b, s, hk, d, torch.float16, g, paged)
    seqlens = torch.tensor([10, 200, 299], dtype=torch.int32, device=DEV)
    kc0, vc0 = kc.clone(), vc.clone()
    rot = {}
    if rotary:
        cos, sin = rotary_cos_sin(s, d // 2, device=DEV)
        rot = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=False)
    call = lambda: flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens, block_table=bt, causal=True,
                                           return_softmax_lse=True, **rot)  # fmt: skip
    ref_out, ref_lse = call()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = call()
    kc.copy_(kc0)
    vc.copy_(vc0)
    graph.replay()
    torch.testing.assert_close(out, ref_out, atol=0, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=0, rtol=0)
    seqlens[1] = s + 5  # beyond the capacity
    if paged:
        bt[2, 3] = 10**6  # a block that does not exist
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isnan(out[1]).all() and not torch.isnan(out[0]).any()
    assert torch.isnan(out[2]).all() == paged


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("paged", [False, True])
def test_split_merge_repeatable_gpu(paged):
    """Many pieces merged by the last program to finish: every repeat equals the unsplit result
    (a missed partial or a counter left non-zero would show as a different answer)."""
    b, s, h, hk, d = 3, 5000, 16, 4, 128
    g = torch.Generator(device="cpu").manual_seed(41)
    q = torch.randn(b, 1, h, d, generator=g).to(DEV, torch.bfloat16)
    kc, vc, bt = _cache(b, s, hk, d, torch.bfloat16, g, paged)
    seqlens = torch.tensor([5000, 77, 2500], dtype=torch.int32, device=DEV)
    ref, ref_lse = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, block_table=bt, num_splits=1,
                                           return_softmax_lse=True)  # fmt: skip
    for splits in (2, 16, 64) * 10:
        out, lse = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, block_table=bt, num_splits=splits,
                                           return_softmax_lse=True)  # fmt: skip
        torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=0)
        torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=0)


_TRITON_DECODE = torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


@pytest.mark.skipif(not _TRITON_DECODE, reason="the Triton decode kernel: a CUDA device or TRITON_INTERPRET=1")
@pytest.mark.parametrize("flat", [False, True], ids=["chunked", "flat"])
@pytest.mark.parametrize("case", ["gqa", "sink", "two_row_blocks", "paged", "window_vdim"])
def test_fused_merge_equals_merge_kernel(monkeypatch, case, flat):
    """Split pieces merged inside the decode kernel (by the last program of each group to finish,
    in chunks of pieces; both forms of ``launch_decode.FLAT_MERGE``) equal the separate merge
    kernel's result and the oracle; repeated calls are bitwise equal and leave every group counter
    at zero."""
    from flashtile.backends.triton import launch, launch_decode

    monkeypatch.setattr(launch_decode, "FLAT_MERGE", flat)

    b, sq, h, hk, d, dv, cap, splits = 2, 1, 8, 2, 16, 16, 96, 7
    opts = dict(causal=True)
    if case == "two_row_blocks":  # 10 queries x 4 heads per KV head: two row blocks per group
        sq = 10
    if case == "window_vdim":
        dv, opts = 8, dict(causal=True, window_size=(40, 0), softcap=3.0)
    if case == "sink":
        opts["learnable_sink"] = torch.tensor([8.0, -3.0, 0.0, 1.0, 8.0, 2.0, -1.0, 0.5], device=DEV)
    g = torch.Generator(device="cpu").manual_seed(43)
    q = torch.randn(b, sq, h, d, generator=g).to(DEV)
    k = torch.randn(b, cap, hk, d, generator=g).to(DEV)
    v = torch.randn(b, cap, hk, dv, generator=g).to(DEV)
    table = None
    kc, vc = k, v
    if case == "paged":  # pages of 16 tokens in a shuffled order
        page, nblk = 16, cap // 16
        perm = torch.randperm(b * nblk, generator=g).to(DEV)
        table = perm.view(b, nblk).to(torch.int32)
        kc = torch.empty(b * nblk, page, hk, d, device=DEV)
        vc = torch.empty(b * nblk, page, hk, dv, device=DEV)
        kc[perm] = k.reshape(b * nblk, page, hk, d)
        vc[perm] = v.reshape(b * nblk, page, hk, dv)
    lens = torch.tensor([cap, 41], dtype=torch.int32, device=DEV)
    orig = launch_decode.merge_layout
    monkeypatch.setattr(launch_decode, "merge_layout", lambda *a: (orig(*a)[0], 2))  # 4 chunks of 2 pieces

    def call():
        return flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, block_table=table, num_splits=splits,
                                       return_softmax_lse=True, **opts)  # fmt: skip

    results = {}
    for fused in (True, False):
        monkeypatch.setattr(launch_decode, "FUSED_MERGE", fused)
        launch.clear_plans()
        launch_decode._SCRATCH.clear()
        results[fused] = [call() for _ in range(3)]
        for out, lse in results[fused][1:]:
            assert torch.equal(out, results[fused][0][0]) and torch.equal(lse, results[fused][0][1])
        cnts = [t for key, t in launch_decode._SCRATCH.items() if "cnt" in key]
        assert len(cnts) == (1 if fused else 0) and all(int(t.abs().sum()) == 0 for t in cnts)
    (out, lse), (out2, lse2) = results[True][0], results[False][0]
    torch.testing.assert_close(out, out2, atol=2e-6, rtol=0)
    torch.testing.assert_close(lse, lse2, atol=2e-6, rtol=0)
    sink = opts.pop("learnable_sink", None)
    for i in range(b):  # the oracle, row by row (its keys: the first lens[i] of the cache)
        n = int(lens[i])
        ref, ref_lse = attention_ref(q[i : i + 1], k[i : i + 1, :n], v[i : i + 1, :n], learnable_sink=sink, **opts)
        torch.testing.assert_close(out[i : i + 1], ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(lse[i : i + 1], ref_lse, atol=ATOL, rtol=0)


@pytest.mark.skipif(not _TRITON_DECODE, reason="the Triton decode kernel: a CUDA device or TRITON_INTERPRET=1")
@pytest.mark.parametrize("b, splits, chunk", [(1, 16, 16), (1, 5, 2), (2, 3, 4), (3, 9, 4), (4, 2, 2)])
def test_flat_merge_equals_chunked_and_merge_kernel(monkeypatch, b, splits, chunk):
    """The flat in-kernel merge (``FLAT_MERGE``: one tile per piece, unrolled, combined
    elementwise) over several batches, piece counts and chunk sizes (the last chunk partly empty,
    rows of different lengths, one of a single key): equal to the chunked in-kernel merge and to
    the separate merge kernel within fp32 rounding, its repeated calls bitwise equal, the counters
    left zero."""
    from flashtile.backends.triton import launch, launch_decode

    h, hk, d, cap = 8, 2, 16, 96
    g = torch.Generator(device="cpu").manual_seed(100 + 7 * b + splits)
    q = torch.randn(b, 1, h, d, generator=g).to(DEV)
    kc = torch.randn(b, cap, hk, d, generator=g).to(DEV)
    vc = torch.randn(b, cap, hk, d, generator=g).to(DEV)
    lens = torch.tensor([cap, 1, 50, 77][:b], dtype=torch.int32, device=DEV)
    orig = launch_decode.merge_layout
    monkeypatch.setattr(launch_decode, "merge_layout", lambda *a: (orig(*a)[0], chunk))

    def call():
        return flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, num_splits=splits, causal=True,
                                       return_softmax_lse=True)  # fmt: skip

    got = {}
    for mode in ("flat", "chunked", "kernel"):
        monkeypatch.setattr(launch_decode, "FUSED_MERGE", mode != "kernel")
        monkeypatch.setattr(launch_decode, "FLAT_MERGE", mode == "flat")
        launch.clear_plans()
        launch_decode._SCRATCH.clear()
        runs = [call() for _ in range(2)]
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1]), mode
        assert all(int(t.abs().sum()) == 0 for key, t in launch_decode._SCRATCH.items() if "cnt" in key), mode
        got[mode] = runs[0]
    for other in ("chunked", "kernel"):
        torch.testing.assert_close(got["flat"][0], got[other][0], atol=2e-6, rtol=0)
        torch.testing.assert_close(got["flat"][1], got[other][1], atol=2e-6, rtol=0)
    for i in range(b):
        n = int(lens[i])
        ref, ref_lse = attention_ref(q[i : i + 1], kc[i : i + 1, :n], vc[i : i + 1, :n], causal=True)
        torch.testing.assert_close(got["flat"][0][i : i + 1], ref, atol=ATOL, rtol=0)
        torch.testing.assert_close(got["flat"][1][i : i + 1], ref_lse, atol=ATOL, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("flat", [False, True], ids=["chunked", "flat"])
def test_split_decode_graph_and_streams_gpu(monkeypatch, flat):
    """A split decode (its pieces merged in the kernel, in either form of ``FLAT_MERGE``) captured
    in CUDA graphs -- the first with the spare counters the eager calls left, the second with
    counters zeroed in the graph -- replays bitwise equal to the eager calls, interleaved with eager
    calls on this and another stream (whose kept counters must stay zero); the fused and separate
    merges agree."""
    from flashtile.backends.triton import launch, launch_decode

    monkeypatch.setattr(launch_decode, "FLAT_MERGE", flat)

    g = torch.Generator(device="cpu").manual_seed(47)
    b, s, h, hk, d = 2, 8192, 32, 8, 128
    q = torch.randn(b, 1, h, d, generator=g).to(DEV, torch.bfloat16)
    kc = torch.randn(b, s, hk, d, generator=g).to(DEV, torch.bfloat16)
    vc = torch.randn(b, s, hk, d, generator=g).to(DEV, torch.bfloat16)
    lens = torch.tensor([8000, 3001], dtype=torch.int32, device=DEV)
    call = lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, num_splits=16,  # noqa: E731
                                           return_softmax_lse=True)  # fmt: skip
    refs = {}
    for fused in (False, True):
        monkeypatch.setattr(launch_decode, "FUSED_MERGE", fused)
        launch.clear_plans()
        launch_decode._SPARE.clear()
        launch_decode._SCRATCH.clear()  # (so that the first fused call makes its counters, and a spare)
        refs[fused] = [call() for _ in range(4)]
        for o, lse in refs[fused][1:]:
            assert torch.equal(o, refs[fused][0][0]) and torch.equal(lse, refs[fused][0][1])
    torch.testing.assert_close(refs[True][0][0].float(), refs[False][0][0].float(), atol=1e-2, rtol=0)
    torch.testing.assert_close(refs[True][0][1], refs[False][0][1], atol=1e-4, rtol=0)
    ref = refs[True][0]
    assert len(launch_decode._SPARE) == 1  # left by the first eager fused call
    side = torch.cuda.Stream()
    for spare in (True, False):
        n_taken = len(launch_decode._CAPTURED)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                call()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out, lse = call()
        assert len(launch_decode._CAPTURED) == n_taken + spare and not launch_decode._SPARE
        for _ in range(3):
            graph.replay()
            e_out, e_lse = call()  # eager, between replays
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                s_out, _ = call()
            torch.cuda.current_stream().wait_stream(side)
            torch.cuda.synchronize()
            assert torch.equal(out, ref[0]) and torch.equal(lse, ref[1])
            assert torch.equal(e_out, ref[0]) and torch.equal(e_lse, ref[1]) and torch.equal(s_out, ref[0])
    for key, t in launch_decode._SCRATCH.items():
        if "cnt" in key:
            assert int(t.abs().sum()) == 0, key
