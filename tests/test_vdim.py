"""v with its own head dim (DeepSeek V2/V3 and MLA prefill: 192 for q/k, 128 for v): out and dv have
v's head dim, forward and backward, dense and varlen, GQA, every option (causal, window, softcap,
ALiBi, dropout, sinks), the KV cache with a v cache of its own head dim (split-KV included), against
the oracle; validation; the hopper backend declines such calls.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import DTYPE_IDS, DTYPES, shrink, skip_if_too_big
from test_dropout import redraw_seed

from flashtile import dispatch, flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, ops
from flashtile.backends import _device
from flashtile.backends.base import registry
from flashtile.rng import dropout_mask
from flashtile.spec import Problem, make_call
from flashtile.testing import attention_ref, compare_with_oracle, cu_seqlens, make_alibi

#: (q/k head dim, v head dim): DeepSeek's and other unequal pairs, one with v wider than q/k, and
#: small odd ones (the interpreter runs only those <= 128).
DIMS = [(192, 128), (128, 64), (256, 128), (40, 24), (24, 72), (16, 8)]


def _inputs(b, sq, sk, h, hk, d, dv, dtype, device):
    q = torch.randn(b, sq, h, d, device=device).to(dtype)
    k = torch.randn(b, sk, hk, d, device=device).to(dtype)
    v = torch.randn(b, sk, hk, dv, device=device).to(dtype)
    return q, k, v


def _dims_ok(backend, d, dv, dtype=None):
    skip_if_too_big(backend, headdim=max(d, dv), dtype=dtype)


@pytest.mark.parametrize("d,dv", DIMS, ids=[f"{a}-{b}" for a, b in DIMS])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dense_causal_gqa(backend, device, d, dv, dtype):
    _dims_ok(backend, d, dv, dtype)
    b, h, hk = 2, 4, 2
    sq, sk = shrink(backend, 45, 61)
    q, k, v = _inputs(b, sq, sk, h, hk, d, dv, dtype, device)

    def fn(q, k, v):
        out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        assert out.shape == (b, sq, h, dv)
        return out, lse

    def oracle(q, k, v, upcast):
        return attention_ref(q, k, v, causal=True, upcast=upcast)

    compare_with_oracle(fn, oracle, (q, k, v))


OPTIONS = [
    ("full-sq>sk", 50, 30, dict()),
    ("window-empty-rows", 50, 30, dict(window_size=(2, 0))),  # rows that see no key
    ("softcap-alibi", 29, 37, dict(causal=True, softcap=3.0, alibi="bh", softmax_scale=0.3)),
    ("sink-window", 40, 40, dict(window_size=(5, 3), sink=True)),
]


@pytest.mark.parametrize("name,sq,sk,opts", OPTIONS, ids=[c[0] for c in OPTIONS])
def test_options(backend, device, name, sq, sk, opts):
    opts = dict(opts)
    b, h, hk, d, dv = 2, 4, 1, 40, 24
    sq, sk = shrink(backend, sq, sk)
    alibi = make_alibi(opts.pop("alibi", None), b, h, device)
    with_sink = opts.pop("sink", False)
    q, k, v = _inputs(b, sq, sk, h, hk, d, dv, torch.float32, device)
    s = torch.randn(h, device=device) * 2
    inputs = (q, k, v, s) if with_sink else (q, k, v)

    def fn(q, k, v, *s):
        sink = dict(learnable_sink=s[0]) if s else {}
        out, lse, _ = flash_attn_func(q, k, v, alibi_slopes=alibi, return_attn_probs=True, **sink, **opts)
        return out, lse

    def oracle(q, k, v, *s, upcast):
        sink = dict(learnable_sink=s[0]) if s else {}
        return attention_ref(q, k, v, alibi_slopes=alibi, upcast=upcast, **sink, **opts)

    compare_with_oracle(fn, oracle, inputs)


def test_dropout(backend, device):
    b, h, hk, d, dv, p = 2, 4, 2, 32, 16, 0.25
    sq, sk = shrink(backend, 37, 50)
    q, k, v = _inputs(b, sq, sk, h, hk, d, dv, torch.float32, device)
    mask = dropout_mask(redraw_seed(5, device), p, b, h, sq, sk, device)

    def fn(q, k, v):
        torch.manual_seed(5)
        out, lse, probs = flash_attn_func(q, k, v, dropout_p=p, causal=True, return_attn_probs=True)
        torch.testing.assert_close(torch.einsum("bhts,bshd->bthd", probs, v.repeat_interleave(h // hk, 2)), out)
        return out, lse

    def oracle(q, k, v, upcast):
        return attention_ref(q, k, v, dropout_p=p, dropout_mask=mask, causal=True, upcast=upcast)

    compare_with_oracle(fn, oracle, (q, k, v))


@pytest.mark.parametrize("d,dv", [(192, 128), (40, 24)], ids=["192-128", "40-24"])
def test_varlen(backend, device, d, dv):
    _dims_ok(backend, d, dv)
    lens_q = [shrink(backend, n) for n in (9, 0, 1, 30, 17)]
    lens_k = [shrink(backend, n) for n in (14, 3, 1, 22, 0)]
    h, hk = 4, 2
    q = torch.randn(sum(lens_q), h, d, device=device)
    k = torch.randn(sum(lens_k), hk, d, device=device)
    v = torch.randn(sum(lens_k), hk, dv, device=device)
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    cq, ck = cu_q.tolist(), cu_k.tolist()

    def fn(q, k, v):
        out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                             return_attn_probs=True)  # fmt: skip
        return out, lse

    def oracle(q, k, v, upcast):
        outs, lses = [], []
        for n in range(len(lens_q)):
            if lens_q[n] == 0:
                continue
            o, lse = attention_ref(q[cq[n] : cq[n + 1]][None], k[ck[n] : ck[n + 1]][None], v[ck[n] : ck[n + 1]][None],
                                   causal=True, upcast=upcast)  # fmt: skip
            outs.append(o[0])
            lses.append(lse[0])
        return torch.cat(outs), torch.cat(lses, dim=1)

    compare_with_oracle(fn, oracle, (q, k, v))


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("paged", [False, True], ids=["dense", "paged"])
def test_kvcache(device, num_splits, paged):
    """Decoding into a cache whose v part has its own head dim equals full attention (sinks on)."""
    b, s, h, hk, d, dv, prefill, page = 2, 21, 4, 2, 24, 16, 5, 8
    q, k, v = _inputs(b, s, s, h, hk, d, dv, torch.float32, device)
    sink = torch.tensor([2.0, -1.0, 0.0, 4.0], device=device)
    ref_o, ref_l = attention_ref(q, k, v, causal=True, learnable_sink=sink)
    cap = 3 * page
    if paged:
        nblk = b * cap // page + 2
        kc = torch.zeros(nblk, page, hk, d, device=device)
        vc = torch.zeros(nblk, page, hk, dv, device=device)
        table = torch.randperm(nblk, device=device)[: b * cap // page].view(b, -1).to(torch.int32)
    else:
        kc = torch.zeros(b, cap, hk, d, device=device)
        vc = torch.zeros(b, cap, hk, dv, device=device)
        table = None
    outs, lses = [], []
    for a, e in [(0, prefill)] + [(t, t + 1) for t in range(prefill, s)]:
        o, lse = flash_attn_with_kvcache(q[:, a:e], kc, vc, k[:, a:e], v[:, a:e], cache_seqlens=a, causal=True,
                                         block_table=table, num_splits=num_splits, return_softmax_lse=True,
                                         learnable_sink=sink)  # fmt: skip
        assert o.shape == (b, e - a, h, dv)
        outs.append(o)
        lses.append(lse)
    torch.testing.assert_close(torch.cat(outs, 1), ref_o, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.cat(lses, 2), ref_l, atol=1e-5, rtol=0)


def test_decode_shaped_forward(backend, device):
    """A few query rows per KV head (the Triton backend's split-KV path for flash_attn_func)."""
    b, h, hk, d, dv = 2, 8, 2, 40, 24
    q, k, v = _inputs(b, 3, shrink(backend, 70), h, hk, d, dv, torch.float16, device)

    def fn(q, k, v):
        out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        return out, lse

    compare_with_oracle(fn, lambda q, k, v, upcast: attention_ref(q, k, v, causal=True, upcast=upcast), (q, k, v))


class TestValidation:
    def test_k_must_match_q(self):
        q, k, v = _inputs(1, 4, 4, 2, 2, 16, 8, torch.float32, "cpu")
        with pytest.raises(ValueError, match=r"k must have the same head dim as q \(16\), got 8"):
            flash_attn_func(q, v, v)

    def test_v_shape_except_head_dim(self):
        q, k, v = _inputs(1, 4, 4, 2, 2, 16, 8, torch.float32, "cpu")
        with pytest.raises(ValueError, match="k and v must have the same shape except the head dim"):
            flash_attn_func(q, k, v[:, :3])

    def test_v_head_dim_range(self):
        q, k, _ = _inputs(1, 4, 4, 2, 2, 16, 8, torch.float32, "cpu")
        with pytest.raises(ValueError, match="head dim of v must be between 1 and 512, got 600"):
            flash_attn_func(q, k, torch.zeros(1, 4, 2, 600))

    def test_cache_v_head_dim(self):
        q, k, v = _inputs(1, 1, 4, 2, 2, 16, 8, torch.float32, "cpu")
        kc, vc = torch.zeros(1, 8, 2, 16), torch.zeros(1, 8, 2, 8)
        with pytest.raises(ValueError, match=r"v must have the head dim of v_cache \(8\), got 16"):
            flash_attn_with_kvcache(q, kc, vc, k, k, cache_seqlens=0)
        with pytest.raises(ValueError, match="k_cache and v_cache must have the same shape except the head dim"):
            flash_attn_with_kvcache(q, kc, vc[:, :4], cache_seqlens=0)

    def test_problem_headdim_v(self):
        q, k, v = _inputs(1, 4, 4, 2, 2, 16, 8, torch.float32, "cpu")
        call = make_call(headdim=16)
        assert Problem.of(q, k, call).headdim_v == 16
        assert Problem.of(q, k, call, v).headdim_v == 8
        assert Problem(1, 4, 4, 2, 2, 16, torch.float32, torch.device("cpu")).headdim_v == 16


def test_hopper_declines_unequal_head_dims(monkeypatch):
    be = registry()["hopper"]
    monkeypatch.setattr(be, "available", lambda: None)
    monkeypatch.setattr(_device, "info", lambda dev: None)
    call = make_call(headdim=192)
    cuda = torch.device("cuda", 0)
    p = Problem(1, 256, 256, 8, 8, 192, torch.bfloat16, cuda, headdim_v=128)
    assert be.supports(p, call) == "v head dim 128 differs from the q/k head dim 192"
    assert be.supports(dataclasses.replace(p, headdim_v=192), call) is None
    assert "differs" in dispatch.why_not("hopper", p, call)


@pytest.mark.parametrize("opts", [dict(causal=True), dict(window_size=(1, 1), softcap=2.0)], ids=["causal", "window"])
def test_gradcheck_float64(opts):
    """torch.autograd.gradcheck through the custom op with v's head dim 3 and q/k's 5, sink included."""
    b, sq, sk, h, hk, d, dv = 1, 5, 4, 2, 1, 5, 3
    q = torch.randn(b, sq, h, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, sk, hk, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, sk, hk, dv, dtype=torch.float64, requires_grad=True)
    sink = torch.randn(h, dtype=torch.float64, requires_grad=True)
    base = make_call(headdim=d, **opts)

    def fn(q, k, v, sink):
        return ops.attention(q, k, v, dataclasses.replace(base, learnable_sink=sink), "torch")[0]

    assert fn(q, k, v, sink).shape == (b, sq, h, dv)
    assert torch.autograd.gradcheck(fn, (q, k, v, sink))
