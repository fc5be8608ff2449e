"""flashtile.padding (flash-attn's bert_padding): unpad_input / pad_input, and varlen attention on
unpadded inputs against the dense oracle with padding masks."""

from __future__ import annotations

import pytest
import torch
from conftest import DTYPE_IDS, DTYPES, shrink

from flashtile import flash_attn_varlen_func
from flashtile.padding import pad_input, unpad_input
from flashtile.testing import attention_ref, compare_with_oracle, make_alibi, qkv_inputs


def right_padded_mask(lens: list[int], seqlen: int, device="cpu") -> torch.Tensor:
    return torch.arange(seqlen, device=device)[None, :] < torch.tensor(lens, device=device)[:, None]


MASKS = {
    "right-padded": lambda: right_padded_mask([5, 0, 8, 1], 8),
    "random": lambda: torch.rand(4, 8) < 0.6,
    "all-real": lambda: torch.ones(4, 8, dtype=torch.bool),
    "int": lambda: right_padded_mask([3, 8, 2, 7], 8).to(torch.int32),
}


@pytest.mark.parametrize("kind", list(MASKS))
def test_unpad_values(kind):
    mask = MASKS[kind]()
    x = torch.randn(4, 8, 3, 5)
    xu, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, mask)
    lens = mask.bool().sum(-1)
    assert cu_seqlens.dtype == torch.int32 and seqused.dtype == torch.int32
    assert cu_seqlens.tolist() == [0] + torch.cumsum(lens, 0).tolist()
    assert isinstance(max_seqlen, int) and max_seqlen == lens.max().item()
    assert seqused.tolist() == lens.tolist()
    assert indices.tolist() == torch.nonzero(mask.bool().flatten()).flatten().tolist()
    assert xu.shape == (lens.sum().item(), 3, 5)
    torch.testing.assert_close(xu, x.flatten(0, 1)[mask.bool().flatten()], rtol=0, atol=0)


@pytest.mark.parametrize("kind", list(MASKS))
def test_round_trip(kind):
    mask = MASKS[kind]().bool()
    x = torch.randn(4, 8, 6)
    xu, indices, *_ = unpad_input(x, mask)
    back = pad_input(xu, indices, 4, 8)
    assert back.shape == x.shape
    torch.testing.assert_close(back, x * mask[..., None], rtol=0, atol=0)
    # and the other way round: unpad(pad(xu)) == xu
    torch.testing.assert_close(unpad_input(back, mask)[0], xu, rtol=0, atol=0)


def test_unused_mask():
    """unused_mask tokens are kept in the packed output and counted in cu_seqlens, not in seqused."""
    attn = right_padded_mask([3, 5], 8)
    unused = torch.zeros(2, 8, dtype=torch.bool)
    unused[0, 3:5] = True  # two extra tokens after sequence 0's real ones
    x = torch.randn(2, 8, 4)
    xu, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, attn, unused)
    assert cu_seqlens.tolist() == [0, 5, 10]
    assert seqused.tolist() == [3, 5]
    assert max_seqlen == 5
    assert xu.shape == (10, 4)
    torch.testing.assert_close(pad_input(xu, indices, 2, 8), x * (attn | unused)[..., None], rtol=0, atol=0)


def test_gradients_flow():
    mask = torch.rand(3, 7) < 0.5
    x = torch.randn(3, 7, 4, requires_grad=True)
    xu, indices, *_ = unpad_input(x, mask)
    w = torch.randn_like(xu)
    (xu * w).sum().backward()
    torch.testing.assert_close(x.grad, pad_input(w, indices, 3, 7), rtol=0, atol=0)
    assert (x.grad[~mask] == 0).all()

    y = xu.detach().requires_grad_()
    z = torch.randn(3, 7, 4)
    (pad_input(y, indices, 3, 7) * z).sum().backward()
    torch.testing.assert_close(y.grad, z[mask], rtol=0, atol=0)


def test_bad_mask_shape():
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, seqlen\) = \(2, 8\)"):
        unpad_input(torch.randn(2, 8, 4), torch.ones(2, 7, dtype=torch.bool))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize(
    "opts",
    [dict(), dict(causal=True), dict(causal=True, alibi="bh", softcap=2.0), dict(window_size=(3, 5))],
    ids=["full", "causal", "causal-alibi-softcap", "window"],
)
def test_varlen_on_unpadded_equals_padded_reference(backend, device, dtype, opts):
    """unpad -> flash_attn_varlen_func -> pad equals attention_ref on the padded batch with
    query/key padding masks (right-padded; a batch entry with no keys gives zeros)."""
    opts = dict(opts)
    b, h, hk, d = 4, 4, 2, 32
    sq, sk = shrink(backend, 23, 31)
    lens_q = [sq, 1, 9, 12]
    lens_k = [sk, 4, 0, 17]
    qmask = right_padded_mask(lens_q, sq, device)
    kmask = right_padded_mask(lens_k, sk, device)
    alibi = make_alibi(opts.pop("alibi", None), b, h, device)
    q, k, v = qkv_inputs(b, sq, sk, h, hk, d, dtype, device)

    def fn(q, k, v):
        qu, iq, cu_q, mq, _ = unpad_input(q, qmask)
        ku, ik, cu_k, mk, _ = unpad_input(k, kmask)
        vu = unpad_input(v, kmask)[0]
        out, lse, _ = flash_attn_varlen_func(qu, ku, vu, cu_q, cu_k, mq, mk, alibi_slopes=alibi,
                                             return_attn_probs=True, **opts)  # fmt: skip
        lse_pad = torch.full((b * sq, h), float("-inf"), device=device)
        lse_pad[iq] = lse.t()
        return pad_input(out, iq, b, sq), lse_pad.view(b, sq, h).permute(0, 2, 1)

    def oracle(q, k, v, upcast):
        return attention_ref(q, k, v, query_padding_mask=qmask, key_padding_mask=kmask, alibi_slopes=alibi,
                             upcast=upcast, **opts)  # fmt: skip

    res = compare_with_oracle(fn, oracle, (q, k, v))
    assert (res["out"][~qmask] == 0).all()
    dq, dk, dv = res["grads"]
    assert (dq[~qmask] == 0).all() and (dk[~kmask] == 0).all() and (dv[~kmask] == 0).all()
