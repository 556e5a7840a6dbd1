from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from itrkit.data.records import Caption, Dataset, ImageRecord
from itrkit.errors import ConfigError, StoreError
from itrkit.models.base import Tower
from itrkit.teachers.extract import extract_teacher, teach
from itrkit.teachers.reduce import PCA
from itrkit.teachers.store import FeatureStore


class CharTower(Tower):
    """Text tower: character histogram (a–z) → Linear → 8-d. Counts forward calls."""

    modality = "text"
    output_dim = 8

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.lin = nn.Linear(26, 8)
        with torch.no_grad():
            self.lin.weight.copy_(torch.randn(8, 26, generator=g))
            self.lin.bias.copy_(torch.randn(8, generator=g))
        self.spec = {"name": "char-test"}
        self.calls = 0

    def prepare(self, items: list[str]) -> torch.Tensor:
        out = torch.zeros(len(items), 26)
        for i, t in enumerate(items):
            for ch in t.lower():
                if "a" <= ch <= "z":
                    out[i, ord(ch) - 97] += 1
        return out

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.lin(inputs)


TEXTS = ["a dog", "two cats sleeping on a red sofa", "x", "a child climbs stairs", "boats",
         "the quick brown fox jumps over the lazy dog", "sun", "rain on a window", "zebra", "kites in the sky"]


def test_tower_rows_equal_one_by_one_reference(tmp_path: Path) -> None:
    tower = CharTower()
    ids = [f"c{i}" for i in range(len(TEXTS))]
    s = extract_teacher(tower, TEXTS, ids, tmp_path / "t.store", "text", batch_size=3, progress=False)
    assert tower.calls == 4 and s.teacher == "char-test" and s.dim == 8 and s.kind == "text"
    got = s.lookup(ids).numpy()
    with torch.no_grad():
        for k, t in enumerate(TEXTS):  # slow reference: one text at a time, in dataset order
            want = tower.forward(tower.prepare([t]))[0].numpy()
            assert np.allclose(got[k], want.astype(np.float16).astype(np.float32), atol=1e-6)
    h = s.header
    assert h["teacher"]["spec"] == {"name": "char-test"} and h["extraction"]["items_per_s"] > 0
    assert h["reduction"] is None and h["reduction_spec"] == []


def test_plain_callable_and_fp32(tmp_path: Path) -> None:
    seen: list[list[Any]] = []

    def encode(batch: list[int]) -> np.ndarray:
        seen.append(list(batch))
        return np.stack([np.full(3, float(v)) for v in batch])

    items = list(range(7))
    s = extract_teacher(encode, items, [f"i{v}" for v in items], tmp_path / "i.store", "image",
                        batch_size=4, fp16=False, progress=False)
    assert seen == [[0, 1, 2, 3], [4, 5, 6]] and s.teacher == "encode" and s.dtype == "float32"
    assert np.array_equal(s.lookup(["i5", "i0"]).numpy(), [[5, 5, 5], [0, 0, 0]])


