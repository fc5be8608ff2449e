"""FP8 (e4m3) forward calls: flash-attn 3's descale API on every backend (CPU: the upcast path),
validation, the forward-only rule, the quantisation / incoherent-processing helpers, and GPU
parity of the hopper FP8 kernels (``gpu`` marker).

Error bound (:func:`flashtile.testing.fp8_error_bound`): against the float32 oracle run on the
dequantised inputs, a backend without FP8 kernels only rounds its output to bf16 (``2^-8 |o|``);
the FP8 kernels also round the probabilities to e4m3 (``2^-4 (P |V|)`` and a subnormal term).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from flashtile import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache, fp8
from flashtile.testing import attention_ref, cu_seqlens, fp8_dequantized, fp8_error_bound, fp8_score_error_bound

E4M3 = torch.float8_e4m3fn


def _fp8_inputs(b, sq, sk, h, hk, d, device="cpu", descale_kind="head", gen=None):
    """Fresh FP8 q, k, v (quantised standard normals) and descales of the given kind."""
    q = torch.randn(b, sq, h, d, generator=gen, device=device) * 2
    k = torch.randn(b, sk, hk, d, generator=gen, device=device)
    v = torch.randn(b, sk, hk, d, generator=gen, device=device) * 3
    if descale_kind == "none":
        return q.clamp(-448, 448).to(E4M3), k.to(E4M3), v.to(E4M3), None, None, None
    gran = "head" if descale_kind == "head" else "tensor"
    q8, k8, v8, qd, kd, vd = fp8.quantize(q, k, v, granularity=gran)
    if descale_kind == "scalar":  # (1, 1): one scale for the tensor, broadcast
        qd, kd, vd = (x[:1, :1].clone() for x in (qd, kd, vd))
    return q8, k8, v8, qd, kd, vd


def _check(out, q8, k8, v8, qd, kd, vd, *, quantized_p=False, **options):
    assert out.dtype == torch.bfloat16
    qf, kf, vf = fp8_dequantized(q8, qd), fp8_dequantized(k8, kd), fp8_dequantized(v8, vd)
    ref, _ = attention_ref(qf, kf, vf, **options)
    bound = fp8_error_bound(qf, kf, vf, quantized_p=quantized_p, **options)
    err = (out.float() - ref).abs()
    worst = (err - bound).max()
    assert worst <= 0, f"error exceeds the bound by {float(worst):.3g} (max err {float(err.max()):.3g})"


CASES = list(itertools.product(
    [(1, 1, 1), (2, 113, 203), (2, 203, 113), (1, 64, 64)],  # (b, sq, sk)
    [(4, 4), (4, 1), (6, 2)],  # (h, hk)
    [dict(), dict(causal=True), dict(window_size=(17, 5)), dict(softcap=20.0), dict(causal=True, softcap=5.0)],
    ["head", "tensor", "scalar", "none"],
))  # fmt: skip


@pytest.mark.parametrize("shape,heads,opts,kind", CASES[::5] + [CASES[1], CASES[-1]])
def test_fp8_dense_matches_dequantized_oracle(shape, heads, opts, kind):
    b, sq, sk = shape
    h, hk = heads
    g = torch.Generator().manual_seed(hash((shape, heads, kind)) % 2**31)
    q8, k8, v8, qd, kd, vd = _fp8_inputs(b, sq, sk, h, hk, 40 if sq == 113 else 64, descale_kind=kind, gen=g)
    out, lse, _ = flash_attn_func(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd, return_attn_probs=True,
                                  **opts)  # fmt: skip
    _check(out, q8, k8, v8, qd, kd, vd, **opts)
    qf, kf, vf = fp8_dequantized(q8, qd), fp8_dequantized(k8, kd), fp8_dequantized(v8, vd)
    _, lse_ref = attention_ref(qf, kf, vf, **opts)
    torch.testing.assert_close(lse, lse_ref, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("granularity", ["head", "tensor"])
def test_fp8_varlen(causal, granularity):
    g = torch.Generator().manual_seed(7)
    lens_q, lens_k = [5, 0, 70, 1], [9, 3, 70, 33]
    h, hk, d = 4, 2, 72
    q = torch.randn(sum(lens_q), h, d, generator=g)
    k = torch.randn(sum(lens_k), hk, d, generator=g)
    v = torch.randn(sum(lens_k), hk, d, generator=g)
    cq, ck = cu_seqlens(lens_q, "cpu"), cu_seqlens(lens_k, "cpu")
    q8, k8, v8, qd, kd, vd = fp8.quantize(q, k, v, granularity=granularity, cu_seqlens_q=cq, cu_seqlens_k=ck)
    assert qd.shape == (4, hk)
    out = flash_attn_varlen_func(q8, k8, v8, cq, ck, max(lens_q), max(lens_k), causal=causal,
                                 q_descale=qd, k_descale=kd, v_descale=vd)  # fmt: skip
    assert out.dtype == torch.bfloat16 and out.shape == (sum(lens_q), h, d)
    for i in range(4):  # per sequence against the dense oracle
        sl_q, sl_k = slice(int(cq[i]), int(cq[i + 1])), slice(int(ck[i]), int(ck[i + 1]))
        if lens_q[i] == 0:
            continue
        qs, ks, vs = q8[sl_q][None], k8[sl_k][None], v8[sl_k][None]
        _check(out[sl_q][None], qs, ks, vs, qd[i : i + 1], kd[i : i + 1], vd[i : i + 1], causal=causal)


def test_fp8_matches_bf16_reference_roughly():
    """The FP8 call on quantised bf16 inputs is close to the bf16 call (quantisation error only)."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, 128, 4, 64, generator=g) for _ in range(3))
    q8, k8, v8, qd, kd, vd = fp8.quantize(q, k, v)
    out8 = flash_attn_func(q8, k8, v8, causal=True, q_descale=qd, k_descale=kd, v_descale=vd).float()
    ref = flash_attn_func(q, k, v, causal=True)
    rel = (out8 - ref).norm() / ref.norm()
    assert 1e-3 < rel < 0.08, rel  # e4m3: about 2^-5 relative per input; > 0: quantisation happened


