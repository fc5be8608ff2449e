"""The tiled online-softmax engine in plain PyTorch: forward and backward on any device.

Layout inside the engine ("packed GQA"): the ``G = H // Hk`` query heads that share a
key/value head are folded into the rows, so q becomes ``(B, Hk, Sq * G, D)`` with row
``r <-> (query position r // G, head hk * G + r % G)`` and K/V are never repeated.
Everything is computed in float32 (float64 stays float64).

Forward: for each block of query rows, walk the key blocks that the causal/window mask
leaves visible, keeping the running max ``m_i``, normaliser ``l_i`` and accumulator ``acc``.
Backward (FlashAttention-2): ``delta = rowsum(dout * out)``; for each key block, walk the
visible query blocks, recompute ``p = exp(s - lse)``, accumulate dK/dV for the block and add
into dQ (``delta`` from the given ``out``: see the comment in ``backward``).
``learnable_sink``: the forward folds ``exp(sink - m)`` into each row's ``m_i`` / ``l_i`` after the
key blocks (so the lse includes it; a row without keys gets ``lse = sink``, out 0); the backward
is unchanged given that lse, plus ``dsink = -sum exp(sink - lse) * delta``. Split-KV decoding
computes the pieces without the sink and merges it in once, as a state ``(out 0, lse = sink)``. Extra memory: the fp32
copies of q/k/v/out/dout and the gradients, O((Sq + Sk) * D) per head, plus one
``(rows x keys)`` tile whose size does not grow with the sequence length.
The loops are sequential, so gradients are bitwise reproducible (``deterministic`` is always met).
On the CPU, plain calls (fp32/fp16/bf16, one head dim, no options but causal on square problems) take
torch's fused flash-attention CPU kernels instead of the loops: see ``_fused_ok``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from dataclasses import dataclass

import torch

from ..mask import block_fully_visible, key_range, visible
from ..merge import merge_states
from ..paged import cache_index, check_cache_indices, packed_positions
from ..rng import dropout_threshold, philox_word
from ..rotary import apply_rotary_at
from ..spec import FEATURES, MOD_FEATURES, AttnCall, KVCache, Problem
from .base import Capabilities, register

#: Elements in one score tile (all batch x heads together); 2**20 fp32 = 4 MiB fits in cache
#: on typical CPUs and keeps Python overhead per tile small. Override: FLASHTILE_TORCH_TILE.
_TILE_ELEMS = int(os.environ.get("FLASHTILE_TORCH_TILE", 1 << 20))
_BLOCK_N = 512


@dataclass
class _Seq:
    """One group of equal-length sequences: rows and keys of ``qh`` / ``kh`` it owns."""

    row0: int  # first query position (not row) in qh
    sq: int
    col0: int
    sk: int
    batch: slice  # batch slice into qh/kh
    bh0: int  # (first sequence index) * H, for the dropout counter
    slopes: torch.Tensor | None  # (nb, H) fp32 or None
    #: key column aligned with query 0 (the mask diagonal); None = bottom-right, sk - sq.
    #: A piece of a longer key range (split-KV) passes the offset of the whole range.
    key_offset: int | None = None

    @property
    def offset(self) -> int:
        return self.sk - self.sq if self.key_offset is None else self.key_offset


# --- threads (issue 16) -----------------------------------------------------------------------
# The engine runs ~15 torch ops per tile, each a parallel region ending in a barrier. When the
# machine is oversubscribed (another CPU-bound job on a 2-core machine), a barrier waits for a
# descheduled sibling thread for up to a scheduler time slice, every op: measured on a 2-core VM,
# the forward at seqlen 1024 went from 0.2 s (1 thread) to 2.7 s (2 threads) while SDPA's single
# parallel region kept ~0.11 s. So each CPU call takes min(torch.get_num_threads(), idle cores)
# threads, the idle cores counted from the runnable tasks in /proc/loadavg minus this process's
# own running threads. Only where that count describes the CPUs this process may use (Linux,
# affinity = every CPU of the machine, i.e. not a container slice of a larger host); elsewhere,
# torch's own setting. FLASHTILE_TORCH_THREADS=N fixes the count (0 or unset: automatic).
# A count that would lower the threads is confirmed by a second look ~1 ms later (the lower of
# the two counts is used): one look can catch a short-lived task (a shell, a monitor), and a
# decision lasts a whole call -- seconds at 16k tokens, where one such look cost 2x (measured on
# the idle 2-core VM: 16k forward 3.4 s with 2 threads, 6.3-7.0 s in the repeats that got 1).
_ENV_THREADS = "FLASHTILE_TORCH_THREADS"


def _running_tasks() -> int | None:
    """Runnable tasks on the machine, less this process's own running threads (None if unknown)."""
    try:
        with open("/proc/loadavg", "rb") as fh:
            running = int(fh.read().split()[3].split(b"/")[0])
        own = 0
        for tid in os.listdir("/proc/self/task"):
            try:
                with open(f"/proc/self/task/{tid}/stat", "rb") as fh:
                    own += fh.read().rsplit(b")", 1)[1].split()[0] == b"R"
            except OSError:
                continue
        return max(0, running - own)
    except (OSError, ValueError, IndexError):
        return None


