"""Host cost of the Triton backend's launchers on any machine (issue 16), without a GPU.

    PYTHONPATH=src python benchmarks/bench_launch_host.py [--profile NAME] [--n 2000]

The launchers (``backends/triton/launch.py``, ``launch_decode.py``) run as they do on the GPU --
geometry, configs, flags, scalars, allocations, the lean launch's signature key
(``fastlaunch.FastKernel``) -- on small CPU tensors, with each kernel replaced by a fake
``JITFunction`` of the real kernel's parameters whose compiled launcher does nothing, a fake
Triton driver (device 0, a fixed stream) and the ``sm90`` config table. What is not measured:
the CUDA allocator (``torch.empty`` on CUDA costs a few us more than on CPU), the real
launcher's C code (argument packing, ``cuLaunchKernel``: a few us a kernel) and the device
guard's CUDA query. Thread CPU time per call, the fastest of 7 loops, and the Python function calls
per call (cProfile's count: what a busy machine does not disturb); ``--rows a,b`` times those rows
only; ``--profile NAME`` prints a
cProfile of one row (``e2e_fwd``, ``e2e_fwd_bwd``, ``e2e_kv_int``, ``e2e_kv_tensor``, ``e2e_kv_split``, ``e2e_grow``
(the public functions through the triton backend, with the same fakes), ``fwd``, ``bwd``, ``decode``,
``decode_split``, ``dense_decode``).

Rows ``gluon_*`` (``--rows gluon`` selects them all): the Gluon Hopper forwards (``hopper/launch.py``,
``hopper/flex.py``) with fake kernels (``tests/conftest.py::install_fake_hopper_kernels``' kind):
the dense forward b1 s4096 h8 d64 causal bf16 (``launch.forward`` alone, and ``flash_attn_func``
through the hopper backend: the flat path), the flex forward b1 s4096 h4 d128 with a causal block mask
(``flex_triton.launch.forward``, the route's checks by ``gluon_reason`` / ``long_rows`` as on a GPU;
``_device.info`` and ``available()`` not counted), each with the lean host path on and off
(``hopper.launch.LEAN``, flipped around each call of an ``_off`` row).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import types

import torch


def _thread_us(fn, n: int) -> float:
    """bench_lean's timer, the least disturbed loop (a shared machine)."""
    from bench_lean import _thread_us as thread_us  # (this script's folder is on sys.path)

    return thread_us(fn, n, stat=min)


def _py_calls(fn, n: int = 50) -> int:
    """Python-level function calls per call of ``fn`` (cProfile's count, warmed up): a measure of the
    interpreter work that the load on a shared machine does not disturb."""
    for _ in range(20):
        fn()
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    return round(pstats.Stats(pr).total_calls / n)


class _Compiled:
    function, packed_metadata = "fn", "meta"

    def run(self, *args):  # the compiled kernel's launcher: nothing to launch here
        pass


def _fake(kernel):
    """A stand-in with ``kernel``'s parameters, named as FastKernel expects (``JITFunction``)."""
    cls = type("JITFunction", (), {"params": kernel.params})
    fake = cls()
    cls.__getitem__ = lambda self, grid: lambda *a, **kw: _Compiled()
    return fake


def install() -> None:
    """Point the launchers at fake kernels, a fake driver and the sm90 table (for this process)."""
    import triton

    from flashtile.backends.triton import fastlaunch, launch, launch_decode

    drv = types.SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda d: 0)
    triton.runtime.driver = types.SimpleNamespace(active=drv)
    fastlaunch.ENABLED = True
    for mod, names in ((launch, ("_FWD", "_BWD_PRE", "_BWD_DKDV", "_BWD_DQ")),
                       (launch_decode, ("_DECODE", "_MERGE", "_APPEND"))):  # fmt: skip
        for n in names:
            setattr(mod, n, fastlaunch.fast(_fake(getattr(mod, n).fn)))
    launch.arch = lambda device: "sm90"
    # the triton backend serves these CPU tensors (its kernels are the fakes above)
    from flashtile.backends.triton import backend

    backend.available = lambda: None
    backend.supports = lambda problem, call: None


