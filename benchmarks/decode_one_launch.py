"""Decode in one launch (issue 16, helpers wt-dec1 / wt-dec2): the split pieces merged inside the decode kernel.

    PYTHONPATH=src python benchmarks/decode_one_launch.py [--batches 1,2,4,8] [--calls 200] [--repeats 7]
        [--skip-checks]

Three merge modes throughout: ``chunked`` (the in-kernel merge as measured in stop 24: each chunk of
pieces one (pieces, rows, dv) tile reduced across warps), ``flat`` (``launch_decode.FLAT_MERGE``:
one tile per piece, loads issued together, combined elementwise) and ``kernel`` (the separate merge
kernel, ``FUSED_MERGE`` off); ``FUSE_MIN_GROUPS`` is set to 1 so that the in-kernel forms serve every
batch size (b x 8 KV heads groups: b1 8 .. b8 64) -- the table places the threshold.

On a GPU (< 6 minutes on the H200 with Triton compiles). First correctness, stopping at the
first failure (named):

* the flat in-kernel merge (with ``--check-chunked`` the chunked one too, checked in stop 24)
  against the separate merge kernel and against the fp32 oracle
  (flash-attn's rule: error <= 2x that of PyTorch in the same dtype + atol), over batch 1 / 3 / 8,
  GQA and MHA, head dims 64 / 128 / 256, cache lengths 1 .. the whole cache (int, int32 tensor,
  None), 2 .. 64 pieces, causal / window / softcap / ALiBi / sink, new k / v appended, paged caches
  (pages of 16 and 256), several query rows, a v head dim of its own, fp16 and bf16;
* repeated calls bitwise equal (the flat path's runner among them), 300 calls with a new length
  each against the unsplit result, and the group counters left at zero;
* CUDA graphs: captured with the decode + merge kernels (``FUSED_MERGE`` off), and in one launch
  with the spare counters an eager call left or with counters zeroed in the graph; replays bitwise
  equal to the eager calls of the same kernels, eager calls interleaved on two streams.

Then the timings per batch size (bf16, 1 query, 8k cache, h32/8, d128; wall us per call,
``--calls`` calls between two synchronisations, median (min-max) of ``--repeats`` loops, the modes'
runs interleaved): eager with an int length (bench_lean's row) in the three merge modes and SDPA
cuDNN; CUDA-graph replay in the three modes (spare counters) and of SDPA cuDNN; the device time of
the kernels per call (torch.profiler: the decode kernel, the merge kernel, all), also of a probe:
the in-kernel counting (fence, atomic, counter reset) without the merge (``_MERGE_SYNC_ONLY``; its
result is not one), which splits the in-kernel merge's cost into the synchronisation and the merge. Full table, then a
short one (one line per batch) last; JSON under ``$OUT`` (else benchmarks/results/).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from bench_lean import _graph  # (this folder: the script's own; warm-up on a side stream, then capture)

DEV = "cuda"
DRY = False  # --dry-cpu: the checks on tiny fp32 shapes through Triton's interpreter (TRITON_INTERPRET=1)


def _sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


MODES = ("chunked", "flat", "kernel")  # the in-kernel merge in its two forms, the separate merge kernel


def _set(fused: bool | None = None, spare: bool = True, flat: bool = False) -> None:
    """FUSED_MERGE and FLAT_MERGE; ``spare``: True = the next eager split call leaves spare zeroed
    counters for a capture (the kept scratch dropped), False = none (a capture zeroes its own in the graph)."""
    from flashtile.backends.triton import launch, launch_decode

    if fused is not None:
        launch_decode.FUSED_MERGE = fused
        launch_decode.FLAT_MERGE = flat
        launch_decode._MERGE_SYNC_ONLY = False
        launch_decode.FUSE_MIN_GROUPS = 1  # the A/B of the merges at every size (the default: >= 64 groups)
    launch_decode._SPARE.clear()
    launch_decode._SPARE_MAX = 256 if spare else 0
    if spare:
        launch_decode._SCRATCH.clear()
    launch.clear_plans()  # (plans and the flat path's runners hold the launches of one mode)


def _mode(mode: str, spare: bool = True) -> None:
    """:func:`_set` for one of :data:`MODES`."""
    _set(fused=mode != "kernel", spare=spare, flat=mode == "flat")


_GRAPH_MODES = {  # name -> (merge mode, spare counters)
    "decode + merge kernels": ("kernel", True),
    "one launch (chunked), spare counters": ("chunked", True),
    "one launch (flat), spare counters": ("flat", True),
    "one launch (flat), counters zeroed in the graph": ("flat", False),
}


def _fail(msg: str):
    raise AssertionError(f"check failed: {msg}")


def _oracle_rows(q, k_rows, v_rows, lens_new, opts, upcast):
    """Per batch row: attention_ref over that row's keys (fp32 when upcast, else the input dtype)."""
    from flashtile.testing import attention_ref

    outs, lses = [], []
    for i, (kr, vr) in enumerate(zip(k_rows, v_rows, strict=True)):
        o, lse = attention_ref(q[i : i + 1], kr[None], vr[None], upcast=upcast, **opts(i))
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


