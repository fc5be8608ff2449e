"""Host side of the ``flex_triton`` backend: tile configs, block-mask lists, kernel launches.

Tile configs come from the built-in Triton kernels' table (``backends/triton/configs.py``, the
same loop shape), with blocks clipped to the block mask's ``BLOCK_SIZE`` (a program's query rows
and each step's keys must lie in one block-mask block) and 4 warps for a 64-row program, unless
:data:`_TABLE` names a config of its own (``FLASHTILE_FLEX_FWD`` / ``FLASHTILE_FLEX_BWD`` force one, to
measure others on a GPU), or :data:`_SHORT` one for block masks with short rows; the forward's
config also carries the kernel's grid order and loop order (:class:`FlexFwdConfig`). On
``OutOfResources`` the launch steps down through ``configs.fallbacks`` once per key and remembers
what fitted.

Per call the host does little: the kernels launch through the lean path (``fastlaunch``), a block
mask's lists are converted to the kernels' int32 form once (cached per block mask), and ``out`` is
allocated contiguous, so the autograd function above does not copy it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

from ...flex import PerBlockMask
from ...spec import AttnCall
from .._ints import cdiv as _cdiv
from ..hopper import flex as _gluon_flex
from ..triton import configs
from ..triton.bwd import _bwd_preprocess
from ..triton.configs import BwdConfig, FwdConfig
from ..triton.fastlaunch import fast
from ..triton.launch import _fit as _triton_fit
from ..triton.launch import arch as _arch
from ..triton.launch import block_d as _bd
from ..triton.launch import device_guard as _guard
from . import kernels as K

LOG2E = 1.4426950408889634
INTERPRET = type(K.flex_fwd).__name__ == "InterpretedFunction"

# the kernels on the lean launch path (backends/triton/fastlaunch.py: after the first launch of a
# signature, the compiled kernel's own launcher instead of Triton's generic per-call binding of ~60
# arguments; Triton's generic launch under the interpreter)
_FWD = fast(K.flex_fwd)
_DKDV = fast(K.flex_bwd_dkdv)
_DQ = fast(K.flex_bwd_dq)
_PRE = fast(_bwd_preprocess)


@dataclass(frozen=True)
class FlexFwdConfig(FwdConfig):
    """The forward's tile config plus the flex kernel's own switches (``kernels.flex_fwd``):
    ``grid`` (0: heads fastest, last query blocks first; 1: query blocks fastest, in order, as
    FlexAttention; 2: query blocks fastest, last first) and ``partial_first`` (the block mask's
    partial blocks before its full ones, as FlexAttention)."""

    grid: int = 0
    partial_first: bool = False


#: (arch, block-mask block, head-dim bucket) -> (forward, backward) config overriding the clipped
#: built-in entry. Empty: the built-in sm90 entries at block 128 are the ones the flex kernels
#: compile to without spills (scripts/flex_compile_check.py); candidates for short rows are timed
#: by benchmarks/flex_sweep.py (NOT yet measured with mods on a GPU).
_TABLE: dict[tuple[str, int, int], tuple[FwdConfig, BwdConfig]] = {}

#: (arch, block-mask block, head-dim bucket) -> forward config for block masks with short rows: query
#: blocks visiting on average at most SHORT_ROW_KEYS keys (document, sliding-window masks: a few key
#: blocks per program, where pipeline fill, q's load and the epilogue weigh); an entry costs one host
#: sync per block mask (its mean row length, cached with its lists). sm90 d128: 64x64, 4 warps, 3
#: stages measured 0.406 / 0.372 ms GPU time on document-16 / sliding-1k (b1 h16 s16k) against the
#: default tile's 0.438 / 0.410 (H200, benchmarks/flex_sweep.py, results/flex_sweep_H200_20261201-2353.json)
_SHORT: dict[tuple[str, int, int], FlexFwdConfig] = {
    ("sm90", 128, 128): FlexFwdConfig(64, 64, 4, 3, 0, False),
}
SHORT_ROW_KEYS = 2048


def _env_cfg(name: str, cls):
    """A config forced through the environment (for measuring others on a GPU):
    ``FLASHTILE_FLEX_FWD=M,N,WARPS,STAGES[,GRID[,PARTIAL_FIRST]]`` /
    ``FLASHTILE_FLEX_BWD=M1,N1,M2,N2,W1,S1,W2,S2``."""
    val = os.environ.get(name)
    if not val:
        return None
    try:
        vals = [int(x) for x in val.split(",")]
        if cls is not FlexFwdConfig:
            return cls(*vals)
        if not 4 <= len(vals) <= 6:
            raise ValueError
        return cls(*vals[:5], *(bool(x) for x in vals[5:]))
    except (TypeError, ValueError) as e:
        n = "4 to 6" if cls is FlexFwdConfig else str(len(fields(cls)))
        raise ValueError(f"{name} must be {n} comma-separated ints, got {val!r}") from e


def fwd_cfg(
    arch: str, d: int, dtype: torch.dtype, mb: int, max_seqlen: int, row_keys: Callable[[], float] | None = None
) -> FlexFwdConfig:
    """The forward's tile config for block-mask block ``mb`` (128 without a block mask).
    ``row_keys``: the block mask's mean keys per query row (called only where :data:`_SHORT` has an
    entry for this key)."""
    forced = _env_cfg("FLASHTILE_FLEX_FWD", FlexFwdConfig)
    if forced is not None and arch != "interpret":
        return _clip(forced, mb)
    bd = _bd(d)
    short = _SHORT.get((arch, mb, configs.bucket(bd)))
    if short is not None and row_keys is not None and row_keys() <= SHORT_ROW_KEYS:
        return _clip(short, mb)
    over = _TABLE.get((arch, mb, configs.bucket(bd)))
    if over is not None:
        c = over[0]
        return c if isinstance(c, FlexFwdConfig) else FlexFwdConfig(*(getattr(c, f.name) for f in fields(FwdConfig)))
    c = configs.fwd_config(arch, bd, dtype, max_seqlen)
    bm, bn = min(c.block_m, mb), min(c.block_n, mb)
    warps = min(c.num_warps, 4) if bm < c.block_m and bm <= 64 else c.num_warps
    return FlexFwdConfig(bm, bn, warps, c.num_stages)


def bwd_cfg(arch: str, d: int, dtype: torch.dtype, mb: int, max_seqlen: int) -> BwdConfig:
    forced = _env_cfg("FLASHTILE_FLEX_BWD", BwdConfig)
    if forced is not None and arch != "interpret":
        return _clip(forced, mb)
    bd = _bd(d)
    over = _TABLE.get((arch, mb, configs.bucket(bd)))
    if over is not None:
        return over[1]
    c = configs.bwd_config(arch, bd, dtype, max_seqlen)
    m1, n1, m2, n2 = (min(x, mb) for x in (c.block_m1, c.block_n1, c.block_m2, c.block_n2))
    w1 = min(c.num_warps1, 4) if n1 < c.block_n1 and n1 <= 64 else c.num_warps1
    w2 = min(c.num_warps2, 4) if m2 < c.block_m2 and m2 <= 64 else c.num_warps2
    return BwdConfig(m1, n1, m2, n2, w1, c.num_stages1, w2, c.num_stages2)


#: score mods that look a captured tensor up per score element (the software pipeliner stages the
#: gathered tile through shared memory): smaller backward steps, two stages (sm90 compile check,
#: scripts/flex_compile_check.py: (64,128,128,64,8,3,8,3) spills 248-528 B and the dQ pass needs
#: 256 KB of shared memory; (32,128,128,32,8,2,8,2) no spills in the loops, 115 / 131 KB). NOT
#: measured.
_GATHER_MODS = ("relative_bias",)


def mod_bwd_cfg(cfg: BwdConfig, score_name: str) -> BwdConfig:
    """The backward config adjusted for the flex kernels: the dK/dV pass at most two stages (its
    dK / dV accumulators leave few registers; compile check at (64,128,w8): 3 stages spill 96-216 B,
    6-22 local loads / stores a step, 2 stages 0-2), and per-element lookups
    (:data:`_GATHER_MODS`) 32-wide steps and two stages in both passes."""
    cfg = replace(cfg, num_stages1=min(cfg.num_stages1, 2))
    if score_name in _GATHER_MODS:
        return replace(cfg, block_m1=min(cfg.block_m1, 32), block_n2=min(cfg.block_n2, 32),
                       num_stages2=min(cfg.num_stages2, 2))  # fmt: skip
    return cfg


def _clip(cfg, mb: int):
    """A fallback config with its blocks kept within the block-mask block."""
    if isinstance(cfg, FwdConfig):
        return replace(cfg, block_m=min(cfg.block_m, mb), block_n=min(cfg.block_n, mb))
    return replace(cfg, block_m1=min(cfg.block_m1, mb), block_n1=min(cfg.block_n1, mb),
                   block_m2=min(cfg.block_m2, mb), block_n2=min(cfg.block_n2, mb))  # fmt: skip


def _fit(key: tuple, cfg, mb: int, launch) -> None:
    """The Triton launcher's fit-and-remember (:func:`..triton.launch._fit`), each fallback kept
    within the block-mask block."""
    _triton_fit(("flex", *key), cfg, launch, adapt=lambda c: _clip(c, mb), who="flex_triton")


def _twin(fn):
    return getattr(fn, "_flashtile_triton", None)


def _arg(a):
    return a.detach() if isinstance(a, torch.Tensor) else a


#: zero placeholders (the lists' stand-ins without a block mask), one per device
_ZEROS: dict[torch.device, torch.Tensor] = {}


#: _lists' results: the int32 / contiguous conversions and strides once per block mask, not per call
_LISTS = PerBlockMask()


def _lists(bm, side: str, device: torch.device):
    """The block mask's ``side`` ("kv": per query block; "q": per key block, for the dK/dV pass)
    lists as int32 tensors with unit inner stride, flattened into the kernels' arguments:
    ``(num, idx, full_num, full_idx, 12 strides, has_full, B > 1, H > 1)``; placeholders without a
    block mask. Cached per block mask (checked by identity of the object and of its count tensor,
    so a block mask whose lists are replaced is converted again)."""
    if bm is None:
        return _convert_lists(None, side, device)
    return _LISTS.get(bm, (side, device), getattr(bm, f"{side}_num_blocks"), lambda: _convert_lists(bm, side, device))


def _convert_lists(bm, side: str, device: torch.device):
    zero = _ZEROS.get(device)
    if zero is None:
        zero = _ZEROS[device] = torch.zeros(1, dtype=torch.int32, device=device)
    ph = (zero.view(1, 1, 1), zero.view(1, 1, 1, 1))
    if bm is None:
        num, idx, fnum, fidx, has_full = *ph, *ph, False
    else:

        def get(name):
            return getattr(bm, name).to(torch.int32).contiguous()

        num, idx = get(f"{side}_num_blocks"), get(f"{side}_indices")
        has_full = getattr(bm, f"full_{side}_num_blocks") is not None
        fnum, fidx = (get(f"full_{side}_num_blocks"), get(f"full_{side}_indices")) if has_full else ph
    strides = (*num.stride(), *idx.stride()[:3], *fnum.stride(), *fidx.stride()[:3])
    return (
        (num, idx, fnum, fidx),
        strides,
        dict(HAS_BLOCK_MASK=bm is not None, HAS_FULL=has_full, BM_B=int(num.shape[0] > 1), BM_H=int(num.shape[1] > 1)),
    )


_ROW_KEYS = PerBlockMask()


def _row_keys(bm) -> float:
    """The block mask's mean number of visited keys per query block (partial + full blocks, times
    the block): one host sync per block mask, cached (weakly, as :func:`_lists`)."""

    def compute() -> float:
        n = bm.kv_num_blocks.float().mean()
        if bm.full_kv_num_blocks is not None:
            n = n + bm.full_kv_num_blocks.float().mean()
        return float(n.item()) * bm.BLOCK_SIZE[1]

    return _ROW_KEYS.get(bm, (), bm.kv_num_blocks, compute)


def _geometry(bm, Sq: int, Sk: int) -> tuple[int, bool]:
    """(block-mask block, EVEN): EVEN when both lengths are multiples of the block and, with a block
    mask, its lists cover exactly the call's blocks (no list names a block past the end)."""
    mb = bm.BLOCK_SIZE[0] if bm is not None else 128
    even = Sq % mb == 0 and Sk % mb == 0
    if bm is not None:
        nq, nk = bm.kv_num_blocks.shape[-1], bm.kv_indices.shape[-1]
        even = even and nq == Sq // mb and nk == Sk // mb
    return mb, even


