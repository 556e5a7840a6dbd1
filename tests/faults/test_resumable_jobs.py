"""SIGKILL part-way through `itrkit teach`, `itrkit grid` and a tower-feature cache fill, then the
same command again: only the unfinished shards are computed (counted), and the result has the
same bytes as an uninterrupted run."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from itrkit.cli import main

# A child process that SIGKILLs itself: right after the n-th shard is recorded in a store's
# manifest ("after-shard"), after the n-th store write's rows are on disk but before its shard is
# recorded ("mid-shard"), or after the n-th shard file of a feature cache is saved ("cache").
KILLER = r"""
import os, signal, sys
import itrkit.models.features as features
import itrkit.teachers.store as store
mode, n, shard, argv = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
store.SHARD_ITEMS = features.SHARD_ITEMS = shard
count = [0]
def hit():
    count[0] += 1
    if count[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
if mode == "after-shard":
    orig = store.StoreWriter._hash_rows  # runs in the writer's background thread
    def hash_rows(self, s, cast, complete):
        orig(self, s, cast, complete)
        if complete:
            hit()
    store.StoreWriter._hash_rows = hash_rows
if mode == "mid-shard":
    orig = store.StoreWriter._account  # called once the write's rows are in the file
    def account(self, rows, cast):
        if self._bg is not None:  # the earlier shards' records are written (one FIFO worker): the kill
            self._bg.submit(lambda: None).result()  # lands mid-shard, not inside an earlier record
        hit()
        orig(self, rows, cast)
    store.StoreWriter._account = account
if mode in ("after-shard", "mid-shard"):
    from itrkit.cli import main
    sys.exit(main(argv))
orig_save = features._Partial.save
def save(self, k, rows):
    orig_save(self, k, rows)
    hit()
features._Partial.save = save
from itrkit.data.records import Dataset
from itrkit.models.towers import build_tower
ds = Dataset.load(argv[0])
features.cached_features(build_tower("tiny-image", "image"), [str(p) for p in ds.image_paths], ds.image_ids,
                         cache_dir=argv[1], batch_size=8)
"""


def _killed(mode: str, n: int, shard: int, argv: list[str]) -> None:
    proc = subprocess.run([sys.executable, "-c", KILLER, mode, str(n), str(shard), *argv],
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-1500:]


class _RowCounter:
    """Counts the items a tower class computes (rows of its outputs)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, cls: type) -> None:
        self.rows = 0
        orig = cls.forward

        def forward(tower, inputs):
            out = orig(tower, inputs)
            self.rows += int(out.shape[0])
            return out

        monkeypatch.setattr(cls, "forward", forward)


def _same_store(a: Path, b: Path) -> None:
    for name in sorted(p.name for p in a.iterdir()):
        if name != "header.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ha, hb = (json.loads((p / "header.json").read_text()) for p in (a, b))
    for h in (ha, hb):
        h.pop("created"), h.pop("extraction")  # wall-clock facts of each run
    assert ha == hb
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())


def _teach(data: Path, out: Path) -> list[str]:
    return ["teach", "--data", str(data), "--out", str(out), "--image-teacher", "tiny-image",
            "--text-teacher", "tiny-text"]


