"""The Gluon Hopper backward (issue 12): the config table and the routing of
``HopperBackend.backward`` (CPU), and gradient parity on the H200 (``gpu`` marker: skipped
without CUDA or when the backend is unusable).

The kernel is compiled for sm_90 on CPU machines by ``scripts/gluon_compile_check.py --only bwd``
(needs Triton 3.6); ``benchmarks/hopper_bwd_run.py`` is the full GPU check and the benchmark.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import dense_fn, dense_oracle, plan_recorders

import flashtile
from flashtile import flash_attn_func, flash_attn_varlen_func
from flashtile.backends import hopper
from flashtile.backends.hopper import configs
from flashtile.spec import Problem, make_call
from flashtile.testing import attention_ref, compare_with_oracle, qkv_inputs
from flashtile.testing import cu_seqlens as cu

BE = hopper.backend


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("FLASHTILE_BACKEND", raising=False)
    monkeypatch.setenv(hopper.BWD_ENV, "gluon")  # the kernels under test (the default is Triton's)
    monkeypatch.setattr(hopper, "SMALL_ROWS", 0)  # small test shapes: the Gluon forward too
    monkeypatch.setattr(hopper, "TRITON_FWD_WINDOW_SPAN", {})  # (windows too)
    yield


# ----------------------------------------------------------------------------------------------
# config table (pure Python)


@pytest.mark.parametrize("d", configs.HEADDIMS)
def test_bwd_table_entries_pass_their_check(d):
    cfg = configs.bwd_config(d)
    assert configs.bwd_check(cfg, d) is None
    assert configs.bwd_smem_bytes(cfg, d) <= configs.SM90_SMEM_LIMIT
    assert configs.bwd_accumulator_regs(cfg, d) <= 192
    assert configs.block_d(d) % cfg.chunk(d) == 0


def test_bwd_smem_and_register_arithmetic():
    cfg = configs.HopperBwdConfig(64, 128, 2)
    # K, V 2 x 128 x 128; ring 2 stages x (Q, dO) 64 x 128; P, dS 64 x 128: bf16
    assert configs.bwd_smem_bytes(cfg, 128) == 2 * (2 * 128 * 128 + 2 * 2 * 64 * 128 + 2 * 128 * 64)
    # d = 96 computes on 128 columns
    assert configs.bwd_smem_bytes(cfg, 96) == configs.bwd_smem_bytes(cfg, 128)
    # dK + dV (2 x 128 x 128) + max(S + dP 2 x 64 x 128, dQ 64 x 128) over 256 threads
    assert configs.bwd_accumulator_regs(cfg, 128) == (2 * 128 * 128 + 2 * 64 * 128) // 256
    assert configs.HopperBwdConfig(64, 64, 2, dq_chunk=64).chunk(256) == 64
    assert configs.HopperBwdConfig(64, 64, 2).chunk(192) == 256


@pytest.mark.parametrize(
    "overrides,needle",
    [
        ({"num_warps": 4}, "num_warps"),
        ({"block_n": 32}, "block_n"),
        ({"block_m": 96}, "block_m"),
        ({"num_stages": 0}, "num_stages"),
        ({"dq_chunk": 48}, "dq_chunk"),
        ({"num_stages": 4}, "shared memory"),
    ],
)
def test_bwd_check_names_the_problem(overrides, needle):
    cfg = configs.bwd_config(256, **overrides)
    reason = configs.bwd_check(cfg, 256)
    assert reason and needle in reason


def test_bwd_stat_ring_and_fold_checks_and_tables():
    """stat_ring / fold: options of the ws kernel with swap (fold needs the ring); the non-causal
    table uses them at d64 / 96 / 128, the masked one (causal / window) at d96 / 128, not at d64."""
    for d in (64, 96, 128):
        plain, masked = configs.bwd_config(d), configs.bwd_config(d, masked=True)
        assert plain.stat_ring and plain.fold
        assert (masked.stat_ring, masked.fold) == ((0, 0) if d == 64 else (1, 1))
        assert configs.bwd_check(masked, d) is None
        assert "stat_ring = 1" in configs.bwd_check(configs.bwd_config(d, stat_ring=0), d)
        assert "swap" in configs.bwd_check(configs.bwd_config(d, swap=0), d)
    assert "ws / ws2" in configs.bwd_check(configs.bwd_config(256, fold=1, stat_ring=1), 256)
    ring = configs.bwd_config(128)
    assert configs.bwd_smem_bytes(ring, 128) - configs.bwd_smem_bytes(replace(ring, stat_ring=0, fold=0), 128) \
        == 4 * 2 * ring.num_stages * ring.block_m  # fmt: skip
    k = ring.kernel_consts(128)
    assert k["STAT_RING"] and k["FOLD"]


def test_bwd_nbar_config_and_constexprs():
    """nbar (the named-barrier dQ hand-off): off in every table entry, an option of the ws kernel
    only (bwd_check refuses it on plain and ws2), and it reaches the kernel as the constexpr NBAR
    (always present for ws / ws2, so nbar=0 compiles the kernel as before)."""
    for d in configs.HEADDIMS:
        for masked in (False, True):
            assert configs.bwd_config(d, masked).nbar == 0
    ws = configs.bwd_config(128, nbar=1, persistent=0)  # (persistent refuses nbar)
    assert ws.kernel == "ws" and configs.bwd_check(ws, 128) is None
    assert ws.kernel_consts(128)["NBAR"] == 1 and ws.kernel_consts(128, softcap=True)["NBAR"] == 1
    assert configs.bwd_config(128).kernel_consts(128)["NBAR"] == 0
    assert configs.bwd_check(configs.bwd_config(64, nbar=1), 64) is None
    assert configs.bwd_check(configs.bwd_config(64, True, nbar=1), 64) is None  # (the masked table: no ring)
    assert "ws / ws2" in configs.bwd_check(configs.bwd_config(256, nbar=1), 256)  # plain
    ws2 = replace(ws, kernel="ws2", stat_ring=0, fold=0)
    assert configs.bwd_check(replace(ws2, nbar=0), 128) is None
    assert "not ws2" in configs.bwd_check(ws2, 128)
    assert ws2.kernel_consts(128)["NBAR"] == 0
    assert "NBAR" not in configs.bwd_config(256).kernel_consts(256)  # the plain kernel has no such constexpr


def test_bwd_nbar2_config_and_constexprs():
    """nbar=2 (the ring's slot releases on named barriers too) is accepted where nbar=1 is (the ws
    kernel, either table, any head dim it serves) and reaches the kernel as NBAR=2; refused on plain
    and ws2 like nbar=1, and any other value is refused."""
    for d in (64, 96, 128):
        for masked in (False, True):
            cfg = configs.bwd_config(d, masked, nbar=2, persistent=0)
            assert configs.bwd_check(cfg, d) is None
            assert cfg.kernel_consts(d)["NBAR"] == 2 and cfg.kernel_consts(d, softcap=True)["NBAR"] == 2
    three = configs.bwd_config(128, nbar=2, num_stages=3, persistent=0, epi=0)  # (a named barrier a slot: ids 11..13)
    assert configs.bwd_check(three, 128) is None and three.kernel_consts(128)["NBAR"] == 2
    assert "num_stages <= 11" in configs.bwd_check(replace(three, num_stages=12), 128)
    assert "ws / ws2" in configs.bwd_check(configs.bwd_config(256, nbar=2), 256)  # plain
    ws2 = replace(configs.bwd_config(128, nbar=2), kernel="ws2", stat_ring=0, fold=0)
    assert "not ws2" in configs.bwd_check(ws2, 128)
    assert ws2.kernel_consts(128)["NBAR"] == 0
    for bad in (3, -1):
        assert "nbar must be 0, 1 or 2" in configs.bwd_check(configs.bwd_config(128, nbar=bad), 128)


def test_bwd_ws_config_checks_and_shared_memory():
    """The warp-specialised kernel's fields are checked, and its dQ tile (fp32 block_m x BLOCK_D,
    only with atomic dQ) counts in shared memory."""
    ws = configs.HopperBwdConfig(64, 128, 2, kernel="ws")
    plain = configs.HopperBwdConfig(64, 128, 2)
    assert configs.bwd_check(ws, 128) is None
    assert configs.bwd_smem_bytes(ws, 128) == configs.bwd_smem_bytes(plain, 128) + 4 * 64 * 128
    assert configs.bwd_smem_bytes(replace(ws, atomic_dq=0), 128) == configs.bwd_smem_bytes(plain, 128)
    for bad, needle in ((dict(kernel="pp"), "kernel"), (dict(worker_regs=20), "worker_regs"),
                        (dict(red_rows=3), "red_rows"), (dict(red_vec=4), "red_vec"),
                        (dict(num_stages=4), "shared memory")):  # fmt: skip
        reason = configs.bwd_check(replace(ws, **bad), 128)
        assert reason and needle in reason, (bad, reason)


def test_bwd_check_refuses_register_hungry_tiles():
    reason = configs.bwd_check(configs.HopperBwdConfig(128, 128, 1), 256)
    assert reason and ("registers" in reason or "shared memory" in reason)


def test_bwd_config_rejects_unknown_head_dim():
    with pytest.raises(ValueError, match="head dims"):
        configs.bwd_config(80)


# ----------------------------------------------------------------------------------------------
# routing of HopperBackend.backward (no GPU needed: the launchers are stubbed)


def test_bwd_kernel_choice_and_env(monkeypatch):
    call = make_call(headdim=128)
    monkeypatch.delenv(hopper.BWD_ENV)
    assert hopper.bwd_kernel(call) == hopper.DEFAULT_BWD == "triton"
    assert hopper.bwd_kernel(call, 192) == "triton" and hopper.bwd_kernel(call, 256) == "gluon"
    # head dims 64/128: the Gluon kernels from 1k keys on (the shortest measured), causal or not
    assert hopper.bwd_kernel(call, 128, 512) == "triton" and hopper.bwd_kernel(call, 128, 1024) == "gluon"
    assert hopper.bwd_kernel(call, 64, 512) == "triton" and hopper.bwd_kernel(call, 64, 4096) == "gluon"
    causal = make_call(headdim=64, causal=True)
    assert hopper.bwd_kernel(causal, 64, 512) == "triton" and hopper.bwd_kernel(causal, 64, 1024) == "gluon"
    # the ws kernel with the transposed score tiles and TMA dQ reductions, masked or not
    for d in (64, 96, 128):
        for masked in (False, True):
            cfg = configs.bwd_config(d, masked=masked)
            assert (cfg.kernel, cfg.swap, cfg.dq_tma) == ("ws", 1, 1) and configs.bwd_check(cfg, d) is None
    monkeypatch.setenv(hopper.BWD_ENV, "gluon")
    assert hopper.bwd_kernel(call) == "gluon"
    monkeypatch.setenv(hopper.BWD_ENV, "triton")
    assert hopper.bwd_kernel(call) == "triton"
    monkeypatch.setenv(hopper.BWD_ENV, " Gluon ")
    assert hopper.bwd_kernel(call) == "gluon"
    monkeypatch.setenv(hopper.BWD_ENV, "cuda")
    with pytest.raises(ValueError, match=hopper.BWD_ENV):
        hopper.bwd_kernel(call)


def test_bwd_kernel_sends_learnable_sink_to_triton():
    call = make_call(headdim=128, learnable_sink=torch.zeros(4))
    assert hopper.bwd_kernel(call) == "triton"


def _stub_launchers(monkeypatch):
    """Replace both backward launchers with recorders (CPU tensors, no kernels)."""
    import types

    from flashtile.backends import triton as triton_pkg

    seen = []

    def fake_gluon(dout, q, k, v, out, lse, call):
        seen.append("gluon")
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    def fake_triton(dout, q, k, v, out, lse, call):
        seen.append("triton")
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), {}

    monkeypatch.setitem(sys.modules, "flashtile.backends.hopper.launch_bwd", types.SimpleNamespace(backward=fake_gluon))
    monkeypatch.setattr(hopper, "launch_bwd", sys.modules["flashtile.backends.hopper.launch_bwd"], raising=False)
    monkeypatch.setattr(triton_pkg.backend, "backward", fake_triton)
    return seen


@pytest.mark.parametrize("env,expect", [(None, "gluon"), ("gluon", "gluon"), ("triton", "triton")])
def test_backend_backward_routes(monkeypatch, env, expect):
    seen = _stub_launchers(monkeypatch)
    if env:
        monkeypatch.setenv(hopper.BWD_ENV, env)
    q, k, v = qkv_inputs(1, 5, 5, 2, 2, 64, torch.float16, "cpu")
    res = BE.backward(torch.ones_like(q), q, k, v, q, torch.zeros(1, 2, 5), make_call(headdim=64))
    assert seen == [expect]
    assert len(res) == 4 and res[3] == {}
    assert res[0].shape == q.shape and res[1].shape == k.shape and res[2].shape == v.shape


def test_launch_bwd_import_is_lazy():
    """Importing the backend (and flashtile) never imports the backward's Gluon module."""
    code = "import sys, flashtile.backends.hopper as h; print('flashtile.backends.hopper.launch_bwd' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------------
