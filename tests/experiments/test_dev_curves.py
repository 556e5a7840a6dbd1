"""scripts/dev_curves.py: the per-epoch validation records of train.log, across stages, with the
re-ranker's first-stage curve, and a one-line error for a log without them."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from itrkit.errors import DataError

ROOT = Path(__file__).resolve().parents[2]


def _script():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("dev_curves", ROOT / "scripts" / "dev_curves.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _log(run: Path, vals: list[dict]) -> None:
    run.mkdir(parents=True)
    lines = [{"step": 1, "loss": 0.5}]
    for i, v in enumerate(vals):
        lines += [{"step": 10 * i, "loss": 0.4}, {"event": "val", "stage": "s1" if i < 2 else "s2", "epoch": 1 + i % 2, "val": v}]
    (run / "train.log").write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def test_curves_read_every_validation_record_and_plot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    mod = _script()
    _log(tmp_path / "a", [{"rsum": 10.0, "itc_rsum": 20.0}, {"rsum": 12.5, "itc_rsum": 20.0}, {"rsum": 13.0, "itc_rsum": 20.0}])
    _log(tmp_path / "b", [{"rsum": 5.0}, {"rsum": 4.0}])
    got = mod.curves(tmp_path / "a")
    assert got == {"epoch": [1, 2, 3], "rsum": [10.0, 12.5, 13.0], "itc_rsum": [20.0, 20.0, 20.0]}  # stages continue the axis
    assert mod.curves(tmp_path / "b") == {"epoch": [1, 2], "rsum": [5.0, 4.0]}
    monkeypatch.setattr(sys, "argv", ["dev_curves.py", str(tmp_path / "a"), str(tmp_path / "b"), "--labels", "A,B",
                                      "--out", str(tmp_path / "c.png"), "--json", str(tmp_path / "c.json")])
    mod.main()
    out = capsys.readouterr().out
    assert "A: 3 epochs, best 13.0 (epoch 3), last 13.0 (last step +0.5)" in out
    assert "B: 2 epochs, best 5.0 (epoch 1), last 4.0 (last step -1.0)" in out
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "c.json").read_text())["runs"]["B"]["rsum"] == [5.0, 4.0]
    _log(tmp_path / "empty", [])
    with pytest.raises(DataError, match="no validation records"):
        mod.curves(tmp_path / "empty")
    with pytest.raises(DataError, match="hold no 'r1'"):
        mod.curves(tmp_path / "a", "r1")
