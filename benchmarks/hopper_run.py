"""One H200 run of the Gluon Hopper backend: correctness first, then speed.

    PYTHONPATH=src python benchmarks/hopper_run.py [--quick] [--keep-going] [--variant kernel=plain ...]

The default config is the table's (``configs.py``: the warp-specialised ``ws`` kernel); the
other kernels are variants: ``--variant kernel=plain`` (step A), ``--variant kernel=persistent``
(step C), and tile sweeps like ``--variant block_n=64,num_stages=3``.

1. Correctness of the kernel (``flashtile.backends.hopper.launch.forward``, called directly so that
   short query lengths are not routed to the decode kernel) on small odd shapes against the fp32
   oracle (``flashtile.testing.attention_ref``, materialised scores), for every option the
   backend declares: seqlen 1, 17, 113 vs 203 both ways, GQA 8/2, causal, windows, softcap,
   varlen with empty and length-1 sequences, rows that see no key, every head dim, fp16 and
   bf16. Rule (the project's, tests/conftest.py): ``max|x - ref| <= 2 * max|pt - ref| + atol
   + eps(dtype) * max|ref|`` with ``pt`` the same oracle in the input dtype; lse ``-inf`` exactly
   where the oracle has it, out 0 there, no NaN. Prints PASS/FAIL per case and stops at the first
   failure (exit code 1). Then the backend through the public API (forward + Triton backward).
2. Speed: bf16, batch * seqlen = 16384 tokens, nheads * headdim = 2048, head dims 64 and 128
   (and 256 at b4 h8 s4096), causal and not, seqlen 1k/4k/16k: hopper vs flashtile's triton
   backend vs SDPA flash vs SDPA cuDNN; TFLOP/s = 4 b h s^2 d / t (halved when causal),
   ``triton.testing.do_bench`` medians. A short table last; JSON to ``$OUT`` when set.

``--variant`` (repeatable) adds hopper config variants (``HopperConfig`` fields, applied to every
head dim on top of the config a default call runs, e.g. ``kernel=plain`` or ``wait_fence=1``): each
gets a quick correctness pass, then its own benchmark column. ``--full-bench`` with ``--quick``: the
quick correctness set and the full grid; ``--no-triton``: no column for flashtile's triton backend.
``--quick``: a smaller correctness set and two benchmark cells. ``--keep-going``: a failing variant
is reported and dropped, the others still run (exit code 1 at the end). A watchdog ends the process
(exit code 3) if one case or benchmark cell runs longer than ``--case-timeout`` seconds (a hung
kernel), naming it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import replace

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

import flashtile  # noqa: E402
from flashtile import dispatch  # noqa: E402
from flashtile.backends import hopper  # noqa: E402
from flashtile.spec import Problem, make_call  # noqa: E402
from flashtile.testing import attention_ref  # noqa: E402

FWD_ATOL = {torch.float16: 1e-3, torch.bfloat16: 8e-3}
LSE_ATOL = 1e-3
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


@contextmanager
def watchdog(seconds: float, what: str):
    """Exit the process (code 3) if the block takes longer than ``seconds``: a kernel that hangs
    on an mbarrier cannot be interrupted otherwise."""

    def fire():
        print(f"[{time.time() - T0:6.1f}s] HANG: {what} still running after {seconds:.0f} s; exiting", flush=True)
        os._exit(3)

    timer = threading.Timer(seconds, fire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


CASE_TIMEOUT = 180.0  # set from --case-timeout


class ClockLog:
    """The GPU's SM clock (MHz) and board power (W) sampled by ``nvidia-smi -lms`` in a background
    reader while it is open, and labelled time windows (:meth:`window`) to average them over: a
    benchmark's TFLOP/s divided by the clock it ran at is its work per cycle, which tells a faster
    kernel from a cooler GPU (the H200 holds its 700 W cap under these loads, moving the clock
    1.6-2.0 GHz). Without ``nvidia-smi`` it records nothing and :meth:`summary` is empty."""

    def __init__(self, period_ms: int = 50):
        import shutil
        import subprocess

        self.samples: list[tuple[float, float, float]] = []  # (monotonic s, MHz, W)
        self.windows: list[tuple[str, float, float]] = []
        self._proc = None
        if shutil.which("nvidia-smi"):
            self._proc = subprocess.Popen(
                ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
                 f"-lms={period_ms}", f"--id={torch.cuda.current_device()}"],
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)  # fmt: skip
            threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                mhz, watts = (float(x) for x in line.split(","))
            except ValueError:
                continue
            self.samples.append((time.monotonic(), mhz, watts))

    @contextmanager
    def window(self, label: str):
        t0 = time.monotonic()
        try:
            yield
        finally:
            self.windows.append((label, t0, time.monotonic()))

    def summary(self) -> dict[str, dict[str, float]]:
        """Per label: the median over its windows of the mean clock (``mhz``) and power (``w``) sampled
        inside each window (windows without a sample are skipped)."""
        import statistics

        per: dict[str, list[tuple[float, float]]] = {}
        for label, t0, t1 in self.windows:
            inside = [(m, w) for t, m, w in self.samples if t0 <= t <= t1]
            if inside:
                per.setdefault(label, []).append((statistics.fmean(m for m, _ in inside),
                                                  statistics.fmean(w for _, w in inside)))  # fmt: skip
        med = statistics.median
        return {label: {"mhz": round(med(m for m, _ in v)), "w": round(med(w for _, w in v))}
                for label, v in per.items()}

    def close(self) -> None:
        if self._proc is not None:
            self._proc.terminate()


def timed_rounds(fns: dict, rounds: int, rep_ms: int, what: str, timeout: float,
                 clocks: ClockLog | None = None) -> dict[str, list[float] | None]:
    """Milliseconds per call (``do_bench`` medians of ``rep_ms`` ms) of each contender of ``fns`` (name ->
    zero-argument function) in ``rounds`` turns, round ``r`` starting with contender ``r`` (none always runs
    first on a cool GPU: the first turn reads 5-10% higher than throttled later ones). A contender that
    raises is logged and gets None (the others go on); ``timeout`` s per turn (:func:`watchdog`). With
    ``clocks``, each turn's ``do_bench`` is a :meth:`ClockLog.window` labelled with the contender's name."""
    import triton

    runs: dict[str, list[float] | None] = {name: [] for name in fns}
    order = list(fns.items())
    for r in range(rounds):
        for name, fn in order[r % len(order):] + order[: r % len(order)]:
            if runs[name] is None:
                continue
            try:
                with watchdog(timeout, f"bench {name} {what}"):
                    fn()
                    torch.cuda.synchronize()
                    with clocks.window(name) if clocks else nullcontext():
                        ms = triton.testing.do_bench(fn, warmup=25 if rounds == 1 else 5, rep=rep_ms,
                                                     return_mode="median")
                runs[name].append(ms)
            except Exception as e:  # one contender failing must not hide the others
                runs[name] = None
                log(f"{name} failed at {what}: {type(e).__name__}: {str(e)[:300]}")
    return runs


def for_headdim(overrides: dict | None, d: int) -> dict | None:
    """A ``--variant``'s overrides for head dim ``d``: its ``d`` key, if given, names the one head
    dim it applies to (None for the others; fp8_run.py's variants too)."""
    if not overrides or "d" not in overrides:
        return overrides
    ov = dict(overrides)
    return ov if ov.pop("d") == d else None
HEADDIMS: list[int] | None = None  # set from --headdim
WITH_TRITON = True  # unset by --no-triton


# ------------------------------------------------------------------------------------------
# correctness


class CaseFailure(Exception):
    pass


def _max_abs(x: torch.Tensor) -> float:
    return x.abs().max().item() if x.numel() else 0.0


def _check(name: str, x: torch.Tensor, ref: torch.Tensor, pt: torch.Tensor) -> tuple[float, float]:
    """(error, baseline error) on the oracle's finite entries; non-finite oracle entries must be
    matched exactly, and NaN never passes."""
    x, ref, pt = x.double(), ref.double(), pt.double()
    if torch.isnan(x).any():
        raise CaseFailure(f"{name}: NaN")
    fin = torch.isfinite(ref)
    if not torch.equal(x[~fin], ref[~fin]):
        raise CaseFailure(f"{name}: non-finite entries differ from the oracle")
    x, ref, pt = x[fin], ref[fin], pt[fin]
    if not torch.isfinite(x).all():
        raise CaseFailure(f"{name}: non-finite where the oracle is finite")
    pt_ok = torch.isfinite(pt)
    err, pt_err = _max_abs(x - ref), _max_abs((pt - ref)[pt_ok])
    return err, pt_err


def _ref_dense(q, k, v, call, upcast: bool):
    return attention_ref(q, k, v, causal=False, window_size=(call.window_left, call.window_right),
                         softcap=call.softcap, softmax_scale=call.softmax_scale, upcast=upcast)  # fmt: skip


def _ref(q, k, v, call, lens_q, lens_k, upcast: bool):
    """Oracle (out, lse) on the internal layout (varlen: per sequence, concatenated)."""
    if lens_q is None:
        return _ref_dense(q, k, v, call, upcast)
    outs, lses = [], []
    cq, ck = 0, 0
    for nq, nk in zip(lens_q, lens_k, strict=True):
        qs, ks, vs = q[:, cq:cq + nq], k[:, ck:ck + nk], v[:, ck:ck + nk]
        if nq == 0:
            pass
        elif nk == 0:
            outs.append(torch.zeros_like(qs))
            lses.append(torch.full((1, q.shape[2], nq), float("-inf"), device=q.device))
        else:
            o, lse = _ref_dense(qs, ks, vs, call, upcast)
            outs.append(o)
            lses.append(lse)
        cq, ck = cq + nq, ck + nk
    return torch.cat(outs, 1), torch.cat(lses, 2)


def run_case(name, *, b=2, sq=17, sk=17, h=4, hk=None, d=64, dtype=torch.bfloat16, causal=False,
             window=(-1, -1), softcap=0.0, scale=None, lens=None, packed=False, config=None) -> str:  # fmt: skip
    """One correctness case; raises CaseFailure with the errors on failure, else returns a summary."""
    from flashtile.backends.hopper import launch

    hk = hk or h
    dev = torch.device("cuda")
    if lens is not None:  # varlen: lens = (lens_q, lens_k)
        lens_q, lens_k = lens
        tq, tk = sum(lens_q), sum(lens_k)
        q = torch.randn(1, tq, h, d, device=dev, dtype=dtype)
        k = torch.randn(1, tk, hk, d, device=dev, dtype=dtype)
        v = torch.randn(1, tk, hk, d, device=dev, dtype=dtype)
        cu = lambda ls: torch.tensor([0] + list(torch.tensor(ls).cumsum(0).tolist()), dtype=torch.int32, device=dev)
        call = make_call(headdim=d, softmax_scale=scale, causal=causal, window_size=window, softcap=softcap,
                         cu_seqlens_q=cu(lens_q), cu_seqlens_k=cu(lens_k),
                         max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k))  # fmt: skip
    else:
        lens_q = lens_k = None
        if packed:  # q, k, v as views of one (b, s, 3, h, d) tensor: non-contiguous, TMA-compatible strides
            qkv = torch.randn(b, sq, 3, h, d, device=dev, dtype=dtype)
            q, k, v = qkv.unbind(2)
        else:
            q = torch.randn(b, sq, h, d, device=dev, dtype=dtype)
            k = torch.randn(b, sk, hk, d, device=dev, dtype=dtype)
            v = torch.randn(b, sk, hk, d, device=dev, dtype=dtype)
        call = make_call(headdim=d, softmax_scale=scale, causal=causal, window_size=window, softcap=softcap)
    out, lse = launch.forward(q, k, v, call, config=config)
    torch.cuda.synchronize()
    ref_out, ref_lse = _ref(q.float(), k.float(), v.float(), call, lens_q, lens_k, upcast=True)
    pt_out, pt_lse = _ref(q, k, v, call, lens_q, lens_k, upcast=False)
    if out.dtype != dtype or out.shape != q.shape or lse.dtype != torch.float32:
        raise CaseFailure(f"out {out.dtype} {tuple(out.shape)}, lse {lse.dtype}")
    if lse.shape != ref_lse.shape:
        raise CaseFailure(f"lse shape {tuple(lse.shape)} != {tuple(ref_lse.shape)}")
    dead = torch.isneginf(ref_lse)  # rows that see no key: (B, H, Sq)
    if not torch.equal(torch.isneginf(lse), dead):
        raise CaseFailure(f"lse -inf at {int(torch.isneginf(lse).sum())} rows, oracle at {int(dead.sum())}")
    if dead.any() and _max_abs(out.float().permute(0, 2, 1, 3)[dead]) != 0:
        raise CaseFailure("out is not 0 on rows that see no key")
    e_o, p_o = _check("out", out, ref_out, pt_out)
    bound_o = 2 * p_o + FWD_ATOL[dtype] + torch.finfo(dtype).eps * _max_abs(ref_out.float())
    e_l, p_l = _check("lse", lse, ref_lse, pt_lse)
    bound_l = 2 * p_l + LSE_ATOL
    msg = (f"out err {e_o:.2e} (bound {bound_o:.2e}), lse err {e_l:.2e} (bound {bound_l:.2e}), "
           f"{int(dead.sum())} dead rows")  # fmt: skip
    if e_o > bound_o or e_l > bound_l:
        raise CaseFailure(msg)
    return msg


