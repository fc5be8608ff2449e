"""The lean call path (issue 16): the eager fast path of the ops gives what the custom ops give,
the Triton launch cache's key refines Triton's own specialisation and launches with Triton's
argument order, the dispatch cache follows what determines the choice, and the dropout seed needs
no device read."""

from __future__ import annotations

import importlib
import inspect
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import flashtile
from flashtile import dispatch, ops
from flashtile.spec import AttnCall, make_call
from flashtile.testing import qkv_inputs

# ----------------------------------------------------------------------------------------------
# ops: eager fast path == the custom ops


def _grads(fn, inputs):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*xs)
    dout = torch.arange(out.numel(), dtype=out.dtype).reshape(out.shape).sin()
    return (out.detach(), *torch.autograd.grad(out, xs, dout))


@pytest.mark.parametrize("sink", [False, True])
def test_fast_path_matches_the_ops(sink):
    torch.manual_seed(0)
    q, k, v = qkv_inputs(2, 13, 21, 4, 2, 16, torch.float32, "cpu")
    s = torch.randn(4) if sink else None
    call = AttnCall(softmax_scale=0.3, window_left=5, window_right=0, softcap=2.0)

    def via(path):
        def fn(q, k, v, *rest):
            c = call if not rest else AttnCall(**{**call.__dict__, "learnable_sink": rest[0]})
            if path == "op":
                return ops.attn_fwd(q, k, v, *ops.flatten(c), "torch")[0]
            assert ops._fast_path(q, k, v)
            return ops.attention(q, k, v, c, "torch")[0]

        return fn

    inputs = (q, k, v) + ((s,) if sink else ())
    fast, slow = _grads(via("fast"), inputs), _grads(via("op"), inputs)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_fast_path_is_taken_in_eager_and_not_under_a_dispatch_mode():
    q, k, v = qkv_inputs(1, 5, 5, 2, 2, 8, torch.float32, "cpu")
    seen = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    out = flashtile.flash_attn_func(q, k, v, causal=True)
    with Record():
        assert not ops._fast_path(q, k, v)
        out2 = flashtile.flash_attn_func(q, k, v, causal=True)
    assert any("flashtile.attn_fwd" in s for s in seen), seen
    torch.testing.assert_close(out, out2, rtol=0, atol=0)


def test_fast_path_no_grad_returns_no_graph():
    q, k, v = (x.requires_grad_() for x in qkv_inputs(1, 7, 7, 2, 1, 8, torch.float32, "cpu"))
    with torch.no_grad():
        out = flashtile.flash_attn_func(q, k, v)
    assert out.grad_fn is None and not out.requires_grad
    out = flashtile.flash_attn_func(q, k, v)
    assert out.grad_fn is not None


# ----------------------------------------------------------------------------------------------
# Triton launch cache

triton = pytest.importorskip("triton")
fastlaunch = importlib.import_module("flashtile.backends.triton.fastlaunch")


