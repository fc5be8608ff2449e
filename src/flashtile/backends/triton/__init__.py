"""The ``triton`` backend: fused forward and backward attention kernels written in Triton.

Serves fp16, bf16 and fp32 (IEEE fp32 products, never tf32) with head dims up to 256 on
CUDA (and ROCm, untested) devices, and on CPU tensors when ``TRITON_INTERPRET=1`` is set
before Triton is imported (the kernels then run in Triton's numpy interpreter: slow, for
tests). Every option of :class:`flashtile.spec.AttnCall` is supported: causal and sliding
windows, softcap, ALiBi, dropout, GQA/MQA, ``seqlen_q != seqlen_k``, varlen, learnable sinks
(with their gradient), a v head dim of its own, and KV-cache decoding (:mod:`.launch_decode`).

Importing this module never needs Triton; the kernels are imported on first use, so the
interpreter switch read at kernel definition time is honoured even if this module was
imported first. Calls are bitwise deterministic: the backward uses no atomics.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import torch

from ...spec import FEATURES, AttnCall, KVCache, Problem
from .. import _device
from ..base import Capabilities, register

MAX_HEADDIM = 256
_HAS_TRITON = importlib.util.find_spec("triton") is not None
#: Forward calls with at most this many query rows per KV head (``seqlen_q * nheads / nheads_k``)
#: go to the split-KV decode kernel (see :meth:`TritonBackend.forward`).
DECODE_SHAPED_ROWS = 64


def _interpret_env() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _interpreter_too_late() -> bool:
    """True when TRITON_INTERPRET=1 is set but Triton's own library was imported without it
    (Triton reads the switch at import): interpreted kernels would then fail."""
    std = sys.modules.get("triton.language.standard")
    return std is not None and type(getattr(std, "zeros", None)).__name__ != "InterpretedFunction"


# The launcher modules, imported on first use (they import Triton); kept here after that, since an
# import statement in a function costs ~1 us per call (issue 16).
_LAUNCH = _LAUNCH_DECODE = None


def _import(name: str):
    global _LAUNCH, _LAUNCH_DECODE
    mod = importlib.import_module(f"{__name__}.{name}")
    if name == "launch":
        _LAUNCH = mod
    else:
        _LAUNCH_DECODE = mod
    return mod


class TritonBackend:
    """Implements :class:`flashtile.backends.base.Backend` with Triton kernels.

    Forward calls with few query rows per KV head (``seqlen_q * nheads / nheads_k <=
    DECODE_SHAPED_ROWS``: decoding, speculative or chunked steps through ``flash_attn_func``; no
    dropout, not varlen) run the split-KV decode kernel of :mod:`.decode` over the dense k/v, with
    the same semantics: it reads each KV head once for its whole query group and spreads the keys
    over the SMs, where the forward kernel would give each query head a mostly empty row block
    (3.3-4.7x at 32k keys on the H200, benchmarks/NOTES.md). Their backward is the usual one.
    """

    name = "triton"
    dispatch_env = ("TRITON_INTERPRET",)  # available() / supports() read it (flashtile.dispatch caches on it)
    capabilities = Capabilities(
        priority=10,
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        max_headdim=MAX_HEADDIM,
        features=FEATURES,
        auto_devices=("cuda",),
        decode=True,
    )

    def available(self) -> str | None:
        if not _HAS_TRITON:
            return "triton is not installed (pip install triton)"
        if torch.cuda.is_available() or _interpret_env():
            return None
        return "no CUDA device, and TRITON_INTERPRET=1 is not set"

    def supports(self, problem: Problem, call: AttnCall) -> str | None:
        dev = problem.device
        if dev.type == "cuda":
            if not torch.version.hip:
                info = _device.info(dev)
                if info is not None and info.major < 8:
                    return f"the triton backend needs compute capability 8.0 or newer, device has {info.major}.x"
        elif not (_interpret_env() and dev.type == "cpu"):
            return f"{dev.type} tensors need CUDA, or CPU tensors with TRITON_INTERPRET=1"
        elif _interpreter_too_late():
            return "TRITON_INTERPRET=1 was set after triton was imported (set it before starting Python)"
        return None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not call.varlen and call.dropout_p == 0.0 and q.shape[1] * (q.shape[2] // k.shape[2]) <= DECODE_SHAPED_ROWS \
                and k.shape[1] > 0 and q.numel() > 0:  # fmt: skip
            return (_LAUNCH_DECODE or _import("launch_decode")).dense(q, k, v, call)
        return (_LAUNCH or _import("launch")).forward(q, k, v, call)

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
        return (_LAUNCH or _import("launch")).backward(dout, q, k, v, out, lse, call)

    def decode(self, q: torch.Tensor, cache: KVCache, call: AttnCall) -> tuple[torch.Tensor, torch.Tensor]:
        return (_LAUNCH_DECODE or _import("launch_decode")).kvcache(q, cache, call)


backend = register(TritonBackend())

__all__ = ["TritonBackend", "backend", "MAX_HEADDIM", "DECODE_SHAPED_ROWS"]
