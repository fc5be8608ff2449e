"""The start-up prewarm (flashtile._prewarm): when it applies, and that it leaves Triton's
per-process key computed."""

import importlib.util

import pytest
import torch

from flashtile import _prewarm

HAS_TRITON = importlib.util.find_spec("triton") is not None


def test_prewarm_switch_and_cpu_builds(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.delenv("FLASHTILE_PREWARM", raising=False)
    assert not _prewarm.wanted()  # a CPU build of torch: nothing to prewarm
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert _prewarm.wanted() is HAS_TRITON
    for off in ("0", "off", "False"):
        monkeypatch.setenv("FLASHTILE_PREWARM", off)
        assert not _prewarm.wanted()


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_prewarm_computes_triton_key(monkeypatch, tmp_path):
    import triton.runtime.cache as cache_module

    triton_key = getattr(cache_module.triton_key, "flashtile_original", cache_module.triton_key)
    monkeypatch.setattr(cache_module, "triton_key", triton_key)  # restored after the test
    monkeypatch.setenv("FLASHTILE_CACHE_DIR", str(tmp_path))  # no key kept: the thread computes it
    triton_key.cache_clear()
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.delenv("FLASHTILE_PREWARM", raising=False)
    monkeypatch.setattr(_prewarm, "_THREAD", None)
    t = _prewarm.start()
    assert t is not None and t.daemon
    assert _prewarm.start() is t  # once per process
    _prewarm.wait()  # what a kernel's first launch does
    assert not t.is_alive() and not _prewarm._PENDING
    assert triton_key.cache_info().currsize == 1  # the first launch finds it computed
    _prewarm.wait()  # free once done
    assert len(list(tmp_path.glob("triton_key-*.json"))) == 1  # and kept for the next process


def test_first_launch_waits_for_the_prewarm(monkeypatch):
    """FastKernel.launch joins a pending prewarm before the kernel's first launch."""
    pytest.importorskip("triton")
    from flashtile.backends.triton import fastlaunch

    calls = []
    monkeypatch.setattr(_prewarm, "_PENDING", True)
    monkeypatch.setattr(_prewarm, "wait", lambda: calls.append(1))

    class Fn:
        def __getitem__(self, grid):
            return lambda *a, **k: None

    fk = fastlaunch.FastKernel.__new__(fastlaunch.FastKernel)
    fk.fast, fk.fn = False, Fn()
    fk.launch((1,), (), {})
    assert calls == [1]


def test_key_memo_round_trip_and_invalidation(tmp_path):
    """The memo returns the kept key while the files keep their metadata, and nothing once one
    changes, a file appears, or another Triton folder asks."""
    root = tmp_path / "triton"
    for rel in ("runtime/cache.py", "compiler/compiler.py", "backends/nvidia/driver.py", "language/core.py",
                "_C/libtriton.so"):  # fmt: skip
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(rel.encode() * 3)
    memo = _prewarm.KeyMemo(str(root), str(tmp_path / "cache"))
    sig = memo.signature()
    assert memo.load(sig) is None  # nothing kept yet
    memo.save(sig, "3.6.0-abc")
    assert memo.load(sig) == "3.6.0-abc"
    assert memo.signature() == sig  # stable while nothing changes
    (root / "backends/nvidia/driver.py").write_bytes(b"edited, longer than before")
    sig2 = memo.signature()
    assert sig2 != sig and memo.load(sig2) is None
    (root / "language/new_module.py").write_bytes(b"x")
    assert memo.signature() != sig2
    other = _prewarm.KeyMemo(str(tmp_path / "elsewhere"), str(tmp_path / "cache"))
    assert other.path != memo.path
    (tmp_path / "cache" / memo.path.rsplit("/", 1)[1]).write_text("{not json")
    assert memo.load(sig) is None  # a damaged memo is a miss


def test_install_key_needs_the_checked_layout():
    """install_key leaves a module alone unless get_cache_key reads triton_key by name there."""
    import types

    mod = types.ModuleType("triton.fake_cache")
    mod.triton_key = lambda: "computed"
    mod.get_cache_key = lambda: "no reference to the key function"
    assert not _prewarm.install_key(mod, "kept")
    assert mod.triton_key() == "computed"
    exec("def get_cache_key():\n    return triton_key()", vars(mod))
    assert _prewarm.install_key(mod, "kept")
    assert mod.triton_key() == "kept" and mod.get_cache_key() == "kept"
    assert _prewarm.install_key(mod, "other") and mod.triton_key() == "kept"  # installed once


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_key_memo_gives_triton_its_own_key(tmp_path):
    """End to end with the installed Triton, in fresh processes: the first computes and keeps the
    key, the second installs the kept value, which equals what triton_key() computes."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json, triton.runtime.cache as c; from flashtile import _prewarm; _prewarm._work(); "
        "f = c.triton_key; memo = getattr(f, 'flashtile_memo', False); "
        "real = f.flashtile_original() if memo else f(); "
        "print(json.dumps(dict(memo=memo, equal=f() == real, key=real[:40])))"
    )
    env = dict(os.environ, FLASHTILE_CACHE_DIR=str(tmp_path), FLASHTILE_PREWARM="0")
    runs = [
        json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                  check=True).stdout.strip().splitlines()[-1])
        for _ in range(2)
    ]  # fmt: skip
    assert runs[0]["memo"] is False and runs[1]["memo"] is True
    assert runs[1]["equal"] and runs[0]["key"] == runs[1]["key"]
    assert len(list(tmp_path.glob("triton_key-*.json"))) == 1


def test_prewarm_thread_never_imports_triton(tmp_path):
    """The thread does not import Triton (importing flashtile must not, and two threads importing one
    package can see it half-initialised: torch._dynamo's import failed with "module 'triton' has no
    attribute 'backends'" on the H200): in a fresh process whose code never imports Triton, Triton
    stays unimported while the thread waits; once the caller imports it, the thread installs or
    computes the key (and wait() returns at once before that)."""
    import json
    import os
    import subprocess
    import sys

    code = (
        "import json, sys, time, torch; torch.version.cuda = torch.version.cuda or '12.8'\n"
        "import flashtile; from flashtile import _prewarm\n"
        "t = _prewarm._THREAD; time.sleep(0.3)\n"
        "before = 'triton' in sys.modules; alive = t is not None and t.is_alive()\n"
        "t0 = time.monotonic(); _prewarm.wait(); quick = time.monotonic() - t0 < 0.05\n"
        "import triton.runtime.cache as c\n"
        "_prewarm.wait(); done = t is not None and not t.is_alive()\n"
        "memo = bool(getattr(c.triton_key, 'flashtile_memo', False)); cached = c.triton_key.cache_info().currsize\n"
        "print(json.dumps(dict(before=before, alive=alive, quick=quick, done=done, memo=memo, cached=cached)))\n"
    )
    env = dict(os.environ, FLASHTILE_CACHE_DIR=str(tmp_path))
    env.pop("FLASHTILE_PREWARM", None)
    runs = [
        json.loads(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                  check=True).stdout.strip().splitlines()[-1])
        for _ in range(2)
    ]  # fmt: skip
    for r in runs:  # no import by the thread; wait() does not block on it before Triton is imported
        assert r["before"] is False and r["alive"] and r["quick"] and r["done"], r
    assert runs[0]["memo"] is False and runs[0]["cached"] == 1  # first process: hashed by the thread, kept
    assert runs[1]["memo"] is True  # second: the kept key installed
