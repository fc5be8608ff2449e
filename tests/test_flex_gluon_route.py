"""Routing of flex forwards to the Gluon ws kernel (backends/hopper/flex.py): which calls it takes
and which it leaves to the Triton flex kernel, in plain Python (the kernel runs on the H200 only:
benchmarks/gflex_run.py and the GPU test below)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import flashtile
from flashtile import create_block_mask, masks
from flashtile.backends.hopper import flex as gf
from flashtile.spec import make_call

BF = torch.bfloat16


def _bm(mod=masks.causal, s=256, block=128, b=None, h=None):
    return create_block_mask(mod, b, h, s, s, device="cpu", BLOCK_SIZE=block)


def reason(call, q=(1, 256, 4, 128), k=(1, 256, 2, 128), vd=None, dtype=BF, dev="cuda", major=9, unavail=None,
           mode="auto"):  # fmt: skip
    return gf.gluon_reason(call, q, k, q[-1] if vd is None else vd, dtype, dev, major, unavail, mode)


def test_takes_library_mods_with_block_128():
    for mm in (masks.causal, masks.sliding_window(100), masks.prefix_lm(70), masks.chunked(64)):
        assert reason(make_call(headdim=128, block_mask=_bm(mm))) is None
    assert reason(make_call(headdim=128, score_mod=masks.alibi(torch.rand(4)), block_mask=_bm())) is None
    assert reason(make_call(headdim=128, score_mod=masks.softcap(20.0))) is None  # no block mask: all blocks
    assert reason(make_call(headdim=64, block_mask=_bm()), q=(2, 256, 4, 64), k=(2, 256, 4, 64)) is None
    # odd lengths: the block mask of the call's lengths (BOUNDS in the kernel)
    assert reason(make_call(headdim=128, block_mask=_bm(s=203)), q=(1, 203, 4, 128), k=(1, 203, 4, 128)) is None


@pytest.mark.parametrize(
    "kw, why",
    [
        (dict(mode="off"), "FLASHTILE_FLEX_GLUON=0"),
        (dict(unavail="no CUDA device"), "unavailable"),
        (dict(dev="cpu"), "CUDA"),
        (dict(major=8), "9.x"),
        (dict(major=None), "9.x"),
        (dict(dtype=torch.float32), "dtype"),
        (dict(q=(1, 256, 4, 40), k=(1, 256, 2, 40)), "head dim"),
        (dict(vd=64), "head dim"),
        (dict(q=(1, 256, 3, 128)), "multiple"),
        (dict(q=(1, 0, 4, 128)), "empty"),
    ],
)
def test_refusals_name_the_reason(kw, why):
    r = reason(make_call(headdim=128, block_mask=_bm()), **kw)
    assert r is not None and why in r, r


def test_refuses_what_the_kernel_does_not_serve(monkeypatch):
    def custom(b, h, qi, ki):
        return qi >= ki

    r = reason(make_call(headdim=128, block_mask=_bm(block=64)))
    assert r is not None and "BLOCK_SIZE" in r
    r = reason(make_call(headdim=128, block_mask=_bm(custom)))
    assert r is not None and "twin" in r
    r = reason(make_call(headdim=128, score_mod=lambda s, b, h, qi, ki: s))
    assert r is not None and "twin" in r
    # a block mask built for fewer query blocks than the call has
    r = reason(make_call(headdim=128, block_mask=_bm(s=128)))
    assert r is not None and "query blocks" in r
    # a score mod listed in SKIP_SCORES stays on Triton unless forced
    call = make_call(headdim=128, score_mod=masks.relative_bias(torch.randn(4, 9)), block_mask=_bm())
    assert reason(call) is None
    monkeypatch.setattr(gf, "SKIP_SCORES", ("relative_bias",))
    r = reason(call)
    assert r is not None and "SKIP_SCORES" in r
    assert reason(call, mode="force") is None
    r = reason(dataclasses.replace(make_call(headdim=128, block_mask=_bm()), dropout_p=0.1))
    assert r is not None and "dropout" in r


def test_env_mode(monkeypatch):
    for val, mode in (("", "auto"), ("1", "auto"), ("0", "off"), ("off", "off"), ("force", "force")):
        monkeypatch.setenv(gf.ENV, val)
        assert gf.env_mode() == mode
    monkeypatch.setenv(gf.ENV, "maybe")
    with pytest.raises(ValueError, match=gf.ENV):
        gf.env_mode()


def test_cpu_tensors_stay_on_triton():
    q = torch.randn(1, 256, 4, 128)
    assert not gf.use_gluon(q, q, q, make_call(headdim=128, block_mask=_bm()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (H200)")
@pytest.mark.parametrize("prefetch", ["0", "1"])
@pytest.mark.parametrize("mask_name", ["causal", "document"])
def test_gluon_flex_matches_oracle(mask_name, prefetch, monkeypatch):
    from flashtile.testing import attention_ref, compare_with_oracle, mask_from_mod, qkv_inputs

    monkeypatch.setenv(gf.ENV, "force")  # 203 tokens: short rows, which the default routes to Triton
    monkeypatch.setenv(gf.PREFETCH_ENV, prefetch)  # the kernel's FLEX_PREFETCH off / on

    dev = torch.device("cuda")
    b, s, h, hk, d = 2, 203, 4, 2, 128
    mm = masks.causal if mask_name == "causal" else masks.document((torch.rand(b, s) < 0.02).cumsum(-1).to(dev))
    bm = create_block_mask(mm, b, None, s, s, device=dev, BLOCK_SIZE=128)
    q, k, v = qkv_inputs(b, s, s, h, hk, d, BF, dev)
    call = make_call(headdim=d, block_mask=bm)
    if not gf.use_gluon(q, k, v, call):
        pytest.skip("the Gluon flex forward does not serve this device")
    dense = mask_from_mod(mm, b, None, s, s, dev)

    def fn(q, k, v):
        out, lse, _ = flashtile.flash_attn_func(q, k, v, block_mask=bm, return_attn_probs=True)
        return out, lse

    def oracle(q, k, v, upcast):
        return attention_ref(q, k, v, mask=dense, upcast=upcast)

    compare_with_oracle(fn, oracle, (q, k, v), grads=False)


def test_takes_the_gpu_scripts_cases():
    """Every case of benchmarks/gflex_run.py's correctness pass is one the Gluon kernel takes
    (forced: the relative-bias table too), at its ragged GQA shape with sq < sk and with sq > sk."""
    ids = (torch.rand(2, 300) < 0.02).cumsum(-1)
    ar = torch.arange(300)
    mods = [masks.causal, masks.sliding_window(70), masks.document(ids), masks.prefix_lm(70),
            masks.prefix_lm(torch.tensor([5, 150])), masks.chunked(48),
            masks.bidirectional_blocks(torch.where((ar // 30) % 3 == 1, ar // 30, -1)), None]  # fmt: skip
    scores = [None, masks.alibi(torch.rand(4)), masks.alibi(torch.rand(2, 4)), masks.softcap(2.0),
              masks.relative_bias(torch.randn(4, 65))]  # fmt: skip
    for sq, sk in ((113, 203), (203, 113)):
        for i, mm in enumerate(mods):
            sm = scores[i % len(scores)]
            if mm is None and sm is None:
                continue
            bm = None if mm is None else create_block_mask(mm, 2, 4 if i == 5 else None, sq, sk, device="cpu")
            call = make_call(headdim=128, score_mod=sm, block_mask=bm)
            assert reason(call, q=(2, sq, 4, 128), k=(2, sk, 2, 128), mode="force") is None


def test_launch_arguments_bind_and_address_the_lists(monkeypatch):
    """hopper/flex.py's launch binds to attn_fwd_ws's signature, and the kernel's list addressing
    (``lb = b * bm_sb + h * bm_sh + pid_m``, indices at ``lb * bm_nk``) reads the block mask's
    lists for every (batch, head, query block), broadcast dims included. The launch is mocked
    (the kernel runs on the H200 only)."""
    import inspect

    try:
        from flashtile.backends.hopper import fwd as F
        from flashtile.backends.hopper import launch as HL
    except Exception as e:  # noqa: BLE001 - no Gluon in this Triton
        pytest.skip(f"Gluon not importable: {e}")
    sig = inspect.signature(F.attn_fwd_ws.fn)
    got = []

    class Mock:
        def __getitem__(self, grid):
            return lambda *a, **kw: got.append((grid, sig.bind(*a, **kw).arguments))

    monkeypatch.setattr(HL, "_WS", Mock())
    b, s, h, hk, d = 2, 300, 4, 2, 64
    ids = (torch.rand(b, s) < 0.02).cumsum(-1)
    for bb, bh in ((b, None), (None, h), (b, h)):
        bm = create_block_mask(masks.document(ids), bb, bh, s, s, device="cpu")
        q = torch.randn(b, s, h, d, dtype=BF)
        k = torch.randn(b, s, hk, d, dtype=BF)
        gf.forward(q, k, k, make_call(headdim=d, score_mod=masks.alibi(torch.rand(h)), block_mask=bm))
        grid, a = got[-1]
        assert grid == (3, h, b) and a["FLEX"] and a["HAS_FULL"] and a["BOUNDS"] and a["HAS_MASK"] and a["HAS_SCORE"]
        nk = a["bm_nk"]
        for name, num_t, idx_t in (("KV", bm.kv_num_blocks, bm.kv_indices),
                                   ("FULL", bm.full_kv_num_blocks, bm.full_kv_indices)):  # fmt: skip
            num, idx = a[f"{name}_NUM"].flatten(), a[f"{name}_IDX"].flatten()
            for bi in range(b):
                for hi in range(h):
                    for m in range(3):
                        lb = bi * a["bm_sb"] + hi * a["bm_sh"] + m
                        n = int(num[lb])
                        ref_b, ref_h = min(bi, num_t.shape[0] - 1), min(hi, num_t.shape[1] - 1)
                        assert n == int(num_t[ref_b, ref_h, m])
                        assert idx[lb * nk : lb * nk + n].tolist() == idx_t[ref_b, ref_h, m, :n].tolist()


def test_flex_config_tiles_fit_the_block_mask_block():
    from flashtile.backends.hopper import configs

    for d in (64, 96, 128):
        cfg = configs.flex_config(d)
        assert cfg.block_m == configs.FLEX_MASK_BLOCK and configs.FLEX_MASK_BLOCK % cfg.block_n == 0
        assert cfg.kernel == "ws" and cfg.consumers == 2 and configs.check(cfg, d) is None


def test_prefetch_switch_off_by_default_and_from_the_env(monkeypatch):
    """``FLASHTILE_FLEX_PREFETCH`` picks the kernel's FLEX_PREFETCH (off unset or 0, on with 1) and
    nothing else: the launch's other arguments and the routing stay as they are."""
    from flashtile.backends.hopper import configs

    try:
        from flashtile.backends.hopper import launch as HL
    except Exception as e:  # noqa: BLE001 - no Gluon in this Triton
        pytest.skip(f"Gluon not importable: {e}")
    assert configs.flex_config(128).flex_prefetch == 0
    assert configs.check(configs.flex_config(128, flex_prefetch=1), 128) is None
    bad = configs.check(configs.config(128, kernel="plain", flex_prefetch=1), 128)
    assert bad is not None and "flex_prefetch" in bad
    got = []

    class Mock:
        def __getitem__(self, grid):
            return lambda *a, **kw: got.append((grid, {**dict(enumerate(a)), **kw}))

    monkeypatch.setattr(HL, "_WS", Mock())
    b, s, h, d = 1, 300, 2, 128
    bm = create_block_mask(masks.sliding_window(100), None, None, s, s, device="cpu")
    q = torch.randn(b, s, h, d, dtype=BF)
    call = make_call(headdim=d, block_mask=bm)
    runs = {}
    for val in ("", "0", "1", "on"):
        monkeypatch.setenv(gf.PREFETCH_ENV, val)
        assert reason(call, q=q.shape, k=q.shape) is None  # routing unchanged
        assert gf.long_rows(bm, "auto") == gf.long_rows(bm)
        gf.forward(q, q, q, call)
        runs[val] = got[-1]
    assert runs[""][1]["FLEX_PREFETCH"] is False and runs["0"][1]["FLEX_PREFETCH"] is False
    assert runs["1"][1]["FLEX_PREFETCH"] is True and runs["on"][1]["FLEX_PREFETCH"] is True
    # everything else the same launch (positional arguments by position)
    for val in ("0", "1"):
        grid, kw = runs[val]
        assert grid == runs[""][0]
        for key, ref in runs[""][1].items():
            if key == "FLEX_PREFETCH":
                continue
            x = kw[key]
            if isinstance(ref, torch.Tensor):  # (out / lse: fresh allocations, compared by shape)
                assert x.shape == ref.shape and x.dtype == ref.dtype, key
                assert x.dtype != torch.int32 or torch.equal(x, ref), key  # the block-mask lists
            elif isinstance(key, int) and key < 4:
                continue  # (the q / k / v / o descriptors: fresh objects of the same tensors)
            else:
                assert x == ref, key
    monkeypatch.setenv(gf.PREFETCH_ENV, "maybe")
    with pytest.raises(ValueError, match=gf.PREFETCH_ENV):
        gf.forward(q, q, q, call)
