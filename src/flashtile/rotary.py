"""Rotary position embeddings (RoPE), flash-attn's conventions.

``cos`` / ``sin`` have shape ``(seqlen_ro, rotary_dim / 2)``; the first ``rotary_dim`` channels
of each head are rotated, the rest pass through.

* ``interleaved=False`` (GPT-NeoX / Llama style): channel ``c < rotary_dim / 2`` is paired
  with channel ``c + rotary_dim / 2``.
* ``interleaved=True`` (GPT-J style): channels ``2c`` and ``2c + 1`` are paired.

A pair ``(x1, x2)`` at position ``p`` becomes ``(x1 cos - x2 sin, x1 sin + x2 cos)`` with
``cos = cos[p, c]``; computed in float32 and cast back to x's dtype.
"""

from __future__ import annotations

import torch

from .paged import packed_positions
from .spec import capturing


def rotary_cos_sin(
    seqlen: int,
    rotary_dim: int,
    base: float = 10000.0,
    *,
    scaling_factor: float = 1.0,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``(cos, sin)`` tables ``(seqlen, rotary_dim // 2)`` for positions ``0 .. seqlen - 1``
    (``scaling_factor`` > 1 is linear position interpolation)."""
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even number, got {rotary_dim}")
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, device=device, dtype=torch.float32) / rotary_dim))
    t = torch.arange(seqlen, device=device, dtype=torch.float32) / scaling_factor
    freqs = torch.outer(t, inv_freq)
    return freqs.cos().to(dtype), freqs.sin().to(dtype)


def check_rotary_tables(cos: object, sin: object, headdim: int, device: torch.device) -> None:
    """``cos`` / ``sin``: floating tensors ``(seqlen_ro, rotary_dim / 2)`` on ``device`` with
    ``rotary_dim <= headdim`` and a contiguous last dim."""
    for t, n in ((cos, "rotary_cos"), (sin, "rotary_sin")):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{n} must be a floating-point tensor, got {getattr(t, 'dtype', type(t).__name__)}")
        if t.device != device:
            raise ValueError(f"{n} must be on the same device as the rotated tensor ({device}), got {t.device}")
    if cos.shape != sin.shape or cos.dim() != 2 or cos.shape[1] == 0:
        raise ValueError(f"rotary_cos and rotary_sin must both be (seqlen_ro, rotary_dim / 2), got "
                         f"{tuple(cos.shape)} and {tuple(sin.shape)}")  # fmt: skip
    if 2 * cos.shape[1] > headdim:
        raise ValueError(f"rotary dim {2 * cos.shape[1]} (2 * cos.shape[-1]) is larger than the head dim {headdim}")
    if cos.stride(-1) != 1 or sin.stride(-1) != 1:
        raise ValueError("rotary_cos and rotary_sin must be contiguous in their last dimension")


def apply_rotary_at(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor, interleaved: bool = False
) -> torch.Tensor:
    """Rotate ``x (..., seqlen, nheads, headdim)`` with token positions ``positions`` broadcastable
    to ``x.shape[:-2]`` (int tensor). Returns a new tensor."""
    check_rotary_tables(cos, sin, x.shape[-1], x.device)
    half = cos.shape[-1]
    rd = 2 * half
    positions = positions.to(device=x.device, dtype=torch.long)
    n = cos.shape[0]
    if torch.compiler.is_compiling() or capturing(positions):
        # Traced (torch.compile) or captured in a CUDA graph: no host check possible. Stay in
        # bounds and make out-of-range positions NaN rather than silently rotated by another angle.
        bad = (positions < 0) | (positions >= n)
        positions = positions.clamp(0, max(n - 1, 0))
        c = torch.where(bad[..., None], float("nan"), cos.float()[positions]).unsqueeze(-2)
        s = torch.where(bad[..., None], float("nan"), sin.float()[positions]).unsqueeze(-2)
    else:
        if positions.numel() and (int(positions.max()) >= n or int(positions.min()) < 0):
            raise ValueError(f"rotary position {int(positions.max())} is out of range of rotary_cos/rotary_sin "
                             f"(seqlen_ro = {n})")  # fmt: skip
        c = cos.float()[positions].unsqueeze(-2)  # (..., s, 1, half)
        s = sin.float()[positions].unsqueeze(-2)
    xf = x[..., :rd].float()
    if interleaved:
        x1, x2 = xf[..., 0::2], xf[..., 1::2]
        rot = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xf[..., :half], xf[..., half:]
        rot = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rot.to(x.dtype), x[..., rd:]), dim=-1) if rd < x.shape[-1] else rot.to(x.dtype)


def apply_rotary_emb(
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    interleaved: bool = False,
    inplace: bool = False,
    seqlen_offsets: int | torch.Tensor = 0,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Apply rotary embeddings to ``x``.

    Args:
        x: ``(batch, seqlen, nheads, headdim)``, or ``(total, nheads, headdim)`` with ``cu_seqlens``.
        cos, sin: ``(seqlen_ro, rotary_dim / 2)``.
        interleaved: GPT-J style pairs (True) or NeoX style halves (False).
        inplace: write the result into ``x``.
        seqlen_offsets: position of each sequence's first token: int or ``(batch,)`` tensor
            (e.g. the KV-cache length during decoding).
        cu_seqlens: int32 ``(batch + 1,)`` for the packed layout; positions restart at each sequence.

    Returns:
        The rotated tensor, same shape and dtype as ``x`` (``x`` itself when ``inplace``).
    """
    if cu_seqlens is None:
        if x.dim() != 4:
            raise ValueError(f"x must be (batch, seqlen, nheads, headdim), got {tuple(x.shape)}")
        b, s = x.shape[:2]
        pos = torch.arange(s, device=x.device).view(1, s)
        off = seqlen_offsets.view(b, 1) if isinstance(seqlen_offsets, torch.Tensor) else seqlen_offsets
        pos = (pos + off).expand(b, s)
    else:
        if x.dim() != 3:
            raise ValueError(f"x must be (total, nheads, headdim) with cu_seqlens, got {tuple(x.shape)}")
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long().to(x.device)
        seq_id, pos = packed_positions(lens, total=x.shape[0])
        if isinstance(seqlen_offsets, torch.Tensor):
            pos = pos + seqlen_offsets.to(x.device).long()[seq_id]
        else:
            pos = pos + seqlen_offsets
    out = apply_rotary_at(x, cos, sin, pos, interleaved)
    if inplace:
        x.copy_(out)
        return x
    return out
