"""``itrkit data prepare --format synthetic`` needs no ``--source``; every other format still does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from itrkit.cli import main


def test_synthetic_prepares_without_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    import itrkit.data.synthetic as synthetic

    real = synthetic.make_synthetic
    # The CLI's 600 scenes at 224 px take seconds; the same call with fewer, smaller scenes.
    monkeypatch.setattr(synthetic, "make_synthetic", lambda out, **kw: real(out, n_images=20, size=32, **kw))
    assert main(["data", "prepare", "--format", "synthetic", "--out", str(tmp_path / "syn")]) == 0
    report = json.loads((tmp_path / "syn" / "prepare_report.json").read_text())
    assert report["format"] == "synthetic" and report["images"] == 20 and report["source"] is None
    assert "prepared 20 images" in capsys.readouterr().out


def test_other_formats_still_need_a_source_and_write_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["data", "prepare", "--format", "csv", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: format 'csv' needs a source file or folder (--source)"
    assert not (tmp_path / "out").exists()
