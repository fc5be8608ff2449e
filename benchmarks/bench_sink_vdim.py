"""Learnable sinks and a v head dim of its own on the Triton kernels (GPU, bf16): correctness first,
then what each costs.

1. Correctness on small shapes against the fp32 oracle (flash-attn's tolerance rule,
   ``flashtile.testing.compare_with_oracle``): sinks forward + backward (the sink's gradient
   included) dense / varlen / decode-shaped, the KV cache with split-KV merging, and v head dims
   192/128, 128/64, 256/128 (dense, varlen, KV cache). Stops at the first failure, naming it.
2. Sinks on vs off, gpt-oss's attention shape (64 query heads, 8 KV heads, head dim 64, causal),
   seqlen 4k / 8k / 16k: forward and backward kernels (the backend called directly, so autograd's
   host time is not in it; the backward includes the sink's gradient reduction), and decoding
   (``flash_attn_with_kvcache``, one token, batch 8, caches of 4k and 16k, replayed from a CUDA
   graph). Target: sinks cost <= 3%.
3. DeepSeek-V3's 192/128 against the same call with v zero-padded to 192 (what the Hugging Face
   flash path does), 32 heads, causal, seqlen 4k / 8k: forward + backward. Target: 192/128 faster.

Every timing is a median of ``triton.testing.do_bench``; the on/off pairs are measured twice,
interleaved, and the lower median of each kept. Run from the repository root (about 3 minutes,
most of it Triton compiles)::

    PYTHONPATH=src python benchmarks/bench_sink_vdim.py

JSON to ``$OUT/bench_sink_vdim.json`` if ``$OUT`` is set, else ``benchmarks/results/``; a short
table is printed last.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time

import torch
import triton

import flashtile
from flashtile import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from flashtile.dispatch import backends
from flashtile.spec import make_call
from flashtile.testing import attention_ref, compare_with_oracle, cu_seqlens

BF16 = torch.bfloat16
DEV = "cuda"


# ----------------------------------------------------------------------------------------------
# 1. correctness


def _qkv(b, sq, sk, h, hk, d, dv, dtype=BF16):
    q = torch.randn(b, sq, h, d, device=DEV, dtype=dtype)
    k = torch.randn(b, sk, hk, d, device=DEV, dtype=dtype)
    v = torch.randn(b, sk, hk, dv, device=DEV, dtype=dtype)
    return q, k, v


def check_dense(d, dv, sink, causal=True, window=(-1, -1), sq=300, sk=517, h=8, hk=2):
    q, k, v = _qkv(2, sq, sk, h, hk, d, dv)
    s = torch.randn(h, device=DEV) * 2 if sink else None
    inputs = (q, k, v, s) if sink else (q, k, v)

    def fn(q, k, v, *s):
        kw = dict(learnable_sink=s[0]) if s else {}
        out, lse, _ = flash_attn_func(q, k, v, causal=causal, window_size=window, return_attn_probs=True, **kw)
        return out, lse

    def oracle(q, k, v, *s, upcast):
        kw = dict(learnable_sink=s[0]) if s else {}
        return attention_ref(q, k, v, causal=causal, window_size=window, upcast=upcast, **kw)

    compare_with_oracle(fn, oracle, inputs)


def check_varlen(d, dv):
    lens_q, lens_k = [130, 0, 1, 257, 64], [200, 5, 1, 257, 0]
    h, hk = 8, 2
    q = torch.randn(sum(lens_q), h, d, device=DEV, dtype=BF16)
    k = torch.randn(sum(lens_k), hk, d, device=DEV, dtype=BF16)
    v = torch.randn(sum(lens_k), hk, dv, device=DEV, dtype=BF16)
    s = torch.randn(h, device=DEV) * 2
    cu_q, cu_k = cu_seqlens(lens_q, DEV), cu_seqlens(lens_k, DEV)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    def fn(q, k, v, s):
        out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=True,
                                             return_attn_probs=True, learnable_sink=s)  # fmt: skip
        return out, lse

    def oracle(q, k, v, s, upcast):
        outs, lses = [], []
        for n in range(len(lens_q)):
            if lens_q[n]:
                o, lse = attention_ref(q[cq[n] : cq[n + 1]][None], k[ck[n] : ck[n + 1]][None],
                                       v[ck[n] : ck[n + 1]][None], causal=True, upcast=upcast,
                                       learnable_sink=s)  # fmt: skip
                outs.append(o[0])
                lses.append(lse[0])
        return torch.cat(outs), torch.cat(lses, 1)

    compare_with_oracle(fn, oracle, (q, k, v, s))


def check_kvcache(d, dv, sink, num_splits):
    """Prefill, then chunks of 9 new tokens, against a dense cache; num_splits 0 lets the launcher
    split the keys (the merge kernel then adds the sink once)."""
    b, s_len, h, hk, prefill = 4, 700, 8, 2, 600
    q, k, v = _qkv(b, s_len, s_len, h, hk, d, dv, torch.float16)
    sink = torch.randn(h, device=DEV) * 2 + 3 if sink else None
    ref_o, ref_l = attention_ref(q, k, v, causal=True, learnable_sink=sink)
    kc = torch.zeros(b, s_len + 8, hk, d, device=DEV, dtype=torch.float16)
    vc = torch.zeros(b, s_len + 8, hk, dv, device=DEV, dtype=torch.float16)
    outs = []
    for a, e in [(0, prefill)] + [(t, min(t + 9, s_len)) for t in range(prefill, s_len, 9)]:  # chunks of 9
        o, lse = flash_attn_with_kvcache(q[:, a:e], kc, vc, k[:, a:e], v[:, a:e], cache_seqlens=a, causal=True,
                                         num_splits=num_splits, return_softmax_lse=True,
                                         learnable_sink=sink)  # fmt: skip
        outs.append((a, e, o, lse))
    for a, e, o, lse in outs:
        torch.testing.assert_close(o.float(), ref_o[:, a:e].float(), atol=2e-2, rtol=0)
        torch.testing.assert_close(lse, ref_l[:, :, a:e], atol=2e-3, rtol=0)


CHECKS = [
    ("sink dense causal GQA d64", lambda: check_dense(64, 64, True)),
    ("sink dense window d64 (rows without keys)", lambda: check_dense(64, 64, True, False, (32, 0), sq=517, sk=300)),
    ("sink decode-shaped flash_attn_func d64", lambda: check_dense(64, 64, True, sq=4, sk=3000, h=64, hk=8)),
    ("sink varlen causal d64", lambda: check_varlen(64, 64)),
    ("sink kvcache one piece d64", lambda: check_kvcache(64, 64, True, 1)),
    ("sink kvcache split-KV merge d64", lambda: check_kvcache(64, 64, True, 0)),
    ("vdim 192/128 dense causal GQA", lambda: check_dense(192, 128, False)),
    ("vdim 128/64 dense causal", lambda: check_dense(128, 64, False)),
    ("vdim 256/128 dense window", lambda: check_dense(256, 128, False, False, (64, 16))),
    ("vdim 192/128 + sink varlen", lambda: check_varlen(192, 128)),
    ("vdim 192/128 decode-shaped", lambda: check_dense(192, 128, False, sq=2, sk=2000, h=16, hk=2)),
    ("vdim 192/128 kvcache split-KV", lambda: check_kvcache(192, 128, False, 0)),
]


def run_checks() -> list[dict]:
    done = []
    for name, fn in CHECKS:
        t0 = time.time()
        torch.manual_seed(len(done))
        try:
            with flashtile.use_backend("triton"):
                fn()
        except Exception as e:  # noqa: BLE001 - report which check failed, then stop
            print(f"CHECK FAILED: {name}: {type(e).__name__}: {e}", flush=True)
            sys.exit(1)
        done.append(dict(check=name, ok=True, seconds=round(time.time() - t0, 1)))
        print(f"check ok: {name} ({time.time() - t0:.1f} s)", flush=True)
    return done


# ----------------------------------------------------------------------------------------------
# 2. and 3. timings


def ms(fn, rep=100) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=rep, return_mode="median")


def graph_ms(fn, rep=200) -> float:
    """Median ms of ``fn`` captured once in a CUDA graph and replayed (no host time)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return ms(graph.replay, rep)


