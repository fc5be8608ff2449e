"""The ``flex_triton`` backend (Triton forward, dK/dV and dQ passes with flashtile.masks' mods
compiled in, block-mask skipping, captured-tensor gradients) against the oracle. Runs on a GPU, or on CPU under
``TRITON_INTERPRET=1`` (fp16: the interpreter's bf16 dot is wrong); skipped otherwise."""

from __future__ import annotations

import pytest
import torch

import flashtile
from flashtile import create_block_mask, flash_attn_func, masks
from flashtile.spec import Problem, make_call
from flashtile.testing import attention_ref, compare_with_oracle, mask_from_mod, qkv_inputs

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BE = flashtile.dispatch.backends().get("flex_triton")
pytestmark = pytest.mark.skipif(BE is None or BE.available() is not None, reason="flex_triton is not usable here")
DTYPES = [torch.float16] + ([torch.bfloat16] if DEV.type == "cuda" else [])


def _ids(b, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, s, generator=g) < 0.1).cumsum(-1).to(DEV)


MASKS = {
    "causal": lambda b, s: masks.causal,
    "sliding_window": lambda b, s: masks.sliding_window(40),
    "document": lambda b, s: masks.document(_ids(b, s)),
    "document_bidir_1d": lambda b, s: masks.document(_ids(1, s, 2)[0], causal=False),
    "prefix_lm": lambda b, s: masks.prefix_lm(70),
    "prefix_lm_per_row": lambda b, s: masks.prefix_lm(torch.tensor([5, 90], device=DEV)[:b]),
    "chunked": lambda b, s: masks.chunked(48),
    "bidirectional_blocks": lambda b, s: masks.bidirectional_blocks(
        torch.where((torch.arange(s, device=DEV) // 30) % 3 == 1, torch.arange(s, device=DEV) // 30, -1)
    ),
}
SCORES = {
    "none": (None, None),
    "alibi": (masks.alibi, lambda h, b: torch.rand(h, device=DEV) * 0.3),
    "alibi_bh": (masks.alibi, lambda h, b: torch.rand(b, h, device=DEV) * 0.3),
    "softcap": (lambda t: masks.softcap(2.0), None),
    "relative_bias": (masks.relative_bias, lambda h, b: torch.randn(h, 2 * 33 - 1, device=DEV)),
}


def run(mask_name, score_name, dtype=torch.float16, b=2, s=150, h=4, hk=2, d=40, block=64, per_head=False):
    """One call through flex_triton against the oracle, forward and backward (and the captured
    tensor's gradient). Under the interpreter the kernels take 32-row / 16-key tiles, so a
    64-block mask block is visited in several steps."""
    mm = MASKS[mask_name](b, s) if mask_name else None
    make, cap_fn = SCORES[score_name]
    cap = cap_fn(h, b) if cap_fn else None
    q, k, v = qkv_inputs(b, s, s, h, hk, d, dtype, DEV)
    bm = create_block_mask(mm, b, h if per_head else None, s, s, device=DEV, BLOCK_SIZE=block) if mm else None
    dense = mask_from_mod(mm, b, None, s, s, DEV) if mm else None
    sm = None if make is None else make(cap)
    call = make_call(headdim=d, score_mod=sm, block_mask=bm)
    assert flashtile.dispatch.why_not("flex_triton", Problem.of(q, k, call), call) is None
    inputs = (q, k, v) if cap is None else (q, k, v, cap)

    def fn(q, k, v, *t):
        with flashtile.use_backend("flex_triton"):
            out, lse, _ = flash_attn_func(q, k, v, score_mod=make(t[0] if t else None) if make else None,
                                          block_mask=bm, return_attn_probs=True)  # fmt: skip
        return out, lse

    def oracle(q, k, v, *t, upcast):
        return attention_ref(q, k, v, mask=dense, score_mod=make(t[0] if t else None) if make else None, upcast=upcast)

    compare_with_oracle(fn, oracle, inputs)


@pytest.mark.parametrize("mask_name", list(MASKS))
def test_masks(mask_name):
    run(mask_name, "none")


@pytest.mark.parametrize("score_name", [s for s in SCORES if s != "none"])
def test_scores(score_name):
    run("document", score_name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_score_only_and_block128(dtype):
    run(None, "relative_bias", dtype, s=97, d=64)
    run("chunked", "alibi", dtype, s=200, block=128, d=32)


def test_refusals_name_the_reason():
    q, k, v = qkv_inputs(1, 16, 16, 2, 2, 16, torch.float16, DEV)

    def custom(b, h, qi, ki):
        return qi >= ki

    for call, why in (
        (make_call(headdim=16, score_mod=lambda s, b, h, qi, ki: s), "no Triton version"),
        (make_call(headdim=16, block_mask=create_block_mask(custom, None, None, 16, 16, device=DEV)),
         "no Triton version"),
        (make_call(headdim=16, block_mask=create_block_mask(masks.causal, None, None, 16, 16, device=DEV,
                                                            BLOCK_SIZE=32)), "BLOCK_SIZE"),
        (make_call(headdim=16), "score_mod / block_mask only"),
    ):  # fmt: skip
        reason = flashtile.dispatch.why_not("flex_triton", Problem.of(q, k, call), call)
        assert reason is not None and why in reason, reason


@pytest.mark.parametrize("score_name", ["none", "relative_bias"])
def test_even_lengths_fast_path(score_name):
    """Lengths that are multiples of the block mask's block: the kernels' unchecked path (EVEN),
    with GQA, full and partial blocks, and for the bias table tiles wholly clamped and inside."""
    run("prefix_lm", score_name, s=128, h=4, hk=1, d=64, block=64)


def test_even_block128_document_bias_table():
    """Block 128 at an even length: each block-mask block visited in several kernel steps, the
    document mask's partial blocks and the bias table's clamped and inner tiles."""
    run("document", "relative_bias", b=1, s=256, h=2, hk=1, d=32, block=128)


def test_even_per_head_block_mask_and_no_block_mask():
    """A block mask with per-batch and per-head lists (read per query head in the dK/dV pass's
    GQA loop), and a score mod without a block mask, at lengths multiple of 128."""
    run("sliding_window", "alibi_bh", s=128, h=4, hk=2, d=32, block=64, per_head=True)
    run(None, "softcap", s=128, h=2, hk=2, d=32)


def test_deterministic_backward(monkeypatch):
    """dQ / dK / dV take no atomics: deterministic calls keep the Triton backward (bitwise equal
    to the default); a captured tensor's gradient takes atomics, so deterministic calls with one
    use the torch engine's backward."""
    from flashtile.backends import torch_tiled

    calls = []
    orig = torch_tiled.backend.backward
    monkeypatch.setattr(torch_tiled.backend, "backward", lambda *a: calls.append(1) or orig(*a))
    q, k, v = (x.requires_grad_() for x in qkv_inputs(1, 70, 70, 2, 2, 16, torch.float16, DEV))
    bm = create_block_mask(masks.causal, None, None, 70, 70, device=DEV, BLOCK_SIZE=64)
    table = torch.randn(2, 9, device=DEV, requires_grad=True)
    with flashtile.use_backend("flex_triton"):
        a = torch.autograd.grad(flash_attn_func(q, k, v, block_mask=bm).sum(), q)[0]
        b = torch.autograd.grad(flash_attn_func(q, k, v, block_mask=bm, deterministic=True).sum(), q)[0]
        assert calls == []
        assert torch.equal(a, b)
        out = flash_attn_func(q, k, v, block_mask=bm, score_mod=masks.relative_bias(table))
        ga = torch.autograd.grad(out.sum(), table)[0]
        assert calls == []
        out = flash_attn_func(q, k, v, block_mask=bm, score_mod=masks.relative_bias(table), deterministic=True)
        gb = torch.autograd.grad(out.sum(), table)[0]
        assert calls == [1]
    torch.testing.assert_close(ga, gb, atol=2e-3, rtol=1e-2)


@pytest.mark.parametrize("grid,partial_first", [(1, True), (2, False), (0, True)])
def test_forward_grid_orders_and_partial_first(monkeypatch, grid, partial_first):
    """The forward's switches (launch.FlexFwdConfig: grid order, partial blocks before full ones)
    against the oracle: ragged and even lengths, block 64 and 128, a mask with partial blocks on both
    sides of the full ones, a score mod; the backward is unchanged (its own config)."""
    from flashtile.backends.flex_triton import launch as L

    base = L.fwd_cfg

    def cfg(*a, **kw):
        c = base(*a, **kw)
        return L.FlexFwdConfig(c.block_m, c.block_n, c.num_warps, c.num_stages, grid, partial_first)

    monkeypatch.setattr(L, "fwd_cfg", cfg)
    run("sliding_window", "alibi", s=150, h=4, hk=2, d=40, block=64)
    run("document", "none", b=1, s=256, h=2, hk=1, d=32, block=128)


def test_block_mask_lists_cached_per_block_mask():
    """The int32 lists are converted once per block mask (same tensors on the second call), and a
    block mask with replaced lists is converted again."""
    from flashtile.backends.flex_triton import launch as L

    bm = create_block_mask(masks.causal, None, None, 128, 128, device=DEV, BLOCK_SIZE=64)
    a = L._lists(bm, "kv", DEV)
    assert L._lists(bm, "kv", DEV) is a
    assert L._lists(bm, "q", DEV) is not a
    bm.kv_num_blocks = bm.kv_num_blocks.clone()
    b = L._lists(bm, "kv", DEV)
    assert b is not a and b[0][0] is bm.kv_num_blocks
    assert L._lists(None, "kv", DEV)[2]["HAS_BLOCK_MASK"] is False


def test_short_row_config_and_env(monkeypatch):
    """A short-row entry (launch._SHORT) is taken for block masks whose rows visit few keys, the
    default for the others; FLASHTILE_FLEX_FWD takes 4 to 6 ints (tile, warps, stages, grid,
    partial_first) and FLASHTILE_FLEX_BWD 8."""
    import torch as _t

    from flashtile.backends.flex_triton import launch as L

    short = L.FlexFwdConfig(64, 64, 4, 2, 1, True)
    monkeypatch.setitem(L._SHORT, ("sm90", 128, 128), short)
    assert L.fwd_cfg("sm90", 128, _t.bfloat16, 128, 16384, lambda: 1024.0) == short
    assert L.fwd_cfg("sm90", 128, _t.bfloat16, 128, 16384, lambda: 8192.0) != short
    sl = create_block_mask(masks.sliding_window(100), None, None, 1024, 1024, device=DEV)
    assert L._row_keys(sl) <= 2 * 128 + 1
    assert L._row_keys(create_block_mask(masks.causal, None, None, 1024, 1024, device=DEV)) == 128 * 4.5
    monkeypatch.setenv("FLASHTILE_FLEX_FWD", "128,64,8,3,1,1")
    assert L.fwd_cfg("sm90", 128, _t.bfloat16, 64, 16384) == L.FlexFwdConfig(64, 64, 8, 3, 1, True)
    monkeypatch.setenv("FLASHTILE_FLEX_FWD", "128,64,8")
    with pytest.raises(ValueError, match="FLASHTILE_FLEX_FWD"):
        L.fwd_cfg("sm90", 128, _t.bfloat16, 128, 16384)
    monkeypatch.setenv("FLASHTILE_FLEX_BWD", "64,128,128,64,8,3,8,3")
    assert L.bwd_cfg("sm90", 128, _t.bfloat16, 128, 16384).num_stages1 == 3


def test_grid_order_falls_back_past_the_grid_limit():
    """Grid orders 1 / 2 put batch x heads on the grid's second dimension (at most 65535): beyond
    that the launcher takes order 0 (its grid shape and the kernel's GRID switch together)."""
    from flashtile.backends.flex_triton import launch as L

    c = L.FlexFwdConfig(128, 64, 8, 3, 1, True)
    assert L._grid_order(c, 2, 16) == 1 and L._fwd_grid(c, 2, 16, 1000) == (8, 32)
    assert L._grid_order(c, 4096, 32) == 0 and L._fwd_grid(c, 4096, 32, 1000) == (4096 * 32, 8)
