"""Where the host time of a flex backward goes between the public call's autograd graph and the
backend's launch (issue 18's one-call columns, issue 16), on the GPU machine:

    PYTHONPATH=src python benchmarks/flex_bwd_host.py [--calls 40]

Document-16 block mask, b1 s16k h16 d64 bf16 (the flex kernels, not the built-in route). Wall us
per call (``host_profile_gpu._wall``: median of 5 rounds, calls between two synchronisations) of:
``direct`` (the backend's launch), ``api`` (``torch.autograd.grad`` through
``flashtile.flex_attention``), ``api_bshd`` (the same through ``flash_attn_func(block_mask=...)``,
no transposes), ``noop_t`` / ``noop_c`` (an autograd function of the same tensors whose backward
returns ready gradients: the engine alone, transposed / contiguous inputs), ``builtin_window``
(the built-in option a library sliding-window mask routes to at d128:
``flash_attn_func(causal=True, window_size=(1024, 0))``, the Hopper backward). Then
``torch.profiler``'s CPU table of ``api`` (self CPU time), the thread the backward ran on, and
``cProfile`` of ``direct``, ``api`` and ``builtin_window`` (``host_profile_gpu._profile``). Prints
text only.
"""

from __future__ import annotations

import argparse
import threading

import torch
from host_profile_gpu import _profile, _wall  # (benchmarks/ is the script's directory)


class _Noop(torch.autograd.Function):
    grads: tuple = ()

    @staticmethod
    def forward(ctx, q, k, v):  # noqa: D102
        ctx.save_for_backward(q, k, v)
        return q.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)

    @staticmethod
    def backward(ctx, dout, dlse):  # noqa: D102
        return _Noop.grads


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--calls", type=int, default=40)
    args = ap.parse_args()
    import flashtile
    from flashtile import create_block_mask, masks
    from flashtile import flex as flex_mod
    from flashtile.backends.flex_triton import launch as L
    from flashtile.spec import make_call

    flex_mod.BUILTIN_ROUTE = False
    dev, dt = "cuda", torch.bfloat16
    s, h, d = 16384, 16, 64
    ids = torch.arange(s, device=dev) // (s // 16)
    bm = create_block_mask(masks.document(ids), None, None, s, s, device=dev)
    q, k, v = (torch.randn(1, h, s, d, device=dev, dtype=dt).requires_grad_() for _ in range(3))
    o = flashtile.flex_attention(q, k, v, block_mask=bm)
    go = torch.randn_like(o)
    call = make_call(headdim=d, block_mask=bm)
    qi, ki, vi = (x.detach().transpose(1, 2) for x in (q, k, v))
    with torch.no_grad():
        out, lse = L.forward(qi, ki, vi, call)
    dout = go.transpose(1, 2)
    qb, kb, vb = (x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))
    ob = flashtile.flash_attn_func(qb, kb, vb, block_mask=bm)
    gb = torch.randn_like(ob)
    _Noop.grads = tuple(torch.empty_like(x) for x in (qi, ki, vi))
    on_t = _Noop.apply(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))[0]
    on_c = _Noop.apply(qb, kb, vb)[0]
    qw, kw_, vw = (torch.randn(1, s, h, 128, device=dev, dtype=dt).requires_grad_() for _ in range(3))
    ow = flashtile.flash_attn_func(qw, kw_, vw, causal=True, window_size=(1024, 0))
    gw = torch.randn_like(ow)
    cases = {
        "builtin_window": lambda: torch.autograd.grad(ow, (qw, kw_, vw), gw, retain_graph=True),
        "direct": lambda: L.backward(dout, qi, ki, vi, out, lse, call, ()),
        "api": lambda: torch.autograd.grad(o, (q, k, v), go, retain_graph=True),
        "api_bshd": lambda: torch.autograd.grad(ob, (qb, kb, vb), gb, retain_graph=True),
        "noop_t": lambda: torch.autograd.grad(on_t, (q, k, v), dout, retain_graph=True),
        "noop_c": lambda: torch.autograd.grad(on_c, (qb, kb, vb), gb, retain_graph=True),
    }
    for name, fn in cases.items():
        print(f"{name:10s} {_wall(fn, args.calls):9.1f} us per call", flush=True)
    seen = []
    orig = flex_mod._ModAttention.backward

    def spy(ctx, *a):
        seen.append(threading.get_ident())
        return orig(ctx, *a)

    flex_mod._ModAttention.backward = staticmethod(spy)
    cases["api"]()
    torch.cuda.synchronize()
    flex_mod._ModAttention.backward = orig
    print(f"backward ran on the {'calling' if seen == [threading.get_ident()] else 'another'} thread")
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(10):
            cases["api"]()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))
    for name in ("direct", "api", "builtin_window"):
        _profile(name, cases[name], args.calls, 22)


if __name__ == "__main__":
    main()
