from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA as SkPCA
from sklearn.decomposition import IncrementalPCA

from itrkit.errors import ConfigError
from itrkit.teachers.reduce import PCA, Reducer, parse_reduction, pool_tokens


def _tokens(n: int, t: int, d: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).standard_normal((n, t, d)).astype(np.float32))


def test_mean_cls_flatten_against_loops() -> None:
    x = _tokens(3, 10, 4)  # 10 = 3² + 1: a leading CLS token is inferred
    got = pool_tokens(x, "mean")
    for i in range(3):
        want = sum(x[i, j] for j in range(1, 10)) / 9
        assert torch.allclose(got[i], want, atol=1e-6)
    assert torch.equal(pool_tokens(x, "cls"), x[:, 0])
    assert torch.equal(pool_tokens(x, "flatten"), x.reshape(3, 40))
    y = _tokens(2, 9, 4)  # 9 = 3²: all patches
    assert torch.allclose(pool_tokens(y, "mean"), y.mean(1))
    assert torch.allclose(pool_tokens(x, "mean", has_cls=False), x.mean(1))


def test_grid_pooling_against_loops() -> None:
    s, d = 4, 3
    x = _tokens(2, s * s + 1, d, seed=1)
    got = pool_tokens(x, "grid:2")
    assert got.shape == (2, 4 * d)
    for n in range(2):
        patches = x[n, 1:].reshape(s, s, d)  # row-major patch grid
        for ci in range(2):
            for cj in range(2):
                cell = patches[2 * ci:2 * ci + 2, 2 * cj:2 * cj + 2].reshape(-1, d).mean(0)
                k = ci * 2 + cj
                assert torch.allclose(got[n, k * d:(k + 1) * d], cell, atol=1e-6)
    assert torch.allclose(pool_tokens(x, "grid:1"), pool_tokens(x, "mean"), atol=1e-6)
    assert torch.allclose(pool_tokens(x, f"grid:{s}"), x[:, 1:].reshape(2, -1))
    with pytest.raises(ConfigError, match="square grid"):
        pool_tokens(_tokens(1, 7, 2), "grid:2")
    with pytest.raises(ConfigError, match="between 1 and the grid size 4"):
        pool_tokens(x, "grid:5")
    with pytest.raises(ConfigError, match="unknown pooling"):
        pool_tokens(x, "max")


def test_pca_matches_sklearn_up_to_sign() -> None:
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((60, 9)) @ rng.standard_normal((9, 9))).astype(np.float32)
    ours = PCA(4).fit(x)
    ref = SkPCA(4, svd_solver="full").fit(x.astype(np.float64))
    a, b = ours.transform(x).numpy(), ref.transform(x.astype(np.float64))
    for j in range(4):
        sign = np.sign(a[:, j] @ b[:, j])
        assert np.allclose(a[:, j], sign * b[:, j], atol=1e-3)
    assert np.allclose(ours.explained_variance.numpy(), ref.explained_variance_, rtol=1e-4)
    assert ours.explained_variance_ratio == pytest.approx(ref.explained_variance_ratio_.sum(), rel=1e-5)


def test_partial_fit_matches_incremental_and_exact() -> None:
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((120, 6)) @ rng.standard_normal((6, 6)) + 5).astype(np.float32)
    inc = PCA(6)
    for i in range(0, 120, 30):
        inc.partial_fit(x[i:i + 30])
    exact = PCA(6).fit(x)  # all components kept: the incremental update loses nothing
    assert torch.allclose(inc.mean, exact.mean, atol=1e-4)
    a, b = inc.transform(x).numpy(), exact.transform(x).numpy()
    assert np.allclose(np.abs(a), np.abs(b), atol=2e-3)
    trunc = PCA(3)
    ref = IncrementalPCA(3)
    for i in range(0, 120, 30):
        trunc.partial_fit(x[i:i + 30])
        ref.partial_fit(x[i:i + 30].astype(np.float64))
    a, b = trunc.transform(x).numpy(), ref.transform(x.astype(np.float64))
    assert np.allclose(np.abs(a), np.abs(b), atol=2e-3)
    assert trunc.explained_variance_ratio == pytest.approx(ref.explained_variance_ratio_.sum(), rel=1e-4)


def test_pca_save_load_and_errors(tmp_path: Path) -> None:
    x = np.random.default_rng(5).standard_normal((20, 5)).astype(np.float32)
    p = PCA(2).fit(x)
    p.save(tmp_path / "pca.safetensors")
    q = PCA.load(tmp_path / "pca.safetensors")
    assert torch.equal(p.transform(x), q.transform(x)) and q.n_seen == 20 and q.total_var == p.total_var
    from safetensors.torch import save_file

    save_file(p.state(), str(tmp_path / "old.safetensors"),  # the two-key metadata of earlier versions
              metadata={"n_seen": str(p.n_seen), "total_var": repr(p.total_var)})
    old = PCA.load(tmp_path / "old.safetensors")
    assert (old.n_seen, old.total_var) == (20, p.total_var)
    p.save(tmp_path / "again.safetensors")  # one metadata key: the same bytes on every save
    assert (tmp_path / "again.safetensors").read_bytes() == (tmp_path / "pca.safetensors").read_bytes()
    with pytest.raises(ConfigError, match="needs at least"):
        PCA(6).fit(x)
    with pytest.raises(ConfigError, match="fitted on dimension 5"):
        p.transform(np.zeros((1, 4)))


def test_parse_and_reducer() -> None:
    assert parse_reduction(None) == [] and parse_reduction("grid:2+pca:16") == ["grid:2", "pca:16"]
    for bad, msg in [("pca:4+mean", "PCA must be the last"), ("mean+cls", "pooling"), ("pca:x", "integer"),
                     ("zoom", "unknown reduction step"), ("pca:0", "positive")]:
        with pytest.raises(ConfigError, match=msg):
            parse_reduction(bad)
    r = Reducer("mean")
    with pytest.raises(ConfigError, match="pools tokens"):
        r.pool(torch.zeros(2, 8))
    flat = Reducer(None)
    assert flat.pool(_tokens(2, 4, 3)).shape == (2, 12)
    assert flat.header() == [{"type": "pool", "mode": "flatten", "tokens": 4, "token_dim": 3, "has_cls": False}]
    with pytest.raises(ConfigError, match="5×3 tokens after 4×3"):
        flat.pool(_tokens(2, 5, 3))
