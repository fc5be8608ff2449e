"""A library of common masks and score modifications for :func:`flashtile.flex_attention` and the
``score_mod=`` / ``block_mask=`` arguments (see :mod:`flashtile.flex` for the conventions).

mask_mods (``mask_mod(b, h, q_idx, kv_idx) -> bool``, True = visible; give them to
:func:`flashtile.create_block_mask`):

* :func:`causal`: ``q_idx >= kv_idx`` (top-left aligned, as FlexAttention; flash-attn's
  ``causal=True`` aligns to the bottom-right corner: the same when ``seqlen_q == seqlen_k``).
* :func:`sliding_window` ``(w)``: causal, and at most ``w`` positions back (flash-attn's
  ``causal=True, window_size=(w, 0)``).
* :func:`document` ``(seq_ids)``: packed documents, each token sees its own document (causally
  by default).
* :func:`prefix_lm` ``(prefix_len)``: the prefix is seen by every query, the rest causally.
* :func:`chunked` ``(chunk)``: Llama 4's chunked attention, causal within chunks of ``chunk``.
* :func:`bidirectional_blocks` ``(block_ids)``: causal, plus full attention inside marked spans
  (image tokens).

score_mods (``score_mod(score, b, h, q_idx, kv_idx) -> score``):

* :func:`alibi` ``(slopes)``: ``score - slope_h * |q_idx - kv_idx|`` (flash-attn's ``alibi_slopes``
  when ``seqlen_q == seqlen_k``); the slopes may require grad.
* :func:`softcap` ``(cap)``: ``cap * tanh(score / cap)`` (flash-attn's ``softcap``).
* :func:`relative_bias` ``(table)``: a learned bias per head and clamped relative distance.

:func:`draw` renders a mask_mod to a PNG (needs matplotlib: ``pip install 'flashtile[plot]'``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from .flex import dense_mask

__all__ = [
    "alibi",
    "bidirectional_blocks",
    "causal",
    "chunked",
    "document",
    "draw",
    "prefix_lm",
    "relative_bias",
    "sliding_window",
    "softcap",
]

MaskMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
ScoreMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _twin(fn: Callable, name: str, a0: object = 0, a1: object = 0, a2: object = 0) -> Callable:
    """Name the Triton version of ``fn`` written beside it (``backends/flex_triton/kernels.py``)
    and its three arguments (a captured tensor, a stride, a scalar), for kernels that compile
    the mod in; a mod without it is served by the torch engine."""
    fn._flashtile_triton = (name, (a0, a1, a2))
    return fn


def _check_int(x: object, name: str, low: int) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < low:
        raise ValueError(f"{name} must be an int >= {low}, got {x!r}")
    return x


def causal(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """mask_mod: query ``i`` sees keys ``j <= i``."""
    return q_idx >= kv_idx


_twin(causal, "causal")


def sliding_window(window: int) -> MaskMod:
    """mask_mod: causal, query ``i`` sees keys ``i - window <= j <= i`` (``window + 1`` keys)."""
    window = _check_int(window, "window", 0)

    def sliding_window_mask(b, h, q_idx, kv_idx):
        d = q_idx - kv_idx
        return (d >= 0) & (d <= window)

    return _twin(sliding_window_mask, "sliding_window", a2=window)


def _ids(ids: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dim() not in (1, 2) or ids.is_floating_point():
        raise ValueError(f"{name} must be an integer tensor (seqlen,) or (batch, seqlen), got {ids!r:.80}")
    return ids


def _at(ids: torch.Tensor, b: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return ids[idx] if ids.dim() == 1 else ids[b, idx]


def document(seq_ids: torch.Tensor, kv_seq_ids: torch.Tensor | None = None, causal: bool = True) -> MaskMod:
    """mask_mod of packed documents: query ``i`` sees key ``j`` when both belong to the same
    document (``seq_ids[i] == kv_seq_ids[j]``) and, if ``causal``, ``j <= i``.

    Args:
        seq_ids: integer ``(seqlen_q,)`` or ``(batch, seqlen_q)``, the document of each query
            position (e.g. ``[0, 0, 0, 1, 1, 2, ...]``).
        kv_seq_ids: the same for the keys (default: ``seq_ids``).
        causal: also causal inside each document.
    """
    qs = _ids(seq_ids, "seq_ids")
    ks = qs if kv_seq_ids is None else _ids(kv_seq_ids, "kv_seq_ids")

    def document_mask(b, h, q_idx, kv_idx):
        same = _at(qs, b, q_idx) == _at(ks, b, kv_idx)
        return same & (q_idx >= kv_idx) if causal else same

    if kv_seq_ids is None:
        _twin(document_mask, "document", qs.contiguous(), qs.shape[-1] if qs.dim() == 2 else 0, int(causal))
    return document_mask


def prefix_lm(prefix_len: int | torch.Tensor) -> MaskMod:
    """mask_mod of a prefix LM: every query sees the first ``prefix_len`` keys (bidirectional
    prefix), and the keys ``j <= i`` (causal). ``prefix_len``: an int, or an integer ``(batch,)``
    tensor (one prefix per sequence)."""
    if isinstance(prefix_len, torch.Tensor):
        if prefix_len.dim() != 1 or prefix_len.is_floating_point():
            raise ValueError(f"prefix_len must be an int or an integer (batch,) tensor, got {tuple(prefix_len.shape)}")
        plen = prefix_len

        def prefix_lm_mask(b, h, q_idx, kv_idx):
            return (kv_idx < plen[b]) | (q_idx >= kv_idx)

        _twin(prefix_lm_mask, "prefix_lm_per_row", plen.contiguous())
    else:
        n = _check_int(prefix_len, "prefix_len", 0)

        def prefix_lm_mask(b, h, q_idx, kv_idx):
            return (kv_idx < n) | (q_idx >= kv_idx)

        _twin(prefix_lm_mask, "prefix_lm", a2=n)
    return prefix_lm_mask


def chunked(chunk: int, causal: bool = True) -> MaskMod:
    """mask_mod of chunked attention (Llama 4's local layers): query ``i`` sees key ``j`` in the
    same chunk (``i // chunk == j // chunk``) and, if ``causal``, ``j <= i``."""
    chunk = _check_int(chunk, "chunk", 1)

    def chunked_mask(b, h, q_idx, kv_idx):
        same = (q_idx // chunk) == (kv_idx // chunk)
        return same & (q_idx >= kv_idx) if causal else same

    return _twin(chunked_mask, "chunked", a1=chunk, a2=int(causal))


def bidirectional_blocks(block_ids: torch.Tensor) -> MaskMod:
    """mask_mod: causal, plus full attention between positions of the same marked span (e.g.
    the tokens of one image). ``block_ids``: integer ``(seqlen,)`` or ``(batch, seqlen)``, the span
    of each position, negative for positions in no span."""
    ids = _ids(block_ids, "block_ids")

    def bidirectional_blocks_mask(b, h, q_idx, kv_idx):
        bq = _at(ids, b, q_idx)
        return (q_idx >= kv_idx) | ((bq >= 0) & (bq == _at(ids, b, kv_idx)))

    stride = ids.shape[-1] if ids.dim() == 2 else 0
    return _twin(bidirectional_blocks_mask, "bidirectional_blocks", ids.contiguous(), stride)


def alibi(slopes: torch.Tensor) -> ScoreMod:
    """score_mod of ALiBi: ``score - slopes[h] * |q_idx - kv_idx|``. ``slopes``: float ``(nheads,)``
    or ``(batch, nheads)``; it may require grad."""
    if not isinstance(slopes, torch.Tensor) or slopes.dim() not in (1, 2) or not slopes.is_floating_point():
        raise ValueError(f"slopes must be a float tensor (nheads,) or (batch, nheads), got {slopes!r:.80}")

    def alibi_score(score, b, h, q_idx, kv_idx):
        s = slopes[h] if slopes.dim() == 1 else slopes[b, h]
        return score - s * (q_idx - kv_idx).abs()

    return _twin(alibi_score, "alibi", slopes, slopes.stride(0) if slopes.dim() == 2 else 0)


def softcap(cap: float) -> ScoreMod:
    """score_mod: ``cap * tanh(score / cap)`` (Gemma-2's logit soft-capping)."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap > 0:
        raise ValueError(f"cap must be a positive float, got {cap!r}")
    cap = float(cap)

    def softcap_score(score, b, h, q_idx, kv_idx):
        return torch.tanh(score / cap) * cap

    return _twin(softcap_score, "softcap", a2=cap)


def relative_bias(table: torch.Tensor) -> ScoreMod:
    """score_mod of a learned relative-position bias: ``score + table[h, clamp(q_idx - kv_idx,
    -(M - 1), M - 1) + M - 1]`` for ``table (nheads, 2M - 1)`` (or ``(2M - 1,)`` shared by the
    heads): one entry per head and relative distance, distances beyond ``M - 1`` share the last.
    The table may require grad (it gets its gradient in the backward)."""
    if not isinstance(table, torch.Tensor) or table.dim() not in (1, 2) or table.shape[-1] % 2 != 1:
        raise ValueError(f"table must be a float tensor (nheads, 2M - 1) or (2M - 1,), got {table!r:.80}")
    m = (table.shape[-1] - 1) // 2

    def relative_bias_score(score, b, h, q_idx, kv_idx):
        d = (q_idx - kv_idx).clamp(-m, m) + m
        return score + (table[d] if table.dim() == 1 else table[h, d])

    return _twin(relative_bias_score, "relative_bias", table, table.stride(0) if table.dim() == 2 else 0, m)


def draw(
    mask_mod: MaskMod,
    q_len: int,
    kv_len: int,
    path: str | Path,
    *,
    b: int = 0,
    h: int = 0,
    title: str | None = None,
) -> Path:
    """Render ``mask_mod`` for batch ``b`` and head ``h`` over ``q_len x kv_len`` to a PNG at
    ``path`` (dark = visible), like attention-gym's pictures. Returns the path. Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError(
            "flashtile.masks.draw needs matplotlib: pip install 'flashtile[plot]' (or pip install matplotlib)"
        ) from e
    _check_int(q_len, "q_len", 1)
    _check_int(kv_len, "kv_len", 1)
    m = dense_mask(lambda bb, hh, qi, ki: mask_mod(bb + b, hh + h, qi, ki), 1, 1, q_len, kv_len)[0, 0]
    fig, ax = plt.subplots(figsize=(5, 5 * q_len / kv_len if kv_len else 5))
    ax.imshow(m.cpu().numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xlabel("kv_idx")
    ax.set_ylabel("q_idx")
    ax.set_title(title or getattr(mask_mod, "__name__", "mask"))
    path = Path(path)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
