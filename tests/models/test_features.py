"""compute_features / cached_features: order, eval mode, cache hits, keys, damaged files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from itrkit.errors import ConfigError, DataError
from itrkit.models.features import cache_path, cached_features, compute_features
from itrkit.models.towers import build_tower


class _Counter:
    """Counts forward calls of a tower without changing what it computes."""

    def __init__(self, tower) -> None:
        self.calls = 0
        original = tower.forward

        def forward(inputs):
            self.calls += 1
            return original(inputs)

        tower.forward = forward


@pytest.fixture
def images(tmp_path: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(5):
        p = tmp_path / "img" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (36, 40, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


def test_compute_features_matches_row_by_row_and_restores_mode(images: list[Path]) -> None:
    tower = build_tower("tiny-image", "image")
    tower.set_trainable("all")
    tower.train()
    feats = compute_features(tower, images, batch_size=2)
    assert feats.dtype == np.float32 and feats.shape == (5, 64) and tower.training
    with torch.inference_mode():
        for i, p in enumerate(images):
            np.testing.assert_allclose(feats[i], tower.eval()(tower.prepare([p]))[0].numpy(), atol=1e-6)
    assert compute_features(tower, [], batch_size=2).shape == (0, 64)


def test_cache_hit_does_not_run_the_tower(images: list[Path], tmp_path: Path) -> None:
    tower = build_tower("tiny-image", "image")
    counter = _Counter(tower)
    keys = [p.stem for p in images]
    first = cached_features(tower, images, keys, cache_dir=tmp_path / "cache", batch_size=2)
    assert counter.calls == 3
    second = cached_features(tower, images, keys, cache_dir=tmp_path / "cache", batch_size=2)
    assert counter.calls == 3 and np.array_equal(first, second)
    path = cache_path(tower, images, keys, cache_dir=tmp_path / "cache")
    assert path.parent == tmp_path / "cache" / "features" and path.name.startswith(tower.fingerprint())
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["count"] == 5 and meta["dim"] == 64 and meta["tower"] == tower.spec and meta["modality"] == "image"
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, path.with_suffix(".json").name])


def test_default_cache_dir_is_used(images: list[Path]) -> None:
    tower = build_tower("tiny-image", "image")
    cached_features(tower, images, [str(i) for i in range(5)])
    assert cache_path(tower, images, [str(i) for i in range(5)]).parent == Path(os.environ["ITRKIT_CACHE"]) / "features"


def test_changed_image_file_changes_the_key(images: list[Path], tmp_path: Path) -> None:
    tower = build_tower("tiny-image", "image")
    keys = [p.stem for p in images]
    before = cache_path(tower, images, keys, cache_dir=tmp_path)
    feats = cached_features(tower, images, keys, cache_dir=tmp_path)
    st = images[1].stat()
    os.utime(images[1], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new mtime: same key
    assert cache_path(tower, images, keys, cache_dir=tmp_path) == before
    Image.new("RGB", (36, 40), (255, 0, 0)).save(images[2])
    after = cache_path(tower, images, keys, cache_dir=tmp_path)
    assert after != before
    counter = _Counter(tower)
    new = cached_features(tower, images, keys, cache_dir=tmp_path)
    assert counter.calls == 1 and not np.allclose(new[2], feats[2]) and np.allclose(new[0], feats[0])
    assert cache_path(tower, images, [k + "x" for k in keys], cache_dir=tmp_path) != after  # ids count too


def test_different_weights_or_texts_change_the_key(tmp_path: Path) -> None:
    texts = ["a dog", "a cat", ""]
    a, b = build_tower("tiny-text", "text"), build_tower({"name": "tiny-text", "seed": 7}, "text")
    assert cache_path(a, texts, ["0", "1", "2"], tmp_path) != cache_path(b, texts, ["0", "1", "2"], tmp_path)
    trained = build_tower("tiny-text", "text")
    with torch.no_grad():
        trained.proj.bias.add_(0.01)
    assert cache_path(trained, texts, ["0", "1", "2"], tmp_path) != cache_path(a, texts, ["0", "1", "2"], tmp_path)
    assert cache_path(a, ["a dog", "a cat", "x"], ["0", "1", "2"], tmp_path) != cache_path(a, texts, ["0", "1", "2"], tmp_path)
    fa = cached_features(a, texts, ["0", "1", "2"], tmp_path, kind="text")
    fb = cached_features(b, texts, ["0", "1", "2"], tmp_path, kind="text")
    assert not np.allclose(fa, fb)


def test_damaged_cache_file_is_recomputed(images: list[Path], tmp_path: Path, capsys) -> None:
    tower = build_tower("tiny-image", "image")
    keys = [p.stem for p in images]
    good = cached_features(tower, images, keys, cache_dir=tmp_path)
    path = cache_path(tower, images, keys, cache_dir=tmp_path)
    path.write_bytes(path.read_bytes()[:50])  # truncated
    counter = _Counter(tower)
    again = cached_features(tower, images, keys, cache_dir=tmp_path)
    err = capsys.readouterr().err
    assert f"cache file {path} damaged, recomputing" in err and err.count("\n") == 1
    assert counter.calls == 1 and np.array_equal(good, again)
    assert cached_features(tower, images, keys, cache_dir=tmp_path) is not None and counter.calls == 1
    path.with_suffix(".json").write_text("{not json")
    cached_features(tower, images, keys, cache_dir=tmp_path)
    assert counter.calls == 2 and "damaged" in capsys.readouterr().err


def test_bad_inputs(images: list[Path], tmp_path: Path) -> None:
    tower = build_tower("tiny-image", "image")
    with pytest.raises(DataError, match="image not found: .*nope.png"):
        cached_features(tower, [tmp_path / "nope.png"], ["x"], cache_dir=tmp_path)
    with pytest.raises(DataError, match="2 item keys for 5 items"):
        cached_features(tower, images, ["a", "b"], cache_dir=tmp_path)
    with pytest.raises(ConfigError, match="text features asked from the image tower tiny-image"):
        cached_features(tower, images, [str(i) for i in range(5)], cache_dir=tmp_path, kind="text")
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    with pytest.raises(DataError, match="broken.jpg"):
        compute_features(tower, [broken])
    pil = [Image.open(p) for p in images]  # PIL images are keyed by their pixels
    assert cache_path(tower, pil, ["a"] * 5, tmp_path) == cache_path(tower, [Image.open(p) for p in images], ["a"] * 5, tmp_path)


def test_text_features_come_back_in_item_order() -> None:
    tower = build_tower({"name": "gru:minilm", "embed_dim": 8, "hidden": 6}, "text")
    texts = ["a", "a dog on a long beach at sunset", "two cats", "", "the man", "a b c d e f g h"]
    feats = compute_features(tower, texts, batch_size=4)
    with torch.inference_mode():
        for i, t in enumerate(texts):
            np.testing.assert_allclose(feats[i], tower(tower.prepare([t]))[0].numpy(), atol=1e-5)


def test_bit_flipped_or_foreign_cache_entry_is_recomputed(images: list[Path], tmp_path: Path, capsys) -> None:
    tower = build_tower("tiny-image", "image")
    keys = [p.stem for p in images]
    good = cached_features(tower, images, keys, cache_dir=tmp_path)
    path = cache_path(tower, images, keys, cache_dir=tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0x01  # one low mantissa bit of a float32: still finite, loads without complaint
    path.write_bytes(bytes(raw))
    counter = _Counter(tower)
    again = cached_features(tower, images, keys, cache_dir=tmp_path)
    assert f"cache file {path} damaged, recomputing" in capsys.readouterr().err
    assert counter.calls == 1 and np.array_equal(good, again)
    meta_path = path.with_suffix(".json")
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "tower_fingerprint": "0" * 16}))  # a sidecar of another tower
    cached_features(tower, images, keys, cache_dir=tmp_path)
    assert counter.calls == 2 and "damaged" in capsys.readouterr().err
    meta = json.loads(meta_path.read_text())
    del meta["sha256"]  # an entry written before the checksum was recorded: still read
    meta_path.write_text(json.dumps(meta))
    assert np.array_equal(cached_features(tower, images, keys, cache_dir=tmp_path), good) and counter.calls == 2


def test_interrupted_cache_fill_resumes_from_its_shards(images: list[Path], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import itrkit.models.features as features

    monkeypatch.setattr(features, "SHARD_ITEMS", 2)  # shards of one batch of 2
    tower = build_tower("tiny-image", "image")
    keys = [p.stem for p in images]
    want = cached_features(tower, images, keys, cache_dir=tmp_path / "full", batch_size=2)
    real = tower.forward
    calls = [0]

    def forward(inputs):
        calls[0] += 1
        if calls[0] == 3:
            raise KeyboardInterrupt  # Ctrl-C during the third batch
        return real(inputs)

    tower.forward = forward
    with pytest.raises(KeyboardInterrupt):
        cached_features(tower, images, keys, cache_dir=tmp_path / "cut", batch_size=2)
    path = cache_path(tower, images, keys, cache_dir=tmp_path / "cut")
    assert not path.exists() and len(list(path.with_suffix(".partial").glob("shard-*"))) == 2
    got = cached_features(tower, images, keys, cache_dir=tmp_path / "cut", batch_size=2)
    assert calls[0] == 4 and np.array_equal(got, want)  # only the third (last) batch was computed again
    assert path.read_bytes() == cache_path(tower, images, keys, cache_dir=tmp_path / "full").read_bytes()
    assert not path.with_suffix(".partial").exists()
