"""One place for flash-attn's semantics: validated, normalised options and shape checks.

Every public entry point turns its arguments into an :class:`AttnCall` (the options and
optional tensors of the call: the one carrier down to the kernels) and a :class:`Problem` (the
shapes, dtype and device) here, so backends never re-interpret the options and every bad input
is rejected with an error that names the argument.

Semantics (flash-attn 2.8):

* ``softmax_scale`` defaults to ``1 / sqrt(headdim)``.
* ``softcap > 0``: ``s = softcap * tanh(softmax_scale * q.k / softcap)``.
* ALiBi: ``s += -slope * |i + seqlen_k - seqlen_q - j|``, added after softcap.
* ``window_size = (left, right)``, ``-1`` = unbounded: query ``i`` sees keys ``j`` with
  ``i + sk - sq - left <= j <= i + sk - sq + right``. ``causal=True`` sets ``right = 0``
  (the mask is aligned to the bottom-right corner when ``sq != sk``).
* GQA/MQA: query head ``i`` uses key/value head ``i // (nheads // nheads_k)``.
* Rows that see no key output 0 and have ``lse = -inf``.
* ``v`` may have its own head dim (DeepSeek's 192 for q/k, 128 for v): out and dv have v's head
  dim; ``softmax_scale`` still defaults to ``1 / sqrt(headdim of q)``.
* ``learnable_sink`` (gpt-oss, flash-attn 4's ``learnable_sink``): float32 ``(nheads,)``, one
  logit per query head added to every row's softmax denominator as a key without value:
  ``p_ij = exp(s_ij - lse_i)`` with ``lse_i = log(sum_j exp(s_ij) + exp(sink_h))`` (s after
  scale, softcap, ALiBi and mask; the sink is neither scaled nor capped). The returned lse
  includes the sink. Rows that see no key output 0 and have ``lse = sink_h`` (the sink is then
  the only term of the denominator: the consistent value, and ``exp(sink - lse) = 1`` keeps the
  sink's gradient formula valid there). With dropout, the sink is in the denominator before
  dropout, which applies to the keys' probabilities only. It may require grad:
  ``dsink_h = -sum_{b,i} exp(sink_h - lse_i) * rowsum(dout_i * out_i)``.
"""

from __future__ import annotations

import functools
import math
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
#: FP8 inputs (forward only, flash-attn 3's API: descales, bf16 output; see :mod:`flashtile.fp8`).
FP8_DTYPES = (torch.float8_e4m3fn,)
#: Largest head dimension the public API accepts. The torch backend serves all of it; each
#: backend states its own limit through ``supports()``.
MAX_HEADDIM = 512


_REAL = (int, float, torch.SymInt, torch.SymFloat)


