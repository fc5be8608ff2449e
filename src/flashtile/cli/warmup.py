"""``flashtile warmup``: compile a grid of kernel variants into Triton's on-disk cache ahead of time
(for containers and servers: later processes then load them instead of compiling on first use).

Each grid point runs tiny calls through the public API on the GPU, which compiles exactly the
variants real calls of that head dim, dtype and feature set use: the forward and backward for
tiny (keys in one block: the one-pass backward), short (<= the short-sequence config table's
bound) and long sequences, with and without GQA, the
long ones past the hopper backend's small-call bound (its Gluon kernels), the decode-shaped forward,
and ``flash_attn_with_kvcache`` (appending, with int and tensor cache lengths). Triton writes
them to its cache (``TRITON_CACHE_DIR``, default ``~/.triton/cache``). On a machine without CUDA
the torch engine serves every call and has nothing to compile: the command says so and exits 0.
"""

from __future__ import annotations

import argparse
import time

import torch

from ._util import DTYPES

#: Feature names a grid point may combine with "+" (``--features causal+softcap,window``).
FEATURE_NAMES = ("plain", "causal", "window", "softcap", "alibi", "dropout", "varlen", "decode")
DEFAULT_FEATURES = "plain,causal,decode"


def parse_feature_sets(text: str) -> list[tuple[str, ...]]:
    """``"causal,causal+softcap"`` -> ``[("causal",), ("causal", "softcap")]``; raises ValueError naming
    an unknown feature."""
    sets = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        names = tuple(n.strip() for n in item.split("+") if n.strip())
        bad = [n for n in names if n not in FEATURE_NAMES]
        if bad or not names:
            raise ValueError(f"unknown feature {', '.join(bad) or item!r}: choose from {', '.join(FEATURE_NAMES)}, "
                             "combined with '+' (e.g. causal+softcap)")  # fmt: skip
        sets.append(names)
    if not sets:
        raise ValueError("--features: give at least one feature set")
    return sets


def _lengths() -> tuple[int, int, int, int]:
    """(tiny, short, mid, long) sequence lengths whose calls compile every config the tables pick:
    the one-pass backward (keys within one block), the Triton short table (one key block < keys <=
    SHORT_SEQLEN), the causal-short one (SHORT_SEQLEN < keys <=
    CAUSAL_SHORT_SEQLEN, below the shortest Gluon backward threshold so that the Triton backward
    runs it on sm_90 too), the long one, and the Gluon backward from its longest key threshold
    (hopper.GLUON_BWD_MIN_KEYS)."""
    from ..backends.hopper import GLUON_BWD_MIN_KEYS
    from ..backends.triton.configs import _BWD_ONE_PASS, CAUSAL_SHORT_SEQLEN, SHORT_SEQLEN

    gluon = [n for n in GLUON_BWD_MIN_KEYS.values() if n > 0]
    mid = min(CAUSAL_SHORT_SEQLEN, *(n - 64 for n in gluon))
    one = min(c.block_n1 for c in _BWD_ONE_PASS.values())
    return (one // 2, min(SHORT_SEQLEN, 2 * one), max(mid, SHORT_SEQLEN + 64),
            max(SHORT_SEQLEN, CAUSAL_SHORT_SEQLEN, *gluon) + 64)  # fmt: skip


