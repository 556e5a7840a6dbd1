"""Re-ranking: re-score each query's top-k first-stage candidates with a pair scorer (X2VLM inference).

:func:`make_rerank` turns any ``score_pairs(img_idx, txt_idx)`` (a cross-encoder, an ITM head) into
the ``rerank`` callback of :func:`itrkit.eval.retrieval.evaluate_retrieval`; ``evaluate_retrieval(...,
rerank_k=k, score_pairs=fn)`` does the same in one call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from itrkit.errors import ConfigError, DataError

# rerank(scores, query_indices, direction) -> new scores of the same shape. direction "i2t": rows are
# a chunk of images, columns all captions; "t2i": rows a chunk of captions, columns all images.
Rerank = Callable[[Tensor, Tensor, str], Tensor]

# score_pairs(img_idx, txt_idx) -> (P,) scores of the pairs (img_idx[p], txt_idx[p]).
PairScorer = Callable[[Tensor, Tensor], Tensor]


def make_rerank(score_pairs: PairScorer, k: int, batch_size: int = 512, progress: bool = True) -> Rerank:
    """A ``rerank`` callback for :func:`itrkit.eval.retrieval.evaluate_retrieval` from any pair scorer.

    For each query row of a block, the ``k`` best candidates by the first-stage score (ties: lower
    gallery index first, the docs/method.md §4.1 rule) are re-scored with ``score_pairs(img_idx, txt_idx)``
    (image and caption indices of the split, whatever the direction) in batches of ``batch_size``
    pairs, and ordered by that score (ties: lower gallery index first) above all other candidates,
    which keep their first-stage order. The returned row values encode this final order exactly:
    the candidate at final position ``p`` gets ``G − p`` (G = gallery size, exact in float32 up to
    2**24), so the evaluator's ranks are the re-ranked positions. ``k = 0`` returns the scores
    unchanged. Works for any cross-encoder, e.g. to re-rank a trained ``DualEncoder``'s scores.
    """
    if int(k) < 0:
        raise ConfigError(f"rerank k must be >= 0, got {k}")
    if int(batch_size) < 1:
        raise ConfigError(f"rerank batch_size must be >= 1, got {batch_size}")
    k, batch_size = int(k), int(batch_size)

    def rerank(scores: Tensor, rows: Tensor, direction: str) -> Tensor:
        if direction not in ("i2t", "t2i"):
            raise ValueError(f"unknown rerank direction {direction!r} (i2t or t2i)")
        n, g = scores.shape
        kk = min(k, g)
        if kk == 0:
            return scores
        if g >= 2 ** 24:
            raise DataError(f"re-ranking supports galleries below 2**24 items, got {g}")
        # Stable sort of −score: equal scores keep ascending index order (the tie rule).
        order = torch.sort(-scores, dim=1, stable=True).indices
        top = order[:, :kk]
        query = rows.reshape(-1, 1).expand(n, kk)
        img_idx, txt_idx = (query, top) if direction == "i2t" else (top, query)
        flat_i, flat_t = img_idx.reshape(-1), txt_idx.reshape(-1)
        new = torch.empty(flat_i.numel(), dtype=torch.float64)
        from itrkit.utils.progress import progress as progress_lines

        starts = range(0, flat_i.numel(), batch_size)
        for s in progress_lines(starts, desc=f"re-rank {direction}", unit="batch", enabled=progress):
            out = torch.as_tensor(score_pairs(flat_i[s:s + batch_size], flat_t[s:s + batch_size]))
            out = out.detach().reshape(-1).to(torch.float64)
            if out.numel() != min(batch_size, flat_i.numel() - s):
                raise ValueError(f"score_pairs returned {out.numel()} scores for "
                                 f"{min(batch_size, flat_i.numel() - s)} pairs")
            new[s:s + out.numel()] = out
        new = new.reshape(n, kk)
        if not bool(torch.isfinite(new).all()):
            r = int((~torch.isfinite(new)).any(1).nonzero()[0])
            raise DataError(f"re-ranking scores of {direction} query {int(rows.reshape(-1)[r])} are not finite")
        # Order the k candidates by (new score desc, gallery index asc): sort by index, then a
        # stable sort by score.
        by_idx = torch.sort(top, dim=1).indices
        top, new = top.gather(1, by_idx), new.gather(1, by_idx)
        order[:, :kk] = top.gather(1, torch.sort(-new, dim=1, stable=True).indices)
        values = torch.arange(g, 0, -1, dtype=torch.float32).expand(n, g)
        return torch.empty(n, g, dtype=torch.float32).scatter_(1, order, values)

    return rerank
