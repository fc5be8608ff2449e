"""Helpers shared by the subcommands: dtype names, machine description, formatting, and the one
place where the CLI asks :mod:`flashtile.dispatch` which backend a call would get."""

from __future__ import annotations

import importlib.metadata
import os
import platform
from collections.abc import Sequence

import torch

from .. import __version__, dispatch
from ..spec import Problem, make_call

#: The dtypes the command line accepts, by name.
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
GiB = 2**30
MiB = 2**20


def default_device() -> str:
    """``"cuda"`` when a CUDA device is available, else ``"cpu"``."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def device_problem(text: str) -> str | None:
    """Why ``--device text`` cannot be used on this machine (one line, naming the option), or None.
    The one device check of the command line: :func:`flashtile.cli.main` runs it for every command."""
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        return f"--device {text} is not a device (expected cpu, cuda or cuda:N)"
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return f"--device {text} but CUDA is not available here"
        n = torch.cuda.device_count()
        if device.index is not None and device.index >= n:
            return f"--device {text} but there {'is' if n == 1 else 'are'} {n} CUDA device{'s' * (n != 1)} here"
    elif device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except Exception as e:  # noqa: BLE001 - reported as the reason
            first = (str(e).splitlines() or [""])[0].split(". ")[0][:120]  # the first sentence
            return f"--device {text} is not usable here ({type(e).__name__}: {first})"
    return None


def pkg_version(*names: str) -> str:
    """The installed version of the first of ``names`` that is installed, else ``"not installed"``."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def versions() -> dict[str, str]:
    """Versions of flashtile, Python and the libraries it runs on."""
    return {
        "flashtile": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": pkg_version("triton", "pytorch-triton"),
        "numpy": pkg_version("numpy"),
    }


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    """One line describing ``device``: GPU name, compute capability and memory, or the CPU and its threads."""
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        return f"{p.name} (sm_{p.major}{p.minor}, {p.total_memory / GiB:.0f} GiB)"
    return f"{cpu_model()} ({os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def free_memory_bytes(device: torch.device) -> int:
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
    return 8 * GiB  # unknown platform: assume a modest machine


def fmt_bytes(n: float) -> str:
    """``n`` bytes in the largest binary unit that keeps it >= 1 (``"1.5 GiB"``)."""
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def dname(dtype: torch.dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).replace("torch.", "")


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False) -> str:
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


def chosen_backend(
    device: torch.device,
    dtype: torch.dtype,
    *,
    batch: int = 1,
    seqlen: int = 128,
    nheads: int = 8,
    headdim: int = 64,
    causal: bool = False,
    backend: str = "auto",
) -> str:
    """The backend ``dispatch`` picks, under ``use_backend(backend)``, for a plain dense self-attention
    call of this shape (no dropout, window, softcap or ALiBi). Raises what ``dispatch.choose``
    raises when none serves it.

    The one place the CLI builds a ``Problem`` and a spec and calls ``dispatch.choose``."""
    problem = Problem(batch=batch, seqlen_q=seqlen, seqlen_k=seqlen, nheads=nheads, nheads_k=nheads, headdim=headdim,
                      dtype=dtype, device=device)  # fmt: skip
    spec = make_call(headdim=headdim, causal=causal)
    with dispatch.use_backend(backend):
        return dispatch.choose(problem, spec)
