from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from itrkit.data.records import Caption, Dataset, ImageRecord
from itrkit.errors import DataError


def _ds(tmp_path: Path) -> Dataset:
    recs = []
    for i, n in enumerate([1, 3, 2]):
        p = tmp_path / f"im{i}.png"
        p.write_bytes(b"x")
        recs.append(ImageRecord(f"im{i}", p, [Caption(f"im{i}#{k}", f"caption {i} {k}") for k in range(n)],
                                split="train" if i < 2 else "test"))
    return Dataset(recs, name="t")


def test_views_and_roundtrip(tmp_path: Path) -> None:
    ds = _ds(tmp_path)
    assert np.array_equal(ds.txt2img, [0, 1, 1, 1, 2, 2])
    assert ds.split("test").image_ids == ["im2"] and ds.splits() == {"train": 2, "test": 1}
    ds.save(tmp_path / "out", image_root=tmp_path)
    back = Dataset.load(tmp_path / "out")
    assert back.image_ids == ds.image_ids and back.texts == ds.texts
    assert [str(p) for p in back.image_paths] == [str(p.resolve()) for p in ds.image_paths]
    assert back.fingerprint() == Dataset(back.records).fingerprint()


def test_validation_errors(tmp_path: Path) -> None:
    p = tmp_path / "a.png"
    with pytest.raises(DataError, match="duplicate image id 'a'"):
        Dataset([ImageRecord("a", p, [Caption("1", "x")]), ImageRecord("a", p, [Caption("2", "y")])])
    with pytest.raises(DataError, match="empty caption '1' for image 'a'"):
        Dataset([ImageRecord("a", p, [Caption("1", "  ")])])
    with pytest.raises(DataError, match="duplicate caption id '1'"):
        Dataset([ImageRecord("a", p, [Caption("1", "x")]), ImageRecord("b", p, [Caption("1", "y")])])
    with pytest.raises(DataError, match="split val of dataset 't' has no images"):
        _ds(tmp_path).split("val")
    with pytest.raises(DataError, match="no prepared dataset"):
        Dataset.load(tmp_path / "nowhere")