@dataclass(frozen=True)
class AttnCall:
    """Every option and optional tensor of one attention call: the one carrier from validation
    through dispatch, the custom ops and the backends to the kernels.

    Built by :func:`make_call` (validated, normalised); backends read it and never re-interpret
    the public arguments. ``window_left`` / ``window_right`` use ``-1`` for "unbounded";
    ``causal`` is already folded into ``window_right = 0``. Varlen calls carry int32
    ``cu_seqlens_q`` / ``cu_seqlens_k`` ``(nseq + 1,)`` and ``max_seqlen_*``; ``alibi_slopes`` is
    None or contiguous fp32 ``(batch_or_nseq, nheads)``; ``seed`` is the dropout seed, an int64
    ``()`` tensor (None when ``dropout_p == 0``); ``learnable_sink`` is None or fp32 ``(nheads,)``;
    ``q_descale`` / ``k_descale`` / ``v_descale`` (FP8 calls only, see :mod:`flashtile.fp8`) are
    None (1) or fp32 ``(batch_or_nseq, nheads_k)``, possibly expanded views (zero strides).

    A tensor field declared with ``field(default=None, metadata={"grad": True})`` is
    differentiable: the custom op returns its gradient (see :mod:`flashtile.ops`) and backends
    that implement it return that gradient from ``backward`` (see :mod:`flashtile.backends.base`).

    Adding an option: add a field here (a scalar ``float`` / ``int`` / ``bool``, or an optional
    ``torch.Tensor | None``), set it in :func:`make_call`, name the feature in :meth:`features`
    if a backend may lack it, and implement it in the kernels. The custom-op schema
    (:mod:`flashtile.ops`) is derived from these fields, so nothing in between changes.
    """

    softmax_scale: float
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    dropout_p: float = 0.0
    deterministic: bool = False
    cu_seqlens_q: torch.Tensor | None = None
    cu_seqlens_k: torch.Tensor | None = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    alibi_slopes: torch.Tensor | None = None
    seed: torch.Tensor | None = None
    learnable_sink: torch.Tensor | None = field(default=None, metadata={"grad": True})
    q_descale: torch.Tensor | None = None
    k_descale: torch.Tensor | None = None
    v_descale: torch.Tensor | None = None
    #: Python objects (see :mod:`flashtile.flex`): a ``score_mod`` callable and a ``BlockMask``.
    #: ``metadata={"python": True}``: outside the custom-op schema; calls that set them take
    #: :func:`flashtile.flex.mod_attention` instead of the op.
    score_mod: Callable | None = field(default=None, metadata={"python": True})
    block_mask: Any = field(default=None, metadata={"python": True})

    @property
    def is_causal(self) -> bool:
        return self.window_right == 0

    @property
    def has_window(self) -> bool:
        return self.window_left >= 0 or self.window_right >= 0

    @property
    def varlen(self) -> bool:
        return self.cu_seqlens_q is not None

    @property
    def seed_int(self) -> int:
        """The dropout seed as a Python int (0 without dropout): one host read."""
        return 0 if self.seed is None else int(self.seed.item())

    def features(self) -> frozenset[str]:
        """The optional features this call uses, by the names backends declare in
        :class:`flashtile.backends.base.Capabilities` (``FEATURES``)."""
        used = []
        if self.is_causal:
            used.append("causal")
        if self.has_window and not (self.is_causal and self.window_left < 0):
            used.append("window")
        if self.softcap > 0:
            used.append("softcap")
        if self.alibi_slopes is not None:
            used.append("alibi")
        if self.dropout_p > 0:
            used.append("dropout")
        if self.varlen:
            used.append("varlen")
        if self.learnable_sink is not None:
            used.append("sink")
        if self.score_mod is not None:
            used.append("score_mod")
        if self.block_mask is not None:
            used.append("block_mask")
        return frozenset(used)


#: Every feature name :meth:`AttnCall.features` can report, except :data:`MOD_FEATURES`.
FEATURES = frozenset({"causal", "window", "softcap", "alibi", "dropout", "varlen", "sink"})
#: Python mods (:mod:`flashtile.flex`): not in ``Capabilities``' default, so that a backend
#: serves them only when it declares them (the kernels would otherwise ignore them silently).
MOD_FEATURES = frozenset({"score_mod", "block_mask"})


@dataclass(frozen=True)
class Problem:
    """Shapes, dtype and device of one call, for backend selection (the options are in the
    :class:`AttnCall`). For varlen calls ``batch`` is the number of sequences and
    ``seqlen_q`` / ``seqlen_k`` are the ``max_seqlen`` values. ``headdim`` is q's and k's,
    ``headdim_v`` v's (and the output's); 0 (the default) means the same as ``headdim``."""

    batch: int
    seqlen_q: int
    seqlen_k: int
    nheads: int
    nheads_k: int
    headdim: int
    dtype: torch.dtype
    device: torch.device
    headdim_v: int = 0

    def __post_init__(self) -> None:
        if not self.headdim_v:
            object.__setattr__(self, "headdim_v", self.headdim)

    @classmethod
    def of(cls, q: torch.Tensor, k: torch.Tensor, call: AttnCall, v: torch.Tensor | None = None) -> Problem:
        """The problem of a call on the internal layout (dense ``(B, S, H, D)``, varlen ``(1, total, H, D)``);
        ``v`` gives the v head dim (None: q's)."""
        if call.varlen:
            batch, sq, sk = call.cu_seqlens_q.shape[0] - 1, call.max_seqlen_q, call.max_seqlen_k
        else:
            batch, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        return cls(batch=batch, seqlen_q=sq, seqlen_k=sk, nheads=q.shape[-2], nheads_k=k.shape[-2],
                   headdim=q.shape[-1], dtype=q.dtype, device=q.device,
                   headdim_v=q.shape[-1] if v is None else v.shape[-1])  # fmt: skip


