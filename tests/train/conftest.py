from __future__ import annotations

from pathlib import Path

from itrkit.config import load_config
from itrkit.train.config import TrainConfig


def tiny_config(out: Path, data: Path, *extra: str) -> TrainConfig:
    base = [
        f"out={out}", f"data.path={data}", "model.image_tower=tiny-image", "model.text_tower=tiny-text",
        "model.embed_dim=32", "batch_size=16", "stages.0.epochs=3", "stages.0.lr=0.01", "log_every=1",
    ]
    return load_config(TrainConfig, None, overrides=base + list(extra))
