"""FP8 accuracy study on the CPU: RMSE of FP8 attention against fp32 attention on the original
(unquantised) inputs, with and without incoherent processing, next to bf16 flashtile.

    PYTHONPATH=src python benchmarks/fp8_rmse.py [--seqlen 1024] [--headdim 128] [--seeds 3]

Inputs: q, k, v standard normal (b=1, h=4), or the same with 0.1% of the entries of q and k
replaced by outliers of magnitude 10-100 (random sign). Columns:

* ``bf16``: flashtile (torch backend) on the inputs rounded to bf16, output bf16;
* ``fp8 tensor`` / ``fp8 head``: q, k, v quantised to e4m3 per tensor / per (batch, KV head),
  through the FP8 API on the CPU (dequantised inputs, exact attention: input quantisation only);
* ``+rot``: the same after ``flashtile.fp8.rotate_qk`` (random Hadamard rotation of q and k);
* ``kernel``: ``flashtile.testing.fp8_kernel_emulation``: the FP8 kernel's numerics (per-head
  scales, P rounded to e4m3 for P V), what the hopper kernel adds on top of input quantisation.

Prints a markdown table (mean RMSE over ``--seeds``); the numbers are in benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "src"))

from flashtile import flash_attn_func, fp8  # noqa: E402
from flashtile.testing import attention_ref, fp8_dequantized, fp8_kernel_emulation  # noqa: E402


def _inputs(s: int, d: int, outliers: bool, g: torch.Generator):
    q, k, v = (torch.randn(1, s, 4, d, generator=g) for _ in range(3))
    if outliers:
        for x in (q, k):
            n = x.numel()
            idx = torch.randperm(n, generator=g)[: n // 1000]
            sign = torch.sign(torch.randn(idx.numel(), generator=g))
            x.view(-1)[idx] = (torch.rand(idx.numel(), generator=g) * 90 + 10) * sign
    return q, k, v


def _rmse(o: torch.Tensor, ref: torch.Tensor) -> float:
    return float((o.float() - ref).pow(2).mean().sqrt())


def study(s: int, d: int, seed: int) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(seed)
    res = {}
    for dist in ("gaussian", "outliers 0.1%"):
        q, k, v = _inputs(s, d, dist != "gaussian", g)
        ref, _ = attention_ref(q, k, v)
        row = {"bf16": _rmse(flash_attn_func(q.bfloat16(), k.bfloat16(), v.bfloat16()), ref)}
        for rot in (False, True):
            qq, kk = fp8.rotate_qk(q, k, generator=g) if rot else (q, k)
            for gran in ("tensor", "head"):
                q8, k8, v8, qd, kd, vd = fp8.quantize(qq, kk, v, granularity=gran)
                out = flash_attn_func(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd)
                row[f"fp8 {gran}{' +rot' if rot else ''}"] = _rmse(out, ref)
            q8, k8, v8, qd, kd, vd = fp8.quantize(qq, kk, v, granularity="head")
            emu = fp8_kernel_emulation(fp8_dequantized(q8, qd), fp8_dequantized(k8, kd), fp8_dequantized(v8, vd))
            row[f"kernel{' +rot' if rot else ''}"] = _rmse(emu, ref)
        res[dist] = row
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--seeds", type=int, default=3)
    args = ap.parse_args()
    runs = [study(args.seqlen, args.headdim, seed) for seed in range(args.seeds)]
    cols = list(runs[0]["gaussian"])
    print(f"RMSE vs fp32 on the original inputs, b=1 h=4 s={args.seqlen} d={args.headdim}, "
          f"mean of {args.seeds} seeds\n")  # fmt: skip
    print("| inputs | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for dist in runs[0]:
        vals = [sum(r[dist][c] for r in runs) / len(runs) for c in cols]
        print(f"| {dist} | " + " | ".join(f"{x:.2e}" for x in vals) + " |")


if __name__ == "__main__":
    main()
