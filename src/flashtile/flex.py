"""Masks and score modifications as Python functions, with block sparsity (FlexAttention's API).

* ``mask_mod(b, h, q_idx, kv_idx) -> bool``: True where query ``q_idx`` may attend to key ``kv_idx``.
* ``score_mod(score, b, h, q_idx, kv_idx) -> score``: a new score from the scaled score.

Both are plain Python functions of tensors. flashtile evaluates them on whole tiles at once with
*broadcastable* integer index tensors (``b``, ``h``, ``q_idx``, ``kv_idx`` broadcast to the
tile's shape, ``score`` a float32 tile), not on vmapped scalars as FlexAttention does: write them
with tensor operations (comparisons, ``&``, ``|``, ``torch.where``, indexing a captured tensor
with the index tensors), which is what FlexAttention requires too; Python ``if`` on a tensor
fails in both. ``b`` is the batch index (varlen: the sequence index), ``h`` the *query* head,
``q_idx`` / ``kv_idx`` positions within the sequence.

Order of operations on a score: ``softmax_scale * q.k`` -> softcap -> ALiBi -> ``score_mod`` ->
masks (causal / window, then the block mask). Rows that see no key output 0 and have
``lse = -inf`` (as FlexAttention).

Tensors a ``score_mod`` captures (a closure variable, a default argument, a module-level global,
a ``functools.partial`` argument, the ``nn.Module`` / object of a bound method or callable
object) that require grad receive gradients in the backward. A tensor that requires grad and is
reached some other way is detected when the call is made and refused with an error.

:func:`create_block_mask` builds a :class:`BlockMask` (FlexAttention's names): for each query
block the key blocks that are partially visible (``kv_num_blocks`` / ``kv_indices``: the mask is
evaluated there) and those that are fully visible (``full_kv_num_blocks`` /
``full_kv_indices``: no mask evaluation); blocks in neither list are skipped. As in FlexAttention
the block lists *define* the mask: a key in a skipped block is never attended, one in a full
block always is (``mask_mod`` is not evaluated there). torch's own ``BlockMask`` objects are
accepted too.

Backends: the torch engine serves every mod call (forward and backward); on CUDA the
``flex_triton`` backend serves calls whose mods all come from :mod:`flashtile.masks` (Triton
versions, and for score mods their derivatives, written beside them).

``torch.compile``: a dense call with a ``score_mod`` or ``block_mask`` (no varlen, dropout, ALiBi,
sink or FP8) is traced as plain torch ops on the materialised scores (:func:`dense_mod_attention`:
``fullgraph=True`` works, gradients reach the captured tensors; O(Sq * Sk) memory per head); the
other mod calls run eagerly, as a graph break (``torch.compiler.disable``).
"""

from __future__ import annotations

import dataclasses
import functools
import types
import weakref
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["BlockMask", "create_block_mask", "flex_attention", "noop_mask", "and_masks", "or_masks"]

#: Elements of the mask evaluated at once by :func:`create_block_mask` (bounds its memory).
_EVAL_ELEMS = 1 << 24


class PerBlockMask:
    """Values derived from a block mask, kept per (block mask, ``extra`` key): a hit needs the same
    object (held by a weak reference; ``None``, no block mask, is kept as such) and the same
    ``stamp`` (its count list), so a block mask whose lists are replaced is derived again; cleared
    when full. Objects without weak references are not kept."""

    def __init__(self, maxsize: int = 256) -> None:
        self.store: dict[tuple, tuple] = {}
        self.maxsize = maxsize

    def __len__(self) -> int:
        return len(self.store)

    def clear(self) -> None:
        self.store.clear()

    def peek(self, bm, extra: tuple, stamp) -> Any:
        """The value kept for (``bm``, ``extra``) with ``stamp``, else None."""
        hit = self.store.get((id(bm), *extra))
        if hit is not None and (hit[0] is None if bm is None else hit[0]() is bm) and hit[1] is stamp:
            return hit[2]
        return None

    def put(self, bm, extra: tuple, stamp, val) -> None:
        try:
            ref = None if bm is None else weakref.ref(bm)
        except TypeError:
            return
        if len(self.store) >= self.maxsize:
            self.store.clear()
        self.store[(id(bm), *extra)] = (ref, stamp, val)

    def discard(self, bm, extra: tuple) -> None:
        self.store.pop((id(bm), *extra), None)

    def get(self, bm, extra: tuple, stamp, compute: Callable[[], Any]) -> Any:
        """The kept value, or ``compute()``, kept (a None value is computed again each time)."""
        val = self.peek(bm, extra, stamp)
        if val is None:
            val = compute()
            self.put(bm, extra, stamp, val)
        return val


