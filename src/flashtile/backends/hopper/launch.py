"""Host side of the Hopper backend: TMA descriptors, grid and config -> Gluon kernel launch.

Works on the internal layout of :mod:`flashtile.backends.base` (dense ``(B, S, H, D)``;
varlen ``(1, total, H, D)`` with ``cu_seqlens``). Imports Triton and Gluon: import it only
once :meth:`HopperBackend.available` said yes.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import fields, replace

import torch
import triton
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ...spec import AttnCall
from .. import _device
from .. import base as _base
from .._ints import cdiv
from ..triton.fastlaunch import fast
from ..triton.launch import _plannable, device_guard, forward_outputs, score_scales
from . import configs
from .configs import HopperConfig
from .fwd import attn_fwd_persistent, attn_fwd_plain, attn_fwd_ws
from .fwd_fp8 import attn_fwd_persistent_fp8, attn_fwd_ws_fp8
from .sched import schedule
from .vt import key_perm32

# The Gluon kernels through the lean launch path (issue 16; host TensorDescriptors are keyed as Triton
# specialises them, see fastlaunch._desc_key).
_PLAIN, _WS, _PERSISTENT, _WS_FP8, _PERSISTENT_FP8 = (
    fast(k) for k in (attn_fwd_plain, attn_fwd_ws, attn_fwd_persistent, attn_fwd_ws_fp8, attn_fwd_persistent_fp8)
)

# (schedule key, device) -> (codes, offsets) int32 tensors of the persistent kernel's schedule
_SCHEDULES: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}


def swizzle_bytes(headdim: int, elem_bytes: int = 2) -> int:
    """The NVMMA swizzle width of a ``[rows, headdim]`` tile: the largest of 128/64/32 bytes that
    divides a row (what ``NVMMASharedLayout.get_default_for`` picks for these tiles)."""
    row = headdim * elem_bytes
    for sw in (128, 64, 32):
        if row % sw == 0:
            return sw
    return 0


def tma_compatible(t: torch.Tensor) -> bool:
    """Whether TMA can read ``t`` as it is: 16-byte aligned base, unit last stride, every other
    stride a positive multiple of 16 bytes."""
    es = t.element_size()
    if t.data_ptr() % 16 or t.stride(-1) != 1:
        return False
    return all(s > 0 and (s * es) % 16 == 0 for s in t.stride()[:-1])


def tma_ready(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if TMA can read it (:func:`tma_compatible`), else a contiguous copy (a fresh
    allocation: 16-byte aligned also where ``t`` was contiguous but its base was not, which
    ``contiguous()`` would have returned as it is)."""
    return t if tma_compatible(t) else t.clone(memory_format=torch.contiguous_format)


def _descriptor(t: torch.Tensor, rows: int, varlen: bool) -> TensorDescriptor:
    """Descriptor of ``t`` (``(B, S, H, D)``) for ``[rows, BLOCK_D]`` tiles of one head: 4-D with
    blocks ``[1, rows, 1, BLOCK_D]`` (dense: bounds per batch), or 3-D over ``t[0]`` with blocks
    ``[rows, 1, BLOCK_D]`` (varlen: bounds are the whole packed tensor). ``BLOCK_D`` > D (d = 96,
    192): TMA zero-fills the extra columns on loads and clips them on stores."""
    d = configs.block_d(t.shape[-1])
    es = t.element_size()
    if varlen:
        x = t[0]
        return descriptor(x, x.shape, x.stride(), (rows, 1, d), nvmma_layout(swizzle_bytes(d, es), es, 3))
    return descriptor(t, t.shape, t.stride(), (1, rows, 1, d), nvmma_layout(swizzle_bytes(d, es), es, 4))


# Descriptor templates (issue 16): Triton's TensorDescriptor validates its fields in __post_init__
# (rank, 16-byte aligned base, power-of-2 block, 16-byte strides, positive shape, unit last stride,
# layout, padding): ~12 us a descriptor on the H200 host, four per forward. Everything it checks
# but the base's alignment is a function of (dtype, shape, strides, block shape, layout), so a
# descriptor is built by the constructor once per such key, and later ones of the key are copies of
# its fields with another base whose alignment is checked here. Only where the class is a plain
# dataclass whose instances hold exactly its fields (no state derived in __post_init__), in the
# Triton versions read for it (3.6: the H200's; 3.9): elsewhere every descriptor takes the constructor.
_TD_VERSIONS = ("3.6", "3.9")
_TD_FIELDS = tuple(f.name for f in dataclasses.fields(TensorDescriptor)) if dataclasses.is_dataclass(
    TensorDescriptor) else ()  # fmt: skip
