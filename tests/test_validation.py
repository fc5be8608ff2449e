"""Bad input (issue 2, item 6): each one raises an exception whose message names the argument
and states the expectation. These checks run before any backend is chosen, so one device
(CPU, plus 'meta' tensors for device mismatches) covers them."""

from __future__ import annotations

import re

import pytest
import torch

import flashtile
from flashtile import (
    BackendUnavailableError,
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)
from flashtile.testing import cu_seqlens, qkv_inputs


def qkv(b=2, sq=8, sk=8, h=4, hk=4, d=16, dtype=torch.float32):
    return qkv_inputs(b, sq, sk, h, hk, d, dtype, "cpu")


def varlen_qkv(lens_q=(3, 5), lens_k=(4, 6), h=2, d=16):
    q = torch.randn(sum(lens_q), h, d)
    k = torch.randn(sum(lens_k), h, d)
    v = torch.randn(sum(lens_k), h, d)
    return q, k, v, cu_seqlens(list(lens_q), "cpu"), cu_seqlens(list(lens_k), "cpu"), max(lens_q), max(lens_k)


# ----------------------------------------------------------------------------------------------
# q, k, v


@pytest.mark.parametrize("which", ["k", "v"])
def test_dtype_mismatch(which):
    q, k, v = qkv()
    args = {"q": q, "k": k, "v": v}
    args[which] = args[which].half()
    with pytest.raises(TypeError, match=rf"^{which} must have the same dtype as q \(torch.float32\)"):
        flash_attn_func(**args)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.int64, torch.uint8])
def test_unsupported_dtype(dtype):
    q, k, v = (x.to(dtype) for x in qkv())
    with pytest.raises(TypeError, match=r"^q must be float16, bfloat16, float32 or float8_e4m3fn, got torch\."):
        flash_attn_func(q, k, v)


@pytest.mark.parametrize("which", ["k", "v"])
def test_device_mismatch(which):
    q, k, v = qkv()
    args = {"q": q, "k": k, "v": v}
    args[which] = torch.empty(args[which].shape, device="meta")
    with pytest.raises(ValueError, match=rf"^{which} must be on the same device as q \(cpu\), got meta"):
        flash_attn_func(**args)


def test_not_a_tensor():
    q, k, v = qkv()
    with pytest.raises(TypeError, match=r"^k must be a torch.Tensor, got list"):
        flash_attn_func(q, k.tolist(), v)


@pytest.mark.parametrize(
    "which,shape",
    [("q", (2, 8, 4)), ("q", (2, 8, 4, 16, 1)), ("k", (8, 4, 16)), ("v", (1, 2, 8, 4, 16))],
)
def test_wrong_rank(which, shape):
    args = dict(zip("qkv", qkv(), strict=True))
    args[which] = torch.randn(shape)
    with pytest.raises(ValueError, match=rf"^{which} must have 4 dimensions \(batch, seqlen_"):
        flash_attn_func(**args)


def test_wrong_rank_varlen():
    q, k, v, cu_q, cu_k, mq, mk = varlen_qkv()
    with pytest.raises(ValueError, match=r"^q must have 3 dimensions \(total_q, nheads, headdim\)"):
        flash_attn_varlen_func(q[None], k, v, cu_q, cu_k, mq, mk)


def test_batch_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"^q, k, v must have the same batch size, got 2, 1, 1"):
        flash_attn_func(q, k[:1], v[:1])


def test_k_v_shape_mismatch():
    q, k, v = qkv()
    with pytest.raises(ValueError, match=r"^k and v must have the same shape"):
        flash_attn_func(q, k, v[:, :5])


@pytest.mark.parametrize("h,hk", [(4, 3), (6, 4), (2, 4)])
def test_heads_not_divisible(h, hk):
    q, k, v = qkv(h=h, hk=hk)
    with pytest.raises(ValueError, match=rf"number of query heads \({h}\) must be a positive multiple .*\({hk}\)"):
        flash_attn_func(q, k, v)


def test_headdim_mismatch():
    """k must have q's head dim; v may have its own (tests/test_vdim.py)."""
    args = dict(zip("qkv", qkv(d=16), strict=True))
    args["k"] = torch.randn(*args["k"].shape[:-1], 32)
    args["v"] = torch.randn(*args["v"].shape[:-1], 32)
    with pytest.raises(ValueError, match=r"^k must have the same head dim as q \(16\), got 32"):
        flash_attn_func(**args)
    args["k"] = torch.randn(*args["k"].shape[:-1], 16)
    assert flash_attn_func(**args).shape[-1] == 32


