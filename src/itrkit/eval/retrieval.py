"""Cross-modal retrieval metrics (SPEC §4), computed in chunks so memory stays bounded.

i2t rank of image n: the best (lowest) 0-based rank among its captions in row n's descending
scores; t2i rank of caption m: the rank of its image. Ties: a candidate with an equal score and a
lower index ranks first, i.e. ``rank = #{j: s_j > s_true} + #{j < true: s_j = s_true}``.
``R@K = 100·mean(rank < K)``, ``rsum`` = sum of the six R@K, ``medr``/``meanr`` of rank + 1.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

PRIMARY_METRIC = "rsum"
KS = (1, 5, 10)


def l2_normalize(x: Any) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    return F.normalize(t, dim=-1)


def _ranks_of_targets(scores: torch.Tensor, target_cols: torch.Tensor) -> torch.Tensor:
    """0-based rank of column ``target_cols[i]`` in row i of ``scores`` (ties: lower index first)."""
    true = scores.gather(1, target_cols[:, None])
    cols = torch.arange(scores.shape[1])[None, :]
    higher = (scores > true).sum(1)
    tied_before = ((scores == true) & (cols < target_cols[:, None])).sum(1)
    return higher + tied_before


def ranks(img_emb: Any, txt_emb: Any, txt2img: Any, chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """(i2t ranks per image, t2i ranks per caption), 0-based."""
    img, txt = l2_normalize(img_emb), l2_normalize(txt_emb)
    t2i_map = torch.as_tensor(np.asarray(txt2img), dtype=torch.long)
    n, m = len(img), len(txt)
    if len(t2i_map) != m:
        raise ValueError(f"txt2img has {len(t2i_map)} entries for {m} captions")
    # t2i: a chunk of caption rows against all images (chunk × N scores at a time)
    t2i = torch.empty(m, dtype=torch.long)
    for s in range(0, m, chunk_size):
        sc = (img @ txt[s:s + chunk_size].T).T  # the same products as the i2t pass: ties agree
        t2i[s:s + chunk_size] = _ranks_of_targets(sc, t2i_map[s:s + chunk_size])
    # i2t: a chunk of image rows against all captions. An image's best rank is the rank of its
    # highest-scoring caption (the lowest index among equal scores), so one target per row.
    counts = torch.bincount(t2i_map, minlength=n)
    if bool((counts == 0).any()):
        raise ValueError(f"image {int((counts == 0).nonzero()[0])} has no caption")
    order = torch.argsort(t2i_map, stable=True)  # captions grouped by image, ascending index
    width = int(counts.max())
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(m) - starts[t2i_map[order]]
    caps = torch.full((n, width), -1, dtype=torch.long)
    caps[t2i_map[order], slot] = order
    i2t = torch.empty(n, dtype=torch.long)
    for s in range(0, n, chunk_size):
        sc = img[s:s + chunk_size] @ txt.T
        c = caps[s:s + chunk_size]
        own = sc.gather(1, c.clamp(min=0)).masked_fill(c < 0, float("-inf"))
        target = c.gather(1, own.argmax(1, keepdim=True)).squeeze(1)  # argmax: first of equal maxima
        i2t[s:s + chunk_size] = _ranks_of_targets(sc, target)
    return i2t.numpy(), t2i.numpy()


def metrics_from_ranks(i2t: np.ndarray, t2i: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_R@{k}"] = float(100.0 * np.mean(r < k))
    out["rsum"] = float(sum(out[f"{n}_R@{k}"] for n in ("i2t", "t2i") for k in ks))
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        out[f"{name}_medr"] = float(np.floor(np.median(r + 1)))
        out[f"{name}_meanr"] = float(np.mean(r + 1))
    return out


def evaluate_retrieval(img_emb: Any, txt_emb: Any, txt2img: Any, chunk_size: int = 1024) -> dict[str, float]:
    """R@1/5/10 both ways, RSUM, MedR, MnR (SPEC §4). Embeddings are L2-normalised inside."""
    i2t, t2i = ranks(img_emb, txt_emb, txt2img, chunk_size)
    return metrics_from_ranks(i2t, t2i)


def topk(queries: Any, gallery: Any, k: int, chunk_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k of each query in chunks; ties broken by the lower gallery index."""
    q, g = l2_normalize(queries), l2_normalize(gallery)
    k = min(k, len(g))
    scores, idx = [], []
    for s in range(0, len(q), chunk_size):
        sc = q[s:s + chunk_size] @ g.T
        # stable sort on -score keeps lower indices first among equal scores
        order = torch.sort(-sc, dim=1, stable=True).indices[:, :k]
        idx.append(order)
        scores.append(sc.gather(1, order))
    if not idx:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return torch.cat(scores).numpy(), torch.cat(idx).numpy()


class RetrievalEvaluator:
    """sentence-transformers style: call with embeddings, get a dict; ``primary_metric`` names the key."""

    def __init__(self, primary: str = PRIMARY_METRIC, chunk_size: int = 1024) -> None:
        self.primary_metric = primary
        self.chunk_size = chunk_size

    def __call__(self, img_emb: Any, txt_emb: Any, txt2img: Any) -> dict[str, float]:
        return evaluate_retrieval(img_emb, txt_emb, txt2img, self.chunk_size)
