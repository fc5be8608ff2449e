"""flashtile.sdpa.scaled_dot_product_attention against torch.nn.functional.scaled_dot_product_attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flashtile.sdpa import scaled_dot_product_attention as ft_sdpa

TOL = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def compare(q, k, v, grads=True, **kw):
    """Output and gradients of flashtile vs PyTorch (PyTorch run in float32 as the reference)."""
    dtype = q.dtype
    leaves = [x.detach().clone().requires_grad_(grads) for x in (q, k, v)]
    ref_leaves = [x.detach().float().requires_grad_(grads) for x in (q, k, v)]
    out = ft_sdpa(*leaves, **kw)
    ref_kw = dict(kw)
    m = ref_kw.get("attn_mask")
    if m is not None:  # PyTorch wants the mask as (..., sq, sk); the float reference in float32
        m = m.reshape((1,) * (4 - m.dim()) + tuple(m.shape))
        ref_kw["attn_mask"] = m.float() if m.is_floating_point() else m
    ref = F.scaled_dot_product_attention(*ref_leaves, **ref_kw)
    assert out.shape == ref.shape and out.dtype == dtype
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.float(), ref, atol=atol, rtol=rtol)
    if grads:
        dout = torch.randn_like(ref)
        g = torch.autograd.grad(out, leaves, dout.to(dtype))
        g_ref = torch.autograd.grad(ref, ref_leaves, dout)
        for a, b in zip(g, g_ref, strict=True):
            torch.testing.assert_close(a.float(), b, atol=4 * atol, rtol=4 * rtol)


def qkv(b=2, h=4, hk=4, sq=9, sk=9, e=16, ev=None, dtype=torch.float32, batch=None):
    lead = (b,) if batch is None else batch
    return (torch.randn(*lead, h, sq, e, dtype=dtype), torch.randn(*lead, hk, sk, e, dtype=dtype),
            torch.randn(*lead, hk, sk, ev or e, dtype=dtype))  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("sq,sk", [(9, 9), (5, 12), (12, 5), (1, 7)])
def test_matches_torch(dtype, is_causal, sq, sk):
    """Causal is top-left aligned, as in PyTorch, also when sq != sk."""
    compare(*qkv(sq=sq, sk=sk, dtype=dtype), is_causal=is_causal)


@pytest.mark.parametrize("hk", [1, 2], ids=["mqa", "gqa"])
def test_gqa(hk):
    compare(*qkv(hk=hk), is_causal=True, enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa"):
        ft_sdpa(*qkv(hk=hk))


@pytest.mark.parametrize("e,ev", [(16, 8), (8, 16)])
def test_value_head_dim_differs(e, ev):
    compare(*qkv(e=e, ev=ev), is_causal=True)


def test_scale_and_layouts():
    compare(*qkv(), scale=0.3)
    compare(*qkv(batch=()))  # (h, s, e): no batch dim
    compare(*qkv(batch=(2, 3)), is_causal=True)  # two batch dims
    q, k, v = (x.transpose(-2, -3).contiguous().transpose(-2, -3) for x in qkv())  # (b, s, h, e) memory
    compare(q, k, v, is_causal=True)


@pytest.mark.parametrize("shape", [(2, 1, 1, 11), (11,), (1, 1, 11), (2, 1, 1, 1)], ids=str)
def test_key_padding_bool_mask(shape):
    q, k, v = qkv(sq=6, sk=11)
    mask = torch.rand(shape) > 0.4
    mask[..., 0] = True  # every row keeps a key
    compare(q, k, v, attn_mask=mask)


def test_key_padding_float_mask():
    q, k, v = qkv(sq=6, sk=11)
    keep = torch.rand(2, 1, 1, 11) > 0.4
    keep[..., 0] = True
    mask = torch.zeros(2, 1, 1, 11).masked_fill(~keep, float("-inf"))
    compare(q, k, v, attn_mask=mask)
    compare(*(x.half() for x in (q, k, v)), attn_mask=mask.half())


def test_fully_masked_batch_row_outputs_zero():
    q, k, v = qkv(sq=4, sk=6)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1] = False
    out = ft_sdpa(q, k, v, attn_mask=mask)
    assert out[1].abs().max() == 0
    torch.testing.assert_close(out[0], F.scaled_dot_product_attention(q[:1], k[:1], v[:1])[0], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_general_masks_through_block_masks(dtype):
    """Masks that vary over query rows or heads, and arbitrary additive biases (served as a block
    mask plus a bias score_mod), match PyTorch; every row keeps at least one key."""
    q, k, v = qkv(sq=6, sk=11, dtype=dtype)
    rows = torch.ones(6, 11, dtype=torch.bool).tril(4)
    heads = torch.rand(2, 4, 1, 11) > 0.3
    heads[..., 0] = True
    compare(q, k, v, attn_mask=rows)
    compare(q, k, v, attn_mask=heads)
    compare(q, k, v, attn_mask=torch.randn(2, 1, 6, 11).to(dtype))  # a bias
    bias = torch.randn(2, 1, 6, 11).masked_fill(~rows, float("-inf"))
    compare(q, k, v, attn_mask=bias.to(dtype))
    bias = torch.randn(1, 4, 6, 11, requires_grad=True)  # the bias gets its gradient
    out = ft_sdpa(q.float(), k.float(), v.float(), attn_mask=bias)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias)
    g, g_ref = (torch.autograd.grad(x.square().sum(), bias)[0] for x in (out, ref))
    torch.testing.assert_close(g, g_ref, atol=1e-4, rtol=1e-4)


def test_rejected_masks_have_clear_errors():
    q, k, v = qkv(sq=6, sk=11)
    with pytest.raises(ValueError, match="broadcast"):
        ft_sdpa(q, k, v, attn_mask=torch.ones(5, 11, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_causal"):
        ft_sdpa(q, k, v, attn_mask=torch.ones(11, dtype=torch.bool), is_causal=True)
    with pytest.raises(TypeError, match="bool or floating"):
        ft_sdpa(q, k, v, attn_mask=torch.ones(11, dtype=torch.int64))


def test_dropout():
    q, k, v = qkv()
    torch.manual_seed(0)
    a = ft_sdpa(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    b = ft_sdpa(q, k, v, dropout_p=0.5)
    assert torch.equal(a, b)
    assert not torch.allclose(a, ft_sdpa(q, k, v))
    torch.testing.assert_close(ft_sdpa(q, k, v, dropout_p=0.0), F.scaled_dot_product_attention(q, k, v),
                               atol=2e-5, rtol=1e-4)  # fmt: skip


def test_compiles_without_graph_breaks():
    q, k, v = (x.requires_grad_() for x in qkv(sq=5, sk=9))
    f = torch.compile(lambda q, k, v: ft_sdpa(q, k, v, is_causal=True), fullgraph=True, backend="aot_eager")
    out = f(q, k, v)
    out.sum().backward()
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize(
    "sizes",
    [dict(sq=4, sk=0), dict(sq=0, sk=5), dict(h=0, hk=0), dict(sq=0, sk=0), dict(h=0, hk=0, sq=0, sk=0),
     dict(b=0)],
    ids=["no-keys", "no-queries", "no-heads", "no-queries-no-keys", "all-empty", "no-batch"],
)  # fmt: skip
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_zero_size_sequences_and_heads_match_torch(sizes, is_causal):
    """Empty sequences or head counts give PyTorch's result (zeros where there are no keys, an
    empty tensor where there are no queries or heads), gradients included."""
    compare(*qkv(**sizes), is_causal=is_causal)
    compare(*qkv(**sizes, ev=8), is_causal=is_causal)  # Ev != E
    compare(*qkv(**sizes, dtype=torch.float16))


def test_zero_size_with_mask_gqa_and_no_batch_dim():
    q, k, v = qkv(sq=3, sk=0)
    compare(q, k, v, attn_mask=torch.ones(2, 1, 1, 0, dtype=torch.bool))
    compare(*qkv(h=4, hk=2, sk=0), enable_gqa=True)
    compare(*qkv(h=0, hk=0, batch=()))
    with pytest.raises(TypeError, match="query"):  # the dtype rule holds for empty inputs too
        ft_sdpa(*qkv(sk=0, dtype=torch.float64))
    with pytest.raises(ValueError, match="heads"):
        ft_sdpa(*qkv(h=4, hk=0), enable_gqa=True)
