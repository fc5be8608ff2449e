"""Context-parallel attention over ``torch.distributed`` (NCCL on GPUs, gloo on CPUs).

A sequence too long for one device is sharded along its length over the ranks of a process
group (:func:`shard` / :func:`unshard`, layouts ``"zigzag"`` and ``"contiguous"``), and two
strategies compute exact attention over the whole sequence from the shards:

* **ring** (:func:`ring_flash_attn_func` and its packed / varlen forms): K/V shards travel around
  the ranks with point-to-point sends overlapped with compute; partial ``(out, lse)`` merged by
  log-sum-exp. Memory per rank O(S / W); any number of heads.
* **all-to-all / Ulysses** (:func:`ulysses_flash_attn_func` ...): two all-to-alls re-shard
  sequence <-> heads around one ordinary attention call on the whole sequence. Every option
  (ALiBi, any window, ``learnable_sink``) works; needs ``nheads`` divisible by ``W``.

Both run on every flashtile backend and are differentiable; the result equals
:func:`flashtile.flash_attn_func` on the full sequence, sharded the same way::

    q, k, v = (shard(x, group, "zigzag") for x in (q_full, k_full, v_full))  # (b, s / W, h, d)
    out = ring_flash_attn_func(q, k, v, group=group, causal=True, layout="zigzag")
    out_full = unshard(out, group, "zigzag")
"""

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
