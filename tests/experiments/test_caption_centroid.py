"""``itrkit teach --image-teacher caption-centroid`` (issue 16): an image's teacher row is the
normalised mean of the text teacher's rows of its own captions, written as an ordinary image store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from itrkit.cli import main
from itrkit.data.records import Caption, Dataset, ImageRecord
from itrkit.errors import ConfigError
from itrkit.teachers.extract import teach
from itrkit.teachers.store import FeatureStore


def _dataset(tmp_path: Path) -> Dataset:
    """Four training images with 3, 1, 2 and 4 captions, one test image (no pixels are read)."""
    counts = {"a": 3, "b": 1, "c": 2, "d": 4, "t": 2}
    recs = [ImageRecord(s, tmp_path / f"{s}.jpg", [Caption(f"{s}#{k}", f"a photo {s} number {k} {'z' * k}")
                                                   for k in range(n)], "test" if s == "t" else "train")
            for s, n in counts.items()]
    return Dataset(recs, name="cc", validate=False)


def test_centroid_rows_are_the_normalised_means_of_the_images_own_caption_rows(tmp_path: Path) -> None:
    train = _dataset(tmp_path).split("train")
    paths = teach(train, "caption-centroid", "tiny-text", tmp_path / "t")
    img = FeatureStore.open(paths["image"], expect_kind="image")
    txt = FeatureStore.open(paths["text"], expect_kind="text")
    assert img.ids == ["a", "b", "c", "d"] and img.teacher == "caption-centroid(tiny-text)"
    assert img.dim == txt.dim and img.header["centroid_of"]["text_teacher"] == "tiny-text"
    got = img.lookup(img.ids).numpy()
    for r, rec in enumerate(train.records):  # the slow reference: one image at a time
        rows = np.stack([txt.lookup([c.id]).numpy()[0].astype(np.float64) for c in rec.captions])
        want = rows.mean(axis=0)
        want /= np.linalg.norm(want)
        np.testing.assert_allclose(got[r], want, atol=1e-3)  # float16 rows, as the text store's
        assert abs(np.linalg.norm(got[r]) - 1) < 2e-3
    assert not np.allclose(got[0], got[1], atol=1e-2)
    before = (paths["image"] / "features.npy").stat().st_mtime_ns
    teach(train, "caption-centroid", "tiny-text", tmp_path / "t")  # same text rows: reused
    assert (paths["image"] / "features.npy").stat().st_mtime_ns == before


def test_caption_centroid_needs_a_text_teacher_and_no_image_reduction(tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    train = _dataset(tmp_path).split("train")
    with pytest.raises(ConfigError, match="caption-centroid needs a text teacher"):
        teach(train, "caption-centroid", None, tmp_path / "t")
    with pytest.raises(ConfigError, match="takes no image reduction"):
        teach(train, "caption-centroid", "tiny-text", tmp_path / "t", reduction={"image": "mean"})
    assert not (tmp_path / "t").exists()


def test_teach_cli_writes_a_caption_centroid_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from itrkit.data.synthetic import make_synthetic

    make_synthetic(tmp_path / "syn", n_images=6, captions_per_image=2, seed=0, size=16)
    ds = Dataset.load(tmp_path / "syn")
    assert main(["teach", "--data", str(tmp_path / "syn"), "--out", str(tmp_path / "t"),
                 "--image-teacher", "caption-centroid", "--text-teacher", "tiny-text"]) == 0
    img = FeatureStore.open(tmp_path / "t" / "image.store", dataset=ds, expect_kind="image")
    assert img.ids == ds.image_ids and img.teacher == "caption-centroid(tiny-text)"


def test_reproduce_teachers_build_the_centroid_store_and_refuse_another_teacher_in_the_same_out(
        tmp_path: Path) -> None:
    from itrkit.data.synthetic import make_synthetic
    from itrkit.experiments.runner import Runner

    make_synthetic(tmp_path / "syn", n_images=8, captions_per_image=2, seed=1, size=16)
    runner = Runner(tmp_path / "out")
    ov = runner.teachers(tmp_path / "syn", "caption-centroid", "tiny-text")
    img = FeatureStore.open(tmp_path / "out" / "teachers" / "image.store")
    train = Dataset.load(tmp_path / "syn").split("train")
    assert ov[0] == f"teacher.image_store={img.path}" and img.ids == train.image_ids  # training images only
    assert img.teacher == "caption-centroid(tiny-text)"
    with pytest.raises(ConfigError, match="holds the image teacher 'caption-centroid\\(tiny-text\\)', not 'tiny-image'"):
        Runner(tmp_path / "out").teachers(tmp_path / "syn", "tiny-image", "tiny-text")
