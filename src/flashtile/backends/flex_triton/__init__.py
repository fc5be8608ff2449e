"""The ``flex_triton`` backend: calls with ``score_mod`` / ``block_mask`` whose mods have Triton
versions (every mod of :mod:`flashtile.masks`) get a Triton forward kernel with the mods compiled
in and the block mask's empty blocks skipped (:mod:`.kernels`). The backward is a Triton kernel
too (dK / dV per key block over the transposed block lists, dQ and the captured tensor's gradient
by fp32 atomics) when the score_mod has a derivative written beside it (alibi, softcap,
relative_bias, or none) and the call is not ``deterministic``; otherwise the torch engine's
(correct from the saved out / lse).

Serves CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``, for tests), fp16 / bf16, head
dim <= 128, dense (not varlen) calls without dropout or other options; block masks built with
``BLOCK_SIZE`` 64 or 128 (flashtile's or torch's). Anything else is refused with the reason, and
``auto`` hands it to the torch engine. Importing this module never needs Triton.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from ...spec import MOD_FEATURES, AttnCall, KVCache, Problem
from ..base import Capabilities, register

_HAS_TRITON = importlib.util.find_spec("triton") is not None
_BLOCKS = (64, 128)


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _twin(fn) -> tuple[str, tuple] | None:
    return getattr(fn, "_flashtile_triton", None)


def _why_not_mods(call: AttnCall, problem: Problem) -> str | None:
    if call.score_mod is not None and _twin(call.score_mod) is None:
        return "the score_mod has no Triton version (only flashtile.masks' mods do)"
    bm = call.block_mask
    if bm is not None:
        if bm.mask_mod is not None and _twin(bm.mask_mod) is None:
            return "the block mask's mask_mod has no Triton version (only flashtile.masks' mods do)"
        bq, bk = bm.BLOCK_SIZE
        if bq != bk or bq not in _BLOCKS:
            return f"block masks with BLOCK_SIZE 64 or 128 only, got {tuple(bm.BLOCK_SIZE)}"
    for fn in (call.score_mod, None if bm is None else bm.mask_mod):
        twin = None if fn is None else _twin(fn)
        for a in () if twin is None else twin[1]:
            if isinstance(a, torch.Tensor) and (a.device != problem.device or a.stride(-1) != 1):
                return "a mod's captured tensor is not on q's device or not contiguous in its last dim"
    return None


class FlexTritonBackend:
    name = "flex_triton"
    capabilities = Capabilities(
        priority=5,
        dtypes=frozenset({torch.float16, torch.bfloat16}),
        max_headdim=128,
        features=MOD_FEATURES,
        auto_devices=("cuda",),
    )

    def available(self) -> str | None:
        if not _HAS_TRITON:
            return "triton is not installed (pip install triton)"
        if torch.cuda.is_available() or _interpret():
            return None
        return "no CUDA device, and TRITON_INTERPRET=1 is not set"

    def supports(self, problem: Problem, call: AttnCall) -> str | None:
        if call.score_mod is None and call.block_mask is None:
            return "serves calls with score_mod / block_mask only"
        dev = problem.device
        if dev.type != "cuda" and not (_interpret() and dev.type == "cpu"):
            return f"{dev.type} tensors need CUDA, or CPU tensors with TRITON_INTERPRET=1"
        if dev.type == "cuda" and not torch.version.hip and torch.cuda.get_device_capability(dev)[0] < 8:
            return "needs compute capability 8.0 or newer"
        return _why_not_mods(call, problem)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from . import kernels as K

        B, Sq, H, D = q.shape
        Sk, Hk = k.shape[1], k.shape[2]
        out = torch.empty_like(q)
        lse = torch.empty((B, H, Sq), dtype=torch.float32, device=q.device)
        if out.numel() == 0:
            return out, lse.fill_(float("-inf"))
        bm = call.block_mask
        block = bm.BLOCK_SIZE[0] if bm is not None else 128
        kvn, kvi, fn, fi, has_full, bm_b, bm_h = _lists(bm, "kv", q.device)
        # no mask_mod: partial blocks count as fully visible (no_mask)
        mask_name, margs = _twin(bm.mask_mod) if bm is not None and bm.mask_mod is not None else ("no_mask", (0, 0, 0))
        score_name, sargs = _twin(call.score_mod) if call.score_mod is not None else ("no_score", (0, 0, 0))
        grid = (triton_cdiv(Sq, 64), B * H)
        K.flex_fwd[grid](
            q, k, v, out, lse, kvn, kvi, fn, fi,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            kvn.stride(0), kvn.stride(1), kvn.stride(2), kvi.stride(0), kvi.stride(1), kvi.stride(2),
            fn.stride(0), fn.stride(1), fn.stride(2), fi.stride(0), fi.stride(1), fi.stride(2),
            Sq, Sk, H, H // Hk, triton_cdiv(Sk, block), float(call.softmax_scale),
            *[_arg(a) for a in margs], *[_arg(a) for a in sargs],
            MASK_MOD=getattr(K, mask_name), SCORE_MOD=getattr(K, score_name), HAS_BLOCK_MASK=bm is not None,
            HAS_FULL=has_full, BM_B=bm_b, BM_H=bm_h, BLOCK_M=block, BLOCK_N=block,
            BLOCK_D=max(16, triton_next_pow2(D)), HEAD_DIM=D, SUB_N=64, SUB_M=64, num_warps=8, num_stages=1,
        )  # fmt: skip
        return out, lse

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        call: AttnCall,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        from ..torch_tiled import backend as engine

        captured = self._triton_backward(call)
        if captured is None:
            return engine.backward(dout, q, k, v, out, lse, call)
        return self._backward(dout, q, k, v, out, lse, call, captured)

    @staticmethod
    def _triton_backward(call: AttnCall) -> tuple[torch.Tensor, ...] | None:
        """The captured tensors (gradients wanted) when the Triton backward serves the call, else
        None: its dQ uses atomics, so deterministic calls take the torch engine's."""
        from ...flex import captured_tensors
        from . import kernels as K

        if call.deterministic:
            return None
        bm = call.block_mask
        if bm is not None and getattr(bm, "q_num_blocks", None) is None:
            return None
        if call.score_mod is None:
            return ()
        name, args = _twin(call.score_mod)
        if not hasattr(K, f"{name}_bwd"):
            return None
        captured = captured_tensors(call.score_mod)
        if captured and (len(captured) != 1 or captured[0] is not args[0] or not captured[0].is_contiguous()):
            return None
        return captured

    def _backward(self, dout, q, k, v, out, lse, call, captured):
        from . import kernels as K

        B, Sq, H, D = q.shape
        Sk, Hk = k.shape[1], k.shape[2]
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk, dv = torch.empty_like(k), torch.empty_like(v)
        grad = torch.zeros(captured[0].shape, dtype=torch.float32, device=q.device) if captured else None
        if q.numel() == 0 or k.numel() == 0:
            dk.zero_(), dv.zero_()
            return dq.to(q.dtype), dk, dv, ({"score_mod": (grad.to(captured[0].dtype),)} if captured else {})
        delta = (dout.float() * out.float()).sum(-1).permute(0, 2, 1).contiguous()  # (B, H, Sq)
        bm = call.block_mask
        block = bm.BLOCK_SIZE[0] if bm is not None else 128
        qn, qi, fn, fi, has_full, bm_b, bm_h = _lists(bm, "q", q.device)
        mask_name, margs = _twin(bm.mask_mod) if bm is not None and bm.mask_mod is not None else ("no_mask", (0, 0, 0))
        score_name, sargs = _twin(call.score_mod) if call.score_mod is not None else ("no_score", (0, 0, 0))
        grid = (triton_cdiv(Sk, 64), B * Hk)
        K.flex_bwd[grid](
            q, k, v, dout, dq, dk, dv, lse, delta, qn, qi, fn, fi,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), dout.stride(0), dout.stride(1), dout.stride(2),
            dq.stride(0), dq.stride(1), dq.stride(2), dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            qn.stride(0), qn.stride(1), qn.stride(2), qi.stride(0), qi.stride(1), qi.stride(2),
            fn.stride(0), fn.stride(1), fn.stride(2), fi.stride(0), fi.stride(1), fi.stride(2),
            Sq, Sk, H, Hk, H // Hk, triton_cdiv(Sq, block), float(call.softmax_scale),
            *[_arg(a) for a in margs], *[_arg(a) for a in sargs], grad if grad is not None else 0,
            MASK_MOD=getattr(K, mask_name), SCORE_MOD=getattr(K, score_name),
            SCORE_BWD=getattr(K, f"{score_name}_bwd"), GRAD=grad is not None,
            HAS_BLOCK_MASK=bm is not None, HAS_FULL=has_full, BM_B=bm_b, BM_H=bm_h, BLOCK_M=block, BLOCK_N=block,
            BLOCK_D=max(16, triton_next_pow2(D)), HEAD_DIM=D, SUB_M=64, SUB_N=64, num_warps=8, num_stages=1,
        )  # fmt: skip
        grads = {"score_mod": (grad.to(captured[0].dtype),)} if captured else {}
        return dq.to(q.dtype), dk, dv, grads

    def decode(self, q: torch.Tensor, cache: KVCache, call: AttnCall) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


def _lists(bm, side: str, device: torch.device):
    """The block mask's ``side`` ("kv": per query block; "q": per key block, for the backward)
    lists as int32 tensors read with unit stride: ``(num, idx, full_num, full_idx, has_full, B > 1,
    H > 1)``, placeholders without a block mask."""
    zero = torch.zeros(1, dtype=torch.int32, device=device)
    ph = (zero.view(1, 1, 1), zero.view(1, 1, 1, 1))
    if bm is None:
        return (*ph, *ph, False, 0, 0)

    def get(name):
        return getattr(bm, name).to(torch.int32).contiguous()

    num, idx = get(f"{side}_num_blocks"), get(f"{side}_indices")
    has_full = getattr(bm, f"full_{side}_num_blocks") is not None
    full = (get(f"full_{side}_num_blocks"), get(f"full_{side}_indices")) if has_full else ph
    return num, idx, *full, has_full, int(num.shape[0] > 1), int(num.shape[1] > 1)


def _arg(a):
    if isinstance(a, torch.Tensor):
        return a.detach()
    return a


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


backend = register(FlexTritonBackend())

__all__ = ["FlexTritonBackend", "backend"]
