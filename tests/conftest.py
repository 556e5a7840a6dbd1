"""Shared test fixtures. Tests never touch the network: hubs are forced offline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ITRKIT_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` beside the repository; tests that need real data skip without it."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not available: {SHARED_DATA} is absent")
    return SHARED_DATA


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Feature caches of one test session are shared (real-model features are slow to compute),
    # but never the user's ~/.cache/itrkit.
    cache = tmp_path_factory.getbasetemp() / "itrkit-cache"
    monkeypatch.setenv("ITRKIT_CACHE", str(cache))


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from itrkit.data.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("synth")
    make_synthetic(out, n_images=60, captions_per_image=3, seed=1, size=64)
    return out


@pytest.fixture(scope="session")
def teacher_stores(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Teacher stores for the synthetic set, written by tiny random towers (a real teacher run)."""
    from itrkit.data.records import Dataset
    from itrkit.teachers.extract import teach

    out = tmp_path_factory.mktemp("teachers")
    paths = teach(Dataset.load(synth_dir), "tiny-image", "tiny-text", out)
    return [f"teacher.image_store={paths['image']}", f"teacher.text_store={paths['text']}"]


def pixel_grid_store(ds, path: Path) -> Path:
    """A real grid store made from the images themselves: 4×4 cells of 12-d (2×2 mean colours per
    cell), for fusion-matcher tests without a CNN."""
    import numpy as np
    from PIL import Image

    from itrkit.teachers.store import FeatureStore

    w = FeatureStore.create(path, ds.image_ids, 16 * 12, {"name": "pixels"}, "image", extra={"grid": [16, 12]})
    for i, r in enumerate(ds.records):
        a = np.asarray(Image.open(r.path).convert("RGB").resize((32, 32)), dtype=np.float32) / 255.0
        cells = a.reshape(4, 2, 4, 4, 2, 4, 3).mean(axis=(2, 5))  # (cell row, sub, cell col, sub, rgb)
        w.write(i, cells.transpose(0, 2, 1, 3, 4).reshape(1, -1))
    w.close()
    return path
