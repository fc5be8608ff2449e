"""Issue 16 (a lean call path) in one run: small calls, decode, CUDA-graph decode, first calls of a
fresh process, and Hugging Face greedy generation, flashtile against SDPA flash / cuDNN.

    PYTHONPATH=src python benchmarks/bench_lean.py            # on a GPU: checks, then the table
    PYTHONPATH=src python benchmarks/bench_lean.py --host     # any machine: host cost per stage

GPU run (< 6 minutes on the H200 including Triton compiles): first correctness on small shapes
(stops at the first failure, naming it), then

* ``flash_attn_func`` b1 s128 h8 d64 causal bf16, forward and forward + backward;
* ``flash_attn_with_kvcache`` decode, 1 query, 8k cache, h32/8, d128, b1 and b8 (cache lengths
  as None = the whole cache, and as an int32 tensor, which costs a host read of the error flag);
* the b1 decode replayed from a CUDA graph;

each as wall time per call: ``--calls`` calls (200) between two synchronisations after a warm-up,
the median (and min / max) of ``--repeats`` (7) such loops, against SDPA flash and cuDNN in the
same process. Then the first calls of fresh processes (b2 s1k h16 d128 bf16: import, the first
forward, its backward, a second option set (window + softcap), a decode, and SDPA's first
forward + backward), once with an empty Triton cache and once with it warm; and, if transformers
is installed, greedy ``generate`` of 128 tokens after a 1k prompt with a randomly initialised
8-layer Llama-style model (hidden 2048, 16/4 heads, bf16) with attn_implementation flashtile,
sdpa and eager. Prints a table last; JSON under ``$OUT`` if set, else benchmarks/results/.

``--host`` (CPU is fine): what each stage of a call costs on the host, measured with thread CPU
time on tiny shapes and a do-nothing backend registered here, so that only the call path is timed:
validation, options, dispatch, the op/autograd layer, and the whole call, for forward, forward +
backward and decode, next to the same call through the custom ops (the path torch.compile uses).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time

import torch

# ----------------------------------------------------------------------------------------------
# host profile (CPU)


def _thread_us(fn, n: int = 3000, reps: int = 7, stat=statistics.median) -> float:
    """Thread CPU time of one ``fn()`` in us: ``stat`` (median; min: the least disturbed loop on a
    shared machine) over ``reps`` loops of ``n`` calls, after a warm-up."""
    for _ in range(min(n, 200)):
        fn()
    ts = []
    for _ in range(reps):
        t0 = time.thread_time()
        for _ in range(n):
            fn()
        ts.append((time.thread_time() - t0) / n)
    return stat(ts) * 1e6


def host_profile() -> list[tuple[str, float]]:
    """Per-stage host cost of the call path (microseconds of thread CPU time)."""
    import flashtile
    from flashtile import dispatch, ops
    from flashtile.backends.base import Capabilities, register
    from flashtile.spec import FEATURES, Problem, check_qkv, make_call

    class Null:
        """A backend that allocates its outputs and computes nothing."""

        name = "null"
        capabilities = Capabilities(priority=1000, dtypes=frozenset({torch.float32}), max_headdim=512,
                                    features=FEATURES, decode=True)  # fmt: skip

        def available(self):
            return None

        def supports(self, problem, call):
            return None

        def forward(self, q, k, v, call):
            return torch.empty_like(q), torch.empty(q.shape[0], q.shape[2], q.shape[1])

        def backward(self, dout, q, k, v, out, lse, call):
            return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), {}

        def decode(self, q, cache, call):
            return self.forward(q, q, q, call)

    register(Null())
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4, 2, 16) for _ in range(3))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    dout = torch.randn(1, 4, 2, 16)
    kc, vc = torch.randn(1, 64, 2, 16), torch.randn(1, 64, 2, 16)
    seqlens = torch.full((1,), 60, dtype=torch.int32)
    call = make_call(headdim=16, causal=True)
    problem = Problem.of(q, k, call)
    args = ops.flatten(call)

    def fwd_bwd():
        out = flashtile.flash_attn_func(qg, kg, vg, causal=True)
        torch.autograd.grad(out, (qg, kg, vg), dout)

    def fwd_bwd_ops():
        out = ops.attn_fwd(qg, kg, vg, *args, "null")[0]
        torch.autograd.grad(out, (qg, kg, vg), dout)

    from flashtile import interface, kvcache

    def kv_full(lens):  # flash_attn_with_kvcache without its signature memo
        return kvcache._kvcache(q[:, :1], kc, vc, None, None, None, None, lens, None, None, None, None, False,
                                (-1, -1), 0.0, True, None, 0, False, None, None, None, None, None)  # fmt: skip

    rows = [
        ("flash_attn_func forward, whole call", lambda: flashtile.flash_attn_func(q, k, v, causal=True)),
        ("  same, memo off (checks, make_call, dispatch)",
         lambda: interface._run(q, k, v, causal=True, alibi_slopes=None, return_attn_probs=False)),
        ("  check_qkv", lambda: check_qkv(q, k, v, varlen=False)),
        ("  make_call", lambda: make_call(headdim=16, causal=True)),
        ("  Problem.of (built on a dispatch-cache miss only)", lambda: Problem.of(q, k, call)),
        ("  dispatch.choose_for (cached)", lambda: dispatch.choose_for(q, k, call)),
        ("  dispatch.choose, uncached path", lambda: dispatch._choose(problem, call, False)),
        ("  ops.attention, no grad (fast path)", lambda: ops.attention(q, k, v, call, "null")),
        ("  same through the custom op attn_fwd", lambda: ops.attn_fwd(q, k, v, *args, "null")),
        ("  backend.forward (null: two allocations)", lambda: dispatch.backends()["null"].forward(q, k, v, call)),
        ("flash_attn_func forward, inputs require grad", lambda: flashtile.flash_attn_func(qg, kg, vg, causal=True)),
        ("  ops.attention with grad (autograd.Function)", lambda: ops.attention(qg, kg, vg, call, "null")),
        ("  same through the custom op (register_autograd)", lambda: ops.attn_fwd(qg, kg, vg, *args, "null")),
        ("flash_attn_func forward + backward (autograd.grad)", fwd_bwd),
        ("  same through the custom ops", fwd_bwd_ops),
        ("flash_attn_with_kvcache, int cache length", lambda: flashtile.flash_attn_with_kvcache(q[:, :1], kc, vc,
                                                                                                 cache_seqlens=60)),
        ("flash_attn_with_kvcache, int32 tensor lengths", lambda: flashtile.flash_attn_with_kvcache(
            q[:, :1], kc, vc, cache_seqlens=seqlens)),
        ("  same, memo off", lambda: kv_full(seqlens)),
    ]  # fmt: skip
    with flashtile.use_backend("null"):
        out = [(name, _thread_us(fn, n=1000 if "backward" in name else 3000)) for name, fn in rows]
    return out


# ----------------------------------------------------------------------------------------------
# GPU (``--dry-cpu`` runs the same code on the CPU, in float32 with a 512-key cache: a smoke test
# of the script itself)

DEV, DT, CACHE = "cuda", torch.bfloat16, 8192


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def per_call_us(fn, calls: int, repeats: int, warmup: int = 30) -> tuple[float, float, float]:
    """(median, min, max) over ``repeats`` of the wall time per call of ``calls`` back-to-back calls."""
    for _ in range(warmup):
        fn()
    _sync()
    ts = []
    for _ in range(repeats):
        _sync()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        _sync()
        ts.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(ts), min(ts), max(ts)


def _sdpa(backend_name: str):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, backend_name))


def checks() -> None:
    """Correctness on small shapes before timing; raises naming the first failure."""
    import torch.nn.functional as F

    import flashtile
    from flashtile.backends.triton import fastlaunch

    def close(name, a, b, tol, pt=None, factor=3.0):
        """max |a - b| <= tol, or with ``pt`` (SDPA in the same low precision, long shapes) the
        project's rule: <= factor x SDPA's own error against the fp32 reference + a small atol."""
        err = (a.float() - b.float()).abs().max().item()
        if pt is not None:
            pt_err = (pt.float() - b.float()).abs().max().item()
            tol = factor * pt_err + 1e-3 * b.float().abs().max().item()
        if not err <= tol:
            raise AssertionError(f"check failed: {name}: max abs error {err:.3g} > {tol:.3g}")
        print(f"  ok  {name} (max err {err:.2g}, allowed {tol:.2g})")

    torch.manual_seed(0)
    dt = DT
    shapes = [(1, 128, 8, 8, 64), (2, 113, 4, 2, 72)]
    if DEV == "cuda":  # more than hopper.SMALL_ROWS query rows: the Gluon forward (and at d256 its backward)
        shapes += [(1, 4096, 8, 8, 64), (1, 4160, 4, 4, 256)]
    for b, s, h, hk, d in shapes:
        rel = s > 1000
        q = torch.randn(b, s, h, d, device=DEV, dtype=dt, requires_grad=True)
        k = torch.randn(b, s, hk, d, device=DEV, dtype=dt, requires_grad=True)
        v = torch.randn(b, s, hk, d, device=DEV, dtype=dt, requires_grad=True)
        g = torch.randn(b, s, h, d, device=DEV, dtype=dt)
        rq, rk, rv = (x.detach().float().transpose(1, 2).requires_grad_() for x in (q, k, v))
        ref = F.scaled_dot_product_attention(rq, rk, rv, is_causal=True, enable_gqa=h != hk).transpose(1, 2)
        rg = torch.autograd.grad(ref, (rq, rk, rv), g.float())
        pts = [None] * 4
        if rel:  # SDPA in bf16: the error scale the long shapes are held to
            pq, pk, pv = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
            pout = F.scaled_dot_product_attention(pq, pk, pv, is_causal=True, enable_gqa=h != hk)
            pts = [pout.transpose(1, 2), *(x.transpose(1, 2) for x in torch.autograd.grad(pout, (pq, pk, pv),
                                                                                          g.transpose(1, 2)))]
        outs = []
        for _ in range(5):  # the first launch is Triton's generic one, the later ones the lean path
            # (from the 4th call on the entry point's flat path: the runner its memo keeps)
            # deterministic on the long shapes: the Gluon backward's atomic dQ is not bitwise repeatable
            out = flashtile.flash_attn_func(q, k, v, causal=True, deterministic=rel)
            grads = torch.autograd.grad(out, (q, k, v), g)
            outs.append((out, *grads))
        with torch.no_grad():  # the same signature without autograd: the flat path's runner itself
            plain = [flashtile.flash_attn_func(q, k, v, causal=True, deterministic=rel) for _ in range(5)]
        close(f"forward b{b} s{s} h{h}/{hk} d{d}", outs[0][0], ref, 2e-2, pts[0], 2.0)
        for name, a, r, pt in zip("qkv", outs[0][1:], rg, pts[1:], strict=True):
            close(f"d{name} b{b} s{s} h{h}/{hk} d{d}", a, r.transpose(1, 2), 6e-2, pt)
        for later in outs[1:]:
            for a, c in zip(outs[0], later, strict=True):
                if not torch.equal(a, c):
                    raise AssertionError("check failed: the lean launch path differs from the first launch")
        if not all(torch.equal(p, outs[0][0]) for p in plain):
            raise AssertionError("check failed: the flat path (no grad) differs from the first launch")
        print("  ok  lean launches and the flat path repeat the first launch bitwise")
    from flashtile import interface, kvcache

    if DEV == "cuda":
        if not interface._FLAT:
            raise AssertionError("check failed: no runner was kept for the flat path (interface._FLAT empty)")
        q1 = torch.randn(1, 128, 8, 64, device=DEV, dtype=dt)
        k1, v1 = torch.randn_like(q1), torch.randn_like(q1)
        ref1 = [flashtile.flash_attn_func(q1, k1, v1, causal=True) for _ in range(5)][0]
        graph, static_out = _graph(lambda: flashtile.flash_attn_func(q1, k1, v1, causal=True))
        graph.replay()
        _sync()
        close("forward (flat path) replayed from a CUDA graph", static_out, ref1, 0.0)
        side = torch.cuda.Stream()  # the flat path on another stream (its own scratch and error flag)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            on_side = [flashtile.flash_attn_func(q1, k1, v1, causal=True) for _ in range(3)]
        torch.cuda.current_stream().wait_stream(side)
        _sync()
        if not all(torch.equal(x, ref1) for x in on_side):
            raise AssertionError("check failed: the flat path on a side stream differs")
        print("  ok  flat path under CUDA graph capture and on a side stream")
    import flashtile.backends.triton.launch as launch

    mods = [launch]
    if DEV == "cuda":
        import flashtile.backends.hopper.launch as hl
        import flashtile.backends.hopper.launch_bwd as hlb

        mods += [hl, hlb]
    launched = {n: (k.fast_launches, k.generic_launches) for m in mods for n, k in vars(m).items()
                if isinstance(k, fastlaunch.FastKernel)}  # fmt: skip
    print(f"  lean launch path enabled: {fastlaunch.ENABLED} (triton {__import__('triton').__version__}); "
          f"(fast, generic) launches: {launched}")
    if DEV == "cuda" and fastlaunch.ENABLED and not any(f for f, _ in launched.values()):
        raise AssertionError("check failed: the lean launch path was enabled but never taken")
    # decode against SDPA, eager and from a CUDA graph
    b, h, hk, d, n = 2, 8, 2, 128, 1000
    q = torch.randn(b, 1, h, d, device=DEV, dtype=dt)
    kc = torch.randn(b, 1024, hk, d, device=DEV, dtype=dt)
    vc = torch.randn(b, 1024, hk, d, device=DEV, dtype=dt)
    lens = torch.full((b,), n, dtype=torch.int32, device=DEV)
    qf, kf, vf = (x.transpose(1, 2).float() for x in (q, kc[:, :n], vc[:, :n]))
    ref = F.scaled_dot_product_attention(qf, kf, vf, enable_gqa=True).transpose(1, 2)
    out = flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens)
    close("decode (tensor cache lengths)", out, ref, 2e-2)
    out_int = flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=n)
    close("decode (int cache length)", out_int, ref, 2e-2)
    for lens_ in (lens, n):  # later calls: the signature memo, the prepared launches, the flat path
        again = [flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens_) for _ in range(5)]
        if not all(torch.equal(a, out) for a in again):
            raise AssertionError("check failed: repeated decode calls differ from the first")
    if DEV == "cuda" and not kvcache._FLAT:
        raise AssertionError("check failed: no decode runner was kept for the flat path (kvcache._FLAT empty)")
    # an int length that changes every call (its length vector is kept and refilled), split pieces
    for n_ in (1000, 700, 1000, 3, 1024, 999):
        kn, vn = (x[:, :n_].transpose(1, 2).float() for x in (kc, vc))
        ref_n = F.scaled_dot_product_attention(qf, kn, vn, enable_gqa=True).transpose(1, 2)
        for splits in (0, 3):
            got = flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=n_, num_splits=splits)
            close(f"decode (int length {n_}, num_splits={splits})", got, ref_n, 2e-2)
    print("  ok  repeated decode calls (memo, prepared launches, flat path, changing int lengths)")
    if DEV == "cuda":
        graph, static_out = _graph(lambda: flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens))
        graph.replay()
        _sync()
        close("decode replayed from a CUDA graph", static_out, out, 0.0)


def _graph(fn):
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    _sync()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = fn()
    return g, out


def small_calls(calls: int, repeats: int) -> list[dict]:
    import torch.nn.functional as F

    import flashtile

    rows = []
    dt = DT
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 128, 8, 64, device=DEV, dtype=dt, requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)
    qt, kt, vt = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    gt = g.transpose(1, 2).contiguous()

    qn, kn, vn = (x.detach() for x in (q, k, v))  # inference: no autograd node on either side
    qtn, ktn, vtn = (x.detach() for x in (qt, kt, vt))

    def ft_inf():
        return flashtile.flash_attn_func(qn, kn, vn, causal=True)

    def sd_inf():
        return F.scaled_dot_product_attention(qtn, ktn, vtn, is_causal=True)

    def ft_fwd():
        return flashtile.flash_attn_func(q, k, v, causal=True)

    def ft_fb():
        torch.autograd.grad(flashtile.flash_attn_func(q, k, v, causal=True), (q, k, v), g)

    def sd_fwd():
        return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)

    def sd_fb():
        torch.autograd.grad(F.scaled_dot_product_attention(qt, kt, vt, is_causal=True), (qt, kt, vt), gt)

    for mode, ft, sd in (("fwd, inputs without grad", ft_inf, sd_inf), ("fwd", ft_fwd, sd_fwd),
                         ("fwd+bwd", ft_fb, sd_fb)):  # fmt: skip
        row = dict(call=f"flash_attn_func b1 s128 h8 d64 causal, {mode}")
        row["flashtile"] = per_call_us(ft, calls, repeats)
        rows.append(_sdpa_peers(row, sd, calls, repeats, mode))
    return rows


def _sdpa_peers(row: dict, sd, calls: int, repeats: int, label: str) -> dict:
    """``row`` with SDPA flash's and cuDNN's per-call times of ``sd`` (None where one cannot run)."""
    for name, be in (("sdpa_flash", "FLASH_ATTENTION"), ("sdpa_cudnn", "CUDNN_ATTENTION")):
        try:
            with _sdpa(be):
                row[name] = per_call_us(sd, calls, repeats)
        except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported
            row[name] = None
            print(f"  {name} {label}: {type(e).__name__}: {str(e)[:120]}")
    return row


def decode_calls(calls: int, repeats: int) -> list[dict]:
    return [row for b in (1, 8) for row in _decode_rows(b, calls, repeats)] + [_growing_row(calls, repeats)]


def growing_calls(b: int, h: int, hk: int, d: int, n0: int, lengths: int = 512, device=None, dtype=None):
    """``(flashtile call, SDPA call)``, each a function of no argument: decode-shaped attention of one
    query over keys that grow by one every call, in Hugging Face's dynamic-cache layout (a fresh
    ``(b, hk, s, d)`` tensor per step, transposed for flashtile: new strides every step), ``lengths``
    distinct lengths from ``n0`` on, taken in turn (more than the flat path's 256 signatures, so no
    call finds its exact shape kept); SDPA (``enable_gqa``) gets the same tensors."""
    import torch.nn.functional as F

    import flashtile

    device, dtype = device or DEV, dtype or DT
    torch.manual_seed(0)
    kv = [tuple(torch.randn(b, hk, n0 + i, d, device=device, dtype=dtype) for _ in range(2)) for i in range(lengths)]
    q = torch.randn(b, h, 1, d, device=device, dtype=dtype)
    qf = q.transpose(1, 2)
    step = [0]

    def nxt():
        step[0] = (step[0] + 1) % lengths
        return kv[step[0]]

    def ft():
        k, v = nxt()
        return flashtile.flash_attn_func(qf, k.transpose(1, 2), v.transpose(1, 2), causal=True)

    def sd():
        k, v = nxt()
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True)

    return ft, sd


def _growing_row(calls: int, repeats: int) -> dict:
    """:func:`growing_calls` at b1 h32/8 d128 from the decode rows' cache size."""
    ft, sd = growing_calls(1, 32, 8, 128, CACHE)
    row = dict(call=f"flash_attn_func decode-shaped b1 h32/8 d128, keys growing per call from {CACHE // 1024}k, HF "
                    "layout")
    row["flashtile"] = per_call_us(ft, calls, repeats)
    return _sdpa_peers(row, sd, calls, repeats, "growing")


