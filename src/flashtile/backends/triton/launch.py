"""Host side of the Triton backend: shapes, strides, grids, configs -> kernel launches.

Works on the internal layout of :mod:`flashtile.backends.base` (dense ``(B, S, H, D)``;
varlen ``(1, total, H, D)`` with ``cu_seqlens``). Under ``TRITON_INTERPRET=1`` the same
kernels run on CPU tensors through Triton's interpreter.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import triton

from ...rng import dropout_threshold
from ...spec import AttnSpec
from . import configs
from .bwd import _bwd_dkdv_kernel, _bwd_dq_kernel, _bwd_preprocess
from .configs import BwdConfig, FwdConfig
from .fwd import _fwd_kernel

try:  # Triton >= 3.0
    from triton.runtime.errors import OutOfResources
except ImportError:  # pragma: no cover - older layouts
    from triton.runtime.autotuner import OutOfResources  # type: ignore[no-redef]

LOG2E = 1.4426950408889634

#: True when Triton was imported with TRITON_INTERPRET=1: kernels are numpy programs.
INTERPRET = type(_fwd_kernel).__name__ == "InterpretedFunction"

# (kernel name, arch, dtype, head-dim bucket, requested config) -> config that fitted
_FITTED: dict[tuple, FwdConfig | BwdConfig] = {}


def _arch(device: torch.device) -> str:
    return "interpret" if INTERPRET else configs.arch_of(device)


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _seed_words(seed: int | torch.Tensor) -> tuple[int, int]:
    """(lo, hi) 32-bit words of the seed as signed int32 values (one kernel signature for
    every seed); the kernel bitcasts them back to uint32."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF

    def i32(x: int) -> int:
        return x - (1 << 32) if x >= (1 << 31) else x

    return i32(s & 0xFFFFFFFF), i32((s >> 32) & 0xFFFFFFFF)


def _scalars(spec: AttnSpec, seed: int | torch.Tensor) -> dict:
    """Scalar kernel arguments shared by the forward and backward launches."""
    if spec.softcap > 0:
        qk_scale = spec.softmax_scale / spec.softcap
        cap_out = spec.softcap * LOG2E
    else:
        qk_scale = spec.softmax_scale * LOG2E
        cap_out = 0.0
    p = spec.dropout_p
    seed_lo, seed_hi = _seed_words(seed) if p > 0 else (0, 0)
    return dict(
        qk_scale=qk_scale,
        cap_out=cap_out,
        alibi_mul=LOG2E,
        window_left=spec.window_left,
        window_right=spec.window_right,
        thresh=dropout_threshold(p) if p > 0 else 0,
        drop_scale=1.0 / (1.0 - p),
        seed_lo=seed_lo,
        seed_hi=seed_hi,
    )


def _flags(spec: AttnSpec, alibi: torch.Tensor | None, varlen: bool, dtype: torch.dtype) -> dict:
    return dict(
        HAS_WL=spec.window_left >= 0,
        HAS_WR=spec.window_right >= 0,
        HAS_SOFTCAP=spec.softcap > 0,
        HAS_ALIBI=alibi is not None,
        HAS_DROPOUT=spec.dropout_p > 0,
        IS_VARLEN=varlen,
        # fp32 inputs: IEEE fp32 products; bf16 under the interpreter: its bf16 dot is wrong
        UPCAST=dtype == torch.float32 or (INTERPRET and dtype == torch.bfloat16),
    )


def _fit(key: tuple, cfg: FwdConfig | BwdConfig, launch: Callable[[FwdConfig | BwdConfig], None]) -> None:
    """Launch with cfg, stepping down through smaller configs on OutOfResources (once per key)."""
    fitted = _FITTED.get(key + (cfg,))
    if fitted is not None:
        launch(fitted)
        return
    err: Exception | None = None
    for c in configs.fallbacks(cfg):
        try:
            launch(c)
        except OutOfResources as e:
            err = e
            continue
        _FITTED[key + (cfg,)] = c
        return
    raise RuntimeError(f"flashtile triton: no tile config fits this device ({err})")


class _DeviceGuard:
    def __init__(self, device: torch.device):
        self.ctx = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            self.ctx.__exit__(*exc)