def _mods(call: AttnCall) -> tuple[dict, tuple, tuple, str]:
    """The mods' constexpr switches and arguments: (consts, mask args, score args, score name)."""
    bm = call.block_mask
    has_mask = bm is not None and bm.mask_mod is not None
    mask_name, margs = _twin(bm.mask_mod) if has_mask else ("no_mask", (0, 0, 0))
    has_score = call.score_mod is not None
    score_name, sargs = _twin(call.score_mod) if has_score else ("no_score", (0, 0, 0))
    consts = dict(MASK_MOD=getattr(K, mask_name), SCORE_MOD=getattr(K, score_name), HAS_MASK=has_mask,
                  HAS_SCORE=has_score)  # fmt: skip
    return consts, tuple(_arg(a) for a in margs), tuple(_arg(a) for a in sargs), score_name


def _upcast(dtype: torch.dtype) -> bool:
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


def _scale(call: AttnCall) -> float:
    """The kernels' q.k scale: natural units with a score mod (it sees FlexAttention's scores),
    base 2 without (log2(e) folded in)."""
    return float(call.softmax_scale) * (1.0 if call.score_mod is not None else LOG2E)


def _grid_order(c: FwdConfig, B: int, H: int) -> int:
    """The config's grid order, or 0 where B * H would exceed CUDA's 65535 limit on the grid's
    second dimension (orders 1 / 2 put the batch x heads there)."""
    g = getattr(c, "grid", 0)
    return g if B * H <= 65535 else 0


