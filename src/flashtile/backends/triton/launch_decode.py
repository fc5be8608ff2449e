"""Host side of the split-KV decode kernels (:mod:`.decode`): tile configs, the number of key
pieces, the error flag, the ``append_kv`` / ``decode`` launchers, and the two ways the backend
uses them: :func:`kvcache` (``flash_attn_with_kvcache``) and :func:`dense` (decode-shaped
``flash_attn_func`` calls)."""

from __future__ import annotations

import functools
import threading

import torch

from ...paged import check_cache_indices
from ...spec import AttnCall, KVCache, capturing
from .. import _device
from .. import base as _base
from .._ints import cdiv, next_power_of_2
from . import launch as _launch
from .decode import _append_kernel, _decode_kernel, _merge_kernel
from .fastlaunch import fast, int_classes
from .launch import _PLANS, PENDING, _keep_plan, _plannable, _sink_args, block_d, device_guard, score_scales, upcast

_APPEND, _DECODE, _MERGE = fast(_append_kernel), fast(_decode_kernel), fast(_merge_kernel)


def _interpret() -> bool:
    return type(_decode_kernel).__name__ == "InterpretedFunction"


def choose_splits(programs: int, max_keys: int, block_n: int, slots: int, waves: int, min_keys: int = 256) -> int:
    """Key pieces per row. None when ``programs`` (batch x KV heads x row blocks) already fill
    the ``slots`` (SMs x programs resident per SM). Else the fewest pieces whose programs make
    at least ``waves`` waves with the last one >= 95% full, or as many as allowed if none do;
    each piece at least ``min_keys`` keys, at most 64 pieces. H200 sweep (benchmarks/NOTES.md,
    "Decode"): reading whole key blocks is fastest with one well-filled wave (``waves=0``) and
    pieces down to 128 keys, gathering a block id per key with about eight (``waves=8``) and
    pieces of at least 256. A function of the number of key blocks (memoised on it: calls whose
    keys grow by one share it for a whole block)."""
    if programs >= slots:
        return 1
    max_keys = max(max_keys, 1)
    return _split_count(programs, cdiv(max_keys, block_n), max(1, min(64, cdiv(max_keys, min_keys))), slots, waves)


@functools.lru_cache(maxsize=4096)
def _split_count(programs: int, blocks: int, top: int, slots: int, waves: int) -> int:
    """:func:`choose_splits` over ``blocks`` key blocks, trying 1 .. ``top`` pieces: ``want`` pieces
    of ``cdiv(blocks, want)`` blocks each make ``cdiv(blocks, that)`` pieces (the same counts as in
    keys: ``cdiv(cdiv(m, a), b) == cdiv(m, a * b)``)."""
    splits = 1
    for want in range(1, top + 1):
        splits = cdiv(blocks, cdiv(blocks, want))
        total = programs * splits
        if total >= waves * slots and total / (slots * cdiv(total, slots)) >= 0.95:
            break
    return splits


