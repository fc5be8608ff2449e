"""Where the FP8 forward's time per key block goes, per consumer warpgroup (debug; H200, issue 13).

    PYTHONPATH=src python benchmarks/fp8_trace.py [--d 128] [--s 16384] [--causal] [--set row_tree=3 ...]

Runs the FP8 (e4m3) forward (b x s = 16k, h x d = 2048) once untimed with ``launch.FP8_TRACE`` set: the
first ``--progs`` query tiles of head 0 record, per key block after the first and per consumer
warpgroup, eight ``%clock64`` stamps (``fwd_fp8._clk``): 0 turn taken (the block's wgmmas about to be
issued), 1 S ready, 2 softmax issued, 3 P V waited for, O rescaled and P packed, 4 block start, 5 K
ready, 6 S issued, 7 P V issued and the turn passed. Printed per config (medians over the blocks of the
traced tiles, the first and last 4 blocks of a tile left out), in SM cycles:

* ``issue->S``: 0 -> 1 (the S wgmma behind whatever the tensor cores had queued), ``softmax``: 1 -> 2,
  ``tail``: 2 -> 3 (the P V wait, the rescale, P's packing), ``to next``: 3 -> the next block's 0 (the K
  wait and the turn), ``period``: 0 -> the next block's 0;
* the parts of those: ``k_wait`` 4 -> 5, ``turn_wait`` 5 -> 0, ``s_issue`` 0 -> 6 (S's four wgmma
  instructions), ``pv_issue`` 6 -> 7 (the V wait, P V's four, the turn's arrival), ``s_wait`` 7 -> 1;
* the other consumer's offset: its "S ready" minus this one's, same block (a 2-consumer tile);
* how much of a consumer's softmax interval overlaps the other's (their exponentials share the MUFU);
* per tile and consumer (slot 0 of its trace, :data:`TILE_PARTS`): ``q_wait`` (start -> Q ready, the
  descale loads within), ``first_block`` (its S and masked softmax), ``loop`` (-> the last P V waited for;
  ``loop_per_block`` that over the traced blocks), ``last_pv`` (the last block's end -> that wait),
  ``epilogue`` (the v descale, the normalisation, the bf16 store) and ``tile`` (start -> epilogue done).

Then the same call untraced and traced, timed (TFLOP/s): how much the stamps perturb the kernel. Each
``--set`` is a config (``FP8Config`` fields over the table's), traced and timed in turn after the
table's. JSON to ``$OUT`` (else benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch


def _inputs(b: int, s: int, h: int, d: int, causal: bool):
    from flashtile import fp8
    from flashtile.spec import make_call

    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    q8, k8, v8, qd, kd, vd = fp8.quantize(q, k, v)
    return q8, k8, v8, make_call(headdim=d, causal=causal, q_descale=qd, k_descale=kd, v_descale=vd)


def _overlap(a: tuple[int, int], bs: list[tuple[int, int]]) -> int:
    return sum(max(0, min(a[1], e) - max(a[0], s)) for s, e in bs)


#: the tile's own stamps (slot 0 of each consumer's trace): 0 consumer start, 1 Q ready (after the descale
#: loads), 2 the first key block's softmax done (the loop starts), 3 the last P V waited for, 4 the epilogue done
TILE_PARTS = ("q_wait", "first_block", "loop", "last_pv", "epilogue", "tile", "loop_per_block")


def analyse(buf: list, skip: int = 4) -> dict:
    """Medians of the stamps' differences over every traced tile, consumer and block (see the module doc)."""
    out: dict[str, list[float]] = {k: [] for k in ("issue_to_s", "softmax", "tail", "to_next", "period",
                                                   "s_offset", "softmax_overlap", "k_wait", "turn_wait",
                                                   "s_issue", "pv_issue", "s_wait", *TILE_PARTS)}
    for tile in buf:  # [consumers][cap][8]: slot 0 the tile's stamps, slots 1.. the key blocks'
        n_c = len(tile)
        for c in range(n_c):
            t = tile[c][0]
            blocks = [r for r in tile[c][1:] if all(r)]
            if all(t[:5]) and blocks:  # (a consumer with key blocks; traced by a kernel with the tile stamps)
                for name, a, b in (("q_wait", 0, 1), ("first_block", 1, 2), ("loop", 2, 3), ("epilogue", 3, 4),
                                   ("tile", 0, 4)):
                    out[name].append(t[b] - t[a])
                out["last_pv"].append(t[3] - blocks[-1][3])
                out["loop_per_block"].append((t[3] - t[2]) / len(blocks))
            rows = blocks
            rows = rows[skip:-skip] if len(rows) > 2 * skip + 2 else rows
            other = [r for r in tile[(c + 1) % n_c] if all(r)] if n_c > 1 else []
            spans = [(r[1], r[2]) for r in other]
            for i, r in enumerate(rows):
                out["issue_to_s"].append(r[1] - r[0])
                if len(r) >= 8:
                    for name, a, b in (("k_wait", 4, 5), ("turn_wait", 5, 0), ("s_issue", 0, 6), ("pv_issue", 6, 7),
                                       ("s_wait", 7, 1)):
                        out[name].append(r[b] - r[a])
                out["softmax"].append(r[2] - r[1])
                out["tail"].append(r[3] - r[2])
                if i + 1 < len(rows):
                    out["to_next"].append(rows[i + 1][0] - r[3])
                    out["period"].append(rows[i + 1][0] - r[0])
                if spans:
                    out["softmax_overlap"].append(_overlap((r[1], r[2]), spans) / max(1, r[2] - r[1]))
            if c == 0 and n_c > 1:
                for r0, r1 in zip(tile[0][1:], tile[1][1:], strict=True):
                    if all(r0) and all(r1):
                        out["s_offset"].append(r1[1] - r0[1])
    return {k: round(statistics.median(v), 3 if k == "softmax_overlap" else 0) if v else None for k, v in out.items()}


