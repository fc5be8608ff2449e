"""The ``triton`` backend: fused forward and backward attention kernels written in Triton.

Serves fp16, bf16 and fp32 (IEEE fp32 products, never tf32) with head dims up to 256 on
CUDA (and ROCm, untested) devices, and on CPU tensors when ``TRITON_INTERPRET=1`` is set
before Triton is imported (the kernels then run in Triton's numpy interpreter: slow, for
tests). Every option of :class:`flashtile.spec.AttnSpec` is supported: causal and sliding
windows, softcap, ALiBi, dropout, GQA/MQA, ``seqlen_q != seqlen_k`` and varlen.

Importing this module never needs Triton; the kernels are imported on first use, so the
interpreter switch read at kernel definition time is honoured even if this module was
imported first. Calls are bitwise deterministic: the backward uses no atomics.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

from ...spec import AttnSpec, Problem

MAX_HEADDIM = 256
_HAS_TRITON = importlib.util.find_spec("triton") is not None


_CUDA_MAJOR: dict[int, int] = {}


def _cuda_major(index: int | None) -> int | None:
    """Compute capability major of a CUDA device, cached. Inside a torch.compile trace it only
    reads the cache (the query returns a tuple, which Dynamo cannot put in a graph): None when
    this device was never asked about eagerly, and the caller then skips the check."""
    if index is None:
        if torch.compiler.is_compiling():
            return next(iter(_CUDA_MAJOR.values()), None)
        index = torch.cuda.current_device()
    if index not in _CUDA_MAJOR:
        if torch.compiler.is_compiling():
            return None
        _CUDA_MAJOR[index] = torch.cuda.get_device_capability(index)[0]
    return _CUDA_MAJOR[index]


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _interpreter_too_late() -> bool:
    """True when TRITON_INTERPRET=1 is set but Triton's own library was imported without it
    (Triton reads the switch at import): interpreted kernels would then fail."""
    std = sys.modules.get("triton.language.standard")
    return std is not None and type(getattr(std, "zeros", None)).__name__ != "InterpretedFunction"


class TritonBackend:
    """Implements :class:`flashtile.backends.base.Backend` with Triton kernels."""

    name = "triton"

    def available(self) -> str | None:
        if not _HAS_TRITON:
            return "triton is not installed (pip install triton)"
        if torch.cuda.is_available() or _interpret_env():
            return None
        return "no CUDA device, and TRITON_INTERPRET=1 is not set"

    def supports(self, problem: Problem, spec: AttnSpec) -> str | None:
        why = self.available()
        if why is not None:
            return why
        dev = problem.device
        if dev.type == "cuda":
            if not torch.version.hip:
                major = _cuda_major(dev.index)
                if major is not None and major < 8:
                    return f"the triton backend needs compute capability 8.0 or newer, device has {major}.x"
        elif not (_interpret_env() and dev.type == "cpu"):
            return f"{dev.type} tensors need CUDA, or CPU tensors with TRITON_INTERPRET=1"
        elif _interpreter_too_late():
            return "TRITON_INTERPRET=1 was set after triton was imported (set it before starting Python)"
        if problem.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return f"dtype {problem.dtype} is not supported (float16, bfloat16, float32)"
        if problem.headdim > MAX_HEADDIM:
            return f"head dim {problem.headdim} > {MAX_HEADDIM}"
        return None

    def forward(
        self,
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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from . import launch

        return launch.forward(
            q, k, v, spec, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
            max_seqlen_k=max_seqlen_k, alibi_slopes=alibi_slopes, seed=seed,
        )

    def backward(
        self,
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
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from . import launch

        return launch.backward(
            dout, q, k, v, out, lse, spec, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
            max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, alibi_slopes=alibi_slopes, seed=seed,
        )


backend = TritonBackend()

__all__ = ["TritonBackend", "backend", "MAX_HEADDIM"]
