"""Evaluators that name their primary metric and its direction (sentence-transformers'
``SentenceEvaluator`` contract): the training loop selects on ``primary_metric`` and never
hard-codes a metric or assumes that higher is better.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from itrkit.eval.retrieval import evaluate_retrieval

# Rank statistics: a lower median / mean rank is better; everything else (R@K, RSUM, mAP) is higher-better.
LOWER_IS_BETTER_SUFFIXES = ("medr", "meanr")


def greater_is_better(metric: str) -> bool:
    """Direction of a metric key (``t2i_medr`` → False, ``rsum`` → True)."""
    return not metric.endswith(LOWER_IS_BETTER_SUFFIXES)


def is_improvement(value: float, best: float | None, metric: str) -> bool:
    """Whether ``value`` beats ``best`` (None = nothing yet) in ``metric``'s direction."""
    if best is None:
        return True
    return value > best if greater_is_better(metric) else value < best


class RetrievalEvaluator:
    """Cross-modal retrieval metrics of a dual encoder on one split of precomputed inputs.

    ``embed(model) -> {"image_embeds", "text_embeds", ...}`` computes the split's embeddings (the
    caller knows whether they come from cached features or live towers)."""

    def __init__(self, embed: Any, txt2img: np.ndarray, primary_metric: str = "rsum") -> None:
        self.embed, self.txt2img, self.primary_metric = embed, txt2img, primary_metric
        self.greater_is_better = greater_is_better(primary_metric)
        self.last_embeddings: dict[str, np.ndarray] | None = None

    def __call__(self, model: Any) -> dict[str, float]:
        emb = self.embed(model)
        self.last_embeddings = emb
        return evaluate_retrieval(emb["image_embeds"], emb["text_embeds"], self.txt2img)
