"""A lean launch path for the Triton (and Gluon) kernels: ``fast(kernel)[grid](*args, **constexprs)`` launches
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
of floats and bools; None; for a Gluon host ``TensorDescriptor`` its dtype, block shape, layout and
padding (Triton specialises it on ``tensordesc<dtype[block_shape],layout>``; the launcher builds
the TMA descriptor from its base, shape and strides on every launch); the type of every argument;
the constexpr values; the launch options (``num_warps``, ...); the current device. The key is
computed with C-level gathers: per tuple of argument types, ``operator.itemgetter``s pick the
values keyed as they are, the ints (their classes memoised per tuple of int values) and the
tensors. Parameters the call leaves out take their declared defaults, as Triton's binder
does (a kernel whose new parameters have defaults stays on the lean path; found on the H200,
where such kernels took the generic launch on every call). Tensors never enter the key themselves
(only their dtype and alignment), whether passed by position or by keyword.

Verified against the source of Triton 3.6.0 (the H200's) and 3.9.0 (``JITFunction.run`` and the
NVIDIA ``CudaLauncher``; ``GluonJITFunction`` shares ``JITFunction.run``); other versions, the interpreter (``TRITON_INTERPRET=1``), launch hooks
(profilers such as proton add to ``knobs.runtime.launch_enter_hook``) and
``FLASHTILE_TRITON_FAST_LAUNCH=0`` take Triton's generic launch every time. Knobs that change how
Triton compiles (``TRITON_DEBUG``, instrumentation) are read at the first launch of a key only.
"""

from __future__ import annotations

import inspect
import operator
import os
from collections.abc import Callable
from functools import reduce
from typing import Any

import torch
import triton

