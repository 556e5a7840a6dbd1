"""Index at scale: the auto backend rule, IVF backends, calibration to a target recall, stored parameters."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import itrkit.index.backends as backends
from itrkit.errors import StoreError
from itrkit.index.backends import (
    FaissHNSWIndex,
    FaissIVFIndex,
    FaissIVFPQIndex,
    build_calibrated,
    calibrate,
    choose_backend,
    load_backend,
)
from itrkit.index.build import build_index, load_index


def clustered(n: int, d: int = 32, clusters: int = 40, noise: float = 0.35, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).standard_normal((clusters, d))
    x = centres[rng.integers(0, clusters, n)] + noise * rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def slow_recall(index, data: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """Reference: full argsort of every score row (float64), share of each true top-k found."""
    truth = np.argsort(-(queries.astype(np.float64) @ data.astype(np.float64).T), axis=1, kind="stable")[:, :k]
    found = index.search(queries, k)[1]
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found.tolist(), truth.tolist())]))


def test_auto_picks_exact_up_to_the_threshold_and_hnsw_above() -> None:
    assert choose_backend(1) == "exact"
    assert choose_backend(backends.AUTO_EXACT_MAX) == "exact"
    assert choose_backend(backends.AUTO_EXACT_MAX + 1) == "faiss-hnsw"
    assert choose_backend(10, "faiss-ivf") == "faiss-ivf"  # an explicit choice is kept


@pytest.mark.parametrize("backend", ["faiss-ivf", "faiss-hnsw"])
def test_calibration_reaches_the_target_on_held_out_queries(backend: str) -> None:
    data = clustered(6000)
    held_out = clustered(300, seed=1)  # same clusters, not indexed
    index, info = build_calibrated(backend, data, held_out, target_recall=0.95, n_queries=300,
                                   m=8, ef_construction=16)
    assert info["reached"] and info["queries"] == 300 and info["query_source"] == "given"
    # The recall it reports is what an independent reference measures with the chosen parameters.
    assert info["params"] == index.search_params()
    assert slow_recall(index, data, held_out) == pytest.approx(info["recall_at_10"], abs=1e-4)
    assert info["recall_at_10"] >= 0.95
    # ... and the smallest knob (its lower bound) falls short, so calibration had work to do.
    knob = index.knob
    index.set_params(**{knob: index.knob_range()[0]})
    assert slow_recall(index, data, held_out) < 0.95


def test_calibration_keeps_the_smallest_passing_value_it_tried() -> None:
    data = clustered(6000)
    queries = clustered(200, seed=2)
    index = FaissIVFIndex(32, nlist=128)
    index.add(data)
    cal = calibrate(index, queries, backends.ExactIndex.from_vectors(data), target_recall=0.9)
    passing = [v for v, r in cal.tried if r >= 0.9]
    assert cal.reached and cal.params["nprobe"] == min(passing)
    assert dict(cal.tried)[cal.params["nprobe"]] == cal.recall


def test_unreachable_target_keeps_the_largest_value_and_says_so() -> None:
    data = clustered(2000, noise=2.0)
    index = FaissHNSWIndex(32, m=4, ef_construction=8)
    index.add(data)
    index.knob_range = lambda: (16, 16)  # type: ignore[method-assign]  # one value: cannot be raised
    cal = calibrate(index, clustered(100, noise=2.0, seed=3), backends.ExactIndex.from_vectors(data), 1.0)
    assert not cal.reached and cal.params == {"ef_search": 16} and cal.recall < 1.0


def test_ivf_never_pads_when_probed_cells_hold_fewer_than_k() -> None:
    data = clustered(800)
    index = FaissIVFIndex(32, nlist=40, nprobe=1)
    index.add(data)
    scores, idx = index.search(data[:20], 200)
    assert (idx >= 0).all() and idx.shape == (20, 200)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", data[:20], data[idx]), atol=1e-5)


def test_ivfpq_reranks_to_true_inner_products_and_round_trips(tmp_path: Path) -> None:
    data, queries = clustered(3000, d=16), clustered(50, d=16, seed=4)
    index = FaissIVFPQIndex(16, nlist=16, nprobe=4, pq_m=4, rerank=8)
    index.add(data)
    scores, idx = index.search(queries, 10)
    np.testing.assert_allclose(scores, np.einsum("qd,qkd->qk", queries, data[idx]), atol=1e-5)
    assert slow_recall(index, data, queries) >= 0.8
    index.save(tmp_path / "pq.faiss")
    loaded = load_backend("faiss-ivfpq", tmp_path / "pq.faiss", params={"nprobe": 4, "rerank": 8}, vectors=data)
    for a, b in zip(index.search(queries, 10), loaded.search(queries, 10)):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(StoreError, match="no search parameter ef_search"):
        loaded.set_params(ef_search=3)


def test_load_applies_the_given_search_params(tmp_path: Path) -> None:
    data, queries = clustered(3000), clustered(40, seed=5)
    index = FaissIVFIndex(32, nlist=64, nprobe=1)
    index.add(data)
    index.save(tmp_path / "ivf.faiss")
    loaded = load_backend("faiss-ivf", tmp_path / "ivf.faiss", params={"nprobe": 9})
    index.set_params(nprobe=9)
    assert loaded.search_params() == {"nprobe": 9}
    for a, b in zip(index.search(queries, 10), loaded.search(queries, 10)):
        np.testing.assert_array_equal(a, b)


def test_auto_build_above_the_threshold_stores_calibration_and_search_uses_it(
        tmp_path: Path, colour_dataset, colour_encoder, monkeypatch: pytest.MonkeyPatch) -> None:
    from itrkit.index.build import _manifest_digest

    small = build_index(colour_encoder, colour_dataset, tmp_path / "small", progress=False)
    assert json.loads((small / "manifest.json").read_text())["backend"] == "exact"  # 16 captions: exact

    monkeypatch.setattr(backends, "AUTO_EXACT_MAX", 10)  # 16 captions > 10: approximate
    out = build_index(colour_encoder, colour_dataset, tmp_path / "ix", progress=False, target_recall=0.95)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["backend"] == "faiss-hnsw"
    cal = manifest["calibration"]
    assert set(cal) == {"image_embeds", "image_uni", "text_embeds"}
    assert cal["image_embeds"]["query_source"] == "given" and cal["image_uni"]["query_source"] == "indexed"
    assert all(c["recall_at_10"] >= 0.95 and c["reached"] for c in cal.values())
    reader = load_index(out)
    assert reader.image_index.search_params() == cal["image_embeds"]["params"]

    # The manifest's parameters win over what the faiss file carries.
    cal["image_embeds"]["params"] = {"ef_search": 77}
    manifest["manifest_sha256"] = _manifest_digest(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert load_index(out).image_index.search_params() == {"ef_search": 77}


def test_cli_defaults_to_auto_and_checks_the_target(tmp_path: Path, colour_dataset, monkeypatch, make_encoder,
                                                    capsys) -> None:
    import argparse

    import itrkit.cli.index as cli
    from itrkit.errors import ConfigError

    monkeypatch.setattr(cli, "load_encoder", lambda run_dir: make_encoder())
    p = argparse.ArgumentParser(prog="itrkit")
    cli.add_parsers(p.add_subparsers(dest="cmd", required=True))
    colour_dataset.save(tmp_path / "data")
    base = ["index", "build", "--run", str(tmp_path / "run"), "--images", str(tmp_path / "data"), "--quiet"]
    args = p.parse_args([*base, "--out", str(tmp_path / "ix")])
    assert args.backend == "auto" and args.target_recall == 0.95
    assert args.func(args) == 0
    assert "(exact)" in capsys.readouterr().out  # 8 images, 16 captions: below the threshold
    bad = p.parse_args([*base, "--out", str(tmp_path / "ix2"), "--target-recall", "1.5"])
    with pytest.raises(ConfigError, match="--target-recall"):
        bad.func(bad)
    assert not (tmp_path / "ix2").exists()