@pytest.mark.parametrize("d", [0, 513, 1024])
def test_headdim_out_of_range(d):
    q, k, v = qkv(d=d)
    with pytest.raises(ValueError, match=rf"^head dim of q must be between 1 and 512, got {d}"):
        flash_attn_func(q, k, v)


@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_last_dim_not_contiguous(which):
    args = dict(zip("qkv", qkv(), strict=True))
    args[which] = torch.randn(*args[which].shape[:-1], 32)[..., ::2]
    assert args[which].stride(-1) == 2
    with pytest.raises(ValueError, match=rf"^{which} must be contiguous in its last dimension \(stride 1\)"):
        flash_attn_func(**args)


def test_other_strides_are_fine():
    """Only the last dimension must be contiguous: transposed (b, h, s, d) views are accepted."""
    q, k, v = (x.transpose(1, 2).contiguous().transpose(1, 2) for x in qkv())
    assert not q.is_contiguous()
    torch.testing.assert_close(flash_attn_func(q, k, v), flash_attn_func(q.contiguous(), k, v))


# ----------------------------------------------------------------------------------------------
# scalar options


@pytest.mark.parametrize("window", [(-2, -1), (-1, -2), (3, -5), (-100, 0)])
def test_window_below_minus_one(window):
    with pytest.raises(ValueError, match=r"^window_size entries must be >= -1"):
        flash_attn_func(*qkv(), window_size=window)


@pytest.mark.parametrize("window", [(1,), (1, 2, 3), "ab", None])
def test_window_not_a_pair(window):
    with pytest.raises(ValueError, match=r"^window_size must be a pair of ints"):
        flash_attn_func(*qkv(), window_size=window)


@pytest.mark.parametrize("window", [(1.5, 0), (0, 2.0), (-1.0, -1), (True, 0), (3, "2")], ids=str)
def test_window_entries_must_be_ints(window):
    """Floats are not truncated (``(1.5, 0)`` was silently ``(1, 0)``), bools are not windows."""
    with pytest.raises(ValueError, match=r"^window_size must be a pair of ints"):
        flash_attn_func(*qkv(), window_size=window)


def test_window_integer_like_entries_are_accepted():
    """Any integer (a list, numpy-style integer scalars, 0-d integer tensors) is a window entry."""
    q, k, v = qkv()
    ref = flash_attn_func(q, k, v, window_size=(3, 0))
    torch.testing.assert_close(flash_attn_func(q, k, v, window_size=[3, 0]), ref, atol=0, rtol=0)
    torch.testing.assert_close(flash_attn_func(q, k, v, window_size=(torch.tensor(3), 0)), ref, atol=0, rtol=0)


def test_window_from_symbolic_shapes_under_compile():
    """Under torch.compile with dynamic shapes a window computed from a shape is a SymInt: accepted."""
    q, k, v = qkv(sq=8, sk=12)
    f = torch.compile(lambda q, k, v: flash_attn_func(q, k, v, window_size=(k.shape[1] - q.shape[1], 0)),
                      fullgraph=True, dynamic=True, backend="eager")  # fmt: skip
    torch.testing.assert_close(f(q, k, v), flash_attn_func(q, k, v, window_size=(4, 0)), atol=0, rtol=0)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan"), "0.1"])
def test_dropout_out_of_range(p):
    with pytest.raises(ValueError, match=r"^dropout_p must be in \[0, 1\)"):
        flash_attn_func(*qkv(), dropout_p=p)


@pytest.mark.parametrize("cap", [-1.0, -1e-6, float("nan")])
def test_softcap_negative(cap):
    with pytest.raises(ValueError, match=r"^softcap must be >= 0"):
        flash_attn_func(*qkv(), softcap=cap)


@pytest.mark.parametrize("scale", [float("inf"), float("nan"), "0.5"])
def test_softmax_scale_invalid(scale):
    with pytest.raises(ValueError, match=r"^softmax_scale must be a finite float or None"):
        flash_attn_func(*qkv(), softmax_scale=scale)


@pytest.mark.parametrize("shape", [(3,), (5,), (2, 3), (1, 4), (2, 4, 1), (4, 2)])
def test_alibi_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"^alibi_slopes must have shape \(nheads,\) = \(4,\) or \(batch, nheads\)"):
        flash_attn_func(*qkv(b=2, h=4), alibi_slopes=torch.rand(shape))


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64, torch.bfloat16])
def test_alibi_wrong_dtype(dtype):
    with pytest.raises(TypeError, match=r"^alibi_slopes must be float32"):
        flash_attn_func(*qkv(h=4), alibi_slopes=torch.rand(4, dtype=dtype))


