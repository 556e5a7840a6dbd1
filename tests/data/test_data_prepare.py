"""prepare_dataset: a complete folder or nothing; skipped items listed; overwrite rules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itrkit.data.prepare import prepare_dataset
from itrkit.data.records import Dataset
from itrkit.errors import DataError, ItrkitError


def _source(tmp_path: Path, n: int = 4) -> Path:
    src = tmp_path / "src"
    (src / "img").mkdir(parents=True)
    rows = ["filepath,caption,split"]
    for i in range(n):
        Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(src / "img" / f"{i}.jpg")
        split = "test" if i == n - 1 else "train"
        rows += [f"img/{i}.jpg,photo {i} first,{split}", f"img/{i}.jpg,photo {i} second,{split}"]
    (src / "pairs.csv").write_text("\n".join(rows) + "\n")
    return src


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_prepare_csv(tmp_path: Path) -> None:
    src = _source(tmp_path)
    ds, skipped = prepare_dataset("csv", src / "pairs.csv", tmp_path / "out")
    assert skipped == [] and len(ds) == 4 and len(ds.captions) == 8
    assert ds.image_paths[0] == (src / "img" / "0.jpg").resolve()  # images are not copied
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert report["splits"] == {"train": {"images": 3, "captions": 6}, "test": {"images": 1, "captions": 2}}
    assert report["images"] == 4 and report["skipped"] == [] and report["ids_fingerprint"] == ds.ids_fingerprint()
    assert Dataset.load(tmp_path / "out").texts == ds.texts
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dataset.json", "prepare_report.json"]


def test_existing_output_and_overwrite(tmp_path: Path) -> None:
    src = _source(tmp_path)
    prepare_dataset("csv", src / "pairs.csv", tmp_path / "out")
    with pytest.raises(ItrkitError, match="already exists"):
        prepare_dataset("csv", src / "pairs.csv", tmp_path / "out")
    (src / "pairs.csv").write_text("filepath,caption\nimg/0.jpg,only one\n")
    ds, _ = prepare_dataset("csv", src / "pairs.csv", tmp_path / "out", overwrite=True)
    assert len(ds) == 1 and Dataset.load(tmp_path / "out").texts == ["only one"]
    (tmp_path / "empty").mkdir()  # an empty folder (e.g. made by the user) is fine
    assert len(prepare_dataset("csv", src / "pairs.csv", tmp_path / "empty")[0]) == 1
    with pytest.raises(ItrkitError, match="holds the source data"):
        prepare_dataset("csv", src / "pairs.csv", src, overwrite=True)
    assert (src / "img" / "0.jpg").is_file()


def test_failure_leaves_nothing(tmp_path: Path) -> None:
    src = _source(tmp_path)
    data = (src / "img" / "2.jpg").read_bytes()
    (src / "img" / "2.jpg").write_bytes(data[: len(data) // 2])  # truncated JPEG
    with pytest.raises(DataError, match=r"image 'img/2.jpg': cannot decode image .*2.jpg"):
        prepare_dataset("csv", src / "pairs.csv", tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path) == []
    # an existing good folder survives a failed overwrite untouched
    (src / "img" / "2.jpg").write_bytes(data)
    prepare_dataset("csv", src / "pairs.csv", tmp_path / "out")
    before = (tmp_path / "out" / "dataset.json").read_bytes()
    (src / "pairs.csv").write_text("filepath,caption\nimg/0.jpg,\n")
    with pytest.raises(DataError, match=r"pairs.csv:2: empty caption"):
        prepare_dataset("csv", src / "pairs.csv", tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "dataset.json").read_bytes() == before and _leftovers(tmp_path) == []


def test_skip_bad_lists_what_it_skipped(tmp_path: Path) -> None:
    src = _source(tmp_path)
    data = (src / "img" / "2.jpg").read_bytes()
    (src / "img" / "2.jpg").write_bytes(data[: len(data) // 2])
    with open(src / "pairs.csv", "a") as f:
        f.write("img/1.jpg,,train\nimg/9.jpg,no such file,train\n")
    ds, skipped = prepare_dataset("csv", src / "pairs.csv", tmp_path / "out", skip_bad=True)
    assert ds.image_ids == ["img/0.jpg", "img/1.jpg", "img/3.jpg"] and len(ds.captions) == 6
    assert len(skipped) == 3
    assert "pairs.csv:10: empty caption 'img/1.jpg#2'" in skipped[0]
    assert "image file not found" in skipped[1] and "9.jpg" in skipped[1]
    assert skipped[2].startswith("image 'img/2.jpg': cannot decode image")
    report = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert report["skipped"] == skipped


def test_split_files_and_synthetic(tmp_path: Path) -> None:
    src = _source(tmp_path)
    (tmp_path / "val.txt").write_text("img/1.jpg\n")
    ds, _ = prepare_dataset("csv", src / "pairs.csv", tmp_path / "out", split_files={"val": tmp_path / "val.txt"})
    assert [r.split for r in ds] == ["extra", "val", "extra", "extra"]
    ds, _ = prepare_dataset("synthetic", None, tmp_path / "syn", n_images=12, size=32, seed=1)
    assert len(ds) == 12 and ds.image_paths[0] == (tmp_path / "syn" / "images" / "syn00000.png")
    assert json.loads((tmp_path / "syn" / "dataset.json").read_text())["image_root"] == "."
    assert _leftovers(tmp_path) == []
