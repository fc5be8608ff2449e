"""The ``flashtile`` command.

    flashtile env     versions, devices, which backends are usable here (and why not)
    flashtile check   parity of every usable backend against the oracle; exit code 1 on a failure
    flashtile bench   time and peak memory: flashtile vs standard attention vs PyTorch SDPA
    flashtile demo    check + a small bench with a plot (about 2 minutes on a 2-core CPU)

``flashtile COMMAND --help`` lists each command's options. The optional dependencies are
tqdm (progress bar) and matplotlib (``--plot``): ``pip install 'flashtile[bench]'``.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

try:
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

from . import __version__, dispatch
from .interface import flash_attn_func, flash_attn_varlen_func
from .padding import pad_input
from .rng import draw_seed, dropout_mask
from .spec import Problem, make_spec
from .testing import attention_ref

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_GiB = 2**30
_MiB = 2**20


# ---------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _int_list(text: str) -> list[int]:
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def _choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        vals = [x for x in text.replace(" ", "").split(",") if x]
        bad = [x for x in vals if x not in choices]
        if not vals or bad:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (comma-separated), got {text!r}")
        return vals

    return parse


def _pkg_version(*names: str) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def _versions() -> dict[str, str]:
    return {
        "flashtile": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _pkg_version("triton", "pytorch-triton"),
        "numpy": _pkg_version("numpy"),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / _GiB:.0f} GiB)"
    return f"{_cpu_model()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def _free_memory_bytes(device: torch.device) -> int:
    """Free memory of the device: MemAvailable for the CPU, cudaMemGetInfo's free for a GPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * _GiB  # unknown platform: assume a modest machine


