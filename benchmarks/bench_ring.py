"""Context-parallel attention (flashtile.distributed): parity over the real transport, then throughput.

Strategies on a group of W ranks: ``ring`` (ulysses_size 1), ``ulysses`` (ulysses_size W) and
``2d`` (hybrid_flash_attn_func, every ulysses_size 1 < U < W, or ``--ulysses-size``).

1. Parity: every strategy, both layouts, causal and not, GQA, one varlen case, bf16 and fp32,
   against single-device ``flash_attn_func`` and the fp32 oracle on the full sequence. Rule
   (flash-attn's): ``max|cp - ref| <= factor * max|single - ref| + atol`` for out, lse, dq, dk,
   dv (factor 2 forward, 3 backward; atol and rule from flashtile.testing).
2. Throughput: causal, bf16, ``--heads`` x ``--heads-k`` x ``--headdim`` (32 x 8 x 128), batch 1,
   total seqlen ``--seqlens`` (32k .. 512k): tokens/s and TFLOP/s per device of forward +
   backward on W devices (each holding seqlen / W tokens) against one device running the whole
   sequence (skipped where it does not fit: recorded as "oom"), and the scaling model's
   prediction (:func:`model_time`, benchmarks/NOTES.md "2-D context parallelism"). Time per
   iteration = the slowest rank's; median of ``--iters``. FLOPs: forward ``4 * s^2 * h * d / 2``
   (causal), backward 2.5x forward.

GPU (H200s, NCCL; NVLink multicast stays off, this script sets the variables)::

    python benchmarks/bench_ring.py --nprocs 1 --skip-parity    # one GPU: the baseline rows only
    torchrun --nproc-per-node 8 benchmarks/bench_ring.py --skip-single
    python benchmarks/bench_ring.py --nprocs 2                  # or mp.spawn, one process per GPU
    python benchmarks/bench_ring.py --summary benchmarks/results/ring_*_x*.json   # 1/2/4/8 table

CPU smoke run (gloo, tiny)::

    python benchmarks/bench_ring.py --device cpu --nprocs 4 --seqlens 256 --heads 4 --heads-k 2 --headdim 32

Writes ``ring_<device>_x<W>_<date>.json`` to ``--out`` (default: $OUT if set, else benchmarks/results)
and prints a table last.
"""

from __future__ import annotations

import os

# NVLink multicast (NVLS) must stay off on the lent machines: set before NCCL starts.
for _k, _v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[_k] = _v

import argparse  # noqa: E402
import datetime as _dt  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

