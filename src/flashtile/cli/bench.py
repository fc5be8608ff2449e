"""``flashtile bench``: time and peak memory of flashtile, standard attention
(:func:`flashtile.testing.standard_attention`) and PyTorch SDPA, each case in a fresh process.

Cases run in children forked from a server process (:func:`_fork_server`, driven by
:class:`CaseRunner`): a clean heap for the CPU memory measurement (peak RSS), a timeout, and
an address-space cap so that a case that runs out of memory fails cleanly.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

try:
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None

from .. import dispatch
from ..interface import flash_attn_func
from ..testing import attention_flops, standard_attention
from . import plot
from ._util import (
    DTYPES,
    GiB,
    MiB,
    chosen_backend,
    default_device,
    device_name,
    fmt_bytes,
    free_memory_bytes,
    sync,
    table,
    versions,
)

METHODS = ("flashtile", "standard", "sdpa")
MODES = ("fwd", "fwd_bwd")
MEMORY_NOTE = {
    "cuda": "peak memory = torch.cuda.max_memory_allocated() during one run, minus the inputs",
    "cpu": "peak memory = growth of peak RSS (VmHWM) during one run in a fresh process, over the inputs",
}


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)


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
    dtype = DTYPES[c["dtype"]]
    b, h, d, s, causal = c["batch"], c["heads"], c["headdim"], c["seqlen"], c["causal"]
    grad = c["mode"] == "fwd_bwd"
    if c.get("threads"):  # --threads: every method with this many threads (the torch engine too)
        torch.set_num_threads(c["threads"])
        os.environ["FLASHTILE_TORCH_THREADS"] = str(c["threads"])
    result: dict = {"status": "ok", "threads": torch.get_num_threads()}
    if c["method"] == "flashtile":
        fwd = lambda q, k, v: flash_attn_func(q, k, v, causal=causal)
        result["backend"] = chosen_backend(device, dtype, batch=b, seqlen=s, nheads=h, headdim=d, causal=causal,
                                           backend=c.get("backend") or "auto")  # fmt: skip
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
        sync(device)
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                step(*inputs)
                sync(device)
                result["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device) - base
            else:
                if isolated:
                    _cap_address_space(c["max_mem_bytes"])
                with _CpuPeak() as peak:
                    step(*inputs)
                result["peak_mem_bytes"] = peak.peak
            times = []
            for _ in range(c["repeats"]):
                sync(device)
                t0 = time.perf_counter()
                step(*inputs)
                sync(device)
                times.append((time.perf_counter() - t0) * 1e3)
        except Exception as e:  # noqa: BLE001 - classified and reported
            if not _is_oom(e):
                raise
            where = f"over the {fmt_bytes(c['max_mem_bytes'])} cap" if device.type == "cpu" else "on the device"
            return {"status": "oom", "note": f"out of memory {where}"}
    result["times_ms"] = times
    result["time_ms"] = statistics.median(times)
    result["time_min_ms"], result["time_max_ms"] = min(times), max(times)
    return result


#: Repeats whose (max - min) / median exceeds this are flagged in the table ("!") and warned about.
SPREAD_WARN = 0.25


def spread(row: dict) -> float:
    """(max - min) / median of a row's repeats (0 with fewer than two)."""
    t = row.get("times_ms") or []
    return (max(t) - min(t)) / statistics.median(t) if len(t) > 1 and statistics.median(t) > 0 else 0.0


def _cap_address_space(max_bytes: int) -> None:
    """Limit this process's virtual memory to what it uses now + ``max_bytes`` + 512 MiB of slack."""
    if resource is None:  # pragma: no cover - Windows
        return
    try:
        _, hard = resource.getrlimit(resource.RLIMIT_AS)
        limit = _rss_status("VmSize") + int(max_bytes) + 512 * MiB
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (OSError, ValueError):
        pass  # not Linux, or not allowed: run uncapped