def test_key_refines_tritons_specialisation():
    """Two arguments with the same key get the same specialisation from Triton's own code."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    base = torch.zeros(64)
    values = [base, base[1:], base[4:], base.half(), base[8:].half(), None, 1.5, -2.0, True, False]
    ints = [0, 1, 2, 15, 16, 17, 32, -1, -16, -(1 << 31), (1 << 31) - 1, 1 << 31, (1 << 31) + 16,
            -(1 << 31) - 1, (1 << 63) - 1, 1 << 63, (1 << 63) + 16, 1 << 40]  # fmt: skip
    values += ints
    for a in values:
        for b in values:
            if type(a) is not type(b) or fastlaunch._arg_key(a) != fastlaunch._arg_key(b):
                continue
            for spec in (True, False):
                sa = native_specialize_impl(BaseBackend, a, False, spec, True)
                sb = native_specialize_impl(BaseBackend, b, False, spec, True)
                assert sa == sb, (a, b, sa, sb)


class _Compiled:
    function, packed_metadata = "fn-handle", "meta"

    def __init__(self, log):
        self.log = log

    def run(self, *args):
        self.log.append(("fast", args))


def _param(name, const=False, default=inspect.Parameter.empty):
    return types.SimpleNamespace(name=name, is_constexpr=const, default=default)


class JITFunction:  # the name the launcher checks; params as Triton's KernelParam
    params = [_param("x"), _param("n"), _param("y"), _param("BLOCK", True), _param("FLAG", True),
              _param("Z", default=None), _param("WIDE", True, default=0)]  # fmt: skip

    def __init__(self):
        self.log = []

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append(("generic", grid, args, kwargs))
            return _Compiled(self.log)

        return launch


def test_second_launch_calls_the_compiled_kernel_in_declaration_order(fake_driver):
    fn = JITFunction()
    k = fastlaunch.fast(fn)
    x, y = torch.zeros(8), torch.zeros(8)
    k[(3, 2)](x, 5, y, FLAG=True, BLOCK=64, num_warps=4)
    k[(4,)](x, 7, y, BLOCK=64, FLAG=True, num_warps=4)
    assert [e[0] for e in fn.log] == ["generic", "fast"]
    assert fn.log[1][1] == (4, 1, 1, 1234, "fn-handle", "meta", None, None, None, x, 7, y, 64, True, None, 0)
    # another constexpr, option, alignment or int class: Triton's launch again
    k[(4,)](x, 7, y, BLOCK=32, FLAG=True, num_warps=4)
    k[(4,)](x, 7, y, BLOCK=64, FLAG=True, num_warps=8)
    k[(4,)](x[1:], 7, y, BLOCK=64, FLAG=True, num_warps=4)
    k[(4,)](x, 16, y, BLOCK=64, FLAG=True, num_warps=4)
    k[(4,)](x, 1, y, BLOCK=64, FLAG=True, num_warps=4)
    assert [e[0] for e in fn.log[2:]] == ["generic"] * 5
    assert k.fast_launches == 1 and k.generic_launches == 6


def test_defaults_and_tensor_keywords_stay_on_the_fast_path(fake_driver):
    """Parameters left to their defaults are filled as Triton binds them (a kernel with defaulted
    parameters took the generic launch on every call before); a tensor passed by keyword enters
    the key by dtype and alignment only (new tensors each call: still one entry, still fast)."""
    fn = JITFunction()
    k = fastlaunch.fast(fn)
    x = torch.zeros(8)
    for _ in range(3):
        k[(2,)](x, 5, x, BLOCK=16, FLAG=False)
    assert [e[0] for e in fn.log] == ["generic", "fast", "fast"]
    assert fn.log[2][1][-2:] == (None, 0)
    for _ in range(3):
        z = torch.zeros(8)
        k[(2,)](x, 5, x, BLOCK=16, FLAG=False, Z=z, WIDE=2)
    assert [e[0] for e in fn.log[3:]] == ["generic", "fast", "fast"]
    assert fn.log[5][1][-2] is z and len(k.compiled) == 2
    k[(2,)](x, 5, x, BLOCK=16, FLAG=False, WIDE=3)  # another constexpr value: another kernel
    assert fn.log[-1][0] == "generic"


def test_launch_hooks_and_disabled_take_the_generic_launch(fake_driver, monkeypatch):
    fn = JITFunction()
    k = fastlaunch.fast(fn)
    x = torch.zeros(8)
    k[(1,)](x, 5, x, BLOCK=16, FLAG=False)
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", lambda *a: None)
    k[(1,)](x, 5, x, BLOCK=16, FLAG=False)
    chain = triton.knobs.HookChain()
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", chain)  # empty chain: no hook
    k[(1,)](x, 5, x, BLOCK=16, FLAG=False)
    chain.add(lambda *a: None)
    k[(1,)](x, 5, x, BLOCK=16, FLAG=False)
    assert [e[0] for e in fn.log] == ["generic", "generic", "fast", "generic"]
    monkeypatch.setattr(fastlaunch, "ENABLED", False)
    k2 = fastlaunch.fast(fn)
    k2[(1,)](x, 5, x, BLOCK=16, FLAG=False)
    k2[(1,)](x, 5, x, BLOCK=16, FLAG=False)
    assert [e[0] for e in fn.log[4:]] == ["generic", "generic"] and k2.generic_launches == 0


def test_non_jit_kernels_are_launched_as_given():
    class Interpreted:
        params = [_param("x")]

        def __init__(self):
            self.calls = 0

        def __getitem__(self, grid):
            def go(*a, **kw):
                self.calls += 1

            return go

    fn = Interpreted()
    k = fastlaunch.fast(fn)
    k[(1,)](1)
    k[(1,)](1)
    assert fn.calls == 2 and not k.fast


# ----------------------------------------------------------------------------------------------
# dispatch and dropout seed


def test_dispatch_cache_follows_the_environment(monkeypatch):
    q, k, v = qkv_inputs(1, 4, 4, 2, 2, 8, torch.float32, "cpu")
    monkeypatch.delenv("FLASHTILE_BACKEND", raising=False)
    flashtile.flash_attn_func(q, k, v)
    assert (
        dispatch.choose(dispatch.Problem.of(q, k, AttnCall(softmax_scale=1.0)), AttnCall(softmax_scale=1.0)) == "torch"
    )
    monkeypatch.setenv("FLASHTILE_BACKEND", "nonsense")
    with pytest.raises(ValueError, match="FLASHTILE_BACKEND"):
        flashtile.flash_attn_func(q, k, v)


def test_dropout_seed_reproducible_on_cpu():
    from flashtile.rng import draw_seed

    torch.manual_seed(3)
    a = int(draw_seed(torch.device("cpu")))
    torch.manual_seed(3)
    assert int(draw_seed(torch.device("cpu"))) == a == int(
        (torch.manual_seed(3), torch.randint(0, 2**62, (), dtype=torch.int64))[1]
    )


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@gpu
@pytest.mark.gpu
def test_dense_calls_do_not_sync_the_host():
    """Forward + backward with dropout, and a decode with an int cache length: no device sync
    (torch's sync debug mode raises on one)."""
    q, k, v = (x.requires_grad_() for x in qkv_inputs(2, 64, 64, 4, 2, 64, torch.float16, "cuda"))
    kc, vc = (torch.randn(2, 128, 2, 64, device="cuda", dtype=torch.float16) for _ in range(2))
    flashtile.flash_attn_func(q, k, v, dropout_p=0.1, causal=True).sum().backward()  # compile first
    flashtile.flash_attn_with_kvcache(q[:, :1].detach(), kc, vc, cache_seqlens=100, causal=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        torch.manual_seed(1)
        out = flashtile.flash_attn_func(q, k, v, dropout_p=0.1, causal=True)
        out.backward(torch.ones_like(out))
        flashtile.flash_attn_with_kvcache(q[:, :1].detach(), kc, vc, cache_seqlens=100, causal=True)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.manual_seed(1)
    again = flashtile.flash_attn_func(q, k, v, dropout_p=0.1, causal=True)
    torch.testing.assert_close(out, again, rtol=0, atol=0)


@gpu
@pytest.mark.parametrize("shape", [(1, 128, 8, 64), (1, 4096, 8, 64), (2, 1, 16, 128)],
                         ids=["triton", "gluon", "decode"])  # fmt: skip
def test_flat_calls_without_lse_on_the_gpu(shape):
    """Repeated no-grad calls (the flat path with the kept lse buffer once planned, whichever kernel
    serves the shape) give the output of the first call bitwise, and the same output and lse as
    calls that return the lse."""
    b, s, h, d = shape
    torch.manual_seed(0)
    q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b, 1024 if s == 1 else s, h // 4, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    first, lse, _ = flashtile.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    for _ in range(6):
        assert torch.equal(flashtile.flash_attn_func(q, k, v, causal=True), first)
        out2, lse2, _ = flashtile.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        assert torch.equal(out2, first) and torch.equal(lse2, lse)


@gpu
@pytest.mark.parametrize("layout", ["hf", "cat"])
def test_growing_keys_on_the_gpu(layout):
    """Decode-shaped calls whose keys grow every call (the runners' length-free plans: new strides
    each step, the tile config changing at 2k keys, the number of pieces changing) give, bitwise,
    what the memo-free full path gives, and match the fp32 oracle; once planned, no call syncs."""
    from flashtile import interface, kvcache
    from flashtile.testing import attention_ref

    torch.manual_seed(0)
    b, hk, d, dt = 2, 2, 128, torch.bfloat16
    kbig, vbig = (torch.randn(b, 2100, hk, d, device="cuda", dtype=dt) for _ in range(2))
    steps = [*range(1, 40), *range(1000, 1010), *range(2040, 2060)]
    calls = []
    for n in steps:
        q = torch.randn(b, 1, 8, d, device="cuda", dtype=dt)
        if layout == "hf":  # (b, hk, s, d) transposed, as Hugging Face's dynamic cache hands it over
            k, v = (x[:, :n].transpose(1, 2).contiguous().transpose(1, 2) for x in (kbig, vbig))
        else:
            k, v = (torch.cat([x[:, : n - 1], x[:, n - 1 : n]], dim=1) for x in (kbig, vbig))
        calls.append((q, k, v))
    for q, k, v in calls:  # plans made (their first calls may synchronise once: counters for graphs)
        flashtile.flash_attn_func(q, k, v, causal=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        got = [flashtile.flash_attn_func(q, k, v, causal=True) for q, k, v in calls]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len(interface._GROW) >= 1
    memo_key = (interface._memo_key, kvcache._memo_key)
    interface._memo_key = kvcache._memo_key = lambda *a: None
    try:
        for (q, k, v), g in zip(calls, got, strict=True):
            assert torch.equal(g, flashtile.flash_attn_func(q, k, v, causal=True))
            ref = attention_ref(q, k, v, causal=True)[0]
            low = attention_ref(q, k, v, causal=True, upcast=False)[0]
            assert (g.float() - ref).abs().max() <= 2 * (low.float() - ref).abs().max() + 1e-3
    finally:
        interface._memo_key, kvcache._memo_key = memo_key


# ----------------------------------------------------------------------------------------------
# flashtile warmup


def test_warmup_grid_calls_are_valid_api_calls(monkeypatch):
    """Every feature set's calls run (here on the torch engine; on a GPU they compile kernels)."""
    from flashtile.backends.hopper import GLUON_BWD_MIN_KEYS
    from flashtile.backends.triton.configs import _BWD_ONE_PASS, CAUSAL_SHORT_SEQLEN, ONE_PASS_MAX_ROWS, SHORT_SEQLEN
    from flashtile.cli import warmup

    tiny, short, mid, long = warmup._lengths()
    one = min(c.block_n1 for c in _BWD_ONE_PASS.values())
    assert tiny <= one and tiny * 2 <= ONE_PASS_MAX_ROWS  # the one-pass backward, with GQA (the grid's h / hk = 2)
    assert max(c.block_n1 for c in _BWD_ONE_PASS.values()) < short <= SHORT_SEQLEN < mid <= CAUSAL_SHORT_SEQLEN < long
    # the mid call stays on the Triton backward on sm_90; the long one reaches the Gluon one
    assert all(mid < n <= long for n in GLUON_BWD_MIN_KEYS.values() if n > 0)
    monkeypatch.setattr(warmup, "_lengths", lambda: (8, 16, 24, 40))  # small calls on the CPU
    for fs in warmup.parse_feature_sets("plain,causal+softcap,window+alibi,dropout,varlen+causal,decode+causal"):
        for call in warmup._calls(fs, 16, torch.float32, torch.device("cpu")):
            call()
    with pytest.raises(ValueError, match="unknown feature"):
        warmup.parse_feature_sets("causal+nope")


def test_warmup_on_cpu_has_nothing_to_do(capsys):
    from flashtile.cli import main

    assert main(["warmup", "--device", "cpu"]) == 0
    assert "nothing to warm up" in capsys.readouterr().out


def test_host_int_helpers_match_tritons():
    """The plain-Python cdiv / next_power_of_2 used on the host (Triton's are constexpr functions,
    microseconds a call) agree with Triton's."""
    from flashtile.backends._ints import cdiv, next_power_of_2

    for a in [0, 1, 2, 15, 16, 17, 127, 128, 129, 8191, 8192, 8193, 10**9 + 7]:
        assert next_power_of_2(a) == triton.next_power_of_2(a), a
        for b in (1, 2, 16, 64, 128, 129):
            assert cdiv(a, b) == triton.cdiv(a, b), (a, b)


# ----------------------------------------------------------------------------------------------
# second pass (helper lean2): the fast launch key, launch plans, the autograd.Function


def test_fast_key_equals_the_reference_key():
    """FastKernel's C-level key (types, gathers, memoised int classes) distinguishes exactly what
    the per-argument reference key does, for argument tuples of the same types."""
    fn = JITFunction()
    k = fastlaunch.fast(fn)
    base = torch.zeros(64)
    tensors = [base, base[1:], base[4:], base.half(), base[8:].half()]
    ints = [0, 1, 2, 16, 17, 32, -16, (1 << 31) + 16, 1 << 40, (1 << 63) + 16]
    cases = []
    for t in tensors:
        for n in ints:
            for y in (tensors[0], tensors[3]):
                for z in (None, tensors[1]):
                    cases.append((t, n, y, 64, True, z, 0))
    cases += [(base, 5, base, 32, False, None, 1), (base, 5, base, 32, False, None, 2)]
    for a in cases:
        for b in cases:
            if tuple(map(type, a)) != tuple(map(type, b)):
                continue
            same_ref = k._key_part(a) == k._key_part(b)
            assert (k._fast_key_part(a) == k._fast_key_part(b)) == same_ref, (a, b)
    # types are part of the key: a float where an int was is another signature
    a, b = (base, 5, base, 32, False, None, 1), (base, 5.0, base, 32, False, None, 1)
    assert k._fast_key_part(a) != k._fast_key_part(b)


def _record(monkeypatch, mod, names):
    """Replace ``mod``'s kernels with recorders: (kernel, grid, args with tensors as their dtype, kwargs)."""
    log = []

    class Rec:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            def go(*args, **kw):
                args = tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args)
                log.append((self.name, tuple(grid), args, kw))

            return go

        def prepare(self, grid, args, kw, lead):  # no prepared launch: plans launch through __getitem__
            return None

    for n in names:
        monkeypatch.setattr(mod, n, Rec(n))
    return log


def plan_case(monkeypatch, atomic: bool):
    """(q, k, v, call) of the lean-launch forward/backward tests: fp16 2 x 37 / 45 tokens, h4 / hk2,
    d40, causal + softcap; ``atomic``: the Triton backward table answers with an atomic-dQ config."""
    from flashtile.backends.triton import configs
    from flashtile.spec import make_call

    if atomic:
        cfg = configs.BwdConfig(64, 64, 64, 64, 4, 2, 4, 2, atomic_dq=True)
        monkeypatch.setattr(configs, "bwd_config", lambda *a, **kw: cfg)
    q, k, v = qkv_inputs(2, 37, 45, 4, 2, 40, torch.float16, "cpu")
    return q, k, v, make_call(headdim=40, causal=True, softcap=2.0)


@pytest.mark.parametrize("mode", ["three", "atomic", "one"])
def test_launch_plans_repeat_the_first_launch(monkeypatch, mode):
    """A repeated tensor-free call takes its plan (no geometry, config or argument work) and
    launches exactly what the first, unplanned call launched: same kernels, grids, non-tensor
    arguments, tensor dtypes and keywords; and output shapes. Modes of the backward: the three
    passes, atomic dQ (two), and one pass (the keys fit in one block: the dK/dV kernel alone)."""
    from flashtile.backends.triton import launch
    from flashtile.spec import make_call

    log = _record(monkeypatch, launch, ("_FWD", "_BWD_PRE", "_BWD_DKDV", "_BWD_DQ"))
    monkeypatch.setattr(launch, "arch", lambda device: "sm90")
    monkeypatch.setattr(launch, "ONE_PASS", mode == "one")
    launch._PLANS.clear()
    atomic = mode == "atomic"
    q, k, v, call = plan_case(monkeypatch, atomic)
    runs = []
    for _ in range(3):
        n0 = len(log)
        out, lse = launch.forward(q, k, v, call)
        dout = torch.randn_like(out)
        grads = launch.backward(dout, q, k, v, out, lse, call)
        runs.append((log[n0:], [tuple(t.shape) for t in (out, lse, *grads[:3])]))
    assert len(launch._PLANS) == 2  # one forward plan, one backward plan
    assert runs[0] == runs[1] == runs[2]
    names = [e[0] for e in runs[0][0]]
    assert names == {"atomic": ["_FWD", "_BWD_PRE", "_BWD_DKDV"], "three": ["_FWD", "_BWD_PRE", "_BWD_DKDV", "_BWD_DQ"],
                     "one": ["_FWD", "_BWD_DKDV"]}[mode]  # fmt: skip
    # calls holding tensors are not planned (new objects per call), and a planned call's entry
    # is found only by the same call object
    alibi = torch.rand(2, 4)
    launch.forward(q, k, v, make_call(headdim=40, causal=True, alibi_slopes=alibi))
    assert len(launch._PLANS) == 2


def decode_case(splits: int):
    """(q, cache, call) of a small fp16 decode (2 x 1 query, 300-token cache of which 250 filled,
    h8 / hk2, d64, causal) with ``splits`` key splits: the lean-launch decode tests' call."""
    from flashtile.spec import KVCache, make_call

    q = torch.randn(2, 1, 8, 64, dtype=torch.float16)
    kc, vc = (torch.randn(2, 300, 2, 64, dtype=torch.float16) for _ in range(2))
    cache = KVCache(k_cache=kc, v_cache=vc, k_new=None, v_new=None, seqlens=250, batch_idx=None, leftpad=None,
                    block_table=None, rotary=None, capacity=300, num_splits=splits)  # fmt: skip
    return q, cache, make_call(headdim=64, causal=True)


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_plans_repeat_the_first_launch(monkeypatch, splits, fused):
    from flashtile.backends.triton import launch, launch_decode

    log = _record(monkeypatch, launch_decode, ("_DECODE", "_MERGE", "_APPEND"))
    launch._PLANS.clear()
    monkeypatch.setattr(launch_decode, "FUSED_MERGE", fused)  # (the merge inside the decode kernel, or its own)
    q, cache, call = decode_case(splits)
    runs = []
    for _ in range(3):
        n0 = len(log)
        out, lse = launch_decode.kvcache(q, cache, call)
        runs.append((log[n0:], tuple(out.shape), tuple(lse.shape)))
    assert len(launch._PLANS) == 1
    assert runs[0] == runs[1] == runs[2]
    assert [e[0] for e in runs[0][0]] == (["_DECODE"] if splits == 1 or fused else ["_DECODE", "_MERGE"])


def test_fast_path_backward_without_materialised_lse_grad():
    """The autograd.Function does not materialise lse's (unused) gradient; gradients through out
    are those of the ops, and a graph using lse only has no gradient path (lse is not differentiable)."""
    q, k, v = (x.requires_grad_() for x in qkv_inputs(1, 9, 11, 2, 1, 8, torch.float32, "cpu"))
    call = AttnCall(softmax_scale=0.4, window_right=0)
    out, lse = ops.attention(q, k, v, call, "torch")
    assert not lse.requires_grad and out.grad_fn is not None
    g = torch.autograd.grad(out.sum(), (q, k, v))
    qs, ks, vs = (x.detach().requires_grad_() for x in (q, k, v))
    ref = ops.attn_fwd(qs, ks, vs, *ops.flatten(call), "torch")[0]
    for a, b in zip(g, torch.autograd.grad(ref.sum(), (qs, ks, vs)), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gluon_descriptors_keyed_as_triton_specialises_them(fake_driver):
    """Gluon kernels take the lean launch too: a host TensorDescriptor enters the key by what
    Triton specialises it on (dtype, block shape, layout) and its padding, so new descriptors of
    new tensors each call stay on one compiled kernel; equal keys mean equal specialisations."""
    gluon = pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    gl = pytest.importorskip("triton.experimental.gluon.language")
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    def desc(t, block, sw=128):
        lay = gl.NVMMASharedLayout(swizzle_byte_width=sw, element_bitwidth=8 * t.element_size(), rank=t.dim())
        return gluon.TensorDescriptor(t, list(t.shape), list(t.stride()), block, lay)

    ds = [desc(torch.zeros(2, 128, 4, 64, dtype=torch.float16), [1, 64, 1, 64]),
          desc(torch.zeros(3, 100, 2, 64, dtype=torch.float16), [1, 64, 1, 64]),
          desc(torch.zeros(2, 128, 4, 64, dtype=torch.float16), [1, 128, 1, 64]),
          desc(torch.zeros(2, 128, 4, 64, dtype=torch.float16), [1, 64, 1, 64], sw=64),
          desc(torch.zeros(2, 128, 4, 64, dtype=torch.bfloat16), [1, 64, 1, 64]),
          desc(torch.zeros(2, 128, 4, 32, dtype=torch.float32), [1, 64, 1, 32])]  # fmt: skip
    for a in ds:
        for b in ds:
            if fastlaunch._desc_key(a) == fastlaunch._desc_key(b):
                assert native_specialize_impl(BaseBackend, a, False, True, True) == \
                    native_specialize_impl(BaseBackend, b, False, True, True)  # fmt: skip
    assert len({fastlaunch._desc_key(d) for d in ds}) == 5

    class GluonJITFunction(JITFunction):
        pass

    fn = GluonJITFunction()
    k = fastlaunch.fast(fn)
    x = torch.zeros(8)
    for i in range(3):
        d = desc(torch.zeros(2, 128 + 16 * i, 4, 64, dtype=torch.float16), [1, 64, 1, 64])
        k[(1,)](d, 5, x, BLOCK=16, FLAG=False)
    assert [e[0] for e in fn.log] == ["generic", "fast", "fast"] and fn.log[2][1][9] is d
def test_triton_bwd_table_causal_short_rule():
    """Causal calls of at most CAUSAL_SHORT_SEQLEN tokens at head dim 128 on sm_90 take their own
    backward tile (measured faster than FA2 there, the table's long tile was not); other calls
    keep the length tables."""
    from flashtile.backends.triton import configs

    bf = torch.bfloat16
    short = configs.bwd_config("sm90", 128, bf, configs.CAUSAL_SHORT_SEQLEN, causal=True)
    assert short == configs._BWD_CAUSAL_SHORT[("sm90", 128)]
    assert configs.bwd_config("sm90", 128, bf, 1024) == configs._BWD[("sm90", 128)]
    assert configs.bwd_config("sm90", 128, bf, 4096, causal=True) == configs._BWD[("sm90", 128)]
    assert configs.bwd_config("sm90", 64, bf, 1024, causal=True) == configs._BWD[("sm90", 64)]
    assert configs.bwd_config("sm80", 128, bf, 1024, causal=True) == configs._BWD[("sm80", 128)]


def test_triton_fwd_table_short_window_rule(monkeypatch):
    """Windowed calls whose rows see at most WINDOW_SHORT_SPAN keys take the short-window forward
    tile where the table has one (sm_90, head dim 64: measured faster there); unbounded or longer
    windows, other head dims and archs keep the length tables; the launcher passes the span."""
    from flashtile.backends.triton import configs, launch

    bf = torch.bfloat16
    short = configs._FWD_WINDOW_SHORT[("sm90", 64)]
    assert configs.fwd_config("sm90", 64, bf, 16384, 1025) == short
    assert configs.fwd_config("sm90", 64, bf, 16384, configs.WINDOW_SHORT_SPAN) == short
    assert configs.fwd_config("sm90", 64, bf, 16384, configs.WINDOW_SHORT_SPAN + 1) == configs._FWD[("sm90", 64)]
    assert configs.fwd_config("sm90", 64, bf, 16384) == configs._FWD[("sm90", 64)]
    assert configs.fwd_config("sm90", 128, bf, 16384, 1025) == configs._FWD[("sm90", 128)]
    assert configs.fwd_config("sm80", 64, bf, 16384, 1025) == configs._FWD[("sm80", 64)]
    assert configs.fwd_config("sm90", 64, torch.float32, 16384, 1025) == configs._FWD_FP32[64]
    from conftest import fake_compiled, install_fake_triton_kernels

    install_fake_triton_kernels(monkeypatch, fake_compiled(lambda name, args: None))
    spans = []
    real = configs.fwd_config
    monkeypatch.setattr(configs, "fwd_config", lambda *a: spans.append(a[4]) or real(*a))
    q = torch.randn(1, 40, 2, 64, dtype=torch.float16)
    for ws, causal in (((8, 0), True), ((5, 3), False), ((-1, -1), True), ((4, -1), False)):
        launch.forward(q, q, q, make_call(headdim=64, causal=causal, window_size=ws))
    assert spans == [9, 9, None, None]


def test_triton_one_pass_backward_rule(monkeypatch):
    """Dense backwards whose keys fit in one key block run as one launch of the dK/dV kernel
    (ONE_PASS, grid (1, nheads_k, batch), out in delta's slot, dq itself as DQ) on the sm_90 table,
    fp16 / bf16, at most ONE_PASS_MAX_ROWS query rows x group a program; the plan replays it as one
    prepared launch. Longer keys, more rows, fp32, sinks, dout with other strides than out, and
    ONE_PASS = False keep the three passes."""
    from conftest import plan_recorders

    from flashtile.backends.triton import configs, launch

    bf = torch.bfloat16
    one = configs._BWD_ONE_PASS[("sm90", 64)]
    assert configs.one_pass_config("sm90", 64, bf, 128, 128, 1) == one
    assert configs.one_pass_config("sm90", 64, bf, 128, one.block_n1 + 1, 1) is None
    assert configs.one_pass_config("sm90", 64, bf, configs.ONE_PASS_MAX_ROWS // 4, 64, 4) == one
    assert configs.one_pass_config("sm90", 64, bf, configs.ONE_PASS_MAX_ROWS // 4 + 1, 64, 4) is None
    assert configs.one_pass_config("sm90", 64, torch.float32, 128, 128, 1) is None
    assert configs.one_pass_config("sm80", 64, bf, 128, 128, 1) is None
    assert configs.one_pass_config("sm90", 256, bf, 128, 128, 1) is None
    monkeypatch.setattr(launch, "arch", lambda device: "sm90")
    log = plan_recorders(monkeypatch, launch, ("_BWD_PRE", "_BWD_DKDV", "_BWD_DQ"))

    def kernels(sq=128, sk=128, h=8, hk=8, dtype=torch.float16, sink=None, dout_t=False, **opts):
        launch.clear_plans()
        log.clear()
        q, k = torch.randn(1, sq, h, 64, dtype=dtype), torch.randn(1, sk, hk, 64, dtype=dtype)
        out, lse = torch.randn_like(q), torch.randn(1, h, sq)
        dout = torch.randn(1, h, sq, 64, dtype=dtype).transpose(1, 2) if dout_t else torch.randn_like(q)
        call = make_call(headdim=64, causal=True, learnable_sink=sink, **opts)
        launch.backward(dout, q, k, k, out, lse, call)
        return [(name, grid, kw.get("ONE_PASS", False)) for name, grid, _, kw, _ in log], (q, out, log)

    got, (q, out, raw) = kernels()
    assert got == [("_BWD_DKDV", (1, 8, 1), True)]
    args = raw[0][2]
    assert args[5] == out.dtype and args[8] == q.dtype  # out in delta's slot, dq (not an fp32 buffer) as DQ
    for three in (dict(sk=129), dict(sq=1024 + 1), dict(sq=257, hk=2), dict(dtype=torch.float32),
                  dict(sink=torch.zeros(8)), dict(dout_t=True)):  # fmt: skip
        assert [n for n, _, _ in kernels(**three)[0]][0] == "_BWD_PRE", three
    monkeypatch.setattr(launch, "ONE_PASS", False)
    assert [n for n, _, _ in kernels()[0]][0] == "_BWD_PRE"
    monkeypatch.setattr(launch, "ONE_PASS", True)
    # planned: the second call replays the plan (generic), the third prepared; one launch each
    launch.clear_plans()
    q, k = torch.randn(1, 128, 8, 64, dtype=bf), torch.randn(1, 128, 8, 64, dtype=bf)
    out, lse, call = torch.randn_like(q), torch.randn(1, 8, 128), make_call(headdim=64, causal=True)
    log.clear()
    for _ in range(3):
        launch.backward(out, q, k, k, out, lse, call)
    assert [(e[0], e[4]) for e in log] == [("_BWD_DKDV", "generic")] * 2 + [("_BWD_DKDV", "prepared")]
    assert log[0][1:4] == log[2][1:4]
