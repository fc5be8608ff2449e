"""Learnable attention sinks (gpt-oss, flash-attn 4's ``learnable_sink``): one logit per query head
in every row's softmax denominator, without value. Out, lse (which includes the sink) and the
gradients of q, k, v and the sink against the oracle; dropout; split-KV decoding (the sink counted
once); gradcheck in float64; validation; dispatch (the hopper kernel does not declare ``"sink"``).
Every backend-parametrised test runs on the Triton kernels too (``FLASHTILE_TEST_BACKENDS=triton``
with ``TRITON_INTERPRET=1`` on CPU): forward, backward (the sink's gradient), decode and the
split-KV merge kernel.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import shrink
from test_dropout import redraw_seed

import flashtile
from flashtile import dispatch, flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, ops
from flashtile.backends.base import registry
from flashtile.rng import dropout_mask
from flashtile.spec import AttnCall, Problem, make_call
from flashtile.testing import attention_ref, compare_with_oracle, cu_seqlens, make_alibi, qkv_inputs


def _sink(h, kind, device):
    if kind == "rand":
        return torch.randn(h, device=device)
    return torch.full((h,), float(kind), device=device)


DENSE = [
    ("full", 33, 41, dict()),
    ("causal", 33, 41, dict(causal=True)),
    ("causal-sq>sk", 45, 20, dict(causal=True)),  # the first 25 rows see no key
    ("window", 40, 40, dict(window_size=(5, 3))),
    ("window-empty-rows", 50, 30, dict(window_size=(2, 0))),  # rows 0..19 see no key
    ("softcap-alibi", 29, 37, dict(causal=True, softcap=3.0, alibi="bh")),
]


@pytest.mark.parametrize("sink", ["rand", "30", "-30"])
@pytest.mark.parametrize("name,sq,sk,opts", DENSE, ids=[c[0] for c in DENSE])
def test_dense_matches_oracle(backend, device, name, sq, sk, opts, sink):
    opts = dict(opts)
    b, h, hk, d = 2, 6, 2, 32
    sq, sk = shrink(backend, sq, sk)
    alibi = make_alibi(opts.pop("alibi", None), b, h, device)
    q, k, v = qkv_inputs(b, sq, sk, h, hk, d, torch.float32, device)
    s = _sink(h, sink, device)

    def fn(q, k, v, s):
        out, lse, _ = flash_attn_func(q, k, v, alibi_slopes=alibi, return_attn_probs=True, learnable_sink=s, **opts)
        return out, lse

    def oracle(q, k, v, s, upcast):
        return attention_ref(q, k, v, alibi_slopes=alibi, learnable_sink=s, upcast=upcast, **opts)

    res = compare_with_oracle(fn, oracle, (q, k, v, s))
    assert res["grads"][3].dtype == torch.float32 and res["grads"][3].shape == (h,)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision(backend, device, dtype):
    b, h, hk, d = 2, 4, 1, 64
    sq, sk = shrink(backend, 37, 29)
    q, k, v = qkv_inputs(b, sq, sk, h, hk, d, dtype, device)
    s = torch.randn(h, device=device)

    def fn(q, k, v, s):
        out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True, learnable_sink=s)
        return out, lse

    def oracle(q, k, v, s, upcast):
        return attention_ref(q, k, v, causal=True, learnable_sink=s, upcast=upcast)

    compare_with_oracle(fn, oracle, (q, k, v, s))


def test_fully_masked_rows_output_zero_and_lse_is_the_sink(backend, device):
    b, sq, sk, h, d = 1, 7, 3, 2, 16
    q, k, v = qkv_inputs(b, sq, sk, h, h, d, torch.float32, device)
    s = torch.tensor([0.5, -2.0], device=device)
    out, lse, _ = flash_attn_func(q, k, v, causal=True, learnable_sink=s, return_attn_probs=True)
    empty = sq - sk  # rows 0 .. sq - sk - 1 see no key
    assert torch.equal(out[:, :empty], torch.zeros_like(out[:, :empty]))
    torch.testing.assert_close(lse[:, :, :empty], s.view(1, h, 1).expand(b, h, empty))
    assert torch.isfinite(lse).all()


def _varlen_oracle(lens_q, lens_k, dropout=None, **opts):
    """Per-sequence oracle (sequence n's dropout mask is dropout_mask(..., batch_start=n))."""
    cq, ck = cu_seqlens(lens_q, "cpu").tolist(), cu_seqlens(lens_k, "cpu").tolist()

    def oracle(q, k, v, s, upcast):
        outs, lses = [], []
        for n, (lq, lk) in enumerate(zip(lens_q, lens_k, strict=True)):
            if lq == 0:
                continue
            drop = {}
            if dropout is not None:
                seed, p = dropout
                drop = dict(dropout_p=p, dropout_mask=dropout_mask(seed, p, 1, q.shape[1], lq, lk, q.device,
                                                                   batch_start=n))  # fmt: skip
            qs, ks, vs = q[cq[n] : cq[n + 1]][None], k[ck[n] : ck[n + 1]][None], v[ck[n] : ck[n + 1]][None]
            o, lse = attention_ref(qs, ks, vs, learnable_sink=s, upcast=upcast, **drop, **opts)
            outs.append(o[0])
            lses.append(lse[0])
        return torch.cat(outs), torch.cat(lses, dim=1)

    return oracle


LENS = ([9, 0, 1, 30, 17], [14, 3, 1, 22, 0])  # an empty query sequence, an empty key sequence, sq > sk


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_matches_oracle(backend, device, causal):
    lens_q, lens_k = [shrink(backend, n) for n in LENS[0]], [shrink(backend, n) for n in LENS[1]]
    h, hk, d = 4, 2, 32
    q = torch.randn(sum(lens_q), h, d, device=device)
    k = torch.randn(sum(lens_k), hk, d, device=device)
    v = torch.randn(sum(lens_k), hk, d, device=device)
    s = torch.randn(h, device=device) * 3
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)

    def fn(q, k, v, s):
        out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                             return_attn_probs=True, learnable_sink=s)  # fmt: skip
        return out, lse

    compare_with_oracle(fn, _varlen_oracle(lens_q, lens_k, causal=causal), (q, k, v, s))