from ... import _prewarm

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
        #: parameters with a default value (taken when the call leaves them out, as Triton binds)
        self.defaults: dict[str, Any] = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        self.compiled: dict[tuple, Any] = {}
        #: (number of positional args, keyword names) -> (getter of the other parameters' values from
        #: the keywords and defaults, whether defaults are needed, the launch options' names and getter)
        self._calls: dict[tuple, tuple] = {}
        #: argument types -> getters of (values keyed as they are, ints keyed by class, tensors)
        self._plans: dict[tuple, tuple] = {}
        self.fast = ENABLED and type(fn).__name__ in ("JITFunction", "GluonJITFunction") and bool(self.names)
        self.generic_launches = 0  # counted for the tests and benchmarks
        self.fast_launches = 0

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        return lambda *args, **kwargs: self.launch(grid, args, kwargs)

    def _key_part(self, vals: tuple) -> tuple:
        """The arguments' part of the key, one entry per parameter (the reference form of
        :meth:`_fast_key_part`, which computes an equivalent key faster)."""
        return tuple([v if c else _arg_key(v) for v, c in zip(vals, self.const, strict=True)])

    def _call_plan(self, n: int, kwnames: tuple) -> tuple:
        rest = self.names[n:]
        missing = [name for name in rest if name not in kwnames]
        if any(name not in self.defaults for name in missing):
            raise KeyError(missing)  # a required parameter is missing: Triton raises its own error
        onames = tuple(name for name in kwnames if name not in self.nameset)  # num_warps, num_stages, ...
        plan = (_getter(rest), bool(missing), onames, _getter(onames))
        if len(self._calls) < 256:
            self._calls[(n, kwnames)] = plan
        return plan

    def _type_plan(self, types: tuple) -> tuple:
        """Getters for the positions whose values enter the key as they are (constexprs, and types
        other than int / float / bool / None / tensors), ints (keyed by class) and tensors (keyed by
        dtype and alignment); the types themselves are part of the key."""
        keep, ints, tensors, descs = [], [], [], []
        for i, (t, c) in enumerate(zip(types, self.const, strict=True)):
            if c:
                keep.append(i)
            elif issubclass(t, torch.Tensor):
                tensors.append(i)
            elif t is int:
                ints.append(i)
            elif t.__name__ == "TensorDescriptor" and t.__module__ in _DESCRIPTOR_MODULES:
                descs.append(i)
            elif t not in (float, bool, type(None)):
                keep.append(i)
        plan = (_getter(keep), _getter(ints), _getter(tensors), _getter(descs) if descs else None)
        if len(self._plans) < 256:
            self._plans[types] = plan
        return plan

    def _fast_key_part(self, vals: tuple) -> tuple:
        """The arguments' part of the key: equal exactly when :meth:`_key_part`'s is (for the types
        :func:`_arg_key` distinguishes; stricter on types: ``True`` and ``1`` differ here), computed
        with C-level gathers and one dict lookup for the ints' classes."""
        types = tuple(map(type, vals))
        plan = self._plans.get(types)
        if plan is None:
            plan = self._type_plan(types)
        keep, ints, tensors, descs = plan
        ivals = ints(vals)
        iclass = _INT_CLASSES.get(ivals)
        if iclass is None:
            iclass = tuple(map(_arg_key, ivals))
            if len(_INT_CLASSES) >= 4096:
                _INT_CLASSES.clear()
            _INT_CLASSES[ivals] = iclass
        tkey = tuple([(t.dtype, not (t.data_ptr() & 15)) for t in tensors(vals)])
        if descs is None:
            return types, keep(vals), iclass, tkey
        return types, keep(vals), iclass, tkey, tuple(map(_desc_key, descs(vals)))

    def _resolve(self, args: tuple, kwargs: dict) -> tuple:
        """``(driver, device, key, values)`` of a launch: the compiled kernel's key and every
        positional value (defaults filled as Triton binds them). Raises KeyError (a required
        parameter missing), TypeError / ValueError (an unhashable argument, or too many): the
        callers then leave the launch to Triton, which binds them or raises its own error."""
        n = len(args)
        kwnames = tuple(kwargs)
        get_rest, needs_defaults, onames, get_options = self._calls.get((n, kwnames)) or self._call_plan(n, kwnames)
        if needs_defaults:
            merged = self.defaults.copy()
            merged.update(kwargs)
            extra = get_rest(merged)
        else:
            extra = get_rest(kwargs)
        drv = triton.runtime.driver.active
        device = drv.get_current_device()
        vals = args + extra
        return drv, device, (device, self._fast_key_part(vals), onames, get_options(kwargs)), vals

    def launch(self, grid: tuple[int, ...], args: tuple, kwargs: dict) -> None:
        if _prewarm._PENDING:  # Triton's per-process key, hashed in the background since import
            _prewarm.wait()
        if not self.fast:
            self.fn[grid](*args, **kwargs)
            return
        try:
            drv, device, key, vals = self._resolve(args, kwargs)
            compiled = self.compiled.get(key)
        except (KeyError, TypeError, ValueError):  # see _resolve
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
                     compiled.function, compiled.packed_metadata, None, None, None, *vals)  # fmt: skip
        self.fast_launches += 1


    def prepare(
        self, grid: tuple[int, ...], args: tuple, kwargs: dict, lead: int, descs: int = 0, keep: bool = False,
        vary: tuple[int, ...] = (),
    ) -> Prepared | None:
        """A launcher of this kernel with these arguments, except the first ``lead`` positional ones
        (tensors or None), which each call passes anew: ``prepare(grid, args, kwargs, n)(*args[:n])``
        launches like ``self[grid](*args, **kwargs)`` without recomputing the signature key. Call it
        right after such a launch (the compiled kernel is looked up under its key); None where the
        lean launch does not apply (see :meth:`launch`), or for a launch with an unaligned tensor
        among the leading arguments. The launcher checks on every call what the key read from them
        (each tensor 16-byte aligned, None where None was; their dtypes are the caller's to key),
        the current device, and that no launch hook is set; otherwise it takes :meth:`launch`.

        ``descs``: the first ``descs`` leading arguments are host TensorDescriptors (Gluon's):
        each call's must have what the key read from the prepared ones (dtype, block shape, layout,
        padding: the caller builds them alike, e.g. ``hopper/launch.py``'s templates; their bases'
        alignment is the caller's to check). ``keep``: tensors among the other arguments are kept
        for every call (the caller keys the plan on those objects, e.g. a block mask's lists);
        otherwise such a launch is not prepared.

        ``vary``: positions (among the positional arguments after the first ``lead``) of ints that
        each call may pass anew through :meth:`Prepared.go_vary` / :meth:`Prepared.call_vary`; the
        caller keys the plan on their classes (:func:`int_classes`: what Triton specialises ints on),
        so that the compiled kernel stays the one for them."""
        if not self.fast:
            return None
        try:
            _, device, key, vals = self._resolve(args, kwargs)
            compiled = self.compiled.get(key)
        except (KeyError, TypeError, ValueError):  # see _resolve
            return None
        head = args[:lead]
        if compiled is None or any(not _is_desc(a) for a in head[:descs]):
            return None
        rest = head[descs:]
        if any(a is not None and (not isinstance(a, torch.Tensor) or a.data_ptr() & 15) for a in rest):
            return None
        if not keep and any(isinstance(a, torch.Tensor) for a in vals[lead:]):  # kept for later calls
            return None
        if any(not 0 <= i < len(args) - lead or type(args[lead + i]) is not int for i in vary):
            return None
        g = (*grid, 1, 1)[:3]
        return Prepared(self, grid, args[lead:], kwargs, compiled, device, g, lead,
                        [i for i, a in enumerate(head) if a is not None and i >= descs], vals[lead:],
                        _direct(compiled, descs), descs, tuple(vary))  # fmt: skip


