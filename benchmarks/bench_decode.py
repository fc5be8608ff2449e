"""Decode benchmark (GPU): flash_attn_with_kvcache vs SDPA's backends, against the copy ceiling.

One new token (seqlen_q = 1) per sequence against a cache of ``L`` tokens, bf16, h = 32,
hk = 8, d = 128, batch {1, 8, 64}, cache length {1k, 8k, 32k}, dense and paged (pages of 16
and 256 tokens, block tables shuffled). Achieved bandwidth counts the cache bytes read
(``2 * b * L * hk * d * 2`` for K and V); the ceiling is a device-to-device copy measured in
the same run (bytes read + bytes written). SDPA gets the dense cache as k/v in its
(b, h, s, d) layout (a transposed view, as a server would pass it) with ``enable_gqa=True``.
Medians of ``triton.testing.do_bench``; flashtile is timed eagerly (the default call,
including its one read-back of the index checks) and replayed from a CUDA graph; on dense
caches also ``flash_attn_func(q, k_cache, v_cache)`` (how the Hugging Face integration decodes).

    PYTHONPATH=src python benchmarks/bench_decode.py --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from flashtile import flash_attn_func, flash_attn_with_kvcache


def copy_ceiling_gbs() -> float:
    n = 1 << 30  # 1 GiB each way
    a = torch.empty(n, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = triton.testing.do_bench(lambda: b.copy_(a), warmup=50, rep=300, return_mode="median")
    return 2 * n / ms / 1e6


def graph_ms(fn, rep: int = 200) -> float:
    """Median ms of ``fn`` captured once in a CUDA graph and replayed (no host time)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()  # warm-up (compiles) off the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=25, rep=rep, return_mode="median")


def bench_case(batch: int, L: int, page: int | None, h: int, hk: int, d: int, dtype, splits: int) -> dict:
    g = torch.Generator(device="cuda").manual_seed(batch * 7 + L)
    q = torch.randn(batch, 1, h, d, device="cuda", dtype=dtype, generator=g)
    seqlens = torch.full((batch,), L, dtype=torch.int32, device="cuda")
    if page is None:
        kc = torch.randn(batch, L, hk, d, device="cuda", dtype=dtype, generator=g)
        vc = torch.randn_like(kc)
        bt = None
    else:
        nblk = -(-L // page)
        kc = torch.randn(batch * nblk, page, hk, d, device="cuda", dtype=dtype, generator=g)
        vc = torch.randn_like(kc)
        bt = torch.randperm(batch * nblk, device="cuda", generator=g).view(batch, nblk).to(torch.int32)
    fn = lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, block_table=bt, num_splits=splits)
    ms = triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")
    nbytes = 2 * batch * L * hk * d * q.element_size()
    row = dict(batch=batch, cache_len=L, page=page or 0, flashtile_ms=ms, flashtile_gbs=nbytes / ms / 1e6)
    # the same call captured in a CUDA graph (how servers run decode): no host work, no range read-back
    row["flashtile_graph_ms"] = graph_ms(fn)
    if page is None:  # SDPA peers on the dense cache, and flash_attn_func (the Hugging Face path)
        f = lambda: flash_attn_func(q, kc, vc)
        row["flashtile_func_ms"] = triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median")
        qt = q.transpose(1, 2)
        kt, vt = kc.transpose(1, 2), vc.transpose(1, 2)
        for name, be in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION),
                         ("sdpa_efficient", SDPBackend.EFFICIENT_ATTENTION)):  # fmt: skip
            try:
                with sdpa_kernel(be):
                    f = lambda: torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
                    f()
                    row[f"{name}_ms"] = triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median")
            except Exception as e:  # backend refuses the shape / GQA
                row[f"{name}_ms"] = None
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100]}"
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,8,64")
    ap.add_argument("--lens", default="1024,8192,32768")
    ap.add_argument("--pages", default="0,16,256", help="0 = dense cache")
    ap.add_argument("--splits", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args()
    h, hk, d, dtype = 32, 8, 128, torch.bfloat16
    ceiling = copy_ceiling_gbs()
    rows = []
    for batch in map(int, a.batches.split(",")):
        for L in map(int, a.lens.split(",")):
            for page in map(int, a.pages.split(",")):
                rows.append(bench_case(batch, L, page or None, h, hk, d, dtype, a.splits))
                torch.cuda.empty_cache()
                r = rows[-1]
                peers = " ".join(f"{k[5:-3]}={r[k]:.3f}" for k in r if k.startswith("sdpa") and k.endswith("_ms")
                                 and r[k] is not None)  # fmt: skip
                print(f"b={batch:3d} L={L:6d} page={page:4d} ft={r['flashtile_ms']:.4f} ms "
                      f"graph={r['flashtile_graph_ms']:.4f} ms func={r.get('flashtile_func_ms') or 0:.4f} ms "
                      f"{r['flashtile_gbs']:7.0f} GB/s ({100 * r['flashtile_gbs'] / ceiling:5.1f}% of copy) {peers}",
                      flush=True)  # fmt: skip
    meta = dict(
        gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        copy_ceiling_gbs=ceiling, shape=dict(h=h, hk=hk, d=d, dtype="bfloat16", seqlen_q=1),
    )  # fmt: skip
    os.makedirs(a.out, exist_ok=True)
    path = os.path.join(a.out, f"decode_{torch.cuda.get_device_name().replace(' ', '_')}_{dt.date.today()}.json")
    with open(path, "w") as f:
        json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"\ncopy ceiling {ceiling:.0f} GB/s; wrote {path}")
    print("| batch | cache | page | flashtile ms | GB/s | % copy | graph ms | % copy | SDPA flash ms | cuDNN ms | "
          "efficient ms |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    fmt = lambda x: "n/a" if x is None else f"{x:.4f}"
    nb = lambda r: 2 * r["batch"] * r["cache_len"] * hk * d * 2
    for r in rows:
        print(f"| {r['batch']} | {r['cache_len']} | {r['page'] or 'dense'} | {r['flashtile_ms']:.4f} | "
              f"{r['flashtile_gbs']:.0f} | {100 * r['flashtile_gbs'] / ceiling:.0f}% | {r['flashtile_graph_ms']:.4f} | "
              f"{100 * nb(r) / r['flashtile_graph_ms'] / 1e6 / ceiling:.0f}% | {fmt(r.get('sdpa_flash_ms'))} | "
              f"{fmt(r.get('sdpa_cudnn_ms'))} | {fmt(r.get('sdpa_efficient_ms'))} |")  # fmt: skip


if __name__ == "__main__":
    main()
