"""Host time per ``flash_attn_with_kvcache`` call (GPU): where the eager path's microseconds go.

Small decode shape (b = 1, cache 1k, bf16, h = 32, hk = 8, d = 128) so the GPU is never the
bottleneck: wall time per call over a loop = host time. Prints per-call microseconds of the
full call with and without the index read-back, of the kernel wrapper alone, and a cProfile
of the call by own time.

    PYTHONPATH=src python benchmarks/host_overhead_decode.py
"""

from __future__ import annotations

import cProfile
import pstats
import time

import torch

from flashtile import flash_attn_with_kvcache
from flashtile.backends.triton.launch_decode import decode
from flashtile.spec import make_call


def per_call_us(fn, n: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / n * 1e6


def main() -> None:
    b, L, h, hk, d = 1, 1024, 32, 8, 128
    q = torch.randn(b, 1, h, d, device="cuda", dtype=torch.bfloat16)
    kc = torch.randn(b, L, hk, d, device="cuda", dtype=torch.bfloat16)
    vc = torch.randn_like(kc)
    seqlens = torch.full((b,), L - 1, dtype=torch.int32, device="cuda")
    err = torch.zeros(1, dtype=torch.int32, device="cuda")
    spec = make_call(headdim=d, dropout_p=0.0, softmax_scale=None, causal=True, window_size=(-1, -1), softcap=0.0,
                     deterministic=False)  # fmt: skip
    cases = {
        "call, cache_seqlens tensor (read-back)": lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens),
        "call, cache_seqlens int (no read-back)": lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=L - 1),
        "decode() wrapper, split (1 launch)": lambda: decode(q, kc, vc, None, seqlens, None, spec, sn=0,
                                                                        capacity=L, n_index=b, dense=True, err=err),
        "decode() wrapper, 1 split": lambda: decode(q, kc, vc, None, seqlens, None, spec, sn=0, capacity=L,
                                                    n_index=b, dense=True, err=err, num_splits=1),
        "torch.zeros(1) on cuda": lambda: torch.zeros(1, dtype=torch.int32, device="cuda"),
        "SDPA (cuDNN/flash pick)": lambda: torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2), enable_gqa=True),
    }  # fmt: skip
    for name, fn in cases.items():
        print(f"{name:42s} {per_call_us(fn):8.1f} us/call")
    fn = cases["call, cache_seqlens int (no read-back)"]
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(500):
        fn()
    prof.disable()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
