"""The entry points' flat path (issue 16): on a signature-memo hit, the runner the triton launcher
offered for the full signature allocates and launches. Checked here with the triton launchers'
kernels replaced by fakes whose compiled launcher writes, into each output, a checksum of the
inputs and of every scalar argument (so a wrong tensor, stride, scalar or config shows): the flat
path gives exactly what the full path gives with the memos off, raises the same errors, falls back
when anything keyed changes or a runner declines, and keeps autograd and the mode checks."""

from __future__ import annotations

import threading
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

triton = pytest.importorskip("triton")

from conftest import fake_compiled, install_fake_triton_kernels  # noqa: E402

import flashtile  # noqa: E402
from flashtile import dispatch, interface, kvcache  # noqa: E402
from flashtile.backends import base  # noqa: E402
from flashtile.backends.triton import backend as triton_backend  # noqa: E402
from flashtile.backends.triton import fastlaunch, launch, launch_decode  # noqa: E402

# output positions (declaration order) of each fake kernel
_OUTPUTS = {"_FWD": (3, 4), "_DECODE": (7, 8, 10, 11), "_MERGE": (2, 3), "_APPEND": (2, 3), "_BWD_PRE": (2,),
            "_BWD_DKDV": (6, 7, 8), "_BWD_DQ": (6,)}  # fmt: skip
# the error flag (and the fused merge's group counters): neither input nor output here
_SKIP = {"_DECODE": (9, 12), "_APPEND": (7,)}


def _checksum(args, outs, skip) -> float:
    s = 0.0
    for i, a in enumerate(args):
        if i in outs or i in skip:
            continue
        if isinstance(a, torch.Tensor):
            s += float(a.double().sum()) * (i + 1)
        elif isinstance(a, bool | int | float):
            s += float(a) * (i + 1)
    return s


@pytest.fixture
def fakes(monkeypatch):
    """The triton backend on CPU tensors with checksum-writing fake kernels; a log of launches."""
    log = []

    def run(name, args):
        kargs = args[9:]
        outs, skip = _OUTPUTS[name], _SKIP.get(name, ())
        s = _checksum(kargs, outs, skip) % 97.0
        for j, i in enumerate(outs):
            if isinstance(kargs[i], torch.Tensor):
                kargs[i].fill_(s + j)
        log.append((name, args[:3]))

    drv = install_fake_triton_kernels(monkeypatch, fake_compiled(run))
    monkeypatch.setattr(triton_backend, "available", lambda: None)
    monkeypatch.setattr(triton_backend, "supports", lambda problem, call: None)

    def clear():
        launch.clear_plans()
        launch_decode._SCRATCH.clear()
        for m in (interface._MEMO, interface._FLAT, interface._GROW, kvcache._MEMO, kvcache._FLAT):
            m.clear()
        dispatch.clear_cache()

    clear()
    with flashtile.use_backend("triton"):
        yield types.SimpleNamespace(log=log, drv=drv)
    clear()


def _memo_off(monkeypatch):
    monkeypatch.setattr(interface, "_memo_key", lambda *a: None)
    monkeypatch.setattr(kvcache, "_memo_key", lambda *a: None)


def _same(a, b):
    if isinstance(a, tuple | list):
        assert type(a) is type(b) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _same(x, y)
    elif a is None:
        assert b is None
    else:
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def _dense(seq=37, sk=45, d=40, hk=2, dtype=torch.float16):
    torch.manual_seed(0)
    q = torch.randn(2, seq, 4, d, dtype=dtype)
    k, v = (torch.randn(2, sk, hk, d, dtype=dtype) for _ in range(2))
    return q, k, v


# the forward kernel (37 rows) and the decode-shaped forward (1 row per KV head group: split-KV kernel)
_SHAPES = {"fwd": dict(seq=37), "decode_shaped": dict(seq=1, sk=300)}


@pytest.mark.parametrize("shape", list(_SHAPES))
@pytest.mark.parametrize("probs", [False, True])
def test_flat_dense_equals_full_path(fakes, monkeypatch, shape, probs):
    q, k, v = _dense(**_SHAPES[shape])
    opts = dict(causal=True, softcap=2.0, return_attn_probs=probs)
    got = [flashtile.flash_attn_func(q, k, v, **opts) for _ in range(5)]
    assert len(interface._FLAT) == 1  # adopted at a memo hit once the launch plan was prepared
    n = len(fakes.log)
    calls, fast = [], interface.attention_fast
    monkeypatch.setattr(interface, "attention_fast", lambda *a: calls.append(a) or fast(*a))
    again = flashtile.flash_attn_func(q, k, v, **opts)
    assert not calls and len(fakes.log) > n  # launched without the memo's path
    _memo_off(monkeypatch)
    ref = flashtile.flash_attn_func(q, k, v, **opts)
    for g in (*got, again):
        _same(g, ref)