def _fwd_grid(c: FwdConfig, B: int, H: int, Sq: int) -> tuple[int, int]:
    nq = _cdiv(Sq, c.block_m)
    return (B * H, nq) if _grid_order(c, B, H) == 0 else (nq, B * H)


def outputs(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A flex forward's ``out`` (q's shape and dtype, contiguous) and ``lse`` (``(B, H, Sq)`` fp32),
    uninitialised (both flex forwards, Triton and Gluon)."""
    B, Sq, H, _ = q.shape
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), torch.empty((B, H, Sq), dtype=torch.float32,
                                                                             device=q.device)  # fmt: skip


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of a call with mods, internal layout ``(B, S, H, D)``; lse ``(B, H, Sq)`` fp32.
    out is contiguous in that layout whatever q's strides (a q viewed from FlexAttention's
    ``(B, H, S, D)`` would otherwise give an out that the autograd function copies).
    On sm_90 the Gluon ws kernel runs it where it serves the call (``hopper/flex.py``:
    :func:`~flashtile.backends.hopper.flex.gluon_reason`; ``FLASHTILE_FLEX_GLUON=0``: never)."""
    res = _gluon_flex.planned(q, k, v, call)  # a repeated Gluon call's prepared launch (None: none)
    if res is not None:
        return res
    if _gluon_flex.use_gluon(q, k, v, call):
        return _gluon_flex.forward(q, k, v, call)
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    out, lse = outputs(q)
    if out.numel() == 0:
        return out, lse.fill_(float("-inf"))
    bm = call.block_mask
    mb, even = _geometry(bm, Sq, Sk)
    lists, lstrides, bflags = _lists(bm, "kv", q.device)
    consts, margs, sargs, _ = _mods(call)
    arch = _arch(q.device)
    cfg = fwd_cfg(arch, D, q.dtype, mb, max(Sq, Sk), None if bm is None else (lambda: _row_keys(bm)))

    def launch(c: FwdConfig) -> None:
        _FWD[_fwd_grid(c, B, H, Sq)](
            q, k, v, out, lse, *lists,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2), *lstrides,
            Sq, Sk, H, H // Hk, _scale(call), *margs, *sargs,
            **consts, **bflags, MASK_BLOCK=mb, EVEN=even, BLOCK_M=c.block_m, BLOCK_N=c.block_n, BLOCK_D=_bd(D),
            HEAD_DIM=D, UPCAST=_upcast(q.dtype), GRID=_grid_order(c, B, H),
            PARTIAL_FIRST=bool(getattr(c, "partial_first", False)), num_warps=c.num_warps, num_stages=c.num_stages,
        )  # fmt: skip

    with _guard(q.device):
        _fit(("fwd", arch, q.dtype, D, mb), cfg, mb, launch)
    return out, lse


