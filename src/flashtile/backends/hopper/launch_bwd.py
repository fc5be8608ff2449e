"""Host side of the Hopper backward: preprocess, the Gluon dK/dV/dQ kernel, dQ conversion.

Works on the internal layout of :mod:`flashtile.backends.base` (dense ``(B, S, H, D)``; varlen
``(1, total, H, D)`` with ``cu_seqlens``). Imports Triton and Gluon: import it only once
:meth:`HopperBackend.available` said yes.

Steps:

1. ``delta = rowsum(dO * O)`` (float32, lse's shape): the Triton backend's preprocess kernel.
2. :func:`.bwd.attn_bwd_ws` (config ``kernel="ws"``: two compute warpgroups and a worker
   warpgroup for the loads and the dQ reductions) or :func:`.bwd.attn_bwd` (``"plain"``: one
   8-warp partition), one program per (key block, KV head, batch or sequence): dK and dV
   written directly; dQ (unscaled) added with fp32 atomics into a zeroed ``(B, Sq, H, BLOCK_D)``
   buffer (``call.deterministic=False``).
3. dQ conversion: ``dq = scale * acc[..., :D]`` in q's dtype (one Triton pass, :mod:`.dq`); with the
   persistent kernel's split tail (``HopperBwdConfig.tail``, :func:`.sched.tail_split`) first the tail
   tiles' fp32 dK / dV sums into dK / dV (:func:`.dq.dkdv_tail`).

``call.deterministic=True`` (or a config with ``atomic_dq=0``): atomics make the order of the
dQ additions vary from run to run,
so the Gluon kernel runs without them (``ATOMIC_DQ=False``: dK/dV only, which are written by
one program each and so reproducible) and dQ comes from the Triton backend's dQ kernel (one
program per query block, summing key blocks in a fixed order): bitwise reproducible, at the cost
of recomputing S and dP once more.

Flex block masks (:func:`flex_backward`): the same launch with the ws kernel's block-list mode
(``LIST_SUBS``, ``MASK_MOD``: see :func:`.bwd.attn_bwd_ws`), the block mask's transposed lists merged
once per block mask by :func:`flex_lists`.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from ...flex import PerBlockMask
from ...spec import AttnCall
from .. import _device
from .._ints import cdiv
from ..triton import configs as triton_configs
from ..triton.fastlaunch import fast
from ..triton.launch import _BWD_DQ as _bwd_dq_kernel  # the kernels' lean launch wrappers (issue 16)
from ..triton.launch import _BWD_PRE as _bwd_preprocess
from ..triton.launch import _flags, _geometry, _plannable, _scalars, arch, device_guard, score_scales
from . import bwd, configs, sched
from . import launch as HL
from .configs import HopperBwdConfig
from .dq import _dkdv_tail_kernel, _dq_kernel, convert_dq, dkdv_tail, dkdv_tail_launch, dq_launch
from .launch import _check_launch, _descriptor, tma_ready

# the Gluon kernels (and the dQ conversion) on the lean launch path too
attn_bwd, attn_bwd_ws, _dq_fast = fast(bwd.attn_bwd), fast(bwd.attn_bwd_ws), fast(_dq_kernel)
attn_bwd_ws_persistent, _dkdv_fast = fast(bwd.attn_bwd_ws_persistent), fast(_dkdv_tail_kernel)


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (the persistent backward's grid; as the forward's)."""
    info = _device.info(device)
    return info.sm_count if info is not None else 132


def _convert_dq(acc: torch.Tensor, dq: torch.Tensor, scale: float) -> None:
    """``dq = scale * acc[..., :D]`` in one pass (:func:`.dq.convert_dq`, on the lean launch)."""
    convert_dq(acc, dq, scale, kernel=_dq_fast)


#: Debug: an int64 tensor ``(SMs, cap, 6)`` (zeroed by the caller) makes the persistent backward
#: record its tiles (see :func:`.bwd.attn_bwd_ws_persistent`'s ``TRACE``); None (the default): off.
TRACE: torch.Tensor | None = None


