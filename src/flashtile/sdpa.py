"""``torch.nn.functional.scaled_dot_product_attention``'s signature on flashtile.

Replace ``F.scaled_dot_product_attention`` with :func:`scaled_dot_product_attention` in code
that uses the ``(batch, heads, seqlen, headdim)`` layout, and the attention runs through
flashtile's kernels (the tiled torch engine or Triton) without materialising the scores.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .flex import mods_from_dense_mask
from .interface import flash_attn_func, flash_attn_varlen_func
from .padding import unpad_input
from .spec import SUPPORTED_DTYPES


def _key_padding(attn_mask: torch.Tensor, b: int, sk: int) -> torch.Tensor | None:
    """A mask broadcastable to ``(b, h, sq, sk)`` that depends on the batch and key only, and is
    bool or 0 / -inf, as a bool ``(b, sk)`` keep-mask (served by dropping keys); None for any other
    mask (served through a block mask, see :func:`flashtile.flex.mods_from_dense_mask`)."""
    m = attn_mask
    if m.dim() > 4:
        raise ValueError(f"attn_mask must broadcast to (batch, heads, seqlen_q, seqlen_k), got {tuple(m.shape)}")
    if m.dtype != torch.bool and not m.is_floating_point():
        raise TypeError(f"attn_mask must be bool or floating point, got {m.dtype}")
    m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))  # (B?, H?, Sq?, Sk?)
    if m.shape[1] != 1 or m.shape[2] != 1 or m.shape[0] not in (1, b) or m.shape[3] not in (1, sk):
        return None
    m = m.reshape(m.shape[0], m.shape[3]).expand(b, sk)
    if m.dtype == torch.bool:
        return m
    keep = m == 0
    return keep if bool((keep | (m == float("-inf"))).all()) else None


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """``softmax(query @ key^T * scale + mask) @ value`` with PyTorch's SDPA signature and layout.

    Args:
        query: ``(..., heads, seqlen_q, E)``; the leading dims are the batch (3-D input: no batch).
        key: ``(..., heads_k, seqlen_k, E)``; value: ``(..., heads_k, seqlen_k, Ev)``. The batch dims
            must be equal (no broadcasting). ``Ev != E`` is served (the shorter of q/k and v is
            zero-padded internally, which changes no result; the output has ``Ev`` channels).
            dtypes: float16, bfloat16, float32.
        attn_mask: optional, broadcastable to ``(batch, heads, seqlen_q, seqlen_k)`` (at most 4
            dims). Boolean: True = take part (SDPA's convention); float: added to the scores.
            A **key-padding mask** (shape ``(batch, 1, 1, seqlen_k)`` broadcast, bool or 0 / -inf)
            drops the masked keys and runs the varlen kernel (they cost nothing); any other mask
            is served as a block mask of it (:func:`flashtile.flex.mods_from_dense_mask`: blocks
            it hides entirely are skipped; float entries other than 0 and very negative ones are a
            bias added by a score_mod, with a gradient if the mask requires one). Reading the mask
            syncs with the device.
        dropout_p: dropout on the attention probabilities, applied whenever ``dropout_p > 0``
            (as in PyTorch, pass ``0.0`` at evaluation). Drawn from flashtile's generator, so
            the dropped entries differ from PyTorch's for the same seed.
        is_causal: PyTorch's causal mask, aligned to the **top-left** corner: query ``i`` sees keys
            ``j <= i`` (flash-attn aligns to the bottom-right; the two agree when
            ``seqlen_q == seqlen_k``). Mapped exactly: with ``seqlen_k > seqlen_q`` the keys past
            ``seqlen_q`` are never visible and are dropped; with ``seqlen_k < seqlen_q`` a window
            ``(-1, seqlen_q - seqlen_k)`` reproduces the top-left diagonal. Cannot be combined with
            ``attn_mask`` (as in PyTorch).
        scale: default ``1 / sqrt(E)``.
        enable_gqa: allow ``heads_k`` to divide ``heads``: query head ``i`` uses key/value head
            ``i // (heads // heads_k)`` (PyTorch's grouping).

    Returns:
        ``(..., heads, seqlen_q, Ev)``, in query's dtype (a transposed view of flashtile's
        ``(batch, seqlen, heads, Ev)`` output). Differences from PyTorch: a query row that sees no
        key outputs 0 (PyTorch gives NaN); no broadcasting of batch dims. Empty sequences or head
        counts give PyTorch's result: zeros where there is no key, an empty tensor where there is
        no query or head.
    """
    for x, n in ((query, "query"), (key, "key"), (value, "value")):
        if not isinstance(x, torch.Tensor) or x.dim() < 3:
            raise ValueError(f"{n} must be a tensor (..., heads, seqlen, headdim) with at least 3 dims")
    if not (query.shape[:-3] == key.shape[:-3] == value.shape[:-3]):
        raise ValueError(f"query, key, value must have the same batch dims, got {tuple(query.shape[:-3])}, "
                         f"{tuple(key.shape[:-3])}, {tuple(value.shape[:-3])}")  # fmt: skip
    if key.shape[:-1] != value.shape[:-1]:
        raise ValueError(f"key and value must agree except in the last dim, got {tuple(key.shape)} and "
                         f"{tuple(value.shape)}")  # fmt: skip
    h, hk = query.shape[-3], key.shape[-3]
    if h != hk and not enable_gqa:
        raise ValueError(f"query has {h} heads and key/value {hk}: pass enable_gqa=True for grouped-query attention")
    if h != hk and (hk == 0 or h % hk):
        raise ValueError(f"enable_gqa: the key/value heads ({hk}) must divide the query heads ({h})")
    if is_causal and attn_mask is not None:
        raise ValueError("attn_mask and is_causal cannot both be set (as in PyTorch's SDPA)")
    if query.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"query must be float16, bfloat16 or float32, got {query.dtype}")
    for x, n in ((key, "key"), (value, "value")):
        if x.dtype != query.dtype:
            raise TypeError(f"{n} must have the same dtype as query ({query.dtype}), got {x.dtype}")
        if x.device != query.device:
            raise ValueError(f"{n} must be on the same device as query ({query.device}), got {x.device}")

    batch_shape = query.shape[:-3]
    sq, sk, e, ev = query.shape[-2], key.shape[-2], query.shape[-1], value.shape[-1]
    scale = 1.0 / math.sqrt(e) if scale is None else scale
    if h == 0:  # no heads: an empty result, still in the autograd graph of the inputs (as PyTorch's)
        return query.new_zeros(*batch_shape, 0, sq, ev) + 0 * (query.sum() + key.sum() + value.sum())
    nb = math.prod(batch_shape)  # explicit: reshape(-1, ...) is ambiguous when a sequence is empty

    def bshd(x: torch.Tensor) -> torch.Tensor:  # (..., h, s, d) -> (b, s, h, d), last dim contiguous
        x = x.reshape(nb, *x.shape[-3:]).transpose(1, 2)
        return x if x.stride(-1) == 1 else x.contiguous()

    q, k, v = bshd(query), bshd(key), bshd(value)
    d = max(e, ev)
    if e < d:
        q, k = F.pad(q, (0, d - e)), F.pad(k, (0, d - e))
    elif ev < d:
        v = F.pad(v, (0, d - ev))
    b = q.shape[0]

    causal, window = False, (-1, -1)
    if is_causal and sk > sq:  # top-left: keys j >= sq are seen by no query
        k, v, sk, causal = k[:, :sq], v[:, :sq], sq, True
    elif is_causal and sk < sq:  # top-left diagonal j <= i is the bottom-right one shifted by sq - sk
        window = (-1, sq - sk)
    elif is_causal:
        causal = True

    if attn_mask is None:
        out = flash_attn_func(q, k, v, dropout_p, softmax_scale=scale, causal=causal, window_size=window)
    else:
        keep = _key_padding(attn_mask.to(q.device), b, sk)  # (b, sk)
    if attn_mask is not None and keep is None:  # any other mask: a block mask (and a bias score_mod)
        mask = attn_mask.to(q.device)
        if len(batch_shape) != 1 and mask.dim() == 4 and mask.shape[0] != 1:
            raise ValueError("with several batch dims, a 4-D attn_mask must have batch dim 1, got "
                             f"{tuple(attn_mask.shape)}")  # fmt: skip
        block_mask, score_mod = mods_from_dense_mask(mask, b, h, sq, sk)
        out = flash_attn_func(q, k, v, dropout_p, softmax_scale=scale, block_mask=block_mask, score_mod=score_mod)
    elif attn_mask is not None:
        kv_u, _, cu_k, max_k, _ = unpad_input(torch.stack((k, v), dim=2), keep)  # (t_k, 2, hk, d): kept keys
        k_u, v_u = kv_u.unbind(1)
        cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device)
        out = flash_attn_varlen_func(q.reshape(b * sq, h, d), k_u, v_u, cu_q, cu_k, sq, max_k, dropout_p,
                                     softmax_scale=scale)  # fmt: skip
        out = out.view(b, sq, h, d)
    out = out[..., :ev].transpose(1, 2)  # (b, h, sq, ev)
    return out.reshape(*batch_shape, h, sq, ev) if len(batch_shape) != 1 else out


__all__ = ["scaled_dot_product_attention"]