def checks(modes: tuple = ("flat", "kernel")) -> int:
    import flashtile
    from flashtile.backends.triton import launch_decode
    from flashtile.testing import FWD_FACTOR, make_alibi, max_err, tolerance

    n_checks = 0
    cases = [  # (name, b, sq, h, hk, d, dv, cap, lens kind, splits, page, new tokens, dtype, options)
        ("b1 h32/8 d128 8k int, auto pieces", 1, 1, 32, 8, 128, 128, 8192, "int", 0, 0, 0, "bf16", {}),
        ("b1 len 1", 1, 1, 32, 8, 128, 128, 8192, "one", 0, 0, 0, "bf16", {}),
        ("b3 h16/2 d64 tensor lens, 64 pieces", 3, 1, 16, 2, 64, 64, 5000, "tensor", 64, 0, 0, "bf16", {}),
        ("b8 MHA d128 None lens, 2 pieces", 8, 1, 8, 8, 128, 128, 1024, "none", 2, 0, 0, "fp16", {}),
        ("b2 d256 window + softcap", 2, 1, 16, 4, 256, 256, 3000, "tensor", 7, 0, 0, "bf16",
         dict(window_size=(700, 0), softcap=20.0)),
        ("b2 ALiBi", 2, 1, 32, 8, 128, 128, 4096, "tensor", 0, 0, 0, "bf16", dict(alibi=True)),
        ("b2 sink", 2, 1, 32, 8, 128, 128, 4096, "tensor", 9, 0, 0, "bf16", dict(sink=True)),
        ("b2 paged 16 + 1 new token", 2, 1, 32, 8, 128, 128, 4096, "tensor", 0, 16, 1, "bf16", {}),
        ("b2 paged 256, 3 queries + 3 new", 2, 3, 32, 8, 128, 128, 4096, "tensor", 0, 256, 3, "bf16", {}),
        ("b2 5 queries x 4 heads, dv 64", 2, 5, 32, 8, 128, 64, 2048, "tensor", 5, 0, 0, "fp16", {}),
    ]  # fmt: skip
    for ci, (name, b, sq, h, hk, d, dv, cap, lk, splits, page, sn, dts, o) in enumerate(cases):
        dt = torch.bfloat16 if dts == "bf16" else torch.float16
        if DRY:  # tiny fp32 shapes for the interpreter
            dt, cap, d, dv, h, hk = torch.float32, 64, min(d, 32), min(dv, 32), h // hk * min(hk, 2), min(hk, 2)
            page, splits = min(page, 16), min(splits, 8)
        g = torch.Generator(device="cpu").manual_seed(ci)
        q = torch.randn(b, sq, h, d, generator=g).to(DEV, dt)
        k = torch.randn(b, cap, hk, d, generator=g).to(DEV, dt)
        v = torch.randn(b, cap, hk, dv, generator=g).to(DEV, dt)
        kn = torch.randn(b, sn, hk, d, generator=g).to(DEV, dt) if sn else None
        vn = torch.randn(b, sn, hk, dv, generator=g).to(DEV, dt) if sn else None
        pre = [cap - sn, max(cap // 3, 1)] + [int(x) for x in torch.randint(1, cap - sn + 1, (b,), generator=g)]
        pre = pre[:b]
        if lk == "int":
            pre, lens = [cap - 5 - sn] * b, cap - 5 - sn
        elif lk == "one":
            pre, lens = [1 - sn] * b, 1 - sn
        elif lk == "none":
            pre, lens = [cap - sn] * b, None
        else:
            lens = torch.tensor(pre, dtype=torch.int32, device=DEV)
        kw = dict(causal=True, **{x: y for x, y in o.items() if x not in ("alibi", "sink")})
        if o.get("alibi"):
            kw["alibi_slopes"] = make_alibi("bh", b, h, DEV, low=0.0)
        if o.get("sink"):
            kw["learnable_sink"] = torch.randn(h, generator=g).to(DEV) * 4
        table = None
        kc, vc = k.clone(), v.clone()
        if page:
            nblk = cap // page
            perm = torch.randperm(b * nblk, generator=g).to(DEV)
            table = perm.view(b, nblk).to(torch.int32)
            kc = torch.empty(b * nblk, page, hk, d, device=DEV, dtype=dt)
            vc = torch.empty(b * nblk, page, hk, dv, device=DEV, dtype=dt)
            kc[perm] = k.reshape(b * nblk, page, hk, d)
            vc[perm] = v.reshape(b * nblk, page, hk, dv)
        kc0, vc0 = kc.clone(), vc.clone()
        got = {}
        for fused in modes:
            _mode(fused)
            outs = []
            for _ in range(4):  # (the flat path from the 4th call, where it applies)
                kc.copy_(kc0)
                vc.copy_(vc0)
                outs.append(flashtile.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens,
                                                             block_table=table, num_splits=splits,
                                                             return_softmax_lse=True, **kw))  # fmt: skip
            for later in outs[1:]:
                if not (torch.equal(later[0], outs[0][0]) and torch.equal(later[1], outs[0][1])):
                    _fail(f"{name} (fused={fused}): repeated calls differ")
            got[fused] = outs[0]
        # the keys of row i: its first pre[i] cache tokens, then the new ones
        k_rows = [torch.cat([k[i, : pre[i]]] + ([kn[i]] if sn else [])) for i in range(b)]
        v_rows = [torch.cat([v[i, : pre[i]]] + ([vn[i]] if sn else [])) for i in range(b)]

        def opts(i, kw=kw):
            r = dict(kw)
            if "alibi_slopes" in r:
                r["alibi_slopes"] = r["alibi_slopes"][i : i + 1]
            return r

        ref, ref_lse = _oracle_rows(q, k_rows, v_rows, None, opts, True)
        pt, _ = _oracle_rows(q, k_rows, v_rows, None, opts, False)
        for fused in modes:
            out, lse = got[fused]
            err, pt_err = max_err(out, ref), max_err(pt, ref)
            if not err <= tolerance(pt_err, FWD_FACTOR, 1e-3):
                _fail(f"{name} (fused={fused}): error {err:.3g} > 2 x {pt_err:.3g} + 1e-3 against the fp32 oracle")
            if max_err(lse, ref_lse) > 1e-3:
                _fail(f"{name} (fused={fused}): lse error {max_err(lse, ref_lse):.3g}")
        uo, ul = got["kernel"]
        for form in [m for m in modes if m != "kernel"]:
            fo, fl = got[form]
            if max_err(fo, uo) > 2 * max_err(pt, ref) + 1e-3 or max_err(fl, ul) > 1e-4:
                _fail(f"{name}: {form} and separate merges differ ({max_err(fo, uo):.3g}, lse {max_err(fl, ul):.3g})")
        fo, fl = got["flat"]
        n_checks += 1
        vs = f", flat - chunked {max_err(fo, got['chunked'][0]):.2g}" if "chunked" in got else ""
        print(f"  ok  {name}: err {max_err(fo, ref):.2g} (PyTorch {max_err(pt, ref):.2g}), flat - separate "
              f"{max_err(fo, uo):.2g}, lse {max_err(fl, ul):.2g}{vs}")  # fmt: skip
    _mode("flat")
    # many calls, a new length each (the kept counters and pieces reused 300 times) vs the unsplit kernel
    g = torch.Generator(device="cpu").manual_seed(5)
    q = torch.randn(1, 1, 32, 128, generator=g).to(DEV, torch.bfloat16)
    cap, calls = (64, 5) if DRY else (8192, 300)
    kc = torch.randn(1, cap, 8, 128, generator=g).to(DEV, torch.bfloat16)
    vc = torch.randn(1, cap, 8, 128, generator=g).to(DEV, torch.bfloat16)
    if DRY:
        q, kc, vc = q.float(), kc.float(), vc.float()
    worst = 0.0
    for n in torch.randint(1, cap + 1, (calls,), generator=g).tolist():
        n_ = {"num_splits": 3} if DRY else {}  # (on the CPU the split count is not chosen: 1)
        a = flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=n, **n_)
        c = flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=n, num_splits=1)
        worst = max(worst, max_err(a, c))
    if worst > 2e-2:
        _fail(f"{calls} calls of new lengths: split vs unsplit max error {worst:.3g}")
    bad = [key for key, t in launch_decode._SCRATCH.items() if "cnt" in key and int(t.abs().sum())]
    if bad:
        _fail(f"group counters left non-zero: {bad}")
    print(f"  ok  {calls} calls with new lengths: split (fused) vs unsplit max err {worst:.2g}; counters zero")
    if DRY:
        return n_checks
    # CUDA graphs: both capture modes, replays interleaved with eager calls on two streams
    lens = torch.tensor([8000], dtype=torch.int32, device=DEV)
    call = lambda: flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, return_softmax_lse=True)  # noqa: E731
    eager = {}
    for fused in MODES:
        _mode(fused)
        eager[fused] = [call() for _ in range(4)][-1]
    side = torch.cuda.Stream()
    for mode, (fused, spare) in _GRAPH_MODES.items():
        _mode(fused, spare=spare)
        taken = len(launch_decode._CAPTURED)
        graph, (out, lse) = _graph(call)  # (its warm-up calls leave the spare counters, if asked)
        if len(launch_decode._CAPTURED) != taken + (1 if fused != "kernel" and spare else 0):
            _fail(f"graph ({mode}): {len(launch_decode._CAPTURED) - taken} spare counters taken")
        for _ in range(3):
            graph.replay()
            e = call()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                s_ = call()
            torch.cuda.current_stream().wait_stream(side)
            _sync()
            if not (torch.equal(out, eager[fused][0]) and torch.equal(lse, eager[fused][1])):
                _fail(f"graph replay ({mode}) differs from the eager calls of its kernels")
            if not (torch.equal(e[0], eager[fused][0]) and torch.equal(s_[0], eager[fused][0])):
                _fail(f"eager calls between graph replays ({mode}) differ")
        print(f"  ok  CUDA graph ({mode}) replays bitwise equal, eager calls between on two streams")
    bad = [key for key, t in launch_decode._SCRATCH.items() if "cnt" in key and int(t.abs().sum())]
    if bad:
        _fail(f"group counters left non-zero after the graphs: {bad}")
    _mode("flat")
    return n_checks


