"""The README says what is true: statements that have been wrong or missing are checked here
against the code and the packaging they describe."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from flashtile import flash_attn_with_kvcache

ROOT = Path(__file__).resolve().parents[1]


def section(title: str) -> str:
    """The README section under ``## title``, whitespace collapsed to single spaces."""
    text = (ROOT / "README.md").read_text()
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, flags=re.S | re.M)
    assert m, f"README has no '## {title}' section"
    return " ".join(m.group(1).split())


def test_install_mentions_venv_test_time_and_the_numpy_pin():
    install = section("Install")
    assert "python3 -m venv .venv" in install and "virtual environment" in install
    assert "about 11 minutes on a 2-core CPU" in install
    assert "pins numpy below 2.3 for Triton's interpreter" in install and "TRITON_INTERPRET=1" in install
    pyproject = (ROOT / "pyproject.toml").read_text()
    dev = re.search(r"^dev = \[(.*?)\]", pyproject, flags=re.S | re.M).group(1)
    assert '"numpy<2.3"' in dev  # the pin the README explains


def test_semantics_documents_the_deliberate_differences_from_flash_attn():
    semantics = section("Semantics, in brief")
    assert "deliberately differs from flash-attn" in semantics
    assert "`lse = -inf`" in semantics and "`+inf`" in semantics
    assert "normalised attention probabilities after dropout" in semantics and "`S_dmask`" in semantics
    assert "or an empty tensor without dropout" in semantics


def test_block_table_check_is_described_as_it_is():
    """Only the blocks a call uses are checked (the rest of a row's table may be padding)."""
    kv = section("Inference: KV cache")
    assert not re.search(r"every [^.]*block-table entry is checked", kv)
    assert "every block-table entry the call reads or writes" in kv
    assert "neither read nor checked (they may hold anything, e.g. -1)" in kv
    # ... and so it is: -1 past the used blocks is fine, -1 within them is refused by name
    q = torch.randn(2, 1, 2, 8)
    kc = torch.randn(6, 4, 2, 8)
    bt = torch.tensor([[0, 1, -1], [2, -1, -1]], dtype=torch.int32)
    flash_attn_with_kvcache(q, kc, kc.clone(), cache_seqlens=torch.tensor([8, 3], dtype=torch.int32), block_table=bt)
    with pytest.raises(ValueError, match=r"block_table\[1\]"):
        flash_attn_with_kvcache(q, kc, kc.clone(), cache_seqlens=torch.tensor([8, 5], dtype=torch.int32),
                                block_table=bt)  # fmt: skip