def _decode_rows(b: int, calls: int, repeats: int) -> list[dict]:
    import torch.nn.functional as F

    import flashtile

    dt = DT
    h, hk, d, n = 32, 8, 128, CACHE
    torch.manual_seed(0)
    q = torch.randn(b, 1, h, d, device=DEV, dtype=dt)
    kc = torch.randn(b, n, hk, d, device=DEV, dtype=dt)
    vc = torch.randn(b, n, hk, d, device=DEV, dtype=dt)
    lens = torch.full((b,), n, dtype=torch.int32, device=DEV)
    qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
    kx, vx = kt.repeat_interleave(h // hk, 1), vt.repeat_interleave(h // hk, 1)

    def sd(gqa=True):
        if gqa:
            return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)
        return F.scaled_dot_product_attention(qt, kx, vx)

    def ft_lens():
        return flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens)

    row = dict(call=f"flash_attn_with_kvcache decode b{b} {n // 1024}k h32/8 d128, eager")
    row["flashtile"] = per_call_us(lambda: flashtile.flash_attn_with_kvcache(q, kc, vc), calls, repeats)
    row["flashtile_tensor_lens"] = per_call_us(ft_lens, calls, repeats)
    gqa_used = {}
    for name, be in (("sdpa_flash", "FLASH_ATTENTION"), ("sdpa_cudnn", "CUDNN_ATTENTION")):
        row[name] = None
        for gqa in (True, False):  # enable_gqa where the backend takes it, else k/v expanded beforehand
            try:
                with _sdpa(be):
                    row[name] = per_call_us(lambda gqa=gqa: sd(gqa), calls, repeats)
                row[name + "_gqa"] = gqa_used[name] = gqa
                break
            except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported
                print(f"  {name} decode b{b} gqa={gqa}: {type(e).__name__}: {str(e)[:100]}")
    if b != 1 or DEV != "cuda":
        return [row]
    grow = dict(call="same, b1, replayed from a CUDA graph (tensor cache lengths)")
    g, _ = _graph(ft_lens)
    grow["flashtile"] = per_call_us(g.replay, calls, repeats)
    for name, be in (("sdpa_flash", "FLASH_ATTENTION"), ("sdpa_cudnn", "CUDNN_ATTENTION")):
        try:
            gqa = gqa_used.get(name, True)
            with _sdpa(be):
                gs, _ = _graph(lambda gqa=gqa: sd(gqa))
            grow[name] = per_call_us(gs.replay, calls, repeats)
        except Exception as e:  # noqa: BLE001
            grow[name] = None
            print(f"  {name} graph: {type(e).__name__}: {str(e)[:100]}")
    return [row, grow]


