"""Backend selection from the backends' own declarations, and why not.

Backends register themselves (:func:`flashtile.backends.base.register`); this module imports
every module of :mod:`flashtile.backends` (and the ``flashtile.backends`` entry-point group) once,
so a new backend changes nothing here. ``FLASHTILE_BACKEND=auto|<name>`` (or :func:`use_backend`)
chooses. ``auto`` tries the usable backends from the highest ``capabilities.priority`` down,
skipping those whose ``auto_devices`` exclude the tensors' device; a forced backend that cannot
serve a call raises :class:`BackendUnavailableError` with the reason. Nowhere else compares
backend names.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.metadata
import os
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from . import backends as _pkg
from . import fp8
from .backends.base import Backend, Capabilities, register, registry
from .spec import AttnCall, Problem

ENV_VAR = "FLASHTILE_BACKEND"
ENTRY_POINTS = "flashtile.backends"

_override: str | None = None
_loaded = False


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot serve the call (the message says why)."""


@dataclass
class _Missing:
    """Stands in for a backend module that failed to import, so that its reason is reported."""

    name: str
    reason: str
    capabilities: Capabilities = Capabilities(priority=-1, dtypes=frozenset(), max_headdim=0)

    def available(self) -> str | None:
        return self.reason

    def supports(self, problem: Problem, call: AttnCall) -> str | None:
        return self.reason


def _load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in pkgutil.iter_modules(_pkg.__path__):
        if mod.name.startswith("_") or mod.name == "base":
            continue
        try:
            importlib.import_module(f"{_pkg.__name__}.{mod.name}")
        except Exception as e:  # pragma: no cover - depends on the environment
            register(_Missing(mod.name, f"cannot import the {mod.name} backend: {type(e).__name__}: {e}"))
    for ep in importlib.metadata.entry_points(group=ENTRY_POINTS):  # third-party backends
        try:
            ep.load()
        except Exception as e:  # pragma: no cover - depends on the environment
            register(_Missing(ep.name, f"cannot load entry point {ep.value}: {type(e).__name__}: {e}"))


_order: tuple[tuple, dict[str, Backend]] = ((), {})
_generation = 0  # bumped whenever the registry changes (part of the dispatch cache's key)


_seen_version: int = -1  # the registry's change count when _order was last checked


def backends() -> dict[str, Backend]:
    """All registered backends by name, highest priority first (recomputed only when the registry changes)."""
    if not _loaded:
        _load()
    global _order, _generation, _seen_version
    reg = registry()
    version = getattr(reg, "version", None)
    if version is not None and version == _seen_version:
        return _order[1]
    items = tuple(reg.items())
    if items != _order[0]:
        _order = (items, dict(sorted(items, key=lambda kv: -kv[1].capabilities.priority)))
        _generation += 1
    _seen_version = -1 if version is None else version
    return _order[1]


def requested() -> str:
    """The backend asked for: :func:`use_backend`'s override, else ``$FLASHTILE_BACKEND``, else ``auto``."""
    name = _override or os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name != "auto" and name not in backends():
        raise ValueError(f"{ENV_VAR} must be one of auto, {', '.join(backends())}; got {name!r}")
    return name


def why_not(name: str, problem: Problem, call: AttnCall, *, decode: bool = False) -> str | None:
    """None if backend ``name`` can serve the call (``decode``: through ``Backend.decode``), else the reason."""
    return _why_not(backends()[name], problem, call, decode)


def _why_not(be: Backend, problem: Problem, call: AttnCall, decode: bool) -> str | None:
    if fp8.is_fp8(problem.dtype) and not fp8.serves_fp8(be.capabilities):
        # served on dequantised inputs (flashtile.ops upcasts FP8 calls for such backends)
        problem = dataclasses.replace(problem, dtype=fp8.compute_dtype(problem.device))
    return be.available() or be.capabilities.refuse(problem, call, decode) or be.supports(problem, call)


# The decision, cached per signature (issue 16: dispatch ran on every call). What determines it:
# the backend asked for, the registry, the device, dtype, head counts and head dim, the call's
# scalar options and which of its optional tensors are set, decode or not, and the values of the
# environment variables backends name in a ``dispatch_env`` attribute (triton: TRITON_INTERPRET).
# Not batch or sequence lengths: no backend's ``available()`` / ``supports()`` may depend on them
# (see flashtile.backends.base). Only successful choices are cached; refusals are re-explained.
_FIELD_KEYS = tuple(
    (f.name, "Tensor" in str(f.type)) for f in dataclasses.fields(AttnCall) if not f.name.startswith("max_seqlen")
)  # max_seqlen_* are the Problem's sequence lengths on varlen calls
_CACHE: dict[tuple, str] = {}
_last_opts: tuple[AttnCall | None, tuple] = (None, ())
_CACHE_MAX = 512
_env_names: tuple[int, tuple[str, ...]] = (-1, ())


# os.environ's own mapping, keyed by encoded names: a lookup there skips the encoding and decoding
# of os.environ.get (~1 us each on a slow CPU); os.environ's writes keep it current.
_ENVIRON = getattr(os.environ, "_data", None)
_encode = getattr(os.environ, "encodekey", None)
if _ENVIRON is None or _encode is None:  # pragma: no cover - not CPython's os.environ
    _ENVIRON, _encode = os.environ, lambda n: n


