"""Backend registry and selection: auto, FLASHTILE_BACKEND, use_backend, report(), and the error
a forced backend raises when it cannot serve a call."""

from __future__ import annotations

import pytest
import torch
from conftest import requires_cuda

import flashtile
from flashtile import BackendUnavailableError, dispatch, flash_attn_func
from flashtile.backends import registry
from flashtile.backends.base import Capabilities
from flashtile.spec import FEATURES, MOD_FEATURES, AttnCall, Problem, make_call
from flashtile.testing import qkv_inputs


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("FLASHTILE_BACKEND", raising=False)
    yield


def problem(device="cpu", dtype=torch.float32, d=64, **kw) -> Problem:
    base = dict(batch=2, seqlen_q=16, seqlen_k=16, nheads=4, nheads_k=4, headdim=d, dtype=dtype,
                device=torch.device(device))  # fmt: skip
    base.update(kw)
    return Problem(**base)


def spec(d=64, **kw):
    return make_call(headdim=d, **kw)


class Recorder:
    """A backend that delegates to the torch engine and records its calls."""

    def __init__(self, name="recorder", reason=None, capabilities=None):
        self.name, self.reason, self.calls = name, reason, []
        self._torch = dispatch.backends()["torch"]
        self.capabilities = capabilities or Capabilities(
            priority=-10, dtypes=frozenset({torch.float32, torch.float16, torch.bfloat16}), max_headdim=256
        )

    def available(self):
        return None

    def supports(self, problem, call):
        return self.reason

    def forward(self, *args, **kwargs):
        self.calls.append("forward")
        return self._torch.forward(*args, **kwargs)

    def backward(self, *args, **kwargs):
        self.calls.append("backward")
        return self._torch.backward(*args, **kwargs)


@pytest.fixture
def recorder(monkeypatch):
    rec = Recorder()
    monkeypatch.setitem(registry(), rec.name, rec)
    return rec


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("interpret", ["0", "1"])
def test_auto_picks_torch_on_cpu(monkeypatch, dtype, interpret):
    """auto on CPU tensors is the torch engine, even when Triton's interpreter is enabled."""
    monkeypatch.setenv("TRITON_INTERPRET", interpret)
    assert dispatch.requested() == "auto"
    assert dispatch.choose(problem(dtype=dtype), spec()) == "torch"
    assert dispatch.choose(problem(d=512), spec(d=512)) == "torch"
    cu = torch.tensor([0, 5, 16], dtype=torch.int32)
    full = spec(causal=True, dropout_p=0.1, softcap=5.0, cu_seqlens_q=cu, cu_seqlens_k=cu,
                alibi_slopes=torch.ones(2, 4))  # fmt: skip
    assert full.features() == {"causal", "dropout", "softcap", "varlen", "alibi"}
    assert dispatch.choose(problem(), full) == "torch"


@requires_cuda
def test_auto_picks_triton_on_cuda():
    """auto on CUDA: the Gluon hopper backend where it serves the call (sm_90), else triton, else torch."""
    p, c = problem("cuda", torch.float16), spec()
    expected = next((n for n in ("hopper", "triton") if dispatch.why_not(n, p, c) is None), "torch")
    assert dispatch.choose(p, c) == expected
    # head dims the Triton kernels do not serve fall back to the torch engine
    assert dispatch.choose(problem("cuda", torch.float16, d=512), spec(d=512)) == "torch"


def test_report_lists_torch_usable():
    rep = dispatch.report()
    names = [name for name, _ in rep]
    assert "torch" in names and "triton" in names
    assert dict(rep)["torch"] is None
    for name, reason in rep:
        assert isinstance(name, str) and (reason is None or (isinstance(reason, str) and reason))
    assert set(names) == set(dispatch.backends())