def engine_threads() -> int:
    """Threads the engine uses for a CPU call (see the comment above)."""
    want = torch.get_num_threads()
    env = os.environ.get(_ENV_THREADS, "").strip()
    if env and env != "0":
        return max(1, int(env))
    if want <= 1 or not hasattr(os, "sched_getaffinity"):
        return want
    ncpu = len(os.sched_getaffinity(0))
    if ncpu != os.cpu_count():
        return want
    global _last_check
    now = time.monotonic()
    if now - _last_check[0] > 0.2:  # a fresh look at most 5 times a second (it costs ~50-100 us)
        others = _running_tasks()
        if others is not None and ncpu - others < want:  # confirm a reduction (see above)
            time.sleep(0.001)
            again = _running_tasks()
            others = others if again is None else min(others, again)
        _last_check = (now, others)
    others = _last_check[1]
    if others is None:
        return want
    return max(1, min(want, ncpu - others))


_last_check: tuple[float, int | None] = (-1.0, None)


class _threads:
    """``with _threads(device):`` runs the block with :func:`engine_threads` threads on CPU tensors."""

    def __init__(self, device: torch.device):
        self.prev = None
        if device.type == "cpu" and not torch.compiler.is_compiling():
            n = engine_threads()
            prev = torch.get_num_threads()
            if n != prev:
                self.prev = prev
                torch.set_num_threads(n)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        if self.prev is not None:
            torch.set_num_threads(self.prev)


def _with_threads(method):
    """Run a backend method (first argument a tensor) under :class:`_threads`."""

    @functools.wraps(method)
    def run(self, x, *args, **kwargs):
        with _threads(x.device):
            return method(self, x, *args, **kwargs)

    return run