def noop_mask(b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor) -> torch.Tensor:
    """The mask that hides nothing."""
    return torch.ones((), dtype=torch.bool, device=q_idx.device)


def and_masks(*mods: Callable) -> Callable:
    """The mask_mod visible where every one of ``mods`` is."""

    def mask_mod(b, h, q_idx, kv_idx):
        out = noop_mask(b, h, q_idx, kv_idx)
        for m in mods:
            out = out & m(b, h, q_idx, kv_idx)
        return out

    return mask_mod


def or_masks(*mods: Callable) -> Callable:
    """The mask_mod visible where any one of ``mods`` is."""

    def mask_mod(b, h, q_idx, kv_idx):
        out = torch.zeros((), dtype=torch.bool, device=q_idx.device)
        for m in mods:
            out = out | m(b, h, q_idx, kv_idx)
        return out

    return mask_mod


# ----------------------------------------------------------------------------------------------
# block masks


def _first(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(count, indices)`` of the True entries of ``mask`` along the last dim, int32, the True
    indices first in ascending order (FlexAttention's layout)."""
    count = mask.sum(-1, dtype=torch.int32).contiguous()
    idx = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32).contiguous()
    return count, idx


def _as_state(num: torch.Tensor, idx: torch.Tensor, n: int) -> torch.Tensor:
    """bool ``(..., n)``: which of ``n`` blocks the first ``num`` entries of ``idx`` name."""
    valid = torch.arange(idx.shape[-1], device=idx.device) < num.unsqueeze(-1)
    out = torch.zeros((*idx.shape[:-1], n), dtype=torch.int32, device=idx.device)
    out.scatter_add_(-1, idx.long().clamp(0, max(n - 1, 0)), valid.to(torch.int32))
    return out > 0


class BlockMask:
    """Block-sparse structure of a mask (FlexAttention's ``BlockMask`` fields and names).

    ``kv_num_blocks`` int32 ``(B, H, num_q_blocks)``, ``kv_indices`` int32 ``(B, H,
    num_q_blocks, num_kv_blocks)``: per query block, the partially visible key blocks first;
    ``full_kv_num_blocks`` / ``full_kv_indices``: the fully visible ones (None: none are
    separated); ``q_num_blocks`` / ``q_indices`` / ``full_q_*``: the transposed lists (per key
    block, the query blocks), for the backward. ``B`` / ``H`` may be 1 (broadcast over the batch /
    heads). ``BLOCK_SIZE = (Q_BLOCK, KV_BLOCK)``; ``seq_lengths = (Q_LEN, KV_LEN)``;
    ``mask_mod`` is evaluated on partial blocks (None: they count as fully visible).
    """

    def __init__(
        self,
        kv_num_blocks: torch.Tensor,
        kv_indices: torch.Tensor,
        full_kv_num_blocks: torch.Tensor | None,
        full_kv_indices: torch.Tensor | None,
        q_num_blocks: torch.Tensor | None,
        q_indices: torch.Tensor | None,
        full_q_num_blocks: torch.Tensor | None,
        full_q_indices: torch.Tensor | None,
        BLOCK_SIZE: tuple[int, int],
        mask_mod: Callable | None,
        seq_lengths: tuple[int, int],
        exact: bool = False,
    ) -> None:
        self.kv_num_blocks, self.kv_indices = kv_num_blocks, kv_indices
        self.full_kv_num_blocks, self.full_kv_indices = full_kv_num_blocks, full_kv_indices
        self.q_num_blocks, self.q_indices = q_num_blocks, q_indices
        self.full_q_num_blocks, self.full_q_indices = full_q_num_blocks, full_q_indices
        self.BLOCK_SIZE = (int(BLOCK_SIZE[0]), int(BLOCK_SIZE[1]))
        self.mask_mod = mask_mod
        self.seq_lengths = (int(seq_lengths[0]), int(seq_lengths[1]))
        #: the block lists are ``mask_mod``'s, evaluated everywhere (:func:`create_block_mask`): a
        #: library mask with a built-in twin may then run as that option (:func:`builtin_window`)
        self.exact = bool(exact)

    @classmethod
    def from_kv_blocks(
        cls,
        kv_num_blocks: torch.Tensor,
        kv_indices: torch.Tensor,
        full_kv_num_blocks: torch.Tensor | None = None,
        full_kv_indices: torch.Tensor | None = None,
        BLOCK_SIZE: int | tuple[int, int] = 128,
        mask_mod: Callable | None = None,
        seq_lengths: tuple[int, int] | None = None,
    ) -> BlockMask:
        """A block mask from the key-block lists alone (the query-block lists are derived)."""
        bs = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else tuple(BLOCK_SIZE)
        nq, nk = kv_indices.shape[-2], kv_indices.shape[-1]
        if seq_lengths is None:
            seq_lengths = (nq * bs[0], nk * bs[1])
        partial = _as_state(kv_num_blocks, kv_indices, nk)
        full = None if full_kv_num_blocks is None else _as_state(full_kv_num_blocks, full_kv_indices, nk)
        return cls._from_states(partial, full, bs, mask_mod, seq_lengths)

    @classmethod
    def _from_states(cls, partial, full, bs, mask_mod, seq_lengths, exact: bool = False) -> BlockMask:
        kn, ki = _first(partial)
        qn, qi = _first(partial.transpose(-1, -2))
        if full is None:
            fkn = fki = fqn = fqi = None
        else:
            fkn, fki = _first(full)
            fqn, fqi = _first(full.transpose(-1, -2))
        return cls(kn, ki, fkn, fki, qn, qi, fqn, fqi, bs, mask_mod, seq_lengths, exact)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(B, H, Q_LEN, KV_LEN)``."""
        return (*self.kv_num_blocks.shape[:2], *self.seq_lengths)

    def block_states(self) -> torch.Tensor:
        """int8 ``(B, H, num_q_blocks, num_kv_blocks)``: 0 skipped, 1 partial (mask_mod
        evaluated), 2 full."""
        nk = -(-self.seq_lengths[1] // self.BLOCK_SIZE[1])
        nk = max(nk, self.kv_indices.shape[-1])
        st = _as_state(self.kv_num_blocks, self.kv_indices, nk).to(torch.int8)
        if self.full_kv_num_blocks is not None:
            st = torch.where(_as_state(self.full_kv_num_blocks, self.full_kv_indices, nk), 2, st).to(torch.int8)
        return st

    def to_dense(self) -> torch.Tensor:
        """int32 ``(B, H, num_q_blocks, num_kv_blocks)``: 1 where a block is visited (partial or full)."""
        return (self.block_states() > 0).to(torch.int32)

    def sparsity(self) -> float:
        """Percentage of blocks skipped."""
        d = self.to_dense()
        return 100.0 * (1.0 - d.float().mean().item()) if d.numel() else 0.0

    def numel(self) -> int:
        return self.to_dense().numel()

    def to(self, device: torch.device | str) -> BlockMask:
        """The same block mask with its tensors on ``device``."""
        mv = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in vars(self).items()}
        return BlockMask(**mv)

    def as_tuple(self) -> tuple:
        return (self.seq_lengths[0], self.seq_lengths[1], self.kv_num_blocks, self.kv_indices,
                self.full_kv_num_blocks, self.full_kv_indices, self.q_num_blocks, self.q_indices,
                self.full_q_num_blocks, self.full_q_indices, *self.BLOCK_SIZE, self.mask_mod)  # fmt: skip

    def __repr__(self) -> str:
        return f"BlockMask(shape={self.shape}, BLOCK_SIZE={self.BLOCK_SIZE}, sparsity={self.sparsity():.2f}%)"


def _index_grids(B: int, H: int, q0: int, q1: int, kv_len: int, device: torch.device):
    b = torch.arange(B, device=device, dtype=torch.int32).view(B, 1, 1, 1)
    h = torch.arange(H, device=device, dtype=torch.int32).view(1, H, 1, 1)
    qi = torch.arange(q0, q1, device=device, dtype=torch.int32).view(1, 1, -1, 1)
    ki = torch.arange(kv_len, device=device, dtype=torch.int32).view(1, 1, 1, -1)
    return b, h, qi, ki


def dense_mask(
    mask_mod: Callable, B: int | None, H: int | None, Q_LEN: int, KV_LEN: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """The mask as a dense bool ``(B or 1, H or 1, Q_LEN, KV_LEN)`` tensor (O(Q_LEN * KV_LEN):
    for tests and pictures)."""
    B, H = B or 1, H or 1
    grids = _index_grids(B, H, 0, Q_LEN, KV_LEN, torch.device(device))
    return _eval_mask(mask_mod, *grids, (B, H, Q_LEN, KV_LEN))


def _eval_mask(mask_mod, b, h, qi, ki, shape) -> torch.Tensor:
    m = mask_mod(b, h, qi, ki)
    m = torch.as_tensor(m, device=qi.device)
    if m.dtype != torch.bool:
        raise TypeError(f"mask_mod must return a bool tensor, got {m.dtype}")
    return m.expand(shape)


def _default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def create_block_mask(
    mask_mod: Callable,
    B: int | None,
    H: int | None,
    Q_LEN: int,
    KV_LEN: int,
    device: torch.device | str | None = None,
    BLOCK_SIZE: int | tuple[int, int] = 128,
    separate_full_blocks: bool = True,
) -> BlockMask:
    """Evaluate ``mask_mod(b, h, q_idx, kv_idx)`` everywhere and keep its block structure.

    Args:
        mask_mod: the mask (see the module docstring); True = visible.
        B, H: batch size and number of query heads, or None to broadcast over them (the mask
            must then not depend on ``b`` / ``h``).
        Q_LEN, KV_LEN: sequence lengths (a block mask serves calls with ``seqlen_q <= Q_LEN``
            and ``seqlen_k <= KV_LEN``; varlen calls: the longest sequence).
        device: where to evaluate and store it (default: CUDA if available, else CPU).
        BLOCK_SIZE: ``Q_BLOCK`` and ``KV_BLOCK`` (one int: both).
        separate_full_blocks: keep fully visible blocks in ``full_kv_*`` (no mask evaluation
            there); False: every visited block is partial.

    A block is full when every position of it inside ``Q_LEN x KV_LEN`` is visible. Memory is
    bounded by evaluating the mask a band of query rows at a time.
    """
    if not callable(mask_mod):
        raise TypeError(f"mask_mod must be callable, got {type(mask_mod).__name__}")
    bs = (BLOCK_SIZE, BLOCK_SIZE) if isinstance(BLOCK_SIZE, int) else tuple(BLOCK_SIZE)
    if len(bs) != 2 or not all(isinstance(x, int) and x > 0 for x in bs):
        raise ValueError(f"BLOCK_SIZE must be a positive int or a pair of them, got {BLOCK_SIZE!r}")
    for val, n in ((Q_LEN, "Q_LEN"), (KV_LEN, "KV_LEN")):
        if not isinstance(val, int) or val < 0:
            raise ValueError(f"{n} must be a non-negative int, got {val!r}")
    for val, n in ((B, "B"), (H, "H")):
        if val is not None and (not isinstance(val, int) or val < 1):
            raise ValueError(f"{n} must be a positive int or None (broadcast), got {val!r}")
    device = _default_device() if device is None else torch.device(device)
    Bm, Hm = B or 1, H or 1
    BQ, BK = bs
    nq, nk = -(-Q_LEN // BQ), -(-KV_LEN // BK)
    padk = nk * BK - KV_LEN
    partial = torch.zeros((Bm, Hm, nq, nk), dtype=torch.bool, device=device)
    full = torch.zeros_like(partial)
    band = max(1, _EVAL_ELEMS // max(1, Bm * Hm * BQ * max(KV_LEN, 1)))  # query blocks per band
    for qb0 in range(0, nq, band):
        qb1 = min(nq, qb0 + band)
        q0, q1 = qb0 * BQ, min(Q_LEN, qb1 * BQ)
        m = _eval_mask(mask_mod, *_index_grids(Bm, Hm, q0, q1, KV_LEN, device), (Bm, Hm, q1 - q0, KV_LEN))
        padq = (qb1 - qb0) * BQ - (q1 - q0)
        # out-of-range positions: False for "any visible", True for "all visible"
        anyv = torch.nn.functional.pad(m, (0, padk, 0, padq), value=False)
        allv = torch.nn.functional.pad(m, (0, padk, 0, padq), value=True)
        anyv = anyv.view(Bm, Hm, qb1 - qb0, BQ, nk, BK).any(5).any(3)
        allv = allv.view(Bm, Hm, qb1 - qb0, BQ, nk, BK).all(5).all(3)
        if separate_full_blocks:
            full[:, :, qb0:qb1] = allv
            partial[:, :, qb0:qb1] = anyv & ~allv
        else:
            partial[:, :, qb0:qb1] = anyv
    return BlockMask._from_states(partial, full if separate_full_blocks else None, bs, mask_mod, (Q_LEN, KV_LEN),
                                  exact=True)


def check_block_mask(block_mask: Any, batch: int, nheads: int, seqlen_q: int, seqlen_k: int, device) -> None:
    """Validate a block mask (flashtile's or torch's ``BlockMask``) against a call."""
    for name in ("kv_num_blocks", "kv_indices", "BLOCK_SIZE", "seq_lengths"):
        if not hasattr(block_mask, name):
            raise TypeError(
                f"block_mask must be a BlockMask (flashtile.create_block_mask), got {type(block_mask).__name__}"
            )
    Bm, Hm = block_mask.kv_num_blocks.shape[:2]
    QL, KL = block_mask.seq_lengths
    if Bm not in (1, batch):
        raise ValueError(f"block_mask's batch dim must be 1 or the batch size ({batch}), got {Bm}")
    if Hm not in (1, nheads):
        raise ValueError(f"block_mask's head dim must be 1 or the number of query heads ({nheads}), got {Hm}")
    if QL < seqlen_q or KL < seqlen_k:
        raise ValueError(
            f"block_mask was built for Q_LEN={QL}, KV_LEN={KL}; this call needs at least {seqlen_q}, {seqlen_k}"
        )
    bdev, dev = block_mask.kv_num_blocks.device, torch.device(device)
    if bdev.type != dev.type or None not in (bdev.index, dev.index) and bdev.index != dev.index:
        raise ValueError(f"block_mask must be on q's device ({device}), got {block_mask.kv_num_blocks.device}")


#: Whether calls whose mods are a built-in window run as that option (:func:`builtin_window`); off:
#: through the mod machinery like any other mask (benchmarks of the flex kernels, tests of it)
BUILTIN_ROUTE = True
#: library mask_mods (:mod:`flashtile.masks`, by their Triton twin's name) that are a built-in window:
#: name -> the window's left extent from the twin's scalar argument (-1: unbounded); right is 0
_BUILTIN_WINDOWS = {"causal": lambda a2: -1, "sliding_window": lambda a2: int(a2)}


def builtin_window(score_mod: Any, block_mask: Any, seqlen_q: int, seqlen_k: int, varlen: bool) -> int | None:
    """The left extent of the built-in causal window (``window_size=(left, 0)``, -1 unbounded) that
    computes the same thing as this call's mods, or None. Only for a block mask that
    :func:`create_block_mask` built from :func:`flashtile.masks.causal` or
    :func:`flashtile.masks.sliding_window` (``exact``), no score_mod, a dense call with ``seqlen_q ==
    seqlen_k`` (FlexAttention aligns the mask to the top-left corner, flash-attn's window to the
    bottom-right: the same then). Such calls run the built-in kernels, whose window skips blocks
    without block lists and masks without a mask_mod call (each backend picks its fastest kernel
    for the window: e.g. the hopper backend's short-window rule, ``hopper.short_window``)."""
    if not BUILTIN_ROUTE or score_mod is not None or varlen or seqlen_q != seqlen_k:
        return None
    if not getattr(block_mask, "exact", False):
        return None
    twin = getattr(block_mask.mask_mod, "_flashtile_triton", None)
    if twin is None or twin[0] not in _BUILTIN_WINDOWS:
        return None
    return _BUILTIN_WINDOWS[twin[0]](twin[1][2])


def check_mods(score_mod: Any, block_mask: Any, batch: int, nheads: int, seqlen_q: int, seqlen_k: int, device) -> None:
    """Validate the ``score_mod`` / ``block_mask`` arguments of a call (errors name them)."""
    if score_mod is not None and not callable(score_mod):
        raise TypeError(f"score_mod must be callable or None, got {type(score_mod).__name__}")
    if block_mask is not None:
        check_block_mask(block_mask, batch, nheads, seqlen_q, seqlen_k, device)


def mods_from_dense_mask(
    mask: torch.Tensor, batch: int, nheads: int, seqlen_q: int, seqlen_k: int
) -> tuple[BlockMask | None, Callable | None]:
    """A dense attention mask as ``(block_mask, score_mod)`` for ``flash_attn_func``.

    ``mask``: broadcastable to ``(batch, nheads, seqlen_q, seqlen_k)`` (at most 4 dims); bool
    (True = attend), or additive float: entries below half the dtype's minimum (or ``-inf``) hide
    the key, other non-zero entries become a bias added to the scaled scores (a ``score_mod``
    indexing the mask, which gets a gradient if the mask requires one). The block mask skips the
    blocks the mask hides entirely (None when it hides nothing)."""
    if not isinstance(mask, torch.Tensor) or mask.dim() > 4:
        got = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise ValueError(f"the mask must be a tensor broadcastable to (batch, heads, seqlen_q, seqlen_k), got {got}")
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"the mask must be bool or floating point, got {mask.dtype}")
    m = mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))
    ok = [m.shape[i] in (1, n) for i, n in enumerate((batch, nheads, seqlen_q, seqlen_k))]
    if not all(ok):
        raise ValueError(
            f"the mask must broadcast to (batch, heads, seqlen_q, seqlen_k) = ({batch}, {nheads}, {seqlen_q}, "
            f"{seqlen_k}), got {tuple(mask.shape)}"
        )
    mb, mh = m.shape[:2]
    m = m.expand(mb, mh, seqlen_q, seqlen_k)
    if m.dtype == torch.bool:
        vis, bias = m, None
    else:
        vis = m > torch.finfo(m.dtype).min / 2
        bias = m.float().masked_fill(~vis, 0.0)
        bias = bias if bool(bias.detach().any()) else None

    def _at(t, bi, hi, qi, ki):
        return t[bi if mb > 1 else 0, hi if mh > 1 else 0, qi, ki]

    def mask_mod(bi, hi, qi, ki):
        return _at(vis, bi, hi, qi, ki)

    score_mod = None
    if bias is not None:

        def score_mod(score, bi, hi, qi, ki):
            return score + _at(bias, bi, hi, qi, ki)

    block_mask = None
    if not bool(vis.all()):
        block_mask = create_block_mask(mask_mod, mb, mh, seqlen_q, seqlen_k, device=vis.device)
    return block_mask, score_mod


