"""SIGKILL part-way through `itrkit teach`, `itrkit grid`, a tower-feature cache fill and `itrkit index build`, then the
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


# --- itrkit index build ----------------------------------------------------------------------------
# A child process that SIGKILLs itself right after the n-th shard of an index build is recorded
# ("after-shard"), or after the n-th shard's file is written but before the partial manifest lists
# it ("before-record").
INDEX_KILLER = r"""
import os, signal, sys
import itrkit.index.build as build
mode, n, shard, argv = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
build.SHARD_ITEMS = shard
count = [0]
def hit():
    count[0] += 1
    if count[0] == n:
        os.kill(os.getpid(), signal.SIGKILL)
if mode == "after-shard":
    orig = build._Shards.save
    def save(self, name, k, rows, sums):
        orig(self, name, k, rows, sums)
        hit()
    build._Shards.save = save
else:
    orig = build._Shards._record
    def record(self, key, digest):
        hit()
        orig(self, key, digest)
    build._Shards._record = record
from itrkit.cli import main
sys.exit(main(argv))
"""


def _index_killed(mode: str, n: int, argv: list[str], shard: int = 16) -> None:
    proc = subprocess.run([sys.executable, "-c", INDEX_KILLER, mode, str(n), str(shard), *argv],
                          capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-1500:]


def _index(run: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return ["index", "build", "--run", str(run), "--images", str(data), "--out", str(out), "--batch-size", "8",
            "--quiet", *extra]


def _same_index(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name != "manifest.json":
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (json.loads((p / "manifest.json").read_text()) for p in (a, b))
    for m in (ma, mb):
        m.pop("created"), m.pop("manifest_sha256")  # the build's wall-clock time (and the digest over it)
    assert ma == mb


@pytest.fixture(scope="module")
def index_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder of a tiny random dual encoder with USA heads (16-d cross, 8-d uni)."""
    from itrkit.models import ModelConfig, build_model, save_model

    run = tmp_path_factory.mktemp("index-run") / "run"
    save_model(build_model(ModelConfig(image_tower="tiny-image", text_tower="tiny-text", embed_dim=16,
                                       usa_heads=True, usa_dim=8)), run / "model")
    return run