#: ``FLASHTILE_FLEX_GLUON=0`` runs calls with mods on the Triton kernels here even where the Gluon
#: Hopper kernels serve them (A/B comparisons); shared by the forward and the backward (one name and
#: one parser: :func:`~flashtile.backends.hopper.flex.env_mode`)
FLEX_GLUON_ENV = _gluon_flex.ENV
#: score mods the Gluon backward applies as an added bias (``hopper.bwd._bwd_p``'s ``SCORE_MOD``):
#: their derivative in the score is 1, so only P's recomputation changes (the mod on the natural-unit
#: score before the exponent, as the forward's lse has it) and dS = P * (dP - delta) is as without;
#: only without a captured tensor gradient (the slopes / table then stay on the Triton backward)
_GLUON_ADDITIVE_SCORES = ("alibi", "relative_bias")
#: score mods the Gluon backward computes (softcap as its built-in softcap; the additive ones above;
#: no captured tensor)
_GLUON_SCORE_MODS = ("softcap", *_GLUON_ADDITIVE_SCORES)


def _hopper_ready(device: torch.device) -> str | None:
    """Why the Gluon Hopper kernels cannot run on ``device`` (None: they can): the hopper
    backend's availability (Triton 3.6 with Gluon, CUDA) and compute capability 9.x."""
    from ..hopper import backend as hopper

    why = hopper.available()
    if why is None and (device.type != "cuda" or torch.cuda.get_device_capability(device)[0] != 9):
        why = "needs a compute capability 9.x CUDA device"
    return why


