"""Dimension reduction of teacher features: pooling of patch tokens, and PCA.

The paper's image teacher (Unicom ViT-B/32) gives 49 patch tokens × 768 = 37,632 values per
image; the authors kept them all (a 15.9 GB pickled dict for COCO). Soft labels only need the
teacher's cosine similarities (docs/method.md §1.3, ``softmax(cos(t, t)/τ)``), which pooling and PCA keep
largely intact at a small fraction of the size.

Reduction specs (strings, joined with ``+``; applied left to right)::

    "mean"        mean of the patch tokens (a leading CLS token is dropped, see pool_tokens)
    "cls"         the CLS token (token 0)
    "grid:k"      patch tokens on their s×s grid, average-pooled to k×k cells → k·k·D values
    "flatten"     all tokens concatenated (T·D values; what the paper stored)
    "pca:n"       project on the first n principal components (fitted on a sample of rows)

e.g. ``"grid:2+pca:512"``. A teacher that returns ``[B, T, D]`` tokens with no pooling step is
flattened.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itrkit.errors import ConfigError, StoreError

POOL_MODES = ("mean", "cls", "flatten")


def _is_square(n: int) -> bool:
    return n >= 1 and math.isqrt(n) ** 2 == n


def _has_cls(t: int, has_cls: bool | None) -> bool:
    if has_cls is not None:
        return has_cls
    # T = s² patches → no CLS; T = s² + 1 → a leading CLS token (ViT layout).
    return not _is_square(t) and _is_square(t - 1)


def pool_tokens(x: torch.Tensor | np.ndarray, mode: str = "mean", has_cls: bool | None = None) -> torch.Tensor:
    """Pool ``[N, T, D]`` tokens to ``[N, D']`` float32.

    ``has_cls=None`` infers a leading CLS token when T − 1 (and not T) is a perfect square.
    ``mean`` averages the patch tokens (all tokens if T is neither s² nor s² + 1); ``grid:k``
    needs the patches on a square grid and returns the k×k cells row-major, each D values.
    """
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).float()
    if t.ndim != 3:
        raise ConfigError(f"pool_tokens needs [N, T, D] tokens, got shape {tuple(t.shape)}")
    n, tokens, d = t.shape
    cls = _has_cls(tokens, has_cls)
    if mode == "cls":
        if has_cls is False:
            raise ConfigError("reduction 'cls' needs a CLS token, but has_cls=False")
        return t[:, 0]
    if mode == "flatten":
        return t.reshape(n, tokens * d)
    patches = t[:, 1:] if cls else t
    if mode == "mean":
        return patches.mean(dim=1)
    if mode.startswith("grid:"):
        k = _int_arg(mode)
        p = patches.shape[1]
        if not _is_square(p):
            raise ConfigError(f"reduction '{mode}': {p} patch tokens do not form a square grid")
        s = math.isqrt(p)
        if not 1 <= k <= s:
            raise ConfigError(f"reduction '{mode}': k must be between 1 and the grid size {s}")
        grid = patches.reshape(n, s, s, d).permute(0, 3, 1, 2)  # tokens are row-major patches
        pooled = torch.nn.functional.adaptive_avg_pool2d(grid, k)  # [N, D, k, k]
        return pooled.permute(0, 2, 3, 1).reshape(n, k * k * d)
    raise ConfigError(f"unknown pooling mode '{mode}' (mean, cls, flatten or grid:k)")


def _int_arg(step: str) -> int:
    try:
        v = int(step.split(":", 1)[1])
    except (IndexError, ValueError):
        raise ConfigError(f"reduction '{step}' needs an integer after ':'") from None
    if v <= 0:
        raise ConfigError(f"reduction '{step}' needs a positive integer")
    return v


class PCA:
    """Principal component projection, float32, on torch.

    ``fit`` is exact (``torch.linalg.svd`` of the centred sample). ``partial_fit`` updates the
    fit batch by batch (incremental SVD, Ross et al. 2008: stack the previous components scaled by
    their singular values, the new centred batch and a mean-correction row, then re-decompose),
    so memory is (n_components + batch) × dim whatever the sample size. Component signs follow
    the largest-magnitude loading (positive), so refits are reproducible.
    """

    def __init__(self, n_components: int) -> None:
        if n_components <= 0:
            raise ConfigError(f"PCA needs n_components > 0, got {n_components}")
        self.n_components = int(n_components)
        self.mean: torch.Tensor | None = None
        self.components: torch.Tensor | None = None  # [k, D]
        self.singular_values: torch.Tensor | None = None
        self.n_seen = 0
        self.total_var = 0.0  # Σ of per-feature variances × (n − 1): denominator of the ratio

    @staticmethod
    def _flip(vh: torch.Tensor) -> torch.Tensor:
        idx = vh.abs().argmax(dim=1)
        signs = torch.sign(vh[torch.arange(vh.shape[0]), idx])
        signs[signs == 0] = 1
        return vh * signs[:, None]

    def fit(self, x: torch.Tensor | np.ndarray) -> PCA:
        """Exact PCA of ``x`` ``[N, D]``."""
        x = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x).float()
        n, d = x.shape
        if n < 2 or self.n_components > min(n, d):
            raise ConfigError(f"PCA with {self.n_components} components needs at least that many rows and "
                              f"columns (got {n} rows of dimension {d})")
        self.mean = x.mean(dim=0)
        xc = x - self.mean
        _, s, vh = torch.linalg.svd(xc, full_matrices=False)
        self.components = self._flip(vh[: self.n_components]).contiguous()
        self.singular_values = s[: self.n_components].clone()
        self.n_seen = n
        self.total_var = float((s.double() ** 2).sum())
        return self

    def partial_fit(self, x: torch.Tensor | np.ndarray) -> PCA:
        """Update the fit with one more batch of rows (the first batch needs ≥ n_components rows)."""
        x = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x).float()
        if self.mean is None:
            if x.shape[0] < self.n_components:
                raise ConfigError(f"the first PCA batch needs ≥ {self.n_components} rows, got {x.shape[0]}")
            mean = x.mean(dim=0)
            stacked = x - mean
            n_total = x.shape[0]
            total_var = float(((x.double() - mean.double()) ** 2).sum())
        else:
            assert self.components is not None and self.singular_values is not None
            n_old, n_new = self.n_seen, x.shape[0]
            n_total = n_old + n_new
            batch_mean = x.mean(dim=0)
            mean = (n_old * self.mean + n_new * batch_mean) / n_total
            correction = math.sqrt(n_old * n_new / n_total) * (self.mean - batch_mean)
            stacked = torch.cat([self.singular_values[:, None] * self.components, x - batch_mean, correction[None]])
            total_var = (self.total_var + float(((x.double() - batch_mean.double()) ** 2).sum())
                         + float((correction.double() ** 2).sum()))
        _, s, vh = torch.linalg.svd(stacked, full_matrices=False)
        k = min(self.n_components, vh.shape[0])
        # Sign flips do not change the subspace: Σ·V stacks the same Gram matrix either way.
        self.components = self._flip(vh[:k]).contiguous()
        self.singular_values = s[:k].clone()
        self.mean, self.n_seen, self.total_var = mean, n_total, total_var
        return self

    @property
    def fitted(self) -> bool:
        return self.components is not None

    @property
    def input_dim(self) -> int:
        assert self.components is not None
        return int(self.components.shape[1])

    @property
    def explained_variance(self) -> torch.Tensor:
        assert self.singular_values is not None
        return self.singular_values ** 2 / max(self.n_seen - 1, 1)

    @property
    def explained_variance_ratio(self) -> float:
        """Share of the sample's total variance kept by the components."""
        assert self.singular_values is not None
        return float((self.singular_values.double() ** 2).sum() / self.total_var) if self.total_var > 0 else 1.0

    def transform(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """``(x − mean) @ componentsᵀ``: ``[N, D]`` → ``[N, n_components]``."""
        if self.components is None or self.mean is None:
            raise ConfigError("PCA is not fitted")
        x = torch.as_tensor(np.asarray(x, dtype=np.float32) if not isinstance(x, torch.Tensor) else x).float()
        if x.shape[-1] != self.input_dim:
            raise ConfigError(f"PCA fitted on dimension {self.input_dim}, got {x.shape[-1]}")
        return (x - self.mean) @ self.components.T

    def metadata(self) -> dict[str, str]:
        """The fit's counts as safetensors metadata: one key, because safetensors writes a
        several-key metadata map in a per-process random order (the file's bytes would differ
        between two identical runs)."""
        return {"pca": json.dumps({"n_seen": self.n_seen, "total_var": repr(self.total_var)}, sort_keys=True)}

    def state(self) -> dict[str, torch.Tensor]:
        assert self.components is not None and self.mean is not None and self.singular_values is not None
        return {"mean": self.mean, "components": self.components, "singular_values": self.singular_values}

    def save(self, path: str | Path) -> None:
        from safetensors.torch import save_file

        from itrkit.utils.io import atomic_path

        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.state().items()}, str(tmp), metadata=self.metadata())

    @classmethod
    def from_state(cls, tensors: dict[str, torch.Tensor], n_seen: int = 0, total_var: float = 0.0) -> PCA:
        try:
            comps = tensors["components"].float()
            pca = cls(comps.shape[0])
            pca.components, pca.mean = comps, tensors["mean"].float()
            pca.singular_values = tensors["singular_values"].float()
        except KeyError as e:
            raise StoreError(f"PCA state lacks '{e.args[0]}'") from None
        if pca.mean.shape != (comps.shape[1],) or pca.singular_values.shape != (comps.shape[0],):
            raise StoreError("PCA state has inconsistent shapes")
        pca.n_seen, pca.total_var = n_seen, total_var
        return pca

    @classmethod
    def load(cls, path: str | Path) -> PCA:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise StoreError(f"{path} is missing")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise StoreError(f"{path}: damaged PCA file ({type(e).__name__})") from None
        if "pca" in meta:  # the one-key form; files written before it have the two keys directly
            try:
                meta = json.loads(meta["pca"])
            except ValueError:
                raise StoreError(f"{path}: damaged PCA metadata") from None
        return cls.from_state(tensors, int(meta.get("n_seen", 0)), float(meta.get("total_var", 0.0)))

    @classmethod
    def from_store(cls, store: Any) -> PCA:
        """The PCA a reduced store was projected with (to project new items the same way)."""
        for step in store.reduction or []:
            if step.get("type") == "pca":
                if callable(getattr(store, "check_side_file", None)):
                    store.check_side_file(step["file"])  # its sha256 in the store header
                return cls.load(Path(store.path) / step["file"])
        raise StoreError(f"{store.path} was not reduced with PCA")


