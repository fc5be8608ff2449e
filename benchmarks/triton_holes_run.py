"""The Triton kernels' speed holes on one GPU (issue 12 item 3, issue 11 item 4), in one run.

From the repo root on the GPU machine::

    PYTHONPATH=src python benchmarks/triton_holes_run.py [--base .base] [--skip-check]
        [--fwd256 M,N,W,S ...] [--bwd256 M1,N1,M2,N2,W1,S1,W2,S2 ...] [--softcap-bwd ...]

1. Correctness on small shapes (head dim 256 causal, softcap 30 with GQA and causal, fp16 and
   bf16) for every candidate config, against the fp32 oracle under the project's tolerance rule;
   stops at the first failure and says which.
2. Timing (bf16, ``do_bench`` medians, kernels launched directly with ``config=``, backward
   timed alone with 2.5x the forward's FLOPs), each cell with SDPA flash (FA2) and SDPA cuDNN
   in the same run:
   - forward, d256 causal b4 s4096 h8: the table's old config and the candidates;
   - backward, same cell: the same;
   - d256 non-causal, forward and backward: the new defaults only;
   - backward, d128 GQA 32/8 causal b2 s8192, softcap 30: the candidates, the same kernel without
     softcap (the issue's "0.55x its own speed" ratio), and, when ``--base`` points at an older
     tree (``mkdir .base && git archive 6cb35ae src | tar -x -C .base``, carried to the device),
     that tree's backward kernels with the same config (the before/after of the kernel edits).
     SDPA has no softcap: its rows there are the same shape without softcap (FA2's own softcap
     costs it little: its tanh is one hardware op).
3. The table last; JSON under $OUT (else benchmarks/results/).

Candidate configs can be replaced from the command line (repeat the flag), without editing code:
the kernels take any ``FwdConfig`` / ``BwdConfig`` through ``launch.forward/backward(config=)``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
import types
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from flashtile.backends.triton import configs, launch  # noqa: E402
from flashtile.backends.triton.configs import BwdConfig, FwdConfig  # noqa: E402
from flashtile.spec import make_call  # noqa: E402
from flashtile.testing import (  # noqa: E402
    BWD_ATOL,
    BWD_FACTOR,
    FWD_ATOL,
    FWD_FACTOR,
    LSE_ATOL,
    assert_close_to_ref,
    assert_lse_close,
    attention_flops,
    attention_ref,
)

# label -> config. "old" = the sm90 table before this change (d256 was never swept).
FWD256 = {
    "old (64,64,4,2)": FwdConfig(64, 64, 4, 2),
    "(128,32,8,3)": FwdConfig(128, 32, 8, 3),
    "(128,64,8,2)": FwdConfig(128, 64, 8, 2),
}
BWD256 = {
    "old (32,64,64,32,4,1,4,1)": BwdConfig(32, 64, 64, 32, 4, 1, 4, 1),
    "(32,64,128,32,8,3,8,2)": BwdConfig(32, 64, 128, 32, 8, 3, 8, 2),
    "(32,64,128,32,8,2,8,3)": BwdConfig(32, 64, 128, 32, 8, 2, 8, 3),
    "(64,64,128,32,8,2,8,2)": BwdConfig(64, 64, 128, 32, 8, 2, 8, 2),
}
SOFTCAP_BWD = {
    "(64,128,128,64,8,3,8,3)": BwdConfig(64, 128, 128, 64, 8, 3, 8, 3),  # the d128 table entry
    "(32,128,128,32,8,3,8,3)": BwdConfig(32, 128, 128, 32, 8, 3, 8, 3),
}
SOFTCAP = 30.0
# (b, h, hk, s, d, causal, softcap) of the timed cells
CELL256 = (4, 8, 8, 4096, 256, True, 0.0)
CELL256_NC = (4, 8, 8, 4096, 256, False, 0.0)
CELL_SC = (2, 32, 8, 8192, 128, True, SOFTCAP)


def log(*a):
    print(*a, flush=True)


# ------------------------------------------------------------------------------------------
# an older tree's kernels (before/after in one run)


def load_base(base: str | None):
    """The backward kernels of an older tree's Triton backend, or None (no tree, or their
    arguments differ from this tree's launcher)."""
    if not base:
        return None
    pkg_dir = Path(base) / "src" / "flashtile" / "backends" / "triton"
    if not (pkg_dir / "bwd.py").exists():
        return None
    name = "_flashtile_base_triton"
    if name not in sys.modules:
        pkg = types.ModuleType(name)
        pkg.__path__ = [str(pkg_dir)]  # only common.py and bwd.py are imported, not __init__
        sys.modules[name] = pkg
    bwd = importlib.import_module(f"{name}.bwd")
    for k in ("_bwd_dkdv_kernel", "_bwd_dq_kernel", "_bwd_preprocess"):
        if getattr(bwd, k).arg_names != getattr(launch, k).arg_names:
            log(f"base tree {base}: {k} takes other arguments than this tree's launcher: no base rows")
            return None
    return bwd


