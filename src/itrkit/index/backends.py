"""Inner-product vector indexes with one API: exact (NumPy), faiss flat and faiss HNSW.

Every backend answers ``search(queries, k) -> (scores [Q, k], indices [Q, k])`` with rows sorted
by descending score. ``k`` larger than the number of stored vectors is clamped to it, so no
backend ever returns padding (faiss's ``-1``). Embeddings are L2-normalised upstream, so the inner
product is the cosine similarity used for retrieval (docs/method.md §4.1).

Ties in the exact backend follow the evaluation rule: equal scores rank the lower index first.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import numpy as np

from itrkit.errors import StoreError
from itrkit.utils.io import atomic_path
from itrkit.utils.optional import require

BACKENDS = ("exact", "faiss-flat", "faiss-hnsw")


class VectorIndex:
    """Common behaviour: shape checks on ``add`` and ``search``; subclasses store and score."""

    name: ClassVar[str] = ""

    def __init__(self, dim: int) -> None:
        if dim <= 0:
            raise StoreError(f"index dimension must be positive, got {dim}")
        self.dim = int(dim)

    @property
    def ntotal(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def __len__(self) -> int:
        return self.ntotal

    def add(self, vectors: np.ndarray) -> None:
        self._add(self._check(vectors, "vectors"))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product: float32 scores and int64 indices, both ``[Q, min(k, ntotal)]``."""
        q = self._check(queries, "queries")
        if k < 1:
            raise StoreError(f"k must be at least 1, got {k}")
        k = min(int(k), self.ntotal)
        if k == 0 or len(q) == 0:
            return np.zeros((len(q), k), np.float32), np.zeros((len(q), k), np.int64)
        return self._search(q, k)

    def _check(self, x: np.ndarray, what: str) -> np.ndarray:
        x = np.asarray(x)
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise StoreError(f"{self.name} index of dimension {self.dim} got {what} of shape {tuple(x.shape)}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            bad = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
            raise StoreError(f"{self.name} index: {what} row {bad} is not finite")
        return x

    def _add(self, x: np.ndarray) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:  # pragma: no cover - abstract
        raise NotImplementedError

    def save(self, path: str | Path) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    @classmethod
    def load(cls, path: str | Path) -> VectorIndex:  # pragma: no cover - abstract
        raise NotImplementedError


class ExactIndex(VectorIndex):
    """Brute force in blocks, so a 1M x 256 gallery never needs a full [Q, 1M] score matrix.

    A block holds at most ``block_elems`` scores (32 MB of float32 by default): one query scans
    the whole gallery in one product, a batch of 256 scans it 32k rows at a time.
    """

    name = "exact"

    def __init__(self, dim: int, chunk_size: int | None = None, query_chunk: int = 256,
                 block_elems: int = 1 << 23) -> None:
        super().__init__(dim)
        self.chunk_size = chunk_size
        self.query_chunk = int(query_chunk)
        self.block_elems = int(block_elems)
        self._parts: list[np.ndarray] = []
        self._data = np.zeros((0, self.dim), np.float32)

    @property
    def vectors(self) -> np.ndarray:
        if self._parts:
            # Concatenate lazily: repeated add() calls stay linear in the total size.
            self._data = np.concatenate([self._data, *self._parts])
            self._parts = []
        return self._data

    @property
    def ntotal(self) -> int:
        return len(self._data) + sum(len(p) for p in self._parts)

    def _add(self, x: np.ndarray) -> None:
        self._parts.append(x.copy())

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        data = self.vectors
        scores = np.empty((len(q), k), np.float32)
        indices = np.empty((len(q), k), np.int64)
        for qs in range(0, len(q), self.query_chunk):
            s, i = self._search_block(q[qs:qs + self.query_chunk], data, k)
            scores[qs:qs + len(s)], indices[qs:qs + len(s)] = s, i
        return scores, indices

    def _search_block(self, q: np.ndarray, data: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        rows = max(4096, self.block_elems // len(q))
        if self.chunk_size is not None:
            rows = min(rows, self.chunk_size)
        best_s = np.zeros((len(q), 0), np.float32)
        best_i = np.zeros((len(q), 0), np.int64)
        for start in range(0, len(data), rows):
            block = q @ data[start:start + rows].T
            s, i = _top_k_lowest_index_on_ties(block, min(k, block.shape[1]))
            best_s = np.concatenate([best_s, s], axis=1)
            best_i = np.concatenate([best_i, i + start], axis=1)
            # Merge the running best with this block's: sort by score, then by index.
            order = np.lexsort((best_i, -best_s), axis=-1)[:, :k]
            best_s = np.take_along_axis(best_s, order, axis=1)
            best_i = np.take_along_axis(best_i, order, axis=1)
        return best_s, best_i

    def save(self, path: str | Path) -> None:
        from safetensors.numpy import save_file

        with atomic_path(path) as tmp:
            save_file({"vectors": self.vectors}, str(tmp), metadata={"backend": self.name})

    @classmethod
    def load(cls, path: str | Path) -> ExactIndex:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        try:
            data = load_file(str(path))["vectors"]
        except (SafetensorError, OSError, KeyError, ValueError) as e:
            raise StoreError(f"{path}: cannot read exact index ({e.__class__.__name__})") from None
        return cls.from_vectors(data)

    @classmethod
    def from_vectors(cls, vectors: np.ndarray, copy: bool = True, **kwargs: int) -> ExactIndex:
        """An index over ``vectors``; ``copy=False`` searches the caller's array in place (no second copy)."""
        vectors = np.asarray(vectors)
        if vectors.ndim != 2:
            raise StoreError(f"exact index needs a 2-D matrix, got shape {tuple(vectors.shape)}")
        index = cls(vectors.shape[1], **kwargs)
        checked = index._check(vectors, "vectors")
        index._data = checked.copy() if copy and checked is vectors else checked
        return index


def _top_k_lowest_index_on_ties(s: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise top-``k`` of ``s`` (unsorted within the k), preferring lower columns among equal scores.

    ``argpartition`` may pick any of several candidates tied at the k-th place. Rows where a tied
    candidate was left out are redone: everything above the k-th score, then the leftmost ties.
    """
    n = s.shape[1]
    if k >= n:
        return s.copy(), np.broadcast_to(np.arange(n, dtype=np.int64), s.shape).copy()
    cols = np.argpartition(s, n - k, axis=1)[:, n - k:]
    top = np.take_along_axis(s, cols, axis=1)
    kth = top.min(axis=1, keepdims=True)
    left_out = (s == kth).sum(axis=1) > (top == kth).sum(axis=1)
    for r in np.flatnonzero(left_out):
        above = np.flatnonzero(s[r] > kth[r, 0])
        tied = np.flatnonzero(s[r] == kth[r, 0])[:k - len(above)]
        cols[r] = np.concatenate([above, tied])
        top[r] = s[r, cols[r]]
    return top, cols.astype(np.int64, copy=False)


class _FaissIndex(VectorIndex):
    """Shared faiss plumbing: the wrapped index lives in ``self.index``."""

    def __init__(self, dim: int) -> None:
        super().__init__(dim)
        faiss = require("faiss", "index", f"index backend {self.name!r}")

        self._faiss = faiss
        self.index = self._make()

    def _make(self):  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def _add(self, x: np.ndarray) -> None:
        self.index.add(x)

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, indices = self.index.search(q, k)
        return scores.astype(np.float32, copy=False), indices.astype(np.int64, copy=False)

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            self._faiss.write_index(self.index, str(tmp))

    @classmethod
    def _read(cls, path: str | Path):
        faiss = require("faiss", "index", f"index backend {cls.name!r}")

        if not Path(path).is_file():
            raise StoreError(f"faiss index file not found: {path}")
        try:
            index = faiss.read_index(str(path))
        except RuntimeError as e:
            raise StoreError(f"{path}: cannot read faiss index ({str(e).splitlines()[0][:120]})") from None
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise StoreError(f"{path}: faiss index does not use the inner product metric")
        return index


class FaissFlatIndex(_FaissIndex):
    """faiss ``IndexFlatIP``: exact, with faiss's BLAS kernels."""

    name = "faiss-flat"

    def _make(self):
        return self._faiss.IndexFlatIP(self.dim)

    @classmethod
    def load(cls, path: str | Path) -> FaissFlatIndex:
        faiss = require("faiss", "index", f"index backend {cls.name!r}")

        raw = cls._read(path)
        if not isinstance(raw, faiss.IndexFlat):
            raise StoreError(f"{path}: not a faiss flat index ({type(raw).__name__})")
        obj = cls.__new__(cls)
        VectorIndex.__init__(obj, raw.d)
        obj._faiss, obj.index = faiss, raw
        return obj


class FaissHNSWIndex(_FaissIndex):
    """faiss ``IndexHNSWFlat`` (approximate): ``m`` links per node, ``ef_construction``/``ef_search`` beams."""

    name = "faiss-hnsw"

    def __init__(self, dim: int, m: int = 32, ef_construction: int = 200, ef_search: int = 128) -> None:
        self.m, self.ef_construction, self.ef_search = int(m), int(ef_construction), int(ef_search)
        if min(self.m, self.ef_construction, self.ef_search) < 1:
            raise StoreError(f"HNSW parameters must be positive (m={m}, ef_construction={ef_construction}, "
                             f"ef_search={ef_search})")
        super().__init__(dim)

    def _make(self):
        index = self._faiss.IndexHNSWFlat(self.dim, self.m, self._faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = self.ef_construction
        index.hnsw.efSearch = self.ef_search
        return index

    def set_ef_search(self, ef: int) -> None:
        self.ef_search = int(ef)
        self.index.hnsw.efSearch = self.ef_search

    @classmethod
    def load(cls, path: str | Path) -> FaissHNSWIndex:
        faiss = require("faiss", "index", f"index backend {cls.name!r}")

        raw = cls._read(path)
        if not isinstance(raw, faiss.IndexHNSWFlat):
            raise StoreError(f"{path}: not a faiss HNSW index ({type(raw).__name__})")
        obj = cls.__new__(cls)
        VectorIndex.__init__(obj, raw.d)
        # efSearch and efConstruction travel inside the faiss file.
        obj.m = int(raw.hnsw.nb_neighbors(1))
        obj.ef_construction, obj.ef_search = int(raw.hnsw.efConstruction), int(raw.hnsw.efSearch)
        obj._faiss, obj.index = faiss, raw
        return obj


_CLASSES: dict[str, type[VectorIndex]] = {"exact": ExactIndex, "faiss-flat": FaissFlatIndex,
                                          "faiss-hnsw": FaissHNSWIndex}


def make_index(backend: str, dim: int, **params: int) -> VectorIndex:
    """A new empty index; ``params`` go to the backend (HNSW: ``m``, ``ef_construction``, ``ef_search``)."""
    if backend not in _CLASSES:
        from itrkit.errors import ConfigError

        raise ConfigError(f"unknown index backend '{backend}' (use {', '.join(BACKENDS)})")
    cls = _CLASSES[backend]
    if cls is FaissHNSWIndex:
        return FaissHNSWIndex(dim, **params)
    return cls(dim)


def load_backend(backend: str, path: str | Path) -> VectorIndex:
    if backend not in _CLASSES:
        raise StoreError(f"{path}: unknown index backend '{backend}' (known: {', '.join(BACKENDS)})")
    return _CLASSES[backend].load(path)
