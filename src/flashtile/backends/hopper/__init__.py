"""The ``hopper`` backend: a forward attention kernel for sm_90 written in Gluon
(``triton.experimental.gluon``), FA3's design: TMA loads into an mbarrier-guarded K/V ring,
``warpgroup_mma`` for Q K^T and P V, online softmax in the wgmma accumulator layout, a
warp-specialised TMA producer and two consumer warpgroups in ping-pong, and a persistent variant
over a host-computed tile schedule (kernels in :mod:`.fwd`, configs in :mod:`.configs`).

Serves fp16, bf16 and FP8 e4m3 (forward: both products in FP8 wgmma, :mod:`.fwd_fp8`; output
bf16) with head dims 64, 96, 128, 192 and 256 on compute capability 9.x, with
causal and sliding windows (bottom-right aligned), softcap, GQA/MQA, ``seqlen_q != seqlen_k``
and varlen. Not ALiBi, not dropout (``auto`` then picks the next backend). The backward is
Gluon too (:mod:`.bwd`, host side :mod:`.launch_bwd`); ``FLASHTILE_HOPPER_BWD=triton`` switches
it to the Triton backend's kernels (which need only ``out`` and ``lse``, of the same semantics);
the Triton kernels are the default until the Gluon backward is faster (:data:`DEFAULT_BWD`).

Gluon is an experimental API that changes between Triton releases: the backend runs only with
the Triton versions it was tested with (:data:`TESTED_TRITON`); ``available()`` names the
version found otherwise. Importing this package never imports Triton; :mod:`.launch` and the
kernels are imported on the first call.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import sys

import torch

from ...fp8 import is_fp8, run_upcast
from ...spec import AttnCall, Problem
from .. import _device
from ..base import Capabilities, register
from .configs import HEADDIMS

#: Triton releases whose Gluon this backend was compiled and tested against.
TESTED_TRITON = ("3.6.0",)
MAX_HEADDIM = max(HEADDIMS)

_gluon_error: list[str | None] = []  # cached result of the first Gluon import (when CUDA is present)


def _triton_version() -> str | None:
    """Triton's version without importing it (importing Triton early would defeat a later
    ``TRITON_INTERPRET=1`` for the triton backend): the loaded module's, else the installed
    distribution's; None if Triton is not installed."""
    mod = sys.modules.get("triton")
    if mod is not None:
        return getattr(mod, "__version__", None)
    return _installed_triton_version()


@functools.cache
def _installed_triton_version() -> str | None:
    """The installed distribution's version, read from its metadata once (``available()`` runs
    on every dispatch, and a metadata lookup scans the environment)."""
    if importlib.util.find_spec("triton") is None:
        return None
    for dist in ("triton", "pytorch-triton"):
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "unknown"


@functools.cache
def _gluon_files_present() -> bool:
    """Whether the installed Triton ships Gluon's Hopper module (checked on disk once: no import;
    ``available()`` runs on every dispatch)."""
    spec = importlib.util.find_spec("triton")
    for root in (spec.submodule_search_locations or []) if spec else []:
        if os.path.exists(os.path.join(root, "experimental", "gluon", "language", "nvidia", "hopper", "__init__.py")):
            return True
    return False


def _gluon_import_error() -> str | None:
    """Import Gluon's Hopper module once; the error message if that fails."""
    if not _gluon_error:
        try:
            importlib.import_module("triton.experimental.gluon.language.nvidia.hopper")
            _gluon_error.append(None)
        except Exception as e:  # pragma: no cover - depends on the installation
            _gluon_error.append(f"{type(e).__name__}: {e}")
    return _gluon_error[0]


#: Dense calls with at most this many query rows (batch x seqlen_q x heads: under one wave of
#: 128-row tiles on an H100/H200) run the Triton forward: there the launch, not the kernel, is
#: the cost, and the Triton kernels take the lean launch path (issue 16); the Gluon kernel's
#: speed-up needs a full GPU.
SMALL_ROWS = 16384