def correctness_cases(quick: bool) -> list[tuple[str, dict]]:
    fp = torch.float16  # bf16 is the default dtype of run_case
    cases = [
        ("seqlen 1", dict(sq=1, sk=1, d=128)),
        ("seqlen 17", dict(sq=17, sk=17, d=64)),
        ("113 q vs 203 k", dict(sq=113, sk=203, d=128)),
        ("203 q vs 113 k causal (dead rows)", dict(sq=203, sk=113, d=128, causal=True)),
        ("113 q vs 203 k causal", dict(sq=113, sk=203, d=128, causal=True)),
        ("GQA 8/2 causal fp16", dict(sq=203, sk=203, h=8, hk=2, d=128, causal=True, dtype=fp)),
        ("window (32, 8)", dict(sq=300, sk=300, d=64, window=(32, 8))),
        ("softcap 30", dict(sq=203, sk=203, d=128, softcap=30.0, scale=0.5)),
        ("varlen empty/len-1 causal",
         dict(lens=([0, 1, 17, 130, 0, 300], [5, 0, 40, 130, 3, 257]), d=128, causal=True)),
        ("d=256 causal", dict(sq=300, sk=300, d=256, causal=True)),
        ("d=64 GQA 8/2 causal 113 vs 203", dict(sq=113, sk=203, h=8, hk=2, d=64, causal=True)),
        ("d=64 varlen empty/len-1 causal", dict(lens=([0, 1, 17, 400, 0, 300], [5, 0, 40, 400, 3, 257]), d=64,
                                                causal=True)),
    ]
    if quick:
        return cases
    cases += [
        ("seqlen 17 fp16 d=96", dict(sq=17, sk=17, d=96, dtype=fp)),
        ("203 q vs 113 k", dict(sq=203, sk=113, d=64)),
        ("MQA 8/1 window (-1, 16)", dict(sq=113, sk=203, h=8, hk=1, d=64, window=(-1, 16))),
        ("window (0, 0) sq > sk (dead rows)", dict(sq=203, sk=113, d=128, window=(0, 0))),
        ("window (64, -1)", dict(sq=300, sk=257, d=128, window=(64, -1))),
        ("causal + softcap fp16", dict(sq=300, sk=300, d=64, causal=True, softcap=5.0, dtype=fp)),
        ("window + softcap", dict(sq=113, sk=203, d=128, window=(40, 3), softcap=20.0)),
        ("varlen none", dict(lens=([7, 128, 1, 255], [300, 128, 1, 31]), d=64)),
        ("varlen window fp16", dict(lens=([129, 0, 64, 200], [129, 9, 1, 150]), d=128, window=(20, 5), dtype=fp)),
        ("varlen softcap GQA", dict(lens=([50, 260], [70, 255]), h=6, hk=2, d=64, softcap=10.0)),
        ("packed qkv views", dict(sq=257, sk=257, d=128, causal=True, packed=True)),
        ("d=96 causal", dict(sq=300, sk=300, d=96, causal=True)),
        ("d=192 causal", dict(sq=300, sk=300, d=192, causal=True)),
        ("d=192 varlen fp16", dict(lens=([1, 200, 33], [1, 199, 300]), d=192, dtype=fp)),
        ("d=256 window fp16", dict(sq=203, sk=300, d=256, window=(50, 50), dtype=fp)),
        ("d=64 long causal", dict(b=1, sq=1024, sk=1024, h=2, d=64, causal=True)),
        ("d=128 long", dict(b=1, sq=1000, sk=1500, h=2, d=128)),
    ]
    return cases


