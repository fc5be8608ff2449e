"""Decode with a paged KV cache, eagerly and replayed from a CUDA graph.

Each step appends one token per sequence to a paged cache (rotary applied to q and the new k)
and attends to everything cached, with ``flash_attn_with_kvcache``. ``cache_seqlens`` lives on
the device and is advanced in place, so one captured step can be replayed for every token:
that is how servers run decode, and it removes the Python launch cost that bounds small-batch
decoding in eager mode. The script checks that the replayed steps equal the eager ones (and,
for the last step, attention over the gathered cache) and prints the time per step of each.
Without a GPU it runs the eager loop and the check only.

    python examples/decode_cuda_graph.py                      # batch 4, prompts of ~2k tokens
    python examples/decode_cuda_graph.py --batch 64 --page 256 --steps 64
"""

from __future__ import annotations

import argparse
import time

import torch

from flashtile import flash_attn_func, flash_attn_with_kvcache
from flashtile.rotary import apply_rotary_at, rotary_cos_sin


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=2000, help="cached tokens before decoding (mean)")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--heads-k", type=int, default=8)
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--page", type=int, default=16)
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    dev, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    if not cuda:  # keep the CPU run short
        a.heads, a.heads_k, a.headdim, a.prompt, a.steps = 4, 2, 32, min(a.prompt, 200), min(a.steps, 8)
    b, h, hk, d, page = a.batch, a.heads, a.heads_k, a.headdim, a.page
    g = torch.Generator(device="cpu").manual_seed(0)
    prompt = torch.randint(a.prompt // 2, a.prompt + 1, (b,), generator=g)
    capacity = int(prompt.max()) + a.steps
    blocks = -(-capacity // page)
    kc0 = torch.randn(b * blocks, page, hk, d, generator=g).to(dev, dtype)  # prompts already cached
    vc0 = torch.randn(b * blocks, page, hk, d, generator=g).to(dev, dtype)
    table = torch.randperm(b * blocks, generator=g).view(b, blocks).to(dev, torch.int32)
    cos, sin = rotary_cos_sin(capacity, d, device=dev)
    toks = [tuple(torch.randn(b, 1, n, d, generator=g).to(dev, dtype) for n in (h, hk, hk)) for _ in range(a.steps)]

    # Static buffers: a captured graph reads and writes the same memory on every replay.
    kc, vc = kc0.clone(), vc0.clone()
    seqlens = prompt.to(dev, torch.int32)
    q_in, k_in, v_in = (torch.empty_like(x) for x in toks[0])

    def step() -> torch.Tensor:
        out = flash_attn_with_kvcache(q_in, kc, vc, k_in, v_in, rotary_cos=cos, rotary_sin=sin,
                                      rotary_interleaved=False, cache_seqlens=seqlens, block_table=table,
                                      causal=True)  # fmt: skip
        seqlens.add_(1)
        return out

    def reset() -> None:
        kc.copy_(kc0)
        vc.copy_(vc0)
        seqlens.copy_(prompt)

    def run(fn) -> tuple[list[torch.Tensor], float]:
        reset()
        outs, t_sum = [], 0.0
        for q, k, v in toks:
            q_in.copy_(q)
            k_in.copy_(k)
            v_in.copy_(v)
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs.append(fn().clone())
            if cuda:
                torch.cuda.synchronize()
            t_sum += time.perf_counter() - t0
        return outs, t_sum / len(toks) * 1e6

    run(step)  # warm-up: first calls compile kernels / load code
    eager, t_eager = run(step)
    print(f"{b} sequences, {int(prompt.min())}-{int(prompt.max())} cached tokens, pages of {page}, "
          f"{a.steps} decode steps, {dtype}")  # fmt: skip
    print(f"eager:        {t_eager:8.1f} us per step")
    ok = True
    if cuda:
        reset()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up (compiles the kernels) outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            graph_out = step()
        replayed, t_graph = run(lambda: (graph.replay(), graph_out)[1])
        same = all(torch.equal(x, y) for x, y in zip(eager, replayed, strict=True))
        print(f"graph replay: {t_graph:8.1f} us per step ({t_eager / t_graph:.1f}x); identical to eager: {same}")
        ok &= same
    # The last step against attention over the gathered cache (keys already rotated in it).
    last = eager[-1]
    n = prompt + a.steps  # tokens cached after the last step
    worst = 0.0
    for i in range(b):
        idx = torch.arange(int(n[i]), device=dev)
        rows, pos = table[i, idx // page].long(), idx % page
        k_i, v_i = kc[rows, pos].unsqueeze(0), vc[rows, pos].unsqueeze(0)
        q_i = apply_rotary_at(toks[-1][0][i : i + 1], cos, sin, (n[i] - 1).view(1, 1).to(dev), False)
        ref = flash_attn_func(q_i, k_i, v_i, causal=True)
        worst = max(worst, (ref.float() - last[i : i + 1].float()).abs().max().item())
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    print(f"last step vs attention over the gathered cache: max |diff| = {worst:.2e} (tolerance {tol})")
    ok &= worst <= tol
    print("OK" if ok else "MISMATCH")
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()
