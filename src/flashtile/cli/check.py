"""``flashtile check``: parity of every usable backend against the oracle, judged by flash-attn's
tolerance rule (:mod:`flashtile.testing`); exit code 1 on a failure."""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass, field

import torch

from .. import dispatch, testing
from ..interface import flash_attn_func, flash_attn_varlen_func
from ..padding import pad_input
from ..rng import draw_seed, dropout_mask
from ..testing import attention_ref, cu_seqlens, eps_atol, make_alibi, max_err, qkv_inputs
from ._util import DTYPES, default_device, device_name, dname, table


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
    headdim_v: int = 0  # v's head dim; 0 = headdim
    sink: bool = False  # learnable_sink: random per-head logits

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
        dv = f"/{self.headdim_v}" if self.headdim_v else ""
        return f"b{b} {sq}x{sk} h{self.nheads}/{self.nheads_k} d{self.headdim}{dv}{lens}"


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
    Case("headdim 192/128 (v), causal", batch=1, headdim=192, headdim_v=128, seqlen_q=97, seqlen_k=130,
         causal=True),
    Case("headdim 40/72 (v), varlen, GQA", nheads=8, nheads_k=2, headdim=40, headdim_v=72, seqlens_q=(70, 12),
         seqlens_k=(70, 30)),
    Case("sink, causal, GQA", nheads=8, nheads_k=2, causal=True, sink=True),
    Case("sink, sq > sk, window (empty rows)", seqlen_q=203, seqlen_k=97, window=(16, 0), sink=True),
    Case("all options", seqlen_q=113, seqlen_k=203, nheads=6, nheads_k=2, causal=True, window=(48, -1), softcap=3.0,
         alibi="h", sink=True),
)  # fmt: skip
QUICK = ("plain", "causal, sq > sk (empty rows)", "varlen (empty, length-1)", "all options")
QUANTITIES = ("out", "lse", "dq", "dk", "dv")


@dataclass
class CaseResult:
    """The verdict on one case, backend and dtype."""

    backend: str
    dtype: str
    case: Case
    status: str  # PASS | FAIL | SKIP | ERROR
    #: quantity -> (error vs oracle, plain-PyTorch error vs oracle, tolerance)
    errors: dict[str, tuple[float, float, float]] = field(default_factory=dict)
    note: str = ""


class _Inputs:
    """The random inputs of one case in the public layout (dense 4-D, varlen packed 3-D),
    stored in float64 on the CPU, already rounded to the tested dtype."""

    def __init__(self, case: Case, dtype: torch.dtype, seed: int):
        g = torch.Generator().manual_seed(seed)
        b, sq, sk = case.dims()
        h, hk, d = case.nheads, case.nheads_k, case.headdim
        q, k, v = qkv_inputs(b, sq, sk, h, hk, d, torch.float64, "cpu", generator=g)
        dv = case.headdim_v or d
        if dv != d:
            v = torch.randn(b, sk, hk, dv, generator=g, dtype=torch.float64)
        dout = torch.randn(b, sq, h, dv, generator=g, dtype=torch.float64)
        self.sink = torch.randn(h, generator=g) * 2 if case.sink else None
        q, k, v, dout = (t.to(dtype).double() for t in (q, k, v, dout))
        self.slopes = make_alibi(case.alibi, b, h, "cpu", low=0.0, generator=g)
        self.b, self.sq, self.sk = b, sq, sk
        if case.varlen:
            lq, lk = torch.tensor(case.seqlens_q), torch.tensor(case.seqlens_k)
            self.mask_q = torch.arange(sq) < lq.unsqueeze(1)
            self.mask_k = torch.arange(sk) < lk.unsqueeze(1)
            self.idx_q = torch.nonzero(self.mask_q.flatten()).flatten()
            self.idx_k = torch.nonzero(self.mask_k.flatten()).flatten()
            self.cu_q = cu_seqlens(case.seqlens_q, "cpu")
            self.cu_k = cu_seqlens(case.seqlens_k, "cpu")
            q, dout = q[self.mask_q], dout[self.mask_q]
            k, v = k[self.mask_k], v[self.mask_k]
        self.q, self.k, self.v, self.dout = q, k, v, dout


