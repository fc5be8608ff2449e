"""The Gluon ``hopper`` backend: declarations, ``available()`` / ``supports()`` reasons, dispatch,
the config table (all CPU-only), and GPU parity against the oracle (``gpu`` marker: skipped
without CUDA or when the backend is unusable, e.g. not an sm_90 device or another Triton).

The kernels themselves are compiled for sm_90 on CPU machines by ``scripts/gluon_compile_check.py``
(needs Triton 3.6); ``benchmarks/hopper_run.py`` is the full GPU check.
"""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest
import torch
from conftest import dense_fn, dense_oracle

import flashtile
from flashtile import BackendUnavailableError, dispatch, flash_attn_func, flash_attn_varlen_func
from flashtile.backends import _device, hopper
from flashtile.backends.hopper import configs, sched
from flashtile.spec import Problem, make_call
from flashtile.testing import attention_ref, compare_with_oracle, qkv_inputs
from flashtile.testing import cu_seqlens as cu

BE = hopper.backend


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv("FLASHTILE_BACKEND", raising=False)
    monkeypatch.setattr(hopper, "SMALL_ROWS", 0)  # the small test shapes exercise the Gluon kernels
    monkeypatch.setattr(hopper, "TRITON_FWD_WINDOW_SPAN", {})  # (windows too)
    yield


def _problem(device="cuda", dtype=torch.bfloat16, d=128, **kw) -> Problem:
    base = dict(batch=2, seqlen_q=256, seqlen_k=256, nheads=4, nheads_k=4, headdim=d, dtype=dtype,
                device=torch.device(device))  # fmt: skip
    base.update(kw)
    return Problem(**base)


def _hopper_device(monkeypatch, major=9, minor=0):
    """Pretend the CUDA device is of compute capability major.minor (no GPU needed)."""
    info = _device.DeviceInfo(major, minor, 132, 228 * 1024)
    monkeypatch.setattr(_device, "info", lambda device=None: info)


# ----------------------------------------------------------------------------------------------
# declarations


def test_registered_with_declared_capabilities():
    assert dispatch.backends()["hopper"] is BE
    caps = BE.capabilities
    assert BE.name == "hopper"
    assert caps.priority == 20 and caps.priority > dispatch.backends()["triton"].capabilities.priority
    assert caps.dtypes == frozenset({torch.float16, torch.bfloat16, torch.float8_e4m3fn})
    assert caps.max_headdim == 256
    assert caps.features == frozenset({"causal", "window", "softcap", "varlen"})
    assert caps.auto_devices == ("cuda",)
    assert caps.decode is False
    assert hopper.TESTED_TRITON == ("3.6.0",)


def test_declarations_refuse_what_the_kernel_lacks():
    p = _problem()
    assert BE.capabilities.refuse(p, make_call(headdim=128)) is None
    assert BE.capabilities.refuse(p, make_call(headdim=128, causal=True, window_size=(8, -1), softcap=3.0)) is None
    assert "dropout" in BE.capabilities.refuse(p, make_call(headdim=128, dropout_p=0.1))
    alibi = make_call(headdim=128, alibi_slopes=torch.ones(2, 4))
    assert "alibi" in BE.capabilities.refuse(p, alibi)
    assert "dtype" in BE.capabilities.refuse(_problem(dtype=torch.float32), make_call(headdim=128))
    assert "head dim" in BE.capabilities.refuse(_problem(d=512), make_call(headdim=512))
    assert BE.capabilities.refuse(p, make_call(headdim=128), decode=True)


def test_import_does_not_import_triton():
    """Importing flashtile (and so this backend) must not import triton: the triton backend's
    interpreter switch is read when triton is imported."""
    code = "import sys, flashtile.backends.hopper as h; h.backend.capabilities; print('triton' in sys.modules)"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "False"


# ----------------------------------------------------------------------------------------------
# available()


def test_available_reason_without_triton(monkeypatch):
    monkeypatch.setattr(hopper, "_triton_version", lambda: None)
    reason = BE.available()
    assert reason and "triton is not installed" in reason


@pytest.mark.parametrize("version", ["3.5.1", "3.9.0", "3.6.0+git1234"])
def test_available_reason_names_untested_triton(monkeypatch, version):
    monkeypatch.setattr(hopper, "_triton_version", lambda: version)
    reason = BE.available()
    assert reason and version in reason and "3.6.0" in reason


