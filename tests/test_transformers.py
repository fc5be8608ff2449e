"""Hugging Face transformers with attn_implementation="flashtile" against "eager".

Tiny randomly initialised Llama (GQA), Mistral (sliding window) and Gemma-2 (softcap, sliding and
full layers) and gpt-oss (learned attention sinks, sliding and full layers) models built from
configs (no download), and DeepSeek-V3 (multi-head latent attention: v's head dim differs from
q/k's, served unpadded): same logits with left / right / no
padding, same greedy generations (dynamic, sliding and static caches), packed sequences,
dropout in training; a tiny Llama 4 (chunked attention layers, served with a block mask) and
ready-made 4-D masks (bool, additive, additive with a bias). Skipped when transformers is not installed
(except the error-message test).
"""

from __future__ import annotations

import copy
import sys

import pytest
import torch

import flashtile.integrations.transformers as ft_hf

try:
    import transformers
except ImportError:
    transformers = None

needs_hf = pytest.mark.skipif(transformers is None, reason="transformers is not installed (pip install flashtile[hf])")

COMMON = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip


def configs():
    from transformers import Gemma2Config, LlamaConfig, MistralConfig

    cfgs = {
        "llama-gqa": LlamaConfig(**COMMON),
        "mistral-sliding-window": MistralConfig(**COMMON, sliding_window=4),
        "gemma2-softcap": Gemma2Config(**COMMON, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
                                       attn_logit_softcapping=3.0, final_logit_softcapping=20.0),  # fmt: skip
    }
    if HAS_DEEPSEEK_V3:  # multi-head latent attention: q/k head dim 24 (16 + 8 rotary), v head dim 16
        cfgs["deepseek-v3-mla"] = transformers.DeepseekV3Config(
            **{**COMMON, "num_key_value_heads": 4}, moe_intermediate_size=32, q_lora_rank=None, kv_lora_rank=16,
            qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=4, num_experts_per_tok=2,
            n_shared_experts=1, first_k_dense_replace=1, n_group=1, topk_group=1,
        )  # fmt: skip
    if HAS_GPT_OSS:  # layer_types alternate sliding / full attention (the config's default)
        cfgs["gpt-oss-sinks"] = transformers.GptOssConfig(**COMMON, head_dim=16, sliding_window=4, num_local_experts=4,
                                                          num_experts_per_tok=2)  # fmt: skip
    return cfgs


HAS_GPT_OSS = transformers is not None and hasattr(transformers, "GptOssConfig")
HAS_DEEPSEEK_V3 = transformers is not None and hasattr(transformers, "DeepseekV3Config")
NAMES = ["llama-gqa", "mistral-sliding-window", "gemma2-softcap"] + (["gpt-oss-sinks"] if HAS_GPT_OSS else []) + (
    ["deepseek-v3-mla"] if HAS_DEEPSEEK_V3 else []
)


def pair(name: str):
    """(flashtile model, eager model) with the same random weights, in eval mode."""
    from transformers import AutoModelForCausalLM

    # gpt-oss lists its own flash implementations and swaps any name containing "flash" for one of
    # them: flashtile registers under a name without it there (see the integration's docstring)
    impl = ft_hf.register("tile_attention" if name == "gpt-oss-sinks" else "flashtile")
    cfg = configs()[name]
    torch.manual_seed(0)
    ft = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    if name == "gpt-oss-sinks":  # sinks large enough to matter, of both signs
        with torch.no_grad():
            for layer in ft.model.layers:
                layer.self_attn.sinks.copy_(torch.tensor([-1.0, 0.5, 2.0, 0.0]))
    eager.load_state_dict(ft.state_dict())
    assert ft.config._attn_implementation == impl and eager.config._attn_implementation == "eager"
    return ft, eager


@pytest.fixture
def calls(monkeypatch):
    """Counts the flashtile kernel calls made by the integration."""
    n = {"dense": 0, "varlen": 0}

    def spy(key, fn):
        def wrapper(*a, **kw):
            n[key] += 1
            return fn(*a, **kw)

        return wrapper

    monkeypatch.setattr(ft_hf, "flash_attn_func", spy("dense", ft_hf.flash_attn_func))
    monkeypatch.setattr(ft_hf, "flash_attn_varlen_func", spy("varlen", ft_hf.flash_attn_varlen_func))
    return n


def masks(b=3, s=12):
    left = torch.ones(b, s, dtype=torch.long)
    left[0, :5] = 0
    left[2, :1] = 0
    return {"none": None, "left": left, "right": left.flip(1)}