def test_fp8_kvcache_dense_append():
    g = torch.Generator().manual_seed(11)
    b, cap, hk, h, d = 2, 40, 2, 4, 64
    kc = torch.randn(b, cap, hk, d, generator=g).to(E4M3)
    vc = torch.randn(b, cap, hk, d, generator=g).to(E4M3)
    q = torch.randn(b, 3, h, d, generator=g).to(E4M3)
    kn = torch.randn(b, 3, hk, d, generator=g).to(E4M3)
    vn = torch.randn(b, 3, hk, d, generator=g).to(E4M3)
    kd = torch.rand(b, hk, generator=g) + 0.5
    vd = torch.rand(b, hk, generator=g) + 0.5
    qd = torch.rand(b, hk, generator=g) + 0.5
    seqlens = torch.tensor([10, 30], dtype=torch.int32)
    kc0, vc0 = kc.clone(), vc.clone()
    out = flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens, causal=True,
                                  q_descale=qd, k_descale=kd, v_descale=vd)  # fmt: skip
    assert out.dtype == torch.bfloat16
    for i in range(b):
        n = int(seqlens[i])
        # the new tokens were appended to the FP8 cache bit for bit, the rest is untouched
        assert torch.equal(kc[i, n : n + 3].view(torch.uint8), kn[i].view(torch.uint8))
        assert torch.equal(vc[i, :n].view(torch.uint8), vc0[i, :n].view(torch.uint8))
        assert torch.equal(kc[i, n + 3 :].view(torch.uint8), kc0[i, n + 3 :].view(torch.uint8))
        sl = slice(0, n + 3)
        _check(out[i : i + 1], q[i : i + 1], kc[i : i + 1, sl], vc[i : i + 1, sl], qd[i : i + 1], kd[i : i + 1],
               vd[i : i + 1], causal=True)  # fmt: skip


def test_fp8_backward_raises():
    q8, k8, v8, qd, kd, vd = _fp8_inputs(1, 8, 8, 2, 2, 32)
    qd.requires_grad_()
    out = flash_attn_func(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd)
    assert out.requires_grad
    with pytest.raises(RuntimeError, match="forward only"):
        out.sum().backward()


def test_fp8_validation():
    q8, k8, v8, qd, kd, vd = _fp8_inputs(2, 8, 8, 4, 2, 32)
    with pytest.raises(ValueError, match=r"q_descale must have shape \(batch, nheads_k\) = \(2, 2\)"):
        flash_attn_func(q8, k8, v8, q_descale=torch.ones(2, 4))
    with pytest.raises(TypeError, match="k_descale must be float32"):
        flash_attn_func(q8, k8, v8, k_descale=kd.double())
    with pytest.raises(ValueError, match="apply to float8_e4m3fn inputs only"):
        flash_attn_func(q8.float(), k8.float(), v8.float(), v_descale=vd)
    with pytest.raises(TypeError, match="v must have the same dtype as q"):
        flash_attn_func(q8, k8, v8.bfloat16())
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        flash_attn_func(q8.to(torch.float8_e5m2), k8.to(torch.float8_e5m2), v8.to(torch.float8_e5m2))


