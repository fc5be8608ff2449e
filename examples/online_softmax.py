"""The online softmax: one streaming pass over blocks gives exactly softmax (and softmax @ V).

FlashAttention never holds a whole row of attention scores. It walks the keys block by block
and keeps, per row, three running quantities:

    m    the largest score seen so far
    l    sum(exp(score - m)) over the scores seen so far
    acc  sum(exp(score - m) * v) over the keys seen so far

When a block raises the maximum from m to m_new, everything accumulated so far is rescaled by
exp(m - m_new). After the last block, softmax(row) = exp(row - m) / l and softmax(row) @ V =
acc / l, with no second pass over the scores. This script checks that numerically, on scores
large enough that the naive exp(x) / sum(exp(x)) overflows.

    python examples/online_softmax.py                 # 4 rows of 10000 scores, blocks of 256
    python examples/online_softmax.py --block 7 --length 50 --trace
"""

from __future__ import annotations

import argparse
import math

import torch


def online_softmax(scores: torch.Tensor, values: torch.Tensor, block: int, trace: bool = False):
    """Stream over ``scores`` (rows, n) and ``values`` (n, d) in blocks of ``block`` keys.

    Returns (m, l, acc): running max, normaliser and un-normalised output per row."""
    rows, n = scores.shape
    m = torch.full((rows,), -math.inf, dtype=scores.dtype)
    l = torch.zeros(rows, dtype=scores.dtype)
    acc = torch.zeros(rows, values.shape[1], dtype=scores.dtype)
    for j0 in range(0, n, block):
        s = scores[:, j0 : j0 + block]
        m_new = torch.maximum(m, s.amax(dim=1))
        alpha = torch.exp(m - m_new)  # rescales what was accumulated under the old max
        p = torch.exp(s - m_new[:, None])  # every entry <= 1: no overflow
        l = l * alpha + p.sum(dim=1)
        acc = acc * alpha[:, None] + p @ values[j0 : j0 + block]
        if trace:
            print(f"  keys [{j0:5d}, {min(j0 + block, n):5d}): m = {m_new[0].item():10.4f}  "
                  f"l = {l[0].item():12.6f}  (rescaled the old sum by {alpha[0].item():.3e})")  # fmt: skip
        m = m_new
    return m, l, acc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--length", type=int, default=10_000, help="scores per row")
    ap.add_argument("--block", type=int, default=256, help="keys per block")
    ap.add_argument("--headdim", type=int, default=16, help="width of V")
    ap.add_argument("--spread", type=float, default=40.0, help="scores are spread * N(0, 1)")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--trace", action="store_true", help="print the running max and sum of row 0 per block")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(args.seed)
    scores = (torch.randn(args.rows, args.length, generator=g, dtype=torch.float64) * args.spread).to(dtype)
    values = torch.randn(args.length, args.headdim, generator=g, dtype=torch.float64).to(dtype)

    print(f"{args.rows} rows x {args.length} scores ({args.dtype}, max score {scores.max().item():.1f}), "
          f"blocks of {args.block} keys")  # fmt: skip
    naive = torch.exp(scores) / torch.exp(scores).sum(dim=1, keepdim=True)
    if not torch.isfinite(naive).all():
        print("naive exp(x) / sum(exp(x)) overflows: "
              f"{(~torch.isfinite(naive)).sum().item()} non-finite entries (why the max is subtracted)")  # fmt: skip

    if args.trace:
        print("row 0, block by block:")
    m, l, acc = online_softmax(scores, values, args.block, trace=args.trace)

    exact = torch.softmax(scores, dim=1)
    streamed = torch.exp(scores - m[:, None]) / l[:, None]
    d_soft = (streamed - exact).abs().max().item()
    d_out = (acc / l[:, None] - exact @ values).abs().max().item()
    d_lse = (m + torch.log(l) - torch.logsumexp(scores, dim=1)).abs().max().item()
    print(f"max |online softmax - torch.softmax|       = {d_soft:.3e}")
    print(f"max |online acc / l - softmax @ V|          = {d_out:.3e}")
    print(f"max |m + log(l) - logsumexp|                = {d_lse:.3e}")
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    ok = max(d_soft, d_out, d_lse) <= tol
    print(f"{'OK' if ok else 'MISMATCH'}: the streaming pass equals softmax (tolerance {tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