@pytest.mark.parametrize("p", [0.2, 0.6])
def test_dropout_matches_oracle(backend, device, p):
    """The sink is in the denominator before dropout; dropout drops keys only (the same mask)."""
    b, sq, sk, h, hk, d = 2, shrink(backend, 37), shrink(backend, 50), 6, 2, 32
    q, k, v = qkv_inputs(b, sq, sk, h, hk, d, torch.float32, device)
    s = torch.randn(h, device=device) * 2
    mask = dropout_mask(redraw_seed(77, device), p, b, h, sq, sk, device)

    def fn(q, k, v, s):
        torch.manual_seed(77)
        out, lse, probs = flash_attn_func(q, k, v, dropout_p=p, causal=True, return_attn_probs=True, learnable_sink=s)
        # return_attn_probs gives the probabilities after dropout, without the sink's
        torch.testing.assert_close(torch.einsum("bhts,bshd->bthd", probs, v.repeat_interleave(h // hk, 2)), out)
        return out, lse

    def oracle(q, k, v, s, upcast):
        return attention_ref(q, k, v, dropout_p=p, dropout_mask=mask, causal=True, learnable_sink=s, upcast=upcast)

    compare_with_oracle(fn, oracle, (q, k, v, s))


def test_varlen_dropout_matches_oracle(backend, device):
    lens_q, lens_k = [shrink(backend, n) for n in LENS[0]], [shrink(backend, n) for n in LENS[1]]
    h, hk, d, p = 4, 2, 32, 0.3
    q = torch.randn(sum(lens_q), h, d, device=device)
    k = torch.randn(sum(lens_k), hk, d, device=device)
    v = torch.randn(sum(lens_k), hk, d, device=device)
    s = torch.randn(h, device=device)
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)

    def fn(q, k, v, s):
        torch.manual_seed(99)
        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), dropout_p=p, causal=True,
                                     learnable_sink=s)  # fmt: skip
        return out, None

    oracle = _varlen_oracle(lens_q, lens_k, dropout=(redraw_seed(99, device), p), causal=True)
    compare_with_oracle(fn, oracle, (q, k, v, s))