def _loop(fn, calls: int) -> float:
    _sync()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    _sync()
    return (time.perf_counter() - t0) / calls * 1e6


def _interleaved(fns: dict, calls: int, repeats: int) -> dict:
    """name -> (median, min, max) of ``repeats`` loops, the loops of the entries taken in turns
    (each preceded by its own switch: ``fns[name] = (setup, fn)``)."""
    for setup, fn in fns.values():
        setup()
        for _ in range(30):
            fn()
    ts = {n: [] for n in fns}
    for r in range(repeats):
        order = list(fns) if r % 2 == 0 else list(fns)[::-1]
        for n in order:
            setup, fn = fns[n]
            setup()
            for _ in range(5):
                fn()
            ts[n].append(_loop(fn, calls))
    return {n: (statistics.median(v), min(v), max(v)) for n, v in ts.items()}


def _device_us(fn, calls: int = 50) -> dict | None:
    """Kernel time per call on the device (torch.profiler): {"all": the CUDA kernels' durations
    summed, "decode": the decode kernel's, "merge": the merge kernel's}, or None if unavailable."""
    try:
        from torch.profiler import ProfilerActivity, profile

        for _ in range(5):
            fn()
        _sync()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(calls):
                fn()
            _sync()
        tot = {"all": 0.0, "decode": 0.0, "merge": 0.0}
        for ev in prof.key_averages():
            us = getattr(ev, "device_time_total", None) or getattr(ev, "cuda_time_total", 0.0)
            tot["all"] += us
            for part in ("decode", "merge"):
                if f"_{part}_kernel" in ev.key:
                    tot[part] += us
        return {k: v / calls for k, v in tot.items()}
    except Exception as e:  # noqa: BLE001 - optional
        print(f"  (device time unavailable: {type(e).__name__}: {str(e)[:80]})")
        return None


