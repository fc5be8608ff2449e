"""``flashtile demo``: ``check``, then a small ``bench`` with a plot."""

from __future__ import annotations

import argparse
import json
import os
import tempfile

from . import plot
from ._util import default_device


def run_demo(args: argparse.Namespace) -> int:
    """Run ``flashtile check`` and a small ``flashtile bench`` (with ``--plot`` when matplotlib is
    installed) on one device; 0 when both pass."""
    from . import main  # the package's entry point, which imports this module

    device = args.device or default_device()
    print("== flashtile demo, step 1/2: check ==")
    rc = main(["check", "--device", device])
    print()
    print("== flashtile demo, step 2/2: bench ==")
    seqlens = args.seqlens or ("512,1024,2048,4096" if device == "cpu" else "1024,2048,4096,8192,16384")
    bench = ["bench", "--device", device, "--seqlens", seqlens]
    if args.repeats:
        bench += ["--repeats", str(args.repeats)]
    if plot.have_matplotlib():
        bench += ["--plot", args.plot]
    else:
        print("(matplotlib is not installed: no plot; pip install 'flashtile[bench]')")
    if getattr(args, "threads", None):
        bench += ["--threads", str(args.threads)]
    with tempfile.TemporaryDirectory() as tmp:
        rows_json = args.json or os.path.join(tmp, "bench.json")
        rc = max(rc, main(bench + ["--json", rows_json]))
        try:
            with open(rows_json) as fh:
                line = takeaway(json.load(fh).get("rows", []))
        except (OSError, ValueError):
            line = None
    print()
    print("demo: " + ("check passed" if rc == 0 else "something failed (see above)"))
    if line:
        print(line)
    return rc


def takeaway(rows: list[dict]) -> str | None:
    """One line from the bench rows: at the longest sequence where flashtile, standard attention
    and SDPA all ran (forward + backward if measured, else forward), the memory flashtile saved
    against standard attention and its time against SDPA's."""
    ok = {(r["mode"], r["seqlen"], r["method"]): r for r in rows if r.get("status") == "ok"}
    for mode in ("fwd_bwd", "fwd"):
        lens = sorted({s for (m, s, _) in ok if m == mode}, reverse=True)
        for s in lens:
            ft, st, sd = (ok.get((mode, s, m)) for m in ("flashtile", "standard", "sdpa"))
            if ft and st and sd:
                saved = st["peak_mem_bytes"] - ft["peak_mem_bytes"]
                ratio = ft["time_ms"] / sd["time_ms"]
                what = "forward + backward" if mode == "fwd_bwd" else "forward"
                return (f"takeaway: at seqlen {s} ({what}) flashtile used {ft['peak_mem_bytes'] / 2**20:.0f} MiB where "
                        f"standard attention used {st['peak_mem_bytes'] / 2**20:.0f} MiB ({saved / 2**20:.0f} MiB "
                        f"saved), and took {ratio:.2f}x the time of PyTorch's SDPA "
                        f"({ft['time_ms']:.1f} vs {sd['time_ms']:.1f} ms)")  # fmt: skip
    return None
