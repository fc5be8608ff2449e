"""Compile the Triton backend's kernels for sm_90 on a machine without a GPU (a quick check that
a kernel change still lowers, not only runs in the interpreter).

Run with a Python that has Triton 3.6 (and torch, for the package imports)::

    PYTHONPATH=src /work/tri36/bin/python scripts/triton_compile_variants.py

It compiles the forward, both backward passes, the decode, merge and append kernels in a few
variants (learnable sinks on and off, v head dim equal to or different from q/k's) and prints
shared memory and registers; exits 1 if any fails to compile.
"""

from __future__ import annotations

import inspect
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from flashtile.backends.triton import bwd, decode, fwd

FLOATS = {"qk_scale", "cap_out", "alibi_mul", "sm_scale", "drop_scale"}


def _sig(fn, pointers: dict[str, str], consts: dict) -> dict:
    """Signature of ``fn``: the named pointers, fp32 for the float scalars, i32 for the rest, and
    constexpr for ``consts`` (pointers left None become constexpr None)."""
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in FLOATS:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _compile(label: str, fn, pointers: dict[str, str], consts: dict, num_warps: int = 4) -> bool:
    pointers, consts = dict(pointers), dict(consts)
    for p in fn.params:  # constexprs left out take their defaults, as a launch binds them
        if p.is_constexpr and p.name not in consts and p.default is not inspect.Parameter.empty:
            consts[p.name] = p.default
    for p in list(pointers):
        if pointers[p] is None:
            pointers.pop(p)
            consts[p] = None
    try:
        k = triton.compile(ASTSource(fn, _sig(fn, pointers, consts), consts), target=GPUTarget("cuda", 90, 32),
                           options=dict(num_warps=num_warps))  # fmt: skip
    except Exception as e:  # noqa: BLE001 - report every variant
        msg = str(e).strip().splitlines()
        print(f"FAIL {label}: {type(e).__name__}: {msg[-1] if msg else ''}")
        return False
    print(f"ok   {label}: smem {k.metadata.shared} B, {k.n_regs if hasattr(k, 'n_regs') else '?'} regs")
    return True


def main() -> int:
    dt = "bf16"
    ok = True
    for d, dv in ((128, 128), (192, 128), (128, 64), (64, 64)):
        for sink in (False, True):
            bd, bdv = max(16, triton.next_power_of_2(d)), max(16, triton.next_power_of_2(dv))
            flags = dict(HAS_WL=False, HAS_WR=True, HAS_SOFTCAP=False, HAS_ALIBI=False, HAS_DROPOUT=False,
                         IS_VARLEN=False, UPCAST=False)  # fmt: skip
            tag = f"d={d}/{dv} sink={int(sink)}"
            ptr = dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", O=f"*{dt}", LSE="*fp32", ALIBI=None, CU_Q=None, CU_K=None,
                       SINK="*fp32" if sink else None)  # fmt: skip
            c = dict(HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=128, BLOCK_N=64, REVERSE_M=True, HAS_SINK=sink, HEAD_DIM_V=dv,
                     BLOCK_DV=bdv, **flags)  # fmt: skip
            ok &= _compile(f"fwd {tag}", fwd._fwd_kernel, ptr, c, 8)
            if sink:
                continue  # the backward kernels do not see the sink
            ptr = dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", DO=f"*{dt}", LSE="*fp32", DELTA="*fp32", DK=f"*{dt}",
                       DV=f"*{dt}", DQ=f"*{dt}", ALIBI=None, CU_Q=None, CU_K=None)  # fmt: skip
            c = dict(HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=64, BLOCK_N=64, ATOMIC_DQ=False, HEAD_DIM_V=dv, BLOCK_DV=bdv,
                     **flags)  # fmt: skip
            ok &= _compile(f"bwd dkdv {tag}", bwd._bwd_dkdv_kernel, ptr, c, 8)
            ptr = dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", DO=f"*{dt}", LSE="*fp32", DELTA="*fp32", DQ=f"*{dt}",
                       ALIBI=None, CU_Q=None, CU_K=None)  # fmt: skip
            c = dict(HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=64, BLOCK_N=64, REVERSE_M=True, HEAD_DIM_V=dv, BLOCK_DV=bdv,
                     **flags)  # fmt: skip
            ok &= _compile(f"bwd dq {tag}", bwd._bwd_dq_kernel, ptr, c, 8)
        for sink in (False, True):
            tag = f"d={d}/{dv} sink={int(sink)}"
            ptr = dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", BT=None, SEQ="*i32", LEFTPAD=None, SLOPES=None, O="*fp32",
                       LSE="*fp32", ERR="*i32", OUT=None, LSE_OUT=None, CNT=None, COS=None, SIN=None,
                       SINK="*fp32" if sink else None)  # fmt: skip
            c = dict(HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=16, BLOCK_N=64, HAS_SOFTCAP=False, HAS_ALIBI=False, HAS_WL=False,
                     HAS_WR=True, HAS_LEFTPAD=False, HAS_BT=False, UPCAST=False, KV_MODE=0, ROT_DIM=0,
                     INTERLEAVED=False, ROT_ALONG=False, HAS_SINK=sink, HEAD_DIM_V=dv, BLOCK_DV=bdv)  # fmt: skip
            ok &= _compile(f"decode {tag}", decode._decode_kernel, ptr, c, 4)
            # the split pieces merged in the kernel (launch_decode.FUSED_MERGE), as the 8k decode runs it
            ptr = dict(Q=f"*{dt}", K=f"*{dt}", V=f"*{dt}", BT=None, SEQ="*i32", LEFTPAD=None, SLOPES=None, O="*fp32",
                       LSE="*fp32", ERR="*i32", OUT=f"*{dt}", LSE_OUT="*fp32", CNT="*i32", COS=None, SIN=None,
                       SINK="*fp32" if sink else None)  # fmt: skip
            c = dict(c, BLOCK_N=128, MERGE=True, MERGE_M=4, SPLIT_CHUNK=16 * 128 // bdv)
            ok &= _compile(f"decode merged {tag}", decode._decode_kernel, ptr, c, 8)
            ok &= _compile(f"decode merged flat {tag}", decode._decode_kernel, ptr, dict(c, MERGE_FLAT=True), 8)
            ptr = dict(O="*fp32", LSE="*fp32", OUT=f"*{dt}", LSE_OUT="*fp32", SINK="*fp32" if sink else None)
            c = dict(HEAD_DIM=dv, BLOCK_S=4, BLOCK_D=bdv, HAS_SINK=sink)
            ok &= _compile(f"merge {tag}", decode._merge_kernel, ptr, c, 4)
        ptr = dict(KN=f"*{dt}", VN=f"*{dt}", K=f"*{dt}", V=f"*{dt}", BT=None, SEQ="*i32", LEFTPAD=None, ERR="*i32",
                   COS=None, SIN=None)  # fmt: skip
        c = dict(HEAD_DIM=d, BLOCK_D=bd, BLOCK_T=16, HAS_LEFTPAD=False, HAS_BT=False, KV_MODE=0, ROT_DIM=0,
                 INTERLEAVED=False, HEAD_DIM_V=dv, BLOCK_DV=bdv)  # fmt: skip
        ok &= _compile(f"append d={d}/{dv}", decode._append_kernel, ptr, c, 4)
    print("all compiled" if ok else "SOME FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
