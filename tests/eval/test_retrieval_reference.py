"""evaluate_retrieval equals an explicit per-query loop (ties, unequal caption counts); chunked == full."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from itrkit.errors import DataError
from itrkit.eval import retrieval
from itrkit.eval.retrieval import (
    PRIMARY_METRIC,
    RetrievalEvaluator,
    evaluate_retrieval,
    l2_normalize,
    metrics_from_scores,
    ranks,
    topk,
)
from tests.eval._vectors import exact_unit_vectors


def _reference_ranks(S: np.ndarray, t2i: np.ndarray) -> tuple[list[int], list[int]]:
    """Ranks by the docs/method.md §4.1 definition, one query at a time."""
    n, m = S.shape
    i2t = []
    for i in range(n):
        best = None
        for c in range(m):
            if t2i[c] != i:
                continue
            r = sum(1 for j in range(m) if S[i, j] > S[i, c] or (S[i, j] == S[i, c] and j < c))
            best = r if best is None else min(best, r)
        i2t.append(best)
    t2i_r = []
    for c in range(m):
        t = t2i[c]
        t2i_r.append(sum(1 for j in range(n) if S[j, c] > S[t, c] or (S[j, c] == S[t, c] and j < t)))
    return i2t, t2i_r


def _reference_metrics(i2t: list[int], t2i_r: list[int]) -> dict[str, float]:
    out = {}
    for name, rr in (("i2t", i2t), ("t2i", t2i_r)):
        for k in (1, 5, 10):
            out[f"{name}_R@{k}"] = 100.0 * sum(1 for x in rr if x < k) / len(rr)
    out["rsum"] = sum(out.values())
    for name, rr in (("i2t", i2t), ("t2i", t2i_r)):
        s = sorted(x + 1 for x in rr)
        mid = len(s) // 2
        out[f"{name}_medr"] = float(np.floor(s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2))
        out[f"{name}_meanr"] = sum(s) / len(s)
    return out


def _identity(scores: torch.Tensor, rows: torch.Tensor, direction: str) -> torch.Tensor:
    return scores  # any rerank switches to the two-pass path


@pytest.mark.parametrize("seed", range(10))
def test_matches_reference_loop_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 18))
    t2i = np.repeat(np.arange(n), rng.integers(1, 8, size=n))  # 1..7 captions per image
    rng.shuffle(t2i)  # captions of an image need not be adjacent
    img, txt = exact_unit_vectors(rng, n), exact_unit_vectors(rng, len(t2i))
    img[1] = img[0]  # identical images: ties settled by index in both directions
    S = img.astype(np.float64) @ txt.astype(np.float64).T  # exact: entries are multiples of 0.25
    ref = _reference_metrics(*_reference_ranks(S, t2i))
    for chunk in (1, 3, 7, 4096):
        for rerank in (None, _identity):
            got = evaluate_retrieval(img, txt, t2i, chunk_size=chunk, rerank=rerank)
            assert list(got) == list(retrieval.METRIC_KEYS)
            for k in ref:
                assert got[k] == pytest.approx(ref[k], abs=1e-9), (chunk, rerank, k)
    from_scores = metrics_from_scores(torch.from_numpy(S), t2i)  # a fusion matcher's path
    assert list(from_scores) == list(retrieval.METRIC_KEYS)
    for k in ref:
        assert from_scores[k] == pytest.approx(ref[k], abs=1e-9), k


def test_single_pass_settles_band_entries_on_float_scores() -> None:
    """Float scores with duplicated images/captions: the one-matmul path equals the loop on the same S."""
    rng = np.random.default_rng(3)
    n, d = 40, 16
    t2i = np.repeat(np.arange(n), rng.integers(1, 6, size=n))
    img = rng.normal(size=(n, d)).astype(np.float32)
    txt = (img[t2i] + 1.5 * rng.normal(size=(len(t2i), d))).astype(np.float32)
    img[7] = img[3]
    img[20] = img[3]
    txt[5] = txt[2]
    img_n, txt_n = l2_normalize(img), l2_normalize(txt)
    S = (img_n @ txt_n.T).numpy()  # the very matmul a single block computes (chunk ≥ N)
    ref_i2t, ref_t2i = _reference_ranks(S, t2i)
    got_i2t, got_t2i = ranks(img, txt, t2i, chunk_size=n)
    assert got_i2t.tolist() == ref_i2t and got_t2i.tolist() == ref_t2i


def test_chunked_equals_full_on_random_floats() -> None:
    rng = np.random.default_rng(1)
    t2i = np.repeat(np.arange(300), 5)
    img, txt = rng.normal(size=(300, 32)), rng.normal(size=(1500, 32))
    full = ranks(img, txt, t2i, chunk_size=10_000)
    for chunk in (64, 128, 256):  # BLAS gives the same bits for blocks of ≥ 64 rows here
        part = ranks(img, txt, t2i, chunk_size=chunk)
        assert np.array_equal(full[0], part[0]) and np.array_equal(full[1], part[1])


def test_fallback_when_matmul_leaves_the_band(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(2)
    t2i = np.repeat(np.arange(50), 3)
    img, txt = rng.normal(size=(50, 512)), rng.normal(size=(150, 512))
    expected = ranks(img, txt, t2i, rerank=_identity)
    monkeypatch.setattr(retrieval, "_BAND_ULPS", 0)  # any rounding difference now "strays"
    with pytest.warns(RuntimeWarning, match="two passes"):
        got = ranks(img, txt, t2i)
    assert np.array_equal(got[0], expected[0]) and np.array_equal(got[1], expected[1])


def test_known_case_and_tensor_inputs() -> None:
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.9, 0.1]])  # image 0 ↔ captions 1, 2; image 1 ↔ caption 0
    m = evaluate_retrieval(img * 3, txt, [1, 0, 0])  # unnormalised input is normalised inside
    assert m["i2t_R@1"] == 100.0 and m["t2i_R@1"] == 100.0 and m["rsum"] == 600.0
    assert m["i2t_medr"] == 1.0 and m["t2i_meanr"] == 1.0
    m = evaluate_retrieval(img.numpy(), txt.double(), np.array([0, 1, 1]))  # every caption on the wrong image
    # i2t: image 0's own caption 0 scores lowest of 3 → rank 2; image 1's best own caption (2) → rank 1
    assert m["i2t_R@1"] == 0.0 and m["i2t_R@5"] == 100.0 and m["i2t_medr"] == 2.0
    assert m["t2i_R@1"] == 0.0 and m["t2i_meanr"] == 2.0 and m["rsum"] == 400.0
    # a pure tie: both images score 0 with the caption; the lower index (image 0) ranks first
    m = evaluate_retrieval([[1.0, 0.0], [-1.0, 0.0]], [[0.0, 1.0], [0.0, 1.0]], [1, 0])
    assert m["t2i_R@1"] == 50.0 and m["i2t_R@1"] == 50.0


def test_rerank_sees_query_rows_and_changes_scores() -> None:
    rng = np.random.default_rng(4)
    t2i = np.repeat(np.arange(12), 2)
    img, txt = exact_unit_vectors(rng, 12), exact_unit_vectors(rng, 24)
    seen = []

    def negate(scores: torch.Tensor, rows: torch.Tensor, direction: str) -> torch.Tensor:
        seen.append((direction, rows.tolist(), tuple(scores.shape)))
        return -scores

    got = evaluate_retrieval(img, txt, t2i, chunk_size=5, rerank=negate)
    assert got == evaluate_retrieval(img, -txt, t2i, chunk_size=5)  # cos(x, −y) = −cos(x, y), exactly
    assert [s for s in seen if s[0] == "i2t"][0] == ("i2t", [0, 1, 2, 3, 4], (5, 24))
    assert [s for s in seen if s[0] == "t2i"][-1] == ("t2i", [20, 21, 22, 23], (4, 12))
    with pytest.raises(ValueError, match="shape"):
        evaluate_retrieval(img, txt, t2i, rerank=lambda s, r, d: s[:, :1])


@pytest.mark.parametrize("args, match", [
    ((np.eye(3), np.eye(3), [0, 0, 1]), "image 2 has no caption"),
    ((np.eye(3), np.eye(3), [0, 1, 3]), r"txt2img\[2\] = 3"),
    ((np.eye(3), np.eye(3), [0, 1]), "2 entries for 3 captions"),
    ((np.eye(3), np.eye(3)[:, :2], [0, 1, 2]), "3-d but text embeddings 2-d"),
    ((np.array([[1.0, np.nan], [0, 1]]), np.eye(2), [0, 1]), "row 0 is not finite"),
    ((np.eye(2), np.eye(2), [0.0, 1.0]), "integer"),
    ((np.zeros(3), np.eye(3), [0, 1, 2]), "2-D"),
])
def test_bad_input_is_a_one_line_data_error(args: tuple, match: str) -> None:
    with pytest.raises(DataError, match=match):
        evaluate_retrieval(*args)


def _reference_topk(S: np.ndarray, k: int) -> np.ndarray:
    return np.array([sorted(range(S.shape[1]), key=lambda j: (-S[i, j], j))[:k] for i in range(len(S))])


@pytest.mark.parametrize("chunk", [1, 4, 100])
def test_topk_equals_sorted_reference_with_ties(chunk: int) -> None:
    rng = np.random.default_rng(5)
    q, g = exact_unit_vectors(rng, 9), exact_unit_vectors(rng, 40)  # scores in {−1, …, 1}: ties everywhere
    S = q.astype(np.float64) @ g.astype(np.float64).T
    for k in (1, 3, 10, 40, 99):
        scores, idx = topk(q, g, k, chunk_size=chunk)
        ref = _reference_topk(S, min(k, 40))
        assert idx.tolist() == ref.tolist(), k
        assert np.allclose(scores, np.take_along_axis(S, ref, 1))


def test_topk_lower_index_wins_at_the_cut() -> None:
    q = np.array([[1.0, 0.0]])
    g = np.array([[0.0, 1.0], [1.0, 0.0], [1.0, 0.0], [2.0, 0.0], [0.5, 0.0]])
    scores, idx = topk(q, g, 2, chunk_size=1)
    assert idx.tolist() == [[1, 2]] and np.allclose(scores, 1.0)
    assert topk(np.zeros((0, 2)), g, 3)[1].shape == (0, 3)


def test_evaluator_is_sentence_transformers_style() -> None:
    ev = RetrievalEvaluator()
    assert ev.primary_metric == PRIMARY_METRIC == "rsum" and ev.greater_is_better
    assert not RetrievalEvaluator("t2i_medr").greater_is_better
    with pytest.raises(ValueError):
        RetrievalEvaluator("accuracy")
    rng = np.random.default_rng(6)
    img = rng.normal(size=(5, 4))
    out = ev(img, img, np.arange(5))
    assert out[ev.primary_metric] == 600.0


@pytest.mark.parametrize("scores, t2i, match", [
    (np.zeros((0, 3)), [0, 0, 0], "non-empty"),
    (np.full((2, 3), np.nan), [0, 1, 1], "non-finite"),
    (np.zeros((2, 3)), [0, 0, 0], "at least one caption"),
    (np.zeros((2, 3)), [0, 1], "txt2img"),
])
def test_metrics_from_scores_bad_input(scores: np.ndarray, t2i: list[int], match: str) -> None:
    with pytest.raises(DataError, match=match):
        metrics_from_scores(scores, t2i)