def install_hopper() -> None:
    """The Gluon forward kernels replaced by fakes (as :func:`install` does for the Triton ones); the
    hopper backend usable on CPU tensors; the flex route's device checks answered as on an H200."""
    from flashtile.backends.hopper import backend as hopper_backend
    from flashtile.backends.hopper import flex as HF
    from flashtile.backends.hopper import launch as HL
    from flashtile.backends.triton import fastlaunch

    for n in ("_PLAIN", "_WS", "_PERSISTENT"):
        setattr(HL, n, fastlaunch.fast(_fake(getattr(HL, n).fn)))
    hopper_backend.available = lambda: None
    hopper_backend.supports = lambda problem, call: None

    def use_gluon(q, k, v, call):  # hopper/flex.py's rule without the CUDA queries
        mode = HF.env_mode()
        return HF.gluon_reason(call, tuple(q.shape), tuple(k.shape), v.shape[-1], q.dtype, "cuda", 9, None,
                               mode) is None and HF.long_rows(call.block_mask, mode, q.shape[-1], False,
                                                              call.score_mod)  # fmt: skip

    HF.use_gluon = use_gluon
    from flashtile.backends.flex_triton import backend as flex_backend

    flex_backend.available = lambda: None
    flex_backend.supports = lambda problem, call: None


def gluon_rows() -> dict:
    import flashtile
    from flashtile import masks
    from flashtile.backends.flex_triton import launch as FL
    from flashtile.backends.hopper import launch as HL
    from flashtile.flex import create_block_mask
    from flashtile.spec import make_call

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 4096, 8, 64, dtype=torch.bfloat16) for _ in range(3))
    call = make_call(headdim=64, causal=True)
    qf, kf, vf = (torch.randn(1, 4096, 4, 128, dtype=torch.bfloat16) for _ in range(3))
    bm = create_block_mask(masks.causal, 1, 1, 4096, 4096, device="cpu")  # (rows long enough for Gluon)
    fcall = make_call(headdim=128, block_mask=bm)

    def off(fn):
        def run():
            HL.LEAN = False
            try:
                fn()
            finally:
                HL.LEAN = True

        return run

    qp, kp, vp = (x.transpose(1, 2) for x in (qf, kf, vf))
    flex_attention = flashtile.flex_attention  # (a lazy attribute of the package: looked up once)

    def e2e_flex():  # (main() forces the flex_triton backend for the flex rows)
        flex_attention(qp, kp, vp, block_mask=bm)

    def e2e():  # (main() forces the hopper backend while it times these rows)
        flashtile.flash_attn_func(q, k, v, causal=True)

    table = {
        "gluon_fwd": ("hopper launch.forward b1 s4096 h8 d64 causal bf16 (planned)", lambda: HL.forward(q, k, v, call)),
        "gluon_fwd_off": ("same, lean path off (main's launch)", off(lambda: HL.forward(q, k, v, call))),
        "gluon_e2e": ("flash_attn_func, same shape, hopper backend (flat path)", e2e),
        "gluon_e2e_off": ("same, lean path off", off(e2e)),
        "gluon_flex": ("flex forward b1 s4096 h4 d128 causal block mask, route + Gluon (planned)",
                       lambda: FL.forward(qf, kf, vf, fcall)),
        "gluon_flex_off": ("same, lean path off", off(lambda: FL.forward(qf, kf, vf, fcall))),
        "gluon_flex_e2e": ("flex_attention public, same call", e2e_flex),
        "gluon_flex_e2e_off": ("same, lean path off", off(e2e_flex)),
    }  # fmt: skip
    return table