CHEAP_DESCRIPTORS = ".".join(triton.__version__.split(".")[:2]) in _TD_VERSIONS and "base" in _TD_FIELDS \
    and "__slots__" not in vars(TensorDescriptor)  # fmt: skip
#: The lean host path of the Gluon launches (descriptor templates, launch plans, prepared launches,
#: runners offered to the entry points): ``FLASHTILE_HOPPER_LEAN=0`` at import turns it off; A/B
#: comparisons in one process set this attribute (plans made while on are then not used).
LEAN = os.environ.get("FLASHTILE_HOPPER_LEAN", "1").strip().lower() not in ("0", "false", "off", "no")
#: (dtype, shape, strides, block shape, layout) -> the fields of a descriptor the constructor validated
_TEMPLATES: dict[tuple, dict] = {}
_new = object.__new__


def descriptor(t: torch.Tensor, shape, strides, block: tuple, layout) -> TensorDescriptor:
    """``TensorDescriptor(t, list(shape), list(strides), list(block), layout)``, validated by its
    constructor once per (dtype, shape, strides, block, layout) and copied from that one's fields
    afterwards (see above; its lists are shared between the copies: the launcher only reads them)."""
    if not (LEAN and CHEAP_DESCRIPTORS):
        return TensorDescriptor(t, list(shape), list(strides), list(block), layout)
    key = (t.dtype, tuple(shape), tuple(strides), block, layout)
    tpl = _TEMPLATES.get(key)
    if tpl is not None and not t.data_ptr() & 15:
        d = _new(TensorDescriptor)
        d.__dict__ = {**tpl, "base": t}
        return d
    d = TensorDescriptor(t, list(shape), list(strides), list(block), layout)
    if tuple(vars(d)) == _TD_FIELDS:  # nothing else kept on the instance: its fields say it all
        if len(_TEMPLATES) >= 1024:
            _TEMPLATES.clear()
        _TEMPLATES[key] = {**vars(d), "base": None}
    return d


def _template(t: torch.Tensor, rows: int) -> dict | None:
    """The template of :func:`_descriptor`'s dense descriptor of ``t`` (None where there is none)."""
    d = configs.block_d(t.shape[-1])
    es = t.element_size()
    return _TEMPLATES.get((t.dtype, tuple(t.shape), tuple(t.stride()), (1, rows, 1, d),
                           nvmma_layout(swizzle_bytes(d, es), es, 4)))  # fmt: skip


@functools.lru_cache(maxsize=64)
def nvmma_layout(swizzle: int, elem_bytes: int, rank: int) -> gl.NVMMASharedLayout:
    """The shared layout of a TMA tile (a frozen value, built once: ~6 us each on a slow CPU)."""
    return gl.NVMMASharedLayout(swizzle_byte_width=swizzle, element_bitwidth=8 * elem_bytes, rank=rank)


def _check_launch(call: AttnCall, lse: torch.Tensor, cfg, headdim: int, check, what: str) -> None:
    """What every forward launch needs: a positive scale, int32-indexable lse, a config that fits
    (``check(cfg, headdim)``, named ``what`` in the error)."""
    if not call.softmax_scale > 0:
        raise ValueError(f"flashtile hopper: softmax_scale must be > 0, got {call.softmax_scale}")
    if lse.numel() >= 2**31:
        raise ValueError(f"flashtile hopper: lse has {lse.numel()} elements; the kernels index it with int32")
    bad = check(cfg, headdim)
    if bad:
        raise ValueError(f"flashtile hopper: {what} {cfg} for head dim {headdim}: {bad}")


# Launch plans of the dense forward (issue 16, as the Triton backend's ``launch._PLANS``): per
# signature -- the call (by id, kept in the entry and checked with ``is``; only calls holding no
# tensor, see triton's ``_plannable``), the dtypes and device, the shapes and strides of q, k, v --
# what a launch derives from it: the config, grid, every non-tensor argument, the persistent
# kernel's schedule, the descriptors' templates, the compiled kernel (``FastKernel.prepare``). A
# plan is made at a signature's first call and prepared at its first reuse; from then on a call
# allocates out and lse, copies four descriptors from their templates and launches. Only inputs TMA
# reads as they are (no copies) and with 16-byte aligned bases are planned (checked per call).
_PLANS: dict[tuple, tuple] = {}
_PLANS_MAX = 512
_PENDING = object()
#: replaced by clear_plans(): runners made before then decline
_EPOCH = object()


