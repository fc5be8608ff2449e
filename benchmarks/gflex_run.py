"""Flex forwards on the Gluon Hopper ws kernel (issue 18, hopper/flex.py): correctness, then timings.

1. Correctness (stops at the first failure, naming it): every library mod of flashtile.masks with
   a Triton twin (causal, sliding window, document, prefix-LM scalar / per row, chunked,
   bidirectional blocks; ALiBi, softcap, relative-bias table as score mods on a causal or no block
   mask), GQA, sq != sk (113 vs 203), 1000 and 256 tokens, head dims 64 / 128 (and 96), block masks of
   BLOCK_SIZE 128 (batch-broadcast, per batch and per head), against the fp32 oracle by the project's
   rule (flashtile.testing.compare_with_oracle, forward: out and lse). Every call is checked to run on
   the Gluon kernel (FLASHTILE_FLEX_GLUON=force during the checks, so the relative-bias table too).
   ``--prefetch``: every check again with the kernel's FLEX_PREFETCH on (FLASHTILE_FLEX_PREFETCH=1).
2. Forward timings, b1 h16 s16k bf16, head dim 128 (and 64 while time allows): causal, document-16,
   prefix-LM, sliding-1k, ALiBi, bias-table: the Gluon flex kernel (forced: ``gluon``; and with
   FLEX_PREFETCH on: ``prefetch``, the two timed in alternation, twice each, the faster round kept;
   and the default routing: ``auto``), the Triton flex kernel (FLASHTILE_FLEX_GLUON=0), flashtile's built-in option
   where one exists (causal, window, alibi_slopes, varlen for the documents) and compiled
   FlexAttention; each timed as one call after a sync (host preparation included) and as 10 calls back
   to back (device time, ``*_dev_ms``); median ms of CUDA-event-timed calls; two tables printed last,
   JSON to $OUT (else benchmarks/results).

    PYTHONPATH=src python benchmarks/gflex_run.py [--seqlen 16384] [--no-d64] [--skip-check] [--prefetch]
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

import bench_flex as BF  # noqa: E402  (its cases, document ids and FlexAttention compile)

import flashtile  # noqa: E402
from flashtile import create_block_mask, flash_attn_func, flex_attention, masks  # noqa: E402
from flashtile import flex as flex_mod  # noqa: E402
from flashtile.backends import _device  # noqa: E402
from flashtile.backends.hopper import backend as hopper_backend  # noqa: E402
from flashtile.backends.hopper import flex as gflex  # noqa: E402
from flashtile.testing import attention_ref, compare_with_oracle, mask_from_mod, qkv_inputs  # noqa: E402

warnings.filterwarnings("ignore")
DEV = torch.device("cuda")
DT = torch.bfloat16



env = BF.env

#: counts the calls the Gluon flex forward served
_SERVED = []
_orig_forward = gflex.forward


def _counting_forward(*a, **kw):
    _SERVED.append(1)
    return _orig_forward(*a, **kw)


gflex.forward = _counting_forward
_orig_planned = gflex.planned


def _counting_planned(*a, **kw):  # a repeated call's prepared launch (the lean path) is served too
    res = _orig_planned(*a, **kw)
    if res is not None:
        _SERVED.append(1)
    return res


gflex.planned = _counting_planned


def _ids(b, s, p, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, s, generator=g) < p).cumsum(-1).to(DEV)


def check_cases():
    """(name, mask_mod builder (b, sq, sk) or None, score builder (captured) or None, captured
    builder (h, b) or None, block-mask batch / heads)."""
    ar = torch.arange(2048, device=DEV)
    bidir = torch.where((ar // 30) % 3 == 1, ar // 30, -1)
    return [
        ("causal", lambda b, sq, sk: masks.causal, None, None, (None, None)),
        ("sliding_window", lambda b, sq, sk: masks.sliding_window(70), None, None, (None, None)),
        ("document", lambda b, sq, sk: masks.document(_ids(b, max(sq, sk), 0.02, 1)), None, None, ("B", None)),
        ("document_bidir", lambda b, sq, sk: masks.document(_ids(1, max(sq, sk), 0.02, 2)[0], causal=False), None,
         None, (None, None)),
        ("prefix_lm", lambda b, sq, sk: masks.prefix_lm(70), None, None, (None, None)),
        ("prefix_lm_per_row", lambda b, sq, sk: masks.prefix_lm(torch.tensor([5, 150], device=DEV)[:b]), None, None,
         ("B", None)),
        ("chunked", lambda b, sq, sk: masks.chunked(48), None, None, (None, "H")),
        ("bidirectional_blocks", lambda b, sq, sk: masks.bidirectional_blocks(bidir[: max(sq, sk)]), None, None,
         (None, None)),
        ("alibi", lambda b, sq, sk: masks.causal, masks.alibi, lambda h, b: torch.rand(h, device=DEV) * 0.3,
         (None, None)),
        ("alibi_bh", lambda b, sq, sk: masks.causal, masks.alibi, lambda h, b: torch.rand(b, h, device=DEV) * 0.3,
         ("B", "H")),
        ("softcap", lambda b, sq, sk: masks.prefix_lm(40), lambda t: masks.softcap(2.0), None, (None, None)),
        ("relative_bias", lambda b, sq, sk: masks.causal, masks.relative_bias,
         lambda h, b: torch.randn(h, 2 * 33 - 1, device=DEV), (None, None)),
        ("bias_no_block_mask", None, masks.relative_bias, lambda h, b: torch.randn(h, 2 * 33 - 1, device=DEV),
         (None, None)),
        ("softcap_no_block_mask", None, lambda t: masks.softcap(5.0), None, (None, None)),
    ]  # fmt: skip


def check_one(name, mk, score, capf, bdims, b, sq, sk, h, hk, d):
    mm = mk(b, sq, sk) if mk else None
    cap = capf(h, b) if capf else None
    q, k, v = qkv_inputs(b, sq, sk, h, hk, d, DT, DEV)
    bb = b if bdims[0] == "B" else None
    bh = h if bdims[1] == "H" else None
    bm = create_block_mask(mm, bb, bh, sq, sk, device=DEV, BLOCK_SIZE=128) if mm else None
    dense = mask_from_mod(mm, b, None, sq, sk, DEV) if mm else None
    inputs = (q, k, v) if cap is None else (q, k, v, cap)
    n0 = len(_SERVED)

    def fn(q, k, v, *t):
        sm = score(t[0] if t else None) if score else None
        out, lse, _ = flash_attn_func(q, k, v, score_mod=sm, block_mask=bm, return_attn_probs=True)
        return out, lse

    def oracle(q, k, v, *t, upcast):
        sm = score(t[0] if t else None) if score else None
        return attention_ref(q, k, v, mask=dense, score_mod=sm, upcast=upcast)

    compare_with_oracle(fn, oracle, inputs, grads=False)
    if len(_SERVED) == n0:
        raise AssertionError("the call did not run on the Gluon flex kernel (routing refused it)")


#: (b, sq, sk, h, hk, d): ragged lengths with sq < sk and GQA (every case), block multiples with MQA,
#: 1000 tokens at head dim 64, sq > sk at head dim 96 (the cases in SHAPE_CASES)
SHAPES = [(2, 113, 203, 4, 2, 128), (2, 256, 256, 4, 1, 128), (1, 1000, 1000, 4, 4, 64), (1, 203, 113, 2, 2, 96)]
SHAPE_CASES = {
    1: ("causal", "document", "sliding_window", "alibi_bh", "prefix_lm"),
    2: ("causal", "softcap"),
    3: ("chunked",),
}


def correctness(full: bool, prefetch: str = "") -> int:
    """Every case at SHAPES[0], then SHAPE_CASES' cases at the other shapes (``full``: every case
    at every shape: more Gluon compiles, minutes); ``prefetch``: FLASHTILE_FLEX_PREFETCH's value."""
    n = 0
    cases = check_cases()
    tag = " prefetch" if prefetch else ""
    flex_mod.BUILTIN_ROUTE = False  # the checks test the flex kernels, causal / sliding masks included
    with env(gflex.ENV, "force"), env(gflex.PREFETCH_ENV, prefetch):
        for i, shape in enumerate(SHAPES):
            for name, mk, score, capf, bdims in cases:
                if i > 0 and not full and name not in SHAPE_CASES[i]:
                    continue
                t = time.perf_counter()
                try:
                    check_one(name, mk, score, capf, bdims, *shape)
                except Exception as e:  # noqa: BLE001
                    print(f"CORRECTNESS FAILURE{tag}: {name} at (b, sq, sk, h, hk, d) = {shape}: "
                          f"{type(e).__name__}: {e}")  # fmt: skip
                    sys.exit(1)
                n += 1
                print(f"check{tag} {name:22} {shape}: ok ({time.perf_counter() - t:.1f}s)", flush=True)
    return n


