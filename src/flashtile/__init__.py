"""flashtile: FlashAttention as a Python library.

Exact attention computed tile by tile with an online softmax, behind flash-attn 2's API:
Triton kernels on GPUs, a tiled PyTorch engine on every device.
"""

import importlib

from . import _prewarm
from ._version import __version__
from .dispatch import BackendUnavailableError, use_backend
from .interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from .kvcache import flash_attn_with_kvcache
from .padding import pad_input, unpad_input
from .sdpa import scaled_dot_product_attention

_prewarm.start()  # Triton's per-process cache key, hashed in the background (start-up; FLASHTILE_PREWARM=0: off)

__all__ = [
    "BackendUnavailableError",
    "BlockMask",
    "create_block_mask",
    "flex_attention",
    "masks",
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_with_kvcache",
    "models",
    "modules",
    "pad_input",
    "scaled_dot_product_attention",
    "unpad_input",
    "use_backend",
    "__version__",
]


_FLEX_NAMES = ("BlockMask", "create_block_mask", "flex_attention")


def __getattr__(name: str):
    """``flashtile.models`` / ``modules`` / ``masks`` and the FlexAttention API (:mod:`flashtile.flex`,
    which imports torch's flex_attention and so Triton) are imported on first use (start-up time;
    and the triton backend's interpreter switch is read when Triton is first imported)."""
    if name in ("models", "modules", "masks"):
        return importlib.import_module(f"{__name__}.{name}")
    if name in _FLEX_NAMES:
        return getattr(importlib.import_module(f"{__name__}.flex"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