class kernels_of:
    """Within the block, launch.backward runs the given module's backward kernels."""

    NAMES = ("_bwd_dkdv_kernel", "_bwd_dq_kernel", "_bwd_preprocess")

    def __init__(self, mod):
        self.mod, self.saved = mod, None

    def __enter__(self):
        if self.mod is not None:
            self.saved = {k: getattr(launch, k) for k in self.NAMES}
            for k in self.NAMES:
                setattr(launch, k, getattr(self.mod, k))

    def __exit__(self, *exc):
        if self.saved:
            for k, v in self.saved.items():
                setattr(launch, k, v)


# ------------------------------------------------------------------------------------------
# problems


DEV = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run under TRITON_INTERPRET=1


def inputs(b, h, hk, s, d, dtype, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    q = torch.randn(b, s, h, d, device=DEV, dtype=dtype, generator=g)
    k = torch.randn(b, s, hk, d, device=DEV, dtype=dtype, generator=g)
    v = torch.randn(b, s, hk, d, device=DEV, dtype=dtype, generator=g)
    return q, k, v


def call_of(d, causal, softcap):
    return make_call(headdim=d, causal=causal, softcap=softcap)


def run_variant(kind, cell, cfg, dtype, code, base_dir, s=None):
    """One launch of a variant (compiles it): kind 'fwd' or 'bwd'."""
    b, h, hk, s0, d, causal, sc = cell
    q, k, v = inputs(1, h, hk, s or 256, d, dtype)
    call = call_of(d, causal, sc)
    if kind == "fwd":
        launch.forward(q, k, v, call, config=cfg)
    else:
        out, lse = launch.forward(q, k, v, call)
        with kernels_of(load_base(base_dir) if code == "base" else None):
            launch.backward(torch.randn_like(out), q, k, v, out, lse, call, config=cfg)
    if DEV == "cuda":
        torch.cuda.synchronize()


def _compile_job(job):
    sys.path.insert(0, str(ROOT / "src"))
    try:
        run_variant(*job)
        return job, None
    except Exception as e:  # noqa: BLE001 - reported, the run goes on
        return job, f"{type(e).__name__}: {str(e)[:300]}"


# ------------------------------------------------------------------------------------------
# correctness


class CheckFailed(Exception):
    pass


def check(kind, cell, cfg, dtype, code, base_dir, s=400):
    """Kernel vs fp32 oracle on a small problem of the cell's heads / head dim / options (400
    rows: several blocks plus a ragged tail). Raises CheckFailed with the numbers."""
    b, h, hk, _, d, causal, sc = cell
    h, hk = (16, 4) if h != hk else (h, hk)  # same divisibility as the timed cell's heads
    q, k, v = inputs(1, h, hk, s, d, dtype, seed=1)
    call = call_of(d, causal, sc)
    if kind == "fwd":
        out, lse = launch.forward(q, k, v, call, config=cfg)
    else:
        out, lse = launch.forward(q, k, v, call)
    dout = torch.randn_like(out)
    leaves_ref = [x.float().requires_grad_() for x in (q, k, v)]
    leaves_pt = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = attention_ref(*leaves_ref, causal=causal, softcap=sc, upcast=True)
    pt_out, pt_lse = attention_ref(*leaves_pt, causal=causal, softcap=sc, upcast=False)
    try:
        assert_close_to_ref(out, ref_out, pt_out, FWD_FACTOR, FWD_ATOL[dtype], "out")
        assert_lse_close(lse, ref_lse, pt_lse, LSE_ATOL[dtype])
        if kind == "fwd":
            return
        with kernels_of(load_base(base_dir) if code == "base" else None):
            grads = launch.backward(dout, q, k, v, out, lse, call, config=cfg)
        g_ref = torch.autograd.grad(ref_out, leaves_ref, dout.float())
        g_pt = torch.autograd.grad(pt_out, leaves_pt, dout)
        for name, g, r, p in zip(("dq", "dk", "dv"), grads, g_ref, g_pt, strict=True):
            assert_close_to_ref(g, r, p, BWD_FACTOR, BWD_ATOL[dtype], name)
    except AssertionError as e:
        raise CheckFailed(str(e)) from None


# ------------------------------------------------------------------------------------------
# timing


def fitted(cfg):
    """The config a launch with cfg really ran (launch steps down when shared memory is short)."""
    got = {v for k, v in launch._FITTED.items() if k[-1] == cfg}
    return got.pop() if len(got) == 1 else cfg


def _bench(fn):
    from triton.testing import do_bench

    fn()
    torch.cuda.synchronize()
    return do_bench(fn, warmup=25, rep=100, return_mode="median")


def time_variant(kind, cell, cfg, code, base_dir, softcap=None):
    b, h, hk, s, d, causal, sc = cell
    if softcap is not None:
        sc = softcap
    q, k, v = inputs(b, h, hk, s, d, torch.bfloat16)
    call = call_of(d, causal, sc)
    if kind == "fwd":
        return _bench(lambda: launch.forward(q, k, v, call, config=cfg))
    out, lse = launch.forward(q, k, v, call)
    dout = torch.randn_like(out)
    with kernels_of(load_base(base_dir) if code == "base" else None):
        return _bench(lambda: launch.backward(dout, q, k, v, out, lse, call, config=cfg))


def time_sdpa(kind, cell, backend):
    """SDPA on the cell's shape (no softcap: SDPA has none), (b, h, s, d) views, GQA through
    enable_gqa where the backend takes it, else k/v repeated (outside the timing)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    b, h, hk, s, d, causal, _ = cell
    q, k, v = (x.transpose(1, 2) for x in inputs(b, h, hk, s, d, torch.bfloat16))
    kw = {}
    if h != hk:
        kw = dict(enable_gqa=True)

    def f(q, k, v):
        with sdpa_kernel([be]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, **kw)

    try:
        f(q, k, v)
    except RuntimeError:
        if not kw:
            raise
        kw = {}
        k, v = (x.repeat_interleave(h // hk, dim=1) for x in (k, v))
    if kind == "fwd":
        with torch.no_grad():
            return _bench(lambda: f(q, k, v))
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    out = f(q, k, v)
    g = torch.randn_like(out)
    return _bench(lambda: torch.autograd.grad(out, (q, k, v), g, retain_graph=True))


# ------------------------------------------------------------------------------------------


def short(cfg) -> str:
    """(M, N, W, S) / (M1, N1, M2, N2, W1, S1, W2, S2) of a config, as the labels write it."""
    vals = list(vars(cfg).values())
    if isinstance(cfg, BwdConfig):
        vals = vals[:8] + (["atomic"] if cfg.atomic_dq else [])
    return "(" + ",".join(map(str, vals)) + ")"


def parse_cfgs(vals, cls):
    return {f"({v})": cls(*(int(x) for x in v.split(","))) for v in vals}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", default=str(ROOT / ".base"), help="an older tree (src/...) for before rows")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--fwd256", action="append", default=[], metavar="M,N,W,S", help="replaces the fwd candidates")
    ap.add_argument("--bwd256", action="append", default=[], metavar="M1,N1,M2,N2,W1,S1,W2,S2")
    ap.add_argument("--softcap-bwd", action="append", default=[], metavar="M1,N1,M2,N2,W1,S1,W2,S2")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results"))
    args = ap.parse_args()
    t_start = time.time()
    fwd256 = parse_cfgs(args.fwd256, FwdConfig) if args.fwd256 else dict(FWD256)
    bwd256 = parse_cfgs(args.bwd256, BwdConfig) if args.bwd256 else dict(BWD256)
    sc_bwd = parse_cfgs(args.softcap_bwd, BwdConfig) if args.softcap_bwd else dict(SOFTCAP_BWD)
    base = load_base(args.base)
    base_dir = args.base if base is not None else None
    ar = launch.arch(torch.device("cuda"))
    default_fwd = configs.fwd_config(ar, 256, torch.bfloat16)
    default_bwd = configs.bwd_config(ar, 256, torch.bfloat16)
    default_sc = configs.bwd_config(ar, 128, torch.bfloat16)
    log(f"device {torch.cuda.get_device_name()}, arch {ar}, torch {torch.__version__}, "
        f"triton {__import__('triton').__version__}; base tree: {base_dir or 'none'}")  # fmt: skip
    log(f"table defaults: fwd d256 {default_fwd}, bwd d256 {default_bwd}, bwd d128 {default_sc}")

    # (group, kind, cell, label, cfg, code, softcap override)
    plan = []
    for lab, c in fwd256.items():
        plan.append(("fwd d256 causal", "fwd", CELL256, lab, c, "new", None))
    for lab, c in bwd256.items():
        plan.append(("bwd d256 causal", "bwd", CELL256, lab, c, "new", None))
    plan.append(("fwd d256 non-causal", "fwd", CELL256_NC, f"default {short(default_fwd)}", default_fwd, "new", None))
    plan.append(("bwd d256 non-causal", "bwd", CELL256_NC, f"default {short(default_bwd)}", default_bwd, "new", None))
    sc_group = "bwd d128 GQA32/8 softcap30"
    for lab, c in sc_bwd.items():
        plan.append((sc_group, "bwd", CELL_SC, lab, c, "new", None))
    if base_dir:
        plan.append((sc_group, "bwd", CELL_SC, f"BASE tree {short(default_sc)}", default_sc, "base", None))
    plan.append((sc_group, "bwd", CELL_SC, f"no softcap {short(default_sc)}", default_sc, "new", 0.0))

    # 1. compile everything in parallel (fills Triton's cache; the checks and timings reuse it)
    jobs = []
    for _, kind, cell, _, c, code, sc in plan:
        cl = cell if sc is None else cell[:6] + (sc,)
        jobs.append((kind, cl, c, torch.bfloat16, code, base_dir))
    jobs.append(("bwd", CELL256, default_bwd, torch.float16, "new", base_dir))  # fp16 checks below
    jobs.append(("fwd", CELL256, default_fwd, torch.float16, "new", base_dir))
    jobs.append(("bwd", CELL_SC, default_sc, torch.float16, "new", base_dir))
    t0 = time.time()
    errors = {}
    ctx = torch.multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=ctx) as ex:
        for job, err in ex.map(_compile_job, jobs):
            if err:
                errors[(job[0], job[1], job[2], job[4])] = err
                log(f"compile FAILED {job[0]} {job[2]} ({job[4]}): {err}")
    log(f"compiled {len(jobs)} variants in {time.time() - t0:.0f} s ({len(errors)} failed)")

    result = {"meta": {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "triton": __import__("triton").__version__, "base": base_dir,
                       "defaults": [str(default_fwd), str(default_bwd), str(default_sc)]},
              "checks": [], "rows": []}  # fmt: skip

    # 2. correctness: every candidate in bf16, the defaults in fp16 too
    if not args.skip_check:
        checks = [(kind, cell if sc is None else cell[:6] + (sc,), lab, c, torch.bfloat16, code)
                  for _, kind, cell, lab, c, code, sc in plan]  # fmt: skip
        checks += [("fwd", CELL256, "default fp16", default_fwd, torch.float16, "new"),
                   ("bwd", CELL256, "default fp16", default_bwd, torch.float16, "new"),
                   ("bwd", CELL_SC, "default fp16", default_sc, torch.float16, "new")]  # fmt: skip
        for kind, cell, lab, c, dt, code in checks:
            if (kind, cell, c, code) in errors and dt == torch.bfloat16:
                continue
            what = f"{kind} d{cell[4]} causal={cell[5]} softcap={cell[6]} h{cell[1]}/{cell[2]} {lab} {dt}"
            try:
                check(kind, cell, c, dt, code, base_dir)
            except CheckFailed as e:
                log(f"CHECK FAILED: {what}: {e}")
                result["checks"].append({"case": what, "ok": False, "error": str(e)})
                _write(result, args.out)
                return 1
            except Exception as e:  # noqa: BLE001 - an error is a failure too
                log(f"CHECK ERROR: {what}: {type(e).__name__}: {e}")
                result["checks"].append({"case": what, "ok": False, "error": f"{type(e).__name__}: {e}"})
                _write(result, args.out)
                return 1
            log(f"check ok: {what}")
            result["checks"].append({"case": what, "ok": True})
    log(f"checks done at {time.time() - t_start:.0f} s")

    # 3. timing
    sdpa = {}
    for group, kind, cell, lab, c, code, sc in plan:
        key = (kind, cell)
        if key not in sdpa:
            sdpa[key] = {}
            for be in ("flash", "cudnn"):
                try:
                    sdpa[key][be] = time_sdpa(kind, cell, be)
                except Exception as e:  # noqa: BLE001
                    log(f"sdpa {be} {group}: {type(e).__name__}: {str(e)[:120]}")
                    sdpa[key][be] = float("nan")
        if (kind, cell if sc is None else cell[:6] + (sc,), c, code) in errors:
            ms = float("nan")
        else:
            try:
                ms = time_variant(kind, cell, c, code, base_dir, softcap=sc)
            except Exception as e:  # noqa: BLE001
                log(f"time {group} {lab}: {type(e).__name__}: {str(e)[:200]}")
                ms = float("nan")
        if fitted(c) != c:
            lab += f" RAN AS {short(fitted(c))}"
        b, h, hk, s, d, causal, _ = cell
        flops = attention_flops(b, h, s, d, causal, kind)
        tf = flops / (ms * 1e-3) / 1e12
        tf_fl = flops / (sdpa[key]["flash"] * 1e-3) / 1e12
        tf_cu = flops / (sdpa[key]["cudnn"] * 1e-3) / 1e12
        row = dict(group=group, kind=kind, cell=list(cell), label=lab, config=list(vars(c).values()), code=code,
                   softcap=cell[6] if sc is None else sc, ms=ms, tflops=tf, sdpa_flash=tf_fl, sdpa_cudnn=tf_cu,
                   vs_flash=tf / tf_fl, vs_cudnn=tf / tf_cu)  # fmt: skip
        result["rows"].append(row)
        log(f"{group:30} {lab:34} {ms:8.3f} ms {tf:6.0f} TFLOP/s  (SDPA flash {tf_fl:.0f}, cuDNN {tf_cu:.0f})")

    # 4. table
    _write(result, args.out)
    log(f"\ntotal {time.time() - t_start:.0f} s")
    log("\n| cell | variant | TFLOP/s | SDPA flash | SDPA cuDNN | vs flash | vs cuDNN |")
    log("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        log(f"| {r['group']} | {r['label']} | {r['tflops']:.0f} | {r['sdpa_flash']:.0f} | {r['sdpa_cudnn']:.0f} | "
            f"{r['vs_flash']:.2f}x | {r['vs_cudnn']:.2f}x |")  # fmt: skip
    for group in dict.fromkeys(r["group"] for r in result["rows"]):
        rs = [r for r in result["rows"] if r["group"] == group and r["code"] == "new" and r["softcap"] == (
            SOFTCAP if "softcap" in group else 0.0) and not math.isnan(r["tflops"])]  # fmt: skip
        if rs:
            best = max(rs, key=lambda r: r["tflops"])
            log(f"best {group}: {best['label']} {best['tflops']:.0f} TFLOP/s = {best['vs_flash']:.2f}x SDPA flash")
    sc_rows = {r["label"]: r["tflops"] for r in result["rows"] if "softcap" in r["group"]}
    nosc = [t for lab, t in sc_rows.items() if lab.startswith("no softcap")]
    if nosc:
        for lab, t in sc_rows.items():
            if not lab.startswith("no softcap"):
                log(f"softcap / no softcap: {lab}: {t / nosc[0]:.2f}x")
    return 0


def _write(result, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    path = Path(out_dir) / f"triton_holes_{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=1, default=str))
    log(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
