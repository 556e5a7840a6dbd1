"""Evaluate a trained run folder on any split and protocol (the ``itrkit eval`` command)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import yaml

from itrkit.data.records import Dataset
from itrkit.errors import ConfigError, DataError


def run_dataset_path(run: str | Path) -> str:
    cfg = Path(run) / "config.yaml"
    if not cfg.is_file():
        raise ConfigError(f"{run}: no config.yaml; pass --data")
    path = (yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}).get("data", {}).get("path", "")
    if not path:
        raise ConfigError(f"{cfg}: data.path is empty; pass --data")
    return path


def embed_dataset(model: Any, ds: Dataset, cache_dir: str | None = None) -> dict[str, np.ndarray]:
    """Embeddings of every head for ``ds`` (cached tower features when the model trains on them)."""
    from itrkit.train.data import PairData, embed_split

    return embed_split(model, PairData(ds, model, model.config.cached_features, cache_dir))


def evaluate_run(run: str | Path, data: str | None = None, split: str = "test", protocol: str = "full",
                 eccv: bool = False, sts_root: str | None = None, cache_dir: str | None = None,
                 max_images: int = 0) -> dict[str, float]:
    from itrkit.eval.protocols import evaluate_protocol
    from itrkit.models.io import load_model

    model = load_model(run)
    ds = Dataset.load(data or run_dataset_path(run)).split(split).subset(max_images or None)
    emb = embed_dataset(model, ds, cache_dir)
    metrics = dict(evaluate_protocol(emb["image_embeds"], emb["text_embeds"], ds.txt2img, protocol,
                                     image_ids=ds.image_ids))
    if eccv:
        from itrkit.eval.eccv import evaluate_eccv

        try:
            img_ids = [int(i) for i in ds.image_ids]
            cap_ids = [int(c) for c in ds.caption_ids]
        except ValueError:
            raise DataError("ECCV Caption needs numeric COCO image and caption ids (prepare COCO data with --format coco or karpathy)") from None
        metrics.update(evaluate_eccv(emb["image_embeds"], emb["text_embeds"], img_ids, cap_ids))
    if sts_root:
        from itrkit.eval.sts import evaluate_sts

        encode = model.encode_texts_uni if model.has_usa else model.encode_texts
        metrics.update(evaluate_sts(encode, sts_root))
    return metrics