def gluon_bwd_reason(
    q: torch.Tensor, k: torch.Tensor, call: AttnCall, captured: tuple, hopper_ready: Callable | None = None
) -> str | None:
    """Why the backward of this flex call does not run on the Gluon Hopper kernel
    (``hopper.launch_bwd.flex_backward``; None: it does). Served: a block mask with ``BLOCK_SIZE``
    128 and its transposed lists, whose mask_mod has a Triton version (or is None); no score_mod,
    softcap's or one of :data:`_GLUON_ADDITIVE_SCORES`; no captured tensor gradient; fp16 / bf16;
    a head dim whose backward config is the ws kernel with swapped tiles (64, 96, 128); not
    deterministic; a per-head block mask only without GQA; a Hopper GPU with the Gluon backend
    available (``hopper_ready(device)``, by default :func:`_hopper_ready`); and ``FLASHTILE_FLEX_GLUON`` not ``0``."""
    from ..hopper import configs as hcfg

    if _gluon_flex.env_mode() == "off":
        return f"{FLEX_GLUON_ENV}=0"
    bm = call.block_mask
    if bm is None or getattr(bm, "q_num_blocks", None) is None:
        return "no block mask with transposed (per key block) lists"
    if tuple(bm.BLOCK_SIZE) != (128, 128):
        return f"block-mask BLOCK_SIZE {tuple(bm.BLOCK_SIZE)} (the Gluon backward walks 128-key blocks)"
    if bm.mask_mod is not None and (_twin(bm.mask_mod) is None or not hasattr(K, _twin(bm.mask_mod)[0])):
        return "the mask_mod has no Triton version"
    if call.score_mod is not None and (_twin(call.score_mod) or ("",))[0] not in _GLUON_SCORE_MODS:
        return f"score_mod other than {', '.join(_GLUON_SCORE_MODS)}"
    if captured:
        return "a captured tensor needs a gradient"
    if call.deterministic:
        return "deterministic (the Triton backward adds no atomics)"
    if call.has_window or call.softcap > 0 or call.dropout_p > 0 or call.varlen or call.alibi_slopes is not None:
        return "built-in options beside the mods"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype}"
    d = q.shape[-1]
    if d not in hcfg.HEADDIMS or k.shape[-1] != d:
        return f"head dim {d}"
    c = hcfg.bwd_config(d)
    if not (c.kernel == "ws" and c.swap and c.block_n == 128 and 128 % c.block_m == 0):
        return f"head dim {d}: the Hopper backward's config is not the ws kernel with swapped tiles"
    if bm.q_num_blocks.shape[1] > 1 and q.shape[2] != k.shape[2]:
        return "a per-head block mask under GQA"
    return (hopper_ready or _hopper_ready)(q.device)


