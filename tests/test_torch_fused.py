"""The torch backend's fused CPU path (torch's own flash-attention CPU kernels for plain calls,
see ``torch_tiled._fused_ok``) next to the tiled engine on the same plain calls: both against the
oracle, forward and backward; which calls take the fused path; and the backward's flash-attn
semantics (it uses the ``out`` / ``lse`` it is given, as ring attention needs)."""

from __future__ import annotations

import pytest
import torch
from conftest import TORCH_TEST_TILES
from test_parity import dense_fn, dense_oracle

import flashtile
from flashtile.backends import torch_tiled as tt
from flashtile.spec import make_call
from flashtile.testing import compare_with_oracle

pytestmark = pytest.mark.skipif(tt._ATEN_FWD is None, reason="this torch has no fused CPU attention kernels")

SHAPES = [(1, 1, 64), (17, 17, 40), (113, 203, 72), (203, 113, 64), (65, 65, 256)]


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the calls of the fused forward and backward kernels."""
    n = {"fwd": 0, "bwd": 0}

    def count(name, fn):
        def run(*a, **kw):
            n[name] += 1
            return fn(*a, **kw)

        return run

    monkeypatch.setattr(tt, "_ATEN_FWD", count("fwd", tt._ATEN_FWD))
    monkeypatch.setattr(tt, "_ATEN_BWD", count("bwd", tt._ATEN_BWD))
    return n


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "engine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("sq,sk,d", SHAPES)
@pytest.mark.parametrize("h,hk", [(3, 3), (4, 2)], ids=["mha", "gqa"])
def test_plain_calls(monkeypatch, fused_calls, fused, dtype, causal, sq, sk, d, h, hk):
    monkeypatch.setattr(tt, "_FUSED", fused)
    if not fused:  # the engine with small tiles, as the backend fixture runs it
        for attr, value in TORCH_TEST_TILES.items():
            monkeypatch.setattr(tt, attr, value)
    q, k, v = (torch.randn(2, s, n, d).to(dtype) for s, n in ((sq, h), (sk, hk), (sk, hk)))
    with flashtile.use_backend("torch"):
        compare_with_oracle(dense_fn(causal=causal), dense_oracle(causal=causal), (q, k, v))
    # the fused path exactly where it computes the same thing: causal only when sq == sk
    taken = fused and (not causal or sq == sk)
    assert fused_calls == {"fwd": int(taken), "bwd": int(taken)}


def test_routing():
    q, k = torch.randn(1, 8, 4, 64), torch.randn(1, 8, 4, 64)
    plain = make_call(headdim=64)
    assert tt._fused_ok(q, k, k, plain)
    assert tt._fused_ok(q, k, k, make_call(headdim=64, causal=True))
    assert tt._fused_ok(q.bfloat16(), k.bfloat16(), k.bfloat16(), plain)
    assert not tt._fused_ok(q.double(), k.double(), k.double(), plain)
    assert not tt._fused_ok(q, k[:, :5], k[:, :5], make_call(headdim=64, causal=True))  # sq != sk
    assert tt._fused_ok(q, k[:, :, :2], k[:, :, :2], plain)  # GQA: K/V heads repeated
    assert not tt._fused_ok(q, k, k[..., :32], plain)  # v head dim of its own
    for opts in ({"window_size": (3, 0)}, {"softcap": 5.0}, {"deterministic": True}, {"dropout_p": 0.1}):
        assert not tt._fused_ok(q, k, k, make_call(headdim=64, **opts)), opts


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_backward_uses_given_out_and_lse(monkeypatch, causal):
    """Ring attention hands the backward the global out / lse of a longer key range: both paths
    must use them as given (not recompute them) and so agree on perturbed ones."""
    torch.manual_seed(0)
    b, s, h, d = 2, 70, 4, 32
    q, dout = torch.randn(b, s, h, d), torch.randn(b, s, h, d)
    k, v = torch.randn(b, s, 2, d), torch.randn(b, s, 2, d)  # GQA
    call = make_call(headdim=d, causal=causal)
    out, lse = tt.backend.forward(q, k, v, call)
    out = out + 0.05 * torch.randn_like(out)
    lse = lse + 0.05 * torch.randn_like(lse)
    grads = {}
    for fused in (True, False):
        monkeypatch.setattr(tt, "_FUSED", fused)
        grads[fused] = tt.backend.backward(dout, q, k, v, out, lse, call)[:3]
    for a, r in zip(grads[True], grads[False], strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


def test_strided_inputs(monkeypatch):
    """The fused kernels misread a head dim whose stride is not 1 (the public API rejects such
    q/k/v, but the backend is also called directly, and a dout from ``out.sum()`` has stride 0
    everywhere): such inputs are copied first. Checked against the tiled loop."""
    torch.manual_seed(0)
    b, s, h, d = 2, 33, 3, 16
    q, v = torch.randn(b, s, h, d), torch.randn(b, s, h, d)
    k = torch.randn(b, s, h, d).transpose(-1, -2).contiguous().transpose(-1, -2)  # D strided
    assert k.stride(-1) != 1
    dout = torch.ones(1, 1, 1, 1).expand(b, s, h, d)
    call = make_call(headdim=d, causal=True)
    res = {}
    for fused in (True, False):
        monkeypatch.setattr(tt, "_FUSED", fused)
        out, lse = tt.backend.forward(q, k, v, call)
        res[fused] = (out, lse, *tt.backend.backward(dout, q, k, v, out, lse, call)[:3])
    for a, r in zip(res[True], res[False], strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-4)


def test_engine_threads_follow_the_idle_cores(monkeypatch):
    """The torch engine's CPU thread count: torch's setting on an idle machine, fewer threads when
    other tasks keep cores busy, a passing task (seen once, gone on the confirming look) ignored,
    FLASHTILE_TORCH_THREADS fixing it."""
    import os

    if not hasattr(os, "sched_getaffinity") or len(os.sched_getaffinity(0)) != os.cpu_count():
        pytest.skip("the automatic count applies where the affinity is the whole machine")
    ncpu = os.cpu_count()
    monkeypatch.delenv(tt._ENV_THREADS, raising=False)
    prev = torch.get_num_threads()
    torch.set_num_threads(ncpu)
    try:
        looks = []

        def run(counts):
            looks.clear()
            it = iter(counts)
            monkeypatch.setattr(tt, "_running_tasks", lambda: looks.append(1) or next(it))
            monkeypatch.setattr(tt, "_last_check", (-1.0, None))
            return tt.engine_threads()

        assert run([0]) == ncpu and len(looks) == 1  # idle: no second look
        if ncpu > 1:
            assert run([1, 1]) == ncpu - 1 and len(looks) == 2  # a competitor, confirmed
            assert run([1, 0]) == ncpu  # a passing task: gone on the second look
            assert run([ncpu + 3, ncpu + 3]) == 1  # never below one thread
        assert run([None]) == ncpu  # unknown: torch's setting
        monkeypatch.setenv(tt._ENV_THREADS, "3")
        assert tt.engine_threads() == 3
    finally:
        torch.set_num_threads(prev)
