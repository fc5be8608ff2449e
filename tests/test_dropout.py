"""Dropout: reproducible from torch's seed, rate close to p, and output/gradients equal to the
oracle given the same keep mask (the mask is rebuilt with ``flashtile.rng.dropout_mask`` from the
seed the call draws: ``torch.randint(0, 2**62, (), dtype=torch.int64)`` from q's device generator).
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DTYPE_IDS, DTYPES, shrink

from flashtile import flash_attn_func, flash_attn_qkvpacked_func, flash_attn_varlen_func
from flashtile.rng import draw_seed, dropout_mask
from flashtile.testing import (
    attention_probs_ref,
    attention_ref,
    compare_with_oracle,
    cu_seqlens,
    make_alibi,
    qkv_inputs,
)


def redraw_seed(torch_seed: int, device: torch.device) -> int:
    """The dropout seed a call made right after ``torch.manual_seed(torch_seed)`` used."""
    torch.manual_seed(torch_seed)
    return int(draw_seed(torch.device(device)))


def test_same_seed_reproduces(backend, device):
    q, k, v = (x.requires_grad_() for x in qkv_inputs(2, 33, 40, 4, 2, 32, torch.float32, device))
    results = []
    for _ in range(2):
        torch.manual_seed(1234)
        out = flash_attn_func(q, k, v, dropout_p=0.3, causal=True)
        grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        results.append((out, *grads))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


def test_different_seed_differs(backend, device):
    q, k, v = qkv_inputs(2, 33, 40, 4, 2, 32, torch.float32, device)
    torch.manual_seed(1)
    a = flash_attn_func(q, k, v, dropout_p=0.3)
    b = flash_attn_func(q, k, v, dropout_p=0.3)  # the generator moved on: another mask
    torch.manual_seed(2)
    c = flash_attn_func(q, k, v, dropout_p=0.3)
    nodrop = flash_attn_func(q, k, v)
    for x, y in ((a, b), (a, c), (b, c), (a, nodrop)):
        assert (x - y).abs().max() > 1e-2


@pytest.mark.parametrize("p", [0.1, 0.5, 0.85])
def test_kept_fraction_and_scaling(backend, device, p):
    """Nonzero entries of attn_probs: a fraction 1-p of them (5 sigma), each equal to the
    undropped probability times 1/(1-p)."""
    b, s, h, d = 2, shrink(backend, 64), 4, 16
    q, k, v = qkv_inputs(b, s, s, h, h, d, torch.float32, device)
    out, lse, probs = flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True)
    assert probs.shape == (b, h, s, s)
    kept = probs > 0
    n = kept.numel()
    frac = kept.float().mean().item()
    assert abs(frac - (1 - p)) <= 5 * math.sqrt(p * (1 - p) / n), f"kept {frac:.4f}, expected {1 - p}"
    p_full = attention_probs_ref(q, k, v)
    torch.testing.assert_close(probs[kept], (p_full / (1 - p))[kept], rtol=1e-5, atol=1e-6)
    # the dropped probabilities are not renormalised: rows sum to about 1 only on average
    assert abs(probs.sum(-1).mean().item() - 1.0) < 0.1


@pytest.mark.parametrize(
    "opts",
    [dict(), dict(causal=True), dict(window_size=(5, 3), softcap=2.0, alibi="h")],
    ids=["full", "causal", "window-softcap-alibi"],
)
def test_probs_times_v_is_out(backend, device, opts):
    """return_attn_probs with dropout: out == attn_probs @ v (GQA: v repeated per group)."""
    opts = dict(opts)
    b, sq, sk, h, hk, d = 2, shrink(backend, 29), shrink(backend, 41), 4, 2, 16
    alibi = make_alibi(opts.pop("alibi", None), b, h, device)
    q, k, v = qkv_inputs(b, sq, sk, h, hk, d, torch.float32, device)
    out, lse, probs = flash_attn_func(q, k, v, dropout_p=0.25, return_attn_probs=True, alibi_slopes=alibi, **opts)
    vr = v.repeat_interleave(h // hk, dim=2)
    expected = torch.einsum("bhts,bshd->bthd", probs, vr)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "opts",
    [
        dict(),
        dict(causal=True),
        dict(causal=True, window_size=(7, -1), softcap=3.0, alibi="bh"),
    ],
    ids=["full", "causal", "window-softcap-alibi"],
)
@pytest.mark.parametrize("p", [0.17, 0.6])
def test_matches_oracle_with_same_mask(backend, device, dtype, opts, p):
    """Output and gradients equal the oracle's given the keep mask rebuilt from the seed: the
    backward uses the forward's mask."""
    opts = dict(opts)
    b, sq, sk, h, hk, d = 2, shrink(backend, 37), shrink(backend, 50), 6, 2, 32
    alibi = make_alibi(opts.pop("alibi", None), b, h, device)
    q, k, v = qkv_inputs(b, sq, sk, h, hk, d, dtype, device)
    mask = dropout_mask(redraw_seed(77, device), p, b, h, sq, sk, device)
    assert abs(mask.float().mean().item() - (1 - p)) < 0.05

    def fn(q, k, v):
        torch.manual_seed(77)
        out, lse, _ = flash_attn_func(q, k, v, dropout_p=p, alibi_slopes=alibi, return_attn_probs=True, **opts)
        return out, lse

    def oracle(q, k, v, upcast):
        return attention_ref(q, k, v, dropout_p=p, dropout_mask=mask, alibi_slopes=alibi, upcast=upcast, **opts)

    compare_with_oracle(fn, oracle, (q, k, v))