def _blocks(problem_rows: int, nbh: int, groups: int) -> tuple[int, int]:
    bn = _BLOCK_N
    bm = max(16, _TILE_ELEMS // max(1, nbh * groups * bn))
    return min(bm, max(problem_rows, 1)), bn


class _Ctx:
    """Per-call constants and the shared per-tile score computation."""

    def __init__(self, call: AttnCall, H: int, Hk: int, D: int, seed: int):
        self.call = call
        self.H, self.Hk, self.G, self.D = H, Hk, H // Hk, D
        self.cap = call.softcap
        # q is pre-scaled by c, so that u = (c q) . k; s = cap * tanh(u) (softcap) or u.
        self.c = call.softmax_scale / call.softcap if call.softcap > 0 else call.softmax_scale
        self.seed = seed
        self.left, self.right = call.window_left, call.window_right
        self._scratch: dict[str, torch.Tensor] = {}
        self.mods = _Mods(call, H, Hk) if call.score_mod is not None or call.block_mask is not None else None

    def scratch(self, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """A contiguous tile-sized buffer reused across tiles: fresh multi-MiB allocations per
        tile cost page faults that showed up as ~10% of the forward on CPU."""
        n = 1
        for x in shape:
            n *= x
        buf = self._scratch.get(name)
        if buf is None or buf.numel() < n:
            buf = self._scratch[name] = torch.empty(n, dtype=like.dtype, device=like.device)
        return buf[:n].view(shape)

    def scores(
        self,
        qb: torch.Tensor,
        kb: torch.Tensor,
        seq: _Seq,
        i0: int,
        i1: int,
        j0: int,
        j1: int,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Scores of query positions [i0, i1) against keys [j0, j1) of one sequence group,
        masked with -inf. Returns (s, t) with t = tanh(u) when softcap is on (for the backward)."""
        G = self.G
        shape = (*qb.shape[:-1], kb.shape[-2])  # (nb, Hk, (i1-i0)*G, j1-j0)
        s = self.scratch("s", shape, qb)
        torch.bmm(_b3(qb), _b3(kb).transpose(1, 2), out=s.view(-1, *shape[2:]))
        t = None
        if self.cap > 0:
            t = s.tanh_()
            s = t * self.cap
        offset = seq.offset
        need_mask = not block_fully_visible(i0, i1, j0, j1, offset, self.left, self.right)
        if need_mask or seq.slopes is not None:
            dev = s.device
            rows = torch.arange(i0, i1, device=dev).repeat_interleave(G)
            cols = torch.arange(j0, j1, device=dev)
            if seq.slopes is not None:
                nb = s.shape[0]
                sl = seq.slopes.view(nb, self.Hk, 1, G).expand(nb, self.Hk, i1 - i0, G)
                dist = (rows.unsqueeze(-1) + offset - cols).abs().to(s.dtype)
                s.sub_(sl.reshape(nb, self.Hk, -1, 1).to(s.dtype) * dist)
        if self.mods is not None:  # score_mod (after softcap and ALiBi), then the block mask
            s = self.mods.apply(s, seq, i0, i1, j0, j1)
        if need_mask:
            vis = visible(rows, cols, offset, self.left, self.right)
            s.masked_fill_(~vis, float("-inf"))
        return s, t

    def keep(self, seq: _Seq, nb: int, i0: int, i1: int, j0: int, j1: int, device: torch.device) -> torch.Tensor:
        """Dropout keep mask for the tile, shaped like the scores."""
        G, Hk = self.G, self.Hk
        rows = torch.arange(i0, i1, device=device).repeat_interleave(G)
        heads = torch.arange(self.H, device=device).view(Hk, 1, G).expand(Hk, i1 - i0, G).reshape(Hk, -1)
        b = torch.arange(nb, device=device).view(nb, 1, 1)
        bh = seq.bh0 + b * self.H + heads  # (nb, Hk, R)
        cols = torch.arange(j0, j1, device=device)
        word = philox_word(self.seed, cols.view(1, 1, 1, -1), rows.view(1, 1, -1, 1), bh.unsqueeze(-1))
        return (word >> 8) >= dropout_threshold(self.call.dropout_p)


def _b3(x: torch.Tensor) -> torch.Tensor:
    """``(nb, Hk, R, C)`` -> ``(nb * Hk, R, C)`` for ``torch.bmm`` (a view on the engine's layouts)."""
    return x.flatten(0, 1)


def _to_rows(x: torch.Tensor, Hk: int, cdt: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """(B, S, H, D) -> a fresh (B, Hk, S * G, D) contiguous buffer in the compute dtype, times
    ``scale`` (always a copy, so the engine may update it in place). Already in the compute
    dtype: one pass (scaled copy); else the upcast, then the scale in the compute dtype."""
    B, S, H, D = x.shape
    G = H // Hk
    buf = torch.empty((B, Hk, S, G, D), dtype=cdt, device=x.device)
    src = x.view(B, S, Hk, G, D).permute(0, 2, 1, 3, 4)
    if x.dtype == cdt and scale != 1.0:
        torch.mul(src, scale, out=buf)
    else:
        buf.copy_(src)
        if scale != 1.0:
            buf.mul_(scale)
    return buf.view(B, Hk, S * G, D)


def _from_rows(x: torch.Tensor, H: int, dtype: torch.dtype) -> torch.Tensor:
    """(B, Hk, S * G, D) -> (B, S, H, D) in dtype."""
    B, Hk, R, D = x.shape
    G = H // Hk
    S = R // G
    return x.view(B, Hk, S, G, D).permute(0, 2, 1, 3, 4).reshape(B, S, H, D).to(dtype)


def _kv_heads(x: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """(B, S, Hk, D) -> (B, Hk, S, D) in the compute dtype, read-only: a strided view when that
    needs no copy for ``torch.bmm`` (one batch, compute dtype, unit stride along D), else a
    contiguous copy."""
    xv = x.permute(0, 2, 1, 3)
    if x.shape[0] == 1 and x.dtype == cdt and x.stride(-1) == 1:
        return xv
    return xv.to(cdt).contiguous()


def _groups(B: int, Sq: int, Sk: int, H: int, call: AttnCall) -> list[_Seq]:
    cu_q, cu_k, slopes = call.cu_seqlens_q, call.cu_seqlens_k, call.alibi_slopes
    if cu_q is None:
        return [_Seq(0, Sq, 0, Sk, slice(0, B), 0, slopes)]
    cq, ck = cu_q.tolist(), cu_k.tolist()
    out = []
    for n in range(len(cq) - 1):
        sl = None if slopes is None else slopes[n : n + 1]
        out.append(_Seq(cq[n], cq[n + 1] - cq[n], ck[n], ck[n + 1] - ck[n], slice(0, 1), n * H, sl))
    return out


def _sink_rows(sink: torch.Tensor, Hk: int, n: int, cdt: torch.dtype) -> torch.Tensor:
    """The per-head sink ``(H,)`` on ``n`` query positions of the row layout: ``(1, Hk, n * G)``."""
    G = sink.shape[0] // Hk
    return sink.to(cdt).view(1, Hk, 1, G).expand(1, Hk, n, G).reshape(1, Hk, n * G)


def forward_seqs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    call: AttnCall,
    seqs: list[_Seq],
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward over explicit sequence groups (the engine behind ``TorchTiledBackend.forward``;
    also used directly by split-KV decoding, whose pieces carry their own mask offset)."""
    with torch.no_grad():
        B, Sq, H, D = q.shape
        Hk = k.shape[2]
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        ctx = _Ctx(call, H, Hk, D, seed)
        G = ctx.G
        qh = _to_rows(q, Hk, cdt, ctx.c)
        kh, vh = _kv_heads(k, cdt), _kv_heads(v, cdt)
        Dv = v.shape[-1]
        # out in its final layout (B, Sq, H, Dv), written a row block at a time through the
        # (B, Hk, Sq, G, Dv) view; zero-filled only where some rows may belong to no group.
        covered = sum((sq.batch.stop - sq.batch.start) * sq.sq for sq in seqs) == B * Sq
        new = torch.empty if covered and len(seqs) == 1 else torch.zeros
        out = new((B, Sq, H, Dv), dtype=q.dtype, device=q.device)
        out5 = out.view(B, Sq, Hk, G, Dv).permute(0, 2, 1, 3, 4)
        lse = torch.full((B, Hk, Sq * G), float("-inf"), dtype=torch.float32, device=q.device)
        drop = call.dropout_p > 0
        for seq in seqs:
            nb = seq.batch.stop - seq.batch.start
            bm, bn = _blocks(seq.sq, nb * Hk, G)
            offset = seq.offset
            kseq = kh[seq.batch, :, seq.col0 : seq.col0 + seq.sk]
            vseq = vh[seq.batch, :, seq.col0 : seq.col0 + seq.sk]
            for i0 in range(0, seq.sq, bm):
                i1 = min(i0 + bm, seq.sq)
                r0, r1 = (seq.row0 + i0) * G, (seq.row0 + i1) * G
                qb = qh[seq.batch, :, r0:r1]
                lo, hi = key_range(i0, i1, seq.sk, offset, ctx.left, ctx.right)
                acc = ctx.scratch("acc", (*qb.shape[:-1], Dv), qb)
                m_i = l_i = None  # no key block seen yet: acc holds garbage
                for j0 in range(lo, hi, bn):
                    j1 = min(j0 + bn, hi)
                    if ctx.mods is not None and ctx.mods.skip(seq, i0, i1, j0, j1):
                        continue
                    s, _ = ctx.scores(qb, kseq[:, :, j0:j1], seq, i0, i1, j0, j1)
                    m_t = s.amax(-1)
                    m_new = m_t if m_i is None else torch.maximum(m_i, m_t)
                    # rows whose keys are all masked so far: subtract 0 (p = exp(-inf) = 0)
                    m_safe = torch.where(torch.isinf(m_new), 0.0, m_new)
                    p = s.sub_(m_safe.unsqueeze(-1)).exp_()
                    if m_i is None:  # the first block: the running state is this block's
                        l_i = p.sum(-1)
                    else:
                        alpha = torch.exp(m_i - m_safe)
                        l_i = l_i.mul_(alpha).add_(p.sum(-1))
                    if drop:
                        p = p.masked_fill_(~ctx.keep(seq, nb, i0, i1, j0, j1, q.device), 0.0)
                    if m_i is None:
                        torch.bmm(_b3(p), _b3(vseq[:, :, j0:j1]), out=_b3(acc))
                    else:
                        _b3(acc.mul_(alpha.unsqueeze(-1))).baddbmm_(_b3(p), _b3(vseq[:, :, j0:j1]))
                    m_i = m_new
                if m_i is None:  # no visible key block
                    acc.zero_()
                    m_i = torch.full(qb.shape[:-1], float("-inf"), dtype=cdt, device=q.device)
                    l_i = torch.zeros_like(m_i)
                if call.learnable_sink is not None:  # one more term of the denominator, without value
                    sink = _sink_rows(call.learnable_sink, Hk, i1 - i0, cdt)
                    m_new = torch.maximum(m_i, sink)  # finite: the sink is
                    alpha = torch.exp(m_i - m_new)  # 0 on rows without keys
                    l_i = l_i.mul_(alpha).add_(torch.exp(sink - m_new))
                    acc = acc.mul_(alpha.unsqueeze(-1))
                    m_i = m_new
                empty = l_i == 0
                scale = torch.where(empty, 0.0, 1.0 / l_i)
                if drop:
                    scale = scale / (1.0 - call.dropout_p)
                dst = out5[seq.batch, :, seq.row0 + i0 : seq.row0 + i1]
                res = acc.view(dst.shape), scale.view(*dst.shape[:-1], 1)
                if out.dtype == cdt:
                    torch.mul(*res, out=dst)
                else:
                    dst.copy_(res[0] * res[1])
                lse[seq.batch, :, r0:r1] = torch.where(empty, float("-inf"), m_i + torch.log(l_i))
        lse_out = lse.view(B, Hk, Sq, G).permute(0, 1, 3, 2).reshape(B, H, Sq)
        return out, lse_out


# --- CPU fast path (issue 16) ------------------------------------------------------------------
# On the CPU, the plain cases go to the fused flash-attention kernels that torch ships for SDPA
# (``aten::_scaled_dot_product_flash_attention_for_cpu`` and its backward): one parallel region per
# call, the score tile kept in cache, out + logsumexp returned and the backward taking the given
# out / lse (flash-attn's semantics, which ring attention relies on). The tiled engine runs ~8
# eager ops per score tile and streams each 4 MiB tile through memory 6 times: measured 1.4-1.5x
# SDPA at 1k-4k even after trimming it. Taken only where both compute the same thing: CPU, fp32
# (fp16/bf16 upcast to fp32 first, as the engine does), GQA by repeating K/V heads, equal head dims, dense,
# no window except causal with seqlen_q == seqlen_k (top-left = bottom-right alignment), no
# softcap/ALiBi/dropout/sink/FP8/mods, not ``deterministic`` (the engine's loops are bitwise
# reproducible by construction). FLASHTILE_TORCH_FUSED=0 turns it off.
_ATEN_FWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_ATEN_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_FUSED = os.environ.get("FLASHTILE_TORCH_FUSED", "1").strip() != "0"


def _fused_ok(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall) -> bool:
    """Whether the call may take the fused CPU kernels (see the comment above)."""
    if not _FUSED or _ATEN_FWD is None or _ATEN_BWD is None or q.device.type != "cpu":
        return False
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or torch.compiler.is_compiling():
        return False
    B, Sq, H, D = q.shape
    Sk = k.shape[1]
    if k.shape[-1] != D or v.shape[-1] != D or Sq == 0 or Sk == 0:
        return False
    causal_square = call.window_left < 0 and call.window_right == 0 and Sq == Sk
    if call.has_window and not causal_square:
        return False
    return (
        call.softcap == 0 and call.dropout_p == 0 and not call.deterministic and call.cu_seqlens_q is None
        and call.alibi_slopes is None and call.learnable_sink is None and call.q_descale is None
        and call.k_descale is None and call.v_descale is None and call.score_mod is None
        and call.block_mask is None
    )  # fmt: skip


def _heads_first(x: torch.Tensor, heads: int = 0) -> torch.Tensor:
    """(B, S, Hx, D) -> a (B, H, S, D) fp32 view; a copy only to upcast or where D is strided (the
    fused kernels read D as contiguous whatever its stride: measured wrong results otherwise;
    other strides, including 0 from expand, are read correctly). GQA (``heads`` = H > Hx): each
    K/V head repeated for its H // Hx query heads (flash-attn's mapping: query head h reads kv
    head h // (H // Hx)), a copy of H heads."""
    if x.dtype != torch.float32 or x.stride(-1) != 1:
        x = x.float() if x.stride(-1) == 1 else x.float().contiguous()
    x = x.transpose(1, 2)
    return x.repeat_interleave(heads // x.shape[1], dim=1) if heads > x.shape[1] else x


class TorchTiledBackend:
    """Tiled PyTorch attention: every option, every device, fp16/bf16/fp32/fp64 inputs, any
    head dim the API accepts, and KV-cache decoding."""

    name = "torch"
    capabilities = Capabilities(
        priority=0,
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        max_headdim=1 << 30,
        features=FEATURES | MOD_FEATURES,
        decode=True,
    )

    def available(self) -> str | None:
        return None

    def supports(self, problem: Problem, call: AttnCall) -> str | None:
        return None

    @_with_threads
    @torch.no_grad()
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        H = q.shape[2]
        if _fused_ok(q, k, v, call):
            out, lse = _ATEN_FWD(
                _heads_first(q),
                _heads_first(k, H),
                _heads_first(v, H),
                is_causal=call.is_causal,
                scale=call.softmax_scale,
            )
            return out.transpose(1, 2).to(q.dtype).contiguous(), lse
        seqs = _groups(q.shape[0], q.shape[1], k.shape[1], q.shape[2], call)
        return forward_seqs(q, k, v, call, seqs, call.seed_int)

    @_with_threads
    @torch.no_grad()
    def decode(self, q: torch.Tensor, cache: KVCache, call: AttnCall) -> tuple[torch.Tensor, torch.Tensor]:
        """Any device: check the indices (one host sync), append with indexing, gather each row's
        keys into the packed layout and run the engine (``num_splits > 1``: pieces of each row's
        key range computed separately and merged)."""
        b, sq, h, d = q.shape
        dev = q.device
        sn, paged = cache.seqlen_new, cache.paged
        page = cache.k_cache.shape[1] if paged else 0
        cache_rows = torch.arange(b, device=dev) if cache.batch_idx is None else cache.batch_idx.long()
        seqlens = cache.seqlens.long() if isinstance(cache.seqlens, torch.Tensor) else \
            torch.full((b,), cache.seqlens, dtype=torch.long, device=dev)  # fmt: skip
        leftpad = torch.zeros(b, dtype=torch.long, device=dev) if cache.leftpad is None else cache.leftpad.long()
        check_cache_indices(cache, seqlens)
        rot = cache.rotary
        # 1. rotary on the new keys (at their cache positions), then append them in place.
        if cache.k_new is not None:
            k = cache.k_new
            if rot is not None:
                k = apply_rotary_at(k, rot[0], rot[1], _rotary_positions(seqlens, sn, True), rot[2])
            rows = torch.arange(b, device=dev).view(b, 1).expand(b, sn)
            at = seqlens.view(b, 1) + torch.arange(sn, device=dev).view(1, sn)
            i0, i1 = cache_index(rows, at, cache.block_table, cache_rows, page)
            cache.k_cache[i0, i1] = k.to(cache.k_cache.dtype)
            cache.v_cache[i0, i1] = cache.v_new.to(cache.v_cache.dtype)
        # 2. rotary on q.
        if rot is not None:
            q = apply_rotary_at(q, rot[0], rot[1], _rotary_positions(seqlens, sq, cache.rotary_along(call)), rot[2])
        # 3. gather each row's keys [leftpad, seqlens + sn) into the packed layout.
        lens_k = seqlens + sn - leftpad
        cu_k = [0] + torch.cumsum(lens_k, 0).tolist()
        row_of, pos = packed_positions(lens_k, leftpad, cu_k[-1])
        i0, i1 = cache_index(row_of, pos, cache.block_table, cache_rows, page)
        kp, vp = cache.k_cache[i0, i1].unsqueeze(0), cache.v_cache[i0, i1].unsqueeze(0)  # (1, total_k, hk, d)
        qp = q.reshape(1, b * sq, h, d)  # row i's queries at [i * sq, (i + 1) * sq)
        splits = max(1, cache.num_splits)
        sink = call.learnable_sink
        if splits > 1 and sink is not None:  # the sink is merged in once below, not in every piece
            call = dataclasses.replace(call, learnable_sink=None)
        outs, lses = [], []
        for piece in range(splits):
            seqs = []
            for i in range(b):
                n = cu_k[i + 1] - cu_k[i]
                chunk = -(-n // splits) if n else 0
                lo, hi = min(n, piece * chunk), min(n, (piece + 1) * chunk)
                sl = None if call.alibi_slopes is None else call.alibi_slopes[i : i + 1]
                # Keys [lo, hi) of a row with n keys: the diagonal sits at column n - sq - lo of the piece.
                seqs.append(_Seq(row0=i * sq, sq=sq, col0=cu_k[i] + lo, sk=hi - lo, batch=slice(0, 1), bh0=0,
                                 slopes=sl, key_offset=n - sq - lo))  # fmt: skip
            out, lse = forward_seqs(qp, kp, vp, call, seqs)
            outs.append(out.view(b, sq, h, vp.shape[-1]))
            lses.append(lse.view(h, b, sq).permute(1, 0, 2))
        if splits == 1:
            return outs[0], lses[0].contiguous()
        if sink is not None:  # the sink as one more piece: no value (out 0), lse = sink
            outs.append(torch.zeros_like(outs[0]))
            lses.append(sink.float().view(1, h, 1).expand(b, h, sq))
        return merge_states(outs, lses)

    @_with_threads
    @torch.no_grad()
    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        call: AttnCall,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        H, Hk = q.shape[2], k.shape[2]
        if _fused_ok(q, k, v, call):
            dq, dk, dv = _ATEN_BWD(
                _heads_first(dout), _heads_first(q), _heads_first(k, H), _heads_first(v, H), _heads_first(out),
                lse.float().contiguous(), 0.0, call.is_causal, scale=call.softmax_scale,
            )  # fmt: skip
            if Hk < H:  # GQA: the repeated K/V heads' gradients summed back onto each K/V head
                dk, dv = (g.unflatten(1, (Hk, H // Hk)).sum(2) for g in (dk, dv))
            dq, dk, dv = (g.transpose(1, 2).to(x.dtype).contiguous() for g, x in ((dq, q), (dk, k), (dv, v)))
            return dq, dk, dv, {}
        B, Sq, H, D = q.shape
        Sk, Hk = k.shape[1], k.shape[2]
        cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
        ctx = _Ctx(call, H, Hk, D, call.seed_int)
        if ctx.mods is not None:
            ctx.mods.grad = True
        G = ctx.G
        qh = _to_rows(q, Hk, cdt, ctx.c)
        doh = _to_rows(dout, Hk, cdt)
        seqs = _groups(B, Sq, Sk, H, call)
        # delta = rowsum(dout * out) uses the `out` we are given, as flash-attn does: callers such
        # as ring attention pass the *global* out / lse of a longer key range than this k / v, so
        # it cannot be recomputed here. For fp16/bf16 that carries out's rounding into
        # ds = p * (dp - delta): small, but as large as the gradient where the softmax saturates.
        delta = (dout.to(cdt) * out.to(cdt)).sum(-1)  # (B, Sq, H) -> rows (B, Hk, Sq*G)
        delta = delta.view(B, Sq, Hk, G).permute(0, 2, 1, 3).reshape(B, Hk, Sq * G)
        kh, vh = _kv_heads(k, cdt), _kv_heads(v, cdt)
        # lse in row layout; rows that saw no key get +inf so that p = exp(s - lse) = 0 there.
        lse_r = lse.view(B, Hk, G, Sq).permute(0, 1, 3, 2).reshape(B, Hk, Sq * G).to(cdt)
        lse_r = torch.where(torch.isneginf(lse_r), float("inf"), lse_r)
        dq = torch.zeros_like(qh)
        dk = torch.zeros_like(kh)
        dv = torch.zeros_like(vh)
        drop = call.dropout_p > 0
        inv_keep = 1.0 / (1.0 - call.dropout_p)
        for seq in seqs:
            nb = seq.batch.stop - seq.batch.start
            bm, bn = _blocks(seq.sq, nb * Hk, G)
            offset = seq.offset
            for j0 in range(0, seq.sk, bn):
                j1 = min(j0 + bn, seq.sk)
                c0, c1 = seq.col0 + j0, seq.col0 + j1
                kb, vb = kh[seq.batch, :, c0:c1], vh[seq.batch, :, c0:c1]
                dk_acc = dk[seq.batch, :, c0:c1]  # accumulated in place (views of dk / dv)
                dv_acc = dv[seq.batch, :, c0:c1]
                # query positions that see any key in [j0, j1)
                i_lo = 0 if ctx.right < 0 else max(0, j0 - offset - ctx.right)
                i_hi = seq.sq if ctx.left < 0 else min(seq.sq, j1 - 1 - offset + ctx.left + 1)
                for i0 in range(i_lo, i_hi, bm):
                    i1 = min(i0 + bm, seq.sq)
                    if ctx.mods is not None and ctx.mods.skip(seq, i0, i1, j0, j1):
                        continue
                    r0, r1 = (seq.row0 + i0) * G, (seq.row0 + i1) * G
                    qb = qh[seq.batch, :, r0:r1]
                    dob = doh[seq.batch, :, r0:r1]
                    s, t = ctx.scores(qb, kb, seq, i0, i1, j0, j1)
                    p = s.sub_(lse_r[seq.batch, :, r0:r1].unsqueeze(-1)).exp_()
                    dp = ctx.scratch("dp", p.shape, p)
                    torch.bmm(_b3(dob), _b3(vb).transpose(1, 2), out=_b3(dp))
                    if drop:
                        keep = ctx.keep(seq, nb, i0, i1, j0, j1, q.device)
                        pd = p.masked_fill(~keep, 0.0).mul_(inv_keep)
                        dp = dp.masked_fill_(~keep, 0.0).mul_(inv_keep)
                    else:
                        pd = p
                    _b3(dv_acc).baddbmm_(_b3(pd).transpose(1, 2), _b3(dob))
                    ds = p.mul_(dp.sub_(delta[seq.batch, :, r0:r1].unsqueeze(-1)))
                    if ctx.mods is not None:  # through score_mod (and into its captured tensors)
                        ds = ctx.mods.vjp(ds)
                    if t is not None:
                        ds = ds.mul_(t.square_().neg_().add_(1.0)).mul_(ctx.cap)
                    _b3(dq[seq.batch, :, r0:r1]).baddbmm_(_b3(ds), _b3(kb))
                    _b3(dk_acc).baddbmm_(_b3(ds).transpose(1, 2), _b3(qb))
        dq.mul_(ctx.c)
        dq_out = _from_rows(dq, H, q.dtype)
        grads = {}
        sink = call.learnable_sink
        if sink is not None:
            # dsink_h = -sum_{b,i} p_sink * delta_i with p_sink = exp(sink_h - lse_i).
            p_sink = torch.exp(_sink_rows(sink, Hk, Sq, cdt) - lse_r)
            grads["learnable_sink"] = (-(p_sink * delta)).view(B, Hk, Sq, G).sum((0, 2)).reshape(H).to(sink.dtype)
        if ctx.mods is not None and call.score_mod is not None:
            grads["score_mod"] = ctx.mods.captured_grads()
        return dq_out, dk.permute(0, 2, 1, 3).to(k.dtype), dv.permute(0, 2, 1, 3).to(v.dtype), grads


# ----------------------------------------------------------------------------------------------
# mods: score_mod / block_mask (see flashtile.flex) evaluated tile by tile


class _Mods:
    """A call's ``score_mod`` and ``block_mask`` on the engine's tiles.

    Index tensors follow the packed-GQA row layout: for a tile of query positions [i0, i1) and
    keys [j0, j1) the mods see ``b (nb, 1, 1, 1)``, ``h (1, Hk, R, 1)`` (the query head of each
    row), ``q_idx (1, 1, R, 1)``, ``kv_idx (1, 1, 1, C)``, int32, broadcasting to the score tile
    ``(nb, Hk, R, C)``. Block mask: tiles whose blocks are all skipped are not computed
    (:meth:`skip`), tiles whose blocks are all full evaluate no mask, the others take the
    block-state map (skipped -> hidden, full -> visible, partial -> ``mask_mod``). Backward
    (``grad``): the score_mod runs under autograd on each tile and :meth:`vjp` carries the score
    gradient through it, accumulating the gradients of its captured tensors.
    """

    def __init__(self, call: AttnCall, H: int, Hk: int):
        from ..flex import captured_tensors

        self.H, self.Hk, self.G = H, Hk, H // Hk
        self.score_mod = call.score_mod
        self.grad = False
        self.graph: tuple[torch.Tensor, torch.Tensor] | None = None
        self.captured = captured_tensors(call.score_mod) if call.score_mod is not None else ()
        self.acc: list[torch.Tensor | None] = [None] * len(self.captured)
        bm = call.block_mask
        self.block = bm
        if bm is not None:
            self.mask_mod = bm.mask_mod
            self.BQ, self.BK = bm.BLOCK_SIZE
            st = bm.block_states() if hasattr(bm, "block_states") else _torch_block_states(bm)
            self.state = st  # (Bm, Hm, nq, nk) int8 on the mask's device
            self.state_cpu = st.cpu()
            self.Bm, self.Hm = st.shape[:2]

    def _grids(self, seq, nb: int, i0: int, i1: int, j0: int, j1: int, dev: torch.device):
        G, Hk = self.G, self.Hk
        b0 = seq.bh0 // self.H
        b = torch.arange(b0, b0 + nb, device=dev, dtype=torch.int32).view(nb, 1, 1, 1)
        h = torch.arange(self.H, device=dev, dtype=torch.int32).view(1, Hk, 1, G)
        h = h.expand(1, Hk, i1 - i0, G).reshape(1, Hk, -1, 1)
        qi = torch.arange(i0, i1, device=dev, dtype=torch.int32).repeat_interleave(G).view(1, 1, -1, 1)
        ki = torch.arange(j0, j1, device=dev, dtype=torch.int32).view(1, 1, 1, -1)
        return b, h, qi, ki

    def _tile_states(self, seq, nb: int, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        b0 = seq.bh0 // self.H
        bsel = slice(0, 1) if self.Bm == 1 else slice(b0, b0 + nb)
        qb0, qb1 = i0 // self.BQ, -(-i1 // self.BQ)
        kb0, kb1 = j0 // self.BK, -(-j1 // self.BK)
        return self.state_cpu[bsel, :, qb0:qb1, kb0:kb1]

    def skip(self, seq, i0: int, i1: int, j0: int, j1: int) -> bool:
        """Whether the block mask skips every block the tile touches."""
        if self.block is None:
            return False
        nb = seq.batch.stop - seq.batch.start
        return not bool(self._tile_states(seq, nb, i0, i1, j0, j1).any())

    def apply(self, s: torch.Tensor, seq, i0: int, i1: int, j0: int, j1: int) -> torch.Tensor:
        """The tile's scores through score_mod, then hidden (-inf) where the block mask hides."""
        nb = s.shape[0]
        b, h, qi, ki = self._grids(seq, nb, i0, i1, j0, j1, s.device)
        if self.score_mod is not None:
            if self.grad:
                x = s.detach().requires_grad_()
                with torch.enable_grad():
                    y = torch.as_tensor(self.score_mod(x, b, h, qi, ki), device=s.device)
                    y = y.to(s.dtype).expand(s.shape)
                self.graph = (x, y)
                s = y.detach().clone()
            else:
                y = torch.as_tensor(self.score_mod(s, b, h, qi, ki), device=s.device).to(s.dtype)
                s = y if y.shape == s.shape and y.is_contiguous() else y.expand(s.shape).contiguous()
        if self.block is not None:
            st = self._tile_states(seq, nb, i0, i1, j0, j1)
            if not bool((st == 2).all()):
                bi = b.long() if self.Bm > 1 else torch.zeros_like(b, dtype=torch.long)
                hi = h.long() if self.Hm > 1 else torch.zeros_like(h, dtype=torch.long)
                tile = self.state[bi, hi, qi.long() // self.BQ, ki.long() // self.BK]
                vis = tile == 2
                if bool((st == 1).any()):
                    part = tile == 1
                    if self.mask_mod is not None:
                        m = torch.as_tensor(self.mask_mod(b, h, qi, ki), device=s.device)
                        part = part & m
                    vis = vis | part
                s.masked_fill_(~vis, float("-inf"))
        return s

    def vjp(self, ds: torch.Tensor) -> torch.Tensor:
        """The gradient of the pre-score_mod scores from that of the modified ones; accumulates
        the captured tensors' gradients."""
        if self.graph is None:
            return ds
        x, y = self.graph
        self.graph = None
        g = torch.autograd.grad(y, [x, *self.captured], ds, allow_unused=True)
        for i, gi in enumerate(g[1:]):
            if gi is not None:
                gi = gi.to(torch.float64 if gi.dtype == torch.float64 else torch.float32)
                self.acc[i] = gi if self.acc[i] is None else self.acc[i].add_(gi)
        return torch.zeros_like(ds) if g[0] is None else g[0]

    def captured_grads(self) -> tuple[torch.Tensor, ...]:
        return tuple(
            torch.zeros_like(t) if a is None else a.to(t.dtype) for t, a in zip(self.captured, self.acc, strict=True)
        )


def _torch_block_states(bm) -> torch.Tensor:
    """torch's ``BlockMask`` as flashtile's block-state map (0 skipped, 1 partial, 2 full)."""
    from ..flex import BlockMask

    return BlockMask.from_kv_blocks(
        bm.kv_num_blocks, bm.kv_indices, bm.full_kv_num_blocks, bm.full_kv_indices, tuple(bm.BLOCK_SIZE),
        bm.mask_mod, tuple(bm.seq_lengths),
    ).block_states()  # fmt: skip


def _rotary_positions(seqlens: torch.Tensor, n: int, along: bool) -> torch.Tensor:
    """Rotary positions ``(b, n)`` of a decode step, flash-attn's: ``seqlens (+ t if along)``, the
    cache index of the first new token (leftpad included)."""
    base = seqlens.view(-1, 1)
    return base + torch.arange(n, device=seqlens.device).view(1, n) if along else base.expand(-1, n)


@torch.no_grad()
def attention_probs(q: torch.Tensor, k: torch.Tensor, call: AttnCall) -> torch.Tensor:
    """The attention probabilities after dropout, materialised (``return_attn_probs``, a testing
    aid: O(seqlen_q * seqlen_k) memory): the engine run with v = the identity over each sequence's
    keys, so that its output is the probabilities, with the call's dropout mask (the one every
    backend draws from ``call.seed``). On the internal layout; returns float32
    ``(batch, nheads, seqlen_q, seqlen_k)``, varlen ``(nseq, nheads, max_seqlen_q, max_seqlen_k)``
    zero-padded, such that ``out = probs @ v``."""
    qf, kf, hk = q.float(), k.float(), k.shape[2]
    if not call.varlen:
        b, sk = k.shape[0], k.shape[1]
        eye = torch.eye(sk, dtype=torch.float32, device=q.device).view(1, sk, 1, sk).expand(b, sk, hk, sk)
        out, _ = backend.forward(qf, kf, eye.contiguous(), call)
        return out.permute(0, 2, 1, 3)
    cq, ck = call.cu_seqlens_q.tolist(), call.cu_seqlens_k.tolist()
    lens_k = call.cu_seqlens_k.diff().long()
    rows, pos = packed_positions(lens_k, None, ck[-1])
    eye = torch.nn.functional.one_hot(pos, max(call.max_seqlen_k, 1)).float()  # (total_k, max_sk)
    out, _ = backend.forward(qf, kf, eye.view(1, -1, 1, eye.shape[-1]).expand(1, -1, hk, -1).contiguous(), call)
    probs = q.new_zeros((len(cq) - 1, q.shape[2], call.max_seqlen_q, eye.shape[-1]), dtype=torch.float32)
    for n in range(len(cq) - 1):
        probs[n, :, : cq[n + 1] - cq[n]] = out[0, cq[n] : cq[n + 1]].transpose(0, 1)
    return probs[..., : call.max_seqlen_k]


backend = register(TorchTiledBackend())