@pytest.mark.parametrize("shape", list(_SHAPES))
def test_flat_dense_without_lse_writes_a_kept_buffer(fakes, monkeypatch, shape):
    # a flat call that drops the lse (no return_attn_probs, no autograd) has the kernel write it into
    # one kept buffer (launch_decode.lse_sink, per device / stream / thread) instead of a new tensor
    # each call; a call that returns it gets a fresh one; while a graph is captured, fresh too
    q, k, v = _dense(**_SHAPES[shape])
    for _ in range(4):
        flashtile.flash_attn_func(q, k, v, causal=True)
    assert len(interface._FLAT) == 1
    sinks = lambda: [t for key, t in launch_decode._SCRATCH.items() if "lse" in key]  # noqa: E731
    assert len(sinks()) == 1
    sink = sinks()[0]
    before = sink.clone()
    sink.fill_(-1.0)
    out = flashtile.flash_attn_func(q, k, v, causal=True)  # the kernel writes the kept buffer
    assert sinks() == [sink] and not torch.equal(sink, torch.full_like(sink, -1.0))
    torch.testing.assert_close(sink, before, rtol=0, atol=0)  # the same lse as the first call's
    _, lse, _ = flashtile.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert lse.data_ptr() != sink.data_ptr()
    monkeypatch.setattr(launch_decode, "_scratch_key", lambda dev: None)  # as while a graph is captured
    sink.fill_(-1.0)
    assert torch.equal(flashtile.flash_attn_func(q, k, v, causal=True), out)
    assert torch.equal(sink, torch.full_like(sink, -1.0))  # written elsewhere: a fresh tensor


def test_flat_dense_falls_back_when_the_signature_changes(fakes, monkeypatch):
    q, k, v = _dense()
    for _ in range(4):
        flashtile.flash_attn_func(q, k, v, causal=True)
    assert len(interface._FLAT) == 1
    variants = {
        "batch": tuple(x[:1] for x in (q, k, v)),
        "length": (q[:, :20], k, v),
        "strides": (q.transpose(1, 2).contiguous().transpose(1, 2), k, v),  # same shape, other strides
        "dtype": tuple(x.float() for x in (q, k, v)),
    }
    got = {name: [flashtile.flash_attn_func(*xs, causal=True) for _ in range(4)] for name, xs in variants.items()}
    got["option"] = [flashtile.flash_attn_func(q, k, v, causal=False) for _ in range(4)]
    assert len(interface._FLAT) == 1 + len(got)  # each its own signature
    _memo_off(monkeypatch)
    for name, xs in variants.items():
        ref = flashtile.flash_attn_func(*xs, causal=True)
        for g in got[name]:
            _same(g, ref)
    for g in got["option"]:
        _same(g, flashtile.flash_attn_func(q, k, v, causal=False))


def _error(fn):
    with pytest.raises(Exception) as e:
        fn()
    return type(e.value), str(e.value)


def test_flat_dense_rejected_input_still_rejected(fakes, monkeypatch):
    q, k, v = _dense()
    bad = {
        "batch": lambda: flashtile.flash_attn_func(q, k[:1], v[:1]),
        "kv lengths": lambda: flashtile.flash_attn_func(q, k, v[:, :5]),
        "window floats": lambda: flashtile.flash_attn_func(q, k, v, window_size=(-1.0, -1)),
        "window list": lambda: flashtile.flash_attn_func(q, k, v, window_size=[1, 2, 3]),
        "nan softcap": lambda: flashtile.flash_attn_func(q, k, v, softcap=float("nan")),
        "0-d": lambda: flashtile.flash_attn_func(torch.tensor(1.0), k, v),
        "strided": lambda: flashtile.flash_attn_func(q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v),
        "heads": lambda: flashtile.flash_attn_func(q[:, :, :3], k, v),
        "dtype": lambda: flashtile.flash_attn_func(q, k.float(), v),
        "scale list": lambda: flashtile.flash_attn_func(q, k, v, softmax_scale=[0.5]),
        "sparse": lambda: flashtile.flash_attn_func(q.to_sparse(), k, v),  # (stride() raises)
    }
    for _ in range(4):
        flashtile.flash_attn_func(q, k, v)
    assert len(interface._FLAT) == 1
    flat_errors = {name: _error(fn) for name, fn in bad.items()}
    _memo_off(monkeypatch)
    assert flat_errors == {name: _error(fn) for name, fn in bad.items()}


