"""Attention backends: ``torch`` (tiled PyTorch, any device) and ``triton`` (GPU kernels)."""

from .base import Backend, register, registry

__all__ = ["Backend", "register", "registry"]
