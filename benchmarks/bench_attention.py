"""Attention speed on one GPU: flashtile (Triton backend) against PyTorch's SDPA backends.

Convention (see the anchors in the project's shared notes): bf16, batch * seqlen = 16384,
nheads * headdim = 2048, hdim 64 and 128, causal and not, seqlen 512..16384. FLOPs: forward
4*b*h*s*s*d, halved when causal; backward 2.5x forward. The backward is timed alone, from a
saved forward graph (``autograd.grad(..., retain_graph=True)``). Times are
``triton.testing.do_bench`` medians. SDPA gets its own (b, h, s, d) layout, flashtile its
(b, s, h, d) one: neither pays for a transpose.

    python benchmarks/bench_attention.py                 # full table + memory, JSON and PNG
    python benchmarks/bench_attention.py --sweep         # tile-config sweep first (configs.py)
    python benchmarks/bench_attention.py --seqlens 1024 4096 --hdims 128

Writes ``bench_<gpu>_<date>.json`` (rows tagged with GPU, versions, date, command) and a PNG
to ``--out`` (default: $OUT if set, else benchmarks/results).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import functools
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

from flashtile.testing import attention_flops, standard_attention  # noqa: E402

# FlashAttention-4 (flash-attn-4 4.0.0b36) on an H200, from the project's anchor table:
# (hdim, causal, seqlen) -> (fwd, bwd) TFLOP/s. Only meaningful against H200 runs.
FA4_H200 = {
    (64, False, 1024): (408, 440), (64, False, 4096): (500, 502), (64, False, 16384): (547, 525),
    (64, True, 1024): (262, 315), (64, True, 4096): (433, 455), (64, True, 16384): (560, 522),
    (128, False, 1024): (550, 479), (128, False, 4096): (664, 575), (128, False, 16384): (672, 613),
    (128, True, 1024): (408, 356), (128, True, 4096): (573, 514), (128, True, 16384): (638, 603),
}

# Sweep candidates (configs.py records the outcome). fwd: (BLOCK_M, BLOCK_N, warps, stages);
# bwd: (M1, N1, M2, N2, warps1, stages1, warps2, stages2).
FWD_CANDIDATES = {
    64: [(128, 128, 4, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 4, 4), (64, 64, 4, 3), (128, 128, 8, 2)],
    128: [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 4, 3), (128, 64, 8, 4), (64, 64, 4, 3), (128, 32, 4, 3)],
}
# Sweep 1 (H200, seqlen 4096) put atomic_dq=True 8-55% behind the split backward in every
# cell, so sweep 2 explores the split backward only.
BWD_CANDIDATES = {
    64: [(64, 64, 64, 64, 4, 3, 4, 3, False), (64, 64, 64, 64, 4, 4, 4, 4, False),
         (64, 64, 128, 64, 4, 3, 8, 3, False), (64, 128, 64, 64, 8, 3, 4, 3, False),
         (128, 64, 64, 64, 8, 3, 4, 3, False), (64, 64, 64, 32, 4, 3, 4, 3, False),
         (64, 128, 128, 64, 8, 3, 8, 3, False)],
    128: [(64, 128, 128, 64, 8, 2, 8, 2, False), (64, 128, 128, 64, 8, 3, 8, 3, False),
          (64, 128, 64, 64, 8, 2, 4, 2, False), (64, 64, 128, 64, 4, 2, 8, 2, False),
          (64, 128, 128, 32, 8, 2, 8, 3, False), (64, 64, 64, 64, 4, 3, 4, 3, False),
          (128, 64, 128, 64, 8, 2, 8, 2, False)],
}

# Short sequences (configs._FWD_SHORT / _BWD_SHORT, max seqlen <= 512): first entry = the long table's.
FWD_SHORT_CANDIDATES = {
    64: [(128, 64, 4, 4), (128, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (128, 128, 4, 2), (64, 32, 4, 2)],
    128: [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 2)],
}
BWD_SHORT_CANDIDATES = {
    64: [(64, 64, 64, 64, 4, 4, 4, 4, False), (64, 64, 64, 64, 4, 2, 4, 2, False),
         (32, 64, 64, 32, 4, 3, 4, 3, False), (64, 64, 64, 64, 4, 3, 4, 3, False),
         (32, 64, 64, 32, 4, 2, 4, 2, False), (64, 128, 128, 64, 8, 2, 8, 2, False)],
    128: [(64, 128, 128, 64, 8, 3, 8, 3, False), (64, 128, 128, 64, 8, 2, 8, 2, False),
          (64, 128, 64, 64, 8, 3, 4, 3, False), (32, 128, 128, 32, 8, 2, 8, 2, False),
          (32, 64, 64, 32, 4, 2, 4, 2, False), (64, 64, 64, 64, 4, 2, 4, 2, False)],
}


def _bench(fn, warmup=25, rep=100):
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


# ---------------------------------------------------------------------------------------
# implementations: fn(q, k, v, causal) -> out, with their own input layouts
# ---------------------------------------------------------------------------------------


def _flashtile():
    try:
        import flashtile
        from flashtile import flash_attn_func

        def f(q, k, v, causal):
            with flashtile.use_backend("triton"):
                return flash_attn_func(q, k, v, causal=causal)

        return f, "api"
    except Exception as e:  # the public API not there: call the backend directly
        print("flashtile API unavailable, timing the backend directly:", e)
        from flashtile.backends.triton import backend
        from flashtile.spec import make_call

        class _Fn(torch.autograd.Function):
            @staticmethod
            def forward(ctx, q, k, v, causal):
                spec = make_call(headdim=q.shape[-1], dropout_p=0.0, softmax_scale=None, causal=causal,
                                 window_size=(-1, -1), softcap=0.0, deterministic=False)
                kw = {}  # the call carries every option
                out, lse = backend.forward(q, k, v, spec, **kw)
                ctx.save_for_backward(q, k, v, out, lse)
                ctx.spec, ctx.kw = spec, kw
                return out

            @staticmethod
            def backward(ctx, dout):
                q, k, v, out, lse = ctx.saved_tensors
                return (*backend.backward(dout, q, k, v, out, lse, ctx.spec, **ctx.kw)[:3], None)

        return (lambda q, k, v, causal: _Fn.apply(q, k, v, causal)), "direct"


def _sdpa(backend):
    from torch.nn.attention import sdpa_kernel

    def f(q, k, v, causal):
        with sdpa_kernel([backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return f


def _standard(q, k, v, causal):
    return standard_attention(q, k, v, causal, layout="bhsd", softmax_dtype=torch.float32)


def _flashtile_backend(name):
    """flash_attn_func forced onto one backend; None when that backend is not usable here."""
    try:
        import flashtile
    except Exception:  # noqa: BLE001 - the public API not there
        return None
    be = flashtile.dispatch.backends().get(name)
    if be is None or be.available() is not None:
        return None

    def f(q, k, v, causal):
        with flashtile.use_backend(name):
            return flashtile.flash_attn_func(q, k, v, causal=causal)

    return f


def impls():
    from torch.nn.attention import SDPBackend

    ft, how = _flashtile()
    extra = {}
    hopper = _flashtile_backend("hopper")  # the Gluon sm_90 forward (backward: the Triton kernels)
    if hopper is not None:
        extra["flashtile-hopper"] = (hopper, "bshd")
    return {
        "flashtile": (ft, "bshd"),
        **extra,
        "sdpa-flash": (_sdpa(SDPBackend.FLASH_ATTENTION), "bhsd"),
        "sdpa-cudnn": (_sdpa(SDPBackend.CUDNN_ATTENTION), "bhsd"),
        "sdpa-effic": (_sdpa(SDPBackend.EFFICIENT_ATTENTION), "bhsd"),
        "standard": (_standard, "bhsd"),
    }, how


def time_impl(fn, layout, b, h, s, d, causal, mode, dtype=torch.bfloat16):
    shape = (b, s, h, d) if layout == "bshd" else (b, h, s, d)
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype) for _ in range(3))
    if mode == "fwd":
        with torch.no_grad():
            return _bench(lambda: fn(q, k, v, causal))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    out = fn(q, k, v, causal)
    g = torch.randn_like(out)
    return _bench(lambda: torch.autograd.grad(out, (q, k, v), g, retain_graph=True))


# ---------------------------------------------------------------------------------------
# config sweep
# ---------------------------------------------------------------------------------------


def _sweep_inputs(d, causal, s, b=None):
    from flashtile.spec import make_call

    h = 2048 // d
    b = b or max(1, 16384 // s)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    spec = make_call(headdim=d, dropout_p=0.0, softmax_scale=None, causal=causal, window_size=(-1, -1),
                     softcap=0.0, deterministic=False)
    return q, k, v, spec, {}  # the call carries every option


def _compile_one(job):
    """Worker: compile one (kind, d, causal, config) variant into Triton's disk cache."""
    kind, d, causal, cfg = job
    sys.path.insert(0, os.path.join(ROOT, "src"))
    from flashtile.backends.triton import configs, launch

    try:
        q, k, v, spec, kw = _sweep_inputs(d, causal, 256, b=1)
        if kind == "fwd":
            launch.forward(q, k, v, spec, **kw, config=configs.FwdConfig(*cfg))
        else:
            out, lse = launch.forward(q, k, v, spec, **kw)
            launch.backward(torch.randn_like(out), q, k, v, out, lse, spec, **kw, config=configs.BwdConfig(*cfg))
        torch.cuda.synchronize()
        return job, None
    except Exception as e:  # noqa: BLE001 - reported, the sweep goes on
        return job, f"{type(e).__name__}: {str(e)[:200]}"


