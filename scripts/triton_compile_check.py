"""Compile the Triton-language attention kernels for sm_90 on a machine without a GPU.

Run with a Python that has Triton 3.6 and torch (the device's Triton version)::

    PYTHONPATH=src /work/tri36/bin/python scripts/triton_compile_check.py --headdim 256 \
        [--kind fwd|dkdv|dq] [--mask causal] [--softcap] [--cfg fwd=64,64,4,2] [--cfg bwd=...]

For every (kernel, head dim, mask, config) it prints shared memory, registers, spill bytes
(``ptxas -v``), local-memory instructions and MUFU / HGMMA counts in the SASS: the numbers that
explain a slow tile config before it reaches a GPU. Configs default to the sm90 table entries.
Pointers and strides are compiled as 16-byte divisible, as the JIT specialises them for the
contiguous (B, S, H, D) tensors of a real call.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

MASKS = {
    "none": dict(HAS_WL=False, HAS_WR=False),
    "causal": dict(HAS_WL=False, HAS_WR=True),
    "window": dict(HAS_WL=True, HAS_WR=True),
}
POINTERS_FP32 = {"LSE", "DELTA"}
POINTERS = {"Q", "K", "V", "O", "DO", "DK", "DV", "DQ"}


def _bin(tool: str) -> str:
    import triton

    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", tool)


def ptxas_and_sass(k, arch: str = "sm_90a") -> tuple[str, str]:
    """``ptxas -v``'s report and ``cuobjdump -sass``'s listing of a compiled kernel ``k`` (shared by
    the compile-check scripts)."""
    with tempfile.TemporaryDirectory() as tmp:
        ptx = os.path.join(tmp, "k.ptx")
        Path(ptx).write_text(k.asm["ptx"])
        out = subprocess.run([_bin("ptxas"), f"-arch={arch}", "-v", ptx, "-o", os.path.join(tmp, "k.o")],
                             capture_output=True, text=True).stderr  # fmt: skip
        cub = os.path.join(tmp, "k.cubin")
        Path(cub).write_bytes(k.asm["cubin"])
        sass = subprocess.run([_bin("cuobjdump"), "-sass", cub], capture_output=True, text=True).stdout
    return out, sass


def regs_and_spills(ptxas_out: str) -> tuple[int, tuple[int, int]]:
    """(registers, (spill store bytes, spill load bytes)) from a ``ptxas -v`` report (-1 when absent)."""
    m = re.search(r"Used (\d+) registers", ptxas_out)
    regs = int(m.group(1)) if m else -1
    m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_out)
    return regs, ((int(m.group(1)), int(m.group(2))) if m else (-1, -1))


def inner_loop_bodies(sass: str) -> list[list[str]]:
    """The instructions of each innermost loop of a ``cuobjdump -sass`` listing (a backward branch
    whose range holds no other one), in address order."""
    ins = [(int(a, 16), t) for a, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    loops = []
    for a, t in ins:
        m = re.search(r"\bBRA\s+0x([0-9a-f]+)", t)
        if m and int(m.group(1), 16) < a:
            loops.append((int(m.group(1), 16), a))
    inner = [(lo, hi) for lo, hi in loops if not any(lo <= x < y <= hi and (x, y) != (lo, hi) for x, y in loops)]
    return [[t for a, t in ins if lo <= a <= hi] for lo, hi in inner]


def _inner_loops(sass: str) -> list[str]:
    """Per innermost loop of the SASS: its instruction, HGMMA, MUFU and local-memory (spill)
    counts: the hot-loop cost of a variant."""
    out = []
    for body in inner_loop_bodies(sass):
        counts = [sum(1 for t in body if re.search(pat, t)) for pat in (r"HGMMA", r"MUFU", r"\b(?:LDL|STL)\b")]
        out.append("/".join(map(str, [len(body), *counts])))
    return out


def compile_one(kind: str, d: int, mask: str, softcap: bool, cfg: tuple, dtype: str = "bf16") -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from flashtile.backends.triton import bwd, fwd

    fn = {"fwd": fwd._fwd_kernel, "dkdv": bwd._bwd_dkdv_kernel, "dq": bwd._bwd_dq_kernel}[kind]
    bd = max(16, triton.next_power_of_2(d))
    if kind == "fwd":
        bm, bn, warps, stages = cfg
    elif kind == "dkdv":
        bm, bn, _, _, warps, stages, _, _ = cfg[:8]
    else:
        _, _, bm, bn, _, _, warps, stages = cfg[:8]
    consts = dict(HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=bm, BLOCK_N=bn, HAS_SOFTCAP=softcap, HAS_ALIBI=False,
                  HAS_DROPOUT=False, IS_VARLEN=False, UPCAST=dtype == "fp32", ALIBI=None, CU_Q=None, CU_K=None,
                  **MASKS[mask])  # fmt: skip
    if kind != "dkdv":
        consts["REVERSE_M"] = MASKS[mask]["HAS_WR"]
    else:
        consts["ATOMIC_DQ"] = False
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in POINTERS:
            sig[name] = f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in POINTERS_FP32:
            sig[name] = "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "cap_out", "alibi_mul", "sm_scale", "drop_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name.startswith("stride_") and name != "stride_ab":
                attrs[(i,)] = [["tt.divisibility", 16]]
    name = f"{kind} {dtype} d={d} {mask}{'+softcap' if softcap else ''} {cfg}"
    res = {"name": name}
    try:
        k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=warps, num_stages=stages))  # fmt: skip
    except Exception as e:  # noqa: BLE001 - reported
        res["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        return res
    res["smem"] = k.metadata.shared
    out, sass = ptxas_and_sass(k)
    res["regs"], res["spill"] = regs_and_spills(out)
    res["warn"] = sorted({w.split(":")[-1].strip()[:90] for w in re.findall(r"warning.*", out)})
    res["local"] = len(re.findall(r"\b(?:LDL|STL)(?:\.\w+)*\b", sass))
    res["hgmma"] = len(re.findall(r"\bHGMMA\.", sass))
    res["mufu"] = len(re.findall(r"\bMUFU\.", sass))
    res["sass_lines"] = sass.count("\n")
    res["loops"] = " | ".join(_inner_loops(sass))
    if os.environ.get("DUMP"):
        stem = re.sub(r"[^\w.=+-]+", "_", name)
        Path(os.environ["DUMP"]).mkdir(parents=True, exist_ok=True)
        Path(os.environ["DUMP"], f"{stem}.ptx").write_text(k.asm["ptx"])
        Path(os.environ["DUMP"], f"{stem}.sass").write_text(sass)
        Path(os.environ["DUMP"], f"{stem}.ttgir").write_text(k.asm["ttgir"])
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--headdim", type=int, action="append")
    ap.add_argument("--kind", action="append", choices=["fwd", "dkdv", "dq"])
    ap.add_argument("--mask", action="append", choices=list(MASKS))
    ap.add_argument("--softcap", action="store_true", help="softcap variants only")
    ap.add_argument("--both-softcap", action="store_true", help="with and without softcap")
    ap.add_argument("--cfg", action="append", default=[], metavar="fwd=M,N,W,S | bwd=M1,N1,M2,N2,W1,S1,W2,S2")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from flashtile.backends.triton import configs

    dims = args.headdim or [128, 256]
    kinds = args.kind or ["fwd", "dkdv", "dq"]
    masks = args.mask or ["causal"]
    caps = [False, True] if args.both_softcap else [args.softcap]
    cfgs: dict[str, list[tuple]] = {"fwd": [], "bwd": []}
    for c in args.cfg:
        key, val = c.split("=")
        cfgs[key].append(tuple(int(x) for x in val.split(",")))
    jobs = []
    for d in dims:
        b = configs.bucket(max(16, 1 << (d - 1).bit_length()))
        fc = cfgs["fwd"] or [tuple(vars(configs._FWD[("sm90", b)]).values())]
        bc = cfgs["bwd"] or [tuple(vars(configs._BWD[("sm90", b)]).values())[:8]]
        for kind in kinds:
            for cfg in fc if kind == "fwd" else bc:
                for mk in masks:
                    for sc in caps:
                        jobs.append((kind, d, mk, sc, cfg, args.dtype))
    bad = 0
    print(f"{'variant':70} {'smem':>7} {'regs':>4} {'spill st/ld':>12} {'LDL/STL':>7} {'HGMMA':>5} {'MUFU':>5} "
          f"{'SASS':>6}  innermost loops: instructions/HGMMA/MUFU/LDL+STL")  # fmt: skip
    with cf.ProcessPoolExecutor(args.jobs) as ex:
        for r in ex.map(compile_one, *zip(*jobs, strict=True)):
            if "error" in r:
                bad += 1
                print(f"{r['name']:70} FAILED: {r['error']}")
                continue
            sp = f"{r['spill'][0]}/{r['spill'][1]}"
            print(f"{r['name']:70} {r['smem']:>7} {r['regs']:>4} {sp:>12} {r['local']:>7} {r['hgmma']:>5} "
                  f"{r['mufu']:>5} {r['sass_lines']:>6}  {r['loops']}", flush=True)  # fmt: skip
            for w in r["warn"]:
                print(f"    ptxas: {w}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
