"""Start-up: Triton's per-process cache key, computed in the background at import (issue 16).

The first kernel launch of a process with every kernel already in Triton's on-disk cache still
cost ~0.4 s on the H200 host (``benchmarks/first_call_profile.py``): before Triton can look a
kernel up it computes ``triton.runtime.cache.triton_key()`` once per process, a sha256 over
Triton's compiler sources and its ~hundreds-of-MB ``libtriton`` shared library. File reads and
hashing release the GIL, so a daemon thread started by ``import flashtile`` does that work while
the caller creates its CUDA context, its tensors and its model. The thread never imports Triton
(importing flashtile does not, and two threads importing one package can see it half-initialised):
it reads the kept key below at once, then installs it, or hashes, as soon as the caller's own
import of Triton has finished (5 ms polls, for up to 10 minutes). ``functools.lru_cache`` does not
make a second caller wait for a computation in flight (it would hash everything again), so
flashtile's launchers call :func:`wait` before a kernel's first (generic) launch: the first call
waits for what is left of the background work instead of redoing it.

The key itself is kept between processes (:class:`KeyMemo`): a small JSON file under
``FLASHTILE_CACHE_DIR`` (default ``$XDG_CACHE_HOME/flashtile``, else ``~/.cache/flashtile``) maps
the size, modification time and inode of every file ``triton_key()`` reads (a ~1-5 ms walk of
Triton's ``compiler``, ``backends`` and ``language`` folders, ``runtime/cache.py`` and
``libtriton``) to the key an earlier process computed from their contents. When nothing changed,
the thread installs that value as ``triton_key()`` (every loaded ``triton.*`` module's reference to
the function, where ``get_cache_key`` looks it up by name: checked, else not installed) instead of
hashing ~400-500 MB again; any change to those files (an upgrade, a rebuild, an edited source) misses
and recomputes. The same approach as ccache's "direct mode": file metadata standing in for
contents that only a reinstall changes. Checked on Triton 3.6 (the H200's) and 3.9 (CI's CPU
builds, where nothing launches); another layout leaves Triton's function alone.

Only on CUDA builds of torch with Triton installed (nothing to gain elsewhere), never touching
CUDA itself (no driver initialisation from a background thread), and off with
``FLASHTILE_PREWARM=0``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import sys
import tempfile
import threading
import time

_THREAD: threading.Thread | None = None
_PENDING = False  # a started thread not yet joined (wait's fast test)


class KeyMemo:
    """Triton's per-process key kept between processes, valid while the files it was computed
    from keep their size, modification time and inode (see the module's docstring).

    ``root``: Triton's package folder; ``cache_dir``: where the memo file lives."""

    FOLDERS = ("compiler", "backends", "language", "_C")  # what triton_key() reads, and libtriton
    FILES = (os.path.join("runtime", "cache.py"),)

    def __init__(self, root: str, cache_dir: str | None = None) -> None:
        self.root = root
        self.cache_dir = cache_dir if cache_dir is not None else default_cache_dir()
        tag = hashlib.sha256(os.path.abspath(root).encode()).hexdigest()[:16]
        self.path = os.path.join(self.cache_dir, f"triton_key-{tag}.json")

    def signature(self) -> str:
        """A digest of (relative path, size, mtime, inode) of every file the key depends on."""
        h = hashlib.sha256()
        paths = [os.path.join(self.root, f) for f in self.FILES]
        for sub in self.FOLDERS:
            for dirpath, dirnames, filenames in os.walk(os.path.join(self.root, sub)):
                dirnames[:] = sorted(d for d in dirnames if d != "__pycache__")
                paths += [os.path.join(dirpath, f) for f in sorted(filenames)]
        for p in paths:
            st = os.stat(p)
            h.update(f"{os.path.relpath(p, self.root)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}\n".encode())
        return h.hexdigest()

    def load(self, signature: str) -> str | None:
        """The key kept for ``signature``, or None (no memo, another signature, unreadable)."""
        try:
            with open(self.path) as fh:
                entry = json.load(fh)
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or entry.get("signature") != signature:
            return None
        key = entry.get("key")
        return key if isinstance(key, str) and key else None

    def save(self, signature: str, key: str) -> None:
        """Keep ``key`` for ``signature`` (atomically: a reader sees the old file or the new one)."""
        os.makedirs(self.cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.cache_dir, prefix=".triton_key-")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"signature": signature, "key": key, "root": self.root}, fh)
            os.replace(tmp, self.path)
        except BaseException:
            os.unlink(tmp)
            raise


