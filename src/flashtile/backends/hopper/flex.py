"""FlexAttention forwards (``score_mod`` / ``block_mask``) on the Gluon ws kernel (sm_90).

:func:`forward` has exactly ``flex_triton.launch.forward``'s contract: ``(q, k, v, call) ->
(out, lse)`` on the internal layout ``(B, S, H, D)``, out contiguous, lse float32 ``(B, H, Sq)``
in natural log (``-inf``, out 0, on rows that see no key). It runs ``fwd.attn_fwd_ws`` in its
``FLEX`` mode: each 128-row query tile is one block-mask query block; the producer warp's TMA loads
and both consumer warpgroups walk the block mask's partial list (mask_mod evaluated on the score
tile in registers), then its full list (no mask_mod), each block-mask block in ``128 // block_n``
key steps; the mods are the ``flex_triton`` kernels' ``@triton.jit`` functions, compiled into the
Gluon kernel. Score mods see FlexAttention's scores (``softmax_scale * q.k``, natural units).

:func:`gluon_reason` decides, in plain Python (CPU-tested, no Triton import), whether a call runs
here; ``flex_triton.launch.forward`` asks :func:`use_gluon` first and runs its Triton kernel
otherwise. ``FLASHTILE_FLEX_GLUON=0`` forces the Triton kernel (A/B comparisons), ``=force`` also
sends the score mods of :data:`SKIP_SCORES` (none now) here. ``FLASHTILE_FLEX_PREFETCH=1`` /
``=0`` turns the kernel's ``FLEX_PREFETCH`` on / off (:data:`PREFETCH_ENV`; unset: the config's,
off), an A/B switch that changes no routing.
"""

from __future__ import annotations

import os

import torch

from ...flex import PerBlockMask
from ...spec import AttnCall
from .configs import FLEX_MASK_BLOCK, HEADDIMS

#: Environment switch: ``0`` / ``off``: the Triton flex kernel always; ``force``: the Gluon kernel
#: also for :data:`SKIP_SCORES`; unset / ``1``: the rule of :func:`gluon_reason`.
ENV = "FLASHTILE_FLEX_GLUON"
#: Score mods left to the Triton kernel unless ``FLASHTILE_FLEX_GLUON=force`` (none now). The
#: relative-bias table (a per-element gather) spilled 172 / 220 bytes in the Gluon consumer when its
#: score mod ran on the whole 64 x 128 tile (scripts/gluon_compile_check.py --flex, bf16 d128);
#: on the tile's two column halves in turn (``fwd._flex_mods``) the loops over full blocks do not
#: spill, the partial-block loop a few words per block (96 / 144 bytes in all, most at entry).
#: NOT measured: benchmarks/gflex_run.py times the Gluon and Triton kernels on the bias table; put
#: ``"relative_bias"`` back here if the Gluon kernel is the slower.
SKIP_SCORES: tuple[str, ...] = ()
DTYPES = (torch.float16, torch.bfloat16)
#: Environment switch of the kernel's ``FLEX_PREFETCH`` (``configs.HopperConfig.flex_prefetch``: the
#: producer's list entries one step ahead): ``1`` on, ``0`` off, unset: :func:`configs.flex_config`'s
#: (off). Read at each launch (A/B in one process); it changes the kernel, not which calls run here.
PREFETCH_ENV = "FLASHTILE_FLEX_PREFETCH"


def env_mode() -> str:
    """``off``, ``auto`` or ``force`` from :data:`ENV`."""
    val = os.environ.get(ENV, "").strip().lower()
    if val in ("", "1", "on", "true", "yes", "auto"):
        return "auto"
    if val in ("0", "off", "false", "no"):
        return "off"
    if val == "force":
        return "force"
    raise ValueError(f"{ENV} must be 0, 1 or force, got {val!r}")


