"""Host side of the Triton backend: shapes, strides, grids, configs -> kernel launches.

Works on the internal layout of :mod:`flashtile.backends.base` (dense ``(B, S, H, D)``;
varlen ``(1, total, H, D)`` with ``cu_seqlens``). Under ``TRITON_INTERPRET=1`` the same
kernels run on CPU tensors through Triton's interpreter. The launch-side pieces every Triton
launcher shares (the device guard, the architecture, the scalar and flag arguments derived from
an :class:`~flashtile.call.AttnCall`) live here; :mod:`.launch_decode` uses them too.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable

import torch

from ...rng import dropout_threshold
from ...spec import AttnCall
from .. import _device
from .. import base as _base
from .._ints import cdiv, next_power_of_2
from . import configs
from .bwd import _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_preprocess
from .configs import BwdConfig, FwdConfig
from .fastlaunch import fast
from .fwd import _fwd_kernel

try:  # Triton >= 3.0
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - older layouts
    from triton.runtime.autotuner import OutOfResources  # type: ignore[no-redef]

LOG2E = 1.4426950408889634

#: True when Triton was imported with TRITON_INTERPRET=1: kernels are numpy programs.
INTERPRET = type(_fwd_kernel).__name__ == "InterpretedFunction"

# The kernels through the lean launch path (:mod:`.fastlaunch`).
_FWD, _BWD_PRE, _BWD_DKDV, _BWD_DQ = fast(_fwd_kernel), fast(_bwd_preprocess), fast(_bwd_dkdv_kernel), fast(_bwd_dq_kernel)

# (kernel name, arch, dtype, head-dim bucket, requested config) -> config that fitted
_FITTED: dict[tuple, FwdConfig | BwdConfig] = {}


def arch(device: torch.device) -> str:
    """The config table's architecture key for ``device`` (``interpret`` under the interpreter)."""
    return "interpret" if INTERPRET else _device.info(device).arch


#: Dense backwards whose keys fit in one key block run as one launch of the dK/dV kernel
#: (``ONE_PASS``, see :mod:`.bwd` and ``configs.one_pass_config``); False: always the three passes
ONE_PASS = True
_NULL_GUARD = contextlib.nullcontext()  # reusable (and reentrant): one object for every call


def device_guard(device: torch.device):
    """Make ``device`` current for a launch (a no-op when it already is, or off CUDA)."""
    if device.type != "cuda" or device.index is None or device.index == torch.cuda.current_device():
        return _NULL_GUARD
    return torch.cuda.device(device)


def block_d(d: int) -> int:
    return max(16, next_power_of_2(d))


