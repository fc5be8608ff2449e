"""``flashtile demo``: ``check``, then a small ``bench`` with a plot."""

from __future__ import annotations

import argparse

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
    if args.json:
        bench += ["--json", args.json]
    rc = max(rc, main(bench))
    print()
    print("demo: " + ("check passed" if rc == 0 else "something failed (see above)"))
    return rc