def _growing(layout: str, steps: int, start: int = 1, b: int = 2, hk: int = 2, d: int = 40, dtype=torch.float16):
    """Decode-shaped calls whose keys grow by one each step: q ``(b, 1, 4, d)`` and k / v as a
    ``torch.cat`` cache (``cat``: contiguous, new strides every step), Hugging Face's dynamic cache
    (``hf``: ``(b, hk, s, d)`` transposed) or slices of one buffer (``slice``: the same strides)."""
    torch.manual_seed(1)
    big = [torch.randn(b, start + steps, hk, d, dtype=dtype) for _ in range(2)]
    out = []
    for n in range(start, start + steps):
        q = torch.randn(b, 1, 4, d, dtype=dtype)
        if layout == "slice":
            k, v = (x[:, :n] for x in big)
        elif layout == "cat":
            k, v = (torch.cat([x[:, : n - 1], x[:, n - 1 : n]], dim=1) for x in big)
        else:
            k, v = (x[:, :n].transpose(1, 2).contiguous().transpose(1, 2) for x in big)
        out.append((q, k, v))
    return out


@pytest.mark.parametrize("layout", ["cat", "hf", "slice"])
@pytest.mark.parametrize("pieces", ["one", "several"])
def test_flat_dense_growing_keys_equal_full_path(fakes, monkeypatch, layout, pieces):
    # a decode-shaped call whose keys grow every call takes the runner's any_length plan (keyed on
    # the tile config, the number of pieces and the classes of the length-dependent ints) and gives
    # what the full path gives at every length: the fakes' checksums cover every int and tensor
    if pieces == "several":  # as on a GPU: more pieces as the keys grow (fused merge, group counters)
        pieces_of = launch_decode._pieces

        def several(q, bd, config, programs, max_keys, gather, num_splits=0):
            return pieces_of(q, bd, (16, *config[1:]), programs, max_keys, gather, 1 + max_keys // 24)

        monkeypatch.setattr(launch_decode, "_pieces", several)
    calls = _growing(layout, 40)
    decodes, dec = [], launch_decode.decode
    monkeypatch.setattr(launch_decode, "decode", lambda *a, **kw: decodes.append(kw.get("grow")) or dec(*a, **kw))
    got = [flashtile.flash_attn_func(q, k, v, causal=True, softcap=3.0) for q, k, v in calls[:-1]]
    assert len(interface._GROW) == 1
    planned = len(decodes)
    assert planned < len(calls) // 2  # a plan per (pieces, int classes), not per length
    fast0 = launch_decode._DECODE.fast_launches
    q, k, v = calls[-1]
    again = flashtile.flash_attn_func(q, k, v, causal=True, softcap=3.0, return_attn_probs=True)
    assert launch_decode._DECODE.fast_launches == fast0 + 1
    _memo_off(monkeypatch)
    for (q, k, v), g in zip(calls, [*got, again], strict=True):
        _same(g, flashtile.flash_attn_func(q, k, v, causal=True, softcap=3.0, return_attn_probs=g is again))


def test_flat_dense_growing_keys_fall_back(fakes, monkeypatch):
    # what the length-free key leaves out is checked per call: k and v of different lengths raise
    # as on the full path; another head count, batch or head dim is another signature; cleared
    # plans make the runner decline
    calls = _growing("cat", 8)
    for q, k, v in calls[:6]:
        flashtile.flash_attn_func(q, k, v)
    assert len(interface._GROW) == 1
    q, k, v = calls[6]
    with pytest.raises(ValueError, match="same shape except the head dim"):
        flashtile.flash_attn_func(q, k, v[:, :-1])
    one = (q, k[:, :, :1], v[:, :, :1])
    out = flashtile.flash_attn_func(*one)  # 1 KV head: a signature of its own
    assert len(interface._GROW) == 1
    (before,) = interface._GROW.values()
    launch.clear_plans()
    last = flashtile.flash_attn_func(*calls[7])
    assert [e[0] for e in interface._GROW.values()] != [before[0]]  # declined, dropped: the memo's path (a new runner)
    _memo_off(monkeypatch)
    _same(out, flashtile.flash_attn_func(*one))
    _same(last, flashtile.flash_attn_func(*calls[7]))


def test_flat_runner_declines_after_clear_plans(fakes, monkeypatch):
    q, k, v = _dense()
    for _ in range(4):
        flashtile.flash_attn_func(q, k, v, causal=True)
    assert len(interface._FLAT) == 1
    launch.clear_plans()  # e.g. a benchmark changed the config tables
    a = flashtile.flash_attn_func(q, k, v, causal=True)
    assert not interface._FLAT  # dropped; the memo's path served the call
    _memo_off(monkeypatch)
    _same(a, flashtile.flash_attn_func(q, k, v, causal=True))


def test_flat_runner_takes_the_slow_launch_when_prepared_checks_fail(fakes, monkeypatch):
    """Another current device, a launch hook, an unaligned input: the runner launches through the
    generic path (as a prepared launch does), with the same result."""
    q, k, v = _dense()
    for _ in range(4):
        ref = flashtile.flash_attn_func(q, k, v, causal=True)
    assert len(interface._FLAT) == 1
    fast0 = launch._FWD.fast_launches
    _same(flashtile.flash_attn_func(q, k, v, causal=True), ref)
    assert launch._FWD.fast_launches == fast0 + 1
    fakes.drv.get_current_device = lambda: 1
    _same(flashtile.flash_attn_func(q, k, v, causal=True), ref)
    assert launch._FWD.fast_launches == fast0 + 1  # not through the prepared launch
    fakes.drv.get_current_device = lambda: 0
    buf = torch.empty(q.numel() + 1, dtype=q.dtype)
    qu = buf[1:].view(q.shape).copy_(q)  # 2-byte offset: unaligned
    _same(flashtile.flash_attn_func(qu, k, v, causal=True), ref)
    assert launch._FWD.fast_launches == fast0 + 1


def test_flat_dense_autograd(fakes, monkeypatch):
    q, k, v = _dense()
    dout = torch.randn(q.shape, dtype=q.dtype)

    def run():
        xs = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        out = flashtile.flash_attn_func(*xs, causal=True)
        assert type(out.grad_fn).__name__ == "_AttentionBackward"
        return out.detach(), torch.autograd.grad(out, xs, dout)

    got = [run() for _ in range(5)]
    assert len(interface._FLAT) == 1  # adopted from the autograd path too
    with torch.no_grad():  # the same signature without grad: the runner itself
        nograd = flashtile.flash_attn_func(q, k, v, causal=True)
    _memo_off(monkeypatch)
    ref = run()
    for g in got:
        _same(g, ref)
    _same(nograd, ref[0])


def test_flat_path_off_under_modes(fakes, monkeypatch):
    q, k, v = _dense()
    for _ in range(4):
        flashtile.flash_attn_func(q, k, v)
    assert len(interface._FLAT) == 1
    runs = []
    full = interface._run
    monkeypatch.setattr(interface, "_run", lambda *a, **kw: runs.append(1) or full(*a, **kw))

    class Watch(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Watch():
        flashtile.flash_attn_func(q, k, v)
    with torch.autograd.profiler.profile():
        flashtile.flash_attn_func(q, k, v)
    flashtile.flash_attn_func(torch.nn.Parameter(q, requires_grad=False), k, v)
    assert len(runs) == 3
    flashtile.flash_attn_func(q, k, v)
    assert len(runs) == 3


@pytest.mark.parametrize("lens", ["int", "none", "tensor"])
@pytest.mark.parametrize("splits", [1, 3])
def test_flat_kvcache_equals_full_path(fakes, monkeypatch, lens, splits):
    torch.manual_seed(0)
    q = torch.randn(2, 1, 8, 64, dtype=torch.float16)
    kc, vc = (torch.randn(2, 300, 2, 64, dtype=torch.float16) for _ in range(2))

    def run(step):
        n = {"int": 250 + step, "none": None, "tensor": torch.tensor([250 + step, 7], dtype=torch.int32)}[lens]
        return flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=n, causal=True, num_splits=splits,
                                                 return_softmax_lse=True)  # fmt: skip

    got = [run(s) for s in range(6)]
    assert len(kvcache._FLAT) == 1
    _memo_off(monkeypatch)
    for s, g in enumerate(got):
        _same(g, run(s))


@pytest.mark.parametrize("splits", [1, 3])
def test_flat_kvcache_lse_fresh_only_when_returned(fakes, monkeypatch, splits):
    """Without return_softmax_lse the flat path's kernels write the lse into one kept buffer (and the
    fused merge its pieces' counters into another): the output is fresh and equal to the full path's;
    with it, every call returns a fresh lse."""
    torch.manual_seed(0)
    q = torch.randn(2, 1, 8, 64, dtype=torch.float16)
    kc, vc = (torch.randn(2, 300, 2, 64, dtype=torch.float16) for _ in range(2))

    def run(lse):
        return flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=250, causal=True, num_splits=splits,
                                                 return_softmax_lse=lse)  # fmt: skip

    outs = [run(False) for _ in range(5)]
    assert len(kvcache._FLAT) == 1 and isinstance(outs[0], torch.Tensor)
    assert len({o.data_ptr() for o in outs}) == 5  # fresh outputs (all alive here)
    sinks = [t for key, t in launch_decode._SCRATCH.items() if "lse" in key]
    assert len(sinks) == 1 and sinks[0].shape == (2, 8, 1)
    with_lse = [run(True) for _ in range(3)]
    assert len({r[1].data_ptr() for r in with_lse} | {sinks[0].data_ptr()}) == 4  # fresh lse each call
    assert len([key for key in launch_decode._SCRATCH if "cnt" in key]) == (1 if splits > 1 else 0)
    _memo_off(monkeypatch)
    _same(outs[-1], run(False))
    _same(with_lse[-1], run(True))