@dataclass(frozen=True)
class KVCache:
    """The cache side of one ``flash_attn_with_kvcache`` call, validated (see :mod:`flashtile.kvcache`).

    ``k_cache`` / ``v_cache``: dense ``(batch_cache, seqlen_cache, Hk, D)`` or paged
    ``(num_blocks, page, Hk, D)`` with ``block_table`` int32 ``(batch, max_blocks)`` (``v_cache``
    and ``v_new`` may have their own head dim ``Dv``);
    ``k_new`` / ``v_new``: None or ``(batch, seqlen_new, Hk, D)``, appended at positions
    ``seqlens[b] ..`` before attending; ``seqlens``: int32 ``(batch,)`` or one int (tokens already
    cached); ``batch_idx`` / ``leftpad``: None or int32 ``(batch,)``; ``rotary``: None or
    ``(cos, sin, interleaved)``; ``capacity``: positions a row can hold; ``num_splits``: key
    pieces per row (0 = the backend chooses).

    Rotary positions (flash-attn's): new key ``t`` of row ``b`` at ``seqlens[b] + t``, its index in
    the cache (leftpad included); query ``t`` there too when :meth:`rotary_along`, else every query
    at ``seqlens[b]``.
    """

    k_cache: torch.Tensor
    v_cache: torch.Tensor
    k_new: torch.Tensor | None
    v_new: torch.Tensor | None
    seqlens: torch.Tensor | int
    batch_idx: torch.Tensor | None
    leftpad: torch.Tensor | None
    block_table: torch.Tensor | None
    rotary: tuple[torch.Tensor, torch.Tensor, bool] | None
    capacity: int
    num_splits: int = 0

    @property
    def paged(self) -> bool:
        return self.block_table is not None

    @property
    def seqlen_new(self) -> int:
        return 0 if self.k_new is None else self.k_new.shape[1]

    def rotary_along(self, call: AttnCall) -> bool:
        """Whether query ``t`` is rotated at ``seqlens + t`` (else every query at ``seqlens``): when
        the attention is causal or local, as flash-attn decides it, where a window side of at least
        the cache capacity counts as unbounded."""
        return 0 <= call.window_left < self.capacity or 0 <= call.window_right < self.capacity

    @property
    def has_index_tensors(self) -> bool:
        """Whether any index comes from a tensor (so it can only be checked on the device)."""
        return (isinstance(self.seqlens, torch.Tensor) or self.batch_idx is not None or self.leftpad is not None
                or self.paged)  # fmt: skip


def _check_tensor(x: object, name: str) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    return x


def _shape(x: torch.Tensor) -> str:
    return "(" + ", ".join(str(s) for s in x.shape) + ")"


def _qkv_ok(q: object, k: object, v: object, rank: int, same_batch: bool) -> bool:
    """True only if :func:`check_qkv` passes (one pass over the common case, no messages built);
    False sends the call through the detailed checks, which raise the error."""
    T = torch.Tensor
    if not (isinstance(q, T) and isinstance(k, T) and isinstance(v, T)):
        return False
    qs, ks, vs = q.shape, k.shape, v.shape
    if len(qs) != rank or len(ks) != rank or ks != vs:
        return False
    dt = q.dtype
    if dt not in SUPPORTED_DTYPES or k.dtype != dt or v.dtype != dt:
        return False
    dev = q.device
    if k.device != dev or v.device != dev or (same_batch and qs[0] != ks[0]):
        return False
    h, hk, d = qs[-2], ks[-2], qs[-1]
    if hk == 0 or h == 0 or h % hk or ks[-1] != d or not 1 <= d <= MAX_HEADDIM:
        return False
    return q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1


