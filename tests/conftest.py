"""Shared test machinery: the backend parametrisation, device choice, interpreter shrinking and
flash-attn's tolerance rule.

* ``FLASHTILE_TEST_BACKENDS`` (comma list) picks the backends the parity tests run on; the
  default is ``torch``, plus ``triton`` when CUDA is available. A test that takes the
  ``backend`` fixture runs once per backend, inside ``flashtile.use_backend(name)``.
* Triton's CPU interpreter (``TRITON_INTERPRET=1``) runs the kernels on CPU tensors, slowly and
  with a wrong bf16 dot: under it, bf16 cases are skipped and shapes are shrunk
  (:func:`is_interpreter`, :func:`shrink`, :func:`skip_if_too_big`).
* :func:`assert_close_to_ref`: ``max|x - ref| <= factor * max|pt - ref| + atol`` where ``ref`` is
  the upcast oracle (fp32 math; float64 for fp32 inputs) and ``pt`` the same-dtype oracle; NaN
  never passes. :func:`compare_with_oracle` applies it to out, lse and every gradient.
* The torch engine runs with tiny tiles under the ``backend`` fixture (``TORCH_TEST_TILES``), so
  that small problems still cross many block boundaries; ``default_tiles`` undoes that.
"""

from __future__ import annotations

import os

import pytest
import torch

import flashtile

# ----------------------------------------------------------------------------------------------
# backends and devices


def _default_backends() -> list[str]:
    names = ["torch"]
    if torch.cuda.is_available():
        names.append("triton")
    return names


def parity_backends() -> list[str]:
    """Backends the parity tests run on (``$FLASHTILE_TEST_BACKENDS`` or the default)."""
    env = os.environ.get("FLASHTILE_TEST_BACKENDS", "").strip()
    if not env:
        return _default_backends()
    return [n.strip().lower() for n in env.split(",") if n.strip()]


BACKENDS = parity_backends()


def is_interpreter(backend: str) -> bool:
    """True when ``backend`` runs Triton kernels through the CPU interpreter (slow; bf16 dot wrong)."""
    return backend == "triton" and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_for(backend: str) -> torch.device:
    """Where the inputs of a test live: CUDA when there is one (for every backend), else CPU
    (the torch backend, or Triton under the interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


#: Under the interpreter, sequence lengths above this are shrunk and head dims above
#: INTERP_MAX_HEADDIM are skipped.
INTERP_MAX_SEQLEN = 48
INTERP_MAX_HEADDIM = 128


def shrink(backend: str, *sizes: int) -> int | tuple[int, ...]:
    """Sequence lengths, shrunk under the interpreter by a monotone map (so ``sq < sk`` stays
    ``sq <= sk``; 1 and small lengths are kept). Returns an int for one size, else a tuple."""
    if is_interpreter(backend):
        sizes = tuple(n if n <= 24 else min(INTERP_MAX_SEQLEN, 24 + (n - 24) // 8) for n in sizes)
    return sizes[0] if len(sizes) == 1 else sizes


def skip_if_too_big(backend: str, *, headdim: int = 0, dtype: torch.dtype | None = None) -> None:
    """Skip a case the interpreter cannot run usefully (bf16, or a very large head dim)."""
    if not is_interpreter(backend):
        return
    if dtype == torch.bfloat16:
        pytest.skip("Triton interpreter: bf16 dot products are wrong")
    if headdim > INTERP_MAX_HEADDIM:
        pytest.skip(f"Triton interpreter: head dim {headdim} too slow")


#: Tile sizes the torch engine uses under the ``backend`` fixture: small and unequal, so that every
#: test crosses many query/key block boundaries. With the default tiles (2**20 scores, 512 keys)
#: a test of a few hundred tokens fits in one tile and never exercises the online softmax across
#: key blocks, the skipping of masked blocks, or the backward's per-block query ranges.
TORCH_TEST_TILES = {"_BLOCK_N": 24, "_TILE_ELEMS": 1}  # _TILE_ELEMS=1: the engine's floor, 16 query rows


def _torch_engine():
    from flashtile.backends import torch_tiled

    return torch_tiled


TORCH_DEFAULT_TILES = {k: getattr(_torch_engine(), k) for k in TORCH_TEST_TILES if hasattr(_torch_engine(), k)}


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """The backend under test; the test body runs inside ``flashtile.use_backend(name)``.
    The torch engine runs with the small tiles of ``TORCH_TEST_TILES`` (see :func:`default_tiles`).
    CPU tests run on one intra-op thread: their tensors are tiny, and on a busy 2-core machine
    OpenMP's spinning threads made them up to 4x slower."""
    name = request.param
    if name == "triton" and not (torch.cuda.is_available() or is_interpreter(name)):
        pytest.skip("triton backend needs CUDA or TRITON_INTERPRET=1")
    if name == "torch":
        for attr, value in TORCH_TEST_TILES.items():
            if attr in TORCH_DEFAULT_TILES:
                monkeypatch.setattr(_torch_engine(), attr, value)
    threads = torch.get_num_threads()
    if device_for(name).type == "cpu":
        torch.set_num_threads(1)
    try:
        with flashtile.use_backend(name):
            yield name
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def default_tiles(backend, monkeypatch):
    """Put the torch engine back on its default tile sizes."""
    for attr, value in TORCH_DEFAULT_TILES.items():
        monkeypatch.setattr(_torch_engine(), attr, value)


