"""Test inputs shared by the evaluation tests."""

from __future__ import annotations

import numpy as np


def exact_unit_vectors(rng: np.random.Generator, k: int, d: int = 8) -> np.ndarray:
    """Rows with four entries of ±0.5: unit norm exactly, dot products exact multiples of 0.25, so
    scores have many true ties (the case where rank conventions differ)."""
    out = np.zeros((k, d), np.float32)
    for r in range(k):
        idx = rng.choice(d, 4, replace=False)
        out[r, idx] = rng.choice([-0.5, 0.5], 4)
    return out
