"""Flickr8k human judgments: agreement with people and graded (multi-positive) retrieval (docs/method.md §4.5).

Hodosh, Young & Hockenmaier (2013) released two sets of judgments on the official 1,000 test
images, each line ``image.jpg<TAB>caption.jpg#k<TAB>…``:

- ``ExpertAnnotations.txt``: 5,822 (image, caption) pairs, three expert scores on 1–4
  (1 = does not describe the image, 4 = describes it without errors);
- ``CrowdFlowerAnnotations.txt``: 47,830 pairs, percent-yes, #yes, #no (≥ 3 yes/no judgments).

Only pairs whose caption belongs to *another* image count for agreement (the 158 / 721 own-caption
pairs are left out, as in the caption-metric literature). A pair's model score is the cosine of
its image and caption embeddings (float64; :func:`evaluate_flickr8k_human`), or for models that
score pairs (fusion matchers, ensembles, re-rankers; :func:`evaluate_flickr8k_human_scores`) the
model's own score of the pair.

- ``f8k_expert_tau_c``: Kendall τ_c ×100 between model scores and expert scores over every
  individual judgment (each pair's three scores are three entries, the model score repeated:
  5,664 pairs → 16,992 entries on the full test split);
- ``f8k_cf_tau_b``: Kendall τ_b ×100 over every individual CrowdFlower judgment (yes = 1, no = 0;
  47,109 pairs → 142,685 judgments).

τ is computed from weighted (score, judgment, count) cells without expanding them; the result
is exactly scipy's ``kendalltau`` on the expanded entries (``tests/eval/test_flickr8k_human.py``).

Graded retrieval over the given images × captions (the official test split: 1,000 × 5,000). The
positives of an image are its own captions plus every caption judged for it with CrowdFlower
percent-yes ≥ 0.5 (``2·#yes ≥ #yes + #no``, the same on these files) or an expert mean ≥ 3 (sum of
the three scores ≥ 9); the positives of a caption are its own image plus every image for which it
was judged positive so. With ``R`` = the query's number of positives and ``rel(r)`` whether the
r-th retrieved item is one (ranking by descending cosine, or by the model's score matrix;
ties: lower gallery index first):

- mAP@R = (1/R) Σ_{r ≤ R} rel(r) · P(r), ``P(r)`` = share of positives in the top r;
- R-Precision = P(R); both averaged over queries, ×100 (keys ``f8k_human_{i2t,t2i}_{map@r,rp}``).

Subsets: annotation pairs whose image or caption is not among the given rows are skipped (their
number is the info key ``f8k_skipped_pairs``); ``R`` counts only positives among the rows, and a
query with no positive among the rows (a caption whose image is absent and that no one judged
for a present image) is not scored. Info keys beside the six metrics: ``f8k_expert_pairs`` and
``f8k_cf_pairs`` (cross-image pairs behind the two τ), ``f8k_skipped_pairs``.

Both entry points are thin layers over one implementation (``_human_metrics``), which takes the
pair scores and the score rows of each direction's queries as functions: the metric logic cannot
drift between dual encoders and score-matrix models.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from itrkit.errors import DataError

EXPERT_FILE = "ExpertAnnotations.txt"
CROWDFLOWER_FILE = "CrowdFlowerAnnotations.txt"
METRIC_KEYS = ("f8k_expert_tau_c", "f8k_cf_tau_b", "f8k_human_i2t_map@r", "f8k_human_t2i_map@r",
               "f8k_human_i2t_rp", "f8k_human_t2i_rp")
INFO_KEYS = ("f8k_expert_pairs", "f8k_cf_pairs", "f8k_skipped_pairs")
# The published zero-shot CLIP ViT-B/32 anchors (CLIP-S, Hessel et al. 2021; their pair sets may
# differ slightly from ours): a reference line, not a target.
PUBLISHED_CLIP_VIT_B32 = {"f8k_expert_tau_c": 51.2, "f8k_cf_tau_b": 34.4}


@dataclass(frozen=True)
class Judgments:
    """The two annotation files, one row per (image, caption) pair, in file order."""

    expert_images: list[str]
    expert_captions: list[str]
    expert_scores: np.ndarray  # (P, 3) int, each 1..4
    cf_images: list[str]
    cf_captions: list[str]
    cf_yes: np.ndarray  # (Q,) int
    cf_no: np.ndarray  # (Q,) int

    def expert_positive(self) -> np.ndarray:
        """Expert mean ≥ 3, in integers (sum of the three scores ≥ 9)."""
        return self.expert_scores.sum(1) >= 9

    def cf_positive(self) -> np.ndarray:
        """Percent-yes ≥ 0.5, in integers."""
        return 2 * self.cf_yes >= self.cf_yes + self.cf_no


def caption_image(caption_id: str) -> str:
    """The image a caption id ``name.jpg#k`` belongs to (``name.jpg``)."""
    return caption_id.rpartition("#")[0]


