"""Disk full and unwritable output: a one-line error naming the file, exit 2, no temporary or
partial files left behind."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from itrkit.cli import main

TINY = ["model.image_tower=tiny-image", "model.text_tower=tiny-text", "model.embed_dim=16", "batch_size=16",
        "stages.0.epochs=2"]


def _train(data: Path, out: Path) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--quiet"] + [x for s in TINY for x in ("--set", s)]


@pytest.mark.parametrize("victim", ["config.yaml", "ckpt-", "model", "metrics.json"])
def test_disk_full_while_training(synth_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture[str], victim: str) -> None:
    real_replace = os.replace

    def full_disk(src, dst, *a, **k):  # the final rename of an atomic write is where ENOSPC surfaces
        if Path(dst).name.startswith(victim):
            raise OSError(errno.ENOSPC, "No space left on device", str(dst))
        return real_replace(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", full_disk)
    out = tmp_path / "run"
    assert main(_train(synth_dir, out)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "No space left on device" in err[0] and victim in err[0]
    leftovers = [p.name for p in out.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".")]
    assert leftovers == []
    assert not (out / "metrics.json").exists()


def test_output_folder_cannot_be_created(synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(_train(synth_dir, blocker / "run")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "a-file" in err[0]
