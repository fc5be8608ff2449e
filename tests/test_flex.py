"""Masks and score modifications as Python functions (flashtile.flex, flashtile.masks): every
library mod against the oracle (a dense mask and a score function), forward and backward incl.
the gradients of captured tensors, odd lengths, GQA, varlen, dropout; block-mask construction
against the dense mask and torch's create_block_mask; flex_attention against torch's own
FlexAttention (eager, CPU forward); dispatch, validation and torch.compile behaviour.

Calls with mods are served by the torch engine (the only backend declaring score_mod /
block_mask), which runs here with tiny tiles so that the block mask's blocks and the engine's
tiles cross many boundaries.
"""

from __future__ import annotations

import types
import warnings

import pytest
import torch

import flashtile
from flashtile import create_block_mask, flash_attn_func, flash_attn_varlen_func, flex_attention, masks
from flashtile.backends import torch_tiled
from flashtile.backends.base import Capabilities
from flashtile.rng import dropout_mask
from flashtile.spec import FEATURES, Problem, make_call
from flashtile.testing import (
    attention_ref,
    compare_with_oracle,
    cu_seqlens,
    mask_from_block_mask,
    mask_from_mod,
    qkv_inputs,
)

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    monkeypatch.setattr(torch_tiled, "_BLOCK_N", 24)
    monkeypatch.setattr(torch_tiled, "_TILE_ELEMS", 1)  # 16 query rows per tile


def _seq_ids(b: int, s: int, gen_seed: int = 0) -> torch.Tensor:
    """(b, s) document ids: random document boundaries per row."""
    g = torch.Generator().manual_seed(gen_seed)
    ids = (torch.rand(b, s, generator=g) < 0.12).cumsum(-1)
    return ids.to(DEV)


# name -> (mask_mod factory(b, s), score_mod factory(h, b) -> (score_mod builder, captured tensor or None))
MASKS = {
    "causal": lambda b, s: masks.causal,
    "sliding_window": lambda b, s: masks.sliding_window(5),
    "document": lambda b, s: masks.document(_seq_ids(b, s)),
    "document_bidir": lambda b, s: masks.document(_seq_ids(b, s, 3), causal=False),
    "prefix_lm": lambda b, s: masks.prefix_lm(7),
    "prefix_lm_per_row": lambda b, s: masks.prefix_lm(torch.tensor([3, 20], device=DEV)[:b]),
    "chunked": lambda b, s: masks.chunked(8),
    "bidirectional_blocks": lambda b, s: masks.bidirectional_blocks(
        torch.where((torch.arange(s, device=DEV) // 6) % 3 == 1, torch.arange(s, device=DEV) // 6, -1)
    ),
}

SCORES = {
    "none": None,
    "alibi": lambda h, b: (lambda t: masks.alibi(t), torch.rand(h, device=DEV) * 0.5 + 0.05),
    "alibi_bh": lambda h, b: (lambda t: masks.alibi(t), torch.rand(b, h, device=DEV) * 0.5 + 0.05),
    "softcap": lambda h, b: (lambda t: masks.softcap(2.5), None),
    "relative_bias": lambda h, b: (lambda t: masks.relative_bias(t), torch.randn(h, 2 * 9 - 1, device=DEV)),
    "relative_bias_shared": lambda h, b: (lambda t: masks.relative_bias(t), torch.randn(2 * 9 - 1, device=DEV)),
}


def _run_case(mask_name, score_name, dtype, b=2, sq=37, sk=37, h=4, hk=2, d=32, block=16, dropout_p=0.0):
    mask_mod = MASKS[mask_name](b, max(sq, sk)) if mask_name else None
    q, k, v = qkv_inputs(b, sq, sk, h, hk, d, dtype, DEV)
    make, captured = (None, None) if SCORES[score_name] is None else SCORES[score_name](h, b)
    inputs = (q, k, v) if captured is None else (q, k, v, captured)
    bm = create_block_mask(mask_mod, b, None, sq, sk, device=DEV, BLOCK_SIZE=block) if mask_mod else None
    dense = mask_from_mod(mask_mod, b, None, sq, sk, DEV) if mask_mod else None
    keep = None
    if dropout_p > 0:
        torch.manual_seed(11)
        seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item())
        keep = dropout_mask(seed, dropout_p, b, h, sq, sk, DEV)

    def fn(q, k, v, *t):
        sm = make(t[0] if t else None) if make else None
        if dropout_p > 0:
            torch.manual_seed(11)
        out, lse, _ = flash_attn_func(q, k, v, score_mod=sm, block_mask=bm, dropout_p=dropout_p, return_attn_probs=True)
        return out, lse

    def oracle(q, k, v, *t, upcast):
        sm = make(t[0] if t else None) if make else None
        return attention_ref(q, k, v, mask=dense, score_mod=sm, upcast=upcast, dropout_p=dropout_p, dropout_mask=keep)

    return compare_with_oracle(fn, oracle, inputs)


@pytest.mark.parametrize("mask_name", list(MASKS))
def test_each_mask_mod_matches_oracle(mask_name):
    _run_case(mask_name, "none", torch.float32)


@pytest.mark.parametrize("score_name", [s for s in SCORES if s != "none"])
def test_each_score_mod_matches_oracle_with_captured_grads(score_name):
    res = _run_case(None, score_name, torch.float32, sq=29, sk=41)
    if len(res["grads"]) == 4:  # the captured tensor got a real gradient
        assert res["grads"][3].abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "mask_name,score_name", [("document", "relative_bias"), ("prefix_lm", "alibi"), ("sliding_window", "softcap")]
)
def test_mods_low_precision(dtype, mask_name, score_name):
    _run_case(mask_name, score_name, dtype, sq=45, sk=45, h=6, hk=2, d=40)