class HopperBackend:
    """Implements :class:`flashtile.backends.base.Backend` with Gluon kernels for sm_90.

    Forward calls with few query rows per KV head (decoding-shaped: the triton backend's
    ``DECODE_SHAPED_ROWS`` rule, not varlen) run the triton backend's split-KV decode kernel
    instead: a 128-row tile would be almost empty there. Dense calls of at most
    :data:`SMALL_ROWS` query rows run the triton backend's forward (launch-bound sizes), so do
    fp16 / bf16 calls with a short window at a small head dim (:func:`short_window`), and FP8
    varlen calls the bf16 Gluon kernel on dequantised inputs (the FP8 kernel is dense-only).
    """

    name = "hopper"
    capabilities = Capabilities(
        priority=20,
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float8_e4m3fn}),
        max_headdim=MAX_HEADDIM,
        features=frozenset({"causal", "window", "softcap", "varlen"}),
        auto_devices=("cuda",),
        decode=False,
    )

    def available(self) -> str | None:
        version = _triton_version()
        if version is None:
            return "triton is not installed (pip install triton==3.6.0)"
        if version not in TESTED_TRITON:
            return (f"triton {version} is installed; the Gluon kernels are tested only with triton "
                    f"{', '.join(TESTED_TRITON)} (Gluon's API changes between releases)")  # fmt: skip
        if not _gluon_files_present():
            return f"triton {version} has no Gluon Hopper module (triton.experimental.gluon.language.nvidia.hopper)"
        if torch.version.hip:
            return "ROCm build of PyTorch: the Gluon kernels are for NVIDIA Hopper"
        if not torch.cuda.is_available():
            return "no CUDA device"
        err = _gluon_import_error()
        if err:
            return f"cannot import Gluon: {err}"
        return None

    def supports(self, problem: Problem, call: AttnCall) -> str | None:
        dev = problem.device
        if dev.type != "cuda":
            return f"needs CUDA tensors, got {dev.type}"
        info = _device.info(dev)
        if info is not None and info.major != 9:
            return f"needs compute capability 9.x (Hopper), device has {info.major}.{info.minor}"
        if problem.headdim not in HEADDIMS:
            return f"head dim {problem.headdim} is not one of {', '.join(map(str, HEADDIMS))}"
        if problem.headdim_v != problem.headdim:
            return f"v head dim {problem.headdim_v} differs from the q/k head dim {problem.headdim}"
        if not call.softmax_scale > 0:
            return f"softmax_scale must be > 0 for the hopper kernels, got {call.softmax_scale}"
        return None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from ..triton import DECODE_SHAPED_ROWS
        from ..triton import backend as triton_backend

        small = not call.varlen and q.shape[0] * q.shape[1] * q.shape[2] <= SMALL_ROWS
        if small or (not call.varlen and q.shape[1] * (q.shape[2] // k.shape[2]) <= DECODE_SHAPED_ROWS):
            if is_fp8(q.dtype):  # the triton kernels have no FP8: dequantised first
                return run_upcast(triton_backend.forward, q, k, v, call)
            return triton_backend.forward(q, k, v, call)
        if not is_fp8(q.dtype) and short_window(call, q.shape[-1]):  # (FP8 keeps its own kernel)
            return triton_backend.forward(q, k, v, call)
        from . import launch

        if is_fp8(q.dtype) and call.varlen:  # the FP8 kernel is dense-only so far: the bf16 kernel, upcast
            return run_upcast(launch.forward, q, k, v, call)
        return launch.forward(q, k, v, call)

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
        keys = int(call.max_seqlen_k) if call.varlen else k.shape[1]
        if bwd_kernel(call, q.shape[-1], keys) == "triton":
            from ..triton import backend as triton_backend

            return triton_backend.backward(dout, q, k, v, out, lse, call)
        from . import launch_bwd

        dq, dk, dv = launch_bwd.backward(dout, q, k, v, out, lse, call)
        return dq, dk, dv, {}


#: head dim -> the largest window span (keys a query row can see: ``window_left + 1 + window_right``)
#: at which a windowed fp16 / bf16 forward runs the Triton forward instead of the Gluon kernel: at
#: short rows the Gluon forward's per-program fixed costs (its pipeline fill, the warp-specialised
#: hand-offs) weigh most at small head dims. Measured on the H200 (b1 h16 s16k bf16, causal, window
#: (w, 0), device time of 10 calls back to back, ``benchmarks/window_fwd_routes.py``,
#: ``results/window_fwd_routes_NVIDIA_H200_20261202-{1103,1141}.json``), Triton (with its short-window
#: tile, ``triton.configs._FWD_WINDOW_SHORT``) / Gluon ms: head dim 64, w = 512 / 1024 / 2048 / 4096:
#: 0.135 / 0.267, 0.211 / 0.328, 0.361 / 0.439, 0.631 / 0.642; head dim 96 (the Triton table's
#: tile): 0.278 / 0.200, 0.432 / 0.292, 0.675 / 0.494, 1.137 / 0.849 (Gluon stays), head dim 128 at
#: 1024: 0.404 / 0.285.
TRITON_FWD_WINDOW_SPAN: dict[int, int] = {64: 4097}


def short_window(call: AttnCall, headdim: int) -> bool:
    """Whether ``call``'s window is short enough at ``headdim`` for the Triton forward
    (:data:`TRITON_FWD_WINDOW_SPAN`): both sides bounded and the span at most the entry."""
    limit = TRITON_FWD_WINDOW_SPAN.get(headdim)
    if limit is None or call.window_left < 0 or call.window_right < 0:
        return False
    return call.window_left + 1 + call.window_right <= limit


#: Environment variable choosing the backward kernels: ``gluon`` or ``triton``.
BWD_ENV = "FLASHTILE_HOPPER_BWD"
#: The default backward: the Triton kernels, except for (head dim, masked) in
#: :data:`GLUON_BWD_MIN_KEYS` with at least that many keys (the longest sequence's; masked: causal
#: or windowed). Measured on the H200 (``benchmarks/results/hopper_bwd_H200_20261202_final.json``,
#: backward TFLOP/s, bf16, the ws kernel (swap, TMA dQ reductions) against the Triton backward in
#: the same run): head dim 128, 350 / 255 at 1k (non-causal / causal), 471 / 410 at 4k, 509 / 509 at
#: 16k against 334 / 213, 390 / 335, 413 / 393 (GQA 32/8 8k causal 469 vs 361, softcap 382 vs 298);
#: head dim 64: 304 / 222, 405 / 377, 436 / 447 against 282 / 213, 332 / 293, 348 / 342; head dim
#: 256 (plain Gluon kernel) 289 / 270 at 4k against 209 / 204. Below 1k keys (not measured) the
#: Triton backward stays. ``FLASHTILE_HOPPER_BWD=gluon|triton`` forces one.
DEFAULT_BWD = "triton"
GLUON_BWD_MIN_KEYS: dict[tuple[int, bool], int] = {
    (64, False): 1024, (64, True): 1024, (96, False): 1024, (96, True): 1024,
    (128, False): 1024, (128, True): 1024, (256, False): 0, (256, True): 0,
}


def bwd_kernel(call: AttnCall, headdim: int | None = None, keys: int | None = None) -> str:
    """Which kernels run the backward of ``call`` (q/k head dim ``headdim``, ``keys`` keys in the
    longest sequence; unknown: as long as needed): ``gluon`` (:mod:`.bwd`) or ``triton`` (the
    Triton backend's, also the path for anything the Gluon kernel does not serve: a learnable
    sink). ``FLASHTILE_HOPPER_BWD`` forces one (A/B comparisons)."""
    env = os.environ.get(BWD_ENV, "").strip().lower()
    if env and env not in ("gluon", "triton"):
        raise ValueError(f"{BWD_ENV} must be 'gluon' or 'triton', got {env!r}")
    masked = call.window_left >= 0 or call.window_right >= 0
    min_keys = GLUON_BWD_MIN_KEYS.get((headdim, masked)) if headdim is not None else None
    auto = "gluon" if min_keys is not None and (keys is None or keys >= min_keys) else DEFAULT_BWD
    choice = env or auto
    if choice == "triton" or call.learnable_sink is not None:
        return "triton"
    return "gluon"


backend = register(HopperBackend())

__all__ = ["HopperBackend", "backend", "bwd_kernel", "BWD_ENV", "TESTED_TRITON", "MAX_HEADDIM"]