def keep_plan(key: tuple, plan: tuple) -> None:
    """Keep a launch plan (forward or backward: ``launch_bwd``'s keys start with "bwd"), forgetting
    them all when the store is full."""
    if len(_PLANS) >= _PLANS_MAX and key not in _PLANS:
        _PLANS.clear()
    _PLANS[key] = plan


def clear_plans() -> None:
    """Forget every launch plan and the runners made from them (code that changes the config
    tables at run time calls it)."""
    global _EPOCH
    _PLANS.clear()
    _EPOCH = object()


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    call: AttnCall,
    *,
    config: HopperConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) on the internal layout: out like q, lse float32 ``(B, H, Sq)`` (varlen
    ``(1, H, total_q)``) in natural log, -inf (out 0) on rows that see no key. ``config``
    overrides the table (benchmark sweeps)."""
    if q.dtype == torch.float8_e4m3fn:
        return forward_fp8(q, k, v, call, config=config)
    key = plan = None
    if config is None and LEAN:
        key = (id(call), q.dtype, k.dtype, v.dtype, q.device, q.shape, k.shape, v.shape, q.stride(), k.stride(),
               v.stride())  # fmt: skip
        plan = _PLANS.get(key)
        if plan is not None and plan[0] is call:
            run = plan[1]
            if run is not _PENDING and run is not None:  # (None: the launch could not be prepared)
                res = run(q, k, v)
                if res is not None:
                    if _base.OFFERS is not None:  # an entry point records: it may keep the runner
                        _base.OFFERS.append(((q, k, v), res, run))
                    return res
            elif run is _PENDING and not (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15:  # first reuse
                out, lse, kern, grid, args, kw, lead = _launch_args(q, k, v, call, None)
                with device_guard(q.device):
                    kern[grid](*args, **kw)
                prep = kern.prepare(grid, args, kw, lead, descs=4)
                _PLANS[key] = (call, None if prep is None else _runner(out, lse, prep, args[:4], args[6:lead]))
                return out, lse
    out, lse, kern, grid, args, kw, lead = _launch_args(q, k, v, call, config)
    if kern is None:
        return out, lse
    with device_guard(q.device):
        kern[grid](*args, **kw)
    copied = args[0].base is not q or args[1].base is not k or args[2].base is not v  # (TMA needed copies)
    if key is not None and (plan is None or plan[0] is not call) and _plannable(call) and not call.varlen \
            and not copied:  # fmt: skip
        keep_plan(key, (call, _PENDING))
    return out, lse


def _launch_args(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall, config: HopperConfig | None):
    """``(out, lse, kernel, grid, args, kwargs, lead)`` of a dense forward launch (kernel None: the
    problem is empty and (out, lse) final); ``args[:lead]`` are the descriptors, out, lse and the
    persistent kernel's schedule (what changes per call or is a tensor), the rest of ``args`` and
    ``kwargs`` depend on the signature only."""
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    out, lse, geo = forward_outputs(q, k, call)
    if geo is None:
        return out, lse, None, None, None, None, 0
    varlen, nb, _, _, rows_q, _ = geo
    cfg = config or configs.config_for(D, causal=call.window_right >= 0, seqlen_q=rows_q)
    _check_launch(call, lse, cfg, D, configs.check, "config")
    if varlen and cfg.kernel == "persistent":  # the host knows no sequence lengths to schedule
        cfg = replace(cfg, kernel="ws")
    q, k, v = (tma_ready(x) for x in (q, k, v))
    qk_scale, cap_out = score_scales(call)
    descs = (_descriptor(q, cfg.q_rows, varlen), _descriptor(k, cfg.block_n, varlen),
             _descriptor(v, cfg.block_n, varlen), _descriptor(out, cfg.q_rows, varlen))  # fmt: skip
    consts = dict(
        HEAD_DIM=D, BLOCK_D=configs.block_d(D), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NUM_STAGES=cfg.num_stages,
        HAS_WL=call.window_left >= 0, HAS_WR=call.window_right >= 0, HAS_SOFTCAP=call.softcap > 0,
        IS_VARLEN=varlen, REVERSE_M=call.window_right >= 0, num_warps=cfg.num_warps,
    )  # fmt: skip
    ws_kw = dict(CONSUMER_REGS=cfg.consumer_regs, PRODUCER_REGS=cfg.producer_regs, NUM_CONSUMERS=cfg.consumers,
                 WAIT_FENCE=bool(cfg.wait_fence))  # (the ws and persistent kernels')
    if cfg.kernel == "persistent":
        tiles, offs = _schedule_tensors(q.device, B, H, Sq, Sk, cfg, call)
        for name in ("IS_VARLEN", "REVERSE_M"):
            consts.pop(name)
        args = (
            *descs, out, lse, tiles, offs,
            out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
            Sq, Sk, H // Hk, cdiv(Sq, cfg.block_m), H, qk_scale, cap_out,
            call.window_left, call.window_right,
        )  # fmt: skip
        return out, lse, _PERSISTENT, (offs.shape[0] - 1,), args, dict(**ws_kw, **consts), 8
    args = (
        *descs, out, lse, call.cu_seqlens_q, call.cu_seqlens_k,
        out.stride(1), out.stride(2), 0 if varlen else lse.stride(0), lse.stride(1),
        Sq, Sk, H // Hk, qk_scale, cap_out, call.window_left, call.window_right,
    )  # fmt: skip
    grid = (cdiv(rows_q, cfg.block_m), H, nb)
    if cfg.kernel == "plain":
        return out, lse, _PLAIN, grid, args, consts, 6
    return out, lse, _WS, grid, args, dict(**ws_kw, **consts), 6


def _runner(out: torch.Tensor, lse: torch.Tensor, prep, descs: tuple, extra: tuple):
    """A plan's runner (see :data:`flashtile.backends.base.OFFERS`): ``run(q, k, v)`` allocates out
    and lse, makes the four descriptors as ``descs`` (this launch's) with the new bases, and
    launches the prepared kernel (``extra``: the persistent kernel's schedule); None, launching
    nothing, when the plans were cleared, the lean path was turned off or a base is not 16-byte
    aligned (the caller's full path then decides: copies)."""
    epoch, empty, f32, dev, dtype = _EPOCH, torch.empty, torch.float32, out.device, out.dtype
    out_shape, lse_shape = tuple(out.shape), tuple(lse.shape)
    cheap = CHEAP_DESCRIPTORS and all(tuple(vars(d)) == _TD_FIELDS for d in descs)
    if cheap:  # the fields of descriptors the constructor validated (see descriptor())
        tq, tk, tv, to = ({**vars(d), "base": None} for d in descs)
    else:
        specs = tuple((tuple(d.shape), tuple(d.strides), tuple(d.block_shape), d.layout) for d in descs)
    new, TD = _new, TensorDescriptor
    from ..triton import launch_decode as ld

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, want_lse: bool = True) -> tuple | None:
        if _EPOCH is not epoch or not LEAN or (q.data_ptr() | k.data_ptr() | v.data_ptr()) & 15:
            return None
        out = empty(out_shape, dtype=dtype, device=dev)
        lse = empty(lse_shape, dtype=f32, device=dev) if want_lse else ld.lse_sink(dev, lse_shape)
        if cheap:
            dq, dk, dv, do = new(TD), new(TD), new(TD), new(TD)
            dq.__dict__, dk.__dict__, dv.__dict__ = {**tq, "base": q}, {**tk, "base": k}, {**tv, "base": v}
            do.__dict__ = {**to, "base": out}
        else:
            dq, dk, dv, do = (TD(t, list(s[0]), list(s[1]), list(s[2]), s[3])
                              for t, s in zip((q, k, v, out), specs, strict=True))  # fmt: skip
        if not prep.go(dq, dk, dv, do, out, lse, *extra):  # another device current, a launch hook
            with device_guard(dev):
                prep(dq, dk, dv, do, out, lse, *extra)
        return out, lse

    run.prepared = prep  # (for tests and benchmarks: which launch it makes)
    return run


_PERM_IDX: dict[tuple[int, str], torch.Tensor] = {}


def transpose_v(v: torch.Tensor, varlen: bool) -> torch.Tensor:
    """V^T for the FP8 kernel, whose P V wgmma needs V with the keys contiguous: dense
    ``(B, Sk, Hk, D)`` -> ``(B, Hk, D, Sk_pad)`` with the keys of every 32-key chunk in the order
    :func:`key_perm32` (the kernel's P operand comes in that order), ``Sk_pad`` a multiple of 32;
    varlen ``(1, total, Hk, D)`` -> ``(Hk, D, total_pad)`` in key order, a multiple of 16. Padding
    keys are zeros (TMA strides are multiples of 16 bytes; the padding keys are masked, and zeros
    keep ``0 * v`` finite). On CUDA one Triton pass (:mod:`.vt`: coalesced reads of V's rows,
    transposed in the kernel); torch's strided copy took ~180-200 us for the benchmark's 32 MiB on
    the H200 (6-20% of an FP8 forward). Elsewhere (CPU tests) this torch version, the reference."""
    if v.is_cuda:  # one Triton pass (hopper/vt.py); the torch version below is the reference
        from .vt import transpose_v_kernel

        return transpose_v_kernel(v, varlen)
    x = v[0].permute(1, 2, 0) if varlen else v.permute(0, 2, 3, 1)  # (..., D, S)
    s = x.shape[-1]
    if varlen:
        sp = (s + 15) // 16 * 16
        vt = torch.empty((*x.shape[:-1], sp), dtype=v.dtype, device=v.device)
        vt[..., :s].copy_(x)
        if sp > s:
            vt[..., s:].zero_()
        return vt
    sp = (s + 31) // 32 * 32
    key = (s, str(v.device))
    idx = _PERM_IDX.get(key)
    if idx is None:
        base = torch.tensor(key_perm32(), dtype=torch.int64)
        idx = (torch.arange(0, sp, 32).view(-1, 1) + base.view(1, -1)).view(-1).clamp_(max=s - 1).to(v.device)
        if len(_PERM_IDX) > 64:
            _PERM_IDX.clear()
        _PERM_IDX[key] = idx
    raw = x.view(torch.uint8) if v.dtype.itemsize == 1 else x  # (gathers of float8 as bytes)
    vt = raw.index_select(-1, idx)
    if sp > s:  # positions holding padding keys (>= s) read key s - 1 above: zero them
        pad = torch.tensor(key_perm32(), device=v.device) + (sp - 32) >= s
        tail = vt[..., sp - 32:]
        tail.masked_fill_(pad, 0)
    return vt.view(v.dtype) if v.dtype.itemsize == 1 else vt


#: Debug: an int64 CUDA tensor ``[programs, consumers, cap, 8]`` makes the FP8 kernel record per key block
#: the ``%clock64`` stamps of its first ``programs`` query tiles of head 0, batch 0
#: (:func:`.fwd_fp8.attn_fwd_ws_fp8`'s ``TRACE``; ``benchmarks/fp8_trace.py``); None (the default): off.
FP8_TRACE: torch.Tensor | None = None


def forward_fp8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    call: AttnCall,
    *,
    config: HopperConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of an FP8 (e4m3) call on the internal layout, out bf16 (see :mod:`.fwd_fp8`):
    the ``ws`` kernel with both products in FP8 wgmma; ``config`` overrides the FP8 table."""
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    out, lse, geo = forward_outputs(q, k, call)
    if geo is None:
        return out.to(torch.bfloat16), lse
    out = torch.empty(q.shape, dtype=torch.bfloat16, device=q.device)
    varlen, nb, _, _, rows_q, _ = geo
    cfg = config or configs.fp8_config_for(D, causal=call.window_right >= 0, seqlen_q=rows_q)
    _check_launch(call, lse, cfg, D, configs.check_fp8, "FP8 config")
    q, k = (tma_ready(x) for x in (q, k))
    vt = transpose_v(v, varlen)
    qk_scale, cap_out = score_scales(call)
    bd = configs.block_d(D)
    vt_layout = gl.NVMMASharedLayout(swizzle_byte_width=swizzle_bytes(cfg.block_n, 1), element_bitwidth=8,
                                     rank=vt.dim())  # fmt: skip
    vt_block = [1, bd, cfg.block_n] if varlen else [1, 1, bd, cfg.block_n]
    vt_desc = TensorDescriptor(vt, list(vt.shape), list(vt.stride()), vt_block, vt_layout)
    q_desc = _descriptor(q, cfg.q_rows, varlen)
    k_desc = _descriptor(k, cfg.block_n, varlen)
    o_desc = _descriptor(out, cfg.q_rows, varlen)
    descales, strides = [], []
    for d in (call.q_descale, call.k_descale, call.v_descale):
        descales.append(d)
        strides += [0, 0] if d is None else [d.stride(0), d.stride(1)]
    consts = dict(
        HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NUM_STAGES=cfg.num_stages,
        HAS_WL=call.window_left >= 0, HAS_WR=call.window_right >= 0, HAS_SOFTCAP=call.softcap > 0,
        CONSUMER_REGS=cfg.consumer_regs, PRODUCER_REGS=cfg.producer_regs, num_warps=cfg.num_warps,
        **configs.fp8_flags(cfg),
    )  # fmt: skip
    if getattr(cfg, "persistent", 0) and not varlen and FP8_TRACE is None:
        tiles, offs = _schedule_tensors(q.device, B, H, Sq, Sk, cfg, call)
        with device_guard(q.device):
            _PERSISTENT_FP8[(offs.shape[0] - 1,)](
                q_desc, k_desc, vt_desc, o_desc, out, lse, tiles, offs, *descales, *strides,
                out.stride(1), out.stride(2), lse.stride(0), lse.stride(1),
                Sq, Sk, H // Hk, cdiv(Sq, cfg.block_m), H, qk_scale, cap_out, call.window_left, call.window_right,
                Q_BUFS=configs.fp8_q_buffers(cfg, D), **consts,
            )  # fmt: skip
        return out, lse
    grid = (cdiv(rows_q, cfg.block_m), H, nb)
    extra = {}
    if FP8_TRACE is not None:  # (debug: benchmarks/fp8_trace.py)
        extra = dict(TRACE_BUF=FP8_TRACE, TRACE_CAP=FP8_TRACE.shape[2], TRACE_PROGS=FP8_TRACE.shape[0], TRACE=True)
    with device_guard(q.device):
        _WS_FP8[grid](
            q_desc, k_desc, vt_desc, o_desc, out, lse, call.cu_seqlens_q, call.cu_seqlens_k, *descales, *strides,
            out.stride(1), out.stride(2), 0 if varlen else lse.stride(0), lse.stride(1),
            Sq, Sk, H // Hk, qk_scale, cap_out, call.window_left, call.window_right,
            IS_VARLEN=varlen, REVERSE_M=call.window_right >= 0, **consts, **extra,
        )  # fmt: skip
    return out, lse


def _schedule_tensors(
    device: torch.device, B: int, H: int, Sq: int, Sk: int, cfg: HopperConfig, call: AttnCall
) -> tuple[torch.Tensor, torch.Tensor]:
    """The persistent kernel's tile schedule (:func:`.sched.schedule`, one program per SM) as
    int32 device tensors, built once per shape and device."""
    info = _device.info(device)
    n_programs = info.sm_count if info is not None else 132
    key = (B, H, Sq, Sk, cfg.block_m, cfg.block_n, call.window_left, call.window_right, n_programs)
    found = _SCHEDULES.get((key, device))
    if found is None:
        codes, offsets = schedule(*key)
        found = (torch.tensor(codes, dtype=torch.int32, device=device),
                 torch.tensor(offsets, dtype=torch.int32, device=device))  # fmt: skip
        if len(_SCHEDULES) > 256:
            _SCHEDULES.clear()
        _SCHEDULES[(key, device)] = found
    return found


def describe(headdim: int) -> str:
    """One line naming the config a call with this head dim uses (for ``flashtile env``)."""
    extra = f", bwd {configs.bwd_config(headdim)}; fp8: {configs.fp8_config(headdim)}"
    table, open_cfg = configs.fp8_config(headdim), configs.fp8_config_for(headdim, causal=False, seqlen_q=1 << 30)
    changed = [f"{f.name}={getattr(open_cfg, f.name)}" for f in fields(open_cfg)  # (the rule's, not spelled here)
               if getattr(open_cfg, f.name) != getattr(table, f.name)]
    if changed:
        extra += f" ({', '.join(changed)} on calls without a right window)"
    if headdim == 64:
        two = configs.fp8_config_for(64, causal=True, seqlen_q=0)
        extra += f" (causal calls shorter than {configs.D64_CAUSAL_THREE_CONSUMERS_FROM}: {two})"
        return (f"sm90 gluon: {configs.config_for(64, causal=False, seqlen_q=0)} (causal calls shorter than "
                f"{configs.D64_CAUSAL_THREE_CONSUMERS_FROM} rows: {configs.config(64)}){extra}")  # fmt: skip
    return f"sm90 gluon: {configs.config(headdim)}{extra}"


__all__ = ["forward", "forward_fp8", "describe", "swizzle_bytes", "transpose_v", "tma_compatible", "tma_ready"]
