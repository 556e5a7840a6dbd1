"""Embeddings of a whole dataset split by a dual encoder (every head), for training's validation,
``itrkit eval`` and indexes alike: from cached tower features when the model trains on them
(content-keyed cache, reused by every run; for ``top:N`` towers the cached frozen prefix + the
live top blocks), else through the live towers."""

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


def cached_side(model: Any, side: str, items: list[Any], cache_dir: str | Path | None) -> Any:
    """What training and evaluation read for one side when ``model.cached_features``: the pooled
    features of a frozen tower (a float32 tensor), or the frozen prefix of a ``top:N`` tower
    (:class:`itrkit.models.prefix.PrefixStates`, read per batch)."""
    from itrkit.models.features import cached_features
    from itrkit.models.prefix import cached_prefix

    tower = model.image_tower if side == "image" else model.text_tower
    cut = model.prefix_cut(side)
    if cut is not None:
        return cached_prefix(tower, cut, items, items, cache_dir, dtype=model.config.prefix_dtype,
                             batch_size=64 if side == "image" else 128)
    return torch.from_numpy(np.asarray(cached_features(tower, items, items, cache_dir=cache_dir, kind=side), np.float32))


def side_features(model: Any, source: Any, side: str) -> torch.Tensor:
    """Pooled features from :func:`cached_side`'s result (the top blocks run over a prefix)."""
    return source if isinstance(source, torch.Tensor) else model.features_from_prefix(side, source)


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
        img = side_features(model, cached_side(model, "image", image_keys(ds), cache_dir), "image")
        txt = side_features(model, cached_side(model, "text", ds.texts, cache_dir), "text")
        return model.embed_features(img, txt)
    return embed_live(model, image_keys(ds), ds.texts)
