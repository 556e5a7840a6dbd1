"""Standard test protocols over :func:`itrkit.eval.retrieval.evaluate_retrieval` (docs/method.md §4.3).

- ``full``: every image and caption given.
- ``coco5k``: the same, checked to be 5,000 images (Karpathy's COCO 5K test split).
- ``coco1k``: the mean of every metric over 5 folds of 1,000 consecutive images and their
  captions (VSE++ / SCAN practice; ``eccv_caption`` defines its COCO 1K folds the same way:
  consecutive 5,000-caption slices of its 25,000 test captions, i.e. 1,000 images with their 5
  captions). Folds follow the package's image order when ``image_ids`` are the COCO 5K test
  images (so the folds are the published ones whatever the dataset order), else dataset order.
  Extra captions (Karpathy's split has 25,010) stay with their image.
- ``flickr30k-1k``: ``full``, checked to be 1,000 test images (Flickr30K and Flickr8K 1K tests).
- ``flickr8k-human``: ``full`` plus the Flickr8k human-judgment metrics of
  :func:`itrkit.eval.flickr8k_human.evaluate_flickr8k_human` (expert τ_c, CrowdFlower τ_b, graded
  mAP@R / R-Precision). Needs the images' file names, the official caption ids ``x.jpg#k`` and
  the folder of ``ExpertAnnotations.txt`` / ``CrowdFlowerAnnotations.txt``; annotation pairs
  outside the given images / captions are skipped (counted in ``f8k_skipped_pairs``), so a subset
  of the test split works, but only the whole official test split gives the protocol's numbers.

:func:`evaluate_dataset_protocol` takes a :class:`~itrkit.data.records.Dataset` and derives the
ids, names and (for ``flickr8k-human``, when not given) the annotation folder from it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from itrkit.errors import ConfigError, DataError
from itrkit.eval.retrieval import evaluate_retrieval

if TYPE_CHECKING:
    from itrkit.data.records import Dataset

PROTOCOLS = ("full", "coco5k", "coco1k", "flickr30k-1k", "flickr8k-human")
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
                      fold_order: str = "auto", image_names: Sequence[str] | None = None,
                      caption_ids: Sequence[str] | None = None,
                      annotations_dir: str | Path | None = None) -> dict[str, float]:
    """Metrics of :func:`evaluate_retrieval` under ``protocol``; ``coco1k`` adds ``folds``.

    ``flickr8k-human`` also needs ``caption_ids`` (``x.jpg#k``), ``annotations_dir`` and the image
    file names: ``image_names``, else ``image_ids`` with ``.jpg`` appended (Flickr8k image ids
    are the file stems).
    """
    if protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {protocol!r}; one of {', '.join(PROTOCOLS)}")
    n = len(img_emb)
    want = _SIZES.get(protocol)
    if want is not None and n != want:
        raise DataError(f"protocol {protocol} needs {want} test images, got {n}")
    if image_ids is not None and len(image_ids) != n:
        raise DataError(f"{len(image_ids)} image ids for {n} image embeddings")
    if protocol == "flickr8k-human":
        from itrkit.eval.flickr8k_human import evaluate_flickr8k_human

        if annotations_dir is None:
            raise ConfigError("protocol flickr8k-human needs the folder of ExpertAnnotations.txt and "
                              "CrowdFlowerAnnotations.txt")
        if caption_ids is None:
            raise DataError("protocol flickr8k-human needs the caption ids (x.jpg#k)")
        if image_names is None:
            if image_ids is None:
                raise DataError("protocol flickr8k-human needs the image file names (x.jpg)")
            image_names = [str(i) if str(i).endswith(".jpg") else f"{i}.jpg" for i in image_ids]
        out = dict(evaluate_retrieval(img_emb, txt_emb, txt2img, chunk_size))
        out.update(evaluate_flickr8k_human(img_emb, txt_emb, image_names, caption_ids, annotations_dir))
        return out
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


def flickr8k_names(ds: Dataset) -> tuple[list[str], list[str]]:
    """(image file names, caption ids ``name.jpg#k``) of a Flickr8k dataset, as the annotations
    write them. Caption ids ``stem#k`` (the ``captions.txt`` variant) are given the file name."""
    names, caps = [], []
    for r in ds.records:
        fname = Path(r.path).name
        names.append(fname)
        for c in r.captions:
            prefix, _, k = str(c.id).rpartition("#")
            if prefix not in (fname, r.id) or not k.isdigit():
                raise DataError(f"caption id {c.id!r} of image {r.id!r} is not '{fname}#k': the Flickr8k human "
                                "judgments need the official caption ids (prepare the data with --format flickr8k)")
            caps.append(f"{fname}#{k}")
    return names, caps


def flickr8k_human_metrics(img_emb: Any, txt_emb: Any, ds: Dataset,
                           annotations_dir: str | Path | None = None) -> dict[str, float]:
    """Only the Flickr8k human-judgment keys for the embeddings of ``ds`` (e.g. to add them to a
    run's test metrics); the annotation folder defaults to the one found beside the images."""
    from itrkit.eval.flickr8k_human import evaluate_flickr8k_human

    names, caps = flickr8k_names(ds)
    return evaluate_flickr8k_human(img_emb, txt_emb, names, caps, _annotations_dir(ds, annotations_dir))


def _annotations_dir(ds: Dataset, given: str | Path | None) -> Path:
    from itrkit.eval.flickr8k_human import CROWDFLOWER_FILE, EXPERT_FILE, find_annotations_dir

    if given is not None:
        return Path(given)
    found = find_annotations_dir(ds.image_paths)
    if found is None:
        where = Path(ds.image_paths[0]).parent if len(ds) else Path(".")
        raise DataError(f"no {EXPERT_FILE} and {CROWDFLOWER_FILE} found in {where}, its parent or "
                        f"{where.parent / 'Flickr8k_text'}; pass the annotations folder")
    return found


def evaluate_dataset_protocol(img_emb: Any, txt_emb: Any, ds: Dataset, protocol: str, chunk_size: int = 1024,
                              fold_order: str = "auto",
                              annotations_dir: str | Path | None = None) -> dict[str, float]:
    """:func:`evaluate_protocol` for the embeddings of ``ds`` (rows in dataset order).

    For ``flickr8k-human`` the annotation folder defaults to the one found beside the images
    (:func:`itrkit.eval.flickr8k_human.find_annotations_dir`).
    """
    if protocol != "flickr8k-human":
        return evaluate_protocol(img_emb, txt_emb, ds.txt2img, protocol, image_ids=ds.image_ids,
                                 chunk_size=chunk_size, fold_order=fold_order)
    names, caps = flickr8k_names(ds)
    return evaluate_protocol(img_emb, txt_emb, ds.txt2img, protocol, chunk_size=chunk_size, image_names=names,
                             caption_ids=caps, annotations_dir=_annotations_dir(ds, annotations_dir))
