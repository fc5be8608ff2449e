"""Where the first calls of a process spend their time (issue 16, start-up), on the GPU machine.

    PYTHONPATH=src python benchmarks/first_call_profile.py [--top 18]

Runs the first-call sequence of ``bench_lean.py`` (b2 s1k h16 d128 bf16: causal forward, its
backward, window + softcap forward and backward, a decode) in fresh processes, first with an
empty Triton cache and then with the cache it left: for each phase the wall time, every Triton
compile it triggered (kernel name and seconds, from a wrapper around ``triton.compile``: zero
entries with a warm cache means the time went elsewhere), and a cProfile of the phase (the
functions with the most cumulative time, then the most own time). Prints text; JSON to $OUT (or
benchmarks/results/) with the timings and compiles.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

CHILD = textwrap.dedent(
    """
    import cProfile, io, json, pstats, sys, time
    TOP = int(sys.argv[1])
    t0 = time.perf_counter()
    import torch
    import triton
    import triton.compiler as tc
    COMPILES = []
    _orig = tc.compile
    def _timed_compile(src, *a, **kw):
        t = time.perf_counter()
        try:
            return _orig(src, *a, **kw)
        finally:
            fn = getattr(src, "fn", None)
            name = getattr(fn, "__name__", None) or getattr(getattr(fn, "fn", None), "__name__", None) or str(src)[:60]
            COMPILES.append((name, round(time.perf_counter() - t, 3)))
    tc.compile = _timed_compile  # JITFunction's binder imports it from triton.compiler when first called
    import flashtile
    torch.empty(1, device="cuda"); torch.cuda.synchronize()
    r = {"import": time.perf_counter() - t0}
    phases = {}
    def phase(name, fn):
        n0 = len(COMPILES)
        pr = cProfile.Profile()
        torch.cuda.synchronize(); t = time.perf_counter()
        pr.enable(); x = fn(); torch.cuda.synchronize(); pr.disable()
        wall = time.perf_counter() - t
        s = io.StringIO()
        st = pstats.Stats(pr, stream=s)
        rows = []
        for (fname, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():
            rows.append((ct, tt, nc, f"{fname.split('/')[-1]}:{line}:{func}"))
        cum = sorted(rows, reverse=True)[:TOP]
        own = sorted(rows, key=lambda x: -x[1])[:TOP]
        phases[name] = dict(wall=wall, compiles=COMPILES[n0:], cum=[(round(c, 3), f) for c, _t, _n, f in cum],
                            own=[(round(t, 3), f) for _c, t, _n, f in own])
        return x
    dt = torch.bfloat16
    q, k, v = (torch.randn(2, 1024, 16, 128, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)
    out = phase("fwd", lambda: flashtile.flash_attn_func(q, k, v, causal=True))
    phase("bwd", lambda: torch.autograd.grad(out, (q, k, v), g))
    out2 = phase("fwd_window_softcap", lambda: flashtile.flash_attn_func(q, k, v, window_size=(256, 0), softcap=30.0))
    phase("bwd_window_softcap", lambda: torch.autograd.grad(out2, (q, k, v), g))
    kc, vc = (torch.randn(2, 2048, 16, 128, device="cuda", dtype=dt) for _ in range(2))
    lens = torch.full((2,), 2000, dtype=torch.int32, device="cuda")
    phase("decode", lambda: flashtile.flash_attn_with_kvcache(q[:, :1].detach(), kc, vc, cache_seqlens=lens))
    r["phases"] = phases
    print("RESULT " + json.dumps(r))
    """
)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--top", type=int, default=18)
    args = ap.parse_args()
    res = {}
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as memo:
        # flashtile's kept Triton key (flashtile._prewarm.KeyMemo): the empty-cache process computes
        # and keeps it in `memo`, the warm-cache process finds it there; the last process has the
        # warm Triton cache but no kept key (it hashes Triton again, as before the memo)
        for label, memo_dir in (("empty_cache", memo), ("warm_cache", memo), ("warm_cache_key_hashed", None)):
            env = dict(os.environ, TRITON_CACHE_DIR=cache, FLASHTILE_CACHE_DIR=memo_dir or tempfile.mkdtemp())
            p = subprocess.run([sys.executable, "-c", CHILD, str(args.top)], env=env, capture_output=True, text=True,
                               timeout=280)  # fmt: skip
            line = [s for s in p.stdout.splitlines() if s.startswith("RESULT ")]
            if p.returncode != 0 or not line:
                print(f"{label}: failed\n{p.stderr[-3000:]}")
                res[label] = None
                continue
            res[label] = r = json.loads(line[0][7:])
            print(f"\n##### {label}: import + CUDA init {r['import']:.2f} s")
            for name, ph in r["phases"].items():
                comp = ", ".join(f"{n} {t:.2f}s" for n, t in ph["compiles"]) or "none"
                print(f"\n== {label} {name}: {ph['wall']:.3f} s; compiles: {comp}")
                print("   cumulative s  function")
                for c, f in ph["cum"]:
                    print(f"   {c:10.3f}  {f}")
                print("   own s  function")
                for t, f in ph["own"][:8]:
                    print(f"   {t:10.3f}  {f}")
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "first_call_profile.json"), "w") as fh:
        json.dump(res, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