@pytest.fixture(scope="module")
def full_teach(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("full") / "teachers"
    assert main(_teach(synth_dir, out)) == 0
    return out


# The synthetic set: 60 images (one batch of 64: one shard) and 180 captions (batches of 64, 64, 52;
# shards of 64 rows: one batch each). Shard events count the image store's first.
@pytest.mark.parametrize("mode, n, recomputed, damage", [
    ("after-shard", 2, 116, False),  # text shard 0 recorded, then killed
    ("mid-shard", 4, 52, False),  # third text batch on disk, its shard not yet recorded
    ("after-shard", 3, 116, True),  # text shards 0-1 recorded, then shard 0's rows damaged on disk
], ids=["after-shard", "between-rows-and-manifest", "finished-shard-damaged"])
def test_teach_sigkill_then_same_command_resumes_byte_identical(
        tmp_path: Path, synth_dir: Path, full_teach: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], mode: str, n: int, recomputed: int, damage: bool) -> None:
    from itrkit.models.tiny import TinyImageTower, TinyTextTower
    from itrkit.teachers.store import partial_path

    out = tmp_path / "teachers"
    _killed(mode, n, 64, _teach(synth_dir, out))
    partial = partial_path(out / "text.store")
    assert (out / "image.store").is_dir() and not (out / "text.store").exists() and partial.is_dir()
    if damage:  # flip one bit of the longest caption's row (text shard 0 holds the 64 longest)
        from itrkit.data.records import Dataset

        texts = Dataset.load(synth_dir).texts
        row = int(np.argsort([-len(t) for t in texts], kind="stable")[0])
        raw = bytearray((partial / "features.npy").read_bytes())
        offset = len(raw) - (len(texts) - row) * 64 * 2  # 64-d float16 rows at the end of the file
        raw[offset + 1] ^= 0x01  # a high mantissa bit of one float16: still finite, another value
        (partial / "features.npy").write_bytes(bytes(raw))
    images, captions = _RowCounter(monkeypatch, TinyImageTower), _RowCounter(monkeypatch, TinyTextTower)
    capsys.readouterr()
    assert main(_teach(synth_dir, out)) == 0
    err = capsys.readouterr().err
    assert (images.rows, captions.rows) == (0, recomputed)  # image store reused; only unfinished text shards
    assert f"({180 - recomputed} of 180 items) kept" in err
    assert ("fail their checksum" in err) == damage
    for kind in ("image", "text"):
        _same_store(full_teach / f"{kind}.store", out / f"{kind}.store")
    assert not partial.exists() and not list(out.glob(".*"))


def test_grid_sigkill_then_same_command_resumes_byte_identical(tmp_path: Path, synth_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from itrkit.models.efficientnet import EfficientNetLiteTower

    def grid(out: Path) -> list[str]:
        return ["grid", str(synth_dir), "--out", str(out), "--batch-size", "2", "--split", "test"]

    assert main(grid(tmp_path / "full.store")) == 0
    count = json.loads((tmp_path / "full.store" / "header.json").read_text())["count"]
    assert count >= 5
    _killed("after-shard", 2, 2, grid(tmp_path / "g.store"))  # two shards of two images kept
    seen: list[int] = []
    real = EfficientNetLiteTower.prepare
    monkeypatch.setattr(EfficientNetLiteTower, "prepare", lambda self, items: (seen.append(len(items)),
                                                                               real(self, items))[1])
    assert main(grid(tmp_path / "g.store")) == 0
    assert sum(seen) == count - 4
    _same_store(tmp_path / "full.store", tmp_path / "g.store")


def test_feature_cache_sigkill_then_same_call_resumes_byte_identical(tmp_path: Path, synth_dir: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from itrkit.data.records import Dataset
    from itrkit.models.features import cache_path, cached_features
    from itrkit.models.tiny import TinyImageTower
    from itrkit.models.towers import build_tower

    ds = Dataset.load(synth_dir)
    paths = [str(p) for p in ds.image_paths]
    tower = build_tower("tiny-image", "image")
    want = cached_features(tower, paths, ds.image_ids, cache_dir=tmp_path / "full", batch_size=8)
    _killed("cache", 2, 16, [str(synth_dir), str(tmp_path / "cut")])  # shards of 16 images: 2 of 4 saved
    entry = cache_path(tower, paths, ds.image_ids, cache_dir=tmp_path / "cut")
    assert not entry.exists() and len(list(entry.with_suffix(".partial").glob("shard-*"))) == 2
    counter = _RowCounter(monkeypatch, TinyImageTower)
    got = cached_features(tower, paths, ds.image_ids, cache_dir=tmp_path / "cut", batch_size=8)
    assert counter.rows == len(paths) - 32 and np.array_equal(got, want)
    ref = cache_path(tower, paths, ds.image_ids, cache_dir=tmp_path / "full")
    assert entry.read_bytes() == ref.read_bytes()
    assert not entry.with_suffix(".partial").exists()