def timings(batches: list[int], calls: int, repeats: int) -> list[dict]:
    return [row for b in batches for row in _time_batch(b, calls, repeats)]


def _time_batch(b: int, calls: int, repeats: int) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    import flashtile

    rows = []
    h, hk, d, n = 32, 8, 128, 8192
    torch.manual_seed(0)
    q = torch.randn(b, 1, h, d, device=DEV, dtype=torch.bfloat16)
    kc = torch.randn(b, n, hk, d, device=DEV, dtype=torch.bfloat16)
    vc = torch.randn(b, n, hk, d, device=DEV, dtype=torch.bfloat16)
    lens = torch.full((b,), n, dtype=torch.int32, device=DEV)
    qt, kt, vt = q.transpose(1, 2), kc.transpose(1, 2), vc.transpose(1, 2)
    ft_int = lambda: flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=n - 1)  # noqa: E731
    ft_lens = lambda: flashtile.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens)  # noqa: E731
    fns = {f"int, {m}": ((lambda m=m: _mode(m)), ft_int) for m in MODES}

    def sd(be):
        def go():
            with sdpa_kernel(be):
                return F.scaled_dot_product_attention(qt, kt, vt, enable_gqa=True)

        return go

    try:
        sd(SDPBackend.CUDNN_ATTENTION)()
        fns["SDPA cuDNN"] = (lambda: None, sd(SDPBackend.CUDNN_ATTENTION))
    except Exception as e:  # noqa: BLE001
        print(f"  SDPA cuDNN b{b}: {type(e).__name__}: {str(e)[:100]}")
    res = _interleaved(fns, calls, repeats)
    tag = f"decode b{b} ({b * hk} groups) 8k h32/8 d128 bf16"
    for name, t in res.items():
        rows.append(dict(batch=b, kind="eager", mode=name.removeprefix("int, "), call=f"{tag} eager: {name}", us=t))
    graphs = {}
    for mode, (m, spare) in _GRAPH_MODES.items():
        _mode(m, spare=spare)
        graphs[mode] = _graph(ft_lens)[0]
    try:
        graphs["SDPA cuDNN"] = _graph(sd(SDPBackend.CUDNN_ATTENTION))[0]
    except Exception as e:  # noqa: BLE001
        print(f"  SDPA cuDNN graph b{b}: {type(e).__name__}: {str(e)[:100]}")
    gres = _interleaved({k: (lambda: None, g.replay) for k, g in graphs.items()}, calls, repeats)
    short = {v: k for k, v in {"kernel": "decode + merge kernels", "chunked": "one launch (chunked), spare counters",
                               "flat": "one launch (flat), spare counters"}.items()}  # fmt: skip
    for name, t in gres.items():
        mode = short.get(name, "SDPA cuDNN" if name == "SDPA cuDNN" else name)
        rows.append(dict(batch=b, kind="graph", mode=mode, call=f"{tag} CUDA graph replay: {name}", us=t))
    for m in MODES:
        _mode(m)
        dev = _device_us(ft_int)
        us = None if dev is None else (dev["all"],) * 3
        rows.append(dict(batch=b, kind="device", mode=m, call=f"{tag} device time per call: {m}", us=us,
                         parts=dev))  # fmt: skip
    # the probe: the in-kernel counting (fence, atomic, reset) without the merge (a wrong result, timed only)
    _mode("flat")
    from flashtile.backends.triton import launch, launch_decode

    launch_decode._MERGE_SYNC_ONLY = True
    launch.clear_plans()
    dev = _device_us(ft_int)
    launch_decode._MERGE_SYNC_ONLY = False
    launch.clear_plans()
    if dev is not None:
        rows.append(dict(batch=b, kind="device", mode="sync only", call=f"{tag} device time per call: the in-kernel "
                         "counting alone (probe, no merge)", us=(dev["all"],) * 3, parts=dev))  # fmt: skip
    dev = _device_us(sd(SDPBackend.CUDNN_ATTENTION)) if "SDPA cuDNN" in fns else None
    if dev is not None:
        rows.append(dict(batch=b, kind="device", mode="SDPA cuDNN", call=f"{tag} device time per call: SDPA cuDNN",
                         us=(dev["all"],) * 3, parts=dev))  # fmt: skip
    _mode("flat")
    print(f"  decode b{b} timed")
    return rows


