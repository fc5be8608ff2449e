"""Packaging: the version comes from one place, and a wheel built from a clean copy of the tree
carries the license, the ``py.typed`` marker and an SPDX license expression in its metadata.

The wheel is built offline with the environment's setuptools (``pip wheel --no-build-isolation
--no-index``); the ``dev`` extra pins the setuptools it needs (>= 77: SPDX ``license`` strings and
``license-files``)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

import flashtile
from flashtile import cli

ROOT = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_version_has_one_source(capsys):
    """pyproject reads the version from flashtile/_version.py; the package and the CLI report it."""
    from flashtile import _version

    meta = pyproject()
    assert "version" not in meta["project"] and "version" in meta["project"]["dynamic"]
    assert meta["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "flashtile._version.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", _version.__version__)
    assert flashtile.__version__ == _version.__version__
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out == f"flashtile {_version.__version__}\n"


def test_license_and_build_requirements():
    meta = pyproject()
    assert meta["project"]["license"] == "BSD-3-Clause"  # an SPDX expression, not the deprecated table
    assert meta["project"]["license-files"] == ["LICENSE"]
    assert not any(c.startswith("License ::") for c in meta["project"]["classifiers"])  # redundant with SPDX
    assert "Typing :: Typed" in meta["project"]["classifiers"] and meta["project"]["urls"]
    # SPDX strings and license-files need setuptools >= 77, for isolated builds and for the dev extra
    # (which builds without isolation, as below)
    assert "setuptools>=77" in meta["build-system"]["requires"]
    assert "setuptools>=77" in meta["project"]["optional-dependencies"]["dev"]
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("BSD 3-Clause License") and "Redistribution and use in source and binary forms" in text
    assert (ROOT / "src" / "flashtile" / "py.typed").is_file()


def test_wheel_from_a_clean_tree(tmp_path):
    setuptools = pytest.importorskip("setuptools", minversion="77", reason="the dev extra installs setuptools>=77")
    tree = tmp_path / "tree"
    tree.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(ROOT / name, tree / name)
    shutil.copytree(ROOT / "src", tree / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path / "dist"
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "--no-index",
                        "-w", str(out), str(tree)], capture_output=True, text=True, timeout=300)  # fmt: skip
    log = p.stdout + p.stderr
    assert p.returncode == 0, log[-4000:]
    assert "deprecat" not in "\n".join(line for line in log.lower().splitlines() if "license" in line), (
        f"setuptools {setuptools.__version__} warns about the license metadata:\n{log[-4000:]}"
    )
    (wheel,) = out.glob("flashtile-*.whl")
    assert wheel.name.startswith(f"flashtile-{flashtile.__version__}-")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (metadata,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = z.read(metadata).decode()
    assert "flashtile/py.typed" in names
    assert any(re.fullmatch(r"flashtile-[^/]+\.dist-info/licenses/LICENSE", n) for n in names), names
    headers = text.split("\n\n", 1)[0].splitlines()
    assert "License-Expression: BSD-3-Clause" in headers
    assert "License-File: LICENSE" in headers
    assert f"Version: {flashtile.__version__}" in headers
    assert "Classifier: Typing :: Typed" in headers
    assert not any(h.startswith("License:") for h in headers)  # the deprecated free-text field
