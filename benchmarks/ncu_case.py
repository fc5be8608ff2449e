"""One attention call between ``cudaProfilerStart`` / ``cudaProfilerStop``, for Nsight Compute.

    ncu --profile-from-start off --clock-control none --set full -o rep \\
        python benchmarks/ncu_case.py --case bwd128 --who ours

The call runs three times first (compiles, autotuning, cuDNN's plan cache), then once inside the
profiler range: ncu sees only that call's kernels. Cases (bf16 unless named): ``bwd128`` backward
b4 s4k h16 d128, ``bwd128c`` the same causal, ``bwd64`` backward b4 s4k h32 d64, ``fwd128``
forward b1 s16k h16 d128, ``fp8_128`` the FP8 forward of that shape; ``--who ours`` (the routed
flashtile kernels: Gluon on the H200) or ``cudnn`` (SDPA's cuDNN backend; no FP8 there).
``benchmarks/ncu_run.sh`` drives it and prints the reports.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

from flashtile import fp8  # noqa: E402
from flashtile.spec import make_call  # noqa: E402

CASES = {
    # name: (batch, seqlen, heads, headdim, causal, what)
    "bwd128": (4, 4096, 16, 128, False, "bwd"),
    "bwd128c": (4, 4096, 16, 128, True, "bwd"),
    "bwd64": (4, 4096, 32, 64, False, "bwd"),
    "fwd128": (1, 16384, 16, 128, False, "fwd"),
    "fp8_128": (1, 16384, 16, 128, False, "fp8"),
}


def make_fn(case: str, who: str):
    """A zero-argument function running the case's call once."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashtile.backends.hopper import launch, launch_bwd

    b, s, h, d, causal, what = CASES[case]
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    call = make_call(headdim=d, causal=causal)
    if who == "cudnn":
        if what == "fp8":
            raise SystemExit("cuDNN has no FP8 path through SDPA")
        qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_(what == "bwd") for x in (q, k, v))
        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            if what == "fwd":

                def fwd():
                    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                        return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)

                return fwd
            o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        do = torch.randn_like(o)
        return lambda: torch.autograd.grad(o, (qt, kt, vt), do, retain_graph=True)
    if what == "fwd":
        return lambda: launch.forward(q, k, v, call)
    if what == "fp8":
        q8, k8, v8, qd, kd, vd = fp8.quantize(q, k, v)
        call8 = make_call(headdim=d, causal=causal, q_descale=qd, k_descale=kd, v_descale=vd)
        return lambda: launch.forward_fp8(q8, k8, v8, call8)
    out, lse = launch.forward(q, k, v, call)
    dout = torch.randn_like(out)
    return lambda: launch_bwd.backward(dout, q, k, v, out, lse, call)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--case", choices=sorted(CASES), required=True)
    ap.add_argument("--who", choices=("ours", "cudnn"), default="ours")
    ap.add_argument("--bwd-set", default="", help="backward table overrides, e.g. stat_ring=1,fold=1")
    args = ap.parse_args()
    if args.bwd_set:
        sys.path.insert(0, HERE)
        from hopper_bwd_run import patch_table

        patch_table(args.bwd_set)
    fn = make_fn(args.case, args.who)
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    fn()
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()
    print(f"{args.case} {args.who}: done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
