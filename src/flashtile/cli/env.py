"""``flashtile env``: versions, devices, which backends are usable here (and why not)."""

from __future__ import annotations

import argparse
import os
import platform

import torch

from .. import dispatch
from ._util import chosen_backend, device_name, versions


def auto_pick(device_type: str, dtype: torch.dtype) -> str:
    """The backend ``auto`` would pick for a plain call on this device type and dtype."""
    try:
        return chosen_backend(torch.device(device_type), dtype)
    except Exception as e:  # noqa: BLE001 - reported, not raised
        return f"none ({e})"


def cmd_env(args: argparse.Namespace) -> int:
    """Print the environment report; always returns 0."""
    p = print
    v = versions()
    import flashtile

    p(f"flashtile  {v['flashtile']}  ({os.path.dirname(flashtile.__file__)})")
    p(f"python     {v['python']}  ({platform.system()} {platform.machine()})")
    p(f"torch      {v['torch']}  (CUDA build: {torch.version.cuda or 'no'})")
    p(f"triton     {v['triton']}")
    p(f"numpy      {v['numpy']}")
    p("")
    p("devices")
    p(f"  cpu      {device_name(torch.device('cpu'))}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p(f"  cuda:{i}   {device_name(torch.device('cuda', i))}")
    else:
        p("  cuda     not available")
    p("")
    p("backends")
    for name, reason in dispatch.report():
        p(f"  {name:8} {'usable' if reason is None else 'not usable: ' + reason}")
    p("")
    raw = os.environ.get(dispatch.ENV_VAR)
    try:
        req = dispatch.requested()
    except ValueError as e:
        req = f"invalid ({e})"
    p(f"{dispatch.ENV_VAR}={raw if raw is not None else '(unset)'}  ->  requested backend: {req}")
    p("auto picks")
    p(f"  cpu  float32   -> {auto_pick('cpu', torch.float32)}")
    cuda_pick = auto_pick("cuda", torch.float16)
    note = "" if torch.cuda.is_available() else "   (no CUDA device in this process)"
    p(f"  cuda float16   -> {cuda_pick}{note}")
    return 0