def _env_key(generation: int) -> tuple:
    global _env_names
    if _env_names[0] != generation:
        names = sorted({n for be in registry().values() for n in getattr(be, "dispatch_env", ())})
        _env_names = (generation, tuple(_encode(n) for n in (ENV_VAR, *names)))
    return tuple(map(_ENVIRON.get, _env_names[1]))


def _key(device, dtype, nheads: int, nheads_k: int, headdim: int, headdim_v: int, call: AttnCall,
         decode: bool) -> tuple:
    global _last_opts
    if _last_opts[0] is call:  # make_call returns one object per option set: its key part is known
        opts = _last_opts[1]
    else:
        opts = tuple((getattr(call, n) is None) if tensor else getattr(call, n) for n, tensor in _FIELD_KEYS)
        if all(opts[i] for i, (_, tensor) in enumerate(_FIELD_KEYS) if tensor):  # holds no tensor alive
            _last_opts = (call, opts)
    return (_override, _generation, _env_key(_generation), device, dtype, nheads, nheads_k, headdim, headdim_v, decode,
            opts)


def _remember(key: tuple | None, name: str) -> str:
    if key is not None and not torch.compiler.is_compiling():
        if len(_CACHE) >= _CACHE_MAX:
            _CACHE.clear()
        _CACHE[key] = name
    return name


def choose_for(
    q: torch.Tensor,
    k: torch.Tensor,
    call: AttnCall,
    problem: Problem | Callable[[], Problem] | None = None,
    *,
    decode: bool = False,
    v: torch.Tensor | None = None,
) -> str:
    """:func:`choose` for a call on ``q`` / ``k`` (internal layout), from the cache when this
    signature was seen before; the :class:`~flashtile.spec.Problem` (``problem``, a function
    returning it, or ``Problem.of(q, k, call, v)``) is built only when it was not; ``v`` (or the v
    cache) gives the v head dim (None: q's)."""
    backends()  # the registry key is current
    key = None
    if not torch.compiler.is_compiling():
        dv = q.shape[-1] if v is None else v.shape[-1]
        key = _key(q.device, q.dtype, q.shape[-2], k.shape[-2], q.shape[-1], dv, call, decode)
        name = _CACHE.get(key)
        if name is not None:
            return name
    if problem is None:
        problem = Problem.of(q, k, call, v)
    elif callable(problem):
        problem = problem()
    return _remember(key, _choose(problem, call, decode))


def choose(problem: Problem, call: AttnCall, *, decode: bool = False) -> str:
    """Name of the backend that will run this call."""
    backends()
    key = None
    if not torch.compiler.is_compiling():
        p = problem
        key = _key(p.device, p.dtype, p.nheads, p.nheads_k, p.headdim, p.headdim_v, call, decode)
        name = _CACHE.get(key)
        if name is not None:
            return name
    return _remember(key, _choose(problem, call, decode))


def _choose(problem: Problem, call: AttnCall, decode: bool) -> str:
    name = requested()
    if name != "auto":
        reason = _why_not(backends()[name], problem, call, decode)
        if reason:
            raise BackendUnavailableError(f"backend {name!r} was requested but cannot serve this call: {reason}")
        return name
    reasons = []
    for cand, be in backends().items():
        devs = be.capabilities.auto_devices
        if devs is not None and problem.device.type not in devs:
            reasons.append(f"{cand}: auto uses it only on {'/'.join(devs)} tensors")
            continue
        reason = _why_not(be, problem, call, decode)
        if reason is None:
            return cand
        reasons.append(f"{cand}: {reason}")
    raise BackendUnavailableError("no backend can serve this call: " + "; ".join(reasons))


def backend_for(problem: Problem, call: AttnCall, *, decode: bool = False) -> Backend:
    """The backend object :func:`choose` picks."""
    return backends()[choose(problem, call, decode=decode)]


def clear_cache() -> None:
    """Forget the cached decisions (they are keyed on everything they depend on; for tests), and
    those the entry points' signature memos keep (:func:`state` changes)."""
    global _clears
    _CACHE.clear()
    _clears += 1


_clears = 0  # clear_cache() calls: part of state()


def state() -> tuple:
    """What a decision depends on besides the call itself: the backend asked for, the registry,
    the environment variables backends name, and :func:`clear_cache` calls. The entry points'
    signature memos (:mod:`flashtile.interface`, :mod:`flashtile.kvcache`) key on it next to
    everything the call's checks and dispatch read."""
    if not _loaded or getattr(registry(), "version", None) != _seen_version or _seen_version == -1:
        backends()  # the registry's generation is current
    return _override, _generation, _clears, _env_key(_generation)


def report() -> list[tuple[str, str | None]]:
    """``(name, reason)`` for every backend, highest priority first: reason None when it is usable in this process."""
    return [(name, be.available()) for name, be in backends().items()]


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside a ``with`` block (takes precedence over ``$FLASHTILE_BACKEND``)."""
    global _override
    if name != "auto" and name not in backends():
        raise ValueError(f"backend must be one of auto, {', '.join(backends())}; got {name!r}")
    prev, _override = _override, name
    try:
        yield
    finally:
        _override = prev


_load()  # at import: registering lazily inside code traced by torch.compile happens too late for the op