def _bytes(n: float) -> str:
    for unit, size in (("GiB", _GiB), ("MiB", _MiB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def _dname(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False) -> str:
    """Columns left-aligned for text, right-aligned when every cell parses as a number."""
    cols = list(zip(headers, *rows, strict=True)) if rows else [(h,) for h in headers]

    def numeric(col: Sequence[str]) -> bool:
        cells = [c for c in col[1:] if c not in ("", "-")]
        try:
            return bool(cells) and all(float(c.rstrip("x")) == float(c.rstrip("x")) for c in cells)
        except ValueError:
            return False

    right = [numeric(c) for c in cols]
    widths = [max(len(x) for x in c) for c in cols]

    def fmt(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right, strict=True)]
        return ("| " + " | ".join(out) + " |") if markdown else "  ".join(out).rstrip()

    lines = [fmt(headers)]
    if markdown:
        rules = [("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right, strict=True)]
        lines.append("|" + "|".join(rules) + "|")
    else:
        lines.append("  ".join("-" * w for w in widths))
    lines += [fmt(r) for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# env
# ---------------------------------------------------------------------------------------


def _auto_pick(device_type: str, dtype: torch.dtype) -> str:
    """The backend ``auto`` would pick for a plain call on this device type and dtype."""
    problem = Problem(batch=1, seqlen_q=128, seqlen_k=128, nheads=8, nheads_k=8, headdim=64, dtype=dtype,
                      device=torch.device(device_type))  # fmt: skip
    spec = make_spec(headdim=64, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                     deterministic=False)  # fmt: skip
    with dispatch.use_backend("auto"):
        try:
            return dispatch.choose(problem, spec)
        except Exception as e:  # noqa: BLE001 - reported, not raised
            return f"none ({e})"


def cmd_env(args: argparse.Namespace) -> int:
    p = print
    v = _versions()
    import flashtile

    p(f"flashtile  {v['flashtile']}  ({os.path.dirname(flashtile.__file__)})")
    p(f"python     {v['python']}  ({platform.system()} {platform.machine()})")
    p(f"torch      {v['torch']}  (CUDA build: {torch.version.cuda or 'no'})")
    p(f"triton     {v['triton']}")
    p(f"numpy      {v['numpy']}")
    p("")
    p("devices")
    p(f"  cpu      {_device_name(torch.device('cpu'))}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p(f"  cuda:{i}   {_device_name(torch.device('cuda', i))}")
    else:
        p("  cuda     not available")
    p("")
    p("backends")
    for name, reason in dispatch.report():
        p(f"  {name:8} {'usable' if reason is None else 'not usable: ' + reason}")
    p("")
    raw = os.environ.get(dispatch.ENV_VAR)
    try:
        req = dispatch.requested()
    except ValueError as e:
        req = f"invalid ({e})"
    p(f"{dispatch.ENV_VAR}={raw if raw is not None else '(unset)'}  ->  requested backend: {req}")
    p("auto picks")
    p(f"  cpu  float32   -> {_auto_pick('cpu', torch.float32)}")
    cuda_pick = _auto_pick("cuda", torch.float16)
    note = "" if torch.cuda.is_available() else "   (no CUDA device in this process)"
    p(f"  cuda float16   -> {cuda_pick}{note}")
    return 0


# ---------------------------------------------------------------------------------------
# check: parity against the oracle
# ---------------------------------------------------------------------------------------

#: flash-attn's rule: error vs the high-precision oracle <= FACTOR x the error of a plain
#: PyTorch implementation in the same dtype, + ATOL_EPS x eps(dtype) x max(1, |oracle|).
FWD_FACTOR, BWD_FACTOR, ATOL_EPS = 2.0, 3.0, 4.0


@dataclass(frozen=True)
class Case:
    """One random problem of the check grid. ``seqlens_q``/``seqlens_k`` make it a varlen call."""

    name: str
    batch: int = 2
    seqlen_q: int = 128
    seqlen_k: int = 128
    nheads: int = 4
    nheads_k: int = 4
    headdim: int = 64
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: str = ""  # "" | "h": slopes (nheads,) | "bh": slopes (batch, nheads)
    dropout_p: float = 0.0
    seqlens_q: tuple[int, ...] = ()
    seqlens_k: tuple[int, ...] = ()

    @property
    def varlen(self) -> bool:
        return bool(self.seqlens_q)

    def dims(self) -> tuple[int, int, int]:
        if self.varlen:
            return len(self.seqlens_q), max(self.seqlens_q), max(self.seqlens_k)
        return self.batch, self.seqlen_q, self.seqlen_k

    def shape(self) -> str:
        b, sq, sk = self.dims()
        lens = f" lens q{list(self.seqlens_q)} k{list(self.seqlens_k)}" if self.varlen else ""
        return f"b{b} {sq}x{sk} h{self.nheads}/{self.nheads_k} d{self.headdim}{lens}"


CASES: tuple[Case, ...] = (
    Case("plain"),
    Case("causal", causal=True),
    Case("causal, sq < sk", seqlen_q=97, seqlen_k=203, causal=True),
    Case("causal, sq > sk (empty rows)", seqlen_q=203, seqlen_k=97, causal=True),
    Case("window left", window=(32, -1)),
    Case("window right", window=(-1, 16)),
    Case("window both, sq < sk", seqlen_q=113, seqlen_k=203, window=(40, 8)),
    Case("softcap", softcap=1.5),
    Case("alibi (h,)", alibi="h"),
    Case("alibi (b, h), causal", alibi="bh", causal=True),
    Case("GQA", nheads=8, nheads_k=2),
    Case("MQA, causal", nheads=8, nheads_k=1, causal=True),
    Case("headdim 1", headdim=1, seqlen_q=17, seqlen_k=33),
    Case("headdim 40", headdim=40, seqlen_q=113, seqlen_k=203),
    Case("headdim 128, causal", headdim=128, causal=True),
    Case("headdim 256", batch=1, headdim=256, seqlen_q=64, seqlen_k=80),
    Case("varlen (empty, length-1)", seqlens_q=(37, 0, 1, 64, 5), seqlens_k=(50, 3, 1, 64, 0)),
    Case("varlen, causal, GQA", nheads=8, nheads_k=2, causal=True, seqlens_q=(90, 1, 33), seqlens_k=(40, 7, 33)),
    Case("varlen, window, alibi", window=(16, 4), alibi="bh", seqlens_q=(70, 12), seqlens_k=(70, 30)),
    Case("dropout 0.17, causal", dropout_p=0.17, causal=True),
    Case("all options", seqlen_q=113, seqlen_k=203, nheads=6, nheads_k=2, causal=True, window=(48, -1), softcap=3.0,
         alibi="h"),
)  # fmt: skip
QUICK = ("plain", "causal, sq > sk (empty rows)", "varlen (empty, length-1)", "all options")


@dataclass
class CaseResult:
    backend: str
    dtype: str
    case: Case
    status: str  # PASS | FAIL | SKIP | ERROR
    #: quantity -> (error vs oracle, plain-PyTorch error vs oracle, tolerance)
    errors: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    note: str = ""


def _max_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """max |x - ref|, where equal infinities count as 0 and NaN (or a lone inf) as inf."""
    if x.numel() == 0:
        return 0.0
    x, ref = x.detach().double(), ref.detach().double()
    d = (x - ref).abs()
    d = torch.where(x == ref, torch.zeros_like(d), d)
    return float(torch.nan_to_num(d, nan=math.inf).max())


def _finite_absmax(x: torch.Tensor) -> float:
    x = x.detach().double()
    x = x[torch.isfinite(x)]
    return float(x.abs().max()) if x.numel() else 0.0


class _Inputs:
    """The random inputs of one case in the public layout (dense 4-D, varlen packed 3-D),
    stored in float64 on the CPU, already rounded to the tested dtype."""

    def __init__(self, case: Case, dtype: torch.dtype, seed: int):
        g = torch.Generator().manual_seed(seed)
        b, sq, sk = case.dims()
        h, hk, d = case.nheads, case.nheads_k, case.headdim

        def rnd(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).double()

        q, k, v, dout = rnd(b, sq, h, d), rnd(b, sk, hk, d), rnd(b, sk, hk, d), rnd(b, sq, h, d)
        self.slopes = None
        if case.alibi == "h":
            self.slopes = torch.rand(h, generator=g) * 0.5
        elif case.alibi == "bh":
            self.slopes = torch.rand(b, h, generator=g) * 0.5
        self.b, self.sq, self.sk = b, sq, sk
        if case.varlen:
            lq, lk = torch.tensor(case.seqlens_q), torch.tensor(case.seqlens_k)
            self.mask_q = torch.arange(sq) < lq.unsqueeze(1)
            self.mask_k = torch.arange(sk) < lk.unsqueeze(1)
            self.idx_q = torch.nonzero(self.mask_q.flatten()).flatten()
            self.idx_k = torch.nonzero(self.mask_k.flatten()).flatten()
            self.cu_q = F.pad(lq.cumsum(0), (1, 0)).to(torch.int32)
            self.cu_k = F.pad(lk.cumsum(0), (1, 0)).to(torch.int32)
            q, dout = q[self.mask_q], dout[self.mask_q]
            k, v = k[self.mask_k], v[self.mask_k]
        self.q, self.k, self.v, self.dout = q, k, v, dout


def _run_flashtile(case: Case, x: _Inputs, dtype: torch.dtype, device: torch.device, seed: int):
    """Forward with return_attn_probs (for lse) and backward through the public API."""
    q, k, v = (t.to(device, dtype, copy=True).requires_grad_() for t in (x.q, x.k, x.v))
    slopes = None if x.slopes is None else x.slopes.to(device)
    kw = dict(dropout_p=case.dropout_p, causal=case.causal, window_size=case.window, softcap=case.softcap,
              alibi_slopes=slopes, return_attn_probs=True)  # fmt: skip
    torch.manual_seed(seed)  # the dropout seed is drawn from torch's generator
    if case.varlen:
        cu_q, cu_k = x.cu_q.to(device), x.cu_k.to(device)
        out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, x.sq, x.sk, **kw)
    else:
        out, lse, _ = flash_attn_func(q, k, v, **kw)
    out.backward(x.dout.to(device, dtype))
    return out, lse, q.grad, k.grad, v.grad


def _run_reference(case: Case, x: _Inputs, dtype: torch.dtype, device: torch.device, upcast: bool, keep):
    """``attention_ref`` in the public layout: upcast = the oracle, else the same-dtype baseline."""
    q, k, v = (t.to(device, dtype, copy=True).requires_grad_() for t in (x.q, x.k, x.v))
    slopes = None if x.slopes is None else x.slopes.to(device)
    if slopes is not None and dtype == torch.float64:
        slopes = slopes.double()  # an exact ALiBi bias for the float64 oracle
    kw = dict(causal=case.causal, window_size=case.window, softcap=case.softcap, alibi_slopes=slopes,
              dropout_p=case.dropout_p, dropout_mask=keep, upcast=upcast)  # fmt: skip
    if case.varlen:
        qp = pad_input(q, x.idx_q.to(device), x.b, x.sq)
        kp = pad_input(k, x.idx_k.to(device), x.b, x.sk)
        vp = pad_input(v, x.idx_k.to(device), x.b, x.sk)
        out, lse = attention_ref(qp, kp, vp, query_padding_mask=x.mask_q.to(device),
                                 key_padding_mask=x.mask_k.to(device), **kw)  # fmt: skip
        idx = x.idx_q.to(device)
        out = out.reshape(x.b * x.sq, *out.shape[2:]).index_select(0, idx)
        lse = lse.permute(1, 0, 2).reshape(lse.shape[1], -1).index_select(1, idx)
    else:
        out, lse = attention_ref(q, k, v, **kw)
    out.backward(x.dout.to(device, dtype))
    return out, lse, q.grad, k.grad, v.grad


def check_case(case: Case, backend: str, dtype: torch.dtype, device: torch.device, seed: int) -> CaseResult:
    """Run one case on one backend and judge it with flash-attn's tolerance rule."""
    res = CaseResult(backend, _dname(dtype), case, "PASS")
    x = _Inputs(case, dtype, seed)
    keep = None
    if case.dropout_p > 0:
        torch.manual_seed(seed)
        dseed = int(draw_seed(device))
        keep = dropout_mask(dseed, case.dropout_p, x.b, case.nheads, x.sq, x.sk, device)
    try:
        with dispatch.use_backend(backend):
            got = _run_flashtile(case, x, dtype, device, seed)
    except dispatch.BackendUnavailableError as e:
        res.status, res.note = "SKIP", str(e).split(": ", 1)[-1]
        return res
    except Exception as e:  # noqa: BLE001 - a crash is a failed check, reported in the table
        res.status, res.note = "ERROR", f"{type(e).__name__}: {e}"
        return res
    # The oracle: float64 for float32 inputs (float32 would be exact copy of the baseline), else float32.
    ref_dtype = torch.float64 if dtype == torch.float32 else torch.float32
    ref = _run_reference(case, x, ref_dtype, device, True, keep)
    pt = _run_reference(case, x, dtype, device, False, keep)
    eps = torch.finfo(dtype).eps
    for i, name in enumerate(("out", "lse", "dq", "dk", "dv")):
        factor = FWD_FACTOR if i < 2 else BWD_FACTOR
        e_eps = torch.finfo(torch.float32).eps if name == "lse" else eps
        err, pt_err = _max_err(got[i], ref[i]), _max_err(pt[i], ref[i])
        tol = factor * pt_err + ATOL_EPS * e_eps * max(1.0, _finite_absmax(ref[i]))
        res.errors[name] = (err, pt_err, tol)
        if not err <= tol:
            res.status = "FAIL"
    return res


def _check_dtypes(args: argparse.Namespace, device: torch.device) -> list[torch.dtype]:
    if args.dtypes:
        return [_DTYPES[d] for d in args.dtypes]
    return [torch.float32] if device.type == "cpu" else [torch.float16, torch.bfloat16]


def run_check(args: argparse.Namespace) -> int:
    device = torch.device(args.device or _default_device())
    dtypes = _check_dtypes(args, device)
    cases = [c for c in CASES if c.name in QUICK] if args.quick else list(CASES)
    report = dict(dispatch.report())
    names = args.backends or [n for n, r in report.items() if r is None]
    print(f"flashtile check on {device} ({_device_name(device)}), dtypes {', '.join(map(_dname, dtypes))}")
    print(
        f"rule: error vs the oracle (float64 for float32 inputs, float32 otherwise) <= {FWD_FACTOR:g}x "
        f"(grads {BWD_FACTOR:g}x) the error of plain PyTorch in the same dtype + {ATOL_EPS:g} eps; "
        "columns show error / tolerance (<= 1 passes)"
    )
    unusable = 0
    for name, reason in report.items():
        if name not in names:
            print(f"backend {name}: not checked ({reason or 'not selected'})")
    for name in names:
        if name not in report:
            print(f"backend {name}: unknown (registered: {', '.join(report)})")
            return 2
        if report[name] is not None:
            print(f"backend {name}: FAIL, not usable here: {report[name]}")
            unusable += 1
    names = [n for n in names if report.get(n) is None]
    t0 = time.perf_counter()
    results: list[CaseResult] = []
    for name in names:
        for dtype in dtypes:
            for i, case in enumerate(cases):
                results.append(check_case(case, name, dtype, device, seed=args.seed * 1000 + i))
    elapsed = time.perf_counter() - t0
    rows, skipped = [], {}
    for r in results:
        if r.status == "SKIP":
            skipped.setdefault((r.backend, r.dtype), []).append(r)
            continue
        cells = [r.backend, r.dtype, r.case.name, r.case.shape()]
        for q in ("out", "lse", "dq", "dk", "dv"):
            if q not in r.errors:
                cells.append("-")
            else:
                err, pt_err, tol = r.errors[q]
                ratio = err / tol if tol > 0 else (0.0 if err == 0 else math.inf)
                cells.append(f"{err:.1e}/{tol:.1e}" if args.verbose else f"{ratio:.2f}")
        cells.append(r.status + (f" ({r.note})" if r.note else ""))
        rows.append(cells)
    print()
    print(_table(["backend", "dtype", "case", "shape", "out", "lse", "dq", "dk", "dv", "result"], rows))
    for (bname, dname), rs in skipped.items():
        total = sum(1 for r in results if (r.backend, r.dtype) == (bname, dname))
        notes = sorted({r.note for r in rs})
        print(f"{bname} {dname}: {len(rs)}/{total} cases skipped, not served: {'; '.join(notes)}")
    bad = [r for r in results if r.status in ("FAIL", "ERROR")]
    ran = [r for r in results if r.status != "SKIP"]
    print()
    if bad or unusable:
        extra = f"; {unusable} requested backend(s) not usable" if unusable else ""
        print(f"FAIL: {len(bad)} of {len(ran)} checks failed{extra} ({elapsed:.1f} s)")
        return 1
    if not ran:
        print("FAIL: nothing was checked (no usable backend serves these cases on this device)")
        return 1
    print(f"PASS: {len(ran)} checks on {', '.join(names)} ({elapsed:.1f} s)")
    return 0


# ---------------------------------------------------------------------------------------
# bench: one fresh process per case
# ---------------------------------------------------------------------------------------

METHODS = ("flashtile", "standard", "sdpa")
MODES = ("fwd", "fwd_bwd")
MEMORY_NOTE = {
    "cuda": "peak memory = torch.cuda.max_memory_allocated() during one run, minus the inputs",
    "cpu": "peak memory = growth of peak RSS (VmHWM) during one run in a fresh process, over the inputs",
}


def standard_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """Textbook attention in plain PyTorch: materialises the (seqlen x seqlen) scores and probabilities."""
    scale = q.shape[-1] ** -0.5
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    s = torch.matmul(qt * scale, kt.transpose(-1, -2))
    if causal:
        sq, sk = s.shape[-2:]
        hidden = torch.ones(sq, sk, dtype=torch.bool, device=s.device).triu(sk - sq + 1)
        s = s.masked_fill(hidden, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.matmul(p, vt).transpose(1, 2)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)


def _flops(batch: int, heads: int, seqlen: int, headdim: int, causal: bool, mode: str) -> float:
    f = 4.0 * batch * heads * seqlen * seqlen * headdim
    if causal:
        f /= 2
    return f * (3.5 if mode == "fwd_bwd" else 1.0)


def _rss_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{key} not in /proc/self/status")


def _maxrss_bytes() -> int:
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return ru if sys.platform == "darwin" else ru * 1024  # bytes on macOS, KiB on Linux


class _CpuPeak:
    """Peak resident memory of this process during a block, over its resident memory at the start.

    Linux: resets the kernel's high-water mark (``/proc/self/clear_refs`` = 5) and reads
    ``VmHWM``. Elsewhere (or where that is not allowed): ``ru_maxrss``, which is right in a fresh
    process whose earlier peak was its imports, and reads 0 when the block stayed below that."""

    def __enter__(self) -> _CpuPeak:
        gc.collect()
        self.hwm = False
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _rss_status("VmRSS")
            self.hwm = True
        except OSError:
            self.base = _maxrss_bytes() if resource is not None else 0
        self.peak = 0
        return self

    def __exit__(self, *exc) -> None:
        if self.hwm:
            top = _rss_status("VmHWM")
        else:
            top = _maxrss_bytes() if resource is not None else 0
        self.peak = max(0, top - self.base)


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError":
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("can't allocate memory" in msg or "out of memory" in msg)


def bench_case(c: dict, isolated: bool = False) -> dict:
    """Time and peak memory of one (method, mode, seqlen) case in this process.

    Runs a small warm-up, allocates the inputs, measures memory over one run and then times
    ``repeats`` runs. In an ``isolated`` process on the CPU, the address space is capped at the
    inputs + ``max_mem_bytes`` (+ slack), so a case that needs more fails with a clean "oom"
    instead of swapping or waking the kernel's OOM killer."""
    device = torch.device(c["device"])
    dtype = _DTYPES[c["dtype"]]
    b, h, d, s, causal = c["batch"], c["heads"], c["headdim"], c["seqlen"], c["causal"]
    grad = c["mode"] == "fwd_bwd"
    result: dict = {"status": "ok", "threads": torch.get_num_threads()}
    if c["method"] == "flashtile":
        fwd = lambda q, k, v: flash_attn_func(q, k, v, causal=causal)
        result["backend"] = _chosen_backend(c, device, dtype)
    elif c["method"] == "standard":
        fwd = lambda q, k, v: standard_attention(q, k, v, causal)
    else:
        fwd = lambda q, k, v: _sdpa(q, k, v, causal)

    def make(n: int):
        qkv = [torch.randn(b, n, h, d, device=device, dtype=dtype, requires_grad=grad) for _ in range(3)]
        return (*qkv, torch.randn(b, n, h, d, device=device, dtype=dtype) if grad else None)

    def step(q, k, v, dout) -> None:
        if grad:
            fwd(q, k, v).backward(dout)
            q.grad = k.grad = v.grad = None
        else:
            with torch.no_grad():
                fwd(q, k, v)

    with dispatch.use_backend(c.get("backend") or "auto"):
        step(*make(min(s, 256)))  # warm-up: thread pools, lazy initialisation
        inputs = make(s)
        _sync(device)
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                step(*inputs)
                _sync(device)
                result["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device) - base
            else:
                if isolated:
                    _cap_address_space(c["max_mem_bytes"])
                with _CpuPeak() as peak:
                    step(*inputs)
                result["peak_mem_bytes"] = peak.peak
            times = []
            for _ in range(c["repeats"]):
                _sync(device)
                t0 = time.perf_counter()
                step(*inputs)
                _sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
        except Exception as e:  # noqa: BLE001 - classified and reported
            if not _is_oom(e):
                raise
            where = f"over the {_bytes(c['max_mem_bytes'])} cap" if device.type == "cpu" else "on the device"
            return {"status": "oom", "note": f"out of memory {where}"}
    result["times_ms"] = times
    result["time_ms"] = statistics.median(times)
    return result


def _chosen_backend(c: dict, device: torch.device, dtype: torch.dtype) -> str:
    problem = Problem(batch=c["batch"], seqlen_q=c["seqlen"], seqlen_k=c["seqlen"], nheads=c["heads"],
                      nheads_k=c["heads"], headdim=c["headdim"], dtype=dtype, device=device)  # fmt: skip
    spec = make_spec(headdim=c["headdim"], dropout_p=0.0, softmax_scale=None, causal=c["causal"],
                     window_size=(-1, -1), softcap=0.0, deterministic=False)  # fmt: skip
    with dispatch.use_backend(c.get("backend") or "auto"):
        return dispatch.choose(problem, spec)


def _cap_address_space(max_bytes: int) -> None:
    """Limit this process's virtual memory to what it uses now + ``max_bytes`` + 512 MiB of slack."""
    if resource is None:  # pragma: no cover - Windows
        return
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = _rss_status("VmSize") + int(max_bytes) + 512 * _MiB
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (OSError, ValueError):
        pass  # not Linux, or not allowed: run uncapped


def _fork_server() -> None:
    """``python -c 'from flashtile.cli import _fork_server; _fork_server()'``: reads one request per
    line on stdin (``{"case": ..., "timeout": ...}``), runs each case in a child forked from this
    process (which has imported torch and flashtile but never runs any of it, so the child starts
    clean within milliseconds), and answers one JSON line per request on stdout."""
    import select
    import signal

    out = sys.stdout
    for line in sys.stdin:
        req = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: run the case, write its result, exit
            os.close(r)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            try:
                res = bench_case(req["case"], isolated=True)
            except Exception as e:  # noqa: BLE001 - the parent shows it
                res = {"status": "error", "note": f"{type(e).__name__}: {e}".splitlines()[0][:200]}
            os.write(w, json.dumps(res).encode())
            os._exit(0)
        os.close(w)
        timeout = req.get("timeout")
        ready, _, _ = select.select([r], [], [], timeout)
        if not ready:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            res = {"status": "timeout", "note": f"over --timeout-per-case {timeout:g} s"}
        else:
            chunks = []
            while chunk := os.read(r, 65536):
                chunks.append(chunk)
            _, status = os.waitpid(pid, 0)
            if chunks:
                res = json.loads(b"".join(chunks))
            elif os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL:
                res = {"status": "oom", "note": "killed (out of memory?)"}
            else:
                res = {"status": "error", "note": f"the case's process died ({_exit_text(status)})"}
        os.close(r)
        out.write(json.dumps(res) + "\n")
        out.flush()


def _exit_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"exit code {os.WEXITSTATUS(status)}"


class CaseRunner:
    """Runs bench cases each in a fresh process (forked by :func:`_fork_server`): a clean heap
    for the memory measurement, a timeout, and no harm here when a case runs out of memory.
    Where there is no ``fork`` (Windows), cases run in this process instead."""

    def __init__(self) -> None:
        self.proc = None
        if hasattr(os, "fork"):
            code = "from flashtile.cli import _fork_server; _fork_server()"
            self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True)  # fmt: skip

    def run(self, case: dict, timeout: float | None) -> dict:
        if self.proc is None:  # pragma: no cover - Windows
            return bench_case(case)
        self.proc.stdin.write(json.dumps({"case": case, "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the bench's fork server exited (code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait()
            self.proc = None

    def __enter__(self) -> CaseRunner:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Progress:
    """tqdm when installed, else one line per case on stderr."""

    def __init__(self, total: int, desc: str):
        self.total, self.i = total, 0
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
            print("(pip install tqdm for a progress bar)", file=sys.stderr)
        else:
            self.bar = tqdm(total=total, desc=desc, unit="case", file=sys.stderr, dynamic_ncols=True)

    def start(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label)
        else:
            print(f"[{self.i + 1}/{self.total}] {label} ...", file=sys.stderr, flush=True)

    def done(self) -> None:
        self.i += 1
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_bench(args: argparse.Namespace) -> int:
    device = torch.device(args.device or _default_device())
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available here", file=sys.stderr)
        return 2
    if args.plot and not _have_matplotlib():
        print("error: --plot needs matplotlib: pip install 'flashtile[bench]' (or pip install matplotlib)",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.repeats is None:
        args.repeats = 3 if device.type == "cpu" else 20
    if args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    dtype = _DTYPES[args.dtype]
    free = _free_memory_bytes(device)
    cap_gb = args.max_mem_gb if args.max_mem_gb is not None else 0.4 * free / _GiB
    meta = {
        "device": _device_name(device),
        "device_type": device.type,
        "versions": _versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "args": {k: v for k, v in vars(args).items() if k not in ("func",)},
        "max_mem_gb": round(cap_gb, 3),
        "memory_method": MEMORY_NOTE[device.type if device.type == "cuda" else "cpu"],
    }
    print(f"flashtile bench on {meta['device']}: {args.dtype}, batch {args.batch}, heads {args.heads}, "
          f"headdim {args.headdim}, {'causal' if args.causal else 'not causal'}, median of {args.repeats}")  # fmt: skip
    print(f"memory cap per case: {cap_gb:.1f} GiB (--max-mem-gb; default 40% of free memory)")
    base = dict(device=str(device), dtype=args.dtype, batch=args.batch, heads=args.heads, headdim=args.headdim,
                causal=args.causal, repeats=args.repeats, max_mem_bytes=int(cap_gb * _GiB), backend=args.backend)
    cases = [(s, mode, m) for s in sorted(args.seqlens) for mode in args.mode for m in args.methods]
    rows: list[dict] = []
    gave_up: dict[tuple[str, str], str] = {}
    prog = _Progress(len(cases), "bench")
    runner = CaseRunner()
    try:
        for s, mode, method in cases:
            prog.start(f"{mode} {method} seqlen={s}")
            row = {"seqlen": s, "mode": mode, "method": method, "status": "ok"}
            score_bytes = args.batch * args.heads * s * s * dtype.itemsize
            if (mode, method) in gave_up:
                row.update(status="skipped", note=gave_up[(mode, method)])
            elif method == "standard" and score_bytes > cap_gb * _GiB:
                row.update(status="skipped",
                           note=f"score matrix alone needs {_bytes(score_bytes)} > {_bytes(cap_gb * _GiB)} cap")
            else:
                case = {**base, "seqlen": s, "mode": mode, "method": method}
                row.update(runner.run(case, args.timeout_per_case))
            if row["status"] == "ok":
                row["tflops"] = _flops(args.batch, args.heads, s, args.headdim, args.causal, mode) / (
                    row["time_ms"] * 1e-3) / 1e12  # fmt: skip
            elif row["status"] in ("oom", "timeout") and (mode, method) not in gave_up:
                gave_up[(mode, method)] = f"{row['status']} at seqlen {s}"
            rows.append(row)
            prog.done()
    finally:
        runner.close()
        prog.close()
    meta["rows"] = rows
    print()
    print(MEMORY_NOTE[device.type if device.type == "cuda" else "cpu"] + "; vs sdpa = time / SDPA's time")
    print(format_bench_table(rows, markdown=args.markdown))
    rc = 0
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(meta, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        plot_bench(meta, args.plot)
        print(f"wrote {args.plot}")
    if any(r["status"] == "error" for r in rows):
        rc = 1
    return rc


def format_bench_table(rows: list[dict], markdown: bool = False) -> str:
    sdpa = {(r["mode"], r["seqlen"]): r.get("time_ms") for r in rows if r["method"] == "sdpa"}
    out = []
    for r in rows:
        name = r["method"] + (f" ({r['backend']})" if r.get("backend") else "")
        if r["status"] == "ok":
            ref = sdpa.get((r["mode"], r["seqlen"]))
            tf = r["tflops"]
            out.append([r["mode"], str(r["seqlen"]), name, _ms(r["time_ms"]), f"{tf:.3f}" if tf < 10 else f"{tf:.1f}",
                        f"{r['peak_mem_bytes'] / _MiB:.1f}", f"{r['time_ms'] / ref:.2f}x" if ref else "-", ""])
        else:
            out.append([r["mode"], str(r["seqlen"]), name, "-", "-", "-", "-",
                        f"{r['status'].upper()}: {r.get('note', '')}"])  # fmt: skip
    return _table(["mode", "seqlen", "method", "time (ms)", "TFLOP/s", "peak mem (MiB)", "vs sdpa", "note"], out,
                  markdown=markdown)  # fmt: skip


def _ms(t: float) -> str:
    return f"{t:.3f}" if t < 1 else f"{t:.2f}" if t < 10 else f"{t:.1f}"


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def plot_bench(meta: dict, path: str) -> None:
    """Time and peak memory against sequence length (log-log), one line per method and mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows = meta["rows"]
    colors = {"flashtile": "tab:blue", "standard": "tab:red", "sdpa": "tab:green"}
    styles = {"fwd": ("-", "o"), "fwd_bwd": ("--", "s")}
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.8))
    for method in dict.fromkeys(r["method"] for r in rows):
        for mode in dict.fromkeys(r["mode"] for r in rows):
            rs = [r for r in rows if r["method"] == method and r["mode"] == mode]
            ok = [r for r in rs if r["status"] == "ok"]
            ls, mk = styles.get(mode, ("-", "o"))
            label = f"{method} {mode.replace('_', '+')}"
            color = colors.get(method)
            if ok:
                xs = [r["seqlen"] for r in ok]
                ax_t.plot(xs, [r["time_ms"] for r in ok], ls, marker=mk, color=color, label=label)
                ax_m.plot(xs, [max(r["peak_mem_bytes"], 1) / _MiB for r in ok], ls, marker=mk, color=color,
                          label=label)  # fmt: skip
            for r in rs:
                if r["status"] != "ok" and not r.get("note", "").startswith(("oom at", "timeout at")):
                    for ax in (ax_t, ax_m):
                        ax.axvline(r["seqlen"], color=color, ls=":", lw=1)
                    ax_m.annotate(f"{method}\n{r['status']}", (r["seqlen"], 0.97), xycoords=("data", "axes fraction"),
                                  ha="center", va="top", fontsize=8, color=color)  # fmt: skip
    mem_top = max([r["peak_mem_bytes"] / _MiB for r in rows if r["status"] == "ok"] or [0.0])
    if meta.get("max_mem_gb") and meta["max_mem_gb"] * 1024 < 10 * mem_top:  # the cap, when it is in view
        ax_m.axhline(meta["max_mem_gb"] * 1024, color="gray", ls=":", lw=1)
        ax_m.annotate("memory cap", (0.01, meta["max_mem_gb"] * 1024), xycoords=("axes fraction", "data"),
                      va="bottom", fontsize=8, color="gray")  # fmt: skip
    a = meta["args"]
    seqlens = sorted({r["seqlen"] for r in rows})
    for ax, title, unit in ((ax_t, "time", "ms"), (ax_m, "peak memory", "MiB")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqlens, [f"{s // 1024}k" if s % 1024 == 0 else str(s) for s in seqlens])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(f"{title} ({unit})")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_t.legend(fontsize=8)
    fig.suptitle(f"flashtile vs standard attention vs SDPA on {meta['device']}\n{a['dtype']}, batch {a['batch']}, "
                 f"heads {a['heads']}, headdim {a['headdim']}, {'causal' if a['causal'] else 'not causal'}",
                 fontsize=10)  # fmt: skip
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------------------


def run_demo(args: argparse.Namespace) -> int:
    device = args.device or _default_device()
    print("== flashtile demo, step 1/2: check ==")
    rc = main(["check", "--device", device])
    print()
    print("== flashtile demo, step 2/2: bench ==")
    seqlens = args.seqlens or ("512,1024,2048,4096" if device == "cpu" else "1024,2048,4096,8192,16384")
    bench = ["bench", "--device", device, "--seqlens", seqlens]
    if args.repeats:
        bench += ["--repeats", str(args.repeats)]
    if _have_matplotlib():
        bench += ["--plot", args.plot]
    else:
        print("(matplotlib is not installed: no plot; pip install 'flashtile[bench]')")
    if args.json:
        bench += ["--json", args.json]
    rc = max(rc, main(bench))
    print()
    print("demo: " + ("check passed" if rc == 0 else "something failed (see above)"))
    return rc


# ---------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashtile", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Run 'flashtile COMMAND --help' for a command's options.")  # fmt: skip
    p.add_argument("--version", action="version", version=f"flashtile {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    sp = sub.add_parser("env", help="versions, devices and which backends are usable here")
    sp.set_defaults(func=cmd_env)

    sp = sub.add_parser("check", help="parity of every usable backend against the oracle (exit 1 on failure)")
    sp.add_argument("--device", help="cpu or cuda (default: cuda if available, else cpu)")
    sp.add_argument("--dtypes", type=_choice_list(tuple(_DTYPES)),
                    help="comma-separated (default: float32 on cpu, float16,bfloat16 on cuda)")  # fmt: skip
    sp.add_argument("--backends", type=lambda s: [x for x in s.split(",") if x],
                    help="comma-separated backend names (default: every usable backend)")  # fmt: skip
    sp.add_argument("--quick", action="store_true", help=f"only {len(QUICK)} cases")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("-v", "--verbose", action="store_true", help="show error/tolerance instead of their ratio")
    sp.set_defaults(func=run_check)

    sp = sub.add_parser("bench", help="time and peak memory vs standard attention and SDPA")
    sp.add_argument("--device", help="cpu or cuda (default: cuda if available, else cpu)")
    sp.add_argument("--seqlens", type=_int_list, default=[1024, 2048, 4096, 8192, 16384],
                    help="comma-separated (default 1024,2048,4096,8192,16384)")  # fmt: skip
    sp.add_argument("--batch", type=int, default=1)
    sp.add_argument("--heads", type=int, default=8)
    sp.add_argument("--headdim", type=int, default=64)
    sp.add_argument("--dtype", choices=tuple(_DTYPES), default="float32")
    sp.add_argument("--causal", action="store_true")
    sp.add_argument("--mode", type=_choice_list(MODES), default=list(MODES), help="fwd,fwd_bwd (default both)")
    sp.add_argument("--methods", type=_choice_list(METHODS), default=list(METHODS),
                    help="flashtile,standard,sdpa (default all)")  # fmt: skip
    sp.add_argument("--backend", help="force flashtile's backend (default: auto)")
    sp.add_argument("--repeats", type=int,
                    help="timed runs per case; the median is reported (default 3 on cpu, 20 on cuda)")  # fmt: skip
    sp.add_argument("--max-mem-gb", type=float,
                    help="memory cap per case; standard attention is skipped when its score matrix alone exceeds it "
                         "(default: 40%% of free RAM / GPU memory)")  # fmt: skip
    sp.add_argument("--timeout-per-case", type=float, default=1800.0, help="seconds (default 1800)")
    sp.add_argument("--json", help="write the rows and the machine's description to this file")
    sp.add_argument("--plot", help="write a PNG: time and memory against seqlen (needs matplotlib)")
    sp.add_argument("--markdown", action="store_true", help="print the table as markdown")
    sp.set_defaults(func=run_bench)

    sp = sub.add_parser("demo", help="check + a small bench with a plot (about 2 minutes on a 2-core CPU)")
    sp.add_argument("--device", help="cpu or cuda (default: cuda if available, else cpu)")
    sp.add_argument("--seqlens", help="default 512,1024,2048,4096 on cpu, 1024..16384 on cuda")
    sp.add_argument("--repeats", type=int, help="as in bench (default 3 on cpu, 20 on cuda)")
    sp.add_argument("--plot", default="flashtile_demo.png", help="default flashtile_demo.png")
    sp.add_argument("--json", help="also write the bench rows to this file")
    sp.set_defaults(func=run_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