# ----------------------------------------------------------------------------------------------
# the tensors a score_mod captures (they get gradients)


def captured_tensors(fn: Any) -> tuple[torch.Tensor, ...]:
    """The tensors requiring grad that ``fn`` reaches through its closure, defaults, globals,
    ``functools.partial`` arguments, bound object (an ``nn.Module``'s parameters and buffers, an
    object's attributes) and containers of these, in a fixed order without duplicates."""
    found: dict[int, torch.Tensor] = {}
    _walk(fn, found, set(), 0)
    return tuple(found.values())


def _walk(obj: Any, found: dict[int, torch.Tensor], seen: set[int], depth: int) -> None:
    if depth > 6 or id(obj) in seen:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if obj.requires_grad:
            found.setdefault(id(obj), obj)
        return
    nxt = depth + 1
    if isinstance(obj, (list, tuple, set, frozenset)):
        for x in obj:
            _walk(x, found, seen, nxt)
    elif isinstance(obj, dict):
        for x in obj.values():
            _walk(x, found, seen, nxt)
    elif isinstance(obj, torch.nn.Module):
        for x in (*obj.parameters(), *obj.buffers()):
            _walk(x, found, seen, nxt)
    elif isinstance(obj, functools.partial):
        for x in (obj.func, obj.args, obj.keywords):
            _walk(x, found, seen, nxt)
    elif isinstance(obj, types.MethodType):
        _walk(obj.__self__, found, seen, nxt)
        _walk(obj.__func__, found, seen, nxt)
    elif isinstance(obj, types.FunctionType):
        for cell in obj.__closure__ or ():
            try:
                _walk(cell.cell_contents, found, seen, nxt)
            except ValueError:  # an empty cell
                pass
        _walk(obj.__defaults__, found, seen, nxt)
        _walk(obj.__kwdefaults__, found, seen, nxt)
        g = obj.__globals__
        for name in _code_names(obj.__code__):
            if name in g and not isinstance(g[name], types.ModuleType):
                _walk(g[name], found, seen, nxt)
    elif isinstance(obj, (types.ModuleType, type, str, bytes, int, float, bool, type(None))):
        return
    elif callable(obj) and hasattr(obj, "__dict__"):  # a callable object
        _walk(vars(obj), found, seen, nxt)