def _calls(features: tuple[str, ...], d: int, dtype: torch.dtype, device: torch.device) -> list:
    """The tiny calls that compile what a grid point uses (functions of no arguments)."""
    from .. import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache

    f = set(features)
    opts: dict = {}
    if "causal" in f:
        opts["causal"] = True
    if "window" in f:
        opts["window_size"] = (64, 0 if "causal" in f else 64)
    if "softcap" in f:
        opts["softcap"] = 30.0
    if "alibi" in f:
        opts["alibi_slopes"] = torch.rand(2, device=device, dtype=torch.float32)
    if "dropout" in f:
        opts["dropout_p"] = 0.1
    h, hk = 2, 1

    def rnd(*shape, grad=False):
        return torch.randn(*shape, device=device, dtype=dtype).requires_grad_(grad)

    def dense(s: int, hk: int, batch: int = 1):
        def run():
            q = rnd(batch, s, h, d, grad=True)
            k, v = rnd(batch, s, hk, d, grad=True), rnd(batch, s, hk, d, grad=True)
            out = flash_attn_func(q, k, v, **opts)
            out.backward(torch.ones_like(out))

        return run

    def varlen(s: int):
        def run():
            cu = torch.tensor([0, s // 2, s], dtype=torch.int32, device=device)
            q, k, v = rnd(s, h, d, grad=True), rnd(s, hk, d, grad=True), rnd(s, hk, d, grad=True)
            out = flash_attn_varlen_func(q, k, v, cu, cu, s - s // 2, s - s // 2, **opts)
            out.backward(torch.ones_like(out))

        return run

    def decode():
        kv_opts = {k: v for k, v in opts.items() if k != "dropout_p"}
        q = rnd(2, 1, h, d)
        kc, vc = rnd(2, 256, hk, d), rnd(2, 256, hk, d)
        with torch.no_grad():
            flash_attn_func(q, kc, vc, **kv_opts)  # decode-shaped forward
            flash_attn_with_kvcache(q, kc, vc, rnd(2, 1, hk, d), rnd(2, 1, hk, d), cache_seqlens=100, **kv_opts)
            lens = torch.full((2,), 100, dtype=torch.int32, device=device)
            flash_attn_with_kvcache(q, kc, vc, cache_seqlens=lens, **kv_opts)

    if "decode" in f:
        return [decode]
    tiny, short, mid, long = _lengths()
    if "varlen" in f:
        return [varlen(short), varlen(2 * mid), varlen(2 * long)]
    # MHA and GQA both: Triton compiles a kernel per value class of the group size (1 or not);
    # the long shape has more query rows than the hopper backend's small-call bound, so on sm_90
    # its Gluon kernels are compiled too (smaller calls run the Triton forward).
    from ..backends.hopper import SMALL_ROWS

    batch = SMALL_ROWS // (long * h) + 1
    return [dense(tiny, hk), dense(tiny, h), dense(short, hk), dense(short, h), dense(mid, hk), dense(mid, h),
            dense(long, hk, batch), dense(long, h, batch)]


def run_warmup(args: argparse.Namespace) -> int:
    """Compile the grid; 0 on success (also when there is nothing to compile), 1 if a point failed."""
    try:
        sets = parse_feature_sets(args.features)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda":
        print("flashtile warmup: no CUDA device here: the torch engine serves every call and compiles nothing, "
              "so there is nothing to warm up.")  # fmt: skip
        return 0
    from .. import dispatch

    dtypes = [DTYPES[n] for n in args.dtypes]
    grid = [(d, dt, fs) for d in args.headdims for dt in dtypes for fs in sets]
    try:
        from tqdm import tqdm

        bar = tqdm(total=len(grid), desc="warmup", unit="variant set")
    except ImportError:
        bar = None
    failures = 0
    t0 = time.perf_counter()
    for i, (d, dt, fs) in enumerate(grid):
        label = f"d{d} {str(dt).removeprefix('torch.')} {'+'.join(fs)}"
        t = time.perf_counter()
        try:
            for call in _calls(fs, d, dt, device):
                call()
            torch.cuda.synchronize(device)
            status = f"{time.perf_counter() - t:.1f} s"
        except dispatch.BackendUnavailableError as e:
            status = f"skipped ({e})"
        except Exception as e:  # noqa: BLE001 - one point's failure is reported, the rest still compile
            failures += 1
            status = f"FAILED: {type(e).__name__}: {str(e)[:200]}"
        if bar is not None:
            bar.set_postfix_str(label)
            bar.update(1)
            if not status.endswith(" s"):
                bar.write(f"{label}: {status}")
        else:
            print(f"[{i + 1}/{len(grid)}] {label}: {status}", flush=True)
    if bar is not None:
        bar.close()
    failed = f", {failures} failed" if failures else ""
    print(f"warmup: {len(grid)} variant sets in {time.perf_counter() - t0:.1f} s{failed} "
          "(Triton's cache: TRITON_CACHE_DIR or ~/.triton/cache)")  # fmt: skip
    return 1 if failures else 0
