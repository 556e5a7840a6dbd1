"""The one-matmul ranking path counts with the numba loop (threaded row ranges) or torch ops in
cache-sized tiles; neither edges, ties nor the thread split may change a rank."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from itrkit.errors import DataError
from itrkit.eval import counts, retrieval
from itrkit.eval.retrieval import evaluate_retrieval, l2_normalize, ranks
from tests.eval._vectors import exact_unit_vectors
from tests.eval.test_retrieval_reference import _reference_metrics, _reference_ranks

COUNTERS = [("torch", (1, 1)), ("torch", (2, 3)), ("torch", (3, 5)), ("torch", (256, 4096)),
            ("numba", (1, 1)), ("numba", (1, 2)), ("numba", (1, 3))]


def test_numba_counter_is_the_default_here() -> None:
    assert retrieval.COUNTER == "numba" and counts.available()


@pytest.mark.parametrize("counter,tile", COUNTERS)
def test_tiled_counts_equal_the_reference_loop_with_ties(monkeypatch: pytest.MonkeyPatch, counter: str,
                                                         tile: tuple[int, int]) -> None:
    # numba: tile[1] = torch threads = row ranges per block (1: inline, 2-3: thread pool)
    monkeypatch.setattr(retrieval, "COUNTER", counter)
    monkeypatch.setattr(torch, "get_num_threads", lambda: tile[1])
    monkeypatch.setattr(retrieval, "_TILE_ROWS", tile[0])
    monkeypatch.setattr(retrieval, "_TILE_COLS", tile[1])
    for seed in range(4):
        rng = np.random.default_rng(100 + seed)
        n = int(rng.integers(6, 15))
        t2i = np.repeat(np.arange(n), rng.integers(1, 6, size=n))
        rng.shuffle(t2i)
        img, txt = exact_unit_vectors(rng, n), exact_unit_vectors(rng, len(t2i))
        img[2] = img[0]  # exact ties in both directions, split across tiles
        txt[3] = txt[1]
        S = img.astype(np.float64) @ txt.astype(np.float64).T
        ref = _reference_metrics(*_reference_ranks(S, t2i))
        for chunk in (1, 4, 4096):
            got = evaluate_retrieval(img, txt, t2i, chunk_size=chunk)
            for k in ref:
                assert got[k] == pytest.approx(ref[k], abs=1e-9), (tile, seed, chunk, k)


@pytest.mark.parametrize("counter", ["torch", "numba"])
def test_tiled_ranks_equal_untiled_on_float_scores(monkeypatch: pytest.MonkeyPatch, counter: str) -> None:
    monkeypatch.setattr(retrieval, "COUNTER", counter)
    rng = np.random.default_rng(5)
    n, d = 60, 12
    t2i = np.repeat(np.arange(n), 5)
    img = rng.normal(size=(n, d)).astype(np.float32)
    txt = (img[t2i] + 1.2 * rng.normal(size=(len(t2i), d))).astype(np.float32)
    S = (l2_normalize(img) @ l2_normalize(txt).T).numpy()
    ref_i2t, ref_t2i = _reference_ranks(S, t2i)
    monkeypatch.setattr(retrieval, "_TILE_ROWS", 7)
    monkeypatch.setattr(retrieval, "_TILE_COLS", 33)
    got_i2t, got_t2i = ranks(img, txt, t2i, chunk_size=n)
    assert got_i2t.tolist() == ref_i2t and got_t2i.tolist() == ref_t2i


def test_l2_normalize_equals_torch_and_still_names_the_bad_row() -> None:
    x = torch.randn(9, 5)
    assert torch.equal(l2_normalize(x), torch.nn.functional.normalize(x, dim=1))
    zero = torch.zeros(2, 3)
    assert torch.equal(l2_normalize(zero), zero)
    big = torch.full((2, 4), 3e38)  # finite entries whose norm overflows: not an error
    assert torch.isfinite(l2_normalize(big)).all()
    for bad in (float("nan"), float("inf")):
        y = x.clone()
        y[6, 2] = bad
        with pytest.raises(DataError, match="row 6 is not finite"):
            l2_normalize(y)