def prefetch_override() -> dict:
    """The :func:`configs.flex_config` override :data:`PREFETCH_ENV` asks for (``{}``: unset)."""
    val = os.environ.get(PREFETCH_ENV, "").strip().lower()
    if val == "":
        return {}
    if val in ("1", "on", "true", "yes"):
        return {"flex_prefetch": 1}
    if val in ("0", "off", "false", "no"):
        return {"flex_prefetch": 0}
    raise ValueError(f"{PREFETCH_ENV} must be 0 or 1, got {val!r}")


def _twin_name(fn) -> str | None:
    twin = getattr(fn, "_flashtile_triton", None)
    return None if twin is None else twin[0]


def gluon_reason(
    call: AttnCall,
    q_shape: tuple[int, ...],
    k_shape: tuple[int, ...],
    v_headdim: int,
    dtype: torch.dtype,
    device_type: str,
    capability_major: int | None,
    unavailable: str | None,
    mode: str = "auto",
) -> str | None:
    """Why a flex forward of this shape does NOT run on the Gluon kernel (None: it does).
    Shapes are the internal ``(B, S, H, D)``; ``capability_major`` the device's (None: unknown);
    ``unavailable`` the Hopper backend's :meth:`available` answer (None: available); ``mode``
    :func:`env_mode`'s."""
    if mode == "off":
        return f"{ENV}=0"
    if unavailable is not None:
        return f"hopper backend unavailable: {unavailable}"
    if device_type != "cuda":
        return f"needs CUDA tensors, got {device_type}"
    if capability_major != 9:
        return f"needs compute capability 9.x, got {capability_major}"
    if dtype not in DTYPES:
        return f"dtype {dtype} (fp16 / bf16 only)"
    B, Sq, H, D = q_shape
    Sk, Hk = k_shape[1], k_shape[2]
    if D not in HEADDIMS or v_headdim != D:
        return f"head dim {D} (v {v_headdim}): the Gluon forward serves {HEADDIMS} with equal q/v head dims"
    if call.varlen or call.dropout_p > 0 or call.learnable_sink is not None:
        return "varlen, dropout or a learnable sink"
    if Sq == 0 or Sk == 0 or B * H * Sq >= 2**31:
        return "empty sequences or an lse past int32 indexing"
    if H % Hk:
        return f"{H} query heads are not a multiple of {Hk} kv heads"
    if call.score_mod is None and not call.softmax_scale > 0:
        return "softmax_scale must be > 0 without a score_mod"
    if call.score_mod is not None:
        name = _twin_name(call.score_mod)
        if name is None:
            return "the score_mod has no Triton twin"
        if name in SKIP_SCORES and mode != "force":
            return f"score_mod {name} stays on the Triton kernel (SKIP_SCORES)"
    bm = call.block_mask
    if bm is not None:
        if bm.mask_mod is not None and _twin_name(bm.mask_mod) is None:
            return "the mask_mod has no Triton twin"
        if tuple(bm.BLOCK_SIZE) != (FLEX_MASK_BLOCK, FLEX_MASK_BLOCK):
            return f"block mask BLOCK_SIZE {tuple(bm.BLOCK_SIZE)}: the Gluon kernel serves {FLEX_MASK_BLOCK} only"
        num, idx = bm.kv_num_blocks, bm.kv_indices
        if num.dim() != 3 or idx.dim() != 4 or tuple(idx.shape[:3]) != tuple(num.shape):
            return "block-mask lists of unexpected shapes"
        if num.shape[-1] < -(-Sq // FLEX_MASK_BLOCK):
            return f"the block mask covers {num.shape[-1]} query blocks, fewer than the call's"
        if num.shape[0] not in (1, B) or num.shape[1] not in (1, H):
            return "block mask batch / heads neither 1 nor the call's"
        fnum, fidx = bm.full_kv_num_blocks, bm.full_kv_indices
        if fnum is not None and (tuple(fnum.shape) != tuple(num.shape) or tuple(fidx.shape) != tuple(idx.shape)):
            return "full lists of another shape than the partial lists"
    return None


#: Block masks whose query blocks visit fewer keys than this on average (partial + full blocks)
#: stay on the Triton flex kernels unless ``FLASHTILE_FLEX_GLUON=force``: every block mask at head
#: dim 64 (backward) and those of :data:`GATHER_MASKS`; :data:`MIN_ROW_KEYS_PLAIN` for the others.
#: Measured (H200, b1 h16 s16k bf16, device time of back-to-back calls,
#: results/gflex_NVIDIA_H200_20261202-0438.json, -0446.json, gflex_bwd_H200_20261202-0439.json,
#: -0448.json; forward Gluon / Triton ms): the long rows (causal, prefix-LM, ALiBi, bias table:
#: 8-9k keys a row) 1.3-4x faster on the Gluon kernels at d128 (prefix-LM backward 6.1 against
#: 8.0 ms, at d64 3.9 against 4.8); document-16 (1200 keys a row, a mask that reads the document
#: ids at every key) faster on Triton in both directions (forward 0.43-0.44 either way, backward
#: 1.38 against 1.48 at d128, 0.83 against 1.02 at d64).
MIN_ROW_KEYS = 2048
#: The threshold for mask mods outside :data:`GATHER_MASKS` at head dims >= 96: sliding-1k
#: (1116 keys a row) ran on the Gluon kernels at least as fast as on Triton's (forward 0.331 / 0.377
#: against 0.383 / 0.377 ms in two runs; backward 1.155 / 1.167 against 1.256 / 1.270 ms).
MIN_ROW_KEYS_PLAIN = 768
#: Mask mods that read a tensor at every key index (document ids, span ids): on short rows their
#: per-element gathers cost the Gluon consumers more than the Triton kernel's.
GATHER_MASKS = ("document", "bidirectional_blocks")
#: At head dim 64 the Gluon flex forward's per-block fixed costs weigh twice as much: it tied or
#: lost to the Triton flex kernel on every mask (causal 1.330 / 1.342 ms, prefix-LM 1.417 / 1.427,
#: ALiBi 1.748 / 1.557, document 0.378 / 0.292, sliding 0.270 / 0.253) except the bias-table score
#: mod (2.45 against 10.8: the Triton kernel's per-element table gather); so the d64 forward runs
#: on Triton unless its score mod is one of these.
D64_FORWARD_SCORES = ("relative_bias",)


def long_rows(bm, mode: str | None = None, headdim: int = 128, backward: bool = False, score_mod=None) -> bool:
    """Whether a call with block mask ``bm`` (None: every block) and ``score_mod`` at ``headdim``
    goes to the Gluon kernels (the ``backward``'s or the forward's) by the row-length rules above;
    always with ``mode == "force"``. One host sync per block mask, cached
    (``flex_triton.launch._row_keys``)."""
    if (mode or env_mode()) == "force":
        return True
    if headdim < 96 and not backward:
        return _twin_name(score_mod) in D64_FORWARD_SCORES  # (None for no score mod)
    if bm is None:
        return True
    from ..flex_triton import launch as FL

    plain = headdim >= 96 and (bm.mask_mod is None or _twin_name(bm.mask_mod) not in GATHER_MASKS)
    return FL._row_keys(bm) >= (MIN_ROW_KEYS_PLAIN if plain else MIN_ROW_KEYS)


def use_gluon(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall) -> bool:
    """Whether ``flex_triton.launch.forward`` hands this call to :func:`forward`: the shapes and
    options :func:`gluon_reason` accepts, with rows long enough (:func:`long_rows`)."""
    mode = env_mode()
    if mode == "off" or not q.is_cuda:
        return False
    from .. import _device
    from . import backend

    info = _device.info(q.device)
    major = None if info is None else info.major
    ok = gluon_reason(call, tuple(q.shape), tuple(k.shape), v.shape[-1], q.dtype, q.device.type, major,
                      backend.available(), mode) is None  # fmt: skip
    return ok and long_rows(call.block_mask, mode, q.shape[-1], False, call.score_mod)


#: (nq, nk, device) -> the lists of "every key block full" (a score_mod without a block mask)
_ALL: dict[tuple, tuple] = {}


def _all_blocks(nq: int, nk: int, device: torch.device) -> tuple:
    key = (nq, nk, device)
    hit = _ALL.get(key)
    if hit is None:
        num0 = torch.zeros((1, 1, nq), dtype=torch.int32, device=device)
        idx = torch.arange(nk, dtype=torch.int32, device=device).expand(1, 1, nq, nk).contiguous()
        full = torch.full((1, 1, nq), nk, dtype=torch.int32, device=device)
        hit = (num0, idx, full, idx)
        if len(_ALL) > 64:
            _ALL.clear()
        _ALL[key] = hit
    return hit


# Flex launch plans (issues 16 and 18): what a Gluon flex forward derives besides its tensors --
# the route (use_gluon), the block mask's int32 lists, geometry and flags, the mods' switches and
# arguments, the config, the grid, every other kernel argument, the descriptors' templates, the
# compiled kernel -- kept per signature, so that a repeated call allocates out and lse, copies four
# descriptors and launches (``launch._runner``). Kept per block mask (``PerBlockMask``: the same
# object, weakly, and count list; entries hold its mask_mod and the score_mod, checked with ``is``)
# and key: every call field the route reads (scale, varlen, dropout, sink), the dtypes, device,
# shapes and strides of q, k, v, and the two environment switches (read per call, as the unplanned
# path reads them). Made at a signature's first Gluon call, prepared at its first reuse; only inputs
# TMA reads as they are. An entry: (mask_mod, score_mod, runner, _PENDING, or None: not preparable).
_PLANS = PerBlockMask(64)
_PENDING = object()
_L: list = []  # the Triton-importing modules, imported at the first forward (this module imports no Triton)


def _mods_loaded():
    if not _L:
        from ..flex_triton import launch as FL
        from . import launch as HL

        _L.extend((FL, HL))
    return _L


def _plan_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall) -> tuple:
    env = os.environ.get
    return (id(call.score_mod), call.softmax_scale, call.cu_seqlens_q is None, call.dropout_p,
            call.learnable_sink is None, q.dtype, k.dtype, v.dtype, q.device, q.shape, k.shape, v.shape, q.stride(),
            k.stride(), v.stride(), env(ENV), env(PREFETCH_ENV))  # fmt: skip


