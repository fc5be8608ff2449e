"""Where the host time of a small call goes, on the GPU machine itself (issue 16).

    PYTHONPATH=src python benchmarks/host_profile_gpu.py [--calls 400] [--top 22]

For each call (flash_attn_func b1 s128 h8 d64 causal bf16 forward; the same forward + backward;
flash_attn_with_kvcache decode b1 8k h32/8 d128; a Gluon-sized forward b1 s4096 h8 d64): wall time
per call (calls between two
synchronisations), then ``cProfile`` of the same loop, functions sorted by their own time
(``tottime``), so that Python frames, torch C++ entry points (``{built-in method ...}``) and
Triton's launcher show up with microseconds per call. Also the same with the Triton fast launch
off (``FLASHTILE_TRITON_FAST_LAUNCH=0`` in a subprocess) for the forward. Prints text only.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import subprocess
import sys
import time

import torch


def _wall(fn, calls):
    for _ in range(30):
        fn()
    torch.cuda.synchronize()
    best = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        best.append((time.perf_counter() - t0) / calls * 1e6)
    best.sort()
    return best[len(best) // 2]


def _profile(name, fn, calls, top):
    wall = _wall(fn, calls)
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    pr.disable()
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    st.sort_stats("tottime")
    # per-call microseconds instead of seconds
    print(f"\n=== {name}: wall {wall:.1f} us per call (median of 5 x {calls}); cProfile, us per call ===")
    rows = []
    for (fname, line, func), (_cc, nc, tt, ct, _callers) in st.stats.items():
        rows.append((tt / calls * 1e6, ct / calls * 1e6, nc / calls, f"{os.path.basename(fname)}:{line}:{func}"))
    rows.sort(reverse=True)
    print(f"{'own us':>8} {'cum us':>8} {'n/call':>7}  function")
    for tt, ct, n, f in rows[:top]:
        print(f"{tt:8.2f} {ct:8.2f} {n:7.1f}  {f}")
    rows.sort(key=lambda r: -r[1])
    print("-- by cumulative --")
    for tt, ct, n, f in rows[:top]:
        print(f"{tt:8.2f} {ct:8.2f} {n:7.1f}  {f}")
    return wall


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=400)
    ap.add_argument("--top", type=int, default=22)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    import torch.nn.functional as F

    import flashtile

    torch.manual_seed(0)
    dev, dt = "cuda", torch.bfloat16
    q, k, v = (torch.randn(1, 128, 8, 64, device=dev, dtype=dt) for _ in range(3))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    g = torch.randn_like(q)
    qd = torch.randn(1, 1, 32, 128, device=dev, dtype=dt)
    kc, vc = (torch.randn(1, 8192, 8, 128, device=dev, dtype=dt) for _ in range(2))
    qs, ks, vs = (x.transpose(1, 2) for x in (q, k, v))

    def fwd():
        flashtile.flash_attn_func(q, k, v, causal=True)

    def fwd_bwd():
        out = flashtile.flash_attn_func(qg, kg, vg, causal=True)
        torch.autograd.grad(out, (qg, kg, vg), g)

    ql, kl, vl = (torch.randn(1, 4096, 8, 64, device=dev, dtype=dt) for _ in range(3))

    def fwd_gluon():  # > hopper.SMALL_ROWS query rows: the Gluon forward (TMA descriptors, lean launch)
        flashtile.flash_attn_func(ql, kl, vl, causal=True)

    def decode():
        flashtile.flash_attn_with_kvcache(qd, kc, vc, cache_seqlens=8192, causal=True)

    def sdpa():
        F.scaled_dot_product_attention(qs, ks, vs, is_causal=True)

    cases = {"fwd": fwd, "fwd_bwd": fwd_bwd, "decode": decode, "fwd_gluon": fwd_gluon, "sdpa": sdpa}
    only = [c for c in args.only.split(",") if c] or list(cases)
    for c in only:
        _profile(c, cases[c], args.calls, args.top)
    from flashtile.backends.triton import fastlaunch, launch, launch_decode

    mods = [launch, launch_decode]
    try:
        from flashtile.backends.hopper import launch as hopper_launch

        mods.append(hopper_launch)
    except Exception as e:  # noqa: BLE001 - not a Hopper machine
        print("hopper launch not importable:", e)
    counts = {n: (k.fast_launches, k.generic_launches) for m in mods for n, k in vars(m).items()
              if isinstance(k, fastlaunch.FastKernel) and (k.fast_launches or k.generic_launches)}  # fmt: skip
    print("\nTriton launches (fast, generic):", counts)
    if not args.only:
        env = dict(os.environ, FLASHTILE_TRITON_FAST_LAUNCH="0")
        print("\n##### FLASHTILE_TRITON_FAST_LAUNCH=0 #####", flush=True)
        subprocess.run([sys.executable, __file__, "--only", "fwd,decode", "--calls", str(args.calls),
                        "--top", "12"], env=env, check=False)


if __name__ == "__main__":
    main()
