"""Where the persistent Hopper backward's time per tile goes (debug; H200, issue 12).

    PYTHONPATH=src python benchmarks/bwd_tile_trace.py [--cells 4096:0,4096:1,16384:0]

Each cell (bf16, head dim 128, batch x seqlen = 16k, 16 heads; ``seqlen:causal``) runs the backward
once with ``launch_bwd.TRACE`` set: every program records, per unit (a tile, or with the split tail,
``HopperBwdConfig.tail``, a part of a tail tile: ``tiles`` counts units), its
iterations and four ``%globaltimer`` stamps (the compute warps taking the tile and being done with it,
dK / dV stored; the worker handing it over and having issued its loads and dQ adds). Printed per cell:

* the fit ``compute time of a tile = a x iterations + c`` over every tile (causal tiles differ in
  length, so ``c``, the fixed cost of a tile, is measured, not inferred from two sequence lengths);
* the gap between a tile's end and the next tile's start on the compute side (the hand-off);
* how long the worker is done before the compute warps (``w_end - c_end``, negative: the worker ahead),
  and how long a tile waits between the worker handing it over and the compute warps taking it;
* the makespan against the mean program's busy time (the tail).

The timer ticks in ns but advances in steps of ~32 ns-1 us depending on the GPU (the stamps of one
tile are still ordered); the fit is over thousands of tiles. JSON to ``$OUT`` (else benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch


def trace_cell(s: int, causal: bool, overrides: dict | None = None) -> dict:
    from flashtile.backends.hopper import configs, launch_bwd, sched
    from flashtile.backends.hopper import launch as HL
    from flashtile.spec import make_call

    d, h = 128, 16
    b = 16384 // s
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    call = make_call(headdim=d, causal=causal)
    out, lse = HL.forward(q, k, v, call)
    dout = torch.randn_like(out)
    # (no untraced call first: the traced kernel compiles before it runs, and its stamps are the GPU's)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    n_tiles = -(-s // 128) * h * b
    cap = 4 * (-(-n_tiles // sms)) + 8
    buf = torch.zeros(sms, cap, 6, dtype=torch.int64, device="cuda")
    launch_bwd.TRACE = buf
    try:
        torch.cuda.synchronize()
        cfg = configs.bwd_config(d, causal, **(overrides or {}))  # (passed: a call with a config is never planned)
        launch_bwd.backward(dout, q, k, v, out, lse, call, config=cfg)
        torch.cuda.synchronize()
    finally:
        launch_bwd.TRACE = None
    rows = buf.cpu().tolist()
    tiles, gaps, lead, given, busy, ends = [], [], [], [], [], []
    t_min = min(r[2] for prog in rows for r in prog if r[2])
    for prog in rows:
        prev_end, total_busy = None, 0
        for _tile, iters, c0, c1, w0, w1 in prog:
            if not c0:
                break
            tiles.append((iters, (c1 - c0) / 1e3))
            lead.append((w1 - c1) / 1e3)
            given.append((c0 - w0) / 1e3)
            total_busy += c1 - c0
            if prev_end is not None:
                gaps.append((c0 - prev_end) / 1e3)
            prev_end = c1
        if prev_end is not None:
            busy.append(total_busy / 1e3)
            ends.append((prev_end - t_min) / 1e3)
    # every tile once: whole (code < t_full), or with the split tail (cfg.tail) in parts covering its query
    # blocks once (codes t_full + (j << 2 * bits | lo << bits | hi))
    n_mb = -(-s // cfg.block_m)
    n_split = sched.tail_split(n_tiles, sms, n_mb) if cfg.tail and not causal else 0
    t_full, bits = n_tiles - n_split, sched.TAIL_BITS
    codes = [t for prog in rows for t, *_ in (r for r in prog if r[2])]
    whole = sorted(t for t in codes if t < t_full)
    blocks = sorted((t - t_full) >> 2 * bits for t in codes if t >= t_full
                    for _ in range(((t - t_full) & (1 << bits) - 1) - ((t - t_full) >> bits & (1 << bits) - 1)))
    if whole != list(range(t_full)) or blocks != sorted(j for j in range(n_split) for _ in range(n_mb)):
        raise SystemExit(f"s={s} causal={causal}: {len(whole)} whole tiles traced ({len(set(whole))} distinct, "
                         f"expected {t_full}) and {len(blocks)} query blocks of {n_split} split tiles (expected "
                         f"{n_split * n_mb}): a unit past TRACE_CAP, or the counter")
    xs, ys = [t[0] for t in tiles], [t[1] for t in tiles]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    a = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else float("nan")
    c = my - a * mx if sxx else my
    res = dict(seqlen=s, causal=causal, overrides=overrides or {}, tiles=len(tiles), split=n_split, us_per_iteration=a,
               us_per_tile_fixed=c,
               tile_us_median=statistics.median(ys), handoff_gap_us_median=statistics.median(gaps) if gaps else 0.0,
               worker_minus_compute_end_us_median=statistics.median(lead),
               taken_after_given_us_median=statistics.median(given), makespan_us=max(ends),
               busy_us_mean=statistics.fmean(busy))  # fmt: skip
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", default="4096:0,4096:1,16384:0,16384:1", help="seqlen:causal,...")
    ap.add_argument("--set", action="append", default=[], metavar="K=V",
                    help="config fields (ints) for one more pass over the cells (repeatable), e.g. --set epi=1")
    args = ap.parse_args()
    passes = [{}] + [{k: int(v) for k, v in (kv.split("=") for kv in text.split(","))} for text in args.set]
    results = []
    for over, cell in ((o, c) for o in passes for c in args.cells.split(",")):
        s, c = cell.split(":")
        r = trace_cell(int(s), c == "1", over)
        results.append(r)
        print(f"{over or 'default'} s={r['seqlen']:6d} causal={int(r['causal'])} tiles={r['tiles']:5d}  tile = "
              f"{r['us_per_iteration']:.3f} us x iterations + {r['us_per_tile_fixed']:.2f} us;  median tile "
              f"{r['tile_us_median']:.1f} us, hand-off"
              f" gap {r['handoff_gap_us_median']:.2f} us, worker end - compute end "
              f"{r['worker_minus_compute_end_us_median']:.2f} us, taken {r['taken_after_given_us_median']:.2f} us"
              f" after given;  makespan {r['makespan_us']:.0f} us against "
              f"busy {r['busy_us_mean']:.0f} us a program", flush=True)  # fmt: skip
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, date=time.strftime("%Y-%m-%d %H:%M"))
    (out / "bwd_tile_trace.json").write_text(json.dumps(dict(meta=meta, cells=results), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
