"""Does Gluon emit a named barrier through inline PTX? Compiles a tiny 8-warp kernel for sm_90 (no
GPU needed; run with a Python that has Triton 3.6) in which warpgroup 0 waits at named barrier 9
(``bar.sync 9, 256``) for warpgroup 1's arrival (``bar.arrive 9, 256``), one thread per element of
a 256-wide tensor, and prints the PTX and SASS lines with barriers::

    /work/tri36/bin/python scripts/gluon_named_barrier_probe.py

Triton 3.6 (this stop): ``@!P0 BAR.SYNC.DEFER_BLOCKING 0x9, 0x100`` and ``@P0 BAR.ARV 0x9, 0x100``:
per-warpgroup synchronisation inside one partition is expressible (benchmarks/NOTES.md, stop 26).
"""

from __future__ import annotations

import triton
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource

#: warpgroup 0 (threads 0-127) waits at named barrier 9, warpgroup 1 arrives there
WAIT_OR_ARRIVE = gl.constexpr(
    "{ .reg .pred p; setp.ge.s32 p, $1, 128; @!p bar.sync 9, 256; @p bar.arrive 9, 256; mov.b32 $0, $1; }"
)


@gluon.jit
def probe(X, Y, num_warps: gl.constexpr):
    lay: gl.constexpr = gl.BlockedLayout([1], [32], [num_warps], [0])
    idx = gl.arange(0, 32 * num_warps, layout=lay)
    x = gl.load(X + idx)
    t = gl.inline_asm_elementwise(WAIT_OR_ARRIVE, "=r,r", [idx], dtype=gl.int32, is_pure=False, pack=1)
    gl.store(Y + idx, x + t.to(gl.float32))


def main() -> None:
    k = triton.compile(GluonASTSource(probe, {"X": "*fp32", "Y": "*fp32"}, {"num_warps": 8}),
                       target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))  # fmt: skip
    print("triton", triton.__version__)
    print("PTX:", [ln.strip() for ln in k.asm["ptx"].splitlines() if "bar." in ln])
    from triton.tools.disasm import get_sass

    print("SASS:", [ln.strip() for ln in get_sass(k.asm["cubin"]).splitlines() if "BAR" in ln])


if __name__ == "__main__":
    main()