@pytest.mark.parametrize("budget", ["kept", "per call"])
def test_flat_kvcache_scratch_bundle(fakes, monkeypatch, budget):
    """A runner finds its pieces, counters and lse buffer in one entry (made from the kept scratch)
    -- unless the pieces are over the size kept, then they are allocated per call, no entry -- and
    gives what the full path gives either way."""
    if budget == "per call":
        monkeypatch.setattr(launch_decode, "_SCRATCH_BYTES", 0)
    torch.manual_seed(0)
    q = torch.randn(2, 1, 8, 64, dtype=torch.float16)
    kc, vc = (torch.randn(2, 300, 2, 64, dtype=torch.float16) for _ in range(2))
    run = lambda: flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=250, num_splits=3)  # noqa: E731
    got = [run() for _ in range(5)]
    entries = [v for k, v in launch_decode._SCRATCH.items() if len(k) == 2 and isinstance(k[0], tuple)]
    bundles = [v for v in entries if len(v) == 4]  # the plan runner's (pieces, lse pieces, counters, lse)
    if budget == "kept":
        assert len(bundles) == 1 and bundles[0][0].shape[0] == 3 and bundles[0][2] is not None
    else:
        assert not bundles
    # the kv runner's (length vector entry, flag: None off CUDA), whatever the pieces
    (lens_ent, flag), = [v for v in entries if len(v) == 2]
    assert lens_ent[0] == 250 and lens_ent[1].tolist() == [250, 250] and flag is None
    _memo_off(monkeypatch)
    _same(got[-1], run())


