"""One H200 run of the Gluon Hopper backward (issue 12): correctness first, then speed.

    PYTHONPATH=src python benchmarks/hopper_bwd_run.py [--quick] [--no-bench] [--case-timeout 120]

1. Correctness, stopping at the first failure (exit code 1, the case printed): gradients of
   ``flash_attn_func`` / ``flash_attn_varlen_func`` under ``use_backend("hopper")`` (the Gluon
   forward, then the Gluon backward) against the fp32 oracle with the project's rule
   (:func:`flashtile.testing.compare_with_oracle`: 3x the same-dtype PyTorch error + atol), for
   every option the backend serves: seqlen 1, 17, 113 vs 203 both ways, GQA, causal, windows,
   softcap, varlen with empty and length-1 sequences, every head dim, fp16 and bf16; rows that see
   no key get exactly zero dq (no NaN); ``deterministic=True`` bitwise identical over 20 reruns;
   the default (atomic) mode within tolerance run to run; inputs scaled by 30 give finite
   gradients; ``FLASHTILE_HOPPER_BWD=triton`` still routes to the Triton kernels.
2. Speed, backward alone (``dout, q, k, v, out, lse`` prepared once): TFLOP/s with 2.5x the
   forward's FLOPs (``4 b h s^2 d``, halved when causal), bf16, b * s = 16384, h * d = 2048:
   d 64 / 128 at 1k / 4k / 16k, causal and not; d 256 at 4k (b4 h8); GQA 32/8 at 8k causal with
   and without softcap 30. Contenders: hopper (Gluon), flashtile triton, SDPA flash, SDPA cuDNN
   (``torch.autograd.grad`` of a retained SDPA graph). Then a short table; JSON to ``$OUT`` (else
   benchmarks/results/).

``--quick``: a smaller correctness set and three benchmark cells (about 2 minutes); with
``--full-bench`` the smaller correctness set and the whole benchmark grid.
``--variant block_m=128,dq_chunk=64`` or ``--variant kernel=plain,block_n=64`` (repeatable): a
backward config variant (``HopperBwdConfig`` fields over the cell's default config, every head dim): its
gradients are checked against the default config's on a few shapes, then it gets its own
benchmark column. A watchdog (from ``hopper_run.py``) ends the process (exit code 3) if a case or cell hangs.
``--rounds 5``: the contenders of a cell take turns 5 times, each round starting with the next one (the
median round is reported: an A/B of a few percent); ``--rep-ms 200``: each turn that long.
``--where d=128,causal=1``: only the benchmark cells whose fields match.
``--fwd-bwd``: also forward + backward at 16k (d64 / d128, causal and not) through the public
``flash_attn_func`` against SDPA flash and cuDNN, TFLOP/s (3.5x the forward's FLOPs) and peak memory
of one forward + backward beyond its inputs (``torch.cuda.max_memory_allocated``), same rounds.
``--plans``: the dense backward's launch plans on (``launch_bwd.PLANS``) for the whole run, and first
a check of planned calls: the same signature four times (d64 / d128, causal and not), dK / dV
bitwise equal to the first call's, dQ within the atomics' rounding, the last two through the plan.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))
sys.path.insert(0, HERE)

import hopper_run  # noqa: E402  (log, watchdog, CaseFailure, the varlen oracle)
from hopper_run import CaseFailure, log, watchdog  # noqa: E402

import flashtile  # noqa: E402
from flashtile import flash_attn_func, flash_attn_varlen_func  # noqa: E402
from flashtile.backends import hopper  # noqa: E402
from flashtile.spec import make_call  # noqa: E402
from flashtile.testing import attention_flops, attention_ref, compare_with_oracle, cu_seqlens  # noqa: E402

CASE_TIMEOUT = 180.0


# ------------------------------------------------------------------------------------------
# correctness


def _dense_case(b=2, sq=17, sk=17, h=4, hk=None, d=64, dtype=torch.bfloat16, **opts) -> str:
    hk = hk or h
    q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)

    def fn(q, k, v):
        out, lse, _ = flash_attn_func(q, k, v, return_attn_probs=True, **opts)
        return out, lse

    def oracle(q, k, v, upcast):
        return attention_ref(q, k, v, upcast=upcast, **opts)

    with flashtile.use_backend("hopper"):
        res = compare_with_oracle(fn, oracle, (q, k, v))
    dq = res["grads"][0]
    for i, g in enumerate(res["grads"]):
        if not torch.isfinite(g).all():
            raise CaseFailure(f"grad[{i}] not finite")
    dead = torch.isneginf(res["ref_lse"])  # (b, h, sq): rows that see no key
    if dead.any():
        zero = dq.permute(0, 2, 1, 3)[dead]
        if zero.abs().max().item() != 0:
            raise CaseFailure(f"dq is not 0 on the {int(dead.sum())} rows that see no key")
    return f"ok ({int(dead.sum())} dead rows)"


def _varlen_case(lens_q, lens_k, h=4, hk=None, d=128, dtype=torch.bfloat16, **opts) -> str:
    hk = hk or h
    dev = "cuda"
    q = torch.randn(sum(lens_q), h, d, device=dev, dtype=dtype)
    k = torch.randn(sum(lens_k), hk, d, device=dev, dtype=dtype)
    v = torch.randn(sum(lens_k), hk, d, device=dev, dtype=dtype)
    cq, ck = cu_seqlens(lens_q, dev), cu_seqlens(lens_k, dev)
    call = make_call(headdim=d, **opts)

    def fn(q, k, v):
        out, lse, _ = flash_attn_varlen_func(q, k, v, cq, ck, max(lens_q), max(lens_k), return_attn_probs=True,
                                             **opts)  # fmt: skip
        return out, lse[None]

    def oracle(q, k, v, upcast):
        o, lse = hopper_run._ref(q[None], k[None], v[None], call, lens_q, lens_k, upcast)
        return o[0], lse

    with flashtile.use_backend("hopper"):
        res = compare_with_oracle(fn, oracle, (q, k, v))
    for i, g in enumerate(res["grads"]):
        if not torch.isfinite(g).all():
            raise CaseFailure(f"grad[{i}] not finite")
    return "ok"


def _extreme_case(d=128, scale=30.0, **opts) -> str:
    """Inputs scaled by 30 (logits in the thousands): finite gradients."""
    q, k, v = (torch.randn(2, 257, 4, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    q, k = (x * scale for x in (q, k))
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    with flashtile.use_backend("hopper"):
        out = flash_attn_func(q, k, v, **opts)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    for name, g in zip(("dq", "dk", "dv"), grads, strict=True):
        if not torch.isfinite(g).all():
            raise CaseFailure(f"{name} not finite")
    return "finite"


def _deterministic_case(d=128, reruns=20) -> str:
    """deterministic=True: dq, dk, dv bitwise identical over ``reruns`` backward calls; the default
    (atomic dQ) mode: within tolerance of the deterministic one."""
    from flashtile.backends.hopper import launch, launch_bwd

    q = torch.randn(2, 1000, 8, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 1100, 2, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(2, 1100, 2, d, device="cuda", dtype=torch.bfloat16)
    call = make_call(headdim=d, causal=True, deterministic=True)
    out, lse = launch.forward(q, k, v, call)
    dout = torch.randn_like(out)
    first = launch_bwd.backward(dout, q, k, v, out, lse, call)
    for _ in range(reruns - 1):
        again = launch_bwd.backward(dout, q, k, v, out, lse, call)
        for name, a, b in zip(("dq", "dk", "dv"), first, again, strict=True):
            if not torch.equal(a, b):
                raise CaseFailure(f"deterministic=True: {name} differs between reruns")
    fast = launch_bwd.backward(dout, q, k, v, out, lse, make_call(headdim=d, causal=True))
    worst = 0.0
    for name, a, b in zip(("dq", "dk", "dv"), first, fast, strict=True):
        err = (a.float() - b.float()).abs().max().item()
        scale = b.float().abs().max().item()
        worst = max(worst, err / max(scale, 1e-6))
        if err > 2e-2 * max(scale, 1.0):
            raise CaseFailure(f"atomic vs deterministic {name}: max diff {err:.3e} (max |x| {scale:.3e})")
    return f"bitwise identical x{reruns}; atomic mode within {worst:.1e} (relative)"


def _triton_switch_case() -> str:
    """FLASHTILE_HOPPER_BWD=triton routes the backward to the Triton kernels (same gradients)."""
    q, k, v = (torch.randn(1, 300, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))  # fmt: skip
    grads = {}
    for mode in ("gluon", "triton"):
        os.environ[hopper.BWD_ENV] = mode
        try:
            with flashtile.use_backend("hopper"):
                out = flash_attn_func(q, k, v, causal=True)
            grads[mode] = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        finally:
            os.environ[hopper.BWD_ENV] = "gluon"
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(grads["gluon"], grads["triton"], strict=True))
    big = max(b.float().abs().max().item() for b in grads["triton"])
    if diff > 2e-2 * max(big, 1.0):
        raise CaseFailure(f"gluon vs triton backward differ by {diff:.3e} (max |grad| {big:.3e})")
    return f"gluon vs triton max diff {diff:.2e}"


def correctness_cases(quick: bool) -> list[tuple[str, object, dict]]:
    fp = torch.float16
    D, V = _dense_case, _varlen_case
    cases = [
        ("seqlen 17 d64", D, dict(sq=17, sk=17, d=64)),
        ("113 q vs 203 k d128", D, dict(sq=113, sk=203, d=128)),
        ("203 q vs 113 k causal d128 (dead rows)", D, dict(sq=203, sk=113, d=128, causal=True)),
        ("GQA 8/2 causal fp16 d128", D, dict(sq=203, sk=203, h=8, hk=2, d=128, causal=True, dtype=fp)),
        ("window (32, 8) d64", D, dict(sq=300, sk=300, d=64, window_size=(32, 8))),
        ("softcap 30 d128", D, dict(sq=203, sk=203, d=128, softcap=30.0)),
        ("varlen empty/len-1 causal d128", V, dict(lens_q=[0, 1, 17, 130, 0, 300], lens_k=[5, 0, 40, 130, 3, 257],
                                                   causal=True)),
        ("d256 causal", D, dict(sq=300, sk=300, h=2, d=256, causal=True)),
        ("inputs x30 causal d128", _extreme_case, dict(causal=True)),
        ("inputs x30 softcap 30 d64", _extreme_case, dict(d=64, softcap=30.0)),
        ("deterministic x20 + atomic mode", _deterministic_case, {}),
    ]  # fmt: skip
    if quick:
        return cases
    cases += [
        ("seqlen 1 d128", D, dict(sq=1, sk=1, d=128)),
        ("seqlen 1 q vs 203 k causal", D, dict(sq=1, sk=203, d=64, causal=True)),
        ("203 q vs 113 k d64", D, dict(sq=203, sk=113, d=64)),
        ("113 q vs 203 k causal d64 fp16", D, dict(sq=113, sk=203, d=64, causal=True, dtype=fp)),
        ("MQA 8/1 window (-1, 16) d64", D, dict(sq=113, sk=203, h=8, hk=1, d=64, window_size=(-1, 16))),
        ("window (0, 0) sq > sk (dead rows)", D, dict(sq=203, sk=113, d=128, window_size=(0, 0))),
        ("window (64, -1) d128", D, dict(sq=300, sk=257, d=128, window_size=(64, -1))),
        ("causal + softcap fp16 d64", D, dict(sq=300, sk=300, d=64, causal=True, softcap=5.0, dtype=fp)),
        ("window + softcap d128", D, dict(sq=113, sk=203, d=128, window_size=(40, 3), softcap=20.0)),
        ("varlen none d64", V, dict(lens_q=[7, 128, 1, 255], lens_k=[300, 128, 1, 31], d=64)),
        ("varlen window fp16", V, dict(lens_q=[129, 0, 64, 200], lens_k=[129, 9, 1, 150], window_size=(20, 5),
                                       dtype=fp)),
        ("varlen softcap GQA 6/2 d64", V, dict(lens_q=[50, 260], lens_k=[70, 255], h=6, hk=2, d=64, softcap=10.0)),
        ("d96 causal", D, dict(sq=300, sk=300, d=96, causal=True)),
        ("d96 fp16 17", D, dict(sq=17, sk=17, d=96, dtype=fp)),
        ("d192 causal", D, dict(sq=300, sk=300, h=2, d=192, causal=True)),
        ("d192 varlen fp16", V, dict(lens_q=[1, 200, 33], lens_k=[1, 199, 300], d=192, dtype=fp)),
        ("d256 window fp16", D, dict(sq=203, sk=300, h=2, d=256, window_size=(50, 50), dtype=fp)),
        ("d256 GQA 4/2 softcap", D, dict(sq=130, sk=257, h=4, hk=2, d=256, softcap=20.0)),
        ("d64 long causal", D, dict(b=1, sq=1024, sk=1024, h=2, d=64, causal=True)),
        ("d128 long", D, dict(b=1, sq=1000, sk=1500, h=2, d=128)),
        ("FLASHTILE_HOPPER_BWD=triton switch", _triton_switch_case, {}),
    ]  # fmt: skip
    return cases


def _variant_case(overrides: dict) -> str:
    """A config variant's gradients against the default config's (checked against the oracle
    above) on a few shapes: within 1e-2 of the largest gradient."""
    from flashtile.backends.hopper import configs, launch, launch_bwd

    # (the last: window (0, 0) with 113 queries against 300 keys, key blocks with 0, 2 and 1 query
    # blocks: programs whose loop runs no / one iteration, e.g. for nbar's barrier counts)
    shapes = [(2, 203, 300, 4, 2, 128, dict(causal=True)), (1, 300, 300, 2, 2, 64, dict(softcap=20.0)),
              (1, 257, 203, 2, 2, 256, dict(window_size=(50, 8))), (2, 130, 130, 4, 4, 96, {}),
              (1, 113, 300, 2, 2, 128, dict(window_size=(0, 0))), (2, 333, 200, 8, 2, 128, {})]  # fmt: skip
    done = []
    for b, sq, sk, h, hk, d, opts in shapes:
        cfg = configs.bwd_config(d, **overrides)
        if configs.bwd_check(cfg, d):
            continue
        q = torch.randn(b, sq, h, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, sk, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        call = make_call(headdim=d, **opts)
        out, lse = launch.forward(q, k, v, call)
        dout = torch.randn_like(out)
        ref = launch_bwd.backward(dout, q, k, v, out, lse, call)
        got = launch_bwd.backward(dout, q, k, v, out, lse, call, config=cfg)
        for name, a, r in zip(("dq", "dk", "dv"), got, ref, strict=True):
            err, big = (a.float() - r.float()).abs().max().item(), r.float().abs().max().item()
            if not err <= 1e-2 * max(big, 1.0):
                raise CaseFailure(f"d={d} {opts} {name}: differs from the default config by {err:.3e}")
        done.append(d)
    return f"matches the default config at head dims {done}"


def run_correctness(quick: bool) -> bool:
    for name, fn, kw in correctness_cases(quick):
        t = time.time()
        try:
            with watchdog(CASE_TIMEOUT, name):
                msg = fn(**kw)
        except (CaseFailure, AssertionError) as e:
            log(f"FAIL {name} ({kw}): {str(e)[:2000]}")
            return False
        log(f"PASS {name}: {msg} ({time.time() - t:.1f} s)")
    return True


# ------------------------------------------------------------------------------------------
# speed


def bench_cells(quick: bool) -> list[tuple[int, int, int, int, int, bool, float]]:
    """(b, h, hk, s, d, causal, softcap) cells."""
    if quick:
        return [(4, 16, 16, 4096, 128, False, 0.0), (4, 16, 16, 4096, 128, True, 0.0), (4, 8, 8, 4096, 256, True, 0.0)]
    cells = []
    for d in (64, 128):
        for s in (1024, 4096, 16384):
            for causal in (False, True):
                cells.append((16384 // s, 2048 // d, 2048 // d, s, d, causal, 0.0))
    cells += [(4, 8, 8, 4096, 256, False, 0.0), (4, 8, 8, 4096, 256, True, 0.0)]
    cells += [(2, 32, 8, 8192, 128, True, 0.0), (2, 32, 8, 8192, 128, True, 30.0)]
    return cells


def _contenders(b, h, hk, s, d, causal, softcap, variants=()) -> dict:
    """name -> zero-argument function running one backward of that contender."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashtile.backends.hopper import launch as hlaunch
    from flashtile.backends.hopper import launch_bwd
    from flashtile.backends.triton import launch as tlaunch

    dt = torch.bfloat16
    q = torch.randn(b, s, h, d, device="cuda", dtype=dt)
    k, v = (torch.randn(b, s, hk, d, device="cuda", dtype=dt) for _ in range(2))
    call = make_call(headdim=d, causal=causal, softcap=softcap)
    out, lse = hlaunch.forward(q, k, v, call)
    dout = torch.randn_like(out)
    from flashtile.backends.hopper import configs

    fns = {"hopper": lambda: launch_bwd.backward(dout, q, k, v, out, lse, call)}
    for label, ov in variants:
        cfg = configs.bwd_config(d, causal, **ov)  # (over the cell's default: the masked table's if causal)
        if not configs.bwd_check(cfg, d):
            fns[f"hopper{label}"] = lambda cfg=cfg: launch_bwd.backward(dout, q, k, v, out, lse, call, config=cfg)
    fns["triton"] = lambda: tlaunch.backward(dout, q, k, v, out, lse, call)
    if softcap:
        return fns  # SDPA has no softcap

    def sdpa(backend):
        qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
        with sdpa_kernel(backend):
            o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=h != hk)
        do = dout.transpose(1, 2)
        return lambda: torch.autograd.grad(o, (qt, kt, vt), do, retain_graph=True)

    for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        try:
            fns[name] = sdpa(backend)
        except Exception as e:  # e.g. a backend that does not take GQA
            log(f"{name} unavailable at b{b} h{h}/{hk} s{s} d{d}: {type(e).__name__}: {str(e)[:120]}")
    return fns


