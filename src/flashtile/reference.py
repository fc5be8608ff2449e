"""The test oracle: attention that materialises the (seqlen_q x seqlen_k) score matrix.

``attention_ref`` supports every option of the public API. It runs in two modes:

* ``upcast=True`` (default): computes in float32 (float64 for float64 inputs): the "ref".
* ``upcast=False``: computes in the input dtype, as a plain PyTorch implementation would:
  the "pt" baseline whose error sets the tolerance (flash-attn's rule: a kernel's error
  against "ref" must be within 2x of "pt"'s, 3x for gradients, plus a small atol).

It is O(seqlen_q * seqlen_k) in memory: for tests and ``flashtile check`` only.
"""

from __future__ import annotations

import math

import torch

from .mask import alibi_bias, visible


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    query_padding_mask: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    dropout_mask: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    upcast: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention in the dense layout.

    Args:
        q: ``(batch, seqlen_q, nheads, headdim)``.
        k, v: ``(batch, seqlen_k, nheads_k, headdim)``; ``nheads % nheads_k == 0``.
        query_padding_mask / key_padding_mask: optional bool ``(batch, seqlen)``, True = real token.
            Sequences are taken as right-padded: the causal/window alignment uses each
            sequence's own lengths, exactly as the varlen API does.
        causal, window_size, softcap, alibi_slopes, softmax_scale: as in ``flash_attn_func``.
        dropout_p, dropout_mask: bool keep mask ``(batch, nheads, seqlen_q, seqlen_k)``; kept
            probabilities are scaled by ``1 / (1 - dropout_p)``.
        upcast: compute in float32 (True) or in the input dtype (False).

    Returns:
        ``(out, lse)``: out ``(batch, seqlen_q, nheads, headdim)`` in q's dtype, lse float32
        ``(batch, nheads, seqlen_q)``; rows that see no key give out = 0 and lse = -inf.
    """
    dtype_og = q.dtype
    if upcast:
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        q, k, v = q.to(cdt), k.to(cdt), v.to(cdt)
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    g = h // hk
    k = k.repeat_interleave(g, dim=2)
    v = v.repeat_interleave(g, dim=2)
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    scores = torch.einsum("bthd,bshd->bhts", q * scale if softcap == 0 else q, k)
    if softcap > 0:
        scores = torch.tanh(scores * (scale / softcap)) * softcap
    rows = torch.arange(sq, device=q.device)
    cols = torch.arange(sk, device=q.device)
    if query_padding_mask is not None or key_padding_mask is not None:
        len_q = query_padding_mask.sum(-1) if query_padding_mask is not None else torch.full((b,), sq)
        len_k = key_padding_mask.sum(-1) if key_padding_mask is not None else torch.full((b,), sk)
        offset = (len_k - len_q).to(q.device).view(b, 1, 1, 1)
    else:
        offset = sk - sq
    if alibi_slopes is not None:
        slopes = alibi_slopes if alibi_slopes.dim() == 2 else alibi_slopes.unsqueeze(0).expand(b, h)
        scores = scores + alibi_bias(slopes.view(b, h, 1, 1), rows, cols, offset).to(scores.dtype)
    left, right = window_size
    if causal:
        right = 0
    vis = visible(rows, cols, offset, left, right)
    masked = torch.zeros(1, dtype=torch.bool, device=q.device)
    if vis is not None:
        masked = masked | ~vis
    if key_padding_mask is not None:
        masked = masked | ~key_padding_mask.view(b, 1, 1, sk)
    scores = scores.masked_fill(masked, float("-inf"))
    lse = torch.logsumexp(scores.float(), dim=-1)
    m = scores.amax(dim=-1, keepdim=True) if sk > 0 else scores.new_zeros((*scores.shape[:-1], 1))
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    p = torch.exp(scores - m)
    denom = p.sum(-1, keepdim=True)
    p = p / torch.where(denom == 0, torch.ones_like(denom), denom)
    if dropout_p > 0.0:
        if dropout_mask is None:
            raise ValueError("attention_ref needs dropout_mask when dropout_p > 0")
        p = p.masked_fill(~dropout_mask, 0.0) / (1.0 - dropout_p)
    out = torch.einsum("bhts,bshd->bthd", p.to(v.dtype), v)
    if query_padding_mask is not None:
        out = out.masked_fill(~query_padding_mask.view(b, sq, 1, 1), 0.0)
        lse = lse.masked_fill(~query_padding_mask.view(b, 1, sq), float("-inf"))
    return out.to(dtype_og), lse


def attention_probs_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    **kwargs,
) -> torch.Tensor:
    """The attention probabilities ``(batch, nheads, seqlen_q, seqlen_k)`` after dropout (zeros
    where dropped, kept entries scaled by ``1 / (1 - p)``), such that ``out = probs @ v``.
    Same arguments as :func:`attention_ref`; computed in float32."""
    # Recover P from the reference by running it with v = identity over keys.
    b, sk = k.shape[0], k.shape[1]
    h = q.shape[2]
    hk = k.shape[2]
    eye = torch.eye(sk, dtype=torch.float32, device=q.device)
    v_eye = eye.view(1, sk, 1, sk).expand(b, sk, hk, sk)
    probs, _ = attention_ref(q.float(), k.float(), v_eye, **kwargs)
    return probs.permute(0, 2, 1, 3).reshape(b, h, q.shape[1], sk)
