"""Cross-modal retrieval metrics (docs/method.md §4), computed in chunks so memory stays bounded.

i2t rank of image n: the best (lowest) 0-based rank among its captions in row n's descending
scores; t2i rank of caption m: the rank of its image. Ties: a candidate with an equal score and a
lower index ranks first, i.e. ``rank = #{j: s_j > s_true} + #{j < true: s_j = s_true}``.
``R@K = 100·mean(rank < K)``, ``rsum`` = sum of the six R@K, ``medr``/``meanr`` of rank + 1
(``medr`` is floored, as in the VSE++ evaluation code the field copies).

Scores are cosine similarities in float32 (``torch`` matmul). Without ``rerank`` the N×M score
matrix is computed once, one block of image rows at a time, and both directions are ranked from
that block: i2t rows are complete inside a block; for t2i the column threshold (the true pair's
score) is needed before its block is seen, so blocks compare against an estimate with a safety
band wider than float32 matmul error and the few in-band entries are settled exactly at the end
against the matmul's own value. With ``rerank`` each direction gets its own pass (two matmuls).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from itrkit.errors import ConfigError, DataError
from itrkit.eval import counts
from itrkit.eval.rerank import Rerank, make_rerank

PRIMARY_METRIC = "rsum"
KS = (1, 5, 10)
METRIC_KEYS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum",
               "i2t_medr", "i2t_meanr", "t2i_medr", "t2i_meanr")

_U = 2.0 ** -24  # float32 unit roundoff
_BAND_ULPS = 64


def l2_normalize(x: Any) -> torch.Tensor:
    """A float32 CPU tensor with unit rows (arrays, lists or tensors of any float dtype)."""
    t = x.detach() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    t = t.to(device="cpu", dtype=torch.float32)
    if t.ndim != 2:
        raise DataError(f"embeddings must be a 2-D (rows × dim) array, got shape {tuple(t.shape)}")
    if not t.numel():
        return F.normalize(t, dim=1)
    # The row norms double as the finiteness check (a NaN/Inf entry makes its norm NaN/Inf):
    # one pass over the embeddings instead of isfinite + all + normalize. A finite norm that
    # overflowed (entries near 1e19) is told apart by the exact check.
    norms = torch.linalg.vector_norm(t, dim=1, keepdim=True)
    if not bool(torch.isfinite(norms).all()):
        bad = ~torch.isfinite(t).all(1)
        if bool(bad.any()):
            raise DataError(f"embedding row {int(bad.nonzero()[0])} is not finite (NaN or Inf)")
        return F.normalize(t, dim=1)
    return t / norms.clamp_min(1e-12)  # F.normalize's eps and its x / max(‖x‖, eps)


def _check(img: torch.Tensor, txt: torch.Tensor, txt2img: Any) -> torch.Tensor:
    n, m = len(img), len(txt)
    if n == 0 or m == 0:
        raise DataError(f"nothing to evaluate: {n} images, {m} captions")
    if img.shape[1] != txt.shape[1]:
        raise DataError(f"image embeddings are {img.shape[1]}-d but text embeddings {txt.shape[1]}-d")
    t2i = torch.as_tensor(np.asarray(txt2img)).reshape(-1)
    if t2i.is_floating_point() or t2i.dtype == torch.bool:
        raise DataError(f"txt2img must hold integer image indices, got {t2i.dtype}")
    t2i = t2i.long()
    if len(t2i) != m:
        raise DataError(f"txt2img has {len(t2i)} entries for {m} captions")
    if int(t2i.min()) < 0 or int(t2i.max()) >= n:
        bad = int(((t2i < 0) | (t2i >= n)).nonzero()[0])
        raise DataError(f"txt2img[{bad}] = {int(t2i[bad])} is not an image index in [0, {n})")
    counts = torch.bincount(t2i, minlength=n)
    if bool((counts == 0).any()):
        raise DataError(f"image {int((counts == 0).nonzero()[0])} has no caption")
    return t2i


def _caption_table(t2i: torch.Tensor, n: int) -> torch.Tensor:
    """(n, max captions) table of each image's caption indices, ascending, padded with -1."""
    counts = torch.bincount(t2i, minlength=n)
    order = torch.argsort(t2i, stable=True)  # grouped by image, ascending caption index inside
    starts = torch.cumsum(counts, 0) - counts
    slot = torch.arange(len(t2i)) - starts[t2i[order]]
    caps = torch.full((n, int(counts.max())), -1, dtype=torch.long)
    caps[t2i[order], slot] = order
    return caps