def test_alibi_wrong_device():
    with pytest.raises(ValueError, match=r"^alibi_slopes must be on the same device as q"):
        flash_attn_func(*qkv(h=4), alibi_slopes=torch.rand(4, device="meta"))


def test_alibi_varlen_batch_shape():
    q, k, v, cu_q, cu_k, mq, mk = varlen_qkv(h=2)
    flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, alibi_slopes=torch.rand(2, 2))  # (nseq, h): fine
    with pytest.raises(ValueError, match=r"^alibi_slopes must have shape .*\(batch, nheads\) = \(2, 2\)"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, mq, mk, alibi_slopes=torch.rand(3, 2))


# ----------------------------------------------------------------------------------------------
# varlen metadata


@pytest.mark.parametrize("which", ["cu_seqlens_q", "cu_seqlens_k"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.int16])
def test_cu_seqlens_not_int32(which, dtype):
    q, k, v, cu_q, cu_k, mq, mk = varlen_qkv()
    args = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k}
    args[which] = args[which].to(dtype)
    with pytest.raises(TypeError, match=rf"^{which} must be int32, got torch\."):
        flash_attn_varlen_func(q, k, v, max_seqlen_q=mq, max_seqlen_k=mk, **args)


@pytest.mark.parametrize("which", ["cu_seqlens_q", "cu_seqlens_k"])
def test_cu_seqlens_not_monotonic(which):
    q, k, v, cu_q, cu_k, mq, mk = varlen_qkv(lens_q=(3, 5), lens_k=(4, 6))
    args = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k}
    total = args[which][-1].item()
    args[which] = torch.tensor([0, total + 1, total], dtype=torch.int32)
    with pytest.raises(ValueError, match=rf"^{which} must be non-decreasing"):
        flash_attn_varlen_func(q, k, v, max_seqlen_q=64, max_seqlen_k=64, **args)


@pytest.mark.parametrize("which", ["cu_seqlens_q", "cu_seqlens_k"])
def test_cu_seqlens_not_starting_at_zero(which):
    q, k, v, cu_q, cu_k, mq, mk = varlen_qkv(lens_q=(3, 5), lens_k=(4, 6))
    args = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k}
    args[which] = args[which].clone()
    args[which][0] = 1
    with pytest.raises(ValueError, match=rf"^{which} must start at 0, got 1"):
        flash_attn_varlen_func(q, k, v, max_seqlen_q=mq, max_seqlen_k=mk, **args)


@pytest.mark.parametrize("which", ["cu_seqlens_q", "cu_seqlens_k"])
@pytest.mark.parametrize("delta", [-1, 1])
def test_cu_seqlens_total_mismatch(which, delta):
    q, k, v, cu_q, cu_k, mq, mk = varlen_qkv(lens_q=(3, 5), lens_k=(4, 6))
    args = {"cu_seqlens_q": cu_q, "cu_seqlens_k": cu_k}
    args[which] = args[which].clone()
    args[which][-1] += delta
    with pytest.raises(ValueError, match=rf"^{re.escape(which)}\[-1\] must equal the total number of tokens"):
        flash_attn_varlen_func(q, k, v, max_seqlen_q=mq + 1, max_seqlen_k=mk + 1, **args)