@needs_hf
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_logits_match_eager(name, padding, calls):
    ft, eager = pair(name)
    ids = torch.randint(0, 97, (3, 12))
    mask = masks()[padding]
    with torch.no_grad():
        a = ft(ids, attention_mask=mask).logits
        b = eager(ids, attention_mask=mask).logits
    real = torch.ones(3, 12, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=2e-5, rtol=1e-4)
    assert calls["varlen" if mask is not None else "dense"] == 2  # one call per layer, on flashtile


@needs_hf
@pytest.mark.parametrize("name", NAMES)
def test_greedy_generate_matches_eager(name, calls):
    """Left-padded batch, 14 new tokens: past the sliding window, through the KV cache."""
    ft, eager = pair(name)
    ids = torch.randint(3, 97, (3, 12))
    mask = masks()["left"]
    kw = dict(attention_mask=mask, max_new_tokens=14, min_new_tokens=14, do_sample=False)
    with torch.no_grad():
        a, b = ft.generate(ids, **kw), eager.generate(ids, **kw)
    assert a.shape == (3, 26)
    assert torch.equal(a, b)
    # prefill + 13 decode steps, 2 layers; varlen while padding is in view (a sliding-window cache
    # drops the padded keys once they are older than the window, then the dense kernel serves)
    assert calls["varlen"] + calls["dense"] == 2 * 14 and calls["varlen"] >= 2


@needs_hf
@pytest.mark.skipif(not HAS_GPT_OSS, reason="this transformers has no gpt-oss (GptOssConfig)")
@pytest.mark.parametrize("padding", ["none", "left"])
def test_gpt_oss_sink_gradients_match_eager(padding, calls):
    """gpt-oss passes its sinks as s_aux: the loss's gradients w.r.t. the sinks (and other
    attention weights) equal eager's, through the sliding and the full layer."""
    ft, eager = pair("gpt-oss-sinks")
    ids = torch.randint(0, 97, (3, 12))
    mask = masks()[padding]
    labels = ids if mask is None else ids.masked_fill(mask == 0, -100)
    grads = []
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("sinks", "q_proj.weight", "k_proj.weight")]
    for model in (ft, eager):
        out = model(ids, attention_mask=mask, labels=labels)
        params = dict(model.named_parameters())
        grads.append(torch.autograd.grad(out.loss, [params[n] for n in names]))
    for n, a, b in zip(names, *grads, strict=True):
        assert a.abs().max() > 0, n
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=n)
    assert calls["varlen" if mask is not None else "dense"] == 2


@needs_hf
@pytest.mark.skipif(not HAS_DEEPSEEK_V3, reason="this transformers has no DeepSeek-V3 (DeepseekV3Config)")
@pytest.mark.parametrize("padding", ["none", "left"])
def test_deepseek_v3_unpadded_v_gradients_match_eager(padding, calls, monkeypatch):
    """DeepSeek-V3's attention (q/k head dim 24, v 16) reaches flashtile with v unpadded; the
    loss's gradients w.r.t. every parameter equal eager's. With padding, the first real token is
    no label either: the logits that predict it are a padded position's, whose attention output is
    not defined alike by the two implementations."""
    ft, eager = pair("deepseek-v3-mla")
    dims = []
    varlen = ft_hf.flash_attn_varlen_func

    def spy(q, k, v, *a, **kw):
        dims.append((q.shape[-1], v.shape[-1]))
        return varlen(q, k, v, *a, **kw)

    monkeypatch.setattr(ft_hf, "flash_attn_varlen_func", spy)
    ids = torch.randint(0, 97, (3, 12))
    mask = masks()[padding]
    labels = ids
    if mask is not None:
        after_pad = torch.cat([torch.ones_like(mask[:, :1]), mask[:, :-1]], 1) == 0
        labels = ids.masked_fill((mask == 0) | after_pad, -100)
    grads = []
    for model in (ft, eager):
        out = model(ids, attention_mask=mask, labels=labels)
        params = dict(model.named_parameters())
        names = sorted(params)
        grads.append(torch.autograd.grad(out.loss, [params[n] for n in names], allow_unused=True))
    checked = 0
    for n, a, b in zip(names, *grads, strict=True):
        if b is None:  # (MoE experts no token was routed to)
            assert a is None or a.abs().max() == 0, n
            continue
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=n)
        checked += "self_attn" in n
    assert checked >= 8
    if mask is not None:
        assert dims == [(24, 16)] * 2
    assert calls["varlen" if mask is not None else "dense"] == 2


