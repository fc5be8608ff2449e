"""A GPT in one short file: token embedding -> pre-norm blocks (attention, MLP) -> norm -> logits.

Attention is :class:`flashtile.modules.MHA` (causal, fused QKV, optional GQA, rotary / ALiBi /
learned positions, sliding window, softcap, attention sinks); generation decodes through its KV cache. Shapes in
comments: ``b`` batch, ``s`` sequence, ``d`` n_embd, ``V`` vocab_size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..modules.mha import MHA, InferenceParams
from ..padding import pad_input, unpad_input


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int = 50304
    block_size: int = 1024  # longest sequence: learned positions, rotary tables, generate()'s cache
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # GQA / MQA when < n_head
    n_embd: int = 768
    mlp: str = "gelu"  # "gelu" (d -> hidden -> d) or "swiglu" (silu(x W1) * x W3 -> W2)
    mlp_hidden: int | None = None  # default: 4 d (gelu), 8/3 d rounded up to a multiple of 64 (swiglu)
    norm: str = "layernorm"  # "layernorm" or "rmsnorm"
    norm_eps: float = 1e-5
    pos_emb: str = "learned"  # "learned", "rotary", "alibi" or "none"
    rotary_dim: int | None = None  # rotated channels per head (partial rotary); default the head dim
    rotary_base: float = 10000.0
    rotary_interleaved: bool = False  # GPT-J pairs (True) or NeoX halves (False)
    window: int = -1  # sliding window: each token sees itself and the `window` tokens before (-1 = all)
    softcap: float = 0.0  # attention logit softcap (Gemma-2 style), 0 = off
    sink: bool = False  # a learnable attention sink per head (gpt-oss style; MHA's `sink` parameter)
    dropout: float = 0.0  # embedding / residual dropout (training only)
    attn_dropout: float = 0.0  # attention-probability dropout (training only)
    bias: bool = True  # biases in the linear layers and LayerNorm
    tie_embeddings: bool = True  # lm_head shares the token embedding matrix

    @classmethod
    def from_preset(cls, name: str, **overrides) -> GPTConfig:
        """A named configuration (see ``PRESETS``), with fields overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
        return replace(PRESETS[name], **overrides)

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


_GPT2 = dict(vocab_size=50304, block_size=1024, mlp="gelu", norm="layernorm", pos_emb="learned", bias=True)
PRESETS: dict[str, GPTConfig] = {
    # Tests and the CPU example: a few hundred thousand parameters, Llama-style choices.
    "tiny": GPTConfig(
        vocab_size=256, block_size=128, n_layer=4, n_head=4, n_kv_head=2, n_embd=128,
        mlp="swiglu", norm="rmsnorm", pos_emb="rotary", bias=False,
    ),  # fmt: skip
    # GPT-2 sizes (vocab padded to a multiple of 64).
    "gpt2-small": GPTConfig(n_layer=12, n_head=12, n_embd=768, **_GPT2),
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024, **_GPT2),
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280, **_GPT2),
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600, **_GPT2),
}


def _norm(cfg: GPTConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
    if cfg.norm == "layernorm":
        return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)
    raise ValueError(f"norm must be 'layernorm' or 'rmsnorm', got {cfg.norm!r}")


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.mlp not in ("gelu", "swiglu"):
            raise ValueError(f"mlp must be 'gelu' or 'swiglu', got {cfg.mlp!r}")
        self.swiglu = cfg.mlp == "swiglu"
        hidden = cfg.mlp_hidden or (4 * cfg.n_embd if not self.swiglu else 64 * math.ceil(8 * cfg.n_embd / 3 / 64))
        self.fc1 = nn.Linear(cfg.n_embd, (2 if self.swiglu else 1) * hidden, bias=cfg.bias)
        self.fc2 = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)  # (..., hidden) or (..., 2 hidden)
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            return self.fc2(F.silu(gate) * up)
        return self.fc2(F.gelu(h, approximate="tanh"))


