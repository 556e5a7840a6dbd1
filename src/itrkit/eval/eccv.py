"""ECCV Caption and CxC metrics on the COCO 5K test set (docs/method.md §4.4).

ECCV Caption (Chun et al., ECCV 2022) re-annotates COCO 5K with machine-proposed, human-verified
positives: 1,261 image queries and 1,332 caption queries with many positives each. CxC (Parekh
et al., EACL 2021) adds human similarity judgements for all 5K images and ~25K captions. The
positives and the 25,000 test caption ids ship in the ``eccv-caption`` PyPI package; we read its
JSON/NPY data files directly (its metric code needs nothing from us).

Metrics, exactly as ``eccv_caption`` computes them from ranked lists (per query, then averaged):
with ``R`` = the number of the query's positives (all listed, even if absent from the gallery)
and ``rel(r)`` = 1 if the r-th retrieved item is a positive,

- ``mAP@R = (1/R) Σ_{r=1..R} rel(r) · P(r)``, ``P(r) = (1/r) Σ_{i≤r} rel(i)`` (Musgrave et al. 2020);
- ``R-Precision = P(R)``; ``R@1 = rel(1)``; CxC ``R@K`` = 1 if any of the top K is a positive.

All reported ×100. Rankings come from exact chunked top-k (ties: lower gallery index first).
"""

from __future__ import annotations

import functools
import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from itrkit.errors import DataError
from itrkit.eval.retrieval import l2_normalize, topk

COCO5K_IMAGES = 5000
COCO5K_CAPTIONS = 25000
CXC_KS = (1, 5, 10)


@functools.lru_cache(maxsize=1)
def package_data_dir() -> Path:
    """The ``data/`` folder of the installed ``eccv_caption`` package (not imported: it warns)."""
    spec = importlib.util.find_spec("eccv_caption")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("ECCV Caption metrics need the eccv-caption package (pip install eccv-caption==0.1.0): "
                        "its data files hold the verified positives")
    d = Path(list(spec.submodule_search_locations)[0]) / "data"
    if not d.is_dir():
        raise DataError(f"eccv-caption is installed but has no data folder at {d}")
    return d


@functools.cache
def load_positives(kind: str) -> tuple[dict[int, tuple[int, ...]], dict[int, tuple[int, ...]]]:
    """(image id → positive caption ids, caption id → positive image ids) for ``original``, ``cxc`` or ``eccv``."""
    if kind not in ("original", "cxc", "eccv"):
        raise ValueError(f"unknown positive set {kind!r} (original, cxc, eccv)")
    out = []
    for name in (f"{kind}_image_to_caption.json", f"{kind}_caption_to_image.json"):
        path = package_data_dir() / name
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
            out.append({int(k): tuple(int(x) for x in v) for k, v in raw.items()})
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise DataError(f"{path}: unreadable ECCV Caption positives ({e.__class__.__name__})") from None
    return out[0], out[1]


@functools.lru_cache(maxsize=1)
def coco5k_caption_ids() -> np.ndarray:
    """The 25,000 COCO 5K test caption ids in the package's (VSE++ / Karpathy) order."""
    path = package_data_dir() / "coco_test_ids.npy"
    try:
        ids = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DataError(f"{path}: unreadable COCO test ids ({e.__class__.__name__})") from None
    return ids.astype(np.int64)


@functools.lru_cache(maxsize=1)
def coco5k_image_ids() -> np.ndarray:
    """The 5,000 COCO 5K test image ids, ordered by their captions' order in :func:`coco5k_caption_ids`.

    This is the order whose consecutive thousands are the COCO 1K folds of ``eccv_caption``.
    """
    _, cap2img = load_positives("original")
    seen: dict[int, None] = {}
    for c in coco5k_caption_ids().tolist():
        seen.setdefault(cap2img[c][0], None)
    return np.array(list(seen), dtype=np.int64)


def _as_coco_ids(ids: Sequence[Any], what: str, n: int) -> np.ndarray:
    if len(ids) != n:
        raise DataError(f"{len(ids)} COCO {what} ids for {n} {what} embeddings")
    try:
        out = np.array([int(x) for x in ids], dtype=np.int64)
    except (TypeError, ValueError):
        bad = next(x for x in ids if not str(x).strip().lstrip("-").isdigit())
        raise DataError(f"ECCV Caption needs numeric COCO {what} ids; {what} id {bad!r} is not one") from None
    uniq, counts = np.unique(out, return_counts=True)
    if len(uniq) != len(out):
        raise DataError(f"duplicate COCO {what} id {int(uniq[counts > 1][0])}")
    return out


def eccv_subset_ids(coco_image_ids: Sequence[Any], coco_caption_ids: Sequence[Any]) -> dict[str, np.ndarray]:
    """Positions (into the given id lists) of the items the COCO 5K / ECCV Caption protocols know.

    Keys: ``images_in_5k``, ``captions_in_5k`` (the 25,000 test captions), ``i2t_queries`` and
    ``t2i_queries`` (ECCV Caption query images / captions).
    """
    img = _as_coco_ids(coco_image_ids, "image", len(coco_image_ids))
    cap = _as_coco_ids(coco_caption_ids, "caption", len(coco_caption_ids))
    orig_i2t, _ = load_positives("original")
    eccv_i2t, eccv_t2i = load_positives("eccv")
    return {
        "images_in_5k": np.flatnonzero(np.isin(img, np.fromiter(orig_i2t, np.int64))),
        "captions_in_5k": np.flatnonzero(np.isin(cap, coco5k_caption_ids())),
        "i2t_queries": np.flatnonzero(np.isin(img, np.fromiter(eccv_i2t, np.int64))),
        "t2i_queries": np.flatnonzero(np.isin(cap, np.fromiter(eccv_t2i, np.int64))),
    }