def test_available_reason_without_gluon(monkeypatch):
    monkeypatch.setattr(hopper, "_triton_version", lambda: "3.6.0")
    monkeypatch.setattr(hopper, "_gluon_files_present", lambda: False)
    reason = BE.available()
    assert reason and "Gluon" in reason


def test_available_reason_without_cuda(monkeypatch):
    monkeypatch.setattr(hopper, "_triton_version", lambda: "3.6.0")
    monkeypatch.setattr(hopper, "_gluon_files_present", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert BE.available() == "no CUDA device"


def test_available_never_raises():
    reason = BE.available()
    assert reason is None or (isinstance(reason, str) and reason)


def test_triton_version_is_read_without_import():
    v = hopper._triton_version()
    if v is not None:
        assert isinstance(v, str) and v


# ----------------------------------------------------------------------------------------------
# supports()


def test_supports_sm90_head_dims(monkeypatch):
    _hopper_device(monkeypatch)
    call = make_call(headdim=128, causal=True)
    for d in configs.HEADDIMS:
        assert BE.supports(_problem(d=d), make_call(headdim=d)) is None, d
    assert BE.supports(_problem(), call) is None
    for d in (32, 80, 160, 48):
        reason = BE.supports(_problem(d=d), make_call(headdim=d))
        assert reason and f"head dim {d}" in reason


@pytest.mark.parametrize("cc", [(8, 0), (8, 9), (10, 0), (12, 0)])
def test_supports_refuses_other_architectures(monkeypatch, cc):
    _hopper_device(monkeypatch, *cc)
    reason = BE.supports(_problem(), make_call(headdim=128))
    assert reason and "9.x" in reason and f"{cc[0]}.{cc[1]}" in reason


def test_supports_refuses_cpu_tensors_and_bad_scale(monkeypatch):
    assert "CUDA" in BE.supports(_problem("cpu"), make_call(headdim=128))
    _hopper_device(monkeypatch)
    assert "softmax_scale" in BE.supports(_problem(), make_call(headdim=128, softmax_scale=-0.1))


# ----------------------------------------------------------------------------------------------
# dispatch


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_auto_never_picks_hopper_on_cpu(dtype):
    p = _problem("cpu", dtype=dtype)
    assert dispatch.choose(p, make_call(headdim=128)) != "hopper"
    q, k, v = qkv_inputs(1, 16, 16, 2, 2, 64, dtype, "cpu")
    flash_attn_func(q, k, v)  # runs (on the torch engine)


def test_forcing_hopper_on_cpu_says_why():
    q, k, v = qkv_inputs(1, 16, 16, 2, 2, 64, torch.bfloat16, "cpu")
    with flashtile.use_backend("hopper"):
        with pytest.raises(BackendUnavailableError, match="'hopper' was requested but cannot serve"):
            flash_attn_func(q, k, v)


def test_forcing_hopper_for_undeclared_feature_says_why(monkeypatch):
    monkeypatch.setattr(BE, "available", lambda: None)
    _hopper_device(monkeypatch)
    with flashtile.use_backend("hopper"):
        with pytest.raises(BackendUnavailableError, match="dropout"):
            dispatch.choose(_problem(), make_call(headdim=128, dropout_p=0.1))


def test_auto_prefers_hopper_when_usable(monkeypatch):
    monkeypatch.setattr(BE, "available", lambda: None)
    _hopper_device(monkeypatch)
    assert dispatch.choose(_problem(), make_call(headdim=128, causal=True)) == "hopper"
    # a head dim it does not serve goes to the next backend down
    assert dispatch.choose(_problem(d=80), make_call(headdim=80)) != "hopper"


# ----------------------------------------------------------------------------------------------
# config table


def test_config_table_sane():
    for d in configs.HEADDIMS:
        cfg = configs.config(d)
        assert configs.check(cfg, d) is None, (d, cfg)
        assert configs.smem_bytes(cfg, d) + 1024 <= configs.SM90_SMEM_LIMIT
        assert cfg.block_m == 64 * cfg.consumers and cfg.kernel in configs.KERNELS
        assert cfg.num_warps == (8 if cfg.kernel == "plain" else 4)
        assert cfg.q_rows == (128 if cfg.kernel == "plain" else 64)
        assert configs.block_d(d) >= d and configs.block_d(d) & (configs.block_d(d) - 1) == 0
    assert configs.block_d(96) == 128 and configs.block_d(192) == 256 and configs.block_d(64) == 64
    with pytest.raises(ValueError, match="head dims"):
        configs.config(80)
    assert configs.config(128, num_stages=3).num_stages == 3
    assert "shared memory" in configs.check(configs.config(256, num_stages=4), 256)
    assert "block_n" in configs.check(configs.config(128, block_n=72), 128)
    assert "kernel" in configs.check(configs.config(128, kernel="nope"), 128)
    assert configs.check(configs.config(128, kernel="plain"), 128) is None
    assert "registers" in configs.check(configs.config(128, kernel="ws", consumer_regs=256, producer_regs=56), 128)
    assert "multiples of 8" in configs.check(configs.config(128, kernel="ws", consumer_regs=236), 128)


def test_three_consumer_configs():
    """consumers=3 brings block_m = 192 and a register split that fits 64K registers (3 x 128 x r
    + 128 x producer); the plain kernel and bad counts are refused with the reason."""
    cfg = configs.config(64, consumers=3)
    assert (cfg.block_m, cfg.q_rows) == (192, 64)
    assert configs.check(cfg, 64) is None
    assert (3 * cfg.consumer_regs + cfg.producer_regs) * 128 <= 65536 and cfg.consumer_regs % 8 == 0
    assert configs.config(64, consumers=2).block_m == 128
    assert "block_m" in configs.check(configs.config(64, consumers=3, block_m=128), 64)
    assert "consumers" in configs.check(configs.config(64, consumers=4), 64)
    assert "registers" in configs.check(configs.config(64, consumers=3, consumer_regs=240), 64)
    assert "plain" in configs.check(configs.config(64, kernel="plain", consumers=3), 64)


def test_config_for_picks_consumers_by_causality_and_length():
    """Head dim 64: 3 consumers except causal calls shorter than the threshold; others: the table."""
    n = configs.D64_CAUSAL_THREE_CONSUMERS_FROM
    assert configs.config_for(64, causal=False, seqlen_q=1024).consumers == 3
    assert configs.config_for(64, causal=True, seqlen_q=n).consumers == 3
    assert configs.config_for(64, causal=True, seqlen_q=n - 1).consumers == 2
    for d in configs.HEADDIMS:
        cfg = configs.config_for(d, causal=True, seqlen_q=4096)
        assert configs.check(cfg, d) is None
        if d != 64:
            assert cfg == configs.config(d)


def test_configs_module_is_torch_free():
    """scripts/gluon_compile_check.py loads configs.py on machines without torch."""
    src = open(configs.__file__).read()
    assert "import torch" not in src and "import triton" not in src


# ----------------------------------------------------------------------------------------------
# tile schedule of the persistent kernel (sched.py)


@pytest.mark.parametrize("n_split,n_mb,g", [(68, 64, 132), (68, 256, 132), (5, 2000, 132), (88, 32, 132),
                                             (3, 40, 7), (1, 16, 1)])
def test_tail_parts_cover_the_split_tiles_once(n_split, n_mb, g):
    """The split tail's pieces (``sched.tail_parts``, the kernel's ``_tail_code``): one or two parts each,
    none empty, within a tile, codes within TAIL_BITS; together every query block of the split tiles
    exactly once, and no piece longer than its share rounded up."""
    seen = [[0] * n_mb for _ in range(n_split)]
    for p in range(g):
        parts = sched.tail_parts(p, n_split, n_mb, g)
        assert 1 <= len(parts) <= 2
        assert sum(hi - lo for _, lo, hi in parts) <= -(-n_split * n_mb // g)
        for j, lo, hi in parts:
            assert 0 <= j < n_split and 0 <= lo < hi <= n_mb < 1 << sched.TAIL_BITS
            for m in range(lo, hi):
                seen[j][m] += 1
        if len(parts) == 2:  # the end of one tile, then the start of the next
            assert parts[0][2] == n_mb and parts[1] == (parts[0][0] + 1, 0, parts[1][2])
    assert all(c == 1 for row in seen for c in row)


def test_tail_split_rule():
    """Split where a last round of whole tiles would leave programs idle: 2048 tiles of 64 query blocks on
    132 SMs (68 in the last round); not without a whole first round, with an even last round, a nearly full
    one, pieces shorter than TAIL_MIN_BLOCKS blocks, or more blocks than a code holds."""
    assert sched.tail_split(2048, 132, 64) == 68
    assert sched.tail_split(2048, 132, 256) == 68
    assert sched.tail_split(352, 132, 32) == 88
    assert sched.tail_split(200, 132, 64) == 0  # (no whole first round for every program)
    assert sched.tail_split(132 * 16, 132, 64) == 0
    assert sched.tail_split(132 * 15 + 130, 132, 64) == 0  # (a full last round: > TAIL_MAX_FILL)
    assert sched.tail_split(2048, 132, 16) == 0  # (68 x 16 blocks: pieces of 8)
    assert sched.tail_split(2048, 132, 1 << sched.TAIL_BITS) == 0
    assert sched.tail_split(2048, 0, 64) == 0


def _visible(i: int, j: int, sq: int, sk: int, wl: int, wr: int) -> bool:
    off = sk - sq
    return 0 <= j < sk and (wl < 0 or j >= i + off - wl) and (wr < 0 or j <= i + off + wr)


@pytest.mark.parametrize("seed", range(6))
def test_block_range_matches_brute_force(seed):
    """The host twin of the kernel's _block_range: visited blocks cover every visible pair, blocks
    outside are invisible, 'full' blocks are visible to every row of the tile."""
    rng = torch.Generator().manual_seed(seed)
    for _ in range(60):
        sq, sk = (int(x) for x in torch.randint(1, 300, (2,), generator=rng))
        wl, wr = (int(x) - 1 for x in torch.randint(0, 80, (2,), generator=rng))
        if int(torch.randint(0, 3, (1,), generator=rng)) == 0:
            wl = -1
        if int(torch.randint(0, 3, (1,), generator=rng)) == 0:
            wr = -1
        bm, bn = [(16, 16), (64, 32), (128, 128), (128, 64)][int(torch.randint(0, 4, (1,), generator=rng))]
        for r_lo in range(0, sq, bm):
            r_hi = min(r_lo + bm, sq)
            nb_lo, fu_lo, fu_hi, nb_hi = sched.block_range(r_lo, r_hi, sk, sk - sq, wl, wr, bn)
            assert 0 <= nb_lo <= fu_lo <= fu_hi <= nb_hi <= -(-sk // bn)
            for blk in range(-(-sk // bn)):
                cols = range(blk * bn, min(blk * bn + bn, sk))
                vis = [[_visible(i, j, sq, sk, wl, wr) for j in cols] for i in range(r_lo, r_hi)]
                if not nb_lo <= blk < nb_hi:
                    assert not any(map(any, vis)), (sq, sk, wl, wr, bm, bn, r_lo, blk)
                if fu_lo <= blk < fu_hi:
                    assert all(map(all, vis)) and len(cols) == bn, (sq, sk, wl, wr, bm, bn, r_lo, blk)


def _cost(sq, sk, bm, bn, wl, wr, n_mb):
    return lambda code: sched.key_blocks(code % n_mb, bm, bn, sq, sk, wl, wr) + sched.TILE_OVERHEAD


@pytest.mark.parametrize(
    "b,h,sq,sk,wl,wr,g",
    [(1, 16, 16384, 16384, -1, 0, 132), (4, 16, 4096, 4096, -1, 0, 132), (2, 3, 1000, 700, -1, 0, 7),
     (1, 8, 8192, 8192, 256, 0, 132), (16, 32, 1024, 1024, -1, -1, 132), (1, 1, 200, 200, -1, 0, 132),
     (3, 5, 513, 2049, 64, 64, 11), (4, 16, 4096, 4096, -1, 0, 20), (2, 8, 4096, 4096, 300, -1, 9)],
)  # fmt: skip
def test_schedule_covers_every_tile_heaviest_first(b, h, sq, sk, wl, wr, g):
    """Both dealing paths (LPT heap; the snake above SNAKE_ABOVE tiles per program)."""
    bm, bn = 128, 128
    n_mb = -(-sq // bm)
    codes, offsets = sched.schedule(b, h, sq, sk, bm, bn, wl, wr, g)
    n_tiles = b * h * n_mb
    assert sorted(codes) == list(range(n_tiles))
    assert offsets[0] == 0 and offsets[-1] == n_tiles and len(offsets) == min(g, n_tiles) + 1
    assert all(a < c for a, c in zip(offsets[:-1], offsets[1:], strict=True))  # every program has a tile
    cost = _cost(sq, sk, bm, bn, wl, wr, n_mb)
    for a, c in zip(offsets[:-1], offsets[1:], strict=True):
        costs = [cost(x) for x in codes[a:c]]
        assert costs == sorted(costs, reverse=True)  # each program: heaviest tiles first
    # LPT bound: makespan <= 4/3 of the lower bound max(mean load, heaviest tile)
    total = sum(cost(x) for x in range(n_tiles))
    lower = max(total / len(offsets[:-1]), max(cost(x) for x in range(n_tiles)))
    assert sched.makespan(codes, offsets, cost) <= 4 / 3 * lower + 1


def test_schedule_causal_beats_round_robin():
    b, h, s, bm, bn, g = 1, 16, 16384, 128, 128, 132
    n_mb = s // bm
    codes, offsets = sched.schedule(b, h, s, s, bm, bn, -1, 0, g)
    cost = _cost(s, s, bm, bn, -1, 0, n_mb)
    # the non-persistent grid's order: heaviest query block first, programs take tiles in turn
    rr = sorted(range(b * h * n_mb), key=lambda c: (-cost(c), c))
    per = [rr[p::g] for p in range(g)]
    rr_codes = tuple(c for lst in per for c in lst)
    rr_offsets = tuple([0] + list(itertools.accumulate(len(lst) for lst in per)))
    assert sched.makespan(codes, offsets, cost) <= sched.makespan(rr_codes, rr_offsets, cost)
    # and it is close to perfect balance
    total = sum(cost(c) for c in range(b * h * n_mb))
    assert sched.makespan(codes, offsets, cost) <= 1.02 * total / g + max(map(cost, range(n_mb)))


def test_schedule_uniform_is_round_robin_in_code_order():
    codes, offsets = sched.schedule(2, 4, 1024, 1024, 128, 128, -1, -1, 5)
    n = 2 * 4 * 8
    for p in range(5):
        assert list(codes[offsets[p]:offsets[p + 1]]) == list(range(p, n, 5))
    assert sched.schedule(0, 4, 1024, 1024, 128, 128, -1, -1, 5) == ((), (0,))


# ----------------------------------------------------------------------------------------------
# GPU parity (skipped without a usable backend)


def _gpu_ready() -> str | None:
    if not torch.cuda.is_available():
        return "needs CUDA"
    reason = BE.available()
    if reason:
        return f"hopper backend unavailable: {reason}"
    reason = BE.supports(_problem(), make_call(headdim=128))
    return f"hopper backend does not serve this device: {reason}" if reason else None


_NOT_READY = _gpu_ready()
gpu_only = pytest.mark.skipif(_NOT_READY is not None, reason=str(_NOT_READY))




@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize(
    "sq,sk,h,hk,d,opts",
    [
        (113, 203, 4, 4, 128, {}),
        (203, 113, 4, 4, 128, {"causal": True}),
        (300, 300, 8, 2, 64, {"causal": True}),
        (257, 300, 4, 1, 96, {"window_size": (40, 8)}),
        (203, 203, 2, 2, 192, {"softcap": 20.0}),
        (300, 257, 2, 2, 256, {"causal": True, "softcap": 5.0}),
    ],
)
def test_gpu_parity_dense(dtype, sq, sk, h, hk, d, opts):
    q, k, v = qkv_inputs(2, sq, sk, h, hk, d, dtype, "cuda")
    with flashtile.use_backend("hopper"):
        compare_with_oracle(dense_fn(**opts), dense_oracle(**opts), (q, k, v))


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("causal", [False, True])
def test_gpu_parity_varlen(causal):
    lens_q, lens_k = [0, 1, 17, 130, 300], [5, 0, 40, 130, 257]
    dev, dtype, h, d = "cuda", torch.bfloat16, 4, 128
    q = torch.randn(sum(lens_q), h, d, device=dev, dtype=dtype)
    k = torch.randn(sum(lens_k), h, d, device=dev, dtype=dtype)
    v = torch.randn(sum(lens_k), h, d, device=dev, dtype=dtype)
    with flashtile.use_backend("hopper"):
        out, lse, _ = flash_attn_varlen_func(q, k, v, cu(lens_q, dev), cu(lens_k, dev), max(lens_q), max(lens_k),
                                             causal=causal, return_attn_probs=True)  # fmt: skip
    assert not torch.isnan(out).any()
    cq = ck = 0
    for nq, nk in zip(lens_q, lens_k, strict=True):
        if nq:
            sl_o, sl_l = out[cq:cq + nq], lse[:, cq:cq + nq]
            if nk == 0:
                assert (sl_o == 0).all() and torch.isneginf(sl_l).all()
            else:
                ro, rl = attention_ref(q[None, cq:cq + nq].float(), k[None, ck:ck + nk].float(),
                                       v[None, ck:ck + nk].float(), causal=causal)  # fmt: skip
                po, _ = attention_ref(q[None, cq:cq + nq], k[None, ck:ck + nk], v[None, ck:ck + nk], causal=causal,
                                      upcast=False)  # fmt: skip
                err, pt_err = (sl_o.float() - ro[0]).abs().max().item(), (po[0].float() - ro[0]).abs().max().item()
                assert err <= 2 * pt_err + 8e-3, (nq, nk, err, pt_err)
                fin = torch.isfinite(rl[0])
                assert torch.equal(torch.isneginf(sl_l), ~fin)
                assert (sl_l[fin] - rl[0][fin]).abs().max().item() <= 2e-3
        cq, ck = cq + nq, ck + nk


@pytest.mark.gpu
@gpu_only
@pytest.mark.parametrize("kernel,consumers,d", [(kn, 2, 128) for kn in configs.KERNELS]
                         + [("ws", 3, 64), ("persistent", 3, 64)])  # fmt: skip
@pytest.mark.parametrize("opts", [{}, {"causal": True}, {"window_size": (100, 20), "softcap": 8.0}])
def test_gpu_every_kernel_variant(kernel, consumers, d, opts):
    """Each kernel (plain / ws / persistent, 2 or 3 consumer warpgroups) through launch.forward
    with its config forced."""
    from flashtile.backends.hopper import launch

    q, k, v = qkv_inputs(2, 389, 517, 6, 2, d, torch.bfloat16, "cuda")
    call = make_call(headdim=d, causal=opts.get("causal", False), window_size=opts.get("window_size", (-1, -1)),
                     softcap=opts.get("softcap", 0.0))  # fmt: skip
    out, lse = launch.forward(q, k, v, call, config=configs.config(d, kernel=kernel, consumers=consumers))
    ref = dict(causal=opts.get("causal", False), window_size=opts.get("window_size", (-1, -1)),
               softcap=opts.get("softcap", 0.0))  # fmt: skip
    ro, rl = attention_ref(q.float(), k.float(), v.float(), **ref)
    po, _ = attention_ref(q, k, v, upcast=False, **ref)
    err, pt_err = (out.float() - ro).abs().max().item(), (po.float() - ro).abs().max().item()
    assert err <= 2 * pt_err + 8e-3, (err, pt_err)
    fin = torch.isfinite(rl)
    assert torch.equal(torch.isfinite(lse), fin)
    assert (lse[fin] - rl[fin]).abs().max().item() <= 2e-3


def test_short_windows_at_small_head_dims_run_the_triton_forward(monkeypatch):
    """hopper.short_window: a fp16 / bf16 forward whose window spans at most
    TRITON_FWD_WINDOW_SPAN[head dim] keys goes to the Triton forward; longer windows, unbounded sides,
    other head dims and FP8 stay on the Gluon kernels."""
    from flashtile.backends.hopper import launch
    from flashtile.backends.triton import backend as triton_backend

    taken: list[str] = []
    monkeypatch.setattr(triton_backend, "forward", lambda q, k, v, call: taken.append("triton"))
    monkeypatch.setattr(launch, "forward", lambda q, k, v, call: taken.append("gluon"))
    monkeypatch.setattr(hopper, "TRITON_FWD_WINDOW_SPAN", {64: 4097})

    def route(d, dtype=torch.bfloat16, **kw):
        q = torch.empty(1, 2048, 16, d, dtype=dtype)  # 32k rows: past SMALL_ROWS, not decode-shaped
        BE.forward(q, q, q, make_call(headdim=d, **kw))
        return taken.pop()

    assert route(64, causal=True, window_size=(1024, 0)) == "triton"
    assert route(64, torch.float16, window_size=(2048, 2048)) == "triton"  # a span of 4097 keys
    assert route(64, window_size=(2048, 2049)) == "gluon"  # 4098 keys
    assert route(64, causal=True, window_size=(4096, 0)) == "triton"
    assert route(64, causal=True, window_size=(4097, 0)) == "gluon"
    assert route(64, window_size=(512, -1)) == "gluon"  # unbounded on the right
    assert route(64, causal=True) == "gluon"
    assert route(128, causal=True, window_size=(1024, 0)) == "gluon"
    assert route(64, torch.float8_e4m3fn, causal=True, window_size=(1024, 0)) == "gluon"
    monkeypatch.setattr(hopper, "TRITON_FWD_WINDOW_SPAN", {})
    assert route(64, causal=True, window_size=(1024, 0)) == "gluon"