def check_qkv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    varlen: bool,
    names: tuple[str, str, str] = ("q", "k", "v"),
    same_batch: bool = True,
) -> None:
    """Validate rank, dtype, device, head counts, head dim and contiguity of q, k, v.

    Dense layout: q ``(batch, seqlen_q, nheads, headdim)``, k/v ``(batch, seqlen_k, nheads_k, headdim)``.
    Varlen layout: q ``(total_q, nheads, headdim)``, k/v ``(total_k, nheads_k, headdim)``.
    k has q's head dim; v may have its own (``headdim_v``, 1 to ``MAX_HEADDIM``).
    ``same_batch=False``: k/v's first dim is not q's batch (KV caches: rows or pages).
    """
    if _qkv_ok(q, k, v, 3 if varlen else 4, same_batch and not varlen):
        return
    qn, kn, vn = names
    for x, n in ((q, qn), (k, kn), (v, vn)):
        _check_tensor(x, n)
    rank = 3 if varlen else 4
    layout_q = "(total_q, nheads, headdim)" if varlen else "(batch, seqlen_q, nheads, headdim)"
    layout_k = "(total_k, nheads_k, headdim)" if varlen else "(batch, seqlen_k, nheads_k, headdim)"
    for x, n, lay in ((q, qn, layout_q), (k, kn, layout_k), (v, vn, layout_k)):
        if x.dim() != rank:
            raise ValueError(f"{n} must have {rank} dimensions {lay}, got shape {_shape(x)}")
    if q.dtype not in SUPPORTED_DTYPES + FP8_DTYPES:
        raise TypeError(f"{qn} must be float16, bfloat16, float32 or float8_e4m3fn, got {q.dtype}")
    for x, n in ((k, kn), (v, vn)):
        if x.dtype != q.dtype:
            raise TypeError(f"{n} must have the same dtype as {qn} ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{n} must be on the same device as {qn} ({q.device}), got {x.device}")
    if not varlen and same_batch and not (q.shape[0] == k.shape[0] == v.shape[0]):
        raise ValueError(
            f"{qn}, {kn}, {vn} must have the same batch size, got {q.shape[0]}, {k.shape[0]}, {v.shape[0]}"
        )
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(
            f"{kn} and {vn} must have the same shape except the head dim, got {_shape(k)} and {_shape(v)}"
        )
    h, hk = q.shape[-2], k.shape[-2]
    if h == 0 or hk == 0 or h % hk != 0:
        raise ValueError(
            f"the number of query heads ({h}) must be a positive multiple of the number of "
            f"key/value heads ({hk}) in {kn}/{vn}"
        )
    d = q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"{kn} must have the same head dim as {qn} ({d}), got {k.shape[-1]}")
    if not 1 <= d <= MAX_HEADDIM:
        raise ValueError(f"head dim of {qn} must be between 1 and {MAX_HEADDIM}, got {d}")
    if not 1 <= v.shape[-1] <= MAX_HEADDIM:
        raise ValueError(f"head dim of {vn} must be between 1 and {MAX_HEADDIM}, got {v.shape[-1]}")
    for x, n in ((q, qn), (k, kn), (v, vn)):
        if x.stride(-1) != 1 and x.numel() > 0:
            raise ValueError(
                f"{n} must be contiguous in its last dimension (stride 1), got strides {tuple(x.stride())}"
            )


def as_int(x: object, name: str, expected: str = "an int") -> int:
    """``x`` as a Python int, for an integer argument ``name``: ints (SymInts under
    ``torch.compile``, as ``int()`` would) and integer scalars with ``__index__`` (numpy integers,
    0-d integer tensors). Bools, floats (never truncated) and anything else raise ``ValueError``
    saying that ``name`` must be ``expected``."""
    if isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool):
        return int(x)
    if not isinstance(x, (bool, float)):
        try:
            return operator.index(x)
        except TypeError:
            pass
    raise ValueError(f"{name} must be {expected}, got {x!r} ({type(x).__name__})")