def test_packed_variants_take_the_sink(backend, device):
    b, sq, h, d = 2, 13, 4, 16
    q, k, v = qkv_inputs(b, sq, sq, h, h, d, torch.float32, device)
    s = torch.randn(h, device=device)
    ref = flash_attn_func(q, k, v, causal=True, learnable_sink=s)
    qkv = torch.stack([q, k, v], 2)
    torch.testing.assert_close(flashtile.flash_attn_qkvpacked_func(qkv, causal=True, learnable_sink=s), ref)
    kv = torch.stack([k, v], 2)
    torch.testing.assert_close(flashtile.flash_attn_kvpacked_func(q, kv, causal=True, learnable_sink=s), ref)
    cu = cu_seqlens([sq] * b, device)
    out = flashtile.flash_attn_varlen_qkvpacked_func(qkv.flatten(0, 1), cu, sq, causal=True, learnable_sink=s)
    torch.testing.assert_close(out.view_as(ref), ref)
    out = flashtile.flash_attn_varlen_kvpacked_func(q.flatten(0, 1), kv.flatten(0, 1), cu, cu, sq, sq, causal=True,
                                                    learnable_sink=s)  # fmt: skip
    torch.testing.assert_close(out.view_as(ref), ref)


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("opts", [dict(causal=True), dict(causal=True, window_size=(5, 0))], ids=["causal", "window"])
def test_kvcache_decode(device, num_splits, opts):
    """Decoding against a cache equals full attention with the sink; with num_splits > 1 the sink
    is merged in once (counted in every piece, the lse would be off by log(num_splits) where the
    sink dominates, hence the +8 sinks)."""
    b, s, h, hk, d, prefill = 2, 23, 4, 2, 16, 6
    q, k, v = qkv_inputs(b, s, s, h, hk, d, torch.float32, device)
    sink = torch.tensor([8.0, -3.0, 0.0, 8.0], device=device)
    ref_out, ref_lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, learnable_sink=sink, **opts)
    ref_o, ref_l = attention_ref(q, k, v, learnable_sink=sink, **opts)
    torch.testing.assert_close(ref_out, ref_o)
    torch.testing.assert_close(ref_lse, ref_l)
    kc = torch.zeros(b, s + 2, hk, d, device=device)
    vc = torch.zeros_like(kc)
    outs, lses = [], []
    for a, e in [(0, prefill)] + [(t, t + 1) for t in range(prefill, s)]:
        o, lse = flash_attn_with_kvcache(q[:, a:e], kc, vc, k[:, a:e], v[:, a:e], cache_seqlens=a,
                                         num_splits=num_splits, return_softmax_lse=True, learnable_sink=sink,
                                         **opts)  # fmt: skip
        outs.append(o)
        lses.append(lse)
    torch.testing.assert_close(torch.cat(outs, 1), ref_o, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(lses, 2), ref_l, atol=1e-5, rtol=0)


def test_kvcache_empty_rows_lse_is_the_sink(device):
    """A row without keys (cache empty, no new tokens) gives out 0 and lse = sink, split or not."""
    b, h, d = 2, 2, 8
    q = torch.randn(b, 1, h, d, device=device)
    kc = torch.randn(b, 4, h, d, device=device)
    sink = torch.tensor([1.5, -0.5], device=device)
    for splits in (1, 2):
        out, lse = flash_attn_with_kvcache(q, kc, kc.clone(), cache_seqlens=torch.tensor([0, 3], dtype=torch.int32),
                                           num_splits=splits, return_softmax_lse=True, learnable_sink=sink)  # fmt: skip
        assert torch.equal(out[0], torch.zeros_like(out[0]))
        torch.testing.assert_close(lse[0, :, 0], sink)


@pytest.mark.parametrize("opts", [dict(causal=True), dict(window_size=(1, 1), softcap=2.0)], ids=["causal", "window"])
def test_gradcheck_float64(opts):
    """torch.autograd.gradcheck through the custom op (dense and with rows that see no key), sink included."""
    torch.manual_seed(0)
    b, sq, sk, h, hk, d = 1, 5, 3, 2, 1, 4
    q = torch.randn(b, sq, h, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, sk, hk, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, sk, hk, d, dtype=torch.float64, requires_grad=True)
    sink = torch.randn(h, dtype=torch.float64, requires_grad=True)
    base = make_call(headdim=d, **opts)

    def fn(q, k, v, sink):
        return ops.attention(q, k, v, dataclasses.replace(base, learnable_sink=sink), "torch")[0]

    assert torch.autograd.gradcheck(fn, (q, k, v, sink))
    # the lse includes the sink (and is the oracle's)
    _, lse = ops.attention(q, k, v, dataclasses.replace(base, learnable_sink=sink), "torch")
    _, ref_lse = attention_ref(q, k, v, learnable_sink=sink, **opts)
    torch.testing.assert_close(lse, ref_lse.to(lse.dtype))


