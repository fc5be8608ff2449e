"""Merge partial attention states.

Attention over keys ``K = K_1 u K_2 u ...`` can be computed piece by piece: each piece gives
``(out_i, lse_i)`` (softmax-normalised within the piece), and the exact result is

    lse = log(sum_i exp(lse_i)),    out = sum_i exp(lse_i - lse) * out_i.

Split-KV decoding and ring attention both use this. A piece that saw no key has
``lse_i = -inf`` and contributes nothing; if no piece saw a key, out = 0 and lse = -inf.
"""

from __future__ import annotations

import torch


def merge_states(
    outs: torch.Tensor | list[torch.Tensor], lses: torch.Tensor | list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge ``n`` partial states.

    Args:
        outs: ``(n, *batch, seqlen, nheads, headdim)`` or a list of such tensors without the
            leading ``n``.
        lses: float32 ``(n, *batch, nheads, seqlen)`` (flash-attn's lse layout), or a list.

    Returns:
        ``(out, lse)``: out in the dtype of ``outs``, lse float32, without the leading ``n``.
    """
    if isinstance(outs, (list, tuple)):
        outs = torch.stack(list(outs))
    if isinstance(lses, (list, tuple)):
        lses = torch.stack(list(lses))
    lses = lses.float()
    lse = torch.logsumexp(lses, dim=0)
    lse_safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    w = torch.exp(lses - lse_safe)  # (n, ..., h, s); 0 where the piece or the row is empty
    w = w.transpose(-1, -2).unsqueeze(-1)  # (n, ..., s, h, 1)
    out = (w * outs.float()).sum(0)
    return out.to(outs.dtype), lse


def _weights(lse_a: torch.Tensor, lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(lse, wa, wb)`` of merging two states: the merged float32 lse and each state's weight,
    shaped ``(..., s, h, 1)`` to scale outputs; weights are 0 where the row is empty."""
    lse_a, lse_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)
    lse_safe = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse)
    wa = torch.exp(lse_a - lse_safe).transpose(-1, -2).unsqueeze(-1)
    wb = torch.exp(lse_b - lse_safe).transpose(-1, -2).unsqueeze(-1)
    return lse, wa, wb


def merge_two(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two partial states of the same shape (see :func:`merge_states`); numerically stable."""
    lse, wa, wb = _weights(lse_a, lse_b)
    out = wa * out_a.float() + wb * out_b.float()
    return out.to(out_a.dtype), lse


def merge_two_(acc_out: torch.Tensor, acc_lse: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor) -> None:
    """:func:`merge_two` into a float32 running state ``(acc_out, acc_lse)`` in place (views
    allowed): ``acc_out = wa * acc_out + wb * out_b`` in two passes over ``acc_out`` instead of
    new tensors for every term."""
    lse, wa, wb = _weights(acc_lse, lse_b)
    acc_out.mul_(wa).addcmul_(out_b, wb)
    acc_lse.copy_(lse)