import flashtile  # noqa: E402
from flashtile import dispatch  # noqa: E402
from flashtile.distributed import (  # noqa: E402
    hybrid_flash_attn_func,
    hybrid_flash_attn_varlen_func,
    shard,
)
from flashtile.spec import Problem, make_call  # noqa: E402
from flashtile.testing import (  # noqa: E402
    BWD_ATOL,
    BWD_FACTOR,
    FWD_ATOL,
    FWD_FACTOR,
    attention_flops,
    attention_ref,
    cu_seqlens,
    max_err,
    tolerance,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
STRATEGIES = ("ring", "ulysses", "2d")


def configs(world: int, strategies, ulysses_sizes, heads: int) -> list[tuple[str, int]]:
    """``(label, ulysses_size)`` of every strategy run on ``world`` ranks: ring = 1, Ulysses = W,
    2-D = each size strictly between (or ``ulysses_sizes``) that divides W and ``heads``. Ring
    and Ulysses are the same implementation (hybrid_flash_attn_func) at those sizes."""
    if world == 1:
        return []
    out = []
    if "ring" in strategies:
        out.append(("ring", 1))
    if "ulysses" in strategies and heads % world == 0:
        out.append(("ulysses", world))
    if "2d" in strategies:
        for u in ulysses_sizes or [u for u in range(2, world) if world % u == 0]:
            if 1 < u < world and world % u == 0 and heads % u == 0:
                out.append((f"2d-U{u}xR{world // u}", u))
    return out


# ----------------------------------------------------------------------------------------------
# the scaling model (benchmarks/NOTES.md, "2-D context parallelism"). Fitted on 2 x H200 with
# the code of issue 6 (h = hk = 32, d = 128): P, the fixed cost per ring step and the per-token
# memory traffic of a ring step, and the effective rate of the all-to-all path; link bandwidth
# and the rule "a ring hop is hidden while it is shorter than the step's attention" from the
# hardware.

MODEL = {
    "tflops": 427.0,  # one-GPU causal fwd+bwd rate (bench_ring 1-device rows, 32k-128k)
    "ring_step_s": 0.68e-3,  # fixed cost per ring step, forward + backward (launches, merge setup, p2p latency)
    "ring_token_s": 0.145e-6,  # per token of the ring position's shard per step, at (h + hk) d = 64 * 128
    "a2a_bytes_per_s": 134e9,  # all-to-all path (copies + NCCL), per byte of the 8 re-sharded tensors
    "link_bytes_per_s": 450e9,  # NVLink per direction (H200)
}


def model_time(s: int, world: int, ulysses: int, h: int, hk: int, d: int, elem: int = 2, m: dict = MODEL) -> float:
    """Predicted seconds of one causal forward + backward at total length ``s`` on ``world`` GPUs
    with ``ulysses`` ranks per Ulysses group (``world // ulysses`` ring positions)."""
    ring = world // ulysses
    flops = attention_flops(1, h, s, d, True, "fwd_bwd")
    t = flops / (world * m["tflops"] * 1e12)
    if world == 1:
        return t
    hk_eff = math.lcm(hk, ulysses) if hk % ulysses else hk  # k/v heads replicated for the all-to-all
    if ring > 1:
        t += ring * m["ring_step_s"] + m["ring_token_s"] * s / ulysses * (h + hk_eff) * d / (64 * 128)
        step_compute = flops / (world * ring * m["tflops"] * 1e12)
        # k, v in the forward; k, v and float32 dk, dv in the backward: 16 bytes per (token, k/v head, dim) / W
        step_link = 16 * s * hk_eff * d / world / m["link_bytes_per_s"]
        t += ring * max(0.0, step_link - step_compute)  # the part of each hop not hidden
    if ulysses > 1:  # q, k, v, out forward and dout, dq, dk, dv backward, (U - 1) / U of them off the rank
        nbytes = s / world * d * elem * (4 * h + 4 * hk_eff)
        t += nbytes / m["a2a_bytes_per_s"] * 2 * (ulysses - 1) / ulysses
    return t


def _log(rank: int, *a) -> None:
    if rank == 0:
        print(*a, flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------
# parity


def _parity_case(group, device, ulysses, layout, causal, dtype, *, s, h, hk, d, varlen) -> dict:
    """One parity case on every rank (hybrid_flash_attn_func with ``ulysses``); returns the rank's
    errors and verdict."""
    g = torch.Generator(device="cpu").manual_seed(1000 + s + hk)
    if varlen:
        lens = [s // 2, s // 4, s // 4]
        cu = cu_seqlens(lens, device)
        shapes = [(s, h, d), (s, hk, d), (s, hk, d), (s, h, d)]
    else:
        shapes = [(1, s, h, d), (1, s, hk, d), (1, s, hk, d), (1, s, h, d)]
    q, k, v, dout = (torch.randn(*sh, generator=g).to(device=device, dtype=dtype) for sh in shapes)
    sdim = 0 if varlen else 1
    kw = dict(dim=sdim, cu_seqlens=cu if varlen else None)

    def sh(x):
        return shard(x, group, layout, **kw)

    # single device, the same dtype
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    if varlen:
        out1, lse1, _ = flashtile.flash_attn_varlen_func(*leaves, cu, cu, max(lens), max(lens), causal=causal,
                                                         return_attn_probs=True)  # fmt: skip
    else:
        out1, lse1, _ = flashtile.flash_attn_func(*leaves, causal=causal, return_attn_probs=True)
    g1 = torch.autograd.grad(out1, leaves, dout)
    # fp32 oracle (dense layout; varlen sequences one by one)
    ref_leaves = [x.detach().float().requires_grad_() for x in (q, k, v)]
    if varlen:
        outs, lses = [], []
        bounds = cu.tolist()
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            o, l_ = attention_ref(*(x[a:b].unsqueeze(0) for x in ref_leaves), causal=causal)
            outs.append(o[0])
            lses.append(l_[0])
        ref_out, ref_lse = torch.cat(outs), torch.cat(lses, dim=1)
    else:
        ref_out, ref_lse = attention_ref(*ref_leaves, causal=causal)
    gref = torch.autograd.grad(ref_out, ref_leaves, dout.float())
    # context parallel
    loc = [sh(x).requires_grad_() for x in (q, k, v)]
    if varlen:
        m = max(lens)
        out, lse, _ = hybrid_flash_attn_varlen_func(*loc, cu, cu, m, m, group=group, ulysses_size=ulysses,
                                                    causal=causal, layout=layout, return_attn_probs=True)  # fmt: skip
    else:
        out, lse, _ = hybrid_flash_attn_func(*loc, group=group, ulysses_size=ulysses, causal=causal, layout=layout,
                                             return_attn_probs=True)  # fmt: skip
    gcp = torch.autograd.grad(out, loc, sh(dout))
    lse_dim = 1 if varlen else 2
    rows = []
    for name, x, one, ref, factor, atol in (
        ("out", out, sh(out1), sh(ref_out), FWD_FACTOR, FWD_ATOL[dtype]),
        ("lse", lse, shard(lse1, group, layout, dim=lse_dim, cu_seqlens=kw["cu_seqlens"]),
         shard(ref_lse, group, layout, dim=lse_dim, cu_seqlens=kw["cu_seqlens"]), FWD_FACTOR, FWD_ATOL[dtype]),
        *((f"d{n}", gc, sh(gs), sh(gr), BWD_FACTOR, BWD_ATOL[dtype])
          for n, gc, gs, gr in zip("qkv", gcp, g1, gref, strict=True)),
    ):  # fmt: skip
        err, err1 = max_err(x, ref), max_err(one, ref)
        rows.append({"tensor": name, "err": err, "single_err": err1, "vs_single": max_err(x, one),
                     "ok": err <= tolerance(err1, factor, atol)})  # fmt: skip
    return {"ok": all(r["ok"] for r in rows), "errors": rows}


def run_parity(group, rank, world, device, args) -> list[dict]:
    s, h, d = args.parity_seqlen, args.parity_heads, args.parity_headdim
    cases = []
    for dtype_name in ("bf16", "fp32"):
        for label, u in configs(world, args.strategies, args.ulysses_size, h):
            for layout in ("zigzag", "contiguous"):
                for causal in (True, False):
                    cases.append((label, u, layout, causal, dtype_name, h // 2 if causal else h, False))
            cases.append((label, u, "zigzag", True, dtype_name, h // 2, True))  # varlen
    results = []
    for label, u, layout, causal, dtype_name, hk, varlen in cases:
        name = f"{label}/{layout}/{'causal' if causal else 'full'}/{dtype_name}/hk={hk}{'/varlen' if varlen else ''}"
        try:
            res = _parity_case(group, device, u, layout, causal, DTYPES[dtype_name], s=s, h=h, hk=hk, d=d,
                               varlen=varlen)  # fmt: skip
        except Exception as e:  # keep the ranks in step: every rank reports, the run goes on
            res = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()}
        flag = torch.tensor([1.0 if res["ok"] else 0.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN, group=group)
        res["ok_all_ranks"] = bool(flag.item() == 1.0)
        res.update(case=name, strategy=label, ulysses_size=u, layout=layout, causal=causal, dtype=dtype_name,
                   nheads_k=hk, varlen=varlen, seqlen=s, nheads=h, headdim=d, rank=rank)  # fmt: skip
        worst = {r["tensor"]: (r["err"], r["single_err"]) for r in res.get("errors", [])}
        _log(rank, f"parity {name:50s} {'PASS' if res['ok_all_ranks'] else 'FAIL'}  "
             + "  ".join(f"{t}: {e:.2g} (1 dev {e1:.2g})" for t, (e, e1) in worst.items())
             + (f"  {res.get('error', '')}" if "error" in res else ""))  # fmt: skip
        results.append(res)
    return results


# ----------------------------------------------------------------------------------------------
# throughput


def _time_iters(fn, device, group, warmup: int, iters: int, collective: bool) -> list[float]:
    """Per-iteration wall times (s); with ``collective``, each the slowest rank's of ``group``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(iters):
        if collective:
            dist.barrier(group=group)
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        dt = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
        if collective:
            dist.all_reduce(dt, op=dist.ReduceOp.MAX, group=group)
        times.append(dt.item())
    return times


def _fwd_bwd(fn, q, k, v, dout):
    def step():
        for x in (q, k, v):
            x.grad = None
        out = fn(q, k, v)
        out.backward(dout)

    return step


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e).lower()


def run_throughput(group, rank, world, device, args) -> list[dict]:
    dtype = DTYPES[args.dtype]
    h, d = args.heads, args.headdim
    hk = args.heads_k or h
    rows = []
    for s in args.seqlens:
        base = {"seqlen": s, "batch": 1, "nheads": h, "nheads_k": hk, "headdim": d, "dtype": args.dtype,
                "causal": True, "world": world}  # fmt: skip
        # one device, whole sequence (rank 0 alone; the others wait)
        single = {"status": "skipped"}
        if not args.skip_single:
            if rank == 0:
                try:
                    g = torch.Generator(device=device).manual_seed(s)  # on the device: 512k x 32 x 128 is 2G values
                    q, k, v, dout = (torch.randn(*sh, generator=g, device=device, dtype=dtype).requires_grad_(i < 3)
                                     for i, sh in enumerate([(1, s, h, d), (1, s, hk, d), (1, s, hk, d),
                                                             (1, s, h, d)]))  # fmt: skip
                    step = _fwd_bwd(lambda a, b, c: flashtile.flash_attn_func(a, b, c, causal=True), q, k, v, dout)
                    times = _time_iters(step, device, None, args.warmup, args.iters, collective=False)
                    t = statistics.median(times)
                    single = {"status": "ok", "time_s": t, "times_s": times, "tokens_per_s": s / t,
                              "tflops_per_device": attention_flops(1, h, s, d, True, "fwd_bwd") / t / 1e12}  # fmt: skip
                    del q, k, v, dout, step
                except Exception as e:
                    if not _is_oom(e):
                        raise
                    single = {"status": "oom", "error": str(e).splitlines()[0]}
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                if single["status"] != "skipped":
                    rows.append(
                        dict(
                            base,
                            world=1,
                            strategy="single",
                            ulysses_size=1,
                            ring_size=1,
                            layout="-",
                            status=single["status"],
                            **{k: v for k, v in single.items() if k != "status"},
                        )
                    )
            dist.barrier(group=group)
        for label, u in configs(world, args.strategies, args.ulysses_size, h):
            for layout in args.layouts:
                row = dict(base, strategy=label, ulysses_size=u, ring_size=world // u, layout=layout, single=single)
                row["model_time_s"] = model_time(s, world, u, h, hk, d)
                row["model_speedup"] = model_time(s, 1, 1, h, hk, d) / row["model_time_s"]
                try:
                    g = torch.Generator(device=device).manual_seed(s + 1 + rank)
                    sl = s // world
                    q, k, v, dout = (torch.randn(*sh, generator=g, device=device, dtype=dtype).requires_grad_(i < 3)
                                     for i, sh in enumerate([(1, sl, h, d), (1, sl, hk, d), (1, sl, hk, d),
                                                             (1, sl, h, d)]))  # fmt: skip
                    step = _fwd_bwd(lambda a, b, c, u=u, lay=layout: hybrid_flash_attn_func(
                        a, b, c, group=group, ulysses_size=u, causal=True, layout=lay), q, k, v, dout)  # fmt: skip
                    times = _time_iters(step, device, group, args.warmup, args.iters, collective=True)
                    t = statistics.median(times)
                    flops = attention_flops(1, h, s, d, True, "fwd_bwd")
                    row.update(status="ok", time_s=t, times_s=times, tokens_per_s=s / t,
                               tflops_per_device=flops / t / 1e12 / world)  # fmt: skip
                    if single.get("status") == "ok":
                        row["speedup_vs_single"] = single["time_s"] / t
                    if device.type == "cuda":
                        row["max_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
                    del q, k, v, dout, step
                except Exception as e:
                    if not _is_oom(e):
                        raise
                    row.update(status="oom", error=str(e).splitlines()[0])
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                sp = row.get("speedup_vs_single")
                _log(rank, f"seqlen {s:>7} {label:12s} {layout:10s} "
                     + (f"{row['tokens_per_s']:12.0f} tok/s  {row['tflops_per_device']:6.1f} TFLOP/s/dev"
                        if row["status"] == "ok" else row["status"])
                     + (f"   1 device: {single['tokens_per_s']:12.0f} tok/s  speedup {sp:.2f}x" if sp else
                        f"   1 device: {single.get('status')}")
                     + f"   model {row['model_speedup']:.2f}x")  # fmt: skip
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# driver


def _env_info(device: torch.device) -> dict:
    info = {"torch": torch.__version__, "date": _dt.datetime.now().isoformat(timespec="seconds"),
            "command": " ".join([os.path.basename(sys.executable)] + sys.argv), "host": socket.gethostname(),
            "nccl_env": {k: os.environ.get(k) for k in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST",
                                                        "NVSHMEM_DISABLE_NVLS")}}  # fmt: skip
    try:
        info["git"] = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                     text=True, timeout=10).stdout.strip()  # fmt: skip
    except Exception:
        info["git"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        try:
            import triton

            info["triton"] = triton.__version__
        except Exception:
            info["triton"] = None
        if dist.is_nccl_available():
            info["nccl"] = ".".join(str(x) for x in torch.cuda.nccl.version())
    else:
        info["gpu"] = None
    return info


def _worker(rank: int, world: int, init: str, args) -> None:
    if args.device == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
        backend = "nccl"
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
        device = torch.device("cpu")
        backend = "gloo"
    kw = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(backend, init_method=init, rank=rank, world_size=world,
                            timeout=_dt.timedelta(seconds=args.timeout), **kw)  # fmt: skip
    report = {"env": _env_info(device), "world": world, "device": args.device, "args": vars(args)}
    with flashtile.use_backend(args.backend):
        spec = make_call(headdim=args.headdim, dropout_p=0.0, softmax_scale=None, causal=True, window_size=(-1, -1),
                         softcap=0.0, deterministic=False)  # fmt: skip
        prob = Problem(batch=1, seqlen_q=4096, seqlen_k=4096, nheads=args.heads, nheads_k=args.heads_k or args.heads,
                       headdim=args.headdim, dtype=DTYPES[args.dtype], device=device)  # fmt: skip
        report["attention_backend"] = dispatch.choose(prob, spec)
        _log(rank, f"{world} x {report['env'].get('gpu') or 'cpu'} over {backend}; attention backend "
             f"{report['attention_backend']}; NCCL env {report['env']['nccl_env']}")  # fmt: skip
        if not args.skip_parity:
            report["parity"] = run_parity(None, rank, world, device, args)
            report["parity_ok"] = all(r["ok_all_ranks"] for r in report["parity"])
            _log(rank, f"parity: {'all passed' if report['parity_ok'] else 'FAILURES'}")
        if not args.skip_throughput:
            report["throughput"] = run_throughput(None, rank, world, device, args)
    if rank == 0:
        os.makedirs(args.out, exist_ok=True)
        tag = (report["env"].get("gpu") or "cpu").replace(" ", "_").replace("/", "_")
        path = os.path.join(args.out, f"ring_{tag}_x{world}_{_dt.datetime.now():%Y%m%d_%H%M%S}.json")
        with open(path, "w") as f:
            json.dump(report, f, indent=1, default=str)
        print(f"wrote {path}", flush=True)
        if "parity" in report:
            bad = [r["case"] for r in report["parity"] if not r["ok_all_ranks"]]
            print(f"parity: {len(report['parity']) - len(bad)}/{len(report['parity'])} passed"
                  + (f"; FAILED: {', '.join(bad)}" if bad else ""), flush=True)  # fmt: skip
        print(summary_table([report]), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _k(s: int) -> str:
    return f"{s // 1024}k" if s >= 1024 and s % 1024 == 0 else str(s)


def summary_table(reports: list[dict]) -> str:
    """Markdown table of the throughput rows of one or more runs (e.g. the 1, 2, 4 and 8 GPU
    runs): tokens/s, TFLOP/s per device, speedup over one device (the run's own single row, or
    another run's for the same shape) and the model's speedup."""
    rows = [r for rep in reports for r in rep.get("throughput", [])]
    key = ("seqlen", "nheads", "nheads_k", "headdim", "dtype")
    single = {tuple(r[k] for k in key): r for r in rows if r["strategy"] == "single" and r["status"] == "ok"}
    lines = [
        "| seqlen | GPUs | strategy | tok/s | TFLOP/s/GPU | speedup | model |",
        "|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in sorted(rows, key=lambda r: (r["seqlen"], r["world"], r["strategy"] != "single", r["strategy"])):
        one = single.get(tuple(r[k] for k in key))
        if r["status"] != "ok":
            lines.append(f"| {_k(r['seqlen'])} | {r['world']} | {r['strategy']} | {r['status']} | | | |")
            continue
        sp = one["time_s"] / r["time_s"] if one else r.get("speedup_vs_single")  # else the run's own single row
        sp = f"{sp:.2f}x" if sp else "-"
        model = f"{r['model_speedup']:.2f}x" if "model_speedup" in r else "-"
        lines.append(f"| {_k(r['seqlen'])} | {r['world']} | {r['strategy']} | {r['tokens_per_s']:,.0f} | "
                     f"{r['tflops_per_device']:.0f} | {sp} | {model} |")  # fmt: skip
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--nprocs", type=int, default=2, help="processes (devices) when not under torchrun")
    p.add_argument("--seqlens", type=int, nargs="+", default=[32768, 65536, 131072, 262144, 524288])
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--heads-k", type=int, default=8, help="k/v heads (0: as --heads)")
    p.add_argument("--headdim", type=int, default=128)
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--strategies", nargs="+", choices=list(STRATEGIES), default=list(STRATEGIES))
    p.add_argument(
        "--ulysses-size",
        type=int,
        nargs="+",
        default=None,
        help="ulysses sizes of the 2d strategy (default: every divisor of W strictly between 1 and W)",
    )
    p.add_argument(
        "--summary", nargs="+", metavar="JSON", help="print the table of finished runs (globs accepted) and exit"
    )
    p.add_argument("--layouts", nargs="+", choices=["zigzag", "contiguous"], default=["zigzag"])
    p.add_argument("--backend", default="auto", help="flashtile backend: auto, torch, triton")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations (the first compiles the kernels)")
    p.add_argument("--iters", type=int, default=3)
    p.add_argument("--parity-seqlen", type=int, default=0, help="0: 2048 on cuda, 64 on cpu")
    p.add_argument("--parity-heads", type=int, default=8)
    p.add_argument("--parity-headdim", type=int, default=0, help="0: 128 on cuda, 32 on cpu")
    p.add_argument("--skip-parity", action="store_true")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--skip-single", action="store_true", help="do not time the one-device baseline")
    p.add_argument("--timeout", type=int, default=900, help="process-group timeout (s)")
    p.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)
    if args.summary:
        paths = sorted({f for pat in args.summary for f in (glob.glob(pat) or [pat])})
        reports = []
        for path in paths:
            with open(path) as f:
                reports.append(json.load(f))
        print(summary_table(reports))
        return
    args.parity_seqlen = args.parity_seqlen or (2048 if args.device == "cuda" else 64)
    args.parity_headdim = args.parity_headdim or (128 if args.device == "cuda" else 32)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
        _worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), "env://", args)
        return
    if args.device == "cuda" and torch.cuda.device_count() < args.nprocs:
        raise SystemExit(f"--nprocs {args.nprocs} needs as many GPUs, found {torch.cuda.device_count()}")
    init = f"tcp://127.0.0.1:{_free_port()}"
    mp.spawn(_worker, args=(args.nprocs, init, args), nprocs=args.nprocs, join=True)


if __name__ == "__main__":
    main()