def _accumulator(shape: tuple, device: torch.device, counter: bool,
                 tail: tuple = ()) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:  # fmt: skip
    """The zeroed fp32 dQ accumulator of ``shape``, with ``counter`` the persistent kernel's int32 tile
    counter (zero) behind it, and with a ``tail`` shape the split tail's fp32 workspace (zero) behind
    that, else None: one memset for all (16-byte aligned: the accumulator's rows are BLOCK_D wide)."""
    n, m, c = math.prod(shape), math.prod(tail) if tail else 0, 4 if counter else 0
    buf = torch.zeros(n + c + m, dtype=torch.float32, device=device)
    ws = buf[n + c :].view(tail) if tail else None
    return buf[:n].view(shape), buf[n : n + 1].view(torch.int32) if counter else None, ws


def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    call: AttnCall,
    *,
    config: HopperBwdConfig | None = None,
    lists: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) shaped and typed like (q, k, v). ``config`` overrides the table (sweeps).
    ``lists``: the block-list mode's kernel arguments (:func:`flex_backward`). With :data:`PLANS`
    on, a dense call without either is planned (see the comment above it)."""
    key = plan = None
    if PLANS and config is None and lists is None and HL.LEAN:
        key = ("bwd", id(call), q.dtype, dout.dtype, out.dtype, q.device, q.shape, k.shape, v.shape, q.stride(),
               k.stride(), v.stride(), dout.stride(), out.stride(), lse.stride())  # fmt: skip
        plan = HL._PLANS.get(key)
        if plan is not None and plan[0] is call and plan[1] is not _PENDING and plan[1] is not None:
            res = plan[1](dout, q, k, v, out, lse)
            if res is not None:
                return res
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    varlen, nb, seqlen_q, seqlen_k, rows_q, rows_k = _geometry(q, k, call)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if nb == 0 or q.numel() == 0 or k.numel() == 0 or rows_q == 0 or rows_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    cfg = config or configs.bwd_config(D, call.window_left >= 0 or call.window_right >= 0)
    _check_launch(call, lse, cfg, D, configs.bwd_check, "backward config")
    inputs = (q, k, v, dout, out, lse)
    q, k, v, dout = (tma_ready(x) for x in (q, k, v, dout))
    if out.stride(-1) != 1:
        out = out.contiguous()
    lse = lse.contiguous()
    copied = any(a is not b for a, b in zip(inputs, (q, k, v, dout, out, lse), strict=True))
    delta = torch.empty_like(lse)
    bd = configs.block_d(D)
    atomic = bool(cfg.atomic_dq) and not call.deterministic
    if lists is not None and not (atomic and cfg.kernel == "ws" and cfg.swap):
        raise ValueError("flashtile hopper: the block-list mode needs the ws kernel with swap and atomic dQ")
    # fp32 dQ accumulator, BLOCK_D wide and BLOCK_M rows longer: the kernel's atomics need no
    # masks (rows past a sequence add exact zeros)
    # persistent (dense ws calls): one program per SM over the n_kb * Hk * B key-block tiles, each
    # program taking the next free tile from a zeroed int32 counter as it finishes one
    persistent = bool(cfg.persistent) and cfg.kernel == "ws" and not varlen and lists is None
    n_kb = cdiv(rows_k, cfg.block_n)
    n_tiles, n_prog, n_mb = n_kb * Hk * nb, (_sm_count(q.device) if persistent else 0), cdiv(Sq, cfg.block_m)
    # the split tail (tiles of one cost: no mask or window; atomic dQ, whose order varies anyway)
    n_split = sched.tail_split(n_tiles, n_prog, n_mb) if (
        persistent and atomic and cfg.tail and call.window_left < 0 and call.window_right < 0) else 0
    tail = (n_split, 2, cfg.block_n, bd) if n_split else ()
    ws_tail = None
    if atomic:
        dq_acc, ctr, ws_tail = _accumulator((B, Sq + cfg.block_m, H, bd), q.device, persistent, tail)
    else:
        dq_acc, ctr = dq, torch.zeros(1, dtype=torch.int32, device=q.device) if persistent else None
    qk_scale, cap_out = score_scales(call)
    stride_lb = 0 if varlen else lse.stride(0)

    with device_guard(q.device):
        pre_m = 64
        pre = ((cdiv(Sq, pre_m), H, B), (
            out, dout, delta,
            out.stride(0), out.stride(1), out.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            delta.stride(0), delta.stride(1), Sq,
        ), dict(HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=pre_m))  # fmt: skip
        _bwd_preprocess[pre[0]](*pre[1], **pre[2])
        descs = [_descriptor(q, cfg.block_m, varlen), _descriptor(k, cfg.block_n, varlen),
                 _descriptor(v, cfg.block_n, varlen), _descriptor(dout, cfg.block_m, varlen)]  # fmt: skip
        # (ws2: the default partition is one compute warpgroup)
        extra = cfg.kernel_consts(D, softcap=call.softcap > 0)
        ws = cfg.kernel in ("ws", "ws2")
        kernel = attn_bwd_ws if ws else attn_bwd
        if extra.get("STAT_RING"):  # fold's starting values -lse / scale: not with a zero scale
            extra["FOLD"] = extra["FOLD"] and qk_scale != 0
            extra["stat_mul"] = -1.0 / qk_scale if extra["FOLD"] else 1.0
        if ws:  # the dQ accumulator's [block_m, BLOCK_D] fp32 tiles, added by TMA (DQ_TMA), else None
            extra["DQ_TMA"] = bool(extra["DQ_TMA"]) and atomic
            extra["NBAR"] = extra["NBAR"] if atomic else 0  # (no dQ hand-off to the worker without atomics)
            descs.append(_descriptor(dq_acc, cfg.block_m, varlen) if extra["DQ_TMA"] else None)
        # causal / right window: key block 0 of every head first (longest first); grid y / z <= 65535
        lpt = bool(cfg.lpt) and call.window_right >= 0 and nb <= 65535 and n_kb <= 65535 and lists is None
        grid = (Hk, nb, n_kb) if lpt else (n_kb, Hk, nb)
        if persistent:
            kernel = attn_bwd_ws_persistent
            # causal / right window: the long tiles first (head_group pairs at a time, 0: all)
            group = (cfg.head_group or Hk * nb) if call.window_right >= 0 else 1
            extra.update(n_kb=n_kb, n_hk=Hk, n_tiles=n_tiles, head_group=min(group, Hk * nb))
            if n_split:
                extra.update(t_full=n_tiles - n_split, n_split=n_split, split_mb=n_mb, TAIL=True)
            if TRACE is not None:  # (debug: benchmarks/bwd_tile_trace.py)
                extra.update(TRACE_BUF=TRACE, TRACE_CAP=TRACE.shape[1], TRACE=True)
            grid = (min(n_tiles, n_prog),)
        main = (grid, (
            *descs, dq_acc, dk, dv, lse, delta, *((ctr, ws_tail) if persistent else ()), call.cu_seqlens_q,
            call.cu_seqlens_k,
            0 if varlen else dq_acc.stride(0), dq_acc.stride(1), dq_acc.stride(2),
            0 if varlen else dk.stride(0), dk.stride(1), dk.stride(2), stride_lb, lse.stride(1),
            Sq, Sk, H // Hk, qk_scale, cap_out, call.softmax_scale, call.window_left, call.window_right,
        ), dict(
            HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NUM_STAGES=cfg.num_stages,
            HAS_WL=call.window_left >= 0, HAS_WR=call.window_right >= 0, HAS_SOFTCAP=call.softcap > 0,
            IS_VARLEN=varlen, ATOMIC_DQ=atomic, LPT=lpt, **extra, **(lists or {}),
        ))  # fmt: skip
        kernel[main[0]](*main[1], **main[2])
        if n_split:
            dkdv_tail(ws_tail, dk, dv, n_tiles - n_split, n_kb, kernel=_dkdv_fast)
        if atomic:
            _convert_dq(dq_acc, dq, call.softmax_scale)
        else:
            _triton_dq(q, k, v, dout, lse, delta, dq, call, varlen, nb, seqlen_q, seqlen_k, rows_q, rows_k)
    if key is not None and ws and atomic and not varlen and not copied and _plannable(call):
        if plan is None or plan[0] is not call:
            HL.keep_plan(key, (call, _PENDING))
        elif plan[1] is _PENDING:  # the first reuse: the launches prepared for the next calls
            HL.keep_plan(key, (call, _runner(kernel, pre, main, cfg, extra["DQ_TMA"], dq_acc, dq, call.softmax_scale,
                                            persistent, ws_tail, dk, dv, n_tiles - n_split, n_kb)))
    return dq, dk, dv


# Launch plans of the dense backward (issue 16; as the forward's, ``launch._PLANS``, where they are
# kept under a key that starts with "bwd"): per signature -- the call (by id, checked with ``is``;
# calls holding no tensor), the dtypes and device, the shapes and strides of q, k, v, dout, out and
# lse -- the config, grids, every non-tensor argument, the descriptors' templates and the compiled
# kernels of the three launches (preprocess, the ws kernel, the dQ conversion), prepared at the
# signature's first reuse. A planned call allocates dq, dk, dv, delta and the zeroed accumulator,
# makes five descriptors and launches. Only atomic-dQ calls of the ws kernel whose inputs TMA reads
# as they are (no copies; bases 16-byte aligned, checked per call) are planned.
_PENDING = object()
#: Whether dense backward calls are planned (on since stop 27: ``hopper_bwd_run.py --quick --plans``
#: passed on the H200, and the built-in window's backward fell from 581 to 241 cProfile-us a call in
#: ``flex_bwd_host.py``; benchmarks/NOTES.md, "Dense Hopper backward plans");
#: ``FLASHTILE_HOPPER_BWD_PLANS=0`` at import turns it off (A/B runs).
PLANS = os.environ.get("FLASHTILE_HOPPER_BWD_PLANS", "1").strip() != "0"


def _runner(kernel, pre: tuple, main: tuple, cfg: HopperBwdConfig, dq_tma: bool, dq_acc: torch.Tensor,
            dq: torch.Tensor, scale: float, persistent: bool = False, ws_tail: torch.Tensor | None = None,
            dk: torch.Tensor | None = None, dv: torch.Tensor | None = None, t_full: int = 0,
            n_kb: int = 0):  # fmt: skip
    """A backward plan's runner from this call's launches ``pre`` / ``main`` (``(grid, args,
    kwargs)``; main's leading arguments: five descriptor slots, the last the accumulator's with
    ``dq_tma``, else None, then five tensors, seven with ``persistent``: the tile counter and the split
    tail's workspace ``ws_tail`` (or None; with it the tail's conversion into ``dk`` / ``dv``, tiles
    ``t_full ..`` of ``n_kb`` key blocks a head, is a fourth launch)):
    ``run(dout, q, k, v, out, lse) -> (dq, dk, dv)``, or
    None (launching nothing) where the plans were cleared, the lean path turned off or a base is not
    16-byte aligned; None itself where a launch cannot be prepared."""
    conv = dq_launch(dq_acc, dq, scale)
    preps = (_bwd_preprocess.prepare(*pre, 3), kernel.prepare(*main, 12 if persistent else 10,
                                                               descs=5 if dq_tma else 4),
             _dq_fast.prepare(*conv, 2),
             _dkdv_fast.prepare(*dkdv_tail_launch(ws_tail, dk, dv, t_full, n_kb, cfg.block_n), 3)
             if ws_tail is not None else False)  # fmt: skip
    if None in preps:
        return None
    p_pre, p_main, p_conv, p_tail = preps
    epoch, dev = HL._EPOCH, dq.device
    acc_shape, block_m, block_n = tuple(dq_acc.shape), cfg.block_m, cfg.block_n
    tail = tuple(ws_tail.shape) if ws_tail is not None else ()

    def run(dout, q, k, v, out, lse):
        if HL._EPOCH is not epoch or not HL.LEAN or (q.data_ptr() | k.data_ptr() | v.data_ptr() | dout.data_ptr()
                                                       | out.data_ptr() | lse.data_ptr()) & 15:  # fmt: skip
            return None
        dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
        dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
        dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
        delta = torch.empty(lse.shape, dtype=torch.float32, device=dev)
        acc, ctr, ws = _accumulator(acc_shape, dev, persistent, tail)
        descs = (_descriptor(q, block_m, False), _descriptor(k, block_n, False), _descriptor(v, block_n, False),
                 _descriptor(dout, block_m, False), _descriptor(acc, block_m, False) if dq_tma else None)  # fmt: skip
        with device_guard(dev):
            p_pre(out, dout, delta)
            p_main(*descs, acc, dk, dv, lse, delta, *((ctr, ws) if persistent else ()))
            if p_tail:
                p_tail(ws, dk, dv)
            p_conv(acc, dq)
        return dq, dk, dv

    return run


def _triton_dq(q, k, v, dout, lse, delta, dq, call: AttnCall, varlen: bool, nb: int, seqlen_q: int,
               seqlen_k: int, rows_q: int, rows_k: int) -> None:  # fmt: skip
    """The deterministic dQ: the Triton backend's dQ kernel (no atomics)."""
    H, D = q.shape[2], q.shape[3]
    bd = configs.block_d(D)
    c = triton_configs.bwd_config(arch(q.device), bd, q.dtype, max(rows_q, rows_k), call.window_right >= 0)
    scal = _scalars(call)

    def bstr(t: torch.Tensor) -> tuple[int, int, int]:
        return (0 if varlen else t.stride(0), t.stride(1), t.stride(2))

    _bwd_dq_kernel[(cdiv(rows_q, c.block_m2), H, nb)](
        q, k, v, dout, lse, delta, dq, None, call.cu_seqlens_q, call.cu_seqlens_k,
        *bstr(q), *bstr(k), *bstr(v), *bstr(dout), *bstr(dq),
        0 if varlen else lse.stride(0), lse.stride(1), 0,
        seqlen_q, seqlen_k, H, H // k.shape[2],
        scal["qk_scale"], scal["cap_out"], scal["alibi_mul"], call.softmax_scale,
        scal["window_left"], scal["window_right"],
        scal["thresh"], scal["drop_scale"], scal["seed_lo"], scal["seed_hi"],
        HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=c.block_m2, BLOCK_N=c.block_n2,
        REVERSE_M=call.window_right >= 0, **_flags(call, q.dtype),
        num_warps=c.num_warps2, num_stages=c.num_stages2,
    )  # fmt: skip




