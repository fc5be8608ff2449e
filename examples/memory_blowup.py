"""Why FlashAttention exists: standard attention's memory grows with seqlen^2, flashtile's with seqlen.

Standard attention materialises the (seqlen x seqlen) score matrix and the probabilities
softmax(scores) for every head; doubling the sequence quadruples them. flashtile walks the keys
tile by tile with an online softmax (see online_softmax.py) and keeps only O(seqlen * headdim)
per head. This script measures the peak memory of one forward pass of each as the sequence
grows. Standard attention is not run once its score matrix alone would exceed ``--limit-gb``
(so the machine never runs out of memory): the script prints what it would need instead.

Peak memory is measured on the CPU as the growth of the process's peak resident memory during
the call: the kernel's high-water mark (VmHWM) is reset just before (Linux), after freed heap
memory is handed back to the system (glibc's malloc_trim), so the number is what the call
itself touched.

    python examples/memory_blowup.py                         # seqlen 512 .. 8192, limit 0.25 GiB
    python examples/memory_blowup.py --seqlens 1024,2048,4096,8192,16384 --limit-gb 1
    python examples/memory_blowup.py --backward --limit-gb 0.5
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import resource
import time

import torch

from flashtile import flash_attn_func
from flashtile.testing import standard_attention  # softmax(q k^T / sqrt(d)) v, holding the (s x s) scores

MiB, GiB = 2**20, 2**30


def _status(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _trim_heap() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: freed memory may be reused unseen, so peaks can read a little low


def one_pass(attn, q, k, v, dout, backward: bool):
    """One forward (no autograd graph) or forward + backward pass of ``attn``."""
    if backward:
        attn(q, k, v).backward(dout)
        q.grad = k.grad = v.grad = None
        return None
    with torch.no_grad():
        return attn(q, k, v)


def peak_memory(fn, *args) -> tuple[int, float]:
    """(peak extra resident bytes, seconds) of one call ``fn(*args)``."""
    _trim_heap()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        base, hwm = _status("VmRSS"), True
    except OSError:
        base, hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, False
    t0 = time.perf_counter()
    out = fn(*args)
    dt = time.perf_counter() - t0
    top = _status("VmHWM") if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    del out
    return max(0, top - base), dt


def _fmt(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqlens", default="512,1024,2048,4096,8192", help="comma-separated")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--heads", type=int, default=2)
    ap.add_argument("--headdim", type=int, default=32)
    ap.add_argument("--limit-gb", type=float, default=0.25,
                    help="do not run standard attention once its score matrix alone exceeds this (default 0.25)")
    ap.add_argument("--backward", action="store_true", help="measure forward + backward instead of forward")
    args = ap.parse_args()
    seqlens = [int(s) for s in args.seqlens.split(",") if s]
    b, h, d = args.batch, args.heads, args.headdim
    torch.manual_seed(0)
    for attn in (flash_attn_func, standard_attention):  # warm-up: imports, thread pools, backend choice
        x = torch.randn(1, 64, h, d, requires_grad=True)
        attn(x, x, x).sum().backward()

    what = "forward + backward" if args.backward else "forward"
    print(f"peak extra memory of one {what} pass, float32, batch {b}, heads {h}, headdim {d} (CPU)")
    print(f"{'seqlen':>7}  {'score matrix':>12}  {'standard attention':>22}  {'flashtile':>10}  {'ratio':>6}")
    for s in seqlens:
        q, k, v = (torch.randn(b, s, h, d, requires_grad=args.backward) for _ in range(3))
        dout = torch.randn(b, s, h, d)

        scores = b * h * s * s * 4
        flash, t_flash = peak_memory(one_pass, flash_attn_func, q, k, v, dout, args.backward)
        if scores > args.limit_gb * GiB:
            std_txt, ratio = f"would need > {_fmt(scores)}", ""
        else:
            std, t_std = peak_memory(one_pass, standard_attention, q, k, v, dout, args.backward)
            std_txt, ratio = f"{_fmt(std)} ({t_std:.2f} s)", f"{std / max(flash, 1):.0f}x"
        print(f"{s:>7}  {_fmt(scores):>12}  {std_txt:>22}  {_fmt(flash):>10}  {ratio:>6}   flashtile {t_flash:.2f} s",
              flush=True)
    print(f"standard attention stops at --limit-gb {args.limit_gb:g}: its score matrix grows 4x per doubling of the"
          " sequence; flashtile's grows at most 2x (its tiles have a fixed size).")
    for s in (32768, 131072):
        print(f"at seqlen {s}, standard attention's score matrix alone would need {_fmt(b * h * s * s * 4)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