def _rows(path: Path, what: str) -> Iterable[tuple[str, list[str]]]:
    if not path.is_file():
        raise DataError(f"{path}: Flickr8k {what} annotation file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: unreadable Flickr8k {what} annotation file ({e.__class__.__name__})") from None
    n = 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield f"{path}:{n}", line.strip().split("\t")
    if n == 0:
        raise DataError(f"{path}: empty Flickr8k {what} annotation file")


def _pair(where: str, fields: list[str], expected: str) -> tuple[str, str]:
    if len(fields) != 5:
        raise DataError(f"{where}: malformed line, {len(fields)} tab-separated fields (expected {expected})")
    img, cap = fields[0].strip(), fields[1].strip()
    k = cap.rpartition("#")[2]
    if not img or not caption_image(cap) or not k.isdigit():
        raise DataError(f"{where}: malformed image / caption id {img!r} {cap!r} (expected 'name.jpg' 'name.jpg#k')")
    return img, cap


def load_expert(path: str | Path) -> tuple[list[str], list[str], np.ndarray]:
    """(images, caption ids, (P, 3) scores) of ``ExpertAnnotations.txt``."""
    p = Path(path)
    imgs, caps, scores = [], [], []
    seen: set[tuple[str, str]] = set()
    for where, f in _rows(p, "expert"):
        img, cap = _pair(where, f, "image, caption, 3 expert scores")
        try:
            s = [int(x) for x in f[2:]]
        except ValueError:
            s = []
        if len(s) != 3 or not all(1 <= v <= 4 for v in s):
            raise DataError(f"{where}: expert scores {' '.join(f[2:])!r} are not three integers in 1..4")
        if (img, cap) in seen:
            raise DataError(f"{where}: duplicate pair {img} {cap}")
        seen.add((img, cap))
        imgs.append(img)
        caps.append(cap)
        scores.append(s)
    return imgs, caps, np.array(scores, dtype=np.int64).reshape(-1, 3)


def load_crowdflower(path: str | Path) -> tuple[list[str], list[str], np.ndarray, np.ndarray]:
    """(images, caption ids, #yes, #no) of ``CrowdFlowerAnnotations.txt`` (percent-yes is checked)."""
    p = Path(path)
    imgs, caps, yes, no = [], [], [], []
    seen: set[tuple[str, str]] = set()
    for where, f in _rows(p, "CrowdFlower"):
        img, cap = _pair(where, f, "image, caption, percent-yes, #yes, #no")
        try:
            pct, y, n = float(f[2]), int(f[3]), int(f[4])
        except ValueError:
            raise DataError(f"{where}: percent-yes / #yes / #no {' '.join(f[2:])!r} are not numbers") from None
        if y < 0 or n < 0 or y + n == 0:
            raise DataError(f"{where}: #yes {y} / #no {n}: need non-negative counts, at least one judgment")
        if not abs(pct - y / (y + n)) <= 1e-3:  # also rejects nan
            raise DataError(f"{where}: percent-yes {f[2]} disagrees with #yes {y} / #no {n}")
        if (img, cap) in seen:
            raise DataError(f"{where}: duplicate pair {img} {cap}")
        seen.add((img, cap))
        imgs.append(img)
        caps.append(cap)
        yes.append(y)
        no.append(n)
    return imgs, caps, np.array(yes, dtype=np.int64), np.array(no, dtype=np.int64)


def load_judgments(annotations_dir: str | Path) -> Judgments:
    """Both annotation files of ``annotations_dir`` (a missing or malformed one: a one-line DataError)."""
    d = Path(annotations_dir)
    ei, ec, es = load_expert(d / EXPERT_FILE)
    ci, cc, cy, cn = load_crowdflower(d / CROWDFLOWER_FILE)
    return Judgments(ei, ec, es, ci, cc, cy, cn)