def normalize_window(window_size: Sequence[int], causal: bool) -> tuple[int, int]:
    """Check ``window_size`` (two ints) and fold ``causal`` into it: returns ``(left, right)``."""
    try:
        left, right = (as_int(w, "window_size") for w in window_size)
    except (TypeError, ValueError):
        raise ValueError(f"window_size must be a pair of ints (left, right), got {window_size!r}") from None
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 means unbounded), got {(left, right)}")
    if causal:
        right = 0
    return left, right


_CALLS: dict[tuple, AttnCall] = {}
#: the types of a call's options -> whether one is a tensor (such calls are not cached)
_HAS_TENSOR: dict[tuple, bool] = {}


def _cached(make: Callable[..., AttnCall]) -> Callable[..., AttnCall]:
    """Cache :func:`make_call` for calls without tensors, by every option's name, value and type
    (and the types of a tuple's entries, so that ``(-1.0, -1)`` is not ``(-1, -1)``): the
    result is a frozen value, the same for the same options (raising calls are not cached; the
    cache is bypassed while torch.compile traces)."""

    @functools.wraps(make)
    def cached(**options) -> AttnCall:
        if torch.compiler.is_compiling():
            return make(**options)
        items = tuple(options.items())
        types = tuple(map(type, options.values()))
        tensor = _HAS_TENSOR.get(types)
        if tensor is None:
            tensor = any(issubclass(t, torch.Tensor) for t in types)
            if len(_HAS_TENSOR) < 256:
                _HAS_TENSOR[types] = tensor
        if tensor:
            return make(**options)
        key = (items, types, tuple([tuple(map(type, x)) for x in options.values() if type(x) is tuple]) if tuple in
               types else ())  # fmt: skip
        try:
            found = _CALLS.get(key)
        except TypeError:  # an unhashable option value (e.g. a list): not cached
            return make(**options)
        if found is None:
            found = make(**options)
            if len(_CALLS) >= 256:
                _CALLS.clear()
            _CALLS[key] = found
        return found

    return cached


@_cached
def make_call(
    *,
    headdim: int,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: Sequence[int] = (-1, -1),
    softcap: float = 0.0,
    deterministic: bool = False,
    **tensors,
) -> AttnCall:
    """Validate the scalar options and return the normalised :class:`AttnCall`.

    ``tensors``: the call's other fields (``cu_seqlens_q``, ``alibi_slopes``, ``seed``, ...),
    taken as given: validate them first (:func:`check_alibi`, :func:`check_varlen_meta`)."""
    # Plain comparisons only (no math.isnan / isfinite): under torch.compile these may be
    # symbolic floats, and comparisons on them become guards instead of graph breaks.
    if not isinstance(dropout_p, _REAL) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    if not isinstance(softcap, _REAL) or not softcap >= 0.0:  # also rejects NaN
        raise ValueError(f"softcap must be >= 0 (0 disables it), got {softcap!r}")
    if softmax_scale is None:
        softmax_scale = 1.0 / math.sqrt(headdim)
    elif not isinstance(softmax_scale, _REAL) or not -math.inf < softmax_scale < math.inf:
        raise ValueError(f"softmax_scale must be a finite float or None, got {softmax_scale!r}")
    left, right = normalize_window(window_size, causal)
    return AttnCall(
        softmax_scale=float(softmax_scale),
        window_left=left,
        window_right=right,
        softcap=float(softcap),
        dropout_p=float(dropout_p),
        deterministic=bool(deterministic),
        **tensors,
    )


