"""Start-up: Triton's per-process cache key, computed in the background at import (issue 16).

The first kernel launch of a process with every kernel already in Triton's on-disk cache still
cost ~0.4 s on the H200 host (``benchmarks/first_call_profile.py``): before Triton can look a
kernel up it computes ``triton.runtime.cache.triton_key()`` once per process, a sha256 over
Triton's compiler sources and its ~hundreds-of-MB ``libtriton`` shared library. File reads and
hashing release the GIL, so a daemon thread started by ``import flashtile`` does that work while
the caller creates its CUDA context, its tensors and its model. ``functools.lru_cache`` does not
make a second caller wait for a computation in flight (it would hash everything again), so
flashtile's launchers call :func:`wait` before a kernel's first (generic) launch: the first call
waits for what is left of the background work instead of redoing it.

Only on CUDA builds of torch with Triton installed (nothing to gain elsewhere), never touching
CUDA itself (no driver initialisation from a background thread), and off with
``FLASHTILE_PREWARM=0``.
"""

from __future__ import annotations

import importlib.util
import os
import threading

_THREAD: threading.Thread | None = None
_PENDING = False  # a started thread not yet joined (wait's fast test)


def _work() -> None:
    try:
        from triton.runtime.cache import triton_key

        triton_key()
    except Exception:  # noqa: BLE001 - an optimisation only: the first launch computes the key itself
        pass


def wanted() -> bool:
    """Whether the prewarm applies here: a CUDA build of torch, Triton installed, not switched off."""
    if os.environ.get("FLASHTILE_PREWARM", "1").strip().lower() in ("0", "false", "off", "no"):
        return False
    import torch

    return torch.version.cuda is not None and importlib.util.find_spec("triton") is not None


def start() -> threading.Thread | None:
    """Start the background computation once per process (None when not :func:`wanted`)."""
    global _THREAD, _PENDING
    if _THREAD is None and wanted():
        _THREAD = threading.Thread(target=_work, name="flashtile-prewarm", daemon=True)
        _PENDING = True
        _THREAD.start()
    return _THREAD


def wait(timeout: float = 60.0) -> None:
    """Let the background computation finish (called before a kernel's first launch; free once
    it has finished, and when none was started)."""
    global _PENDING
    if _PENDING and _THREAD is not None:
        if _THREAD is not threading.current_thread():
            _THREAD.join(timeout)
        _PENDING = _THREAD.is_alive()
