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
def test_prewarm_computes_triton_key(monkeypatch):
    from triton.runtime.cache import triton_key

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
