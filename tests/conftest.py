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


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-matrix tests (two fight the other tests' processes
    for 2 cores): ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def tiny_rerank_split(root: Path, text: dict) -> dict:
    """A 12-image synthetic set with a pixel grid store, a tiny random ``ReRanker`` (``text``: its
    text-tower options) and its ``FusionSplit`` with a random first stage attached
    (``split.attach_itc``); returns ds, grid, model, split and the generator (for more draws)."""
    import torch
    import torch.nn.functional as F

    from itrkit.data.records import Dataset
    from itrkit.data.synthetic import make_synthetic
    from itrkit.eval.fusion import FusionSplit
    from itrkit.models.rerank import ReRanker
    from itrkit.teachers.grid import open_grid_store

    make_synthetic(root / "syn", n_images=12, captions_per_image=2, seed=3, size=32)
    ds = Dataset.load(root / "syn")
    grid = open_grid_store(pixel_grid_store(ds, root / "grid.store"))
    torch.manual_seed(0)
    model = ReRanker(region_dim=12, text_tower=text, embed_dim=8, width=8, heads=2, pair_batch=4).eval()
    split = FusionSplit(ds, grid, model.prepare_texts)
    g = torch.Generator().manual_seed(2)
    img = F.normalize(torch.randn(len(ds), 6, generator=g), dim=1)
    split.attach_itc(img, F.normalize(torch.randn(len(ds.texts), 6, generator=g) + img[ds.txt2img], dim=1))
    return {"ds": ds, "grid": grid, "model": model, "split": split, "generator": g}


def flickr8k_test_embeddings(folder: Path) -> dict:
    """The official Flickr8k test names and caption ids with seeded random embeddings (captions
    near their image's), for protocol tests on the real annotation files in ``folder``."""
    import numpy as np

    names = [line.strip() for line in (folder / "Flickr_8k.testImages.txt").read_text().splitlines() if line.strip()]
    caps = [f"{n}#{k}" for n in names for k in range(5)]
    rng = np.random.default_rng(0)
    img = rng.normal(size=(len(names), 24)).astype(np.float32)
    txt = (np.repeat(img, 5, axis=0) + 1.5 * rng.normal(size=(len(caps), 24))).astype(np.float32)
    return {"dir": folder, "names": names, "caps": caps, "img": img, "txt": txt}