class Block(nn.Module):
    """Pre-norm transformer block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: GPTConfig, layer_idx: int):
        super().__init__()
        rotary = cfg.pos_emb == "rotary"
        self.norm1, self.norm2 = _norm(cfg), _norm(cfg)
        self.attn = MHA(
            cfg.n_embd, cfg.n_head, cfg.n_kv_head, qkv_proj_bias=cfg.bias, out_proj_bias=cfg.bias,
            dropout=cfg.attn_dropout, causal=True, layer_idx=layer_idx,
            rotary_emb_dim=(cfg.rotary_dim or cfg.head_dim) if rotary else 0, rotary_emb_base=cfg.rotary_base,
            rotary_emb_interleaved=cfg.rotary_interleaved, rotary_max_seqlen=cfg.block_size,
            use_alibi=cfg.pos_emb == "alibi", window_size=(cfg.window, 0), softcap=cfg.softcap,
            learnable_sink=cfg.sink,
        )  # fmt: skip
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, **attn_kwargs) -> torch.Tensor:
        x = x + self.drop(self.attn(self.norm1(x), **attn_kwargs))
        return x + self.drop(self.mlp(self.norm2(x)))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        if cfg.pos_emb not in ("learned", "rotary", "alibi", "none"):
            raise ValueError(f"pos_emb must be 'learned', 'rotary', 'alibi' or 'none', got {cfg.pos_emb!r}")
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd) if cfg.pos_emb == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm_f = _norm(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale the residual projections by depth
            if name.endswith(("attn.out_proj.weight", "mlp.fc2.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, mean=0.0, std=0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _positions(self, idx, cu_seqlens, inference_params) -> torch.Tensor:
        """Token positions for the learned embedding."""
        if cu_seqlens is not None:  # packed (t,): restart at every sequence
            lens = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
            starts = torch.repeat_interleave(cu_seqlens[:-1].long(), lens, output_size=idx.shape[0])
            return torch.arange(idx.shape[0], device=idx.device) - starts
        pos = torch.arange(idx.shape[1], device=idx.device)
        if inference_params is None:
            return pos
        if inference_params.lengths_per_sample is not None:  # per-row cache lengths: (b, s)
            return inference_params.lengths_per_sample[: idx.shape[0], None].long() + pos
        return inference_params.seqlen_offset + pos

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        key_padding_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        max_seqlen: int | None = None,
        inference_params: InferenceParams | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(logits, loss)``: logits ``(b, s, V)`` (packed: ``(t, V)``), loss the mean cross-entropy
        against ``targets`` (``-1`` = ignored) or None.

        ``idx``: token ids ``(b, s)``, or a packed ``(t,)`` with ``cu_seqlens`` / ``max_seqlen``.
        ``key_padding_mask``: bool ``(b, s)``, True = real token (left or right padding): the
        real tokens are packed once (:func:`flashtile.unpad_input`) and the whole model runs on
        them alone; padded positions get zero logits. ``inference_params``: decode with the KV
        cache; its ``seqlen_offset`` advances by ``s`` after the call.
        """
        if key_padding_mask is not None:
            b, s = idx.shape
            idx_u, indices, cu, max_s, _ = unpad_input(idx.unsqueeze(-1), key_padding_mask)  # (t, 1)
            tgt = None if targets is None else targets.reshape(-1)[indices]
            logits, loss = self(idx_u.squeeze(-1), tgt, cu_seqlens=cu, max_seqlen=max_s)
            return pad_input(logits, indices, b, s), loss
        x = self.wte(idx)  # (b, s, d) or (t, d)
        if self.wpe is not None:
            x = x + self.wpe(self._positions(idx, cu_seqlens, inference_params))
        x = self.drop(x)
        kw = dict(cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, inference_params=inference_params)
        for block in self.blocks:
            x = block(x, **kw)
        logits = self.lm_head(self.norm_f(x))  # (b, s, V)
        if inference_params is not None:
            inference_params.seqlen_offset += idx.shape[1]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten(), ignore_index=-1)
        return logits, loss

    @staticmethod
    def _sample(logits: torch.Tensor, temperature: float, top_k: int | None, generator) -> torch.Tensor:
        """Next token ids ``(b, 1)`` from last-position logits ``(b, V)``; temperature 0 = greedy."""
        if temperature == 0:
            return logits.argmax(-1, keepdim=True)
        logits = logits.float() / temperature
        if top_k is not None:
            kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        *,
        use_cache: bool = True,
        page_size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Extend the prompts ``idx (b, s)`` (all of length ``s``) by ``max_new_tokens`` tokens:
        returns ``(b, s + max_new_tokens)``. ``temperature=0`` is greedy; ``top_k`` keeps the k
        most likely tokens. ``use_cache``: one prefill, then one token per step through the KV
        cache (``page_size``: a paged cache); else the whole sequence is recomputed each step
        (cropped to ``block_size``). Call ``model.eval()`` first to turn dropout off."""
        b, s = idx.shape
        if not use_cache:
            for _ in range(max_new_tokens):
                logits, _ = self(idx[:, -self.config.block_size :])
                idx = torch.cat([idx, self._sample(logits[:, -1], temperature, top_k, generator)], dim=1)
            return idx
        if s + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt + new tokens ({s} + {max_new_tokens}) exceed block_size "
                             f"({self.config.block_size}); use use_cache=False to slide the context")  # fmt: skip
        params = InferenceParams(b, s + max_new_tokens, page_size=page_size)
        logits, _ = self(idx, inference_params=params)  # prefill
        for i in range(max_new_tokens):
            nxt = self._sample(logits[:, -1], temperature, top_k, generator)  # (b, 1)
            idx = torch.cat([idx, nxt], dim=1)
            if i + 1 < max_new_tokens:
                logits, _ = self(nxt, inference_params=params)
        return idx
