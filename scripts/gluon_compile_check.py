"""Compile every variant of the Gluon Hopper kernels for sm_90 on a machine without a GPU.

Run with a Python that has Triton 3.6 (torch is not needed): the kernels and the config table are
loaded from their files, not through the ``flashtile`` package::

    /work/tri36/bin/python scripts/gluon_compile_check.py [--quick] [--jobs 8] [--dump DIR]
    /work/tri36/bin/python scripts/gluon_compile_check.py --fp8 [--quick]   # the FP8 kernel
    /work/tri36/bin/python scripts/gluon_compile_check.py --flex [--headdim 128]   # the ws kernel's FLEX mode
    /work/tri36/bin/python scripts/gluon_compile_check.py --flex --only fwd --set flex_prefetch=1   # FLEX_PREFETCH

(``--flex`` flags its small spills too: values live across the partitions' register reallocation
at kernel entry, once per CTA, and the bias table's gather in the partial-block loop; see
benchmarks/NOTES.md, "Flex forward on the Gluon Hopper ws kernel". ``FLEX_ONLY=name,..`` compiles
a subset of FLEX_VARIANTS.)

For every (kernel, dtype, head dim, mask option, varlen) it prints the shared memory, registers
and spills (``ptxas -v``), whether the SASS has HGMMA (wgmma) and UTMALDG (TMA loads) and any
local-memory traffic, and exits 1 if a variant fails to compile, spills, or lacks HGMMA/UTMALDG.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import dataclasses
import importlib.util
import os
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "src" / "flashtile" / "backends" / "hopper"

MASKS = {
    "none": dict(HAS_WL=False, HAS_WR=False, HAS_SOFTCAP=False),
    "causal": dict(HAS_WL=False, HAS_WR=True, HAS_SOFTCAP=False),
    "window": dict(HAS_WL=True, HAS_WR=True, HAS_SOFTCAP=False),
    "softcap": dict(HAS_WL=False, HAS_WR=False, HAS_SOFTCAP=True),
    "causal+softcap": dict(HAS_WL=False, HAS_WR=True, HAS_SOFTCAP=True),
}


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def _load_bwd():
    """bwd.py imports ``.fwd``: load both as modules of a stand-in package (no flashtile import)."""
    if "hopper_pkg.bwd" in sys.modules:
        return sys.modules["hopper_pkg.bwd"]
    import types

    pkg = types.ModuleType("hopper_pkg")
    pkg.__path__ = [str(PKG)]
    sys.modules["hopper_pkg"] = pkg
    import importlib

    return importlib.import_module("hopper_pkg.bwd")


def _desc_sig(dtype: str, rows: int, d: int, varlen: bool, block: list[int] | None = None) -> str:
    """The launcher's signature string of a descriptor made by launch._descriptor (d: BLOCK_D), or
    of any ``block`` (its last dim contiguous)."""
    from triton.experimental.gluon import language as gl

    bits = 8 if dtype.startswith("fp8") else 32 if dtype == "fp32" else 16
    if block is None:
        block = [rows, 1, d] if varlen else [1, rows, 1, d]
    row = block[-1] * bits // 8
    sw = next((s for s in (128, 64, 32) if row % s == 0), 0)
    layout = gl.NVMMASharedLayout(swizzle_byte_width=sw, element_bitwidth=bits, rank=len(block))
    return f"tensordesc<{dtype}[{', '.join(map(str, block))}],{layout!r}>"


def _aligned_pointers(fn, sig: dict) -> dict:
    """The specialisation a launch gives its 16-byte aligned tensors (every pointer argument here: the
    launchers' are torch allocations or checked), so that vectorised accesses compile as they run."""
    return {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n, t in sig.items() if t.startswith("*")}


def compile_one_fp8(d: int, mask: str, varlen: bool, descales: bool, overrides: dict, dump: str | None) -> dict:
    """Compile one variant of the FP8 kernel (fwd_fp8.attn_fwd_ws_fp8)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    configs = _load("hopper_configs", PKG / "configs.py")
    _load("hopper_fwd", PKG / "fwd.py")
    fwd8 = _load_fp8()
    overrides = dict(overrides)
    trace = bool(overrides.pop("fp8_trace", 0))  # (--set fp8_trace=1: the kernel's TRACE, launch.FP8_TRACE)
    cfg = configs.fp8_config(d, **overrides)
    tiles = f"{cfg.block_m}x{cfg.block_n}x{cfg.num_stages}"
    name = f"fp8 ws e4m3 d={d} {mask}{' varlen' if varlen else ''}{'' if descales else ' no-descale'} {tiles}"
    name += " trace" if trace else ""
    res = {"name": name, "ok": False}
    bad = configs.check_fp8(cfg, d)
    if bad:
        res["error"] = bad
        return res
    if varlen and cfg.consumers == 3:  # (spills at 160 registers without the packed-P path of dense calls)
        res.update(ok=True, skipped="FP8 varlen calls run the bf16 kernel on dequantised inputs (hopper backend)")
        return res
    if cfg.persistent and (varlen or trace):
        res.update(ok=True, skipped="the persistent FP8 kernel serves dense calls, without the trace")
        return res
    bd = configs.block_d(d)
    vt_block = [1, bd, cfg.block_n] if varlen else [1, 1, bd, cfg.block_n]
    ptr = "*fp32" if descales else "constexpr"
    sig = {
        "q_desc": _desc_sig("fp8e4nv", cfg.q_rows, bd, varlen), "k_desc": _desc_sig("fp8e4nv", cfg.block_n, bd, varlen),
        "vt_desc": _desc_sig("fp8e4nv", 0, bd, varlen, vt_block), "o_desc": _desc_sig("bf16", cfg.q_rows, bd, varlen),
        "O": "*bf16", "LSE": "*fp32",
        "CU_Q": "*i32" if varlen else "constexpr", "CU_K": "*i32" if varlen else "constexpr",
        "QD": ptr, "KD": ptr, "VD": ptr,
        "sqd_b": "i32", "sqd_h": "i32", "skd_b": "i32", "skd_h": "i32", "svd_b": "i32", "svd_h": "i32",
        "stride_os": "i32", "stride_oh": "i32", "stride_lb": "i32", "stride_lh": "i32",
        "seqlen_q": "i32", "seqlen_k": "i32", "group": "i32", "qk_scale": "fp32", "cap_out": "fp32",
        "window_left": "i32", "window_right": "i32",
    }  # fmt: skip
    consts = dict(HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NUM_STAGES=cfg.num_stages,
                  IS_VARLEN=varlen, REVERSE_M=MASKS[mask]["HAS_WR"], num_warps=cfg.num_warps,
                  CONSUMER_REGS=cfg.consumer_regs, PRODUCER_REGS=cfg.producer_regs, **MASKS[mask],
                  **configs.fp8_flags(cfg))  # fmt: skip
    if not varlen:
        consts.update(CU_Q=None, CU_K=None)
    if not descales:
        consts.update(QD=None, KD=None, VD=None)
    if trace:
        sig.update(TRACE_BUF="*i64", TRACE_CAP="i32", TRACE_PROGS="i32")
        consts["TRACE"] = True
    if cfg.persistent:  # attn_fwd_persistent_fp8: the tile list instead of cu_seqlens; n_mb and nheads added
        order = ("q_desc", "k_desc", "vt_desc", "o_desc", "O", "LSE", "TILES", "OFFS", "QD", "KD", "VD", "sqd_b",
                 "sqd_h", "skd_b", "skd_h", "svd_b", "svd_h", "stride_os", "stride_oh", "stride_lb", "stride_lh",
                 "seqlen_q", "seqlen_k", "group", "n_mb", "nheads", "qk_scale", "cap_out", "window_left",
                 "window_right")  # fmt: skip
        sig = {k: {"TILES": "*i32", "OFFS": "*i32", "n_mb": "i32", "nheads": "i32"}.get(k) or sig[k] for k in order}
        for k in ("CU_Q", "CU_K", "IS_VARLEN", "REVERSE_M"):
            consts.pop(k, None)
        consts["Q_BUFS"] = configs.fp8_q_buffers(cfg, d)
        res["name"] = name = name.replace("fp8 ws", f"fp8 persistent q{consts['Q_BUFS']}")
    for k in consts:
        sig[k] = "constexpr"
    try:
        fn = fwd8.attn_fwd_persistent_fp8 if cfg.persistent else fwd8.attn_fwd_ws_fp8
        _defaults(fn, sig, consts)
        k = triton.compile(GluonASTSource(fn, sig, consts, _aligned_pointers(fn, sig)),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=cfg.num_warps))  # fmt: skip
    except Exception as e:  # report, do not stop the other variants
        res["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        res["trace"] = str(e)
        return res
    return _analyse(k, res, name, dump)


def _load_fp8():
    """fwd_fp8.py imports ``.fwd`` relatively: load both as modules of a stand-in package."""
    import types

    pkg = sys.modules.get("hopper_pkg")
    if pkg is None:
        pkg = types.ModuleType("hopper_pkg")
        pkg.__path__ = [str(PKG)]
        sys.modules["hopper_pkg"] = pkg
        _load("hopper_pkg.fwd", PKG / "fwd.py")
    return _load("hopper_pkg.fwd_fp8", PKG / "fwd_fp8.py")


def compile_one(kernel: str, dtype: str, d: int, mask: str, varlen: bool, overrides: dict, dump: str | None) -> dict:
    """Compile one variant; returns a dict of what the report prints."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    configs = _load("hopper_configs", PKG / "configs.py")
    fwd = _load("hopper_fwd", PKG / "fwd.py")
    cfg = configs.config(d, kernel=kernel, **overrides)
    tiles = f"{cfg.block_m}x{cfg.block_n}x{cfg.num_stages}"
    name = f"{cfg.kernel} {dtype} d={d} {mask}{' varlen' if varlen else ''} {tiles}"
    res = {"name": name, "ok": False}
    bad = configs.check(cfg, d)
    if bad:
        res["error"] = bad
        return res
    if cfg.kernel == "persistent" and varlen:
        res.update(ok=True, skipped="varlen calls run the ws kernel")
        return res
    fn = {"plain": fwd.attn_fwd_plain, "ws": fwd.attn_fwd_ws, "persistent": fwd.attn_fwd_persistent}[cfg.kernel]
    bd = configs.block_d(d)
    sig = {
        "q_desc": _desc_sig(dtype, cfg.q_rows, bd, varlen), "k_desc": _desc_sig(dtype, cfg.block_n, bd, varlen),
        "v_desc": _desc_sig(dtype, cfg.block_n, bd, varlen), "o_desc": _desc_sig(dtype, cfg.q_rows, bd, varlen),
        "O": f"*{dtype}", "LSE": "*fp32",
        "CU_Q": "*i32" if varlen else "constexpr", "CU_K": "*i32" if varlen else "constexpr",
        "stride_os": "i32", "stride_oh": "i32", "stride_lb": "i32", "stride_lh": "i32",
        "seqlen_q": "i32", "seqlen_k": "i32", "group": "i32", "qk_scale": "fp32", "cap_out": "fp32",
        "window_left": "i32", "window_right": "i32",
    }  # fmt: skip
    consts = dict(HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NUM_STAGES=cfg.num_stages,
                  IS_VARLEN=varlen, REVERSE_M=MASKS[mask]["HAS_WR"], num_warps=cfg.num_warps,
                  **MASKS[mask])  # fmt: skip
    if not varlen:
        consts.update(CU_Q=None, CU_K=None)
    if cfg.kernel != "plain":
        consts.update(CONSUMER_REGS=cfg.consumer_regs, PRODUCER_REGS=cfg.producer_regs, NUM_CONSUMERS=cfg.consumers,
                      WAIT_FENCE=bool(cfg.wait_fence))
    if cfg.kernel == "persistent":
        for key in ("CU_Q", "CU_K", "IS_VARLEN", "REVERSE_M"):
            sig.pop(key, None)
            consts.pop(key)
        sig = {**{k: v for k, v in sig.items() if k in ("q_desc", "k_desc", "v_desc", "o_desc", "O", "LSE")},
               "TILES": "*i32", "OFFS": "*i32",
               **{k: v for k, v in sig.items() if k.startswith("stride_")},
               "seqlen_q": "i32", "seqlen_k": "i32", "group": "i32", "n_mb": "i32", "nheads": "i32",
               "qk_scale": "fp32", "cap_out": "fp32", "window_left": "i32", "window_right": "i32",
               **{k: "constexpr" for k in consts}}  # fmt: skip
    for k in consts:
        sig[k] = "constexpr"
    _defaults(fn, sig, consts)
    try:
        k = triton.compile(GluonASTSource(fn, sig, consts, _aligned_pointers(fn, sig)),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=cfg.num_warps))  # fmt: skip
    except Exception as e:  # report, do not stop the other variants
        res["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        res["trace"] = str(e)
        return res
    return _analyse(k, res, name, dump)


def _defaults(fn, sig: dict, consts: dict) -> None:
    """Arguments the variant leaves out take their defaults, as constexprs (the ws kernel's flex
    arguments: None and False when the flex mode is off, as a launch without them compiles)."""
    import inspect

    for name, par in inspect.signature(fn.fn).parameters.items():
        if name not in sig and par.default is not inspect.Parameter.empty:
            sig[name] = "constexpr"
            consts[name] = par.default


#: flex variants of the ws kernel (--flex): (name, mask_mod, its argument types, score_mod, its
#: argument types, full list, BOUNDS), the mods of flex_triton/kernels.py as bench_flex.py uses them
FLEX_VARIANTS = [
    ("document-16", "document", ("*i64", "i32", "i32"), "no_score", ("i32", "i32", "i32"), True, False),
    ("prefix-lm", "prefix_lm", ("i32", "i32", "i32"), "no_score", ("i32", "i32", "i32"), True, False),
    ("sliding-1k", "sliding_window", ("i32", "i32", "i32"), "no_score", ("i32", "i32", "i32"), True, False),
    ("alibi", "causal", ("i32", "i32", "i32"), "alibi", ("*fp32", "i32", "i32"), True, False),
    ("bias-table", "causal", ("i32", "i32", "i32"), "relative_bias", ("*fp32", "i32", "i32"), True, False),
    ("softcap odd", "causal", ("i32", "i32", "i32"), "softcap", ("i32", "i32", "fp32"), True, True),
    ("bidir odd", "bidirectional_blocks", ("*i32", "i32", "i32"), "no_score", ("i32", "i32", "i32"), True, True),
    ("score only", "no_mask", ("i32", "i32", "i32"), "relative_bias", ("*fp32", "i32", "i32"), True, False),
]


def compile_flex(dtype: str, d: int, variant: tuple, overrides: dict, dump: str | None) -> dict:
    """Compile the ws kernel's flex mode (fwd.attn_fwd_ws with FLEX) for one mod combination, with
    the config the flex host side (hopper/flex.py) uses: the table's, 2 consumers."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    sys.path.insert(0, str(ROOT / "src"))
    from flashtile.backends.flex_triton import kernels as K

    configs = _load("hopper_configs", PKG / "configs.py")
    fwd = _load("hopper_fwd", PKG / "fwd.py")
    cfg = configs.flex_config(d, **overrides)
    vname, mask, mtypes, score, stypes, has_full, bounds = variant
    pf = " prefetch" if cfg.flex_prefetch else ""
    name = f"flex {dtype} d={d} {vname}{pf} {cfg.block_m}x{cfg.block_n}x{cfg.num_stages}"
    res = {"name": name, "ok": False}
    bd = configs.block_d(d)
    sig = {
        "q_desc": _desc_sig(dtype, cfg.q_rows, bd, False), "k_desc": _desc_sig(dtype, cfg.block_n, bd, False),
        "v_desc": _desc_sig(dtype, cfg.block_n, bd, False), "o_desc": _desc_sig(dtype, cfg.q_rows, bd, False),
        "O": f"*{dtype}", "LSE": "*fp32",
        "stride_os": "i32", "stride_oh": "i32", "stride_lb": "i32", "stride_lh": "i32",
        "seqlen_q": "i32", "seqlen_k": "i32", "group": "i32", "qk_scale": "fp32", "cap_out": "fp32",
        "window_left": "i32", "window_right": "i32",
        "KV_NUM": "*i32", "KV_IDX": "*i32", "bm_sb": "i32", "bm_sh": "i32", "bm_nk": "i32",
        "MA0": mtypes[0], "MA1": mtypes[1], "MA2": mtypes[2], "SA0": stypes[0], "SA1": stypes[1], "SA2": stypes[2],
    }  # fmt: skip
    if has_full:
        sig.update(FULL_NUM="*i32", FULL_IDX="*i32")
    consts = dict(HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NUM_STAGES=cfg.num_stages,
                  IS_VARLEN=False, REVERSE_M=True, num_warps=cfg.num_warps, CU_Q=None, CU_K=None,
                  HAS_WL=False, HAS_WR=False, HAS_SOFTCAP=False, CONSUMER_REGS=cfg.consumer_regs,
                  PRODUCER_REGS=cfg.producer_regs, NUM_CONSUMERS=cfg.consumers, FLEX=True, HAS_FULL=has_full,
                  SUBS=128 // cfg.block_n, BOUNDS=bounds, HAS_MASK=mask != "no_mask", HAS_SCORE=score != "no_score",
                  MASK_MOD=getattr(K, mask), SCORE_MOD=getattr(K, score))  # fmt: skip
    if cfg.flex_prefetch:  # (off: left to the default, as hopper/flex.py's launch compiles the same kernel)
        consts["FLEX_PREFETCH"] = True
    consts["WAIT_FENCE"] = bool(cfg.wait_fence)
    for k in consts:
        sig[k] = "constexpr"
    _defaults(fwd.attn_fwd_ws, sig, consts)
    try:
        fn = fwd.attn_fwd_ws
        k = triton.compile(GluonASTSource(fn, sig, consts, _aligned_pointers(fn, sig)),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=cfg.num_warps))  # fmt: skip
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        res["trace"] = str(e)
        return res
    return _analyse(k, res, name, dump)


def pv_overlap(sass: str) -> tuple[int, int]:
    """(key-block loops whose wait for the previous P V follows the softmax's exponentials, key-block
    loops) of a forward kernel's SASS. A key-block loop: an innermost loop with at least 32
    ``MUFU.EX2`` and a wgmma with a register A operand (P V). The wait: its ``WARPGROUP.DEPBAR.LE
    gsb0, 0x0``; placed before the last exponentials it serialises P V with the softmax (ptxas
    hoists it: see ``fwd._wait_fence``)."""
    from triton_compile_check import inner_loop_bodies

    n = good = 0
    for body in inner_loop_bodies(sass):
        mufu = [i for i, t in enumerate(body) if "MUFU.EX2" in t]
        if len(mufu) < 32 or not any(re.search(r"[HQ]GMMA\.\S+ R\d+, R\d+,", t) for t in body):
            continue
        n += 1
        dep = [i for i, t in enumerate(body) if re.search(r"DEPBAR\.LE\s+gsb0,\s*0x0", t)]
        good += bool(dep) and min(dep) > mufu[-3]
    return good, n


def _analyse(k, res: dict, name: str, dump: str | None) -> dict:
    """ptxas -v registers / spills and SASS counts of a compiled kernel into ``res``."""
    from triton_compile_check import ptxas_and_sass, regs_and_spills

    res["smem"] = k.metadata.shared
    out, sass = ptxas_and_sass(k, re.search(r"\.target\s+(sm_\w+)", k.asm["ptx"]).group(1))
    res["regs"], res["spill"] = regs_and_spills(out)
    res["ptxas_notes"] = [ln.strip() for ln in out.splitlines() if "wgmma" in ln.lower() or "warning" in ln.lower()]
    res["hgmma"] = sorted(set(re.findall(r"[HQ]GMMA\.(\d+x\d+x\d+(?:\.\w+)*)", sass)))
    res["n_hgmma"] = len(re.findall(r"\b[HQ]GMMA\.", sass))  # QGMMA: the fp8 wgmma
    res["utmaldg"] = len(re.findall(r"\bUTMALDG", sass))
    res["utmastg"] = len(re.findall(r"\bUTMASTG", sass))
    res["local"] = len(re.findall(r"\b(?:LDL|STL)\b", sass))
    regs = re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", k.asm["ptx"])
    res["setmaxnreg"] = sorted({int(x) for x in regs})
    res["boxes"] = sorted({tuple(t["block_size"]) for t in (k.metadata.tensordesc_meta or [])})
    res["pv"] = pv_overlap(sass)
    res["ok"] = (res["n_hgmma"] > 0 and res["utmaldg"] > 0 and res["spill"] == (0, 0) and res["local"] == 0
                 and not res["ptxas_notes"])  # fmt: skip
    if dump:
        stem = re.sub(r"[^\w.=+-]+", "_", name)
        for ext in ("ttgir", "ptx"):
            Path(dump, f"{stem}.{ext}").write_text(k.asm[ext])
        Path(dump, f"{stem}.sass").write_text(sass)
    return res


#: backward option sets: the mask flags, and ATOMIC_DQ (False: deterministic mode's dK/dV-only kernel)
BWD_OPTS = {**{m: dict(f, ATOMIC_DQ=True) for m, f in MASKS.items()},
            "deterministic": dict(HAS_WL=False, HAS_WR=True, HAS_SOFTCAP=False, ATOMIC_DQ=False)}  # fmt: skip

#: the backward's block-list mode (flex block masks, ``bwd.attn_bwd_ws`` with ``LIST_SUBS``): a mask_mod
#: of ``flex_triton.kernels`` with the types of its three arguments (as ``flex_triton.launch`` passes
#: them: tensors, ints; an int value: the JIT's constexpr specialisation of 1), and softcap (a softcap
#: score_mod: True) or an additive score_mod (``SCORE_MOD``: its name and argument types)
FLEX_OPTS = {
    "flex-causal": ("causal", ("i32", "i32", "i32"), False),
    "flex-sliding": ("sliding_window", ("i32", "i32", "i32"), False),
    "flex-document": ("document", ("*i64", "i32", 1), False),
    "flex-document-bidir": ("document", ("*i64", "i32", "i32"), False),
    "flex-prefix-lm": ("prefix_lm", ("i32", "i32", "i32"), False),
    "flex-chunked": ("chunked", ("i32", "i32", 1), False),
    "flex-bidir-blocks": ("bidirectional_blocks", ("*i64", "i32", "i32"), False),
    "flex-no-mask": ("no_mask", ("i32", "i32", "i32"), False),
    "flex-prefix-lm+softcap": ("prefix_lm", ("i32", "i32", "i32"), True),
    "flex-causal+alibi": ("causal", ("i32", "i32", "i32"), ("alibi", ("*fp32", "i32", "i32"))),
    "flex-causal+bias": ("causal", ("i32", "i32", "i32"), ("relative_bias", ("*fp32", "i32", "i32"))),
}


def compile_bwd(dtype: str, d: int, opt: str, varlen: bool, overrides: dict, dump: str | None) -> dict:
    """Compile one variant of the backward kernel (bwd.attn_bwd)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    configs = _load("hopper_configs", PKG / "configs.py")
    bwd = _load_bwd()
    overrides = dict(overrides)
    tile_trace = bool(overrides.pop("tile_trace", 0))  # (--set tile_trace=1: the persistent kernel's TRACE)
    cfg = configs.bwd_config(d, **overrides)
    name = f"bwd {dtype} d={d} {opt}{' varlen' if varlen else ''} {cfg.block_m}x{cfg.block_n}x{cfg.num_stages}"
    res = {"name": name, "ok": False}
    bad = configs.bwd_check(cfg, d)
    if bad:
        res["error"] = bad
        return res
    bd = configs.block_d(d)
    sig = {
        "q_desc": _desc_sig(dtype, cfg.block_m, bd, varlen), "k_desc": _desc_sig(dtype, cfg.block_n, bd, varlen),
        "v_desc": _desc_sig(dtype, cfg.block_n, bd, varlen), "do_desc": _desc_sig(dtype, cfg.block_m, bd, varlen),
        "DQ": "*fp32", "DK": f"*{dtype}", "DV": f"*{dtype}", "LSE": "*fp32", "DELTA": "*fp32",
        "CU_Q": "*i32" if varlen else "constexpr", "CU_K": "*i32" if varlen else "constexpr",
        **{f"stride_{n}": "i32" for n in ("dqb", "dqs", "dqh", "dkb", "dks", "dkh", "lb", "lh")},
        "seqlen_q": "i32", "seqlen_k": "i32", "group": "i32", "qk_scale": "fp32", "cap_out": "fp32",
        "sm_scale": "fp32", "window_left": "i32", "window_right": "i32",
    }  # fmt: skip
    if opt in FLEX_OPTS:  # block-list mode: no window flags, the mask_mod's Triton function
        sys.path.insert(0, str(ROOT / "src"))
        from flashtile.backends.flex_triton import kernels as K

        mask, mtypes, score = FLEX_OPTS[opt]
        cap = score is True
        flags = dict(HAS_WL=False, HAS_WR=False, HAS_SOFTCAP=cap, ATOMIC_DQ=True, LIST_SUBS=128 // cfg.block_m,
                     MASK_MOD=getattr(K, mask))  # fmt: skip
        sig.update({"BL_CNT": "*i32", "BL_IDX": "*i32", "bl_sb": "i32", "bl_sh": "i32", "bl_w": "i32"})
        for i, t in enumerate(mtypes):
            if isinstance(t, int):
                flags[f"MA{i}"] = t
            else:
                sig[f"MA{i}"] = t
        if isinstance(score, tuple):  # an additive score_mod (SCORE_MOD, SA0..2)
            flags["SCORE_MOD"] = getattr(K, score[0])
            for i, t in enumerate(score[1]):
                if isinstance(t, int):
                    flags[f"SA{i}"] = t
                else:
                    sig[f"SA{i}"] = t
    else:
        flags = BWD_OPTS[opt]
    consts = dict(HEAD_DIM=d, BLOCK_D=bd, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, NUM_STAGES=cfg.num_stages,
                  IS_VARLEN=varlen, num_warps=cfg.num_warps, **flags)  # fmt: skip
    consts.update(cfg.kernel_consts(d, softcap=bool(flags["HAS_SOFTCAP"])))
    if cfg.kernel in ("ws", "ws2"):
        tag = f"{'_swap' if cfg.swap else ''}{'_tma' if cfg.dq_tma else ''}{'_ring' if cfg.stat_ring else ''}"
        tag += f"{'_fold' if cfg.fold else ''}{'_nbar' if cfg.nbar else ''}{cfg.nbar if cfg.nbar > 1 else ''}"
        name = name.replace("bwd ", f"bwd_{cfg.kernel}{tag} ", 1)
        res["name"] = name
        if consts.get("STAT_RING"):  # stat_mul: a runtime float
            sig["stat_mul"] = "fp32"
        if consts["DQ_TMA"]:
            if consts["ATOMIC_DQ"]:
                sig["dq_desc"] = _desc_sig("fp32", cfg.block_m, bd, varlen)
            else:
                consts["DQ_TMA"] = False
        if not consts["ATOMIC_DQ"]:  # (as the launcher: no dQ hand-off to put on named barriers)
            consts["NBAR"] = 0
        if "dq_desc" not in sig:  # (a leading argument without a default: None without DQ_TMA)
            consts["dq_desc"] = None
    fn = bwd.attn_bwd_ws if cfg.kernel in ("ws", "ws2") else bwd.attn_bwd
    if cfg.persistent and opt not in FLEX_OPTS:  # (dense only: varlen and block-list calls keep one program per tile)
        if varlen:
            res.update(ok=True, skipped="the persistent backward serves dense calls")
            return res
        fn = bwd.attn_bwd_ws_persistent
        res["name"] = name = name.replace(f"bwd_{cfg.kernel}", f"bwd_{cfg.kernel}_persistent", 1)
        sig.update(n_kb="i32", n_hk="i32", n_tiles="i32", TILE_CTR="*i32", head_group="i32")
        if cfg.tail and flags.get("ATOMIC_DQ") and not (flags.get("HAS_WL") or flags.get("HAS_WR")):  # (launcher)
            sig.update(WS="*fp32", t_full="i32", n_split="i32", split_mb="i32")
            consts["TAIL"] = True
            res["name"] = name = name.replace("_persistent", "_persistent_tail", 1)
        else:
            consts["WS"] = None
        if tile_trace:
            sig.update(TRACE_BUF="*i64", TRACE_CAP="i32")
            consts["TRACE"] = True
            res["name"] = name = name.replace("_persistent", "_persistent_trace", 1)
    if not varlen:
        consts.update(CU_Q=None, CU_K=None)
    for key in consts:
        sig[key] = "constexpr"
    try:
        k = triton.compile(GluonASTSource(fn, sig, consts, _aligned_pointers(fn, sig)),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=consts["num_warps"]))  # fmt: skip
    except Exception as e:
        res["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        res["trace"] = str(e)
        return res
    return _analyse(k, res, name, dump)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fp16 only, masks none/causal, d in 64/128/256")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1))
    ap.add_argument("--dump", help="write ttgir/ptx/sass of every variant into this folder")
    ap.add_argument("--headdim", type=int, action="append", help="only these head dims")
    ap.add_argument("--only", choices=("fwd", "bwd"), help="only the forward or the backward kernels")
    ap.add_argument("--trace", action="store_true", help="print the full error of failed variants")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=INT",
                    help="override config fields for every variant (block_n=64, num_stages=3; a,b=.. or repeated)")
    ap.add_argument("--fp8", action="store_true", help="the FP8 kernel (fwd_fp8.py) instead of the 16-bit ones")
    ap.add_argument("--bwd-kernel", choices=("plain", "ws", "ws2"), help="the backward kernel (default: the table's)")
    ap.add_argument("--flex", action="store_true",
                    help="the flex modes only: the forward ws kernel's (FLEX_VARIANTS, bf16; --headdim, default "
                         "64 and 128) and the backward's block-list mode (mask_mods, head dims 64/96/128, dense); "
                         "--only fwd / bwd picks one")
    args = ap.parse_args()
    overrides = {}
    for kv in (item for arg in args.set for item in arg.split(",")):  # (--set a=1,b=2 or --set a=1 --set b=2)
        key, val = kv.split("=")
        overrides[key] = val if key == "kernel" else int(val)
    configs = _load("hopper_configs", PKG / "configs.py")
    dims = args.headdim or ([64, 128, 256] if args.quick else list(configs.HEADDIMS))
    dtypes = ["fp16"] if args.quick else ["fp16", "bf16"]
    masks = ["none", "causal"] if args.quick else list(MASKS)
    kernels = [overrides.pop("kernel")] if "kernel" in overrides else list(configs.KERNELS)
    jobs = []
    if args.only != "bwd":
        jobs += [(compile_one, (kn, dt, d, mk, vl, overrides)) for kn in kernels for dt in dtypes for d in dims
                 for mk in masks for vl in (False, True)]  # fmt: skip
    if args.only != "fwd":
        bopts = ["none", "causal", "deterministic"] if args.quick else list(BWD_OPTS)
        fields = {f.name for f in dataclasses.fields(configs.HopperBwdConfig)}
        bwd_over = {k: v for k, v in overrides.items() if k in fields or k == "tile_trace"}
        if args.bwd_kernel:
            bwd_over["kernel"] = args.bwd_kernel
        if args.flex:
            fdims = [d for d in (args.headdim or (64, 96, 128)) if d in (64, 96, 128)]
            fopts = ["flex-causal", "flex-document"] if args.quick else list(FLEX_OPTS)
            jobs = [(compile_bwd, (dt, d, op, False, bwd_over)) for dt in dtypes for d in fdims for op in fopts]
        else:
            jobs += [(compile_bwd, (dt, d, op, vl, bwd_over)) for dt in dtypes for d in dims for op in bopts
                     for vl in (False, True)]  # fmt: skip
    if args.fp8:  # (head dim, mask, varlen, descales given)
        jobs = [(compile_one_fp8, (d, mk, vl, True, overrides)) for d in dims for mk in masks for vl in (False, True)]
        jobs.append((compile_one_fp8, (dims[0], masks[0], False, False, overrides)))
    if args.flex:  # (the backward's flex jobs, unless --only fwd, are in jobs already)
        fdims = args.headdim or [64, 128]
        only = os.environ.get("FLEX_ONLY")  # a comma-separated subset of FLEX_VARIANTS' names
        fwd_jobs = [(compile_flex, ("bf16", d, v, overrides)) for d in fdims for v in FLEX_VARIANTS
                    if not only or v[0] in only.split(",")]  # fmt: skip
        jobs = (fwd_jobs if args.only != "bwd" else []) + (jobs if args.only != "fwd" else [])
    if args.dump:
        os.makedirs(args.dump, exist_ok=True)
    failed = 0
    with cf.ProcessPoolExecutor(args.jobs) as ex:
        futs = [ex.submit(fn, *v, args.dump) for fn, v in jobs]
        print(f"{'variant':58} {'smem':>7} {'regs':>4} {'spill':>9} {'HGMMA':>22} {'TMA ld/st':>9}  boxes")
        for f in futs:
            r = f.result()
            if "skipped" in r:
                print(f"{r['name']:58} n/a: {r['skipped']}")
                continue
            if "error" in r:
                failed += 1
                print(f"{r['name']:58} FAILED: {r['error']}")
                if args.trace and "trace" in r:
                    print(r["trace"])
                continue
            failed += not r["ok"]
            hg = f"{r['n_hgmma']} {','.join(r['hgmma'])}"
            boxes = " ".join("x".join(map(str, b)) for b in r["boxes"])
            if r["setmaxnreg"]:
                boxes += f"  setmaxnreg {'/'.join(map(str, r['setmaxnreg']))}"
            if r.get("pv", (0, 0))[1]:
                boxes += "  P V overlapped in {}/{} loops".format(*r["pv"])
            flag = "" if r["ok"] else "  <-- CHECK" + (f" (local mem ops {r['local']})" if r["local"] else "")
            flag += "".join(f"\n    ptxas: {n}" for n in r["ptxas_notes"])
            print(f"{r['name']:58} {r['smem']:>7} {r['regs']:>4} {r['spill'][0]:>4}/{r['spill'][1]:<4} {hg:>22} "
                  f"{r['utmaldg']:>4}/{r['utmastg']:<4}  {boxes}{flag}")  # fmt: skip
    print(f"{len(jobs)} variants, {failed} failed or flagged")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