def sweep(hdims, seqlen, jobs_parallel=8, short=False):
    from flashtile.backends.triton import configs, launch

    fwd_c, bwd_c = (FWD_SHORT_CANDIDATES, BWD_SHORT_CANDIDATES) if short else (FWD_CANDIDATES, BWD_CANDIDATES)
    jobs = [("fwd", d, c, cfg) for d in hdims for c in (False, True) for cfg in fwd_c[d]]
    jobs += [("bwd", d, c, cfg) for d in hdims for c in (False, True) for cfg in bwd_c[d]]
    t0 = time.time()
    errors = {}
    ctx = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(jobs_parallel, mp_context=ctx) as ex:
        for job, err in ex.map(_compile_one, jobs):
            if err:
                errors[job] = err
    print(f"sweep: compiled {len(jobs)} variants in {time.time() - t0:.0f} s ({len(errors)} failed)", flush=True)
    rows = []
    for d in hdims:
        for causal in (False, True):
            q, k, v, spec, kw = _sweep_inputs(d, causal, seqlen)
            b, h = q.shape[0], q.shape[2]
            args = (q, k, v, spec)
            out, lse = launch.forward(*args, **kw)
            dout = torch.randn_like(out)
            for kind, cands in (("fwd", fwd_c[d]), ("bwd", bwd_c[d])):
                for cfg in cands:
                    if (kind, d, causal, cfg) in errors:
                        ms, note = float("nan"), errors[(kind, d, causal, cfg)]
                    else:
                        try:
                            if kind == "fwd":
                                ms = _bench(functools.partial(launch.forward, *args, **kw,
                                                              config=configs.FwdConfig(*cfg)))
                            else:
                                ms = _bench(functools.partial(launch.backward, dout, *args[:3], out, lse, spec,
                                                              **kw, config=configs.BwdConfig(*cfg)))
                            note = ""
                        except Exception as e:  # noqa: BLE001
                            ms, note = float("nan"), f"{type(e).__name__}: {str(e)[:120]}"
                    tf = attention_flops(b, h, seqlen, d, causal, kind) / ms / 1e9
                    rows.append(dict(kind=kind, hdim=d, causal=causal, seqlen=seqlen, config=list(cfg), ms=ms,
                                     tflops=tf, note=note))
                    print(f"sweep {kind} d={d} causal={int(causal)} s={seqlen} {cfg}: {ms:.3f} ms {tf:.0f} TFLOP/s",
                          note, flush=True)
            q = k = v = out = lse = dout = args = None
    winners = {}
    for d in hdims:
        for kind in ("fwd", "bwd"):
            best = {}
            for cfg in (fwd_c if kind == "fwd" else bwd_c)[d]:
                ts = [r["tflops"] for r in rows if r["kind"] == kind and r["hdim"] == d and tuple(r["config"]) == cfg]
                best[cfg] = sum(ts) / len(ts) if all(not math.isnan(t) for t in ts) else float("nan")
            top = max((c for c in best if not math.isnan(best[c])), key=lambda c: best[c], default=None)
            print(f"sweep best {kind} d={d}: {top} mean {best.get(top, float('nan')):.0f} TFLOP/s", flush=True)
            if top is not None:
                winners[(kind, d)] = top
    return rows, winners


