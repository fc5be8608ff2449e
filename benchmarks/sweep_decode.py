"""Decode kernel sweep (GPU): tile config x split count, replayed from CUDA graphs (kernel time only).

For each shape (bf16, h = 32, hk = 8, d = 128, seqlen_q = 1) and cache layout, times
``backends.triton.decode.decode`` for each (BLOCK_N, num_warps, num_stages) and a split count
of 1x / 2x / 4x the heuristic's, and prints the best few against the copy ceiling. Used to
choose ``decode._config`` and ``choose_splits``; see benchmarks/NOTES.md.

    PYTHONPATH=src python benchmarks/sweep_decode.py
"""

from __future__ import annotations

import argparse
import functools
import itertools

import torch
import triton
from bench_decode import graph_ms  # benchmarks/ is the script's directory

from flashtile.backends.triton.launch_decode import choose_splits, decode
from flashtile.spec import make_call

CONFIGS = [(32, 2, 2), (32, 4, 3), (64, 2, 3), (64, 4, 2), (64, 4, 3), (64, 4, 4), (64, 8, 3), (128, 4, 2),
           (128, 8, 2), (128, 8, 3)]  # fmt: skip
SHAPES = [(1, 8192), (1, 32768), (8, 8192), (8, 32768), (64, 1024), (64, 8192), (64, 32768)]


def _inputs(batch, L, page, h, hk, d, dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(batch, 1, h, d, device="cuda", dtype=dtype, generator=g)
    seqlens = torch.full((batch,), L - 1, dtype=torch.int32, device="cuda")
    if page == 0:
        kc = torch.randn(batch, L, hk, d, device="cuda", dtype=dtype, generator=g)
        table = None
    else:
        nblk = L // page
        kc = torch.randn(batch * nblk, page, hk, d, device="cuda", dtype=dtype, generator=g)
        table = torch.randperm(batch * nblk, device="cuda", generator=g).view(batch, nblk).to(torch.int32)
    return q, kc, torch.randn_like(kc), table, seqlens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default=",".join(f"{b}x{L}" for b, L in SHAPES), help="batch x cache length, ...")
    ap.add_argument("--pages", default="0,16,256", help="0 = dense cache")
    args = ap.parse_args()
    shapes = [tuple(map(int, x.split("x"))) for x in args.shapes.split(",")]
    pages = [int(x) for x in args.pages.split(",")]
    h, hk, d, dtype = 32, 8, 128, torch.bfloat16
    n = 1 << 30
    src, dst = torch.empty(n, dtype=torch.uint8, device="cuda"), torch.empty(n, dtype=torch.uint8, device="cuda")
    ceil = 2 * n / triton.testing.do_bench(functools.partial(dst.copy_, src), warmup=20, rep=200,
                                           return_mode="median") / 1e6  # fmt: skip
    del src, dst
    spec = make_call(headdim=d, dropout_p=0.0, softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0,
                     deterministic=False)  # fmt: skip
    print(f"copy ceiling {ceil:.0f} GB/s")
    for (batch, L), page in itertools.product(shapes, pages):
        q, kc, vc, table, seqlens = _inputs(batch, L, page, h, hk, d, dtype)
        err = torch.zeros(1, dtype=torch.int32, device="cuda")
        base = choose_splits(batch * hk, L, 128, torch.cuda.get_device_properties(0).multi_processor_count, 4)
        nbytes = 2 * batch * L * hk * d * 2
        res = []
        for cfg, mult in itertools.product(CONFIGS, (0.25, 0.5, 1, 2)):
            splits = max(1, min(round(base * mult), L // cfg[0]))
            f = functools.partial(decode, q, kc, vc, table, seqlens, None, spec, sn=1, capacity=L,
                                  n_index=kc.shape[0], dense=page == 0, err=err, num_splits=splits, config=cfg)
            try:
                ms = graph_ms(f, rep=100)
            except Exception as e:  # out of resources
                print(f"  {cfg} x{mult}: {type(e).__name__}")
                continue
            res.append((ms, cfg, splits))
        res.sort()
        assert int(err.item()) == 0
        best = " | ".join(f"{c} s={s} {ms * 1e3:.0f}us {100 * nbytes / ms / 1e6 / ceil:.0f}%" for ms, c, s in res[:4])
        dflt = [r for r in res if r[1] == ((128, 8, 3) if page != 16 else (128, 4, 2)) and r[2] == base]
        dtxt = f"default {dflt[0][0] * 1e3:.0f}us" if dflt else ""
        print(f"b={batch:3d} L={L:6d} page={page:3d} base_splits={base:2d}: {best}   [{dtxt}]", flush=True)


if __name__ == "__main__":
    main()