def paired(off, on, timer=ms) -> tuple[float, float]:
    """(off, on) medians, measured twice interleaved, the lower of each kept."""
    a, b = [], []
    for _ in range(2):
        a.append(timer(off))
        b.append(timer(on))
    return min(a), min(b)


def _sink_prefill(be, s: int, h: int, hk: int, d: int) -> list[dict]:
    q, k, v = _qkv(1, s, s, h, hk, d, d)
    sink = torch.randn(h, device=DEV)
    c_off = make_call(headdim=d, causal=True)
    c_on = make_call(headdim=d, causal=True, learnable_sink=sink)
    f_off, f_on = paired(lambda: be.forward(q, k, v, c_off), lambda: be.forward(q, k, v, c_on))
    out0, lse0 = be.forward(q, k, v, c_off)
    out1, lse1 = be.forward(q, k, v, c_on)
    dout = torch.randn_like(out0)
    b_off, b_on = paired(lambda: be.backward(dout, q, k, v, out0, lse0, c_off),
                         lambda: be.backward(dout, q, k, v, out1, lse1, c_on))  # fmt: skip
    rows = []
    for kind, off, on in (("fwd", f_off, f_on), ("bwd", b_off, b_on)):
        rows.append(dict(kind=kind, seqlen=s, h=h, hk=hk, d=d, causal=True, off_ms=off, on_ms=on,
                         overhead_pct=100 * (on / off - 1)))  # fmt: skip
        print(f"sink {kind} s={s}: off {off:.3f} ms, on {on:.3f} ms ({100 * (on / off - 1):+.1f}%)", flush=True)
    return rows


