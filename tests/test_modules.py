"""flashtile.modules.MHA and flashtile.models.GPT against plain PyTorch.

MHA is compared, with the same weights, to (1) ``torch.nn.MultiheadAttention`` where that module
has the feature (self/cross attention, causal, key padding) and (2) a plain materialised-scores
implementation written here (rotary via complex multiplication, ALiBi, windows, softcap, GQA),
forward and backward, on dense, padded and packed batches. The KV-cache path must reproduce the
full forward; GPT's cached generation must reproduce uncached generation; a tiny GPT must learn.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flashtile.models import GPT, GPTConfig
from flashtile.modules import MHA, InferenceParams, alibi_slopes
from flashtile.testing import attention_ref, cu_seqlens

D, H = 32, 4  # embed dim, heads (head dim 8)
LENS = [7, 9, 11]  # real tokens per row of the padded batch (seqlen 11)


def padding_mask(lens=LENS, s=11, left=(1,)) -> torch.Tensor:
    """bool (b, s): row i has lens[i] real tokens, right-padded, or left-padded for rows in ``left``."""
    m = torch.zeros(len(lens), s, dtype=torch.bool)
    for i, n in enumerate(lens):
        if i in left:
            m[i, s - n :] = True
        else:
            m[i, :n] = True
    return m


# ---------------------------------------------------------------------------------------------
# a plain reference, one sequence at a time


def rope_ref(x: torch.Tensor, rd: int, base: float, interleaved: bool) -> torch.Tensor:
    """Rotary on x (s, heads, hd) at positions 0..s-1, as a complex multiplication."""
    s = x.shape[0]
    inv = base ** (-torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    rot = torch.polar(torch.ones(s, rd // 2, dtype=torch.float64), torch.arange(s).double()[:, None] * inv)
    xr = x[..., :rd].double()
    if interleaved:
        z = torch.view_as_complex(xr.unflatten(-1, (rd // 2, 2)).contiguous()) * rot[:, None]
        out = torch.view_as_real(z).flatten(-2)
    else:
        z = torch.complex(xr[..., : rd // 2], xr[..., rd // 2 :]) * rot[:, None]
        out = torch.cat((z.real, z.imag), dim=-1)
    return torch.cat((out.to(x.dtype), x[..., rd:]), dim=-1)


def attn_ref(q, k, v, *, causal, window, softcap, slopes, scale):
    """q (sq, h, hd), k/v (sk, hk, hd) -> (sq, h, hd); rows that see no key give 0."""
    sq, h, hd = q.shape
    sk = k.shape[0]
    k, v = k.repeat_interleave(h // k.shape[1], 1), v.repeat_interleave(h // v.shape[1], 1)
    s = torch.einsum("qhd,khd->hqk", q, k) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    i = torch.arange(sq)[:, None] + sk - sq  # bottom-right diagonal
    j = torch.arange(sk)[None, :]
    if slopes is not None:
        s = s - slopes[:, None, None] * (i - j).abs()
    left, right = window
    right = 0 if causal else right
    ok = torch.ones(sq, sk, dtype=torch.bool)
    if right >= 0:
        ok &= j <= i + right
    if left >= 0:
        ok &= j >= i - left
    p = torch.softmax(s.masked_fill(~ok, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", p, v)


def mha_ref(m: MHA, x, x_kv=None, key_padding_mask=None, seqs=None):
    """Plain MHA with m's weights. ``seqs``: optional list of (start, end) of packed sequences."""
    h, hk, hd = m.num_heads, m.num_heads_kv, m.head_dim
    scale = m.softmax_scale or 1 / math.sqrt(hd)
    opts = dict(causal=m.causal, window=m.window_size, softcap=m.softcap, slopes=m.alibi_slopes, scale=scale)

    def one(xq, xk):  # (sq, d), (sk, d) -> (sq, d)
        if m.cross_attn:
            q = F.linear(xq, m.Wq.weight, m.Wq.bias).view(-1, h, hd)
            k, v = F.linear(xk, m.Wkv.weight, m.Wkv.bias).view(-1, 2, hk, hd).unbind(1)
        else:
            q, k, v = F.linear(xq, m.Wqkv.weight, m.Wqkv.bias).split([h * hd, hk * hd, hk * hd], -1)
            q, k, v = q.view(-1, h, hd), k.view(-1, hk, hd), v.view(-1, hk, hd)
        if m.rotary_emb_dim:
            q = rope_ref(q, m.rotary_emb_dim, m.rotary_emb_base, m.rotary_emb_interleaved)
            k = rope_ref(k, m.rotary_emb_dim, m.rotary_emb_base, m.rotary_emb_interleaved)
        if m.sink is not None:  # the library's oracle, which knows the sink
            o, _ = attention_ref(q[None], k[None], v[None], causal=m.causal, window_size=m.window_size,
                                 softcap=m.softcap, alibi_slopes=m.alibi_slopes, softmax_scale=scale,
                                 learnable_sink=m.sink)  # fmt: skip
            o = o[0]
        else:
            o = attn_ref(q, k, v, **opts)
        return F.linear(o.flatten(-2), m.out_proj.weight, m.out_proj.bias)

    if seqs is not None:
        return torch.cat([one(x[a:b], x[a:b]) for a, b in seqs])
    outs = []
    for i in range(x.shape[0]):
        if key_padding_mask is None:
            outs.append(one(x[i], x[i] if x_kv is None else x_kv[i]))
        elif m.cross_attn:
            outs.append(one(x[i], x_kv[i][key_padding_mask[i]]))
        else:
            real = key_padding_mask[i]
            o = x.new_zeros(x.shape[1:]).index_put((real.nonzero().flatten(),), one(x[i][real], x[i][real]))
            outs.append(o)
    return torch.stack(outs)


