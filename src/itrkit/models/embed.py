"""Embeddings of a whole dataset split by a dual encoder (every head), for training's validation,
``itrkit eval`` and indexes alike: from cached tower features when the model trains on them
(content-keyed cache, reused by every run), else through the live towers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


def image_keys(ds: Any) -> list[str]:
    return [str(r.path) for r in ds.records]


def split_features(model: Any, ds: Any, cache_dir: str | Path | None) -> tuple[np.ndarray, np.ndarray]:
    """Tower features of every image and caption of ``ds`` (cached on disk, reused by every run)."""
    from itrkit.models.features import cached_features

    img = cached_features(model.image_tower, image_keys(ds), image_keys(ds), cache_dir=cache_dir, kind="image")
    txt = cached_features(model.text_tower, ds.texts, ds.texts, cache_dir=cache_dir, kind="text")
    return np.asarray(img, np.float32), np.asarray(txt, np.float32)


def embed_features(model: Any, image_features: torch.Tensor, text_features: torch.Tensor) -> dict[str, np.ndarray]:
    return model.embed_features(image_features, text_features)


def embed_live(model: Any, paths: list[str], texts: list[str]) -> dict[str, np.ndarray]:
    out = {"image_embeds": model.encode_images(paths), "text_embeds": model.encode_texts(texts)}
    if model.has_usa:
        out["image_uni"] = model.encode_images_uni(paths)
        out["text_uni"] = model.encode_texts_uni(texts)
    return out


def embed_dataset(model: Any, ds: Any, cache_dir: str | Path | None = None) -> dict[str, np.ndarray]:
    """L2-normalised embeddings of every head for ``ds`` (rows in dataset order)."""
    if model.config.cached_features:
        img, txt = split_features(model, ds, cache_dir)
        return model.embed_features(torch.from_numpy(img), torch.from_numpy(txt))
    return embed_live(model, image_keys(ds), ds.texts)