def test_flat_kvcache_under_capture(fakes, monkeypatch):
    """While a CUDA graph is captured (seen here as no scratch key) the runner launches the same
    fused kernel as the eager calls (no other variant to compile or load during a capture) with
    scratch of the call's own (fresh counters: none kept for the CPU), and gives what the eager
    calls and the full path under the same capture give."""
    torch.manual_seed(0)
    q = torch.randn(2, 1, 8, 64, dtype=torch.float16)
    kc, vc = (torch.randn(2, 300, 2, 64, dtype=torch.float16) for _ in range(2))
    run = lambda: flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=250, num_splits=3)  # noqa: E731
    eager = [run() for _ in range(4)][-1]
    assert len(kvcache._FLAT) == 1
    kept = {k: v for k, v in launch_decode._SCRATCH.items()}
    monkeypatch.setattr(launch_decode, "_scratch_key", lambda dev: None)
    n = len(fakes.log)
    captured = run()
    assert [e[0] for e in fakes.log[n:]] == ["_DECODE"] and len(kvcache._FLAT) == 1
    assert launch_decode._SCRATCH == kept  # nothing kept taken or added
    _same(captured, eager)
    _memo_off(monkeypatch)
    _same(captured, run())


def test_flat_kvcache_rejected_input_still_rejected(fakes, monkeypatch):
    torch.manual_seed(0)
    q = torch.randn(2, 1, 8, 64, dtype=torch.float16)
    kc, vc = (torch.randn(2, 300, 2, 64, dtype=torch.float16) for _ in range(2))
    for n in range(4):
        flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=250 + n)
    assert len(kvcache._FLAT) == 1
    bad = {
        "negative": lambda: flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=-1),
        "over": lambda: flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=301),
        "bool": lambda: flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=True),
        "float": lambda: flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=5.0),
        "int64 lens": lambda: flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.tensor([1, 2])),
        "splits": lambda: flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=5, num_splits=-1),
        "batch": lambda: flashtile.flash_attn_with_kvcache(q, kc[:1], vc[:1], cache_seqlens=5),
        "sparse": lambda: flashtile.flash_attn_with_kvcache(q.to_sparse(), kc, vc, cache_seqlens=5),
    }
    flat_errors = {name: _error(fn) for name, fn in bad.items()}
    _memo_off(monkeypatch)
    assert flat_errors == {name: _error(fn) for name, fn in bad.items()}