def apply_winners(winners, short=False):
    """Use the sweep's winners for the rest of this run (configs.py keeps the recorded ones)."""
    from flashtile.backends.triton import configs, launch

    arch = launch.arch(torch.device("cuda"))
    launch.clear_plans()  # launch plans (and runners made from them) keep the configs they were made with
    for (kind, d), cfg in winners.items():
        if short:
            table = configs._FWD_SHORT if kind == "fwd" else configs._BWD_SHORT
        else:
            table = configs._FWD if kind == "fwd" else configs._BWD
        table[(arch, configs.bucket(d))] = (configs.FwdConfig if kind == "fwd" else configs.BwdConfig)(*cfg)
        print(f"using sweep winner for {kind} d={d}{' (short)' if short else ''}: {table[(arch, configs.bucket(d))]}",
              flush=True)


def check_vs_sdpa(ft, d, causal, s):
    """Max abs difference of flashtile's out and dq against SDPA flash on the same bf16 inputs
    (two flash implementations: expect ~1e-2 for out, a few 1e-2 relative for dq)."""
    from torch.nn.attention import SDPBackend

    flash = _sdpa(SDPBackend.FLASH_ATTENTION)
    h = 2048 // d
    q, k, v = (torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    g = torch.randn(1, s, h, d, device="cuda", dtype=torch.bfloat16)
    o1 = ft(q, k, v, causal)
    dq1 = torch.autograd.grad(o1, q, g)[0]
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    o2 = flash(qt, kt, vt, causal)
    dq2 = torch.autograd.grad(o2, qt, g.transpose(1, 2))[0]
    e_out = (o1 - o2.transpose(1, 2)).abs().max().item()
    e_dq = ((dq1 - dq2.transpose(1, 2)).abs().max() / dq2.abs().max()).item()
    return e_out, e_dq


# ---------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------


def peak_memory(fn, layout, b, h, s, d, dtype, with_bwd):
    shape = (b, s, h, d) if layout == "bshd" else (b, h, s, d)
    q, k, v = (torch.randn(shape, device="cuda", dtype=dtype, requires_grad=with_bwd) for _ in range(3))
    g = torch.randn(shape, device="cuda", dtype=dtype) if with_bwd else None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    if with_bwd:
        out = fn(q, k, v, False)
        torch.autograd.grad(out, (q, k, v), g)
    else:
        with torch.no_grad():
            out = fn(q, k, v, False)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    del out
    return peak


# ---------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlens", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    ap.add_argument("--hdims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--impls", nargs="+", default=None,
                    help="subset of: flashtile sdpa-flash sdpa-cudnn sdpa-effic standard")
    ap.add_argument("--sweep", action="store_true", help="time the candidate tile configs first")
    ap.add_argument("--sweep-only", action="store_true")
    ap.add_argument("--sweep-seqlen", type=int, default=4096)
    ap.add_argument("--standard-max-seqlen", type=int, default=4096)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()
    import triton

    os.makedirs(args.out, exist_ok=True)
    props = torch.cuda.get_device_properties(0)
    meta = dict(gpu=props.name, sms=props.multi_processor_count, torch=torch.__version__, triton=triton.__version__,
                date=_dt.datetime.now().isoformat(timespec="seconds"), command=" ".join(sys.argv))
    print(f"device {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
          f"triton {triton.__version__}", flush=True)
    from flashtile.backends.triton import launch

    for d in args.hdims:
        print("configs", launch.describe(torch.device("cuda"), d, torch.bfloat16), flush=True)
        meta[f"configs_d{d}"] = launch.describe(torch.device("cuda"), d, torch.bfloat16)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = _bench(functools.partial(torch.matmul, a, a), warmup=50, rep=200)
    meta["matmul_bf16_tflops"] = 2 * 8192**3 / ms / 1e9
    print(f"ceiling bf16 matmul 8192^3: {meta['matmul_bf16_tflops']:.0f} TFLOP/s", flush=True)
    a = None

    result = dict(meta=meta, rows=[], sweep=[], memory=[], checks=[])
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M")
    gpu_tag = props.name.replace("NVIDIA ", "").replace(" ", "-")
    path = os.path.join(args.out, f"bench_{gpu_tag}_{stamp}.json")

    def save():
        with open(path, "w") as fh:
            json.dump(result, fh, indent=1)

    if args.sweep or args.sweep_only:
        short = args.sweep_seqlen <= 512
        result["sweep"], winners = sweep(args.hdims, args.sweep_seqlen, short=short)
        save()
        if args.sweep_only:
            return
        apply_winners(winners, short=short)
        tag = "configs_from_sweep" + ("_short" if short else "")
        meta[tag] = {f"{k}_{d}": list(c) for (k, d), c in winners.items()}

    table, how = impls()
    meta["flashtile_call"] = how
    names = args.impls or list(table)
    for d in args.hdims:
        h = 2048 // d
        for causal in (False, True):
            for s in args.seqlens:
                b = max(1, 16384 // s)
                if "flashtile" in names:
                    try:
                        e_out, e_dq = check_vs_sdpa(table["flashtile"][0], d, causal, s)
                    except Exception as e:  # noqa: BLE001
                        e_out = e_dq = float("nan")
                        print("check fail", d, causal, s, e)
                    bad = not (e_out < 3e-2 and e_dq < 5e-2)
                    result["checks"].append(dict(hdim=d, causal=causal, seqlen=s, out_maxabs=e_out, dq_rel=e_dq,
                                                 ok=not bad))
                    print(f"check d={d} causal={int(causal)} s={s}: out max|diff| {e_out:.2e}, dq rel {e_dq:.2e}"
                          f"{'  <-- SUSPICIOUS' if bad else ''}", flush=True)
                for name in names:
                    fn, layout = table[name]
                    if name == "standard" and s > args.standard_max_seqlen:
                        continue
                    for mode in ("fwd", "bwd"):
                        try:
                            ms = time_impl(fn, layout, b, h, s, d, causal, mode)
                            err = ""
                        except Exception as e:  # noqa: BLE001
                            ms, err = float("nan"), f"{type(e).__name__}: {str(e)[:160]}"
                        tf = attention_flops(b, h, s, d, causal, mode) / ms / 1e9
                        result["rows"].append(dict(impl=name, mode=mode, hdim=d, causal=causal, seqlen=s, batch=b,
                                                   nheads=h, ms=ms, tflops=tf, error=err))
                        print(f"{name:10s} {mode} d={d:3d} causal={int(causal)} s={s:6d} {ms:8.3f} ms "
                              f"{tf:6.1f} TFLOP/s", err, flush=True)
                        torch.cuda.empty_cache()
                save()

    # peak extra memory of a forward (anchor convention: b=2 h=16 d=64 fp16) and of fwd+bwd
    for name in ("flashtile", "sdpa-flash"):
        fn, layout = table[name]
        for s, with_bwd in ((4096, False), (16384, False), (16384, True)):
            try:
                mib = peak_memory(fn, layout, 2, 16, s, 64, torch.float16, with_bwd)
            except Exception as e:  # noqa: BLE001
                mib = float("nan")
                print("memory fail", name, s, e)
            result["memory"].append(dict(impl=name, seqlen=s, batch=2, nheads=16, hdim=64, dtype="float16",
                                         mode="fwd+bwd" if with_bwd else "fwd", peak_extra_mib=mib))
            mode = "fwd+bwd" if with_bwd else "fwd"
            print(f"memory {name:10s} s={s} {mode:7s}: peak extra {mib:.1f} MiB", flush=True)
    save()
    print_table(result)
    plot(result, path.replace(".json", ".png"))
    print("wrote", path)


def print_table(result):
    rows = result["rows"]

    def tf(impl, mode, d, c, s):
        for r in rows:
            if (r["impl"], r["mode"], r["hdim"], r["causal"], r["seqlen"]) == (impl, mode, d, c, s):
                return r["tflops"]
        return float("nan")

    keys = sorted({(r["hdim"], r["causal"], r["seqlen"]) for r in rows})
    print("\nTFLOP/s (fwd / bwd). ratios: flashtile / peer. FA4 = H200 anchor figures")
    print(f"{'hdim':>4} {'causal':>6} {'seqlen':>6} | {'flashtile':>11} | {'sdpa-flash':>11} {'x':>11} | "
          f"{'sdpa-cudnn':>11} {'x':>11} | {'FA4(H200)':>9} {'x':>11}")
    worst = [math.inf, math.inf]
    for d, c, s in keys:
        ft = (tf("flashtile", "fwd", d, c, s), tf("flashtile", "bwd", d, c, s))
        fl = (tf("sdpa-flash", "fwd", d, c, s), tf("sdpa-flash", "bwd", d, c, s))
        cu = (tf("sdpa-cudnn", "fwd", d, c, s), tf("sdpa-cudnn", "bwd", d, c, s))
        fa4 = FA4_H200.get((d, c, s))
        for i in range(2):
            if not math.isnan(ft[i] / fl[i]):
                worst[i] = min(worst[i], ft[i] / fl[i])

        def pair(x):
            return f"{x[0]:5.0f}/{x[1]:5.0f}"

        def ratio(x, ft=ft):
            return f"{ft[0] / x[0]:5.2f}/{ft[1] / x[1]:5.2f}"

        fa4s = f"{fa4[0]:4d}/{fa4[1]:4d} {ratio(fa4)}" if fa4 else f"{'':>9} {'':>11}"
        print(f"{d:4d} {int(c):6d} {s:6d} | {pair(ft)} | {pair(fl)} {ratio(fl)} | {pair(cu)} {ratio(cu)} | {fa4s}")
    print(f"worst flashtile / sdpa-flash: fwd {worst[0]:.2f}, bwd {worst[1]:.2f}")
    if any(r["impl"] == "flashtile-hopper" for r in rows):
        print("\nflashtile-hopper (Gluon sm_90 forward; backward = Triton kernels), fwd TFLOP/s and ratios")
        print(f"{'hdim':>4} {'causal':>6} {'seqlen':>6} | {'hopper':>6} | {'x triton':>8} {'x FA2':>6} {'x cuDNN':>7}")
        for d, c, s in keys:
            hp = tf("flashtile-hopper", "fwd", d, c, s)
            tr, fl, cu = (tf(n, "fwd", d, c, s) for n in ("flashtile", "sdpa-flash", "sdpa-cudnn"))
            print(f"{d:4d} {int(c):6d} {s:6d} | {hp:6.0f} | {hp / tr:8.2f} {hp / fl:6.2f} {hp / cu:7.2f}")
    checks = result.get("checks", [])
    if checks:
        n_ok = sum(c["ok"] for c in checks)
        e_out = max(c["out_maxabs"] for c in checks)
        e_dq = max(c["dq_rel"] for c in checks)
        print(f"flashtile vs sdpa-flash outputs: {n_ok}/{len(checks)} cells within bf16 tolerance "
              f"(max out diff {e_out:.2e}, max dq rel {e_dq:.2e})")
    for m in result["memory"]:
        print(f"memory {m['impl']:10s} s={m['seqlen']:5d} {m['mode']:7s} peak extra {m['peak_extra_mib']:.1f} MiB")


def plot(result, png):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:  # noqa: BLE001 - matplotlib is optional
        print("no plot:", e)
        return
    rows = result["rows"]
    fig, axes = plt.subplots(2, 4, figsize=(18, 8), sharex=True)
    for i, mode in enumerate(("fwd", "bwd")):
        for j, (d, c) in enumerate(((64, False), (64, True), (128, False), (128, True))):
            ax = axes[i][j]
            for impl in sorted({r["impl"] for r in rows}):
                pts = sorted((r["seqlen"], r["tflops"]) for r in rows
                             if r["impl"] == impl and r["mode"] == mode and r["hdim"] == d and r["causal"] == c)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=impl)
            fa4 = sorted((s, v[0 if mode == "fwd" else 1]) for (dd, cc, s), v in FA4_H200.items() if (dd, cc) == (d, c))
            ax.plot([p[0] for p in fa4], [p[1] for p in fa4], "k--", label="FA4 (H200 anchor)")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{mode} hdim={d} causal={c}")
            ax.set_ylabel("TFLOP/s")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    m = result["meta"]
    fig.suptitle(f"flashtile triton vs SDPA, bf16, {m['gpu']}, torch {m['torch']}, triton {m['triton']}, {m['date']}")
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    print("wrote", png)


if __name__ == "__main__":
    main()
