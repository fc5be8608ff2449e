"""Parity of every public function with the oracle (``flashtile.testing.attention_ref``):
forward (out, lse) and backward (dq, dk, dv), under flash-attn's tolerance rule.

Runs once per backend of ``FLASHTILE_TEST_BACKENDS`` (see conftest.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import DTYPE_IDS, DTYPES, dense_fn, dense_oracle, is_interpreter, shrink, skip_if_too_big
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from flashtile import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from flashtile.testing import (
    assert_close_to_ref,
    assert_lse_close,
    attention_ref,
    compare_with_oracle,
    cu_seqlens,
    make_alibi,
    qkv_inputs,
)


def _opts(causal=False, window=(-1, -1), softcap=0.0, alibi=None, scale=None) -> dict:
    return dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=alibi, softmax_scale=scale)




def test_tolerance_rule_itself():
    """The checker: NaN never passes, -inf must match, the bound is factor * pt error + atol."""
    ref = torch.tensor([1.0, 2.0, float("-inf")])
    pt = torch.tensor([1.01, 2.0, float("-inf")])
    assert_close_to_ref(torch.tensor([1.015, 2.0, float("-inf")]), ref, pt, 2.0, 0.0)
    bad = [
        torch.tensor([1.03, 2.0, float("-inf")]),  # 0.03 > 2 * 0.01
        torch.tensor([float("nan"), 2.0, float("-inf")]),
        torch.tensor([1.0, 2.0, 0.0]),  # -inf position not matched
        torch.tensor([1.0, float("inf"), float("-inf")]),
    ]
    for x in bad:
        with pytest.raises(AssertionError):
            assert_close_to_ref(x, ref, pt, 2.0, 1e-3)
    with pytest.raises(AssertionError):  # an overflowing baseline does not open the bound
        assert_close_to_ref(torch.tensor([5.0, 2.0, float("-inf")]), ref, torch.tensor([float("inf"), 2.0, 0.0]), 2, 0)
    lse_ref = torch.tensor([[0.5, float("-inf")]])
    with pytest.raises(AssertionError):
        assert_lse_close(torch.tensor([[0.5, 0.0]]), lse_ref, lse_ref, 1e-3)
    with pytest.raises(AssertionError):
        assert_lse_close(torch.tensor([[float("nan"), float("-inf")]]), lse_ref, lse_ref, 1e-3)
    # a float32 lse may sit a few fp32 steps at its own magnitude from the oracle (its base-2 route:
    # testing.LSE_BASE2_REL), not many: at |lse| = 25 (one step 1.9e-6) with an exact baseline
    big = torch.tensor([[25.0]], dtype=torch.float64)
    step = torch.finfo(torch.float32).eps * 16  # one float32 step in [16, 32)
    assert_lse_close(torch.tensor([[25.0 + 8 * step]]), big, big, 5e-6)  # 8 steps: within 5e-6 + 8 eps * 25
    with pytest.raises(AssertionError):
        assert_lse_close(torch.tensor([[25.0 + 16 * step]]), big, big, 5e-6)


# ----------------------------------------------------------------------------------------------
# curated dense cases


@dataclass(frozen=True)
class Case:
    id: str
    sq: int
    sk: int
    b: int = 2
    h: int = 4
    hk: int = 4
    d: int = 32
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: str | None = None  # None, "h" = (nheads,), "bh" = (batch, nheads)
    scale: float | None = None


CASES = [
    Case("plain", 17, 17),
    Case("causal", 33, 33, causal=True),
    Case("causal-sq<sk", 113, 203, b=1, h=2, hk=2, causal=True),
    Case("causal-sq>sk", 203, 113, b=1, h=2, hk=2, causal=True),  # first 90 rows see nothing
    Case("noncausal-sq<sk", 113, 203, b=1, h=2, hk=1),
    Case("noncausal-sq>sk", 203, 113, b=1, h=2, hk=1),
    Case("window-left", 40, 57, window=(7, -1)),
    Case("window-right", 57, 40, window=(-1, 5)),
    Case("window-both", 64, 64, window=(9, 3)),
    Case("window-both-sq>sk", 50, 30, window=(4, 2)),  # some rows see nothing
    Case("window-diag", 31, 31, window=(0, 0)),
    Case("window-causal", 45, 70, causal=True, window=(11, 5)),  # causal overrides right
    Case("softcap", 33, 47, softcap=1.5),
    Case("softcap-large", 33, 33, softcap=30.0, causal=True),
    Case("alibi-h", 29, 43, alibi="h"),
    Case("alibi-bh-causal", 43, 29, alibi="bh", causal=True),
    Case("alibi-softcap-window", 37, 37, alibi="bh", softcap=2.0, window=(6, 6)),
    Case("gqa", 33, 41, h=6, hk=2),
    Case("gqa-causal-alibi", 41, 33, h=6, hk=3, causal=True, alibi="h"),
    Case("mqa", 33, 33, h=4, hk=1, window=(5, -1)),
    Case("mqa-softcap-causal", 20, 47, h=4, hk=1, causal=True, softcap=5.0),
    Case("scale", 25, 25, scale=0.37),
    Case("scale-softcap-alibi", 25, 30, scale=1.7, softcap=3.0, alibi="h"),
    Case("everything", 47, 61, h=6, hk=2, causal=True, window=(13, -1), softcap=4.0, alibi="bh", scale=0.2),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_dense(backend, device, case: Case, dtype):
    skip_if_too_big(backend, headdim=case.d, dtype=dtype)
    sq, sk = shrink(backend, case.sq, case.sk)
    q, k, v = qkv_inputs(case.b, sq, sk, case.h, case.hk, case.d, dtype, device)
    opts = _opts(case.causal, case.window, case.softcap, make_alibi(case.alibi, case.b, case.h, device), case.scale)
    compare_with_oracle(dense_fn(**opts), dense_oracle(**opts), (q, k, v))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d", [1, 40, 64, 72, 128, 256])
def test_headdim(backend, device, d, dtype):
    skip_if_too_big(backend, headdim=d, dtype=dtype)
    q, k, v = qkv_inputs(2, 19, 27, 2, 1, d, dtype, device)
    opts = _opts(causal=True)
    compare_with_oracle(dense_fn(**opts), dense_oracle(**opts), (q, k, v))


SEQLENS = [(1, 1), (1, 17), (17, 1), (17, 17), (113, 203), (203, 113)]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("sq,sk", SEQLENS, ids=[f"{a}x{b}" for a, b in SEQLENS])
def test_seqlens(backend, device, sq, sk, causal):
    sq, sk = shrink(backend, sq, sk)
    q, k, v = qkv_inputs(1, sq, sk, 2, 2, 64, torch.float16, device)
    opts = _opts(causal=causal)
    compare_with_oracle(dense_fn(**opts), dense_oracle(**opts), (q, k, v))


def test_default_softmax_scale(backend, device):
    """softmax_scale=None means 1/sqrt(d), for any d."""
    q, k, v = qkv_inputs(1, 9, 9, 2, 2, 40, torch.float32, device)
    a = flash_attn_func(q, k, v)
    b = flash_attn_func(q, k, v, softmax_scale=40**-0.5)
    c = flash_attn_func(q, k, v, softmax_scale=0.5)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert (a - c).abs().max() > 1e-3


@pytest.mark.parametrize(
    "opts",
    [dict(causal=True), dict(window=(300, 40)), dict(softcap=5.0, alibi="h")],
    ids=["causal", "window", "softcap-alibi"],
)
def test_default_tiles(backend, device, default_tiles, opts):
    """The torch engine's production tiles (the other tests shrink them): 1100 keys span three
    512-key blocks. fp32, the sharpest check of the engine's block logic."""
    opts = dict(opts)
    sq, sk = shrink(backend, 600, 1100)
    q, k, v = qkv_inputs(1, sq, sk, 2, 1, 32, torch.float32, device)
    opts["alibi"] = make_alibi(opts.get("alibi"), 1, 2, device)
    opts = _opts(**opts)
    compare_with_oracle(dense_fn(**opts), dense_oracle(**opts), (q, k, v))