def test_flat_kvcache_reads_the_error_flag(fakes, monkeypatch):
    """With tensor lengths the runner reads the error flag as the backend does: set, it checks the
    indices by name (here: a length past the cache raises the checks' error) and clears it."""
    torch.manual_seed(0)
    q = torch.randn(2, 1, 8, 64, dtype=torch.float16)
    kc, vc = (torch.randn(2, 300, 2, 64, dtype=torch.float16) for _ in range(2))
    ok = torch.tensor([250, 7], dtype=torch.int32)
    for _ in range(4):
        flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=ok)
    assert len(kvcache._FLAT) == 1
    bad = torch.tensor([250, 400], dtype=torch.int32)
    err = torch.zeros(1, dtype=torch.int32)
    monkeypatch.setattr(launch_decode, "error_flag", lambda dev: err)

    def flagged():
        err.fill_(1)  # what the kernel would set for the row past the cache
        return _error(lambda: flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=bad))

    flat = flagged()
    assert int(err) == 0 and len(kvcache._FLAT) == 1
    _memo_off(monkeypatch)
    assert flagged() == flat and flat[0] is ValueError


def test_lens_vector_and_partials_are_kept_per_thread():
    dev = torch.device("cpu")
    launch_decode._SCRATCH.clear()
    a = launch_decode.lens_vector(dev, 3, 5)
    assert a.tolist() == [5, 5, 5] and a.dtype == torch.int32
    b = launch_decode.lens_vector(dev, 3, 9)
    assert b is a and a.tolist() == [9, 9, 9]  # refilled in place
    other = []
    t = threading.Thread(target=lambda: other.append(launch_decode.lens_vector(dev, 3, 9)))
    t.start()
    t.join()
    assert other[0] is not a and other[0].tolist() == [9, 9, 9]
    parts = ((3, 2, 1, 4, 8), (3, 2, 4, 1))
    o, lse = launch_decode.partials(dev, parts)
    assert launch_decode.partials(dev, parts)[0] is o and o.shape == parts[0] and lse.shape == parts[1]
    big = ((64, 64, 1, 32, 256), (64, 64, 32, 1))  # above _SCRATCH_BYTES: allocated per call
    assert launch_decode.partials(dev, big)[0] is not launch_decode.partials(dev, big)[0]
    launch_decode._SCRATCH.clear()
    launch_decode._held[0] = 0
    mid = ((7, 64, 1, 32, 128), (7, 64, 32, 1))  # ~7 MiB: four fit in the 32 MiB budget, a fifth clears
    kept = [launch_decode.partials(dev, mid, (dev, s, 0))[0] for s in range(5)]
    assert launch_decode._held[0] <= launch_decode._SCRATCH_BUDGET
    assert launch_decode.partials(dev, mid, (dev, 4, 0))[0] is kept[4]
    assert launch_decode.partials(dev, mid, (dev, 0, 0))[0] is not kept[0]  # dropped by the clear
    launch_decode._SCRATCH.clear()
    launch_decode._held[0] = 0