def summary(rows: list[dict]) -> list[str]:
    """One line per batch: eager / graph / device medians per mode, and the in-kernel forms' device
    time against the merge kernel's (negative: the one launch is faster on the device)."""
    cols = [(k, m) for k in ("eager", "graph", "device") for m in (*MODES, "SDPA cuDNN")]
    cols.insert(cols.index(("device", "SDPA cuDNN")), ("device", "sync only"))
    head = "| b | groups | " + " | ".join(f"{k} {m}" for k, m in cols) + " | flat - kernel dev | chunked - kernel dev |"
    out = [head, "|" + "---|" * (head.count("|") - 1)]
    for b in sorted({r["batch"] for r in rows}):
        got = {(r["kind"], r["mode"]): r["us"][0] for r in rows if r["batch"] == b and r["us"]}
        cells = [f"{got[c]:.1f}" if c in got else "-" for c in cols]
        ref = got.get(("device", "kernel"))
        diff = [
            f"{got[('device', f)] - ref:+.1f}" if ref and ("device", f) in got else "-" for f in ("flat", "chunked")
        ]
        out.append(f"| {b} | {b * 8} | " + " | ".join(cells) + f" | {diff[0]} | {diff[1]} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,2,4,8", help="batch sizes timed (comma list)")
    ap.add_argument("--skip-checks", action="store_true", help="the timings only")
    ap.add_argument(
        "--check-chunked",
        action="store_true",
        help="the chunked in-kernel merge in the correctness cases too (checked in stop 24; more compiles)",
    )
    ap.add_argument("--calls", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    ap.add_argument("--dry-cpu", action="store_true", help="the checks, tiny, on the CPU (TRITON_INTERPRET=1)")
    args = ap.parse_args()
    if args.dry_cpu:
        global DEV, DRY
        DEV, DRY = "cpu", True
        import flashtile

        with flashtile.use_backend("triton"):
            print("dry run on the CPU:", checks(MODES), "cases ok")
        return
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA device")
    import triton

    t0 = time.perf_counter()
    meta = dict(date=_dt.datetime.now().isoformat(timespec="seconds"), gpu=torch.cuda.get_device_name(),
                torch=torch.__version__, triton=triton.__version__)  # fmt: skip
    if not args.skip_checks:
        print("== correctness (stops at the first failure)")
        meta["cases"] = checks(MODES if args.check_chunked else ("flat", "kernel"))
    print("== timings")
    rows = timings([int(x) for x in args.batches.split(",")], args.calls, args.repeats)
    meta["seconds"] = time.perf_counter() - t0
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"decode_one_launch_{meta['gpu'].replace(' ', '_')}_{_dt.date.today()}.json")
    with open(path, "w") as fh:
        json.dump(dict(meta=meta, rows=rows), fh, indent=1)
    print(f"\n== decode in one launch ({meta['gpu']}, triton {meta['triton']}, torch {meta['torch']}; us per call, "
          f"median (min-max) of {args.repeats} x {args.calls}) -> {path}")  # fmt: skip
    for r in rows:
        t = r["us"]
        extra = ""
        if r.get("parts"):
            extra = f" (decode kernel {r['parts']['decode']:.1f}, merge kernel {r['parts']['merge']:.1f})"
        print(f"| {r['call']} | " + ("-" if t is None else f"{t[0]:.1f} ({t[1]:.1f}-{t[2]:.1f})") + extra + " |")
    print("\n== summary (us per call, medians; device: torch.profiler kernel time)")
    print("\n".join(summary(rows)))
    print(f"total {meta['seconds']:.0f} s")


if __name__ == "__main__":
    main()
