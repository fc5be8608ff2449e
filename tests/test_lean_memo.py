"""The entry points' signature memos and the Triton launchers' prepared launches (issue 16): a
memo hit gives what the full path gives, any keyed attribute changed misses, input the checks
reject is still rejected with the same error, and a prepared launch calls the compiled kernel
exactly as the lean launch does."""

from __future__ import annotations

import pytest
import torch
from conftest import fake_compiled, install_fake_triton_kernels  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode

import flashtile
from flashtile import dispatch, interface, kvcache
from flashtile.testing import qkv_inputs


@pytest.fixture
def torch_backend():
    interface._MEMO.clear()
    kvcache._MEMO.clear()
    with flashtile.use_backend("torch"):
        yield
    interface._MEMO.clear()
    kvcache._MEMO.clear()


@pytest.fixture
def count_slow(monkeypatch):
    """Counts the calls that take the full (checking) path of each entry point."""
    n = {"dense": 0, "kv": 0}
    run, kv = interface._run, kvcache._kvcache

    def run_spy(*a, **kw):
        n["dense"] += 1
        return run(*a, **kw)

    def kv_spy(*a, **kw):
        n["kv"] += 1
        return kv(*a, **kw)

    monkeypatch.setattr(interface, "_run", run_spy)
    monkeypatch.setattr(kvcache, "_kvcache", kv_spy)
    return n


def _no_memo(monkeypatch):
    monkeypatch.setattr(interface, "_memo_key", lambda *a: None)
    monkeypatch.setattr(kvcache, "_memo_key", lambda *a: None)


# ----------------------------------------------------------------------------------------------
# dense entry points


