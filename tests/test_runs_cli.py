"""``itrkit runs DIR``: one line per run — method, towers, best dev metric, test RSUM and status —
for real runs that finished, were interrupted, failed, or are still running."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import itrkit
from itrkit.cli import main
from itrkit.cli.runs import find_runs, run_summary
from itrkit.errors import NonFiniteLossError
from itrkit.train.data import PairData
from itrkit.train.trainer import Interrupted

TINY = {"model.image_tower": "tiny-image", "model.text_tower": "tiny-text", "model.embed_dim": 32,
        "batch_size": 16, "stages.0.epochs": 2, "device": "cpu", "log_every": 1}


@pytest.fixture(scope="module")
def runs(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    mp = pytest.MonkeyPatch()
    try:
        itrkit.train(None, TINY, data=synth_dir, out=root / "infonce", progress=False)
        orig = PairData.batch
        calls = {"n": 0}

        def interrupt(self: PairData, idx: np.ndarray):  # a real SIGINT in epoch 2, as from Ctrl-C
            calls["n"] += 1
            if calls["n"] == 11:
                os.kill(os.getpid(), signal.SIGINT)
            return orig(self, idx)

        mp.setattr(PairData, "batch", interrupt)
        with pytest.raises(Interrupted):
            itrkit.train(None, TINY, data=synth_dir, out=root / "cut", progress=False)

        def poisoned(self: PairData, idx: np.ndarray):
            b = orig(self, idx)
            b["image_features"] = b["image_features"] * float("nan")
            return b

        mp.setattr(PairData, "batch", poisoned)
        with pytest.raises(NonFiniteLossError):
            itrkit.train(None, TINY, data=synth_dir, out=root / "nan", progress=False)
    finally:
        mp.undo()
    (root / "notes").mkdir()
    (root / "notes" / "config.yaml").write_text("just: a file\n")  # not a run
    return root


def test_finished_run_line_carries_the_metrics_json_numbers(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["runs", str(runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["run", "method", "towers", "best", "dev", "test", "rsum", "status"]
    assert [ln.split()[0] for ln in lines[1:]] == ["cut", "infonce", "nan"]  # sorted; notes/ is no run
    m = json.loads((runs / "infonce" / "metrics.json").read_text())
    line = next(ln for ln in lines if ln.startswith("infonce"))
    assert "dual_encoder: contrastive" in line and "tiny-image / tiny-text" in line
    assert f"rsum {m['best']['metric']:.2f} @ main:{m['best']['epoch']}" in line
    assert f"{m['test']['rsum']:.2f}" in line
    assert line.endswith(f"finished ({m['steps']} steps)")


def test_interrupted_run_is_unfinished_at_its_checkpoint_step(runs: Path) -> None:
    step = max(json.loads(p.read_text())["step"] for p in (runs / "cut" / "checkpoints").glob("ckpt-*.json"))
    s = run_summary(runs / "cut")
    assert step == 11 and s["status"] == f"unfinished (step {step}, interrupted)"
    assert s["test_rsum"] is None and s["best"] is not None  # epoch 1 was validated


def test_failed_run_says_why(runs: Path) -> None:
    s = run_summary(runs / "nan")
    assert s["status"].startswith("failed (step 0): non-finite loss at step 1"), s["status"]


def test_running_run_names_its_process(runs: Path, tmp_path: Path) -> None:
    import shutil

    live = tmp_path / "live"
    shutil.copytree(runs / "cut", live)
    code = ("import sys, time; from itrkit.utils.lock import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(live)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        assert run_summary(live)["status"] == f"running (step 11, pid {proc.pid})"
    finally:
        proc.kill()
        proc.wait()
    assert run_summary(live)["status"].startswith("unfinished (step 11")  # the holder is gone


def test_json_lines_and_errors(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["runs", str(runs / "infonce"), "--json"]) == 0
    rows = [json.loads(ln) for ln in capsys.readouterr().out.splitlines()]
    assert len(rows) == 1 and rows[0]["status"].startswith("finished")
    assert find_runs(runs) == [runs / "cut", runs / "infonce", runs / "nan"]
    assert main(["runs", str(tmp_path / "absent")]) == 2
    assert capsys.readouterr().err.strip() == f"error: itrkit runs: {tmp_path / 'absent'} is not a folder"