# ----------------------------------------------------------------------------------------------
# rows that see no key


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "sq,sk,opts",
    [
        (20, 6, dict(causal=True)),  # rows 0..13 see nothing
        (20, 6, dict(window_size=(2, 0))),
        (12, 12, dict(window_size=(-1, -1), causal=True)),  # control: no empty row
        (16, 8, dict(causal=True, alibi="h", softcap=3.0)),
    ],
    ids=["causal", "window", "none-empty", "causal-alibi-softcap"],
)
def test_fully_masked_rows(backend, device, dtype, sq, sk, opts):
    opts = dict(opts)
    alibi = make_alibi(opts.pop("alibi", None), 2, 3, device)
    q, k, v = qkv_inputs(2, sq, sk, 3, 3, 16, dtype, device)
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out, lse, _ = flash_attn_func(q, k, v, alibi_slopes=alibi, return_attn_probs=True, **opts)
    right = 0 if opts.get("causal") else opts.get("window_size", (-1, -1))[1]
    empty = torch.arange(sq, device=device) + sk - sq + right < 0  # rows whose window ends before key 0
    assert torch.isneginf(lse[:, :, empty]).all()
    assert torch.isfinite(lse[:, :, ~empty]).all()
    assert (out[:, empty] == 0).all()
    out.backward(torch.randn_like(out))
    for x in (q, k, v):
        assert torch.isfinite(x.grad).all()
    assert (q.grad[:, empty] == 0).all()
    compare_with_oracle(
        dense_fn(alibi_slopes=alibi, **opts), dense_oracle(alibi_slopes=alibi, **opts), (q.detach(), k.detach(), v)
    )