def check_alibi(
    alibi_slopes: torch.Tensor | None, batch: int, nheads: int, device: torch.device
) -> torch.Tensor | None:
    """Validate ALiBi slopes (fp32, ``(nheads,)`` or ``(batch, nheads)``) and return them as a
    contiguous fp32 ``(batch, nheads)`` tensor."""
    if alibi_slopes is None:
        return None
    _check_tensor(alibi_slopes, "alibi_slopes")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes must be on the same device as q ({device}), got {alibi_slopes.device}")
    if alibi_slopes.shape == (nheads,):
        alibi_slopes = alibi_slopes.unsqueeze(0).expand(batch, nheads)
    elif alibi_slopes.shape != (batch, nheads):
        raise ValueError(
            f"alibi_slopes must have shape (nheads,) = ({nheads},) or (batch, nheads) = ({batch}, {nheads}), "
            f"got {_shape(alibi_slopes)}"
        )
    return alibi_slopes.contiguous()


def check_sink(sink: torch.Tensor | None, nheads: int, device: torch.device) -> torch.Tensor | None:
    """Validate the per-head sink logits (float32 ``(nheads,)`` on q's device); returned as given
    (so that its gradient reaches the caller's tensor)."""
    if sink is None:
        return None
    _check_tensor(sink, "learnable_sink")
    if sink.dtype != torch.float32:
        raise TypeError(f"learnable_sink must be float32, got {sink.dtype}")
    if sink.device != device:
        raise ValueError(f"learnable_sink must be on the same device as q ({device}), got {sink.device}")
    if sink.shape != (nheads,):
        raise ValueError(f"learnable_sink must have shape (nheads,) = ({nheads},), got {_shape(sink)}")
    return sink


def check_descales(
    dtype: torch.dtype, batch: int, nheads_k: int, device: torch.device, **descales: torch.Tensor | None
) -> dict[str, torch.Tensor | None]:
    """Validate flash-attn 3's ``q_descale`` / ``k_descale`` / ``v_descale`` (keywords of
    ``descales``): float32 on q's device, broadcastable to ``(batch, nheads_k)`` (per-tensor
    scales as ``(1, 1)``), only with float8_e4m3fn inputs. Returns them expanded to
    ``(batch, nheads_k)`` (views, no copy), None left as None (1)."""
    given = {n: d for n, d in descales.items() if d is not None}
    if given and dtype not in FP8_DTYPES:
        raise ValueError(f"{', '.join(given)} apply to float8_e4m3fn inputs only, got {dtype} inputs")
    out: dict[str, torch.Tensor | None] = dict.fromkeys(descales)
    for n, d in given.items():
        _check_tensor(d, n)
        if d.dtype != torch.float32:
            raise TypeError(f"{n} must be float32, got {d.dtype}")
        if d.device != device:
            raise ValueError(f"{n} must be on the same device as q ({device}), got {d.device}")
        try:
            ok = d.dim() <= 2 and torch.broadcast_shapes(d.shape, (batch, nheads_k)) == (batch, nheads_k)
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"{n} must have shape (batch, nheads_k) = ({batch}, {nheads_k}) (or broadcast to "
                             f"it, e.g. (1, 1) for one scale), got {_shape(d)}")  # fmt: skip
        out[n] = d.expand(batch, nheads_k)
    return out


def check_cu_seqlens_meta(cu: torch.Tensor, name: str, device: torch.device) -> int:
    """Metadata checks for ``cu_seqlens`` (no device sync): returns the number of sequences."""
    _check_tensor(cu, name)
    if cu.dtype != torch.int32:
        raise TypeError(f"{name} must be int32, got {cu.dtype}")
    if cu.dim() != 1 or cu.shape[0] < 2:
        raise ValueError(f"{name} must be a 1-D tensor of shape (batch + 1,) with batch >= 1, got {_shape(cu)}")
    if cu.device != device:
        raise ValueError(f"{name} must be on the same device as q ({device}), got {cu.device}")
    return cu.shape[0] - 1