def _fwd_bwd_contenders(b, h, s, d, causal) -> tuple[dict, list]:
    """name -> zero-argument function running one forward + backward (fresh gradients each call, the
    inputs requiring grad): ``flash_attn_func`` on the hopper backend, SDPA flash, SDPA cuDNN."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashtile import dispatch

    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    dout = torch.randn_like(q)

    def ours():
        with dispatch.use_backend("hopper"):
            o = flash_attn_func(q, k, v, causal=causal)
        return torch.autograd.grad(o, (q, k, v), dout)

    fns = {"hopper": ours}
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    dt = dout.transpose(1, 2)

    def sdpa(backend):
        def fn():
            with sdpa_kernel(backend):
                o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
            return torch.autograd.grad(o, (qt, kt, vt), dt)

        return fn

    fns["sdpa_flash"] = sdpa(SDPBackend.FLASH_ATTENTION)
    fns["sdpa_cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
    return fns, [q, k, v, qt, kt, vt, dout]


def _peak_mib(fn) -> float:
    """Peak memory of one call beyond what was allocated before it (MiB)."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _time_row(row: dict, fns: dict, flops: float, rounds: int, rep_ms: int, what: str) -> None:
    """``row[name]``: the median TFLOP/s of each contender of ``fns`` over ``rounds`` rotated turns
    (:func:`hopper_run.timed_rounds`; ``rep_ms`` ms each, by default ``100 / rounds`` and at least 20),
    None for one that failed; with ``rounds > 1`` also ``row[name + "_rounds"]``, every round's figure."""
    import statistics

    runs = hopper_run.timed_rounds(fns, rounds, rep_ms or max(20, 100 // rounds), what, CASE_TIMEOUT)
    for name, ms in runs.items():
        vals = [flops / (t * 1e-3) / 1e12 for t in ms or ()]
        row[name] = round(statistics.median(vals), 1) if vals else None
        if vals and rounds > 1:
            row[f"{name}_rounds"] = [round(v, 1) for v in vals]


def run_fwd_bwd(rounds: int = 1, rep_ms: int = 0) -> list[dict]:
    """Forward + backward at 16k tokens (b1, h x d = 2048), d64 / d128, causal and not: TFLOP/s (3.5x
    the forward's FLOPs; rounds as :func:`run_bench`) and peak MiB of one call, per contender."""
    rows = []
    for d in (64, 128):
        for causal in (False, True):
            b, h, s = 1, 2048 // d, 16384
            row = dict(b=b, h=h, s=s, d=d, causal=causal)
            flops = attention_flops(b, h, s, d, causal, mode="fwd_bwd")
            fns, _keep = _fwd_bwd_contenders(b, h, s, d, causal)
            for name, fn in list(fns.items()):
                try:
                    with watchdog(CASE_TIMEOUT, f"fwd+bwd peak {name} {row}"):
                        row[f"{name}_peak_mib"] = round(_peak_mib(fn), 1)
                except Exception as e:  # noqa: BLE001
                    log(f"{name} fwd+bwd failed at {row}: {type(e).__name__}: {str(e)[:200]}")
                    fns.pop(name)
            _time_row(row, fns, flops, rounds, rep_ms, f"fwd+bwd {row}")
            log("fwd+bwd " + " ".join(f"{k}={v}" for k, v in row.items() if not k.endswith("_rounds")))
            rows.append(row)
            del fns, _keep
            torch.cuda.empty_cache()
    return rows


def _kernel_times(fn, calls: int = 5) -> list[tuple[str, float]]:
    """GPU time per call of each kernel ``fn`` launches (torch.profiler), largest first: where a
    backward's time goes (the main kernel against the passes around it)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    tot: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            tot[ev.name[:60]] = tot.get(ev.name[:60], 0.0) + ev.device_time / calls
    return sorted(tot.items(), key=lambda kv: -kv[1])


def run_breakdown() -> list[dict]:
    """Per-kernel GPU time of our backward and cuDNN's at d128 / d64, 4k and 16k."""
    out = []
    cells = [(4, 16, 16, 4096, 128, False, 0.0), (1, 16, 16, 16384, 128, False, 0.0),
             (4, 16, 16, 4096, 128, True, 0.0), (4, 32, 32, 4096, 64, False, 0.0)]  # fmt: skip
    for b, h, hk, s, d, causal, softcap in cells:
        fns = _contenders(b, h, hk, s, d, causal, softcap)
        for name in ("hopper", "sdpa_cudnn"):
            if name not in fns:
                continue
            with watchdog(CASE_TIMEOUT, f"breakdown {name}"):
                ks = _kernel_times(fns[name])
            total = sum(t for _, t in ks)
            log(f"breakdown b{b} h{h} s{s} d{d} causal={causal} {name}: total {total:.1f} us: "
                + "; ".join(f"{n} {t:.1f}" for n, t in ks[:6]))  # fmt: skip
            out.append(dict(b=b, h=h, s=s, d=d, causal=causal, name=name, total_us=total, kernels=ks[:8]))
        torch.cuda.empty_cache()
    return out


def _cell_matches(cell: dict, where: str) -> bool:
    """Whether a cell matches ``--where`` (``d=128,causal=1``: every field equal; empty: all)."""
    for kv in filter(None, where.split(",")):
        k, v = (x.strip() for x in kv.split("="))
        if float(cell[k]) != float(v):
            return False
    return True


def run_bench(quick: bool, variants=(), rounds: int = 1, where: str = "", rep_ms: int = 0) -> list[dict]:
    """TFLOP/s per cell and contender. ``rounds`` > 1: the contenders take turns ``rounds`` times
    (each a ``do_bench`` of ``rep_ms`` ms, by default ``100 / rounds``, at least 20; round ``r`` starts
    with the ``r``-th contender, so that no contender always runs first after another's load), and the
    median round is reported, so that a clock or neighbour drift during a cell falls on every contender
    alike."""
    rows = []
    for b, h, hk, s, d, causal, softcap in bench_cells(quick):
        row = {"b": b, "h": h, "hk": hk, "s": s, "d": d, "causal": causal, "softcap": softcap}
        if not _cell_matches(row, where):
            continue
        flops = attention_flops(b, h, s, d, causal, mode="bwd")
        _time_row(row, _contenders(b, h, hk, s, d, causal, softcap, variants), flops, rounds, rep_ms, str(row))
        log("bench " + " ".join(f"{k}={v}" for k, v in row.items() if not k.endswith("_rounds")))
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


def _value(text: str) -> int | str:
    """A config field's value from the command line: an int, or a string (``kernel=ws``)."""
    text = text.strip()
    return int(text) if text.lstrip("-").isdigit() else text


def _geo(rows: list[dict], a: str, b: str) -> str:
    r = [x[a] / x[b] for x in rows if x.get(a) and x.get(b)]
    return f"{math.exp(sum(map(math.log, r)) / len(r)):.2f}x" if r else "n/a"


def patch_table(text: str) -> None:
    """Apply ``k=v,...`` overrides to the backward table itself (``configs._BWD_TABLE``), at every
    head dim where the config stays valid (``--table``; ``ncu_case.py --bwd-set``)."""
    from dataclasses import replace

    from flashtile.backends.hopper import configs

    ov = {kv.split("=")[0].strip(): _value(kv.split("=")[1]) for kv in text.split(",")}
    for d, cfg in list(configs._BWD_TABLE.items()):
        if not configs.bwd_check(replace(cfg, **ov), d):
            configs._BWD_TABLE[d] = replace(cfg, **ov)


def check_plans() -> str:
    """Planned dense backward calls (``launch_bwd.PLANS``) against the first, unplanned call."""
    from flashtile.backends.hopper import launch as HL
    from flashtile.backends.hopper import launch_bwd

    HL.clear_plans()
    for d, causal in ((64, False), (128, False), (128, True)):
        q, k, v = (torch.randn(2, 1000, h, d, device="cuda", dtype=torch.bfloat16) for h in (8, 2, 2))
        call = make_call(headdim=d, causal=causal)
        out, lse = HL.forward(q, k, v, call)
        dout = torch.randn_like(out)
        grads = [launch_bwd.backward(dout, q, k, v, out, lse, call) for _ in range(4)]
        plans = [p for key, p in HL._PLANS.items() if key[0] == "bwd" and p[0] is call]
        if len(plans) != 1 or not callable(plans[0][1]):
            raise AssertionError(f"d{d} causal={causal}: no prepared plan ({plans})")
        for g in grads[1:]:
            if not (torch.equal(g[1], grads[0][1]) and torch.equal(g[2], grads[0][2])):
                raise AssertionError(f"d{d} causal={causal}: dk / dv of a repeated call differ from the first")
            err = ((g[0].float() - grads[0][0].float()).abs().max() / grads[0][0].float().abs().max()).item()
            if err > 1e-2:
                raise AssertionError(f"d{d} causal={causal}: dq of a repeated call off by {err:.2e} (relative)")
    return "dk / dv bitwise, dq within 1e-2 over 4 calls (the last two planned)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer correctness cases, three benchmark cells")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--full-bench", action="store_true", help="the whole benchmark grid even with --quick")
    ap.add_argument("--variant", action="append", default=[], help="bwd config overrides, e.g. block_m=128,dq_chunk=64")
    ap.add_argument("--case-timeout", type=float, default=CASE_TIMEOUT, help="watchdog per case / cell (s)")
    ap.add_argument("--breakdown", action="store_true", help="per-kernel GPU time of ours and cuDNN's (profiler)")
    ap.add_argument("--fwd-bwd", action="store_true", help="also forward + backward at 16k with peak memory")
    ap.add_argument("--plans", action="store_true", help="the dense backward's launch plans on (checked first)")
    ap.add_argument("--table", default="", help="overrides applied to the backward table itself before the "
                    "correctness cases (every head dim where the config stays valid), e.g. stat_ring=1,fold=1")
    ap.add_argument("--rounds", type=int, default=1, help="contenders take turns this many times per cell "
                    "(median round reported)")
    ap.add_argument("--rep-ms", type=int, default=0, help="do_bench's time per contender and round (ms; "
                    "default 100 / rounds, at least 20): longer rounds for a cell of a few ms")
    ap.add_argument("--where", default="", help="benchmark only cells whose fields match, e.g. d=128,causal=1")
    args = ap.parse_args()
    os.environ[hopper.BWD_ENV] = "gluon"  # the kernels under test (the backend's default is Triton's)
    hopper.SMALL_ROWS = 0  # small checks run the Gluon forward too (not the launch-bound Triton route)
    globals()["CASE_TIMEOUT"] = args.case_timeout
    import triton

    log(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    reason = hopper.backend.available()
    if reason:
        log(f"FAIL hopper backend unavailable: {reason}")
        return 1
    from flashtile.backends.hopper import configs

    if args.table:
        patch_table(args.table)
    if args.plans:
        from flashtile.backends.hopper import launch_bwd

        launch_bwd.PLANS = True
        try:
            with watchdog(CASE_TIMEOUT, "plans"):
                log(f"PASS plans: {check_plans()}")
        except Exception as e:  # noqa: BLE001
            log(f"FAIL plans: {type(e).__name__}: {str(e)[:1000]}")
            return 1
    log(f"backward configs: {', '.join(f'd={d}: {configs.bwd_config(d)}' for d in configs.HEADDIMS)}")
    try:
        ok = run_correctness(args.quick)
    except Exception:  # a compile or launch error is a failure too; show it whole
        import traceback

        traceback.print_exc()
        ok = False
    if not ok:
        log("correctness FAILED: no benchmark")
        return 1
    log("correctness: all PASS")
    variants = []
    for text in args.variant:
        ov = {kv.split("=")[0].strip(): _value(kv.split("=")[1]) for kv in text.split(",")}
        try:
            with watchdog(CASE_TIMEOUT, f"variant {text}"):
                log(f"PASS variant [{text}]: {_variant_case(ov)}")
            variants.append((f"[{text}]", ov))
        except Exception as e:  # a failing variant is dropped, the default still benchmarks
            log(f"FAIL variant [{text}] (dropped): {type(e).__name__}: {str(e)[:1000]}")
    breakdown = run_breakdown() if args.breakdown else None
    fwd_bwd = run_fwd_bwd(args.rounds, args.rep_ms) if args.fwd_bwd else None
    if args.no_bench and not breakdown and not fwd_bwd:
        return 0
    rows = [] if args.no_bench else run_bench(args.quick and not args.full_bench, variants, args.rounds, args.where,
                                              args.rep_ms)
    names = ["hopper"] + [f"hopper{lb}" for lb, _ in variants] + ["triton", "sdpa_flash", "sdpa_cudnn"]
    print("\nTFLOP/s (bf16 backward alone, 2.5x forward FLOPs)")
    print(f"{'b':>3} {'h':>3} {'hk':>3} {'s':>6} {'d':>4} {'causal':>6} {'cap':>4} "
          + " ".join(f"{n:>{max(10, len(n))}}" for n in names) + "  hopper/cudnn")  # fmt: skip
    for r in rows:
        vals = " ".join(f"{('-' if r.get(n) is None else r[n]):>{max(10, len(n))}}" for n in names)
        ratio = f"{r['hopper'] / r['sdpa_cudnn']:.2f}" if r.get("hopper") and r.get("sdpa_cudnn") else "-"
        print(f"{r['b']:>3} {r['h']:>3} {r['hk']:>3} {r['s']:>6} {r['d']:>4} {str(r['causal']):>6} "
              f"{r['softcap']:>4g} {vals}  {ratio:>12}")  # fmt: skip
    if fwd_bwd:
        print("\nforward + backward, TFLOP/s (3.5x forward FLOPs) and peak MiB beyond the inputs")
        for r in fwd_bwd:
            cols = (f"{n} {r.get(n, '-')} ({r.get(n + '_peak_mib', '-')} MiB)" for n in ("hopper", "sdpa_flash",
                                                                                         "sdpa_cudnn"))
            print(f"d{r['d']} s{r['s']} causal={r['causal']}: " + "; ".join(cols))
    out_dir = os.environ.get("OUT") or os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "hopper_bwd_run.json")
    with open(path, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "argv": sys.argv, "configs": {d: str(configs.bwd_config(d)) for d in configs.HEADDIMS},
                   "rows": rows, "breakdown": breakdown, "fwd_bwd": fwd_bwd,
                   "date": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=1)  # fmt: skip
    log(f"wrote {path}")
    log(f"done in {time.time() - hopper_run.T0:.0f} s; geomean hopper/triton {_geo(rows, 'hopper', 'triton')}, "
        f"hopper/cudnn {_geo(rows, 'hopper', 'sdpa_cudnn')}, hopper/flash {_geo(rows, 'hopper', 'sdpa_flash')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