def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    call: AttnCall,
    captured: tuple[torch.Tensor, ...],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """(dq, dk, dv, {"score_mod": (captured tensor's gradient,)}) from the saved out / lse. On a
    Hopper GPU the calls :func:`gluon_bwd_reason` accepts run the Gluon kernel instead
    (``hopper.launch_bwd.flex_backward``, same contract) when the block mask's rows are long
    enough (``hopper.flex.long_rows``, the backward's rule)."""
    key = entry = None
    if not captured:  # (a captured tensor's gradient: never planned)
        key = _bwd_key(dout, q, k, v, out, lse, call)
        entry = _bwd_entry(call, key)
        if entry is not None and isinstance(entry[1], tuple):
            return _run_planned(entry[1], dout, q, k, v, out, lse)
    if (entry[1] == "gluon") if entry is not None else (
        gluon_bwd_reason(q, k, call, captured) is None
        and _gluon_flex.long_rows(call.block_mask, None, q.shape[-1], True, call.score_mod)
    ):  # fmt: skip
        from ..hopper.launch_bwd import flex_backward

        if key is not None and entry is None:
            _bwd_put(call, key, "gluon")
        return flex_backward(dout, q, k, v, out, lse, call, captured)
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    grad = torch.zeros(captured[0].shape, dtype=torch.float32, device=q.device) if captured else None

    def result():
        return dq, dk, dv, ({"score_mod": (grad.to(captured[0].dtype),)} if captured else {})

    if q.numel() == 0 or k.numel() == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return result()
    bm = call.block_mask
    mb, even = _geometry(bm, Sq, Sk)
    consts, margs, sargs, score_name = _mods(call)
    arch = _arch(q.device)
    cfg = bwd_cfg(arch, D, q.dtype, mb, max(Sq, Sk))
    if not os.environ.get("FLASHTILE_FLEX_BWD"):
        cfg = mod_bwd_cfg(cfg, score_name)
    bd = _bd(D)
    up = _upcast(q.dtype)
    scale, sm_scale = _scale(call), float(call.softmax_scale)
    score_bwd = getattr(K, f"{score_name}_bwd")
    with _guard(q.device):
        delta = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
        pre_m = 32 if INTERPRET else 128
        launched = {}  # kernel -> (grid, args, kwargs) of its launch (the plan's templates)

        def go(kernel, grid, *args, **kw) -> None:
            kernel[grid](*args, **kw)
            launched[kernel] = (grid, args, kw)

        go(_PRE, (_cdiv(Sq, pre_m), H, B),
            out, dout, delta, out.stride(0), out.stride(1), out.stride(2), dout.stride(0), dout.stride(1),
            dout.stride(2), delta.stride(0), delta.stride(1), Sq, HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=pre_m, num_warps=4,
        )  # fmt: skip
        qlists, qstrides, bflags = _lists(bm, "q", q.device)

        def dkdv(c: BwdConfig) -> None:
            go(_DKDV, (B * Hk, _cdiv(Sk, c.block_n1)),
                q, k, v, dout, dk, dv, lse, delta, *qlists,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
                dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2), *qstrides,
                Sq, Sk, H, Hk, H // Hk, scale, sm_scale, *margs, *sargs,
                **consts, SCORE_BWD=score_bwd, **bflags, MASK_BLOCK=mb, EVEN=even, BLOCK_M=c.block_m1,
                BLOCK_N=c.block_n1, BLOCK_D=bd, HEAD_DIM=D, UPCAST=up, num_warps=c.num_warps1,
                num_stages=c.num_stages1,
            )  # fmt: skip

        _fit(("dkdv", arch, q.dtype, D, mb, score_name), cfg, mb, dkdv)
        kvlists, kvstrides, bflags = _lists(bm, "kv", q.device)
        has_grad = grad is not None
        gname = score_name if has_grad else "no"

        def dqp(c: BwdConfig) -> None:
            go(_DQ, (B * H, _cdiv(Sq, c.block_m2)),
                q, k, v, dout, dq, lse, delta, *kvlists,
                q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
                v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
                dq.stride(0), dq.stride(1), dq.stride(2), *kvstrides,
                Sq, Sk, H, H // Hk, scale, sm_scale, *margs, *sargs, grad if has_grad else 0,
                **consts, SCORE_BWD=score_bwd, SCORE_GRAD=getattr(K, f"{gname}_grad"),
                SCORE_GRAD_END=getattr(K, f"{gname}_grad_end"), GRAD=has_grad, **bflags, MASK_BLOCK=mb, EVEN=even,
                BLOCK_M=c.block_m2, BLOCK_N=c.block_n2, BLOCK_D=bd, HEAD_DIM=D, UPCAST=up,
                num_warps=c.num_warps2, num_stages=c.num_stages2,
            )  # fmt: skip

        if has_grad:  # a retry after OutOfResources must not add the gradient twice
            _fit(("dq", arch, q.dtype, D, mb, gname), cfg, mb, lambda c: (grad.zero_(), dqp(c)))
        else:
            _fit(("dq", arch, q.dtype, D, mb, gname), cfg, mb, dqp)
    if key is not None:
        _bwd_record(call, key, entry, launched)
    return result()