def parse_reduction(spec: Any) -> list[str]:
    """``None`` / ``"grid:2+pca:256"`` / ``["mean", "pca:256"]`` → validated list of steps."""
    if spec is None or spec == "" or spec == "none":
        return []
    if isinstance(spec, str):
        steps = [s.strip() for s in spec.split("+") if s.strip()]
    elif isinstance(spec, list | tuple):
        steps = [str(s).strip() for s in spec]
    else:
        raise ConfigError(f"reduction must be a string like 'mean+pca:256', not {type(spec).__name__}")
    pools = 0
    for i, s in enumerate(steps):
        if s in POOL_MODES or s.startswith("grid:"):
            if s.startswith("grid:"):
                _int_arg(s)
            pools += 1
            if i != 0:
                raise ConfigError(f"reduction '{spec}': pooling ('{s}') must come first")
        elif s.startswith("pca:"):
            _int_arg(s)
            if i != len(steps) - 1:
                raise ConfigError(f"reduction '{spec}': PCA must be the last step")
        else:
            raise ConfigError(f"unknown reduction step '{s}' (mean, cls, flatten, grid:k, pca:n)")
    if pools > 1:
        raise ConfigError(f"reduction '{spec}': at most one pooling step")
    return steps


class Reducer:
    """Applies a parsed reduction to encoder outputs and describes it for the store header."""

    def __init__(self, spec: Any = None, has_cls: bool | None = None) -> None:
        self.steps = parse_reduction(spec)
        self.pool_mode = self.steps[0] if self.steps and not self.steps[0].startswith("pca:") else None
        self.pca_components = _int_arg(self.steps[-1]) if self.steps and self.steps[-1].startswith("pca:") else 0
        self.has_cls = has_cls
        self.pca: PCA | None = None
        self.token_shape: tuple[int, int] | None = None
        self.input_dim: int | None = None

    @property
    def needs_fit(self) -> bool:
        return self.pca_components > 0 and self.pca is None

    def pool(self, x: torch.Tensor | np.ndarray) -> torch.Tensor:
        """Encoder output ``[B, D]`` or ``[B, T, D]`` → ``[B, D']`` float32 (before PCA)."""
        t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x, dtype=np.float32))
        t = t.detach().to("cpu").float()
        if t.ndim == 3:
            shape = (int(t.shape[1]), int(t.shape[2]))
            if self.token_shape is not None and shape != self.token_shape:
                raise ConfigError(f"teacher returned {shape[0]}×{shape[1]} tokens after "
                                  f"{self.token_shape[0]}×{self.token_shape[1]} before")
            self.token_shape = shape
            t = pool_tokens(t, self.pool_mode or "flatten", has_cls=self.has_cls)
        elif t.ndim == 2:
            if self.pool_mode is not None:
                raise ConfigError(f"reduction '{self.pool_mode}' pools tokens, but the teacher returned "
                                  f"pooled [B, {t.shape[1]}] vectors")
        else:
            raise ConfigError(f"teacher output must be [B, D] or [B, T, D], got shape {tuple(t.shape)}")
        if self.input_dim is not None and t.shape[1] != self.input_dim:
            raise ConfigError(f"teacher output dimension changed from {self.input_dim} to {t.shape[1]}")
        self.input_dim = int(t.shape[1])
        return t

    def fit(self, sample: torch.Tensor) -> None:
        if self.pca_components:
            if sample.shape[0] < self.pca_components:
                raise ConfigError(f"reduction pca:{self.pca_components} needs at least {self.pca_components} "
                                  f"items to fit on, got {sample.shape[0]}")
            self.pca = PCA(self.pca_components).fit(sample)

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if self.pca_components:
            if self.pca is None:
                raise ConfigError("PCA reduction used before it was fitted")
            return self.pca.transform(x)
        return x

    def header(self, pca_file: str = "pca.safetensors", sample: int = 0) -> list[dict[str, Any]] | None:
        """JSON description for the store header (None when the features are stored as returned)."""
        out: list[dict[str, Any]] = []
        if self.token_shape is not None:
            t, d = self.token_shape
            out.append({"type": "pool", "mode": self.pool_mode or "flatten", "tokens": t, "token_dim": d,
                        "has_cls": _has_cls(t, self.has_cls)})
        if self.pca is not None:
            out.append({"type": "pca", "n_components": self.pca.n_components, "input_dim": self.pca.input_dim,
                        "sample": sample, "explained_variance_ratio": round(self.pca.explained_variance_ratio, 6),
                        "file": pca_file})
        return out or None