# launch_bwd's argument preparation on CPU tensors (kernels replaced by recorders; needs Triton
# with Gluon importable, which the CPU venv has)


class _Recorder:
    """Stands in for a JIT kernel: ``kernel[grid](*args, **kw)`` is recorded, and ``effect`` (if
    given) runs on the arguments (a stand-in for what the kernel writes)."""

    def __init__(self, effect=None):
        self.calls = []
        self.effect = effect

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.calls.append((grid, args, kw))
            if self.effect:
                self.effect(*args, **kw)

        return launch


@pytest.fixture
def lb(monkeypatch):
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from flashtile.backends.hopper import launch_bwd

    def fill_dq(*args, **kw):  # the fused kernel: a known unscaled dQ sum in every accumulator cell
        if kw["ATOMIC_DQ"]:
            args[4].fill_(2.0)

    rec = {"main": _Recorder(fill_dq), "pre": _Recorder(), "dq": _Recorder(), "tail": _Recorder()}

    class WsMain:  # the ws kernel's dq_desc (after do_desc) recorded as a keyword: one argument list for both
        def __getitem__(self, grid):
            return lambda *a, **kw: rec["main"][grid](*a[:4], *a[5:], **kw, dq_desc=a[4])

    monkeypatch.setattr(launch_bwd, "attn_bwd", rec["main"])
    monkeypatch.setattr(launch_bwd, "attn_bwd_ws", WsMain())  # (the table picks per head dim)
    monkeypatch.setattr(launch_bwd, "attn_bwd_ws_persistent", WsMain())  # (told apart by its n_tiles keyword)
    monkeypatch.setattr(launch_bwd, "_sm_count", lambda device: 132)
    monkeypatch.setattr(launch_bwd, "_bwd_preprocess", rec["pre"])
    monkeypatch.setattr(launch_bwd, "_bwd_dq_kernel", rec["dq"])
    monkeypatch.setattr(launch_bwd, "_dkdv_fast", rec["tail"])
    monkeypatch.setattr(launch_bwd, "_descriptor", lambda t, rows, varlen: ("desc", tuple(t.shape), rows, varlen))
    # the dQ conversion kernel's arithmetic (the kernel itself: test_triton_kernels.py under the interpreter)
    monkeypatch.setattr(launch_bwd, "_convert_dq",
                        lambda acc, dq, scale: dq.copy_(acc[:, : dq.shape[1], :, : dq.shape[3]] * scale))  # fmt: skip
    monkeypatch.setattr(launch_bwd, "arch", lambda device: "sm90")
    monkeypatch.setattr(launch_bwd.HL, "LEAN", False)  # no launch plans (test_bwd_plans_* test them)
    return launch_bwd, rec