# Flex backward plans (issues 16 and 18), as the forward's (``hopper.flex._PLANS``) and the built-in
# kernels' (``triton.launch._PLANS``): per block mask and signature, the route, and on the Triton
# route the three launches, prepared (``FastKernel.prepare``) at the signature's first reuse, so a
# repeated call allocates its outputs and launches. The key holds every call field the route
# reads, the dtypes, device, shapes and strides, and the two environment switches; an entry holds
# the block mask's mask_mod, the score_mod and their Triton versions (checked with ``is``: the
# launches keep the mods' tensor arguments). Calls whose score_mod captures a tensor are not
# planned. An entry's last item: "gluon", the prepared (pre, dkdv, dq) launches, _PENDING (made,
# not yet prepared) or None (not preparable: the Triton route, unplanned); its first item the mods.
_BWD_PLANS = PerBlockMask(64)
_PENDING = object()


def _bwd_key(dout, q, k, v, out, lse, call: AttnCall) -> tuple:
    env = os.environ.get
    return (id(call.score_mod), call.softmax_scale, call.deterministic, call.window_left, call.window_right,
            call.softcap, call.dropout_p, call.cu_seqlens_q is None, call.alibi_slopes is None, q.dtype, dout.dtype,
            q.device, q.shape, k.shape, v.shape, q.stride(), k.stride(), v.stride(), dout.stride(), out.stride(),
            lse.stride(), env(FLEX_GLUON_ENV), env("FLASHTILE_FLEX_BWD"))  # fmt: skip


def _mods_of(call: AttnCall) -> tuple:
    mm = None if call.block_mask is None else call.block_mask.mask_mod
    return mm, call.score_mod, _twin(mm), _twin(call.score_mod)


def _bwd_entry(call: AttnCall, key: tuple) -> tuple | None:
    bm = call.block_mask
    entry = _BWD_PLANS.peek(bm, key, None if bm is None else bm.q_num_blocks)
    if entry is None or any(a is not b for a, b in zip(entry[0], _mods_of(call), strict=True)):
        return None
    return entry


def _bwd_put(call: AttnCall, key: tuple, plan) -> None:
    bm = call.block_mask
    _BWD_PLANS.put(bm, key, None if bm is None else bm.q_num_blocks, (_mods_of(call), plan))


def _bwd_record(call: AttnCall, key: tuple, entry, launched: dict) -> None:
    """After an unplanned Triton-route backward: a pending plan at a signature's first call, the
    prepared launches at its first reuse (None where one cannot be prepared)."""
    if entry is None:
        _bwd_put(call, key, _PENDING)
    elif entry[1] is _PENDING:
        preps = None
        if len(launched) == 3:
            preps = tuple(kern.prepare(*launched[kern], lead, keep=True) for kern, lead in ((_PRE, 3), (_DKDV, 8),
                                                                                          (_DQ, 7)))  # fmt: skip
            preps = None if None in preps else preps
        _bwd_put(call, key, preps)


def _run_planned(preps: tuple, dout, q, k, v, out, lse) -> tuple:
    """A planned Triton-route backward: outputs allocated as the unplanned path does, three prepared launches."""
    p_pre, p_dkdv, p_dq = preps
    B, Sq, H, _ = q.shape
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    with _guard(q.device):
        p_pre(out, dout, delta)
        p_dkdv(q, k, v, dout, dk, dv, lse, delta)
        p_dq(q, k, v, dout, dq, lse, delta)
    return dq, dk, dv, {}


__all__ = ["FlexFwdConfig", "backward", "bwd_cfg", "forward", "fwd_cfg", "mod_bwd_cfg"]
