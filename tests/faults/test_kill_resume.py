"""SIGKILL at a training step, and SIGKILL inside a checkpoint write, then `itrkit train --resume`:
the run ends bitwise where an uninterrupted run ends (single stage and across a stage boundary).
A truncated newest checkpoint is detected by its checksum and the previous one is used."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from itrkit.cli import main

# Runs the CLI in a child process that SIGKILLs itself: at the n-th training batch ("step"), or
# inside the n-th checkpoint write, after the weights file and before its header ("ckpt").
KILLER = r"""
import os, signal, sys
from itrkit.cli import main
from itrkit.train import checkpoint, data
mode, n, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
count = [0]
def hit():
    count[0] += 1
    if count[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
if mode == "step":
    orig = data.PairData.batch
    def batch(self, idx):
        if self.teacher_image is None and self.n_pairs > 100:  # training batches only
            hit()
        return orig(self, idx)
    data.PairData.batch = batch
else:
    orig_sha = checkpoint.sha256_file
    def sha(path):
        hit()
        return orig_sha(path)
    checkpoint.sha256_file = sha
sys.exit(main(argv))
"""

TWO_STAGES = ["stages.1.name=second", "stages.1.epochs=2", "stages.1.lr=0.003"]


def _args(data: Path, out: Path, extra: list[str]) -> list[str]:
    sets = ["model.image_tower=tiny-image", "model.text_tower=tiny-text", "model.embed_dim=16", "batch_size=16",
            "stages.0.epochs=2", "stages.0.lr=0.01", "checkpoint_every=2", *extra]
    return ["train", "--data", str(data), "--out", str(out), "--quiet"] + [x for s in sets for x in ("--set", s)]


def _weights(run: Path) -> dict:
    return load_file(str(run / "model" / "model.safetensors"))


def _same_run(a: Path, b: Path) -> None:
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all((wa[k] == wb[k]).all() for k in wa)
    ma, mb = (json.loads((r / "metrics.json").read_text()) for r in (a, b))
    assert ma["test"] == mb["test"] and ma["best"] == mb["best"]


@pytest.mark.parametrize("mode, n, extra", [("step", 7, []), ("ckpt", 3, []), ("step", 19, TWO_STAGES),
                                            ("ckpt", 12, TWO_STAGES)],
                         ids=["kill-at-step", "kill-in-checkpoint", "kill-at-step-stage2", "kill-in-checkpoint-stage2"])
def test_sigkill_then_resume_is_bitwise_identical(tmp_path: Path, synth_dir: Path, mode: str, n: int,
                                                  extra: list[str]) -> None:
    assert main(_args(synth_dir, tmp_path / "full", extra)) == 0
    cut = tmp_path / "cut"
    proc = subprocess.run([sys.executable, "-c", KILLER, mode, str(n), *_args(synth_dir, cut, extra)],
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-1500:]
    assert not (cut / "metrics.json").exists()
    newest = json.loads(sorted((cut / "checkpoints").glob("ckpt-*.json"))[-1].read_text())
    assert newest["stage"] == (1 if extra else 0)  # the two-stage cases are cut inside stage II
    assert main(_args(synth_dir, cut, extra) + ["--resume"]) == 0
    _same_run(tmp_path / "full", cut)
    assert not list(cut.rglob("*.tmp"))


def test_truncated_newest_checkpoint_falls_back_with_a_message(tmp_path: Path, synth_dir: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert main(_args(synth_dir, tmp_path / "full", [])) == 0
    cut = tmp_path / "cut"
    proc = subprocess.run([sys.executable, "-c", KILLER, "step", "9", *_args(synth_dir, cut, [])],
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL
    newest = sorted((cut / "checkpoints").glob("ckpt-*.safetensors"))[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    capsys.readouterr()
    assert main(_args(synth_dir, cut, []) + ["--resume"]) == 0
    assert f"{newest.name} fails its checksum" in capsys.readouterr().err
    _same_run(tmp_path / "full", cut)
