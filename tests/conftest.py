"""Shared test machinery: the backend parametrisation, device choice and interpreter shrinking.
The oracle, flash-attn's tolerance rule and the input makers live in :mod:`flashtile.testing`
(shared with ``flashtile check`` and the benchmarks); this file holds what needs pytest.

* ``FLASHTILE_TEST_BACKENDS`` (comma list) picks the backends the parity tests run on; the
  default is every registered backend usable here (on a CPU machine: ``torch``). A test that takes the
  ``backend`` fixture runs once per backend, inside ``flashtile.use_backend(name)``.
* Triton's CPU interpreter (``TRITON_INTERPRET=1``) runs the kernels on CPU tensors, slowly and
  with a wrong bf16 dot: under it, bf16 cases are skipped and shapes are shrunk
  (:func:`is_interpreter`, :func:`shrink`, :func:`skip_if_too_big`).
* The torch engine runs with tiny tiles under the ``backend`` fixture (``TORCH_TEST_TILES``), so
  that small problems still cross many block boundaries; ``default_tiles`` undoes that.
"""

from __future__ import annotations

import os

import pytest
import torch

import flashtile

# ----------------------------------------------------------------------------------------------
# backends and devices


def _default_backends() -> list[str]:
    """Every registered backend usable in this process (the registry's own answer), except that
    one whose ``auto`` devices exclude where the tests run (triton under the interpreter on CPU)
    is left to an explicit ``FLASHTILE_TEST_BACKENDS``."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    names = []
    for name, reason in flashtile.dispatch.report():
        devs = flashtile.dispatch.backends()[name].capabilities.auto_devices
        if reason is None and (devs is None or dev in devs):
            names.append(name)
    return names


def parity_backends() -> list[str]:
    """Backends the parity tests run on (``$FLASHTILE_TEST_BACKENDS`` or the default)."""
    env = os.environ.get("FLASHTILE_TEST_BACKENDS", "").strip()
    if not env:
        return _default_backends()
    return [n.strip().lower() for n in env.split(",") if n.strip()]


BACKENDS = parity_backends()


def is_interpreter(backend: str) -> bool:
    """True when ``backend`` runs Triton kernels through the CPU interpreter (slow; bf16 dot wrong)."""
    return backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_for(backend: str) -> torch.device:
    """Where the inputs of a test live: CUDA when there is one (for every backend), else CPU
    (the torch backend, or Triton under the interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


#: Under the interpreter, sequence lengths above this are shrunk and head dims above
#: INTERP_MAX_HEADDIM are skipped.
INTERP_MAX_SEQLEN = 48
INTERP_MAX_HEADDIM = 128


def shrink(backend: str, *sizes: int) -> int | tuple[int, ...]:
    """Sequence lengths, shrunk under the interpreter by a monotone map (so ``sq < sk`` stays
    ``sq <= sk``; 1 and small lengths are kept). Returns an int for one size, else a tuple."""
    if is_interpreter(backend):
        sizes = tuple(n if n <= 24 else min(INTERP_MAX_SEQLEN, 24 + (n - 24) // 8) for n in sizes)
    return sizes[0] if len(sizes) == 1 else sizes


def skip_if_too_big(backend: str, *, headdim: int = 0, dtype: torch.dtype | None = None) -> None:
    """Skip a case the interpreter cannot run usefully (bf16, or a very large head dim)."""
    if not is_interpreter(backend):
        return
    if dtype == torch.bfloat16:
        pytest.skip("Triton interpreter: bf16 dot products are wrong")
    if headdim > INTERP_MAX_HEADDIM:
        pytest.skip(f"Triton interpreter: head dim {headdim} too slow")


#: Tile sizes the torch engine uses under the ``backend`` fixture: small and unequal, so that every
#: test crosses many query/key block boundaries. With the default tiles (2**20 scores, 512 keys)
#: a test of a few hundred tokens fits in one tile and never exercises the online softmax across
#: key blocks, the skipping of masked blocks, or the backward's per-block query ranges.
TORCH_TEST_TILES = {"_BLOCK_N": 24, "_TILE_ELEMS": 1}  # _TILE_ELEMS=1: the engine's floor, 16 query rows


def _torch_engine():
    from flashtile.backends import torch_tiled

    return torch_tiled


TORCH_DEFAULT_TILES = {k: getattr(_torch_engine(), k) for k in TORCH_TEST_TILES if hasattr(_torch_engine(), k)}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """The backend under test; the test body runs inside ``flashtile.use_backend(name)``.
    The torch engine runs with the small tiles of ``TORCH_TEST_TILES`` (see :func:`default_tiles`).
    CPU tests run on one intra-op thread: their tensors are tiny, and on a busy 2-core machine
    OpenMP's spinning threads made them up to 4x slower."""
    name = request.param
    if name == "triton" and not (torch.cuda.is_available() or is_interpreter(name)):
        pytest.skip("triton backend needs CUDA or TRITON_INTERPRET=1")
    if name == "torch":
        for attr, value in TORCH_TEST_TILES.items():
            if attr in TORCH_DEFAULT_TILES:
                monkeypatch.setattr(_torch_engine(), attr, value)
        # the suite checks the tiled loop; plain CPU calls' fused path (torch's CPU flash kernels)
        # has its own tests in tests/test_torch_fused.py
        if hasattr(_torch_engine(), "_FUSED"):
            monkeypatch.setattr(_torch_engine(), "_FUSED", False)
    threads = torch.get_num_threads()
    if device_for(name).type == "cpu":
        torch.set_num_threads(1)
    try:
        with flashtile.use_backend(name):
            yield name
    finally:
        torch.set_num_threads(threads)


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    """A parity test whose call the backend under test declares it does not serve (e.g. ALiBi on
    a kernel without it) is skipped with the declared reason: the refusal itself is tested in
    tests/test_dispatch.py, and auto hands such calls to the next backend."""
    try:
        return (yield)
    except flashtile.BackendUnavailableError as e:
        if "backend" not in pyfuncitem.fixturenames or "was requested but cannot serve" not in str(e):
            raise
        pytest.skip(str(e))


@pytest.fixture
def default_tiles(backend, monkeypatch):
    """Put the torch engine back on its default tile sizes."""
    for attr, value in TORCH_DEFAULT_TILES.items():
        monkeypatch.setattr(_torch_engine(), attr, value)


@pytest.fixture
def device(backend) -> torch.device:
    return device_for(backend)


def pytest_collection_modifyitems(config, items):
    """Skip bf16 parametrisations of interpreter runs at collection time (cheaper than in the body)."""
    for item in items:
        cs = getattr(item, "callspec", None)
        if cs is None:
            continue
        if is_interpreter(cs.params.get("backend", "")) and cs.params.get("dtype") == torch.bfloat16:
            item.add_marker(pytest.mark.skip(reason="Triton interpreter: bf16 dot products are wrong"))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same torch seed, so a failure reproduces."""
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fused_decode_merge_at_test_sizes(monkeypatch):
    """The split decode's in-kernel merge serves calls of >= FUSE_MIN_GROUPS groups (1 by default; a
    raised threshold would leave the tests' small shapes on the merge kernel): the tests exercise it
    at every size (the threshold has its own test, tests/test_lean_flat.py::test_fused_merge_threshold)."""
    try:
        from flashtile.backends.triton import launch_decode
    except ImportError:  # pragma: no cover - no triton
        yield
        return
    monkeypatch.setattr(launch_decode, "FUSE_MIN_GROUPS", 1)
    yield


@pytest.fixture(autouse=True)
def _mods_through_the_mod_machinery(monkeypatch):
    """A library causal / sliding-window block mask runs as the built-in window by default
    (``flex.builtin_window``); the tests keep such masks on the mod path they were written for (the
    flex kernels and engine), and the routing has its own tests (tests/test_flex.py::test_builtin_route_*)."""
    from flashtile import flex

    monkeypatch.setattr(flex, "BUILTIN_ROUTE", False)
    yield


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# ----------------------------------------------------------------------------------------------
# dtype parametrisation (inputs, the oracle and the tolerance rule: flashtile.testing)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def dense_fn(**opts):
    """A dense call under test: ``(q, k, v) -> (out, lse)`` through ``flash_attn_func`` (no dropout:
    no probabilities materialised)."""

    def fn(q, k, v):
        out, lse, probs = flashtile.flash_attn_func(q, k, v, return_attn_probs=True, **opts)
        assert probs is None  # no dropout: nothing materialised
        return out, lse

    return fn


def dense_oracle(**opts):
    """The oracle of :func:`dense_fn`: ``attention_ref`` with the same options."""

    def oracle(q, k, v, upcast):
        from flashtile.testing import attention_ref

        return attention_ref(q, k, v, upcast=upcast, **opts)

    return oracle


@pytest.fixture
def fake_driver(monkeypatch):
    """Triton's active driver replaced by a stand-in (device 0, stream 1234) and the lean launch
    path enabled: the fake JITFunctions of tests/test_lean.py then run through FastKernel."""
    import types

    import triton

    from flashtile.backends.triton import fastlaunch

    drv = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda d: 1234)
    monkeypatch.setattr(triton.runtime, "driver", types.SimpleNamespace(active=drv))
    monkeypatch.setattr(fastlaunch, "ENABLED", True)
    return drv


def fake_compiled(run):
    """A stand-in for a compiled Triton kernel, to give :func:`install_fake_triton_kernels` /
    :func:`install_fake_hopper_kernels`: ``Compiled(name).run(*args)`` calls ``run(name, args)``
    (``args``: Triton's launcher arguments)."""

    class Compiled:
        function, packed_metadata = "fn", "meta"

        def __init__(self, name):
            self.name = name

        def run(self, *args):
            return run(self.name, args)

    return Compiled


def plan_recorders(monkeypatch, module, names) -> list:
    """``module``'s kernels ``names`` replaced by recorders of launches as (kernel name, grid, args
    with tensors as their dtype, kwargs, "generic" | "prepared"): ``kernel[grid](*args, **kw)``
    records "generic", and ``kernel.prepare(grid, args, kw, lead, ...)`` gives a launcher taking the
    ``lead`` leading arguments that records "prepared" (``FastKernel.prepare``'s contract). For the
    launch-plan tests: a planned call must record what its unplanned first call recorded."""
    log: list = []

    def norm(args):
        return tuple(a.dtype if isinstance(a, torch.Tensor) else a for a in args)

    class Rec:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *a, **kw: log.append((self.name, tuple(grid), norm(a), kw, "generic"))

        def prepare(self, grid, args, kw, lead, descs=0, keep=False):
            return Prepared(lambda *head: log.append((self.name, tuple(grid), norm(head + tuple(args[lead:])), kw,
                                                      "prepared")))  # fmt: skip

    class Prepared:  # called, or its go() (which launches and says so), as fastlaunch.Prepared
        def __init__(self, rec):
            self.rec = rec

        def __call__(self, *head):
            self.rec(*head)

        def go(self, *head) -> bool:
            self.rec(*head)
            return True

    for n in names:
        monkeypatch.setattr(module, n, Rec(n))
    return log


def install_fake_triton_kernels(monkeypatch, compiled):
    """The triton backend's launchers' kernels (forward, backward passes, decode, merge, append)
    replaced by fake ``JITFunction``s of their real parameters whose compiled kernel is
    ``compiled(name)`` (its ``run`` receives Triton's launcher arguments: grid, stream, function,
    metadata, hooks, then every parameter in declaration order); a fake driver (device 0, stream
    77; returned, so a test can change what it answers); the fast launch on; the sm90 tile tables.
    For host-path tests on CPU tensors."""
    import types

    import triton

    from flashtile.backends.triton import fastlaunch, launch, launch_decode

    def fake(name, kernel):
        cls = type("JITFunction", (), {"params": kernel.params})
        obj = cls()

        def getitem(self, grid):
            def go(*a, **kw):  # bound as Triton binds: every parameter in declaration order
                rest = [kw[p.name] if p.name in kw else p.default for p in kernel.params[len(a):]]
                compiled(name).run(*grid, *(1,) * (3 - len(grid)), 77, "fn", "meta", None, None, None, *a, *rest)
                return compiled(name)

            return go

        cls.__getitem__ = getitem
        return obj

    drv = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda d: 77)
    monkeypatch.setattr(triton.runtime, "driver", types.SimpleNamespace(active=drv))
    monkeypatch.setattr(fastlaunch, "ENABLED", True)
    for mod, names in ((launch, ("_FWD", "_BWD_PRE", "_BWD_DKDV", "_BWD_DQ")),
                       (launch_decode, ("_DECODE", "_MERGE", "_APPEND"))):  # fmt: skip
        for n in names:
            monkeypatch.setattr(mod, n, fastlaunch.fast(fake(n, getattr(mod, n).fn)))
    monkeypatch.setattr(launch, "arch", lambda device: "sm90")
    return drv


def install_fake_hopper_kernels(monkeypatch, compiled):
    """The hopper backend's Gluon forward kernels (``launch._PLAIN``, ``_WS``, ``_PERSISTENT``)
    replaced by fake ``JITFunction``s of their real parameters whose compiled kernel is
    ``compiled(name)`` (as :func:`install_fake_triton_kernels`, whose fakes and driver it installs
    too); the hopper launch plans cleared. Imports Gluon (Triton >= 3.6): for host-path tests."""
    from flashtile.backends.hopper import flex as hflex
    from flashtile.backends.hopper import launch as hlaunch
    from flashtile.backends.triton import fastlaunch

    drv = install_fake_triton_kernels(monkeypatch, compiled)

    def fake(name, kernel):
        cls = type("JITFunction", (), {"params": kernel.params})

        def getitem(self, grid):
            def go(*a, **kw):
                rest = [kw[p.name] if p.name in kw else p.default for p in kernel.params[len(a):]]
                compiled(name).run(*grid, *(1,) * (3 - len(grid)), 77, "fn", "meta", None, None, None, *a, *rest)
                return compiled(name)

            return go

        cls.__getitem__ = getitem
        return cls()

    for n in ("_PLAIN", "_WS", "_PERSISTENT"):
        monkeypatch.setattr(hlaunch, n, fastlaunch.fast(fake(n, getattr(hlaunch, n).fn)))
    hlaunch.clear_plans()
    hflex._PLANS.clear()
    return drv