def rows(dtype=torch.float16):
    from flashtile.backends.triton import launch, launch_decode
    from flashtile.spec import KVCache, make_call

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 128, 8, 64, dtype=dtype) for _ in range(3))
    call = make_call(headdim=64, causal=True)
    out, lse = launch.forward(q, k, v, call)
    dout = torch.randn_like(out)
    qd = torch.randn(1, 1, 32, 128, dtype=dtype)
    kc, vc = (torch.randn(1, 1024, 8, 128, dtype=dtype) for _ in range(2))
    cache = KVCache(k_cache=kc, v_cache=vc, k_new=None, v_new=None, seqlens=1024, batch_idx=None, leftpad=None,
                    block_table=None, rotary=None, capacity=1024)  # fmt: skip
    cache4 = KVCache(**{**cache.__dict__, "num_splits": 4})
    import flashtile

    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))

    def e2e_fb():
        o = flashtile.flash_attn_func(qg, kg, vg, causal=True)
        torch.autograd.grad(o, (qg, kg, vg), dout)

    lens = torch.full((1,), 1000, dtype=torch.int32)
    kbig, vbig = (torch.randn(1, 16384, 8, 128, dtype=dtype) for _ in range(2))
    step = [0]

    def e2e_grow():  # generation: one more key per step, never a length seen before (in 16k calls)
        n = 100 + step[0] % 16000
        step[0] += 1
        flashtile.flash_attn_func(qd, kbig[:, :n], vbig[:, :n], causal=True)

    return {
        "e2e_fwd": ("flash_attn_func forward, whole call (triton backend, fake kernel)",
                    lambda: flashtile.flash_attn_func(q, k, v, causal=True)),
        "e2e_fwd_grad": ("same, inputs requiring grad (the autograd node, no backward)",
                         lambda: flashtile.flash_attn_func(qg, kg, vg, causal=True)),
        "e2e_fwd_bwd": ("same, forward + backward (autograd.grad)", e2e_fb),
        "e2e_kv_int": ("flash_attn_with_kvcache b1 q1 h32/8 d128, int length, whole call",
                       lambda: flashtile.flash_attn_with_kvcache(qd, kc, vc, cache_seqlens=1000, causal=True)),
        "e2e_kv_tensor": ("same, int32 tensor lengths",
                          lambda: flashtile.flash_attn_with_kvcache(qd, kc, vc, cache_seqlens=lens, causal=True)),
        "e2e_kv_split": ("same, int length, num_splits=4 (split pieces merged)",
                         lambda: flashtile.flash_attn_with_kvcache(qd, kc, vc, cache_seqlens=1000, causal=True,
                                                                  num_splits=4)),
        "e2e_grow": ("flash_attn_func q1, key length growing per call (HF generate)", e2e_grow),
        "e2e_dense": ("flash_attn_func q1 over 1k keys, one length every call, whole call",
                      lambda: flashtile.flash_attn_func(qd, kc, vc, causal=True)),
        "fwd": ("triton launch.forward (b1 s128 h8 d64 causal)", lambda: launch.forward(q, k, v, call)),
        "bwd": ("triton launch.backward (same)", lambda: launch.backward(dout, q, k, v, out, lse, call)),
        "decode": ("launch_decode.kvcache (b1 q1 h32/8 d128, int length, 1 piece)",
                   lambda: launch_decode.kvcache(qd, cache, call)),
        "decode_split": ("same, num_splits=4 (merged in it)", lambda: launch_decode.kvcache(qd, cache4, call)),
        "dense_decode": ("launch_decode.dense (flash_attn_func q1 over 1k keys)",
                         lambda: launch_decode.dense(qd, kc, vc, call)),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--profile", default="")
    ap.add_argument("--rows", default="", help="comma-separated row names to time (default: all)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    install()
    import flashtile

    forced = flashtile.dispatch.use_backend("triton")  # for the whole process (kept referenced)
    forced.__enter__()
    table = rows()
    if not args.rows or "gluon" in args.rows:
        install_hopper()
        table.update(gluon_rows())

    def switch(name: str) -> None:  # the triton backend for the Triton rows, hopper for the gluon rows
        nonlocal forced
        want = "flex_triton" if name.startswith("gluon_flex") else "hopper" if name.startswith("gluon") else "triton"
        if getattr(forced, "_flashtile_name", None) != want:
            forced.__exit__(None, None, None)
            forced = flashtile.dispatch.use_backend(want)
            forced.__enter__()
            forced._flashtile_name = want

    forced._flashtile_name = "triton"
    if args.profile:
        _, fn = table[args.profile]
        switch(args.profile)
        for _ in range(200):
            fn()
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(args.n):
            fn()
        pr.disable()
        pstats.Stats(pr).sort_stats("tottime").print_stats(25)
        return
    print("host cost of the Triton launchers (thread CPU us, Python calls, per call; fake kernels, CPU tensors)")
    for name, (label, fn) in table.items():
        if args.rows and name not in args.rows.split(",") and not (name.startswith("gluon") and "gluon" in
                                                                        args.rows.split(",")):  # fmt: skip
            continue
        switch(name)
        print(f"  {label:70s} {_thread_us(fn, args.n):7.1f} {_py_calls(fn):5d}   [{name}]")
    from flashtile.backends.triton import launch, launch_decode

    kerns = [launch._FWD, launch._BWD_PRE, launch._BWD_DKDV, launch._BWD_DQ, launch_decode._DECODE,
             launch_decode._MERGE]  # fmt: skip
    # (the growing key length of e2e_grow meets each int specialisation once: a few generic launches)
    assert all(k.generic_launches <= 8 for k in kerns), [(k.generic_launches, k.fast_launches) for k in kerns]


if __name__ == "__main__":
    main()