def test_token_outputs_pooled_or_flattened(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    tokens = rng.standard_normal((6, 5, 4)).astype(np.float32)  # CLS + 2×2 patches, 4-d

    def encode(batch: list[int]) -> torch.Tensor:
        return torch.from_numpy(tokens[batch])

    ids = [f"i{v}" for v in range(6)]
    flat = extract_teacher(encode, list(range(6)), ids, tmp_path / "flat.store", "image", batch_size=4,
                           progress=False)
    assert flat.dim == 20 and flat.reduction[0]["mode"] == "flatten" and flat.reduction[0]["has_cls"]
    assert np.allclose(flat.lookup(ids).numpy(), tokens.reshape(6, 20), atol=2e-3)
    mean = extract_teacher(encode, list(range(6)), ids, tmp_path / "mean.store", "image", batch_size=4,
                           reduction="mean", progress=False)
    for k in range(6):
        want = sum(tokens[k, j] for j in range(1, 5)) / 4
        assert np.allclose(mean.lookup([ids[k]]).numpy()[0], want, atol=2e-3)


def test_pca_reduction(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    feats = (rng.standard_normal((40, 10)) @ rng.standard_normal((10, 10))).astype(np.float32)

    def encode(batch: list[int]) -> np.ndarray:
        return feats[batch]

    ids = [f"i{v}" for v in range(40)]
    s = extract_teacher(encode, list(range(40)), ids, tmp_path / "p.store", "image", batch_size=8,
                        reduction="pca:3", pca_sample=40, progress=False)
    want = PCA(3).fit(feats).transform(feats).numpy()
    assert s.dim == 3 and np.allclose(s.lookup(ids).numpy(), want, atol=2e-2)
    step = s.reduction[-1]
    assert step["type"] == "pca" and step["input_dim"] == 10 and step["sample"] == 40
    assert torch.allclose(PCA.from_store(s).transform(feats), torch.from_numpy(want), atol=1e-4)
    sub = extract_teacher(encode, list(range(40)), ids, tmp_path / "q.store", "image", batch_size=8,
                          reduction="pca:3", pca_sample=12, progress=False)  # fitted on 12, applied to all
    pca = PCA.from_store(sub)
    assert np.allclose(sub.lookup(ids).numpy(), pca.transform(feats).numpy(), atol=2e-2)
    with pytest.raises(ConfigError, match="pca:5 needs at least 5 items"):
        extract_teacher(encode, list(range(4)), ids[:4], tmp_path / "r.store", "image", reduction="pca:5",
                        progress=False)
    assert not (tmp_path / "r.store").exists()


def test_bad_encoder_outputs_leave_nothing(tmp_path: Path) -> None:
    def nan_for_three(batch: list[int]) -> np.ndarray:
        return np.array([[np.nan if v == 3 else 1.0, 0.0] for v in batch])

    ids = [f"i{v}" for v in range(6)]
    with pytest.raises(StoreError, match="'i3'"):
        extract_teacher(nan_for_three, list(range(6)), ids, tmp_path / "a.store", "image", batch_size=2,
                        progress=False)
    with pytest.raises(ConfigError, match="returned \\(1, 2\\) for a batch of 2"):
        extract_teacher(lambda b: np.zeros((1, 2)), list(range(6)), ids, tmp_path / "a.store", "image",
                        batch_size=2, progress=False)
    with pytest.raises(ConfigError, match="6 items but 5 ids"):
        extract_teacher(lambda b: np.zeros((len(b), 2)), list(range(6)), ids[:5], tmp_path / "a.store", "image")
    assert list(tmp_path.iterdir()) == []
    tower = CharTower()
    (tmp_path / "exists.store").mkdir()
    with pytest.raises(StoreError, match="already exists"):
        extract_teacher(tower, TEXTS, [str(i) for i in range(10)], tmp_path / "exists.store", "text")
    assert tower.calls == 0  # refused before any work


def _dataset(tmp_path: Path) -> Dataset:
    from PIL import Image

    recs = []
    for i in range(5):
        p = tmp_path / f"im{i}.png"
        Image.fromarray(np.full((20, 24, 3), 40 * i, dtype=np.uint8)).save(p)
        recs.append(ImageRecord(f"im{i}", p, [Caption(f"im{i}#{k}", f"picture {i} caption {k}") for k in range(2)]))
    return Dataset(recs, name="tiny")


def test_teach_with_registry_towers(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from itrkit.models.towers import build_tower

    ds = _dataset(tmp_path)
    paths = teach(ds, "tiny-image", "tiny-text", tmp_path / "teachers", batch_size=2)
    assert paths == {"image": tmp_path / "teachers" / "image.store", "text": tmp_path / "teachers" / "text.store"}
    img = FeatureStore.open(paths["image"], dataset=ds, expect_kind="image")
    txt = FeatureStore.open(paths["text"], dataset=ds, expect_kind="text")
    assert (len(img), len(txt), img.teacher, txt.header["source"]) == (5, 10, "tiny-image", "tiny")
    assert "items/s" in capsys.readouterr().err
    tower = build_tower("tiny-text", "text")
    with torch.no_grad():
        want = tower(tower.prepare([ds.texts[3]]))[0].numpy()
    assert np.allclose(txt.lookup([ds.caption_ids[3]]).numpy()[0], want, atol=2e-3)
    before = (paths["text"] / "features.npy").stat().st_mtime_ns
    teach(ds, None, "tiny-text", tmp_path / "teachers")  # same teacher and ids: reused, not rewritten
    assert (paths["text"] / "features.npy").stat().st_mtime_ns == before
    with pytest.raises(StoreError, match="already holds features of teacher 'tiny-text'"):
        teach(ds, None, "minilm", tmp_path / "teachers")
    with pytest.raises(ConfigError, match="pools tokens"):
        teach(ds, "tiny-image", None, tmp_path / "other", reduction={"image": "mean"})
    assert not (tmp_path / "other" / "image.store").exists()


def _interrupting(stop_at: int) -> CharTower:
    """A CharTower whose ``stop_at``-th forward call raises KeyboardInterrupt (a Ctrl-C)."""
    tower = CharTower()
    real = tower.forward

    def forward(inputs: torch.Tensor) -> torch.Tensor:
        if tower.calls + 1 == stop_at:
            raise KeyboardInterrupt
        return real(inputs)

    tower.forward = forward
    return tower


TEXTS40 = [f"{t} {k} {'x' * (k % 7)}" for k in range(4) for t in TEXTS]


@pytest.mark.parametrize("reduction", [None, "pca:3"])
def test_interrupted_extraction_resumes_to_the_same_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str], reduction) -> None:
    import itrkit.teachers.store as store_mod
    from itrkit.teachers.store import partial_path

    monkeypatch.setattr(store_mod, "SHARD_ITEMS", 8)  # shards of two batches of 4
    ids = [f"c{i}" for i in range(len(TEXTS40))]
    kw = dict(batch_size=4, reduction=reduction, pca_sample=12, progress=False)
    full = extract_teacher(CharTower(), TEXTS40, ids, tmp_path / "full.store", "text", **kw)
    # With PCA: 12 sample items (3 calls, one shard) first, then 28 items in 7 batches of 4.
    cut = _interrupting(stop_at=7)
    with pytest.raises(KeyboardInterrupt):
        extract_teacher(cut, TEXTS40, ids, tmp_path / "cut.store", "text", **kw)
    assert "run the same command again to continue" in capsys.readouterr().err
    assert partial_path(tmp_path / "cut.store").is_dir() and not (tmp_path / "cut.store").exists()
    again = CharTower()
    store = extract_teacher(again, TEXTS40, ids, tmp_path / "cut.store", "text", **kw)
    kept = 20 if reduction else 24  # the shards finished in the 6 calls before the cut: 12 + 8, or 3 × 8
    assert again.calls == (40 - kept) // 4 and f"({kept} of 40 items) kept" in capsys.readouterr().err
    for name in ["features.npy", "ids.json"] + (["pca.safetensors"] if reduction else []):
        assert (tmp_path / "full.store" / name).read_bytes() == (tmp_path / "cut.store" / name).read_bytes()
    drop = ("created", "extraction")
    assert {k: v for k, v in store.header.items() if k not in drop} == \
        {k: v for k, v in full.header.items() if k not in drop}
    assert not partial_path(tmp_path / "cut.store").exists()


def test_resume_refuses_a_second_writer_and_ignores_another_jobs_partial(tmp_path: Path) -> None:
    from itrkit.teachers.store import StoreWriter, partial_path

    ids = [f"c{i}" for i in range(len(TEXTS))]
    rows = [np.arange(0, 5), np.arange(5, 10)]
    w = StoreWriter(tmp_path / "a.store", ids, 8, "t", "text", job="job-1", groups=[[r] for r in rows])
    with pytest.raises(StoreError, match="being written by another process"):
        StoreWriter(tmp_path / "a.store", ids, 8, "t", "text", job="job-1", groups=[[r] for r in rows])
    w.write_rows(rows[0], np.ones((5, 8)))
    w.abort(KeyboardInterrupt())
    assert partial_path(tmp_path / "a.store").is_dir()
    same = StoreWriter(tmp_path / "a.store", ids, 8, "t", "text", job="job-1", groups=[[r] for r in rows])
    assert same.done_units == {0} and same.resumed_rows == 5
    same.abort(KeyboardInterrupt())
    other = StoreWriter(tmp_path / "a.store", ids, 8, "t", "text", job="job-2", groups=[[r] for r in rows])
    assert other.done_units == set() and other.resumed_rows == 0  # another job: started afresh
    other.abort(RuntimeError("boom"))  # a real error removes the partial folder
    assert list(tmp_path.iterdir()) == []


def test_teach_refuses_a_store_of_other_captions_under_the_same_ids(tmp_path: Path) -> None:
    ds = _dataset(tmp_path)
    teach(ds, None, "tiny-text", tmp_path / "teachers")
    old = ds.records[2].captions[0]
    ds.records[2].captions[0] = Caption(old.id, "an edited caption")
    with pytest.raises(StoreError, match="made from other captions under the same ids"):
        teach(ds, None, "tiny-text", tmp_path / "teachers")