class Prepared:
    """A launch prepared by :meth:`FastKernel.prepare`; call it with the leading arguments."""

    __slots__ = ("kernel", "grid", "args", "kwargs", "compiled", "device", "g", "lead", "tensors", "nones", "none_vals",
                 "tail", "direct", "descs", "vary", "vary_get", "last_vary")

    def __init__(self, kernel, grid, args, kwargs, compiled, device, g, lead, tensors, tail, direct=None,
                 descs=0, vary=()) -> None:  # fmt: skip
        self.kernel, self.grid, self.args, self.kwargs = kernel, grid, args, kwargs
        self.compiled, self.device, self.g, self.lead, self.tail = compiled, device, g, lead, tail
        #: (launch, cooperative, pdl) of the C launcher, and with descriptors (make_tensordesc_arg,
        #: their metadata) (see _direct); or None
        self.direct = direct
        self.descs = descs  # the number of leading host TensorDescriptors
        self.vary = vary  # positions in args / tail of the ints go_vary takes anew (see FastKernel.prepare)
        self.last_vary: tuple = (None, None)  # go_vary's last (ints, tail)
        at = list(range(len(tail)))  # the tail with the ints at `vary` taken from after it (tail + ints)
        for j, i in enumerate(vary):
            at[i] = len(tail) + j
        self.vary_get = _getter(at)
        #: getters of the leading tensors and of the leading Nones (C-level gathers)
        self.tensors = _getter(tensors)
        nones = [i for i in range(descs, lead) if i not in tensors]
        self.nones, self.none_vals = _getter(nones), (None,) * len(nones)

    def __call__(self, *head: Any) -> None:
        if not self.go(*head):
            self.kernel.launch(self.grid, head + self.args, self.kwargs)

    def go_vary(self, head: tuple, ints: tuple) -> bool:
        """:meth:`go` with the ints at the positions ``vary`` (see :meth:`FastKernel.prepare`) replaced
        by ``ints``, which must have the classes the caller keyed this launch on."""
        last = self.last_vary
        if last[0] is not ints:  # (a caller passes the same tuple again for the same ints)
            self.last_vary = last = (ints, self.vary_get(self.tail + ints))  # (one C-level gather)
        return self.go(*head, tail=last[1])

    def call_vary(self, head: tuple, ints: tuple) -> None:
        """:meth:`__call__` with ``ints`` at the positions ``vary`` (see :meth:`go_vary`)."""
        if not self.go_vary(head, ints):
            args = list(self.args)
            for i, x in zip(self.vary, ints, strict=True):
                args[i] = x
            self.kernel.launch(self.grid, head + tuple(args), self.kwargs)

    def go(self, *head: Any, tail: Any = None) -> bool:
        """Launch through the compiled kernel's launcher if what the key read still holds (see
        :meth:`FastKernel.prepare`), and say whether it did; launches nothing otherwise (the caller
        then takes :meth:`__call__` or its own slow path, e.g. with the device made current).
        ``tail``: the prepared arguments after the leading ones (:meth:`go_vary`'s), else None."""
        if tail is None:
            tail = self.tail
        drv = triton.runtime.driver.active
        get = drv.get_current_device
        # torch.cuda.current_device() once CUDA is initialised is _cuda_getDevice() (its lazy-init check skipped)
        device = _cuda_get_device() if get is _torch_current_device and _torch_cuda._initialized else get()
        rt = _knobs.runtime
        enter, leave = rt.launch_enter_hook, rt.launch_exit_hook  # (_hooked, inline)
        if device != self.device or len(head) != self.lead or (enter is not None and getattr(enter, "calls", True)) \
                or (leave is not None and getattr(leave, "calls", True)) or self.nones(head) != self.none_vals:  # fmt: skip
            return False
        try:  # every leading tensor 16-byte aligned (a non-tensor raises: the generic launch decides)
            if reduce(_or, map(_data_ptr, self.tensors(head)), 0) & 15:
                return False
        except TypeError:
            return False
        c, g, d = self.compiled, self.g, self.direct
        if d is None:
            c.run(g[0], g[1], g[2], drv.get_current_stream(device), c.function, c.packed_metadata, None, None, None,
                  *head, *tail)  # fmt: skip
        elif self.descs:  # the descriptors expanded as the launcher's wrapper expands them (see _direct)
            n, mk = self.descs, d[3]
            x = []
            for a, m in zip(head[:n], d[4], strict=True):
                x += mk(a, m)
            d[0](g[0], g[1], g[2], drv.get_current_stream(device), c.function, d[1], d[2], None, None,
                 c.packed_metadata, None, None, None, *x, *head[n:], *tail)  # fmt: skip
        else:  # what CudaLauncher.__call__ would pass its C launcher (see _direct)
            d[0](g[0], g[1], g[2], drv.get_current_stream(device), c.function, d[1], d[2], None, None,
                 c.packed_metadata, None, None, None, *head, *tail)  # fmt: skip
        self.kernel.fast_launches += 1
        return True


