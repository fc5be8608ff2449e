"""Compile the flex_triton forward kernel (backends/flex_triton/kernels.py) for sm_90 on this
machine (no GPU needed) with a few mod combinations, and report registers and spills.

    /work/tri36/bin/python scripts/flex_compile_check.py
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
#: the launcher's choice (backends/flex_triton/__init__.py); W / ST env vars to try others
WARPS, STAGES = int(os.environ.get("W", 8)), int(os.environ.get("ST", 1))
BWD_WARPS = int(os.environ.get("BW", 8))


def _load():
    path = ROOT / "src" / "flashtile" / "backends" / "flex_triton" / "kernels.py"
    spec = importlib.util.spec_from_file_location("flex_kernels", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules["flex_kernels"] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    K = _load()
    variants = [  # (mask, mask arg types, score, score arg types, block mask, block, d)
        ("document", ("*i64", "i32", "i32"), "relative_bias", ("*fp32", "i32", "i32"), True, 128, 128),
        ("causal", ("i32", "i32", "i32"), "alibi", ("*fp32", "i32", "i32"), True, 128, 128),
        ("sliding_window", ("i32", "i32", "i32"), "no_score", ("i32", "i32", "i32"), True, 128, 64),
        ("prefix_lm", ("i32", "i32", "i32"), "softcap", ("i32", "i32", "fp32"), True, 64, 128),
        ("no_mask", ("i32", "i32", "i32"), "relative_bias", ("*fp32", "i32", "i32"), False, 128, 128),
    ]
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ok = True
    jobs = [(v, "fwd") for v in variants] + [(v, "bwd") for v in variants]
    for (mask, margs, score, sargs, has_bm, block, d), which in jobs:
        kern = K.flex_fwd if which == "fwd" else K.flex_bwd
        sig = {n: "i32" for n in kern.arg_names}
        for n in ("Q", "K", "V", "O", "DO", "DK", "DV"):
            if n in sig:
                sig[n] = "*bf16"
        for n in ("LSE", "DQ", "DELTA"):
            if n in sig:
                sig[n] = "*fp32"
        for n in ("KV_NUM", "KV_IDX", "FULL_NUM", "FULL_IDX", "Q_NUM", "Q_IDX"):
            if n in sig:
                sig[n] = "*i32"
        if "G0" in sig:
            sig["G0"] = "*fp32" if sargs[0].startswith("*") else "i32"
        sig["qk_scale"] = "fp32"
        for n, t in zip(("MA0", "MA1", "MA2"), margs, strict=True):
            sig[n] = t
        for n, t in zip(("SA0", "SA1", "SA2"), sargs, strict=True):
            sig[n] = t
        extra = {} if which == "fwd" else dict(SCORE_BWD=getattr(K, f"{score}_bwd"), GRAD=sargs[0].startswith("*"))
        consts = dict(MASK_MOD=getattr(K, mask), SCORE_MOD=getattr(K, score), HAS_BLOCK_MASK=has_bm, **extra,
                      HAS_FULL=has_bm, BM_B=0, BM_H=0, BLOCK_M=block, BLOCK_N=block, BLOCK_D=d, HEAD_DIM=d,
                      SUB_N=64, SUB_M=64)  # fmt: skip
        for n in consts:
            sig[n] = "constexpr"
        name = f"{which} {mask}+{score} block={block} d={d}"
        try:
            warps = WARPS if which == "fwd" else BWD_WARPS
            k = triton.compile(ASTSource(kern, sig, consts), target=GPUTarget("cuda", 90, 32),
                               options=dict(num_warps=warps, num_stages=STAGES))  # fmt: skip
        except Exception as e:  # noqa: BLE001
            print(f"FAIL {name}: {type(e).__name__}: {str(e)[-400:]}")
            ok = False
            continue
        with tempfile.TemporaryDirectory() as tmp:
            ptx = os.path.join(tmp, "k.ptx")
            Path(ptx).write_text(k.asm["ptx"])
            err = subprocess.run([os.path.join(bin_dir, "ptxas"), "-arch=sm_90a", "-v", ptx, "-o",
                                  os.path.join(tmp, "k.o")], capture_output=True, text=True).stderr  # fmt: skip
        regs = re.search(r"Used (\d+) registers", err)
        spill = re.search(r"(\d+) bytes spill stores", err)
        print(f"ok   {name}: regs={regs.group(1) if regs else '?'} spill={spill.group(1) if spill else '?'} "
              f"smem={k.metadata.shared}")  # fmt: skip
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