# ----------------------------------------------------------------------------------------------
# packed variants


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_qkvpacked(backend, device, dtype, causal):
    skip_if_too_big(backend, dtype=dtype)
    b, s, h, d = 2, shrink(backend, 37), 4, 32
    qkv = torch.randn(b, s, 3, h, d, dtype=dtype, device=device)
    alibi = make_alibi("h", b, h, device)
    opts = _opts(causal=causal, alibi=alibi, window=(9, -1))

    def fn(qkv):
        out, lse, _ = flash_attn_qkvpacked_func(qkv, return_attn_probs=True, **opts)
        return out, lse

    def oracle(qkv, upcast):
        return attention_ref(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], upcast=upcast, **opts)

    res = compare_with_oracle(fn, oracle, (qkv,))
    (g,) = res["grads"]
    assert g.shape == qkv.shape  # the gradient lands in qkv itself


def test_qkvpacked_plain_call(backend, device):
    """Default call returns just out, equal to flash_attn_func on the unbound tensors."""
    qkv = torch.randn(1, 13, 3, 2, 16, device=device)
    out = flash_attn_qkvpacked_func(qkv, causal=True)
    assert isinstance(out, torch.Tensor)
    torch.testing.assert_close(out, flash_attn_func(*qkv.unbind(2), causal=True), rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_kvpacked(backend, device, dtype, causal):
    b, h, hk, d = 2, 6, 2, 40
    sq, sk = shrink(backend, 29, 53)
    q = torch.randn(b, sq, h, d, dtype=dtype, device=device)
    kv = torch.randn(b, sk, 2, hk, d, dtype=dtype, device=device)
    opts = _opts(causal=causal, softcap=2.5)

    def fn(q, kv):
        out, lse, _ = flash_attn_kvpacked_func(q, kv, return_attn_probs=True, **opts)
        return out, lse

    def oracle(q, kv, upcast):
        return attention_ref(q, kv[:, :, 0], kv[:, :, 1], upcast=upcast, **opts)

    res = compare_with_oracle(fn, oracle, (q, kv))
    assert res["grads"][1].shape == kv.shape


# ----------------------------------------------------------------------------------------------
# varlen


def varlen_oracle(lens_q, lens_k, alibi=None, **opts):
    """Oracle per sequence: each sequence is attention_ref with batch 1; a sequence with no key
    gives out 0 and lse -inf (attention_ref cannot reduce over zero keys)."""
    cq, ck = cu_seqlens(lens_q, "cpu").tolist(), cu_seqlens(lens_k, "cpu").tolist()

    def oracle(q, k, v, upcast):
        outs, lses = [], []
        for n in range(len(lens_q)):
            qs, ks, vs = q[cq[n] : cq[n + 1]], k[ck[n] : ck[n + 1]], v[ck[n] : ck[n + 1]]
            if qs.shape[0] == 0:
                continue
            if ks.shape[0] == 0:
                outs.append(q.new_zeros(qs.shape))
                lses.append(torch.full((q.shape[1], qs.shape[0]), float("-inf"), device=q.device))
                continue
            sl = None
            if alibi is not None:
                sl = alibi if alibi.dim() == 1 else alibi[n : n + 1]
            o, lse = attention_ref(qs[None], ks[None], vs[None], alibi_slopes=sl, upcast=upcast, **opts)
            outs.append(o[0])
            lses.append(lse[0])
        return torch.cat(outs), torch.cat(lses, dim=1)

    return oracle


def varlen_fn(lens_q, lens_k, device, **opts):
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)

    def fn(q, k, v):
        out, lse, _ = flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), return_attn_probs=True, **opts
        )
        return out, lse

    return fn