def _lse(b, h, s):
    return torch.randn(b, h, s)


def test_launch_bwd_dense_arguments(lb):
    launch_bwd, rec = lb
    B, Sq, Sk, H, Hk, D = 2, 70, 90, 4, 2, 96
    q, k, v = qkv_inputs(B, Sq, Sk, H, Hk, D, torch.bfloat16, "cpu")
    call = make_call(headdim=D, causal=True, softmax_scale=0.25)
    cfg = configs.bwd_config(D, persistent=0)  # (one program per tile: the persistent test has its grid)
    dq, dk, dv = launch_bwd.backward(torch.randn_like(q), q, k, v, torch.randn_like(q), _lse(B, H, Sq), call,
                                     config=cfg)
    (grid, args, kw), *_ = rec["main"].calls
    assert grid == (-(-Sk // cfg.block_n), Hk, B)
    acc = args[4]
    assert acc.dtype == torch.float32 and acc.shape == (B, Sq + cfg.block_m, H, 128)  # spare rows, BLOCK_D wide
    assert args[11:14] == acc.stride()[:3] and args[14:17] == dk.stride()[:3]
    assert args[19:22] == (Sq, Sk, 2)
    assert args[22] == pytest.approx(0.25 * 1.4426950408889634) and args[23] == 0.0 and args[24] == 0.25
    assert args[25:27] == (-1, 0)
    assert kw["HAS_WR"] and not kw["HAS_WL"] and not kw["HAS_SOFTCAP"] and not kw["IS_VARLEN"]
    assert kw["ATOMIC_DQ"] and kw["HEAD_DIM"] == 96 and kw["BLOCK_D"] == 128
    if cfg.kernel == "ws":
        assert kw["WORKER_REGS"] == cfg.worker_regs and kw["RED_ROWS"] == cfg.red_rows and "DQ_CHUNK" not in kw
        assert kw["SWAP"] == bool(cfg.swap) and kw["DQ_TMA"] == bool(cfg.dq_tma)
        if cfg.dq_tma:  # the accumulator's TMA descriptor, [block_m, BLOCK_D] tiles
            assert kw["dq_desc"] == ("desc", tuple(args[4].shape), cfg.block_m, False)
    else:
        assert kw["DQ_CHUNK"] == 128 and kw["RED_VEC"] == cfg.red_vec
    assert args[9] is None and args[10] is None and not kw["LPT"]
    # longest-first grid (key blocks slowest) for a causal call when the config asks for it
    launch_bwd.backward(torch.randn_like(q), q, k, v, torch.randn_like(q), _lse(B, H, Sq), call,
                        config=configs.bwd_config(D, lpt=1, persistent=0))  # fmt: skip
    grid2, _, kw2 = rec["main"].calls[1]
    assert grid2 == (Hk, B, -(-Sk // cfg.block_n)) and kw2["LPT"]
    # the conversion: scale x the accumulator, its first D columns and Sq rows, in q's dtype
    assert dq.dtype == q.dtype and dq.shape == q.shape and torch.all(dq == 0.5)
    assert dk.shape == k.shape and dv.shape == v.shape
    (pgrid, pargs, pkw), *_ = rec["pre"].calls
    assert pgrid[1:] == (H, B) and pkw["HEAD_DIM"] == D
    assert not rec["dq"].calls


def test_launch_bwd_fold_per_call(lb):
    """The launcher keeps fold for calls it serves (the accumulators start from -lse / scale:
    stat_mul = -1 / qk_scale) and turns it off with softcap; causal calls take the masked table
    (no stats ring)."""
    launch_bwd, rec = lb
    q, k, v = qkv_inputs(1, 100, 100, 4, 4, 128, torch.bfloat16, "cpu")
    lse = _lse(1, 4, 100)
    call = make_call(headdim=128, softmax_scale=0.25)
    launch_bwd.backward(torch.randn_like(q), q, k, v, torch.randn_like(q), lse, call)
    kw = rec["main"].calls[-1][2]
    assert kw["STAT_RING"] and kw["FOLD"] and kw["stat_mul"] == pytest.approx(-1.0 / (0.25 * 1.4426950408889634))
    launch_bwd.backward(torch.randn_like(q), q, k, v, torch.randn_like(q), lse, make_call(headdim=128, softcap=30.0))
    kw = rec["main"].calls[-1][2]
    assert kw["STAT_RING"] and not kw["FOLD"] and kw["stat_mul"] == 1.0
    launch_bwd.backward(torch.randn_like(q), q, k, v, torch.randn_like(q), lse, make_call(headdim=128, causal=True))
    kw = rec["main"].calls[-1][2]
    assert kw["STAT_RING"] and kw["FOLD"]  # (causal calls at d128 too, since stop 33)
    q64, k64, v64 = qkv_inputs(1, 100, 100, 4, 4, 64, torch.bfloat16, "cpu")
    call64 = make_call(headdim=64, causal=True)
    launch_bwd.backward(torch.randn_like(q64), q64, k64, v64, torch.randn_like(q64), lse, call64)
    kw = rec["main"].calls[-1][2]
    assert not kw["STAT_RING"] and not kw["FOLD"] and "stat_mul" not in kw
    # non-causal varlen calls take it too (checked on the H200: hopper_bwd_run.py --table stat_ring=1,fold=1)
    qv, kv_, vv = (x.reshape(1, 100, 4, 128) for x in (q, k, v))
    lens = cu([30, 70], "cpu")
    call = make_call(headdim=128, cu_seqlens_q=lens, cu_seqlens_k=lens, max_seqlen_q=70, max_seqlen_k=70)
    launch_bwd.backward(torch.randn_like(qv), qv, kv_, vv, torch.randn_like(qv), _lse(1, 4, 100), call)
    kw = rec["main"].calls[-1][2]
    assert kw["STAT_RING"] and kw["FOLD"] and kw["IS_VARLEN"]


def _nbar_on_dense_calls(launch_bwd, rec, q, k, v, lse, nbar: int):
    """The ws config with ``nbar`` on plain, causal, softcap and varlen calls: NBAR reaches the
    kernel with atomic dQ. Returns the config."""
    nb = configs.bwd_config(128, nbar=nbar, persistent=0)
    for call in (make_call(headdim=128), make_call(headdim=128, causal=True), make_call(headdim=128, softcap=30.0)):
        launch_bwd.backward(torch.randn_like(q), q, k, v, torch.randn_like(q), lse, call, config=nb)
        kw = rec["main"].calls[-1][2]
        assert kw["NBAR"] == nbar and kw["ATOMIC_DQ"]
    qv, kv_, vv = (x.reshape(1, 100, 4, 128) for x in (q, k, v))
    lens = cu([30, 0, 70], "cpu")
    call = make_call(headdim=128, cu_seqlens_q=lens, cu_seqlens_k=lens, max_seqlen_q=70, max_seqlen_k=70)
    launch_bwd.backward(torch.randn_like(qv), qv, kv_, vv, torch.randn_like(qv), _lse(1, 4, 100), call, config=nb)
    kw = rec["main"].calls[-1][2]
    assert kw["NBAR"] == nbar and kw["IS_VARLEN"]
    return nb


def test_launch_bwd_nbar_where_it_applies(lb):
    """nbar reaches the ws kernel as NBAR on atomic-dQ calls (dense, varlen, causal, softcap); the
    launcher turns it off where the kernel hands no dQ tile to the worker (deterministic mode,
    atomic_dq=0) and refuses it on the plain and ws2 kernels (a config error)."""
    launch_bwd, rec = lb
    q, k, v = qkv_inputs(1, 100, 100, 4, 4, 128, torch.bfloat16, "cpu")
    lse = _lse(1, 4, 100)
    nb = _nbar_on_dense_calls(launch_bwd, rec, q, k, v, lse, 1)
    launch_bwd.backward(torch.randn_like(q), q, k, v, torch.randn_like(q), lse, make_call(headdim=128))
    assert rec["main"].calls[-1][2]["NBAR"] == 0  # the table: off
    # no atomic dQ: ignored (the kernel computes dK / dV only)
    launch_bwd.backward(torch.randn_like(q), q, k, v, torch.randn_like(q), lse,
                        make_call(headdim=128, deterministic=True), config=nb)  # fmt: skip
    kw = rec["main"].calls[-1][2]
    assert not kw["ATOMIC_DQ"] and kw["NBAR"] == 0
    launch_bwd.backward(torch.randn_like(q), q, k, v, torch.randn_like(q), lse, make_call(headdim=128),
                        config=replace(nb, atomic_dq=0))  # fmt: skip
    kw = rec["main"].calls[-1][2]
    assert not kw["ATOMIC_DQ"] and kw["NBAR"] == 0
    n = len(rec["main"].calls)
    for bad in (replace(nb, kernel="ws2", stat_ring=0, fold=0), configs.HopperBwdConfig(64, 64, 2, nbar=1)):
        with pytest.raises(ValueError, match="nbar (/ persistent )?(is an option|are options) of the ws"):
            launch_bwd.backward(torch.randn_like(q), q, k, v, torch.randn_like(q), lse, make_call(headdim=128),
                                config=bad)  # fmt: skip
    assert len(rec["main"].calls) == n


def test_launch_bwd_nbar2_where_it_applies(lb):
    """nbar=2 reaches the ws kernel as NBAR=2 wherever nbar=1 does (dense, causal, softcap, varlen, and
    the block-list mode, whose ring is the same), is turned off (0) without atomic dQ like nbar=1, and
    is refused on the plain and ws2 kernels."""
    launch_bwd, rec = lb
    q, k, v = qkv_inputs(1, 100, 100, 4, 4, 128, torch.bfloat16, "cpu")
    lse = _lse(1, 4, 100)
    nb = _nbar_on_dense_calls(launch_bwd, rec, q, k, v, lse, 2)
    launch_bwd.backward(torch.randn_like(q), q, k, v, torch.randn_like(q), lse, make_call(headdim=128),
                        config=nb, lists=dict(LIST_SUBS=2))  # fmt: skip
    kw = rec["main"].calls[-1][2]
    assert kw["NBAR"] == 2 and kw["LIST_SUBS"] == 2
    for call, cfg in ((make_call(headdim=128, deterministic=True), nb), (make_call(headdim=128),
                                                                        replace(nb, atomic_dq=0))):
        launch_bwd.backward(torch.randn_like(q), q, k, v, torch.randn_like(q), lse, call, config=cfg)
        kw = rec["main"].calls[-1][2]
        assert not kw["ATOMIC_DQ"] and kw["NBAR"] == 0
    n = len(rec["main"].calls)
    for bad in (replace(nb, kernel="ws2", stat_ring=0, fold=0), configs.HopperBwdConfig(64, 64, 2, nbar=2),
                replace(nb, nbar=3)):
        with pytest.raises(ValueError, match="nbar (/ persistent )?(is an option|are options) of the ws"
                                             "|nbar must be 0, 1 or 2"):
            launch_bwd.backward(torch.randn_like(q), q, k, v, torch.randn_like(q), lse, make_call(headdim=128),
                                config=bad)  # fmt: skip
    assert len(rec["main"].calls) == n


def test_launch_bwd_deterministic_uses_the_ordered_dq_pass(lb):
    launch_bwd, rec = lb
    q, k, v = qkv_inputs(1, 200, 200, 8, 2, 128, torch.float16, "cpu")
    call = make_call(headdim=128, deterministic=True, softcap=30.0)
    dq, _, _ = launch_bwd.backward(torch.randn_like(q), q, k, v, torch.randn_like(q), _lse(1, 8, 200), call)
    (_, args, kw), = rec["main"].calls
    if "n_tiles" in kw:  # (the persistent kernel: its tile counter and tail workspace after DELTA, args[9:11])
        assert args[9].dtype == torch.int32 and int(args[9]) == 0 and args[10] is None
        args = args[:9] + args[11:]
    assert not kw["ATOMIC_DQ"] and kw["HAS_SOFTCAP"] and args[4] is dq
    assert args[23] == pytest.approx(30.0 * 1.4426950408889634)
    (grid, dargs, dkw), = rec["dq"].calls
    assert grid[1:] == (8, 1) and dargs[6] is dq and dkw["HAS_SOFTCAP"] and not dkw["HAS_ALIBI"]
    # the same second pass for a config with atomic_dq=0
    launch_bwd.backward(torch.randn_like(q), q, k, v, torch.randn_like(q), _lse(1, 8, 200), make_call(headdim=128),
                        config=configs.bwd_config(128, atomic_dq=0))  # fmt: skip
    assert len(rec["dq"].calls) == 2 and not rec["main"].calls[1][2]["ATOMIC_DQ"]


def test_launch_bwd_varlen_arguments(lb):
    launch_bwd, rec = lb
    lens_q, lens_k = [0, 1, 17, 130], [5, 0, 40, 130]
    tq, tk, H, Hk, D = sum(lens_q), sum(lens_k), 4, 4, 64
    q = torch.randn(1, tq, H, D, dtype=torch.bfloat16)
    k, v = (torch.randn(1, tk, Hk, D, dtype=torch.bfloat16) for _ in range(2))
    call = make_call(headdim=D, cu_seqlens_q=cu(lens_q, "cpu"), cu_seqlens_k=cu(lens_k, "cpu"),
                     max_seqlen_q=max(lens_q), max_seqlen_k=max(lens_k), window_size=(8, 3))  # fmt: skip
    launch_bwd.backward(torch.randn_like(q), q, k, v, torch.randn_like(q), _lse(1, H, tq), call)
    cfg = configs.bwd_config(D, masked=True)  # a window: the masked table (d64: ws2, 4 warps a partition)
    (grid, args, kw), = rec["main"].calls
    assert kw["num_warps"] == (4 if cfg.kernel == "ws2" else 8)
    assert grid == (-(-max(lens_k) // cfg.block_n), Hk, len(lens_q))
    assert args[4].shape == (1, tq + cfg.block_m, H, D)
    assert args[11] == 0 and args[14] == 0 and args[17] == 0  # no batch strides: rows are global
    assert args[9] is call.cu_seqlens_q and args[10] is call.cu_seqlens_k
    assert kw["IS_VARLEN"] and kw["HAS_WL"] and kw["HAS_WR"] and args[25:27] == (8, 3)


def test_launch_bwd_empty_problem_launches_nothing(lb):
    launch_bwd, rec = lb
    q = torch.randn(2, 0, 4, 64, dtype=torch.bfloat16)
    k = v = torch.randn(2, 10, 4, 64, dtype=torch.bfloat16)
    dq, dk, dv = launch_bwd.backward(q, q, k, v, q, _lse(2, 4, 0), make_call(headdim=64))
    assert dq.shape == q.shape and torch.all(dk == 0) and torch.all(dv == 0)
    assert not rec["main"].calls and not rec["pre"].calls


def test_launch_bwd_rejects_bad_config(lb):
    launch_bwd, _ = lb
    q, k, v = qkv_inputs(1, 8, 8, 2, 2, 128, torch.bfloat16, "cpu")
    with pytest.raises(ValueError, match="backward config"):
        launch_bwd.backward(q, q, k, v, q, _lse(1, 2, 8), make_call(headdim=128),
                            config=configs.bwd_config(128, block_n=32))  # fmt: skip


# ----------------------------------------------------------------------------------------------
# GPU parity (skipped without a usable backend)


def _gpu_ready() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    reason = BE.available()
    if reason:
        return f"hopper backend unavailable: {reason}"
    p = Problem(batch=1, seqlen_q=128, seqlen_k=128, nheads=2, nheads_k=2, headdim=128, dtype=torch.bfloat16,
                device=torch.device("cuda"))  # fmt: skip
    reason = BE.supports(p, make_call(headdim=128))
    return f"hopper backend does not serve this device: {reason}" if reason else None


_NOT_READY = _gpu_ready()
gpu_only = pytest.mark.skipif(_NOT_READY is not None, reason=str(_NOT_READY))




@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "sq,sk,h,hk,d,opts",
    [
        (1, 1, 2, 2, 128, {}),
        (17, 17, 4, 4, 64, {}),
        (113, 203, 4, 4, 128, {}),
        (203, 113, 4, 4, 128, {"causal": True}),
        (113, 203, 8, 2, 64, {"causal": True}),
        (300, 300, 8, 1, 96, {"window_size": (40, 8)}),
        (203, 113, 4, 4, 128, {"window_size": (0, 0)}),
        (203, 203, 2, 2, 192, {"softcap": 20.0}),
        (300, 257, 2, 2, 256, {"causal": True, "softcap": 5.0}),
        (130, 257, 4, 2, 256, {"window_size": (50, 50)}),
    ],
)
def test_gpu_bwd_parity_dense(dtype, sq, sk, h, hk, d, opts):
    q, k, v = qkv_inputs(2, sq, sk, h, hk, d, dtype, "cuda")
    with flashtile.use_backend("hopper"):
        res = compare_with_oracle(dense_fn(**opts), dense_oracle(**opts), (q, k, v))
    for g in res["grads"]:
        assert torch.isfinite(g).all()
    dead = torch.isneginf(res["ref_lse"])
    if dead.any():  # rows that see no key: dq exactly 0
        assert res["grads"][0].permute(0, 2, 1, 3)[dead].abs().max().item() == 0


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("sq,sk,h,hk,d", [(2048, 2048, 11, 11, 128), (2040, 2000, 22, 11, 128),
                                          (2048, 2048, 11, 11, 96)])  # fmt: skip
def test_gpu_bwd_tail_split(sq, sk, h, hk, d, monkeypatch):
    """The persistent backward's split tail (``tail``): 352 tiles on 132 SMs, the last 88 as one piece a
    program (pieces spanning two tiles; a ragged last key block and query block; GQA): gradients within
    the oracle's tolerance, and the tail's conversion ran."""
    from flashtile.backends.hopper import launch_bwd, sched

    cfg = configs.bwd_config(d, tail=1)
    n_tiles = 2 * hk * -(-sk // cfg.block_n)
    if not sched.tail_split(n_tiles, launch_bwd._sm_count(torch.device("cuda")), -(-sq // cfg.block_m)):
        pytest.skip("this GPU's SM count leaves no tail to split at these shapes")
    monkeypatch.setitem(configs._BWD_TABLE, d, cfg)
    seen = []
    real = launch_bwd.dkdv_tail
    monkeypatch.setattr(launch_bwd, "dkdv_tail", lambda ws, *a, **kw: (seen.append(ws.shape), real(ws, *a, **kw)))
    q, k, v = qkv_inputs(2, sq, sk, h, hk, d, torch.bfloat16, "cuda")
    with flashtile.use_backend("hopper"):
        res = compare_with_oracle(dense_fn(), dense_oracle(), (q, k, v))
    assert seen and seen[0][0] == n_tiles % 132
    for g in res["grads"]:
        assert torch.isfinite(g).all()
    # a launch plan (the same call four times: the third and fourth through the prepared launches, the
    # tail's conversion among them) gives the first call's gradients within the atomics' rounding
    from flashtile.backends.hopper import launch as hlaunch

    call = make_call(headdim=d)
    out, lse = hlaunch.forward(q, k, v, call)
    dout = torch.randn_like(q)
    grads = [launch_bwd.backward(dout, q, k, v, out, lse, call) for _ in range(4)]
    if hlaunch.LEAN and launch_bwd.PLANS:  # (the plan was prepared: its runner is kept)
        assert any(key[0] == "bwd" and key[1] == id(call) and callable(plan[1])
                   for key, plan in hlaunch._PLANS.items())  # fmt: skip
    for later in grads[1:]:
        for a, b in zip(later, grads[0], strict=True):
            assert (a.float() - b.float()).abs().max() <= 1e-2 * b.float().abs().max()


def _varlen_oracle(lens_q, lens_k, causal):
    """Per-sequence attention_ref, concatenated: (out (total_q, H, D), lse (1, H, total_q)); a
    sequence without keys gets out 0 and lse -inf."""

    def oracle(q, k, v, upcast):
        outs, lses = [], []
        cq = ck = 0
        for nq, nk in zip(lens_q, lens_k, strict=True):
            if nq and nk:
                o, lse = attention_ref(q[None, cq:cq + nq], k[None, ck:ck + nk], v[None, ck:ck + nk], causal=causal,
                                       upcast=upcast)  # fmt: skip
                outs.append(o[0])
                lses.append(lse)
            elif nq:
                outs.append(torch.zeros_like(q[cq:cq + nq]))
                lses.append(torch.full((1, q.shape[1], nq), float("-inf"), device=q.device))
            cq, ck = cq + nq, ck + nk
        return torch.cat(outs, 0), torch.cat(lses, 2)

    return oracle


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_bwd_parity_varlen(causal, d):
    """Empty and length-1 sequences, a sequence without keys and one without queries, GQA."""
    lens_q, lens_k = [0, 1, 17, 130, 0, 300, 9], [5, 0, 40, 130, 3, 257, 1]
    dev, dtype, h, hk = "cuda", torch.bfloat16, 4, 2
    q = torch.randn(sum(lens_q), h, d, device=dev, dtype=dtype)
    k = torch.randn(sum(lens_k), hk, d, device=dev, dtype=dtype)
    v = torch.randn(sum(lens_k), hk, d, device=dev, dtype=dtype)
    cq, ck = cu(lens_q, dev), cu(lens_k, dev)

    def fn(q, k, v):
        out, lse, _ = flash_attn_varlen_func(q, k, v, cq, ck, max(lens_q), max(lens_k), causal=causal,
                                             return_attn_probs=True)  # fmt: skip
        return out, lse[None]

    with flashtile.use_backend("hopper"):
        res = compare_with_oracle(fn, _varlen_oracle(lens_q, lens_k, causal), (q, k, v))
    dq, dk, dv = res["grads"]
    assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
    # sequence 1 has no keys: its dq is 0; sequences 0 and 4 have no queries: their dk, dv are 0
    assert dq[0:1].abs().max().item() == 0
    for a, b in ((0, 5), (sum(lens_k[:4]), sum(lens_k[:5]))):
        assert dk[a:b].abs().max().item() == 0 and dv[a:b].abs().max().item() == 0


@pytest.mark.gpu
@gpu_only
def test_gpu_bwd_deterministic_is_bitwise_reproducible():
    from flashtile.backends.hopper import launch, launch_bwd

    q, k, v = qkv_inputs(2, 700, 900, 8, 2, 128, torch.bfloat16, "cuda")
    call = make_call(headdim=128, causal=True, deterministic=True)
    out, lse = launch.forward(q, k, v, call)
    dout = torch.randn_like(out)
    first = launch_bwd.backward(dout, q, k, v, out, lse, call)
    for _ in range(19):
        again = launch_bwd.backward(dout, q, k, v, out, lse, call)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    # the default (atomic dQ) mode: within tolerance of the deterministic result, run to run
    fast = [launch_bwd.backward(dout, q, k, v, out, lse, make_call(headdim=128, causal=True)) for _ in range(2)]
    for run in fast:
        for a, b in zip(run, first, strict=True):
            assert (a.float() - b.float()).abs().max().item() <= 1e-2 * max(1.0, b.float().abs().max().item())


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("opts", [{"causal": True}, {"softcap": 30.0}])
def test_gpu_bwd_extreme_logits_finite(opts):
    q, k, v = qkv_inputs(2, 257, 257, 4, 4, 128, torch.bfloat16, "cuda")
    q, k = q * 30, k * 30
    q, k, v = (x.requires_grad_() for x in (q, k, v))
    with flashtile.use_backend("hopper"):
        out = flash_attn_func(q, k, v, **opts)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.gpu
@gpu_only
def test_gpu_bwd_triton_switch_agrees(monkeypatch):
    q, k, v = (torch.randn(1, 300, 4, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))  # fmt: skip
    grads = {}
    for mode in ("gluon", "triton"):
        monkeypatch.setenv(hopper.BWD_ENV, mode)
        with flashtile.use_backend("hopper"):
            out = flash_attn_func(q, k, v, causal=True)
        grads[mode] = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    for a, b in zip(grads["gluon"], grads["triton"], strict=True):
        assert (a.float() - b.float()).abs().max().item() <= 2e-2 * max(1.0, b.float().abs().max().item())


# ----------------------------------------------------------------------------------------------
# launch plans of the dense backward (launch_bwd._runner)


@pytest.fixture
def planned(monkeypatch):
    """launch_bwd's kernels replaced by recorders (``conftest.plan_recorders``)."""
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from flashtile.backends.hopper import launch as HL
    from flashtile.backends.hopper import launch_bwd

    log = plan_recorders(monkeypatch, launch_bwd, ("attn_bwd_ws", "attn_bwd_ws_persistent", "attn_bwd",
                                                   "_bwd_preprocess", "_dq_fast", "_bwd_dq_kernel",
                                                   "_dkdv_fast"))  # fmt: skip
    monkeypatch.setattr(launch_bwd, "_sm_count", lambda device: 132)
    monkeypatch.setattr(launch_bwd, "_descriptor", lambda t, rows, varlen: ("desc", tuple(t.shape), t.dtype, rows))
    monkeypatch.setattr(launch_bwd, "arch", lambda device: "sm90")
    monkeypatch.setattr(HL, "LEAN", True)
    monkeypatch.setattr(launch_bwd, "PLANS", True)
    HL.clear_plans()
    yield launch_bwd, log
    HL.clear_plans()


@pytest.mark.parametrize("persistent", [0, 1])
def test_bwd_plans_repeat_the_first_launch(planned, monkeypatch, persistent):
    """A signature's first call records a pending plan, its first reuse prepares the three launches,
    later calls take them: every call launches the same kernels, grids, non-tensor arguments,
    tensor dtypes, descriptors and keywords, and returns gradients of the inputs' shapes. The
    persistent kernel's tile counter is a leading argument (each call's own, zeroed with the
    accumulator)."""
    from flashtile.backends.hopper import launch as HL

    launch_bwd, log = planned
    monkeypatch.setitem(configs._BWD_TABLE, 128, replace(configs._BWD_TABLE[128], persistent=persistent))
    q, k, v = qkv_inputs(2, 200, 230, 4, 2, 128, torch.bfloat16, "cpu")
    call = make_call(headdim=128, softmax_scale=0.3)
    dout, out, lse = torch.randn_like(q), torch.randn_like(q), _lse(2, 4, 200)
    runs = []
    for _ in range(4):
        n0 = len(log)
        dq, dk, dv = launch_bwd.backward(dout, q, k, v, out, lse, call)
        assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, v.shape)
        runs.append(log[n0:])
    strip = [[e[:4] for e in r] for r in runs]
    assert strip[0] == strip[1] == strip[2] == strip[3]
    main_name = "attn_bwd_ws_persistent" if persistent else "attn_bwd_ws"
    assert [e[0] for e in runs[0]] == ["_bwd_preprocess", main_name, "_dq_fast"]
    if persistent:  # (recorded args: 4 descriptors, dq_desc, the accumulator, dk, dv, lse, delta, the counter)
        assert all(r[1][2][10] == torch.int32 and r[1][3]["n_tiles"] == 2 * 2 * 2 for r in runs)
    assert [e[4] for e in runs[1]] == ["generic"] * 3 and [e[4] for e in runs[3]] == ["prepared"] * 3
    main = runs[3][1]
    assert main[2][4] == ("desc", (2, 200 + configs.bwd_config(128).block_m, 4, 128), torch.float32,
                          configs.bwd_config(128).block_m)  # fmt: skip
    # cleared plans: the runner declines and the full path runs (and plans anew)
    HL.clear_plans()
    n0 = len(log)
    launch_bwd.backward(dout, q, k, v, out, lse, call)
    assert [e[4] for e in log[n0:]] == ["generic"] * 3


def test_bwd_plans_only_what_they_can_repeat(planned):
    """Not planned: deterministic calls (the ordered dQ pass), calls whose inputs TMA cannot read as
    they are (copied), configs passed by the caller, and calls holding a tensor (ALiBi)."""
    launch_bwd, log = planned
    q, k, v = qkv_inputs(1, 130, 130, 2, 2, 64, torch.float16, "cpu")
    dout, out, lse = torch.randn_like(q), torch.randn_like(q), _lse(1, 2, 130)
    odd = torch.randn(1, 130, 2, 68, dtype=torch.float16)[..., :64]  # head stride 136 B: not TMA-readable
    cases = [
        (make_call(headdim=64, deterministic=True), (dout, q, k, v), {}),
        (make_call(headdim=64), (dout, odd, k, v), {}),
        (make_call(headdim=64), (dout, q, k, v), {"config": configs.bwd_config(64)}),
        (make_call(headdim=64, alibi_slopes=torch.rand(2)), (dout, q, k, v), {}),
    ]
    for call, (d, qq, kk, vv), kw in cases:
        for _ in range(3):
            n0 = len(log)
            launch_bwd.backward(d, qq, kk, vv, out, lse, call, **kw)
            assert all(e[4] == "generic" for e in log[n0:]), call


def test_persistent_backward_config_and_launch(lb):
    """``persistent`` (the d96 / d128 default since stop 34): an option of the ws kernel with swap
    and stat_ring only; a dense call (causal and windowed too) launches one program per SM (at most one
    per tile) with the tile counts and a zeroed tile counter, and is never planned; a varlen call keeps
    one program per tile."""
    launch_bwd, rec = lb
    cfg = configs.bwd_config(128, persistent=1)
    assert configs.bwd_check(cfg, 128) is None
    assert "persistent" in configs.bwd_check(configs.bwd_config(128, persistent=1, stat_ring=0, fold=0), 128)
    assert "persistent" in configs.bwd_check(configs.bwd_config(128, persistent=1, nbar=1), 128)
    assert "ws / ws2" in configs.bwd_check(configs.bwd_config(256, persistent=1), 256)
    B, S, H, Hk, D = 2, 1000, 8, 4, 128
    q = torch.randn(B, S, H, D, dtype=torch.bfloat16)
    k, v = (torch.randn(B, S, Hk, D, dtype=torch.bfloat16) for _ in range(2))
    call = make_call(headdim=D)
    launch_bwd.backward(torch.randn_like(q), q, k, v, torch.randn_like(q), _lse(B, H, S), call, config=cfg)
    grid, _, kw = rec["main"].calls[-1]
    n_kb = -(-S // cfg.block_n)
    assert (kw["n_kb"], kw["n_hk"], kw["n_tiles"]) == (n_kb, Hk, n_kb * Hk * B)
    assert grid == (min(n_kb * Hk * B, 132),) and kw["STAT_RING"] and kw["SWAP"] and not kw["LPT"]
    assert kw["head_group"] == 1  # (tiles of one length: key block fastest)
    big = torch.randn(1, 64 * 1024, 2, D, dtype=torch.bfloat16)  # more tiles than SMs: 132 programs
    launch_bwd.backward(big, big, big, big, big, _lse(1, 2, 64 * 1024), make_call(headdim=D), config=cfg)
    assert rec["main"].calls[-1][0] == (132,)
    for masked in (dict(causal=True), dict(window_size=(64, 64))):  # (tiles of unequal length: the counter)
        launch_bwd.backward(torch.randn_like(q), q, k, v, torch.randn_like(q), _lse(B, H, S),
                            make_call(headdim=D, **masked), config=cfg)  # fmt: skip
        grid, _, kw = rec["main"].calls[-1]
        assert grid == (min(n_kb * Hk * B, 132),) and kw["n_tiles"] == n_kb * Hk * B
        ctr = rec["main"].calls[-1][1][9]  # a fresh zeroed int32 counter per call (after DELTA)
        assert ctr.dtype == torch.int32 and ctr.shape == (1,) and int(ctr) == 0
        assert kw["head_group"] == cfg.head_group == 4  # (the table's: 4 heads' key block 0 first)
    for group, want in ((3, 3), (100, Hk * B), (0, Hk * B)):  # (0: all heads in one group)
        launch_bwd.backward(torch.randn_like(q), q, k, v, torch.randn_like(q), _lse(B, H, S),
                            make_call(headdim=D, causal=True), config=replace(cfg, head_group=group))
        assert rec["main"].calls[-1][2]["head_group"] == want
    assert "head_group" in configs.bwd_check(replace(cfg, head_group=-1), 128)
    lens = cu([30, 70], "cpu")
    qv = torch.randn(1, 100, 4, D, dtype=torch.bfloat16)
    vcall = make_call(headdim=D, cu_seqlens_q=lens, cu_seqlens_k=lens, max_seqlen_q=70, max_seqlen_k=70)
    launch_bwd.backward(torch.randn_like(qv), qv, qv, qv, torch.randn_like(qv), _lse(1, 4, 100), vcall, config=cfg)
    grid, _, kw = rec["main"].calls[-1]
    assert "n_tiles" not in kw and len(grid) == 3



def test_epi_config_and_launch(lb):
    """``epi`` (dK / dV through shared memory; the d64 / d96 / d128 default since stop 35): on the ws
    kernel a staging tile counted in the shared-memory budget (``block_n x BLOCK_D`` elements), handed to
    the kernel as ``EPI`` on the persistent and the one-program-per-tile launches alike; on the plain
    kernel K's and V's tiles (no more shared memory); ignored on ws2."""
    launch_bwd, rec = lb
    for d in (64, 96, 128):
        base = configs.bwd_config(d, epi=0)
        cfg = replace(base, epi=1)
        assert configs.bwd_check(cfg, d) is None
        assert configs.bwd_smem_bytes(cfg, d) - configs.bwd_smem_bytes(base, d) == 2 * base.block_n * configs.block_d(d)
        assert not base.kernel_consts(d)["EPI"] and cfg.kernel_consts(d)["EPI"]
    plain = configs.bwd_config(256, epi=1)  # (plain: through K's and V's tiles, no more shared memory)
    assert configs.bwd_check(plain, 256) is None and plain.kernel_consts(256)["EPI"]
    assert configs.bwd_smem_bytes(plain, 256) == configs.bwd_smem_bytes(replace(plain, epi=0), 256)
    ws2 = configs.bwd_config(64, kernel="ws2", epi=1, swap=0, stat_ring=0, fold=0)  # (ignored there)
    assert configs.bwd_check(ws2, 64) is None and not ws2.kernel_consts(64)["EPI"]
    assert configs.bwd_smem_bytes(ws2, 64) == configs.bwd_smem_bytes(replace(ws2, epi=0), 64)
    B, S, H, D = 1, 300, 2, 128
    q, k, v = (torch.randn(B, S, H, D, dtype=torch.bfloat16) for _ in range(3))
    for cfg in (configs.bwd_config(128, epi=1), configs.bwd_config(128, epi=1, persistent=0)):
        launch_bwd.backward(torch.randn_like(q), q, k, v, torch.randn_like(q), _lse(B, H, S), make_call(headdim=D),
                            config=cfg)  # fmt: skip
        assert rec["main"].calls[-1][2]["EPI"] is True


def test_defer_dk_with_swap(lb):
    """``defer_dk`` with swap (the d96 / d128 default since stop 35, off at d64): accepted by the check and
    handed to the ws kernels as ``DEFER_DK``, the persistent one included."""
    launch_bwd, rec = lb
    assert configs.bwd_config(128).defer_dk and configs.bwd_config(96).defer_dk and not configs.bwd_config(64).defer_dk
    for d in (64, 128):
        cfg = configs.bwd_config(d, defer_dk=1)
        assert cfg.swap and configs.bwd_check(cfg, d) is None and cfg.kernel_consts(d)["DEFER_DK"]
    q, k, v = (torch.randn(1, 300, 2, 128, dtype=torch.bfloat16) for _ in range(3))
    for cfg in (configs.bwd_config(128), configs.bwd_config(128, persistent=0)):
        launch_bwd.backward(torch.randn_like(q), q, k, v, torch.randn_like(q), _lse(1, 2, 300), make_call(headdim=128),
                            config=cfg)  # fmt: skip
        assert rec["main"].calls[-1][2]["DEFER_DK"] is True


def _tail_inputs(causal=False, **kw):
    """A dense d128 call of 2 x 11 KV heads x 16 key blocks = 352 tiles: 88 past two rounds of 132."""
    B, S, H, Hk, D = 2, 2048, 11, 11, 128
    q, k, v = (torch.randn(B, S, n, D, dtype=torch.bfloat16) for n in (H, Hk, Hk))
    return (torch.randn_like(q), q, k, v, torch.randn_like(q), _lse(B, H, S), make_call(headdim=D, causal=causal,
                                                                                         **kw))  # fmt: skip


def test_tail_config_and_launch(lb):
    """``tail`` (the persistent kernel's split last round): an option of the persistent kernel; a dense
    call without mask or window whose tiles leave a short last round (``sched.tail_split``) gets ``TAIL``,
    the split's bounds and a zeroed fp32 workspace after the tile counter, and the workspace's conversion
    into dK / dV after the kernel; causal, windowed and deterministic calls, and configs without ``tail``,
    run without (the workspace argument None)."""
    launch_bwd, rec = lb
    cfg = configs.bwd_config(128, tail=1)
    assert configs.bwd_check(cfg, 128) is None and configs.bwd_config(96).tail and not configs.bwd_config(64).tail
    for d, other in ((128, configs.bwd_config(128, tail=1, persistent=0)), (256, configs.bwd_config(256, tail=1))):
        assert configs.bwd_check(other, d) is None  # (ignored by the other kernels)
    dout, q, k, v, out, lse, call = _tail_inputs()
    _, dk, dv = launch_bwd.backward(dout, q, k, v, out, lse, call, config=cfg)
    grid, args, kw = rec["main"].calls[-1]
    assert grid == (132,) and kw["TAIL"] and kw["n_tiles"] == 352
    assert (kw["t_full"], kw["n_split"], kw["split_mb"]) == (264, 88, 2048 // cfg.block_m)
    ws = args[10]  # (after the tile counter)
    assert ws.dtype == torch.float32 and ws.shape == (88, 2, cfg.block_n, 128) and not ws.any()
    (tgrid, targs, tkw), = rec["tail"].calls
    assert tgrid == (88,) and targs[0] is ws and targs[1] is dk and targs[2] is dv and targs[3:5] == (264, 16)
    assert tkw["BLOCK_N"] == cfg.block_n and tkw["D"] == 128
    for other, c in ((_tail_inputs(causal=True), cfg), (_tail_inputs(window_size=(512, 512)), cfg),
                     (_tail_inputs(deterministic=True), cfg), (_tail_inputs(), replace(cfg, tail=0)),
                     (_tail_inputs(), replace(cfg, persistent=0))):  # fmt: skip
        launch_bwd.backward(*other, config=c)
        _, args, kw = rec["main"].calls[-1]
        assert "TAIL" not in kw and (args[10] is None if c.persistent else "n_tiles" not in kw)
    assert len(rec["tail"].calls) == 1


def test_tail_plans_repeat_the_first_launch(planned, monkeypatch):
    """A planned call with the split tail launches what its first call did: the persistent kernel with a
    fresh workspace, then the tail's conversion, then dQ's."""
    launch_bwd, log = planned
    monkeypatch.setitem(configs._BWD_TABLE, 128, replace(configs._BWD_TABLE[128], persistent=1, tail=1))
    dout, q, k, v, out, lse, call = _tail_inputs()
    runs = []
    for _ in range(4):
        n0 = len(log)
        launch_bwd.backward(dout, q, k, v, out, lse, call)
        runs.append(log[n0:])
    assert [e[0] for e in runs[0]] == ["_bwd_preprocess", "attn_bwd_ws_persistent", "_dkdv_fast", "_dq_fast"]
    assert [[e[:4] for e in r] for r in runs[1:]] == [[e[:4] for e in runs[0]]] * 3
    assert [e[4] for e in runs[3]] == ["prepared"] * 4
    assert runs[3][1][2][11] == torch.float32 and runs[3][1][3]["TAIL"]  # (the workspace: a leading argument)
