"""O(N) memory and deterministic gradients.

CPU memory is measured in a fresh subprocess: the peak resident set size (``VmHWM``) after
forward + backward minus the resident size (``VmRSS``) just before it, an upper bound on the
extra memory the call needed (the test can fail spuriously high, never pass spuriously low).
``VmHWM`` rather than ``ru_maxrss``: the latter survives exec and starts at the parent's (pytest's)
resident size. glibc's mmap threshold is pinned (``MALLOC_MMAP_THRESHOLD_``) so that large
buffers go back to the system when freed and the resident size follows the live memory (with
the default dynamic threshold, freed tiles stay resident and the measure drifts by tens of
MiB). A control run of the materialising oracle checks that the measurement sees an O(N^2) call.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import requires_cuda, shrink

from flashtile import flash_attn_func, flash_attn_varlen_func
from flashtile.testing import cu_seqlens, make_alibi, qkv_inputs

MIB = 1 << 20

_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    import flashtile
    from flashtile.testing import attention_ref

    mode, n, b, h, d = sys.argv[1], *map(int, sys.argv[2:])

    def status(key):
        with open("/proc/self/status") as f:
            line = next(l for l in f if l.startswith(key + ":"))
        return int(line.split()[1]) * 1024  # kB

    def run(n):
        torch.manual_seed(0)
        q, k, v = (torch.randn(b, n, h, d, requires_grad=True) for _ in range(3))
        dout = torch.randn(b, n, h, d)
        before = status("VmRSS")
        if mode == "flashtile":
            with flashtile.use_backend("torch"):
                out = flashtile.flash_attn_func(q, k, v)
        else:
            out, _ = attention_ref(q, k, v)
        out.backward(dout)
        assert torch.isfinite(q.grad).all()
        return before

    run(128)  # warm-up: lazy initialisation is not the call's memory
    before = run(n)
    print(status("VmHWM") - before)
    """
)


def extra_peak_bytes(mode: str, n: int, b: int = 1, h: int = 2, d: int = 32) -> int:
    res = subprocess.run(
        [sys.executable, "-c", _SCRIPT, mode, str(n), str(b), str(h), str(d)],
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": str(64 << 10)},
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return int(res.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_cpu_forward_backward_memory_is_linear():
    """b=1, h=2, d=32, seqlen 8192, fp32: the score matrix would be 512 MiB; forward + backward
    of the torch engine must need less than 1/8 of it."""
    n, b, h = 8192, 1, 2
    scores = b * h * n * n * 4
    extra = extra_peak_bytes("flashtile", n, b, h)
    assert extra < scores / 8, f"peak extra memory {extra / MIB:.1f} MiB >= {scores / 8 / MIB:.0f} MiB"
    # control: the oracle materialises the scores, and the measurement sees it
    n_ref = 2048
    extra_ref = extra_peak_bytes("reference", n_ref, b, h)
    assert extra_ref > b * h * n_ref * n_ref * 4, f"control run only measured {extra_ref / MIB:.1f} MiB"


@requires_cuda
def test_cuda_forward_backward_memory_is_linear(backend, default_tiles):
    """Same check on the GPU with the allocator's own peak counter."""
    n, b, h, d = 16384, 1, 2, 64
    q, k, v = (x.requires_grad_() for x in qkv_inputs(b, n, n, h, h, d, torch.float16, "cuda"))
    dout = torch.randn_like(q)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    flash_attn_func(q, k, v, causal=True).backward(dout)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    scores = b * h * n * n * 4
    assert extra < scores / 8, f"peak extra memory {extra / MIB:.1f} MiB >= {scores / 8 / MIB:.0f} MiB"


# ----------------------------------------------------------------------------------------------
# determinism


def _grads(fn, inputs, dout):
    xs = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn(*xs)
    return (out, *torch.autograd.grad(out, xs, dout))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_deterministic_dense(backend, device, dtype):
    sq, sk = shrink(backend, 130, 77)
    inputs = qkv_inputs(2, sq, sk, 6, 2, 64, dtype, device)
    alibi = make_alibi("bh", 2, 6, device)
    fn = lambda q, k, v: flash_attn_func(q, k, v, causal=True, alibi_slopes=alibi, softcap=4.0, deterministic=True)
    dout = torch.randn(2, sq, 6, 64, dtype=dtype, device=device)
    first, second = _grads(fn, inputs, dout), _grads(fn, inputs, dout)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_deterministic_varlen(backend, device):
    lens_q, lens_k = [shrink(backend, n) for n in (40, 1, 0, 90)], [shrink(backend, n) for n in (60, 5, 3, 70)]
    inputs = (
        torch.randn(sum(lens_q), 4, 32, device=device),
        torch.randn(sum(lens_k), 1, 32, device=device),
        torch.randn(sum(lens_k), 1, 32, device=device),
    )
    cu_q, cu_k = cu_seqlens(lens_q, device), cu_seqlens(lens_k, device)
    fn = lambda q, k, v: flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), window_size=(16, 4), deterministic=True
    )
    dout = torch.randn(sum(lens_q), 4, 32, device=device)
    first, second = _grads(fn, inputs, dout), _grads(fn, inputs, dout)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