def _geometry(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """(varlen, nbatch, seqlen_q, seqlen_k, rows_q, rows_k): rows_* size the grids."""
    varlen = cu_seqlens_q is not None
    if varlen:
        if q.shape[0] != 1 or k.shape[0] != 1:
            raise ValueError("varlen tensors must have the internal layout (1, total, heads, headdim)")
        nb = cu_seqlens_q.shape[0] - 1
        return True, nb, 0, 0, int(max_seqlen_q), int(max_seqlen_k)
    return False, q.shape[0], q.shape[1], k.shape[1], q.shape[1], k.shape[1]


def _decode_shaped(q, k, v, spec: AttnSpec, alibi_slopes) -> tuple[torch.Tensor, torch.Tensor]:
    """Few query rows per KV head (decoding, speculative or chunked steps): the split-KV kernel
    of :mod:`.decode`, which reads each KV head once for its whole query group and spreads the
    keys over the SMs, where the forward kernel would give each query head a mostly empty row
    block and read K/V once per query head. Same semantics (bottom-right causal alignment)."""
    from .launch_decode import decode, error_flag

    B, Sk = k.shape[0], k.shape[1]
    seqlens = torch.full((B,), Sk, dtype=torch.int32, device=q.device)
    return decode(q, k, v, None, seqlens, None, spec, sn=0, capacity=Sk, n_index=B, dense=True,
                  err=error_flag(q.device), alibi_slopes=alibi_slopes)  # fmt: skip


def forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: AttnSpec,
    *,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    alibi_slopes: torch.Tensor | None,
    seed: int,
    config: FwdConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) on the internal layout; ``config`` overrides the table (benchmark sweeps)."""
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    varlen, nb, seqlen_q, seqlen_k, rows_q, rows_k = _geometry(
        q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0 or nb == 0 or rows_q == 0:
        return out, lse
    if Sk == 0 or rows_k == 0:
        out.zero_()
        lse.fill_(float("-inf"))
        return out, lse
    if config is None and not varlen and spec.dropout_p == 0.0 and Sq * (H // Hk) <= 64:
        return _decode_shaped(q, k, v, spec, alibi_slopes)
    block_d = _block_d(D)
    arch = _arch(q.device)
    cfg = config or configs.fwd_config(arch, block_d, q.dtype, max(rows_q, rows_k))
    flags = _flags(spec, alibi_slopes, varlen, q.dtype)
    scal = _scalars(spec, seed)
    stride_ab = alibi_slopes.stride(0) if alibi_slopes is not None else 0

    def launch(c: FwdConfig) -> None:
        grid = (triton.cdiv(rows_q, c.block_m), H, nb)
        _fwd_kernel[grid](
            q, k, v, out, lse, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
            0 if varlen else q.stride(0), q.stride(1), q.stride(2),
            0 if varlen else k.stride(0), k.stride(1), k.stride(2),
            0 if varlen else v.stride(0), v.stride(1), v.stride(2),
            0 if varlen else out.stride(0), out.stride(1), out.stride(2),
            0 if varlen else lse.stride(0), lse.stride(1), stride_ab,
            seqlen_q, seqlen_k, H, H // Hk,
            scal["qk_scale"], scal["cap_out"], scal["alibi_mul"],
            scal["window_left"], scal["window_right"],
            scal["thresh"], scal["drop_scale"], scal["seed_lo"], scal["seed_hi"],
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=c.block_m, BLOCK_N=c.block_n,
            REVERSE_M=spec.window_right >= 0, **flags,
            num_warps=c.num_warps, num_stages=c.num_stages,
        )

    with _DeviceGuard(q.device):
        _fit(("fwd", arch, q.dtype, block_d), cfg, launch)
    return out, lse


def backward(
    dout: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    spec: AttnSpec,
    *,
    cu_seqlens_q: torch.Tensor | None,
    cu_seqlens_k: torch.Tensor | None,
    max_seqlen_q: int,
    max_seqlen_k: int,
    alibi_slopes: torch.Tensor | None,
    seed: int,
    config: BwdConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) shaped and typed like (q, k, v). Bitwise reproducible unless the config
    fuses dQ with atomics (``atomic_dq``), which ``spec.deterministic`` switches off."""
    B, Sq, H, D = q.shape
    Hk = k.shape[2]
    varlen, nb, seqlen_q, seqlen_k, rows_q, rows_k = _geometry(
        q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if nb == 0 or q.numel() == 0 or k.numel() == 0 or rows_q == 0 or rows_k == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    if dout.stride(-1) != 1:
        dout = dout.contiguous()
    if out.stride(-1) != 1:
        out = out.contiguous()
    lse = lse.contiguous()
    delta = torch.empty_like(lse)
    dq_acc = None
    block_d = _block_d(D)
    arch = _arch(q.device)
    cfg = config or configs.bwd_config(arch, block_d, q.dtype, max(rows_q, rows_k))
    flags = _flags(spec, alibi_slopes, varlen, q.dtype)
    scal = _scalars(spec, seed)
    stride_ab = alibi_slopes.stride(0) if alibi_slopes is not None else 0
    stride_lb = 0 if varlen else lse.stride(0)
    group = H // Hk

    def bstr(t: torch.Tensor) -> tuple[int, int, int]:
        return (0 if varlen else t.stride(0), t.stride(1), t.stride(2))

    common = (
        stride_lb, lse.stride(1), stride_ab,
        seqlen_q, seqlen_k, H, group,
        scal["qk_scale"], scal["cap_out"], scal["alibi_mul"], spec.softmax_scale,
        scal["window_left"], scal["window_right"],
        scal["thresh"], scal["drop_scale"], scal["seed_lo"], scal["seed_hi"],
    )

    def launch(c: BwdConfig) -> None:
        nonlocal dq_acc
        atomic = c.atomic_dq and not spec.deterministic
        if atomic:
            dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dq_dst = dq_acc if atomic else dq
        pre_m = 64 if not INTERPRET else 32
        _bwd_preprocess[(triton.cdiv(Sq, pre_m), H, B)](
            out, dout, delta,
            out.stride(0), out.stride(1), out.stride(2),
            dout.stride(0), dout.stride(1), dout.stride(2),
            delta.stride(0), delta.stride(1), Sq,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=pre_m,
        )
        _bwd_dkdv_kernel[(triton.cdiv(rows_k, c.block_n1), Hk, nb)](
            q, k, v, dout, lse, delta, dk, dv, dq_dst, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
            *bstr(q), *bstr(k), *bstr(v), *bstr(dout), *bstr(dk), *bstr(dv), *bstr(dq_dst),
            *common,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=c.block_m1, BLOCK_N=c.block_n1, ATOMIC_DQ=atomic, **flags,
            num_warps=c.num_warps1, num_stages=c.num_stages1,
        )
        if atomic:
            return
        _bwd_dq_kernel[(triton.cdiv(rows_q, c.block_m2), H, nb)](
            q, k, v, dout, lse, delta, dq, alibi_slopes, cu_seqlens_q, cu_seqlens_k,
            *bstr(q), *bstr(k), *bstr(v), *bstr(dout), *bstr(dq),
            *common,
            HEAD_DIM=D, BLOCK_D=block_d, BLOCK_M=c.block_m2, BLOCK_N=c.block_n2,
            REVERSE_M=spec.window_right >= 0, **flags,
            num_warps=c.num_warps2, num_stages=c.num_stages2,
        )

    with _DeviceGuard(q.device):
        _fit(("bwd", arch, q.dtype, block_d, spec.deterministic), cfg, launch)
        if dq_acc is not None:
            dq.copy_(dq_acc.mul_(spec.softmax_scale))
    return dq, dk, dv


def fwd_config_for(device: torch.device, headdim: int, dtype: torch.dtype, max_seqlen: int = 1 << 30) -> FwdConfig:
    """The table's forward config for a call (before any shared-memory fallback)."""
    return configs.fwd_config(_arch(device), _block_d(headdim), dtype, max_seqlen)


def bwd_config_for(device: torch.device, headdim: int, dtype: torch.dtype, max_seqlen: int = 1 << 30) -> BwdConfig:
    """The table's backward config for a call (before any shared-memory fallback)."""
    return configs.bwd_config(_arch(device), _block_d(headdim), dtype, max_seqlen)


def describe(device: torch.device, headdim: int, dtype: torch.dtype) -> str:
    """One line naming the configs a call would use (for `flashtile env`)."""
    block_d = _block_d(headdim)
    arch = _arch(device)
    return f"{arch}: fwd {configs.fwd_config(arch, block_d, dtype)}, bwd {configs.bwd_config(arch, block_d, dtype)}"


__all__ = ["forward", "backward", "describe", "fwd_config_for", "bwd_config_for", "INTERPRET"]