def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _code_names(c)
    return names


def check_captured(score_mod: Callable, captured: tuple[torch.Tensor, ...], device: torch.device) -> None:
    """Refuse a score_mod whose result depends on a tensor requiring grad that
    :func:`captured_tensors` did not find (its gradient would be lost): probed on one score.
    :mod:`flashtile.masks`' mods with a Triton twin are not probed (a few tiny kernels and an
    autograd graph a call): they close over exactly the tensors their twin names, which
    :func:`captured_tensors` finds."""
    if not torch.is_grad_enabled() or getattr(score_mod, "_flashtile_triton", None) is not None:
        return
    z = torch.zeros((1, 1, 1, 1), dtype=torch.int32, device=device)
    x = torch.zeros((1, 1, 1, 1), dtype=torch.float32, device=device, requires_grad=True)
    try:
        with torch.enable_grad():
            y = score_mod(x, z, z, z, z)
    except Exception:  # noqa: BLE001 - the probe is best effort; the real call reports errors
        return
    if not isinstance(y, torch.Tensor) or y.grad_fn is None:
        return
    known = {id(t) for t in captured} | {id(x)}
    stop = {t.grad_fn for t in captured if t.grad_fn is not None}
    todo, seen = [y.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen or node in stop:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None and id(var) not in known:
            raise ValueError(
                "score_mod uses a tensor that requires grad (shape "
                f"{tuple(var.shape)}) that flashtile cannot find, so its gradient would be lost: capture it "
                "in a closure, a default argument, a global, a functools.partial argument or an nn.Module"
            )
        todo.extend(n for n, _ in node.next_functions)


# ----------------------------------------------------------------------------------------------
# the autograd path of calls with mods


def has_mods(call: Any) -> bool:
    return call.score_mod is not None or call.block_mask is not None


def _grad_fields(call: Any) -> list[str]:
    return [n for n in _grad_names(type(call)) if getattr(call, n) is not None]


@functools.cache
def _grad_names(cls: type) -> tuple[str, ...]:
    """The differentiable fields of a call class (read once: ``dataclasses.fields`` per call cost
    ~10 us on a slow host)."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get("grad"))


class _ModAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, call, backend, n_fields, *tensors):  # noqa: D102
        from .backends import registry

        out, lse = registry()[backend].forward(q, k, v, call)
        out, lse = out.contiguous(), lse.contiguous()
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.call, ctx.backend, ctx.n_fields = call, backend, n_fields
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):  # noqa: D102
        from .backends import registry

        q, k, v, out, lse = ctx.saved_tensors
        call = ctx.call
        if dout.stride(-1) != 1:  # the backends take any other strides (a copy of a 16k-token dout: ~40 us)
            dout = dout.contiguous()
        dq, dk, dv, fg = registry()[ctx.backend].backward(dout, q, k, v, out, lse, call)
        extra = [fg.get(name) for name in _grad_fields(call)]
        extra += list(fg.get("score_mod", ()))
        return (dq, dk, dv, None, None, None, *extra)


def traceable(q: torch.Tensor, v: torch.Tensor, call: Any) -> bool:
    """Whether a mod call can run as traced torch ops under ``torch.compile`` (:func:`dense_mod_attention`):
    dense (no varlen), no dropout, ALiBi, sink or FP8, v with q's head dim."""
    return (not call.varlen and call.dropout_p == 0.0 and call.alibi_slopes is None
            and call.learnable_sink is None and q.dtype.itemsize > 1 and v.shape[-1] == q.shape[-1])  # fmt: skip


def dense_mod_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out, lse)`` of a mod call (internal layout ``(B, S, H, D)``) as plain torch ops on the
    materialised ``(B, H, Sq, Sk)`` float32 scores: what ``torch.compile`` traces for such calls
    (``fullgraph=True`` included), autograd reaching q, k, v and the score_mod's captured tensors
    through the traced ops. Same semantics as the engine: score (softcap first), score_mod, the
    causal / window mask (bottom-right), the block mask (skipped blocks hidden, full visible,
    partial through its mask_mod); rows that see no key get out 0 and lse ``-inf``. Memory is
    O(Sq * Sk) per (batch, head): the price of tracing the mods instead of running the tiled
    kernels (those run in eager mode)."""
    B, Sq, H, D = q.shape
    Sk, Hk = k.shape[1], k.shape[2]
    G = H // Hk
    dev = q.device
    qf = q.float().transpose(1, 2)
    kf = k.float().transpose(1, 2)
    vf = v.float().transpose(1, 2)
    if G > 1:
        kf, vf = kf.repeat_interleave(G, dim=1), vf.repeat_interleave(G, dim=1)
    u = torch.matmul(qf, kf.transpose(-1, -2))
    if call.softcap > 0:
        s = torch.tanh(u * (call.softmax_scale / call.softcap)) * call.softcap
    else:
        s = u * call.softmax_scale
    b = torch.arange(B, device=dev, dtype=torch.int32).view(B, 1, 1, 1)
    h = torch.arange(H, device=dev, dtype=torch.int32).view(1, H, 1, 1)
    qi = torch.arange(Sq, device=dev, dtype=torch.int32).view(1, 1, Sq, 1)
    ki = torch.arange(Sk, device=dev, dtype=torch.int32).view(1, 1, 1, Sk)
    if call.score_mod is not None:
        s = torch.as_tensor(call.score_mod(s, b, h, qi, ki), device=dev).to(torch.float32).expand(s.shape)
    vis = torch.ones((1, 1, Sq, Sk), dtype=torch.bool, device=dev)
    off = Sk - Sq
    if call.window_right >= 0:
        vis = vis & (ki <= qi + (off + call.window_right))
    if call.window_left >= 0:
        vis = vis & (ki >= qi + (off - call.window_left))
    bm = call.block_mask
    if bm is not None:
        st = bm.block_states() if hasattr(bm, "block_states") else None
        if st is None:
            from .backends.torch_tiled import _torch_block_states

            st = _torch_block_states(bm)
        st = st.to(dev)
        bq, bk = bm.BLOCK_SIZE
        bi = b.long() if st.shape[0] > 1 else torch.zeros_like(b, dtype=torch.long)
        hi = h.long() if st.shape[1] > 1 else torch.zeros_like(h, dtype=torch.long)
        tile = st[bi, hi, qi.long() // bq, ki.long() // bk]
        keep = tile == 2
        if bm.mask_mod is not None:
            keep = keep | ((tile == 1) & torch.as_tensor(bm.mask_mod(b, h, qi, ki), device=dev))
        else:
            keep = keep | (tile == 1)
        vis = vis & keep
    s = s.masked_fill(~vis, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    dead = lse == float("-inf")
    p = torch.exp(s - torch.where(dead, 0.0, lse).unsqueeze(-1))  # dead rows: exp(-inf) = 0
    out = torch.matmul(p, vf).transpose(1, 2).to(q.dtype)
    return out, lse


def mod_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: Any, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Differentiable ``(out, lse)`` of a call with a ``score_mod`` / ``block_mask`` (internal
    layout). Eager: an autograd function on the chosen backend whose inputs are q, k, v, the
    call's differentiable fields and the tensors the score_mod captures
    (:func:`captured_tensors`), which thus get gradients. Under ``torch.compile``:
    :func:`dense_mod_attention`, traced (``fullgraph=True`` works), for the calls
    :func:`traceable` accepts; the others run eagerly as a graph break."""
    if torch.compiler.is_compiling() and traceable(q, v, call):
        return dense_mod_attention(q, k, v, call)
    return _mod_attention_eager(q, k, v, call, backend)


