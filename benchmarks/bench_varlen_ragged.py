"""Forward of ragged varlen batches on the Hopper kernels: documents of random lengths (most of
them not a multiple of the query tile, so every sequence ends in a partial tile), timed alone.

    PYTHONPATH=src python benchmarks/bench_varlen_ragged.py [--tag before] [--out DIR]

Prints µs and TFLOP/s (medians of ``triton.testing.do_bench``) per cell and writes
``varlen_ragged_<tag>.json`` under ``--out`` (default ``$OUT`` or benchmarks/results/). Meant for
before / after comparisons of the forward's varlen epilogue: run it from two trees in one device
session, alternating (``--tag``), and compare the medians.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os

import torch


def _lens(total: int, lo: int, hi: int, seed: int) -> list[int]:
    """Lengths uniform in ``[lo, hi]`` (fixed seed) until ``total`` tokens are used."""
    g = torch.Generator().manual_seed(seed)
    out, used = [], 0
    while used < total:
        n = min(int(torch.randint(lo, hi + 1, (1,), generator=g)), total - used)
        out.append(n)
        used += n
    return out


def main() -> int:
    import triton

    from flashtile.backends.hopper import launch as hlaunch
    from flashtile.spec import make_call
    from flashtile.testing import attention_flops

    ap = argparse.ArgumentParser()
    ap.add_argument("--tag", default="run")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results"))
    ap.add_argument("--tokens", type=int, default=16384)
    args = ap.parse_args()
    rows = []
    for d, h in ((128, 16), (64, 32)):
        for lo, hi in ((500, 1500), (100, 400)):
            for causal in (False, True):
                lens = _lens(args.tokens, lo, hi, seed=d + lo)
                cu = torch.tensor([0, *lens], device="cuda").cumsum(0).to(torch.int32)
                total, mx = int(cu[-1]), max(lens)
                q, k, v = (torch.randn(1, total, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                call = make_call(headdim=d, causal=causal, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=mx,
                                 max_seqlen_k=mx)

                def fn(q=q, k=k, v=v, call=call):
                    return hlaunch.forward(q, k, v, call)

                fn()
                torch.cuda.synchronize()
                ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
                flops = sum(attention_flops(1, h, n, d, causal) for n in lens)
                row = dict(d=d, h=h, lens=f"{lo}-{hi}", n_seqs=len(lens), causal=causal, us=round(ms * 1e3, 1),
                           tflops=round(flops / ms / 1e9, 1))
                print(row, flush=True)
                rows.append(row)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"varlen_ragged_{args.tag}.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "date": dt.date.today().isoformat(), "tag": args.tag, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