def flex_lists(bm, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    """The block mask's transposed lists in the form of the backward's block-list mode:
    ``(cnt, idx, (bl_sb, bl_sh, bl_w))`` with ``cnt`` int32 ``(Bm, Hm, n_kb, 2)`` (full blocks, all
    blocks of each key block's list) and ``idx`` int32 ``(Bm, Hm, n_kb, bl_w)``: the full query blocks
    first, then the partial ones; ``bl_sb`` / ``bl_sh`` the list-row strides of batch and head (0
    where the block mask broadcasts). Built on the device once per block mask (cached weakly, as
    ``flex_triton.launch._lists``)."""
    return _FLEX_LISTS.get(bm, (device,), bm.q_num_blocks, lambda: _merge_lists(bm, device))


_FLEX_LISTS = PerBlockMask()  # flex_lists' results, once per block mask


def _merge_lists(bm, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int, int]]:
    num = bm.q_num_blocks.to(device=device, dtype=torch.int32)
    idx = bm.q_indices.to(device=device, dtype=torch.int32)
    if bm.full_q_num_blocks is not None:
        fnum = bm.full_q_num_blocks.to(device=device, dtype=torch.int32)
        fidx = bm.full_q_indices.to(device=device, dtype=torch.int32)
    else:
        fnum, fidx = torch.zeros_like(num), idx[..., :1]
    fw = fidx.shape[-1]
    width = fw + idx.shape[-1]
    j = torch.arange(width, device=device)
    f = fnum.unsqueeze(-1).long()
    src = torch.where(j < f, j, fw + j - f).clamp_(0, width - 1)
    merged = torch.gather(torch.cat([fidx, idx], -1), -1, src).clamp_(min=0).contiguous()  # (padding: any index)
    cnt = torch.stack([fnum, fnum + num], -1).contiguous()
    Bm, Hm, nkb = num.shape
    return cnt, merged, (Hm * nkb if Bm > 1 else 0, nkb if Hm > 1 else 0, width)


