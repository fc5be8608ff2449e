"""Backend selection: each backend says what it supports, and why not.

``FLASHTILE_BACKEND=auto|torch|triton`` (or :func:`use_backend`) chooses. ``auto`` takes the
first backend, in order of preference, that is available in this process and serves the call
(``triton`` only for CUDA tensors); a forced backend that cannot serve a call raises
:class:`BackendUnavailableError` with the reason.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

from .backends import registry
from .backends.base import Backend, register
from .backends.torch_tiled import backend as _torch_backend
from .spec import AttnSpec, Problem

ENV_VAR = "FLASHTILE_BACKEND"
#: Preference order for ``auto``.
PREFERENCE = ("triton", "torch")
#: Device types on which ``auto`` may pick each backend (absent = any device).
AUTO_DEVICES = {"triton": ("cuda",)}

_override: str | None = None
_loaded = False


class BackendUnavailableError(RuntimeError):
    """A forced backend cannot serve the call (the message says why)."""


def _load() -> None:
    global _loaded
    if _loaded:
        return
    register(_torch_backend)
    try:
        from .backends.triton import backend as triton_backend
    except Exception as e:  # pragma: no cover - depends on the environment
        register(_Missing("triton", f"cannot import the triton backend: {type(e).__name__}: {e}"))
    else:
        register(triton_backend)
    _loaded = True


@dataclass
class _Missing:
    name: str
    reason: str

    def available(self) -> str | None:
        return self.reason

    def supports(self, problem: Problem, spec: AttnSpec) -> str | None:
        return self.reason


def backends() -> dict[str, Backend]:
    """All registered backends by name."""
    _load()
    return registry()


def requested() -> str:
    """The backend asked for: :func:`use_backend`'s override, else ``$FLASHTILE_BACKEND``, else ``auto``."""
    name = _override or os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if name != "auto" and name not in backends():
        raise ValueError(f"{ENV_VAR} must be one of auto, {', '.join(backends())}; got {name!r}")
    return name


def why_not(name: str, problem: Problem, spec: AttnSpec) -> str | None:
    """None if backend ``name`` can serve the call, else the reason."""
    be = backends()[name]
    return be.available() or be.supports(problem, spec)


def choose(problem: Problem, spec: AttnSpec) -> str:
    """Name of the backend that will run this call."""
    name = requested()
    if name != "auto":
        reason = why_not(name, problem, spec)
        if reason:
            raise BackendUnavailableError(f"backend {name!r} was requested but cannot serve this call: {reason}")
        return name
    reasons = []
    for cand in PREFERENCE:
        if cand not in backends():
            continue
        devs = AUTO_DEVICES.get(cand)
        if devs is not None and problem.device.type not in devs:
            reasons.append(f"{cand}: auto uses it only on {'/'.join(devs)} tensors")
            continue
        reason = why_not(cand, problem, spec)
        if reason is None:
            return cand
        reasons.append(f"{cand}: {reason}")
    raise BackendUnavailableError("no backend can serve this call: " + "; ".join(reasons))  # pragma: no cover


def report() -> list[tuple[str, str | None]]:
    """``(name, reason)`` for every backend: reason None when it is usable in this process."""
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