def check_cu_seqlens_values(
    cu: torch.Tensor, name: str, total: int, max_seqlen: int, max_name: str, vals: list[int] | None = None
) -> None:
    """Value checks for ``cu_seqlens`` (reads it on the host, unless its values ``vals`` are
    given): starts at 0, non-decreasing, ends at ``total``, no sequence longer than ``max_seqlen``."""
    if vals is None:
        vals = cu.tolist()
    if vals[0] != 0:
        raise ValueError(f"{name} must start at 0, got {vals[0]}")
    lens = [b - a for a, b in zip(vals[:-1], vals[1:], strict=True)]
    if any(n < 0 for n in lens):
        raise ValueError(f"{name} must be non-decreasing (cumulative sequence lengths), got {vals}")
    if vals[-1] != total:
        raise ValueError(
            f"{name}[-1] must equal the total number of tokens in the packed tensor ({total}), got {vals[-1]}"
        )
    if lens and max(lens) > max_seqlen:
        raise ValueError(f"{max_name} ({max_seqlen}) is smaller than the longest sequence in {name} ({max(lens)})")


def check_varlen_meta(
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    device: torch.device,
) -> int:
    """Metadata checks of a varlen call (no device sync): both ``cu_seqlens`` int32 1-D of the
    same length on q's device, ``max_seqlen_*`` non-negative ints. Returns the number of sequences."""
    nseq = check_cu_seqlens_meta(cu_seqlens_q, "cu_seqlens_q", device)
    if check_cu_seqlens_meta(cu_seqlens_k, "cu_seqlens_k", device) != nseq:
        raise ValueError(
            f"cu_seqlens_k must have the same length as cu_seqlens_q ({nseq + 1}), got {cu_seqlens_k.shape[0]}"
        )
    for val, n in ((max_seqlen_q, "max_seqlen_q"), (max_seqlen_k, "max_seqlen_k")):
        if not isinstance(val, int) or val < 0:
            raise ValueError(f"{n} must be a non-negative int, got {val!r}")
    return nseq


_PACKED_LAYOUTS = {
    (3, 2): "(batch, seqlen, 3, nheads, headdim)",
    (3, 1): "(total, 3, nheads, headdim)",
    (2, 2): "(batch, seqlen_k, 2, nheads_k, headdim)",
    (2, 1): "(total_k, 2, nheads_k, headdim)",
}


def capturing(t: torch.Tensor) -> bool:
    """Whether ``t``'s stream is being captured into a CUDA graph (no host read-back allowed)."""
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def unbind_packed(x: object, name: str, n: int, dim: int) -> tuple[torch.Tensor, ...]:
    """Split a packed ``qkv`` (n=3) / ``kv`` (n=2) along ``dim`` (2 dense, 1 varlen) into views,
    with an error naming ``name`` and the expected layout on a bad shape."""
    _check_tensor(x, name)
    if x.dim() != dim + 3 or x.shape[dim] != n:
        raise ValueError(f"{name} must have shape {_PACKED_LAYOUTS[(n, dim)]}, got {tuple(x.shape)}")
    return x.unbind(dim)


def check_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    varlen: bool,
    names: tuple[str, str, str],
    **options,
) -> AttnCall:
    """The checks every attention entry point starts with: tensors (:func:`check_qkv`), then
    ``options`` (:func:`make_call`)."""
    check_qkv(q, k, v, varlen=varlen, names=names)
    return make_call(headdim=q.shape[-1], **options)


def check_call_values(q: torch.Tensor, k: torch.Tensor, call: AttnCall) -> None:
    """The checks that read tensors back to the host (varlen ``cu_seqlens`` values), run inside
    the custom op so that a compiled graph has no sync; skipped during CUDA graph capture."""
    if call.cu_seqlens_q is None or capturing(q):
        return
    cq, ck = call.cu_seqlens_q, call.cu_seqlens_k
    both = (cq.tolist(),) * 2 if ck is cq else torch.cat((cq, ck)).tolist()  # one host read
    if ck is not cq:
        both = both[: cq.shape[0]], both[cq.shape[0] :]
    check_cu_seqlens_values(cq, "cu_seqlens_q", q.shape[1], call.max_seqlen_q, "max_seqlen_q", both[0])
    check_cu_seqlens_values(ck, "cu_seqlens_k", k.shape[1], call.max_seqlen_k, "max_seqlen_k", both[1])
