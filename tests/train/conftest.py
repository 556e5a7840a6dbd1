from __future__ import annotations

from pathlib import Path

import pytest

from itrkit.config import load_config
from itrkit.train.config import TrainConfig


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from itrkit.data.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("synth")
    make_synthetic(out, n_images=60, captions_per_image=3, seed=1, size=64)
    return out


def tiny_config(out: Path, data: Path, *extra: str) -> TrainConfig:
    base = [
        f"out={out}", f"data.path={data}", "model.image_tower=tiny-image", "model.text_tower=tiny-text",
        "model.embed_dim=32", "batch_size=16", "stages.0.epochs=3", "stages.0.lr=0.01", "log_every=1",
    ]
    return load_config(TrainConfig, None, overrides=base + list(extra))


@pytest.fixture(scope="session")
def teacher_stores(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """Teacher stores for the synthetic set, written by tiny random towers (a real teacher run)."""
    from itrkit.data.records import Dataset
    from itrkit.teachers.extract import teach

    out = tmp_path_factory.mktemp("teachers")
    paths = teach(Dataset.load(synth_dir), "tiny-image", "tiny-text", out)
    return [f"teacher.image_store={paths['image']}", f"teacher.text_store={paths['text']}"]
