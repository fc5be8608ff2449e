"""The ``flashtile`` command: env, check (pass and fail), bench (table, JSON, plot, memory cap)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from flashtile import cli, testing
from flashtile.backends.torch_tiled import backend as torch_backend
from flashtile.cli import bench, check, plot


def test_env_reports_versions_backends_and_auto(capsys):
    assert cli.main(["env"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out
    assert "backends" in out and "torch    usable" in out
    assert "cpu  float32   -> torch" in out
    assert "FLASHTILE_BACKEND=" in out


def test_env_shows_invalid_backend_variable(capsys, monkeypatch):
    monkeypatch.setenv("FLASHTILE_BACKEND", "nonsense")
    assert cli.main(["env"]) == 0
    assert "FLASHTILE_BACKEND=nonsense  ->  requested backend: invalid" in capsys.readouterr().out


def test_console_module_runs():
    """``python -m flashtile.cli`` is what the bench's worker processes use."""
    p = subprocess.run([sys.executable, "-m", "flashtile.cli", "--version"], capture_output=True, text=True)
    assert p.returncode == 0 and "flashtile" in p.stdout


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "check" in capsys.readouterr().out


def test_check_quick_passes_on_cpu(capsys):
    assert cli.main(["check", "--quick", "--device", "cpu", "--backends", "torch"]) == 0
    out = capsys.readouterr().out
    assert "PASS: 4 checks on torch" in out
    assert "FAIL" not in out
    for name in check.QUICK:
        assert name in out


def test_check_fails_with_exit_code_1_on_a_wrong_backend(capsys, monkeypatch):
    forward = torch_backend.forward

    def off_by_a_bit(*args, **kwargs):
        out, lse = forward(*args, **kwargs)
        return out * 1.001, lse

    monkeypatch.setattr(torch_backend, "forward", off_by_a_bit)
    assert cli.main(["check", "--quick", "--device", "cpu", "--backends", "torch"]) == 1
    out = capsys.readouterr().out
    assert "FAIL: 4 of 4 checks failed" in out