def default_cache_dir() -> str:
    d = os.environ.get("FLASHTILE_CACHE_DIR")
    if d:
        return d
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "flashtile")


def install_key(cache_module, key: str) -> bool:
    """Make ``cache_module.triton_key()`` (and every loaded ``triton.*`` module's reference to it)
    return ``key`` without hashing; False (nothing changed) where the module's layout is not the
    one checked: ``get_cache_key`` looking ``triton_key`` up by name in the module's globals."""
    orig = getattr(cache_module, "triton_key", None)
    if getattr(orig, "flashtile_memo", False):
        return True
    get = getattr(cache_module, "get_cache_key", None)
    code = getattr(get, "__code__", None)
    if orig is None or code is None or "triton_key" not in code.co_names or get.__globals__ is not vars(cache_module):
        return False

    @functools.lru_cache
    def triton_key() -> str:
        return key

    triton_key.flashtile_memo = True  # type: ignore[attr-defined]
    triton_key.flashtile_original = orig  # type: ignore[attr-defined]  # for tests and debugging
    cache_module.triton_key = triton_key
    for name, mod in list(sys.modules.items()):  # modules that imported the function by name
        if (name == "triton" or name.startswith("triton.")) and getattr(mod, "triton_key", None) is orig:
            mod.triton_key = triton_key
    return True


#: how long the thread waits for someone else to import Triton, and how often it looks (s)
IMPORT_WAIT_S = 600.0
IMPORT_POLL_S = 0.005


def _imported(name: str):
    """Module ``name`` once another thread has finished importing it (else None). The thread never
    imports Triton itself: a package imported by two threads at once can hand one of them a
    half-initialised module (Python's import-lock deadlock avoidance), seen on the H200 as
    ``torch._dynamo``'s import failing with "module 'triton' has no attribute 'backends'" while
    this thread imported Triton; and importing flashtile must not import Triton (its interpreter
    switch is read then)."""
    mod = sys.modules.get(name)
    spec = getattr(mod, "__spec__", None)
    if mod is None or spec is None or getattr(spec, "_initializing", False):
        return None
    return mod


def _work() -> None:
    try:
        spec = importlib.util.find_spec("triton")  # (locates the package, does not import it)
        if spec is None or not spec.submodule_search_locations:
            return
        memo = KeyMemo(os.path.abspath(list(spec.submodule_search_locations)[0]))
        try:  # file metadata only: no import
            sig = memo.signature()
            key = memo.load(sig)
        except OSError:
            sig = key = None
        deadline = time.monotonic() + IMPORT_WAIT_S
        while (cache_module := _imported("triton.runtime.cache")) is None or _imported("triton") is None:
            if time.monotonic() > deadline:
                return
            time.sleep(IMPORT_POLL_S)
        if key is not None and install_key(cache_module, key):
            return
        key = cache_module.triton_key()  # (its package walk imports nothing once triton is loaded)
        if sig is not None:
            try:
                memo.save(sig, key)
            except OSError:  # a read-only home: the next process hashes again
                pass
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
        if _imported("triton.runtime.cache") is None:
            return  # (the thread waits for Triton's import: nothing to join yet)
        if _THREAD is not threading.current_thread():
            _THREAD.join(timeout)
        _PENDING = _THREAD.is_alive()