def run(d: int, s: int, causal: bool, progs: int, overrides: dict | None) -> dict:
    import triton

    from flashtile.backends.hopper import configs, launch
    from flashtile.testing import attention_flops

    b, h = 16384 // s, 2048 // d
    q8, k8, v8, call = _inputs(b, s, h, d, causal)
    cfg = configs.fp8_config(d, **(overrides or {}))
    cap = -(-s // cfg.block_n) + 2
    flops = attention_flops(b, h, s, d, causal)

    def fn():
        return launch.forward_fp8(q8, k8, v8, call, config=cfg)

    fn()
    torch.cuda.synchronize()
    untraced = flops / (triton.testing.do_bench(fn, warmup=10, rep=200, return_mode="median") * 1e-3) / 1e12
    buf = torch.zeros(progs, cfg.consumers, cap, 8, dtype=torch.int64, device="cuda")
    launch.FP8_TRACE = buf
    try:
        fn()
        torch.cuda.synchronize()
        traced = flops / (triton.testing.do_bench(fn, warmup=10, rep=200, return_mode="median") * 1e-3) / 1e12
        buf.zero_()
        fn()
        torch.cuda.synchronize()
    finally:
        launch.FP8_TRACE = None
    res = dict(d=d, s=s, causal=causal, config=str(cfg), overrides=overrides or {},
               tflops_untraced=round(untraced, 1), tflops_traced=round(traced, 1), **analyse(buf.cpu().tolist()))
    print(f"{str(overrides or 'table'):>24} d{d} s{s} causal={causal}: " +
          ", ".join(f"{k} {v}" for k, v in res.items() if k not in ("d", "s", "causal", "config", "overrides")))
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--s", type=int, default=16384)
    ap.add_argument("--causal", action="store_true")
    ap.add_argument("--progs", type=int, default=4, help="query tiles of head 0 traced")
    ap.add_argument("--set", action="append", default=[], metavar="K=V,...", help="a config to trace too")
    args = ap.parse_args()
    configs_to_run = [None] + [{k: int(v) for k, v in (kv.split("=") for kv in t.split(","))} for t in args.set]
    results = [run(args.d, args.s, args.causal, args.progs, ov) for ov in configs_to_run]
    out = Path(os.environ.get("OUT") or Path(__file__).parent / "results")
    out.mkdir(parents=True, exist_ok=True)
    import triton

    path = out / "fp8_trace.json"
    path.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                                "triton": triton.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                                "results": results}, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