@pytest.mark.parametrize("sq,sk", [(1, 1), (1, 30), (30, 1), (113, 203)])
def test_odd_lengths(sq, sk):
    _run_case("chunked", "relative_bias", torch.float32, b=1, sq=sq, sk=sk, h=3, hk=1, d=24)


@pytest.mark.parametrize("block", [8, 16, (16, 32), 128])
def test_block_sizes(block):
    _run_case("document", "alibi", torch.float32, sq=50, sk=50, block=block)


@pytest.mark.parametrize("p", [0.2, 0.6])
def test_dropout_matches_oracle_with_same_mask(p):
    _run_case("document", "relative_bias", torch.float32, dropout_p=p)
    _run_case("prefix_lm", "softcap", torch.float16, dropout_p=p)


def test_fully_masked_rows_give_zero_and_neg_inf():
    def mm(b, h, qi, ki):
        return (qi >= ki) & (qi % 5 != 3)  # rows 3, 8, ... see nothing

    q, k, v = qkv_inputs(1, 20, 20, 2, 2, 16, torch.float32, DEV)
    bm = create_block_mask(mm, None, None, 20, 20, device=DEV, BLOCK_SIZE=8)
    out, lse = flex_attention(*(x.transpose(1, 2) for x in (q, k, v)), block_mask=bm, return_lse=True)
    assert torch.isneginf(lse[..., 3]).all() and (out[:, :, 3] == 0).all()
    assert torch.isfinite(lse[..., 4]).all()


def test_with_builtin_options_combined():
    """score_mod and block mask on top of causal / window / softcap / ALiBi (order: scale, softcap,
    ALiBi, score_mod, masks)."""
    b, s, h = 2, 40, 4
    q, k, v = qkv_inputs(b, s, s, h, 2, 16, torch.float32, DEV)
    slopes = torch.rand(h, device=DEV) * 0.3
    table = torch.randn(h, 15, device=DEV)
    mm = masks.document(_seq_ids(b, s))
    bm = create_block_mask(mm, b, None, s, s, device=DEV, BLOCK_SIZE=16)
    dense = mask_from_mod(mm, b, None, s, s, DEV)
    opts = dict(causal=True, window_size=(9, 0), softcap=3.0, alibi_slopes=slopes)

    def fn(q, k, v, t):
        out, lse, _ = flash_attn_func(q, k, v, score_mod=masks.relative_bias(t), block_mask=bm,
                                      return_attn_probs=True, **opts)  # fmt: skip
        return out, lse

    def oracle(q, k, v, t, upcast):
        return attention_ref(q, k, v, mask=dense, score_mod=masks.relative_bias(t), upcast=upcast, **opts)

    compare_with_oracle(fn, oracle, (q, k, v, table))