Grads = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _run_flashtile(case: Case, x: _Inputs, dtype: torch.dtype, device: torch.device, seed: int) -> Grads:
    """Forward with return_attn_probs (for lse) and backward through the public API."""
    q, k, v = (t.to(device, dtype, copy=True).requires_grad_() for t in (x.q, x.k, x.v))
    slopes = None if x.slopes is None else x.slopes.to(device)
    kw = dict(dropout_p=case.dropout_p, causal=case.causal, window_size=case.window, softcap=case.softcap,
              alibi_slopes=slopes, return_attn_probs=True,
              learnable_sink=None if x.sink is None else x.sink.to(device))  # fmt: skip
    torch.manual_seed(seed)  # the dropout seed is drawn from torch's generator
    if case.varlen:
        cu_q, cu_k = x.cu_q.to(device), x.cu_k.to(device)
        out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, x.sq, x.sk, **kw)
    else:
        out, lse, _ = flash_attn_func(q, k, v, **kw)
    out.backward(x.dout.to(device, dtype))
    return out, lse, q.grad, k.grad, v.grad


def _run_reference(
    case: Case, x: _Inputs, dtype: torch.dtype, device: torch.device, upcast: bool, keep: torch.Tensor | None
) -> Grads:
    """``attention_ref`` in the public layout: upcast = the oracle, else the same-dtype baseline."""
    q, k, v = (t.to(device, dtype, copy=True).requires_grad_() for t in (x.q, x.k, x.v))
    slopes = None if x.slopes is None else x.slopes.to(device)
    if slopes is not None and dtype == torch.float64:
        slopes = slopes.double()  # an exact ALiBi bias for the float64 oracle
    kw = dict(causal=case.causal, window_size=case.window, softcap=case.softcap, alibi_slopes=slopes,
              dropout_p=case.dropout_p, dropout_mask=keep, upcast=upcast,
              learnable_sink=None if x.sink is None else x.sink.to(device, torch.float64))  # fmt: skip
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
    res = CaseResult(backend, dname(dtype), case, "PASS")
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
    for i, name in enumerate(QUANTITIES):
        factor = testing.FWD_FACTOR if i < 2 else testing.BWD_FACTOR
        err, pt_err = max_err(got[i], ref[i]), max_err(pt[i], ref[i])
        atol = eps_atol(torch.float32 if name == "lse" else dtype, ref[i])  # lse is float32 for every dtype
        tol = testing.tolerance(pt_err, factor, atol)
        res.errors[name] = (err, pt_err, tol)
        if not err <= tol:
            res.status = "FAIL"
    return res


def _check_dtypes(args: argparse.Namespace, device: torch.device) -> list[torch.dtype]:
    if args.dtypes:
        return [DTYPES[d] for d in args.dtypes]
    return [torch.float32] if device.type == "cpu" else [torch.float16, torch.bfloat16]


def run_check(args: argparse.Namespace) -> int:
    """The ``check`` command: 0 when every check passes, 1 on a failure, 2 for an unknown backend."""
    device = torch.device(args.device or default_device())
    dtypes = _check_dtypes(args, device)
    cases = [c for c in CASES if c.name in QUICK] if args.quick else list(CASES)
    report = dict(dispatch.report())
    names = args.backends or [n for n, r in report.items() if r is None]
    print(f"flashtile check on {device} ({device_name(device)}), dtypes {', '.join(map(dname, dtypes))}")
    print(
        f"rule: error vs the oracle (float64 for float32 inputs, float32 otherwise) <= {testing.FWD_FACTOR:g}x "
        f"(grads {testing.BWD_FACTOR:g}x) the error of plain PyTorch in the same dtype + {testing.ATOL_EPS:g} eps; "
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
        for q in QUANTITIES:
            if q not in r.errors:
                cells.append("-")
            else:
                err, pt_err, tol = r.errors[q]
                ratio = err / tol if tol > 0 else (0.0 if err == 0 else math.inf)
                cells.append(f"{err:.1e}/{tol:.1e}" if args.verbose else f"{ratio:.2f}")
        cells.append(r.status + (f" ({r.note})" if r.note else ""))
        rows.append(cells)
    print()
    print(table(["backend", "dtype", "case", "shape", *QUANTITIES, "result"], rows))
    for (bname, dtype_name), rs in skipped.items():
        total = sum(1 for r in results if (r.backend, r.dtype) == (bname, dtype_name))
        notes = sorted({r.note for r in rs})
        print(f"{bname} {dtype_name}: {len(rs)}/{total} cases skipped, not served: {'; '.join(notes)}")
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
