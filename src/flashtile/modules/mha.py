"""Multi-head attention as an ``nn.Module``, built on flashtile's public functions.

``MHA`` owns the projections and the position encodings; the attention itself is one call to
:func:`flashtile.flash_attn_func` (dense batch), :func:`flashtile.flash_attn_varlen_func`
(packed batch, or a padded batch after dropping the padding) or
:func:`flashtile.flash_attn_with_kvcache` (incremental decoding). Which kernel runs is the
dispatcher's business: nothing here knows about backends.

Shapes: ``b`` batch, ``s`` query length, ``sk`` key length, ``d`` embed_dim, ``h`` / ``hk`` query /
key-value heads, ``hd`` head dim, ``t`` total tokens of a packed batch.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..interface import flash_attn_func, flash_attn_varlen_func
from ..kvcache import flash_attn_with_kvcache
from ..padding import pad_input, unpad_input
from ..rotary import apply_rotary_emb, rotary_cos_sin


def _alibi_exponents(nheads: int) -> tuple[list[int], int]:
    """ALiBi slopes as ``2^(-k_i / den)`` with integers ``k_i``: for the largest power of two
    ``n <= nheads``, the geometric sequence ``2^(-8 i / n)``, i = 1..n, then every other slope of
    the ``2 n`` sequence (Press et al.); ``den = 2 n``."""
    n = 2 ** int(math.floor(math.log2(nheads)))
    return [16 * (i + 1) for i in range(n)] + [8 * (2 * j + 1) for j in range(nheads - n)], 2 * n


def alibi_slopes(nheads: int) -> torch.Tensor:
    """The standard ALiBi slopes, float32 ``(nheads,)`` (8 heads: 1/2, 1/4, ..., 1/256)."""
    ks, den = _alibi_exponents(nheads)
    return torch.tensor([2.0 ** (-k / den) for k in ks], dtype=torch.float32)


def _autocast(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (then inputs may differ from the weights' dtype)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        return torch.is_autocast_enabled() if device_type == "cuda" else torch.is_autocast_cpu_enabled()


class InferenceParams:
    """The KV cache of a model during incremental decoding, shared by all its layers.

    Each :class:`MHA` with a ``layer_idx`` allocates its ``(k_cache, v_cache)`` here on first use:
    dense ``(max_batch_size, max_seqlen, hk, hd)``, or paged ``(num_blocks, page_size, hk, hd)``
    when ``page_size`` is given. ``block_table`` (int32 ``(max_batch_size, ceil(max_seqlen /
    page_size))``) maps each row's pages to cache blocks; the default gives row ``i`` the blocks
    ``i * n .. i * n + n - 1``; pass any other table (e.g. a shuffled one) to share a pool.

    ``seqlen_offset`` is the number of tokens already in the cache (every row the same);
    :class:`flashtile.models.GPT` advances it after each forward (a bare :class:`MHA` leaves that
    to the caller). ``lengths_per_sample`` (int32 ``(batch,)``), when set, replaces it with
    per-row lengths (new tokens are written at, and rotated from, each row's own length), and the
    caller keeps it up to date.
    """

    def __init__(
        self,
        max_batch_size: int,
        max_seqlen: int,
        *,
        page_size: int | None = None,
        num_blocks: int | None = None,
        block_table: torch.Tensor | None = None,
    ):
        self.max_batch_size, self.max_seqlen = max_batch_size, max_seqlen
        self.seqlen_offset = 0
        self.lengths_per_sample: torch.Tensor | None = None
        self.page_size = page_size
        self.caches: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.block_table = block_table
        self.num_blocks = num_blocks
        if page_size is not None:
            pages = -(-max_seqlen // page_size)
            if block_table is None:
                self.num_blocks = num_blocks or max_batch_size * pages
                self.block_table = torch.arange(max_batch_size * pages, dtype=torch.int32).view(max_batch_size, pages)
            elif num_blocks is None:
                self.num_blocks = int(block_table.max()) + 1

    @property
    def paged(self) -> bool:
        return self.page_size is not None

    def reset(self) -> None:
        """Empty the cache (keeps the allocated memory)."""
        self.seqlen_offset = 0
        self.lengths_per_sample = None

    def kv_cache(
        self, layer_idx: int, nheads_k: int, headdim: int, dtype: torch.dtype, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """This layer's ``(k_cache, v_cache)``, allocated (zeros) on first use."""
        if layer_idx not in self.caches:
            if self.paged:
                shape = (self.num_blocks, self.page_size, nheads_k, headdim)
            else:
                shape = (self.max_batch_size, self.max_seqlen, nheads_k, headdim)
            self.caches[layer_idx] = (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
        return self.caches[layer_idx]

    def cache_seqlens(self, batch: int) -> int | torch.Tensor:
        return self.seqlen_offset if self.lengths_per_sample is None else self.lengths_per_sample[:batch]

    def block_table_for(self, batch: int, device: torch.device) -> torch.Tensor | None:
        if self.block_table is None:
            return None
        if self.block_table.device != device:
            self.block_table = self.block_table.to(device)
        return self.block_table[:batch]


class MHA(nn.Module):
    """Multi-head self- or cross-attention on flashtile.

    Args:
        embed_dim: model width ``d``; ``head_dim = embed_dim // num_heads``.
        num_heads: query heads ``h``.
        num_heads_kv: key/value heads ``hk`` (GQA / MQA), dividing ``h``; default ``h``.
        cross_attn: queries from ``x``, keys/values from ``x_kv`` (projections ``Wq`` and ``Wkv``);
            otherwise one fused projection ``Wqkv``, output laid out ``[q (h*hd) | k (hk*hd) | v (hk*hd)]``.
        qkv_proj_bias, out_proj_bias: biases of the input and output projections.
        dropout: attention-probability dropout, applied only in training mode.
        softmax_scale: default ``1 / sqrt(head_dim)``.
        causal: causal mask (bottom-right aligned when the key and query lengths differ).
        layer_idx: index of this layer's cache in :class:`InferenceParams` (needed for decoding).
        rotary_emb_dim: rotate the first ``rotary_emb_dim`` channels of each q/k head (0 = off,
            self-attention only); ``rotary_emb_base``, ``rotary_emb_interleaved`` (GPT-J pairs
            ``2c, 2c+1``) or not (NeoX halves), ``rotary_max_seqlen``: longest position served.
        use_alibi: ALiBi bias with the standard slopes (:func:`alibi_slopes`).
        window_size: ``(left, right)`` sliding window, ``-1`` = unbounded (flash-attn's rule).
        softcap: ``softcap * tanh(scores / softcap)`` (0 = off).
        learnable_sink: a learned per-head attention sink (gpt-oss): the parameter ``sink``, float32
            ``(num_heads,)``, zero-initialised, joins each row's softmax denominator as a key
            without value (see :func:`flashtile.flash_attn_func`); off: ``sink`` is None.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        num_heads_kv: int | None = None,
        cross_attn: bool = False,
        qkv_proj_bias: bool = True,
        out_proj_bias: bool = True,
        dropout: float = 0.0,
        softmax_scale: float | None = None,
        causal: bool = False,
        layer_idx: int | None = None,
        rotary_emb_dim: int = 0,
        rotary_emb_base: float = 10000.0,
        rotary_emb_interleaved: bool = False,
        rotary_max_seqlen: int = 4096,
        use_alibi: bool = False,
        window_size: tuple[int, int] = (-1, -1),
        softcap: float = 0.0,
        learnable_sink: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        fk = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.num_heads_kv = num_heads if num_heads_kv is None else num_heads_kv
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        if num_heads % self.num_heads_kv:
            raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_heads_kv ({self.num_heads_kv})")
        if rotary_emb_dim and cross_attn:
            raise ValueError("rotary embeddings are supported for self-attention only (cross_attn=False)")
        self.head_dim = hd = embed_dim // num_heads
        if rotary_emb_dim > hd or rotary_emb_dim % 2:
            raise ValueError(f"rotary_emb_dim must be even and <= head_dim ({hd}), got {rotary_emb_dim}")
        self.cross_attn, self.causal, self.layer_idx = cross_attn, causal, layer_idx
        self.dropout, self.softmax_scale = dropout, softmax_scale
        self.window_size, self.softcap = tuple(window_size), softcap
        self.rotary_emb_dim, self.rotary_emb_base = rotary_emb_dim, rotary_emb_base
        self.rotary_emb_interleaved = rotary_emb_interleaved

        q_dim, kv_dim = num_heads * hd, self.num_heads_kv * hd
        if cross_attn:
            self.Wq = nn.Linear(embed_dim, q_dim, bias=qkv_proj_bias, **fk)
            self.Wkv = nn.Linear(embed_dim, 2 * kv_dim, bias=qkv_proj_bias, **fk)
        else:
            self.Wqkv = nn.Linear(embed_dim, q_dim + 2 * kv_dim, bias=qkv_proj_bias, **fk)
        self.out_proj = nn.Linear(q_dim, embed_dim, bias=out_proj_bias, **fk)
        # The sink logits are float32 whatever the module's dtype (a cast module's is upcast per call).
        sink = nn.Parameter(torch.zeros(num_heads, dtype=torch.float32, device=device)) if learnable_sink else None
        self.register_parameter("sink", sink)

        # Tables and slopes are derived, not learned: non-persistent buffers (they follow .to()).
        if rotary_emb_dim:
            cos, sin = rotary_cos_sin(rotary_max_seqlen, rotary_emb_dim, rotary_emb_base, device=device)
            self.register_buffer("rotary_cos", cos, persistent=False)  # (rotary_max_seqlen, rotary_emb_dim / 2)
            self.register_buffer("rotary_sin", sin, persistent=False)
        # ALiBi slopes 2^(-k / den) kept as the integers k: an integer buffer follows .to(device) but
        # not .to(dtype), so the slopes stay exact float32 in a module cast to half precision.
        ks, self._alibi_den = _alibi_exponents(num_heads)
        self.register_buffer("alibi_exponents", torch.tensor(ks, device=device) if use_alibi else None,
                             persistent=False)  # fmt: skip

    @property
    def alibi_slopes(self) -> torch.Tensor | None:
        """float32 ``(num_heads,)`` ALiBi slopes, or None."""
        if self.alibi_exponents is None:
            return None
        return torch.exp2(self.alibi_exponents.float() / -self._alibi_den)

    def _opts(self) -> dict:
        return dict(
            softmax_scale=self.softmax_scale, causal=self.causal, window_size=self.window_size,
            softcap=self.softcap, alibi_slopes=self.alibi_slopes,
            learnable_sink=None if self.sink is None else self.sink.float(),
        )  # fmt: skip

    def _split_qkv(self, x: torch.Tensor, x_kv: torch.Tensor | None):
        """Project: q ``(..., h, hd)``, k and v ``(..., hk, hd)`` for ``x (..., d)``."""
        h, hk, hd = self.num_heads, self.num_heads_kv, self.head_dim
        if self.cross_attn:
            q = self.Wq(x).unflatten(-1, (h, hd))
            k, v = self.Wkv(x_kv).unflatten(-1, (2, hk, hd)).unbind(-3)
        else:
            q, k, v = self.Wqkv(x).split([h * hd, hk * hd, hk * hd], dim=-1)
            q, k, v = q.unflatten(-1, (h, hd)), k.unflatten(-1, (hk, hd)), v.unflatten(-1, (hk, hd))
        return q, k, v

    def _rotary(self, q, k, cu_seqlens=None, max_seqlen=None):
        if not self.rotary_emb_dim:
            return q, k
        cos, sin, il = self.rotary_cos, self.rotary_sin, self.rotary_emb_interleaved
        return (
            apply_rotary_emb(q, cos, sin, il, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen),
            apply_rotary_emb(k, cos, sin, il, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen),
        )

    def forward(
        self,
        x: torch.Tensor,
        x_kv: torch.Tensor | None = None,
        key_padding_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        cu_seqlens_k: torch.Tensor | None = None,
        max_seqlen_k: int | None = None,
        inference_params: InferenceParams | None = None,
    ) -> torch.Tensor:
        """Attention output, same shape as ``x``.

        Args:
            x: ``(b, s, d)``, or packed ``(t, d)`` with ``cu_seqlens`` (int32 ``(b + 1,)``) and
                ``max_seqlen``: sequences back to back, attention stays inside each sequence.
            x_kv: cross-attention keys/values source ``(b, sk, d)`` (packed: ``(t_k, d)`` with
                ``cu_seqlens_k`` / ``max_seqlen_k``).
            key_padding_mask: bool ``(b, sk)``, True = real token (flash-attn's convention, the
                opposite of ``nn.MultiheadAttention``). Padding is dropped before the projections
                (self-attention: the queries too), the real tokens run through the varlen kernel
                and the output is scattered back: padded positions output 0. Rotary positions and
                the causal diagonal count real tokens only, so left and right padding both work.
            inference_params: decode with a KV cache: the new k/v are appended to this layer's
                cache and q attends to everything cached (self-attention, dense ``x`` only).
        """
        packed = cu_seqlens is not None
        self._check_input(x, "x", packed)
        if self.cross_attn:
            if x_kv is None:
                raise ValueError("x_kv (the source of keys and values) is required: this MHA is cross-attention "
                                 "(cross_attn=True)")  # fmt: skip
            self._check_input(x_kv, "x_kv", packed, batch=None if packed else x.shape[0])
        elif x_kv is not None:
            raise ValueError("x_kv is only used by cross-attention (cross_attn=True); this MHA is self-attention")
        if key_padding_mask is not None and not packed:
            sk = (x_kv if self.cross_attn else x).shape[1]
            if not isinstance(key_padding_mask, torch.Tensor) or key_padding_mask.dtype != torch.bool \
                    or tuple(key_padding_mask.shape) != (x.shape[0], sk):  # fmt: skip
                got = (f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}"
                       if isinstance(key_padding_mask, torch.Tensor) else type(key_padding_mask).__name__)  # fmt: skip
                raise ValueError(f"key_padding_mask must be a bool tensor of shape (batch, seqlen_k) = "
                                 f"({x.shape[0]}, {sk}) (True = real token), got {got}")  # fmt: skip
        if inference_params is not None and not self.cross_attn:
            if key_padding_mask is not None or cu_seqlens is not None:
                raise ValueError("inference_params cannot be combined with key_padding_mask or cu_seqlens")
            return self._forward_cached(x, inference_params)
        dropout_p = self.dropout if self.training else 0.0
        if cu_seqlens is not None:  # packed batch: (t, d)
            return self._forward_packed(x, x_kv, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, dropout_p)
        if key_padding_mask is not None:
            return self._forward_padded(x, x_kv, key_padding_mask, dropout_p)
        q, k, v = self._split_qkv(x, x_kv)  # (b, s, h, hd), (b, sk, hk, hd) x2
        q, k = self._rotary(q, k)
        out = flash_attn_func(q, k, v, dropout_p, **self._opts())  # (b, s, h, hd)
        return self.out_proj(out.flatten(-2))

    def _check_input(self, x: object, name: str, packed: bool, batch: int | None = None) -> None:
        """Type, rank, embed dim, dtype and device of the input ``x`` / ``x_kv`` (named ``name``)
        against this module's configuration and weights; ``batch``: the batch size it must have."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        d = self.embed_dim
        if packed and x.dim() != 2:
            cu = "cu_seqlens_k" if name == "x_kv" else "cu_seqlens"
            raise ValueError(f"{name} must have shape (total, embed_dim={d}) with {cu} (a packed batch), got shape "
                             f"{tuple(x.shape)}")  # fmt: skip
        if not packed and x.dim() != 3:
            raise ValueError(f"{name} must have shape (batch, seqlen, embed_dim={d}) (a packed batch (total, "
                             f"embed_dim) needs cu_seqlens and max_seqlen), got shape {tuple(x.shape)}")  # fmt: skip
        if x.shape[-1] != d:
            raise ValueError(f"{name} must have embed_dim = {d} features in its last dimension, got {x.shape[-1]}")
        w = self.out_proj.weight
        if x.dtype != w.dtype and not (x.is_floating_point() and _autocast(x.device.type)):
            raise TypeError(f"{name} must have the module's dtype ({w.dtype}), got {x.dtype}: convert one of them "
                            f"({name}.to(dtype) or module.to(dtype))")  # fmt: skip
        if x.device != w.device:
            raise ValueError(f"{name} must be on the module's device ({w.device}), got {x.device}")
        if batch is not None and x.shape[0] != batch:
            raise ValueError(f"{name} must have the same batch size as x ({batch}), got {x.shape[0]}")

    def _forward_packed(self, x, x_kv, cu_q, max_q, cu_k, max_k, dropout_p):
        if max_q is None:
            raise ValueError("max_seqlen is required with cu_seqlens")
        if self.cross_attn and (cu_k is None or max_k is None):
            raise ValueError("cross-attention on a packed batch needs cu_seqlens_k and max_seqlen_k")
        if not self.cross_attn:
            cu_k, max_k = cu_q, max_q
        q, k, v = self._split_qkv(x, x_kv)  # (t, h, hd), (t_k, hk, hd) x2
        q, k = self._rotary(q, k, cu_q, max_q)
        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, **self._opts())
        return self.out_proj(out.flatten(-2))

    def _forward_padded(self, x, x_kv, key_padding_mask, dropout_p):
        b, s = x.shape[:2]
        if self.cross_attn:  # every query is real; the mask drops padded keys
            xk, idx_k, cu_k, max_k, _ = unpad_input(x_kv, key_padding_mask)  # (t_k, d)
            cu_q = torch.arange(0, (b + 1) * s, s, dtype=torch.int32, device=x.device)
            out = self._forward_packed(x.reshape(b * s, -1), xk, cu_q, s, cu_k, max_k, dropout_p)
            return out.view(b, s, -1)
        xu, idx, cu, max_s, _ = unpad_input(x, key_padding_mask)  # (t, d): real tokens only
        out = self._forward_packed(xu, None, cu, max_s, None, None, dropout_p)  # (t, d)
        return pad_input(out, idx, b, s)  # (b, s, d), zeros at padding

    def _forward_cached(self, x: torch.Tensor, params: InferenceParams) -> torch.Tensor:
        if self.layer_idx is None:
            raise ValueError("MHA needs a layer_idx to use a KV cache (inference_params)")
        b = x.shape[0]
        q, k, v = self._split_qkv(x, None)  # (b, s, h, hd), (b, s, hk, hd) x2
        k_cache, v_cache = params.kv_cache(self.layer_idx, self.num_heads_kv, self.head_dim, k.dtype, k.device)
        rot = dict(rotary_cos=self.rotary_cos, rotary_sin=self.rotary_sin) if self.rotary_emb_dim else {}
        out = flash_attn_with_kvcache(
            q, k_cache, v_cache, k, v, **rot, cache_seqlens=params.cache_seqlens(b),
            block_table=params.block_table_for(b, x.device), rotary_interleaved=self.rotary_emb_interleaved,
            **self._opts(),
        )  # fmt: skip
        return self.out_proj(out.flatten(-2))


__all__ = ["MHA", "InferenceParams", "alibi_slopes"]
