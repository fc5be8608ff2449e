"""A lean launch path for the Triton kernels: ``fast(kernel)[grid](*args, **constexprs)`` launches
like ``kernel[grid](...)``, but after the first launch of a specialisation it calls the compiled
kernel's own launcher directly instead of Triton's generic per-call work (argument binding, the
specialisation of every argument, the string cache key, knob reads, the global-value check).

How: the first launch with a given *signature key* goes through ``kernel[grid](...)``, which
compiles (or loads from Triton's cache) and returns the ``CompiledKernel``; it is kept under that
key. Later launches with the same key call ``compiled.run(grid_x, grid_y, grid_z, stream,
compiled.function, compiled.packed_metadata, None, None, None, *args)`` with every parameter in
declaration order, which is exactly the call Triton's ``JITFunction.run`` ends with.

The signature key refines Triton's specialisation, so two launches with the same key get the same
compiled kernel from Triton: for each tensor its dtype and whether its address is 16-byte aligned;
for each int whether it is 1, whether it is a multiple of 16 and its integer width class; the type
of floats and bools; None; the constexpr values; the launch options (``num_warps``, ...); the
current device. Parameters the call leaves out take their declared defaults, as Triton's binder
does (a kernel whose new parameters have defaults stays on the lean path; found on the H200,
where such kernels took the generic launch on every call). Tensors never enter the key themselves
(only their dtype and alignment), whether passed by position or by keyword.

Verified against the source of Triton 3.6.0 (the H200's) and 3.9.0 (``JITFunction.run`` and the
NVIDIA ``CudaLauncher``); other versions, the interpreter (``TRITON_INTERPRET=1``), launch hooks
(profilers such as proton add to ``knobs.runtime.launch_enter_hook``) and
``FLASHTILE_TRITON_FAST_LAUNCH=0`` take Triton's generic launch every time. Knobs that change how
Triton compiles (``TRITON_DEBUG``, instrumentation) are read at the first launch of a key only.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from typing import Any

import torch
import triton

#: Triton versions whose launch path this module was checked against (major.minor).
VERIFIED = ("3.6", "3.9")
_INT32 = 1 << 31


def _version_ok() -> bool:
    return ".".join(triton.__version__.split(".")[:2]) in VERIFIED


ENABLED = os.environ.get("FLASHTILE_TRITON_FAST_LAUNCH", "1").strip().lower() not in ("0", "false", "off", "no") \
    and _version_ok()  # fmt: skip

try:  # where the launch hooks live (Triton >= 3.3)
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older Triton: never fast
    _knobs = None
    ENABLED = False


_INT_KEYS: dict[int, int] = {}


def _int_key(a: int) -> int:
    width = 0 if -_INT32 <= a < _INT32 else (1 if -(1 << 63) <= a < (1 << 63) else 2)
    return 3 * width + (0 if a == 1 else (1 if (a & 15) == 0 else 2))


def _arg_key(a: Any) -> Any:
    """The part of the signature key for one non-constexpr argument (see the module docstring).
    Ordered by frequency and cost (``isinstance`` against ``torch.Tensor`` goes through its
    metaclass: last); int keys are memoised (strides and lengths repeat)."""
    t = type(a)
    if t is int:
        k = _INT_KEYS.get(a)
        if k is None:
            k = _int_key(a)
            if len(_INT_KEYS) < 65536:
                _INT_KEYS[a] = k
        return k
    if t is torch.Tensor:
        return a.dtype, not (a.data_ptr() & 15)
    if a is None:
        return None
    if t is float or t is bool:
        return t
    if isinstance(a, torch.Tensor):  # a subclass (nn.Parameter, ...)
        return a.dtype, not (a.data_ptr() & 15)
    return t, a  # anything else (numpy scalars, ...): keyed on its value


def _hooked(hook: Any) -> bool:
    """Whether a launch hook is set: a function, or a non-empty ``HookChain`` (Triton >= 3.5 keeps
    an empty chain there by default and calls it on every generic launch)."""
    return hook is not None and bool(getattr(hook, "calls", True))


class FastKernel:
    """Wraps a ``triton.jit`` kernel: ``FastKernel(kernel)[grid](*args, **kwargs)`` launches it as
    ``kernel[grid](*args, **kwargs)`` does (see the module docstring)."""

    def __init__(self, fn: Any) -> None:
        self.fn = fn
        params = list(getattr(fn, "params", ()))
        self.names: tuple[str, ...] = tuple(p.name for p in params)
        self.nameset = frozenset(self.names)
        #: per parameter: whether it is a constexpr (its value is part of the key, not its class)
        self.const: tuple[bool, ...] = tuple(bool(p.is_constexpr) for p in params)
        #: how many leading parameters are not constexprs
        self.plain_head = next((i for i, c in enumerate(self.const) if c), len(self.const))
        #: parameters with a default value (taken when the call leaves them out, as Triton binds)
        self.defaults: dict[str, Any] = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        self.compiled: dict[tuple, Any] = {}
        self.fast = ENABLED and type(fn).__name__ == "JITFunction" and bool(self.names)
        self.generic_launches = 0  # counted for the tests and benchmarks
        self.fast_launches = 0

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def _key_part(self, args: tuple, extra: tuple) -> tuple:
        """The arguments' part of the key: constexprs by value, the others by :func:`_arg_key`."""
        const = self.const
        if len(args) <= self.plain_head:  # the usual call: positional arguments are all non-constexpr
            head = tuple(map(_arg_key, args))
        else:
            head = tuple([v if c else _arg_key(v) for v, c in zip(args, const[: len(args)], strict=True)])
        return head + tuple([v if c else _arg_key(v) for v, c in zip(extra, const[len(args):], strict=True)])

    def launch(self, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
        if not self.fast:
            self.fn[grid](*args, **kwargs)
            return
        names = self.names
        n = len(args)
        defaults = self.defaults
        try:
            extra = tuple([kwargs[name] if name in kwargs else defaults[name] for name in names[n:]])
        except KeyError:  # a required parameter is missing: Triton raises its own error
            self.fn[grid](*args, **kwargs)
            return
        nameset = self.nameset
        options = tuple(kv for kv in kwargs.items() if kv[0] not in nameset)  # num_warps, num_stages, ...
        drv = triton.runtime.driver.active
        device = drv.get_current_device()
        try:
            key = (device, self._key_part(args, extra), options)
            compiled = self.compiled.get(key)
        except (TypeError, ValueError):  # an unhashable argument, or too many: Triton binds them
            self.fn[grid](*args, **kwargs)
            return
        rt = _knobs.runtime
        if compiled is None or _hooked(rt.launch_enter_hook) or _hooked(rt.launch_exit_hook):
            compiled = self.fn[grid](*args, **kwargs)
            self.generic_launches += 1
            if compiled is not None and hasattr(compiled, "packed_metadata") and hasattr(compiled, "function"):
                self.compiled[key] = compiled
            return
        g = len(grid)
        compiled.run(grid[0], grid[1] if g > 1 else 1, grid[2] if g > 2 else 1, drv.get_current_stream(device),
                     compiled.function, compiled.packed_metadata, None, None, None, *args, *extra)  # fmt: skip
        self.fast_launches += 1


def fast(fn: Any) -> FastKernel:
    """``fn`` wrapped for the lean launch path (a no-op wrapper where it does not apply)."""
    return FastKernel(fn)


__all__ = ["FastKernel", "fast", "ENABLED", "VERIFIED"]
