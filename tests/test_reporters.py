"""``report_to`` / ``--report-to`` (issue 18): metrics.csv and TensorBoard hold what train.log holds."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest

import itrkit
from itrkit.cli import main
from itrkit.errors import ConfigError
from itrkit.train.reporters import parse_report_to

TINY = {"model.image_tower": "tiny-image", "model.text_tower": "tiny-text", "model.embed_dim": 32,
        "batch_size": 16, "stages.0.epochs": 2, "device": "cpu", "log_every": 3}


def _log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "train.log").read_text().splitlines()]


def test_report_to_parses_lists_and_comma_strings() -> None:
    assert parse_report_to("csv, tensorboard,csv") == ["csv", "tensorboard"]
    assert parse_report_to(["jsonl"]) == ["jsonl"] and parse_report_to("none") == [] == parse_report_to(None)
    with pytest.raises(ConfigError, match="unknown reporter 'wandb'"):
        parse_report_to("csv,wandb")


def test_csv_rows_are_the_train_log_records(tmp_path: Path, synth_dir: Path) -> None:
    run = tmp_path / "r"
    itrkit.train(None, {**TINY, "report_to": "csv"}, data=synth_dir, out=run, progress=False)
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    log = _log(run)
    assert len(rows) == len(log) and len(log) > 2
    for row, rec in zip(rows, log):
        assert float(row["step"]) == rec["step"] and float(row["time"]) == rec["time"]
        if rec.get("event") == "val":
            assert float(row["val.rsum"]) == rec["val"]["rsum"] and row["loss"] == ""
        else:
            assert float(row["loss"]) == rec["loss"] and row["val.rsum"] == ""


def test_tensorboard_scalars_are_the_train_log_values(tmp_path: Path, synth_dir: Path) -> None:
    pytest.importorskip("tensorboard", reason="the tensorboard extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "r"
    assert main(["train", "--data", str(synth_dir), "--out", str(run), "--quiet", "--report-to", "tensorboard",
                 *[f"--set={k}={v}" for k, v in TINY.items()]]) == 0
    acc = EventAccumulator(str(run / "tensorboard"))
    acc.Reload()
    log = _log(run)
    loss = {e.step: e.value for e in acc.Scalars("train/loss")}
    want = {r["step"]: r["loss"] for r in log if "loss" in r}
    assert loss.keys() == want.keys() and all(loss[s] == pytest.approx(want[s], rel=1e-6) for s in want)
    rsum = {e.step: e.value for e in acc.Scalars("val/rsum")}
    assert rsum == pytest.approx({r["step"]: r["val"]["rsum"] for r in log if r.get("event") == "val"}, rel=1e-6)


def test_missing_tensorboard_is_one_line_before_anything_is_written(tmp_path: Path, synth_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    run = tmp_path / "r"
    assert main(["train", "--data", str(synth_dir), "--out", str(run), "--report-to", "csv,tensorboard",
                 *[f"--set={k}={v}" for k, v in TINY.items()]]) == 2
    assert capsys.readouterr().err.strip() == \
        "error: report_to: tensorboard needs tensorboard: pip install 'itrkit[tensorboard]'"
    assert not run.exists()
