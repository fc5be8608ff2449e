"""Tile configurations of the Gluon Hopper kernels, per head dim (16-bit dtypes only).

Pure Python (no torch, no triton): ``scripts/gluon_compile_check.py`` loads this file on a
machine without torch. No autotuning: each entry is a fixed choice and its comment says how it
was chosen. Shared memory per CTA (227 KiB usable on sm_90) is
``2 * BLOCK_D * (BLOCK_M + NUM_STAGES * 2 * BLOCK_N)`` bytes plus a few barriers
(:func:`smem_bytes`), with ``BLOCK_D`` the head dim rounded up to a power of two (Gluon tiles
have power-of-two shapes; TMA zero-fills the columns past ``D`` and clips them on stores, so
d = 96 and 192 compute on 128 and 256 columns: a third of their MMA work is padding).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

#: Head dims the kernels are compiled for (``D`` is the wgmma N of P V, a multiple of 8, and
#: the TMA box's contiguous dim, a multiple of 16 bytes).
HEADDIMS = (64, 96, 128, 192, 256)
#: Shared memory one CTA may use on sm_90 (bytes).
SM90_SMEM_LIMIT = 227 * 1024
#: Kernel variants: ``plain`` (design step A: one partition of 2 warpgroups, 8 warps, that
#: also issues the TMA loads), ``ws`` (step B: warp-specialised, a 1-warp TMA producer and 2
#: consumer warpgroups of 4 warps in ping-pong) and ``persistent`` (step C: ``ws`` partitions
#: looping over a host-computed LPT tile schedule, one program per SM; dense calls only, varlen
#: calls run ``ws``).
KERNELS = ("plain", "ws", "persistent")


@dataclass(frozen=True)
class HopperConfig:
    """``block_m`` query rows per program (``consumers`` warpgroups x 64 rows), ``block_n`` keys
    per K/V ring slot, ``num_stages`` ring slots, ``kernel`` one of :data:`KERNELS`; ``ws`` and
    ``persistent`` only: ``consumers`` consumer warpgroups in ping-pong (2, or 3 as FA3 runs head
    dim 64: more warps share the softmax while one issues its matrix products), and
    ``consumer_regs`` / ``producer_regs`` per thread of the consumer / producer partitions
    (``setmaxnreg``; consumers x 128 x consumer_regs + 128 x producer_regs <= 65536);
    ``flex_prefetch`` (the ws kernel's flex mode only, :func:`flex_config`): the kernel's
    ``FLEX_PREFETCH``, each step's block-mask list entry loaded one step ahead (off: the kernel as
    without the switch)."""

    block_m: int
    block_n: int
    num_stages: int
    kernel: str = "ws"
    consumer_regs: int = 240
    producer_regs: int = 24
    consumers: int = 2
    #: NOT measured yet (benchmarks/NOTES.md, "Flex forward: list entries one step ahead"); off
    #: unless ``FLASHTILE_FLEX_PREFETCH=1`` (hopper/flex.py) or an override
    flex_prefetch: int = 0
    #: the ws / persistent kernels' ``WAIT_FENCE`` (``fwd._wait_fence``): a basic-block boundary
    #: before the wait for the previous P V, so that ptxas keeps the softmax's exponentials ahead of
    #: it (they overlap P V); 0: the kernels as before the switch
    wait_fence: int = 0

    @property
    def num_warps(self) -> int:
        """The launch's ``num_warps``: the plain kernel's 8, or the ws kernel's default partition (4)."""
        return 8 if self.kernel == "plain" else 4

    @property
    def q_rows(self) -> int:
        """Rows of one Q / O TMA block: the whole tile (plain) or one consumer's share (ws)."""
        return self.block_m if self.kernel == "plain" else self.block_m // self.consumers


# NOT measured yet: sized from shared memory and the register budget (ptxas reports in
# scripts/gluon_compile_check.py: no spills anywhere), waiting for the first H200 sweep
# (benchmarks/hopper_run.py --variant ...). The warp-specialised kernel is the default; the
# plain one (step A) stays selectable with kernel="plain".
_TABLE: dict[int, HopperConfig] = {
    64: HopperConfig(128, 128, 3),   # 16 KiB Q + 3 x 32 KiB K/V = 112 KiB
    96: HopperConfig(128, 128, 2),   # padded to 128: 32 KiB Q + 2 x 64 KiB = 160 KiB
    128: HopperConfig(128, 128, 2),  # 32 KiB Q + 2 x 64 KiB = 160 KiB
    192: HopperConfig(128, 64, 2),   # padded to 256: 64 KiB Q + 2 x 64 KiB = 192 KiB
    256: HopperConfig(128, 64, 2),   # 64 KiB Q + 2 x 64 KiB = 192 KiB
}


#: Head dim 64 runs 3 consumer warpgroups (192-row tiles, FA3's choice there) except on causal
#: calls shorter than this many query rows, where 192-row tiles put more of the work on the
#: diagonal (H200, `results/hopper_H200_20261201_stepD_consumers3.json`: non-causal 1k-16k
#: +8-20%, causal 16k +10%, causal 4k +0%, causal 1k -33%).
D64_CAUSAL_THREE_CONSUMERS_FROM = 8192


def _three_consumers(headdim: int, causal: bool, seqlen_q: int) -> bool:
    """Head dim 64's rule, 16-bit and FP8 alike: 3 consumers except on causal calls shorter than
    :data:`D64_CAUSAL_THREE_CONSUMERS_FROM` query rows."""
    return headdim == 64 and (not causal or seqlen_q >= D64_CAUSAL_THREE_CONSUMERS_FROM)
