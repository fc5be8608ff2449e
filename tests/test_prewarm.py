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
    t.join(60)
    assert not t.is_alive()
    assert triton_key.cache_info().currsize == 1  # the first launch finds it computed
