"""Compile the split decode kernel for sm_90 as the launcher specialises it for a bf16 decode over an
8k dense cache, h32/8, d128 (BLOCK_N 128, 8 warps, 3 stages): pieces merged by the separate kernel
(no ``MERGE``), merged in the kernel in chunks (``FLAT_MERGE`` False), merged flat (``FLAT_MERGE``
True), and the counting alone (``_MERGE_SYNC_ONLY``, a probe); at b1 (16 pieces, one chunk of 16)
and b8 (2 pieces).

Run with a Python that has Triton 3.6 (the device's version)::

    PYTHONPATH=src /work/tri36/bin/python scripts/decode_merge_compile_check.py [--dump DIR]

Prints, per variant: registers and spill bytes (``ptxas -v``, sm_90a), shared memory, the CTAs an
SM can hold by registers / shared memory / threads (H200: 64K registers, 228 KB shared memory of
which 1 KB is reserved per CTA), the main loop's SASS instructions, and the merging path's (from
the counter's atomic to the end): instructions, barriers, global loads and how many of them come
before its first MUFU (all of them: one memory round trip). Integer arguments are specialised as
the JIT does (1 -> constexpr, multiples of 16 -> divisible by 16), pointers as 16-byte aligned.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from triton_compile_check import _inner_loops, ptxas_and_sass, regs_and_spills  # noqa: E402

SM_REGS, SM_SMEM, SM_THREADS, CTA_RESERVED = 65536, 233472, 2048, 1024


def occupancy(regs: int, smem: int, warps: int) -> tuple[int, int, int]:
    """CTAs per SM allowed by (registers, shared memory, threads) on sm_90."""
    per_warp = -(-regs * 32 // 256) * 256  # registers are allocated per warp in units of 256
    by_regs = SM_REGS // (per_warp * warps) if regs > 0 else 32
    return min(32, by_regs), SM_SMEM // (smem + CTA_RESERVED), SM_THREADS // (32 * warps)


def build(batch: int, merge: str, warps: int = 8, stages: int = 3):
    """(compiled kernel, ptxas report, SASS) of ``_decode_kernel`` for ``merge`` in ("kernel",
    "chunked", "flat", "sync": the counting without the merge, a probe) at batch ``batch`` (b1: 16
    pieces, b8: 2, as ``choose_splits`` picks them)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from flashtile.backends.triton import decode
    from flashtile.backends.triton.launch_decode import merge_layout

    fn = decode._decode_kernel
    splits = 16 if batch == 1 else 2
    fused = merge != "kernel"
    ints = dict(stride_qb=4096, stride_qs=4096, stride_qh=128, stride_kblk=8192 * 1024, stride_kt=1024,
                stride_kh=128, stride_vblk=8192 * 1024, stride_vt=1024, stride_vh=128, stride_btb=0, stride_ro=0,
                n_ro=0, stride_os=batch * 4096, stride_ob=4096, stride_oq=4096, stride_oh=128,
                stride_ls=batch * 32, stride_lb=32, stride_lh=1, stride_ab=0, seqlen_q=1, sn=0, capacity=8192,
                n_index=batch, page=8192, chunk=8192 // splits, Hk=8, G=4, window_left=-1, window_right=0,
                stride_ub=4096 if fused else 0, stride_uq=4096 if fused else 0, stride_uh=128 if fused else 0,
                stride_mb=32 if fused else 0, stride_mh=1 if fused else 0)  # fmt: skip
    ptr = dict(Q="*bf16", K="*bf16", V="*bf16", SEQ="*i32", O="*fp32", LSE="*fp32", ERR="*i32")
    if fused:
        ptr.update(OUT="*bf16", LSE_OUT="*fp32", CNT="*i32")
    consts = dict(HEAD_DIM=128, BLOCK_D=128, BLOCK_M=16, BLOCK_N=128, HAS_SOFTCAP=False, HAS_ALIBI=False,
                  HAS_WL=False, HAS_WR=True, HAS_LEFTPAD=False, HAS_BT=False, UPCAST=False, KV_MODE=0, ROT_DIM=0,
                  INTERLEAVED=False, ROT_ALONG=False, HEAD_DIM_V=128, BLOCK_DV=128)  # fmt: skip
    if fused:
        flat = merge == "flat"
        mm, chunk = merge_layout(4, 16, splits, warps, 128, flat)
        consts.update(MERGE=True, MERGE_M=mm, SPLIT_CHUNK=chunk, MERGE_FLAT=flat, MERGE_SYNC_ONLY=merge == "sync")
    for p in fn.params:  # constexprs left out take their defaults, as a launch binds them
        if p.is_constexpr and p.name not in consts and p.default is not inspect.Parameter.empty:
            consts[p.name] = p.default
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name in ptr:
            sig[name] = ptr[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in ("qk_scale", "cap_out"):
            sig[name] = "fp32"
        elif name in ints:
            if ints[name] == 1:
                sig[name], consts[name] = "constexpr", 1
            else:
                sig[name] = "i32"
                if ints[name] % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        else:  # a pointer the call passes as None
            sig[name], consts[name] = "constexpr", None
    k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=warps, num_stages=stages))  # fmt: skip
    out, sass = ptxas_and_sass(k)
    return k, out, sass, consts["SPLIT_CHUNK"] if fused else 0


def merge_path(sass: str) -> str:
    """Stats of the SASS from the counter's atomic add to the end (the merging program's path)."""
    lines = [t for _, t in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(.*?);", sass)]
    start = next((i for i, t in enumerate(lines) if "ATOMG.E.ADD" in t), None)
    if start is None:
        return "-"
    tail = lines[start:]
    bars = sum(1 for t in tail if "BAR.SYNC" in t)
    ldg = [i for i, t in enumerate(tail) if re.search(r"\bLDG\b", t)]
    mufu = next((i for i, t in enumerate(tail) if "MUFU" in t and "RCP" not in t), len(tail))
    lds = sum(1 for t in tail if re.search(r"\b(?:LDS|STS)\b", t))
    early = sum(1 for i in ldg if i < mufu)
    return f"{len(tail)} instr, {bars} BAR.SYNC, {lds} LDS/STS, {len(ldg)} LDG ({early} before the first EX2)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dump", help="write each variant's SASS and PTX here")
    args = ap.parse_args()
    print(f"{'variant':28} {'regs':>4} {'spill st/ld':>11} {'smem':>7} {'CTAs/SM regs/smem/thr':>22}  "
          f"{'main loop':>9}  merging path")  # fmt: skip
    for batch in (1, 8):
        for merge in ("kernel", "chunked", "flat", "sync"):
            k, rep, sass, chunk = build(batch, merge)
            regs, spill = regs_and_spills(rep)
            occ = occupancy(regs, k.metadata.shared, 8)
            loops = _inner_loops(sass)
            name = f"b{batch} {merge}" + (f" (chunk {chunk})" if chunk else "")
            loop = loops[0].split("/")[0] if loops else "-"
            print(f"{name:28} {regs:>4} {spill[0]:>5}/{spill[1]:<5} {k.metadata.shared:>7} "
                  f"{'/'.join(map(str, occ)):>22}  {loop:>9}  {merge_path(sass)}")  # fmt: skip
            if args.dump:
                Path(args.dump).mkdir(parents=True, exist_ok=True)
                Path(args.dump, f"decode_b{batch}_{merge}.sass").write_text(sass)
                Path(args.dump, f"decode_b{batch}_{merge}.ptx").write_text(k.asm["ptx"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