@torch.compiler.disable(reason="flashtile: calls with score_mod / block_mask run eagerly (Python callables)")
def _mod_attention_eager(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: Any, backend: str
) -> tuple[torch.Tensor, torch.Tensor]:
    fields = [getattr(call, n) for n in _grad_fields(call)]
    captured = () if call.score_mod is None else captured_tensors(call.score_mod)
    if call.score_mod is not None:
        check_captured(call.score_mod, captured, q.device)
    return _ModAttention.apply(q, k, v, call, backend, len(fields), *fields, *captured)


# ----------------------------------------------------------------------------------------------
# the public function


def flex_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    score_mod: Callable | None = None,
    block_mask: BlockMask | None = None,
    scale: float | None = None,
    enable_gqa: bool = False,
    return_lse: bool = False,
    kernel_options: dict | None = None,
    *,
    dropout_p: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """FlexAttention's function (``torch.nn.attention.flex_attention.flex_attention``), eagerly,
    on every device, with forward and backward.

    Args:
        query: ``(B, Hq, L, E)``.
        key, value: ``(B, Hkv, S, E)`` (same head dim as query: a difference from FlexAttention,
            which allows another value head dim).
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score`` (module docstring).
        block_mask: a :class:`BlockMask` from :func:`create_block_mask` (or torch's).
        scale: softmax scale, default ``1 / sqrt(E)``.
        enable_gqa: allow ``Hq`` a multiple of ``Hkv`` (query head ``h`` uses key/value head
            ``h // (Hq // Hkv)``); without it ``Hq`` must equal ``Hkv``.
        return_lse: also return the float32 ``(B, Hq, L)`` log-sum-exp (natural log) of each
            row's modified, masked scores; ``-inf`` on rows that see no key (whose output is 0).
        kernel_options: accepted for compatibility and ignored.
        dropout_p: (flashtile's addition, keyword only) dropout on the probabilities, as in
            :func:`flashtile.flash_attn_func`.

    Returns:
        ``(B, Hq, L, E)`` output in query's dtype; with ``return_lse``, ``(output, lse)``.
    """
    from .interface import _lean, _run

    for x, n in ((query, "query"), (key, "key"), (value, "value")):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{n} must be a 4-D tensor (B, H, S, E), got {getattr(x, 'shape', type(x).__name__)}")
    hq, hk = query.shape[1], key.shape[1]
    if hq != hk and not enable_gqa:
        raise ValueError(f"query has {hq} heads and key/value {hk}: pass enable_gqa=True for grouped-query attention")
    if scale is not None and not isinstance(scale, (int, float)):
        raise ValueError(f"scale must be a float or None, got {scale!r}")
    q, k, v = (x.transpose(1, 2) for x in (query, key, value))
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    sm_scale = None if scale is None else float(scale)
    names = ("query", "key", "value")
    left = None
    if score_mod is None and block_mask is not None and not dropout_p:
        left = builtin_window(None, block_mask, q.shape[1], k.shape[1], False)
    if left is not None:
        # a library causal / sliding-window mask: the built-in window through flash_attn_func's lean
        # path (its signature memo and launch plans), the block mask checked here instead of by _run
        check_block_mask(block_mask, q.shape[0], q.shape[2], q.shape[1], k.shape[1], q.device)
        opts = (0.0, sm_scale, True, (left, 0), 0.0, False)
        memo, res = _lean(q, k, v, opts, True)
        if res is None:
            res = _run(q, k, v, alibi_slopes=None, softmax_scale=sm_scale, causal=True, window_size=(left, 0),
                       return_attn_probs=True, names=names, probs=False, memo=memo)  # fmt: skip
        out, lse, _ = res
    else:
        out, lse, _ = _run(
            q, k, v, alibi_slopes=None, return_attn_probs=True, score_mod=score_mod, block_mask=block_mask,
            softmax_scale=sm_scale, dropout_p=dropout_p, names=names, probs=False,
        )  # fmt: skip
    out = out.transpose(1, 2)
    return (out, lse) if return_lse else out
