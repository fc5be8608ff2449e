"""Correctness of the Gluon flex backward with an additive score_mod (issue 18: ALiBi and the
relative-bias table, their captured tensors without grad; ``hopper.bwd._bwd_p``'s ``SCORE_MOD``),
one short H200 run: a causal block mask (``BLOCK_SIZE`` 128), the Gluon kernels forced
(``FLASHTILE_FLEX_GLUON=force``, flashtile's built-in route off so that causal + ALiBi is not sent
to the built-in ``alibi_slopes``), out, lse and dq / dk / dv of ``flashtile.flex_attention`` against
the fp32 oracle (``flashtile.testing.compare_with_oracle``, flash-attn's rule); each case asserts
that the Gluon backward ran (``gflex_bwd_run``'s counting wrapper of ``flex_backward``). Stops at
the first failure, printing it (exit 1).

    PYTHONPATH=src python benchmarks/gflex_bwd_alibi_check.py

The timing (FlexAttention in the same run) is ``gflex_bwd_run.py --skip-check --no-d64 --cases alibi``.
"""

from __future__ import annotations

import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import gflex_bwd_run as G  # noqa: E402  (installs the counting wrapper of flex_backward)

from flashtile import create_block_mask, masks  # noqa: E402
from flashtile import flex as flex_mod  # noqa: E402
from flashtile.backends.flex_triton import backend as FTB  # noqa: E402
from flashtile.spec import make_call  # noqa: E402

DEV = G.DEV


def _slopes(h: int, b: int = 0) -> torch.Tensor:
    """ALiBi's geometric slopes 2^(-8 i / h), i = 1..h (a (b, h) copy for b > 0)."""
    s = torch.tensor([2.0 ** (-8.0 * (i + 1) / h) for i in range(h)], device=DEV)
    return s.repeat(b, 1).contiguous() if b else s


def _table(h: int, m: int = 64) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(5)
    return (torch.randn(h, 2 * m - 1, generator=g) * 2.0).to(DEV)


# (score, b, sq, sk, h, hk, d, dtype)
CASES = [
    ("alibi", 1, 1000, 1000, 4, 4, 128, torch.bfloat16),
    ("relative_bias", 1, 1000, 1000, 4, 4, 128, torch.bfloat16),
    ("alibi_bh", 1, 389, 389, 4, 2, 64, torch.bfloat16),  # (b, h) slopes, GQA, a ragged key block
    ("relative_bias", 1, 389, 389, 4, 4, 64, torch.bfloat16),
]


def check(score, b, sq, sk, h, hk, d, dt) -> None:
    sm = {"alibi": lambda: masks.alibi(_slopes(h)), "alibi_bh": lambda: masks.alibi(_slopes(h, b)),
          "relative_bias": lambda: masks.relative_bias(_table(h))}[score]()  # fmt: skip
    bm = create_block_mask(masks.causal, b, None, sq, sk, device=DEV)
    captured = FTB._triton_backward(make_call(headdim=d, block_mask=bm, score_mod=sm))
    if captured != ():
        raise AssertionError(f"the score_mod's tensor needs a gradient or no Triton backward: {captured}")
    # against the oracle, the Gluon backward asserted to have run once (gflex_bwd_run.check)
    G.check("causal", b, sq, sk, h, hk, d, dt, 0.0, score_mod=sm)


def main() -> None:
    t0 = time.perf_counter()
    os.environ[G.ENV] = "force"  # small shapes: the Gluon kernels whatever the row-length rule says
    flex_mod.BUILTIN_ROUTE = False  # causal + ALiBi through the flex kernels, not alibi_slopes
    for case in CASES:
        t1 = time.perf_counter()
        try:
            check(*case)
        except AssertionError as e:
            print(f"FAILED {case[0]} b{case[1]} sq{case[2]} sk{case[3]} h{case[4]}/{case[5]} d{case[6]}: {e}",
                  flush=True)  # fmt: skip
            sys.exit(1)
        print(f"ok {case[0]} b{case[1]} sq{case[2]} sk{case[3]} h{case[4]}/{case[5]} d{case[6]} {str(case[7])[6:]} "
              f"({time.perf_counter() - t1:.0f} s)", flush=True)  # fmt: skip
    print(f"all ok ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
