"""Decode-shaped ``flash_attn_func`` calls whose keys grow by one every call (issue 16): where the
time goes, host or device, against SDPA on the same tensors, on the GPU machine.

    PYTHONPATH=src python benchmarks/grow_calls.py [--calls 200] [--repeats 7]

Hugging Face's dynamic cache hands each layer a fresh ``(b, hk, s, d)`` k / v one key longer than
the step before (new strides every step). For two shapes (the HF generate benchmark's layer: b1
h16/4 d128 from 1k keys; bench_lean's decode row: b1 h32/8 d128 from 8k), in one process:

* wall us per call (``calls`` back-to-back calls between two synchronisations, median of
  ``repeats``) and host thread-CPU us per call of the same loop, for: flashtile with growing keys;
  flashtile with one fixed length (its planned path); SDPA flash and cuDNN with growing keys;
* device us per call (``torch.profiler``: the CUDA kernels' time over the loop / calls).

JSON to ``--out`` (default ``$OUT`` or benchmarks/results/).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import time

import torch


def _loop(fn, calls: int, repeats: int) -> tuple[float, float]:
    for _ in range(30):
        fn()
    torch.cuda.synchronize()
    wall, cpu = [], []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.thread_time()
        for _ in range(calls):
            fn()
        c1 = time.thread_time()
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - t0) / calls * 1e6)
        cpu.append((c1 - c0) / calls * 1e6)
    return statistics.median(wall), statistics.median(cpu)


def _device_us(fn, calls: int) -> float:
    from hopper_bwd_run import _kernel_times  # (this script's folder is on sys.path)

    for _ in range(10):
        fn()
    return sum(t for _, t in _kernel_times(fn, calls))


def case(b: int, h: int, hk: int, d: int, n0: int, calls: int, repeats: int, lengths: int = 512,
         profile: bool = False) -> dict:
    from bench_lean import growing_calls  # (this script's folder is on sys.path)

    import flashtile

    ft, sd = growing_calls(b, h, hk, d, n0, lengths, device="cuda", dtype=torch.bfloat16)
    torch.manual_seed(1)
    qf = torch.randn(b, 1, h, d, device="cuda", dtype=torch.bfloat16)
    kf, vf = (torch.randn(b, n0, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))

    def ft_fixed():
        return flashtile.flash_attn_func(qf, kf, vf, causal=True)

    from torch.nn.attention import SDPBackend, sdpa_kernel

    if profile:  # where flashtile's host time goes with growing keys (host_profile_gpu's cProfile table)
        from host_profile_gpu import _profile  # (this script's folder is on sys.path)

        with torch.no_grad():
            _profile(f"flashtile, keys growing, b{b} h{h}/{hk} from {n0}", ft, calls, 22)

    row = dict(shape=f"b{b} h{h}/{hk} d{d}, keys from {n0}")
    with torch.no_grad():
        for name, fn, be in (("flashtile_growing", ft, None), ("flashtile_fixed", ft_fixed, None),
                             ("sdpa_flash_growing", sd, SDPBackend.FLASH_ATTENTION),
                             ("sdpa_cudnn_growing", sd, SDPBackend.CUDNN_ATTENTION)):  # fmt: skip
            try:
                if be is None:
                    wall, cpu = _loop(fn, calls, repeats)
                    dev = _device_us(fn, calls)
                else:
                    with sdpa_kernel(be):
                        wall, cpu = _loop(fn, calls, repeats)
                        dev = _device_us(fn, calls)
                row[name] = dict(wall_us=round(wall, 2), host_cpu_us=round(cpu, 2), device_us=round(dev, 2))
            except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported
                row[name] = None
                print(f"  {name}: {type(e).__name__}: {str(e)[:120]}")
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--profile", action="store_true", help="also a cProfile of flashtile's growing calls")
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    args = ap.parse_args()
    import triton

    rows = [case(1, 16, 4, 128, 1024, args.calls, args.repeats, profile=args.profile),
            case(1, 32, 8, 128, 8192, args.calls, args.repeats, profile=args.profile)]
    meta = dict(date=_dt.datetime.now().isoformat(timespec="seconds"), gpu=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=triton.__version__)  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"grow_calls_{meta['gpu'].replace(' ', '_')}_{_dt.date.today()}.json")
    with open(path, "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    print(f"decode-shaped calls, keys growing per call (wall / host thread-CPU / device us per call) -> {path}")
    for r in rows:
        print(f"  {r['shape']}")
        for k, v in r.items():
            if k != "shape":
                print(f"    {k:22s} " + ("-" if v is None else f"{v['wall_us']:7.1f} {v['host_cpu_us']:7.1f} "
                                                             f"{v['device_us']:7.1f}"))  # fmt: skip


if __name__ == "__main__":
    main()