@pytest.fixture
def device(backend) -> torch.device:
    return device_for(backend)


def pytest_collection_modifyitems(config, items):
    """Skip bf16 parametrisations of interpreter runs at collection time (cheaper than in the body)."""
    for item in items:
        cs = getattr(item, "callspec", None)
        if cs is None:
            continue
        if is_interpreter(cs.params.get("backend", "")) and cs.params.get("dtype") == torch.bfloat16:
            item.add_marker(pytest.mark.skip(reason="Triton interpreter: bf16 dot products are wrong"))


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same torch seed, so a failure reproduces."""
    torch.manual_seed(0)
    yield


requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

# ----------------------------------------------------------------------------------------------
# inputs

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]


def qkv_inputs(b, sq, sk, h, hk, d, dtype, device):
    """Fresh standard-normal q ``(b, sq, h, d)``, k and v ``(b, sk, hk, d)``."""
    q = torch.randn(b, sq, h, d, dtype=dtype, device=device)
    k = torch.randn(b, sk, hk, d, dtype=dtype, device=device)
    v = torch.randn(b, sk, hk, d, dtype=dtype, device=device)
    return q, k, v


def make_alibi(kind: str | None, b: int, h: int, device) -> torch.Tensor | None:
    """ALiBi slopes: None, ``"h"`` for shape ``(h,)`` or ``"bh"`` for ``(b, h)``; fp32 in [0.01, 0.51)."""
    if kind is None:
        return None
    shape = (h,) if kind == "h" else (b, h)
    return torch.rand(shape, device=device, dtype=torch.float32) * 0.5 + 0.01


def cu(lens: list[int], device) -> torch.Tensor:
    """int32 cu_seqlens ``(len(lens) + 1,)`` for the given sequence lengths."""
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return torch.tensor(out, dtype=torch.int32, device=device)


# ----------------------------------------------------------------------------------------------
# tolerances (flash-attn's rule)

#: atol added to ``factor * pt_error``: forward (out, lse) and backward (dq, dk, dv). fp16/bf16:
#: flash-attn's choice, about twice the rounding step of values of magnitude 1. fp32 (measured
#: against the float64 oracle over ~1000 random problems): the worst excess over ``factor *
#: pt_error`` was 2e-6 for out/lse and 1.7e-5 for gradients (gradients that are exactly 0 in the
#: oracle, e.g. with one visible key, where rowsum(dout * out) cancels dout . v; head dim 256).
FWD_ATOL = {torch.float32: 5e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
BWD_ATOL = {torch.float32: 5e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
#: lse is float32 for every input dtype, but is computed from scores of the input's precision.
LSE_ATOL = {torch.float32: 5e-6, torch.float16: 1e-3, torch.bfloat16: 1e-3}
FWD_FACTOR = 2.0
BWD_FACTOR = 3.0


def _max_abs(x: torch.Tensor) -> float:
    return x.abs().max().item() if x.numel() else 0.0


def assert_close_to_ref(
    x: torch.Tensor, ref: torch.Tensor, pt: torch.Tensor, factor: float, atol: float, name: str = "tensor"
) -> None:
    """flash-attn's rule: ``max|x - ref| <= factor * max|pt - ref| + atol`` (compared in fp64).

    ``ref`` is the fp32 oracle, ``pt`` the same-dtype one. ``x`` must be finite wherever ``ref``
    is (so NaN never passes); non-finite entries of ``ref`` must be matched exactly by ``x``.
    """
    assert x.shape == ref.shape == pt.shape, f"{name}: shapes {tuple(x.shape)}, {tuple(ref.shape)}, {tuple(pt.shape)}"
    # one rounding step of x's own format at the result's magnitude: a result stored in fp16/bf16
    # can land one step away from the rounded oracle even when its fp32 value is closer
    step = torch.finfo(x.dtype).eps if x.dtype in (torch.float16, torch.bfloat16) else 0.0
    x, ref, pt = x.detach().double(), ref.detach().double(), pt.detach().double()
    assert not torch.isnan(x).any(), f"{name}: contains NaN"
    assert not torch.isnan(ref).any(), f"{name}: the oracle contains NaN"
    fin = torch.isfinite(ref)
    if not fin.all():
        assert torch.equal(x[~fin], ref[~fin]), f"{name}: non-finite entries differ from the oracle"
        assert torch.isfinite(x[fin]).all(), f"{name}: non-finite where the oracle is finite"
        x, ref, pt = x[fin], ref[fin], pt[fin]
    assert torch.isfinite(x).all(), f"{name}: non-finite where the oracle is finite"
    pt_ok = torch.isfinite(pt)  # an overflowing baseline must not make the bound vacuous
    pt_err = _max_abs((pt - ref)[pt_ok])
    err = _max_abs(x - ref)
    bound = factor * pt_err + atol + step * _max_abs(ref)
    assert err <= bound, f"{name}: max|x - ref| = {err:.3g} > {factor} * {pt_err:.3g} + {atol:.3g}"


def assert_lse_close(lse: torch.Tensor, ref: torch.Tensor, pt: torch.Tensor, atol: float, name: str = "lse") -> None:
    """lse: the ``-inf`` positions (rows that see no key) must match exactly, the finite ones
    follow the forward rule."""
    assert lse.dtype == torch.float32, f"{name} must be float32, got {lse.dtype}"
    assert lse.shape == ref.shape, f"{name}: shape {tuple(lse.shape)} != {tuple(ref.shape)}"
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref)), f"{name}: -inf positions differ from the oracle"
    fin = torch.isfinite(ref)
    assert_close_to_ref(lse[fin], ref[fin], pt[fin], FWD_FACTOR, atol, name)


# ----------------------------------------------------------------------------------------------
# comparing a function against the oracle


#: Largest softmax_scale (times softcap's tanh' <= 1) that any test passes.
MAX_TEST_SCALE = 2.0


def _rounded_out_slack(out, oracle, dout, leaves) -> float:
    """Both backends, like flash-attn 2/3/4, compute ``delta = rowsum(dout * out)`` from the
    fp16/bf16 ``out`` they returned (the backward's contract: ring attention passes a global
    ``out``, so it cannot be recomputed). That rounding error enters ``ds = p * (dp - delta)``
    and so dq / dk, and where the softmax is saturated it is as large as the gradient itself
    (the same-dtype PyTorch baseline differentiates softmax directly and does not have it).
    The slack is the measured delta error of this very output, times the largest
    ``scale * |k|`` (or ``|q|``) it can be multiplied by."""
    if out.dtype == torch.float32:
        return 0.0
    with torch.no_grad():  # the oracle's out before rounding to the input dtype
        exact_out = oracle(*[x.detach().float() for x in leaves], upcast=True)[0]
    d_err = (dout.double() * (out.double() - exact_out.double())).sum(-1).abs().max().item()
    big = max(_max_abs(x.detach().double()) for x in leaves)
    return BWD_FACTOR * MAX_TEST_SCALE * d_err * big


def compare_with_oracle(fn, oracle, inputs, *, grads: bool = True, dout: torch.Tensor | None = None) -> dict:
    """Run ``fn(*leaves) -> (out, lse)`` and ``oracle(*leaves, upcast) -> (out, lse)`` on fresh
    leaf copies of ``inputs`` and check out, lse (unless ``fn`` returns None for it) and (when
    ``grads``) the gradient of every input against flash-attn's rule. Returns the tensors.

    "ref" is the oracle with ``upcast=True`` (fp32 math) for fp16/bf16 inputs, and the oracle on
    float64 copies for fp32 inputs (so that fp32 has a baseline error too); "pt" is the oracle
    in the input dtype (``upcast=False``).
    """
    dtype = inputs[0].dtype
    leaves = [x.detach().clone().requires_grad_(grads) for x in inputs]
    hi = torch.float64 if dtype == torch.float32 else dtype
    ref_leaves = [x.detach().to(hi).requires_grad_(grads) for x in inputs]
    out, lse = fn(*leaves)
    ref_out, ref_lse = oracle(*ref_leaves, upcast=True)
    pt_out, pt_lse = oracle(*leaves, upcast=False)
    assert out.dtype == dtype, f"out dtype {out.dtype} != {dtype}"
    assert_close_to_ref(out, ref_out, pt_out, FWD_FACTOR, FWD_ATOL[dtype], "out")
    if lse is not None:
        assert_lse_close(lse, ref_lse, pt_lse, LSE_ATOL[dtype])
    res = {"out": out, "lse": lse, "ref_out": ref_out, "ref_lse": ref_lse}
    if not grads:
        return res
    if dout is None:
        dout = torch.randn_like(out)
    g = torch.autograd.grad(out, leaves, dout)
    g_ref = torch.autograd.grad(ref_out, ref_leaves, dout.to(hi), allow_unused=True)
    g_pt = torch.autograd.grad(pt_out, leaves, dout, allow_unused=True)
    slack = _rounded_out_slack(out, oracle, dout, leaves)
    for i, (a, r, p) in enumerate(zip(g, g_ref, g_pt, strict=True)):
        r = torch.zeros_like(ref_leaves[i]) if r is None else r
        p = torch.zeros_like(a) if p is None else p
        assert a.dtype == inputs[i].dtype and a.shape == inputs[i].shape
        assert_close_to_ref(a, r, p, BWD_FACTOR, BWD_ATOL[dtype] + slack, f"grad[{i}]")
    res["grads"], res["ref_grads"] = g, g_ref
    return res