def _count(mask: torch.Tensor, dim: int) -> torch.Tensor:
    """Number of ones along ``dim`` of a float 0/1 matrix, as int64.

    A matrix-vector product with ones is several times faster than ``sum`` (or summing a bool
    tensor) on CPU, and float32 sums of 0/1 are exact below 2**24 terms in any order.
    """
    if mask.shape[dim] >= 2 ** 24:
        return mask.sum(dim, dtype=torch.float64).long()
    ones = torch.ones(mask.shape[dim], dtype=mask.dtype)
    return (torch.mv(mask, ones) if dim == 1 else torch.mv(mask.T, ones)).long()


def _row_ranks(scores: torch.Tensor, target: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """0-based rank of column ``target[i]`` in row i (ties: lower index first)."""
    true = scores.gather(1, target[:, None])
    higher = _count(torch.gt(scores, true, out=buf), 1)
    equal = _count(torch.ge(scores, true, out=buf), 1) - higher  # ≥ 1: the target itself
    return _settle_ties(scores, target, true, higher, equal)


def _settle_ties(scores: torch.Tensor, target: torch.Tensor, true: torch.Tensor, higher: torch.Tensor,
                 equal: torch.Tensor) -> torch.Tensor:
    """Ranks from the counts of higher and equal scores (``equal`` includes the target itself)."""
    tied = (equal > 1).nonzero().squeeze(1)
    if len(tied):  # rare with float scores: count equal scores at lower indices exactly
        cols = torch.arange(scores.shape[1])
        sub = scores[tied]
        before = ((sub == true[tied]) & (cols[None, :] < target[tied, None])).sum(1)
        higher[tied] += before
    return higher


def _best_own(scores: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
    """Each row's highest-scoring own caption (lowest index among equal scores).

    Its rank is the image's i2t rank: any other own caption has a lower score (so at least as
    many higher-or-earlier-tied candidates) or an equal score and a higher index.
    """
    own = scores.gather(1, caps.clamp(min=0)).masked_fill(caps < 0, float("-inf"))
    return caps.gather(1, own.argmax(1, keepdim=True)).squeeze(1)  # argmax: first of equal maxima


def _buffer(rows: int, cols: int) -> torch.Tensor:
    return torch.empty(rows, cols, dtype=torch.float32)


# Counting tiles. Default: one tile per block (a block-sized 0/1 mask, 4 comparisons + 4
# matrix-vector products per block). Cache-sized tiles (256 × 4096: the mask stays in L2 between
# the comparison and its count) were faster on an idle 2-core machine (36 vs 49 ms per
# 1024 × 25,000 block) but 4-5× slower whenever other processes share the cores: each of the
# ~280 small multi-threaded ops per block then waits for a descheduled thread (measured 10 s vs
# 2.2 s for 5K × 25K under load). The tiled path stays, exact and tested, for other machines.
_TILE_ROWS, _TILE_COLS = 1 << 30, 1 << 30


# "numba": the counting pass as one compiled loop (itrkit.eval.counts) when numba is installed;
# "torch": comparisons + matrix-vector products (below). Same counts (tests/eval).
COUNTER = "numba"


class _Counter:
    """The block counter of one ranking call: the numba loop on a thread pool, or torch ops."""

    def __init__(self, rows: int, cols: int) -> None:
        self.numba = COUNTER == "numba" and counts.available()
        self.parts = max(1, torch.get_num_threads())
        self.pool = ThreadPoolExecutor(self.parts) if self.numba and self.parts > 1 else None
        self.tile = None if self.numba else _buffer(min(_TILE_ROWS, rows), min(_TILE_COLS, cols))

    def __call__(self, sc: torch.Tensor, row_thr: torch.Tensor, col_hi: torch.Tensor,
                 col_lo: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.numba:
            assert self.tile is not None
            return _block_counts(sc, row_thr, col_hi, col_lo, self.tile)
        out = counts.block_counts(sc.numpy(), row_thr.reshape(-1).numpy(), col_hi.reshape(-1).numpy(),
                                  col_lo.reshape(-1).numpy(), self.pool, self.parts)
        return tuple(torch.from_numpy(x) for x in out)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def _block_counts(sc: torch.Tensor, row_thr: torch.Tensor, col_hi: torch.Tensor, col_lo: torch.Tensor,
                  tile: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per row: #{> row_thr}, #{≥ row_thr}; per column: #{> col_hi}, #{≥ col_lo} (int64), with torch ops.

    Exact: each tile's float32 0/1 sums stay far below 2**24 and are added up in float64.
    """
    b, m = sc.shape
    tr, tc = tile.shape
    row_gt = torch.zeros(b, dtype=torch.float64)
    row_ge = torch.zeros(b, dtype=torch.float64)
    col_gt = torch.zeros(m, dtype=torch.float64)
    col_ge = torch.zeros(m, dtype=torch.float64)
    ones_c = torch.ones(tc, dtype=torch.float32)
    ones_r = torch.ones(tr, dtype=torch.float32)
    for r0 in range(0, b, tr):
        r1 = min(r0 + tr, b)
        thr = row_thr[r0:r1]
        for c0 in range(0, m, tc):
            c1 = min(c0 + tc, m)
            s = sc[r0:r1, c0:c1]
            x = tile[:r1 - r0, :c1 - c0]
            oc, orr = ones_c[:c1 - c0], ones_r[:r1 - r0]
            row_gt[r0:r1] += torch.mv(torch.gt(s, thr, out=x), oc)
            row_ge[r0:r1] += torch.mv(torch.ge(s, thr, out=x), oc)
            col_gt[c0:c1] += torch.mv(torch.gt(s, col_hi[:, c0:c1], out=x).T, orr)
            col_ge[c0:c1] += torch.mv(torch.ge(s, col_lo[:, c0:c1], out=x).T, orr)
    return row_gt.long(), row_ge.long(), col_gt.long(), col_ge.long()


def ranks(img_emb: Any, txt_emb: Any, txt2img: Any, chunk_size: int = 1024,
          rerank: Rerank | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(i2t rank of each image, t2i rank of each caption), 0-based numpy int64 arrays."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    img, txt = l2_normalize(img_emb), l2_normalize(txt_emb)
    t2i = _check(img, txt, txt2img)
    with torch.no_grad():
        if rerank is None:
            out = _ranks_single_pass(img, txt, t2i, chunk_size)
            if out is not None:
                return out
        return _ranks_two_pass(img, txt, t2i, chunk_size, rerank)


def _ranks_two_pass(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor, chunk_size: int,
                    rerank: Rerank | None) -> tuple[np.ndarray, np.ndarray]:
    """Each direction from its own row blocks (needed when ``rerank`` sees whole query rows)."""
    caps = _caption_table(t2i, len(img))
    i2t = _one_direction(img, txt, chunk_size, rerank, "i2t", lambda sc, rows: _best_own(sc, caps[rows]))
    t2i_r = _one_direction(txt, img, chunk_size, rerank, "t2i", lambda sc, rows: t2i[rows])
    return i2t.numpy(), t2i_r.numpy()


def _one_direction(queries: torch.Tensor, gallery: torch.Tensor, chunk_size: int, rerank: Rerank | None,
                   direction: str, target: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Rank of each query's target (``target(scores, rows)``) among the gallery, in row blocks."""
    n, m = len(queries), len(gallery)
    out = torch.empty(n, dtype=torch.long)
    block, buf = _buffer(min(chunk_size, n), m), _buffer(min(chunk_size, n), m)
    for s in range(0, n, chunk_size):
        rows = torch.arange(s, min(s + chunk_size, n))
        sc = torch.matmul(queries[rows[0]:rows[-1] + 1], gallery.T, out=block[:len(rows)])
        if rerank is not None:
            sc = _apply(rerank, sc, rows, direction)
        out[rows] = _row_ranks(sc, target(sc, rows), buf[:len(rows)])
    return out


def _apply(rerank: Rerank, sc: torch.Tensor, rows: torch.Tensor, direction: str) -> torch.Tensor:
    out = torch.as_tensor(rerank(sc, rows, direction), dtype=torch.float32)
    if out.shape != sc.shape:
        raise ValueError(f"rerank returned shape {tuple(out.shape)} for {direction} scores of shape {tuple(sc.shape)}")
    return out


def _ranks_single_pass(img: torch.Tensor, txt: torch.Tensor, t2i: torch.Tensor,
                       chunk_size: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Both directions from one pass of image-row blocks (one matmul of N×M in total).

    t2i needs each caption's true score before the block holding its image is computed, so
    blocks are compared with a band of ±64 ulp around a separately computed estimate; entries
    above the band are surely higher, entries inside are kept and settled exactly at the end
    against the matmul's own true score. Returns None (the caller then ranks with two passes)
    if the matmul's true scores left the inner half of the band, which float32 matmul does not
    do (measured ≤ 4 ulp) but a reduced-precision matmul setting could.
    """
    n, m = len(img), len(txt)
    caps = _caption_table(t2i, n)
    by_image = torch.argsort(t2i, stable=True)  # captions of images [s, e) = by_image[first[s]:first[e]]
    first = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(torch.bincount(t2i, minlength=n), 0)])
    # Half-width of the band: float32 matmul of unit vectors lands within a few ulp of the exact
    # score (measured ≤ 4u for d = 8…16384); the check below falls back if it ever does not.
    tol = _BAND_ULPS * _U
    approx = (img[t2i] * txt).sum(1).double()  # within a few ulp of the matmul's value
    hi_thr = (approx + tol).float()[None, :]
    lo_thr = (approx - tol).float()[None, :]
    exact = torch.empty(m, dtype=torch.float32)  # the matmul's own true-pair scores
    higher = torch.zeros(m, dtype=torch.long)  # t2i: entries above the band (surely higher)
    band_rows, band_cols, band_vals = [], [], []
    i2t = torch.empty(n, dtype=torch.long)
    # Reused buffers: a fresh 100 MB block per chunk would cost page faults on every block.
    block = _buffer(min(chunk_size, n), m)
    counter = _Counter(min(chunk_size, n), m)
    try:
        for s in range(0, n, chunk_size):
            e = min(s + chunk_size, n)
            sc = torch.matmul(img[s:e], txt.T, out=block[:e - s])
            target = _best_own(sc, caps[s:e])
            true = sc.gather(1, target[:, None])
            # i2t from the rows' counts; t2i: per caption column, against the band around its true score
            row_gt, row_ge, above, col_ge = counter(sc, true, hi_thr, lo_thr)
            i2t[s:e] = _settle_ties(sc, target, true, row_gt, row_ge - row_gt)
            in_band = col_ge - above
            higher += above
            mine = by_image[first[s]:first[e]]  # captions whose image is in this block
            exact[mine] = sc.view(-1).take((t2i[mine] - s) * m + mine)
            in_band[mine] -= 1  # the true pair itself sits in its band (checked below)
            cols = (in_band > 0).nonzero().squeeze(1)
            if len(cols):
                sub = sc.index_select(1, cols)
                hit = (sub >= lo_thr[:, cols]) & (sub <= hi_thr[:, cols])
                r, c = hit.nonzero(as_tuple=True)
                band_rows.append(r + s)
                band_cols.append(cols[c])
                band_vals.append(sub[r, c])
    finally:
        counter.close()
    if bool(((exact.double() - approx).abs() > tol / 2).any()):
        warnings.warn("float32 matmul strayed beyond its error bound (reduced-precision matmul?); "
                      "ranking again with two passes", RuntimeWarning, stacklevel=3)
        return None
    if band_rows:
        r, c, v = torch.cat(band_rows), torch.cat(band_cols), torch.cat(band_vals)
        true_img = t2i[c]
        keep = r != true_img
        r, c, v, true_img = r[keep], c[keep], v[keep], true_img[keep]
        ex = exact[c]
        wins = (v > ex) | ((v == ex) & (r < true_img))
        higher += torch.bincount(c[wins], minlength=m)
    return i2t.numpy(), higher.numpy()


def metrics_from_ranks(i2t: np.ndarray, t2i: np.ndarray, ks: tuple[int, ...] = KS) -> dict[str, float]:
    """R@K (×100), RSUM and floored median / mean of rank + 1 from 0-based ranks."""
    i2t, t2i = np.asarray(i2t), np.asarray(t2i)
    out: dict[str, float] = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_R@{k}"] = float(100.0 * np.mean(r < k))
    out["rsum"] = float(sum(out[f"{d}_R@{k}"] for d in ("i2t", "t2i") for k in ks))
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        out[f"{name}_medr"] = float(np.floor(np.median(r + 1)))
        out[f"{name}_meanr"] = float(np.mean(r + 1))
    return out


def metrics_from_scores(scores: Any, txt2img: Any) -> dict[str, float]:
    """docs/method.md §4 metrics from a precomputed N×M image-caption score matrix (e.g. a fusion matcher's,
    whose scores are not cosines of embeddings). Same ranks and tie rule as ``evaluate_retrieval``."""
    s = scores.detach() if isinstance(scores, torch.Tensor) else torch.as_tensor(np.asarray(scores))
    s = s.to(device="cpu", dtype=torch.float32)
    if s.ndim != 2 or s.shape[0] == 0 or s.shape[1] == 0:
        raise DataError(f"scores must be a non-empty images × captions matrix, got shape {tuple(s.shape)}")
    if not bool(torch.isfinite(s).all()):
        raise DataError("score matrix has non-finite entries (NaN or Inf)")
    n, m = s.shape
    t2i = torch.as_tensor(np.asarray(txt2img)).reshape(-1).long()
    if len(t2i) != m or int(t2i.min()) < 0 or int(t2i.max()) >= n:
        raise DataError(f"txt2img must give each of the {m} captions an image index in [0, {n})")
    if len(torch.unique(t2i)) != n:
        raise DataError("every image needs at least one caption")
    caps = _caption_table(t2i, n)
    i2t = _row_ranks(s, _best_own(s, caps), torch.empty_like(s))
    st = s.T.contiguous()
    t2i_r = _row_ranks(st, t2i, torch.empty_like(st))
    return metrics_from_ranks(i2t.numpy(), t2i_r.numpy())


def evaluate_retrieval(img_emb: Any, txt_emb: Any, txt2img: Any, chunk_size: int = 1024,
                       rerank: Rerank | None = None, rerank_k: int = 0,
                       score_pairs: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                       ) -> dict[str, float]:
    """R@1/5/10 both ways, RSUM, MedR, MnR (docs/method.md §4.2). Embeddings are L2-normalised inside.

    ``txt2img[m]`` is caption m's image index; every image needs ≥ 1 caption. ``rerank``
    (optional) rescores each block of query rows before ranking: ``rerank(scores, query_idx,
    "i2t"|"t2i")`` gets image rows × all captions, then caption rows × all images.
    ``rerank_k=k`` with ``score_pairs(img_idx, txt_idx) -> scores`` (a cross-encoder / ITM head)
    is the X2VLM protocol: each query's top k by embedding cosine are re-scored by ``score_pairs``
    and put, in that order, above the rest (:func:`itrkit.eval.rerank.make_rerank`).
    Memory: about 2 × chunk_size × max(N, M) float32 values, never the whole score matrix.
    """
    if rerank_k:
        if rerank is not None or score_pairs is None:
            raise ConfigError("rerank_k needs score_pairs (and no rerank callback)")

        rerank = make_rerank(score_pairs, rerank_k, progress=False)
    i2t, t2i = ranks(img_emb, txt_emb, txt2img, chunk_size, rerank)
    return metrics_from_ranks(i2t, t2i)


def topk(queries: Any, gallery: Any, k: int, chunk_size: int = 1024,
         normalized: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Exact cosine top-k of each query, in chunks: (scores, indices), each (Q, min(k, G)).

    Ordered by descending score; equal scores by the lower gallery index (the rank convention
    of :func:`ranks`, including which of several equal scores make the cut at position k).
    ``normalized=True`` skips the L2 normalisation for float32 tensors that already have unit rows.
    """
    if normalized:
        q, g = torch.as_tensor(queries, dtype=torch.float32), torch.as_tensor(gallery, dtype=torch.float32)
    else:
        q, g = l2_normalize(queries), l2_normalize(gallery)
    if len(q) and q.shape[1] != g.shape[1]:
        raise DataError(f"query embeddings are {q.shape[1]}-d but gallery embeddings {g.shape[1]}-d")
    k = min(int(k), len(g))
    scores = torch.empty(len(q), k, dtype=torch.float32)
    index = torch.empty(len(q), k, dtype=torch.long)
    if k <= 0 or len(q) == 0:
        return scores.numpy(), index.numpy()
    buf = _buffer(min(chunk_size, len(q)), len(g))
    with torch.no_grad():
        for s in range(0, len(q), chunk_size):
            e = min(s + chunk_size, len(q))
            sc = q[s:e] @ g.T
            vals, idx = torch.topk(sc, k, dim=1)
            # Within the chosen set order by (score desc, index asc): sort by index, then a
            # stable sort by score.
            by_idx = torch.argsort(idx, dim=1)
            idx, vals = idx.gather(1, by_idx), vals.gather(1, by_idx)
            by_score = torch.sort(-vals, dim=1, stable=True).indices
            idx, vals = idx.gather(1, by_score), vals.gather(1, by_score)
            # Rows where the k-th score is shared with candidates left out: topk may have kept
            # a higher index; redo those rows with a full stable sort.
            n_ge = _count(torch.ge(sc, vals[:, -1:], out=buf[:e - s]), 1)
            redo = (n_ge > k).nonzero().squeeze(1)
            if len(redo):
                order = torch.sort(-sc[redo], dim=1, stable=True).indices[:, :k]
                idx[redo] = order
                vals[redo] = sc[redo].gather(1, order)
            scores[s:e], index[s:e] = vals, idx
    return scores.numpy(), index.numpy()


class RetrievalEvaluator:
    """sentence-transformers style: call with embeddings, get a dict; ``primary_metric`` names the key."""

    def __init__(self, primary: str = PRIMARY_METRIC, chunk_size: int = 1024,
                 rerank: Rerank | None = None) -> None:
        if primary not in METRIC_KEYS:
            raise ValueError(f"unknown primary metric {primary!r}; one of {', '.join(METRIC_KEYS)}")
        self.primary_metric = primary
        self.chunk_size = chunk_size
        self.rerank = rerank
        # medr/meanr: lower is better; every other key: higher is better
        self.greater_is_better = not primary.endswith(("medr", "meanr"))

    def __call__(self, img_emb: Any, txt_emb: Any, txt2img: Any) -> dict[str, float]:
        return evaluate_retrieval(img_emb, txt_emb, txt2img, self.chunk_size, self.rerank)
