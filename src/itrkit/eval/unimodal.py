"""Uni-modal image retrieval: Recall@K from embeddings + labels, and the benchmark list loaders.

CUSA (Table 2) reports image-retrieval R@1 on CUB, SOP, In-Shop and iNaturalist following
Unicom (An et al. 2023), i.e. the deep-metric-learning protocol: a query scores a hit at K if
any of its K nearest neighbours (cosine, ties by lower index) shares its label.

- CUB-200-2011, SOP, iNaturalist: leave-one-out inside the test set (:func:`recall_at_k_loo`).
- In-Shop: query images against gallery images (:func:`recall_at_k_query_gallery`).
- Multi-label sets (COCO object labels, :func:`coco_object_labels`): pass sets of labels; a hit is
  a retrieved image sharing at least one label with the query. Queries with no label cannot hit
  and are left out of the mean.

Loaders return :class:`LabelledImage` ``(path, label, split)`` tuples. Formats:

- CUB: ``images.txt`` (``<id> <relative path>`` under ``images/``), ``image_class_labels.txt``
  (``<id> <class>``), ``train_test_split.txt`` (``<id> <1 = train | 0 = test>``).
  ``split_mode="classes"`` (default, the metric-learning split Unicom and CUSA use): classes
  1–100 train, 101–200 test; ``"official"``: ``train_test_split.txt``.
- SOP: ``Ebay_test.txt`` / ``Ebay_train.txt`` with header ``image_id class_id super_class_id path``.
- In-Shop: ``list_eval_partition.txt``: a count line, the header ``image_name item_id
  evaluation_status``, then ``<path> <item id> <train|query|gallery>``.
- iNaturalist: a list file as the metric-learning split files (Brown et al. 2020,
  ``Inaturalist_test_set1.txt``): one image per line, ``<path>`` (label = the name of the
  image's parent folder, the species id in ``train_val2018/<kingdom>/<id>/<file>.jpg``) or
  ``<path> <label>``; paths relative to ``root``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from itrkit.errors import DataError
from itrkit.eval.retrieval import topk


class LabelledImage(NamedTuple):
    path: Path
    label: str
    split: str


# --------------------------------------------------------------------------------------------
# Recall@K
# --------------------------------------------------------------------------------------------
def _is_multilabel(labels: Sequence[Any]) -> bool:
    return len(labels) > 0 and isinstance(labels[0], (set, frozenset, list, tuple))


def _hits(retrieved: np.ndarray, q_labels: Sequence[Any], g_labels: Sequence[Any],
          ks: Sequence[int]) -> dict[str, float]:
    """R@K ×100 from (Q, ≥ max K) retrieved gallery indices."""
    if _is_multilabel(q_labels) != _is_multilabel(g_labels):
        raise DataError("query and gallery labels must both be single labels or both label sets")
    if _is_multilabel(q_labels):
        qs = [frozenset(x) for x in q_labels]
        gs = [frozenset(x) for x in g_labels]
        keep = [i for i, s in enumerate(qs) if s]
        if not keep:
            raise DataError("no query has a label")
        match = np.array([[bool(qs[i] & gs[j]) for j in retrieved[i]] for i in keep], dtype=bool)
    else:
        _, codes = np.unique(np.array([str(x) for x in list(q_labels) + list(g_labels)]), return_inverse=True)
        qc, gc = codes[:len(q_labels)], codes[len(q_labels):]
        match = gc[retrieved] == qc[:, None]
    return {f"R@{k}": float(100.0 * match[:, :k].any(1).mean()) for k in ks}


def _check_ks(ks: Sequence[int], gallery: int) -> list[int]:
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks must be positive integers, got {ks}")
    if ks[-1] > gallery:
        raise DataError(f"R@{ks[-1]} needs at least {ks[-1]} candidates per query, the gallery has {gallery}")
    return ks


def recall_at_k_loo(emb: Any, labels: Sequence[Any], ks: Sequence[int] = (1,),
                    chunk_size: int = 1024) -> dict[str, float]:
    """Leave-one-out R@K (×100) inside one labelled set (CUB, SOP, iNaturalist protocol).

    Each image queries all the others; a hit if one of its K nearest shares its label.
    """
    n = len(emb)
    if len(labels) != n:
        raise DataError(f"{len(labels)} labels for {n} embeddings")
    ks = _check_ks(ks, n - 1)
    _, idx = topk(emb, emb, ks[-1] + 1, chunk_size)
    # Drop the query itself wherever it landed (with duplicates it may sit below index 0, or
    # below the cut: then the first K are all others).
    is_self = idx == np.arange(n)[:, None]
    idx = np.take_along_axis(idx, np.argsort(is_self, axis=1, kind="stable"), 1)[:, :ks[-1]]
    return _hits(idx, labels, labels, ks)


def recall_at_k_query_gallery(q_emb: Any, q_labels: Sequence[Any], g_emb: Any, g_labels: Sequence[Any],
                              ks: Sequence[int] = (1,), chunk_size: int = 1024) -> dict[str, float]:
    """Query-vs-gallery R@K (×100), the In-Shop protocol."""
    if len(q_labels) != len(q_emb) or len(g_labels) != len(g_emb):
        raise DataError(f"labels ({len(q_labels)} query, {len(g_labels)} gallery) do not match embeddings "
                        f"({len(q_emb)} query, {len(g_emb)} gallery)")
    ks = _check_ks(ks, len(g_emb))
    _, idx = topk(q_emb, g_emb, ks[-1], chunk_size)
    return _hits(idx, q_labels, g_labels, ks)


def evaluate_labelled(items: Sequence[LabelledImage], emb: Any, ks: Sequence[int] = (1,)) -> dict[str, float]:
    """R@K for loaded items and their embeddings (same order): query/gallery if the items carry
    those splits (In-Shop), else leave-one-out over all of them."""
    if len(items) != len(emb):
        raise DataError(f"{len(items)} images but {len(emb)} embeddings")
    splits = np.array([it.split for it in items])
    labels = [it.label for it in items]
    if {"query", "gallery"} <= set(splits.tolist()):
        q, g = np.flatnonzero(splits == "query"), np.flatnonzero(splits == "gallery")
        e = np.asarray(emb)
        return recall_at_k_query_gallery(e[q], [labels[i] for i in q], e[g], [labels[i] for i in g], ks)
    return recall_at_k_loo(emb, labels, ks)


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------
def _rows(path: Path, skip: int = 0) -> Iterator[tuple[int, list[str]]]:
    """(1-based line number, whitespace fields) of the non-empty lines after ``skip`` lines."""
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8 text") from None
    for no, line in enumerate(text.splitlines(), 1):
        if no > skip and line.strip():
            yield no, line.split()


def _id_table(path: Path, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for no, f in _rows(path):
        if len(f) != 2:
            raise DataError(f"{path}:{no}: expected '<image id> <{what}>', got {len(f)} fields")
        if f[0] in out:
            raise DataError(f"{path}:{no}: duplicate image id {f[0]}")
        out[f[0]] = f[1]
    return out


def _want(split: str | None, allowed: Sequence[str]) -> None:
    if split is not None and split not in allowed:
        raise DataError(f"unknown split {split!r}; one of {', '.join(allowed)}")


def load_cub(root: str | Path, split: str | None = "test", split_mode: str = "classes") -> list[LabelledImage]:
    """CUB-200-2011 images with their class (see the module docstring for the two split modes)."""
    root = Path(root)
    _want(split, ("train", "test"))
    if split_mode not in ("classes", "official"):
        raise DataError(f"unknown CUB split mode {split_mode!r} (classes, official)")
    files = _id_table(root / "images.txt", "relative path")
    labels = _id_table(root / "image_class_labels.txt", "class id")
    official = _id_table(root / "train_test_split.txt", "1|0") if split_mode == "official" else {}
    out = []
    for image_id, rel in files.items():
        if image_id not in labels:
            raise DataError(f"{root / 'image_class_labels.txt'}: no class for image id {image_id}")
        label = labels[image_id]
        if split_mode == "classes":
            if not label.isdigit():
                raise DataError(f"{root / 'image_class_labels.txt'}: class of image {image_id} is not a number: {label!r}")
            s = "train" if int(label) <= 100 else "test"
        else:
            flag = official.get(image_id)
            if flag not in ("0", "1"):
                raise DataError(f"{root / 'train_test_split.txt'}: image id {image_id} needs 1 (train) or 0 (test), "
                                f"got {flag!r}")
            s = "train" if flag == "1" else "test"
        if split is None or s == split:
            out.append(LabelledImage(root / "images" / rel, label, s))
    return out


def load_sop(root: str | Path, split: str = "test") -> list[LabelledImage]:
    """Stanford Online Products from ``Ebay_<split>.txt`` (label = ``class_id``)."""
    root = Path(root)
    _want(split, ("train", "test"))
    path = root / f"Ebay_{split}.txt"
    rows = _rows(path)
    first = next(rows, None)
    if first is None or [x.lower() for x in first[1]] != ["image_id", "class_id", "super_class_id", "path"]:
        raise DataError(f"{path}:1: expected the header 'image_id class_id super_class_id path'")
    out = []
    for no, f in rows:
        if len(f) != 4 or not f[1].isdigit():
            raise DataError(f"{path}:{no}: expected '<image_id> <class_id> <super_class_id> <path>'")
        out.append(LabelledImage(root / f[3], f[1], split))
    return out


def load_inshop(root: str | Path, split: str | None = None) -> list[LabelledImage]:
    """In-Shop Clothes from ``list_eval_partition.txt`` (label = item id; splits train/query/gallery)."""
    root = Path(root)
    _want(split, ("train", "query", "gallery"))
    path = root / "list_eval_partition.txt"
    rows = list(_rows(path))
    if len(rows) < 2 or len(rows[0][1]) != 1 or not rows[0][1][0].isdigit():
        raise DataError(f"{path}:1: expected the number of images")
    if [x.lower() for x in rows[1][1]] != ["image_name", "item_id", "evaluation_status"]:
        raise DataError(f"{path}:{rows[1][0]}: expected the header 'image_name item_id evaluation_status'")
    if int(rows[0][1][0]) != len(rows) - 2:
        raise DataError(f"{path}:1: announces {rows[0][1][0]} images but lists {len(rows) - 2}")
    out = []
    for no, f in rows[2:]:
        if len(f) != 3 or f[2] not in ("train", "query", "gallery"):
            raise DataError(f"{path}:{no}: expected '<image_name> <item_id> <train|query|gallery>'")
        if split is None or f[2] == split:
            out.append(LabelledImage(root / f[0], f[1], f[2]))
    return out


def load_inat(list_file: str | Path, root: str | Path | None = None, split: str = "test") -> list[LabelledImage]:
    """iNaturalist metric-learning split list (``<path>`` or ``<path> <label>`` per line)."""
    list_file = Path(list_file)
    base = Path(root) if root is not None else list_file.parent
    out = []
    for no, f in _rows(list_file):
        if len(f) == 1:
            parent = Path(f[0]).parent.name
            if not parent:
                raise DataError(f"{list_file}:{no}: '{f[0]}' has no parent folder to take the label from; "
                                f"write '<path> <label>'")
            out.append(LabelledImage(base / f[0], parent, split))
        elif len(f) == 2:
            out.append(LabelledImage(base / f[0], f[1], split))
        else:
            raise DataError(f"{list_file}:{no}: expected '<path>' or '<path> <label>', got {len(f)} fields")
    return out


def coco_object_labels(instances_json: str | Path) -> dict[str, set[str]]:
    """COCO ``instances_*.json`` → {image id (str, as in itrkit datasets): set of category names}."""
    path = Path(instances_json)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        cats = {int(c["id"]): str(c["name"]) for c in data["categories"]}
        out: dict[str, set[str]] = {str(im["id"]): set() for im in data["images"]}
        anns = data["annotations"]
    except (ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path}: not a COCO instances file ({e.__class__.__name__}: {e})") from None
    for i, a in enumerate(anns):
        try:
            image, cat = str(a["image_id"]), int(a["category_id"])
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{path}: annotations[{i}] needs 'image_id' and 'category_id'") from None
        if cat not in cats:
            raise DataError(f"{path}: annotations[{i}] has unknown category_id {cat}")
        if image not in out:
            raise DataError(f"{path}: annotations[{i}] refers to unknown image_id {image}")
        out[image].add(cats[cat])
    return out


LOADERS = {"cub": load_cub, "sop": load_sop, "inshop": load_inshop, "inat": load_inat}
