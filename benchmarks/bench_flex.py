"""Masks and score mods (issue 18) on one GPU: flashtile's mod path against compiled FlexAttention
and against flashtile's built-in option for the same mask where one exists. bf16.

Cases (batch 1, 16 heads, head dim 128, 16384 tokens by default): a document mask (16 documents
of random lengths, causal inside each; built-in: flash_attn_varlen_func), prefix-LM (prefix of a
quarter; no built-in), sliding window 1024 (built-in: causal + window_size=(1024, 0)), ALiBi as a
score_mod on a causal block mask (built-in: alibi_slopes + causal), a learned relative-bias table
as a score_mod on a causal block mask (no built-in; its gradient is part of the backward).

First a correctness pass on small odd shapes (each case's flashtile mod path against the fp32
oracle by flash-attn's rule, forward and backward incl. the captured tensor's gradient, and
optionally against compiled FlexAttention's output), stopping at the first failure; then the timings
(forward; backward alone from a saved graph), a table printed last, JSON written to $OUT (else
benchmarks/results).

    PYTHONPATH=src python benchmarks/bench_flex.py [--seqlen 16384] [--heads 16] [--hdim 128]

Each row records which backward served flashtile's mod path (``flashtile_bwd_path``: the
flex_triton passes or the torch engine's tile loop). ``FLASHTILE_FLEX_FWD=M,N,W,S`` /
``FLASHTILE_FLEX_BWD=M1,N1,M2,N2,W1,S1,W2,S2`` force the flex_triton tile configs (with
``--skip-check --flex-deadline 0`` a quick way to time another config); ``--fwd-cfgs
"64,64,4,3;128,64,4,3"`` times the forward again with each of these.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
import warnings
from unittest import mock

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

import flashtile  # noqa: E402
from flashtile import create_block_mask, flash_attn_func, flash_attn_varlen_func, flex_attention, masks  # noqa: E402
from flashtile.backends import torch_tiled  # noqa: E402
from flashtile.testing import attention_ref, compare_with_oracle, mask_from_mod  # noqa: E402

warnings.filterwarnings("ignore")
DEV = os.environ.get("BENCH_FLEX_DEVICE", "cuda")  # "cpu": a dry run of the script's logic (tiny sizes)
DT = torch.bfloat16



def env(name: str, val: str | None):
    """Set an environment variable inside a with block (None or "" sets it empty, which
    flashtile's switches read as unset); the flex benchmark scripts' A/B switch."""
    return mock.patch.dict(os.environ, {name: val or ""})

def doc_ids(s: int, ndocs: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    g = torch.Generator().manual_seed(seed)
    cuts = sorted(torch.randperm(s - 1, generator=g)[: ndocs - 1].add(1).tolist())
    lens = [b - a for a, b in zip([0, *cuts], [*cuts, s], strict=True)]
    ids = torch.repeat_interleave(torch.arange(ndocs), torch.tensor(lens))
    return ids.to(DEV), lens


def cases(s: int, h: int):
    """name -> dict(mask_mod, score builder (captured tensor -> score_mod) or None, captured, builtin)."""
    ids, lens = doc_ids(s, 16)
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=DEV)
    slopes = (2.0 ** (-8.0 * torch.arange(1, h + 1, device=DEV) / h)).float()
    table = (torch.randn(h, 2 * 512 - 1, device=DEV) * 0.5).requires_grad_()

    def varlen_builtin(q, k, v):  # q: (1, s, h, d)
        return flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, max(lens), max(lens), causal=True).unsqueeze(0)

    return {
        "document-16": dict(mask=masks.document(ids), score=None, captured=None, builtin=varlen_builtin),
        "prefix-lm": dict(mask=masks.prefix_lm(s // 4), score=None, captured=None, builtin=None),
        "sliding-1k": dict(mask=masks.sliding_window(1024), score=None, captured=None,
                           builtin=lambda q, k, v: flash_attn_func(q, k, v, causal=True, window_size=(1024, 0))),
        "alibi": dict(mask=masks.causal, score=masks.alibi, captured=slopes,
                      builtin=lambda q, k, v: flash_attn_func(q, k, v, causal=True, alibi_slopes=slopes)),
        "bias-table": dict(mask=masks.causal, score=masks.relative_bias, captured=table, builtin=None),
    }  # fmt: skip


def _sync():
    if DEV != "cpu":
        torch.cuda.synchronize()


def timed(fn, budget_s: float = 3.0, max_reps: int = 20) -> float:
    """Median milliseconds of fn() after one warm-up; fewer repetitions for slow functions."""
    fn()
    _sync()
    times = []
    t_all = time.perf_counter()
    while len(times) < max_reps and (time.perf_counter() - t_all < budget_s or len(times) < 2):
        t = time.perf_counter()
        fn()
        _sync()
        times.append((time.perf_counter() - t) * 1e3)
    times.sort()
    return times[len(times) // 2]


def event_ms(fn, n: int = 1, reps: int = 7, warm: int = 1) -> float:
    """Median ms per call of ``n`` back-to-back calls of fn() between two CUDA events (after ``warm``
    calls). ``n = 1`` times one call after a sync (the host's preparation of the launch counts
    while the GPU waits); ``n > 1`` the device's time when the host keeps ahead: a call not timed
    is queued first, so the timed calls are prepared while the GPU works (without it the first
    timed call's host preparation, with the GPU idle, counted for 1 / n of it)."""
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if n > 1:
            fn()  # (keeps the GPU busy while the host prepares the first timed call)
        a.record()
        for _ in range(n):
            fn()
        b.record()
        b.synchronize()
        ts.append(a.elapsed_time(b) / n)
    ts.sort()
    return ts[len(ts) // 2]


def fwd_bwd_times(run, inputs):
    """(fwd ms, bwd ms) of out = run(*inputs); the backward alone, from a saved graph."""
    fwd = timed(lambda: run(*inputs))
    out = run(*inputs)
    dout = torch.randn_like(out)
    diff = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    bwd = timed(lambda: torch.autograd.grad(out, diff, dout, retain_graph=True))
    return fwd, bwd


def _ms(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def torch_flex():
    # every case (a new mask_mod / score_mod closure) and head dim is a recompile of the one wrapper:
    # past dynamo's recompile limit (8) FlexAttention fell back to eager, 100x slower (stop 23's d64 rows)
    import torch._dynamo.config as dyn
    from torch.nn.attention.flex_attention import create_block_mask as tcbm
    from torch.nn.attention.flex_attention import flex_attention as tfa

    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dyn, name):
            setattr(dyn, name, max(getattr(dyn, name), 64))
    return torch.compile(tfa, dynamic=False), tcbm


def check(name, c, tflex, tcbm, s=377, h=4, d=64, vs_flex=False):
    """Small-shape correctness of the flashtile mod path (and agreement with FlexAttention)."""
    b = 2
    q, k, v = (torch.randn(b, h, s, d, device=DEV, dtype=DT) for _ in range(3))
    cap = c["captured"]
    if cap is not None:
        cap = cap[:h].detach() if cap.dim() == 1 else cap[:h].detach()
    mm = c["mask"]
    bm = create_block_mask(mm, None, None, s, s, device=DEV)
    dense = mask_from_mod(mm, None, None, s, s, DEV)
    inputs = (q, k, v) if cap is None else (q, k, v, cap)

    def fn(q, k, v, *t):
        sm = c["score"](t[0]) if t else None
        o, lse = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=sm,
                                block_mask=bm, return_lse=True)  # fmt: skip
        return o.transpose(1, 2), lse

    def oracle(q, k, v, *t, upcast):
        sm = c["score"](t[0]) if t else None
        return attention_ref(q, k, v, mask=dense, score_mod=sm, upcast=upcast)

    # inputs in flashtile's (b, s, h, d) layout for the oracle
    res = compare_with_oracle(fn, oracle, [x.transpose(1, 2).contiguous() if x.dim() == 4 else x for x in inputs])
    msg = "ok"
    if not vs_flex or tflex is None:
        print(f"check {name} s={s}: {msg}", flush=True)
        return
    try:
        tbm = tcbm(mm, None, None, s, s, device=DEV)
        sm = c["score"](cap) if cap is not None else None
        ref = tflex(q, k, v, score_mod=sm, block_mask=tbm)
        diff = (ref.float() - res["out"].transpose(1, 2).float()).abs().max().item()
        msg = f"ok (max |flashtile - FlexAttention| = {diff:.3g})"
    except Exception as e:  # noqa: BLE001
        msg = f"ok (FlexAttention comparison failed: {type(e).__name__}: {str(e)[:120]})"
    print(f"check {name} s={s}: {msg}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--hdim", type=int, default=128)
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--flex-deadline", type=float, default=200.0,
                    help="seconds after which FlexAttention rows (a compile each) are skipped")  # fmt: skip
    ap.add_argument("--check-vs-flex", action="store_true", help="also compare outputs with FlexAttention (compiles)")
    ap.add_argument("--fwd-cfgs", type=lambda x: [c for c in x.split(";") if c], default=[],
                    help="also time flashtile's forward with these tile configs, 'M,N,W,S;M,N,W,S'")  # fmt: skip
    args = ap.parse_args()
    s, h, d = args.seqlen, args.heads, args.hdim
    t0 = time.perf_counter()
    try:
        tflex, tcbm = torch_flex()
    except Exception as e:  # noqa: BLE001
        tflex = tcbm = None
        print(f"FlexAttention unavailable: {type(e).__name__}: {e}")
    all_cases = cases(s, h)
    if not args.skip_check:
        # 377, head dim 64: ragged lengths (the kernels' bounds-checked path); 2048, head dim d:
        # multiples of the block mask's block, the unchecked kernels the timed runs then reuse
        # (16 blocks: the block-mask strides specialise as at 16k, so Triton compiles them once)
        for sc, dc in ((377, 64), (2048, d)):
            for name, c in cases(sc, 4).items():
                try:
                    check(name, c, tflex, tcbm, s=sc, d=dc, vs_flex=args.check_vs_flex)
                except AssertionError as e:
                    print(f"CORRECTNESS FAILURE in {name} (seqlen {sc}): {e}")
                    sys.exit(1)
    print(f"checks done in {time.perf_counter() - t0:.0f}s", flush=True)

    rows = []
    for name, c in all_cases.items():
        q, k, v = (torch.randn(1, h, s, d, device=DEV, dtype=DT, requires_grad=True) for _ in range(3))
        cap = c["captured"]
        row = {"case": name}
        tb = time.perf_counter()
        bm = create_block_mask(c["mask"], None, None, s, s, device=DEV)
        _sync()
        row["flashtile_block_mask_ms"] = (time.perf_counter() - tb) * 1e3
        row["sparsity_pct"] = bm.sparsity()

        def ours(q, k, v, *t, c=c, bm=bm):
            sm = c["score"](t[0]) if t else None
            return flex_attention(q, k, v, score_mod=sm, block_mask=bm)

        ins = (q, k, v) if cap is None else (q, k, v, cap)
        engine_calls = []
        engine_bwd = torch_tiled.backend.backward
        torch_tiled.backend.backward = lambda *a, _f=engine_bwd, _c=engine_calls: _c.append(1) or _f(*a)
        try:
            row["flashtile_fwd_ms"], row["flashtile_bwd_ms"] = fwd_bwd_times(ours, ins)
        except Exception as e:  # noqa: BLE001
            row["flashtile_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        finally:
            torch_tiled.backend.backward = engine_bwd
        # which backward served the mod path: the Triton passes, or the torch engine's tile loop
        row["flashtile_bwd_path"] = "torch engine" if engine_calls else "triton"
        for cfg in args.fwd_cfgs:  # the forward again with other tile configs (forced by env var)
            old = os.environ.get("FLASHTILE_FLEX_FWD")
            os.environ["FLASHTILE_FLEX_FWD"] = cfg
            try:
                with torch.no_grad():
                    row[f"flashtile_fwd_ms@{cfg}"] = timed(lambda ours=ours, ins=ins: ours(*ins))
            except Exception as e:  # noqa: BLE001
                row[f"flashtile_fwd_ms@{cfg}"] = f"{type(e).__name__}: {str(e)[:120]}"
            finally:
                if old is None:
                    os.environ.pop("FLASHTILE_FLEX_FWD", None)
                else:
                    os.environ["FLASHTILE_FLEX_FWD"] = old
        if tflex is not None and time.perf_counter() - t0 > args.flex_deadline:
            row["flex_error"] = f"skipped: past --flex-deadline ({args.flex_deadline:.0f}s; compiles are slow)"
        elif tflex is not None:
            try:
                tbm = tcbm(c["mask"], None, None, s, s, device=DEV)

                def theirs(q, k, v, *t, c=c, tbm=tbm):
                    sm = c["score"](t[0]) if t else None
                    return tflex(q, k, v, score_mod=sm, block_mask=tbm)

                row["flex_fwd_ms"], row["flex_bwd_ms"] = fwd_bwd_times(theirs, ins)
            except Exception as e:  # noqa: BLE001
                row["flex_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        if c["builtin"] is not None:
            qb, kb, vb = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
            try:
                row["builtin_fwd_ms"], row["builtin_bwd_ms"] = fwd_bwd_times(c["builtin"], (qb, kb, vb))
            except Exception as e:  # noqa: BLE001
                row["builtin_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
        del q, k, v
        if DEV != "cpu":
            torch.cuda.empty_cache()

    gpu = torch.cuda.get_device_name() if DEV != "cpu" else "cpu"
    meta = dict(gpu=gpu, torch=torch.__version__, flashtile=flashtile.__version__,
                date=_dt.datetime.now().isoformat(timespec="seconds"), seqlen=s, heads=h, hdim=d, dtype="bf16",
                backend_for_mods=flashtile.dispatch.choose(
                    flashtile.spec.Problem(1, s, s, h, h, d, DT, torch.device(DEV)),
                    flashtile.spec.make_call(headdim=d, score_mod=masks.softcap(1.0))),
                flex_cfg_env={k: os.environ.get(k) for k in ("FLASHTILE_FLEX_FWD", "FLASHTILE_FLEX_BWD")},
                total_s=time.perf_counter() - t0)  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"flex_{gpu.replace(' ', '_')}_"
                                  f"{_dt.datetime.now():%Y%m%d-%H%M}.json")  # fmt: skip
    with open(path, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    print(f"\nwrote {path}; mods served by backend {meta['backend_for_mods']!r}; total {meta['total_s']:.0f}s")
    print(f"bf16, b=1, h={h}, s={s}, d={d}; ms (lower is better); x = FlexAttention time / flashtile time")
    hdr = f"{'case':<12} {'pass':<4} {'flashtile':>10} {'flex':>10} {'x flex':>7} {'built-in':>10} {'mod cost':>9}"
    print(hdr)
    for r in rows:
        for p in ("fwd", "bwd"):
            ft, fx, bi = (r.get(f"{k}_{p}_ms") for k in ("flashtile", "flex", "builtin"))

            def f(x):
                return f"{x:10.2f}" if x is not None else f"{'-':>10}"

            ratio = f"{fx / ft:7.2f}" if ft and fx else f"{'-':>7}"
            cost = f"{ft / bi - 1:+9.0%}" if ft and bi else f"{'-':>9}"
            bp = r.get("flashtile_bwd_path")
            path = f"  ({bp})" if p == "bwd" and bp != "triton" else ""
            print(f"{r['case']:<12} {p:<4} {f(ft)} {f(fx)} {ratio} {f(bi)} {cost}{path}")
    for cfg in args.fwd_cfgs:
        print(f"forward with FLASHTILE_FLEX_FWD={cfg}: " + ", ".join(
            f"{r['case']} {_ms(r.get(f'flashtile_fwd_ms@{cfg}'))}" for r in rows))  # fmt: skip


if __name__ == "__main__":
    main()
