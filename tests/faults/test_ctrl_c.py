"""Ctrl-C: the first stops cleanly after a checkpoint (exit 130 through the CLI, resumable); a second
Ctrl-C stops at once."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest

from itrkit.cli import main
from itrkit.train.data import PairData

TINY = ["model.image_tower=tiny-image", "model.text_tower=tiny-text", "model.embed_dim=16", "batch_size=16",
        "stages.0.epochs=2"]


def _train(data: Path, out: Path) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--quiet"] + [x for s in TINY for x in ("--set", s)]


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c(synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys, presses: int) -> None:
    orig, calls = PairData.batch, {"n": 0}

    def batch(self: PairData, idx: np.ndarray):
        if self.n_pairs > 100:
            calls["n"] += 1
            if calls["n"] == 5:
                for _ in range(presses):
                    os.kill(os.getpid(), signal.SIGINT)
        return orig(self, idx)

    monkeypatch.setattr(PairData, "batch", batch)
    out = tmp_path / "run"
    code = main(_train(synth_dir, out))
    err = capsys.readouterr().err
    ckpts = sorted((out / "checkpoints").glob("ckpt-*.json"))
    if presses == 1:
        assert code == 2 and "resume" in err  # Interrupted: a checkpoint was written at the stop
        assert json.loads(ckpts[-1].read_text())["step"] == 5
        monkeypatch.setattr(PairData, "batch", orig)
        assert main(_train(synth_dir, out) + ["--resume"]) == 0
    else:
        assert code == 130 and "interrupted" in err  # at once: no checkpoint for the cut step
        assert all(json.loads(c.read_text())["step"] < 5 for c in ckpts)
    assert calls["n"] >= 5
