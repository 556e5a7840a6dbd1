"""A teacher or grid store whose payload was truncated or bit-flipped, or that another model made,
is refused with one line naming the file (exit 2 through the CLI); stores written before the
checksums existed still open; large stores are verified once per file version."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import itrkit.teachers.store as store_mod
from itrkit.cli import main
from itrkit.errors import StoreError
from itrkit.teachers.store import FEATURES, FeatureStore


def _teach(data: Path, out: Path) -> list[str]:
    return ["teach", "--data", str(data), "--out", str(out), "--image-teacher", "tiny-image",
            "--text-teacher", "tiny-text"]


def _one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err and err.rstrip().endswith(errors[0]), err
    return errors[0]


@pytest.fixture(scope="module")
def stores(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("integrity") / "teachers"
    assert main(_teach(synth_dir, out)) == 0
    return out


@pytest.fixture
def teachers(stores: Path, tmp_path: Path) -> Path:
    out = tmp_path / "teachers"
    shutil.copytree(stores, out)
    return out


def _flip_bit(path: Path, at: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0x01  # the low mantissa bit of a float16: the value stays finite
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage, words", [
    (lambda fp: _flip_bit(fp, fp.stat().st_size // 2 & ~1), "fails its checksum in bytes 0…"),
    (lambda fp: fp.write_bytes(fp.read_bytes()[:-7]), "is truncated"),
], ids=["bit-flip", "truncated"])
def test_damaged_teacher_store_is_one_line_exit_2(teachers: Path, synth_dir: Path, capsys, damage,
                                                  words: str) -> None:
    fp = teachers / "text.store" / FEATURES
    damage(fp)
    capsys.readouterr()
    assert main(_teach(synth_dir, teachers)) == 2  # the same teach finds its store damaged
    line = _one_error(capsys)
    assert str(fp) in line and words in line


def test_bit_flipped_store_is_refused_by_training_before_any_run_folder(teachers: Path, synth_dir: Path,
                                                                      tmp_path: Path, capsys) -> None:
    fp = teachers / "image.store" / FEATURES
    _flip_bit(fp, fp.stat().st_size - 3 * 64)
    sets = ["model.image_tower=tiny-image", "model.text_tower=tiny-text", "model.embed_dim=16", "batch_size=16",
            "stages.0.epochs=1", "model.usa_heads=true", "loss.csa=1", "loss.usa=1",
            f"teacher.image_store={teachers / 'image.store'}", f"teacher.text_store={teachers / 'text.store'}"]
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--data", str(synth_dir), "--out", str(out), "--quiet"]
                + [x for s in sets for x in ("--set", s)]) == 2
    line = _one_error(capsys)
    assert str(fp) in line and "fails its checksum" in line and not out.exists()


def test_store_made_by_other_weights_is_one_line_exit_2(teachers: Path, synth_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import torch

    from itrkit.models.tiny import TinyTextTower
    from itrkit.models.towers import build_tower

    made_by = build_tower("tiny-text", "text")
    orig = TinyTextTower.__init__

    def retrained(self, *a, **kw) -> None:  # same name and spec, other weights (an updated model)
        orig(self, *a, **kw)
        with torch.no_grad():
            self.proj.bias.add_(0.01)

    monkeypatch.setattr(TinyTextTower, "__init__", retrained)
    capsys.readouterr()
    assert main(_teach(synth_dir, teachers)) == 2
    line = _one_error(capsys)
    assert str(teachers / "text.store") in line and "was made by model 'tiny-text' with fingerprint" in line
    other = build_tower("tiny-text", "text")
    with pytest.raises(StoreError, match="not by the expected model"):
        FeatureStore.open(teachers / "text.store", expect_model=other)
    FeatureStore.open(teachers / "text.store", expect_model=made_by)
    FeatureStore.open(teachers / "text.store", expect_model=made_by.fingerprint())
    with pytest.raises(StoreError, match="not the expected 'minilm'"):
        FeatureStore.open(teachers / "text.store", expect_model="minilm")


def test_store_written_before_checksums_still_opens_and_is_checked_by_its_sha256(teachers: Path) -> None:
    path = teachers / "text.store"
    header = json.loads((path / "header.json").read_text())
    header.pop("checksums"), header.pop("file_sha256")  # what the previous version wrote
    (path / "header.json").write_text(json.dumps(header))
    s = FeatureStore.open(path)
    assert s.verify() and s.count == 180
    _flip_bit(path / FEATURES, (path / FEATURES).stat().st_size - 101)
    with pytest.raises(StoreError, match="fails its checksum \\(sha256"):
        FeatureStore.open(path)
    header.pop("sha256")  # no checksum at all: opens with the size checks only
    (path / "header.json").write_text(json.dumps(header))
    assert FeatureStore.open(path).count == 180


def test_large_store_is_verified_on_the_first_open_of_each_file_version(teachers: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store_mod, "VERIFY_ALWAYS_BYTES", 0)  # treat every store as huge
    reads: list[int] = []
    real = store_mod._chunk_digest
    monkeypatch.setattr(store_mod, "_chunk_digest", lambda fd, a, n: (reads.append(n), real(fd, a, n))[1])
    path = teachers / "image.store"
    FeatureStore.open(path)
    size = (path / FEATURES).stat().st_size
    assert sum(reads) == size  # first open: every byte hashed
    FeatureStore.open(path)
    assert sum(reads) == size  # same file version: not re-read
    _flip_bit(path / FEATURES, size - 5)  # a rewrite gives the file a new mtime: verified again
    with pytest.raises(StoreError, match="fails its checksum"):
        FeatureStore.open(path)
    assert sum(reads) == 2 * size


def test_damaged_pca_side_file_is_one_line(tmp_path: Path) -> None:
    from itrkit.teachers.extract import extract_teacher
    from itrkit.teachers.reduce import PCA

    feats = np.random.default_rng(0).standard_normal((30, 6)).astype(np.float32)
    s = extract_teacher(lambda b: feats[b], list(range(30)), [f"i{k}" for k in range(30)], tmp_path / "p.store",
                        "image", batch_size=8, reduction="pca:2", pca_sample=30, progress=False)
    side = tmp_path / "p.store" / "pca.safetensors"
    _flip_bit(side, side.stat().st_size - 2)
    for load in (lambda: PCA.from_store(s), lambda: s.load_tensors("pca.safetensors")):
        with pytest.raises(StoreError) as e:
            load()
        assert str(side) in str(e.value) and "fails its checksum" in str(e.value) and "\n" not in str(e.value)


def test_damaged_or_foreign_grid_store_is_one_line_exit_2(tmp_path: Path, synth_dir: Path, capsys) -> None:
    out = tmp_path / "g.store"
    argv = ["grid", str(synth_dir), "--out", str(out), "--batch-size", "4", "--split", "test"]
    assert main(argv) == 0
    capsys.readouterr()
    assert main([*argv, "--model", "efficientnet-lite1"]) == 2  # made by another model
    assert "holds grid features of 'efficientnet-lite0', not 'efficientnet-lite1'" in _one_error(capsys)
    fp = out / FEATURES
    _flip_bit(fp, fp.stat().st_size // 2 & ~1)
    capsys.readouterr()
    assert main(argv) == 2
    line = _one_error(capsys)
    assert str(fp) in line and "fails its checksum" in line
    os.truncate(fp, fp.stat().st_size - 2)
    assert main(argv) == 2 and "is truncated" in _one_error(capsys)
