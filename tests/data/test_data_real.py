"""Loaders on the real data in ../shared/data (skipped when it is absent)."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from itrkit.data.formats import load_coco, load_flickr8k
from itrkit.data.images import ImageTransform, check_images, load_image
from itrkit.data.prepare import prepare_dataset

pytestmark = pytest.mark.shared


def test_flickr8k_official_counts(shared_data: Path) -> None:
    root = shared_data / "flickr8k"
    ds = load_flickr8k(root)
    # Independent count straight from the files.
    lines = [ln for ln in (root / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines() if ln.strip()]
    per_image = Counter(ln.split("\t")[0].rsplit("#", 1)[0] for ln in lines)
    split_of = {}
    for split, name in [("train", "train"), ("val", "dev"), ("test", "test")]:
        for ln in (root / f"Flickr_8k.{name}Images.txt").read_text().split():
            split_of[Path(ln).stem] = split
    assert len(ds) == len(per_image) == 8091 and len(ds.captions) == len(lines) == 40455
    assert all(len(r.captions) == 5 for r in ds)
    assert ds.splits() == {"train": 6000, "val": 1000, "test": 1000, "extra": 91}
    assert all(r.split == split_of.get(r.id, "extra") for r in ds)
    first = ds[0]
    assert first.id == "1000268201_693b08cb0e" and first.captions[0].id == "1000268201_693b08cb0e.jpg#0"
    assert first.captions[0].text.startswith("A child in a pink dress")
    assert len(ds.split("test").captions) == 5000


def test_flickr8k_sample_opens(shared_data: Path) -> None:
    ds = load_flickr8k(shared_data / "flickr8k").split("test")
    sample = ds.subset(1000)
    sample.records = sample.records[::20]  # 50 photos across the split
    assert check_images(sample, progress=False) == {}
    for r in sample.records[:10]:
        im = load_image(r.path)
        assert im.mode == "RGB" and im.size == (224, 224)
        x = ImageTransform.efficientnet_lite(224)(im)
        assert x.shape == (3, 224, 224) and -1.0 <= x.min() and x.max() <= 1.0 and np.std(x) > 0.05


def test_coco_mini_real_ids(shared_data: Path) -> None:
    ann = shared_data / "coco-mini" / "annotations"
    raw = json.loads((ann / "captions_val2017.json").read_text())
    ds = load_coco(ann / "captions_val2017.json")
    # captions_val2017.json lists 79 images (the val2017/ folder holds 159 files: 80 have no captions here)
    assert ds.name == "coco-val2017" and ds.splits() == {"val": 79} and len(ds.captions) == len(raw["annotations"])
    assert ds.image_ids == [str(im["id"]) for im in raw["images"]]
    a = raw["annotations"][0]
    rec = ds[ds.image_ids.index(str(a["image_id"]))]
    assert str(a["id"]) in [c.id for c in rec.captions]
    assert rec.path.name == f"{a['image_id']:012d}.jpg"
    train = load_coco(ann / "captions_train2017.json")
    assert train.splits() == {"train": 80} and len(train.captions) == 400
    assert check_images(train, progress=False) == {}


def test_prepare_flickr8k_without_image_check(shared_data: Path, tmp_path: Path) -> None:
    ds, skipped = prepare_dataset("flickr8k", shared_data / "flickr8k", tmp_path / "f8k", check_images=False)
    assert skipped == [] and len(ds) == 8091 and ds[0].path.is_file()
    report = json.loads((tmp_path / "f8k" / "prepare_report.json").read_text())
    assert report["splits"]["test"] == {"images": 1000, "captions": 5000}