def test_fp8_compiles_without_graph_break():
    q8, k8, v8, qd, kd, vd = _fp8_inputs(1, 16, 16, 2, 1, 32)
    f = torch.compile(lambda *a: flash_attn_func(*a[:3], causal=True, q_descale=a[3], k_descale=a[4],
                                                 v_descale=a[5]), fullgraph=True)  # fmt: skip
    out = f(q8, k8, v8, qd, kd, vd)
    torch.testing.assert_close(out, flash_attn_func(q8, k8, v8, causal=True, q_descale=qd, k_descale=kd,
                                                    v_descale=vd))  # fmt: skip


# ---------------------------------------------------------------------------------------
# helpers


@pytest.mark.parametrize("granularity", ["head", "tensor"])
def test_quantize_roundtrip(granularity):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 50, 6, 40, generator=g) * torch.tensor([1.0, 100.0]).view(2, 1, 1, 1)
    x8, d = fp8.quantize_one(x, nheads_k=3, granularity=granularity)
    assert x8.dtype == E4M3 and d.shape == (2, 3) and d.dtype == torch.float32
    back = fp8_dequantized(x8, d)
    dd = d.repeat_interleave(2, dim=1).view(2, 1, 6, 1)
    # e4m3 round to nearest: 2^-4 relative (normals), 2^-10 * descale absolute (subnormals)
    assert ((back - x).abs() <= 2**-4 * x.abs() + 2**-10 * dd + 1e-6).all()
    amax = x.abs().amax(dim=(1, 3)).view(2, 3, 2).amax(-1)
    if granularity == "head":
        torch.testing.assert_close(d, amax / 448)
    else:
        assert torch.all(d == x.abs().max() / 448)


def test_hadamard_and_rotation_preserve_scores():
    g = torch.Generator().manual_seed(9)
    for d in (64, 128, 40):
        q, k = torch.randn(2, 17, 4, d, generator=g), torch.randn(2, 19, 4, d, generator=g)
        qr, kr = fp8.rotate_qk(q, k, generator=g)
        assert not torch.allclose(qr, q)
        torch.testing.assert_close(torch.einsum("bqhd,bkhd->bhqk", qr, kr), torch.einsum("bqhd,bkhd->bhqk", q, k),
                                   atol=1e-4, rtol=1e-4)  # fmt: skip
    x = torch.randn(3, 32, generator=g)
    h = fp8.hadamard_transform(torch.eye(32))
    torch.testing.assert_close(h @ h.T, torch.eye(32), atol=1e-6, rtol=0)
    torch.testing.assert_close(fp8.hadamard_transform(x), x @ h, atol=1e-5, rtol=0)
    r = fp8.random_rotation(40, generator=g)
    torch.testing.assert_close(r @ r.T, torch.eye(40), atol=1e-5, rtol=0)


def test_incoherent_processing_cuts_outlier_error():
    """With 0.1% outliers of magnitude 10-100 in q and k, rotating before quantising lowers the
    error of the FP8 call against the fp32 attention on the original inputs (mean over 3 draws;
    a single draw varies: benchmarks/fp8_rmse.py measures ~0.76x at s=1024)."""
    b, s, h, d = 1, 512, 4, 128
    ratios = []
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(b, s, h, d, generator=g) for _ in range(3))
        for x in (q, k):
            n = x.numel()
            idx = torch.randperm(n, generator=g)[: n // 1000]
            sign = torch.sign(torch.randn(idx.numel(), generator=g))
            x.view(-1)[idx] = (torch.rand(idx.numel(), generator=g) * 90 + 10) * sign
        ref, _ = attention_ref(q, k, v)

        def rmse(qq, kk, v=v, ref=ref):
            q8, k8, v8, qd, kd, vd = fp8.quantize(qq, kk, v)
            out = flash_attn_func(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd).float()
            return float((out - ref).pow(2).mean().sqrt())

        ratios.append(rmse(*fp8.rotate_qk(q, k, generator=g)) / rmse(q, k))
    assert sum(ratios) / 3 < 0.92, ratios


# ---------------------------------------------------------------------------------------
# GPU: the hopper FP8 kernels


def _hopper_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    from flashtile import dispatch

    return dispatch.backends()["hopper"].available() is None and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper_usable(), reason="needs an sm_90 GPU with the hopper backend usable")
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("opts", [dict(), dict(causal=True), dict(window_size=(100, 30)), dict(softcap=20.0)])
def test_fp8_hopper_kernel(d, opts):
    import flashtile

    q8, k8, v8, qd, kd, vd = _fp8_inputs(2, 333, 517, 8, 2, d, device="cuda")
    with flashtile.use_backend("hopper"):
        out = flash_attn_func(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd, **opts)
    _check(out.cpu(), q8.cpu(), k8.cpu(), v8.cpu(), qd.cpu(), kd.cpu(), vd.cpu(), quantized_p=True, **opts)