@needs_hf
def test_generate_static_cache_matches_eager():
    ft, eager = pair("llama-gqa")
    ids = torch.randint(3, 97, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    kw = dict(attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        assert torch.equal(ft.generate(ids, **kw), eager.generate(ids, **kw))


@needs_hf
@pytest.mark.parametrize("name", ["llama-gqa", "mistral-sliding-window"])
def test_packed_position_ids_match_separate_sequences(name, calls):
    """One row holding two sequences (position_ids restart): attention stays inside each."""
    ft, _ = pair(name)
    a, b = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 7))
    pos = torch.cat([torch.arange(5), torch.arange(7)])[None]
    with torch.no_grad():
        packed = ft(torch.cat([a, b], 1), position_ids=pos).logits
        sep = torch.cat([ft(a).logits, ft(b).logits], 1)
    torch.testing.assert_close(packed, sep, atol=2e-5, rtol=1e-4)
    assert calls["varlen"] == 2


@needs_hf
def test_dropout_in_training():
    from transformers import AutoModelForCausalLM, LlamaConfig

    ft_hf.register()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**COMMON, attention_dropout=0.3),
                                             attn_implementation="flashtile")  # fmt: skip
    ids = torch.randint(0, 97, (2, 10))
    model.eval()
    with torch.no_grad():
        ref = model(ids).logits
    model.train()
    torch.manual_seed(1)
    a = model(ids, labels=ids)
    torch.manual_seed(1)
    b = model(ids).logits
    torch.manual_seed(2)
    c = model(ids).logits
    assert torch.equal(a.logits, b), "dropout follows torch.manual_seed"
    assert not torch.allclose(a.logits, c) and not torch.allclose(a.logits, ref)
    a.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@needs_hf
def test_register_is_idempotent_and_other_implementations_still_load():
    from transformers import AttentionInterface, AutoModelForCausalLM, LlamaConfig
    from transformers.masking_utils import AttentionMaskInterface

    assert ft_hf.register() == "flashtile" and ft_hf.register() == "flashtile"
    assert AttentionInterface._global_mapping["flashtile"] is ft_hf.flashtile_attention_forward
    assert AttentionMaskInterface._global_mapping["flashtile"] is ft_hf.flashtile_mask
    model = AutoModelForCausalLM.from_config(LlamaConfig(**COMMON), attn_implementation="sdpa")
    assert model.config._attn_implementation == "sdpa"


@needs_hf
def test_unsupported_inputs_raise():
    q = torch.randn(1, 4, 3, 8)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="2-D"):
        ft_hf.flashtile_attention_forward(module, q, q, q, torch.ones(1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="4-D attention mask must have shape"):
        ft_hf.flashtile_attention_forward(module, q, q, q, torch.ones(1, 1, 2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="s_aux"):
        ft_hf.flashtile_attention_forward(module, q, q, q, None, s_aux=torch.zeros(3))
    # per-head sinks in half precision: accepted, upcast to float32, the gradient reaches them
    sinks = torch.randn(4, dtype=torch.bfloat16, requires_grad=True)
    out, _ = ft_hf.flashtile_attention_forward(module, q, q, q, None, s_aux=sinks)
    out.sum().backward()
    assert sinks.grad is not None and sinks.grad.dtype == torch.bfloat16


def test_missing_transformers_gives_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match=r"pip install 'flashtile\[hf\]'"):
        ft_hf.register()


# ----------------------------------------------------------------------------------------------
# mask patterns beyond causal / sliding window: chunked (Llama 4), 4-D masks (flashtile.flex)

HAS_LLAMA4 = transformers is not None and hasattr(transformers, "Llama4TextConfig")


def llama4_pair(chunk: int = 5):
    """(flashtile, eager) tiny Llama 4 text models: three chunked-attention layers and one full."""
    from transformers import Llama4ForCausalLM, Llama4TextConfig

    impl = ft_hf.register("tile_attention")  # transformers refuses long chunked attention for "flash" names
    cfg = Llama4TextConfig(**{**COMMON, "num_hidden_layers": 4}, head_dim=16, intermediate_size_mlp=96,
                           attention_chunk_size=chunk, num_local_experts=2, num_experts_per_tok=1)  # fmt: skip
    torch.manual_seed(0)
    ft = Llama4ForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation=impl).eval()
    eager = Llama4ForCausalLM._from_config(copy.deepcopy(cfg), attn_implementation="eager").eval()
    eager.load_state_dict(ft.state_dict())
    assert "chunked_attention" in cfg.layer_types
    return ft, eager


@needs_hf
@pytest.mark.skipif(not HAS_LLAMA4, reason="this transformers has no Llama 4 text model")
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_llama4_chunked_attention_matches_eager(padding, calls):
    ft, eager = llama4_pair()
    ids = torch.randint(0, 97, (3, 12))
    mask = masks()[padding]
    with torch.no_grad():
        a = ft(ids, attention_mask=mask).logits
        b = eager(ids, attention_mask=mask).logits
        assert calls["dense"] + calls["varlen"] == 4  # one call per layer, on flashtile
        unchunked = llama4_pair(chunk=64)[0](ids, attention_mask=mask).logits
    real = torch.ones(3, 12, dtype=torch.bool) if mask is None else mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=2e-5, rtol=1e-4)
    assert (a[real] - unchunked[real]).abs().max() > 1e-3  # the chunks matter here