def test_report_triton_reason_without_cuda(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reason = dict(dispatch.report())["triton"]
    assert reason, "triton must say why it is unusable without CUDA or TRITON_INTERPRET"


def test_use_backend_context_restores(monkeypatch):
    assert dispatch.requested() == "auto"
    with flashtile.use_backend("torch"):
        assert dispatch.requested() == "torch"
        with flashtile.use_backend("auto"):
            assert dispatch.requested() == "auto"
        assert dispatch.requested() == "torch"
    assert dispatch.requested() == "auto"
    with pytest.raises(RuntimeError, match="boom"), flashtile.use_backend("torch"):
        raise RuntimeError("boom")
    assert dispatch.requested() == "auto"


def test_env_var_respected(monkeypatch, recorder):
    for value in ("torch", " Torch ", "TORCH"):
        monkeypatch.setenv("FLASHTILE_BACKEND", value)
        assert dispatch.requested() == "torch"
    for value in ("", "auto", "AUTO"):
        monkeypatch.setenv("FLASHTILE_BACKEND", value)
        assert dispatch.requested() == "auto"
    monkeypatch.setenv("FLASHTILE_BACKEND", "recorder")
    q, k, v = (x.requires_grad_() for x in qkv_inputs(1, 8, 8, 2, 2, 16, torch.float32, "cpu"))
    flash_attn_func(q, k, v).sum().backward()
    assert recorder.calls == ["forward", "backward"]


def test_use_backend_beats_env(monkeypatch, recorder):
    monkeypatch.setenv("FLASHTILE_BACKEND", "recorder")
    with flashtile.use_backend("torch"):
        assert dispatch.requested() == "torch"
        flash_attn_func(*qkv_inputs(1, 8, 8, 2, 2, 16, torch.float32, "cpu"))
    assert recorder.calls == []
    with flashtile.use_backend("recorder"):
        flash_attn_func(*qkv_inputs(1, 8, 8, 2, 2, 16, torch.float32, "cpu"))
    assert recorder.calls == ["forward"]


def test_forced_backend_that_declines_says_why(monkeypatch):
    rec = Recorder("picky", reason="head dim 16 is not served by picky")
    monkeypatch.setitem(registry(), rec.name, rec)
    with flashtile.use_backend("picky"):
        with pytest.raises(
            BackendUnavailableError, match=r"'picky'.*cannot serve this call: head dim 16 is not served"
        ):
            flash_attn_func(*qkv_inputs(1, 8, 8, 2, 2, 16, torch.float32, "cpu"))
    assert rec.calls == []
    assert issubclass(BackendUnavailableError, RuntimeError)


def test_backend_result_identical_to_torch(recorder):
    """The name passed through the custom op is the backend that runs (here: the recorder)."""
    inputs = qkv_inputs(2, 11, 13, 4, 2, 16, torch.float32, "cpu")
    with flashtile.use_backend("recorder"):
        a = flash_attn_func(*inputs, causal=True)
    with flashtile.use_backend("torch"):
        b = flash_attn_func(*inputs, causal=True)
    assert recorder.calls == ["forward"]
    assert torch.equal(a, b)


def test_auto_orders_by_declared_priority(monkeypatch):
    """auto tries the highest priority first: a usable backend that outranks the others wins,
    with no list of names to edit; report() lists backends in that order."""
    top = Recorder("top", capabilities=Capabilities(priority=100, dtypes=frozenset({torch.float32}), max_headdim=64))
    monkeypatch.setitem(registry(), top.name, top)
    assert list(dispatch.backends())[0] == "top"
    assert dispatch.report()[0][0] == "top"
    assert dispatch.choose(problem(), spec()) == "top"
    # its declarations exclude fp16 and head dim 128: auto falls through to the next backend
    assert dispatch.choose(problem(dtype=torch.float16), spec()) != "top"
    assert dispatch.choose(problem(d=128), spec(d=128)) != "top"


def test_declared_capabilities_explain_refusals(monkeypatch):
    caps = Capabilities(priority=-5, dtypes=frozenset({torch.float16}), max_headdim=128,
                        features=FEATURES - {"softcap"})  # fmt: skip
    rec = Recorder("narrow", capabilities=caps)
    monkeypatch.setitem(registry(), rec.name, rec)
    f16 = problem(dtype=torch.float16)
    assert dispatch.why_not("narrow", f16, spec()) is None
    assert dispatch.why_not("narrow", problem(), spec()) == "dtype torch.float32 is not supported (float16)"
    assert dispatch.why_not("narrow", problem(dtype=torch.float16, d=256), spec(d=256)) == "head dim 256 > 128"
    assert dispatch.why_not("narrow", f16, spec(softcap=30.0)) == "does not implement softcap"
    assert dispatch.why_not("narrow", f16, spec(), decode=True) == "does not implement KV-cache decoding"
    with flashtile.use_backend("narrow"), pytest.raises(BackendUnavailableError, match="does not implement softcap"):
        flash_attn_func(*qkv_inputs(1, 8, 8, 2, 2, 16, torch.float16, "cpu"), softcap=30.0)


def test_every_registered_backend_declares_capabilities():
    for name, be in dispatch.backends().items():
        caps = be.capabilities
        assert isinstance(caps, Capabilities), name
        known = FEATURES | MOD_FEATURES
        assert caps.features <= known, f"{name} declares unknown features {caps.features - known}"
    assert dispatch.backends()["torch"].capabilities.decode


def test_op_schema_is_derived_from_the_carrier():
    """Every field of AttnCall crosses the custom-op boundary, in order, and comes back intact
    (except the Python mods, ``metadata={"python": True}``, which never enter the op)."""
    import dataclasses

    from flashtile import ops

    schema = str(torch.ops.flashtile.attn_fwd.default._schema)
    names = [f.name for f in dataclasses.fields(AttnCall) if not f.metadata.get("python")]
    assert {"score_mod", "block_mask"}.isdisjoint(names)
    positions = [schema.index(f" {n},") for n in names]
    assert positions == sorted(positions)
    call = spec(causal=True, softcap=2.0, dropout_p=0.25, seed=torch.tensor(7), alibi_slopes=torch.ones(1, 2))
    back = ops.unflatten(ops.flatten(call))
    for n in names:
        a, b = getattr(call, n), getattr(back, n)
        assert a is b or a == b, n
