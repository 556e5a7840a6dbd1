"""Inner-product vector indexes with one API: exact (NumPy), faiss flat, HNSW, IVF-flat and IVF-PQ.

Every backend answers ``search(queries, k) -> (scores [Q, k], indices [Q, k])`` with rows sorted
by descending score. ``k`` larger than the number of stored vectors is clamped to it, so no
backend ever returns padding (faiss's ``-1``). Embeddings are L2-normalised upstream, so the inner
product is the cosine similarity used for retrieval (docs/method.md §4.1).

Ties in the exact backend follow the evaluation rule: equal scores rank the lower index first.

Approximate backends have one search-time knob (HNSW ``ef_search``, IVF ``nprobe``) whose faiss
default gives poor recall at scale (HNSW at 1M vectors: recall@10 0.03-0.10). :func:`calibrate`
raises it until recall@10 on held-out queries, against exact search, reaches a target;
:func:`build_calibrated` builds and calibrates in one call and reports what it chose and measured.
:func:`choose_backend` is the ``auto`` rule: exact up to :data:`AUTO_EXACT_MAX` vectors, HNSW above.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from itrkit.errors import StoreError
from itrkit.utils.io import atomic_path
from itrkit.utils.optional import require

BACKENDS = ("exact", "faiss-flat", "faiss-hnsw", "faiss-ivf", "faiss-ivfpq")
# What ``--backend`` accepts: a backend, or ``auto`` (chosen by size, :func:`choose_backend`).
BACKEND_CHOICES = ("auto", *BACKENDS)
# ``auto``: exact search up to this many vectors (a few ms per query single-thread at d=256), HNSW above.
AUTO_EXACT_MAX = 100_000
AUTO_APPROX = "faiss-hnsw"
DEFAULT_TARGET_RECALL = 0.95
CALIBRATION_QUERIES = 1000


class VectorIndex:
    """Common behaviour: shape checks on ``add`` and ``search``; subclasses store and score."""

    name: ClassVar[str] = ""
    # The search-time knob calibrate() raises (None: the backend is exact, nothing to tune).
    knob: ClassVar[str | None] = None

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

    def search_params(self) -> dict[str, int]:
        """The current search-time parameters (``{}`` for exact backends)."""
        return {}

    def set_params(self, **params: int) -> None:
        """Set search-time parameters by name; a name this backend does not have is a StoreError."""
        if params:
            raise StoreError(f"{self.name} index has no search parameters (got {', '.join(params)})")

    def knob_range(self) -> tuple[int, int]:
        """Smallest and largest sensible value of :attr:`knob`."""
        return (1, 1)

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
    knob = "ef_search"

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
        if int(ef) < 1:
            raise StoreError(f"HNSW ef_search must be positive, got {ef}")
        self.ef_search = int(ef)
        self.index.hnsw.efSearch = self.ef_search

    def search_params(self) -> dict[str, int]:
        return {"ef_search": self.ef_search}

    def set_params(self, **params: int) -> None:
        _only(self.name, params, {"ef_search"})
        if "ef_search" in params:
            self.set_ef_search(params["ef_search"])

    def knob_range(self) -> tuple[int, int]:
        return (16, 8192)

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


class FaissIVFIndex(_FaissIndex):
    """faiss ``IndexIVFFlat`` (approximate): ``nlist`` k-means cells, ``nprobe`` of them scanned per query.

    The cells are trained on the first :meth:`add` (a seeded sample of at most 64 points per cell,
    plenty for k-means and far cheaper at 1M); ``nlist=None`` picks about ``4 sqrt(n)`` cells.
    """

    name = "faiss-ivf"
    knob = "nprobe"
    TRAIN_PER_CELL = 64
    TRAIN_MAX: int | None = None

    def __init__(self, dim: int, nlist: int | None = None, nprobe: int = 1) -> None:
        self.nlist = None if nlist is None else int(nlist)
        self.nprobe = int(nprobe)
        if (self.nlist is not None and self.nlist < 1) or self.nprobe < 1:
            raise StoreError(f"IVF parameters must be positive (nlist={nlist}, nprobe={nprobe})")
        super().__init__(dim)

    def _make(self):
        return None  # built on the first add, when the number of vectors is known

    def _new(self, nlist: int):
        quantizer = self._faiss.IndexFlatIP(self.dim)
        return self._faiss.IndexIVFFlat(quantizer, self.dim, nlist, self._faiss.METRIC_INNER_PRODUCT)

    @property
    def ntotal(self) -> int:
        return 0 if self.index is None else int(self.index.ntotal)

    def _add(self, x: np.ndarray) -> None:
        if self.index is None:
            nlist = self.nlist or default_nlist(len(x))
            nlist = max(1, min(nlist, len(x)))
            index = self._new(nlist)
            rng = np.random.default_rng(0)
            n_train = self.TRAIN_PER_CELL * nlist
            if self.TRAIN_MAX is not None:  # IVF-PQ: capped, but 39 points per PQ centroid and cell
                n_train = max(min(n_train, self.TRAIN_MAX), 39 * 256, 39 * nlist)
            n_train = min(len(x), n_train)
            sample = x if n_train == len(x) else x[np.sort(rng.choice(len(x), n_train, replace=False))]
            index.cp.seed = 1234  # deterministic k-means
            index.train(sample)
            self.index, self.nlist = index, nlist
            self.set_params(nprobe=self.nprobe)
        self.index.add(x)

    def _search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, idx = self._probe(q, k)
        short = np.flatnonzero((idx < 0).any(axis=1))
        if len(short):  # the probed cells held fewer than k vectors: probe more for those rows only
            keep, nprobe = self.nprobe, self.nprobe
            try:
                while len(short) and nprobe < self.index.nlist:
                    nprobe = min(self.index.nlist, nprobe * 4)
                    self.index.nprobe = nprobe
                    scores[short], idx[short] = self._probe(q[short], k)
                    short = short[(idx[short] < 0).any(axis=1)]
            finally:
                self.index.nprobe = keep
        return scores, idx

    def _probe(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return super()._search(q, k)

    def save(self, path: str | Path) -> None:
        if self.index is None:
            raise StoreError(f"{self.name} index is empty: add vectors before saving it")
        super().save(path)

    def search_params(self) -> dict[str, int]:
        return {"nprobe": self.nprobe}

    def set_params(self, **params: int) -> None:
        _only(self.name, params, {"nprobe"} | ({"rerank"} if isinstance(self, FaissIVFPQIndex) else set()))
        if "nprobe" in params:
            if int(params["nprobe"]) < 1:
                raise StoreError(f"IVF nprobe must be positive, got {params['nprobe']}")
            self.nprobe = int(params["nprobe"])
            if self.index is not None:
                self.nprobe = min(self.nprobe, self.index.nlist)
                self.index.nprobe = self.nprobe

    def knob_range(self) -> tuple[int, int]:
        return (1, self.nlist or 1)

    @classmethod
    def _wrap(cls, path: str | Path, want: Any):
        faiss = require("faiss", "index", f"index backend {cls.name!r}")

        raw = cls._read(path)
        if type(raw) is not want(faiss):
            raise StoreError(f"{path}: not a faiss {cls.name} index ({type(raw).__name__})")
        obj = cls.__new__(cls)
        VectorIndex.__init__(obj, raw.d)
        obj._faiss, obj.index = faiss, raw
        obj.nlist, obj.nprobe = int(raw.nlist), int(raw.nprobe)  # nprobe travels inside the faiss file
        return obj

    @classmethod
    def load(cls, path: str | Path) -> FaissIVFIndex:
        return cls._wrap(path, lambda faiss: faiss.IndexIVFFlat)


class FaissIVFPQIndex(FaissIVFIndex):
    """faiss ``IndexIVFPQ``: IVF cells of product-quantised codes (``pq_m`` bytes a vector), for RAM.

    PQ scores are approximate, so the top ``k * rerank`` candidates are re-scored exactly against
    the full vectors when the index holds them (:meth:`attach_vectors`; the index folder keeps
    them in ``*.safetensors`` anyway): the returned scores are then true inner products.
    """

    name = "faiss-ivfpq"
    # PQ codebooks (256 centroids per sub-quantiser) train in time proportional to the sample.
    TRAIN_PER_CELL = 64
    TRAIN_MAX = 50_000

    def __init__(self, dim: int, nlist: int | None = None, nprobe: int = 1, pq_m: int | None = None,
                 rerank: int = 4) -> None:
        self.pq_m = int(pq_m) if pq_m is not None else default_pq_m(dim)
        self.rerank = int(rerank)
        if self.pq_m < 1 or dim % self.pq_m or self.rerank < 1:
            raise StoreError(f"IVF-PQ needs pq_m dividing the dimension {dim} and rerank >= 1 "
                             f"(pq_m={pq_m}, rerank={rerank})")
        self._vectors: np.ndarray | None = None
        super().__init__(dim, nlist=nlist, nprobe=nprobe)

    def _new(self, nlist: int):
        quantizer = self._faiss.IndexFlatIP(self.dim)
        return self._faiss.IndexIVFPQ(quantizer, self.dim, nlist, self.pq_m, 8, self._faiss.METRIC_INNER_PRODUCT)

    def _add(self, x: np.ndarray) -> None:
        super()._add(x)
        self._vectors = x if self._vectors is None else np.concatenate([self._vectors, x])

    def attach_vectors(self, vectors: np.ndarray) -> None:
        """The full vectors, row for row, for exact re-scoring (not copied)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (self.ntotal, self.dim):
            raise StoreError(f"{self.name} index of {self.ntotal} x {self.dim} vectors got full vectors of "
                             f"shape {tuple(vectors.shape)}")
        self._vectors = vectors

    def search_params(self) -> dict[str, int]:
        return {"nprobe": self.nprobe, "rerank": self.rerank}

    def set_params(self, **params: int) -> None:
        _only(self.name, params, {"nprobe", "rerank"})
        if "rerank" in params:
            if int(params["rerank"]) < 1:
                raise StoreError(f"IVF-PQ rerank must be at least 1, got {params['rerank']}")
            self.rerank = int(params["rerank"])
        super().set_params(**{k: v for k, v in params.items() if k == "nprobe"})

    def _probe(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self._vectors is None:
            return super()._probe(q, k)
        _, cand = self.index.search(q, min(self.ntotal, k * self.rerank))
        cand = cand.astype(np.int64, copy=False)
        valid = cand >= 0
        exact = np.einsum("qd,qkd->qk", q, self._vectors[np.where(valid, cand, 0)])
        exact = np.where(valid, exact, -np.inf).astype(np.float32)
        order = np.lexsort((np.where(valid, cand, np.iinfo(np.int64).max), -exact), axis=-1)[:, :k]
        scores, idx = np.take_along_axis(exact, order, 1), np.take_along_axis(cand, order, 1)
        # Fewer than k candidates in the probed cells: -1 as faiss pads, which _search then refills.
        return scores.astype(np.float32), np.where(np.isfinite(scores), idx, -1)

    @classmethod
    def load(cls, path: str | Path) -> FaissIVFPQIndex:
        obj = cls._wrap(path, lambda faiss: faiss.IndexIVFPQ)
        obj.pq_m, obj.rerank, obj._vectors = int(obj.index.pq.M), 4, None
        return obj


def _only(name: str, params: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(params) - known)
    if unknown:
        raise StoreError(f"{name} index has no search parameter {', '.join(unknown)} (known: {', '.join(sorted(known))})")


def default_nlist(n: int) -> int:
    """About ``4 sqrt(n)`` cells, at least 39 training points each (faiss's own floor)."""
    return max(1, min(int(4 * math.sqrt(n)), n // 39))


def default_pq_m(dim: int) -> int:
    """Sub-quantisers for IVF-PQ: ``dim / 4`` bytes a vector (16x less than float32), dividing ``dim``."""
    for m in range(max(1, dim // 4), 0, -1):
        if dim % m == 0:
            return m
    return 1


_CLASSES: dict[str, type[VectorIndex]] = {"exact": ExactIndex, "faiss-flat": FaissFlatIndex,
                                          "faiss-hnsw": FaissHNSWIndex, "faiss-ivf": FaissIVFIndex,
                                          "faiss-ivfpq": FaissIVFPQIndex}
# Build-time parameters each backend takes (others given to make_index are ignored).
BUILD_PARAMS: dict[str, tuple[str, ...]] = {
    "exact": (), "faiss-flat": (), "faiss-hnsw": ("m", "ef_construction", "ef_search"),
    "faiss-ivf": ("nlist", "nprobe"), "faiss-ivfpq": ("nlist", "nprobe", "pq_m", "rerank")}


def make_index(backend: str, dim: int, **params: Any) -> VectorIndex:
    """A new empty index; the ``params`` this backend takes (:data:`BUILD_PARAMS`) go to it, None ones dropped."""
    if backend not in _CLASSES:
        from itrkit.errors import ConfigError

        raise ConfigError(f"unknown index backend '{backend}' (use {', '.join(BACKENDS)})")
    mine = {k: v for k, v in params.items() if k in BUILD_PARAMS[backend] and v is not None}
    return _CLASSES[backend](dim, **mine)  # type: ignore[call-arg]


def load_backend(backend: str, path: str | Path, params: dict[str, int] | None = None,
                 vectors: np.ndarray | None = None) -> VectorIndex:
    """Read a saved index; ``params``: search parameters to apply (a manifest's calibrated ones);
    ``vectors``: the full vectors, which IVF-PQ re-scores its candidates against."""
    if backend not in _CLASSES:
        raise StoreError(f"{path}: unknown index backend '{backend}' (known: {', '.join(BACKENDS)})")
    index = _CLASSES[backend].load(path)
    if params:
        index.set_params(**params)
    if vectors is not None and isinstance(index, FaissIVFPQIndex):
        index.attach_vectors(vectors)
    return index


# --- choosing and calibrating ------------------------------------------------------------------
def choose_backend(n: int, backend: str = "auto") -> str:
    """``backend`` itself, or for ``auto``: exact up to :data:`AUTO_EXACT_MAX` vectors, HNSW above."""
    if backend not in BACKEND_CHOICES:
        from itrkit.errors import ConfigError

        raise ConfigError(f"unknown index backend '{backend}' (use {', '.join(BACKEND_CHOICES)})")
    if backend != "auto":
        return backend
    return "exact" if n <= AUTO_EXACT_MAX else AUTO_APPROX


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Mean share of each row's true top-k (``truth``) that ``found`` holds (ids, any order)."""
    found, truth = np.asarray(found), np.asarray(truth)
    if truth.size == 0:
        return 1.0
    hits = [len(set(a) & set(b)) for a, b in zip(found.tolist(), truth.tolist())]
    return float(np.sum(hits) / truth.size)


@dataclass
class Calibration:
    """What :func:`calibrate` chose: search ``params``, the ``recall`` they measured, and every try."""

    params: dict[str, int]
    recall: float
    target_recall: float
    k: int
    n_queries: int
    reached: bool
    tried: list[tuple[int, float]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"params": dict(self.params), f"recall_at_{self.k}": round(self.recall, 4),
                "target_recall": self.target_recall, "queries": self.n_queries, "reached": self.reached}


def calibrate(index: VectorIndex, queries: np.ndarray, exact: VectorIndex | np.ndarray,
              target_recall: float = DEFAULT_TARGET_RECALL, k: int = 10) -> Calibration:
    """Raise ``index``'s search knob (ef_search / nprobe) until recall@``k`` on ``queries`` reaches
    ``target_recall``, then keep the smallest value that does; ``index`` is left set to it.

    ``exact``: the ground truth, an exact index over the same vectors or its top-``k`` ids per query.
    With an :class:`ExactIndex`, ties count: a found row scoring at least the true ``k``-th score
    is a hit (equal scores make "the" top-k ambiguous; a set intersection would punish ties).
    The knob doubles from its lower bound, then a bisection between the last miss and the first hit
    finds the smallest passing value (recall grows with the knob, up to noise). When even the
    largest value misses, that value is kept and ``reached`` is False.
    """
    if not 0.0 < target_recall <= 1.0:
        from itrkit.errors import ConfigError

        raise ConfigError(f"target recall must be in (0, 1], got {target_recall}")
    q = index._check(queries, "queries")
    k_asked, k = int(k), min(int(k), index.ntotal)
    kth: np.ndarray | None = None
    if isinstance(exact, ExactIndex):
        truth_s, truth = exact.search(q, k)
        kth = truth_s[:, -1:] - 1e-6 if k else None
    elif isinstance(exact, VectorIndex):
        truth = exact.search(q, k)[1]
    else:
        truth = np.asarray(exact)[:, :k]
    if len(truth) != len(q):
        raise StoreError(f"calibration: {len(truth)} ground-truth rows for {len(q)} queries")

    def measure(value: int | None) -> float:
        if value is not None:
            index.set_params(**{index.knob: value})  # type: ignore[dict-item]
        found = index.search(q, k)[1]
        if kth is None:
            return recall_at_k(found, truth)
        true_scores = np.einsum("qd,qkd->qk", q, exact.vectors[found])  # type: ignore[union-attr]
        return float(np.minimum((true_scores >= kth).sum(axis=1), k).sum() / truth.size)

    if index.knob is None or k == 0:
        r = measure(None)
        return Calibration(index.search_params(), r, target_recall, k_asked, len(q), r >= target_recall)
    lo, hi = index.knob_range()
    tried: dict[int, float] = {}
    miss, hit, value = None, None, lo
    while True:
        tried[value] = measure(value)
        if tried[value] >= target_recall:
            hit = value
            break
        miss = value
        if value >= hi:
            break
        value = min(hi, value * 2)
    if hit is None:
        index.set_params(**{index.knob: hi})
        return Calibration(index.search_params(), tried[hi], target_recall, k_asked, len(q), False, sorted(tried.items()))
    while miss is not None and hit - miss > max(1, hit // 8):  # to within 1/8 of the value
        mid = (miss + hit) // 2
        tried[mid] = measure(mid)
        if tried[mid] >= target_recall:
            hit = mid
        else:
            miss = mid
    index.set_params(**{index.knob: hit})
    return Calibration(index.search_params(), tried[hit], target_recall, k_asked, len(q), True, sorted(tried.items()))


def calibration_queries(vectors: np.ndarray, queries: np.ndarray | None = None,
                        n: int = CALIBRATION_QUERIES, seed: int = 0) -> np.ndarray:
    """Up to ``n`` held-out queries: rows of ``queries`` (e.g. caption embeddings for an image index,
    the real query distribution) or, without them, rows sampled from the indexed ``vectors``."""
    source = vectors if queries is None or len(queries) == 0 else queries
    rng = np.random.default_rng(seed)
    if len(source) <= n:
        return np.asarray(source, dtype=np.float32)
    return np.asarray(source[np.sort(rng.choice(len(source), n, replace=False))], dtype=np.float32)


def build_calibrated(backend: str, vectors: np.ndarray, queries: np.ndarray | None = None,
                     target_recall: float = DEFAULT_TARGET_RECALL, n_queries: int = CALIBRATION_QUERIES,
                     k: int = 10, **params: Any) -> tuple[VectorIndex, dict[str, Any]]:
    """An index of ``backend`` (``auto`` allowed) over ``vectors``, its search knob calibrated to
    ``target_recall`` on held-out queries (:func:`calibration_queries`) against exact search.

    Returns the index and a JSON-ready record: backend, build and search params, the measured
    recall@k, the target, the number of queries and where they came from.
    """
    backend = choose_backend(len(vectors), backend)
    index = make_index(backend, vectors.shape[1], **params)
    index.add(vectors)
    info: dict[str, Any] = {"backend": backend,
                            "build_params": {k_: v for k_, v in params.items()
                                             if k_ in BUILD_PARAMS[backend] and v is not None}}
    if isinstance(index, FaissIVFIndex):
        info["build_params"]["nlist"] = index.nlist
    if index.knob is None:  # exact: nothing to calibrate
        info.update({"params": index.search_params(), f"recall_at_{k}": 1.0, "target_recall": target_recall,
                     "queries": 0, "reached": True, "query_source": None})
        return index, info
    q = calibration_queries(vectors, queries, n_queries)
    truth = ExactIndex.from_vectors(vectors, copy=False)
    cal = calibrate(index, q, truth, target_recall, k)
    info.update(cal.to_json())
    info["query_source"] = "given" if queries is not None and len(queries) else "indexed"
    return index, info