@pytest.fixture(scope="module")
def full_index(index_run: Path, synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Uninterrupted builds with the default shard size (one shard per pass), by backend."""
    out = tmp_path_factory.mktemp("full-index")
    built = {}
    for backend in ("exact", "faiss-flat"):
        assert main(_index(index_run, synth_dir, out / backend, "--backend", backend)) == 0
        built[backend] = out / backend
    return built


# Killed with shards of 16 images (60 images: 16+16+16+12, two image passes) and 64 captions (the
# caption batch is at least 64; 180 captions: 64+64+52). Shards are saved in the order image
# embeddings 1-4, image USA embeddings 5-8, caption embeddings 9-11; the tiny towers count the rows
# the re-run computes (image rows of both image passes).
@pytest.mark.parametrize("mode, n, backend, image_rows, caption_rows, damage", [
    ("after-shard", 6, "faiss-flat", 28, 180, False),  # cross pass done, 2 USA shards recorded
    ("after-shard", 9, "exact", 0, 116, False),  # both image passes and caption shard 0 recorded
    ("before-record", 2, "exact", 44 + 60, 180, False),  # cross shard 1's file on disk, not recorded
    ("after-shard", 10, "exact", 0, 116, True),  # caption shards 0-1 recorded, then 0's file damaged: 0, 2 computed
], ids=["in-usa-pass", "in-caption-pass", "between-file-and-manifest", "finished-shard-damaged"])
def test_index_build_sigkill_then_same_command_resumes_byte_identical(
        tmp_path: Path, synth_dir: Path, index_run: Path, full_index: dict[str, Path],
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], mode: str, n: int, backend: str,
        image_rows: int, caption_rows: int, damage: bool) -> None:
    if backend.startswith("faiss"):
        pytest.importorskip("faiss")
    from itrkit.index.build import load_index, partial_path
    from itrkit.models.tiny import TinyImageTower, TinyTextTower

    out = tmp_path / "ix"
    argv = _index(index_run, synth_dir, out, "--backend", backend)
    _index_killed(mode, n, argv)
    partial = partial_path(out)
    assert not out.exists() and partial.is_dir()
    if mode == "before-record":
        assert (partial / "image_embeds-00001.safetensors").is_file()
        assert "image_embeds-00001" not in json.loads((partial / "manifest.json").read_text())["shards"]
    if damage:  # one byte of caption shard 0's rows (the end of the file) changed
        shard = partial / "text_embeds-00000.safetensors"
        raw = bytearray(shard.read_bytes())
        raw[-5] ^= 0x01
        shard.write_bytes(bytes(raw))
    images, captions = _RowCounter(monkeypatch, TinyImageTower), _RowCounter(monkeypatch, TinyTextTower)
    capsys.readouterr()
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert (images.rows, captions.rows) == (image_rows, caption_rows)
    assert ("fail their checksum" in err) == damage
    if caption_rows < 180:
        assert f"caption embeddings: {(180 - caption_rows) // 64} of 3 shards ({180 - caption_rows} of 180 items) " \
               "kept" in err
    _same_index(full_index[backend], out)
    assert load_index(out).fingerprint == load_index(full_index[backend]).fingerprint
    assert not partial.exists() and not list(tmp_path.glob(".*"))


def test_index_build_resume_embeds_again_the_shards_whose_images_changed(
        tmp_path: Path, synth_dir: Path, index_run: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    from PIL import Image

    from itrkit.data.records import Dataset
    from itrkit.models.tiny import TinyImageTower, TinyTextTower

    data = tmp_path / "data"
    shutil.copytree(synth_dir, data)
    argv = _index(index_run, data, tmp_path / "ix")
    _index_killed("after-shard", 9, argv)  # both image passes and caption shard 0 recorded
    path = Dataset.load(data).image_paths[20]  # in image shard 1 (images 16-31)
    Image.new("RGB", (64, 64), (200, 10, 90)).save(path)
    images, captions = _RowCounter(monkeypatch, TinyImageTower), _RowCounter(monkeypatch, TinyTextTower)
    capsys.readouterr()
    assert main(argv) == 0
    assert "image files of 1 finished shard(s) changed" in capsys.readouterr().err
    assert (images.rows, captions.rows) == (2 * 16, 116)  # shard 1 through both image heads again
    assert main(_index(index_run, data, tmp_path / "full")) == 0  # uninterrupted, on the changed image
    _same_index(tmp_path / "full", tmp_path / "ix")


def test_index_build_ctrl_c_keeps_shards_a_second_builder_is_refused_another_batch_size_starts_afresh(
        tmp_path: Path, synth_dir: Path, index_run: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    import fcntl
    import os

    import itrkit.index.build as build
    from itrkit.models import load_model
    from itrkit.models.tiny import TinyImageTower, TinyTextTower

    out = tmp_path / "ix"
    monkeypatch.setattr(build, "SHARD_ITEMS", 16)
    model = load_model(index_run)
    calls = [0]
    real = model.encode_texts

    def encode_texts(texts):
        calls[0] += 1
        if calls[0] == 2:
            raise KeyboardInterrupt
        return real(texts)

    monkeypatch.setattr(model, "encode_texts", encode_texts)
    with pytest.raises(KeyboardInterrupt):
        build.build_index(model, build.dataset_from_source(synth_dir), out, batch_size=8, progress=False)
    partial = build.partial_path(out)
    assert "interrupted: 9 finished shard(s)" in capsys.readouterr().err and partial.is_dir()
    assert not out.exists()

    fd = os.open(partial / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # another build holds the folder
    try:
        assert main(_index(index_run, synth_dir, out)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "being built by another process" in err[0] and str(partial) in err[0]
    finally:
        os.close(fd)
    assert partial.is_dir() and not out.exists()

    images, captions = _RowCounter(monkeypatch, TinyImageTower), _RowCounter(monkeypatch, TinyTextTower)
    assert main(_index(index_run, synth_dir, out, "--batch-size", "4")) == 0  # another job
    assert (images.rows, captions.rows) == (120, 180)  # nothing of the batch-8 shards mixed in
    assert not partial.exists()