def _entry(call: AttnCall, key: tuple) -> tuple | None:
    """The plan entry of this block mask (the same object, count list and mask_mod), score_mod and key."""
    bm = call.block_mask
    entry = _PLANS.peek(bm, key, None if bm is None else bm.kv_num_blocks)
    if entry is None or entry[0] is not (None if bm is None else bm.mask_mod) or entry[1] is not call.score_mod:
        return None
    return entry


def planned(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall) -> tuple | None:
    """``(out, lse)`` of a call whose signature has a flex plan (see above), before any routing
    work; None where there is none (the caller routes as always)."""
    if not _PLANS:
        return None
    key = _plan_key(q, k, v, call)
    entry = _entry(call, key)
    if entry is None:
        return None
    run = entry[2]
    if run is _PENDING:  # the first reuse: the full forward, which prepares the launch
        return forward(q, k, v, call, _key=key)
    if run is None:  # the launch could not be prepared
        return None
    res = run(q, k, v)
    if res is None:  # declined (plans cleared, the lean path off, an unaligned base): planned anew
        _PLANS.discard(call.block_mask, key)
    return res


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall, *, _key: tuple | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of a call with mods on the Gluon ws kernel (``flex_triton.launch.forward``'s
    contract; the caller checked :func:`use_gluon`)."""
    FL, HL = _mods_loaded()
    from . import configs

    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    out, lse = FL.outputs(q)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    bm = call.block_mask
    mb = FLEX_MASK_BLOCK
    if bm is None:
        nq, nk = -(-Sq // mb), -(-Sk // mb)
        num, idx, fnum, fidx = _all_blocks(nq, nk, q.device)
        has_full, bm_b, bm_h = True, False, False
        even = Sq % mb == 0 and Sk % mb == 0
    else:
        (num, idx, fnum, fidx), _, flags = FL._lists(bm, "kv", q.device)
        has_full, bm_b, bm_h = flags["HAS_FULL"], bool(flags["BM_B"]), bool(flags["BM_H"])
        _, even = FL._geometry(bm, Sq, Sk)
    consts, margs, sargs, _ = FL._mods(call)
    cfg = configs.flex_config(D, **prefetch_override())
    q, k, v = (HL.tma_ready(x) for x in (q, k, v))
    descs = (HL._descriptor(q, cfg.q_rows, False), HL._descriptor(k, cfg.block_n, False),
             HL._descriptor(v, cfg.block_n, False), HL._descriptor(out, cfg.q_rows, False))  # fmt: skip
    grid = (-(-Sq // cfg.block_m), H, B)
    args = (*descs, out, lse, None, None, out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
            Sq, Sk, H // Hk, FL._scale(call), 0.0, -1, -1)  # fmt: skip
    kw = dict(
        HEAD_DIM=D, BLOCK_D=configs.block_d(D), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        NUM_STAGES=cfg.num_stages, HAS_WL=False, HAS_WR=False, HAS_SOFTCAP=False, IS_VARLEN=False,
        REVERSE_M=True, CONSUMER_REGS=cfg.consumer_regs, PRODUCER_REGS=cfg.producer_regs,
        NUM_CONSUMERS=cfg.consumers, num_warps=cfg.num_warps,
        KV_NUM=num, KV_IDX=idx, FULL_NUM=fnum if has_full else None, FULL_IDX=fidx if has_full else None,
        bm_sb=num.stride(0) if bm_b else 0, bm_sh=num.stride(1) if bm_h else 0, bm_nk=idx.shape[-1],
        MA0=margs[0], MA1=margs[1], MA2=margs[2], SA0=sargs[0], SA1=sargs[1], SA2=sargs[2],
        FLEX=True, HAS_FULL=has_full, SUBS=mb // cfg.block_n, BOUNDS=not even,
        HAS_MASK=consts["HAS_MASK"], HAS_SCORE=consts["HAS_SCORE"], MASK_MOD=consts["MASK_MOD"],
        SCORE_MOD=consts["SCORE_MOD"], FLEX_PREFETCH=bool(cfg.flex_prefetch), WAIT_FENCE=bool(cfg.wait_fence),
    )  # fmt: skip
    with HL.device_guard(q.device):
        HL._WS[grid](*args, **kw)
    if HL.LEAN and descs[0].base is q and descs[1].base is k and descs[2].base is v:  # no copies: plannable
        _plan(q, k, v, call, _key, out, lse, grid, args, kw)
    return out, lse


def _plan(q, k, v, call: AttnCall, key: tuple | None, out, lse, grid, args, kw) -> None:
    """Record this call's plan (pending), or at its first reuse (``key`` given) prepare it."""
    _, HL = _mods_loaded()
    bm = call.block_mask
    stamp = None if bm is None else bm.kv_num_blocks
    if key is not None:
        entry = _entry(call, key)
        if entry is not None and entry[2] is _PENDING:
            prep = HL._WS.prepare(grid, args, kw, 6, descs=4, keep=True)
            _PLANS.put(bm, key, stamp, (*entry[:2], None if prep is None else HL._runner(out, lse, prep, args[:4], ())))
        return
    key = _plan_key(q, k, v, call)
    if _entry(call, key) is None:  # (a block mask without weak references is not kept: no plan)
        _PLANS.put(bm, key, stamp, (None if bm is None else bm.mask_mod, call.score_mod, _PENDING))


__all__ = [
    "ENV",
    "D64_FORWARD_SCORES",
    "GATHER_MASKS",
    "MIN_ROW_KEYS",
    "MIN_ROW_KEYS_PLAIN",
    "PREFETCH_ENV",
    "SKIP_SCORES",
    "env_mode",
    "forward",
    "gluon_reason",
    "long_rows",
    "planned",
    "prefetch_override",
    "use_gluon",
]