def test_qkvpacked_dropout_matches_oracle(backend, device):
    b, s, h, d, p = 2, shrink(backend, 31), 3, 16, 0.4
    qkv = torch.randn(b, s, 3, h, d, device=device)
    mask = dropout_mask(redraw_seed(5, device), p, b, h, s, s, device)

    def fn(qkv):
        torch.manual_seed(5)
        out, lse, _ = flash_attn_qkvpacked_func(qkv, dropout_p=p, causal=True, return_attn_probs=True)
        return out, lse

    def oracle(qkv, upcast):
        q, k, v = qkv.unbind(2)
        return attention_ref(q, k, v, dropout_p=p, dropout_mask=mask, causal=True, upcast=upcast)

    compare_with_oracle(fn, oracle, (qkv,))


def varlen_dropout_oracle(lens_q, lens_k, seed, p, **opts):
    """Per-sequence oracle; sequence n's keep mask is dropout_mask(..., batch_start=n)."""
    cq, ck = cu_seqlens(lens_q, "cpu").tolist(), cu_seqlens(lens_k, "cpu").tolist()

    def oracle(q, k, v, upcast):
        h = q.shape[1]
        outs, lses = [], []
        for n, (lq, lk) in enumerate(zip(lens_q, lens_k, strict=True)):
            if lq == 0:
                continue
            if lk == 0:
                outs.append(q.new_zeros(lq, h, q.shape[2]))
                lses.append(torch.full((h, lq), float("-inf"), device=q.device))
                continue
            mask = dropout_mask(seed, p, 1, h, lq, lk, q.device, batch_start=n)
            qs, ks, vs = q[cq[n] : cq[n + 1]][None], k[ck[n] : ck[n + 1]][None], v[ck[n] : ck[n + 1]][None]
            o, lse = attention_ref(qs, ks, vs, dropout_p=p, dropout_mask=mask, upcast=upcast, **opts)
            outs.append(o[0])
            lses.append(lse[0])
        return torch.cat(outs), torch.cat(lses, dim=1)

    return oracle