def test_sink_without_grad_and_no_grad(device):
    q, k, v = qkv_inputs(1, 9, 9, 2, 2, 16, torch.float32, device)
    q.requires_grad_()
    s = torch.randn(2, device=device)
    out = flash_attn_func(q, k, v, learnable_sink=s)
    (dq,) = torch.autograd.grad(out.sum(), q)
    assert s.grad is None and dq.shape == q.shape
    with torch.no_grad():
        torch.testing.assert_close(flash_attn_func(q, k, v, learnable_sink=s), out.detach())


def test_compile_fullgraph(device):
    q, k, v = qkv_inputs(2, 11, 13, 4, 2, 16, torch.float32, device)
    s = torch.randn(4, device=device)

    def fn(q, k, v, s):
        return flash_attn_func(q, k, v, causal=True, learnable_sink=s)

    grads = []
    for f in (fn, torch.compile(fn, backend="aot_eager", fullgraph=True)):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, s)]
        out = f(*leaves)
        grads.append((out, *torch.autograd.grad(out.square().sum(), leaves)))
    for a, c in zip(*grads, strict=True):
        torch.testing.assert_close(a, c, rtol=0, atol=0)


class TestValidation:
    def setup_method(self):
        self.q, self.k, self.v = qkv_inputs(1, 4, 4, 4, 2, 8, torch.float32, "cpu")

    @pytest.mark.parametrize(
        "sink,err,match",
        [
            (torch.zeros(4, dtype=torch.float16), TypeError, "learnable_sink must be float32"),
            (torch.zeros(2), ValueError, r"learnable_sink must have shape \(nheads,\) = \(4,\)"),
            (torch.zeros(1, 4), ValueError, "learnable_sink must have shape"),
            ([0.0] * 4, TypeError, "learnable_sink must be a torch.Tensor"),
        ],
    )
    def test_bad_sink(self, sink, err, match):
        with pytest.raises(err, match=match):
            flash_attn_func(self.q, self.k, self.v, learnable_sink=sink)
        with pytest.raises(err, match=match):
            flash_attn_with_kvcache(self.q, self.k, self.v, learnable_sink=sink)

    def test_feature_name(self):
        call = make_call(headdim=8, learnable_sink=torch.zeros(4))
        assert call.features() == {"sink"}
        assert "sink" in flashtile.spec.FEATURES
        assert [f.name for f in dataclasses.fields(AttnCall) if f.metadata.get("grad")] == ["learnable_sink"]


def test_triton_declares_sink():
    assert "sink" in registry()["triton"].capabilities.features


@pytest.mark.parametrize("name", ["hopper"])
def test_dispatch_refuses_kernels_without_sink(monkeypatch, name):
    """The hopper kernel does not declare "sink": forced, it refuses with that reason; auto (even
    where it would pick it) hands sink calls to the next backend (torch here)."""
    be = registry()[name]
    monkeypatch.setattr(be, "available", lambda: None)
    monkeypatch.setattr(be, "supports", lambda problem, call: None)
    dtypes = be.capabilities.dtypes | {torch.float32}
    monkeypatch.setattr(be, "capabilities", dataclasses.replace(be.capabilities, auto_devices=None, dtypes=dtypes))
    q, k, v = qkv_inputs(1, 8, 8, 2, 2, 16, torch.float32, "cpu")
    sink = torch.zeros(2)
    call = make_call(headdim=16, learnable_sink=sink)
    problem = Problem.of(q, k, call)
    assert dispatch.why_not(name, problem, call) == "does not implement sink"
    assert dispatch.why_not(name, problem, make_call(headdim=16)) is None
    assert dispatch.choose(problem, call) == "torch"
    with flashtile.use_backend(name), pytest.raises(flashtile.BackendUnavailableError, match="does not implement sink"):
        flash_attn_func(q, k, v, learnable_sink=sink)
