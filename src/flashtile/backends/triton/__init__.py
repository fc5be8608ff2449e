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

import torch

from ...spec import AttnSpec, Problem

MAX_HEADDIM = 256


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


class TritonBackend:
    """Implements :class:`flashtile.backends.base.Backend` with Triton kernels."""

    name = "triton"

    def available(self) -> str | None:
        if importlib.util.find_spec("triton") is None:
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
                major, _ = torch.cuda.get_device_capability(dev)
                if major < 8:
                    return f"the triton backend needs compute capability 8.0 or newer, device has {major}.x"
        elif not (_interpret_env() and dev.type == "cpu"):
            return f"{dev.type} tensors need CUDA, or CPU tensors with TRITON_INTERPRET=1"
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
