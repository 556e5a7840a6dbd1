"""A malicious pickle where a checkpoint, model, teacher store or index file is expected is refused
with a one-line error and never executed (its payload would create a marker file)."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from itrkit.cli import main


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # what an attacker's file does on unpickling
        return (os.system, (f"touch {self.marker}",))


def _plant(path: Path, marker: Path) -> None:
    path.write_bytes(pickle.dumps(_Payload(marker)))


TINY = ["model.image_tower=tiny-image", "model.text_tower=tiny-text", "model.embed_dim=16", "batch_size=16",
        "stages.0.epochs=1", "checkpoint_every=3"]


def _train(data: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--data", str(data), "--out", str(out), "--quiet"] + [x for s in [*TINY, *extra]
                                                                           for x in ("--set", s)]


@pytest.fixture(scope="module")
def run(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("untrusted") / "run"
    assert main(_train(synth_dir, out)) == 0
    return out


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1, err
    return err[0]


def test_pickled_checkpoints(run: Path, synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cut = tmp_path / "run"
    shutil.copytree(run, cut)
    marker = tmp_path / "pwned"
    for header in (cut / "checkpoints").glob("ckpt-*.json"):
        meta = json.loads(header.read_text())
        weights = cut / "checkpoints" / meta["weights"]
        _plant(weights, marker)
        meta["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()  # even with a matching checksum
        header.write_text(json.dumps(meta))
    assert main(_train(synth_dir, cut) + ["--resume"]) == 2
    assert "no usable checkpoint" in _one_error(capsys)
    assert not marker.exists()


def test_pickled_model_weights(run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cut = tmp_path / "run"
    shutil.copytree(run, cut)
    marker = tmp_path / "pwned"
    _plant(cut / "model" / "model.safetensors", marker)
    assert main(["eval", "--run", str(cut)]) == 2
    assert "model.safetensors" in _one_error(capsys)
    assert not marker.exists()


def test_pickled_teacher_store(synth_dir: Path, teacher_stores: list[str], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    image_store = Path(teacher_stores[0].split("=", 1)[1])
    bad = tmp_path / "image.store"
    shutil.copytree(image_store, bad)
    marker = tmp_path / "pwned"
    _plant(bad / "features.npy", marker)
    out = tmp_path / "cusa"
    args = _train(synth_dir, out, "model.usa_heads=true", "loss.csa=1", "loss.usa=1",
                  f"teacher.image_store={bad}", teacher_stores[1])
    assert main(args) == 2
    assert "image.store" in _one_error(capsys)
    assert not marker.exists() and not out.exists()  # refused before the run folder was made


def test_pickled_index(run: Path, synth_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = tmp_path / "index"
    assert main(["index", "build", "--run", str(run), "--images", str(synth_dir), "--split", "test",
                 "--out", str(index), "--quiet"]) == 0
    marker = tmp_path / "pwned"
    _plant(index / "images.safetensors", marker)
    capsys.readouterr()
    assert main(["search", "--index", str(index), "--text", "a red circle"]) == 2
    assert "images.safetensors" in _one_error(capsys)
    assert not marker.exists()
