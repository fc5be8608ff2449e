"""The flex backward on the Gluon Hopper kernel (issue 18: ``hopper.launch_bwd.flex_backward``, the ws
kernel's block-list mode) on one H200, in one run:

1. Correctness first (stops at the first failure, naming it): the library's mask mods with Triton
   versions (causal, sliding window, document, prefix-LM, chunked, bidirectional blocks), and
   softcap as a score_mod, on small odd shapes (113 vs 203 tokens, 1000, GQA, head dims 64 / 96 /
   128, bf16 and fp16), through ``flashtile.flex_attention``: out, lse and the gradients against the
   fp32 oracle by flash-attn's rule (3x PyTorch's error for gradients); each case asserts that the
   Gluon backward served it. Query rows that see no key (sliding window with sq > sk): dq exactly 0,
   nothing NaN. ``deterministic=True`` still takes the Triton backward.
2. Backward timings, b1 h16 s16k bf16, d128 (and d64): document-16, prefix-LM, sliding-1k (the
   cases of bench_flex.py), median ms over CUDA-event-timed calls of
   * ``gluon``: ``flex_triton.launch.backward`` (the routing picks the Gluon kernel),
   * ``triton``: the same with ``FLASHTILE_FLEX_GLUON=0`` (the flex Triton passes),
   * ``gluon_api`` / ``triton_api``: the public call's backward from a saved graph (autograd),
     through the flex kernels (``flex.BUILTIN_ROUTE`` off), and ``auto_api``: the same call as a
     user makes it (the routing; a library causal / sliding-window mask as the built-in window),
   * ``builtin``: flashtile's built-in option for the mask (sliding: causal + window_size=(1024, 0);
     document: flash_attn_varlen_func, causal), backward from a saved graph,
   * ``flex``: FlexAttention (torch.compile'd), backward from a saved graph (d128 only; skipped
     once ``--budget`` seconds are spent). Cases in the order prefix-LM, sliding-1k, document-16;
     d64 only when started within ``--d64-until`` seconds.
3. A table printed last; JSON to $OUT (else benchmarks/results).

    PYTHONPATH=src python benchmarks/gflex_bwd_run.py [--seqlen 16384] [--no-d64] [--budget 270]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import sys
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

import bench_flex  # noqa: E402

import flashtile  # noqa: E402
from flashtile import create_block_mask, flex_attention, masks  # noqa: E402
from flashtile import flex as flex_mod  # noqa: E402
from flashtile.backends.flex_triton import backend as FTB  # noqa: E402
from flashtile.backends.flex_triton import launch as L  # noqa: E402
from flashtile.backends.hopper import launch_bwd  # noqa: E402
from flashtile.spec import make_call  # noqa: E402
from flashtile.testing import attention_ref, compare_with_oracle, mask_from_mod  # noqa: E402

warnings.filterwarnings("ignore")
DEV = torch.device("cuda")
ENV = L.FLEX_GLUON_ENV

#: flex_backward calls seen (the routing imports it from the module at each call)
_GLUON_CALLS = [0]
_flex_backward = launch_bwd.flex_backward


def _counted(*a, **kw):
    _GLUON_CALLS[0] += 1
    return _flex_backward(*a, **kw)


launch_bwd.flex_backward = _counted



env = bench_flex.env

def _ids(b, s, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(b, s, generator=g) < 0.01).cumsum(-1).to(DEV)


def _spans(s, span=150):
    pos = torch.arange(s, device=DEV)
    return torch.where((pos // span) % 3 == 1, pos // span, -1)


MASKS = {
    "causal": lambda b, s: masks.causal,
    "sliding_window": lambda b, s: masks.sliding_window(100),
    "sliding_40": lambda b, s: masks.sliding_window(40),
    "document": lambda b, s: masks.document(_ids(b, s)),
    "document_bidir": lambda b, s: masks.document(_ids(1, s, 3)[0], causal=False),
    "prefix_lm": lambda b, s: masks.prefix_lm(170),
    "chunked": lambda b, s: masks.chunked(200),
    "bidirectional_blocks": lambda b, s: masks.bidirectional_blocks(_spans(s)),
}

# (mask, b, sq, sk, h, hk, d, dtype, softcap)
CHECKS = [
    ("causal", 2, 113, 203, 4, 2, 128, torch.bfloat16, 0.0),
    ("prefix_lm", 2, 203, 113, 4, 4, 128, torch.bfloat16, 0.0),
    ("sliding_window", 2, 1000, 1000, 4, 2, 128, torch.bfloat16, 0.0),
    ("document", 2, 1000, 1000, 4, 1, 128, torch.bfloat16, 0.0),
    ("document_bidir", 1, 389, 389, 4, 2, 128, torch.float16, 0.0),
    ("chunked", 2, 1000, 1000, 4, 4, 128, torch.bfloat16, 0.0),
    ("bidirectional_blocks", 1, 1000, 1000, 4, 2, 128, torch.bfloat16, 0.0),
    ("prefix_lm", 1, 1000, 1000, 4, 2, 128, torch.bfloat16, 20.0),
    ("document", 2, 203, 203, 4, 2, 64, torch.bfloat16, 0.0),
    ("chunked", 1, 389, 389, 4, 2, 96, torch.bfloat16, 0.0),
]


def check(mask_name, b, sq, sk, h, hk, d, dt, cap, deterministic=False, expect_gluon=True, per_head=False,
          score_mod=None):
    """One flex call against the oracle; asserts which backward served it. ``per_head``: a block
    mask with a head dimension (lists per query head). ``score_mod``: this one instead of softcap's
    (``cap``)."""
    mm = MASKS[mask_name](b, max(sq, sk))
    torch.manual_seed(0)
    q = torch.randn(b, sq, h, d, device=DEV, dtype=dt)
    k = torch.randn(b, sk, hk, d, device=DEV, dtype=dt)
    v = torch.randn(b, sk, hk, d, device=DEV, dtype=dt)
    bm = create_block_mask(mm, b, h if per_head else None, sq, sk, device=DEV)
    dense = mask_from_mod(mm, b, None, sq, sk, DEV)
    sm = score_mod if score_mod is not None else masks.softcap(cap) if cap else None
    call = make_call(headdim=d, block_mask=bm, score_mod=sm, deterministic=deterministic)
    why = L.gluon_bwd_reason(q, k, call, ())
    if expect_gluon and why is not None:
        raise AssertionError(f"the Gluon backward does not serve it: {why}")

    def fn(q, k, v):
        o, lse = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), score_mod=sm,
                                block_mask=bm, enable_gqa=h != hk, return_lse=True)  # fmt: skip
        return o.transpose(1, 2), lse

    def oracle(q, k, v, upcast):
        return attention_ref(q, k, v, mask=dense, score_mod=sm, upcast=upcast)

    before = _GLUON_CALLS[0]
    if deterministic:
        res = _check_deterministic(q, k, v, bm, sm, h != hk, dense, oracle)
    else:
        res = compare_with_oracle(fn, oracle, (q, k, v))
    ran = _GLUON_CALLS[0] - before
    if expect_gluon and ran != 1:
        raise AssertionError(f"flex_backward ran {ran} times (expected once)")
    if not expect_gluon and ran:
        raise AssertionError("the Gluon backward served a call it must not")
    return res


def repeated(route: str) -> None:
    """A signature's backward four times (the plans of ``flex_triton.launch._BWD_PLANS``: the
    unplanned call, its pending plan, the prepared launches): the gradients of the later calls
    equal the first's bitwise on the Triton route (no atomics), within the atomics' rounding
    (1e-2 relative) on the Gluon route; the first against the oracle by ``check``."""
    mm = MASKS["document"](1, 1000)
    q, k, v = (torch.randn(1, 1000, h, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True) for h in (4, 2, 2))
    bm = create_block_mask(mm, 1, None, 1000, 1000, device=DEV)
    do = torch.randn(1, 4, 1000, 128, device=DEV, dtype=torch.bfloat16)
    with env(ENV, "force" if route == "gluon" else "0"):
        grads = []
        for _ in range(4):
            o = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm, enable_gqa=True)
            grads.append(torch.autograd.grad(o, (q, k, v), do))
    for g in grads[1:]:
        for a, b, n in zip(grads[0], g, "qkv", strict=True):
            err = ((a.float() - b.float()).abs().max() / a.float().abs().max()).item()
            if (route == "triton" and err != 0) or err > 1e-2:
                raise AssertionError(f"repeated {route} backward: d{n} differs from the first call's by {err:.2e}")


def _check_deterministic(q, k, v, bm, sm, gqa, dense, oracle):
    """deterministic=True through flash_attn_func (flex_attention has no such argument)."""

    def fn(q, k, v):
        o, lse, _ = flashtile.flash_attn_func(q, k, v, score_mod=sm, block_mask=bm, deterministic=True,
                                              return_attn_probs=True)  # fmt: skip
        return o, lse

    return compare_with_oracle(fn, oracle, (q, k, v))


def dead_rows():
    """sliding window 40 with sq = 203 > sk = 113: query rows >= 153 see no key (lse -inf): dq 0."""
    mm = masks.sliding_window(40)
    b, sq, sk, h, d = 1, 203, 113, 2, 128
    q = torch.randn(b, sq, h, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, sk, h, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, sk, h, d, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    bm = create_block_mask(mm, b, None, sq, sk, device=DEV)
    before = _GLUON_CALLS[0]
    o, lse = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=bm, return_lse=True)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), torch.randn_like(o))
    assert _GLUON_CALLS[0] - before == 1, "the Gluon backward did not run"
    assert torch.isinf(lse[0, :, 153:]).all(), "rows >= 153 should see no key"
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all() and torch.isfinite(dv).all(), "NaN / inf"
    assert torch.all(dq[0, 153:] == 0), "dq of rows that see no key is not 0"
    check("sliding_40", 1, 203, 113, 4, 2, 128, torch.bfloat16, 0.0)  # the same rows against the oracle


def _both(row: dict, tag: str, fn) -> None:
    """``row[tag]``: one call after a sync; ``row[tag + '_dev']``: 5 back to back (device time)."""
    row[tag] = bench_flex.event_ms(fn, reps=15, warm=2)
    row[f"{tag}_dev"] = bench_flex.event_ms(fn, n=5, warm=2)


def time_case(name, c, s, h, d, tflex, tcbm, deadline) -> dict:
    row = {"case": name, "d": d}
    g = torch.Generator(device=DEV).manual_seed(0)
    q, k, v = (torch.randn(1, h, s, d, device=DEV, dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))  # fmt: skip
    bm = create_block_mask(c["mask"], None, None, s, s, device=DEV)
    sm = None if c["score"] is None else c["score"](c["captured"])  # (ALiBi: slopes without grad)
    call = make_call(headdim=d, block_mask=bm, score_mod=sm)
    qi, ki, vi = (x.detach().transpose(1, 2) for x in (q, k, v))
    with torch.no_grad():
        out, lse = L.forward(qi, ki, vi, call)
    dout = torch.randn_like(out)
    captured = FTB._triton_backward(call) or ()  # what the public call's backward passes
    row["gluon_route"] = L.gluon_bwd_reason(qi, ki, call, captured) or "gluon"
    long = L._gluon_flex.long_rows(bm, "auto", d, True, sm)
    row["auto_route"] = "gluon" if long and row["gluon_route"] == "gluon" else "triton"
    for tag, val in (("gluon", "force"), ("triton", "0"), ("auto", None)):
        if tag == "auto":  # what a user gets: the routing, and a library causal / sliding mask as the built-in
            flex_mod.BUILTIN_ROUTE = True
            try:
                o = flex_attention(q, k, v, block_mask=bm, score_mod=sm)
                go = dout.transpose(1, 2)
                _both(row, "auto_api", lambda o=o, go=go: torch.autograd.grad(o, (q, k, v), go, retain_graph=True))
            except Exception as e:  # noqa: BLE001
                row["auto_error"] = f"{type(e).__name__}: {str(e)[:200]}"
            continue
        flex_mod.BUILTIN_ROUTE = False  # the forced kernels themselves
        with env(ENV, val):
            try:
                _both(row, tag, lambda: L.backward(dout, qi, ki, vi, out, lse, call, captured))
                o = flex_attention(q, k, v, block_mask=bm, score_mod=sm)
                go = dout.transpose(1, 2)
                _both(row, f"{tag}_api", lambda o=o, go=go: torch.autograd.grad(o, (q, k, v), go, retain_graph=True))
            except Exception as e:  # noqa: BLE001
                row[f"{tag}_error"] = f"{type(e).__name__}: {str(e)[:200]}"
        print(name, d, tag, row.get(tag), row.get(f"{tag}_api"), row.get(f"{tag}_error", ""), flush=True)
    if c["builtin"] is not None:
        qb, kb, vb = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
        try:
            ob = c["builtin"](qb, kb, vb)
            gb = torch.randn_like(ob)
            _both(row, "builtin", lambda: torch.autograd.grad(ob, (qb, kb, vb), gb, retain_graph=True))
        except Exception as e:  # noqa: BLE001
            row["builtin_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    if tflex is not None and time.perf_counter() < deadline:
        try:
            tbm = tcbm(c["mask"], None, None, s, s, device=DEV)
            of = tflex(q, k, v, block_mask=tbm, score_mod=sm)
            gf = torch.randn_like(of)
            _both(row, "flex", lambda: torch.autograd.grad(of, (q, k, v), gf, retain_graph=True))
        except Exception as e:  # noqa: BLE001
            row["flex_error"] = f"{type(e).__name__}: {str(e)[:200]}"
    elif tflex is not None:
        row["flex_error"] = "skipped: time budget"
    print(name, d, json.dumps({k_: v_ for k_, v_ in row.items() if k_ != "case"}), flush=True)
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqlen", type=int, default=16384)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--no-d64", action="store_true")
    ap.add_argument("--only-d64", action="store_true", help="the d64 cases alone")
    ap.add_argument("--cases", default="prefix-lm,sliding-1k,document-16",
                    help="comma list of bench_flex cases (alibi: a score_mod with captured slopes; "
                         "bias-table-frozen: the bias table without a gradient)")
    ap.add_argument("--flex-d64", action="store_true", help="FlexAttention at d64 too (within --budget)")
    ap.add_argument("--d64-until", type=float, default=200.0, help="time the d64 cases only if started before (s)")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--budget", type=float, default=270.0, help="seconds after which FlexAttention is skipped")
    ap.add_argument("--out", default=os.environ.get("OUT") or os.path.join(ROOT, "benchmarks", "results"))
    args = ap.parse_args()
    t0 = time.perf_counter()
    if not args.skip_check:
        os.environ[ENV] = "force"  # small shapes: the Gluon kernel whatever the row-length rule says
        flex_mod.BUILTIN_ROUTE = False  # causal / sliding masks through the flex kernels too
        for case in CHECKS:
            try:
                check(*case)
            except AssertionError as e:
                print(f"FAILED check {case[:8]} cap={case[8]}: {e}", flush=True)
                sys.exit(1)
            print(f"check {case[0]} b{case[1]} sq{case[2]} sk{case[3]} h{case[4]}/{case[5]} d{case[6]} "
                  f"{str(case[7])[6:]} softcap={case[8]}: ok", flush=True)  # fmt: skip
        try:
            dead_rows()
            check("document", 2, 389, 389, 4, 4, 128, torch.bfloat16, 0.0, per_head=True)
            check("document", 1, 389, 389, 4, 2, 128, torch.bfloat16, 0.0, deterministic=True, expect_gluon=False)
            repeated("triton")
            repeated("gluon")
        except AssertionError as e:
            print(f"FAILED check (rows that see no key / per-head block mask / deterministic / repeated): {e}",
                  flush=True)  # fmt: skip
            sys.exit(1)
        os.environ.pop(ENV, None)
        print(f"checks ok ({time.perf_counter() - t0:.0f} s)", flush=True)
    s, h = args.seqlen, args.heads
    tflex = tcbm = None
    if not args.no_flex:
        try:
            tflex, tcbm = bench_flex.torch_flex()
        except Exception as e:  # noqa: BLE001
            print(f"FlexAttention unavailable: {type(e).__name__}: {e}", flush=True)
    deadline = t0 + args.budget
    all_cases = bench_flex.cases(s, h)
    # the bias table with no gradient: the Gluon backward's additive-score route (with one, Triton's)
    table = all_cases["bias-table"]
    all_cases["bias-table-frozen"] = {**table, "captured": table["captured"].detach()}
    rows = []
    for d in (128,) if args.no_d64 else (64,) if args.only_d64 else (128, 64):
        if d == 64 and time.perf_counter() - t0 > args.d64_until:
            print(f"d64 skipped: {time.perf_counter() - t0:.0f} s spent (--d64-until {args.d64_until})", flush=True)
            break
        for name in args.cases.split(","):
            fx = tflex if d == 128 or args.flex_d64 else None
            rows.append(time_case(name, all_cases[name], s, h, d, fx, tcbm, deadline))
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "seqlen": s, "heads": h,
           "rows": rows, "wall_s": time.perf_counter() - t0}  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M")
    path = os.path.join(args.out, f"gflex_bwd_{torch.cuda.get_device_name().split()[-1]}_{stamp}.json")
    with open(path, "w") as f:
        json.dump(res, f, indent=1)

    def f(x):
        return f"{x:8.3f}" if isinstance(x, float) else f"{'-':>8}"

    for sfx, title in (("", "one call after a sync"), ("_dev", "5 calls back to back (device time)")):
        print(f"\nflex backward, b1 h{h} s{s} bf16, median ms (CUDA events), {title}; JSON: {path}")
        print(f"{'case':12} {'d':>3} {'gluon':>8} {'triton':>8} {'g_api':>8} {'t_api':>8} {'builtin':>8} {'flex':>8} "
              f"{'flex/auto':>10} {'auto/bi':>8}")  # fmt: skip
        for r in rows:
            auto = r.get("auto_api" + sfx)  # the public call as a user makes it (routing, built-in twins)
            fl, bi = r.get("flex" + sfx), r.get("builtin" + sfx)
            vs_flex = f"{fl / auto:10.2f}" if isinstance(auto, float) and isinstance(fl, float) else f"{'-':>10}"
            vs_bi = f"{auto / bi:8.2f}" if isinstance(auto, float) and isinstance(bi, float) else f"{'-':>8}"
            route = ("" if r["gluon_route"] == "gluon" else r["gluon_route"]) + f" auto: {r['auto_route']}"
            keys = ("gluon", "triton", "gluon_api", "triton_api", "builtin", "flex")
            cells = " ".join(f(r.get(k + sfx)) for k in keys)
            print(f"{r['case']:12} {r['d']:>3} {cells} {vs_flex} {vs_bi}  {route}")


if __name__ == "__main__":
    main()
