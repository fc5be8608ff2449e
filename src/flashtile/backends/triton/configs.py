"""Tile configurations for the Triton kernels, per architecture, head-dim bucket and dtype.

No autotuning happens at import or call time: each entry below is a fixed choice, and the
comment beside it records the measurement that chose it (or says plainly that it was not
measured). ``benchmarks/bench_attention.py --sweep`` re-runs the measurement on a GPU.

If a config asks for more shared memory than a device has, ``launch`` steps down through
:func:`fallbacks` (fewer stages, then smaller tiles) once per key and remembers the result.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True)
class FwdConfig:
    block_m: int  # query rows per program
    block_n: int  # key columns per inner step
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class BwdConfig:
    block_m1: int  # dK/dV pass: query rows per inner step
    block_n1: int  # dK/dV pass: key rows per program
    block_m2: int  # dQ pass: query rows per program
    block_n2: int  # dQ pass: key columns per inner step
    num_warps1: int
    num_stages1: int
    num_warps2: int
    num_stages2: int
    # fuse the dQ pass into the dK/dV pass with fp32 atomics (used only when the call is not
    # deterministic=True; the *2 fields are then unused)
    atomic_dq: bool = False


# Under TRITON_INTERPRET=1 the kernels run in numpy on the CPU: small tiles keep tests quick
# and still cover several blocks (masked and unmasked) per program at seqlen 33..64.
INTERPRET_FWD = FwdConfig(32, 16, 4, 1)
INTERPRET_BWD = BwdConfig(16, 32, 32, 16, 4, 1, 4, 1)

# --- forward ------------------------------------------------------------------------------
# key: (arch, head-dim bucket) with bucket = BLOCK_D capped at 64 / 128 / 256; 16-bit dtypes.
_FWD: dict[tuple[str, int], FwdConfig] = {
    # sm90, measured on an H200 (Triton 3.6, bf16, b*s = 16384, h*d = 2048, seqlen 4096,
    # TFLOP/s non-causal / causal; benchmarks/NOTES.md has the full sweep):
    #   d=64:  (128,64,4,4) 400/354 | (128,64,4,3) 396/350 | (64,64,4,3) 378/343 | (128,128,4,3) 346/312
    #          | (128,128,8,3) 348/312 | (128,128,8,2) 296/247
    #   d=128: (128,64,8,3) 442/396 | (128,128,8,2) 452/384 | (128,64,8,4) 442/384 | (128,32,4,3) 430/375
    #          | (64,64,4,3) 417/378 | (128,64,4,3) 208/252
    ("sm90", 64): FwdConfig(128, 64, 4, 4),
    ("sm90", 128): FwdConfig(128, 64, 8, 3),
    # d=256: (64,64,4,2) measured 257 causal at seqlen 4096 (b4 h8) against FA2's 284-320: its
    # 64x256 fp32 accumulator on 4 warps spills (ptxas: 188 B, 15 local ops per key block in the
    # hot loop; scripts/triton_compile_check.py). 8 warps halve the accumulator per thread.
    # Measured (H200, b4 h8 s4096 causal, benchmarks/triton_holes_run.py,
    # results/triton_holes_20261201-183728.json): (64,64,4,2) 261 | (128,64,8,2) 368 |
    # (128,32,8,3) 387 TFLOP/s; FA2 285, cuDNN 552 in the same run.
    ("sm90", 256): FwdConfig(128, 32, 8, 3),
    # sm80 (A100, 164 KiB smem): NOT measured; sized to fit 2-3 stages of K/V.
    ("sm80", 64): FwdConfig(128, 64, 4, 3),
    ("sm80", 128): FwdConfig(128, 64, 8, 2),
    ("sm80", 256): FwdConfig(64, 32, 4, 2),
    # sm86 / sm89 (~100 KiB smem): NOT measured; sized to fit the smaller shared memory.
    ("sm86", 64): FwdConfig(128, 64, 4, 2),
    ("sm86", 128): FwdConfig(64, 64, 4, 2),
    ("sm86", 256): FwdConfig(64, 32, 4, 1),
    # AMD / HIP (CDNA): UNTESTED, no measurement at all; 64-wide wavefronts prefer 4 warps.
    ("hip", 64): FwdConfig(128, 64, 4, 1),
    ("hip", 128): FwdConfig(128, 64, 4, 1),
    ("hip", 256): FwdConfig(64, 32, 4, 1),
}

# --- backward -----------------------------------------------------------------------------
_BWD: dict[tuple[str, int], BwdConfig] = {
    # sm90, H200, seqlen 4096, TFLOP/s non-causal / causal (two sweeps, benchmarks/NOTES.md):
    #   d=64:  (64,64,64,64,4,4,4,4) 333/301 | (64,64,64,64,4,3,4,3) 326-351/294-309
    #          | (64,128,128,64,8,3,8,3) 314-319/271-273 | (32,128,128,32,4,3,4,3) 292/258
    #          | atomic_dq (64,64,64,64,4,3) 319/253, (64,128,..,8,2) 288/264
    #   d=128: (64,128,128,64,8,3,8,3) 390/326 | (64,128,128,64,8,2,8,2) 348-353/309
    #          | (64,128,64,64,8,2,4,2) 347/316 | (64,64,64,64,4,2,4,2) 344/282
    #          | atomic_dq (64,128,..,8,2) 307/257, (64,64,..,4,2) 142/156
    # The fused atomic-dQ backward lost everywhere: the split (deterministic) one is the default.
    ("sm90", 64): BwdConfig(64, 64, 64, 64, 4, 4, 4, 4),
    ("sm90", 128): BwdConfig(64, 128, 128, 64, 8, 3, 8, 3),
    # d=256: (32,64,64,32,4,1,4,1) measured 92 causal at seqlen 4096 (b4 h8), FA2 217: dK + dV of
    # a 64-key block are 2 x 64x256 fp32 = 256 registers per thread on 4 warps, so they spill
    # (ptxas: 3.5 KB). 8 warps: 128 per thread, a hot loop without local memory at BLOCK_M1 32
    # (BLOCK_M1 64 spills in it again); dQ pass 128 query rows on 8 warps, no spills.
    # Measured (same run as the forward's d256 entry), causal: (32,64,64,32,4,1,4,1) 92 |
    # (32,64,128,32,8,3,8,2) 184 | (32,64,128,32,8,2,8,3) 199 | (64,64,128,32,8,2,8,2) 205;
    # FA2 230, cuDNN 334: 0.89x FA2 (on sm_90 the hopper backend's backward serves d256).
    ("sm90", 256): BwdConfig(64, 64, 128, 32, 8, 2, 8, 2),
    # sm80: NOT measured.
    ("sm80", 64): BwdConfig(32, 128, 128, 32, 4, 2, 4, 2),
    ("sm80", 128): BwdConfig(32, 128, 128, 32, 8, 2, 8, 2),
    ("sm80", 256): BwdConfig(16, 64, 64, 16, 4, 1, 4, 1),
    # sm86 / sm89: NOT measured.
    ("sm86", 64): BwdConfig(32, 64, 64, 32, 4, 2, 4, 2),
    ("sm86", 128): BwdConfig(32, 64, 64, 32, 4, 1, 4, 1),
    ("sm86", 256): BwdConfig(16, 32, 32, 16, 4, 1, 4, 1),
    # AMD / HIP: UNTESTED.
    ("hip", 64): BwdConfig(32, 64, 64, 32, 4, 1, 4, 1),
    ("hip", 128): BwdConfig(32, 64, 64, 32, 4, 1, 4, 1),
    ("hip", 256): BwdConfig(16, 32, 32, 16, 4, 1, 4, 1),
}

# --- short sequences -------------------------------------------------------------------
# Sequences of at most SHORT_SEQLEN tokens (queries and keys) give each program only a few
# key blocks, so pipeline fill and the epilogue weigh more: a separate, sparser table.
SHORT_SEQLEN = 512
# sm90, H200, seqlen 512 (b=32), TFLOP/s non-causal / causal (sweep 3, benchmarks/NOTES.md):
#   fwd d=64:  (64,64,4,3) 301/223 | (128,64,4,4) 303/186 | (64,64,4,2) 259/218 | (64,32,4,2) 259/192
#   fwd d=128: (64,64,4,3) 327/222 | (128,64,8,3) 308/194 | (64,64,4,2) 294/210 | (128,128,8,2) 282/189
#   bwd d=64:  (64,64,64,64,4,3,4,3) 254/158 | (32,64,64,32,4,3,4,3) 244/166 | (64,64,64,64,4,4,4,4) 237/150
#   bwd d=128: (64,64,64,64,4,2,4,2) 239/149 | (64,128,128,64,8,3,8,3) 266/118 | (32,64,64,32,4,2,4,2) 218/159
_FWD_SHORT: dict[tuple[str, int], FwdConfig] = {
    ("sm90", 64): FwdConfig(64, 64, 4, 3),
    ("sm90", 128): FwdConfig(64, 64, 4, 3),
}
_BWD_SHORT: dict[tuple[str, int], BwdConfig] = {
    ("sm90", 64): BwdConfig(64, 64, 64, 64, 4, 3, 4, 3),
    ("sm90", 128): BwdConfig(64, 64, 64, 64, 4, 2, 4, 2),
}

# fp32 inputs (IEEE products, no tensor cores): correctness over speed, tiles sized for the
# 4-byte elements on every architecture. NOT tuned.
_FWD_FP32 = {64: FwdConfig(64, 32, 4, 2), 128: FwdConfig(64, 32, 4, 1), 256: FwdConfig(32, 32, 4, 1)}
_BWD_FP32 = {
    64: BwdConfig(32, 64, 64, 32, 4, 1, 4, 1),
    128: BwdConfig(32, 64, 64, 32, 4, 1, 4, 1),
    256: BwdConfig(16, 32, 32, 16, 4, 1, 4, 1),
}


def bucket(block_d: int) -> int:
    return 64 if block_d <= 64 else 128 if block_d <= 128 else 256


# Windowed calls whose rows see at most WINDOW_SHORT_SPAN keys (``window_left + 1 +
# window_right``, both bounded): a program visits a few key blocks whatever the sequence length, as
# short sequences do. H200, d64, causal window (w, 0), b1 h16 s16k, device ms
# (benchmarks/window_fwd_routes.py --cand, results/window_fwd_routes_NVIDIA_H200_20261202-1129.json
# and -1141.json): w = 1024: (64,64,4,3) 0.213 | (64,64,4,2) 0.229 | the table's (128,64,4,4) 0.235 |
# (128,64,4,3) 0.235 | (64,128,4,3) 0.255 | (128,128,8,3) 0.287 | (128,64,8,3) 0.293 (FlexAttention
# 0.232); (64,64,4,3) against the table's at w = 512 / 2048 / 4096: 0.135 / 0.157, 0.361 / 0.387,
# 0.631 / 0.658. Longer windows: not measured.
WINDOW_SHORT_SPAN = 4097
_FWD_WINDOW_SHORT: dict[tuple[str, int], FwdConfig] = {
    ("sm90", 64): FwdConfig(64, 64, 4, 3),
}


def fwd_config(
    arch: str, block_d: int, dtype: torch.dtype, max_seqlen: int = 1 << 30, window_span: int | None = None
) -> FwdConfig:
    """``max_seqlen``: the longer of the (max) query and key lengths; <= SHORT_SEQLEN picks
    the short-sequence table where it has an entry. ``window_span``: the keys a row can see when
    the call's window is bounded on both sides (None otherwise); <= WINDOW_SHORT_SPAN picks the
    short-window table where it has an entry."""
    if arch == "interpret":
        return INTERPRET_FWD
    if dtype == torch.float32:
        return _FWD_FP32[bucket(block_d)]
    key = (arch, bucket(block_d))
    if max_seqlen <= SHORT_SEQLEN and key in _FWD_SHORT:
        return _FWD_SHORT[key]
    if window_span is not None and window_span <= WINDOW_SHORT_SPAN and key in _FWD_WINDOW_SHORT:
        return _FWD_WINDOW_SHORT[key]
    return _FWD[key]


# Causal (or right-windowed) calls of at most CAUSAL_SHORT_SEQLEN tokens, where they differ: H200,
# d128 causal 1k b16 h16, backward TFLOP/s (benchmarks/triton_bwd_sweep.py, one run with FA2 at
# 206: results/triton_bwd_sweep_H200_20261201_d128c1k.json): (32,64,64,32,4,2,4,2) 213 |
# (64,128,128,64,8,2,8,2) 208 | (64,64,64,64,4,2,4,2) 206 | the table's (64,128,128,64,8,3,8,3) 194 |
# (32,128,128,32,8,2,8,2) 176 | (64,64,128,64,4,3,8,3) 169 | (64,64,64,64,4,3,4,3) 155; at 512 the
# same tile also led causal in sweep 3 (159 vs 149).
CAUSAL_SHORT_SEQLEN = 1024
_BWD_CAUSAL_SHORT: dict[tuple[str, int], BwdConfig] = {
    ("sm90", 128): BwdConfig(32, 64, 64, 32, 4, 2, 4, 2),
}


# One-pass backward (``bwd.ONE_PASS``): dense calls whose keys fit in one key block run the whole
# backward as one launch of the dK/dV kernel (no preprocess, no dQ pass). One program per KV head
# and batch walks every query row of its GQA group, so it is for small calls only: at most
# ONE_PASS_MAX_ROWS query rows times the group per program. fp16 / bf16 on the GPU (the tiles of
# the table's short-sequence entries, with 128 keys a block); the interpreter's tile for the tests.
ONE_PASS_MAX_ROWS = 1024
_BWD_ONE_PASS: dict[tuple[str, int], BwdConfig] = {
    ("sm90", 64): BwdConfig(64, 128, 64, 64, 8, 2, 8, 2),
    ("sm90", 128): BwdConfig(64, 128, 64, 64, 8, 2, 8, 2),
}


def one_pass_config(arch: str, block_d: int, dtype: torch.dtype, seqlen_q: int, seqlen_k: int,
                    group: int) -> BwdConfig | None:  # fmt: skip
    """The one-pass backward's config for a dense call, or None where it does not apply (keys
    beyond one block, too many query rows for one program, no table entry)."""
    if arch == "interpret":
        cfg = INTERPRET_BWD
    elif dtype == torch.float32:
        return None
    else:
        cfg = _BWD_ONE_PASS.get((arch, bucket(block_d)))
    if cfg is None or seqlen_k > cfg.block_n1 or seqlen_q * group > ONE_PASS_MAX_ROWS:
        return None
    return cfg


def bwd_config(arch: str, block_d: int, dtype: torch.dtype, max_seqlen: int = 1 << 30,
               causal: bool = False) -> BwdConfig:  # fmt: skip
    """``causal``: the call masks keys right of the diagonal (causal or a right window)."""
    if arch == "interpret":
        return INTERPRET_BWD
    if dtype == torch.float32:
        return _BWD_FP32[bucket(block_d)]
    key = (arch, bucket(block_d))
    if causal and max_seqlen <= CAUSAL_SHORT_SEQLEN and key in _BWD_CAUSAL_SHORT:
        return _BWD_CAUSAL_SHORT[key]
    if max_seqlen <= SHORT_SEQLEN and key in _BWD_SHORT:
        return _BWD_SHORT[key]
    return _BWD[key]


def fallbacks(cfg: FwdConfig | BwdConfig) -> Iterator[FwdConfig | BwdConfig]:
    """cfg, then ever smaller variants (stages first, then tiles) for devices with less
    shared memory or registers than the table assumed."""
    yield cfg
    if isinstance(cfg, FwdConfig):
        while cfg.num_stages > 1:
            cfg = replace(cfg, num_stages=cfg.num_stages - 1)
            yield cfg
        while cfg.block_n > 16 or cfg.block_m > 16:
            if cfg.block_n >= cfg.block_m and cfg.block_n > 16:
                cfg = replace(cfg, block_n=cfg.block_n // 2)
            else:
                cfg = replace(cfg, block_m=cfg.block_m // 2)
            yield cfg
    else:
        while cfg.num_stages1 > 1 or cfg.num_stages2 > 1:
            cfg = replace(cfg, num_stages1=max(1, cfg.num_stages1 - 1), num_stages2=max(1, cfg.num_stages2 - 1))
            yield cfg
        while max(cfg.block_m1, cfg.block_n1, cfg.block_m2, cfg.block_n2) > 16:
            cfg = replace(cfg, block_m1=max(16, cfg.block_m1 // 2), block_n1=max(16, cfg.block_n1 // 2),
                          block_m2=max(16, cfg.block_m2 // 2), block_n2=max(16, cfg.block_n2 // 2))
            yield cfg
