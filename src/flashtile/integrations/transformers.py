"""Hugging Face transformers integration: ``attn_implementation="flashtile"``.

::

    import flashtile.integrations.transformers as ft_hf
    ft_hf.register()
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="flashtile")

:func:`register` adds two entries (tested with transformers 5.23):

* ``AttentionInterface["flashtile"]`` = :func:`flashtile_attention_forward`: every attention layer
  of the model calls it with ``(batch, heads, seqlen, headdim)`` q/k/v; it runs
  :func:`flashtile.flash_attn_func`, or :func:`flashtile.flash_attn_varlen_func` when there is
  padding (padded tokens are dropped, never computed) or packed sequences.
* ``AttentionMaskInterface["flashtile"]`` = :func:`flashtile_mask`: the model's mask builder hands
  over the 2-D padding mask (or None) instead of building a 4-D one; causal and sliding-window
  structure come from the layer's ``is_causal`` / ``sliding_window`` and are applied in-kernel.
  Any other pattern the model builds with its mask functions (Llama 4's chunked attention,
  bidirectional image-token blocks, custom ``or_mask_function`` / ``and_mask_function``) becomes a
  :class:`flashtile.BlockMask` of that mask function (padding and offsets included), served with
  ``block_mask=`` (see :mod:`flashtile.flex`).

Served: causal and bidirectional layers, left or right padding, GQA/MQA, ``sliding_window``
(the layer's argument, e.g. Mistral, Gemma-2's sliding layers), ``softcap`` (Gemma-2),
``scaling``, ``dropout`` (what the model passes: non-zero only in training), KV caches
(dynamic, sliding, static), packed sequences (``cu_seq_lens_q/k`` + ``max_length_q/k`` kwargs,
or ``position_ids`` restarting inside one row), attention sinks (gpt-oss's ``s_aux``: per-head
logits in the module's dtype, passed as float32 ``learnable_sink``; their gradient reaches the
model's ``sinks`` parameter), a v head dim of its own (DeepSeek V2/V3's multi-head latent
attention, 192 / 128: v is passed as it is, never padded to the q/k head dim), ready-made 4-D
masks (a bool mask, True = attend, or an additive float mask: 0 / very negative entries become a
block mask, other values a score_mod bias), chunked and bidirectional-block patterns (above).
``output_attentions`` returns None weights. Chunked models (Llama 4): transformers refuses
chunked attention longer than the chunk for any implementation whose name contains "flash":
register under another name, e.g. ``register("tile_attention")``.

A wrinkle of transformers >= 5: it treats every implementation name containing ``"flash"`` as a
FlashAttention kernel and tries to load one at model construction. :func:`register` therefore
wraps ``transformers.modeling_utils.lazy_import_flash_attention`` so that the names registered
here load nothing (other names pass through unchanged). This happens only inside
:func:`register`, and only when the installed transformers applies that rule to the name.
Models that list their own ``_compatible_flash_implementations`` (gpt-oss) go further and replace
any such name with one of theirs: for those, register under a name without "flash", e.g.
``register("tile_attention")``, and pass that name as ``attn_implementation``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..flex import BlockMask, create_block_mask, mods_from_dense_mask
from ..interface import flash_attn_func, flash_attn_varlen_func
from ..padding import pad_input, unpad_input

_MISSING = (
    "flashtile's transformers integration needs Hugging Face transformers with AttentionInterface and "
    "AttentionMaskInterface (tested with 5.23). Install it with: pip install 'flashtile[hf]'"
)
_registered: set[str] = set()


def _interfaces():
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError as e:
        raise ImportError(_MISSING) from e
    return AttentionInterface, AttentionMaskInterface


def flashtile_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: Callable | None = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """transformers' mask hook: the bool ``(batch, kv_length)`` padding mask (True = real token),
    or None when nothing is padded. The last ``kv_length`` columns are kept (a sliding-window
    cache holds only the most recent keys). A ``mask_function`` beyond causal / bidirectional /
    sliding window / packed sequences (e.g. chunked, blockwise) gives a :class:`BlockMask` of it
    instead, with the padding and the offsets folded in (as transformers' flex_attention path)."""
    if mask_function is not None and not _standard_mask_function(mask_function):
        from transformers.masking_utils import (
            add_offsets_to_mask_function,
            and_masks,
            padding_mask_function,
            prepare_padding_mask,
        )

        fn = mask_function
        if attention_mask is not None and not bool(attention_mask.all()):
            fn = and_masks(fn, padding_mask_function(prepare_padding_mask(attention_mask, kv_length, kv_offset)))
        fn = add_offsets_to_mask_function(fn, q_offset, kv_offset)
        device = kwargs.get("device") or (attention_mask.device if attention_mask is not None else None)
        return create_block_mask(fn, batch_size, None, q_length, kv_length, device=device)
    if attention_mask is None:
        return None
    attention_mask = attention_mask[:, -kv_length:].bool()
    if attention_mask.shape[1] == kv_length and bool(attention_mask.all()):
        return None
    return attention_mask


#: transformers' mask functions (by qualified name) whose structure the attention hook applies
#: itself (causal / sliding window from the layer, packed sequences from position_ids), and the
#: combinators whose parts are looked into.
_STANDARD_MASKS = frozenset({
    "causal_mask_function", "bidirectional_mask_function", "sliding_window_overlay.<locals>.inner_mask",
    "sliding_window_bidirectional_overlay.<locals>.inner_mask", "packed_sequence_mask_function.<locals>.inner_mask",
})  # fmt: skip
_COMBINATORS = frozenset({"and_masks.<locals>.and_mask", "remap_positions_for_packed_sequence.<locals>.inner_mask"})


def _standard_mask_function(fn: Callable, depth: int = 0) -> bool:
    """Whether ``fn`` is built only from the mask functions the hook applies by itself."""
    if getattr(fn, "__module__", "") != "transformers.masking_utils" or depth > 8:
        return False
    name = fn.__qualname__
    if name in _STANDARD_MASKS:
        return True
    if name not in _COMBINATORS:
        return False
    parts = []
    for cell in fn.__closure__ or ():
        val = cell.cell_contents
        parts.extend(val if isinstance(val, tuple) else [val])
    parts = [p for p in parts if callable(p)]
    return bool(parts) and all(_standard_mask_function(p, depth + 1) for p in parts)


def _mods_from_4d(mask: torch.Tensor, b: int, h: int, sq: int, sk: int):
    """A ready-made 4-D mask ``(b or 1, h or 1, sq, >= sk)`` as ``(block_mask, score_mod)``
    (:func:`flashtile.flex.mods_from_dense_mask`: bool, True = attend, or additive float, as eager
    attention adds it)."""
    if mask.shape[0] not in (1, b) or mask.shape[1] not in (1, h) or mask.shape[2] != sq or mask.shape[3] < sk:
        raise ValueError(
            f"a 4-D attention mask must have shape (batch or 1, heads or 1, seqlen_q, >= seqlen_k) = "
            f"({b}, {h}, {sq}, {sk}), got {tuple(mask.shape)}"
        )
    return mods_from_dense_mask(mask[..., :sk], b, h, sq, sk)


def _packed_from_position_ids(position_ids: torch.Tensor, total: int):
    """``(cu_seqlens, max_seqlen)`` when one row holds several sequences (a position that is not
    the previous one plus 1 starts a new sequence), else None."""
    pos = position_ids.reshape(-1)
    if pos.numel() != total or total < 2:
        return None
    starts = torch.nonzero(pos[1:] != pos[:-1] + 1).flatten() + 1
    if starts.numel() == 0:
        return None
    bounds = [0, *starts.tolist(), total]
    cu = torch.tensor(bounds, dtype=torch.int32, device=pos.device)
    return cu, max(b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True))