def flex_backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    call: AttnCall,
    captured: tuple[torch.Tensor, ...] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]:
    """The backward of a flex call (a block mask with ``BLOCK_SIZE`` 128 whose ``mask_mod`` has a
    Triton version, or none; no score_mod, flashtile's softcap, or an additive one of
    ``flex_triton.launch._GLUON_ADDITIVE_SCORES``: ALiBi, a bias table) on the Gluon ws kernel, with the
    contract of ``flex_triton.launch.backward``: internal layout ``(B, S, H, D)``, ``out`` / ``lse``
    of the flex forward (lse natural log, -inf on rows that see no key: zero gradients there);
    returns ``(dq, dk, dv, {})`` (no captured tensor gets a gradient on this path: ``captured``
    must be empty). The routing (``flex_triton.launch.gluon_bwd_reason``) checks the rest: head
    dims of the ws table (64 / 96 / 128), not deterministic, per-head block masks only without GQA."""
    from ..flex_triton import kernels as K
    from ..flex_triton.launch import _GLUON_ADDITIVE_SCORES, _arg

    bm = call.block_mask
    if captured or call.deterministic or bm is None or tuple(bm.BLOCK_SIZE) != (128, 128):
        raise ValueError("flashtile hopper flex_backward: needs a block mask with BLOCK_SIZE 128, no captured "
                         "tensor gradient and deterministic=False")  # fmt: skip
    cfg = configs.bwd_config(q.shape[-1])
    if not (cfg.kernel == "ws" and cfg.swap and cfg.block_n == 128 and 128 % cfg.block_m == 0):
        raise ValueError(f"flashtile hopper flex_backward: head dim {q.shape[-1]} has no ws / swap config")
    name, margs = bm.mask_mod._flashtile_triton if bm.mask_mod is not None else ("no_mask", (0, 0, 0))
    cap = 0.0
    score = {}
    if call.score_mod is not None:
        sname, sargs = call.score_mod._flashtile_triton
        if sname == "softcap":
            cap = float(sargs[2])
        elif sname in _GLUON_ADDITIVE_SCORES:  # (derivative 1: the kernel adds the bias, dS unchanged)
            sa = [_arg(a) for a in sargs]
            score = dict(SA0=sa[0], SA1=sa[1], SA2=sa[2], SCORE_MOD=getattr(K, sname))
        else:
            raise ValueError(f"flashtile hopper flex_backward: score_mod {sname!r} (softcap or "
                             f"{', '.join(_GLUON_ADDITIVE_SCORES)} only)")  # fmt: skip
    cnt, idx, (sb, sh, width) = flex_lists(bm, q.device)
    ma = [_arg(a) for a in margs]
    lists = dict(BL_CNT=cnt, BL_IDX=idx, bl_sb=sb, bl_sh=sh, bl_w=width, MA0=ma[0], MA1=ma[1], MA2=ma[2],
                 LIST_SUBS=128 // cfg.block_m, MASK_MOD=getattr(K, name), **score)  # fmt: skip
    # the built-in options off: the mask is the block mask's, softcap the score_mod's (an additive
    # score mod keeps the plain scale: the kernel applies it to softmax_scale * q.k, and fold stays
    # on, the bias being the same added to the folded S - lse / scale)
    base = dataclasses.replace(call, score_mod=None, block_mask=None, softcap=cap, window_left=-1, window_right=-1)
    dq, dk, dv = backward(dout, q, k, v, out, lse, base, config=cfg, lists=lists)
    return dq, dk, dv, {}


__all__ = ["backward", "flex_backward", "flex_lists"]