_ERR: dict[tuple[int, int], torch.Tensor] = {}
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def error_flag(device: torch.device) -> torch.Tensor:
    """The int32 ``(1,)`` flag the kernels OR error bits into. On CUDA one per (device, stream),
    reused so that a call needs no memset: whoever reads it non-zero resets it (bits may be
    stale, from CUDA graph replays that read nothing back). One made while a graph is being
    captured belongs to that graph (zeroed on each replay) and is not kept."""
    if device.type != "cuda":
        return torch.zeros(1, dtype=torch.int32, device=device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    # the raw stream handle (an int, as Triton's launcher reads it): no Stream object per call
    stream = _raw_stream(index) if _raw_stream is not None else torch.cuda.current_stream(index).cuda_stream
    key = (index, stream)
    flag = _ERR.get(key)
    if flag is None:
        flag = torch.zeros(1, dtype=torch.int32, device=device)
        if not capturing(flag):
            _ERR[key] = flag
    return flag


_capturing_now = getattr(torch._C, "_cuda_isCurrentStreamCapturing", None)
_thread = threading.get_ident
# Per-call scratch kept between calls (issue 16): the int32 length vector of a call with one int
# cache length, and the split pieces' fp32 partials. Kept per (device, stream, thread, shape): a
# kernel that reads or writes them is queued on that stream after the previous call's kernels that
# used them, so reuse never races (another thread has its own; the caching allocator reuses freed
# memory on its own stream only, so clearing the bound is safe too). Never while a CUDA graph is
# captured (a graph would keep reading a buffer later calls change): fresh tensors then, as before.
# Bounded: 64 entries, partials of at most 8 MiB each and 32 MiB in all.
_SCRATCH: dict[tuple, list] = {}
_SCRATCH_MAX = 64
_SCRATCH_BYTES = 8 << 20  # partials above this are allocated per call
_SCRATCH_BUDGET = 32 << 20  # partials kept in all (cleared, with the rest, when a new one would pass it)
_held = [0]  # bytes of the partials kept


def _make_room(nbytes: int = 0) -> None:
    if len(_SCRATCH) >= _SCRATCH_MAX or _held[0] + nbytes > _SCRATCH_BUDGET:
        _SCRATCH.clear()
        _held[0] = 0


def _scratch_key(dev: torch.device) -> tuple | None:
    """(device, stream, thread), or None while the current stream is being captured."""
    if dev.type != "cuda":
        return dev, 0, _thread()
    if _capturing_now is None or _capturing_now() or _raw_stream is None:
        return None
    return dev, _raw_stream(dev.index if dev.index is not None else torch.cuda.current_device()), _thread()


_ASK = object()  # (the default of ``key`` below: computed there)


def _flag(dev: torch.device, key: tuple | None) -> torch.Tensor:
    """:func:`error_flag`, looked up with the stream :func:`_scratch_key` already read."""
    flag = None if key is None or dev.type != "cuda" else _ERR.get((dev.index, key[1]))
    return error_flag(dev) if flag is None else flag


def lens_vector(dev: torch.device, b: int, n: int, key: tuple | None | object = _ASK) -> torch.Tensor:
    """int32 ``(b,)`` filled with ``n`` (the kernels read cache lengths from a device vector): kept
    between calls (see above), refilled only when ``n`` changes. ``key``: :func:`_scratch_key`'s, if known."""
    if key is _ASK:
        key = _scratch_key(dev)
    if key is None:
        return torch.full((b,), n, dtype=torch.int32, device=dev)
    key = (*key, "lens", b)
    ent = _SCRATCH.get(key)
    if ent is None:
        _make_room()
        t = torch.full((b,), n, dtype=torch.int32, device=dev)
        _SCRATCH[key] = [n, t]
        return t
    if ent[0] != n:
        ent[1].fill_(n)
        ent[0] = n
    return ent[1]


def partials(dev: torch.device, parts: tuple, key: tuple | None | object = _ASK) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 ``(out pieces, lse pieces)`` of a split call, shapes ``parts``: kept between calls
    (see above) up to a size, written by the decode kernel and read by the merge of the same call."""
    if key is _ASK:
        key = _scratch_key(dev)
    if key is not None:
        key = (*key, parts)
        ent = _SCRATCH.get(key)
        if ent is not None:
            return ent[0], ent[1]
    o = torch.empty(parts[0], dtype=torch.float32, device=dev)
    lse = torch.empty(parts[1], dtype=torch.float32, device=dev)
    nbytes = (o.numel() + lse.numel()) * 4
    if key is not None and nbytes <= _SCRATCH_BYTES:
        _make_room(nbytes)
        _SCRATCH[key] = [o, lse]
        _held[0] += nbytes
    return o, lse


#: Split calls of at least :data:`FUSE_MIN_GROUPS` (batch x kv heads x row blocks) groups merge their
#: pieces inside the decode kernel (the last program of each group to finish merges: one launch, see
#: ``decode._merge_pieces``) instead of in a second kernel (``_merge_kernel``), eager and under CUDA
#: graph capture alike (one kernel variant per shape: a capture never compiles or loads one that the
#: eager calls before it did not, and every call of a shape gives the same bits). Read when a launch
#: is planned: call ``launch.clear_plans()`` after changing either.
FUSED_MERGE = True
#: Measured (H200, 8k cache, h32/8, d128, bf16; results/decode_one_launch_NVIDIA_H200_2026-12-02.json):
#: at b8 (64 groups) the fused kernel's device time equals the two kernels' (65.5 / 65.1 us) and saves
#: a launch (eager 67.7 / 69.1 us, graph replay 68.6 / 69.3); at b1 (8 groups) its first form's device
#: time was 17.0 against 11.0 us (the merging program's serial tail: shared memory and ~20 barriers).
#: With the flat merge (below; results/decode_one_launch_NVIDIA_H200_2026-12-02_flat.json) the fused
#: kernel is within 0.5 us of decode + merge kernels at every batch (b1 11.5 / 11.0, b2 21.6 / 21.0, b4
#: 35.9 / 36.2, b8 65.3 / 65.5 device us), a CUDA-graph replay no slower (b1 13.8 / 14.2) and an eager
#: call a launch cheaper (b1 31.6 / 42.7 us): every split call merges in the kernel. The threshold
#: stays a knob (split calls of fewer groups than this take the merge kernel).
FUSE_MIN_GROUPS = 1
#: The form of the in-kernel merge (``decode._merge_pieces``; helper wt-dec2): False = each chunk of
#: pieces read as one (pieces, rows, dv) tile and reduced over the pieces across warps (shared memory
#: and ~20 barriers on the merging program's path: 17.0 us b1 device time); True = one (rows, dv) tile
#: per piece, the chunk's pieces unrolled (all loads in flight together) and combined elementwise (no
#: shared memory, no barrier: 11.5 us). Both are exact to fp32 rounding but not bitwise equal to each
#: other (another summation order). Read when a launch is planned: call ``launch.clear_plans()`` after
#: changing it.
FLAT_MERGE = True
#: A benchmark's probe (benchmarks/decode_one_launch.py), never for results: the in-kernel merge's
#: counting (fence, atomic, counter reset) without the merge itself, OUT / LSE_OUT left unwritten.
_MERGE_SYNC_ONLY = False
#: Zeroed counters made outside any capture, one per (device, count) at most, each taken by the
#: next capture that needs such counters (a graph keeps them for good: see :func:`counters`).
_SPARE: dict[tuple, torch.Tensor] = {}
_SPARE_MAX = 256  # spare counters made at most (counts: a few per model)
#: counters taken by captured graphs (kept alive: a graph holds device addresses, not tensors)
_CAPTURED: list[torch.Tensor] = []


def counters(dev: torch.device, n: int, key: tuple | None | object = _ASK) -> torch.Tensor:
    """The int32 ``(n,)`` group counters of a fused split call (``decode._merge_pieces``): zero
    between launches (the merging program resets its group's), so kept per (device, stream,
    thread) as the other scratch. Never shared with a CUDA graph being captured (``key`` None): a
    replay may run on another stream, concurrently with eager calls. A capture takes the spare
    zeroed counters the first eager call of this count left (made and synchronised then, outside
    any capture; kept alive for good in :data:`_CAPTURED`: a few bytes per captured call), else
    zeros made in the graph (a fill kernel on each replay)."""
    if key is _ASK:
        key = _scratch_key(dev)
    if key is None:
        spare = _SPARE.pop((dev, n), None)
        if spare is None:
            return torch.zeros(n, dtype=torch.int32, device=dev)
        _CAPTURED.append(spare)
        return spare
    key = (*key, "cnt", n)
    t = _SCRATCH.get(key)
    if t is None:
        _make_room()
        t = _SCRATCH[key] = torch.zeros(n, dtype=torch.int32, device=dev)
        if dev.type == "cuda" and (dev, n) not in _SPARE and len(_SPARE) < _SPARE_MAX:
            _SPARE[(dev, n)] = torch.zeros(n, dtype=torch.int32, device=dev)
            torch.cuda.current_stream(dev).synchronize()  # (zero before any graph that takes it replays)
    return t


def lse_sink(dev: torch.device, shape: tuple, key: tuple | None | object = _ASK) -> torch.Tensor:
    """A kept fp32 buffer of ``shape`` for an lse nobody reads (``flash_attn_with_kvcache`` without
    ``return_softmax_lse``, the dense runners with ``want_lse=False``): written by the kernels,
    returned to no one, so reusing it needs no ordering at all; fresh while a CUDA graph is captured
    (``key`` None). ``key``: :func:`_scratch_key`'s, read here when not given."""
    if key is _ASK:
        key = _scratch_key(dev)
    if key is None:
        return torch.empty(shape, dtype=torch.float32, device=dev)
    key = (*key, "lse", shape)
    t = _SCRATCH.get(key)
    if t is None:
        _make_room()
        t = _SCRATCH[key] = torch.empty(shape, dtype=torch.float32, device=dev)
    return t


def _plan_runner(out_shape, lse_shape, parts, groups, dtype, dev, pdec, pmerge):
    """A decode plan's prepared launches as one function of the per-call tensors. ``groups`` > 0:
    the pieces are merged in the decode kernel (``groups`` counters). ``want_lse`` False: the lse
    goes to a kept buffer (:func:`lse_sink`; the caller drops it). ``lens``: the ints at
    :data:`_LEN_AT` of a length-free plan (:func:`_dense_runner`), else None."""
    empty, f32, token = torch.empty, torch.float32, object()

    def run(q, k_cache, v_cache, table, seqlens, leftpad, err, key=_ASK, want_lse=True, lens=None):
        if key is _ASK:
            key = _scratch_key(dev)
        out = empty(out_shape, dtype=dtype, device=dev)
        kept = None if key is None else _SCRATCH.get((key, token))
        if kept is None:
            kept = _kept(dev, key, token, parts, groups, lse_shape)
        o, lse, cnt, sink = kept
        lse_out = empty(lse_shape, dtype=f32, device=dev) if want_lse else sink
        if parts is None:  # one piece: the kernel writes out / lse_out (as the views (1, ...) of them)
            o, lse, fin = out, lse_out, _NO_FINAL
        else:
            fin = (out, lse_out, cnt) if groups else _NO_FINAL
        if lens is not None:  # a length-free plan (_dense_runner): the ints that follow the key length
            if not pdec.go_vary((q, k_cache, v_cache, table, seqlens, leftpad, None, o, lse, err, *fin), lens):
                with device_guard(dev):
                    pdec.call_vary((q, k_cache, v_cache, table, seqlens, leftpad, None, o, lse, err, *fin), lens)
        elif not pdec.go(q, k_cache, v_cache, table, seqlens, leftpad, None, o, lse, err, *fin):
            with device_guard(dev):
                pdec(q, k_cache, v_cache, table, seqlens, leftpad, None, o, lse, err, *fin)
        if pmerge is not None and not pmerge.go(o, lse, out, lse_out):
            with device_guard(dev):
                pmerge(o, lse, out, lse_out)
        return out, lse_out

    return run


_NO_FINAL = (None, None, None)  # (OUT, LSE_OUT, CNT) of a decode launch without the fused merge


def _kept(dev: torch.device, key: tuple | None, token: object, parts, groups: int, lse_shape: tuple) -> tuple:
    """``(pieces, lse pieces, counters, lse sink)`` of a plan runner's call (None where it has none)
    from :func:`partials`, :func:`counters`, :func:`lse_sink`; also kept together under ``(key,
    token)`` (one lookup for the next calls, cleared with the rest) when the pieces are kept."""
    o = lse = cnt = None
    if parts is not None:
        o, lse = partials(dev, parts, key)
        if groups:
            cnt = counters(dev, groups, key)
    ent = (o, lse, cnt, lse_sink(dev, lse_shape, key))
    if key is not None and (parts is None or (_SCRATCH.get((*key, parts)) or (None,))[0] is o):  # (else: per call)
        if len(_SCRATCH) >= _SCRATCH_MAX:
            return ent
        _SCRATCH[(key, token)] = ent
    return ent


def merge_layout(sq_g: int, block_m: int, splits: int, num_warps: int, bdv: int, flat: bool = False) -> tuple[int, int]:
    """(MERGE_M, SPLIT_CHUNK) of a fused merge: rows read per group (the block's real rows, a power
    of two >= 2) and pieces per read (a power of two: the fp32 piece tile of MERGE_M x SPLIT_CHUNK x
    BLOCK_DV at most 32 values a thread, 16 from 16 rows on: no spills at sm_90, ptxas -v).
    ``flat`` (:data:`FLAT_MERGE`): pieces unrolled per step, each a MERGE_M x BLOCK_DV tile read
    with its lse at every column: at most 32 piece values a thread in flight, 16 pieces at most."""
    merge_m = block_m if sq_g > block_m else max(2, next_power_of_2(sq_g))
    if flat:
        per_piece = max(1, merge_m * bdv // (32 * num_warps))
        chunk = max(1, min(16, 32 // per_piece))
        chunk = 1 << (chunk.bit_length() - 1)
        return merge_m, max(1, min(chunk, next_power_of_2(splits)))
    per_thread = 32 if merge_m <= 8 else 16
    chunk = max(1, per_thread * 32 * num_warps // (merge_m * bdv))
    chunk = 1 << (chunk.bit_length() - 1)  # (a power of two, rounded down)
    return merge_m, max(1, min(chunk, next_power_of_2(splits)))


def _wrap_offer(inputs: tuple, outputs: tuple) -> object | None:
    """The plan runner :func:`decode` offered for this very call (then withdrawn: the caller offers
    its own runner in its place), else None (nothing of it is offered)."""
    offers = _base.OFFERS
    if offers is None:
        return None
    got = _base.adopt(offers[-1:], inputs, outputs) if offers else None
    if got is not None:
        offers.pop()
    return got


def _block_m(rows: int, interp: bool) -> int:
    """Packed query rows (``seqlen_q x`` GQA group) per decode program."""
    return 16 if rows <= 16 else (32 if interp else 64)


def _pieces(q: torch.Tensor, bd: int, config: tuple[int, int, int], programs: int, max_keys: int, gather: bool,
            num_splits: int = 0) -> tuple[int, int]:
    """``(splits, chunk)``: key pieces per row and whole key blocks per piece (see
    :func:`choose_splits`; ``num_splits`` > 0: the caller's count)."""
    block_n, num_warps, num_stages = config
    if num_splits > 0:
        splits = num_splits
    elif q.is_cuda:
        info = _device.info(q.device)
        per_sm = max(1, min(info.smem_per_sm // (2 * block_n * bd * q.element_size() * max(num_stages, 1)),
                            64 // num_warps))  # fmt: skip
        splits = choose_splits(programs, max_keys, block_n, info.sm_count * per_sm, 8 if gather else 0,
                               256 if gather else 128)  # fmt: skip
    else:
        splits = 1
    chunk = cdiv(cdiv(max_keys, splits), block_n) * block_n  # whole key blocks per piece
    return cdiv(max_keys, chunk), chunk


def _config(D: int, kv_mode: int, max_keys: int, interp: bool) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages), from the H200 sweep (benchmarks/sweep_decode.py): key
    blocks read whole (dense, page-aligned) stream best with 8 warps and 3 stages, or for short
    caches (<= 2k keys) with 64-key blocks and more programs per SM; a block id per key (small
    pages) with 4 warps and 2 stages."""
    if interp:
        return 32, 4, 1
    if D > 128:
        return 64, 4, 2
    if kv_mode == 2:
        return 128, 4, 2
    return (64, 4, 2) if max_keys <= 2048 else (128, 8, 3)


def append_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor | None,
    seqlens: torch.Tensor,
    leftpad: torch.Tensor | None,
    *,
    capacity: int,
    n_index: int,
    dense: bool,
    err: torch.Tensor,
    rotary: tuple[torch.Tensor, torch.Tensor, bool] | None = None,
) -> None:
    """Write ``k, v (B, sn, Hk, D)`` into the cache at positions ``seqlens[b] ..`` (in place),
    rotating k first to its cache position when ``rotary = (cos, sin, interleaved)`` is given.

    ``table``: the block table (paged) or ``cache_batch_idx`` as ``(B, 1)`` (dense; None = row b).
    Rows whose indices are out of range (against ``capacity`` positions and ``n_index`` cache
    blocks / rows) write nothing and set bits in ``err`` (int32 ``(1,)``).
    """
    B, sn, Hk, D = k.shape
    Dv = v.shape[-1]
    if B == 0 or sn == 0:
        return
    block_t = min(64, max(16, next_power_of_2(sn)))
    with device_guard(k.device):
        cos, sin, interleaved = rotary or (None, None, False)
        _APPEND[(B * Hk, cdiv(sn, block_t))](
            k, v, k_cache, v_cache, table, seqlens, leftpad, err, cos, sin,
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            table.stride(0) if table is not None else 0,
            cos.stride(0) if rotary else 0, cos.shape[0] if rotary else 0,
            sn, capacity, n_index, k_cache.shape[1], Hk,
            HEAD_DIM=D, BLOCK_D=block_d(D), BLOCK_T=block_t,
            HAS_LEFTPAD=leftpad is not None, HAS_BT=table is not None, KV_MODE=0 if dense else 2,
            ROT_DIM=2 * cos.shape[1] if rotary else 0, INTERLEAVED=interleaved,
            HEAD_DIM_V=Dv, BLOCK_DV=block_d(Dv),
        )  # fmt: skip


def decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    table: torch.Tensor | None,
    seqlens: torch.Tensor,
    leftpad: torch.Tensor | None,
    call: AttnCall,
    *,
    sn: int,
    capacity: int,
    n_index: int,
    dense: bool,
    err: torch.Tensor,
    num_splits: int = 0,
    rotary: tuple[torch.Tensor, torch.Tensor, bool] | None = None,
    rotary_along: bool = False,
    config: tuple[int, int, int] | None = None,
    grow: tuple | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of ``q (B, Sq, H, D)`` over the cache; returns (out like q with v_cache's head dim,
    lse (B, H, Sq) fp32).

    Row ``b``'s keys are cache positions ``[leftpad[b], seqlens[b] + sn)`` (``leftpad`` None = 0):
    ``seqlens`` int32 ``(B,)`` counts the tokens before the ``sn`` new ones. ``table``: int32
    block table ``(B, max_blocks)`` into the first dim of a paged cache ``(n_index, page, Hk, D)``,
    or (``dense``) ``cache_batch_idx`` as ``(B, 1)`` into ``(n_index, capacity, Hk, D)`` (None =
    row b). ``capacity`` (positions a row can hold) also bounds the key count, which sizes the
    splits without a host sync. Out-of-range indices set bits in ``err`` (int32 ``(1,)``) and
    give NaN rows; nothing is read out of bounds. ``rotary = (cos, sin, interleaved)``: q is
    rotated on load to position ``seqlens`` (+ its index when ``rotary_along``: causal or local,
    :meth:`flashtile.spec.KVCache.rotary_along`).
    ``config``: (BLOCK_N, num_warps, num_stages). ``grow``: the plan key of a dense runner's
    ``any_length`` (a dense call, ``seqlens`` None; see :func:`_dense_runner`): the launch is
    planned under it, the ints that follow the key length (:data:`_LEN_AT`) passed anew by each
    call of the plan.
    """
    dev = q.device
    sk = _scratch_key(dev)  # (None while the stream is captured into a CUDA graph)
    fuse = FUSED_MERGE  # split pieces merged in the decode kernel
    key = None
    if config is None and rotary is None and grow is None:
        key = ("decode", id(call), q.dtype, k_cache.dtype, v_cache.dtype, dev, q.shape, q.stride(), k_cache.shape,
               k_cache.stride(), v_cache.shape, v_cache.stride(),
               None if table is None else (table.shape, table.stride()), leftpad is None, seqlens is None, sn,
               capacity, n_index, dense, num_splits, rotary_along, fuse)  # fmt: skip
        plan = _PLANS.get(key)
        if plan is not None and plan[0] is call:
            _, out_shape, lse_shape, parts, groups, dec, merge, preps = plan
            if preps is not None and preps is not PENDING:  # prepared launches (FastKernel.prepare)
                out, lse_out = preps[2](q, k_cache, v_cache, table, seqlens, leftpad, err, sk)
                if _base.OFFERS is not None:  # for kvcache() / dense() to wrap (see there)
                    _base.OFFERS.append(((q, k_cache, v_cache, table, seqlens, leftpad, err), (out, lse_out), preps[2]))
                return out, lse_out
            out = torch.empty(out_shape, dtype=q.dtype, device=dev)
            lse_out = torch.empty(lse_shape, dtype=torch.float32, device=dev)
            if parts is None:  # one piece: the kernel writes out / lse_out (as the views (1, ...) of them)
                o, lse, fin = out, lse_out, _NO_FINAL
            else:
                o, lse = partials(dev, parts, sk)
                fin = (out, lse_out, counters(dev, groups, sk)) if groups else _NO_FINAL
            with device_guard(dev):
                dec_args = (q, k_cache, v_cache, table, seqlens, leftpad, None, o, lse, err, *fin, None, None, *dec[1])
                _DECODE[dec[0]](*dec_args, **dec[2])
                if merge is not None:
                    merge_args = (o, lse, out, lse_out, *merge[1])
                    _MERGE[merge[0]](*merge_args, **merge[2])
                if preps is PENDING:  # the plan's first reuse: its launches prepared for the next ones
                    preps = (_DECODE.prepare(dec[0], dec_args, dec[2], 13),
                             None if merge is None else _MERGE.prepare(merge[0], merge_args, merge[2], 4))  # fmt: skip
                    if preps[0] is None or (merge is not None and preps[1] is None):
                        preps = None
                    else:
                        preps = (*preps, _plan_runner(out_shape, lse_shape, parts, groups, q.dtype, dev, *preps))
                    _PLANS[key] = (*plan[:-1], preps)
            return out, lse_out
    B, Sq, H, D = q.shape
    Hk, Dv = k_cache.shape[2], v_cache.shape[-1]
    G = H // Hk
    interp = _interpret()
    page = k_cache.shape[1]
    block_n, num_warps, num_stages = config or _config(D, 1, capacity, interp)
    kv_mode = 0 if dense else (1 if leftpad is None and page % block_n == 0 else 2)
    if kv_mode == 2:
        block_n, num_warps, num_stages = config or _config(D, 2, capacity, interp)
    block_m = _block_m(Sq * G, interp)
    bd, bdv = block_d(D), block_d(Dv)
    row_blocks = cdiv(Sq * G, block_m)
    max_keys = max(capacity, 1)
    programs = B * Hk * row_blocks
    splits, chunk = _pieces(q, bd, (block_n, num_warps, num_stages), programs, max_keys, kv_mode == 2, num_splits)
    out = torch.empty((B, Sq, H, Dv), dtype=q.dtype, device=dev)
    lse_out = torch.empty((B, H, Sq), dtype=torch.float32, device=dev)
    fuse = fuse and splits > 1 and programs >= FUSE_MIN_GROUPS
    groups = programs if fuse else 0
    if splits == 1:  # the kernel writes the result itself
        o, lse, fin = out.unsqueeze(0), lse_out.unsqueeze(0), _NO_FINAL
    else:
        o, lse = partials(dev, ((splits, B, Sq, H, Dv), (splits, B, H, Sq)), sk)
        fin = (out, lse_out, counters(dev, groups, sk)) if fuse else _NO_FINAL
    cos, sin, interleaved = rotary or (None, None, False)
    qk_scale, cap_out = score_scales(call)
    sink = _sink_args(call)  # in the kernel with one piece or a fused merge, else once in the merge kernel
    qs, ks, vs, os_, ls = q.stride(), k_cache.stride(), v_cache.stride(), o.stride(), lse.stride()
    us, ls2 = out.stride(), lse_out.stride()
    flat = FLAT_MERGE
    merge_m, split_chunk = merge_layout(Sq * G, block_m, splits, num_warps, bdv, flat) if fuse else (2, 1)
    dec = (
        (B * Hk, splits, row_blocks),
        (
            qs[0], qs[1], qs[2],
            ks[0], ks[1], ks[2],
            vs[0], vs[1], vs[2],
            table.stride(0) if table is not None else 0,
            cos.stride(0) if rotary else 0, cos.shape[0] if rotary else 0,
            os_[0], os_[1], os_[2], os_[3],
            ls[0], ls[1], ls[2],
            call.alibi_slopes.stride(0) if call.alibi_slopes is not None else 0,
            *((us[0], us[1], us[2], ls2[0], ls2[1]) if fuse else (0, 0, 0, 0, 0)),
            Sq, sn, capacity, n_index, page, chunk, Hk, G,
            qk_scale, cap_out, call.window_left, call.window_right,
        ),
        dict(
            HEAD_DIM=D, BLOCK_D=bd, BLOCK_M=block_m, BLOCK_N=block_n,
            HAS_SOFTCAP=call.softcap > 0, HAS_ALIBI=call.alibi_slopes is not None,
            HAS_WL=call.window_left >= 0, HAS_WR=call.window_right >= 0,
            HAS_LEFTPAD=leftpad is not None, HAS_BT=table is not None,
            UPCAST=upcast(q.dtype), KV_MODE=kv_mode,
            ROT_DIM=2 * cos.shape[1] if rotary else 0, INTERLEAVED=interleaved, ROT_ALONG=rotary_along,
            **(sink if splits == 1 or fuse else {}), HEAD_DIM_V=Dv, BLOCK_DV=bdv,
            **(dict(MERGE=True, MERGE_M=merge_m, SPLIT_CHUNK=split_chunk, MERGE_FLAT=flat,
                    **({"MERGE_SYNC_ONLY": True} if _MERGE_SYNC_ONLY else {})) if fuse else {}),
            num_warps=num_warps, num_stages=num_stages,
        ),
    )  # fmt: skip
    merge = None
    if splits > 1 and not fuse:
        merge = (
            (B * Sq * H,),
            (splits, os_[0], os_[1], os_[2], os_[3], ls[0], ls[1], ls[2], us[0], us[1], us[2], ls2[0], ls2[1], H, Sq),
            dict(HEAD_DIM=Dv, BLOCK_S=max(2, next_power_of_2(splits)), BLOCK_D=bdv, **sink),
        )
    with device_guard(dev):
        _DECODE[dec[0]](q, k_cache, v_cache, table, seqlens, leftpad, call.alibi_slopes, o, lse, err, *fin, cos, sin,
                        *dec[1], **dec[2])  # fmt: skip
        if merge is not None:
            _MERGE[merge[0]](o, lse, out, lse_out, *merge[1], **merge[2])
    if grow is not None and _plannable(call) and grow[2:4] == ((block_n, num_warps, num_stages), splits) and \
            tuple(dec[1][i] for i in _LEN_AT) == (*ks[:3], *vs[:3], capacity, page, chunk):  # (as the runner keyed it)
        dec_args = (q, k_cache, v_cache, table, seqlens, leftpad, None, o, lse, err, *fin, None, None, *dec[1])
        pdec = _DECODE.prepare(dec[0], dec_args, dec[2], 13, vary=tuple(2 + i for i in _LEN_AT))  # (after COS, SIN)
        pmerge = None if merge is None else _MERGE.prepare(merge[0], (o, lse, out, lse_out, *merge[1]), merge[2], 4)
        if pdec is not None and (merge is None or pmerge is not None):
            parts = None if splits == 1 else (tuple(o.shape), tuple(lse.shape))
            _keep_plan(grow, (call, _plan_runner(tuple(out.shape), tuple(lse_out.shape), parts, groups, q.dtype, dev,
                                                 pdec, pmerge)))  # fmt: skip
    if key is not None and _plannable(call):
        parts = None if splits == 1 else (tuple(o.shape), tuple(lse.shape))
        _keep_plan(key, (call, tuple(out.shape), tuple(lse_out.shape), parts, groups, dec, merge, PENDING))
    return out, lse_out


def kvcache(q: torch.Tensor, cache: KVCache, call: AttnCall) -> tuple[torch.Tensor, torch.Tensor]:
    """``flash_attn_with_kvcache`` on the GPU: the append and attention kernels check every index
    they use (never reading or writing out of bounds) and raise one error flag, read back after
    both are queued, so the host sync overlaps the work; the detailed message is worked out only
    on error. No read-back while a CUDA graph is captured (rows with a bad index then come out NaN)."""
    b, dev = q.shape[0], q.device
    tensor_lens = isinstance(cache.seqlens, torch.Tensor)
    seqlens = cache.seqlens if tensor_lens else lens_vector(dev, b, cache.seqlens)
    if cache.paged:
        table = cache.block_table
    else:
        table = None if cache.batch_idx is None else cache.batch_idx.view(b, 1)
    n_index, dense_cache = cache.k_cache.shape[0], not cache.paged
    err = error_flag(dev)
    k_new = cache.k_new
    if k_new is not None:
        append_kv(k_new, cache.v_new, cache.k_cache, cache.v_cache, table, seqlens, cache.leftpad,
                  capacity=cache.capacity, n_index=n_index, dense=dense_cache, err=err, rotary=cache.rotary)  # fmt: skip
    along = cache.rotary_along(call)
    out, lse = decode(q if q.stride(-1) == 1 else q.contiguous(), cache.k_cache, cache.v_cache, table, seqlens,
                      cache.leftpad, call, sn=0 if k_new is None else k_new.shape[1], capacity=cache.capacity,
                      n_index=n_index, dense=dense_cache, err=err, num_splits=cache.num_splits, rotary=cache.rotary,
                      rotary_along=along)  # fmt: skip
    if cache.has_index_tensors and not capturing(q):
        if int(err.item()):  # this call's, or stale bits of CUDA graph replays on this stream: check by name
            err.zero_()
            check_cache_indices(cache, seqlens, sq=q.shape[1], along=along, rotary=True)
    if _base.OFFERS is not None and k_new is None and table is None and cache.leftpad is None and cache.rotary is None:
        run = _wrap_offer((q, cache.k_cache, cache.v_cache, None, seqlens, None, err), (out, lse))
        if run is not None:
            _base.OFFERS.append(
                ((q, cache.k_cache, cache.v_cache), (out, lse), _kv_runner(run, cache, along, tensor_lens))
            )
    return out, lse


def _kv_runner(run, cache: KVCache, along: bool, tensor_lens: bool):
    """:func:`kvcache`'s runner (see :data:`flashtile.backends.base.OFFERS`) for calls without new
    tokens, rotary tables or index tensors other than the lengths: ``runner(q, k_cache, v_cache,
    lens, want_lse=True)``, ``lens`` an int (checked by the caller) or the int32 tensor; the error
    flag is read as :func:`kvcache` reads it. ``want_lse`` False: the lse it returns is a kept
    buffer the caller must drop."""
    epoch, capacity, num_splits, token = _launch._EPOCH, cache.capacity, cache.num_splits, object()

    def kv(q, k_cache, v_cache, lens, want_lse=True):
        if _launch._EPOCH is not epoch:
            return None
        dev = q.device
        key = _scratch_key(dev)
        got = None if key is None else _SCRATCH.get((key, token))
        if got is None:  # (the length vector's entry and the flag kept together: one lookup next time)
            seqlens = lens if tensor_lens else lens_vector(dev, q.shape[0], lens, key)
            err = _flag(dev, key)
            if key is not None and len(_SCRATCH) < _SCRATCH_MAX:
                ent = None if tensor_lens else _SCRATCH.get((*key, "lens", q.shape[0]))
                if tensor_lens or ent is not None:  # the flag itself only where it is kept (CUDA)
                    _SCRATCH[(key, token)] = (ent, err if dev.type == "cuda" else None)
        else:
            ent, err = got
            if err is None:
                err = _flag(dev, key)
            if tensor_lens:
                seqlens = lens
            else:  # as lens_vector: refilled when the length changes
                if ent[0] != lens:
                    ent[1].fill_(lens)
                    ent[0] = lens
                seqlens = ent[1]
        out, lse = run(q, k_cache, v_cache, None, seqlens, None, err, key, want_lse)
        if tensor_lens and not capturing(q) and int(err.item()):  # as kvcache(): check by name
            err.zero_()
            full = KVCache(k_cache=k_cache, v_cache=v_cache, k_new=None, v_new=None, seqlens=lens, batch_idx=None,
                           leftpad=None, block_table=None, rotary=None, capacity=capacity,
                           num_splits=num_splits)  # fmt: skip
            check_cache_indices(full, seqlens, sq=q.shape[1], along=along, rotary=True)
        return out, lse

    return kv


def dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall) -> tuple[torch.Tensor, torch.Tensor]:
    """A decode-shaped forward (few query rows per KV head) over dense ``k, v (B, Sk, Hk, D)``,
    each batch row's keys all of its ``Sk`` (>= 1): same semantics as the forward kernel
    (bottom-right causal alignment). Offers the entry points a runner of this signature whose
    ``any_length`` serves it at any key length (see :func:`_dense_runner`)."""
    B, Sk = k.shape[0], k.shape[1]
    err = error_flag(q.device)
    out, lse = decode(q, k, v, None, None, None, call, sn=0, capacity=Sk, n_index=B, dense=True, err=err)
    if _base.OFFERS is not None:
        run = _wrap_offer((q, k, v, None, None, None, err), (out, lse))
        _base.OFFERS.append(((q, k, v), (out, lse), _dense_runner(run, call, q, k, v)))
    return out, lse


#: Positions in a decode launch's ints (``dec[1]`` in :func:`decode`) of those that follow a dense
#: call's key length: k's and v's three leading strides, ``capacity``, ``page``, ``chunk``.
_LEN_AT = (3, 4, 5, 6, 7, 8, 27, 29, 30)


def _dense_runner(run, call: AttnCall, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    """:func:`dense`'s runner for calls of the signature of ``q, k, v`` (see
    :data:`flashtile.backends.base.OFFERS`): ``runner(q, k, v, want_lse=True)`` through the shape's
    planned launch ``run``, or (None) through ``any_length``.

    ``runner.any_length(q, k, v, want_lse=True)``: the same for k / v of any length >= 1 (issue 16):
    decode-shaped calls whose keys grow by one every call (a ``torch.cat`` KV cache: Hugging Face's
    dynamic cache, a user's own generation loop) would otherwise plan a launch per length. Its
    plans are keyed by what decides the launch besides the signature: the tile config and the number
    of key pieces this length gets, and the classes Triton specialises the length-dependent ints on
    (:data:`_LEN_AT`: == 1, multiple of 16, width); their prepared launch takes those ints anew each
    call (``fastlaunch.Prepared.go_vary``). A class met for the first time plans through
    :func:`decode`; a call of the previous call's length and strides reuses what that one computed."""
    epoch = _launch._EPOCH
    dev, B, Hk, D = q.device, k.shape[0], k.shape[2], k.shape[3]
    G = q.shape[2] // Hk
    interp = _interpret()
    programs = B * Hk * cdiv(q.shape[1] * G, _block_m(q.shape[1] * G, interp))  # (decode's programs)
    bd, token = block_d(D), object()
    last = [(-1, None, None, None, None)]  # the previous call's (length, k / v strides, ints, plan): one tuple

    def any_length(q, k, v, want_lse=True):
        if _launch._EPOCH is not epoch:
            return None
        Sk, ks, vs = k.shape[1], k.stride(), v.stride()
        prev = last[0]  # (read once: another thread may replace it)
        if Sk == prev[0] and ks == prev[1] and vs == prev[2]:
            lens, plan = prev[3], prev[4]
        else:
            cfg = _config(D, 0, Sk, interp)
            splits, chunk = _pieces(q, bd, cfg, programs, Sk, False)
            lens = (ks[0], ks[1], ks[2], vs[0], vs[1], vs[2], Sk, Sk, chunk)
            key = ("grow", token, cfg, splits, int_classes(lens))
            plan = _PLANS.get(key)
            if plan is None:
                return decode(q, k, v, None, None, None, call, sn=0, capacity=Sk, n_index=B, dense=True,
                              err=error_flag(dev), grow=key)  # fmt: skip
            plan = plan[1]
            last[0] = (Sk, ks, vs, lens, plan)
        sk = _scratch_key(dev)
        return plan(q, k, v, None, None, None, _flag(dev, sk), sk, want_lse, lens)

    if run is None:
        go = any_length
    else:

        def go(q, k, v, want_lse=True):
            if _launch._EPOCH is not epoch:
                return None
            key = _scratch_key(dev)
            return run(q, k, v, None, None, None, _flag(dev, key), key, want_lse)

    go.any_length = any_length
    return go