def test_adopt_needs_exactly_this_call():
    x, y, z, o = (torch.zeros(1) for _ in range(4))
    runner = object()
    assert base.adopt([((x, y, z), (o,), runner)], (x, y, z), (o,)) is runner
    assert base.adopt([((x, y, z), (o,), runner)], (x, y, z.clone()), (o,)) is None
    assert base.adopt([((x, y, z), (o,), runner)], (x, y, z), (o.clone(),)) is None
    assert base.adopt([((x, y, z), (o,), runner)] * 2, (x, y, z), (o,)) is None
    assert base.adopt([((x, y, z, None), (o,), runner)], (x, y, z), (o,)) is None
    res, offers = base.recording(lambda: base.OFFERS.append(1) or 5)
    assert res == 5 and offers == [1] and base.OFFERS is None


class CudaLauncher:  # Triton 3.6's launcher, as far as _direct relies on it (its __call__, reduced)
    def __init__(self, scratch=0):
        self.calls = []
        self.global_scratch_size, self.profile_scratch_size = scratch, 0
        self.launch_cooperative_grid, self.launch_pdl = 0, 1

    def launch(self, *args):
        self.calls.append(args)

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        # 3.6: scratch buffers allocated only when their sizes are > 0 (None otherwise)
        assert self.global_scratch_size == 0 and self.profile_scratch_size == 0
        self.launch(gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid, self.launch_pdl,
                    None, None, *args)  # fmt: skip


def test_direct_launch_passes_what_the_launcher_would(monkeypatch):
    monkeypatch.setattr(fastlaunch, "DIRECT_VERSIONS", (".".join(triton.__version__.split(".")[:2]),))
    launcher = CudaLauncher()
    compiled = types.SimpleNamespace(run=launcher, function="fn", packed_metadata=(4, 1, 0))
    direct = fastlaunch._direct(compiled)
    assert direct is not None and direct[1:] == (0, 1)
    x, y = torch.zeros(8), torch.zeros(8)
    kernel = fastlaunch.FastKernel(types.SimpleNamespace())
    prep = fastlaunch.Prepared(kernel, (3, 2), (5, "c"), {}, compiled, 0, (3, 2, 1), 2, [0, 1], (5, "c"), direct)
    drv = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda d: 99)
    monkeypatch.setattr(triton.runtime, "driver", types.SimpleNamespace(active=drv))
    assert prep.go(x, y)
    launcher(3, 2, 1, 99, "fn", (4, 1, 0), None, None, None, x, y, 5, "c")  # the launcher's own way
    assert len(launcher.calls) == 2 and launcher.calls[0] == launcher.calls[1]
    # not skipped: scratch buffers, another __call__ signature, another version
    assert fastlaunch._direct(types.SimpleNamespace(run=CudaLauncher(scratch=64))) is None

    class Other(CudaLauncher):
        def __call__(self, gridX, gridY, gridZ, stream, function, kernel_metadata, *args):
            pass

    Other.__name__ = "CudaLauncher"
    assert fastlaunch._direct(types.SimpleNamespace(run=Other())) is None
    monkeypatch.setattr(fastlaunch, "DIRECT_VERSIONS", ())
    assert fastlaunch._direct(compiled) is None


def test_prepared_launch_reads_the_device_as_torch_does(monkeypatch):
    """Where Triton's driver asks torch.cuda.current_device, a prepared launch calls its C getter once
    torch.cuda is initialised, and the driver's getter otherwise."""
    asked = []

    def current_device():  # stands for torch.cuda.current_device
        asked.append("python")
        return 0

    monkeypatch.setattr(fastlaunch, "_torch_current_device", current_device)
    monkeypatch.setattr(fastlaunch, "_cuda_get_device", lambda: asked.append("c") or 0)
    flag = types.SimpleNamespace(_initialized=True)
    monkeypatch.setattr(fastlaunch, "_torch_cuda", flag)
    drv = types.SimpleNamespace(get_current_device=current_device, get_current_stream=lambda d: 5)
    monkeypatch.setattr(triton.runtime, "driver", types.SimpleNamespace(active=drv))
    compiled = types.SimpleNamespace(run=lambda *a: None, function="fn", packed_metadata="m")
    prep = fastlaunch.Prepared(fastlaunch.FastKernel(types.SimpleNamespace()), (1,), (), {}, compiled, 0, (1, 1, 1),
                               1, [0], ())  # fmt: skip
    x = torch.zeros(4)
    assert prep.go(x) and asked == ["c"]
    flag._initialized = False
    assert prep.go(x) and asked == ["c", "python"]
    drv.get_current_device = lambda: 1  # another getter (e.g. another driver): asked, and another device
    assert not prep.go(x)


