"""Vector index backends against an explicit-loop reference."""

from __future__ import annotations

import numpy as np
import pytest

from itrkit.errors import ConfigError, StoreError
from itrkit.index.backends import (
    ExactIndex,
    FaissFlatIndex,
    FaissHNSWIndex,
    load_backend,
    make_index,
)


def slow_top_k(data: np.ndarray, queries: np.ndarray, k: int) -> tuple[list[list[float]], list[list[int]]]:
    """Reference: score every pair with a Python loop, sort by (-score, index)."""
    all_s, all_i = [], []
    for q in queries:
        scored = []
        for j, row in enumerate(data):
            s = 0.0
            for a, b in zip(q.tolist(), row.tolist()):
                s += a * b
            scored.append((-s, j))
        scored.sort()
        top = scored[:min(k, len(data))]
        all_s.append([-s for s, _ in top])
        all_i.append([j for _, j in top])
    return all_s, all_i


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("chunk", [7, 64, 100000])
def test_exact_matches_loop_reference_with_ties(chunk: int) -> None:
    rng = np.random.default_rng(0)
    # Small integer vectors give many exactly tied scores; duplicates tie at every query.
    data = rng.integers(-2, 3, size=(90, 6)).astype(np.float32)
    data[3] = data[40] = data[77] = 5.0  # three copies that beat every other row for query 0
    queries = rng.integers(-2, 3, size=(11, 6)).astype(np.float32)
    queries[0] = 1.0
    index = ExactIndex(6, chunk_size=chunk, query_chunk=4)
    index.add(data[:50])
    index.add(data[50:])
    for k in (1, 5, 13, 90):
        scores, idx = index.search(queries, k)
        ref_s, ref_i = slow_top_k(data, queries, k)
        assert idx.tolist() == ref_i
        np.testing.assert_allclose(scores, ref_s, rtol=0, atol=1e-5)
    # The three copies of row 3 are tied at the top for query 0: lowest index first.
    assert index.search(queries[:1], 3)[1].tolist() == [[3, 40, 77]]


def test_k_larger_than_gallery_is_clamped_and_bad_inputs_are_refused() -> None:
    rng = np.random.default_rng(1)
    data = unit(rng, 5, 4)
    for index in (ExactIndex(4), FaissFlatIndex(4), FaissHNSWIndex(4, m=4)):
        index.add(data)
        s, i = index.search(data[0], 50)
        assert s.shape == (1, 5) and sorted(i[0].tolist()) == [0, 1, 2, 3, 4]
        with pytest.raises(StoreError, match="dimension 4"):
            index.search(np.zeros((1, 3), np.float32), 1)
        with pytest.raises(StoreError, match="row 1 is not finite"):
            index.add(np.array([[0, 0, 0, 1], [np.nan, 0, 0, 0]], np.float32))
        with pytest.raises(StoreError, match="k must be at least 1"):
            index.search(data[:1], 0)
    with pytest.raises(ConfigError, match="unknown index backend"):
        make_index("annoy", 4)


def test_empty_index_returns_no_columns() -> None:
    s, i = ExactIndex(3).search(np.ones((2, 3), np.float32), 4)
    assert s.shape == (2, 0) and i.shape == (2, 0)


def test_faiss_flat_agrees_with_reference() -> None:
    rng = np.random.default_rng(2)
    data, queries = unit(rng, 300, 16), unit(rng, 9, 16)
    index = make_index("faiss-flat", 16)
    index.add(data)
    scores, idx = index.search(queries, 10)
    ref_s, ref_i = slow_top_k(data, queries, 10)
    assert idx.tolist() == ref_i  # continuous random data: no ties
    np.testing.assert_allclose(scores, ref_s, atol=1e-5)


def test_hnsw_recall_and_scores_are_true_inner_products() -> None:
    rng = np.random.default_rng(3)
    data, queries = unit(rng, 2000, 16), unit(rng, 50, 16)
    index = FaissHNSWIndex(16, m=16, ef_construction=100, ef_search=64)
    index.add(data)
    scores, idx = index.search(queries, 10)
    _, ref_i = slow_top_k(data, queries, 10)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(idx.tolist(), ref_i)])
    assert recall >= 0.95
    # Whatever HNSW returns, the score must be the real inner product of that pair.
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, data[idx]), atol=1e-5)


@pytest.mark.parametrize("backend,suffix", [("exact", "safetensors"), ("faiss-flat", "faiss"),
                                            ("faiss-hnsw", "faiss")])
def test_save_load_round_trip(tmp_path, backend: str, suffix: str) -> None:
    rng = np.random.default_rng(4)
    data, queries = unit(rng, 200, 8), unit(rng, 5, 8)
    params = {"m": 8, "ef_construction": 40, "ef_search": 33} if backend == "faiss-hnsw" else {}
    index = make_index(backend, 8, **params)
    index.add(data)
    path = tmp_path / f"vectors.{suffix}"
    index.save(path)
    loaded = load_backend(backend, path)
    assert loaded.ntotal == 200 and loaded.dim == 8
    if backend == "faiss-hnsw":
        assert (loaded.m, loaded.ef_construction, loaded.ef_search) == (8, 40, 33)
    for a, b in zip(index.search(queries, 7), loaded.search(queries, 7)):
        np.testing.assert_array_equal(a, b)
    # No temporary files are left beside the index.
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_loading_a_damaged_file_is_a_store_error(tmp_path) -> None:
    bad = tmp_path / "x.faiss"
    bad.write_bytes(b"not a faiss index at all")
    with pytest.raises(StoreError, match="x.faiss"):
        load_backend("faiss-flat", bad)
    with pytest.raises(StoreError, match="x.faiss"):
        load_backend("exact", bad)
    with pytest.raises(StoreError, match="not found"):
        load_backend("faiss-hnsw", tmp_path / "missing.faiss")
    flat = FaissFlatIndex(4)
    flat.add(np.eye(4, dtype=np.float32))
    flat.save(tmp_path / "flat.faiss")
    with pytest.raises(StoreError, match="not a faiss HNSW index"):
        load_backend("faiss-hnsw", tmp_path / "flat.faiss")


def test_from_vectors_copies_unless_told_not_to() -> None:
    data = np.eye(4, dtype=np.float32)
    copied, shared = ExactIndex.from_vectors(data), ExactIndex.from_vectors(data, copy=False)
    data[0, 0] = -1.0
    assert copied.search(np.eye(4, dtype=np.float32)[:1], 1)[0][0, 0] == 1.0
    assert shared.search(np.eye(4, dtype=np.float32)[:1], 1)[0][0, 0] == 0.0
