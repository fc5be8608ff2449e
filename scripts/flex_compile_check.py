"""Compile the flex_triton kernels (backends/flex_triton/kernels.py: forward, dK/dV pass, dQ pass)
for sm_90 on this machine (no GPU needed) for bench_flex.py's mod combinations, with the tile
configs the launcher picks (backends/flex_triton/launch.py), and report shared memory, registers,
spills (ptxas -v), and per innermost SASS loop: instructions / HGMMA / MUFU / local-memory ops.

    PYTHONPATH=src /work/tri36/bin/python scripts/flex_compile_check.py [--only fwd|dkdv|dq] [--cfg ...]

``--cfg fwd=M,N,W,S[,GRID,PARTIAL_FIRST]`` / ``--cfg bwd=M1,N1,M2,N2,W1,S1,W2,S2`` overrides the launcher's choice.
Pointers, strides and sequence lengths are compiled as 16-divisible, as the JIT specialises them
for the contiguous tensors of a real call (16k tokens).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

# (name, mask, mask arg types, score, score arg types, block mask, block-mask block, head dim, grad)
VARIANTS = [
    ("document-16", "document", ("*i64", "i32", "i32"), "no_score", ("i32", "i32", "i32"), True, 128, 128, False),
    ("prefix-lm", "prefix_lm", ("i32", "i32", "i32"), "no_score", ("i32", "i32", "i32"), True, 128, 128, False),
    ("sliding-1k", "sliding_window", ("i32", "i32", "i32"), "no_score", ("i32", "i32", "i32"), True, 128, 128, False),
    ("alibi", "causal", ("i32", "i32", "i32"), "alibi", ("*fp32", "i32", "i32"), True, 128, 128, False),
    ("bias-table", "causal", ("i32", "i32", "i32"), "relative_bias", ("*fp32", "i32", "i32"), True, 128, 128, True),
    ("softcap b64 d64", "prefix_lm", ("i32", "i32", "i32"), "softcap", ("i32", "i32", "fp32"), True, 64, 64, False),
    (
        "bias, no block mask",
        "no_mask",
        ("i32", "i32", "i32"),
        "relative_bias",
        ("*fp32", "i32", "i32"),
        False,
        128,
        128,
        True,
    ),
]


def compile_one(kind: str, v: tuple, cfg: tuple | None) -> dict:
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton_compile_check import _inner_loops, ptxas_and_sass, regs_and_spills

    from flashtile.backends.flex_triton import kernels as K
    from flashtile.backends.flex_triton import launch as L

    name, mask, margs, score, sargs, has_bm, mb, d, grad = v
    kern = {"fwd": K.flex_fwd, "dkdv": K.flex_bwd_dkdv, "dq": K.flex_bwd_dq}[kind]
    if kind == "fwd":
        c = cfg or tuple(vars(L.fwd_cfg("sm90", d, torch.bfloat16, mb, 16384)).values())
        bm, bn, warps, stages = c[:4]
        grid_order, partial_first = (*c[4:6], 0, 0)[:2] if len(c) > 4 else (0, 0)
    else:
        c = cfg or tuple(vars(L.mod_bwd_cfg(L.bwd_cfg("sm90", d, torch.bfloat16, mb, 16384), score)).values())[:8]
        if kind == "dkdv":
            bm, bn, warps, stages = c[0], c[1], c[4], c[5]
        else:
            bm, bn, warps, stages = c[2], c[3], c[6], c[7]
    consts = dict(MASK_MOD=getattr(K, mask), SCORE_MOD=getattr(K, score), HAS_MASK=mask != "no_mask",
                  HAS_SCORE=score != "no_score", HAS_BLOCK_MASK=has_bm, HAS_FULL=has_bm, BM_B=0, BM_H=0,
                  MASK_BLOCK=mb, EVEN=True, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=d, HEAD_DIM=d, UPCAST=False)  # fmt: skip
    if kind == "fwd":
        consts.update(GRID=int(grid_order), PARTIAL_FIRST=bool(partial_first))
    if kind != "fwd":
        consts["SCORE_BWD"] = getattr(K, f"{score}_bwd")
    if kind == "dq":
        g = score if grad else "no"
        consts.update(SCORE_GRAD=getattr(K, f"{g}_grad"), SCORE_GRAD_END=getattr(K, f"{g}_grad_end"), GRAD=grad)
    sig, attrs = {}, {}
    for i, n in enumerate(kern.arg_names):
        if n in consts:
            sig[n] = "constexpr"
        elif n in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ"):
            sig[n] = "*bf16"
        elif n in ("LSE", "DELTA"):
            sig[n] = "*fp32"
        elif n in ("KV_NUM", "KV_IDX", "FULL_NUM", "FULL_IDX", "Q_NUM", "Q_IDX"):
            sig[n] = "*i32"
        elif n == "G0":
            sig[n] = "*fp32" if grad else "i32"
        elif n in ("qk_scale", "sm_scale"):
            sig[n] = "fp32"
        elif n in ("MA0", "MA1", "MA2"):
            sig[n] = margs[int(n[-1])]
        elif n in ("SA0", "SA1", "SA2"):
            sig[n] = sargs[int(n[-1])]
        else:
            sig[n] = "i32"
        if sig[n].startswith("*") or (n.startswith("stride_") or n in ("seqlen_q", "seqlen_k")):
            if n not in consts:
                attrs[(i,)] = [["tt.divisibility", 16]]
    extra = f",g{grid_order},p{int(partial_first)}" if kind == "fwd" else ""
    label = f"{kind:4} {name:20} b{mb} d{d} cfg=({bm},{bn},w{warps},s{stages}{extra})"
    res = {"name": label}
    try:
        k = triton.compile(ASTSource(kern, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=warps, num_stages=stages))  # fmt: skip
    except Exception as e:  # noqa: BLE001 - reported
        res["error"] = f"{type(e).__name__}: {str(e).strip()[-600:]}"
        return res
    res["smem"] = k.metadata.shared
    ttgir = k.asm["ttgir"]
    res["async"] = len(re.findall(r"async_copy_global_to_local", ttgir))
    out, sass = ptxas_and_sass(k)
    res["regs"], (st, ld) = regs_and_spills(out)
    res["spill"] = f"{st}/{ld}" if st >= 0 else "?"
    res["loops"] = " | ".join(_inner_loops(sass))
    if os.environ.get("DUMP"):
        stem = re.sub(r"[^\w.=+-]+", "_", label)
        Path(os.environ["DUMP"]).mkdir(parents=True, exist_ok=True)
        Path(os.environ["DUMP"], f"{stem}.ttgir").write_text(ttgir)
        Path(os.environ["DUMP"], f"{stem}.sass").write_text(sass)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", action="append", choices=["fwd", "dkdv", "dq"])
    ap.add_argument("--variant", action="append", help="substring of a variant name")
    ap.add_argument("--cfg", action="append", default=[], metavar="fwd=M,N,W,S | bwd=M1,N1,M2,N2,W1,S1,W2,S2")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    cfgs = {"fwd": None, "bwd": None}
    for c in args.cfg:
        key, val = c.split("=")
        cfgs[key] = tuple(int(x) for x in val.split(","))
    kinds = args.only or ["fwd", "dkdv", "dq"]
    vs = [v for v in VARIANTS if not args.variant or any(s in v[0] for s in args.variant)]
    jobs = [(kind, v, cfgs["fwd" if kind == "fwd" else "bwd"]) for v in vs for kind in kinds]
    bad = 0
    print(f"{'variant':60} {'smem':>7} {'regs':>4} {'spill st/ld':>11} {'async':>5}  innermost loops: "
          "instructions/HGMMA/MUFU/LDL+STL")  # fmt: skip
    with cf.ProcessPoolExecutor(args.jobs) as ex:
        for r in ex.map(compile_one, *zip(*jobs, strict=True)):
            if "error" in r:
                bad += 1
                print(f"{r['name']:60} FAILED: {r['error']}")
                continue
            print(f"{r['name']:60} {r['smem']:>7} {r['regs']:>4} {r['spill']:>11} {r['async']:>5}  {r['loops']}",
                  flush=True)  # fmt: skip
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
