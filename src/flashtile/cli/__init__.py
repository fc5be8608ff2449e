"""The ``flashtile`` command: check, benchmark and inspect flashtile on this machine.

    flashtile env     versions, devices, which backends are usable here (and why not)
    flashtile check   parity of every usable backend against the oracle; exit code 1 on a failure
    flashtile bench   time and peak memory: flashtile vs standard attention vs PyTorch SDPA
    flashtile demo    check + a small bench with a plot (about 2 minutes on a 2-core CPU)
    flashtile warmup  compile a grid of Triton kernel variants into Triton's cache ahead of time

``flashtile COMMAND --help`` lists each command's options. The optional dependencies are
tqdm (progress bar) and matplotlib (``--plot``): ``pip install 'flashtile[bench]'``.

One module per command (``env``, ``check``, ``bench`` with ``plot``, ``demo``); ``_util`` holds
the shared formatting, the one ``--device`` check (run by :func:`main` for every command) and
the one call into ``dispatch.choose``. The oracle, the tolerance rule,
standard attention and the FLOP count come from :mod:`flashtile.testing`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from .. import __version__
from ._util import DTYPES, device_problem
from .bench import METHODS, MODES, run_bench
from .check import QUICK, run_check
from .demo import run_demo
from .env import cmd_env
from .warmup import DEFAULT_FEATURES, FEATURE_NAMES, run_warmup

__all__ = ["build_parser", "main"]

#: ``flashtile --help``'s description.
DESCRIPTION = (
    "Check, benchmark and inspect flashtile (FlashAttention as a Python library: exact attention tile by tile, "
    "with flash-attn 2's API) on this machine."
)


def int_list(text: str) -> list[int]:
    """argparse type: comma-separated positive integers."""
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """argparse type: a comma-separated subset of ``choices``."""

    def parse(text: str) -> list[str]:
        vals = [x for x in text.replace(" ", "").split(",") if x]
        bad = [x for x in vals if x not in choices]
        if not vals or bad:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (comma-separated), got {text!r}")
        return vals

    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``flashtile`` argument parser: one subcommand per module of this package."""
    p = argparse.ArgumentParser(prog="flashtile", description=DESCRIPTION,
                                epilog="Run 'flashtile COMMAND --help' for a command's options.")  # fmt: skip
    p.add_argument("--version", action="version", version=f"flashtile {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    p.set_defaults(_commands=sub.choices)  # name -> subparser: main reports unknown options with its usage

    sp = sub.add_parser("env", help="versions, devices and which backends are usable here")
    sp.set_defaults(func=cmd_env)

    sp = sub.add_parser("check", help="parity of every usable backend against the oracle (exit 1 on failure)")
    sp.add_argument("--device", help="cpu or cuda (default: cuda if available, else cpu)")
    sp.add_argument("--dtypes", type=choice_list(tuple(DTYPES)),
                    help="comma-separated (default: float32 on cpu, float16,bfloat16 on cuda)")  # fmt: skip
    sp.add_argument("--backends", type=lambda s: [x for x in s.split(",") if x],
                    help="comma-separated backend names (default: every usable backend)")  # fmt: skip
    sp.add_argument("--quick", action="store_true", help=f"only {len(QUICK)} cases")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("-v", "--verbose", action="store_true", help="show error/tolerance instead of their ratio")
    sp.set_defaults(func=run_check)

    sp = sub.add_parser("bench", help="time and peak memory vs standard attention and SDPA")
    sp.add_argument("--device", help="cpu or cuda (default: cuda if available, else cpu)")
    sp.add_argument("--seqlens", type=int_list, default=[1024, 2048, 4096, 8192, 16384],
                    help="comma-separated (default 1024,2048,4096,8192,16384)")  # fmt: skip
    sp.add_argument("--batch", type=int, default=1)
    sp.add_argument("--heads", type=int, default=8)
    sp.add_argument("--headdim", type=int, default=64)
    sp.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    sp.add_argument("--causal", action="store_true")
    sp.add_argument("--mode", type=choice_list(MODES), default=list(MODES), help="fwd,fwd_bwd (default both)")
    sp.add_argument("--methods", type=choice_list(METHODS), default=list(METHODS),
                    help="flashtile,standard,sdpa (default all)")  # fmt: skip
    sp.add_argument("--backend", help="force flashtile's backend (default: auto)")
    sp.add_argument("--repeats", type=int,
                    help="timed runs per case; median, min and max are reported (default 3 on cpu, 20 on cuda)",
                    )  # fmt: skip
    sp.add_argument("--threads", type=int,
                    help="CPU threads for every method (default: torch's; the torch engine then lowers its own "
                         "count on a busy machine, see README)")  # fmt: skip
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
    sp.add_argument("--threads", type=int, help="as in bench")
    sp.set_defaults(func=run_demo)

    sp = sub.add_parser("warmup", help="compile a grid of Triton kernel variants into Triton's cache ahead of time")
    sp.add_argument("--device", help="cuda (default when available; on cpu there is nothing to compile)")
    sp.add_argument("--headdims", type=int_list, default=[64, 128], help="comma-separated (default 64,128)")
    sp.add_argument("--dtypes", type=choice_list(tuple(DTYPES)), default=["bfloat16", "float16"],
                    help="comma-separated (default bfloat16,float16)")  # fmt: skip
    sp.add_argument("--features", default=DEFAULT_FEATURES,
                    help=f"comma-separated feature sets, features combined with '+' (from {', '.join(FEATURE_NAMES)}; "
                         f"default {DEFAULT_FEATURES})")  # fmt: skip
    sp.set_defaults(func=run_warmup)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The console entry point: run one subcommand and return its exit code (2 with no command,
    or with a ``--device`` that is not usable here; argparse exits with 2 on a bad option)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    commands = vars(args).pop("_commands")
    if unknown:  # with the usage of the command they were given to
        commands.get(getattr(args, "command", None), parser).error(f"unrecognized arguments: {' '.join(unknown)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if getattr(args, "device", None) is not None:  # the one device check, for every command
        why = device_problem(args.device)
        if why:
            print(f"error: {why}", file=sys.stderr)
            return 2
    return int(args.func(args) or 0)
