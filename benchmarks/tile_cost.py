"""How much of a Hopper forward's time is outside the key-block loop (debug; H200, issue 13).

    PYTHONPATH=src python benchmarks/tile_cost.py [--d 128] [--sq 16384] [--h 16] [--rounds 3]

Times the FP8 (e4m3, its V^T pre-pass timed apart and subtracted; ``fp8`` with descales per (batch, KV head),
``fp8_nodesc`` without, so the kernel loads none) and the bf16 forward of the Hopper backend, non-causal,
with the same queries (so the same tiles and waves) and key lengths 2k .. 32k, and
fits ``t = a + b * n`` over ``n`` key blocks (the config's ``block_n`` keys each) by least squares. Per SM the grid runs
``waves = ceil(tiles / SMs)`` tiles one after the other (one CTA per SM: shared memory), so ``b /
waves`` is one key block's time in the steady loop and ``a / waves`` a tile's cost outside it (its
start, its first block's softmax, the last P V, the epilogue, the CTA's launch and the last wave's
idle SMs). Printed: both, the key block in SM cycles at the clock sampled while it ran
(``hopper_run.ClockLog``), the loop-only TFLOP/s (the slope) against the measured one at ``--sq`` keys,
and the share of that call's time outside the loop. JSON ``tile_cost_d<d>.json`` to ``$OUT`` (else
benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import hopper_run  # noqa: E402

from flashtile import fp8  # noqa: E402
from flashtile.spec import make_call  # noqa: E402


def fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares ``y = a + b x``: (a, b)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
    return my - b * mx, b


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--sq", type=int, default=16384)
    ap.add_argument("--h", type=int, default=16)
    ap.add_argument("--keys", type=int, nargs="+", default=[2048, 4096, 8192, 16384, 32768])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rep-ms", type=int, default=100)
    args = ap.parse_args()
    import triton

    from flashtile.backends.hopper import configs, launch

    d, sq, h = args.d, args.sq, args.h
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    q = torch.randn(1, sq, h, d, device="cuda", dtype=torch.bfloat16)
    fns, clocks = {}, hopper_run.ClockLog()
    for sk in args.keys:
        k, v = (torch.randn(1, sk, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        q8, k8, v8, qd, kd, vd = fp8.quantize(q, k, v)
        call, call8 = make_call(headdim=d), make_call(headdim=d, q_descale=qd, k_descale=kd, v_descale=vd)
        fns[f"fp8 {sk}"] = lambda q8=q8, k8=k8, v8=v8, c=call8: launch.forward_fp8(q8, k8, v8, c)
        fns[f"fp8_nodesc {sk}"] = lambda q8=q8, k8=k8, v8=v8, c=call: launch.forward_fp8(q8, k8, v8, c)
        fns[f"vt {sk}"] = lambda v8=v8: launch.transpose_v(v8, False)
        fns[f"bf16 {sk}"] = lambda k=k, v=v, c=call: launch.forward(q, k, v, c)
    runs = hopper_run.timed_rounds(fns, args.rounds, args.rep_ms, f"s_q {sq} d {d}", 120.0, clocks)
    clock = clocks.summary()
    clocks.close()
    med = {name: sorted(v)[len(v) // 2] for name, v in runs.items() if v}
    rows = []
    fp8_cfg = configs.fp8_config_for(d, causal=False, seqlen_q=sq)
    for kind, cfg in (("fp8", fp8_cfg), ("fp8_nodesc", fp8_cfg),
                      ("bf16", configs.config_for(d, causal=False, seqlen_q=sq))):
        block_m, block_n = cfg.block_m, cfg.block_n
        tiles = math.ceil(sq / block_m) * h
        waves = math.ceil(tiles / sms)
        ks = [sk for sk in args.keys if f"{kind} {sk}" in med]
        ts = [med[f"{kind} {sk}"] - (med.get(f"vt {sk}", 0.0) if kind.startswith("fp8") else 0.0) for sk in ks]
        nbs = [sk / block_n for sk in ks]
        a, b = fit(nbs, ts)  # ms, ms per key block (all waves)
        mhz = [clock[f"{kind} {sk}"]["mhz"] for sk in ks if f"{kind} {sk}" in clock]
        mhz_med = sorted(mhz)[len(mhz) // 2] if mhz else None
        block_us = b / waves * 1e3
        flops_block = 4 * sq * h * d * block_n  # one key block of every tile
        t_at = a + b * sq / block_n
        row = {"kind": kind, "block_m": block_m, "block_n": block_n, "tiles": tiles, "waves": waves, "keys": ks,
               "ms": [round(t, 4) for t in ts], "mhz": mhz_med, "per_tile_outside_us": round(a / waves * 1e3, 2),
               "key_block_ns": round(block_us * 1e3, 1),
               "key_block_cycles": round(block_us * mhz_med) if mhz_med else None,
               "loop_tflops": round(flops_block / (b * 1e-3) / 1e12, 1),
               "tflops_at_sq": round(flops_block * sq / block_n / (t_at * 1e-3) / 1e12, 1),
               "outside_share_at_sq": round(a / t_at, 3),
               "fit_max_rel_residual": round(max(abs(t - a - b * n) / t for t, n in zip(ts, nbs, strict=True)), 4)}
        rows.append(row)
        hopper_run.log(" ".join(f"{k_}={v_}" for k_, v_ in row.items()))
    print(f"\nd{d} s_q {sq} h{h}, non-causal; key lengths {args.keys}; {sms} SMs")
    print(f"{'kind':>5} {'waves':>5} {'MHz':>5} {'key block ns':>12} {'cycles':>6} {'tile outside us':>15} "
          f"{'loop TF/s':>9} {'TF/s at s_q':>11} {'outside':>7}")
    for r in rows:
        print(f"{r['kind']:>5} {r['waves']:>5} {r['mhz']!s:>5} {r['key_block_ns']:>12} {r['key_block_cycles']!s:>6} "
              f"{r['per_tile_outside_us']:>15} {r['loop_tflops']:>9} {r['tflops_at_sq']:>11} "
              f"{r['outside_share_at_sq']:>7}")
    out_dir = os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"tile_cost_d{d}.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, "clock": clock,
                   "ms": med, "rows": rows}, f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