def make_mha(**kw) -> MHA:
    m = MHA(D, H, **kw)
    with torch.no_grad():  # non-zero biases, so that they are tested
        for p in m.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.1)
    return m


def check_fwd_bwd(m: MHA, fn_mod, fn_ref, inputs, mask=None, atol=2e-5):
    """Same output (at real positions when ``mask``) and same grads of inputs and weights."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    out = fn_mod(*leaves)
    ref_leaves = [x.detach().clone().requires_grad_() for x in inputs]
    ref = fn_ref(*ref_leaves)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-4)
    dout = torch.randn_like(out)
    if mask is not None:
        dout = dout * mask[..., None]
    params = [p for p in m.parameters()]
    g = torch.autograd.grad(out, leaves + params, dout, allow_unused=True)
    g_ref = torch.autograd.grad(ref, ref_leaves + params, dout, allow_unused=True)
    for a, b in zip(g, g_ref, strict=True):
        if b is None:
            assert a is None or a.abs().max() == 0
            continue
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


OPTIONS = {
    "plain": dict(),
    "causal": dict(causal=True),
    "gqa": dict(num_heads_kv=2, causal=True),
    "mqa": dict(num_heads_kv=1),
    "rotary-neox": dict(causal=True, rotary_emb_dim=8),
    "rotary-gptj-partial-base": dict(causal=True, rotary_emb_dim=4, rotary_emb_interleaved=True,
                                     rotary_emb_base=500.0),  # fmt: skip
    "alibi": dict(causal=True, use_alibi=True),
    "window-causal": dict(causal=True, window_size=(3, 0)),
    "window-both": dict(window_size=(2, 3)),
    "softcap-scale": dict(softcap=2.0, softmax_scale=0.7),
    "everything": dict(num_heads_kv=2, causal=True, rotary_emb_dim=6, use_alibi=True, window_size=(4, 0),
                       softcap=5.0, qkv_proj_bias=False),  # fmt: skip
}


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
def test_mha_dense_matches_reference(opts):
    m = make_mha(**opts)
    x = torch.randn(3, 11, D)
    check_fwd_bwd(m, m, lambda x: mha_ref(m, x), [x])


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
def test_mha_padding_mask_matches_reference(opts):
    """Left and right padding: padded tokens are dropped, positions count real tokens."""
    m = make_mha(**opts)
    x = torch.randn(3, 11, D)
    mask = padding_mask()
    check_fwd_bwd(m, lambda x: m(x, key_padding_mask=mask), lambda x: mha_ref(m, x, key_padding_mask=mask), [x],
                  mask=mask)  # fmt: skip
    out = m(x, key_padding_mask=mask)
    assert out[~mask].abs().max() == 0  # padded positions output exactly 0


@pytest.mark.parametrize("opts", OPTIONS.values(), ids=OPTIONS.keys())
def test_mha_packed_matches_reference(opts):
    m = make_mha(**opts)
    lens = [5, 11, 1, 6]
    cu = cu_seqlens(lens, "cpu")
    x = torch.randn(sum(lens), D)
    seqs = list(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True))
    check_fwd_bwd(m, lambda x: m(x, cu_seqlens=cu, max_seqlen=max(lens)), lambda x: mha_ref(m, x, seqs=seqs), [x])


@pytest.mark.parametrize("opts", [dict(), dict(num_heads_kv=2, use_alibi=True), dict(causal=True, softcap=3.0)],
                         ids=["plain", "gqa-alibi", "causal-softcap"])  # fmt: skip
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "kv-padding"])
def test_mha_cross_attention_matches_reference(opts, padded):
    m = make_mha(cross_attn=True, **opts)
    x, x_kv = torch.randn(3, 5, D), torch.randn(3, 11, D)
    mask = padding_mask() if padded else None
    check_fwd_bwd(m, lambda x, y: m(x, y, key_padding_mask=mask), lambda x, y: mha_ref(m, x, y, key_padding_mask=mask),
                  [x, x_kv])  # fmt: skip


SINK_OPTIONS = {
    "plain": dict(),
    "causal-gqa": dict(causal=True, num_heads_kv=2),
    "everything": dict(num_heads_kv=2, causal=True, rotary_emb_dim=6, use_alibi=True, window_size=(4, 0),
                       softcap=5.0),  # fmt: skip
}


def make_sink_mha(**kw) -> MHA:
    m = make_mha(learnable_sink=True, **kw)
    assert m.sink.dtype == torch.float32 and m.sink.shape == (H,)
    with torch.no_grad():
        m.sink.copy_(torch.tensor([-1.0, 0.5, 2.0, 0.0]))
    return m


@pytest.mark.parametrize("opts", SINK_OPTIONS.values(), ids=SINK_OPTIONS.keys())
@pytest.mark.parametrize("layout", ["dense", "padded", "packed"])
def test_mha_learnable_sink_matches_reference(opts, layout):
    """The sink parameter reaches every attention path; output and every gradient (the sink's
    included, via check_fwd_bwd's parameter list) match attention_ref with the same weights."""
    m = make_sink_mha(**opts)
    if layout == "dense":
        x = torch.randn(3, 11, D)
        check_fwd_bwd(m, m, lambda x: mha_ref(m, x), [x])
    elif layout == "padded":
        x, mask = torch.randn(3, 11, D), padding_mask()
        check_fwd_bwd(m, lambda x: m(x, key_padding_mask=mask), lambda x: mha_ref(m, x, key_padding_mask=mask), [x],
                      mask=mask)  # fmt: skip
    else:
        lens = [5, 11, 1, 6]
        cu = cu_seqlens(lens, "cpu")
        seqs = list(zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True))
        check_fwd_bwd(m, lambda x: m(x, cu_seqlens=cu, max_seqlen=max(lens)), lambda x: mha_ref(m, x, seqs=seqs),
                      [torch.randn(sum(lens), D)])  # fmt: skip


