"""Wall time of small attention calls, where the host side (validation, dispatch, the custom op,
launch) dominates: flashtile against SDPA flash and cuDNN in the same process.

    PYTHONPATH=src python benchmarks/bench_small_calls.py [--out DIR] [--tag NAME]

Shapes: b1 s128 h8 d64 (the anchors' small call) and b4 s512 h16 d128, bf16, forward and
forward+backward; and a decode-shaped forward (b1, 1 query, h32/8, d128, 8k keys) through
``flash_attn_func``. Times are medians of wall-clock loops with a synchronize per call (what a
user's eager loop pays), in microseconds. Uses only the public API, so it also runs against an
older tree (``PYTHONPATH=<old>/src``) for before/after comparisons in one device session.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import flashtile


def _wall_us(fn, iters: int = 200, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    shapes = [(1, 128, 8, 8, 64, 128), (4, 512, 16, 16, 128, 512), (1, 1, 32, 8, 128, 8192)]
    for b, sq, h, hk, d, sk in shapes:
        q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        k = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        v = torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        causal = sq == sk
        gqa = h != hk

        def ft(q=q, k=k, v=v, causal=causal):
            return flashtile.flash_attn_func(q, k, v, causal=causal)

        def sd(backend, qt=qt, kt=kt, vt=vt, causal=causal, gqa=gqa):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=gqa)

        impls = {"flashtile": ft, "sdpa-flash": lambda: sd(SDPBackend.FLASH_ATTENTION),
                 "sdpa-cudnn": lambda: sd(SDPBackend.CUDNN_ATTENTION)}  # fmt: skip
        for name, fn in impls.items():
            for mode in ("fwd", "fwd_bwd") if sq > 1 else ("fwd",):
                if mode == "fwd":
                    def step(fn=fn):
                        with torch.no_grad():
                            fn()
                else:
                    def step(fn=fn):
                        fn().sum().backward()
                try:
                    us = _wall_us(step)
                except Exception as e:  # noqa: BLE001 - a peer that cannot run this shape is reported
                    us = float("nan")
                    print(f"{name} {mode} b{b} sq{sq} sk{sk}: {type(e).__name__}: {str(e)[:100]}")
                rows.append(dict(impl=name, mode=mode, b=b, sq=sq, sk=sk, h=h, hk=hk, d=d, us=us))
    meta = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, flashtile_path=flashtile.__file__,
                date=_dt.datetime.now().isoformat(timespec="seconds"), tag=args.tag)  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"small_calls{'_' + args.tag if args.tag else ''}.json")
    with open(path, "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    print(f"small calls, wall us per call (median), {meta['gpu']}, {args.tag}")
    for r in rows:
        print(f"  {r['impl']:10s} {r['mode']:7s} b{r['b']} sq{r['sq']} sk{r['sk']} h{r['h']}/{r['hk']} d{r['d']}: "
              f"{r['us']:8.1f}")


if __name__ == "__main__":
    main()
