"""The contract every backend fulfils, its declared capabilities, and the registry.

A backend computes attention on the *internal layout*:

* dense calls: q ``(B, Sq, H, D)``, k/v ``(B, Sk, Hk, D)`` (v may have its own head dim ``Dv``,
  and then so do out and dv);
* varlen calls (``call.varlen``): q ``(1, total_q, H, D)``, k/v ``(1, total_k, Hk, D)``, with
  ``call.cu_seqlens_q`` / ``call.cu_seqlens_k`` and ``call.max_seqlen_*``.

``forward(q, k, v, call)`` returns ``(out, lse)``: out like q, lse float32 ``(B, H, Sq)``
(varlen: ``(1, H, total_q)``), ``-inf`` on rows that see no key (their out is 0; with
``call.learnable_sink`` the lse includes the sink, and is the sink on such rows).
``backward(dout, q, k, v, out, lse, call)`` recomputes from the saved tensors and returns
``(dq, dk, dv, field_grads)``: dq, dk, dv shaped and typed like ``(q, k, v)``; ``field_grads`` a
dict from the name of each *differentiable* carrier field the call sets (those declared with
``metadata={"grad": True}``, e.g. ``learnable_sink``) to its gradient, shaped and typed like the
field (one for every such field the call sets; ``{}`` from a backend that implements none).
Every option is a field of the :class:`flashtile.spec.AttnCall` (``call.seed`` is the dropout
seed; the keep mask is :func:`flashtile.rng.keep_mask`); all option semantics are in
:mod:`flashtile.spec`.

``decode(q, cache, call)`` (optional, declared by ``Capabilities.decode``) serves
``flash_attn_with_kvcache``: it appends ``cache.k_new`` / ``cache.v_new`` to the cache in place,
then attends q ``(B, Sq, H, D)`` to each row's keys; returns ``(out, lse)`` as ``forward``.
Index checks that need the device's values are the backend's (see
:func:`flashtile.paged.check_cache_indices`).

Adding a backend
----------------
1. A module or package under ``flashtile/backends/`` (a name not starting with ``_``) whose
   import never fails for lack of an optional dependency: import those on first use, and say
   why the backend is unusable in ``available()``.
2. A class with ``name``, ``capabilities`` (a :class:`Capabilities`), ``available()``,
   ``supports(problem, call)`` (checks the declarations cannot express, e.g. compute
   capability), ``forward``, ``backward`` and, if ``capabilities.decode``, ``decode``.
   :mod:`flashtile.dispatch` caches its choice per call signature, so ``available()`` and
   ``supports()`` must not depend on batch size or sequence lengths, and a backend whose answer
   depends on environment variables names them in a ``dispatch_env`` tuple attribute.
3. ``register(instance)`` at the end of the module: discovery imports every module of this
   package (and entry points of the group ``flashtile.backends``), so nothing central changes.
4. Tests: ``tests/test_parity.py`` runs every registered backend usable in the process against
   the oracle (``FLASHTILE_TEST_BACKENDS`` selects); add GPU-only cases with the ``gpu`` marker.
5. A benchmark row in ``benchmarks/bench_attention.py`` against SDPA flash and cuDNN.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ..spec import FEATURES, AttnCall, KVCache, Problem


@dataclass(frozen=True)
class Capabilities:
    """What a backend serves, read by :mod:`flashtile.dispatch` to choose and to explain.

    ``priority``: ``auto`` tries backends from the highest down. ``auto_devices``: the device
    types ``auto`` may pick it for (None: any); a forced backend is still checked against the
    rest. ``dtypes``, ``max_headdim``: what the kernels accept. ``features``: the optional
    features of :meth:`flashtile.spec.AttnCall.features` it implements. ``decode``: whether it
    implements :meth:`Backend.decode`.
    """

    priority: int
    dtypes: frozenset[torch.dtype]
    max_headdim: int
    features: frozenset[str] = FEATURES
    auto_devices: tuple[str, ...] | None = None
    decode: bool = False

    def refuse(self, problem: Problem, call: AttnCall, decode: bool = False) -> str | None:
        """The reason these declarations exclude the call, or None."""
        if problem.dtype not in self.dtypes:
            names = ", ".join(sorted(str(d).removeprefix("torch.") for d in self.dtypes))
            return f"dtype {problem.dtype} is not supported ({names})"
        if max(problem.headdim, problem.headdim_v) > self.max_headdim:
            return f"head dim {max(problem.headdim, problem.headdim_v)} > {self.max_headdim}"
        missing = call.features() - self.features
        if missing:
            return f"does not implement {', '.join(sorted(missing))}"
        if decode and not self.decode:
            return "does not implement KV-cache decoding"
        return None


class Backend(Protocol):
    name: str
    capabilities: Capabilities

    def available(self) -> str | None:
        """None if the backend can run in this process, else the reason it cannot."""

    def supports(self, problem: Problem, call: AttnCall) -> str | None:
        """None if the backend serves this call (beyond its declarations), else the reason."""

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: AttnCall
    ) -> tuple[torch.Tensor, torch.Tensor]: ...

    def backward(
        self,
        dout: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        out: torch.Tensor,
        lse: torch.Tensor,
        call: AttnCall,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]: ...

    def decode(self, q: torch.Tensor, cache: KVCache, call: AttnCall) -> tuple[torch.Tensor, torch.Tensor]:
        """Optional (``capabilities.decode``): append to the cache, then attend (see the module doc)."""
        raise NotImplementedError


class _Registry(dict):
    """The registry's dict, counting its changes in ``version`` (:mod:`flashtile.dispatch` keeps
    its priority order until the count moves, instead of comparing the items on every call)."""

    version = 0

    def _changed(self, result=None):
        self.version += 1
        return result

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        self._changed()

    def __delitem__(self, key):
        super().__delitem__(key)
        self._changed()

    def __ior__(self, other):
        super().__ior__(other)
        return self._changed(self)

    def pop(self, *args):
        return self._changed(super().pop(*args))

    def popitem(self):
        return self._changed(super().popitem())

    def clear(self):
        super().clear()
        self._changed()

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        self._changed()

    def setdefault(self, key, default=None):
        return self._changed(super().setdefault(key, default))


_REGISTRY: dict[str, Backend] = _Registry()


def register(backend: Backend) -> Backend:
    """Add a backend to the registry (``auto`` orders by ``capabilities.priority``)."""
    _REGISTRY[backend.name] = backend
    return backend


def registry() -> dict[str, Backend]:
    return _REGISTRY


# Prepared runners (issue 16). While an entry point records (:func:`recording`), a launcher that
# served a call through a prepared launch plan offers ``(inputs, outputs, runner)``: ``runner(*inputs)``
# repeats that call for any later inputs of the same signature (shapes, strides, dtypes, devices,
# options) -- it allocates the outputs and launches, nothing else -- or returns None, launching
# nothing, when it no longer applies (the entry point then takes its full path). The entry point
# adopts a runner only when exactly one was offered, for its own input tensors, and the call
# returned that runner's outputs unchanged: then the backend's forward (or decode) did nothing but
# that launch for this signature (backends route by signature only: shapes, dtypes, the call, as
# dispatch assumes of supports()), e.g. the hopper backend handing a small call to the triton
# launcher. Keyed by the entry point on the full signature, and used only where its memo hits.
# The dense entry points' runners (``runner(q, k, v, want_lse=True)``) take ``want_lse``: False
# when the caller drops the lse, which then goes to a kept buffer (``triton.launch_decode.lse_sink``,
# per device, stream and thread; fresh while a CUDA graph is captured) instead of a new allocation.
OFFERS: list | None = None


def recording(fn, *args):
    """``(fn(*args), offers)``: the result, and the runners offered while it ran (see above)."""
    global OFFERS
    OFFERS = offers = []
    try:
        res = fn(*args)
    finally:
        OFFERS = None
    return res, offers


def adopt(offers: list, inputs: tuple, outputs: tuple):
    """The runner among ``offers`` that served exactly this call (see above), else None."""
    if len(offers) != 1:
        return None
    ins, outs, runner = offers[0]
    if len(ins) != len(inputs) or len(outs) != len(outputs):
        return None
    if all(a is b for a, b in zip(ins, inputs, strict=True)) and all(
        a is b for a, b in zip(outs, outputs, strict=True)
    ):
        return runner
    return None