_D64_THREE = HopperConfig(192, 128, 2, consumers=3, consumer_regs=160)  # 24 KiB Q + 2 x 32 KiB = 88 KiB


def config_for(headdim: int, *, causal: bool, seqlen_q: int) -> HopperConfig:
    """The config a call runs: the table's, with head dim 64's consumer count chosen by
    causality and (max) query length (:data:`D64_CAUSAL_THREE_CONSUMERS_FROM`)."""
    if _three_consumers(headdim, causal, seqlen_q):
        return _D64_THREE
    return config(headdim)


# FP8 (e4m3) forward (kernel ``attn_fwd_ws_fp8``, the ``ws`` design): elements are 1 byte, so a
# key block of twice the keys costs the shared memory of a 16-bit one; the P V wgmma has K =
# block_n (a multiple of 32 for e4m3). Shared memory adds the bf16 output staging tile
# (2 x 64 x BLOCK_D x 2 bytes). NOT measured yet: sized from shared memory and registers
# (scripts/gluon_compile_check.py --fp8 reports no spills), waiting for benchmarks/fp8_run.py.
@dataclass(frozen=True)
class FP8Config(HopperConfig):
    """A :class:`HopperConfig` of the FP8 kernel plus its code-path switches (0/1 ints, so that a
    benchmark ``--variant cvt_asm=0`` compares them in one run; :func:`fp8_flags` turns them into
    the kernel's constexprs): ``cvt_asm``: P rounded to e4m3 four values at a time by inline PTX and
    carried across the key-block loop as packed 32-bit words (dense calls; ``fwd_fp8._p_pack``);
    ``row_tree``: the softmax's row reductions as trees over the registers (``fwd._row_reduce``): 0
    off (Triton's sequential chain), 1 the row max, 2 the row max and the row sum, 3 the row max and
    the row sum kept per lane across key blocks (``fwd._row_parts``: the quad's shuffles once, at the end);
    ``skip_rescale``: a warp skips the output rescale of a key block in which none of its rows'
    max rose (a warp vote and a branch in inline PTX; exact: alpha is 1 there); ``exp_poly``: 1 / 2
    quarters of the softmax's exponentials by a cubic on the FMA pipe instead of the MUFU
    (``fwd._exp2_split``; relative error < 2e-4, far below e4m3's rounding of P), 0 none;
    ``persistent``: dense calls run ``attn_fwd_persistent_fp8`` (one program per SM over the host's
    tile list, :func:`fp8_q_buffers` Q buffers per consumer so that the next tile's Q lands during this
    one) instead of one program per tile (varlen calls: the ws kernel either way).
    (``wait_fence``, :class:`HopperConfig`'s, is the FP8 kernel's ``WAIT_FENCE`` too.)"""

    cvt_asm: int = 1
    row_tree: int = 1
    skip_rescale: int = 1
    exp_poly: int = 0
    persistent: int = 0


def fp8_flags(cfg: HopperConfig) -> dict[str, bool]:
    """The FP8 kernel's constexpr switches of ``cfg`` (:class:`FP8Config`'s fields; defaults for a
    plain :class:`HopperConfig`)."""
    return dict(CVT_ASM=bool(getattr(cfg, "cvt_asm", FP8Config.cvt_asm)),
                ROW_TREE=int(getattr(cfg, "row_tree", FP8Config.row_tree)),
                SKIP_RESCALE=bool(getattr(cfg, "skip_rescale", FP8Config.skip_rescale)),
                EXP_POLY=int(getattr(cfg, "exp_poly", FP8Config.exp_poly)),
                WAIT_FENCE=bool(cfg.wait_fence), NUM_CONSUMERS=cfg.consumers)


_FP8_TABLE: dict[int, FP8Config] = {
    # d64: 3 consumers (FA3's FP8 d64 runs 3 warpgroups too; H200, results/fp8_H200_20261202_stop30_consumers3.json:
    # 16k 527 -> 678 TFLOP/s); short causal calls keep 2 (fp8_config_for, the 16-bit rule)
    64: FP8Config(192, 128, 3, consumers=3, consumer_regs=160),  # 12 KiB Q + 3 x 16 KiB K/V^T + 24 KiB O = 84 KiB
    # d96 runs d128's tile shape: the fence too (H200, results/fp8_H200_20261203_stop32_d96_d192_fence.json, one
    # run, TFLOP/s without / with: 1k 446 / 461, 4k 600 / 629, 16k 647 / 686; causal 292 / 291, 532 / 533, 676 /
    # 644); d192's cells moved -1..+2% but 1k -23% (not kept there)
    96: FP8Config(128, 128, 2, wait_fence=1),  # padded to 128: 16 KiB Q + 2 x 32 KiB + 32 KiB O = 112 KiB
    # d128: wait_fence (H200, results/fp8_H200_20261202_stop30_wait_fence.json: 4k 791 -> 817, 16k 851 -> 894,
    # 16k causal 864 -> 860 TFLOP/s; d256 1225 -> 1197, so not there)
    128: FP8Config(128, 128, 2, wait_fence=1),  # 16 KiB Q + 2 x 32 KiB + 32 KiB O = 112 KiB
    192: FP8Config(128, 64, 2),  # padded to 256: 32 KiB Q + 2 x 32 KiB + 64 KiB O = 160 KiB
    # d256: 128-key blocks (FA3's FP8 tile) measured 1200 TFLOP/s at 16k against 1137 with 64 (H200,
    # results/fp8_H200_20261201_softmax.json): 32 KiB Q + 2 x 64 KiB + 64 KiB O = 224 KiB
    256: FP8Config(128, 128, 2),
}