def test_sliding_window_mod_equals_builtin_window():
    q, k, v = qkv_inputs(2, 70, 70, 4, 4, 16, torch.float32, DEV)
    bm = create_block_mask(masks.sliding_window(11), None, None, 70, 70, device=DEV, BLOCK_SIZE=16)
    a = flash_attn_func(q, k, v, block_mask=bm)
    ref = flash_attn_func(q, k, v, causal=True, window_size=(11, 0))
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)
    slopes = torch.rand(4, device=DEV)
    a = flash_attn_func(q, k, v, score_mod=masks.alibi(slopes))
    ref = flash_attn_func(q, k, v, alibi_slopes=slopes)
    torch.testing.assert_close(a, ref, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------
# varlen


def test_varlen_positions_within_sequence():
    lens_q, lens_k = [9, 1, 30, 17], [14, 1, 22, 25]
    n, h, hk, d = len(lens_q), 4, 2, 16
    mq, mk = max(lens_q), max(lens_k)
    cq, ck = cu_seqlens(lens_q, DEV), cu_seqlens(lens_k, DEV)
    q = torch.randn(sum(lens_q), h, d, device=DEV)
    k = torch.randn(sum(lens_k), hk, d, device=DEV)
    v = torch.randn(sum(lens_k), hk, d, device=DEV)
    table = torch.randn(h, 2 * 6 - 1, device=DEV)
    prefix = torch.tensor([2, 0, 5, 30], device=DEV)  # per sequence (b = sequence index)
    mm = masks.prefix_lm(prefix)
    bm = create_block_mask(mm, n, None, mq, mk, device=DEV, BLOCK_SIZE=8)
    dense = mask_from_mod(mm, n, None, mq, mk, DEV)

    def rows_pos(lens):
        r = torch.repeat_interleave(torch.arange(len(lens), device=DEV), torch.tensor(lens, device=DEV))
        c = torch.tensor([0, *lens], device=DEV).cumsum(0)[:-1]
        return r, torch.arange(sum(lens), device=DEV) - c[r]

    (rq, pq), (rk, pk) = rows_pos(lens_q), rows_pos(lens_k)

    def fn(q, k, v, t):
        out, lse, _ = flash_attn_varlen_func(q, k, v, cq, ck, mq, mk, score_mod=masks.relative_bias(t),
                                             block_mask=bm, return_attn_probs=True)  # fmt: skip
        return out, lse

    def oracle(q, k, v, t, upcast):
        def pad(x, r, p, m):
            y = x.new_zeros(n, m, *x.shape[1:])
            y[r, p] = x
            return y

        qp, kp, vp = pad(q, rq, pq, mq), pad(k, rk, pk, mk), pad(v, rk, pk, mk)
        qm = torch.arange(mq, device=DEV) < torch.tensor(lens_q, device=DEV)[:, None]
        km = torch.arange(mk, device=DEV) < torch.tensor(lens_k, device=DEV)[:, None]
        out, lse = attention_ref(qp, kp, vp, query_padding_mask=qm, key_padding_mask=km, mask=dense,
                                 score_mod=masks.relative_bias(t), upcast=upcast)  # fmt: skip
        return out[rq, pq], lse[rq, :, pq].transpose(0, 1)

    compare_with_oracle(fn, oracle, (q, k, v, table))


# ----------------------------------------------------------------------------------------------
# block masks


def _states_from_dense(dense: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    B, H, sq, sk = dense.shape
    nq, nk = -(-sq // bq), -(-sk // bk)
    st = torch.zeros(B, H, nq, nk, dtype=torch.int8)
    for i in range(nq):
        for j in range(nk):
            blk = dense[:, :, i * bq : (i + 1) * bq, j * bk : (j + 1) * bk]
            st[:, :, i, j] = torch.where(blk.all(-1).all(-1), 2, torch.where(blk.any(-1).any(-1), 1, 0))
    return st


@pytest.mark.parametrize("mask_name", list(MASKS))
@pytest.mark.parametrize("bs", [8, (8, 16)])
def test_block_mask_construction_vs_dense(mask_name, bs):
    b, sq, sk = 2, 45, 37
    mm = MASKS[mask_name](b, max(sq, sk))
    bm = create_block_mask(mm, b, None, sq, sk, device="cpu", BLOCK_SIZE=bs)
    dense = mask_from_mod(mm, b, None, sq, sk)
    bq, bk = (bs, bs) if isinstance(bs, int) else bs
    assert torch.equal(bm.block_states(), _states_from_dense(dense, bq, bk))
    assert bm.shape == (b, 1, sq, sk) and bm.BLOCK_SIZE == (bq, bk) and bm.mask_mod is mm
    assert torch.equal(mask_from_block_mask(bm, sq, sk), dense.expand(b, 1, sq, sk))
    # the lists: counts and the first `count` indices name exactly the partial / full blocks
    st = bm.block_states()
    for num, idx, code in ((bm.kv_num_blocks, bm.kv_indices, 1), (bm.full_kv_num_blocks, bm.full_kv_indices, 2)):
        assert torch.equal(num, (st == code).sum(-1, dtype=torch.int32))
        for i in range(st.shape[2]):
            got = sorted(idx[0, 0, i, : num[0, 0, i]].tolist())
            assert got == torch.nonzero(st[0, 0, i] == code).flatten().tolist()
    for t in (bm.kv_indices, bm.full_kv_indices, bm.q_indices, bm.full_q_indices, bm.q_num_blocks):
        assert t.is_contiguous()  # kernels read the lists with unit stride
    qst = st.transpose(-1, -2)
    assert torch.equal(bm.q_num_blocks, (qst == 1).sum(-1, dtype=torch.int32))
    assert torch.equal(bm.to_dense(), (st > 0).to(torch.int32))
    assert 0.0 <= bm.sparsity() <= 100.0


def test_block_mask_broadcast_and_no_full_separation():
    bm = create_block_mask(masks.causal, None, None, 40, 40, device="cpu", BLOCK_SIZE=16)
    assert bm.kv_num_blocks.shape == (1, 1, 3)
    nf = create_block_mask(masks.causal, None, None, 40, 40, device="cpu", BLOCK_SIZE=16, separate_full_blocks=False)
    assert nf.full_kv_num_blocks is None
    assert torch.equal(nf.to_dense(), bm.to_dense())
    assert torch.equal(mask_from_block_mask(nf, 40, 40), mask_from_block_mask(bm, 40, 40))


@pytest.mark.parametrize("s", [320, 300])
def test_block_mask_matches_torch_create_block_mask(s):
    """Equal lists when the lengths are multiples of the block size; otherwise the same visited
    blocks, and flashtile also marks a tail block full when all its in-range positions are
    visible (torch keeps tail blocks partial)."""
    tfa = pytest.importorskip("torch.nn.attention.flex_attention")
    for name in ("causal", "document", "prefix_lm", "chunked"):
        mm = MASKS[name](2, s)
        ours = create_block_mask(mm, 2, None, s, s, device="cpu", BLOCK_SIZE=32)
        theirs = tfa.create_block_mask(mm, 2, None, s, s, device="cpu", BLOCK_SIZE=32)
        assert torch.equal(ours.to_dense(), theirs.to_dense())
        both = (ours.kv_num_blocks + ours.full_kv_num_blocks, theirs.kv_num_blocks + theirs.full_kv_num_blocks)
        assert torch.equal(*both)
        if s % 32 == 0:
            assert torch.equal(ours.kv_num_blocks, theirs.kv_num_blocks)
            assert torch.equal(ours.full_kv_num_blocks, theirs.full_kv_num_blocks)
            assert torch.equal(ours.kv_indices, theirs.kv_indices.to(torch.int32)) or name == "causal"


def test_block_mask_from_kv_blocks_defines_the_mask():
    """FlexAttention's semantics: a full block is visible even where mask_mod says no, a skipped
    block is hidden even where it says yes."""
    kv_num = torch.tensor([[[1, 1]]], dtype=torch.int32)
    kv_idx = torch.tensor([[[[1, 0], [0, 1]]]], dtype=torch.int32)  # row 0: block 1 partial; row 1: block 0
    full_num = torch.tensor([[[1, 0]]], dtype=torch.int32)
    full_idx = torch.tensor([[[[0, 1], [0, 1]]]], dtype=torch.int32)  # row 0: block 0 full
    bm = flashtile.BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=8,
                                            mask_mod=masks.causal)  # fmt: skip
    q, k, v = qkv_inputs(1, 16, 16, 2, 2, 16, torch.float32, "cpu")
    dense = mask_from_block_mask(bm, 16, 16)
    assert dense[0, 0, :8, :8].all() and not dense[0, 0, 8:, 8:].any()  # full ignores causal; skipped
    out = flash_attn_func(q, k, v, block_mask=bm)
    ref, _ = attention_ref(q, k, v, mask=dense)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_skipped_tiles_are_not_computed():
    calls = []

    def sm(score, b, h, qi, ki):
        calls.append((int(qi.min()), int(ki.min())))
        return score

    s = 96
    q, k, v = qkv_inputs(1, s, s, 1, 1, 16, torch.float32, "cpu")
    flash_attn_func(q, k, v, score_mod=sm)
    n_all = len(calls)
    calls.clear()
    bm = create_block_mask(masks.chunked(24), None, None, s, s, device="cpu", BLOCK_SIZE=8)
    flash_attn_func(q, k, v, score_mod=sm, block_mask=bm)
    assert 0 < len(calls) < n_all / 2


# ----------------------------------------------------------------------------------------------
# flex_attention: layout, torch's FlexAttention, GQA


def test_flex_attention_layout_matches_flash_attn_func():
    q, k, v = qkv_inputs(2, 33, 33, 6, 2, 16, torch.float32, DEV)
    bm = create_block_mask(masks.chunked(8), None, None, 33, 33, device=DEV, BLOCK_SIZE=16)
    sm = masks.softcap(4.0)
    ref_out, ref_lse, _ = flash_attn_func(q, k, v, score_mod=sm, block_mask=bm, softmax_scale=0.3,
                                          return_attn_probs=True)  # fmt: skip
    out, lse = flex_attention(*(x.transpose(1, 2) for x in (q, k, v)), score_mod=sm, block_mask=bm, scale=0.3,
                              enable_gqa=True, return_lse=True)  # fmt: skip
    assert out.shape == (2, 6, 33, 16) and lse.shape == (2, 6, 33)
    torch.testing.assert_close(out.transpose(1, 2), ref_out)
    torch.testing.assert_close(lse, ref_lse)
    assert flex_attention(*(x.transpose(1, 2) for x in (q, k, v)), enable_gqa=True).shape == (2, 6, 33, 16)


@pytest.mark.parametrize("use_torch_block_mask", [False, True])
def test_flex_attention_matches_torch_flex_on_cpu(use_torch_block_mask):
    tfa = pytest.importorskip("torch.nn.attention.flex_attention")
    b, h, hk, s, d = 2, 4, 2, 70, 16
    q, k, v = (torch.randn(b, n, s, d) for n in (h, hk, hk))
    table = torch.randn(h, 2 * 10 - 1)
    mm = masks.document(_seq_ids(b, s).cpu())
    sm = masks.relative_bias(table)
    ours_bm = create_block_mask(mm, b, None, s, s, device="cpu", BLOCK_SIZE=32)
    try:
        theirs_bm = tfa.create_block_mask(mm, b, None, s, s, device="cpu", BLOCK_SIZE=32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ref, ref_lse = tfa.flex_attention(q, k, v, score_mod=sm, block_mask=theirs_bm, enable_gqa=True,
                                              return_lse=True)  # fmt: skip
    except Exception as e:  # noqa: BLE001 - torch's CPU path may be unavailable
        pytest.skip(f"torch flex_attention does not run here: {type(e).__name__}: {e}")
    bm = theirs_bm if use_torch_block_mask else ours_bm
    out, lse = flex_attention(q, k, v, score_mod=sm, block_mask=bm, enable_gqa=True, return_lse=True)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


def test_flex_attention_cpu_backward_captured_module_params():
    """Captured tensors found through an nn.Module (bound method) get gradients."""

    class Bias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.nn.Parameter(torch.randn(3, 31))

        def score(self, score, b, h, qi, ki):
            return score + self.table[h, (qi - ki).clamp(-15, 15) + 15]

    mod = Bias()
    q, k, v = (torch.randn(1, 3, 20, 8, requires_grad=True) for _ in range(3))
    out = flex_attention(q, k, v, score_mod=mod.score)
    out.square().sum().backward()
    ref = attention_ref(*(x.detach().transpose(1, 2) for x in (q, k, v)),
                        score_mod=lambda s, b, h, qi, ki: mod.score(s, b, h, qi, ki))[0]  # fmt: skip
    g = torch.autograd.grad(ref.square().sum(), mod.table)[0]
    torch.testing.assert_close(mod.table.grad, g, atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------------------------
# dispatch, schema, validation, compile


def test_kernels_refuse_mod_calls_and_torch_serves_them():
    call = make_call(headdim=16, score_mod=masks.softcap(2.0))
    assert call.features() == {"score_mod"}
    prob = Problem(1, 8, 8, 2, 2, 16, torch.float16, DEV)
    reason = Capabilities(priority=1, dtypes=frozenset({torch.float16}), max_headdim=256,
                          features=FEATURES).refuse(prob, call)  # fmt: skip
    assert reason is not None and "score_mod" in reason
    # on CUDA, flashtile.masks' mods go to the Triton forward (flex_triton), elsewhere to the torch engine
    assert flashtile.dispatch.choose(prob, call) == ("flex_triton" if DEV.type == "cuda" else "torch")
    custom = make_call(headdim=16, score_mod=lambda s, b, h, qi, ki: s)
    assert flashtile.dispatch.choose(prob, custom) == "torch"
    assert "score_mod" not in flashtile.ops._CALL_SCHEMA and "block_mask" not in flashtile.ops._CALL_SCHEMA


def test_validation_errors():
    q, k, v = (torch.randn(1, n, 16, 8) for n in (4, 2, 2))
    with pytest.raises(ValueError, match="enable_gqa"):
        flex_attention(q, k, v)
    with pytest.raises(TypeError, match="score_mod must be callable"):
        flex_attention(q, k, v, score_mod=3, enable_gqa=True)
    with pytest.raises(TypeError, match="block_mask must be a BlockMask"):
        flex_attention(q, k, v, block_mask=torch.ones(3), enable_gqa=True)
    small = create_block_mask(masks.causal, None, None, 8, 16, device="cpu")
    with pytest.raises(ValueError, match="Q_LEN=8"):
        flex_attention(q, k, v, block_mask=small, enable_gqa=True)
    wrong_b = create_block_mask(masks.causal, 3, None, 16, 16, device="cpu")
    with pytest.raises(ValueError, match="batch dim"):
        flex_attention(q, k, v, block_mask=wrong_b, enable_gqa=True)
    with pytest.raises(ValueError, match="BLOCK_SIZE"):
        create_block_mask(masks.causal, None, None, 16, 16, device="cpu", BLOCK_SIZE=0)
    with pytest.raises(ValueError, match="window"):
        masks.sliding_window(-1)


_HIDDEN = types.SimpleNamespace(table=None)


def test_hidden_captured_tensor_is_refused():
    _HIDDEN.table = torch.randn(4, requires_grad=True)

    def sm(score, b, h, qi, ki):
        return score + _HIDDEN.table[h]  # reached through an attribute of a plain object

    q, k, v = (torch.randn(1, 4, 8, 8, requires_grad=True) for _ in range(3))
    with pytest.raises(ValueError, match="cannot find"):
        flex_attention(q, k, v, score_mod=sm)
    with torch.no_grad():  # no gradient wanted: fine
        flex_attention(q, k, v, score_mod=sm)


def test_library_mods_skip_the_probe_and_keep_gradients():
    """check_captured does not probe a mod with a Triton twin (the library's: its tensors are
    known) and still probes others; the library's captured tensors still get gradients."""
    from flashtile import flex as flex_mod

    calls = []

    def user_mod(score, b, h, qi, ki):
        calls.append(1)
        return score

    def twin_mod(score, b, h, qi, ki):
        calls.append(2)
        return score

    twin_mod._flashtile_triton = ("softcap", (0, 0, 1.0))
    flex_mod.check_captured(twin_mod, (), torch.device("cpu"))
    assert calls == []
    flex_mod.check_captured(user_mod, (), torch.device("cpu"))
    assert calls == [1]
    slopes = torch.rand(4, requires_grad=True)
    q, k, v = (torch.randn(1, 4, 8, 8, requires_grad=True) for _ in range(3))
    flex_attention(q, k, v, score_mod=masks.alibi(slopes)).square().sum().backward()
    assert slopes.grad is not None and torch.isfinite(slopes.grad).all() and slopes.grad.abs().sum() > 0


def test_mod_backward_takes_a_strided_dout():
    """A dout that is not contiguous (out's (B, H, S, D) view, transposed) gives the gradients of
    its contiguous copy."""
    q, k, v = (torch.randn(1, 4, 12, 8, requires_grad=True) for _ in range(3))
    sm = masks.softcap(5.0)
    out = flex_attention(q, k, v, score_mod=sm)
    g = torch.randn(1, 12, 4, 8).transpose(1, 2)  # last dim contiguous, the rest strided
    assert not g.is_contiguous()
    got = torch.autograd.grad(out, (q, k, v), g)
    out2 = flex_attention(q, k, v, score_mod=sm)
    want = torch.autograd.grad(out2, (q, k, v), g.contiguous())
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_torch_compile_graph_breaks_around_mod_calls():
    """Mod calls the traced path does not take (here: dropout) run eagerly as a graph break: a
    plain compile matches eager, ``fullgraph=True`` refuses."""
    table = torch.randn(2, 9, requires_grad=True)
    q, k, v = (torch.randn(1, 12, 2, 8) for _ in range(3))

    def f(q, k, v):
        torch.manual_seed(0)
        return flash_attn_func(q * 2, k, v, score_mod=masks.relative_bias(table), dropout_p=0.2).sum()

    eager = f(q, k, v)
    compiled = torch.compile(f, backend="eager")(q, k, v)
    torch.testing.assert_close(compiled, eager)
    compiled.backward()
    assert table.grad is not None and table.grad.abs().max() > 0

    def g(q, k, v):  # a fresh code object: the cache of f's non-fullgraph compile would serve it
        return flash_attn_func(q, k, v, score_mod=masks.relative_bias(table), dropout_p=0.2).sum()

    with pytest.raises(Exception, match="score_mod / block_mask run eagerly"):
        torch.compile(g, backend="eager", fullgraph=True)(q, k, v)


@pytest.mark.parametrize("kind", ["flash_attn_func", "flex_attention"])
def test_torch_compile_fullgraph_traces_dense_mod_calls(kind):
    """Dense mod calls are traced under ``torch.compile(fullgraph=True)``: outputs and gradients
    (q, k, v and the score_mod's captured tensors) match eager, with causal + a bias table through
    flash_attn_func and a document block mask + ALiBi slopes (GQA) through flex_attention."""
    torch.manual_seed(0)
    if kind == "flash_attn_func":
        table = torch.randn(2, 41, requires_grad=True)
        q = torch.randn(2, 21, 2, 8, requires_grad=True)  # 21 queries, 17 keys, causal: 4 rows see no key
        k, v = (torch.randn(2, 17, 2, 8, requires_grad=True) for _ in range(2))
        captured = table

        def f(q, k, v):
            return flash_attn_func(q, k, v, score_mod=masks.relative_bias(table), causal=True, softcap=3.0)
    else:
        ids = torch.cat([torch.zeros(30, dtype=torch.long), torch.ones(40, dtype=torch.long)])
        bm = create_block_mask(masks.document(ids), None, None, 70, 70, device="cpu", BLOCK_SIZE=16)
        slopes = torch.rand(4, requires_grad=True)
        q = torch.randn(2, 4, 70, 16, requires_grad=True)
        k, v = (torch.randn(2, 2, 70, 16, requires_grad=True) for _ in range(2))
        captured = slopes

        def f(q, k, v):
            return flex_attention(q, k, v, score_mod=masks.alibi(slopes), block_mask=bm, enable_gqa=True)

    dout = torch.randn_like(f(q, k, v))
    eager = f(q, k, v)
    ge = torch.autograd.grad(eager, (q, k, v, captured), dout)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)(q, k, v)
    gc = torch.autograd.grad(compiled, (q, k, v, captured), dout)
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    if kind == "flash_attn_func":
        assert torch.all(compiled[:, :4] == 0) and torch.all(gc[0][:, :4] == 0)  # rows that see no key
    for a, b in zip(gc, ge, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert ge[3].abs().max() > 0


def test_draw_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    p = masks.draw(masks.document(_seq_ids(1, 64).cpu()), 64, 64, tmp_path / "doc.png")
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_per_block_mask_cache():
    """flashtile.flex.PerBlockMask: a hit needs the same block mask object and stamp; no block mask
    (None) is kept as such; discard drops an entry; objects without weak references are not kept."""
    from flashtile.flex import PerBlockMask

    bm = create_block_mask(lambda b, h, q, k: q >= k, None, None, 256, 256, device="cpu")
    cache, calls = PerBlockMask(4), []
    assert cache.get(bm, ("a",), bm.kv_num_blocks, lambda: calls.append(1) or "v") == "v"
    assert cache.get(bm, ("a",), bm.kv_num_blocks, lambda: calls.append(1) or "w") == "v" and len(calls) == 1
    assert cache.peek(bm, ("a",), bm.kv_num_blocks.clone()) is None  # replaced lists: derived again
    assert cache.peek(bm, ("b",), bm.kv_num_blocks) is None
    cache.put(None, ("a",), None, "none")
    assert cache.peek(None, ("a",), None) == "none" and cache.peek(bm, ("a",), None) is None
    cache.discard(bm, ("a",))
    assert cache.peek(bm, ("a",), bm.kv_num_blocks) is None and len(cache) == 1
    cache.put((1, 2), ("t",), None, "x")  # a tuple has no weak references: not kept
    assert cache.peek((1, 2), ("t",), None) is None
    for i in range(5):  # cleared when full
        cache.put(None, (i,), None, i)
    assert len(cache) <= 4


# ----------------------------------------------------------------------------------------------
# library masks that are a built-in window run as that option (flex.builtin_window)


def _no_mod_path(monkeypatch):
    """Make the mod path fail loudly: a routed call must not reach it."""
    from flashtile import flex

    def boom(*a, **k):
        raise AssertionError("the mod path was taken")

    monkeypatch.setattr(flex, "BUILTIN_ROUTE", True)
    monkeypatch.setattr(flex, "mod_attention", boom)


@pytest.mark.parametrize("window", [None, 0, 11])
def test_builtin_route_sliding_and_causal(monkeypatch, window):
    """``masks.causal`` / ``masks.sliding_window(w)`` block masks with seqlen_q == seqlen_k: the built-in
    window's result exactly, and the oracle's, forward and backward; the mod path is not taken."""
    _no_mod_path(monkeypatch)
    s, h = 70, 4
    mm = masks.causal if window is None else masks.sliding_window(window)
    bm = create_block_mask(mm, None, None, s, s, device=DEV, BLOCK_SIZE=16)
    dense = mask_from_mod(mm, 2, None, s, s, DEV)
    q, k, v = qkv_inputs(2, s, s, h, 2, 16, torch.float32, DEV)
    left = -1 if window is None else window
    got = flash_attn_func(q, k, v, block_mask=bm)
    ref = flash_attn_func(q, k, v, causal=True, window_size=(left, 0))
    assert torch.equal(got, ref)

    def fn(q, k, v):
        out, lse, _ = flash_attn_func(q, k, v, block_mask=bm, return_attn_probs=True)
        return out, lse

    def oracle(q, k, v, upcast):
        return attention_ref(q, k, v, mask=dense, upcast=upcast)

    compare_with_oracle(fn, oracle, (q, k, v))
    # flex_attention's layout, and a call window intersected with the mask's
    qf, kf, vf = (x.transpose(1, 2) for x in (q, k, v))
    torch.testing.assert_close(flex_attention(qf, kf, vf, block_mask=bm, enable_gqa=True).transpose(1, 2), ref)
    both = flash_attn_func(q, k, v, block_mask=bm, window_size=(5, 3))
    torch.testing.assert_close(both, flash_attn_func(q, k, v, window_size=(5 if left < 0 else min(5, left), 0)))


def test_builtin_route_only_where_it_is_the_same(monkeypatch):
    """Not routed (the mod path runs, and agrees with the oracle): seqlen_q != seqlen_k (the mask is
    top-left aligned, the window bottom-right), with a score_mod, for a block mask not built by
    create_block_mask, and for other library masks."""
    from flashtile import flex

    monkeypatch.setattr(flex, "BUILTIN_ROUTE", True)
    taken = []
    real = flex.mod_attention
    monkeypatch.setattr(flex, "mod_attention", lambda *a, **k: taken.append(1) or real(*a, **k))
    q, k, v = qkv_inputs(1, 40, 56, 2, 2, 16, torch.float32, DEV)
    mm = masks.sliding_window(9)
    bm = create_block_mask(mm, None, None, 40, 56, device=DEV, BLOCK_SIZE=16)
    out = flash_attn_func(q, k, v, block_mask=bm)
    ref = attention_ref(q, k, v, mask=mask_from_mod(mm, 1, None, 40, 56, DEV))[0]
    torch.testing.assert_close(out, ref.to(out.dtype), atol=1e-5, rtol=1e-5)
    assert len(taken) == 1
    q, k, v = qkv_inputs(1, 40, 40, 2, 2, 16, torch.float32, DEV)
    bm = create_block_mask(masks.causal, None, None, 40, 40, device=DEV, BLOCK_SIZE=16)
    flash_attn_func(q, k, v, block_mask=bm, score_mod=masks.softcap(3.0))
    assert len(taken) == 2
    lists = flex.BlockMask.from_kv_blocks(bm.kv_num_blocks, bm.kv_indices, BLOCK_SIZE=16, mask_mod=masks.causal,
                                          seq_lengths=(40, 40))  # fmt: skip
    flash_attn_func(q, k, v, block_mask=lists)
    assert len(taken) == 3
    flash_attn_func(q, k, v, block_mask=create_block_mask(masks.chunked(8), None, None, 40, 40, device=DEV))
    assert len(taken) == 4
    flash_attn_func(q, k, v, block_mask=bm.to(DEV))  # a copy keeps its provenance: routed
    assert len(taken) == 4
    # the window's left extent from the library mask; anything else is not a built-in window
    sw = create_block_mask(masks.sliding_window(9), None, None, 40, 40, device=DEV, BLOCK_SIZE=16)
    assert flex.builtin_window(None, sw, 40, 40, False) == 9
    assert flex.builtin_window(None, bm, 40, 40, False) == -1
    assert flex.builtin_window(masks.softcap(3.0), sw, 40, 40, False) is None
    assert flex.builtin_window(None, sw, 40, 41, False) is None
    assert flex.builtin_window(None, sw, 40, 40, True) is None


def test_flex_attention_builtin_window_takes_the_lean_path(monkeypatch):
    """flex_attention with a library causal / sliding-window block mask runs flash_attn_func's lean
    path: the first call of a signature through _run, later ones from the signature memo (no _run),
    with the block mask still checked on every call and gradients as the first call's."""
    from flashtile import flex, interface

    monkeypatch.setattr(flex, "BUILTIN_ROUTE", True)
    runs = []
    real = interface._run
    monkeypatch.setattr(interface, "_run", lambda *a, **k: runs.append(1) or real(*a, **k))
    q, k, v = (torch.randn(1, 3, 48, 16, device=DEV, requires_grad=True) for _ in range(3))
    bm = create_block_mask(masks.sliding_window(7), None, None, 48, 48, device=DEV, BLOCK_SIZE=16)
    outs = []
    for _ in range(3):
        out, lse = flex_attention(q, k, v, block_mask=bm, return_lse=True)
        outs.append((out, lse, torch.autograd.grad(out.square().sum(), (q, k, v))))
    assert len(runs) == 1
    ref = flash_attn_func(*(x.transpose(1, 2) for x in (q, k, v)), causal=True, window_size=(7, 0))
    torch.testing.assert_close(outs[0][0], ref.transpose(1, 2))
    for out, lse, g in outs[1:]:
        assert torch.equal(out, outs[0][0]) and torch.equal(lse, outs[0][1])
        assert all(torch.equal(a, b) for a, b in zip(g, outs[0][2], strict=True))
    small = create_block_mask(masks.sliding_window(7), None, None, 32, 32, device=DEV, BLOCK_SIZE=16)
    with pytest.raises(ValueError, match="block_mask was built for Q_LEN=32"):
        flex_attention(q, k, v, block_mask=small)
    # a score_mod, dropout or another mask keep the mod path (through _run)
    flex_attention(q, k, v, block_mask=bm, score_mod=masks.softcap(5.0))
    flex_attention(q, k, v, block_mask=create_block_mask(masks.chunked(8), None, None, 48, 48, device=DEV))
    assert len(runs) == 3