VARLEN_LENS = [
    # lens_q, lens_k: an empty query sequence, an empty key sequence, length 1, sq < sk, sq > sk
    ("with-empty", [9, 0, 1, 30, 17], [14, 3, 1, 22, 0]),
    ("nonempty", [9, 1, 30, 17], [14, 1, 22, 5]),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("name,lens_q,lens_k", VARLEN_LENS, ids=[c[0] for c in VARLEN_LENS])
def test_varlen_dropout(backend, device, dtype, causal, name, lens_q, lens_k):
    """Varlen: sequence n uses dropout counter batch index n; out and grads match the
    per-sequence oracle with those masks."""
    lens_q, lens_k = [shrink(backend, n) for n in lens_q], [shrink(backend, n) for n in lens_k]
    h, hk, d, p = 4, 2, 32, 0.3
    q = torch.randn(sum(lens_q), h, d, dtype=dtype, device=device)
    k = torch.randn(sum(lens_k), hk, d, dtype=dtype, device=device)
    v = torch.randn(sum(lens_k), hk, d, dtype=dtype, device=device)
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)

    def fn(q, k, v):
        torch.manual_seed(99)
        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), dropout_p=p, causal=causal)
        return out, None

    oracle = varlen_dropout_oracle(lens_q, lens_k, redraw_seed(99, device), p, causal=causal)
    compare_with_oracle(fn, oracle, (q, k, v))


@pytest.mark.parametrize("name,lens_q,lens_k", VARLEN_LENS, ids=[c[0] for c in VARLEN_LENS])
def test_varlen_dropout_probs(backend, device, name, lens_q, lens_k):
    """Varlen with return_attn_probs: lse matches the oracle, attn_probs (padded to max_seqlen,
    zero outside each sequence) times v is out (regression: a sequence with no keys crashed the
    materialisation of attn_probs)."""
    lens_q, lens_k = [shrink(backend, n) for n in lens_q], [shrink(backend, n) for n in lens_k]
    h, hk, d, p = 4, 2, 16, 0.3
    q = torch.randn(sum(lens_q), h, d, device=device)
    k = torch.randn(sum(lens_k), hk, d, device=device)
    v = torch.randn(sum(lens_k), hk, d, device=device)
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    cq, ck = cu_q.tolist(), cu_k.tolist()

    def fn(q, k, v):
        torch.manual_seed(99)
        out, lse, _ = flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), dropout_p=p, causal=True, return_attn_probs=True
        )
        return out, lse

    oracle = varlen_dropout_oracle(lens_q, lens_k, redraw_seed(99, device), p, causal=True)
    compare_with_oracle(fn, oracle, (q, k, v), grads=False)

    torch.manual_seed(99)
    out, lse, probs = flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), dropout_p=p, causal=True, return_attn_probs=True
    )
    assert probs.shape == (len(lens_q), h, max(lens_q), max(lens_k))
    for n, (lq, lk) in enumerate(zip(lens_q, lens_k, strict=True)):
        vs = v[ck[n] : ck[n + 1]].repeat_interleave(h // hk, dim=1)  # (lk, h, d)
        expected = torch.einsum("hts,shd->thd", probs[n, :, :lq, :lk], vs)
        torch.testing.assert_close(out[cq[n] : cq[n + 1]], expected, rtol=1e-5, atol=1e-5)
        assert (probs[n, :, lq:] == 0).all() and (probs[n, :, :, lk:] == 0).all()


def test_dropout_deterministic_backward(backend, device):
    """deterministic=True with dropout: same seed, bitwise identical gradients."""
    q, k, v = (x.requires_grad_() for x in qkv_inputs(1, 40, 40, 2, 1, 32, torch.float32, device))
    dout = torch.randn(1, 40, 2, 32, device=device)
    grads = []
    for _ in range(2):
        torch.manual_seed(3)
        out = flash_attn_func(q, k, v, dropout_p=0.2, deterministic=True)
        grads.append(torch.autograd.grad(out, (q, k, v), dout))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
