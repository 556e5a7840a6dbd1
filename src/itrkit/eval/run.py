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
    from itrkit.models.embed import embed_dataset as _embed

    return _embed(model, ds, cache_dir)


UNIMODAL_FORMATS = ("coco", "cub", "sop", "inshop", "inat")


def trained_usa(run: str | Path) -> bool:
    """Whether the run trained its USA heads (a model may carry untrained ones: same architecture as CUSA)."""
    cfg = Path(run) / "config.yaml"
    if not cfg.is_file():
        return False
    data = yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}
    usa = float((data.get("loss") or {}).get("usa", 0) or 0)
    return usa > 0 or any(float((s.get("loss") or {}).get("usa", usa) or 0) > 0 for s in data.get("stages") or [])


def unimodal_metrics(model: Any, spec: str, ds: Dataset, emb: dict[str, np.ndarray],
                     use_usa: bool = True) -> dict[str, float]:
    """Uni-modal image retrieval R@1/R@5 (×100) from the USA head (when ``use_usa`` and the model has
    one), else the cross head. ``spec`` is ``FORMAT:PATH``:

    - ``coco:instances.json``: leave-one-out over the evaluated split's images, a hit when the
      retrieved image shares an object category (COCO object labels; the images must be COCO ids);
    - ``cub:ROOT``, ``sop:ROOT``, ``inshop:ROOT``, ``inat:LIST``: that benchmark's test images
      (In-Shop: query vs gallery), embedded here.
    """
    from itrkit.eval.unimodal import (
        coco_object_labels,
        evaluate_labelled,
        load_cub,
        load_inat,
        load_inshop,
        load_sop,
        recall_at_k_loo,
    )

    fmt, sep, path = spec.partition(":")
    if not sep or fmt not in UNIMODAL_FORMATS or not path:
        raise ConfigError(f"--unimodal {spec!r}: expected FORMAT:PATH with FORMAT one of {', '.join(UNIMODAL_FORMATS)}")
    usa = use_usa and "image_uni" in emb
    head = "image_uni" if usa else "image_embeds"
    prefix = "uni_usa" if head == "image_uni" else "uni_cross"
    if fmt == "coco":
        labels = coco_object_labels(path)
        missing = [i for i in ds.image_ids if i not in labels]
        if missing:
            raise DataError(f"{path}: no object labels for image id {missing[0]} ({len(missing)} of {len(ds)} images)")
        keep = [k for k, i in enumerate(ds.image_ids) if labels[i]]  # images with no object cannot be judged
        res = recall_at_k_loo(emb[head][keep], [labels[ds.image_ids[k]] for k in keep], ks=(1, 5))
    else:
        items = {"cub": load_cub, "sop": load_sop, "inshop": load_inshop, "inat": load_inat}[fmt](path)
        if not items:
            raise DataError(f"{path}: no images for the {fmt} protocol")
        encode = model.encode_images_uni if usa else model.encode_images
        res = evaluate_labelled(items, encode([str(it.path) for it in items]), ks=(1, 5))
    return {f"{prefix}_{fmt}_{k}": v for k, v in res.items()}


def evaluate_run(run: str | Path, data: str | None = None, split: str = "test", protocol: str = "full",
                 eccv: bool = False, sts_root: str | None = None, cache_dir: str | None = None,
                 max_images: int = 0, unimodal: str | None = None,
                 annotations_dir: str | None = None, device: str | Any = "auto") -> dict[str, float]:
    """Metrics of a run's selected model on a split; embeddings computed on ``device`` (auto: CUDA,
    else MPS, else CPU), metrics on the CPU."""
    from itrkit.eval.protocols import evaluate_dataset_protocol
    from itrkit.models.io import load_model
    from itrkit.utils.device import resolve_device

    device = resolve_device(device)  # a bad device is one line before any work
    model = load_model(run).to(device)
    ds = Dataset.load(data or run_dataset_path(run)).split(split).subset(max_images or None)
    emb = embed_dataset(model, ds, cache_dir)
    metrics = dict(evaluate_dataset_protocol(emb["image_embeds"], emb["text_embeds"], ds, protocol,
                                             annotations_dir=annotations_dir))
    if eccv:
        from itrkit.eval.eccv import evaluate_eccv

        try:
            img_ids = [int(i) for i in ds.image_ids]
            cap_ids = [int(c) for c in ds.caption_ids]
        except ValueError:
            raise DataError("ECCV Caption needs numeric COCO image and caption ids (prepare COCO data with --format coco or karpathy)") from None
        metrics.update(evaluate_eccv(emb["image_embeds"], emb["text_embeds"], img_ids, cap_ids))
    if unimodal:
        metrics.update(unimodal_metrics(model, unimodal, ds, emb, use_usa=trained_usa(run)))
    if sts_root:
        from itrkit.eval.sts import evaluate_sts

        encode = model.encode_texts_uni if model.has_usa and trained_usa(run) else model.encode_texts
        metrics.update(evaluate_sts(encode, sts_root))
    return metrics