def _sink_decode(cache: int, b: int, h: int, hk: int, d: int) -> dict:
    q = torch.randn(b, 1, h, d, device=DEV, dtype=BF16)
    kc = torch.randn(b, cache, hk, d, device=DEV, dtype=BF16)
    vc = torch.randn(b, cache, hk, d, device=DEV, dtype=BF16)
    sink = torch.randn(h, device=DEV)
    with flashtile.use_backend("triton"):
        off, on = paired(lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=cache),
                         lambda: flash_attn_with_kvcache(q, kc, vc, cache_seqlens=cache, learnable_sink=sink),
                         graph_ms)  # fmt: skip
    print(f"sink decode b={b} cache={cache}: off {off * 1e3:.1f} us, on {on * 1e3:.1f} us "
          f"({100 * (on / off - 1):+.1f}%)", flush=True)  # fmt: skip
    return dict(kind="decode", seqlen=cache, batch=b, h=h, hk=hk, d=d, off_ms=off, on_ms=on,
                overhead_pct=100 * (on / off - 1))  # fmt: skip


def bench_sinks() -> list[dict]:
    """gpt-oss's attention: 64 query heads, 8 KV heads, head dim 64."""
    be = backends()["triton"]
    rows = []
    for s in (4096, 8192, 16384):
        rows += _sink_prefill(be, s, 64, 8, 64)
    for cache in (4096, 16384):
        rows.append(_sink_decode(cache, 8, 64, 8, 64))
    return rows


def _fwd_bwd_ms(be, q, k, v, call, dv: int) -> tuple[float, float]:
    """(forward ms, backward ms); the output's columns past ``dv`` (v's padding) get no gradient."""
    out, lse = be.forward(q, k, v, call)
    dout = torch.randn_like(out)
    dout[..., dv:] = 0
    return ms(lambda: be.forward(q, k, v, call)), ms(lambda: be.backward(dout, q, k, v, out, lse, call))


def _vdim_case(be, s: int, h: int, d: int, dv: int) -> dict:
    q, k, v = _qkv(1, s, s, h, h, d, dv)
    vpad = torch.nn.functional.pad(v, (0, d - dv))
    call = make_call(headdim=d, causal=True)
    f1, b1 = _fwd_bwd_ms(be, q, k, v, call, dv)
    f2, b2 = _fwd_bwd_ms(be, q, k, vpad, call, dv)
    print(f"vdim s={s}: {d}/{dv} fwd {f1:.3f} bwd {b1:.3f} ms; padded fwd {f2:.3f} bwd {b2:.3f} ms; "
          f"fwd+bwd speed-up {(f2 + b2) / (f1 + b1):.2f}x", flush=True)  # fmt: skip
    return dict(seqlen=s, h=h, d=d, dv=dv, causal=True, fwd_ms=f1, bwd_ms=b1, padded_fwd_ms=f2, padded_bwd_ms=b2,
                speedup_fwd_bwd=(f2 + b2) / (f1 + b1))  # fmt: skip


def bench_vdim() -> list[dict]:
    """DeepSeek-V3's 192/128 (32 heads here) against v zero-padded to 192."""
    be = backends()["triton"]
    return [_vdim_case(be, s, 32, 192, 128) for s in (4096, 8192)]


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    t0 = time.time()
    props = torch.cuda.get_device_properties(0)
    print(f"{props.name}, torch {torch.__version__}, triton {triton.__version__}", flush=True)
    checks = run_checks()
    sinks = bench_sinks()
    vdim = bench_vdim()
    result = dict(gpu=props.name, torch=torch.__version__, triton=triton.__version__,
                  date=dt.datetime.now().isoformat(timespec="seconds"), checks=checks, sinks=sinks, vdim=vdim,
                  seconds=round(time.time() - t0, 1))  # fmt: skip
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "bench_sink_vdim.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"\nall {len(checks)} checks passed; wrote {path} ({time.time() - t0:.0f} s)")
    print("\nsinks on vs off (target: <= 3%), gpt-oss shape h64/8 d64 causal, bf16")
    print(f"{'kind':6} {'seqlen':>6} {'off ms':>9} {'on ms':>9} {'cost':>7}")
    for r in sinks:
        print(f"{r['kind']:6} {r['seqlen']:>6} {r['off_ms']:9.4f} {r['on_ms']:9.4f} {r['overhead_pct']:+6.1f}%")
    print("\nv head dim 128 vs v padded to 192 (target: faster), h32 causal, bf16, fwd + bwd")
    print(f"{'seqlen':>6} {'192/128 ms':>11} {'padded ms':>10} {'speed-up':>9}")
    for r in vdim:
        print(f"{r['seqlen']:>6} {r['fwd_ms'] + r['bwd_ms']:11.3f} {r['padded_fwd_ms'] + r['padded_bwd_ms']:10.3f} "
              f"{r['speedup_fwd_bwd']:8.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