def test_mha_learnable_sink_grad_and_defaults():
    assert make_mha().sink is None
    assert MHA(D, H, learnable_sink=True).sink.abs().max() == 0  # zero init (gpt-oss)
    m = make_sink_mha(causal=True)
    x = torch.randn(2, 7, D)
    (g,) = torch.autograd.grad(m(x).square().sum(), [m.sink])
    (g_ref,) = torch.autograd.grad(mha_ref(m, x).square().sum(), [m.sink])
    assert g.abs().min() > 0
    torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)
    # a module cast to half precision (the sink with it): the sink is upcast per call, its grad flows
    mb = make_sink_mha(causal=True).to(torch.bfloat16)
    out = mb(x.bfloat16())
    assert out.dtype == torch.bfloat16
    (gb,) = torch.autograd.grad(out.float().square().sum(), [mb.sink])
    assert gb.dtype == torch.bfloat16 and torch.isfinite(gb).all() and gb.abs().max() > 0


def torch_mha_like(m: MHA) -> torch.nn.MultiheadAttention:
    """nn.MultiheadAttention carrying m's weights (same [q | k | v] layout of the input projection)."""
    t = torch.nn.MultiheadAttention(D, H, batch_first=True)
    with torch.no_grad():
        w = torch.cat([m.Wq.weight, m.Wkv.weight]) if m.cross_attn else m.Wqkv.weight
        b = torch.cat([m.Wq.bias, m.Wkv.bias]) if m.cross_attn else m.Wqkv.bias
        t.in_proj_weight.copy_(w)
        t.in_proj_bias.copy_(b)
        t.out_proj.weight.copy_(m.out_proj.weight)
        t.out_proj.bias.copy_(m.out_proj.bias)
    return t


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("padded", [False, True], ids=["dense", "right-padding"])
def test_mha_matches_torch_multihead_attention(causal, padded):
    m = make_mha(causal=causal)
    t = torch_mha_like(m)
    x = torch.randn(3, 11, D, requires_grad=True)
    mask = padding_mask(left=()) if padded else torch.ones(3, 11, dtype=torch.bool)
    out = m(x, key_padding_mask=mask if padded else None)
    causal_mask = torch.ones(11, 11, dtype=torch.bool).triu(1) if causal else None  # True = hidden (torch's rule)
    ref, _ = t(x, x, x, key_padding_mask=~mask if padded else None, attn_mask=causal_mask, need_weights=False)
    torch.testing.assert_close(out[mask], ref[mask], atol=2e-5, rtol=1e-4)
    dout = torch.randn_like(out) * mask[..., None]
    gx, gw = torch.autograd.grad(out, [x, m.Wqkv.weight], dout)
    gx_ref, gw_ref = torch.autograd.grad(ref, [x, t.in_proj_weight], dout)
    torch.testing.assert_close(gx, gx_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(gw, gw_ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("padded", [False, True], ids=["dense", "kv-padding"])
def test_mha_cross_attention_matches_torch_multihead_attention(padded):
    m = make_mha(cross_attn=True)
    t = torch_mha_like(m)
    x, x_kv = torch.randn(3, 5, D), torch.randn(3, 11, D)
    mask = padding_mask()
    out = m(x, x_kv, key_padding_mask=mask if padded else None)
    ref, _ = t(x, x_kv, x_kv, key_padding_mask=~mask if padded else None, need_weights=False)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_mha_dropout_only_in_training():
    torch.manual_seed(0)
    m = make_mha(dropout=0.3, causal=True)
    ref = make_mha(causal=True)
    ref.load_state_dict(m.state_dict())
    x = torch.randn(2, 11, D)
    m.train()
    torch.manual_seed(1)
    a = m(x)
    torch.manual_seed(1)
    b = m(x)
    torch.manual_seed(2)
    c = m(x)
    assert torch.equal(a, b), "dropout must be reproducible under torch.manual_seed"
    assert not torch.allclose(a, c), "different seeds must drop different entries"
    assert not torch.allclose(a, ref(x)), "training mode must apply dropout"
    a.sum().backward()
    assert m.Wqkv.weight.grad is not None and torch.isfinite(m.Wqkv.weight.grad).all()
    m.eval()
    torch.testing.assert_close(m(x), ref(x), atol=1e-6, rtol=1e-6)
    m.train()  # the padded path applies dropout too
    mask = padding_mask(lens=[7, 11], left=())
    torch.manual_seed(3)
    p = m(torch.randn(2, 11, D), key_padding_mask=mask)
    assert p[~mask].abs().max() == 0


CACHE_OPTIONS = {
    "plain": dict(causal=True),
    "gqa-rotary": dict(causal=True, num_heads_kv=2, rotary_emb_dim=8),
    "rotary-gptj-partial": dict(causal=True, rotary_emb_dim=4, rotary_emb_interleaved=True),
    "alibi-window-softcap": dict(causal=True, use_alibi=True, window_size=(3, 0), softcap=4.0, num_heads_kv=1),
    "sink-gqa-rotary": dict(causal=True, num_heads_kv=2, rotary_emb_dim=8, learnable_sink=True),
}


@pytest.mark.parametrize("opts", CACHE_OPTIONS.values(), ids=CACHE_OPTIONS.keys())
@pytest.mark.parametrize("page_size", [None, 4], ids=["dense", "paged"])
def test_mha_kv_cache_matches_full_forward(opts, page_size):
    """Prefill 5 tokens, one chunk of 3, then one token at a time: the same outputs as one full pass."""
    m = make_mha(layer_idx=0, **opts)
    x = torch.randn(2, 13, D)
    full = m(x)
    table, pool = None, None
    if page_size is not None:  # a shuffled block table over a larger pool
        table, pool = torch.randperm(12)[:8].view(2, 4).to(torch.int32), 12
    params = InferenceParams(2, 16, page_size=page_size, block_table=table, num_blocks=pool)
    outs = []
    with torch.no_grad():
        for a, b in [(0, 5), (5, 8)] + [(t, t + 1) for t in range(8, 13)]:
            outs.append(m(x[:, a:b], inference_params=params))
            params.seqlen_offset += b - a
    torch.testing.assert_close(torch.cat(outs, 1), full.detach(), atol=2e-5, rtol=1e-4)


def test_mha_kv_cache_per_row_lengths():
    """lengths_per_sample: row 0 continues after 5 cached tokens, row 1 after 3 (its 2 last
    cached tokens are overwritten): each row equals a full pass over its own prefix + new token."""
    m = make_mha(layer_idx=0, causal=True, num_heads_kv=2, rotary_emb_dim=8, use_alibi=True)
    x, new = torch.randn(2, 5, D), torch.randn(2, 1, D)
    params = InferenceParams(2, 8)
    with torch.no_grad():
        m(x, inference_params=params)
        params.lengths_per_sample = torch.tensor([5, 3], dtype=torch.int32)
        out = m(new, inference_params=params)
        for i, n in enumerate([5, 3]):
            ref = m(torch.cat([x[i : i + 1, :n], new[i : i + 1]], 1))[:, -1]
            torch.testing.assert_close(out[i], ref, atol=2e-5, rtol=1e-4)


def test_gpt_per_row_lengths_learned_positions():
    model = GPT(small_cfg(pos_emb="learned")).eval()
    idx, new = torch.randint(0, 61, (2, 6)), torch.randint(0, 61, (2, 1))
    params = InferenceParams(2, 10)
    with torch.no_grad():
        model(idx, inference_params=params)
        params.lengths_per_sample = torch.tensor([6, 4], dtype=torch.int32)
        out, _ = model(new, inference_params=params)
        for i, n in enumerate([6, 4]):
            ref, _ = model(torch.cat([idx[i : i + 1, :n], new[i : i + 1]], 1))
            torch.testing.assert_close(out[i, -1], ref[0, -1], atol=1e-5, rtol=1e-4)


def test_mha_rejects_bad_configs():
    with pytest.raises(ValueError, match="divisible"):
        MHA(30, 4)
    with pytest.raises(ValueError, match="multiple of num_heads_kv"):
        MHA(32, 4, 3)
    with pytest.raises(ValueError, match="self-attention"):
        MHA(32, 4, cross_attn=True, rotary_emb_dim=8)
    with pytest.raises(ValueError, match="layer_idx"):
        MHA(32, 4, causal=True)(torch.randn(1, 2, 32), inference_params=InferenceParams(1, 4))


def test_mha_checks_its_own_input():
    """Bad input to MHA is named as the module's argument (x, x_kv, key_padding_mask), not as an internal
    tensor (q) or a matmul operand (mat1 and mat2)."""
    m, mc = MHA(64, 4), MHA(64, 4, cross_attn=True)
    x = torch.randn(2, 8, 64)
    with pytest.raises(ValueError, match=r"^x must have shape \(batch, seqlen, embed_dim=64\).*got shape \(8, 64\)"):
        m(torch.randn(8, 64))
    with pytest.raises(ValueError, match=r"^x must have shape \(total, embed_dim=64\) with cu_seqlens .*\(2, 8, 64\)"):
        m(x, cu_seqlens=torch.tensor([0, 8], dtype=torch.int32), max_seqlen=8)
    with pytest.raises(ValueError, match=r"^x must have embed_dim = 64 features in its last dimension, got 32"):
        m(torch.randn(2, 8, 32))
    for dtype in (torch.float64, torch.float16, torch.int64):
        with pytest.raises(TypeError, match=rf"^x must have the module's dtype \(torch.float32\), got {dtype}"):
            m(torch.ones(2, 8, 64, dtype=dtype))
    with pytest.raises(TypeError, match=r"^x must be a torch.Tensor"):
        m([[0.0] * 64])
    with pytest.raises(ValueError, match=r"^x_kv must have embed_dim = 64 features in its last dimension, got 48"):
        mc(x, torch.randn(2, 5, 48))
    with pytest.raises(ValueError, match=r"^x_kv .*cross-attention"):
        mc(x)
    with pytest.raises(ValueError, match=r"^x_kv is only used by cross-attention"):
        m(x, torch.randn(2, 5, 64))
    with pytest.raises(ValueError, match=r"^x_kv must have the same batch size as x \(2\), got 3"):
        mc(x, torch.randn(3, 5, 64))
    with pytest.raises(ValueError, match=r"^key_padding_mask must be a bool tensor of shape \(batch, seqlen_k\) = "
                                         r"\(2, 8\) .*got torch.float32 \(2, 8\)"):
        m(x, key_padding_mask=torch.ones(2, 8))
    with pytest.raises(ValueError, match=r"^key_padding_mask must be a bool tensor of shape \(batch, seqlen_k\) = "
                                         r"\(2, 5\) .*got torch.bool \(2, 8\)"):
        mc(x, torch.randn(2, 5, 64), key_padding_mask=torch.ones(2, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"^x must have shape \(batch, seqlen, embed_dim=64\)"):
        MHA(64, 4, layer_idx=0)(torch.randn(8, 64), inference_params=InferenceParams(1, 16))


def test_alibi_slopes():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -(i + 1) for i in range(8)]))
    s = alibi_slopes(6)  # 4 geometric slopes + 2 interleaved from the 8-head sequence
    torch.testing.assert_close(s, torch.tensor([2**-2, 2**-4, 2**-6, 2**-8, 2**-1, 2**-3]))
    m = MHA(48, 6, use_alibi=True).to(torch.bfloat16)  # casting the module keeps exact fp32 slopes
    assert m.alibi_slopes.dtype == torch.float32
    torch.testing.assert_close(m.alibi_slopes, s, atol=0, rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# GPT


def small_cfg(**kw) -> GPTConfig:
    return GPTConfig.from_preset("tiny", **{"n_layer": 2, "n_embd": 32, "n_head": 4, "block_size": 48,
                                            "vocab_size": 61, **kw})  # fmt: skip


GPT_VARIANTS = {
    "tiny-rotary-swiglu-rms-gqa": dict(),
    "learned-gelu-layernorm-untied": dict(pos_emb="learned", mlp="gelu", norm="layernorm", bias=True, n_kv_head=None,
                                          tie_embeddings=False),  # fmt: skip
    "alibi-window-softcap": dict(pos_emb="alibi", window=5, softcap=10.0),
    "partial-rotary-gptj": dict(rotary_dim=4, rotary_interleaved=True),
    "sinks-window": dict(window=5, sink=True),
}


@pytest.mark.parametrize("variant", GPT_VARIANTS.values(), ids=GPT_VARIANTS.keys())
@pytest.mark.parametrize("page_size", [None, 8], ids=["dense", "paged"])
def test_gpt_generate_cached_equals_uncached(variant, page_size):
    model = GPT(small_cfg(**variant)).eval()
    prompt = torch.randint(0, 61, (3, 6))
    greedy = model.generate(prompt, 24, temperature=0, page_size=page_size)
    assert greedy.shape == (3, 30) and torch.equal(greedy[:, :6], prompt)
    assert torch.equal(greedy, model.generate(prompt, 24, temperature=0, use_cache=False))
    sampled = [model.generate(prompt, 12, temperature=0.9, top_k=10, use_cache=c, page_size=page_size,
                              generator=torch.Generator().manual_seed(7)) for c in (True, False)]  # fmt: skip
    assert torch.equal(*sampled)


def test_gpt_logits_cached_equal_uncached():
    model = GPT(small_cfg()).eval()
    idx = torch.randint(0, 61, (2, 20))
    full, _ = model(idx)
    params = InferenceParams(2, 20)
    with torch.no_grad():
        steps = [model(idx[:, :12], inference_params=params)[0]] + [
            model(idx[:, t : t + 1], inference_params=params)[0] for t in range(12, 20)
        ]
    assert params.seqlen_offset == 20
    torch.testing.assert_close(torch.cat(steps, 1), full.detach(), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("variant", GPT_VARIANTS.values(), ids=GPT_VARIANTS.keys())
def test_gpt_padding_and_packing_equal_separate_sequences(variant):
    model = GPT(small_cfg(**variant)).eval()
    lens = [7, 9, 11]
    seqs = [torch.randint(0, 61, (n,)) for n in lens]
    alone = [model(s[None])[0][0] for s in seqs]
    mask = padding_mask(lens)
    idx = torch.zeros(3, 11, dtype=torch.long)
    idx[mask] = torch.cat(seqs)
    padded, _ = model(idx, key_padding_mask=mask)
    for i in range(3):
        torch.testing.assert_close(padded[i][mask[i]], alone[i], atol=1e-5, rtol=1e-4)
    assert padded[~mask].abs().max() == 0
    cu = torch.tensor([0, 7, 16, 27], dtype=torch.int32)
    packed, _ = model(torch.cat(seqs), cu_seqlens=cu, max_seqlen=11)
    torch.testing.assert_close(packed, torch.cat(alone), atol=1e-5, rtol=1e-4)


def test_gpt_padded_loss_ignores_padding():
    model = GPT(small_cfg())
    mask = padding_mask()
    idx = torch.randint(0, 61, (3, 11))
    tgt = torch.randint(0, 61, (3, 11))
    _, loss = model(idx, tgt, key_padding_mask=mask)
    logits, _ = model(idx, key_padding_mask=mask)
    ref = F.cross_entropy(logits[mask], tgt[mask])
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_gpt_presets_and_errors():
    assert set(GPTConfig.from_preset("tiny").__dict__) == set(GPTConfig().__dict__)
    with torch.device("meta"):
        n = GPT(GPTConfig.from_preset("gpt2-small")).num_params()
    assert 123e6 < n < 125.5e6, n  # GPT-2 small: ~124M with tied embeddings
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.from_preset("huge")
    with pytest.raises(ValueError, match="norm"):
        GPT(small_cfg(norm="batchnorm"))
    with pytest.raises(ValueError, match="mlp"):
        GPT(small_cfg(mlp="relu"))
    with pytest.raises(ValueError, match="pos_emb"):
        GPT(small_cfg(pos_emb="sinusoid"))
    with pytest.raises(ValueError, match="block_size"):
        GPT(small_cfg()).generate(torch.zeros(1, 40, dtype=torch.long), 20)


def test_gpt_training_lowers_loss():
    """A tiny character-level GPT on real text (argparse's source): the loss must fall a lot."""
    text = Path(__import__("argparse").__file__).read_text(encoding="utf-8")[:60_000]
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text])
    torch.manual_seed(0)
    model = GPT(small_cfg(vocab_size=len(chars), block_size=32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)

    def batch():
        ix = torch.randint(len(data) - 33, (16,), generator=gen)
        x = torch.stack([data[i : i + 33] for i in ix.tolist()])
        return x[:, :-1], x[:, 1:]

    losses = []
    for _ in range(200):
        x, y = batch()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    first, last = losses[0], sum(losses[-25:]) / 25
    assert abs(first - math.log(len(chars))) < 0.5  # starts near uniform
    assert last < first - 1.5, f"loss went from {first:.3f} to {last:.3f}"
    assert last < 2.5, f"final loss {last:.3f}"
