"""The ``flex_triton`` backend: calls with ``score_mod`` / ``block_mask`` whose mods have Triton
versions (every mod of :mod:`flashtile.masks`) get a Triton forward kernel with the mods compiled
in and the block mask's empty blocks skipped (:mod:`.kernels`); the backward is the torch engine's
(correct from the saved out / lse, and it gives the captured tensors' gradients), so this backend
speeds up the forward only.

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
        zero = torch.zeros(1, dtype=torch.int32, device=q.device)
        if bm is not None:
            kvn, kvi = bm.kv_num_blocks.to(torch.int32), bm.kv_indices.to(torch.int32)
            has_full = bm.full_kv_num_blocks is not None
            fn, fi = (bm.full_kv_num_blocks.to(torch.int32), bm.full_kv_indices.to(torch.int32)) if has_full \
                else (zero.view(1, 1, 1), zero.view(1, 1, 1, 1))  # fmt: skip
            bm_b, bm_h = int(kvn.shape[0] > 1), int(kvn.shape[1] > 1)
        else:
            kvn, kvi = zero.view(1, 1, 1), zero.view(1, 1, 1, 1)
            fn, fi, has_full, bm_b, bm_h = kvn, kvi, False, 0, 0
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

        return engine.backward(dout, q, k, v, out, lse, call)

    def decode(self, q: torch.Tensor, cache: KVCache, call: AttnCall) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


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