def test_prepared_launch_and_launch_hooks(monkeypatch):
    """An empty hook chain (Triton >= 3.5's default) is no hook; a chain with a hook, or a hook
    function on either side, sends the launch to the generic path."""
    drv = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda d: 5)
    monkeypatch.setattr(triton.runtime, "driver", types.SimpleNamespace(active=drv))
    compiled = types.SimpleNamespace(run=lambda *a: None, function="fn", packed_metadata="m")
    prep = fastlaunch.Prepared(fastlaunch.FastKernel(types.SimpleNamespace()), (1,), (), {}, compiled, 0, (1, 1, 1),
                               1, [0], ())  # fmt: skip
    x = torch.zeros(4)
    rt = triton.knobs.runtime
    for side in ("launch_enter_hook", "launch_exit_hook"):
        monkeypatch.setattr(rt, side, types.SimpleNamespace(calls=[]))
        assert prep.go(x)
        monkeypatch.setattr(rt, side, types.SimpleNamespace(calls=[print]))
        assert not prep.go(x)
        monkeypatch.setattr(rt, side, lambda *a: None)
        assert not prep.go(x)
        monkeypatch.setattr(rt, side, None)
        assert prep.go(x)


def test_fused_merge_threshold(fakes, monkeypatch):
    """Split decode calls of fewer than FUSE_MIN_GROUPS (batch x kv heads x row blocks) groups launch
    the decode and merge kernels (the fused kernel's serial merge costs device time there), at least
    that many the fused kernel alone; every call of a shape the same way."""
    monkeypatch.setattr(launch_decode, "FUSE_MIN_GROUPS", 64)
    q = torch.randn(2, 1, 8, 64, dtype=torch.float16)  # 2 x 2 kv heads x 1 row block: 4 groups
    kc, vc = (torch.randn(2, 300, 2, 64, dtype=torch.float16) for _ in range(2))
    for _ in range(3):
        n = len(fakes.log)
        flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=250, num_splits=3)
        assert [e[0] for e in fakes.log[n:]] == ["_DECODE", "_MERGE"]
    monkeypatch.setattr(launch_decode, "FUSE_MIN_GROUPS", 4)
    launch.clear_plans()
    for _ in range(3):
        n = len(fakes.log)
        flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=250, num_splits=3)
        assert [e[0] for e in fakes.log[n:]] == ["_DECODE"]


def _splits_by_keys(programs, max_keys, block_n, slots, waves, min_keys=256):
    """choose_splits as first written (a loop in keys), the reference of its memoised form."""

    def cdiv(a, b):
        return (a + b - 1) // b

    if programs >= slots:
        return 1
    max_keys = max(max_keys, 1)
    top = max(1, min(64, cdiv(max_keys, min_keys)))
    splits = 1
    for want in range(1, top + 1):
        chunk = cdiv(cdiv(max_keys, want), block_n) * block_n
        splits = cdiv(max_keys, chunk)
        total = programs * splits
        if total >= waves * slots and total / (slots * cdiv(total, slots)) >= 0.95:
            break
    return splits


def test_choose_splits_counts_key_blocks():
    import random

    rng = random.Random(0)
    lengths = (1, 15, 16, 17, 127, 128, 129, 1000, 8192, 33333)
    cases = [(p, m, bn, slots, w, mk) for p in (1, 8, 64, 300) for m in lengths for bn in (16, 64, 128)
             for slots in (132, 264) for w in (0, 8) for mk in (128, 256)]  # fmt: skip
    cases += [(rng.randint(1, 400), rng.randint(1, 200000), rng.choice((16, 32, 64, 128)), rng.choice((132, 396)),
               rng.choice((0, 4, 8)), rng.choice((100, 128, 256))) for _ in range(3000)]  # fmt: skip
    for c in cases:
        assert launch_decode.choose_splits(*c) == _splits_by_keys(*c), c


def test_int_classes_are_the_launch_keys():
    ints = (0, 1, 2, 15, 16, 17, 32, -16, -1, 2**31 - 16, 2**31, 2**31 + 16, -(2**31), 2**63 - 1, 2**63, 2**64)
    assert fastlaunch.int_classes(ints) == tuple(fastlaunch._int_key(a) for a in ints)
