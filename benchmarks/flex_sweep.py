"""Tile configs and kernel switches of the flex_triton forward (and a few backward configs) against
compiled FlexAttention, in one run on one GPU (issue 18: why the sparse masks' forward is ~0.6x
FlexAttention). bf16, batch 1, 16 heads, head dim 128, 16k tokens by default; bench_flex.py's
cases (document-16, prefix-lm, sliding-1k, alibi).

    PYTHONPATH=src python benchmarks/flex_sweep.py [--seqlen 16384] [--budget 330]

1. Correctness first, on the kernels the timings then run (1 x 16 heads x 2048 tokens x d128: the
   same Triton specialisation as 16k): every candidate forward config against the fp32 oracle by
   flash-attn's rule (stops at the first failure, naming it), and the backward candidates'
   gradients likewise.
2. Timings, per case, three ways (ms):
   * ``kernel``: flex_triton's launcher called directly (``launch.forward`` / ``launch.backward``), N
     calls back to back between two CUDA events (no synchronisation in between, so the host work
     hides behind the GPU's): the GPU time of a call.
   * ``api``: the public call, synchronised after each call, median (what bench_flex.py reports:
     host time before the launch counts in full).
   * ``b2b``: the public call back to back (host time hidden where it is shorter than the GPU's).
   FlexAttention (torch.compile'd) ``api`` and ``b2b``; the built-in option for the same mask (varlen,
   window_size, alibi_slopes) likewise.
3. A table printed last; JSON to $OUT (else benchmarks/results).

FlexAttention compiles cost ~20-60 s a case: they are skipped once ``--budget`` seconds are spent
(our candidates go first).
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

import bench_flex  # noqa: E402

from flashtile import create_block_mask, flex_attention  # noqa: E402
from flashtile.backends.flex_triton import backend as FTB  # noqa: E402
from flashtile.backends.flex_triton import launch as L  # noqa: E402
from flashtile.spec import make_call  # noqa: E402
from flashtile.testing import attention_ref, compare_with_oracle, mask_from_mod  # noqa: E402

warnings.filterwarnings("ignore")
# FLEX_SWEEP_DEVICE=cpu (with TRITON_INTERPRET=1 BENCH_FLEX_DEVICE=cpu): a dry run of the script's
# logic on tiny sizes (fp16: the interpreter's bf16 dot is wrong; the interpreter's tile config)
DEV = os.environ.get("FLEX_SWEEP_DEVICE", "cuda")
DT = torch.bfloat16 if DEV == "cuda" else torch.float16
CASES = ("document-16", "sliding-1k", "prefix-lm", "alibi")
SPARSE = ("document-16", "sliding-1k")

# forward candidates: name -> FLASHTILE_FLEX_FWD (M,N,warps,stages,grid,partial_first); "" = the
# launcher's default. grid 0: heads fastest, last query blocks first; 1: query blocks fastest, in
# order (FlexAttention's); 2: query blocks fastest, last first. partial_first: FlexAttention's order.
FWD = {
    "default": "",
    "g1p1 (Flex order)": "128,64,8,3,1,1",
    "g0p1": "128,64,8,3,0,1",
    "m64 w4 s2 (2 CTA/SM)": "64,64,4,2,0,0",
    "m64 w4 s2 g1p1": "64,64,4,2,1,1",
    "m64 w4 s3": "64,64,4,3,0,0",
    "n128 w8 s2": "128,128,8,2,0,0",
    "n128 w8 s3": "128,128,8,3,0,0",
    "m128 w4 s3": "128,64,4,3,0,0",
    "m64 n128 w4 s3": "64,128,4,3,0,0",
}
#: candidates timed on the causal-like cases too (the others: sparse cases only)
FWD_ALL = ("default", "g1p1 (Flex order)", "m64 w4 s2 (2 CTA/SM)")
# backward candidates: FLASHTILE_FLEX_BWD (M1,N1,M2,N2,W1,S1,W2,S2); "" = default (dK/dV 2 stages)
BWD = {
    "default": "",
    "dkdv s3": "64,128,128,64,8,3,8,3",
    "dq m64 w4 s2 (2 CTA/SM)": "64,128,64,64,8,2,4,2",
}
BWD_ALL = ("default",)


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def synced(fn, reps=20, budget_s=2.0) -> float:
    """Median ms of fn() with a synchronisation after each call (one warm-up)."""
    fn()
    _sync()
    ts, t0 = [], time.perf_counter()
    while len(ts) < reps and (time.perf_counter() - t0 < budget_s or len(ts) < 3):
        t = time.perf_counter()
        fn()
        _sync()
        ts.append((time.perf_counter() - t) * 1e3)
    ts.sort()
    return ts[len(ts) // 2]


def back_to_back(fn, n=20) -> float:
    """Mean ms of n calls of fn() launched back to back between two CUDA events (one warm-up);
    best of three such runs."""
    fn()
    _sync()
    best = float("inf")
    for _ in range(3):
        if DEV != "cuda":
            t = time.perf_counter()
            fn()
            best = min(best, (time.perf_counter() - t) * 1e3)
            continue
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(n):
            fn()
        b.record()
        _sync()
        best = min(best, a.elapsed_time(b) / n)
    return best


_CPU_BACKEND = None


env = bench_flex.env


def inputs(s, h, d, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return [torch.randn(1, h, s, d, device=DEV, dtype=DT, generator=g).requires_grad_() for _ in range(3)]


def check(name, c, s, h, d, fwd_cfgs, bwd_cfgs):
    """Every candidate config on case ``c`` against the oracle (raises AssertionError on failure)."""
    q, k, v = inputs(s, h, d, seed=1)
    cap = c["captured"]
    cap = None if cap is None else cap.detach()[:h].clone()
    mm = c["mask"]
    bm = create_block_mask(mm, None, None, s, s, device=DEV)
    dense = mask_from_mod(mm, None, None, s, s, DEV)
    leaves = [x.detach().transpose(1, 2).contiguous() for x in (q, k, v)] + ([] if cap is None else [cap])

    def oracle(q, k, v, *t, upcast):
        sm = c["score"](t[0]) if t else None
        return attention_ref(q, k, v, mask=dense, score_mod=sm, upcast=upcast)

    for cname in fwd_cfgs:

        def fwd(q, k, v, *t):
            call = make_call(headdim=d, score_mod=c["score"](t[0]) if t else None, block_mask=bm)
            return L.forward(q, k, v, call)

        with env("FLASHTILE_FLEX_FWD", FWD[cname]):
            try:
                compare_with_oracle(fwd, oracle, leaves, grads=False)
            except AssertionError as e:
                raise AssertionError(f"forward config {cname!r} ({FWD[cname] or 'default'}): {e}") from e
        print(f"check {name} fwd {cname}: ok", flush=True)
    for cname in bwd_cfgs:

        def full(q, k, v, *t):
            sm = c["score"](t[0]) if t else None
            o, lse = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=sm,
                                    block_mask=bm, return_lse=True)  # fmt: skip
            return o.transpose(1, 2), lse

        with env("FLASHTILE_FLEX_BWD", BWD[cname]):
            try:
                compare_with_oracle(full, oracle, leaves)
            except AssertionError as e:
                raise AssertionError(f"backward config {cname!r} ({BWD[cname] or 'default'}): {e}") from e
        print(f"check {name} bwd {cname}: ok", flush=True)


def run_case(name, c, s, h, d, fwd_cfgs, bwd_cfgs, tflex, tcbm) -> dict:
    """Timings of one case: our candidates (kernel / api / b2b), the built-in option, FlexAttention."""
    q, k, v = inputs(s, h, d)
    cap = c["captured"]
    bm = create_block_mask(c["mask"], None, None, s, s, device=DEV)
    qi, ki, vi = (x.detach().transpose(1, 2) for x in (q, k, v))
    row = {"case": name, "fwd": {}, "bwd": {}}
    ins = (q, k, v) if cap is None else (q, k, v, cap)
    grads_of = [x for x in ins if x.requires_grad]

    def api(q, k, v, *t):
        return flex_attention(q, k, v, score_mod=c["score"](t[0]) if t else None, block_mask=bm)

    call = make_call(headdim=d, score_mod=c["score"](cap) if cap is not None else None, block_mask=bm)
    for cname in fwd_cfgs:
        with env("FLASHTILE_FLEX_FWD", FWD[cname]):
            try:
                with torch.no_grad():
                    kern = back_to_back(lambda: L.forward(qi, ki, vi, call))
                r = {"kernel": kern, "api": synced(lambda: api(*ins)), "b2b": back_to_back(lambda: api(*ins))}
            except Exception as e:  # noqa: BLE001
                r = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        row["fwd"][cname] = r
        print(name, "fwd", cname, json.dumps(r), flush=True)
    out = api(*ins)
    dout = torch.randn_like(out)
    with torch.no_grad():
        saved_out, saved_lse = L.forward(qi, ki, vi, call)
    captured = FTB._triton_backward(call)  # what the public call's backward passes (None: torch engine)

    def bwd_kernel():
        return L.backward(dout.transpose(1, 2), qi, ki, vi, saved_out, saved_lse, call, captured)

    def bwd_api(o=out):
        return torch.autograd.grad(o, grads_of, dout, retain_graph=True)

    for cname in bwd_cfgs:
        with env("FLASHTILE_FLEX_BWD", BWD[cname]):
            try:
                r = {"kernel": None if captured is None else back_to_back(bwd_kernel), "api": synced(bwd_api),
                     "b2b": back_to_back(bwd_api)}  # fmt: skip
            except Exception as e:  # noqa: BLE001
                r = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        row["bwd"][cname] = r
        print(name, "bwd", cname, json.dumps(r), flush=True)
    if c["builtin"] is not None:
        qb, kb, vb = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        try:
            row["builtin_fwd"] = {"api": synced(lambda: c["builtin"](qb, kb, vb)),
                                  "b2b": back_to_back(lambda: c["builtin"](qb, kb, vb))}  # fmt: skip
            ob = c["builtin"](qb, kb, vb)
            gb = torch.randn_like(ob)

            def builtin_bwd():
                return torch.autograd.grad(ob, (qb, kb, vb), gb, retain_graph=True)

            row["builtin_bwd"] = {"api": synced(builtin_bwd), "b2b": back_to_back(builtin_bwd)}
        except Exception as e:  # noqa: BLE001
            row["builtin_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if tflex is not None:
        try:
            tbm = tcbm(c["mask"], None, None, s, s, device=DEV)

            def theirs(q, k, v, *t):
                return tflex(q, k, v, score_mod=c["score"](t[0]) if t else None, block_mask=tbm)

            tc = time.perf_counter()
            # with grad enabled, as ours and bench_flex.py (one compiled graph, forward and backward)
            row["flex_fwd"] = {"api": synced(lambda: theirs(*ins)), "b2b": back_to_back(lambda: theirs(*ins))}
            of = theirs(*ins)

            def flex_bwd():
                return torch.autograd.grad(of, grads_of, dout, retain_graph=True)

            row["flex_bwd"] = {"api": synced(flex_bwd), "b2b": back_to_back(flex_bwd)}
            row["flex_compile_and_time_s"] = time.perf_counter() - tc
        except Exception as e:  # noqa: BLE001
            row["flex_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--hdim", type=int, default=128)
    ap.add_argument("--check-seqlen", type=int, default=2048)
    ap.add_argument(
        "--budget", type=float, default=270.0, help="seconds after which FlexAttention compiles are skipped"
    )
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated subset of " + ",".join(CASES))
    ap.add_argument("--no-bwd", action="store_true", help="forward candidates only")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()
    s, h, d = args.seqlen, args.heads, args.hdim
    if DEV != "cuda":  # the dry run: flex_triton under the interpreter (auto picks the torch engine on CPU)
        import flashtile

        global _CPU_BACKEND
        _CPU_BACKEND = flashtile.use_backend("flex_triton")
        _CPU_BACKEND.__enter__()
    t0 = time.perf_counter()
    all_cases = bench_flex.cases(s, h)

    cases = [c for c in args.cases.split(",") if c]
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        ap.error(f"--cases: unknown {unknown}; expected some of {CASES}")

    def fwd_for(name):
        return [n for n in FWD if name in SPARSE or n in FWD_ALL]

    def bwd_for(name):
        return [] if args.no_bwd else [n for n in BWD if name in SPARSE or n in BWD_ALL]

    if not args.skip_check:
        small = bench_flex.cases(args.check_seqlen, h)
        for name in cases:
            try:
                check(name, small[name], args.check_seqlen, h, d, fwd_for(name), bwd_for(name))
            except AssertionError as e:
                print(f"CORRECTNESS FAILURE in {name}: {e}")
                sys.exit(1)
        if DEV == "cuda":
            torch.cuda.empty_cache()
    print(f"checks done in {time.perf_counter() - t0:.0f}s", flush=True)

    try:
        tflex, tcbm = (None, None) if args.no_flex else bench_flex.torch_flex()
    except Exception as e:  # noqa: BLE001
        tflex = tcbm = None
        print(f"FlexAttention unavailable: {type(e).__name__}: {e}")

    rows = []
    for name in cases:
        budget_left = tflex is not None and time.perf_counter() - t0 <= args.budget
        row = run_case(name, all_cases[name], s, h, d, fwd_for(name), bwd_for(name), tflex if budget_left else None,
                       tcbm)  # fmt: skip
        if tflex is not None and not budget_left:
            row["flex_error"] = f"skipped: past --budget ({args.budget:.0f}s)"
        rows.append(row)
        print(json.dumps(row), flush=True)
        if DEV == "cuda":
            torch.cuda.empty_cache()

    gpu = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    now = _dt.datetime.now().isoformat(timespec="seconds")
    meta = dict(gpu=gpu, torch=torch.__version__, date=now, seqlen=s, heads=h, hdim=d, dtype="bf16", fwd_cfgs=FWD,
                bwd_cfgs=BWD, total_s=time.perf_counter() - t0)  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"flex_sweep_{gpu.replace(' ', '_')}_{_dt.datetime.now():%Y%m%d-%H%M}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\nwrote {path}; total {meta['total_s']:.0f}s")
    print(
        f"bf16 b1 h{h} s{s} d{d}, ms. kernel: launcher alone, back to back (GPU time); api: public call, "
        "synchronised each call (as bench_flex); b2b: public call back to back. x = FlexAttention / ours "
        "(api vs api; kernel vs FlexAttention's b2b); mod cost = api / built-in option's api - 1"
    )
    print(f"{'case':<12} {'pass':<4} {'config':<22} {'kernel':>7} {'api':>7} {'b2b':>7} {'x api':>6} {'x kern':>6} "
          f"{'flex api':>8} {'flex b2b':>8} {'builtin':>7} {'mod cost':>8}")  # fmt: skip

    def f(x, w=7):
        return f"{x:{w}.3f}" if isinstance(x, float) else f"{'-':>{w}}"

    for r in rows:
        for p in ("fwd", "bwd"):
            fx = r.get(f"flex_{p}", {})
            bi = r.get(f"builtin_{p}", {})
            for cname, m in r[p].items():
                if "error" in m:
                    print(f"{r['case']:<12} {p:<4} {cname:<22} ERROR {m['error'][:80]}")
                    continue
                xa = fx["api"] / m["api"] if fx.get("api") else None
                xk = fx["b2b"] / m["kernel"] if fx.get("b2b") and m.get("kernel") else None
                cost = f"{m['api'] / bi['api'] - 1:+8.0%}" if bi.get("api") else f"{'-':>8}"
                print(f"{r['case']:<12} {p:<4} {cname:<22} {f(m['kernel'])} {f(m['api'])} {f(m['b2b'])} {f(xa, 6)} "
                      f"{f(xk, 6)} {f(fx.get('api'), 8)} {f(fx.get('b2b'), 8)} {f(bi.get('api'))} {cost}")  # fmt: skip
        if "flex_error" in r:
            print(f"{r['case']:<12} FlexAttention: {r['flex_error'][:100]}")
    for line in recommend(rows, d):
        print(line)


def recommend(rows, d: int = 128) -> list[str]:
    """Which forward candidate to put in launch._SHORT (sparse cases) / launch._TABLE (the others):
    the fastest by kernel time on every case of its group, if it beats the default by > 3% on each."""
    out = []
    for label, group in (
        (f"launch._SHORT[('sm90', 128, {d})]", SPARSE),
        ("launch._TABLE (fwd)", ("prefix-lm", "alibi")),
    ):
        rs = [r for r in rows if r["case"] in group]
        if len(rs) != len(group):
            continue

        def kern(r, n):
            v = r["fwd"].get(n, {}).get("kernel")
            return v if isinstance(v, float) else None

        best, gain = None, 0.0
        for n in FWD:
            if n == "default" or any(kern(r, n) is None or kern(r, "default") is None for r in rs):
                continue
            g = min(1 - kern(r, n) / kern(r, "default") for r in rs)
            if g > 0.03 and g > gain:
                best, gain = n, g
        if best is None:
            out.append(f"recommendation for {label}: keep the default (no candidate > 3% faster on all of {group})")
        else:
            vals = FWD[best].split(",")
            cfg = f"FlexFwdConfig({', '.join(vals[:4])}, {vals[4]}, {bool(int(vals[5]))})"
            out.append(f"recommendation for {label}: {cfg} ({best}: >= {gain:.0%} faster on {group})")
    return out


if __name__ == "__main__":
    main()
