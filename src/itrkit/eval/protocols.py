"""Standard test protocols over :func:`itrkit.eval.retrieval.evaluate_retrieval` (SPEC §4).

- ``full``: every image and caption given.
- ``coco5k``: the same, checked to be 5,000 images (Karpathy's COCO 5K test split).
- ``coco1k``: the mean of every metric over 5 folds of 1,000 consecutive images and their
  captions (VSE++ / SCAN practice; ``eccv_caption`` defines its COCO 1K folds the same way:
  consecutive 5,000-caption slices of its 25,000 test captions, i.e. 1,000 images with their 5
  captions). Folds follow the package's image order when ``image_ids`` are the COCO 5K test
  images (so the folds are the published ones whatever the dataset order), else dataset order.
  Extra captions (Karpathy's split has 25,010) stay with their image.
- ``flickr30k-1k``: ``full``, checked to be 1,000 test images (Flickr30K and Flickr8K 1K tests).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from itrkit.errors import ConfigError, DataError
from itrkit.eval.retrieval import evaluate_retrieval

PROTOCOLS = ("full", "coco5k", "coco1k", "flickr30k-1k")
FOLD_ORDERS = ("auto", "coco5k", "dataset")
_SIZES = {"coco5k": 5000, "coco1k": 5000, "flickr30k-1k": 1000}


def coco1k_fold_order(image_ids: Sequence[Any] | None, fold_order: str = "auto") -> np.ndarray | None:
    """Positions of the images in COCO 1K fold order, or None for dataset order.

    ``coco5k`` demands that ``image_ids`` are the 5,000 COCO 5K test images (and eccv-caption,
    which ships their order); ``auto`` uses that order when it applies and dataset order otherwise.
    """
    if fold_order not in FOLD_ORDERS:
        raise ConfigError(f"unknown fold order {fold_order!r}; one of {', '.join(FOLD_ORDERS)}")
    if fold_order == "dataset" or (image_ids is None and fold_order == "auto"):
        return None
    if image_ids is None:
        raise DataError("fold_order='coco5k' needs the COCO image ids")
    try:
        ids = np.array([int(i) for i in image_ids], dtype=np.int64)
    except (TypeError, ValueError):
        if fold_order == "auto":
            return None
        raise DataError("fold_order='coco5k' needs numeric COCO image ids") from None
    if fold_order == "auto":
        import importlib.util

        if importlib.util.find_spec("eccv_caption") is None:
            return None
    from itrkit.eval.eccv import coco5k_image_ids

    canon = coco5k_image_ids()
    if len(ids) != len(canon) or not np.array_equal(np.sort(ids), np.sort(canon)):
        if fold_order == "auto":
            return None
        raise DataError(f"fold_order='coco5k': the {len(ids)} image ids are not the COCO 5K test images")
    pos = {int(i): n for n, i in enumerate(ids)}
    return np.array([pos[int(i)] for i in canon])


def evaluate_protocol(img_emb: Any, txt_emb: Any, txt2img: Any, protocol: str,
                      image_ids: Sequence[Any] | None = None, chunk_size: int = 1024,
                      fold_order: str = "auto") -> dict[str, float]:
    """Metrics of :func:`evaluate_retrieval` under ``protocol``; ``coco1k`` adds ``folds``."""
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; one of {', '.join(PROTOCOLS)}")
    n = len(img_emb)
    want = _SIZES.get(protocol)
    if want is not None and n != want:
        raise DataError(f"protocol {protocol} needs {want} test images, got {n}")
    if image_ids is not None and len(image_ids) != n:
        raise DataError(f"{len(image_ids)} image ids for {n} image embeddings")
    if protocol != "coco1k":
        return evaluate_retrieval(img_emb, txt_emb, txt2img, chunk_size)
    img = np.asarray(img_emb.detach().cpu() if hasattr(img_emb, "detach") else img_emb)
    txt = np.asarray(txt_emb.detach().cpu() if hasattr(txt_emb, "detach") else txt_emb)
    t2i = np.asarray(txt2img).reshape(-1)
    if len(t2i) != len(txt):
        raise DataError(f"txt2img has {len(t2i)} entries for {len(txt)} captions")
    order = coco1k_fold_order(image_ids, fold_order)
    if order is None:
        order = np.arange(n)
    folds = []
    for f in range(5):
        imgs = order[f * 1000:(f + 1) * 1000]
        new_index = np.full(n, -1)
        new_index[imgs] = np.arange(len(imgs))
        caps = np.flatnonzero(new_index[t2i] >= 0)  # the fold's captions, in dataset order
        folds.append(evaluate_retrieval(img[imgs], txt[caps], new_index[t2i[caps]], chunk_size))
    out: dict[str, float] = {k: float(np.mean([m[k] for m in folds])) for k in folds[0]}
    out["folds"] = len(folds)
    return out