_FIRST = textwrap.dedent(
    """
    import json, time
    t0 = time.perf_counter()
    import torch
    t1 = time.perf_counter()
    import flashtile
    t2 = time.perf_counter()
    torch.cuda.init(); torch.empty(1, device="cuda"); torch.cuda.synchronize()
    r = dict(import_torch=t1 - t0, import_flashtile=t2 - t1)
    def timed(name, fn):
        torch.cuda.synchronize(); t = time.perf_counter(); x = fn(); torch.cuda.synchronize()
        r[name] = time.perf_counter() - t
        return x
    dt = torch.bfloat16
    q, k, v = (torch.randn(2, 1024, 16, 128, device="cuda", dtype=dt, requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)
    t = time.perf_counter(); import triton; r["import_triton"] = time.perf_counter() - t
    t = time.perf_counter(); import flashtile.backends.triton.launch; r["import_kernels"] = time.perf_counter() - t
    t = time.perf_counter(); flashtile.dispatch.choose_for(q, k, flashtile.spec.make_call(headdim=128, causal=True))
    r["first_dispatch"] = time.perf_counter() - t
    out = timed("fwd", lambda: flashtile.flash_attn_func(q, k, v, causal=True))
    timed("bwd", lambda: torch.autograd.grad(out, (q, k, v), g))
    out2 = timed("fwd_window_softcap", lambda: flashtile.flash_attn_func(q, k, v, window_size=(256, 0), softcap=30.0))
    timed("bwd_window_softcap", lambda: torch.autograd.grad(out2, (q, k, v), g))
    kc, vc = (torch.randn(2, 2048, 16, 128, device="cuda", dtype=dt) for _ in range(2))
    lens = torch.full((2,), 2000, dtype=torch.int32, device="cuda")
    timed("decode", lambda: flashtile.flash_attn_with_kvcache(q[:, :1].detach(), kc, vc, cache_seqlens=lens))
    qt, kt, vt = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    F = torch.nn.functional
    def sd():
        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)
        torch.autograd.grad(o, (qt, kt, vt), g.transpose(1, 2))
    timed("sdpa_fwd_bwd_first", sd)
    timed("sdpa_fwd_bwd_second", sd)
    r["process_to_first_fwd_done"] = time.perf_counter() - t0
    print("RESULT " + json.dumps(r))
    """
)


