"""Context-parallel attention over ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

A sequence too long for one device is sharded along its length over the ranks of a process
group (:func:`shard` / :func:`unshard`, layouts ``"zigzag"`` and ``"contiguous"``), and these
forms compute exact attention over the whole sequence from the shards:

* **ring** (:func:`ring_flash_attn_func` and its packed / varlen forms): K/V shards travel around
  the ranks with point-to-point sends overlapped with compute; partial ``(out, lse)`` merged by
  log-sum-exp. Memory per rank O(S / W); any number of heads.
* **all-to-all / Ulysses** (:func:`ulysses_flash_attn_func` ...): two all-to-alls re-shard
  sequence <-> heads around one ordinary attention call on the whole sequence. Every option
  (ALiBi, any window, ``learnable_sink``) works; needs ``nheads`` divisible by ``W``.
* **2-D** (:func:`hybrid_flash_attn_func` ...): a grid of ``ulysses_size x ring_size`` ranks,
  all-to-all over heads inside each group of ``ulysses_size`` consecutive ranks, zigzag ring
  across the groups. It is the one implementation: ring is ``ulysses_size = 1`` and Ulysses is
  ``ulysses_size = W``. Past 2 ranks it keeps the ring's steps long and few while using more
  ranks than there are k/v heads (see :mod:`flashtile.distributed.hybrid`).

All run on every flashtile backend and are differentiable; the result equals
:func:`flashtile.flash_attn_func` on the full sequence, sharded the same way::

    q, k, v = (shard(x, group, "zigzag") for x in (q_full, k_full, v_full))  # (b, s / W, h, d)
    out = ring_flash_attn_func(q, k, v, group=group, causal=True, layout="zigzag")
    out_full = unshard(out, group, "zigzag")
"""

from .hybrid import (
    hybrid_flash_attn_func,
    hybrid_flash_attn_qkvpacked_func,
    hybrid_flash_attn_varlen_func,
    hybrid_flash_attn_varlen_qkvpacked_func,
)
from .ring import (
    ring_flash_attn_func,
    ring_flash_attn_qkvpacked_func,
    ring_flash_attn_varlen_func,
    ring_flash_attn_varlen_qkvpacked_func,
)
from .shard import LAYOUTS, shard, shard_cu_seqlens, unshard
from .ulysses import (
    ulysses_flash_attn_func,
    ulysses_flash_attn_qkvpacked_func,
    ulysses_flash_attn_varlen_func,
    ulysses_flash_attn_varlen_qkvpacked_func,
)

__all__ = [
    "LAYOUTS",
    "hybrid_flash_attn_func",
    "hybrid_flash_attn_qkvpacked_func",
    "hybrid_flash_attn_varlen_func",
    "hybrid_flash_attn_varlen_qkvpacked_func",
    "ring_flash_attn_func",
    "ring_flash_attn_qkvpacked_func",
    "ring_flash_attn_varlen_func",
    "ring_flash_attn_varlen_qkvpacked_func",
    "shard",
    "shard_cu_seqlens",
    "ulysses_flash_attn_func",
    "ulysses_flash_attn_qkvpacked_func",
    "ulysses_flash_attn_varlen_func",
    "ulysses_flash_attn_varlen_qkvpacked_func",
    "unshard",
]