#: Triton versions whose ``CudaLauncher.__call__`` :func:`_direct` may skip (checked against the source)
DIRECT_VERSIONS = ("3.6",)
_CALL_ARGS = ("self", "gridX", "gridY", "gridZ", "stream", "function")


def _direct(compiled: Any, descs: int = 0) -> tuple | None:
    """``(launch, launch_cooperative_grid, launch_pdl)`` of a compiled kernel's launcher when a
    prepared launch may call its C ``launch`` itself: Triton 3.6's NVIDIA ``CudaLauncher.__call__(gridX,
    gridY, gridZ, stream, function, *args)`` only allocates the global and profile scratch buffers
    (none when their sizes are 0: it passes None) and calls ``self.launch(gridX, gridY, gridZ, stream,
    function, launch_cooperative_grid, launch_pdl, global_scratch, profile_scratch, *args)``; skipping
    it saves a Python frame, a closure and two calls per launch. None elsewhere (other versions,
    another ``__call__`` signature, a kernel with scratch, no such attributes): the launcher's call.

    ``descs`` > 0 (the kernel's first ``descs`` parameters are host TensorDescriptors): Triton 3.6's
    ``self.launch`` is then ``wrap_handle_tensordesc``'s closure ``inner``, which loops over every
    argument to replace each descriptor by ``make_tensordesc_arg(desc, meta)`` (the TMA map, shape,
    strides) before the C launcher; the tuple then is ``(C launch, cooperative, pdl,
    make_tensordesc_arg, the descriptors' metadata)``, read from the closure, so that a prepared
    launch expands its descriptors itself (the same function on the same metadata) -- only when the
    closure is that wrapper (its free variables, the base-argument count 13) and its descriptor
    positions are exactly the first ``descs``."""
    if ".".join(triton.__version__.split(".")[:2]) not in DIRECT_VERSIONS:
        return None
    try:
        launcher = compiled.run
        code = type(launcher).__call__.__code__
        if type(launcher).__name__ != "CudaLauncher" or code.co_varnames[:6] != _CALL_ARGS or \
                code.co_argcount != 6 or not code.co_flags & inspect.CO_VARARGS:  # fmt: skip
            return None
        if launcher.global_scratch_size != 0 or launcher.profile_scratch_size != 0:
            return None
        if not descs:
            return launcher.launch, launcher.launch_cooperative_grid, launcher.launch_pdl
        inner = launcher.launch
        cells = dict(zip(inner.__code__.co_freevars, (c.cell_contents for c in inner.__closure__), strict=True))
        mk = inner.__globals__.get("make_tensordesc_arg")
        if inner.__name__ != "inner" or set(cells) != _WRAP_VARS or inner.__globals__.get("_BASE_ARGS_FORMAT_LEN") \
                != 13 or not callable(mk) or set(cells["tensordesc_indices"]) != set(range(descs)):  # fmt: skip
            return None
        metas = tuple(cells["tensordesc_meta"])
        if len(metas) != descs:
            return None
        return cells["launcher"], launcher.launch_cooperative_grid, launcher.launch_pdl, mk, metas
    except (AttributeError, TypeError, ValueError):
        return None


