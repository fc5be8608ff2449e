"""Which kernel should run a causal sliding-window forward at head dims 64 and 128 on Hopper (issue 18's
sliding-1k row; the hopper backend's forward routing). bf16, b1 h16 s16k, window (1024, 0), causal.

1. Correctness (stops at the first failure): ``flash_attn_func(causal=True, window_size=(w, 0))`` on
   each route below at 1 x 1500 x 4 x d (window 256) and 113 vs 203 tokens against the fp32 oracle by
   the project's rule (``flashtile.testing.compare_with_oracle``, forward: out and lse).
2. Forward timings (no grad), ms, median of CUDA-event-timed repeats: one call after a sync (host
   preparation included) and 10 calls back to back (device time):
   * ``auto``: the default routing (the hopper backend on sm_90, with its short-window rule,
     ``hopper.short_window``);
   * ``gluon``: the hopper backend without that rule (the Gluon forward);
   * ``triton``: the built-in Triton forward (``use_backend("triton")``);
   * ``flex``: ``flashtile.flex_attention`` with ``masks.sliding_window(1024)`` (the route
     ``flex.builtin_window`` picks at this head dim);
   * ``FlexAttention``: compiled ``torch.nn.attention.flex_attention``, the same block mask;
   * ``--cand M,N,WARPS,STAGES`` (repeatable): the built-in Triton forward with that tile config
     (``triton.launch.forward(config=...)``), checked against the oracle first, timed as ``cfg M,N,W,S``.
   A table is printed last; JSON to $OUT (else benchmarks/results).

    PYTHONPATH=src python benchmarks/window_fwd_routes.py [--seqlen 16384] [--window 1024] [--no-flex]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_flex as BF  # noqa: E402  (event_ms, FlexAttention's compile)

import flashtile  # noqa: E402
from flashtile import create_block_mask, flash_attn_func, flex_attention, masks  # noqa: E402
from flashtile.backends import hopper  # noqa: E402
from flashtile.testing import attention_ref, compare_with_oracle  # noqa: E402

warnings.filterwarnings("ignore")
DEV = torch.device("cuda")
DT = torch.bfloat16
ROUTES = ("auto", "gluon", "triton")


def run_route(route: str, q, k, v, w: int):
    if route == "auto":
        return flash_attn_func(q, k, v, causal=True, window_size=(w, 0), return_attn_probs=True)
    if route == "triton":
        with flashtile.use_backend("triton"):
            return flash_attn_func(q, k, v, causal=True, window_size=(w, 0), return_attn_probs=True)
    span, hopper.TRITON_FWD_WINDOW_SPAN = hopper.TRITON_FWD_WINDOW_SPAN, {}  # (its short-window rule off)
    try:
        with flashtile.use_backend("hopper"):
            return flash_attn_func(q, k, v, causal=True, window_size=(w, 0), return_attn_probs=True)
    finally:
        hopper.TRITON_FWD_WINDOW_SPAN = span


def run_cand(cand: str, q, k, v, w: int):
    from flashtile.backends.triton import launch as TL
    from flashtile.backends.triton.configs import FwdConfig
    from flashtile.spec import make_call

    call = make_call(headdim=q.shape[-1], causal=True, window_size=(w, 0))
    return TL.forward(q, k, v, call, config=FwdConfig(*(int(x) for x in cand.split(","))))


def check(d: int, cands=()) -> None:
    for sq, sk, h, w in ((1500, 1500, 4, 256), (113, 203, 2, 37)):
        g = torch.Generator(device=DEV).manual_seed(sq + d)
        leaves = [torch.randn(1, s, h, d, device=DEV, dtype=DT, generator=g) for s in (sq, sk, sk)]

        def oracle(q, k, v, *, upcast, w=w):
            return attention_ref(q, k, v, causal=True, window_size=(w, 0), upcast=upcast)

        for route in (*ROUTES, *cands):

            def fn(q, k, v, route=route, w=w):
                if route in ROUTES:
                    out, lse, _ = run_route(route, q, k, v, w)
                else:
                    out, lse = run_cand(route, q, k, v, w)
                return out, lse

            try:
                compare_with_oracle(fn, oracle, leaves, grads=False)
            except AssertionError as e:
                print(f"CORRECTNESS FAILURE: route {route} d{d} {sq}x{sk} window {w}: {e}")
                sys.exit(1)
    print(f"check d{d}: ok ({', '.join(ROUTES)})", flush=True)


def time_dim(d: int, s: int, h: int, w: int, tflex, tcbm, cands=()) -> dict:
    g = torch.Generator(device=DEV).manual_seed(d)
    q, k, v = (torch.randn(1, s, h, d, device=DEV, dtype=DT, generator=g) for _ in range(3))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    mm = masks.sliding_window(w)
    bm = create_block_mask(mm, None, None, s, s, device=DEV)
    fns = {r: (lambda r=r: run_route(r, q, k, v, w)) for r in ROUTES}
    fns["flex"] = lambda: flex_attention(qt, kt, vt, block_mask=bm)
    for c in cands:
        fns["cfg " + c] = lambda c=c: run_cand(c, q, k, v, w)
    if tflex is not None:
        tbm = tcbm(mm, None, None, s, s, device=DEV)
        fns["FlexAttention"] = lambda: tflex(qt, kt, vt, block_mask=tbm)
    row: dict = {"d": d, "w": w}
    with torch.no_grad():
        for name, fn in fns.items():
            try:
                row[name] = BF.event_ms(fn, n=1)
                row[name + "_dev"] = BF.event_ms(fn, n=10)
            except Exception as e:  # noqa: BLE001
                row[name + "_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(d, name, row.get(name), row.get(name + "_dev"), row.get(name + "_error", ""), flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--window", type=int, action="append", help="left window (default 1024; repeatable)")
    ap.add_argument("--headdim", type=int, action="append", help="default: 64 and 128")
    ap.add_argument("--no-flex", action="store_true", help="skip compiled FlexAttention")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--cand", action="append", default=[], help="a Triton forward config M,N,WARPS,STAGES to time")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()
    s, h, windows = args.seqlen, args.heads, args.window or [1024]
    dims = args.headdim or [64, 128]
    t0 = time.perf_counter()
    if not args.skip_check:
        for d in dims:
            check(d, args.cand)
    tflex = tcbm = None
    if not args.no_flex:
        try:
            tflex, tcbm = BF.torch_flex()
        except Exception as e:  # noqa: BLE001
            print(f"FlexAttention unavailable: {type(e).__name__}: {e}")
    rows = [time_dim(d, s, h, w, tflex, tcbm, args.cand) for w in windows for d in dims]
    gpu = torch.cuda.get_device_name()
    import triton

    meta = dict(gpu=gpu, torch=torch.__version__, triton=triton.__version__, date=_dt.datetime.now().isoformat(),
                seqlen=s, heads=h, windows=windows, dtype="bf16", wall_s=time.perf_counter() - t0)  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"window_fwd_routes_{gpu.replace(' ', '_')}_{_dt.datetime.now():%Y%m%d-%H%M}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\nwrote {path}")
    print(f"causal window (w, 0) forward, b1 h{h} s{s} bf16, ms: one call after a sync / 10 back to back (device)")
    names = [*ROUTES, "flex", "FlexAttention", *("cfg " + c for c in args.cand)]
    print(f"{'w':>5} {'d':>4} " + " ".join(f"{n:>17}" for n in names))
    for r in rows:
        cells = []
        for n in names:
            a, b = r.get(n), r.get(n + "_dev")
            cells.append(f"{a:8.3f}/{b:8.3f}" if a is not None and b is not None else f"{'-':>17}")
        print(f"{r['w']:>5} {r['d']:>4} " + " ".join(cells))


if __name__ == "__main__":
    main()
