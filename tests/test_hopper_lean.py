"""The Gluon Hopper launches' lean host path (issues 16 and 18): descriptor templates, launch plans
with prepared launches for the dense and the flex forward, the runner offered to the entry points,
Triton 3.6's descriptor expansion done by the prepared launch. Checked on CPU tensors with the
kernels replaced by fakes that record what their compiled launcher receives: a planned, prepared
launch passes exactly what the generic launch passes (descriptors field by field, tensors by role,
dtype, shape and strides, every scalar and constexpr), and every change of what a plan keys on
(alignment, strides, device, hooks, block mask, environment) takes the generic path."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

triton = pytest.importorskip("triton")
pytest.importorskip("triton.experimental.gluon.nvidia.hopper")

from conftest import fake_compiled, install_fake_hopper_kernels  # noqa: E402

import flashtile  # noqa: E402
from flashtile import dispatch, interface, masks  # noqa: E402
from flashtile.backends import base  # noqa: E402
from flashtile.backends.flex_triton import launch as FL  # noqa: E402
from flashtile.backends.hopper import backend as hopper_backend  # noqa: E402
from flashtile.backends.hopper import configs  # noqa: E402
from flashtile.backends.hopper import flex as HF  # noqa: E402
from flashtile.backends.hopper import launch as HL  # noqa: E402
from flashtile.backends.triton import fastlaunch  # noqa: E402
from flashtile.flex import create_block_mask  # noqa: E402
from flashtile.spec import make_call  # noqa: E402

TD = HL.TensorDescriptor


@pytest.fixture
def hfakes(monkeypatch):
    log = []

    drv = install_fake_hopper_kernels(monkeypatch, fake_compiled(lambda name, args: log.append((name, args))))
    yield types.SimpleNamespace(log=log, drv=drv)
    HL.clear_plans()
    HF._PLANS.clear()


def _norm(args, named):
    """A launch's arguments with tensors as (role, dtype, shape, strides) -- role: the name of the
    input it is (``named``: name -> tensor), else ``new`` -- and descriptors as their fields."""

    def one(a):
        if isinstance(a, torch.Tensor):
            role = next((n for n, t in named.items() if t is a), "new")
            return (role, a.dtype, tuple(a.shape), a.stride())
        if isinstance(a, TD):
            f = {k: v for k, v in vars(a).items() if k != "base"}
            f = {k: tuple(v) if isinstance(v, list) else v for k, v in f.items()}
            return ("desc", one(a.base), tuple(sorted(f.items(), key=lambda kv: kv[0])))
        return a

    return [one(a) for a in args]


def _dense(b=1, s=300, h=4, hk=2, d=64, dtype=torch.bfloat16):
    torch.manual_seed(0)
    return (torch.randn(b, s, h, d, dtype=dtype), torch.randn(b, s, hk, d, dtype=dtype),
            torch.randn(b, s, hk, d, dtype=dtype))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# descriptor templates


def test_descriptor_copy_equals_the_constructor():
    assert HL.CHEAP_DESCRIPTORS  # (Triton 3.9 here, 3.6 on the GPU)
    lay = HL.nvmma_layout(128, 2, 4)
    a, b = torch.randn(2, 64, 4, 64).to(torch.bfloat16), torch.randn(2, 64, 4, 64).to(torch.bfloat16)
    HL._TEMPLATES.clear()
    d1 = HL.descriptor(a, a.shape, a.stride(), (1, 64, 1, 64), lay)  # constructed, kept as the template
    d2 = HL.descriptor(b, b.shape, b.stride(), (1, 64, 1, 64), lay)  # copied
    ref = TD(b, list(b.shape), list(b.stride()), [1, 64, 1, 64], lay)
    assert type(d2) is TD and d2.base is b and len(HL._TEMPLATES) == 1
    for f in dataclasses.fields(TD):
        if f.name != "base":
            assert getattr(d2, f.name) == getattr(ref, f.name) == getattr(d1, f.name), f.name
    assert vars(d2).keys() == vars(ref).keys()
    # an unaligned base takes the constructor, which rejects it
    raw = torch.zeros(2 * 64 * 4 * 64 + 1, dtype=torch.bfloat16)
    bad = raw[1:].view(2, 64, 4, 64)
    with pytest.raises(AssertionError, match="16-byte aligned"):
        HL.descriptor(bad, bad.shape, bad.stride(), (1, 64, 1, 64), lay)
    # another key (strides) is validated anew
    c = torch.randn(2, 4, 64, 64).to(torch.bfloat16).transpose(1, 2)
    HL.descriptor(c, c.shape, c.stride(), (1, 64, 1, 64), lay)
    assert len(HL._TEMPLATES) == 2


def test_descriptor_constructor_when_lean_off(monkeypatch):
    monkeypatch.setattr(HL, "LEAN", False)
    lay = HL.nvmma_layout(128, 2, 4)
    a = torch.randn(2, 64, 4, 64).to(torch.bfloat16)
    HL._TEMPLATES.clear()
    HL.descriptor(a, a.shape, a.stride(), (1, 64, 1, 64), lay)
    assert not HL._TEMPLATES


# ----------------------------------------------------------------------------------------------
# dense forward plans


_KERNELS = {"plain": "_PLAIN", "ws": "_WS", "persistent": "_PERSISTENT"}


@pytest.mark.parametrize("kernel", list(_KERNELS))
@pytest.mark.parametrize("shape", [dict(), dict(b=2, s=200, h=8, hk=1, d=128), dict(d=96, h=2, hk=2)])
@pytest.mark.parametrize("opts", [dict(causal=True), dict(window_size=(64, 0), softcap=3.0)])
def test_dense_prepared_equals_generic(hfakes, monkeypatch, kernel, shape, opts):
    q, k, v = _dense(**shape)
    d = q.shape[-1]
    cfg = configs.config(d) if kernel == "plain" and configs.config(d).kernel == "plain" else \
        dataclasses.replace(configs.config(d), kernel=kernel)  # fmt: skip
    if kernel == "plain":
        cfg = dataclasses.replace(cfg, kernel="plain")
    monkeypatch.setattr(configs, "config_for", lambda *a, **kw: cfg)
    monkeypatch.setattr(HL._device, "info", lambda device: None)  # (the persistent schedule: 132 programs)
    call = make_call(headdim=d, **opts)
    name = _KERNELS[kernel]
    runs = []
    for _ in range(4):
        n0 = len(hfakes.log)
        out, lse = HL.forward(q, k, v, call)
        (got,) = hfakes.log[n0:]
        assert got[0] == name
        runs.append(_norm(got[1], dict(q=q, k=k, v=v, out=out, lse=lse)))
    kern = getattr(HL, name)
    assert kern.generic_launches == 1 and kern.fast_launches == 3  # generic, lean + prepare, prepared x2
    assert runs[0] == runs[1] == runs[2] == runs[3]
    # the same arguments with the lean path off (the constructor, Triton's binding)
    monkeypatch.setattr(HL, "LEAN", False)
    n0 = len(hfakes.log)
    out, lse = HL.forward(q, k, v, call)
    assert _norm(hfakes.log[n0][1], dict(q=q, k=k, v=v, out=out, lse=lse)) == runs[0]


def test_dense_plan_fallbacks(hfakes, monkeypatch):
    q, k, v = _dense()
    call = make_call(headdim=64, causal=True)
    for _ in range(3):
        HL.forward(q, k, v, call)
    kern = HL._WS if configs.config_for(64, causal=True, seqlen_q=300).kernel == "ws" else HL._PLAIN
    fast0, gen0 = kern.fast_launches, kern.generic_launches
    # an unaligned q (same strides: the plan's key): the runner declines, launching nothing; the
    # full path launches on an aligned copy (tma_ready: contiguous() would return q itself)
    raw = torch.randn(q.numel() + 1).to(q.dtype)
    qu = raw[1:].view(q.shape)
    qu.copy_(q)
    run = next(p[1] for p in HL._PLANS.values() if callable(p[1]))
    n0 = len(hfakes.log)
    assert run(qu, k, v) is None and len(hfakes.log) == n0
    out, lse = HL.forward(qu, k, v, call)
    args = hfakes.log[-1][1][9:]
    assert args[0].base is not qu and args[0].base.data_ptr() % 16 == 0 and torch.equal(args[0].base, q)
    prev = hfakes.log[n0 - 1][1][9:]
    assert _norm(args, dict(q=args[0].base, k=k, v=v, out=out, lse=lse)) == \
        _norm(prev, dict(q=q, k=k, v=v, out=prev[4], lse=prev[5]))  # fmt: skip
    # another current device: the prepared launch takes FastKernel.launch (a new key: generic)
    monkeypatch.setattr(hfakes.drv, "get_current_device", lambda: 1)
    HL.forward(q, k, v, call)
    assert kern.generic_launches == gen0 + 1
    monkeypatch.setattr(hfakes.drv, "get_current_device", lambda: 0)
    # a launch hook: the generic launch
    hook = triton.knobs.runtime.launch_enter_hook
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", lambda *a: None)
    HL.forward(q, k, v, call)
    assert kern.generic_launches == gen0 + 2
    monkeypatch.setattr(triton.knobs.runtime, "launch_enter_hook", hook)
    # other strides: a plan of their own, prepared at its first reuse
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)
    plans = len(HL._PLANS)
    HL.forward(qt, k, v, call)
    assert len(HL._PLANS) == plans + 1
    # cleared plans: the runner declines
    HL.clear_plans()
    assert run(q, k, v) is None
    assert kern.fast_launches >= fast0


def test_dense_not_planned(hfakes):
    """Calls holding tensors (varlen, descales), config overrides, TMA-incompatible inputs."""
    q, k, v = _dense()
    call = make_call(headdim=64, causal=True)
    for _ in range(3):
        HL.forward(q, k, v, call, config=configs.config(64))
    assert not HL._PLANS
    qn = torch.randn(1, 300, 4, 68).to(q.dtype)[..., :64]  # rows of 136 bytes: not 16-byte strides
    for _ in range(3):
        HL.forward(qn, k, v, call)
    assert not HL._PLANS
    cu = torch.tensor([0, 100, 300], dtype=torch.int32)
    vcall = make_call(headdim=64, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=200, max_seqlen_k=200)
    for _ in range(3):
        HL.forward(q, k, v, vcall)
    assert not HL._PLANS


# ----------------------------------------------------------------------------------------------
# the flat path through the entry point


def test_flat_path_offers_the_hopper_runner(hfakes, monkeypatch):
    monkeypatch.setattr(hopper_backend, "available", lambda: None)
    monkeypatch.setattr(hopper_backend, "supports", lambda problem, call: None)
    for m in (interface._MEMO, interface._FLAT):
        m.clear()
    dispatch.clear_cache()
    q, k, v = _dense(b=1, s=4096, h=8, hk=8)  # 32k query rows: the Gluon kernel (not the small-call route)
    with flashtile.use_backend("hopper"):
        outs = []
        for _ in range(5):
            n0 = len(hfakes.log)
            outs.append(flashtile.flash_attn_func(q, k, v, causal=True))
            (got,) = hfakes.log[n0:]
            assert _norm(got[1], dict(q=q, k=k, v=v, out=outs[-1])) == _norm(
                hfakes.log[0][1], dict(q=q, k=k, v=v, out=outs[0])
            )
        assert len(interface._FLAT) == 1
        runner = next(iter(interface._FLAT.values()))[0]
        assert runner.__qualname__.startswith("_runner")
    for m in (interface._MEMO, interface._FLAT):
        m.clear()
    dispatch.clear_cache()


def test_adopt_needs_the_hopper_runner_alone(hfakes):
    q, k, v = _dense()
    call = make_call(headdim=64, causal=True)
    for _ in range(2):
        HL.forward(q, k, v, call)
    (out, lse), offers = base.recording(HL.forward, q, k, v, call)
    assert len(offers) == 1 and base.adopt(offers, (q, k, v), (out, lse)) is offers[0][2]
    assert base.adopt(offers, (q, k, v.clone()), (out, lse)) is None


# ----------------------------------------------------------------------------------------------
# Triton 3.6's descriptor expansion, done by the prepared launch


def _make_tensordesc_arg(arg, meta):  # a stand-in of Triton 3.6's (its wrapper reads the global)
    return [("map", arg.base.data_ptr(), meta["swizzle"]), *arg.shape, *arg.strides]


_BASE_ARGS_FORMAT_LEN = 13


def _wrap_handle_tensordesc(launcher, tensordesc_indices, tensordesc_meta):
    """Triton 3.6's wrapper (driver.py ``wrap_handle_tensordesc``: its closure's names and loop)."""

    def inner(*args):
        final_args = list(args[:_BASE_ARGS_FORMAT_LEN])
        tensordesc_idx = 0
        for i, arg in enumerate(args[_BASE_ARGS_FORMAT_LEN:]):
            if i in tensordesc_indices:
                final_args.extend(_make_tensordesc_arg(arg, tensordesc_meta[tensordesc_idx]))
                tensordesc_idx += 1
            else:
                final_args.append(arg)
        return launcher(*final_args)

    return inner


globals()["make_tensordesc_arg"] = _make_tensordesc_arg  # the name inner's module globals hold in 3.6


class CudaLauncher:  # Triton 3.6's __call__ signature (fastlaunch._direct checks it)
    def __init__(self, c_launch, ndesc):
        self.launch = _wrap_handle_tensordesc(c_launch, set(range(ndesc)), [dict(swizzle=64 + i) for i in range(ndesc)])
        self.global_scratch_size = self.profile_scratch_size = 0
        self.launch_cooperative_grid, self.launch_pdl = False, True

    def __call__(self, gridX, gridY, gridZ, stream, function, *args):
        self.launch(gridX, gridY, gridZ, stream, function, self.launch_cooperative_grid, self.launch_pdl, None, None,
                    *args)  # fmt: skip


def test_direct_launch_expands_descriptors_as_the_wrapper(hfakes, monkeypatch):
    c_log = []

    class Compiled:
        function, packed_metadata = "fn", "meta"

        def __init__(self, name):
            self.run = CudaLauncher(lambda *a: c_log.append(a), 4)

    install_fake_hopper_kernels(monkeypatch, Compiled)
    monkeypatch.setattr(fastlaunch, "DIRECT_VERSIONS", (".".join(triton.__version__.split(".")[:2]),))
    q, k, v = _dense()
    call = make_call(headdim=64, causal=True)
    outs = []
    for _ in range(4):
        outs.append(HL.forward(q, k, v, call))
    prep = next(p[1] for p in HL._PLANS.values() if callable(p[1]))
    assert len(c_log) == 4

    def norm(a, out, lse):
        return [("out" if x is out else "lse" if x is lse else x) for x in a]

    # calls 1-2 through the wrapper (Triton's launch), 3-4 the prepared launch's own expansion
    ref = norm(c_log[1], *outs[1])
    assert ref[13][0] == "map" and ref[13][1] == q.data_ptr()
    assert norm(c_log[2], *outs[2])[:13] == ref[:13]
    assert [x if not isinstance(x, tuple) or x[0] != "map" else x[0] for x in norm(c_log[2], *outs[2])] == \
        [x if not isinstance(x, tuple) or x[0] != "map" else x[0] for x in ref]  # fmt: skip
    assert norm(c_log[3], *outs[3]) == norm(c_log[2], *outs[2])[:13] + norm(c_log[3], *outs[3])[13:]
    assert prep is not None


def test_direct_declines_other_wrappers(monkeypatch):
    monkeypatch.setattr(fastlaunch, "DIRECT_VERSIONS", (".".join(triton.__version__.split(".")[:2]),))
    c = types.SimpleNamespace(run=CudaLauncher(lambda *a: None, 4))
    assert fastlaunch._direct(c, 4) is not None
    assert fastlaunch._direct(c, 3) is None  # descriptor positions other than the first 3
    c.run.launch = lambda *a: None  # not the wrapper
    assert fastlaunch._direct(c, 4) is None


# ----------------------------------------------------------------------------------------------
# flex forward plans


def _flex_case(mask="sliding", s=512, d=128):
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, s, 4, d).to(torch.bfloat16) for _ in range(3))
    if mask == "sliding":
        bm = create_block_mask(masks.sliding_window(200), 1, 1, s, s, device="cpu")
    else:
        ids = torch.arange(s) // 100
        bm = create_block_mask(masks.document(ids), 1, 1, s, s, device="cpu")
    return q, k, v, bm


@pytest.mark.parametrize("mask", ["sliding", "document"])
@pytest.mark.parametrize("score", [None, "softcap"])
def test_flex_prepared_equals_generic(hfakes, monkeypatch, mask, score):
    q, k, v, bm = _flex_case(mask)
    call = make_call(headdim=128, block_mask=bm, score_mod=masks.softcap(20.0) if score else None)
    out, lse = HF.forward(q, k, v, call)  # the generic launch (FL.forward routes here on a GPU)
    ref = _norm(hfakes.log[-1][1], dict(q=q, k=k, v=v, out=out, lse=lse))
    assert len(HF._PLANS) == 1
    for _ in range(3):
        n0 = len(hfakes.log)
        out, lse = FL.forward(q, k, v, call)  # planned first: prepared at the first reuse
        (got,) = hfakes.log[n0:]
        assert _norm(got[1], dict(q=q, k=k, v=v, out=out, lse=lse)) == ref
    assert HL._WS.fast_launches == 3 and HL._WS.generic_launches == 1
    kv_num = 9 + [p.name for p in HL._WS.fn.params].index("KV_NUM")
    assert FL._lists(bm, "kv", q.device)[0][0] is hfakes.log[-1][1][kv_num]  # the block mask's lists, kept


def test_flex_plan_keys(hfakes, monkeypatch):
    q, k, v, bm = _flex_case()
    call = make_call(headdim=128, block_mask=bm)
    HF.forward(q, k, v, call)
    assert HF.planned(q, k, v, call) is not None
    # another block mask of the same shapes, a new score_mod, another scale, an environment switch: no plan
    _, _, _, bm2 = _flex_case()
    assert HF.planned(q, k, v, make_call(headdim=128, block_mask=bm2)) is None
    assert HF.planned(q, k, v, make_call(headdim=128, block_mask=bm, score_mod=masks.softcap(5.0))) is None
    assert HF.planned(q, k, v, make_call(headdim=128, block_mask=bm, softmax_scale=0.5)) is None
    monkeypatch.setenv(HF.PREFETCH_ENV, "1")
    assert HF.planned(q, k, v, call) is None
    monkeypatch.delenv(HF.PREFETCH_ENV)
    monkeypatch.setenv(HF.ENV, "0")
    assert HF.planned(q, k, v, call) is None  # (FL.forward then routes to the Triton kernel)
    monkeypatch.delenv(HF.ENV)
    # replaced lists (the PerBlockMask stamp): no plan
    bm.kv_num_blocks = bm.kv_num_blocks.clone()
    assert HF.planned(q, k, v, call) is None
    # the lean path off: the runner declines and the entry is dropped
    bm.kv_num_blocks = bm.kv_num_blocks  # (same object again)
    HF.forward(q, k, v, call)
    HF.planned(q, k, v, call)
    monkeypatch.setattr(HL, "LEAN", False)
    n = len(HF._PLANS)
    assert HF.planned(q, k, v, call) is None and len(HF._PLANS) == n - 1


def test_direct_launch_with_tritons_own_wrapper(monkeypatch):
    """With Triton 3.6's real ``wrap_handle_tensordesc`` / ``make_tensordesc_arg`` (its TMA fill
    replaced by a recorder): the prepared launch's expansion equals the wrapper's. Runs where
    Triton 3.6 is installed (the GPU machine; ``/work/tri36`` here)."""
    if not triton.__version__.startswith("3.6"):
        pytest.skip("Triton 3.6's launcher wrapper")
    from triton.backends.nvidia import driver as nvd

    fills = []
    utils = types.SimpleNamespace(fill_tma_descriptor=lambda *a: fills.append(a) or ("map", a[0], len(fills)))
    c_log = []
    metas = [dict(swizzle=128, elem_size=2, elem_type=t, block_size=[1, 64, 1, 64], fp4_padded=False)
             for t in (5, 6, 7, 8)]  # fmt: skip
    sig = {i: "tensordesc<bf16[1,64,1,64]>" for i in range(4)} | {4: "*bf16", 5: "i32", 6: "constexpr"}

    class Launcher(nvd.CudaLauncher):
        def __init__(self):  # (no compile: the attributes __call__ reads)
            self.launch = nvd.wrap_handle_tensordesc(lambda *a: c_log.append(a), sig, metas)
            self.num_ctas, self.global_scratch_size, self.profile_scratch_size = 1, 0, 0
            self.global_scratch_align = self.profile_scratch_align = 1
            self.launch_cooperative_grid, self.launch_pdl = False, False

    Launcher.__name__ = "CudaLauncher"
    drv = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda d: 5, utils=utils)
    monkeypatch.setattr(triton.runtime, "driver", types.SimpleNamespace(active=drv))
    compiled = types.SimpleNamespace(run=Launcher(), function="fn", packed_metadata="meta")
    d = fastlaunch._direct(compiled, 4)
    assert d is not None and d[3] is nvd.make_tensordesc_arg and list(d[4]) == metas
    lay = HL.nvmma_layout(128, 2, 4)
    ts = [torch.randn(1, 64, 2, 64).to(torch.bfloat16) for _ in range(5)]
    descs = [TD(t, list(t.shape), list(t.stride()), [1, 64, 1, 64], lay) for t in ts[:4]]
    compiled.run(2, 3, 1, 5, "fn", "meta", None, None, None, *descs, ts[4], 7, 16)  # the wrapper's expansion
    prep = fastlaunch.Prepared(None, (2, 3), (7, 16), {}, compiled, 0, (2, 3, 1), 5, [4], (7, 16), d, 4)
    x = []
    for a, m in zip(descs, d[4], strict=True):
        x += d[3](a, m)
    d[0](2, 3, 1, 5, "fn", d[1], d[2], None, None, "meta", None, None, None, *x, ts[4], 7, 16)
    assert prep.descs == 4
    a, b = c_log
    assert [y if not (isinstance(y, tuple) and y[0] == "map") else y[:2] for y in a] == \
        [y if not (isinstance(y, tuple) and y[0] == "map") else y[:2] for y in b]  # fmt: skip
    assert fills[:4] == fills[4:]