def _fork_server() -> None:
    """``python -c 'from flashtile.cli.bench import _fork_server; _fork_server()'``: reads one request per
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
            code = "from flashtile.cli.bench import _fork_server; _fork_server()"
            self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         text=True)  # fmt: skip

    def run(self, case: dict, timeout: float | None) -> dict:
        """Run one case (a :func:`bench_case` dict) in a fresh child; its result dict."""
        if self.proc is None:  # pragma: no cover - Windows
            return bench_case(case)
        self.proc.stdin.write(json.dumps({"case": case, "timeout": timeout}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the bench's fork server exited (code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        """Stop the fork server."""
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
    """The ``bench`` command: 0 when every case ran (or was skipped), 1 when one errored, 2 on bad options."""
    device = torch.device(args.device or default_device())  # a usable device: checked by cli.main
    if args.plot and not plot.have_matplotlib():
        print("error: --plot needs matplotlib: pip install 'flashtile[bench]' (or pip install matplotlib)",
              file=sys.stderr)  # fmt: skip
        return 2
    if args.repeats is None:
        args.repeats = 3 if device.type == "cpu" else 20
    if args.repeats < 1:
        print("error: --repeats must be >= 1", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    free = free_memory_bytes(device)
    cap_gb = args.max_mem_gb if args.max_mem_gb is not None else 0.4 * free / GiB
    meta = {
        "device": device_name(device),
        "device_type": device.type,
        "versions": versions(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "args": {k: v for k, v in vars(args).items() if k not in ("func",)},
        "max_mem_gb": round(cap_gb, 3),
        "memory_method": MEMORY_NOTE[device.type if device.type == "cuda" else "cpu"],
    }
    print(f"flashtile bench on {meta['device']}: {args.dtype}, batch {args.batch}, heads {args.heads}, "
          f"headdim {args.headdim}, {'causal' if args.causal else 'not causal'}, median of {args.repeats}")  # fmt: skip
    print(f"memory cap per case: {cap_gb:.1f} GiB (--max-mem-gb; default 40% of free memory)")
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        print("error: --threads must be >= 1", file=sys.stderr)
        return 2
    if threads:
        print(f"threads: {threads} for every method (--threads)")
    base = dict(device=str(device), dtype=args.dtype, batch=args.batch, heads=args.heads, headdim=args.headdim,
                causal=args.causal, repeats=args.repeats, max_mem_bytes=int(cap_gb * GiB), backend=args.backend,
                threads=threads)  # fmt: skip
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
            elif method == "standard" and score_bytes > cap_gb * GiB:
                row.update(status="skipped",
                           note=f"score matrix alone needs {fmt_bytes(score_bytes)} > {fmt_bytes(cap_gb * GiB)} cap")
            else:
                case = {**base, "seqlen": s, "mode": mode, "method": method}
                row.update(runner.run(case, args.timeout_per_case))
            if row["status"] == "ok":
                row["tflops"] = attention_flops(args.batch, args.heads, s, args.headdim, args.causal, mode) / (
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
    noisy = [r for r in rows if r["status"] == "ok" and spread(r) > SPREAD_WARN]
    if noisy:
        print(f"warning: in {len(noisy)} case(s) (marked !) the repeats differ by more than {SPREAD_WARN:.0%} of "
              "their median: the machine is probably busy (another process competing for the CPU cores or the "
              "GPU); compare times with care, or rerun with more --repeats on a quieter machine")  # fmt: skip
    rc = 0
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(meta, f, indent=2)
        print(f"wrote {args.json}")
    if args.plot:
        plot.plot_bench(meta, args.plot)
        print(f"wrote {args.plot}")
    if any(r["status"] == "error" for r in rows):
        rc = 1
    return rc


def format_bench_table(rows: list[dict], markdown: bool = False) -> str:
    """The bench rows as a text (or markdown) table, with each time relative to SDPA's."""
    sdpa = {(r["mode"], r["seqlen"]): r.get("time_ms") for r in rows if r["method"] == "sdpa"}
    out = []
    for r in rows:
        name = r["method"] + (f" ({r['backend']})" if r.get("backend") else "")
        if r["status"] == "ok":
            ref = sdpa.get((r["mode"], r["seqlen"]))
            tf = r["tflops"]
            lo, hi = r.get("time_min_ms", r["time_ms"]), r.get("time_max_ms", r["time_ms"])
            flag = " !" if spread(r) > SPREAD_WARN else ""
            out.append([r["mode"], str(r["seqlen"]), name, _ms(r["time_ms"]), f"{_ms(lo)}-{_ms(hi)}{flag}",
                        f"{tf:.3f}" if tf < 10 else f"{tf:.1f}",
                        f"{r['peak_mem_bytes'] / MiB:.1f}", f"{r['time_ms'] / ref:.2f}x" if ref else "-",
                        ""])  # fmt: skip
        else:
            out.append([r["mode"], str(r["seqlen"]), name, "-", "-", "-", "-", "-",
                        f"{r['status'].upper()}: {r.get('note', '')}"])  # fmt: skip
    return table(["mode", "seqlen", "method", "median (ms)", "min-max (ms)", "TFLOP/s", "peak mem (MiB)", "vs sdpa",
                  "note"], out, markdown=markdown)  # fmt: skip


def _ms(t: float) -> str:
    return f"{t:.3f}" if t < 1 else f"{t:.2f}" if t < 10 else f"{t:.1f}"


