"""evaluate_retrieval equals an explicit per-query loop (ties, unequal caption counts); chunked == full."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from itrkit.eval.retrieval import evaluate_retrieval, ranks, topk


def _exact_unit_vectors(rng: np.random.Generator, k: int, d: int = 8) -> np.ndarray:
    # four entries of ±0.5: unit norm exactly, dot products exact multiples of 0.25 → many true ties
    out = np.zeros((k, d), np.float32)
    for r in range(k):
        idx = rng.choice(d, 4, replace=False)
        out[r, idx] = rng.choice([-0.5, 0.5], 4)
    return out


def _reference(img: np.ndarray, txt: np.ndarray, t2i: np.ndarray) -> dict[str, float]:
    S = img.astype(np.float64) @ txt.astype(np.float64).T
    n, m = S.shape
    i2t = []
    for i in range(n):
        best = None
        for c in range(m):
            if t2i[c] != i:
                continue
            r = 0
            for j in range(m):
                if S[i, j] > S[i, c] or (S[i, j] == S[i, c] and j < c):
                    r += 1
            best = r if best is None else min(best, r)
        i2t.append(best)
    t2i_r = []
    for c in range(m):
        r = 0
        for j in range(n):
            if S[j, c] > S[t2i[c], c] or (S[j, c] == S[t2i[c], c] and j < t2i[c]):
                r += 1
        t2i_r.append(r)
    out = {}
    for name, rr in (("i2t", i2t), ("t2i", t2i_r)):
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = 100.0 * sum(1 for x in rr if x < k) / len(rr)
    out["rsum"] = sum(v for v in out.values())
    for name, rr in (("i2t", i2t), ("t2i", t2i_r)):
        s = sorted(x + 1 for x in rr)
        mid = len(s) // 2
        out[f"{name}_medr"] = float(np.floor(s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2))
        out[f"{name}_meanr"] = sum(s) / len(s)
    return out


@pytest.mark.parametrize("seed", range(12))
def test_matches_reference_loop_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 18))
    t2i = np.repeat(np.arange(n), rng.integers(1, 8, size=n))  # 1..7 captions per image
    img, txt = _exact_unit_vectors(rng, n), _exact_unit_vectors(rng, len(t2i))
    ref = _reference(img, txt, t2i)
    for chunk in (1, 3, 7, 4096):
        got = evaluate_retrieval(img, txt, t2i, chunk_size=chunk)
        assert got.keys() == ref.keys()
        for k in ref:
            assert got[k] == pytest.approx(ref[k], abs=1e-9), (chunk, k)


def test_chunked_equals_full_on_random_floats() -> None:
    rng = np.random.default_rng(1)
    t2i = np.repeat(np.arange(200), 5)
    img, txt = rng.normal(size=(200, 32)), rng.normal(size=(1000, 32))
    full = ranks(img, txt, t2i, chunk_size=10_000)
    for chunk in (17, 64):
        part = ranks(img, txt, t2i, chunk_size=chunk)
        assert np.array_equal(full[0], part[0]) and np.array_equal(full[1], part[1])


def test_known_case_and_tensor_inputs() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.9, 0.1]])  # image 0 ↔ captions 1, 2; image 1 ↔ caption 0
    m = evaluate_retrieval(img * 3, txt, [1, 0, 0])  # unnormalised input is normalised inside
    assert m["i2t_R@1"] == 100.0 and m["t2i_R@1"] == 100.0 and m["rsum"] == 600.0
    m = evaluate_retrieval(img, txt, [0, 1, 1])  # every caption on the wrong image
    assert m["i2t_R@1"] == 0.0 and m["t2i_R@1"] == 0.0 and m["i2t_medr"] == 2.0


def test_topk_ties_lower_index_first() -> None:
    q = np.array([[1.0, 0.0]])
    g = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [2.0, 0.0]])
    scores, idx = topk(q, g, 3, chunk_size=1)
    assert idx.tolist() == [[1, 2, 3]] and np.allclose(scores, 1.0)