def test_cu_seqlens_wrong_length():
    q, k, v, cu_q, cu_k, mq, mk = varlen_qkv(lens_q=(3, 5), lens_k=(4, 6))
    cu_k3 = torch.tensor([0, 4, 10, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match=r"^cu_seqlens_k must have the same length as cu_seqlens_q \(3\), got 4"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k3, mq, mk)


@pytest.mark.parametrize("bad", [torch.tensor([0], dtype=torch.int32), torch.zeros(2, 2, dtype=torch.int32)])
def test_cu_seqlens_wrong_shape(bad):
    q, k, v, cu_q, cu_k, mq, mk = varlen_qkv()
    with pytest.raises(ValueError, match=r"^cu_seqlens_q must be a 1-D tensor of shape \(batch \+ 1,\)"):
        flash_attn_varlen_func(q, k, v, bad, cu_k, mq, mk)


def test_cu_seqlens_wrong_device():
    q, k, v, cu_q, cu_k, mq, mk = varlen_qkv()
    with pytest.raises(ValueError, match=r"^cu_seqlens_k must be on the same device as q"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k.to("meta"), mq, mk)


@pytest.mark.parametrize("which", ["max_seqlen_q", "max_seqlen_k"])
def test_max_seqlen_too_small(which):
    q, k, v, cu_q, cu_k, mq, mk = varlen_qkv(lens_q=(3, 5), lens_k=(4, 6))
    args = {"max_seqlen_q": mq, "max_seqlen_k": mk}
    args[which] -= 1
    longest = {"max_seqlen_q": 5, "max_seqlen_k": 6}[which]
    with pytest.raises(ValueError, match=rf"^{which} \({longest - 1}\) is smaller than the longest sequence"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, **args)


@pytest.mark.parametrize("bad", [-1, 2.5, "7"])
def test_max_seqlen_not_int(bad):
    q, k, v, cu_q, cu_k, mq, mk = varlen_qkv()
    with pytest.raises(ValueError, match=r"^max_seqlen_q must be a non-negative int"):
        flash_attn_varlen_func(q, k, v, cu_q, cu_k, bad, mk)


# ----------------------------------------------------------------------------------------------
# packed layouts


@pytest.mark.parametrize("shape", [(2, 8, 2, 4, 16), (2, 8, 4, 4, 16), (2, 8, 3, 4), (8, 3, 4, 16)])
def test_qkvpacked_wrong_shape(shape):
    with pytest.raises(ValueError, match=r"^qkv must have shape \(batch, seqlen, 3, nheads, headdim\)"):
        flash_attn_qkvpacked_func(torch.randn(shape))


@pytest.mark.parametrize("shape", [(2, 8, 3, 4, 16), (2, 8, 2, 4), (8, 2, 4, 16)])
def test_kvpacked_wrong_shape(shape):
    q = torch.randn(2, 8, 4, 16)
    with pytest.raises(ValueError, match=r"^kv must have shape \(batch, seqlen_k, 2, nheads_k, headdim\)"):
        flash_attn_kvpacked_func(q, torch.randn(shape))


def test_varlen_qkvpacked_wrong_shape():
    with pytest.raises(ValueError, match=r"^qkv must have shape \(total, 3, nheads, headdim\)"):
        flash_attn_varlen_qkvpacked_func(torch.randn(8, 2, 4, 16), cu_seqlens([8], "cpu"), 8)


def test_varlen_kvpacked_wrong_shape():
    q, cu = torch.randn(8, 4, 16), cu_seqlens([8], "cpu")
    with pytest.raises(ValueError, match=r"^kv must have shape \(total_k, 2, nheads_k, headdim\)"):
        flash_attn_varlen_kvpacked_func(q, torch.randn(8, 3, 4, 16), cu, cu, 8, 8)


def test_packed_errors_name_the_slice():
    """A problem inside a packed tensor is reported against the slice of the packed argument."""
    qkv_ = torch.randn(2, 8, 3, 4, 32)[..., ::2]
    with pytest.raises(ValueError, match=re.escape("qkv[:, :, 0] must be contiguous in its last dimension")):
        flash_attn_qkvpacked_func(qkv_)
    q = torch.randn(2, 8, 4, 16)
    kv = torch.randn(2, 8, 2, 3, 16)
    with pytest.raises(ValueError, match=re.escape("key/value heads (3) in kv[:, :, 0]/kv[:, :, 1]")):
        flash_attn_kvpacked_func(q, kv)


# ----------------------------------------------------------------------------------------------
# backend selection


def test_invalid_backend_env(monkeypatch):
    monkeypatch.setenv("FLASHTILE_BACKEND", "cudnn")
    with pytest.raises(ValueError, match=r"^FLASHTILE_BACKEND must be one of auto, .*torch.*; got 'cudnn'"):
        flash_attn_func(*qkv())


def test_invalid_backend_name():
    with pytest.raises(ValueError, match=r"^backend must be one of auto, .*; got 'fast'"):
        with flashtile.use_backend("fast"):
            pass


def test_forced_triton_without_cuda_or_interpreter(monkeypatch):
    """Forcing triton on a CPU tensor without TRITON_INTERPRET raises BackendUnavailableError
    that names the backend and says why."""
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: triton can run")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("FLASHTILE_BACKEND", "triton")
    with pytest.raises(BackendUnavailableError, match=r"backend 'triton' was requested but cannot serve this call: \S"):
        flash_attn_func(*qkv())
    with flashtile.use_backend("triton"), pytest.raises(BackendUnavailableError, match=r"'triton'.*(CUDA|triton)"):
        flash_attn_func(*qkv())
    # the torch backend and auto still serve the call
    monkeypatch.setenv("FLASHTILE_BACKEND", "auto")
    flash_attn_func(*qkv())