_WRAP_VARS = frozenset({"launcher", "tensordesc_indices", "tensordesc_meta"})


_data_ptr = torch.Tensor.data_ptr
_torch_cuda = torch.cuda
_cuda_get_device = getattr(torch._C, "_cuda_getDevice", None)
#: Triton's driver's device getter, when it is torch.cuda.current_device (Triton 3.6 and 3.9), which
#: prepared launches replace by its C call once torch.cuda is initialised (its lazy-init check passed)
_torch_current_device = torch.cuda.current_device if _cuda_get_device is not None and \
    hasattr(torch.cuda, "_initialized") else object()  # fmt: skip
_or = operator.or_


#: modules whose ``TensorDescriptor`` (a TMA descriptor on the host) the key knows (:func:`_desc_key`)
_DESCRIPTOR_MODULES = ("triton.experimental.gluon.nvidia.hopper",)


def _is_desc(a: Any) -> bool:
    """Whether ``a`` is a host TensorDescriptor the key knows (:func:`_desc_key`)."""
    t = type(a)
    return t.__name__ == "TensorDescriptor" and t.__module__ in _DESCRIPTOR_MODULES


def _desc_key(d: Any) -> tuple:
    """The key of a host TensorDescriptor: what Triton specialises it on (Triton 3.6 and 3.9:
    ``tensordesc<dtype[block_shape],layout>``, no shape or stride), and its padding mode (read by
    the launcher); the launcher reads its base, shape and strides on every launch."""
    return d.base.dtype, tuple(d.block_shape), getattr(d, "layout", None), d.padding


#: ints of a launch (a tuple of values) -> their classes (:func:`_arg_key`), shared by the kernels
_INT_CLASSES: dict[tuple, tuple] = {}


def int_classes(ints: tuple) -> tuple:
    """What a launch's key reads of these ints (one class each: :func:`_int_key`)."""
    return tuple(map(_int_key, ints))


def _getter(idx: Any) -> Callable[[Any], tuple]:
    """``operator.itemgetter`` that always returns a tuple (of 0, 1 or more items)."""
    idx = tuple(idx)
    if not idx:
        return lambda _: ()
    if len(idx) == 1:
        i = idx[0]
        return lambda x: (x[i],)
    return operator.itemgetter(*idx)


def fast(fn: Any) -> FastKernel:
    """``fn`` wrapped for the lean launch path (a no-op wrapper where it does not apply)."""
    return FastKernel(fn)


__all__ = ["FastKernel", "fast", "ENABLED", "VERIFIED"]
