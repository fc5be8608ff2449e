"""The ``flex_triton`` backend: calls with ``score_mod`` / ``block_mask`` whose mods have Triton
versions (every mod of :mod:`flashtile.masks`) get a Triton forward kernel with the mods compiled
in, the block mask's empty blocks skipped and its full blocks computed without the mask_mod
(:mod:`.kernels`, structured as the built-in Triton kernels). The backward is Triton kernels
too (a dK / dV pass per key block over the block mask's transposed lists and a dQ pass per query
block, no atomics; the captured tensor's gradient reduced per program and added with a few fp32
atomics) when the score_mod has a derivative written beside it (alibi, softcap, relative_bias, or
none), and for a captured tensor, when the call is not ``deterministic``; otherwise the torch
engine's (correct from the saved out / lse). Launches and tile configs: :mod:`.launch`.

Serves CUDA tensors (and CPU tensors under ``TRITON_INTERPRET=1``, for tests), fp16 / bf16, head
dim <= 128, dense (not varlen) calls without dropout or other options, softmax_scale > 0 without
a score_mod; block masks built with
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
    if call.score_mod is None and not call.softmax_scale > 0:
        return "softmax_scale must be > 0 without a score_mod (the kernels take the row max before scaling)"
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
        from . import launch

        return launch.forward(q, k, v, call)

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
        from . import launch

        captured = self._triton_backward(call)
        if captured is None:
            return engine.backward(dout, q, k, v, out, lse, call)
        return launch.backward(dout, q, k, v, out, lse, call, captured)

    @staticmethod
    def _triton_backward(call: AttnCall) -> tuple[torch.Tensor, ...] | None:
        """The captured tensors (gradients wanted) when the Triton backward serves the call, else
        None. dQ / dK / dV take no atomics (reproducible); a captured tensor's gradient does, so
        ``deterministic`` calls with one take the torch engine's backward."""
        from ...flex import captured_tensors
        from . import kernels as K

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
        if captured and (call.deterministic or not hasattr(K, f"{name}_grad")):
            return None
        return captured

    def decode(self, q: torch.Tensor, cache: KVCache, call: AttnCall) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


backend = register(FlexTritonBackend())

__all__ = ["FlexTritonBackend", "backend"]