@pytest.mark.parametrize("grad", [False, True])
def test_dense_hit_equals_full_path(torch_backend, count_slow, monkeypatch, grad):
    q, k, v = qkv_inputs(2, 37, 45, 4, 2, 40, torch.float32, "cpu")
    opts = dict(causal=True, softcap=3.0, window_size=(20, 0), return_attn_probs=True)

    def run():
        xs = [x.detach().clone().requires_grad_(grad) for x in (q, k, v)]
        out, lse, p = flashtile.flash_attn_func(*xs, **opts)
        gs = torch.autograd.grad(out, xs, torch.ones_like(out).sin_()) if grad else ()
        return out.detach(), lse, p, gs

    first, second, third = run(), run(), run()
    assert count_slow["dense"] == 1  # the later calls were hits
    _no_memo(monkeypatch)
    ref = run()
    assert count_slow["dense"] == 2
    for got in (first, second, third):
        torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
        torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)
        assert got[2] is None and ref[2] is None
        for a, b in zip(got[3], ref[3], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_window_lists_share_the_tuples_signature(torch_backend, count_slow):
    q, k, v = qkv_inputs(1, 6, 7, 4, 2, 16, torch.float32, "cpu")
    a = flashtile.flash_attn_func(q, k, v, window_size=(2, 1))
    b = flashtile.flash_attn_func(q, k, v, window_size=[2, 1])
    assert count_slow["dense"] == 1
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    for bad in ([2.0, 1], [2, 1, 0]):
        with pytest.raises(ValueError, match="window_size"):
            flashtile.flash_attn_func(q, k, v, window_size=bad)


def test_dense_memo_ignores_batch_and_lengths(torch_backend, count_slow):
    """Batch and sequence lengths are not keyed (checks and dispatch do not depend on them, save
    their relations, checked on every hit): generation's growing key length still hits."""
    for sk in (5, 6, 7, 30):
        q, k, v = qkv_inputs(1, 1, sk, 4, 2, 16, torch.float32, "cpu")
        flashtile.flash_attn_func(q, k, v, causal=True)
    q, k, v = qkv_inputs(3, 2, 9, 4, 2, 16, torch.float32, "cpu")
    flashtile.flash_attn_func(q, k, v, causal=True)
    assert count_slow["dense"] == 1


@pytest.mark.parametrize(
    "change",
    ["dtype", "heads", "headdim", "vdim", "causal", "softcap", "scale", "scale_type", "window", "window_type",
     "deterministic", "dropout_type", "softcap_type", "causal_type", "deterministic_type", "backend", "clear"],
)  # fmt: skip
def test_dense_keyed_attributes_miss(torch_backend, count_slow, change):
    q, k, v = qkv_inputs(1, 6, 7, 4, 2, 16, torch.float32, "cpu")
    opts = dict(causal=False, softcap=0.0, softmax_scale=0.25, window_size=(-1, -1), deterministic=False)
    flashtile.flash_attn_func(q, k, v, **opts)
    flashtile.flash_attn_func(q, k, v, **opts)
    assert count_slow["dense"] == 1
    if change == "dtype":
        q, k, v = (x.double().float().half() for x in (q, k, v))
    elif change == "heads":
        q, k, v = qkv_inputs(1, 6, 7, 4, 1, 16, torch.float32, "cpu")
    elif change == "headdim":
        q, k, v = qkv_inputs(1, 6, 7, 4, 2, 8, torch.float32, "cpu")
    elif change == "vdim":
        v = torch.randn(1, 7, 2, 8)
    elif change in ("causal", "softcap", "deterministic"):
        opts[change] = {"causal": True, "softcap": 2.0, "deterministic": True}[change]
    elif change == "scale":
        opts["softmax_scale"] = 0.5
    elif change == "scale_type":
        opts["softmax_scale"] = None
    elif change == "window":
        opts["window_size"] = (3, 3)
    elif change == "window_type":  # equal to (-1, -1) and hashing alike: must still be rejected
        with pytest.raises(ValueError, match="window_size"):
            flashtile.flash_attn_func(q, k, v, **{**opts, "window_size": (-1.0, -1)})
        assert count_slow["dense"] == 2
        return
    elif change == "dropout_type":
        opts["dropout_p"] = 0  # an int: another signature (the same results)
    elif change.endswith("_type"):  # equal to the first call's option and hashing alike: another signature
        name = change[: -len("_type")]
        opts[name] = {"softcap": 0, "causal": 0, "deterministic": 0}[name]
    if change == "backend":
        with flashtile.use_backend("auto"):
            flashtile.flash_attn_func(q, k, v, **opts)
    elif change == "clear":
        dispatch.clear_cache()
        flashtile.flash_attn_func(q, k, v, **opts)
    else:
        flashtile.flash_attn_func(q, k, v, **opts)
    assert count_slow["dense"] == 2


def _error(fn):
    with pytest.raises(Exception) as e:
        fn()
    return type(e.value), str(e.value)


def test_dense_rejected_input_still_rejected(torch_backend, count_slow, monkeypatch):
    """Input the checks reject raises the same error whether or not its signature was seen."""
    q, k, v = qkv_inputs(2, 6, 7, 4, 2, 16, torch.float32, "cpu")
    bad = {
        "batch": lambda: flashtile.flash_attn_func(q, k[:1], v[:1]),
        "kv lengths": lambda: flashtile.flash_attn_func(q, k, v[:, :5]),
        "window floats": lambda: flashtile.flash_attn_func(q, k, v, window_size=(-1.0, -1)),
        "window list": lambda: flashtile.flash_attn_func(q, k, v, window_size=[1, 2, 3]),
        "nan softcap": lambda: flashtile.flash_attn_func(q, k, v, softcap=float("nan")),
        "0-d": lambda: flashtile.flash_attn_func(torch.tensor(1.0), k, v),
        "strided": lambda: flashtile.flash_attn_func(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v),
        "packed": lambda: flashtile.flash_attn_kvpacked_func(q, torch.stack((k, v[:, :5].repeat(1, 2, 1, 1)[:, :7]),
                                                                            dim=2)[:1]),
    }  # fmt: skip
    flashtile.flash_attn_func(q, k, v)
    flashtile.flash_attn_func(q, k, v)
    memo_errors = {name: _error(fn) for name, fn in bad.items()}
    _no_memo(monkeypatch)
    assert memo_errors == {name: _error(fn) for name, fn in bad.items()}


def test_empty_inputs_with_other_last_strides_are_not_memoised(torch_backend, count_slow):
    """check_qkv lets a last stride other than 1 through on an empty tensor only: such a signature
    must not let a later non-empty call through."""
    q = torch.randn(1, 4, 2, 16)
    k = torch.randn(1, 0, 2, 32)[..., ::2]  # empty, last stride 2
    for _ in range(2):
        flashtile.flash_attn_func(q, k, k)
    assert not interface._MEMO
    k2 = torch.randn(1, 5, 2, 32)[..., ::2]
    with pytest.raises(ValueError, match="contiguous in its last dimension"):
        flashtile.flash_attn_func(q, k2, k2)


def test_packed_entry_points_hit(torch_backend, count_slow):
    qkv = torch.randn(2, 9, 3, 4, 16)
    a = flashtile.flash_attn_qkvpacked_func(qkv, causal=True)
    b = flashtile.flash_attn_qkvpacked_func(qkv, causal=True)
    q, k, v = qkv.unbind(2)
    c = flashtile.flash_attn_kvpacked_func(q, torch.stack((k, v), dim=2), causal=True)
    assert count_slow["dense"] == 1  # one signature for the three (same views' metadata)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)


def test_memo_off_under_modes_and_for_subclasses(torch_backend, count_slow):
    q, k, v = qkv_inputs(1, 6, 7, 4, 2, 16, torch.float32, "cpu")
    flashtile.flash_attn_func(q, k, v)

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Watch():
        flashtile.flash_attn_func(q, k, v)
    assert count_slow["dense"] == 2
    p = torch.nn.Parameter(q.clone(), requires_grad=False)
    flashtile.flash_attn_func(p, k, v)
    assert count_slow["dense"] == 3
    with torch.autograd.profiler.profile():
        flashtile.flash_attn_func(q, k, v)
    assert count_slow["dense"] == 4
    flashtile.flash_attn_func(q, k, v)
    assert count_slow["dense"] == 4


def test_memo_skips_calls_with_tensors_or_dropout(torch_backend, count_slow):
    q, k, v = qkv_inputs(1, 6, 7, 4, 2, 16, torch.float32, "cpu")
    for _ in range(2):
        flashtile.flash_attn_func(q, k, v, alibi_slopes=torch.rand(4))
        flashtile.flash_attn_func(q, k, v, learnable_sink=torch.randn(4))
        flashtile.flash_attn_func(q, k, v, dropout_p=0.1)
    assert count_slow["dense"] == 6 and not interface._MEMO


# ----------------------------------------------------------------------------------------------
# flash_attn_with_kvcache


def _kv_inputs():
    torch.manual_seed(0)
    q = torch.randn(2, 1, 4, 16)
    kc, vc = torch.randn(2, 20, 2, 16), torch.randn(2, 20, 2, 16)
    kn, vn = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    return q, kc, vc, kn, vn


@pytest.mark.parametrize("lens", ["int", "none", "tensor"])
@pytest.mark.parametrize("new", [False, True])
def test_kvcache_hit_equals_full_path(torch_backend, count_slow, monkeypatch, lens, new):
    q, kc, vc, kn, vn = _kv_inputs()

    def run(step):
        kcc, vcc = kc.clone(), vc.clone()
        n = {"int": 10 + step, "none": None, "tensor": torch.tensor([10 + step, 3 + step], dtype=torch.int32)}[lens]
        if lens == "none" and new:
            n = None
        out, lse = flashtile.flash_attn_with_kvcache(q, kcc, vcc, kn if new else None, vn if new else None,
                                                     cache_seqlens=n, causal=True, return_softmax_lse=True)  # fmt: skip
        return out, lse, kcc, vcc

    got = [run(s) for s in range(3)]
    assert count_slow["kv"] == 1
    _no_memo(monkeypatch)
    ref = [run(s) for s in range(3)]
    for a, b in zip(got, ref, strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_kvcache_rejected_input_still_rejected(torch_backend, count_slow, monkeypatch):
    q, kc, vc, kn, vn = _kv_inputs()
    flashtile.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=5)
    flashtile.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=6)
    assert count_slow["kv"] == 1
    bad = {
        "negative": lambda: flashtile.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=-1),
        "full": lambda: flashtile.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=20),
        "bool": lambda: flashtile.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=True),
        "float": lambda: flashtile.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=5.0),
        "int64 lens": lambda: flashtile.flash_attn_with_kvcache(q, kc, vc, kn, vn,
                                                                cache_seqlens=torch.tensor([1, 2])),
        "k only": lambda: flashtile.flash_attn_with_kvcache(q, kc, vc, kn, None, cache_seqlens=5),
        "splits": lambda: flashtile.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=5, num_splits=-1),
        "window": lambda: flashtile.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=5,
                                                            window_size=(-1.0, -1)),
    }  # fmt: skip
    memo_errors = {name: _error(fn) for name, fn in bad.items()}
    _no_memo(monkeypatch)
    assert memo_errors == {name: _error(fn) for name, fn in bad.items()}
    kg = kc.clone().requires_grad_()
    with pytest.raises(ValueError, match="requires grad"):
        flashtile.flash_attn_with_kvcache(q, kg, vc, kn, vn, cache_seqlens=5)


