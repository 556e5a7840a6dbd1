"""The main job end to end (`itrkit demo --quick`): synthetic data, teachers, InfoNCE and CUSA, index."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from itrkit.cli import main

pytestmark = pytest.mark.slow


def test_quick_demo_trains_both_methods_and_leaves_an_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["retrieval"]
    assert set(rows) == {"InfoNCE (test)", "CUSA (test)"}
    # 22 test images × 5 captions: chance RSUM ≈ 135 (i2t ≈ 4.5+21+37, t2i ≈ 4.5+23+45); measured ≈ 550
    assert all(r["rsum"] > 400 for r in rows.values()), rows
    assert set(summary["unimodal"]) == {"frozen towers", "InfoNCE (cross head)", "CUSA (cross head)", "CUSA (USA head)"}
    assert (out / "index" / "manifest.json").is_file()
    assert (out / "teachers" / "image.store").exists() and (out / "runs" / "cusa" / "metrics.json").is_file()
    printed = capsys.readouterr().out
    assert "CUSA (test)" in printed and "itrkit serve --index" in printed
    assert not any(p.name.endswith(".tmp") for p in out.rglob("*"))  # nothing half-written