def first_calls() -> dict:
    """First calls of fresh processes, with an empty Triton cache, then with it warm."""
    res = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        for label in ("empty_cache", "warm_cache"):
            t = time.perf_counter()
            p = subprocess.run([sys.executable, "-c", _FIRST], env=env, capture_output=True, text=True, timeout=240)
            wall = time.perf_counter() - t
            line = [s for s in p.stdout.splitlines() if s.startswith("RESULT ")]
            if p.returncode != 0 or not line:
                print(f"  first calls ({label}) failed:\n{p.stderr[-2000:]}")
                res[label] = None
                continue
            res[label] = dict(json.loads(line[0][7:]), process_wall=wall)
    with tempfile.TemporaryDirectory() as cache:  # flashtile warmup, then a fresh process
        env = dict(os.environ, TRITON_CACHE_DIR=cache)
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "flashtile.cli", "warmup", "--headdims", "128", "--dtypes", "bfloat16",
               "--features", "causal,window+softcap,decode"]  # fmt: skip
        w = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        res["warmup_command_s"] = time.perf_counter() - t
        print("  " + (w.stdout.strip().splitlines() or ["(no output)"])[-1])
        p = subprocess.run([sys.executable, "-c", _FIRST], env=env, capture_output=True, text=True, timeout=240)
        line = [s for s in p.stdout.splitlines() if s.startswith("RESULT ")]
        res["after_warmup"] = json.loads(line[0][7:]) if line else None
    return res