@pytest.mark.parametrize("change", ["lens_kind", "splits", "causal", "new_len", "cache_len", "backend"])
def test_kvcache_keyed_attributes_miss(torch_backend, count_slow, change):
    q, kc, vc, kn, vn = _kv_inputs()
    opts = dict(cache_seqlens=5, causal=False, num_splits=0)
    flashtile.flash_attn_with_kvcache(q, kc, vc, kn, vn, **opts)
    flashtile.flash_attn_with_kvcache(q, kc, vc, kn, vn, **opts)
    assert count_slow["kv"] == 1
    if change == "lens_kind":
        opts["cache_seqlens"] = torch.tensor([5, 5], dtype=torch.int32)
    elif change == "splits":
        opts["num_splits"] = 2
    elif change == "causal":
        opts["causal"] = True
    elif change == "new_len":
        kn, vn = torch.randn(2, 2, 2, 16), torch.randn(2, 2, 2, 16)
    elif change == "cache_len":
        kc, vc = torch.randn(2, 24, 2, 16), torch.randn(2, 24, 2, 16)
    if change == "backend":
        dispatch.clear_cache()
    flashtile.flash_attn_with_kvcache(q, kc, vc, kn, vn, **opts)
    assert count_slow["kv"] == 2


# ----------------------------------------------------------------------------------------------
# prepared launches (fastlaunch.FastKernel.prepare)