@pytest.mark.gpu
@pytest.mark.skipif(not _hopper_usable(), reason="needs an sm_90 GPU with the hopper backend usable")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("opts", [dict(), dict(causal=True), dict(window_size=(100, 30)), dict(softcap=20.0)])
def test_fp8_persistent_kernel_matches_ws(d, opts):
    """The persistent FP8 kernel (one program per SM over the host's tile list, two Q buffers per consumer,
    the ring and the turns running on across tiles) computes exactly what the one-program-per-tile kernel
    does: many tiles per program (b4 h8, 517 query rows: ragged last tiles), GQA, s_q != s_k, causal rows
    that see no key, and no descales."""
    from dataclasses import replace

    from flashtile.backends.hopper import configs, launch
    from flashtile.spec import make_call

    for sq, sk, with_descales in ((517, 333, True), (333, 1100, True), (640, 640, False)):
        q8, k8, v8, qd, kd, vd = _fp8_inputs(4, sq, sk, 8, 2, d, device="cuda")
        kw = dict(q_descale=qd, k_descale=kd, v_descale=vd) if with_descales else {}
        call = make_call(headdim=d, causal=opts.get("causal", False), window_size=opts.get("window_size", (-1, -1)),
                         softcap=opts.get("softcap", 0.0), **kw)
        ws = configs.fp8_config_for(d, causal=call.window_right >= 0, seqlen_q=sq)
        out0, lse0 = launch.forward_fp8(q8, k8, v8, call, config=replace(ws, persistent=0))
        out1, lse1 = launch.forward_fp8(q8, k8, v8, call, config=replace(ws, persistent=1))
        assert torch.equal(out0, out1), (sq, sk, (out0.float() - out1.float()).abs().max())
        assert torch.equal(lse0, lse1), (sq, sk)
        assert torch.isfinite(out1.float()).all()


@pytest.mark.parametrize("sk", [1, 31, 32, 45, 97, 128])
def test_fp8_transpose_v_key_order(sk):
    """Dense V^T for the FP8 kernel: keys of each 32-key chunk in the kernel's P-operand order
    (position 32g + k holds key 32g + perm[k]), padding keys zero; the kernel's reshape/permute of
    P (mirrored here with torch) reads P's columns in that same order, so P V is unchanged. Varlen
    V^T keeps the key order."""
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from flashtile.backends.hopper import launch

    perm = launch.key_perm32()
    assert sorted(perm) == list(range(32)) and perm != list(range(32))
    v = torch.randn(2, sk, 3, 16).to(E4M3)
    vt = launch.transpose_v(v, varlen=False)
    sp = (sk + 31) // 32 * 32
    assert vt.shape == (2, 3, 16, sp) and vt.dtype == E4M3
    for pos in range(sp):
        key = pos // 32 * 32 + perm[pos % 32]
        got = vt[..., pos].float()  # (B, Hk, D)
        assert torch.equal(got, v[:, key].float() if key < sk else torch.zeros_like(got)), pos
    # the kernel's P operand: reshape (g, h, x, c, e) -> permute to (g, h, c, x, e) -> flatten
    p = torch.randn(4, 64)
    p_op = p.view(4, 2, 2, 2, 4, 2).permute(0, 1, 2, 4, 3, 5).reshape(4, 64)
    cols = torch.tensor([g * 32 + k for g in range(2) for k in perm])
    assert torch.equal(p_op, p[:, cols])
    v64 = torch.randn(64, 8)
    torch.testing.assert_close(p_op @ v64[cols], p @ v64)
    varlen = launch.transpose_v(v[:1], varlen=True)
    assert torch.equal(varlen[..., :sk].float(), v[0].permute(1, 2, 0).float())