def flashtile_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention hook. q ``(b, h, sq, d)``, k/v ``(b, hk, sk, d)`` (``d_v`` may
    differ) -> ``(out (b, sq, h, d_v), None)``.

    ``attention_mask``: None or the bool ``(b, sk')`` padding mask from :func:`flashtile_mask`;
    queries are the last ``sq`` positions of it (``sk' < sk`` happens with static caches: the
    keys beyond the mask are unused slots and are dropped). ``sliding_window = w``: each query
    sees the ``w`` most recent positions including itself (window ``(w - 1, 0)`` when causal,
    ``(w - 1, w - 1)`` otherwise), as transformers' eager masks do.
    """
    s_aux = kwargs.get("s_aux")
    mods = isinstance(attention_mask, BlockMask) or (
        isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 4
    )
    if attention_mask is not None and not mods and attention_mask.dim() != 2:
        raise ValueError(
            f"flashtile attention takes a 2-D (batch, seqlen) padding mask, a 4-D mask or a BlockMask, got a "
            f"{attention_mask.dim()}-D mask of shape {tuple(attention_mask.shape)}"
        )
    b, h, sq, d = query.shape  # v's head dim may differ (DeepSeek's MLA: 192 / 128): served as it is, never padded
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (b, s, heads, d)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:  # (transposes of contiguous tensors: never)
        q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = (-1, -1)
    if sliding_window is not None and sliding_window > 0:
        window = (sliding_window - 1, 0 if causal else sliding_window - 1)
    opts = dict(dropout_p=dropout, softmax_scale=scaling, causal=causal, window_size=window, softcap=softcap or 0.0)
    if s_aux is not None:  # gpt-oss's per-head sinks, in the module's dtype: float32 for flashtile (grad flows)
        if not isinstance(s_aux, torch.Tensor) or s_aux.numel() != h:
            got = tuple(s_aux.shape) if isinstance(s_aux, torch.Tensor) else type(s_aux).__name__
            raise ValueError(f"s_aux (attention sinks) must be a tensor of {h} per-head logits, got {got}")
        opts["learnable_sink"] = s_aux.reshape(h).to(device=query.device, dtype=torch.float32)

    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    max_q, max_k = kwargs.get("max_length_q"), kwargs.get("max_length_k")
    if mods:  # the mask holds the whole pattern (causal / window included), as eager's 4-D masks do
        opts.update(causal=False, window_size=(-1, -1))
        if isinstance(attention_mask, BlockMask):
            block_mask, score_mod = attention_mask, None
            sk = min(k.shape[1], block_mask.seq_lengths[1])
        else:
            sk = min(k.shape[1], attention_mask.shape[-1])
            block_mask, score_mod = _mods_from_4d(attention_mask, b, h, sq, sk)
        k, v = k[:, :sk], v[:, :sk]  # static cache: slots past the mask are unused
        out = flash_attn_func(q, k, v, block_mask=block_mask, score_mod=score_mod, **opts)
    elif attention_mask is not None:
        keep_k = attention_mask.bool()
        if k.shape[1] > keep_k.shape[1]:  # static cache: slots past the mask are unused
            k, v = k[:, : keep_k.shape[1]], v[:, : keep_k.shape[1]]
        kv_u, _, cu_k, max_k, _ = unpad_input(torch.cat((k, v), dim=-1), keep_k)  # (t_k, hk, d + dv): one gather
        q_u, idx_q, cu_q, max_q, _ = unpad_input(q, keep_k[:, -sq:])  # queries: the last sq positions
        out = flash_attn_varlen_func(q_u, kv_u[..., :d], kv_u[..., d:], cu_q, cu_k, max_q, max_k, **opts)
        out = pad_input(out, idx_q, b, sq)
    elif cu_q is not None and cu_k is not None and max_q is not None and max_k is not None:
        out = flash_attn_varlen_func(
            q.reshape(-1, *q.shape[2:]), k.reshape(-1, *k.shape[2:]), v.reshape(-1, *v.shape[2:]),
            cu_q.to(torch.int32), cu_k.to(torch.int32), int(max_q), int(max_k), **opts,
        ).view(b, sq, h, -1)  # fmt: skip
    else:
        pos = kwargs.get("position_ids")
        packed = _packed_from_position_ids(pos, sq) if (pos is not None and b == 1 and sq == k.shape[1]) else None
        if packed is not None:
            cu, mx = packed
            out = flash_attn_varlen_func(q[0], k[0], v[0], cu, cu, mx, mx, **opts).unsqueeze(0)
        else:
            out = flash_attn_func(q, k, v, **opts)
    return out, None


def _skip_flash_kernel_loading(name: str) -> None:
    """transformers >= 5 calls ``lazy_import_flash_attention(name)`` at model construction for any
    name containing "flash"; make it a no-op for flashtile's names (see the module docstring)."""
    try:
        import transformers.modeling_utils as mu
        from transformers.utils.generic import is_flash_attention_requested
    except ImportError:
        return
    if not is_flash_attention_requested(requested_attention_implementation=name):
        return
    original = getattr(mu, "lazy_import_flash_attention", None)
    if original is None:
        return
    names = getattr(original, "_flashtile_names", None)
    if names is not None:  # already wrapped
        names.add(name)
        return

    def lazy_import_flash_attention(implementation, *args, **kwargs):
        if implementation in lazy_import_flash_attention._flashtile_names:
            return None  # flashtile needs no kernel package; transformers ignores the value here
        return original(implementation, *args, **kwargs)

    lazy_import_flash_attention._flashtile_names = {name}
    lazy_import_flash_attention.__wrapped__ = original
    mu.lazy_import_flash_attention = lazy_import_flash_attention


def register(name: str = "flashtile") -> str:
    """Register flashtile with transformers under ``name`` (idempotent); returns the name, for
    ``from_pretrained(..., attn_implementation=name)`` / ``from_config``."""
    attention_interface, mask_interface = _interfaces()
    attention_interface.register(name, flashtile_attention_forward)
    mask_interface.register(name, flashtile_mask)
    _skip_flash_kernel_loading(name)
    _registered.add(name)
    return name


__all__ = ["register", "flashtile_attention_forward", "flashtile_mask"]
