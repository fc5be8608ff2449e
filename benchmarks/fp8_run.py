"""One H200 run of the FP8 (e4m3) forward of the Hopper backend: correctness first, then speed.

    PYTHONPATH=src python benchmarks/fp8_run.py [--quick [--full-bench]] [--no-bench] [--headdim 64]
        [--variant num_stages=3] [--case-timeout 180]

1. Correctness of ``flashtile.backends.hopper.launch.forward_fp8`` (called directly, so short
   query lengths are not routed to the decode path) on small odd shapes: seqlen 1 and 17, 113 vs
   203 both ways, GQA 8/2 and MQA, causal (with rows that see no key), windows, softcap, varlen
   with empty and length-1 sequences, every head dim, descales per (batch, KV head), one scale
   ``(1, 1)`` and None. Oracle: ``flashtile.testing.attention_ref`` in float32 on the dequantised
   inputs; bound: ``flashtile.testing.fp8_error_bound(quantized_p=True)`` elementwise (bf16
   output rounding, e4m3 rounding of P: ``2^-4 (P |V|)`` plus a subnormal term); lse within
   ``5e-3 + 5e-4 |lse|``, ``-inf`` exactly where the oracle has it, out 0 there, no NaN. The
   table's config stops at its first failure, naming the case (exit status 1 at the end, its
   benchmark column dropped); each ``--variant k=v[,k=v]`` (FP8 config fields: ``num_stages``,
   ``cvt_asm``, ``row_tree``, ``skip_rescale``, ...) is checked on :func:`variant_cases` first and
   dropped if one fails, so one run compares code paths (a ``d=64`` key: that head dim only).
   Then the public API (``auto`` picks hopper; a backward raises) and an accuracy table: RMSE
   against fp32 attention on the original inputs,
   Gaussian and with 0.1% outliers of magnitude 10-100 in q and k, for bf16 (hopper), FP8
   per-head scales, and FP8 after incoherent processing (``flashtile.fp8.rotate_qk``).
2. Speed: batch * seqlen = 16384 tokens, nheads * headdim = 2048, head dims 64 / 128 / 256,
   seqlen 1k / 4k / 16k, causal and not: hopper FP8 (the V transpose pre-pass included) vs hopper
   bf16 vs SDPA cuDNN bf16; TFLOP/s = 4 b h s^2 d / t (halved when causal), the bf16 count for
   all (``--headdim 96`` etc.: the full grid at those head dims instead). ``--quick``: d=128 at 4k
   and 16k, d=256 and d=64 at 16k. A short table last; JSON to
   ``$OUT/fp8_run.json`` when ``$OUT`` is set, else ``benchmarks/results/``. ``--clocks``: per contender
   also the SM clock and board power while it ran, and its share of the dense tensor peak at that clock.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import hopper_run  # noqa: E402  (log, watchdog, CaseFailure)

import flashtile  # noqa: E402
from flashtile import dispatch, fp8  # noqa: E402
from flashtile.backends import hopper  # noqa: E402
from flashtile.spec import Problem, make_call  # noqa: E402
from flashtile.testing import attention_ref, fp8_dequantized, fp8_error_bound, fp8_score_error_bound  # noqa: E402

E4M3 = torch.float8_e4m3fn
DEV = "cuda"  # the correctness cases' device (a CPU dry run of the script's checks sets "cpu")
T0 = time.time()
CASE_TIMEOUT = 180.0


log, watchdog, CaseFailure = hopper_run.log, hopper_run.watchdog, hopper_run.CaseFailure


def _inputs(b, sq, sk, h, hk, d, kind, dev, lens=None):
    """FP8 q, k, v (quantised Gaussians of different magnitudes) on the internal layout, descales."""
    if lens is not None:
        tq, tk = sum(lens[0]), sum(lens[1])
        shapes = [(tq, h, d), (tk, hk, d), (tk, hk, d)]
    else:
        shapes = [(b, sq, h, d), (b, sk, hk, d), (b, sk, hk, d)]
    q, k, v = (torch.randn(s, device=dev) * m for s, m in zip(shapes, (3.0, 1.0, 2.0), strict=True))
    cu = None
    if lens is not None:
        cu = [torch.tensor([0, *torch.tensor(ls).cumsum(0).tolist()], dtype=torch.int32, device=dev) for ls in lens]
    if kind == "none":
        return q.to(E4M3), k.to(E4M3), v.to(E4M3), None, None, None, cu
    gran = "tensor" if kind == "scalar" else "head"
    kw = dict(cu_seqlens_q=cu[0], cu_seqlens_k=cu[1]) if cu else {}
    q8, k8, v8, qd, kd, vd = fp8.quantize(q, k, v, granularity=gran, **kw)
    if kind == "scalar":
        qd, kd, vd = (x[:1, :1].clone() for x in (qd, kd, vd))
    return q8, k8, v8, qd, kd, vd, cu


def _sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def _check_dense(out, lse, q8, k8, v8, qd, kd, vd, opts, what="", rounded_to=None):
    """``rounded_to``: the dtype the path under test computes the dequantised inputs in (the FP8
    varlen calls' upcast: ``fp8.compute_dtype``), so that the oracle sees the same inputs."""
    qf, kf, vf = fp8_dequantized(q8, qd), fp8_dequantized(k8, kd), fp8_dequantized(v8, vd)
    if rounded_to is not None:
        qf, kf, vf = (x.to(rounded_to).float() for x in (qf, kf, vf))
    ref, ref_lse = attention_ref(qf, kf, vf, **opts)
    bound = fp8_error_bound(qf, kf, vf, quantized_p=True, **opts)
    o = out.float()
    if torch.isnan(o).any() or torch.isnan(lse).any():
        raise CaseFailure(f"{what}NaN in out or lse")
    dead = torch.isneginf(ref_lse)
    if not torch.equal(torch.isneginf(lse), dead):
        raise CaseFailure(f"{what}lse -inf at {int(torch.isneginf(lse).sum())} rows, oracle at {int(dead.sum())}")
    if dead.any() and o.permute(0, 2, 1, 3)[dead].abs().max() != 0:
        raise CaseFailure(f"{what}out is not 0 on rows that see no key")
    excess = float((( o - ref).abs() - bound).max())
    fin = ~dead
    lse_bound = 5e-3 + 5e-4 * ref_lse.abs() + fp8_score_error_bound(qf, kf, opts.get("softmax_scale"))
    lse_err = float(((lse - ref_lse).abs() - lse_bound)[fin].max()) if fin.any() else -1.0
    err = float((o - ref).abs().max())
    if excess > 0 or lse_err > 0:
        raise CaseFailure(f"{what}out err {err:.3e} exceeds the bound by {excess:.3e}; lse excess {lse_err:.3e}")
    return err


def run_case(name, *, b=2, sq=17, sk=17, h=4, hk=None, d=128, causal=False, window=(-1, -1), softcap=0.0,
             kind="head", lens=None, overrides=None) -> str:  # fmt: skip
    from flashtile.backends.hopper import configs, launch

    cfg = configs.fp8_config(d, **overrides) if overrides else None

    hk = hk or h
    dev = torch.device(DEV)
    q8, k8, v8, qd, kd, vd, cu = _inputs(b, sq, sk, h, hk, d, kind, dev, lens)
    opts = dict(causal=causal, window_size=window, softcap=softcap)
    ds = dict(q_descale=qd, k_descale=kd, v_descale=vd)
    if lens is not None:
        nseq = len(lens[0])
        ds = {n: None if x is None else x.expand(nseq, hk) for n, x in ds.items()}
        call = make_call(headdim=d, causal=causal, window_size=window, softcap=softcap, cu_seqlens_q=cu[0],
                         cu_seqlens_k=cu[1], max_seqlen_q=max(lens[0]), max_seqlen_k=max(lens[1]), **ds)  # fmt: skip
        # varlen through the backend (the FP8 kernel is dense-only so far: the backend runs the bf16
        # Gluon kernel on dequantised inputs; the FP8 kernel's varlen path hit an illegal instruction)
        out, lse = hopper.backend.forward(q8[None], k8[None], v8[None], call)
        _sync()
        errs = []
        cq, ck = cu[0].tolist(), cu[1].tolist()
        for i in range(nseq):
            if lens[0][i] == 0:
                continue
            sl_q, sl_k = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
            pick = lambda x, i=i: None if x is None else x[i : i + 1]  # noqa: E731
            if lens[1][i] == 0:
                if out[0, sl_q].float().abs().max() != 0 or not torch.isneginf(lse[0, :, sl_q]).all():
                    raise CaseFailure(f"seq {i}: no keys, but out != 0 or lse != -inf")
                continue
            errs.append(_check_dense(out[:, sl_q], lse[:, :, sl_q], q8[sl_q][None], k8[sl_k][None], v8[sl_k][None],
                                     pick(ds["q_descale"]), pick(ds["k_descale"]), pick(ds["v_descale"]), opts,
                                     f"seq {i}: ", fp8.compute_dtype(dev)))  # fmt: skip
        err = max(errs) if errs else 0.0
    else:
        call = make_call(headdim=d, causal=causal, window_size=window, softcap=softcap,
                         **{n: None if x is None else x.expand(b, hk) for n, x in ds.items()})  # fmt: skip
        out, lse = launch.forward_fp8(q8, k8, v8, call, config=cfg)
        _sync()
        if out.dtype != torch.bfloat16:
            raise CaseFailure(f"out dtype {out.dtype}, expected bfloat16")
        err = _check_dense(out, lse, q8, k8, v8, qd, kd, vd, opts)
    return f"max err {err:.3e} (within the bound)"


def correctness_cases(quick: bool) -> list[tuple[str, dict]]:
    cases = [
        ("seqlen 1", dict(sq=1, sk=1)),
        ("113 q vs 203 k", dict(sq=113, sk=203)),
        ("203 q vs 113 k causal (dead rows)", dict(sq=203, sk=113, causal=True)),
        ("GQA 8/2 causal, one scale (1, 1)", dict(sq=203, sk=203, h=8, hk=2, causal=True, kind="scalar")),
        ("window (32, 8) d=64", dict(sq=300, sk=300, d=64, window=(32, 8))),
        ("softcap 30, no descales", dict(sq=203, sk=203, softcap=30.0, kind="none")),
        ("varlen empty/len-1 causal", dict(lens=([0, 1, 17, 130, 0, 300], [5, 0, 40, 130, 3, 257]), causal=True)),
        ("d=256 causal", dict(sq=300, sk=300, d=256, causal=True)),
    ]
    if quick:
        return cases
    return cases + [
        ("seqlen 17 d=64", dict(sq=17, sk=17, d=64)),
        ("MQA 8/1 window (-1, 16) d=64", dict(sq=113, sk=203, h=8, hk=1, d=64, window=(-1, 16))),
        ("causal + softcap d=64", dict(sq=300, sk=300, d=64, causal=True, softcap=5.0)),
        ("varlen softcap GQA d=64", dict(lens=([50, 260], [70, 255]), h=6, hk=2, d=64, softcap=10.0)),
        ("d=96 causal", dict(sq=300, sk=300, d=96, causal=True)),
        ("d=192 varlen", dict(lens=([1, 200, 33], [1, 199, 300]), d=192)),
        ("d=256 window", dict(sq=203, sk=300, d=256, window=(50, 50), kind="scalar")),
        ("d=128 long", dict(b=1, sq=1000, sk=1500, h=2)),
    ]


def variant_cases() -> list[tuple[str, dict]]:
    """A ``--variant``'s correctness cases: one per kernel specialisation its benchmark cells run
    (d128 plain and causal, d256 and d64 plain), with odd lengths, dead rows, GQA and a (1, 1) scale."""
    return [
        ("113 q vs 203 k", dict(sq=113, sk=203)),
        ("203 q vs 113 k causal (dead rows), GQA 4/2", dict(sq=203, sk=113, h=4, hk=2, causal=True)),
        ("GQA 8/2 causal, one scale (1, 1)", dict(sq=203, sk=203, h=8, hk=2, causal=True, kind="scalar")),
        ("d=256 300 q vs 203 k", dict(sq=300, sk=203, d=256)),
        ("d=64 GQA 8/2 113 q vs 203 k", dict(sq=113, sk=203, h=8, hk=2, d=64)),
    ]


SKIP: list[str] = []  # set from --skip
HEADDIMS: list[int] | None = None  # set from --headdim
_for_headdim = hopper_run.for_headdim


def run_correctness(quick: bool, overrides: dict | None = None, label: str = "default", cases=None) -> bool:
    from flashtile.backends.hopper import configs

    for name, kw in cases if cases is not None else correctness_cases(quick):
        if any(part in name for part in SKIP):
            log(f"SKIP [{label}] {name} (--skip)")
            continue
        d = kw.get("d", 128)
        ov = _for_headdim(overrides, d)
        if overrides and (ov is None or configs.check_fp8(configs.fp8_config(d, **ov), d)):
            continue
        try:
            with watchdog(CASE_TIMEOUT, f"[{label}] {name}"):
                msg = run_case(name, overrides=ov, **kw)
        except CaseFailure as e:
            log(f"FAIL [{label}] {name} ({kw}): {e}")
            return False
        log(f"PASS [{label}] {name}: {msg}")
    return True


def run_api_check() -> None:
    dev = "cuda"
    q, k, v = (torch.randn(2, 300, 4, 128, device=dev) for _ in range(3))
    q8, k8, v8, qd, kd, vd = fp8.quantize(q, k, v)
    call = make_call(headdim=128, causal=True, q_descale=qd, k_descale=kd, v_descale=vd)
    chosen = dispatch.choose(Problem.of(q8, k8, call), call)
    if chosen != "hopper":
        raise CaseFailure(f"auto picked {chosen!r} for an FP8 call, expected 'hopper'")
    out = flashtile.flash_attn_func(q8, k8, v8, causal=True, q_descale=qd, k_descale=kd, v_descale=vd)
    with flashtile.use_backend("torch"):
        ref = flashtile.flash_attn_func(q8.cpu(), k8.cpu(), v8.cpu(), causal=True, q_descale=qd.cpu(),
                                        k_descale=kd.cpu(), v_descale=vd.cpu())  # fmt: skip
    rel = float((out.float().cpu() - ref.float()).norm() / ref.float().norm())
    if out.dtype != torch.bfloat16 or rel > 0.03:
        raise CaseFailure(f"public API: dtype {out.dtype}, relative error vs the torch upcast path {rel:.3e}")
    q8.requires_grad_()
    try:
        flashtile.flash_attn_func(q8, k8, v8).float().sum().backward()
        raise CaseFailure("backward through an FP8 call did not raise")
    except RuntimeError as e:
        if "forward only" not in str(e):
            raise
    log(f"PASS public API (auto picks 'hopper'; rel. error vs the torch upcast path {rel:.2e}; backward raises)")


def run_accuracy() -> list[dict]:
    """RMSE against fp32 attention on the original inputs (b=1, s=4096, h=16, d=128, not causal)."""
    from flashtile.backends.hopper import launch

    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    for dist in ("gaussian", "outliers"):
        q, k, v = (torch.randn(1, 4096, 16, 128, device="cuda", generator=g) for _ in range(3))
        if dist == "outliers":  # 0.1% of the entries of q and k: magnitude 10-100, random sign
            for x in (q, k):
                n = x.numel()
                idx = torch.randperm(n, device="cuda", generator=g)[: n // 1000]
                mag = torch.rand(idx.numel(), device="cuda", generator=g) * 90 + 10
                x.view(-1)[idx] = mag * torch.sign(torch.randn(idx.numel(), device="cuda", generator=g))
        ref = attention_ref(q, k, v)[0]
        rmse = lambda o, ref=ref: float((o.float() - ref).pow(2).mean().sqrt())  # noqa: E731
        bf16 = launch.forward(q.bfloat16(), k.bfloat16(), v.bfloat16(), make_call(headdim=128))[0]
        row = {"inputs": dist, "bf16": rmse(bf16)}
        for label, (qq, kk) in (("fp8", (q, k)), ("fp8+rotation", fp8.rotate_qk(q, k))):
            q8, k8, v8, qd, kd, vd = fp8.quantize(qq, kk, v)
            call = make_call(headdim=128, q_descale=qd, k_descale=kd, v_descale=vd)
            row[label] = rmse(launch.forward_fp8(q8, k8, v8, call)[0])
        rows.append(row)
        log("accuracy (RMSE vs fp32 on the original inputs) " + " ".join(
            f"{k}={v:.3e}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------
# speed


def _tflops(b, h, s, d, causal, ms):
    return 4 * b * h * s * s * d / (2 if causal else 1) / (ms * 1e-3) / 1e12


def bench_cells(quick: bool) -> list[tuple[int, int, int, int, bool]]:
    if quick:
        return [(4, 16, 4096, 128, False), (1, 16, 16384, 128, False), (1, 16, 16384, 128, True),
                (1, 8, 16384, 256, False), (1, 32, 16384, 64, False)]  # fmt: skip
    return [(16384 // s, 2048 // d, s, d, c)
            for d in (HEADDIMS or (64, 128, 256)) for s in (1024, 4096, 16384) for c in (False, True)]  # fmt: skip


def _contenders(b, h, s, d, causal, variants, default_ok=True) -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashtile.backends.hopper import configs, launch

    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    q8, k8, v8, qd, kd, vd = fp8.quantize(q, k, v)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    call = make_call(headdim=d, causal=causal)
    call8 = make_call(headdim=d, causal=causal, q_descale=qd, k_descale=kd, v_descale=vd)

    def cudnn():
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

    fns = {"fp8": lambda: launch.forward_fp8(q8, k8, v8, call8)} if default_ok else {}
    for label, ov in variants:
        ov = _for_headdim(ov, d)
        if ov is None:
            continue
        cfg = configs.fp8_config(d, **ov)
        if not configs.check_fp8(cfg, d):
            fns[f"fp8{label}"] = lambda cfg=cfg: launch.forward_fp8(q8, k8, v8, call8, config=cfg)
    fns.update({
        "bf16": lambda: launch.forward(q, k, v, call),
        "cudnn_bf16": cudnn,
        "_vt": lambda: launch.transpose_v(v8, False),  # the FP8 call's V^T pre-pass alone
    })  # fmt: skip
    return fns


#: dense tensor-core FLOPs per SM and clock on sm_90 (H100 / H200: 989 bf16 TFLOP/s at 1830 MHz on 132 SMs)
SM90_FLOPS_PER_CLOCK = {"bf16": 4096, "fp8": 8192}


def run_bench(quick: bool, variants: list[tuple[str, dict]], default_ok: bool = True, rounds: int = 1,
              rep_ms: int = 100, clocks: bool = False) -> list[dict]:
    """TFLOP/s per cell and contender: ``rounds`` turns each (``do_bench`` of ``rep_ms`` ms; round ``r``
    starts with contender ``r``, so none always runs first on a cool GPU), the median reported. With
    ``clocks``: per contender the SM clock and board power while it ran (``hopper_run.ClockLog``, medians
    over its turns) and its share of the tensor cores' dense peak at that clock (``<name>_peak``)."""
    import statistics

    rows = []
    log_ = hopper_run.ClockLog() if clocks else None
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for b, h, s, d, causal in bench_cells(quick):
        if HEADDIMS and d not in HEADDIMS:
            continue
        row = {"b": b, "h": h, "s": s, "d": d, "causal": causal}
        if log_:
            log_.windows.clear()
        runs = hopper_run.timed_rounds(_contenders(b, h, s, d, causal, variants, default_ok), rounds, rep_ms,
                                       f"b{b} h{h} s{s} d{d} causal={causal}", CASE_TIMEOUT, log_)
        for name, c in (log_.summary() if log_ else {}).items():
            row[f"{name.lstrip('_')}_mhz"], row[f"{name.lstrip('_')}_w"] = c["mhz"], c["w"]
        for name, vals in runs.items():
            if not vals:
                row[name.lstrip("_")] = None
            elif name == "_vt":
                row["vt_us"] = round(statistics.median(vals) * 1e3, 1)
            else:
                row[name] = round(statistics.median(_tflops(b, h, s, d, causal, ms) for ms in vals), 1)
                if rounds > 1:
                    row[f"{name}_rounds"] = [round(_tflops(b, h, s, d, causal, ms), 1) for ms in vals]
        for name in runs:
            if row.get(name) and row.get(f"{name}_mhz"):
                per_clock = SM90_FLOPS_PER_CLOCK["fp8" if name.startswith("fp8") else "bf16"]
                row[f"{name}_peak"] = round(row[name] * 1e12 / (row[f"{name}_mhz"] * 1e6 * sms * per_clock), 3)
        if row.get("fp8") and row.get("bf16"):
            row["fp8/bf16"] = round(row["fp8"] / row["bf16"], 2)
        log("bench " + " ".join(f"{k}={v}" for k, v in row.items() if not k.endswith("_rounds")))
        rows.append(row)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer correctness cases, four benchmark cells")
    ap.add_argument("--skip", action="append", default=[], help="skip correctness cases whose name contains this")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--case-timeout", type=float, default=CASE_TIMEOUT, help="watchdog per case / cell (s)")
    ap.add_argument("--variant", action="append", default=[],
                    help="FP8 config overrides benchmarked as extra columns (each checked first on "
                         "variant_cases(); failing ones dropped), e.g. num_stages=3 or cvt_asm=0,row_tree=0")
    ap.add_argument("--full-bench", action="store_true", help="with --quick: the quick correctness set, the full grid")
    ap.add_argument("--headdim", type=int, action="append", help="benchmark only cells of these head dims")
    ap.add_argument("--rounds", type=int, default=1, help="contenders take turns this many times per cell, each "
                    "round starting with the next one (median reported)")
    ap.add_argument("--rep-ms", type=int, default=100, help="do_bench's time per contender and round (ms)")
    ap.add_argument("--clocks", action="store_true", help="sample the SM clock and power (nvidia-smi) while each "
                    "contender runs; report them and each one's share of the dense tensor peak at that clock")
    args = ap.parse_args()
    SKIP[:] = args.skip
    globals()["HEADDIMS"] = args.headdim
    variants = []
    for text in args.variant:
        variants.append((f"[{text}]", {k.strip(): int(v) for k, v in (kv.split("=") for kv in text.split(","))}))
    globals()["CASE_TIMEOUT"] = args.case_timeout
    import triton

    log(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    reason = hopper.backend.available()
    if reason:
        log(f"FAIL hopper backend unavailable: {reason}")
        return 1
    from flashtile.backends.hopper import configs

    log(f"FP8 configs: {', '.join(f'd={d}: {configs.fp8_config(d)}' for d in configs.HEADDIMS)}")
    default_ok = True
    acc = []
    try:
        # the table's config: the whole (or quick) set; a failure is reported, and the variants
        # that pass are still measured (so one run compares code paths even if the default breaks)
        default_ok = run_correctness(args.quick)
        if not default_ok:
            log("FAIL the default FP8 config failed a correctness case (above): its column is dropped")
        kept = []
        for label, ov in variants:  # each variant: variant_cases(); a failing one is dropped
            if run_correctness(True, ov, label, variant_cases()):
                kept.append((label, ov))
            else:
                log(f"variant {label} dropped")
        variants = kept
        if default_ok:
            with watchdog(CASE_TIMEOUT, "public API check"):
                run_api_check()
            with watchdog(CASE_TIMEOUT, "accuracy"):
                acc = run_accuracy()
    except Exception as e:  # a compile or launch error is a failure too; show it whole
        import traceback

        traceback.print_exc()
        log(f"FAIL {type(e).__name__}: {e}")
        return 1
    if args.no_bench or not (default_ok or variants):
        return 0 if default_ok else 1
    rows = run_bench(args.quick and not args.full_bench, variants, default_ok, args.rounds, args.rep_ms, args.clocks)
    print("\nRMSE vs fp32 attention on the original inputs (b1 s4096 h16 d128)")
    for r in acc:
        print("  " + "  ".join(f"{k}={v:.3e}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    names = ["fp8", *(f"fp8{lb}" for lb, _ in variants), "bf16", "cudnn_bf16", "fp8/bf16", "vt_us"]
    print("\nTFLOP/s forward (FP8 e4m3 hopper incl. the V^T pre-pass, bf16 hopper, SDPA cuDNN bf16)")
    print(f"{'b':>3} {'h':>3} {'s':>6} {'d':>4} {'causal':>6} " + " ".join(f"{n:>{max(10, len(n))}}" for n in names))
    for r in rows:
        vals = " ".join(f"{('-' if r.get(n) is None else r[n]):>{max(10, len(n))}}" for n in names)
        print(f"{r['b']:>3} {r['h']:>3} {r['s']:>6} {r['d']:>4} {str(r['causal']):>6} {vals}")
    if args.clocks:
        print("\nSM clock MHz / board W / share of the dense tensor peak at that clock, per contender")
        for r in rows:
            cols = [f"{n}: {r[n + '_mhz']} / {r[n + '_w']} / {r.get(n + '_peak', '-')}"
                    for n in names if r.get(f"{n}_mhz")]  # fmt: skip
            print(f"  s{r['s']} d{r['d']} causal={r['causal']}  " + "  ".join(cols))
    out_dir = os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "fp8_run.json")
    with open(path, "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "date": time.strftime("%Y-%m-%d %H:%M:%S"), "argv": sys.argv, "accuracy": acc, "rows": rows},
                  f, indent=1)  # fmt: skip
    log(f"wrote {path}")
    r = [x["fp8/bf16"] for x in rows if x.get("fp8/bf16")]
    geo = f"{math.exp(sum(map(math.log, r)) / len(r)):.2f}x" if r else "n/a"
    log(f"done in {time.time() - T0:.0f} s (geomean fp8/bf16: {geo})")
    return 0 if default_ok else 1


if __name__ == "__main__":
    sys.exit(main())
