"""torch.compile: code calling flashtile compiles with ``fullgraph=True`` (no graph break) and gives
the eager result; the custom ops pass ``torch.library.opcheck``."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import shrink

from flashtile import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    ops,
)
from flashtile.spec import AttnCall
from flashtile.testing import cu_seqlens, make_alibi, qkv_inputs


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def leaves(*xs):
    return [x.detach().clone().requires_grad_() for x in xs]


def run_both(fn, inputs, compile_backend="aot_eager"):
    """(out, grads) of eager ``fn`` and of ``torch.compile(fn, fullgraph=True)`` on the same inputs."""
    compiled = torch.compile(fn, backend=compile_backend, fullgraph=True)
    xs = leaves(*inputs)
    out = fn(*xs)
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, xs, dout)
    xc = leaves(*inputs)
    out_c = compiled(*xc)
    grads_c = torch.autograd.grad(out_c, xc, dout)
    return (out.detach(), grads), (out_c.detach(), grads_c)


def assert_same(results, atol=0.0):
    """Compiled == eager: bitwise by default (aot_eager runs the same ops)."""
    (oe, ge), (oc, gc) = results
    rtol = 0.0 if atol == 0 else 1e-5
    torch.testing.assert_close(oc, oe, rtol=rtol, atol=atol)
    for a, b in zip(gc, ge, strict=True):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol)


OPTIONS = {
    "plain": dict(),
    "causal": dict(causal=True),
    "window-softcap-alibi": dict(window_size=(5, 2), softcap=3.0, alibi="h", softmax_scale=0.2),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_dense_matches_eager(backend, device, name):
    opts = dict(OPTIONS[name])
    alibi = make_alibi(opts.pop("alibi", None), 2, 4, device)
    sq, sk = shrink(backend, 19, 27)
    inputs = qkv_inputs(2, sq, sk, 4, 2, 32, torch.float32, device)

    def fn(q, k, v):
        return flash_attn_func(q, k, v, alibi_slopes=alibi, **opts) * 2.0

    assert_same(run_both(fn, inputs))


def test_no_graph_break(backend, device):
    q, k, v = qkv_inputs(1, 9, 9, 2, 2, 16, torch.float32, device)

    def fn(q, k, v):
        x = torch.nn.functional.gelu(q)
        return (
            flash_attn_func(x, k, v, causal=True).sum(-1) + flash_attn_qkvpacked_func(torch.stack([q, k, v], 2))[..., 0]
        )

    explain = torch._dynamo.explain(fn)(q, k, v)
    assert explain.graph_break_count == 0, explain.break_reasons
    assert explain.graph_count == 1


def test_no_graph_break_with_tensor_options(backend, device):
    """A tensor among the optional arguments (here ``alibi_slopes``): the lean path's check that they
    are unset must compare by identity (``tuple.count(None)`` compares a tensor with ``==``, which
    torch 2.11's dynamo cannot trace: a graph break the H200's FP8 test caught)."""
    q, k, v = qkv_inputs(1, 9, 9, 2, 2, 16, torch.float32, device)
    alibi = make_alibi("h", 1, 2, device)
    explain = torch._dynamo.explain(lambda q, k, v: flash_attn_func(q, k, v, causal=True, alibi_slopes=alibi))(q, k, v)
    assert explain.graph_break_count == 0, explain.break_reasons


def test_packed_match_eager(backend, device):
    b, s, h, d = 2, shrink(backend, 17), 4, 16
    qkv = torch.randn(b, s, 3, h, d, device=device)
    q = torch.randn(b, s, h, d, device=device)
    kv = torch.randn(b, s + 3, 2, 2, d, device=device)
    assert_same(run_both(lambda qkv: flash_attn_qkvpacked_func(qkv, causal=True), (qkv,)))
    assert_same(run_both(lambda q, kv: flash_attn_kvpacked_func(q, kv, window_size=(3, 3)), (q, kv)))


def test_varlen_matches_eager(backend, device):
    lens_q, lens_k = [5, 0, 1, shrink(backend, 30)], [7, 3, 1, shrink(backend, 20)]
    q = torch.randn(sum(lens_q), 4, 32, device=device)
    k = torch.randn(sum(lens_k), 2, 32, device=device)
    v = torch.randn(sum(lens_k), 2, 32, device=device)
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    alibi = make_alibi("bh", len(lens_q), 4, device)

    def fn(q, k, v):
        return flash_attn_varlen_func(
            q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True, alibi_slopes=alibi, softcap=5.0
        )

    assert_same(run_both(fn, (q, k, v)))


def test_dropout_matches_eager(backend, device):
    """aot_eager keeps torch's generator, so the same manual seed gives the same mask."""
    inputs = qkv_inputs(2, 13, 13, 2, 2, 16, torch.float32, device)
    compiled = torch.compile(
        lambda q, k, v: flash_attn_func(q, k, v, dropout_p=0.3), backend="aot_eager", fullgraph=True
    )
    torch.manual_seed(11)
    eager = flash_attn_func(*inputs, dropout_p=0.3)
    torch.manual_seed(11)
    torch.testing.assert_close(compiled(*inputs), eager, rtol=0, atol=0)