def fp8_config(headdim: int, **overrides) -> FP8Config:
    """The FP8 table's config for ``headdim`` (kernel ``ws`` always), with ``overrides``."""
    if headdim not in _FP8_TABLE:
        raise ValueError(f"hopper FP8 kernels serve head dims {HEADDIMS}, got {headdim}")
    cfg = _FP8_TABLE[headdim]
    return replace(cfg, **_consumer_defaults(cfg, overrides)) if overrides else cfg


#: FP8 head dim 64 with 2 consumers: causal calls shorter than D64_CAUSAL_THREE_CONSUMERS_FROM rows
_FP8_D64_TWO = FP8Config(128, 128, 3)  # 8 KiB Q + 3 x 16 KiB K/V^T + 16 KiB O = 72 KiB


#: head dims whose calls without a right window keep the softmax's row sums per lane (``row_tree=3``):
#: H200, one run each, TFLOP/s row_tree 1 / 3 (stop 37, ``results/fp8_H200_20261203_stop37_row_tree3.json``):
#: d128 16k 881 / 903, 4k 831 / 829, d256 16k 1225 / 1234, d64 16k 672 / 676; causal d128 16k 901 / 874
#: (so causal calls keep 1); stop 38 (``results/fp8_H200_20261203_stop38_row_tree_rule.json``) in NOTES
FP8_ROW_PARTS_HEADDIMS = (64, 128, 256)
#: head dims whose calls without a right window run the persistent FP8 kernel (``persistent=1``): H200, one
#: run (stop 39, ``results/fp8_H200_20261203_stop39_persistent.json``), TFLOP/s ws / persistent, both with
#: row_tree=3: d128 4k 828 / 861, 16k 900 / 913, d64 16k 674 / 681; not d256 (one Q buffer fits: 1275 / 1197)
#: nor causal calls (d128 16k 870 / 799 with row_tree=1)
FP8_PERSISTENT_HEADDIMS = (64, 128)


def fp8_config_for(headdim: int, *, causal: bool, seqlen_q: int) -> FP8Config:
    """The FP8 config a call runs: the table's, except head dim 64's causal calls shorter than
    :data:`D64_CAUSAL_THREE_CONSUMERS_FROM` query rows, which keep 2 consumers as :func:`config_for`
    does for 16-bit calls (192-row tiles put more of a short causal call's work on the diagonal);
    and calls with no right window (not causal) at :data:`FP8_ROW_PARTS_HEADDIMS` keep the row sums
    per lane (``row_tree=3``, measured faster there and slower on causal calls), and at
    :data:`FP8_PERSISTENT_HEADDIMS` run the persistent kernel (dense calls; varlen ones run ws)."""
    if headdim == 64 and not _three_consumers(headdim, causal, seqlen_q):
        cfg = _FP8_D64_TWO
    else:
        cfg = fp8_config(headdim)
    if not causal and headdim in FP8_ROW_PARTS_HEADDIMS:
        cfg = replace(cfg, row_tree=3)
    if not causal and headdim in FP8_PERSISTENT_HEADDIMS:
        cfg = replace(cfg, persistent=1)
    return cfg


def fp8_smem_bytes(cfg: HopperConfig, headdim: int, q_buffers: int = 1) -> int:
    """Shared memory of the FP8 kernel's tiles: e4m3 Q (``q_buffers`` per consumer), K and V^T ring, bf16
    output staging (one tile per consumer)."""
    q_extra = (q_buffers - 1) * cfg.block_m * block_d(headdim)
    return smem_bytes(cfg, headdim, elem_bytes=1) + cfg.block_m * block_d(headdim) * 2 + q_extra


#: shared memory kept free for the kernels' mbarriers (a few dozen bytes; ptxas reports ~100 B more)
_BARRIER_BYTES = 1024


def fp8_q_buffers(cfg: HopperConfig, headdim: int) -> int:
    """Q buffers per consumer of the persistent FP8 kernel: 2 where they fit in shared memory (the next
    tile's Q loads during this one), else 1 (head dim 256: 224 KiB with one)."""
    return 2 if fp8_smem_bytes(cfg, headdim, 2) + _BARRIER_BYTES <= SM90_SMEM_LIMIT else 1


def check_fp8(cfg: HopperConfig, headdim: int) -> str | None:
    """Why ``cfg`` cannot work for the FP8 kernel at ``headdim`` (None if it can)."""
    if cfg.kernel != "ws" or cfg.consumers not in (2, 3):
        return (f"the FP8 forward is a ws kernel with 2 or 3 consumers, got kernel={cfg.kernel!r}, "
                f"consumers={cfg.consumers}")
    if cfg.block_n % 32 or not 32 <= cfg.block_n <= 256:
        return f"block_n must be a multiple of 32 in [32, 256] (e4m3 wgmma K = 32), got {cfg.block_n}"
    if getattr(cfg, "row_tree", 1) not in (0, 1, 2, 3):
        return f"row_tree must be 0, 1, 2 or 3 (see FP8Config), got {cfg.row_tree}"
    if getattr(cfg, "exp_poly", 0) not in (0, 1, 2):
        return f"exp_poly must be 0, 1 or 2 (quarters of the exponentials on the FMA pipe), got {cfg.exp_poly}"
    if getattr(cfg, "persistent", 0) not in (0, 1):
        return f"persistent must be 0 or 1, got {cfg.persistent}"
    bad = check(replace(cfg, block_n=16), headdim)  # the shared checks (registers, stages, block_m)
    if bad:
        return bad
    need = fp8_smem_bytes(cfg, headdim)
    if need > SM90_SMEM_LIMIT:
        return f"needs {need // 1024} KiB of shared memory, sm_90 has {SM90_SMEM_LIMIT // 1024} KiB per CTA"
    return None