VARLEN = [
    # (lens_q, lens_k): empty sequences on either side, length 1, sq < sk and sq > sk
    ("mixed", [5, 0, 1, 17, 30, 3], [9, 4, 1, 17, 12, 0]),
    ("same", [7, 1, 0, 23], [7, 1, 0, 23]),
    ("long", [113, 1], [203, 60]),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "opts",
    [
        dict(),
        dict(causal=True),
        dict(causal=True, alibi="bh"),
        dict(window_size=(4, 2), alibi="h", softcap=2.0),
    ],
    ids=["full", "causal", "causal-alibi-bh", "window-alibi-h-softcap"],
)
@pytest.mark.parametrize("name,lens_q,lens_k", VARLEN, ids=[c[0] for c in VARLEN])
def test_varlen(backend, device, dtype, opts, name, lens_q, lens_k):
    lens_q, lens_k = [shrink(backend, n) for n in lens_q], [shrink(backend, n) for n in lens_k]
    h, hk, d = 4, 2, 32
    opts = dict(opts)
    alibi = make_alibi(opts.pop("alibi", None), len(lens_q), h, device)
    q = torch.randn(sum(lens_q), h, d, dtype=dtype, device=device)
    k = torch.randn(sum(lens_k), hk, d, dtype=dtype, device=device)
    v = torch.randn(sum(lens_k), hk, d, dtype=dtype, device=device)
    res = compare_with_oracle(
        varlen_fn(lens_q, lens_k, device, alibi_slopes=alibi, **opts),
        varlen_oracle(lens_q, lens_k, alibi=alibi, **opts),
        (q, k, v),
    )
    assert res["lse"].shape == (h, sum(lens_q))


