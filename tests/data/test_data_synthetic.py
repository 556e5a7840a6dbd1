"""The built-in synthetic set: determinism, splits, captions, labels and true positives."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from itrkit.data.images import load_image
from itrkit.data.records import Caption, Dataset, ImageRecord
from itrkit.data.synthetic import (
    COLOURS,
    SHAPES,
    TEMPLATES,
    Obj,
    Scene,
    make_synthetic,
    render_scene,
    synthetic_positives,
)
from itrkit.errors import DataError


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Dataset]:
    out = tmp_path_factory.mktemp("synth_a")
    return out, make_synthetic(out, n_images=40, captions_per_image=5, seed=3, size=64, progress=False)


def test_deterministic_bytes(synth: tuple[Path, Dataset], tmp_path: Path) -> None:
    out, ds = synth
    again = make_synthetic(tmp_path / "b", n_images=40, captions_per_image=5, seed=3, size=64, progress=False)
    assert again.texts == ds.texts and [r.labels for r in again] == [r.labels for r in ds]
    for r1, r2 in zip(ds, again):
        assert r1.path.read_bytes() == r2.path.read_bytes()
    assert (out / "dataset.json").read_bytes() == (tmp_path / "b" / "dataset.json").read_bytes()
    other = make_synthetic(tmp_path / "c", n_images=40, seed=4, size=64, progress=False)
    assert sum(a.path.read_bytes() != b.path.read_bytes() for a, b in zip(ds, other)) > 30


def test_records_and_splits(synth: tuple[Path, Dataset]) -> None:
    out, ds = synth
    assert len(ds) == 40 and len(ds.captions) == 200 and len(set(ds.caption_ids)) == 200
    assert ds.splits() == {"train": 28, "val": 6, "test": 6}
    for r in ds:
        assert 1 <= len(r.labels) <= 3 and len(set(r.labels)) == len(r.labels)
        assert load_image(r.path).size == (64, 64)
        for lab in r.labels:
            colour, shape = lab.split()
            assert colour in COLOURS and shape in SHAPES
            # every caption names each object's shape; most name its colour too
            assert all(shape in c.text for c in r.captions)
    back = Dataset.load(out)  # image_root "." : the folder can be moved
    moved = out.parent / (out.name + "_moved")
    shutil.copytree(out, moved)
    assert Dataset.load(moved).image_paths[0] == moved / "images" / "syn00000.png"
    assert back.texts == ds.texts and back.image_ids == ds.image_ids
    assert [r.labels for r in back] == [r.labels for r in ds]


def test_captions_vary_and_share_words(synth: tuple[Path, Dataset]) -> None:
    _, ds = synth
    assert len(TEMPLATES) >= 8
    starts = {" ".join(t.split()[:2]) for t in ds.texts}
    assert len(starts) >= 8  # the templates differ in structure, not just in the nouns
    vocab_per_image = [set(" ".join(c.text for c in r.captions).split()) for r in ds]
    shared = sum(len(vocab_per_image[0] & v) > 3 for v in vocab_per_image[1:])
    assert shared > 20
    assert not any(" a orange" in t or " a ob" in t for t in ds.texts)  # "an orange"


def test_positives_against_pairwise_loop(synth: tuple[Path, Dataset]) -> None:
    _, ds = synth
    pos = synthetic_positives(ds)
    for a in ds:
        ref = {b.id for b in ds if sorted(b.labels) == sorted(a.labels)}
        assert pos[a.id] == ref and a.id in ref
    assert any(len(v) > 1 for v in pos.values())  # true multi-positive relations exist
    with pytest.raises(DataError, match="image 'x' .* has no labels"):
        synthetic_positives(Dataset([ImageRecord("x", Path("x.png"), [Caption("c", "t")])]))


def test_rendered_colours_are_where_the_caption_says() -> None:
    rng = np.random.default_rng(0)
    for colour, shape in [("red", "circle"), ("blue", "square"), ("yellow", "hexagon"), ("green", "diamond")]:
        scene = Scene((Obj(colour, shape, "large", "left"), Obj("black", "cross", "small", "right")), "striped")
        arr = np.asarray(render_scene(scene, 96, rng)).astype(int)
        left = arr[int(0.5 * 96), int(0.22 * 96)]
        assert np.abs(left - np.array(COLOURS[colour])).max() <= 20
        right = arr[int(0.5 * 96), int(0.78 * 96)]
        assert np.abs(right - np.array(COLOURS["black"])).max() <= 20
        assert arr[3, 48].min() > 150  # light background at the top edge