triton = pytest.importorskip("triton")
from test_lean import JITFunction as _LeanJIT  # noqa: E402  (the fake kernel; fake_driver: conftest)
from test_lean import _param, decode_case, plan_case  # noqa: E402

from flashtile.backends.triton import fastlaunch  # noqa: E402


class JITFunction(_LeanJIT):  # (the name the launcher checks) test_lean's fake with these parameters
    params = [_param("x"), _param("y"), _param("z"), _param("n"), _param("BLOCK", True), _param("W", default=None),
              _param("FLAG", True, default=False)]  # fmt: skip


def test_prepared_launch_equals_the_lean_launch(fake_driver, monkeypatch):
    fn = JITFunction()
    k = fastlaunch.fast(fn)
    x, y = torch.zeros(8), torch.zeros(8)
    k[(3, 2)](x, y, None, 5, BLOCK=16, num_warps=4)
    prep = k.prepare((3, 2), (x, y, None, 5), dict(BLOCK=16, num_warps=4), 3)
    assert prep is not None
    x2, y2 = torch.zeros(8), torch.zeros(8)
    k[(3, 2)](x2, y2, None, 5, BLOCK=16, num_warps=4)  # the lean launch
    prep(x2, y2, None)
    assert [e[0] for e in fn.log] == ["generic", "fast", "fast"]
    assert fn.log[1][1] == fn.log[2][1] == (3, 2, 1, 1234, "fn-handle", "meta", None, None, None, x2, y2, None, 5, 16,
                                            None, False)  # fmt: skip
    # what the key read from the leading arguments changed: the launch takes FastKernel.launch
    prep(x[1:], y, None)  # unaligned
    prep(x, y, torch.zeros(8))  # a tensor where None was
    assert [e[0] for e in fn.log[3:]] == ["generic", "generic"]
    monkeypatch.setattr(fake_driver, "get_current_device", lambda: 1)  # another device
    prep(x, y, None)
    assert fn.log[-1][0] == "generic"
    monkeypatch.setattr(fake_driver, "get_current_device", lambda: 0)
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", lambda *a: None)
    prep(x, y, None)
    assert fn.log[-1][0] == "generic"