def test_varlen_max_seqlen_upper_bound(backend, device):
    """max_seqlen may exceed the longest sequence (the docstring allows upper bounds)."""
    lens_q, lens_k = [3, 8], [5, 2]
    q = torch.randn(11, 2, 16, device=device)
    k, v = torch.randn(7, 2, 16, device=device), torch.randn(7, 2, 16, device=device)
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    a = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 8, 5, causal=True)
    b = flash_attn_varlen_func(q, k, v, cu_q, cu_k, 64, 64, causal=True)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_qkvpacked(backend, device, dtype):
    lens = [shrink(backend, n) for n in (11, 1, 0, 40)]
    h, d = 3, 24
    qkv = torch.randn(sum(lens), 3, h, d, dtype=dtype, device=device)
    cu_s = cu_seqlens(lens, device)
    alibi = make_alibi("bh", len(lens), h, device)

    def fn(qkv):
        out, lse, _ = flash_attn_varlen_qkvpacked_func(
            qkv, cu_s, max(lens), causal=True, alibi_slopes=alibi, return_attn_probs=True
        )
        return out, lse

    ref = varlen_oracle(lens, lens, alibi=alibi, causal=True)
    res = compare_with_oracle(fn, lambda qkv, upcast: ref(*qkv.unbind(1), upcast), (qkv,))
    assert res["grads"][0].shape == qkv.shape


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_varlen_kvpacked(backend, device, dtype):
    lens_q = [shrink(backend, n) for n in (7, 1, 30, 0)]
    lens_k = [shrink(backend, n) for n in (12, 1, 9, 5)]
    h, hk, d = 4, 1, 64
    q = torch.randn(sum(lens_q), h, d, dtype=dtype, device=device)
    kv = torch.randn(sum(lens_k), 2, hk, d, dtype=dtype, device=device)
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)

    def fn(q, kv):
        out, lse, _ = flash_attn_varlen_kvpacked_func(
            q, kv, cu_q, cu_k, max(lens_q), max(lens_k), causal=True, window_size=(3, -1), return_attn_probs=True
        )
        return out, lse

    ref = varlen_oracle(lens_q, lens_k, causal=True, window_size=(3, -1))
    res = compare_with_oracle(fn, lambda q, kv, upcast: ref(q, *kv.unbind(1), upcast), (q, kv))
    assert res["grads"][1].shape == kv.shape


def test_varlen_equals_dense_batch(backend, device):
    """Equal-length sequences: varlen on the flattened batch equals the dense call."""
    b, s, h, d = 3, shrink(backend, 21), 2, 32
    q, k, v = qkv_inputs(b, s, s, h, h, d, torch.float32, device)
    cu_s = cu_seqlens([s] * b, device)
    dense = flash_attn_func(q, k, v, causal=True)
    var = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_s, cu_s, s, s, causal=True)
    torch.testing.assert_close(var.view(b, s, h, d), dense, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# random options (hypothesis)


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from(DTYPES))
    b = draw(st.integers(1, 2))
    sq = draw(st.integers(1, 70))
    sk = draw(st.integers(1, 70))
    hk = draw(st.integers(1, 2))
    h = hk * draw(st.integers(1, 3))
    d = draw(st.sampled_from([1, 8, 24, 32, 40, 64, 72, 128]))
    causal = draw(st.booleans())
    left = draw(st.one_of(st.just(-1), st.integers(0, 40)))
    right = draw(st.one_of(st.just(-1), st.integers(0, 40)))
    softcap = draw(st.one_of(st.just(0.0), st.floats(0.5, 50.0)))
    alibi = draw(st.sampled_from([None, "h", "bh"]))
    scale = draw(st.one_of(st.none(), st.floats(0.05, 2.0)))
    return dict(
        dtype=dtype, b=b, sq=sq, sk=sk, h=h, hk=hk, d=d, causal=causal, window=(left, right), softcap=softcap,
        alibi=alibi, scale=scale,
    )  # fmt: skip


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(p=problems())
def test_random_options(backend, device, p):
    if is_interpreter(backend):
        assume(p["dtype"] != torch.bfloat16)  # the interpreter's bf16 dot is wrong
    sq, sk = shrink(backend, p["sq"], p["sk"])
    q, k, v = qkv_inputs(p["b"], sq, sk, p["h"], p["hk"], p["d"], p["dtype"], device)
    opts = _opts(p["causal"], p["window"], p["softcap"], make_alibi(p["alibi"], p["b"], p["h"], device), p["scale"])
    compare_with_oracle(dense_fn(**opts), dense_oracle(**opts), (q, k, v))