def event_ms(fn, reps: int = 30) -> float:
    """One call after a sync (host preparation included), median ms (:func:`bench_flex.event_ms`)."""
    return BF.event_ms(fn, n=1, reps=reps, warm=2)


def event_ms_batched(fn, n: int = 10, reps: int = 7) -> float:
    """``n`` calls back to back: the device's time when the host keeps ahead (:func:`bench_flex.event_ms`)."""
    return BF.event_ms(fn, n=n, reps=reps, warm=1)


def bench(s, h, d, tflex, tcbm, t0, flex_deadline, stop_at=None):
    rows = []
    allc = BF.cases(s, h)
    allc = {"causal": dict(mask=masks.causal, score=None, captured=None,
                           builtin=lambda q, k, v: flash_attn_func(q, k, v, causal=True)), **allc}  # fmt: skip
    for name, c in allc.items():
        if stop_at is not None and time.perf_counter() - t0 > stop_at:
            print(f"d={d}: stopped before {name} (time budget)", flush=True)
            break
        g = torch.Generator(device=DEV).manual_seed(0)
        q, k, v = (torch.randn(1, h, s, d, device=DEV, dtype=DT, generator=g) for _ in range(3))
        cap = c["captured"].detach() if c["captured"] is not None else None
        sm = c["score"](cap) if c["score"] is not None else None
        bm = create_block_mask(c["mask"], None, None, s, s, device=DEV)
        row = {"case": name, "hdim": d}
        flex_mod.BUILTIN_ROUTE = True
        row["auto_builtin"] = sm is None and flex_mod.builtin_window(sm, bm, s, s, False) is not None

        def ours(sm=sm, bm=bm, q=q, k=k, v=v):
            return flex_attention(q, k, v, score_mod=sm, block_mask=bm)

        with torch.no_grad():
            # every column timed two ways: one call after a sync (`_ms`: the host's preparation of the
            # launch counts while the GPU waits) and 10 calls back to back (`_dev_ms`: the device's time
            # when the host keeps ahead, what a training loop sees); gluon / prefetch (the forced Gluon
            # kernel with FLEX_PREFETCH off / on) in alternation (A B A B: the short rows moved 20-35%
            # between runs), the faster round of each kept
            cols = (("gluon", "force", "0"), ("prefetch", "force", "1")) * 2 + (("triton", "0", ""), ("auto", "", ""))
            for col, mode, pf in cols:
                # the forced columns time the flex kernels themselves; auto: what a user gets (a library
                # causal / sliding-window mask runs as the built-in window, flex.builtin_window)
                flex_mod.BUILTIN_ROUTE = col == "auto"
                with env(gflex.ENV, mode), env(gflex.PREFETCH_ENV, pf):
                    n0 = len(_SERVED)
                    try:
                        ms, dev = event_ms(ours), event_ms_batched(ours)
                        row.setdefault(f"{col}_rounds", []).append(ms)
                        row.setdefault(f"{col}_dev_rounds", []).append(dev)
                        row[f"{col}_ms"] = min(row[f"{col}_rounds"])
                        row[f"{col}_dev_ms"] = min(row[f"{col}_dev_rounds"])
                        row[f"{col}_served_by_gluon"] = len(_SERVED) > n0
                    except Exception as e:  # noqa: BLE001
                        row[f"{col}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            if c["builtin"] is not None:
                qb, kb, vb = (x.transpose(1, 2).contiguous() for x in (q, k, v))
                try:
                    row["builtin_ms"] = event_ms(lambda c=c, qb=qb, kb=kb, vb=vb: c["builtin"](qb, kb, vb))
                    row["builtin_dev_ms"] = event_ms_batched(lambda c=c, qb=qb, kb=kb, vb=vb: c["builtin"](qb, kb, vb))
                except Exception as e:  # noqa: BLE001
                    row["builtin_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            if tflex is not None and time.perf_counter() - t0 < flex_deadline:
                try:
                    tbm = tcbm(c["mask"], None, None, s, s, device=DEV)

                    def theirs(q=q, k=k, v=v, sm=sm, tbm=tbm):
                        return tflex(q, k, v, score_mod=sm, block_mask=tbm)

                    row["flex_ms"], row["flex_dev_ms"] = event_ms(theirs), event_ms_batched(theirs)
                except Exception as e:  # noqa: BLE001
                    row["flex_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            elif tflex is not None:
                row["flex_error"] = "skipped: past the FlexAttention deadline"
        rows.append(row)
        print(json.dumps(row), flush=True)
        del q, k, v
        torch.cuda.empty_cache()
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--no-d64", action="store_true")
    ap.add_argument("--only-d64", action="store_true", help="the d64 rows alone")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--full-check", action="store_true", help="every check case at every shape (slow)")
    ap.add_argument("--prefetch", action="store_true", help="the checks again with FLASHTILE_FLEX_PREFETCH=1")
    ap.add_argument("--budget", type=float, default=340.0, help="seconds; d64 and FlexAttention rows stop past it")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    q = torch.empty(1, 128, 1, 128, device=DEV, dtype=DT)
    call = flashtile.spec.make_call(headdim=128, block_mask=create_block_mask(masks.causal, None, None, 128, 128,
                                                                              device=DEV))  # fmt: skip
    info = _device.info(DEV)
    why = gflex.gluon_reason(call, tuple(q.shape), tuple(q.shape), 128, DT, "cuda", info.major,
                             hopper_backend.available(), gflex.env_mode())  # fmt: skip
    if why is not None:
        print(f"the Gluon flex forward does not run here: {why}")
        sys.exit(1)
    n = 0 if args.skip_check else correctness(args.full_check, "0")
    if args.prefetch and not args.skip_check:
        n += correctness(args.full_check, "1")
    print(f"{n} checks passed in {time.perf_counter() - t0:.0f}s", flush=True)
    try:
        tflex, tcbm = BF.torch_flex()
    except Exception as e:  # noqa: BLE001
        tflex = tcbm = None
        print(f"FlexAttention unavailable: {type(e).__name__}: {e}")
    rows = [] if args.only_d64 else bench(args.seqlen, args.heads, 128, tflex, tcbm, t0, args.budget - 40)
    if not args.no_d64 and time.perf_counter() - t0 < args.budget - 120:
        rows += bench(args.seqlen, args.heads, 64, tflex, tcbm, t0, args.budget - 40, stop_at=args.budget - 30)
    gpu = torch.cuda.get_device_name()
    meta = dict(
        gpu=gpu,
        torch=torch.__version__,
        date=_dt.datetime.now().isoformat(timespec="seconds"),
        seqlen=args.seqlen,
        heads=args.heads,
        dtype="bf16",
        checks=n,
        prefetch_checks=bool(args.prefetch and not args.skip_check),
        total_s=time.perf_counter() - t0,
    )
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"gflex_{gpu.replace(' ', '_')}_{_dt.datetime.now():%Y%m%d-%H%M}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\nwrote {path}; total {meta['total_s']:.0f}s")
    print(f"forward, bf16, b=1, h={args.heads}, s={args.seqlen}; ms per call, min of rounds of medians; gluon "
          "forced with FLEX_PREFETCH off / on (prefetch), triton forced, auto = the default routing; x flex = "
          "FlexAttention / auto, mod cost = auto / built-in - 1. Two tables: one call after a sync (host "
          "preparation included), then 10 calls back to back (device time)")  # fmt: skip
    cols = ("gluon", "prefetch", "triton", "auto", "builtin", "flex")

    def f(x):
        return f"{x:8.3f}" if isinstance(x, float) else f"{'-':>8}"

    for suffix, title in (("_ms", "one call"), ("_dev_ms", "back to back (device time)")):
        print(f"\n{title}")
        head = " ".join(f"{c:>8}" for c in cols)
        print(f"{'case':<12} {'d':>3} {head} {'pf/g':>6} {'x flex':>7} {'mod cost':>9}")
        for r in rows:
            g, p, t, a, bi, fx = (r.get(c + suffix) for c in cols)
            ratio = f"{fx / a:7.2f}" if a and fx else f"{'-':>7}"
            pg = f"{p / g:6.3f}" if p and g else f"{'-':>6}"
            cost = f"{a / bi - 1:+9.0%}" if a and bi else f"{'-':>9}"
            note = "" if r.get("gluon_served_by_gluon", False) else "  (gluon column NOT served by the Gluon kernel)"
            note += "" if r.get("prefetch_served_by_gluon", False) else "  (prefetch: NOT the Gluon kernel)"
            auto = "gluon" if r.get("auto_served_by_gluon") else "triton"
            note += f"  auto: {'built-in' if r.get('auto_builtin') else auto}"
            cells = " ".join(f(x) for x in (g, p, t, a, bi, fx))
            print(f"{r['case']:<12} {r['hdim']:>3} {cells} {pg} {ratio} {cost}{note}")


if __name__ == "__main__":
    main()