def test_prepare_declines_unaligned_or_disabled(fake_driver, monkeypatch):
    fn = JITFunction()
    k = fastlaunch.fast(fn)
    x = torch.zeros(8)
    k[(1,)](x[1:], x, None, 5, BLOCK=16)
    assert k.prepare((1,), (x[1:], x, None, 5), dict(BLOCK=16), 3) is None
    assert k.prepare((1,), (x, x, None, 5), dict(BLOCK=16), 3) is None  # never launched: nothing compiled
    k[(1,)](x, x, x, 5, BLOCK=16)
    assert k.prepare((1,), (x, x, x, 5), dict(BLOCK=16), 2) is None  # a tensor after the leading arguments
    monkeypatch.setattr(fastlaunch, "ENABLED", False)
    assert fastlaunch.fast(fn).prepare((1,), (x, x, None, 5), dict(BLOCK=16), 3) is None


def _fake_kernels(monkeypatch):
    """The Triton launchers' kernels as fake JITFunctions of their real parameters whose compiled
    launcher records its arguments (tensors as dtype and size)."""
    from flashtile.backends.triton import launch

    log = []

    def run(name, args):
        # tensors by dtype and size (the one-piece decode plan passes out itself where the first
        # launch passed its (1, ...) view: same address, strides from the plan)
        log.append((name, tuple((a.dtype, a.numel()) if isinstance(a, torch.Tensor) else a for a in args)))

    install_fake_triton_kernels(monkeypatch, fake_compiled(run))
    launch._PLANS.clear()
    return log


@pytest.mark.parametrize("atomic", [False, True])
def test_planned_prepared_launches_repeat_the_first(monkeypatch, atomic):
    """Forward and backward: the first (unplanned, generic) launch, the planned prepared launches
    of later calls -- same kernels, grids, streams and arguments (tensors by dtype and size)."""
    from flashtile.backends.triton import launch

    log = _fake_kernels(monkeypatch)
    q, k, v, call = plan_case(monkeypatch, atomic)
    runs = []
    for i in range(3):
        n0 = len(log)
        out, lse = launch.forward(q, k, v, call)
        launch.backward(torch.randn_like(out), q, k, v, out, lse, call)
        runs.append(log[n0:])
        if i == 0:  # prepared at the plan's first reuse only (a plan never reused pays nothing for it)
            assert all(p[-1] is launch.PENDING for p in launch._PLANS.values())
    assert runs[0] == runs[1] == runs[2]
    plans = list(launch._PLANS.values())
    assert len(plans) == 2 and plans[0][-1] is not None and plans[1][-1] is not None  # prepared
    assert launch._FWD.fast_launches == 2 and launch._BWD_DKDV.fast_launches == 2


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("splits", [1, 3])
def test_decode_prepared_launches_repeat_the_first(monkeypatch, splits, fused):
    from flashtile.backends.triton import launch_decode

    log = _fake_kernels(monkeypatch)
    monkeypatch.setattr(launch_decode, "FUSED_MERGE", fused)  # (the merge inside the decode kernel, or its own)
    q, cache, call = decode_case(splits)
    runs = []
    for _ in range(3):
        n0 = len(log)
        launch_decode.kvcache(q, cache, call)
        runs.append(log[n0:])
    assert runs[0] == runs[1] == runs[2]
    assert [e[0] for e in runs[0]] == (["_DECODE"] if splits == 1 or fused else ["_DECODE", "_MERGE"])
    assert launch_decode._DECODE.fast_launches == 2
