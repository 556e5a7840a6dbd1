"""The CLI refuses bad input with one line naming the culprit and a non-zero exit."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from itrkit.cli import main


def _write_csv_dataset(tmp_path: Path, rows: list[tuple[str, str]], images: dict[str, bytes | None]) -> Path:
    for name, content in images.items():
        p = tmp_path / name
        if content is None:
            Image.new("RGB", (16, 16), (200, 30, 30)).save(p)
        else:
            p.write_bytes(content)
    csv = tmp_path / "captions.csv"
    csv.write_text("filepath,caption\n" + "".join(f"{f},{c}\n" for f, c in rows), encoding="utf-8")
    return csv


def _prepare(tmp_path: Path, csv: Path, capsys: pytest.CaptureFixture[str], *extra: str) -> tuple[int, str]:
    code = main(["data", "prepare", "--format", "csv", "--source", str(csv), "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip()
    return code, err


@pytest.mark.parametrize("case, rows, images, needle", [
    ("missing image", [("a.png", "a red square"), ("gone.png", "nothing")], {"a.png": None}, "gone.png"),
    ("unreadable image", [("a.png", "a red square"), ("bad.png", "broken")], {"a.png": None, "bad.png": b"\x89PNG\r\n\x1a\nnot really"}, "bad.png"),
    ("empty caption", [("a.png", "a red square"), ("a.png", "   ")], {"a.png": None}, "caption"),
])
def test_prepare_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str, rows, images, needle: str) -> None:
    csv = _write_csv_dataset(tmp_path, rows, images)
    code, err = _prepare(tmp_path, csv, capsys)
    assert code == 2, case
    assert err.startswith("error: ") and needle in err and "\n" not in err, err
    assert not (tmp_path / "out").exists(), "nothing half-written"


def test_prepare_duplicate_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    jl = tmp_path / "d.jsonl"
    jl.write_text('{"filepath": "a.png", "caption": "one", "caption_id": "c1"}\n'
                  '{"filepath": "a.png", "caption": "two", "caption_id": "c1"}\n')
    code = main(["data", "prepare", "--format", "jsonl", "--source", str(jl), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "c1" in err and "\n" not in err


def test_prepare_skip_bad_lists_what_it_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    csv = _write_csv_dataset(tmp_path, [("a.png", "a red square"), ("gone.png", "x")], {"a.png": None})
    code, err = _prepare(tmp_path, csv, capsys, "--skip-bad")
    assert code == 0 and "skipped" in err and "gone.png" in err
    assert (tmp_path / "out" / "dataset.json").is_file()


def test_train_bad_config_key_exits_nonzero(tmp_path: Path) -> None:
    # a real process: exit status and stderr as a user sees them
    proc = subprocess.run([sys.executable, "-m", "itrkit", "train", "--set", "loss.alpah=1", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: unknown config key 'loss.alpah' (did you mean 'loss.csa'?)" or \
        "unknown config key 'loss.alpah'" in proc.stderr
    assert not (tmp_path / "r").exists()


def test_train_missing_dataset(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and "no prepared dataset" in err and str(tmp_path / "nope") in err
    assert not (tmp_path / "r").exists()


def test_teach_cli_reduces_rows(tmp_path: Path, synth_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from itrkit.teachers.store import FeatureStore

    code = main(["teach", "--data", str(synth_dir), "--out", str(tmp_path / "t"), "--image-teacher", "tiny-image",
                 "--text-teacher", "tiny-text", "--image-reduction", "pca:4", "--text-reduction", "pca:3"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    assert FeatureStore.open(tmp_path / "t" / "image.store").dim == 4
    assert FeatureStore.open(tmp_path / "t" / "text.store").dim == 3
    assert main(["teach", "--data", str(synth_dir), "--out", str(tmp_path / "u"), "--image-teacher", "tiny-image",
                 "--text-teacher", "tiny-text", "--image-reduction", "pca:zero"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pca" in err
