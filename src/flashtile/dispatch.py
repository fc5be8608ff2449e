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
from collections.abc import Iterator
from dataclasses import dataclass

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


def backends() -> dict[str, Backend]:
    """All registered backends by name, highest priority first (recomputed only when the registry changes)."""
    _load()
    global _order
    reg = registry()
    key = tuple((name, id(be)) for name, be in reg.items())
    if key != _order[0]:
        _order = (key, dict(sorted(reg.items(), key=lambda kv: -kv[1].capabilities.priority)))
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


def choose(problem: Problem, call: AttnCall, *, decode: bool = False) -> str:
    """Name of the backend that will run this call."""
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
