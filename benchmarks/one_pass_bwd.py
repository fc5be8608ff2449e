"""The Triton backward's one pass (``triton.launch.ONE_PASS``, issue 16) against its three passes,
and SDPA flash / cuDNN, in one GPU run: small dense calls whose keys fit in one key block.

    PYTHONPATH=src python benchmarks/one_pass_bwd.py [--calls 200] [--repeats 7]

For each shape (bf16; b1 s128 h8 d64 causal is issue 16's row): first the gradients of both
paths against each other and the one-pass path against the fp32 oracle (flash-attn's rule,
``flashtile.testing.compare_with_oracle``); then, alternating the two paths in one process,
the wall time per call of ``flash_attn_func`` forward + backward (``--calls`` back-to-back calls
between synchronisations, median (min-max) of ``--repeats``) and the device time of the backward
alone (``launch.backward`` on saved tensors, CUDA events over 20 back-to-back calls, median of 7),
beside SDPA flash and cuDNN forward + backward. Prints a table last; JSON under ``$OUT`` if set,
else ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

from bench_lean import _sdpa, per_call_us  # noqa: E402

import flashtile  # noqa: E402
from flashtile.backends.triton import launch  # noqa: E402
from flashtile.testing import attention_ref, compare_with_oracle  # noqa: E402

#: (b, s, h, hk, d, causal): issue 16's row first, then other small shapes on one key block
SHAPES = [(1, 128, 8, 8, 64, True), (1, 128, 8, 8, 64, False), (4, 128, 16, 4, 128, True), (2, 77, 16, 16, 128, False),
          (8, 64, 32, 8, 64, True)]  # fmt: skip


def _paths():
    return (("one", True), ("three", False))


def _set(one: bool) -> None:
    launch.ONE_PASS = one
    launch.clear_plans()
    flashtile.interface._FLAT.clear()  # (the flat path's runners hold no backward plan; cleared for symmetry)


def check(b, s, h, hk, d, causal) -> dict:
    torch.manual_seed(b * 1000 + s)
    q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    dout = torch.randn_like(q)
    grads = {}
    for name, one in _paths():
        _set(one)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = flashtile.flash_attn_func(*leaves, causal=causal)
        grads[name] = torch.autograd.grad(out, leaves, dout)
    _set(True)

    def fn(q, k, v):
        return flashtile.flash_attn_func(q, k, v, causal=causal), None

    def oracle(q, k, v, upcast):
        return attention_ref(q, k, v, causal=causal, upcast=upcast)

    compare_with_oracle(fn, oracle, (q, k, v), dout=dout)
    diff = max((a.float() - b_.float()).abs().max().item() for a, b_ in zip(grads["one"], grads["three"], strict=True))
    return {"max_abs_diff_one_vs_three": diff}


def _bwd_device_ms(dout, q, k, v, out, lse, call, n=20, reps=7) -> float:
    for _ in range(3):
        launch.backward(dout, q, k, v, out, lse, call)
    ts = []
    for _ in range(reps):
        a, z = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        launch.backward(dout, q, k, v, out, lse, call)  # queued first: the timed calls are prepared under it
        a.record()
        for _ in range(n):
            launch.backward(dout, q, k, v, out, lse, call)
        z.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(z) / n)
    return statistics.median(ts)


def bench(b, s, h, hk, d, causal, calls, repeats) -> dict:
    import torch.nn.functional as F

    from flashtile.spec import make_call

    torch.manual_seed(0)
    q = torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(b, s, hk, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    g = torch.randn_like(q)
    row = {"shape": f"b{b} s{s} h{h}/{hk} d{d}{' causal' if causal else ''}"}

    def ft_fb():
        torch.autograd.grad(flashtile.flash_attn_func(q, k, v, causal=causal), (q, k, v), g)

    call = make_call(headdim=d, causal=causal)
    with torch.no_grad():
        out, lse = launch.forward(q.detach(), k.detach(), v.detach(), call)
    for rep in range(2):  # alternate, twice: the host's drift shows as a difference between the rounds
        for name, one in _paths():
            _set(one)
            row.setdefault(f"{name}_fwd_bwd_us", []).append(per_call_us(ft_fb, calls, repeats))
            if rep == 0:
                row[f"{name}_bwd_device_ms"] = _bwd_device_ms(g, q.detach(), k.detach(), v.detach(), out, lse, call)
    _set(True)
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    gt = g.transpose(1, 2).contiguous()

    def sd_fb():
        torch.autograd.grad(F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, enable_gqa=hk != h),
                            (qt, kt, vt), gt)  # fmt: skip

    for name, be in (("sdpa_flash", "FLASH_ATTENTION"), ("sdpa_cudnn", "CUDNN_ATTENTION")):
        try:
            with _sdpa(be):
                row[f"{name}_fwd_bwd_us"] = per_call_us(sd_fb, calls, repeats)
        except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported
            row[f"{name}_fwd_bwd_us"] = None
            print(f"  {name}: {type(e).__name__}: {str(e)[:120]}", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()
    rows = []
    for shape in SHAPES:
        c = check(*shape)
        print(f"check {shape}: ok (one vs three: max |diff| {c['max_abs_diff_one_vs_three']:.2e})", flush=True)
        row = bench(*shape, args.calls, args.repeats)
        row.update(c)
        rows.append(row)
        print(json.dumps(row), flush=True)
    import triton

    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
            "date": _dt.datetime.now().isoformat(timespec="seconds")}  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"one_pass_bwd_{meta['gpu'].split()[-1]}_{_dt.datetime.now():%Y%m%d-%H%M}.json")
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)

    def us(x):
        return "-" if not x else f"{x[0]:.1f}"

    print(f"\nforward + backward wall us per call (median of {args.repeats} x {args.calls}; two rounds for ours), "
          f"backward device ms; JSON: {path}")  # fmt: skip
    print("| shape | one pass | three passes | SDPA flash | SDPA cuDNN | one / flash | bwd device one / three |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        one, three = r["one_fwd_bwd_us"], r["three_fwd_bwd_us"]
        fl = r.get("sdpa_flash_fwd_bwd_us")
        ratio = f"{min(x[0] for x in one) / fl[0]:.2f}x" if fl else "-"
        print(f"| {r['shape']} | {' / '.join(us(x) for x in one)} | {' / '.join(us(x) for x in three)} | {us(fl)} | "
              f"{us(r.get('sdpa_cudnn_fwd_bwd_us'))} | {ratio} | "
              f"{r['one_bwd_device_ms'] * 1e3:.1f} / {r['three_bwd_device_ms'] * 1e3:.1f} us |")  # fmt: skip


if __name__ == "__main__":
    main()