def run_correctness(quick: bool, config_overrides: dict | None = None, label: str = "default") -> bool:
    from flashtile.backends.hopper import configs

    ok = True
    for name, kw in correctness_cases(quick):
        cfg = None
        if config_overrides:
            ov = for_headdim(config_overrides, kw.get("d", 64))
            if ov is None:
                continue  # a variant for another head dim
            cfg = replace(configs.config_for(kw.get("d", 64), causal=bool(kw.get("causal")),
                                             seqlen_q=kw.get("sq", 0)), **ov)  # as a default call's, overridden
            bad = configs.check(cfg, kw.get("d", 64))
            if bad:
                log(f"SKIP [{label}] {name}: {bad}")
                continue
        dt = "fp16" if kw.get("dtype") == torch.float16 else "bf16"
        try:
            with watchdog(CASE_TIMEOUT, f"[{label}] {name}"):
                msg = run_case(name, config=cfg, **kw)
        except CaseFailure as e:
            log(f"FAIL [{label}] {name} ({dt}, {kw}): {e}")
            return False
        log(f"PASS [{label}] {name} ({dt}): {msg}")
    return ok


def run_api_check() -> None:
    """The backend through the public API: auto picks hopper, forward + (Triton) backward."""
    q, k, v = (torch.randn(2, 300, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    call = make_call(headdim=128, causal=True)
    chosen = dispatch.choose(Problem.of(q, k, call), call)
    with flashtile.use_backend("hopper"):
        out = flashtile.flash_attn_func(q, k, v, causal=True)
        out.float().square().sum().backward()
    ref = attention_ref(q.float(), k.float(), v.float(), causal=True)[0]
    e = _max_abs(out.float() - ref)
    if not torch.isfinite(q.grad).all() or e > 0.05:
        raise CaseFailure(f"public API: out err {e:.3e} or non-finite grads")
    log(f"PASS public API (auto picks {chosen!r}; flash_attn_func forward + backward under use_backend('hopper'))")


# ------------------------------------------------------------------------------------------
# speed


def _tflops(b, h, s, d, causal, ms):
    f = 4 * b * h * s * s * d / (2 if causal else 1)
    return f / (ms * 1e-3) / 1e12


def bench_cells(quick: bool) -> list[dict]:
    """Cells as dicts: b, h, hk (KV heads), s, d, causal, varlen (varlen: ``b`` sequences of
    random lengths averaging ``s``, packed)."""

    def cell(b, h, s, d, causal, hk=None, varlen=False):
        return dict(b=b, h=h, hk=hk or h, s=s, d=d, causal=causal, varlen=varlen)

    if quick:
        return [cell(4, 16, 4096, 128, False), cell(4, 16, 4096, 128, True)]
    cells = []
    for d in (64, 128):
        for s in (1024, 4096, 16384):
            for causal in (False, True):
                cells.append(cell(16384 // s, 2048 // d, s, d, causal))
    cells += [cell(4, 8, 4096, 256, False), cell(4, 8, 4096, 256, True)]
    cells += [cell(2, 32, 8192, 128, c, hk=8) for c in (False, True)]  # GQA 32/8 (Llama-3 8B's heads)
    cells += [cell(8, 16, 2048, 128, c, varlen=True) for c in (False, True)]
    return cells


def _varlen_lens(b: int, s: int) -> list[int]:
    """``b`` sequence lengths averaging ``s`` (fixed seed: the same in every run)."""
    g = torch.Generator().manual_seed(0)
    lens = (torch.rand(b, generator=g) * s + s // 2).long()
    lens = (lens * (b * s) // lens.sum()).clamp(min=1)
    return lens.tolist()


def _contenders(c: dict, variants) -> dict:
    """name -> zero-argument function running one forward of that contender on fresh inputs.
    Varlen cells have no SDPA contenders (SDPA takes no cu_seqlens)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashtile.backends.hopper import configs
    from flashtile.backends.hopper import launch as hlaunch
    from flashtile.backends.triton import launch as tlaunch

    b, h, hk, s, d, causal = c["b"], c["h"], c["hk"], c["s"], c["d"], c["causal"]
    fns = {}
    if c["varlen"]:
        lens = _varlen_lens(b, s)
        cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
        total, mx = int(cu[-1]), max(lens)
        q = torch.randn(1, total, h, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, total, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        call = make_call(headdim=d, causal=causal, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=mx, max_seqlen_k=mx)
    else:
        q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        call = make_call(headdim=d, causal=causal)
    for label, ov in variants:
        ov = for_headdim(ov, d)
        if ov is None:
            continue  # a variant for another head dim
        # the config a default call runs (head dim 64: its consumer count by length), with the overrides
        cfg = replace(configs.config_for(d, causal=causal, seqlen_q=s), **ov) if ov else None
        if cfg is not None and configs.check(cfg, d):
            continue
        fns[f"hopper{label}"] = lambda cfg=cfg: hlaunch.forward(q, k, v, call, config=cfg)
    if WITH_TRITON:
        fns["triton"] = lambda: tlaunch.forward(q, k, v, call)
    if c["varlen"]:
        return fns
    # SDPA's (b, h, s, d) as views: no copy timed; GQA: K/V expanded beforehand (not timed)
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    if hk != h:
        kt, vt = (x.repeat_interleave(h // hk, dim=1) for x in (kt, vt))

    def sdpa(backend):
        def f():
            with sdpa_kernel(backend):
                return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

        return f

    fns["sdpa_flash"] = sdpa(SDPBackend.FLASH_ATTENTION)
    fns["sdpa_cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
    return fns


def run_bench(quick: bool, variants: list[tuple[str, dict]]) -> list[dict]:
    import triton

    rows = []
    for c in bench_cells(quick):
        if HEADDIMS and c["d"] not in HEADDIMS:
            continue
        b, h, s, d, causal = c["b"], c["h"], c["s"], c["d"], c["causal"]
        row = dict(c)
        for name, fn in _contenders(c, variants).items():
            try:
                with watchdog(CASE_TIMEOUT, f"bench {name} b{b} h{h} s{s} d{d} causal={causal}"):
                    fn()
                    torch.cuda.synchronize()
                    ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
                row[name] = round(_tflops(b, h, s, d, causal, ms), 1)  # varlen: b*s tokens in all
            except Exception as e:  # one contender failing must not hide the others
                row[name] = None
                log(f"{name} failed at b{b} h{h} s{s} d{d} causal={causal}: {type(e).__name__}: {str(e)[:200]}")
        log("bench " + " ".join(f"{k}={v}" for k, v in row.items()))
        rows.append(row)
    return rows


def _parse_variant(text: str) -> tuple[str, dict]:
    ov = {}
    for kv in text.split(","):
        key, val = kv.split("=")
        ov[key.strip()] = val.strip() if key.strip() == "kernel" else int(val)
    return "[" + text + "]", ov


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer correctness cases, two benchmark cells")
    ap.add_argument("--variant", action="append", default=[],
                    help="config overrides, e.g. block_n=64,num_stages=3 (d=64: only for head dim 64)")
    ap.add_argument("--no-bench", action="store_true")
    ap.add_argument("--keep-going", action="store_true", help="drop a failing variant instead of stopping")
    ap.add_argument("--case-timeout", type=float, default=CASE_TIMEOUT, help="watchdog per case / cell (s)")
    ap.add_argument("--headdim", type=int, action="append", help="benchmark only cells of these head dims")
    ap.add_argument("--full-bench", action="store_true", help="with --quick: the quick correctness set, the full grid")
    ap.add_argument("--no-triton", action="store_true", help="leave flashtile's triton backend out of the benchmark")
    args = ap.parse_args()
    globals()["CASE_TIMEOUT"] = args.case_timeout
    globals()["HEADDIMS"] = args.headdim
    globals()["WITH_TRITON"] = not args.no_triton
    hopper.SMALL_ROWS = 0  # the public-API check runs the Gluon kernel, not the small-call Triton route
    import triton

    log(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    reason = hopper.backend.available()
    if reason:
        log(f"FAIL hopper backend unavailable: {reason}")
        return 1
    from flashtile.backends.hopper import configs

    log(f"default configs: {', '.join(f'd={d}: {configs.config(d)}' for d in configs.HEADDIMS)}")
    variants = [("", {})] + [_parse_variant(v) for v in args.variant]
    passed, failed = [], []
    for i, (label, ov) in enumerate(variants):
        try:
            ok = run_correctness(args.quick if i == 0 else True, ov, label or "default")
            if ok and i == 0:
                with watchdog(CASE_TIMEOUT, "public API check"):
                    run_api_check()
        except Exception as e:  # a compile or launch error is a failure too; show it whole
            import traceback

            traceback.print_exc()
            log(f"FAIL [{label or 'default'}] {type(e).__name__}: {e}")
            ok = False
        (passed if ok else failed).append((label, ov))
        if not ok and not args.keep_going:
            return 1
    log(f"correctness: {len(passed)} variant(s) PASS, {len(failed)} FAIL {[lb or 'default' for lb, _ in failed]}")
    if args.no_bench or not passed:
        return 1 if failed else 0
    variants = passed
    rows = run_bench(args.quick and not args.full_bench, variants)
    keys = ("b", "h", "hk", "s", "d", "causal", "varlen")
    names = list(dict.fromkeys(k for r in rows for k in r if k not in keys))
    print("\nTFLOP/s (bf16 forward; varlen rows: b sequences averaging s tokens)")
    print(f"{'b':>3} {'h':>3} {'hk':>3} {'s':>6} {'d':>4} {'causal':>6} {'varlen':>6} "
          + " ".join(f"{n:>{max(10, len(n))}}" for n in names))  # fmt: skip
    for r in rows:
        vals = " ".join(f"{('-' if r.get(n) is None else r[n]):>{max(10, len(n))}}" for n in names)
        print(f"{r['b']:>3} {r['h']:>3} {r['hk']:>3} {r['s']:>6} {r['d']:>4} {str(r['causal']):>6} "
              f"{str(r['varlen']):>6} {vals}")  # fmt: skip
    out_dir = os.environ.get("OUT")
    if out_dir:
        path = os.path.join(out_dir, "hopper_run.json")
        with open(path, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                       "argv": sys.argv, "rows": rows}, f, indent=1)  # fmt: skip
        log(f"wrote {path}")
    log(f"done in {time.time() - T0:.0f} s (geomean hopper/triton: {_geo(rows, 'hopper', 'triton')})")
    return 1 if failed else 0


def _geo(rows: list[dict], a: str, b: str) -> str:
    r = [x[a] / x[b] for x in rows if x.get(a) and x.get(b)]
    return f"{math.exp(sum(map(math.log, r)) / len(r)):.2f}x" if r else "n/a"


if __name__ == "__main__":
    sys.exit(main())