def hf_generate(
    new_tokens: int = 128, prompt: int = 1024, layers: int = 8, hidden: int = 2048, rounds: int = 9,
    profile: bool = False,
) -> dict | None:
    try:
        import transformers
        from transformers import LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("  transformers not installed: no generation row")
        return None
    import flashtile.integrations.transformers as ft_hf

    ft_hf.register()
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=layers,
                      num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                      max_position_embeddings=4096)  # fmt: skip
    res = dict(transformers=transformers.__version__)
    base = LlamaForCausalLM(cfg).to(device=DEV, dtype=DT).eval()
    state = base.state_dict()
    del base
    ids = torch.randint(0, cfg.vocab_size, (1, prompt), device=DEV)
    tokens, models, times = {}, {}, {}
    kw = dict(do_sample=False, pad_token_id=0)
    for impl in ("flashtile", "sdpa", "eager"):
        try:
            try:
                # a config of its own: _from_config sets the attention implementation on the config
                model = LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation=impl, dtype=DT)
            except TypeError:  # transformers < 4.56 names it torch_dtype
                model = LlamaForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation=impl, torch_dtype=DT)
            model.load_state_dict(state)
            models[impl] = model.to(DEV).eval()
            with torch.no_grad():
                models[impl].generate(ids, max_new_tokens=8, min_new_tokens=8, **kw)
            times[impl] = []
        except Exception as e:  # noqa: BLE001
            print(f"  generate with {impl}: {type(e).__name__}: {str(e)[:200]}")
            res[impl] = None
    # the host's speed drifts within a run (stop 23: eager 76 -> 92 tokens/s between runs): the
    # implementations take turns, `rounds` times each, and the median is reported
    order = list(models.items())
    for r in range(rounds):  # the order rotates every round (the host's speed drifts within a round too)
        for impl, model in order[r % len(order) :] + order[: r % len(order)]:
            with torch.no_grad():
                _sync()
                t = time.perf_counter()
                out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
                _sync()
                times[impl].append(time.perf_counter() - t)
            tokens[impl] = out[0, prompt:]
    for impl, model in models.items():  # each model runs the implementation it was built with
        assert model.config._attn_implementation == impl, (impl, model.config._attn_implementation)
    for impl, ts in times.items():
        res[impl] = new_tokens / statistics.median(ts)
        res[f"{impl}_rounds"] = [round(new_tokens / t, 1) for t in ts]
        res[f"{impl}_best"] = new_tokens / min(ts)  # (a host-bound loop on a host whose speed drifts)
    if "flashtile" in times and "sdpa" in times:  # paired per round: the drift between rounds cancels
        pairs = zip(times["flashtile"], times["sdpa"], strict=True)
        res["flashtile_over_sdpa"] = statistics.median(s / f for f, s in pairs)  # (tokens/s ratio of one round)
    if profile and "flashtile" in models:  # where a generated token's host time goes (cProfile, top 25)
        import cProfile
        import io
        import pstats

        cum = {}
        for impl in models:  # each implementation's generate profiled alike, for the comparison below
            prof = cProfile.Profile()
            with torch.no_grad():
                prof.enable()
                models[impl].generate(ids, max_new_tokens=32, min_new_tokens=32, **kw)
                _sync()
                prof.disable()
            st = pstats.Stats(prof)
            cum[impl] = {f"{f.split('site-packages/')[-1]}:{line}({name})": (v[3], v[1])
                         for (f, line, name), v in st.stats.items()}  # fmt: skip
            print(f"  {impl}: generate of 32 tokens under cProfile {st.total_tt:.3f} s, {st.total_calls} calls")
            if impl != "flashtile":
                continue
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
            print(buf.getvalue())
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats("flashtile", 25)
            print(buf.getvalue())
        if "sdpa" in cum:  # the functions whose cumulative time differs most between flashtile and sdpa
            a, b_ = cum["flashtile"], cum["sdpa"]
            diff = sorted(set(a) | set(b_), key=lambda f: -abs(a.get(f, (0, 0))[0] - b_.get(f, (0, 0))[0]))
            print("  cumulative s (calls), flashtile vs sdpa, largest differences first:")
            for f in diff[:30]:
                (ta, na), (tb, nb) = a.get(f, (0.0, 0)), b_.get(f, (0.0, 0))
                print(f"    {ta:8.4f} ({na:5d})  {tb:8.4f} ({nb:5d})  {f}")
    del models
    if "eager" in tokens:
        for impl in ("flashtile", "sdpa"):
            if impl in tokens:
                res[f"{impl}_tokens_equal_to_eager"] = int((tokens[impl] == tokens["eager"]).sum())
    return res


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, tuple):
        return f"{x[0]:.1f} ({x[1]:.1f}-{x[2]:.1f})"
    return f"{x:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", action="store_true", help="host cost per stage of the call path (CPU is fine)")
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--skip", default="", help="comma list of parts to skip: first,hf")
    ap.add_argument("--only-hf", action="store_true", help="HF generate alone (with a cProfile of flashtile's)")
    ap.add_argument("--dry-cpu", action="store_true", help="smoke-test this script on the CPU (tiny, float32)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    args = ap.parse_args()
    meta = dict(date=_dt.datetime.now().isoformat(timespec="seconds"), torch=torch.__version__,
                python=sys.version.split()[0])  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    if args.dry_cpu:
        global DEV, DT, CACHE
        DEV, DT, CACHE = "cpu", torch.float32, 512
        checks()
        small_calls(2, 1)
        decode_calls(2, 1)
        print("generate:", hf_generate(new_tokens=4, prompt=16, layers=1, hidden=256, rounds=2, profile=True))
        print("dry run on the CPU: ok")
        return
    if args.host or not torch.cuda.is_available():
        if not args.host:
            print("no CUDA device: running the host profile (--host)")
        torch.set_num_threads(1)
        rows = host_profile()
        meta["cpu"] = os.uname().machine
        path = os.path.join(args.out, f"lean_host_{_dt.date.today()}.json")
        with open(path, "w") as fh:
            json.dump(dict(meta=meta, rows=rows), fh, indent=1)
        print(f"\nhost cost per stage (thread CPU time, us; tiny shapes, a do-nothing backend) -> {path}")
        for name, us in rows:
            print(f"  {name:60s} {us:8.1f}")
        return
    import triton

    meta.update(gpu=torch.cuda.get_device_name(), triton=triton.__version__)
    skip = set(filter(None, args.skip.split(",")))
    t_start = time.perf_counter()
    if args.only_hf:
        print("HF greedy generate, tokens/s:", hf_generate(profile=True))
        return
    print("== correctness (small shapes)")
    checks()
    print("== small calls")
    table = small_calls(args.calls, args.repeats)
    print("== decode")
    table += decode_calls(args.calls, args.repeats)
    first = None if "first" in skip else (print("== first calls (fresh processes)"), first_calls())[1]
    hf = None if "hf" in skip else (print("== HF generate"), hf_generate(profile=True))[1]
    meta["seconds"] = time.perf_counter() - t_start
    path = os.path.join(args.out, f"lean_{torch.cuda.get_device_name().replace(' ', '_')}_{_dt.date.today()}.json")
    with open(path, "w") as fh:
        json.dump(dict(meta=meta, table=table, first_calls=first, hf_generate=hf), fh, indent=1)
    print(f"\n== issue 16 table ({meta['gpu']}, triton {meta['triton']}, torch {meta['torch']}; wall us per call, "
          f"median (min-max) of {args.repeats} x {args.calls} calls) -> {path}")
    cols = ["flashtile", "flashtile_tensor_lens", "sdpa_flash", "sdpa_cudnn"]
    print("| call | " + " | ".join(cols) + " | flashtile / best SDPA |")
    print("|---|" + "---|" * (len(cols) + 1))
    for r in table:
        sd = [r[c][0] for c in ("sdpa_flash", "sdpa_cudnn") if r.get(c)]
        ratio = f"{r['flashtile'][0] / min(sd):.2f}x" if sd else "-"
        print(f"| {r['call']} | " + " | ".join(_fmt(r.get(c)) for c in cols) + f" | {ratio} |")
    if first:
        def _fmt_first(d):  # a dict of phases, one number, or None
            if isinstance(d, dict):
                return " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in d.items())
            return f"{d:.3f}" if isinstance(d, float) else str(d)

        print("\nfirst call in a fresh process (s): " + ", ".join(f"{label}: {_fmt_first(d)}"
                                                               for label, d in first.items()))
    if hf:
        items = (f"{k}={round(v, 1) if isinstance(v, float) else v}" for k, v in hf.items())
        print("HF greedy generate, tokens/s: " + ", ".join(items))
    print(f"total {meta['seconds']:.0f} s")


if __name__ == "__main__":
    main()
