"""Counter-based dropout randomness, identical in every backend.

The keep decision for query row ``i`` and key column ``j`` of (sequence ``b``, head ``h``) is
a pure function of ``(seed, j, i, b * nheads + h)``: the first 32-bit word of Philox-4x32-10
with key ``(seed_lo, seed_hi)`` and counter ``(j, i, b * nheads + h, 0)``. The entry is kept
when ``word >> 8 >= round(p * 2**24)``. Triton's ``philox`` computes the same word, so the
torch engine, the Triton kernels and the reference all drop the same entries, and the
backward regenerates the forward's mask from the seed alone.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57


def _mul32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hi, lo) 32-bit words of the 64-bit product of a constant and uint32 values held in int64."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    b_hi, b_lo = b >> 16, b & 0xFFFF
    ll = a_lo * b_lo
    mid = a_hi * b_lo + a_lo * b_hi
    hi = a_hi * b_hi + ((mid + (ll >> 16)) >> 16)
    lo = ((mid << 16) + ll) & _M32
    return hi & _M32, lo


def philox_word(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor) -> torch.Tensor:
    """First output word of Philox-4x32-10 (as int64 in [0, 2**32)) for counters (c0, c1, c2, 0)."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    c0, c1, c2 = (torch.broadcast_tensors(c0.to(torch.int64), c1.to(torch.int64), c2.to(torch.int64)))
    c3 = torch.zeros_like(c0)
    for _ in range(10):
        hi_b, lo_b = _mul32(_ROUND_B, c2)
        hi_a, lo_a = _mul32(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0 = (k0 + _KEY_A) & _M32
        k1 = (k1 + _KEY_B) & _M32
    return c0


def dropout_threshold(p: float) -> int:
    """Integer threshold on 24 random bits: an entry is dropped when ``bits < threshold``."""
    return int(round(p * (1 << 24)))


def keep_mask(
    seed: int, p: float, bh: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor
) -> torch.Tensor:
    """Boolean keep mask broadcast over ``bh[..., None, None]``, ``rows[:, None]``, ``cols[None, :]``.

    ``bh`` is ``batch_index * nheads + head`` (any shape), ``rows`` / ``cols`` 1-D index tensors.
    """
    c0 = cols.view(*([1] * bh.dim()), 1, -1)
    c1 = rows.view(*([1] * bh.dim()), -1, 1)
    c2 = bh.view(*bh.shape, 1, 1)
    word = philox_word(seed, c0, c1, c2)
    return (word >> 8) >= dropout_threshold(p)


def dropout_mask(
    seed: int, p: float, batch: int, nheads: int, seqlen_q: int, seqlen_k: int, device: torch.device | str = "cpu",
    batch_start: int = 0,
) -> torch.Tensor:
    """Materialised keep mask ``(batch, nheads, seqlen_q, seqlen_k)`` (for tests and ``return_attn_probs``)."""
    b = torch.arange(batch_start, batch_start + batch, device=device).view(-1, 1)
    h = torch.arange(nheads, device=device).view(1, -1)
    bh = b * nheads + h
    rows = torch.arange(seqlen_q, device=device)
    cols = torch.arange(seqlen_k, device=device)
    return keep_mask(seed, p, bh, rows, cols)


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _cuda_seed(device: torch.device) -> int | None:
    """A seed from the CUDA generator's host-side state (its seed and Philox offset, which it then
    advances as a kernel drawing numbers would): no kernel, no device read. None where the
    generator does not offer it (then :func:`draw_seed` draws on the device)."""
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        gen = torch.cuda.default_generators[index]
        offset = gen.get_offset()
        gen.set_offset(offset + 4)
        return _splitmix64(_splitmix64(gen.initial_seed()) ^ offset) >> 2
    except (AttributeError, RuntimeError):  # pragma: no cover - older torch, or a graph capture
        return None


def draw_seed(device: torch.device) -> torch.Tensor:
    """A fresh 62-bit seed from torch's generator for ``device`` (reproducible under torch.manual_seed).

    Returned as a 0-d int64 CPU tensor, so that it can travel through custom ops and autograd. On
    CUDA it comes from the generator's host-side state (no device sync; issue 16), except while
    torch.compile traces, where it is drawn on the device as before.
    """
    if device.type == "cuda" and not torch.compiler.is_compiling():
        seed = _cuda_seed(device)
        if seed is not None:
            return torch.tensor(seed, dtype=torch.int64)
    gen_device = device if device.type == "cuda" else torch.device("cpu")
    s = torch.randint(0, 2**62, (), dtype=torch.int64, device=gen_device)
    return s.cpu()
