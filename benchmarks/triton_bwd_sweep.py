"""Sweep Triton backward configs on chosen cells (issue 12: no backward cell below FA2).

    PYTHONPATH=src python benchmarks/triton_bwd_sweep.py [--cell b,h,s,d,causal ...] \
        [--cfg M1,N1,M2,N2,W1,S1,W2,S2[,ATOMIC] ...]

For each cell (default: d128 causal 1k, b16 h16, the one cell below FA2): every candidate
``BwdConfig`` of the Triton backward (launched directly with ``config=``) is first checked
against the table's config (gradients within 1e-2 of the largest), then timed alone (bf16,
``do_bench`` median, 2.5x the forward's FLOPs) beside SDPA flash (FA2) and cuDNN in the same
run; the table's own config is timed too (``default``). ``ATOMIC`` 1: the dQ pass fused into the
dK/dV pass with fp32 atomics (``BwdConfig.atomic_dq``). Prints a table; JSON under ``$OUT`` (else
benchmarks/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "src"))

from flashtile.backends.triton import configs, launch  # noqa: E402
from flashtile.spec import make_call  # noqa: E402
from flashtile.testing import attention_flops  # noqa: E402

DEFAULT_CFGS = ["64,128,128,64,8,3,8,3", "64,64,64,64,4,3,4,3", "64,64,64,64,4,2,4,2", "32,64,64,32,4,2,4,2",
                "32,128,128,32,8,2,8,2", "64,128,128,64,8,2,8,2", "32,128,128,32,4,3,4,3", "64,64,128,64,4,3,8,3"]


def run_cell(b: int, h: int, s: int, d: int, causal: int, cfgs: list) -> dict:
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    call = make_call(headdim=d, causal=bool(causal))
    out, lse = launch.forward(q, k, v, call)
    dout = torch.randn_like(out)
    ref = launch.backward(dout, q, k, v, out, lse, call)
    flops = attention_flops(b, h, s, d, bool(causal), mode="bwd")
    row = {"b": b, "h": h, "s": s, "d": d, "causal": bool(causal),
           "default": str(configs.bwd_config(launch.arch(q.device), d, q.dtype, s))}  # fmt: skip

    def bwd(cfg):
        return launch.backward(dout, q, k, v, out, lse, call, config=cfg)

    for cfg in [None, *cfgs]:
        name = "default" if cfg is None else ",".join(
            str(int(x)) for x in (cfg.block_m1, cfg.block_n1, cfg.block_m2, cfg.block_n2, cfg.num_warps1,
                                  cfg.num_stages1, cfg.num_warps2, cfg.num_stages2, cfg.atomic_dq))  # fmt: skip
        try:
            for a, r in zip(bwd(cfg)[:3], ref[:3], strict=True):
                err, big = (a.float() - r.float()).abs().max().item(), r.float().abs().max().item()
                if not err <= 1e-2 * max(big, 1.0):
                    raise AssertionError(f"differs from the default config by {err:.3e}")
            ms = triton.testing.do_bench(lambda cfg=cfg: bwd(cfg), warmup=25, rep=100, return_mode="median")
            row[name] = round(flops / (ms * 1e-3) / 1e12, 1)
        except Exception as e:  # noqa: BLE001 - a candidate that fails is reported, not fatal
            row[name] = None
            print(f"{name}: {type(e).__name__}: {str(e)[:200]}")
    qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_() for x in (q, k, v))
    do = dout.transpose(1, 2)
    for label, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
        with sdpa_kernel(be):
            o = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=bool(causal))
        ms = triton.testing.do_bench(lambda o=o: torch.autograd.grad(o, (qt, kt, vt), do, retain_graph=True),
                                     warmup=25, rep=100, return_mode="median")  # fmt: skip
        row[label] = round(flops / (ms * 1e-3) / 1e12, 1)
    return row


def main() -> int:
    import triton

    ap = argparse.ArgumentParser()
    ap.add_argument("--cell", action="append", default=[], help="b,h,s,d,causal (causal 0/1)")
    ap.add_argument("--cfg", action="append", default=[], help="M1,N1,M2,N2,W1,S1,W2,S2[,ATOMIC]")
    args = ap.parse_args()
    cells = [tuple(int(x) for x in c.split(",")) for c in (args.cell or ["16,16,1024,128,1"])]
    cfgs = [configs.BwdConfig(*(int(x) for x in c.split(","))) for c in (args.cfg or DEFAULT_CFGS)]
    rows = []
    for cell in cells:
        row = run_cell(*cell, cfgs)
        rows.append(row)
        print(" ".join(f"{k}={v}" for k, v in row.items()), flush=True)
    out_dir = os.environ.get("OUT") or os.path.join(HERE, "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "triton_bwd_sweep.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                   "rows": rows}, f, indent=1)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