def _seed_words(seed: int | torch.Tensor) -> tuple[int, int]:
    """(lo, hi) 32-bit words of the seed as signed int32 values (one kernel signature for
    every seed); the kernel bitcasts them back to uint32."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF

    def i32(x: int) -> int:
        return x - (1 << 32) if x >= (1 << 31) else x

    return i32(s & 0xFFFFFFFF), i32((s >> 32) & 0xFFFFFFFF)


def score_scales(call: AttnCall) -> tuple[float, float]:
    """``(qk_scale, cap_out)``: the kernels compute scores in log2 units as
    ``cap_out * tanh(qk_scale * q.k)`` with softcap, else ``qk_scale * q.k``."""
    if call.softcap > 0:
        return call.softmax_scale / call.softcap, call.softcap * LOG2E
    return call.softmax_scale * LOG2E, 0.0


def _scalars(call: AttnCall) -> dict:
    """Scalar kernel arguments shared by the forward and backward launches."""
    qk_scale, cap_out = score_scales(call)
    p = call.dropout_p
    seed_lo, seed_hi = _seed_words(call.seed_int) if p > 0 else (0, 0)
    return dict(
        qk_scale=qk_scale,
        cap_out=cap_out,
        alibi_mul=LOG2E,
        window_left=call.window_left,
        window_right=call.window_right,
        thresh=dropout_threshold(p) if p > 0 else 0,
        drop_scale=1.0 / (1.0 - p),
        seed_lo=seed_lo,
        seed_hi=seed_hi,
    )


def upcast(dtype: torch.dtype) -> bool:
    """Whether the kernels compute products in fp32: fp32 inputs (IEEE fp32 products), and bf16
    under the interpreter, whose bf16 dot is wrong."""
    return dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16)


def _flags(call: AttnCall, dtype: torch.dtype) -> dict:
    return dict(
        HAS_WL=call.window_left >= 0,
        HAS_WR=call.window_right >= 0,
        HAS_SOFTCAP=call.softcap > 0,
        HAS_ALIBI=call.alibi_slopes is not None,
        HAS_DROPOUT=call.dropout_p > 0,
        IS_VARLEN=call.varlen,
        UPCAST=upcast(dtype),
    )


def _sink_args(call: AttnCall) -> dict:
    """The sink's kernel arguments: none without one (the kernels' defaults), else the fp32
    ``(nheads,)`` logits and the switch."""
    if call.learnable_sink is None:
        return {}
    return dict(SINK=call.learnable_sink.detach().contiguous(), HAS_SINK=True)


def sink_grad(sink: torch.Tensor, lse: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """The sink's gradient ``dsink_h = -sum_{b,i} exp(sink_h - lse_i) * delta_i`` from the
    backward's lse and delta (float32 ``(B, H, Sq)``, every entry a real row): a few elementwise
    passes over ``B * H * Sq`` floats, no atomics (deterministic)."""
    return torch.exp(sink.detach().view(1, -1, 1) - lse).mul_(delta).sum((0, 2)).neg_()


def _fit(
    key: tuple,
    cfg: FwdConfig | BwdConfig,
    launch: Callable[[FwdConfig | BwdConfig], None],
    adapt: Callable[[FwdConfig | BwdConfig], FwdConfig | BwdConfig] | None = None,
    who: str = "triton",
) -> FwdConfig | BwdConfig:
    """Launch with cfg, stepping down through smaller configs on OutOfResources (once per key);
    returns the config launched. ``adapt`` maps each fallback before it is tried (the flex
    kernels keep their tiles within the block mask's block); ``who`` names the caller in the
    error. Keys must be distinct between callers (the flex launcher prefixes its own)."""
    fitted = _FITTED.get(key + (cfg,))
    if fitted is not None:
        launch(fitted)
        return fitted
    err: Exception | None = None
    for c in configs.fallbacks(cfg):
        if adapt is not None:
            c = adapt(c)
        try:
            launch(c)
        except OutOfResources as e:
            err = e
            continue
        _FITTED[key + (cfg,)] = c
        return c
    raise RuntimeError(f"flashtile {who}: no tile config fits this device ({err})")


# Launch plans (issue 16): what a launch of a tensor-free call (no ALiBi, varlen, dropout seed or
# sink: the AttnCall objects make_call caches and shares) derives from the call and the shapes and
# strides of its tensors -- output shapes, grids, every non-tensor kernel argument, the fitted
# config -- kept per signature, so that a repeated small call allocates its outputs and launches.
# Keyed by the call's id with the call kept in the entry (checked with ``is``: an id is never
# reused while the entry holds its object), q's dtype and device, and the shapes and strides of
# every tensor the arguments come from; bounded (cleared when full). Code that changes the config
# tables at run time (benchmarks/bench_attention.py's sweep winners) clears it.
_PLANS: dict[tuple, tuple] = {}
_PLANS_MAX = 1024
#: A plan's last entry before its first reuse: the launches are prepared then
#: (``fastlaunch.FastKernel.prepare``), so that a plan made once and never reused (Hugging Face
#: generate's calls, a key length new every step) does not pay for it.
PENDING = object()
_TENSOR_FIELDS = tuple(f.name for f in dataclasses.fields(AttnCall) if "Tensor" in str(f.type))


def clear_plans() -> None:
    """Forget every launch plan and the runners made from them (code that changes the config
    tables at run time calls it)."""
    global _EPOCH
    _PLANS.clear()
    _EPOCH = object()


#: replaced by clear_plans(): runners made before (kept by the entry points) then decline
_EPOCH = object()


def _fwd_runner(out_shape: tuple, lse_shape: tuple, dtype: torch.dtype, dev: torch.device, prep) -> Callable:
    """A forward plan's runner (see :data:`flashtile.backends.base.OFFERS`): the planned, prepared
    launch of :func:`forward` for inputs of the plan's signature, without the plan lookup."""
    from . import launch_decode as ld  # (launch_decode imports this module)

    epoch, empty, f32 = _EPOCH, torch.empty, torch.float32

    def run(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, want_lse: bool = True) -> tuple | None:
        if _EPOCH is not epoch:
            return None
        out = empty(out_shape, dtype=dtype, device=dev)
        lse = empty(lse_shape, dtype=f32, device=dev) if want_lse else ld.lse_sink(dev, lse_shape)
        if not prep.go(q, k, v, out, lse):  # another device current, a launch hook, an unaligned input
            with device_guard(dev):
                prep(q, k, v, out, lse)
        return out, lse

    return run


def _plannable(call: AttnCall) -> bool:
    """Whether launches of ``call`` may be planned: it holds no tensor and no Python mod."""
    return all(getattr(call, n) is None for n in _TENSOR_FIELDS) and call.score_mod is None and call.block_mask is None


def _keep_plan(key: tuple, plan: tuple) -> None:
    if len(_PLANS) >= _PLANS_MAX:
        _PLANS.clear()
    _PLANS[key] = plan


def _geometry(q: torch.Tensor, k: torch.Tensor, call: AttnCall) -> tuple[bool, int, int, int, int, int]:
    """(varlen, nbatch, seqlen_q, seqlen_k, rows_q, rows_k): rows_* size the grids."""
    if call.varlen:
        if q.shape[0] != 1 or k.shape[0] != 1:
            raise ValueError("varlen tensors must have the internal layout (1, total, heads, headdim)")
        nb = call.cu_seqlens_q.shape[0] - 1
        return True, nb, 0, 0, int(call.max_seqlen_q), int(call.max_seqlen_k)
    return False, q.shape[0], q.shape[1], k.shape[1], q.shape[1], k.shape[1]


def forward_outputs(
    q: torch.Tensor, k: torch.Tensor, call: AttnCall, v: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, tuple[bool, int, int, int, int, int] | None]:
    """``(out, lse, geometry)`` of a forward launch, shared by the forward launchers: out like q
    (with v's head dim when ``v`` is given),
    lse float32 ``(B, H, Sq)``, and :func:`_geometry`'s tuple; geometry None when the problem is
    empty and (out, lse) are already final (no query rows: nothing to write; no keys: out 0,
    lse -inf, or the sink with ``learnable_sink``)."""
    geo = _geometry(q, k, call)
    _, nb, _, _, rows_q, rows_k = geo
    dv = q.shape[-1] if v is None else v.shape[-1]
    out = torch.empty((*q.shape[:-1], dv), dtype=q.dtype, device=q.device)
    lse = torch.empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or nb == 0 or rows_q == 0:
        return out, lse, None
    if k.shape[1] == 0 or rows_k == 0:
        out.zero_()
        if call.learnable_sink is None:
            lse.fill_(float("-inf"))
        else:
            lse.copy_(call.learnable_sink.detach().view(1, -1, 1).expand_as(lse))
        return out, lse, None
    return out, lse, geo


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    call: AttnCall,
    *,
    config: FwdConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) on the internal layout; ``config`` overrides the table (benchmark sweeps).
    v (and out) may have their own head dim."""
    dev = q.device
    key = None
    if config is None:
        key = ("fwd", id(call), q.dtype, k.dtype, v.dtype, dev, q.shape, k.shape, v.shape, q.stride(), k.stride(),
               v.stride())  # fmt: skip
        plan = _PLANS.get(key)
        if plan is not None and plan[0] is call:
            _, out_shape, lse_shape, grid, ints, kw, prep = plan
            out = torch.empty(out_shape, dtype=q.dtype, device=dev)
            lse = torch.empty(lse_shape, dtype=torch.float32, device=dev)
            with device_guard(dev):
                if prep is not None and prep is not PENDING:
                    prep[0](q, k, v, out, lse)
                    if _base.OFFERS is not None:  # an entry point records: it may keep the runner
                        _base.OFFERS.append(((q, k, v), (out, lse), prep[1]))
                else:
                    args = (q, k, v, out, lse, None, None, None, *ints)
                    _FWD[grid](*args, **kw)
                    if prep is PENDING:  # the plan's first reuse: its launch prepared for the next ones
                        p = _FWD.prepare(grid, args, kw, 5)
                        _PLANS[key] = (
                            *plan[:-1],
                            None if p is None else (p, _fwd_runner(out_shape, lse_shape, q.dtype, dev, p)),
                        )
            return out, lse
    B, Sq, H, D = q.shape
    Hk, Dv = k.shape[2], v.shape[-1]
    out, lse, geo = forward_outputs(q, k, call, v)
    if geo is None:
        return out, lse
    varlen, nb, seqlen_q, seqlen_k, rows_q, rows_k = geo
    alibi_slopes, cu_seqlens_q, cu_seqlens_k = call.alibi_slopes, call.cu_seqlens_q, call.cu_seqlens_k
    bd, bdv = block_d(D), block_d(Dv)
    bd_cfg = max(bd, bdv)  # the tile table's bucket: the larger head dim
    ar = arch(dev)
    span = call.window_left + 1 + call.window_right if call.window_left >= 0 and call.window_right >= 0 else None
    cfg = config or configs.fwd_config(ar, bd_cfg, q.dtype, max(rows_q, rows_k), span)
    flags = _flags(call, q.dtype)
    scal = _scalars(call)
    stride_ab = alibi_slopes.stride(0) if alibi_slopes is not None else 0
    qs, ks, vs, os_, ls = q.stride(), k.stride(), v.stride(), out.stride(), lse.stride()

    def args(c: FwdConfig) -> tuple[tuple, tuple, dict]:
        grid = (cdiv(rows_q, c.block_m), H, nb)
        ints = (
            0 if varlen else qs[0], qs[1], qs[2],
            0 if varlen else ks[0], ks[1], ks[2],
            0 if varlen else vs[0], vs[1], vs[2],
            0 if varlen else os_[0], os_[1], os_[2],
            0 if varlen else ls[0], ls[1], stride_ab,
            seqlen_q, seqlen_k, H, H // Hk,
            scal["qk_scale"], scal["cap_out"], scal["alibi_mul"],
            scal["window_left"], scal["window_right"],
            scal["thresh"], scal["drop_scale"], scal["seed_lo"], scal["seed_hi"],
        )  # fmt: skip
        kw = dict(
            HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
            REVERSE_M=call.window_right >= 0, **flags, **_sink_args(call), HEAD_DIM_V=Dv, BLOCK_DV=bdv,
            num_warps=c.num_warps, num_stages=c.num_stages,
        )  # fmt: skip
        return grid, ints, kw

    def launch(c: FwdConfig) -> None:
        grid, ints, kw = args(c)
        _FWD[grid](q, k, v, out, lse, alibi_slopes, cu_seqlens_q, cu_seqlens_k, *ints, **kw)

    with device_guard(dev):
        used = _fit(("fwd", ar, q.dtype, bd, bdv), cfg, launch)
    if key is not None and _plannable(call):
        _keep_plan(key, (call, tuple(out.shape), tuple(lse.shape), *args(used), PENDING))
    return out, lse


def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    call: AttnCall,
    *,
    config: BwdConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """(dq, dk, dv, field_grads): dq, dk, dv shaped and typed like (q, k, v); field_grads holds
    ``learnable_sink``'s gradient when the call has one (the backend contract). Bitwise
    reproducible unless the config fuses dQ with atomics (``atomic_dq``), which
    ``call.deterministic`` switches off."""
    dev = q.device
    key = None
    if config is None:
        key = ("bwd", id(call), q.dtype, k.dtype, v.dtype, dout.dtype, out.dtype, lse.dtype, dev, q.shape, k.shape,
               v.shape, q.stride(), k.stride(), v.stride(), dout.shape, dout.stride(), out.shape, out.stride(),
               lse.shape, lse.stride())  # fmt: skip
        plan = _PLANS.get(key)
        if plan is not None and plan[0] is call:
            _, pre, dkdv, dq_pass, preps = plan
            dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
            dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
            dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
            if pre is None:  # one pass (ONE_PASS): the dK/dV kernel alone, out in delta's place
                if preps is not None and preps is not PENDING:
                    p = preps[1]
                    if not p.go(q, k, v, dout, lse, out, dk, dv, dq):  # (another device current, a hook)
                        with device_guard(dev):
                            p(q, k, v, dout, lse, out, dk, dv, dq)
                    return dq, dk, dv, {}
                with device_guard(dev):
                    dkdv_args = (q, k, v, dout, lse, out, dk, dv, dq, None, None, None, *dkdv[1])
                    _BWD_DKDV[dkdv[0]](*dkdv_args, **dkdv[2])
                    if preps is PENDING:
                        p = _BWD_DKDV.prepare(dkdv[0], dkdv_args, dkdv[2], 9)
                        _PLANS[key] = (*plan[:-1], None if p is None else (None, p, None))
                return dq, dk, dv, {}
            delta = torch.empty(lse.shape, dtype=torch.float32, device=dev)
            with device_guard(dev):
                if preps is not None and preps is not PENDING:  # prepared launches (FastKernel.prepare)
                    p_pre, p_dkdv, p_dq = preps
                    p_pre(out, dout, delta)
                    if p_dq is None:
                        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=dev)
                        p_dkdv(q, k, v, dout, lse, delta, dk, dv, dq_acc)
                        dq.copy_(dq_acc.mul_(call.softmax_scale))
                    else:
                        p_dkdv(q, k, v, dout, lse, delta, dk, dv, dq)
                        p_dq(q, k, v, dout, lse, delta, dq)
                    return dq, dk, dv, {}
                pre_args = (out, dout, delta, *pre[1])
                _BWD_PRE[pre[0]](*pre_args, **pre[2])
                dq_args = None
                if dq_pass is None:  # dQ by atomics into an fp32 buffer
                    dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=dev)
                    dkdv_args = (q, k, v, dout, lse, delta, dk, dv, dq_acc, None, None, None, *dkdv[1])
                    _BWD_DKDV[dkdv[0]](*dkdv_args, **dkdv[2])
                    dq.copy_(dq_acc.mul_(call.softmax_scale))
                else:
                    dkdv_args = (q, k, v, dout, lse, delta, dk, dv, dq, None, None, None, *dkdv[1])
                    _BWD_DKDV[dkdv[0]](*dkdv_args, **dkdv[2])
                    dq_args = (q, k, v, dout, lse, delta, dq, None, None, None, *dq_pass[1])
                    _BWD_DQ[dq_pass[0]](*dq_args, **dq_pass[2])
                if preps is PENDING:  # the plan's first reuse: its launches prepared for the next ones
                    preps = (_BWD_PRE.prepare(pre[0], pre_args, pre[2], 3),
                             _BWD_DKDV.prepare(dkdv[0], dkdv_args, dkdv[2], 9),
                             None if dq_pass is None else _BWD_DQ.prepare(dq_pass[0], dq_args, dq_pass[2], 7))  # fmt: skip
                    if preps[0] is None or preps[1] is None or (dq_pass is not None and preps[2] is None):
                        preps = None
                    _PLANS[key] = (*plan[:-1], preps)
            return dq, dk, dv, {}
    B, Sq, H, D = q.shape
    Hk, Dv = k.shape[2], v.shape[-1]
    varlen, nb, seqlen_q, seqlen_k, rows_q, rows_k = _geometry(q, k, call)
    alibi_slopes, cu_seqlens_q, cu_seqlens_k = call.alibi_slopes, call.cu_seqlens_q, call.cu_seqlens_k
    dq = torch.empty(q.shape, dtype=q.dtype, device=dev)
    dk = torch.empty(k.shape, dtype=k.dtype, device=dev)
    dv = torch.empty(v.shape, dtype=v.dtype, device=dev)
    sink = call.learnable_sink
    if nb == 0 or q.numel() == 0 or k.numel() == 0 or rows_q == 0 or rows_k == 0:
        # no rows, or no keys: out = 0, so delta = rowsum(dout * out) = 0 and so is dsink
        grads = {} if sink is None else {"learnable_sink": torch.zeros_like(sink)}
        return dq.zero_(), dk.zero_(), dv.zero_(), grads
    normalised = dout.stride(-1) != 1 or out.stride(-1) != 1 or not lse.is_contiguous()
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if out.stride(-1) != 1:
        out = out.contiguous()
    lse = lse.contiguous()
    dq_acc = None
    bd, bdv = block_d(D), block_d(Dv)
    ar = arch(dev)
    group = H // Hk
    one = None  # the one-pass config (dense, no sink: its gradient needs delta; O read with dO's strides)
    if config is None and ONE_PASS and not varlen and sink is None and out.stride() == dout.stride():
        one = configs.one_pass_config(ar, max(bd, bdv), q.dtype, rows_q, rows_k, group)
    delta = None if one is not None else torch.empty_like(lse)
    cfg = config or one or configs.bwd_config(ar, max(bd, bdv), q.dtype, max(rows_q, rows_k), call.window_right >= 0)
    flags = _flags(call, q.dtype)
    scal = _scalars(call)
    stride_ab = alibi_slopes.stride(0) if alibi_slopes is not None else 0
    ls = lse.stride()
    stride_lb = 0 if varlen else ls[0]
    pre_m = 64 if not INTERPRET else 32

    def bstr(t: torch.Tensor) -> tuple[int, int, int]:
        st = t.stride()
        return (0 if varlen else st[0], st[1], st[2])

    common = (
        stride_lb, ls[1], stride_ab,
        seqlen_q, seqlen_k, H, group,
        scal["qk_scale"], scal["cap_out"], scal["alibi_mul"], call.softmax_scale,
        scal["window_left"], scal["window_right"],
        scal["thresh"], scal["drop_scale"], scal["seed_lo"], scal["seed_hi"],
    )  # fmt: skip
    os_, ds = out.stride(), dout.stride()
    es = delta.stride() if delta is not None else ls
    pre = (
        (cdiv(Sq, pre_m), H, B),
        (os_[0], os_[1], os_[2], ds[0], ds[1], ds[2], es[0], es[1], Sq),
        dict(HEAD_DIM=Dv, BLOCK_D=bdv, BLOCK_M=pre_m),
    )
    qkvd = (*bstr(q), *bstr(k), *bstr(v), *bstr(dout))

    def args(c: BwdConfig) -> tuple[bool, tuple, tuple | None]:
        """(atomic, the dK/dV pass's (grid, ints, kw), the dQ pass's or None with atomics or in
        one pass); dq and the fp32 atomic buffer have the same (contiguous) strides."""
        single = one is not None and rows_k <= c.block_n1  # (a fallback tile may be too small for one pass)
        atomic = c.atomic_dq and not call.deterministic and not single
        dkdv = (
            (cdiv(rows_k, c.block_n1), Hk, nb),
            (*qkvd, *bstr(dk), *bstr(dv), *bstr(dq), *common),
            dict(HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=c.block_m1, BLOCK_N=c.block_n1, ATOMIC_DQ=atomic, **flags,
                 HEAD_DIM_V=Dv, BLOCK_DV=bdv, num_warps=c.num_warps1, num_stages=c.num_stages1,
                 **({"ONE_PASS": True} if single else {})),
        )  # fmt: skip
        if single:
            return False, dkdv, None
        dq_pass = None if atomic else (
            (cdiv(rows_q, c.block_m2), H, nb),
            (*qkvd, *bstr(dq), *common),
            dict(HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=c.block_m2, BLOCK_N=c.block_n2, REVERSE_M=call.window_right >= 0,
                 **flags, HEAD_DIM_V=Dv, BLOCK_DV=bdv, num_warps=c.num_warps2, num_stages=c.num_stages2),
        )  # fmt: skip
        return atomic, dkdv, dq_pass

    def launch(c: BwdConfig) -> None:
        nonlocal dq_acc, delta
        atomic, dkdv, dq_pass = args(c)
        if dq_pass is None and not atomic:  # one pass: out in delta's place
            _BWD_DKDV[dkdv[0]](q, k, v, dout, lse, out, dk, dv, dq, alibi_slopes, None, None, *dkdv[1], **dkdv[2])
            return
        if delta is None:  # (a fallback tile too small for one pass)
            delta = torch.empty_like(lse)
        if atomic:
            dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=dev)
        _BWD_PRE[pre[0]](out, dout, delta, *pre[1], **pre[2])
        _BWD_DKDV[dkdv[0]](q, k, v, dout, lse, delta, dk, dv, dq_acc if atomic else dq, alibi_slopes, cu_seqlens_q,
                           cu_seqlens_k, *dkdv[1], **dkdv[2])  # fmt: skip
        if not atomic:
            _BWD_DQ[dq_pass[0]](q, k, v, dout, lse, delta, dq, alibi_slopes, cu_seqlens_q, cu_seqlens_k, *dq_pass[1],
                                **dq_pass[2])  # fmt: skip

    with device_guard(dev):
        used = _fit(("bwd1" if one is not None else "bwd", ar, q.dtype, bd, bdv, call.deterministic), cfg, launch)
        if dq_acc is not None:
            dq.copy_(dq_acc.mul_(call.softmax_scale))
    if key is not None and not normalised and _plannable(call):
        atomic, dkdv, dq_pass = args(used)
        single = dq_pass is None and not atomic
        _keep_plan(key, (call, None if single else pre, dkdv, dq_pass, PENDING))
    grads = {} if sink is None else {"learnable_sink": sink_grad(sink, lse, delta)}
    return dq, dk, dv, grads


def fwd_config_for(device: torch.device, headdim: int, dtype: torch.dtype, max_seqlen: int = 1 << 30) -> FwdConfig:
    """The table's forward config for a call (before any shared-memory fallback)."""
    return configs.fwd_config(arch(device), block_d(headdim), dtype, max_seqlen)


def bwd_config_for(device: torch.device, headdim: int, dtype: torch.dtype, max_seqlen: int = 1 << 30,
                   causal: bool = False) -> BwdConfig:  # fmt: skip
    """The table's backward config for a call (before any shared-memory fallback)."""
    return configs.bwd_config(arch(device), block_d(headdim), dtype, max_seqlen, causal)


def describe(device: torch.device, headdim: int, dtype: torch.dtype) -> str:
    """One line naming the configs a call would use (for `flashtile env`)."""
    bd, ar = block_d(headdim), arch(device)
    return f"{ar}: fwd {configs.fwd_config(ar, bd, dtype)}, bwd {configs.bwd_config(ar, bd, dtype)}"


__all__ = ["forward", "backward", "describe", "fwd_config_for", "bwd_config_for", "INTERPRET"]
