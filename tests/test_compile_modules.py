"""torch.compile(fullgraph=True) of MHA and GPT, forward and backward, on CPU: no graph breaks,
and the same numbers as eager mode.

``fullgraph=True`` turns any graph break into an error. MHA runs through Inductor (the default
backend, generating C++); GPT through ``aot_eager`` (same Dynamo capture and AOT autograd,
without the C++ build, to keep CI fast) and once through Inductor.
"""

from __future__ import annotations

import pytest
import torch

from flashtile.models import GPT, GPTConfig
from flashtile.modules import MHA


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def fwd_bwd(model, *inputs):
    """Output and the gradients of every parameter and floating input, for sum(out * w)."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = model(*leaves)
    out = out[1] if isinstance(out, tuple) else out  # GPT: (logits, loss) -> loss
    w = torch.linspace(-1, 1, out.numel()).view_as(out) if out.dim() else torch.ones(())
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad((out * w).sum(), params + [x for x in leaves if x.requires_grad])
    return out.detach(), grads


def check_compiled(model, *inputs, backend="inductor"):
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    out_c, g_c = fwd_bwd(compiled, *inputs)
    out_e, g_e = fwd_bwd(model, *inputs)
    torch.testing.assert_close(out_c, out_e, atol=1e-5, rtol=1e-4)
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


MHA_OPTIONS = {
    "causal-gqa-alibi-window-softcap": dict(num_heads_kv=2, causal=True, use_alibi=True, window_size=(5, 0),
                                            softcap=4.0),  # fmt: skip
    "rotary-partial-interleaved": dict(causal=True, rotary_emb_dim=4, rotary_emb_interleaved=True),
    "cross-attention": dict(cross_attn=True, num_heads_kv=1),
}


@pytest.mark.parametrize("opts", MHA_OPTIONS.values(), ids=MHA_OPTIONS.keys())
def test_mha_compiles_fullgraph(opts):
    torch.manual_seed(0)
    m = MHA(32, 4, **opts)
    x = torch.randn(2, 16, 32)
    if opts.get("cross_attn"):
        check_compiled(m, x, torch.randn(2, 9, 32))
    else:
        check_compiled(m, x)


def test_mha_packed_compiles_fullgraph():
    torch.manual_seed(0)
    m = MHA(32, 4, 2, causal=True, rotary_emb_dim=8)
    cu = torch.tensor([0, 5, 16, 20], dtype=torch.int32)

    class Packed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, x):
            return self.m(x, cu_seqlens=cu, max_seqlen=11)

    check_compiled(Packed(), torch.randn(20, 32), backend="aot_eager")


def tiny_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig.from_preset("tiny", n_layer=2, n_embd=64, block_size=32, vocab_size=50, **kw))


@pytest.mark.parametrize("variant", [dict(), dict(pos_emb="learned", mlp="gelu", norm="layernorm"),
                                     dict(pos_emb="alibi", window=8, softcap=20.0)],
                         ids=["rotary-swiglu-rmsnorm", "learned-gelu-layernorm", "alibi-window-softcap"])  # fmt: skip
def test_gpt_compiles_fullgraph(variant):
    idx = torch.randint(0, 50, (2, 32))
    check_compiled(tiny_gpt(**variant), idx, idx.roll(-1, 1), backend="aot_eager")


def test_gpt_compiles_fullgraph_inductor():
    idx = torch.randint(0, 50, (2, 32))
    check_compiled(tiny_gpt(), idx, idx.roll(-1, 1))