def _relevance(q_pos: np.ndarray, retrieved: np.ndarray, gallery_ids: np.ndarray,
               query_ids: np.ndarray, positives: dict[int, tuple[int, ...]]) -> np.ndarray:
    """rel[i, r] = whether the r-th retrieved item of query ``q_pos[i]`` is one of its positives."""
    span = int(max(gallery_ids.max(), max((max(v) for v in positives.values() if v), default=0))) + 1
    pos_keys = np.fromiter((i * span + p for i, q in enumerate(q_pos) for p in positives[int(query_ids[q])]),
                           dtype=np.int64)
    got_keys = np.arange(len(q_pos), dtype=np.int64)[:, None] * span + gallery_ids[retrieved]
    return np.isin(got_keys, pos_keys)


def _eccv_scores(rel: np.ndarray, n_pos: np.ndarray) -> tuple[float, float, float]:
    """(mAP@R, R-Precision, R@1), means over queries, as eccv_caption._metrics.compute_eccv_metrics."""
    k = rel.shape[1]
    r = np.arange(1, k + 1)
    hits = np.cumsum(rel, axis=1)
    prec = hits / r  # P(r): the top r are r distinct gallery items
    within = r[None, :] <= n_pos[:, None]
    ap = (prec * rel * within).sum(1) / n_pos
    rp = hits[np.arange(len(rel)), np.minimum(n_pos, k) - 1] / n_pos
    return float(ap.mean()), float(rp.mean()), float(rel[:, 0].mean())


def evaluate_eccv(img_emb: Any, txt_emb: Any, coco_image_ids: Sequence[Any], coco_caption_ids: Sequence[Any],
                  chunk_size: int = 512, strict: bool = True) -> dict[str, float]:
    """ECCV Caption mAP@R, R-Precision, R@1 and CxC R@1/5/10, both directions, ×100.

    ``coco_image_ids[i]`` names ``img_emb[i]``, ``coco_caption_ids[m]`` names ``txt_emb[m]`` (COCO
    ids). The gallery is everything given. With ``strict`` (default) the given ids must cover the
    whole COCO 5K test set (5,000 images, the package's 25,000 captions; extra captions such as
    the ten beyond 25,000 in Karpathy's split widen the gallery), so the numbers are the
    published protocol's. ``strict=False`` scores whichever ECCV / CxC queries are present
    (positives absent from the gallery still count in R, as in ``eccv_caption``).
    """
    img, txt = l2_normalize(img_emb), l2_normalize(txt_emb)
    img_ids = _as_coco_ids(coco_image_ids, "image", len(img))
    cap_ids = _as_coco_ids(coco_caption_ids, "caption", len(txt))
    if strict:
        missing_img = np.setdiff1d(coco5k_image_ids(), img_ids)
        missing_cap = np.setdiff1d(coco5k_caption_ids(), cap_ids)
        if len(missing_img) or len(missing_cap):
            raise DataError(f"ECCV Caption is defined on COCO 5K: {len(missing_img)} of its {COCO5K_IMAGES} images and "
                            f"{len(missing_cap)} of its {COCO5K_CAPTIONS} captions are missing (e.g. "
                            f"{'image' if len(missing_img) else 'caption'} "
                            f"{int((missing_img if len(missing_img) else missing_cap)[0])}); pass strict=False for a subset")
    out: dict[str, float] = {}
    directions = (("i2t", img, img_ids, txt, cap_ids, 0), ("t2i", txt, cap_ids, img, img_ids, 1))
    for name, q_emb, q_ids, g_emb, g_ids, side in directions:
        eccv_pos = load_positives("eccv")[side]
        cxc_pos = load_positives("cxc")[side]
        e_q = np.flatnonzero(np.isin(q_ids, np.fromiter(eccv_pos, np.int64)))
        c_q = np.flatnonzero(np.isin(q_ids, np.fromiter(cxc_pos, np.int64)))
        what = "image" if name == "i2t" else "caption"
        if len(e_q) == 0 or len(c_q) == 0:
            raise DataError(f"none of the {len(q_ids)} {what} ids is an {'ECCV Caption' if len(e_q) == 0 else 'CxC'} "
                            f"{name} query")
        queries = np.union1d(e_q, c_q)
        n_pos = np.array([len(eccv_pos[int(q_ids[q])]) for q in e_q])
        k = min(max(max(CXC_KS), int(n_pos.max())), len(g_ids))
        _, retrieved = topk(q_emb[queries], g_emb, k, chunk_size, normalized=True)
        row = {int(q): i for i, q in enumerate(queries)}
        e_rows = retrieved[[row[int(q)] for q in e_q]]
        ap, rp, r1 = _eccv_scores(_relevance(e_q, e_rows, g_ids, q_ids, eccv_pos), n_pos)
        out[f"eccv_{name}_map@r"], out[f"eccv_{name}_rp"], out[f"eccv_{name}_r1"] = 100 * ap, 100 * rp, 100 * r1
        c_rows = retrieved[[row[int(q)] for q in c_q]][:, :max(CXC_KS)]
        rel = _relevance(c_q, c_rows, g_ids, q_ids, cxc_pos)
        for kk in CXC_KS:
            out[f"cxc_{name}_R@{kk}"] = float(100.0 * rel[:, :kk].any(1).mean())
    order = ["eccv_i2t_map@r", "eccv_t2i_map@r", "eccv_i2t_rp", "eccv_t2i_rp", "eccv_i2t_r1", "eccv_t2i_r1"]
    order += [f"cxc_{d}_R@{kk}" for d in ("i2t", "t2i") for kk in CXC_KS]
    return {key: out[key] for key in order}