def _acc_14_bits(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Q K^T (``(B, S, H, D)`` inputs, ``(B, H, Sq, Sk)``) accumulated as the FP8 wgmma is modelled:
    32-wide k-steps, the running sum cut to 14 significant bits (truncated) after each."""
    acc = torch.zeros(q.shape[0], q.shape[2], q.shape[1], k.shape[1], dtype=torch.float64)
    for c in range(0, q.shape[-1], 32):
        acc = acc + torch.einsum("bthd,bshd->bhts", q[..., c:c + 32].double(), k[..., c:c + 32].double())
        m, e = torch.frexp(acc)
        acc = torch.ldexp(torch.trunc(m * 2.0**14) / 2.0**14, e)
    return acc


@pytest.mark.parametrize("d", [64, 128, 256])
def test_fp8_score_error_bound_covers_the_accumulation_model(d):
    """``testing.fp8_score_error_bound`` holds for scores accumulated with 14 bits kept per k-step
    (the H200's FP8 wgmma, which flagged lse / output bounds that ignored it at head dim 256), and
    ``fp8_error_bound`` never falls below its former ``2^-8 (P |V|)`` term."""
    g = torch.Generator().manual_seed(d)
    q, k, v = (torch.randn(1, 40, 2, d, generator=g) * sc for sc in (2.0, 1.0, 3.0))
    scale = d**-0.5
    exact = torch.einsum("bthd,bshd->bhts", q.double(), k.double())
    err = ((_acc_14_bits(q, k) - exact).abs() * scale).amax(-1)
    bound = fp8_score_error_bound(q, k)
    assert bound.shape == (1, 2, 40) and (err <= bound.double()).all()
    assert (err > bound.double() / 64).any()  # (the bound is not vacuous)
    b = fp8_error_bound(q, k, v, quantized_p=True)
    pv_abs, _ = attention_ref(q, k, v.abs())
    out, _ = attention_ref(q, k, v)
    vmax = float(v.abs().max())
    old = 2.0**-8 * out.abs() + 1e-5 * vmax + (2.0**-4 + 2.0**-8) * pv_abs + 2.0**-9 * vmax
    assert (b >= old - 1e-6).all()


def test_fp8_kernel_switches():
    """The FP8 kernel's code-path switches: config fields with defaults, turned into constexprs; a
    plain HopperConfig gets the defaults; overrides (``--variant cvt_asm=0``) pass the checks."""
    from dataclasses import replace

    from flashtile.backends.hopper import configs

    cfg = configs.fp8_config(128)
    assert isinstance(cfg, configs.FP8Config)
    # head dim 128's entry has the wait fence (measured faster there), the dataclass default is off
    assert configs.fp8_flags(cfg) == dict(CVT_ASM=True, ROW_TREE=1, SKIP_RESCALE=True, EXP_POLY=0, WAIT_FENCE=True,
                                          NUM_CONSUMERS=2)
    assert configs.fp8_flags(configs.fp8_config(256))["WAIT_FENCE"] is False
    assert configs.fp8_flags(configs.HopperConfig(128, 128, 2)) == {**configs.fp8_flags(cfg), "WAIT_FENCE": False}
    old = configs.fp8_config(128, cvt_asm=0, row_tree=0, skip_rescale=0, exp_poly=2, wait_fence=0)
    assert configs.fp8_flags(old) == dict(CVT_ASM=False, ROW_TREE=0, SKIP_RESCALE=False, EXP_POLY=2, WAIT_FENCE=False,
                                          NUM_CONSUMERS=2)
    three = configs.fp8_config(64)  # head dim 64: 3 consumers, 2 on short causal calls (the 16-bit rule)
    assert (three.consumers, three.block_m, three.consumer_regs) == (3, 192, 160)
    assert configs.check_fp8(three, 64) is None
    assert configs.fp8_flags(three)["NUM_CONSUMERS"] == 3
    two = configs.fp8_config_for(64, causal=True, seqlen_q=configs.D64_CAUSAL_THREE_CONSUMERS_FROM - 1)
    assert two.consumers == 2 and configs.check_fp8(two, 64) is None
    assert configs.fp8_config_for(64, causal=True, seqlen_q=configs.D64_CAUSAL_THREE_CONSUMERS_FROM) == three
    # calls without a right window keep the row sums per lane at the measured head dims; causal ones do not
    # and run the persistent kernel at d64 / d128 (not d256: one Q buffer fits there; not causal: measured slower)
    assert configs.fp8_config_for(64, causal=False, seqlen_q=1) == replace(three, row_tree=3, persistent=1)
    assert configs.fp8_config_for(128, causal=True, seqlen_q=1) == cfg
    assert configs.fp8_config_for(128, causal=False, seqlen_q=1) == replace(cfg, row_tree=3, persistent=1)
    assert configs.fp8_config_for(256, causal=False, seqlen_q=1) == replace(configs.fp8_config(256), row_tree=3)
    for d in (96, 192):  # not measured there: the table's row_tree
        assert configs.fp8_config_for(d, causal=False, seqlen_q=1) == configs.fp8_config(d)
    assert all(configs.fp8_flags(configs.fp8_config_for(d, causal=c, seqlen_q=4096))["ROW_TREE"] == (1 if c else 3)
               for d in configs.FP8_ROW_PARTS_HEADDIMS for c in (False, True))
    two_again = configs.fp8_config(64, consumers=2)  # a consumer count brings its tile height and registers
    assert (two_again.block_m, two_again.consumer_regs) == (128, 240) and configs.check_fp8(two_again, 64) is None
    assert "2 consumers" in configs.check_fp8(configs.fp8_config(128, consumers=3), 128)  # the wait fence
    assert configs.check_fp8(old, 128) is None and configs.check_fp8(configs.fp8_config(128, row_tree=2), 128) is None
    assert "exp_poly" in configs.check_fp8(configs.fp8_config(128, exp_poly=3), 128)
    # the persistent kernel: two Q buffers per consumer where shared memory has room, one at head dim 256
    assert [configs.fp8_q_buffers(configs.fp8_config(d), d) for d in configs.HEADDIMS] == [2, 2, 2, 2, 1]
    assert configs.check_fp8(configs.fp8_config(128, persistent=1), 128) is None
    assert "persistent" in configs.check_fp8(configs.fp8_config(128, persistent=2), 128)
    assert all(configs.fp8_smem_bytes(configs.fp8_config(d), d, configs.fp8_q_buffers(configs.fp8_config(d), d))
               <= configs.SM90_SMEM_LIMIT for d in configs.HEADDIMS)
    assert configs.check_fp8(configs.fp8_config(128, row_tree=3), 128) is None  # (row sums kept per lane)
    assert "row_tree" in configs.check_fp8(configs.fp8_config(128, row_tree=4), 128)


def test_fp8_trace_analysis():
    """``benchmarks/fp8_trace.py``'s reading of the kernel's stamps (turn taken, S ready, softmax issued, P V
    done; per tile, consumer and key block): the medians of each interval, the other consumer's offset and
    the share of a consumer's softmax that overlaps the other's; unwritten rows (zeros) are left out."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import fp8_trace

    def rows(start, shift):
        return [[0, 0, 0, 0]] + [[start + 100 * i, start + 100 * i + 30, start + 100 * i + 30 + shift,
                                  start + 100 * i + 90] for i in range(1, 20)] + [[0, 0, 0, 0]]

    apart = fp8_trace.analyse([[rows(0, 40), rows(50, 40)]])
    assert apart == dict(issue_to_s=30, softmax=40, tail=20, to_next=10, period=100, s_offset=50,
                         softmax_overlap=0.0, k_wait=None, turn_wait=None, s_issue=None, pv_issue=None, s_wait=None,
                         **dict.fromkeys(fp8_trace.TILE_PARTS))
    eight = [[r + [r[0] - 8, r[0] - 3, r[0] + 10, r[0] + 20] if any(r) else [0] * 8 for r in rows(0, 40)]] * 2
    parts = fp8_trace.analyse([eight])
    names = ("k_wait", "turn_wait", "s_issue", "pv_issue", "s_wait")
    assert tuple(parts[k] for k in names) == (5, 3, 10, 10, 10)
    together = fp8_trace.analyse([[rows(0, 40), rows(20, 40)]])  # softmaxes [30, 70] and [50, 90]: half shared
    assert together["s_offset"] == 20 and together["softmax_overlap"] == 0.5
    # slot 0: the tile's own stamps (start, Q ready, first block done, last P V waited for, epilogue done)
    tiled = [[[-300, -200, 50, 2100, 2400, 0, 0, 0]] + rows(0, 40)[1:]] * 2
    t = fp8_trace.analyse([tiled])
    assert (t["q_wait"], t["first_block"], t["loop"], t["epilogue"], t["tile"]) == (100, 250, 2050, 300, 2700)
    assert t["last_pv"] == 2100 - (1900 + 90) and t["loop_per_block"] == round(2050 / 19)
    assert t["period"] == 100  # (the block rows read as before)


def test_exp2_poly_model():
    """``fwd._exp2_poly``'s arithmetic in float32 torch (the kernel's constants): relative error <
    2e-4 against exp2 on [-126, 0], exactly 1 at 0, exactly 0 at -inf and below -127 (masked
    scores), never NaN; float32 rounding as the kernel's (the 1.5 * 2^23 trick needs round to
    nearest, which float32 torch arithmetic does)."""
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from flashtile.backends.hopper import fwd

    c1, c2, c3 = (float(getattr(c, "value", c)) for c in (fwd._EXP2_C1, fwd._EXP2_C2, fwd._EXP2_C3))
    f32 = torch.float32
    x = torch.cat([torch.linspace(-126, 0, 200001, dtype=f32), torch.tensor([-float("inf"), -500.0, -127.0, 0.0])])
    xc = torch.clamp(x, min=-127.0)
    t = xc + torch.tensor(12582912.0, dtype=f32)
    f = xc - (t - torch.tensor(12582912.0, dtype=f32))
    p = 1.0 + f * (c1 + f * (c2 + f * c3))
    bits = p.view(torch.int32) + (t.view(torch.int32) << 23)
    y = bits.view(f32)
    ref = torch.exp2(x.double())
    assert torch.isfinite(y).all() and (y >= 0).all()
    rel = ((y.double() - ref) / ref)[:-4].abs()
    assert rel.max() < 2e-4
    assert y[-4:].tolist() == [0.0, 0.0, 0.0, 1.0]


def test_fp8_inline_ptx_strings():
    """The inline PTX of the FP8 kernel, modelled: the e4m3x4 pack puts input ``$1 .. $4`` in
    bytes 0 .. 3 (``cvt.rn.satfinite.e4m3x2.f32 d, a, b`` writes a to the high byte, b to the low
    one), as ``fwd_fp8._p_pack`` passes the keys 4q .. 4q + 3; the rescale multiplies every
    accumulator register by its own alpha, branching over all of them on a warp vote of the two
    rows' alphas (registers 0 and 2: rows r and r + 8 of the wgmma accumulator)."""
    import re

    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from flashtile.backends.hopper import fwd_fp8

    asm = str(fwd_fp8._CVT_E4M3X4)
    cvts = re.findall(r"cvt\.rn\.satfinite\.e4m3x2\.f32 (\w+), \$(\d), \$(\d);", asm)
    halves = {d: (int(a), int(b)) for d, a, b in cvts}  # d: (high byte's input, low byte's input)
    lo, hi = re.search(r"mov\.b32 \$0, \{(\w+), (\w+)\};", asm).groups()
    # bytes from low to high: (low byte, high byte) of the low half, then of the high half
    order = [halves[lo][1], halves[lo][0], halves[hi][1], halves[hi][0]]
    assert order == [1, 2, 3, 4]
    for n in (32, 64, 128):
        text = fwd_fp8._rescale_asm(n)
        movs = re.findall(r"mov\.b32 \$(\d+), \$(\d+);", text)
        muls = re.findall(r"mul\.f32 \$(\d+), \$(\d+), \$(\d+);", text)
        assert [(int(a), int(b)) for a, b in movs] == [(i, n + i) for i in range(n)]
        assert [tuple(map(int, m)) for m in muls] == [(i, i, 2 * n + i) for i in range(n)]
        votes = re.findall(r"setp\.neu\.f32 \w, \$(\d+), 0f3F800000;", text)
        assert votes == [str(2 * n), str(2 * n + 2)] and "vote.sync.any.pred" in text
        assert text.index("@!p bra SKIP;") < text.index("mul.f32") and text.rstrip().endswith("SKIP: }")
        assert max(int(x) for x in re.findall(r"\$(\d+)", text)) == 3 * n - 1  # n out, n acc, n alpha


def _linear_layout(layout, shape):
    """A Gluon layout as Triton's linear layout (register / lane / warp bases), on the CPU."""
    gluon_ir = pytest.importorskip("triton._C.libtriton.gluon_ir")
    from triton._C.libtriton import ir
    from triton.experimental.gluon.language import _semantic

    ctx = ir.context()
    ir.load_dialects(ctx)
    try:
        sem = _semantic.GluonSemantic(gluon_ir.GluonOpBuilder(ctx))
        return sem.to_linear_layout(layout, shape).value
    except (AttributeError, TypeError) as e:  # another Triton's internals
        pytest.skip(f"no linear-layout query in this Triton: {e}")


def test_fp8_kernel_layout_facts():
    """What the FP8 kernel's inline PTX relies on, from Triton's own layouts: in the e4m3 A operand
    (k_width 4) registers 4i .. 4i + 3 are k = 4q .. 4q + 3 of one row (``_p_pack`` / ``_p_unpack``
    pack them into one word); in the accumulator, register bit 1 is row + 8 (``_rescale_asm``
    votes on elements 0 and 2) and the top column bit is a register bit (``fwd._halve_cols``)."""
    pytest.importorskip("triton.experimental.gluon.nvidia.hopper")
    from triton.experimental.gluon import language as gl

    for d in (64, 128, 256):
        acc = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, d, 32])
        ll = _linear_layout(acc, [64, d])
        assert ll.reg_bases[0] == [0, 1] and ll.reg_bases[1] == [8, 0]
        assert [0, d // 2] in ll.reg_bases  # top column bit: a register
        assert all(b[0] == 0 for b in ll.reg_bases[2:])  # two rows per thread: r, r + 8
        op = _linear_layout(gl.DotOperandLayout(operand_index=0, parent=acc, k_width=4), [64, 128])
        assert op.reg_bases[:2] == [[0, 1], [0, 2]]


def test_fp8_declarations_and_configs():
    from flashtile import dispatch
    from flashtile.backends.hopper import configs
    from flashtile.spec import Problem, make_call

    hop = dispatch.backends()["hopper"].capabilities
    assert fp8.serves_fp8(hop) and not fp8.serves_fp8(dispatch.backends()["triton"].capabilities)
    for d in configs.HEADDIMS:
        cfg = configs.fp8_config(d)
        assert configs.check_fp8(cfg, d) is None, (d, cfg)
        assert configs.fp8_smem_bytes(cfg, d) <= configs.SM90_SMEM_LIMIT
    assert "multiple of 32" in configs.check_fp8(configs.fp8_config(128, block_n=48), 128)
    assert "shared memory" in configs.check_fp8(configs.fp8_config(256, block_n=256, num_stages=3), 256)
    assert "ws kernel" in configs.check_fp8(configs.fp8_config(128, kernel="plain"), 128)
    # a backend without FP8 kernels is judged on the dtype the call is dequantised to
    p = Problem(batch=1, seqlen_q=8, seqlen_k=8, nheads=2, nheads_k=2, headdim=64, dtype=E4M3,
                device=torch.device("cpu"))  # fmt: skip
    call = make_call(headdim=64)
    assert dispatch.why_not("torch", p, call) is None
    assert dispatch.choose(p, call) == "torch"
    assert "dtype" in hop.refuse(p.__class__(**{**p.__dict__, "dtype": torch.float8_e5m2}), call)


def test_readme_fp8_snippet_runs():
    """The README's FP8 example, as written there (q, k, v: bf16 inputs)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    sec = text[text.index("## FP8 (e4m3) forward") :]
    code = re.search(r"```python\n(.*?)```", sec, flags=re.S).group(1)
    q, k, v = (torch.randn(1, 64, 4, 64).bfloat16() for _ in range(3))
    ns = {"q": q, "k": k, "v": v}
    exec(code, ns)
    assert ns["out"].dtype == torch.bfloat16 and ns["out"].shape == q.shape
    assert ns["q8"].dtype == E4M3 and len(ns["descales"]) == 3


def test_fp8_kvcache_paged_shared_descales():
    """Paged FP8 cache: one descale per KV head (cache rows are not batch rows), new tokens land
    in their pages bit for bit; a per-batch descale is refused with a message."""
    g = torch.Generator().manual_seed(2)
    nb, page, hk, d, b, h = 6, 16, 2, 64, 2, 4
    kc = torch.randn(nb, page, hk, d, generator=g).to(E4M3)
    vc = torch.randn(nb, page, hk, d, generator=g).to(E4M3)
    bt = torch.tensor([[3, 1, 0], [5, 2, 4]], dtype=torch.int32)
    q = torch.randn(b, 2, h, d, generator=g).to(E4M3)
    kn, vn = (torch.randn(b, 2, hk, d, generator=g).to(E4M3) for _ in range(2))
    kd, vd = torch.rand(1, hk, generator=g) + 0.5, torch.rand(1, hk, generator=g) + 0.5
    seqlens = torch.tensor([5, 20], dtype=torch.int32)
    out = flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=seqlens, block_table=bt, causal=True,
                                  k_descale=kd, v_descale=vd)  # fmt: skip
    assert torch.equal(kc[3, 5:7].view(torch.uint8), kn[0].view(torch.uint8))
    assert torch.equal(vc[2, 4:6].view(torch.uint8), vn[1].view(torch.uint8))  # row 1: positions 20, 21
    for i in range(b):
        n = int(seqlens[i]) + 2
        rows = [int(x) for x in bt[i]]
        keys = torch.cat([kc[r] for r in rows])[:n][None]
        vals = torch.cat([vc[r] for r in rows])[:n][None]
        _check(out[i : i + 1], q[i : i + 1], keys, vals, None, kd, vd, causal=True)
    with pytest.raises(ValueError, match=r"k_descale must be one scale per KV head"):
        flash_attn_with_kvcache(q, kc, vc, block_table=bt, cache_seqlens=3, k_descale=torch.rand(b, hk) + 0.5)