def find_annotations_dir(image_paths: Sequence[str | Path]) -> Path | None:
    """The folder holding both annotation files near the images, or None.

    Looks in the images' folder, its parent and the parent's ``Flickr8k_text/`` (the official
    release puts ``Flickr8k_text/`` beside ``Flicker8k_Dataset/``; a flattened copy may keep the files
    one level above its ``images/`` folder).
    """
    if not image_paths:
        return None
    folder = Path(image_paths[0]).parent
    for cand in (folder, folder.parent, folder.parent / "Flickr8k_text", folder / "Flickr8k_text"):
        if (cand / EXPERT_FILE).is_file() and (cand / CROWDFLOWER_FILE).is_file():
            return cand
    return None


# --------------------------------------------------------------------------------------------
# Kendall τ on weighted cells
# --------------------------------------------------------------------------------------------
def _tie_pairs(v: np.ndarray, w: np.ndarray) -> int:
    """Σ over groups of equal ``v`` of W(W-1)/2, W = the group's total weight."""
    _, inv = np.unique(v, return_inverse=True)
    W = np.zeros(inv.max() + 1, dtype=np.int64)
    np.add.at(W, inv.reshape(-1), w)
    return int((W * (W - 1) // 2).sum())


def kendall_tau_weighted(x: np.ndarray, y: np.ndarray, w: np.ndarray, variant: str) -> float:
    """Kendall τ (``variant`` 'b' or 'c', as ``scipy.stats.kendalltau``) of the entries obtained by
    repeating each (x[i], y[i]) ``w[i]`` times, without expanding them.

    ``y`` takes few distinct values (judgment grades): concordant minus discordant pairs are
    counted per pair of grades by a sorted search over ``x``, exactly, in integers.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y)
    w = np.asarray(w, dtype=np.int64)
    keep = w > 0
    x, y, w = x[keep], y[keep], w[keep]
    size = int(w.sum())
    tot = size * (size - 1) // 2
    xtie, ytie = _tie_pairs(x, w), _tie_pairs(y, w)
    if size < 2 or xtie == tot or ytie == tot:
        return float("nan")
    grades = np.unique(y)
    sorted_x, cum_w = [], []
    for g in grades:
        sel = y == g
        order = np.argsort(x[sel], kind="stable")
        sorted_x.append(x[sel][order])
        cum_w.append(np.concatenate([[0], np.cumsum(w[sel][order])]))
    con_minus_dis = 0
    for a in range(len(grades)):
        for b in range(a + 1, len(grades)):  # grade b > grade a: concordant when x_a < x_b
            xb, wb = sorted_x[b], cum_w[b][1:] - cum_w[b][:-1]
            below = cum_w[a][np.searchsorted(sorted_x[a], xb, side="left")]
            above = cum_w[a][-1] - cum_w[a][np.searchsorted(sorted_x[a], xb, side="right")]
            con_minus_dis += int((wb * (below - above)).sum())
    if variant == "b":
        tau = con_minus_dis / math.sqrt(tot - xtie) / math.sqrt(tot - ytie)
    elif variant == "c":
        classes = min(len(np.unique(x)), len(grades))
        tau = 2 * con_minus_dis / (size ** 2 * (classes - 1) / classes)
    else:
        raise ValueError(f"unknown Kendall tau variant {variant!r} ('b' or 'c')")
    return float(min(1.0, max(-1.0, tau)))


# --------------------------------------------------------------------------------------------
# Graded retrieval
# --------------------------------------------------------------------------------------------
# query rows (int64) -> their (len, gallery size) float64 scores; pairs -> their 1-D model scores
RowScores = Callable[[np.ndarray], np.ndarray]
PairScores = Callable[[np.ndarray, np.ndarray], Any]


def _as_unit64(x: Any, what: str) -> np.ndarray:
    a = x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    a = np.asarray(a, dtype=np.float64)
    if a.ndim != 2 or len(a) == 0:
        raise DataError(f"{what} embeddings must be a non-empty 2-D array, got shape {a.shape}")
    if not np.isfinite(a).all():
        raise DataError(f"{what} embeddings hold NaN or Inf")
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def _as_matrix(x: Any, what: str, chunk_size: int) -> np.ndarray:
    """``x`` as a 2-D float array without copying float32 / float64 data (rows are converted to
    float64 chunk by chunk where they are ranked); checked finite, ``chunk_size`` rows at a time."""
    if hasattr(x, "detach"):
        t = x.detach().cpu()
        if str(t.dtype) not in ("torch.float32", "torch.float64"):
            t = t.double()
        a = t.numpy()
    else:
        a = np.asarray(x)
        if a.dtype not in (np.float32, np.float64):
            a = a.astype(np.float64)
    if a.ndim != 2 or a.shape[0] == 0 or a.shape[1] == 0:
        raise DataError(f"{what} must be a non-empty images × captions matrix, got shape {a.shape}")
    for s in range(0, len(a), chunk_size):
        bad = ~np.isfinite(a[s:s + chunk_size]).all(1)
        if bad.any():
            raise DataError(f"{what} holds NaN or Inf (image row {s + int(np.argmax(bad))})")
    return a


def _map_at_r(row_scores: RowScores, n_queries: int, pos_q: np.ndarray, pos_g: np.ndarray,
              chunk_size: int) -> tuple[float, float, int]:
    """(mAP@R, R-Precision, queries scored) of queries ``0..n_queries-1`` whose gallery scores are
    ``row_scores(query rows)``, ``chunk_size`` queries at a time (see :func:`map_at_r_scores`)."""
    n_pos = np.bincount(pos_q, minlength=n_queries)
    scored = np.flatnonzero(n_pos > 0)
    pg = pos_g[np.argsort(pos_q, kind="stable")]  # grouped by query: start[q]:start[q + 1]
    start = np.concatenate([[0], np.cumsum(n_pos)])
    ap_sum = rp_sum = 0.0
    for s in range(0, len(scored), chunk_size):
        qs = scored[s:s + chunk_size]
        r = n_pos[qs]
        k = int(r.max())
        scores = row_scores(qs)
        top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        mask = np.zeros(scores.shape, dtype=bool)
        for i, q in enumerate(qs):
            mask[i, pg[start[q]:start[q + 1]]] = True
        rel = np.take_along_axis(mask, top, axis=1)
        ranks = np.arange(1, k + 1)
        hits = np.cumsum(rel, axis=1)
        within = ranks[None, :] <= r[:, None]
        ap_sum += float((((hits / ranks) * rel * within).sum(1) / r).sum())
        rp_sum += float((hits[np.arange(len(qs)), r - 1] / r).sum())
    n = len(scored)
    if n == 0:
        return float("nan"), float("nan"), 0
    return ap_sum / n, rp_sum / n, n


def map_at_r_scores(queries: np.ndarray, gallery: np.ndarray, pos_q: np.ndarray, pos_g: np.ndarray,
                    chunk_size: int = 256) -> tuple[float, float, int]:
    """(mAP@R, R-Precision, number of queries scored) for unit-row ``queries`` against ``gallery``.

    ``(pos_q[j], pos_g[j])`` are the (query, gallery item) positive pairs (unique). Queries
    without a positive are not scored. Ranks: descending cosine, ties by lower gallery index
    (a stable sort of the negated scores). Score rows are computed ``chunk_size`` at a time.
    """
    return _map_at_r(lambda qs: queries[qs] @ gallery.T, len(queries), pos_q, pos_g, chunk_size)


def _index(names: Sequence[str], what: str, n: int, rows: str = "") -> dict[str, int]:
    if len(names) != n:
        raise DataError(f"{len(names)} {what} names for {n} {rows or what + ' embeddings'}")
    out: dict[str, int] = {}
    for i, name in enumerate(names):
        name = str(name)
        if name in out:
            raise DataError(f"duplicate {what} name {name!r} (rows {out[name]} and {i})")
        out[name] = i
    return out


def positive_pairs(judg: Judgments, img_index: dict[str, int], cap_index: dict[str, int]
                   ) -> tuple[np.ndarray, np.ndarray, int]:
    """(image rows, caption rows) of every graded-retrieval positive among the rows (own captions
    and pairs judged positive), unique, plus the number of annotation pairs skipped (image or
    caption not among the rows)."""
    keys: list[int] = []
    m = len(cap_index)
    for cap, c in cap_index.items():  # own captions
        i = img_index.get(caption_image(cap))
        if i is not None:
            keys.append(i * m + c)
    skipped = 0
    for imgs, caps, pos in ((judg.expert_images, judg.expert_captions, judg.expert_positive()),
                            (judg.cf_images, judg.cf_captions, judg.cf_positive())):
        for img, cap, p in zip(imgs, caps, pos.tolist()):
            i, c = img_index.get(img), cap_index.get(cap)
            if i is None or c is None:
                skipped += 1
            elif p:
                keys.append(i * m + c)
    k = np.unique(np.array(keys, dtype=np.int64))
    return k // m, k % m, skipped


def judged_pairs(image_names: Sequence[str], caption_ids: Sequence[str], annotations_dir: str | Path
                 ) -> set[tuple[int, int]]:
    """(image row, caption row) pairs people judged relevant where the caption is another image's
    (the amber items of ``itrkit report``'s retrieval pages)."""
    judg = load_judgments(annotations_dir)
    img_index = _index(image_names, "image", len(image_names))
    cap_index = _index(caption_ids, "caption", len(caption_ids))
    ii, cc, _ = positive_pairs(judg, img_index, cap_index)
    own = np.array([caption_image(str(caption_ids[c])) == str(image_names[i]) for i, c in zip(ii, cc)], dtype=bool)
    return {(int(i), int(c)) for i, c, o in zip(ii, cc, own) if not o}


def _pair_model_scores(pair_scores: PairScores, i: np.ndarray, c: np.ndarray) -> np.ndarray:
    got = pair_scores(i, c)
    got = got.detach().cpu().numpy() if hasattr(got, "detach") else got
    out = np.asarray(got, dtype=np.float64).reshape(-1)
    if len(out) != len(i):
        raise DataError(f"pair_scores returned {len(out)} scores for {len(i)} pairs")
    if not np.isfinite(out).all():
        raise DataError(f"pair_scores returned NaN or Inf for pair (image row {int(i[~np.isfinite(out)][0])}, "
                        f"caption row {int(c[~np.isfinite(out)][0])})")
    return out


def _human_metrics(img_index: dict[str, int], cap_index: dict[str, int], annotations_dir: str | Path,
                   pair_scores: PairScores, i2t_rows: RowScores, t2i_rows: RowScores,
                   chunk_size: int) -> dict[str, float]:
    """The one implementation of the six metrics and the info keys (module docstring), for any
    model: ``pair_scores(image rows, caption rows)`` gives the score of each annotated pair (the two
    τ), ``i2t_rows(image rows)`` / ``t2i_rows(caption rows)`` the gallery scores each query's
    ranking sorts (descending, ties by the lower gallery index)."""
    bad = next((c for c in cap_index if not caption_image(c) or not c.rpartition("#")[2].isdigit()), None)
    if bad is not None:
        raise DataError(f"caption id {bad!r} is not 'name.jpg#k' (Flickr8k official caption ids)")
    judg = load_judgments(annotations_dir)
    out: dict[str, float] = {}
    counts: dict[str, int] = {}
    for name, key, imgs, caps in (("expert", "f8k_expert_tau_c", judg.expert_images, judg.expert_captions),
                                  ("cf", "f8k_cf_tau_b", judg.cf_images, judg.cf_captions)):
        rows = [(j, img_index.get(a), cap_index.get(c)) for j, (a, c) in enumerate(zip(imgs, caps))
                if caption_image(c) != a]
        rows = [(j, i, c) for j, i, c in rows if i is not None and c is not None]
        counts[name] = len(rows)
        if not rows:
            raise DataError(f"none of the {len(imgs)} pairs of {Path(annotations_dir) / (EXPERT_FILE if name == 'expert' else CROWDFLOWER_FILE)} "
                            f"is among the {len(img_index)} images / {len(cap_index)} captions (the judgments are on the official test split)")
        j, i, c = (np.array(v, dtype=np.int64) for v in zip(*rows))
        model = _pair_model_scores(pair_scores, i, c)
        if name == "expert":
            sc = judg.expert_scores[j]
            x, y, w = np.repeat(model, 3), sc.reshape(-1), np.ones(sc.size, dtype=np.int64)
            out[key] = 100.0 * kendall_tau_weighted(x, y, w, "c")
        else:
            x = np.concatenate([model, model])
            y = np.concatenate([np.ones(len(j), np.int64), np.zeros(len(j), np.int64)])
            w = np.concatenate([judg.cf_yes[j], judg.cf_no[j]])
            out[key] = 100.0 * kendall_tau_weighted(x, y, w, "b")
    pi, pc, skipped = positive_pairs(judg, img_index, cap_index)
    for d, rows_of, n, pq, pg in (("i2t", i2t_rows, len(img_index), pi, pc), ("t2i", t2i_rows, len(cap_index), pc, pi)):
        ap, rp, _ = _map_at_r(rows_of, n, pq, pg, chunk_size)
        out[f"f8k_human_{d}_map@r"], out[f"f8k_human_{d}_rp"] = 100.0 * ap, 100.0 * rp
    res: dict[str, float] = {k: out[k] for k in METRIC_KEYS}
    res.update({"f8k_expert_pairs": counts["expert"], "f8k_cf_pairs": counts["cf"], "f8k_skipped_pairs": skipped})
    return res


def evaluate_flickr8k_human(img_emb: Any, txt_emb: Any, image_names: Sequence[str], caption_ids: Sequence[str],
                            annotations_dir: str | Path, chunk_size: int = 256) -> dict[str, float]:
    """The six Flickr8k human-judgment metrics (×100) plus the info keys (module docstring).

    ``image_names[n]`` is the file name of ``img_emb[n]`` as the annotations write it
    (``x.jpg``), ``caption_ids[m]`` the id of ``txt_emb[m]`` (``x.jpg#k``). Model scores: float64
    cosines, both for the τ and for the rankings (score rows computed ``chunk_size`` at a time).
    """
    img, txt = _as_unit64(img_emb, "image"), _as_unit64(txt_emb, "text")
    if img.shape[1] != txt.shape[1]:
        raise DataError(f"image embeddings have dimension {img.shape[1]}, text embeddings {txt.shape[1]}")
    img_index = _index(image_names, "image", len(img))
    cap_index = _index(caption_ids, "caption", len(txt))
    return _human_metrics(img_index, cap_index, annotations_dir,
                          lambda i, c: np.einsum("ij,ij->i", img[i], txt[c]),
                          lambda qs: img[qs] @ txt.T, lambda qs: txt[qs] @ img.T, chunk_size)


def evaluate_flickr8k_human_scores(scores: Any, image_names: Sequence[str], caption_ids: Sequence[str],
                                   annotations_dir: str | Path, *, t2i_scores: Any = None,
                                   pair_scores: PairScores | None = None,
                                   chunk_size: int = 256) -> dict[str, float]:
    """:func:`evaluate_flickr8k_human` for a model that scores pairs rather than embedding them
    (fusion matchers, ensembles, re-rankers): same keys, positives, skipping rules and errors.

    ``scores``: (N_img, N_txt) array or tensor, ``image_names`` / ``caption_ids`` name its rows /
    columns. Rankings: image n's (i2t) sorts ``scores[n]`` descending, ties by the lower caption
    index; caption m's (t2i) sorts ``(t2i_scores if given else scores)[:, m]`` descending, ties by
    the lower image index (``t2i_scores``: same shape; a re-ranker's t2i order is not the i2t
    matrix's, see :func:`itrkit.eval.fusion.rerank_scores`). The model score of an annotated pair
    (the two τ): ``pair_scores(image rows, caption rows) -> 1-D scores`` if given, else
    ``scores[i, c]``. Rows are converted to float64 ``chunk_size`` at a time; float32 / float64
    inputs are not copied whole.
    """
    s = _as_matrix(scores, "score matrix", chunk_size)
    t = s if t2i_scores is None else _as_matrix(t2i_scores, "t2i score matrix", chunk_size)
    if t.shape != s.shape:
        raise DataError(f"t2i scores have shape {t.shape}, the score matrix {s.shape} (both images × captions)")
    n, m = s.shape
    img_index = _index(image_names, "image", n, "image rows of the score matrix")
    cap_index = _index(caption_ids, "caption", m, "caption columns of the score matrix")

    def own_pairs(i: np.ndarray, c: np.ndarray) -> np.ndarray:
        return s[i, c].astype(np.float64)

    return _human_metrics(img_index, cap_index, annotations_dir, own_pairs if pair_scores is None else pair_scores,
                          lambda qs: np.asarray(s[qs], dtype=np.float64),
                          lambda qs: np.asarray(t[:, qs].T, dtype=np.float64), chunk_size)