def test_inductor(backend, device):
    """One end-to-end inductor case: projections around the attention, fused by inductor."""
    torch.manual_seed(0)
    b, s, h, d = 2, shrink(backend, 16), 2, 16
    wq = torch.randn(h * d, h * d, device=device) / 8
    x = torch.randn(b, s, h * d, device=device)

    def fn(x):
        q = (x @ wq).view(b, s, h, d)
        k = torch.tanh(x).view(b, s, h, d)
        v = (x * 0.5).view(b, s, h, d)
        return flash_attn_func(q, k, v, causal=True).reshape(b, s, h * d).relu()

    assert_same(run_both(fn, (x,), compile_backend="inductor"), atol=1e-5)


def test_recompiles_for_new_seqlen(backend, device):
    """Automatic dynamic shapes (a second seqlen) still compile without a graph break."""
    compiled = torch.compile(lambda q, k, v: flash_attn_func(q, k, v, causal=True), backend="aot_eager", fullgraph=True)
    for s in (9, 13, 21):
        inputs = qkv_inputs(1, s, s, 2, 2, 16, torch.float32, device)
        torch.testing.assert_close(compiled(*inputs), flash_attn_func(*inputs, causal=True), rtol=0, atol=0)


def test_dynamic_true(backend, device):
    """torch.compile(dynamic=True): symbolic shapes and floats (regression: the option checks
    once called math.isnan / math.isfinite, which Dynamo cannot trace on symbolic floats)."""
    compiled = torch.compile(lambda q, k, v: flash_attn_func(q, k, v, causal=True), fullgraph=True, dynamic=True,
                             backend="aot_eager")  # fmt: skip
    inputs = qkv_inputs(1, 9, 9, 2, 2, 16, torch.float32, device)
    torch.testing.assert_close(compiled(*inputs), flash_attn_func(*inputs, causal=True), rtol=0, atol=0)


def test_varying_softmax_scale(backend, device):
    """A softmax_scale that changes between calls becomes a symbolic float on recompile
    (regression: math.isfinite(softmax_scale) broke the graph)."""
    compiled = torch.compile(lambda q, k, v, s: flash_attn_func(q, k, v, softmax_scale=s), backend="aot_eager",
                             fullgraph=True)  # fmt: skip
    inputs = qkv_inputs(1, 9, 9, 2, 2, 16, torch.float32, device)
    for scale in (0.3, 0.4, 0.5):
        torch.testing.assert_close(compiled(*inputs, scale), flash_attn_func(*inputs, softmax_scale=scale))


def test_first_call_compiled_in_fresh_process():
    """The very first flashtile call of a process happening under torch.compile (regression:
    backends used to be registered lazily inside the traced code, too late for the op)."""
    code = textwrap.dedent(
        """
        import torch, flashtile
        q, k, v = (torch.randn(1, 8, 2, 16) for _ in range(3))
        f = torch.compile(lambda q, k, v: flashtile.flash_attn_func(q, k, v), backend="eager", fullgraph=True)
        torch.testing.assert_close(f(q, k, v), flashtile.flash_attn_func(q, k, v))
        print("ok")
        """
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# opcheck


def _fwd_args(backend, device, *, varlen=False, options=False, sink=False):
    if varlen:
        q = torch.randn(1, 20, 4, 16, device=device)
        k, v = torch.randn(1, 25, 2, 16, device=device), torch.randn(1, 25, 2, 16, device=device)
        cq, ck, mq, mk = cu_seqlens([5, 15], device), cu_seqlens([10, 15], device), 15, 15
        alibi = make_alibi("bh", 2, 4, device)
    else:
        q, k, v = qkv_inputs(2, 9, 11, 4, 2, 16, torch.float32, device)
        cq = ck = None
        mq = mk = 0
        alibi = None
    q, k, v = leaves(q, k, v)
    seed = torch.tensor(1234, dtype=torch.int64) if options else None
    window, softcap, p = ((3, -1), 2.0, 0.25) if options else ((-1, 0), 0.0, 0.0)
    call = AttnCall(softmax_scale=0.25, window_left=window[0], window_right=window[1], softcap=softcap, dropout_p=p,
                    deterministic=True, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=mq, max_seqlen_k=mk,
                    alibi_slopes=alibi, seed=seed,
                    learnable_sink=torch.randn(4, device=device).requires_grad_() if sink else None)  # fmt: skip
    return (q, k, v, *ops.flatten(call), backend)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
@pytest.mark.parametrize("options", [False, True], ids=["causal", "dropout-window-softcap"])
def test_opcheck_fwd(backend, device, varlen, options):
    args = _fwd_args(backend, device, varlen=varlen, options=options)
    torch.library.opcheck(torch.ops.flashtile.attn_fwd.default, args)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_opcheck_fwd_sink(backend, device, varlen):
    """A differentiable carrier field (the sink logits) gets its gradient through the op."""
    args = _fwd_args(backend, device, varlen=varlen, options=varlen, sink=True)
    torch.library.opcheck(torch.ops.flashtile.attn_fwd.default, args)


@pytest.mark.parametrize("sink", [False, True], ids=["no-sink", "sink"])
def test_opcheck_bwd(backend, device, sink):
    args = _fwd_args(backend, device, varlen=True, options=True, sink=sink)
    out, lse = torch.ops.flashtile.attn_fwd.default(*args)
    q, k, v, *rest = args
    rest = [x.detach() if isinstance(x, torch.Tensor) else x for x in rest]
    bargs = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, *rest)
    torch.library.opcheck(torch.ops.flashtile.attn_bwd.default, bargs)