@needs_hf
@pytest.mark.skipif(not HAS_LLAMA4, reason="this transformers has no Llama 4 text model")
def test_llama4_chunked_generate_matches_eager():
    ft, eager = llama4_pair()
    ids = torch.randint(3, 97, (3, 9))
    kw = dict(attention_mask=masks(3, 9)["left"], max_new_tokens=8, min_new_tokens=8, do_sample=False)
    with torch.no_grad():
        assert torch.equal(ft.generate(ids, **kw), eager.generate(ids, **kw))


@needs_hf
@pytest.mark.parametrize("kind", ["bool", "additive", "additive-bias"])
def test_4d_masks_match_eager(kind):
    """A ready-made 4-D mask (here: causal inside two documents plus a bidirectional prefix)."""
    ft, eager = pair("llama-gqa")
    s = 12
    i = torch.arange(s)
    doc = (i >= 5).long()
    vis = ((i[:, None] >= i[None, :]) | (i[None, :] < 2)) & (doc[:, None] == doc[None, :])
    vis = vis.expand(2, 1, s, s)
    if kind == "bool":
        m = vis
    else:
        m = torch.zeros(2, 1, s, s).masked_fill(~vis, torch.finfo(torch.float32).min)
        if kind == "additive-bias":
            m = m + torch.where(vis, torch.randn(2, 1, s, s), 0.0)
    if kind == "bool":  # eager adds a 4-D mask to the scores; SDPA reads a bool one as True = attend
        eager = sdpa_twin(eager)
    ids = torch.randint(0, 97, (2, s))
    with torch.no_grad():
        a = ft(ids, attention_mask=m).logits
        b = eager(ids, attention_mask=m).logits
    torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4)


def sdpa_twin(model):
    from transformers import AutoModelForCausalLM

    twin = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation="sdpa").eval()
    twin.load_state_dict(model.state_dict())
    return twin


@needs_hf
def test_4d_mask_gradients_match_eager():
    ft, eager = pair("llama-gqa")
    s = 10
    vis = torch.ones(s, s).tril().bool() | (torch.arange(s)[None, :] < 3)
    ids = torch.randint(0, 97, (2, s))
    grads = []
    for model in (ft, sdpa_twin(eager)):
        out = model(ids, attention_mask=vis.expand(2, 1, s, s), labels=ids)
        grads.append(torch.autograd.grad(out.loss, model.model.layers[0].self_attn.q_proj.weight))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


@needs_hf
def test_mask_hook_builds_block_masks_for_nonstandard_patterns():
    """Standard patterns keep the 2-D padding mask; a bidirectional-block (image tokens) or chunked
    mask function becomes a BlockMask equal to transformers' own dense (SDPA) mask."""
    from transformers.masking_utils import (
        and_masks,
        blockwise_overlay,
        causal_mask_function,
        chunked_causal_mask_function,
        or_masks,
        sdpa_mask,
        sliding_window_causal_mask_function,
    )

    from flashtile import BlockMask
    from flashtile.testing import mask_from_block_mask

    b, s = 2, 23
    pad = torch.ones(b, s, dtype=torch.bool)
    pad[1, :4] = False
    assert ft_hf.flashtile_mask(b, s, s, mask_function=causal_mask_function, attention_mask=pad).shape == (b, s)
    sw = sliding_window_causal_mask_function(4)
    assert ft_hf.flashtile_mask(b, s, s, mask_function=sw, attention_mask=None) is None
    blocks = torch.full((b, s), -1)
    blocks[:, 6:11] = 0
    blocks[0, 15:20] = 1
    for fn in (
        or_masks(causal_mask_function, blockwise_overlay(blocks)),
        chunked_causal_mask_function(5, torch.tensor([0, 4])),
        and_masks(causal_mask_function, lambda bi, hi, qi, ki: (qi - ki) % 3 != 1),
    ):
        bm = ft_hf.flashtile_mask(b, s, s, mask_function=fn, attention_mask=pad)
        assert isinstance(bm, BlockMask)
        ref = sdpa_mask(batch_size=b, cache_position=torch.arange(s), q_length=s, kv_length=s, mask_function=fn,
                        attention_mask=pad, allow_is_causal_skip=False, use_vmap=True)  # fmt: skip
        assert torch.equal(mask_from_block_mask(bm, s, s), ref.expand(b, 1, s, s))
