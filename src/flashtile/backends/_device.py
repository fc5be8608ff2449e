"""What the backends ask of a CUDA device (compute capability, SMs, shared memory), read once
per device and cached: the one place for it.

Inside a ``torch.compile`` trace only the cache is read (the queries return tuples and objects
Dynamo cannot put in a graph): :func:`capability` then answers None for a device never asked
about eagerly, and callers skip the check.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DeviceInfo:
    major: int
    minor: int
    sm_count: int
    smem_per_sm: int  # bytes of shared memory per SM

    @property
    def arch(self) -> str:
        """``sm90`` (Hopper and newer), ``sm80`` (A100) or ``sm86`` (other Ampere / Ada parts), or ``hip``."""
        if getattr(torch.version, "hip", None):
            return "hip"
        if self.major >= 9:
            return "sm90"
        return "sm80" if (self.major, self.minor) == (8, 0) else "sm86"


_INFO: dict[int, DeviceInfo] = {}


def info(device: torch.device | int | None = None) -> DeviceInfo | None:
    """The device's :class:`DeviceInfo` (None only inside a trace, before any eager query)."""
    index = device.index if isinstance(device, torch.device) else device
    if index is None:
        if torch.compiler.is_compiling():
            return next(iter(_INFO.values()), None)
        index = torch.cuda.current_device()
    found = _INFO.get(index)
    if found is None and not torch.compiler.is_compiling():
        p = torch.cuda.get_device_properties(index)
        smem = getattr(p, "shared_memory_per_multiprocessor", 0) or 228 * 1024
        found = _INFO[index] = DeviceInfo(p.major, p.minor, p.multi_processor_count, smem)
    return found