def test_check_reports_a_crash_as_error(capsys, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("boom")

    monkeypatch.setattr(torch_backend, "backward", crash)
    assert cli.main(["check", "--quick", "--backends", "torch"]) == 1
    assert "ERROR (RuntimeError: boom)" in capsys.readouterr().out


def test_check_tolerance_is_tight(monkeypatch, capsys):
    """With no slack (factor 0, atol 0) the tiled engine's rounding differences fail the check."""
    monkeypatch.setattr(testing, "FWD_FACTOR", 0.0)
    monkeypatch.setattr(testing, "BWD_FACTOR", 0.0)
    monkeypatch.setattr(testing, "ATOL_EPS", 0.0)
    assert cli.main(["check", "--quick", "--backends", "torch"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_check_unknown_backend(capsys):
    assert cli.main(["check", "--quick", "--backends", "nope"]) == 2


def test_bench_writes_json_and_plot(tmp_path, capsys):
    js, png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["bench", "--device", "cpu", "--seqlens", "64,128", "--heads", "2", "--headdim", "16", "--repeats", "1",
            "--mode", "fwd", "--json", str(js)]  # fmt: skip
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        png = None
    else:
        args += ["--plot", str(png)]
    assert cli.main(args) == 0
    out = capsys.readouterr().out
    assert "peak mem (MiB)" in out and "TFLOP/s" in out
    meta = json.loads(js.read_text())
    assert meta["device_type"] == "cpu" and meta["versions"]["torch"] == torch.__version__
    assert {"date", "args", "rows", "memory_method", "max_mem_gb"} <= set(meta)
    rows = meta["rows"]
    assert [(r["seqlen"], r["method"]) for r in rows] == [(s, m) for s in (64, 128) for m in bench.METHODS]
    for r in rows:
        assert r["status"] == "ok", r
        assert r["mode"] == "fwd" and r["time_ms"] > 0 and r["tflops"] > 0 and r["peak_mem_bytes"] >= 0
        assert r["time_min_ms"] <= r["time_ms"] <= r["time_max_ms"] and len(r["times_ms"]) == 1
    assert rows[0]["backend"] == "torch"
    if png is not None:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_threads_and_spread(tmp_path, capsys):
    js = tmp_path / "t.json"
    assert cli.main(["bench", "--device", "cpu", "--seqlens", "64", "--heads", "2", "--headdim", "16", "--repeats",
                     "3", "--mode", "fwd", "--threads", "1", "--json", str(js)]) == 0  # fmt: skip
    assert "threads: 1 for every method" in capsys.readouterr().out
    rows = json.loads(js.read_text())["rows"]
    assert all(r["threads"] == 1 and len(r["times_ms"]) == 3 for r in rows)
    noisy = dict(rows[0], times_ms=[1.0, 1.1, 2.0], time_ms=1.1, time_min_ms=1.0, time_max_ms=2.0)
    quiet = dict(rows[0], times_ms=[1.0, 1.05, 1.1], time_ms=1.05, time_min_ms=1.0, time_max_ms=1.1)
    assert bench.spread(noisy) > bench.SPREAD_WARN > bench.spread(quiet)
    text = bench.format_bench_table([noisy, quiet])
    assert "1.00-2.00 !" in text and "1.00-1.10 " in text


def test_bench_skips_standard_attention_over_the_memory_cap(tmp_path, capsys):
    js = tmp_path / "b.json"
    rc = cli.main(["bench", "--device", "cpu", "--seqlens", "128", "--methods", "standard", "--max-mem-gb", "1e-6",
                   "--json", str(js), "--markdown"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "SKIPPED: score matrix alone needs" in out and out.count("| fwd ") == out.count("| fwd_bwd ") == 1
    rows = json.loads(js.read_text())["rows"]
    assert [r["status"] for r in rows] == ["skipped", "skipped"]


def test_bench_case_reports_oom_under_the_cap():
    """A case that needs more than the cap fails cleanly with status "oom" in its own process."""
    c = dict(device="cpu", dtype="float32", batch=1, heads=8, headdim=16, causal=False, repeats=1,
             max_mem_bytes=64 * 2**20, backend=None, seqlen=8192, mode="fwd", method="standard")  # fmt: skip
    with bench.CaseRunner() as runner:
        assert runner.run(c, timeout=300)["status"] == "oom"


def test_bench_case_timeout():
    c = dict(device="cpu", dtype="float32", batch=1, heads=8, headdim=64, causal=False, repeats=50,
             max_mem_bytes=2**30, backend=None, seqlen=2048, mode="fwd_bwd", method="standard")  # fmt: skip
    with bench.CaseRunner() as runner:
        res = runner.run(c, timeout=0.5)
        assert res["status"] == "timeout" and "0.5 s" in res["note"]
        c.update(seqlen=64, repeats=1)
        assert runner.run(c, timeout=60)["status"] == "ok"  # the server goes on after a timeout


def test_bench_plot_without_matplotlib_is_a_friendly_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(plot, "have_matplotlib", lambda: False)
    assert cli.main(["bench", "--seqlens", "64", "--plot", str(tmp_path / "x.png")]) == 2
    assert "pip install" in capsys.readouterr().err


def test_flops_and_standard_attention():
    assert testing.attention_flops(1, 8, 1024, 64, False, "fwd") == 4 * 8 * 1024 * 1024 * 64
    assert testing.attention_flops(1, 8, 1024, 64, True, "fwd_bwd") == 4 * 8 * 1024 * 1024 * 64 / 2 * 3.5
    q, k, v = (torch.randn(2, 33, 4, 16) for _ in range(3))
    ref = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                           is_causal=True).transpose(1, 2)  # fmt: skip
    torch.testing.assert_close(testing.standard_attention(q, k, v, causal=True), ref, atol=1e-5, rtol=1e-5)
    # the benchmarks' variant: SDPA's (b, h, s, d) layout, softmax in float32
    assert testing.attention_flops(2, 8, 1024, 64, False, "bwd") == 2.5 * 4 * 2 * 8 * 1024 * 1024 * 64
    qt, kt, vt = (x.transpose(1, 2).bfloat16() for x in (q, k, v))
    out = testing.standard_attention(qt, kt, vt, True, layout="bhsd", softmax_dtype=torch.float32)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref.transpose(1, 2), atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("bad", ["0", "a,b", ""])
def test_bad_seqlens_are_rejected(bad):
    with pytest.raises(SystemExit):
        cli.main(["bench", "--seqlens", bad])


def test_demo_runs_check_and_bench_and_writes_the_plot(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(check, "CASES", tuple(c for c in check.CASES if c.name in check.QUICK))
    png, js = tmp_path / "demo.png", tmp_path / "demo.json"
    rc = cli.main(["demo", "--device", "cpu", "--seqlens", "64", "--repeats", "1", "--plot", str(png),
                   "--json", str(js)])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "PASS: 4 checks" in out and "demo: check passed" in out
    assert len(json.loads(js.read_text())["rows"]) == 2 * 3
    assert "takeaway: at seqlen 64 (forward + backward)" in out and "the time of PyTorch's SDPA" in out
    if plot.have_matplotlib():
        assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("command", ["check", "bench", "demo"])
@pytest.mark.parametrize("device", ["foo", "cuda:x", "cuda"])
def test_every_command_checks_the_device_the_same_way(command, device, capsys):
    """A device that is not one, or CUDA on a machine without it: one line on stderr and exit code 2
    (no traceback), the same for every command."""
    if device == "cuda" and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.device_count()}"  # one past the last device
    assert cli.main([command, "--device", device]) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"error: --device {device} ") and err.count("\n") == 1, err
    assert "Traceback" not in out + err
    if device == "cuda":
        assert err == "error: --device cuda but CUDA is not available here\n"


def test_unknown_option_shows_the_subcommand_usage(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--bogus"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: flashtile bench ") and "unrecognized arguments: --bogus" in err
    with pytest.raises(SystemExit):
        cli.main(["--bogus"])
    assert capsys.readouterr().err.startswith("usage: flashtile [-h]")


def test_help_describes_the_command(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    description = out.split("\n\n")[1]
    assert "``" not in out and "The flashtile command." not in description
    assert description.startswith("Check, benchmark and inspect flashtile"), description
    for command in ("env", "check", "bench", "demo"):
        assert command in out


@pytest.mark.parametrize(
    "methods,head",
    [(["flashtile"], "flashtile on"), (["flashtile", "sdpa"], "flashtile vs SDPA on"),
     (list(bench.METHODS), "flashtile vs standard attention vs SDPA on")],
)  # fmt: skip
def test_plot_title_names_the_methods_that_ran(methods, head):
    args = dict(dtype="float32", batch=1, heads=8, headdim=64, causal=False)
    meta = {"device": "a CPU", "args": args, "rows": [{"method": m, "mode": "fwd", "seqlen": 64} for m in methods]}
    title = plot.plot_title(meta)
    assert title.startswith(head + " a CPU\n"), title