def config(headdim: int, **overrides) -> HopperConfig:
    """The table's config for ``headdim`` (one of :data:`HEADDIMS`), with fields replaced by
    ``overrides`` (benchmark sweeps: ``block_n=64, num_stages=3``)."""
    if headdim not in _TABLE:
        raise ValueError(f"hopper kernels serve head dims {HEADDIMS}, got {headdim}")
    cfg = _TABLE[headdim]
    return replace(cfg, **_consumer_defaults(cfg, overrides)) if overrides else cfg


def _consumer_defaults(cfg: HopperConfig, overrides: dict) -> dict:
    """``overrides`` of ``cfg`` where a new consumer count brings its tile height (64 rows each) and
    register split (``setmaxnreg``'s budget shared by the consumers) unless they are given too."""
    if "consumers" in overrides and overrides["consumers"] != cfg.consumers:
        n = overrides["consumers"]
        budget = 65536 // 128 - overrides.get("producer_regs", cfg.producer_regs)
        overrides = {"block_m": 64 * n, "consumer_regs": min(240, budget // n // 8 * 8), **overrides}
    return overrides


#: Block-mask block the flex mode of the ws kernel serves (``fwd.attn_fwd_ws`` with ``FLEX``): one
#: query tile is one block-mask query block, so ``block_m`` equals it and ``block_n`` divides it.
FLEX_MASK_BLOCK = 128


def flex_config(headdim: int, **overrides) -> HopperConfig:
    """The ws kernel's config for FlexAttention calls (``hopper/flex.py``): the table's tiles with
    two consumer warpgroups of 64 rows (a 128-row tile = one block-mask block, :data:`FLEX_MASK_BLOCK`).
    NOT measured with mods: the built-in options' tiles (``benchmarks/gflex_run.py`` times them)."""
    cfg = replace(config(headdim), kernel="ws", block_m=FLEX_MASK_BLOCK, consumers=2)  # (the table's: 2 already)
    return replace(cfg, **overrides) if overrides else cfg


def block_d(headdim: int) -> int:
    """The tile width of the head dim: ``headdim`` rounded up to a power of two (>= 16)."""
    return max(16, 1 << (headdim - 1).bit_length())


def smem_bytes(cfg: HopperConfig, headdim: int, elem_bytes: int = 2) -> int:
    """Shared memory the tiles of ``cfg`` take (Q, and the K/V ring), without barriers."""
    return elem_bytes * block_d(headdim) * (cfg.block_m + 2 * cfg.num_stages * cfg.block_n)


def check(cfg: HopperConfig, headdim: int) -> str | None:
    """Why ``cfg`` cannot work for ``headdim`` (None if it can)."""
    if cfg.kernel not in KERNELS:
        return f"kernel {cfg.kernel!r} is not one of {KERNELS}"
    if cfg.kernel == "plain" and (cfg.block_m != 128 or cfg.consumers != 2):
        return "the plain kernel runs 2 warpgroups of 64 rows: block_m = 128, consumers = 2"
    if cfg.consumers not in (2, 3):
        return f"consumers must be 2 or 3, got {cfg.consumers}"
    if cfg.wait_fence and (cfg.consumers != 2 or cfg.kernel == "plain"):
        # 3 consumers at 160 registers spill once P_prev's registers stay live through the softmax
        # (scripts/gluon_compile_check.py, head dim 64: 8-56 local memory ops); the plain kernel has no turn
        return f"wait_fence needs a ws / persistent kernel with 2 consumers, got {cfg.kernel!r} x {cfg.consumers}"
    if cfg.flex_prefetch not in (0, 1) or (cfg.flex_prefetch and (cfg.kernel != "ws" or cfg.consumers != 2)):
        return f"flex_prefetch (0 or 1, got {cfg.flex_prefetch}) is a switch of the ws kernel's flex mode (2 consumers)"
    if cfg.block_m != 64 * cfg.consumers:
        return f"each consumer warpgroup owns 64 rows: block_m = 64 x consumers = {64 * cfg.consumers}"
    ws = cfg.kernel != "plain"
    if ws and (cfg.consumers * cfg.consumer_regs + cfg.producer_regs) * 128 > 65536:
        return (f"registers: {cfg.consumers} x 128 x {cfg.consumer_regs} + 128 x {cfg.producer_regs} "
                f"> 65536")  # fmt: skip
    if ws and (cfg.consumer_regs % 8 or cfg.producer_regs % 8 or cfg.producer_regs < 24):
        return "setmaxnreg counts are multiples of 8, at least 24"
    if cfg.block_n % 16 or not 16 <= cfg.block_n <= 256:
        return f"block_n must be a multiple of 16 in [16, 256], got {cfg.block_n}"
    if cfg.num_stages < 1:
        return f"num_stages must be >= 1, got {cfg.num_stages}"
    need = smem_bytes(cfg, headdim)
    if need > SM90_SMEM_LIMIT:
        return f"needs {need // 1024} KiB of shared memory, sm_90 has {SM90_SMEM_LIMIT // 1024} KiB per CTA"
    return None


# ---------------------------------------------------------------------------------------
# backward (:mod:`.bwd`)
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HopperBwdConfig:
    """Backward tiles: ``block_n`` keys per program (dK / dV in registers), ``block_m`` query
    rows per ring slot (Q and dO tiles), ``num_stages`` ring slots; 8 warps in one partition.
    ``dq_chunk``: columns of dQ = dS K computed and added at once (0: all; fewer live registers
    at head dim 256). ``atomic_dq``: dQ added by the kernel with fp32 atomics (1, the default
    unless ``deterministic=True``), or 0: computed by a second pass (the Triton dQ kernel, as in
    deterministic mode; an A/B switch for the cost of the atomics). ``red_vec``: 1, scalar fp32
    atomics straight from the wgmma accumulator; 4, the dQ chunk through shared memory into 4
    consecutive columns a thread and ``red.global.add.v4.f32`` (a quarter of the requests; needs
    ``block_m * chunk * 4`` bytes more shared memory)."""

    block_m: int
    block_n: int
    num_stages: int
    dq_chunk: int = 0
    atomic_dq: int = 1
    red_vec: int = 1
    num_warps: int = 8
    #: "plain": :func:`.bwd.attn_bwd`, one 8-warp partition doing everything; "ws":
    #: :func:`.bwd.attn_bwd_ws`, the 8 compute warps plus a worker warpgroup (TMA loads, and the
    #: dQ reductions from a shared-memory tile, off the compute warps' path); "ws2":
    #: :func:`.bwd.attn_bwd_ws` with ``SPLIT``, the two compute warpgroups in partitions of their own (half of
    #: the keys and a dQ partial each; they never wait for each other) plus the worker
    kernel: str = "plain"
    #: ws / ws2: registers of the worker warpgroup (ws: the compute warps get the rest, 256 - worker / 2)
    worker_regs: int = 32
    #: ws2: registers of each compute warpgroup
    compute_regs: int = 240
    #: ws: issue dQ before dK and let dK's wgmma run under the dQ hand-off (1) or wait for all (0); with
    #: swap dK's register operand stays live until then (on at d96 / d128)
    defer_dk: int = 0
    #: ws: rows of the dQ tile the worker adds per step (its registers: ``red_rows * BLOCK_D / 128`` floats)
    red_rows: int = 8
    #: ws / ws2: FA3's ``SdP_swapAB``: S^T and dP^T with keys along M, P^T / dS^T as register operands
    #: of the dV / dK products (no P tile in shared memory; lse / delta along the columns)
    swap: int = 0
    #: ws / ws2: the worker adds each dQ tile by one TMA reduce-add (``cp.reduce.async.bulk.tensor``)
    #: instead of ``red.global.add.v4.f32`` from registers
    dq_tma: int = 0
    #: grid (heads, batch, key blocks) instead of (key blocks, heads, batch) for causal calls
    #: (longest-first: a key block's work falls with its index there); 0: never, 1: causal calls
    lpt: int = 0
    #: ws with swap: the worker loads each ring slot's lse and delta rows into shared memory beside
    #: its Q / dO tiles (they complete the slot's barrier), instead of the compute warps loading the
    #: next block's from global memory and staging them (a global load on their path each iteration)
    stat_ring: int = 0
    #: ws with stat_ring: the score accumulators start from the stats instead of zero (``S^T`` from
    #: ``-lse / scale``, ``dP^T`` from ``-delta``), so ``P = exp2(scale * acc)`` and ``dS = P * acc``;
    #: the stats are read before the wgmmas are issued, not after their wait. Calls with softcap (or a
    #: zero scale) keep the plain form
    fold: int = 0
    #: ws with atomic dQ: the dQ hand-off between the compute warps and the worker on two named
    #: barriers (``bar.arrive`` / ``bar.sync``, FA3's dQFull / dQEmpty) instead of mbarriers, whose
    #: arrival costs the 8 compute warps a barrier of their partition per iteration. Ignored where dQ
    #: is not added by the kernel (deterministic mode, ``atomic_dq=0``); ``bwd_check`` rejects it on
    #: plain / ws2. 0: mbarriers (the default); 1: the dQ hand-off on named barriers; 2: that, and the
    #: Q / dO ring's "slot empty" releases too (one named barrier per ring slot, ``num_stages <= 11``).
    #: Both correct on the H200 and not faster (stop 27, d128 4k: nbar=1 -1% non-causal, -6% causal;
    #: nbar=2 +0.7% / -2.4%; benchmarks/NOTES.md, "Named-barrier dQ hand-off"): off, kept as a
    #: switch for a kernel whose compute warpgroups no longer meet at the loop head
    nbar: int = 0
    #: ws with swap and stat_ring: :func:`.bwd.attn_bwd_ws_persistent`, one program per SM looping over the
    #: key-block tiles, the next one taken from a counter as a program finishes one (the ring, the dQ
    #: hand-off and the next tile's K / V loads go on across tiles; dense calls: varlen calls keep one
    #: program per tile). On at d96 / d128 (measurements beside :data:`_BWD_TABLE`'s d128 entry); d64
    #: spills 48-64 bytes with it and lost 3-7%
    persistent: int = 0
    #: persistent, causal / right-window calls: the tile order (:func:`.bwd._bwd_tile`) takes the
    #: (batch, KV head) pairs in groups of ``head_group`` (0: all in one group), key block 0 of each
    #: pair in the group first: the long tiles go early and the short ones balance the programs at the
    #: end. Other calls (tiles of one length) keep key block fastest (``head_group = 1``: the heads
    #: running at once share their Q / dO and dQ rows in L2)
    head_group: int = 0
    #: ws, plain (ws2: ignored): dK / dV stored through shared memory (16-byte row vectors to global
    #: memory) instead of straight from the wgmma layout (2-byte stores there: the strides are not
    #: specialised); ws: a ``block_n x BLOCK_D`` staging tile of its own, plain: K's and V's tiles, free
    #: after the loop. On at every head dim (measurements beside :data:`_BWD_TABLE`)
    epi: int = 0
    #: persistent, calls whose tiles all cost the same (no causal mask or window; atomic dQ): the last
    #: ``n_tiles % programs`` tiles handed out as one equal piece of their query blocks per program, dK / dV
    #: of the pieces added in fp32 and converted after the kernel (``sched.tail_split`` decides where it
    #: pays), instead of a last round of whole tiles that leaves the other programs idle; ignored by the
    #: other kernels (on at d96 / d128)
    tail: int = 0

    def chunk(self, headdim: int) -> int:
        """Columns of dQ computed and added at once (``dq_chunk``; 0: the whole tile)."""
        return self.dq_chunk or block_d(headdim)

    def kernel_consts(self, headdim: int, softcap: bool = False) -> dict:
        """The constexpr arguments this config gives its kernel (beyond the tile sizes), and
        ``num_warps`` of the launch, for a call with or without ``softcap``: one place for the
        launcher and the compile check. Fold stays off for softcap calls (tanh of the raw score)."""
        if self.kernel in ("ws", "ws2"):
            split = self.kernel == "ws2"
            ring = bool(self.stat_ring)
            return dict(WORKER_REGS=self.worker_regs, RED_ROWS=self.red_rows, SPLIT=split,
                        DEFER_DK=bool(self.defer_dk) and not split, COMPUTE_REGS=self.compute_regs,
                        SWAP=bool(self.swap), DQ_TMA=bool(self.dq_tma), STAT_RING=ring,
                        FOLD=ring and bool(self.fold) and not softcap, NBAR=0 if split else int(self.nbar),
                        EPI=bool(self.epi) and not split, num_warps=4 if split else self.num_warps)  # fmt: skip
        return dict(DQ_CHUNK=self.chunk(headdim), RED_VEC=self.red_vec, EPI=bool(self.epi), num_warps=self.num_warps)


# Registers bind, not shared memory: 8 compute warps at up to 240-255 registers fill the register
# file, so one CTA per SM whatever the tiles; dK + dV take 2 * block_n * BLOCK_D / 256 fp32
# registers per thread. The plain kernel at block_n = 128, head dim 128 (FA3's tile) spilled
# 36-276 bytes (its dQ atomics' addresses live beside dK/dV); the ws kernel hands dQ to the worker
# through shared memory and fits it in 240 registers (ptxas: a few scalar spills, 16-60 bytes).
# Head dims 192/256 stay on the plain kernel (dK + dV at 128 keys would take 256 registers; at 64
# keys the ws kernel's extra dQ tile does not fit in shared memory with 2 ring stages).
_BWD_TABLE: dict[int, HopperBwdConfig] = {
    # d64: 128-row query blocks (367 / 403 TFLOP/s non-causal at 4k / 16k against 301 / 326 with 64
    # rows, results/hopper_bwd_H200_20261201_ws2.json); K/V 32 KiB + 2 x (Q, dO) 32 KiB + dS^T 32 KiB
    # + dQ tile 32 KiB. swap + dq_tma (results/hopper_bwd_H200_20261201_swap.json, same run):
    # 388 / 431 non-causal, 351 / 445 causal at 4k / 16k against 370 / 404 and 288 / 371 without
    # (ws2 for causal: 291 / 367)
    # stat_ring + fold (results/hopper_bwd_H200_20261202_fold.json, same run, against without): d64
    # 434 / 464 at 4k / 16k against 399 / 429 non-causal (+8-9%), 1k +8%; causal -1% (below)
    # epi (stop 35, 3 interleaved rounds, medians, against without; results/hopper_bwd_H200_20261203_stop35_epi.json):
    # 1k / 4k / 16k 377 / 464 / 482 against 328 / 441 / 485, causal 272 / 414 / 469 against 223 / 379 / 457
    64: HopperBwdConfig(128, 128, 2, kernel="ws", worker_regs=24, swap=1, dq_tma=1, stat_ring=1, fold=1, epi=1),
    96: HopperBwdConfig(64, 128, 2, kernel="ws", worker_regs=24, swap=1, dq_tma=1, stat_ring=1, fold=1,
                        persistent=1, head_group=4, epi=1, defer_dk=1, tail=1),  # as 128
    # ws (FA3's tile): K/V 64 KiB + 2 x (Q, dO) 32 KiB + dS^T 16 KiB + dQ tile 32 KiB; swap + dq_tma:
    # 459 / 396 at 4k, 487 / 514 at 16k (non-causal / causal) against 411 / 338 and 455 / 436 without
    # (swap alone 452 / 388, 501 / 502; dq_tma alone 413 / 352, 457 / 456); ws2 + swap + dq_tma 376 /
    # 327, 395 / 407 (same run). stat_ring + fold: 483 / 518 at 4k / 16k against 473 / 506 (+2%), 1k
    # +3% (results/hopper_bwd_H200_20261202_fold.json; the worker's 24 registers matter: 32 lost
    # 1-11%, and 3 ring stages 1-4%)
    # persistent, head_group=4 (stop 34, 3 interleaved rounds, medians, against one program per tile;
    # results/hopper_bwd_H200_20261203_stop34_persistent.json): 1k / 4k / 16k 363 / 503 / 540 against
    # 352 / 485 / 538 non-causal, causal 264 / 456 / 533 against 259 / 436 / 534, GQA 32/8 8k causal
    # 509 / 488, softcap 30 420 / 395. head_group 1 (key block fastest) lost 4k causal (421); 0 (all
    # heads) lost 1k causal (196: every head's Q / dO and dQ rows at once, out of L2)
    # epi (stop 35, as d64's): 1k / 4k / 16k 435 / 525 / 547 against 360 / 485 / 536, causal 321 / 493 / 546
    # against 264 / 448 / 534, GQA 32/8 8k causal 518 / 511, softcap 30 413 / 416; the tile's fixed cost
    # (benchmarks/bwd_tile_trace.py) 12.2 -> 3.9 us. defer_dk (stop 35, 3 rounds, against without;
    # results/hopper_bwd_H200_20261203_stop35_defer_dk.json): 1k / 4k / 16k 445 / 518 / 551 against 437 / 521 /
    # 546, causal 326 / 514 / 552 against 323 / 488 / 548, GQA 32/8 8k causal 528 / 518 (d64 lost 2-3%: off there)
    # tail (stop 36, 5 interleaved rounds, medians, against without; results/hopper_bwd_H200_20261203_stop36_tail.json):
    # non-causal 4k / 16k 534 / 558 against 510 / 549 (2048 tiles: 68 in the last round); 1k splits nothing (446 / 440)
    128: HopperBwdConfig(64, 128, 2, kernel="ws", worker_regs=24, swap=1, dq_tma=1, stat_ring=1, fold=1,
                         persistent=1, head_group=4, epi=1, defer_dk=1, tail=1),
    192: HopperBwdConfig(64, 64, 2, dq_chunk=64, epi=1),  # padded to 256: as 256
    # d256: red_vec=4 measured 257 TFLOP/s causal 4k b4 h8 against red_vec=1's 136 (H200, same run,
    # results/hopper_bwd_H200_20261201_redvec.json); the default backward at d256 (GLUON_BWD_MIN_KEYS).
    # epi (through K's and V's tiles; stop 35, 3 rounds, results/hopper_bwd_H200_20261203_stop35_epi_d256.json):
    # 4k b4 h8 294 / 282 (causal) against 284 / 265
    256: HopperBwdConfig(64, 64, 2, dq_chunk=64, red_vec=4, epi=1),  # K/V 64 KiB + 2 x 64 KiB + P, dS 16 KiB = 208 KiB
}
#: Entries for causal / windowed calls where they differ from :data:`_BWD_TABLE`: d64 without stat_ring /
#: fold. Stop 25 measured them 0-2% slower on every causal cell (d64 1k / 4k / 16k 219 / 366 / 438 against
#: 223 / 368 / 442, d128 253 / 428 / 502 against 255 / 432 / 508, same run); since the fold accumulators
#: start from a broadcast (stop 33) d128 causal gains with them: 5 interleaved rounds, medians, with /
#: without (results/hopper_bwd_H200_20261203_stop33_causal_fold_rounds5.json): d128 1k / 4k / 16k 258 /
#: 438 / 530 against 255 / 414 / 508, GQA 32/8 8k 491 / 473, softcap 30 (stat_ring alone) 393 / 383; d64
#: 222 / 373 / 456 against 223 / 376 / 453 (no gain: d64 stays plain; d96 follows d128's tile).
#: (ws2, the d64 entry here before the swap variant, measured 291 / 367 causal at 4k / 16k against
#: swap's 351 / 445.)
_BWD_MASKED: dict[int, HopperBwdConfig] = {64: replace(_BWD_TABLE[64], stat_ring=0, fold=0)}


def bwd_config(headdim: int, masked: bool = False, **overrides) -> HopperBwdConfig:
    """The backward table's config for ``headdim`` (one of :data:`HEADDIMS`; ``masked``: a causal or
    windowed call), with fields replaced by ``overrides``."""
    if headdim not in _BWD_TABLE:
        raise ValueError(f"hopper kernels serve head dims {HEADDIMS}, got {headdim}")
    cfg = _BWD_MASKED.get(headdim, _BWD_TABLE[headdim]) if masked else _BWD_TABLE[headdim]
    return replace(cfg, **overrides) if overrides else cfg


def bwd_smem_bytes(cfg: HopperBwdConfig, headdim: int, elem_bytes: int = 2) -> int:
    """Shared memory of the backward's tiles: K and V, the (Q, dO) ring, P and dS (and the dQ
    chunk's layout conversion with ``red_vec = 4``; the dK / dV staging tile with ``epi``)."""
    d = block_d(headdim)
    if cfg.kernel in ("ws", "ws2"):
        # the dQ tile(s) handed to the worker (ws2: one partial per compute warpgroup)
        red = (2 if cfg.kernel == "ws2" else 1) * 4 * cfg.block_m * d if cfg.atomic_dq else 0
    else:
        red = 4 * cfg.block_m * cfg.chunk(headdim) if cfg.red_vec == 4 else 0  # layout conversion scratch
    ps = 1 if cfg.kernel in ("ws", "ws2") and cfg.swap else 2  # P and dS, or dS^T only
    tiles = 2 * cfg.block_n * d + 2 * cfg.num_stages * cfg.block_m * d + ps * cfg.block_n * cfg.block_m
    stats = 4 * 2 * cfg.num_stages * cfg.block_m if cfg.stat_ring else 0  # fp32 lse and delta rows per slot
    epi = cfg.block_n * d if cfg.epi and cfg.kernel == "ws" else 0  # the dK / dV staging tile
    return elem_bytes * (tiles + epi) + red + stats


def bwd_accumulator_regs(cfg: HopperBwdConfig, headdim: int) -> int:
    """fp32 registers per thread of the accumulators live at once: dK and dV, plus S^T and dP^T
    or dQ (dQ is computed once P^T and dP^T are dead). The floor of the kernel's register use;
    the rest is addresses, the P^T / dS^T operands and the loop's state."""
    d = block_d(headdim)
    threads = 32 * cfg.num_warps
    return (2 * cfg.block_n * d + max(2 * cfg.block_n * cfg.block_m, cfg.block_m * cfg.chunk(headdim))) // threads


def bwd_check(cfg: HopperBwdConfig, headdim: int) -> str | None:
    """Why ``cfg`` cannot work for ``headdim`` (None if it can)."""
    if cfg.num_warps != 8:
        return "the backward runs 2 compute warpgroups: num_warps = 8"
    if cfg.kernel not in ("plain", "ws", "ws2"):
        return f"kernel must be 'plain', 'ws' or 'ws2', got {cfg.kernel!r}"
    if cfg.kernel == "ws2" and (cfg.compute_regs % 8 or (2 * cfg.compute_regs + cfg.worker_regs) * 128 > 65536):
        return (f"registers: 2 x 128 x compute_regs {cfg.compute_regs} + 128 x worker_regs {cfg.worker_regs} "
                f"> 65536 (or not multiples of 8)")  # fmt: skip
    if cfg.kernel == "ws2" and cfg.block_n != 128:
        return "ws2 splits 128 keys between its two compute warpgroups: block_n = 128"
    if cfg.kernel in ("ws", "ws2"):
        if cfg.worker_regs % 8 or not 24 <= cfg.worker_regs <= 256:
            return f"worker_regs must be a multiple of 8 in [24, 256], got {cfg.worker_regs}"
        if cfg.red_rows not in (8, 16, 32) or cfg.block_m % cfg.red_rows:
            # (8: the dQ tile's swizzle period; a slice across it does not lower)
            return f"red_rows must be 8, 16 or 32 and divide block_m, got {cfg.red_rows}"
        if cfg.dq_chunk or cfg.red_vec != 1:
            return "the ws kernel computes dQ whole and reduces it from shared memory: no dq_chunk / red_vec"
        if cfg.swap and cfg.block_n != 128:
            return "swap gives each compute warpgroup 64 whole keys (the wgmma M): block_n = 128"
        if (cfg.stat_ring or cfg.fold) and not (cfg.kernel == "ws" and cfg.swap):
            return "stat_ring / fold are options of the ws kernel with swap"
        if cfg.fold and not cfg.stat_ring:
            return "fold reads the stats from the worker's ring: stat_ring = 1"
        if cfg.nbar not in (0, 1, 2):
            return f"nbar must be 0, 1 or 2, got {cfg.nbar}"
        if cfg.nbar == 2 and cfg.num_stages > 11:
            return f"nbar=2 takes a named barrier per ring slot (ids 3..13): num_stages <= 11, got {cfg.num_stages}"
        if cfg.nbar and cfg.kernel != "ws":
            return "nbar is an option of the ws kernel (8 compute warps and the worker; not ws2)"
        if cfg.persistent and not (cfg.kernel == "ws" and cfg.swap and cfg.stat_ring and not cfg.nbar
                                   and not cfg.lpt):
            return "persistent is an option of the ws kernel with swap and stat_ring, without nbar / lpt"
        if cfg.head_group < 0:
            return f"head_group must be >= 0 (0: all heads in one group), got {cfg.head_group}"
    elif cfg.swap or cfg.dq_tma or cfg.stat_ring or cfg.fold or cfg.nbar or cfg.persistent:
        return "swap / dq_tma / stat_ring / fold / nbar / persistent are options of the ws / ws2 kernels"
    if cfg.block_n not in (64, 128):
        return f"block_n (keys per program, the wgmma M of two warpgroups) must be 64 or 128, got {cfg.block_n}"
    if cfg.block_m not in (64, 128):
        return f"block_m must be 64 or 128, got {cfg.block_m}"
    if cfg.num_stages < 1:
        return f"num_stages must be >= 1, got {cfg.num_stages}"
    d = block_d(headdim)
    if cfg.red_vec not in (1, 4):
        return f"red_vec must be 1 or 4, got {cfg.red_vec}"
    if cfg.dq_chunk and (cfg.dq_chunk % 64 or d % cfg.dq_chunk):
        return f"dq_chunk must be a multiple of 64 dividing {d}, got {cfg.dq_chunk}"
    need = bwd_smem_bytes(cfg, headdim)
    if need > SM90_SMEM_LIMIT:
        return f"needs {need // 1024} KiB of shared memory, sm_90 has {SM90_SMEM_LIMIT // 1024} KiB per CTA"
    regs = bwd_accumulator_regs(cfg, headdim)
    if regs > 192:
        return f"the accumulators take {regs} fp32 registers per thread (> 192 of 255)"
    return None
