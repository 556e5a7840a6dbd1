"""Teacher feature stores: one row per image id or caption id, float16 on disk, read O(batch).

A store is a folder ``<name>.store/``::

    header.json       {"format": "itrkit-store/1", "teacher": {"name", "spec", "fingerprint", ...},
                       "kind", "dim", "count", "dtype", "ids_fingerprint", "data_fingerprint",
                       "reduction", "created", "sha256", "checksums", "source", "files",
                       "file_sha256", ...}
    ids.json          the ids in row order
    features.npy      [count, dim] float16, C order
    *.safetensors     optional side files (e.g. the PCA of a reduced store)

Why ``.npy`` and not safetensors for the rows: an ``.npy`` file is a small header followed by
the raw rows at fixed offsets, so a batch read touches only its rows (``os.preadv``) and the file
can also be mapped lazily with ``np.load(mmap_mode="r")``; numpy cannot map a safetensors file
and its loader reads whole tensors into memory. The paper's Unicom features were a 15.9 GB
pickled dict for COCO, loaded whole. Small side tensors (PCA) do use safetensors.

Rows are written with ``os.pwrite`` at their offsets (in any order), so writing a large store does
not grow the writer's memory either. The folder is built under a temporary name and renamed into
place only once every row has been written and checked (finite, within float16 range). Long
extractions write resumably (see :class:`StoreWriter`): a killed run continues where it stopped.

Integrity. The header records the SHA-256 of ``features.npy`` (``sha256``) and of each 64 MiB
chunk of it (``checksums``), and the SHA-256 of each side file (``file_sha256``). Opening checks
the sizes always, and the chunk checksums (in parallel threads) on every open of a payload up to
:data:`VERIFY_ALWAYS_BYTES` (1 GiB: about a second here) and on the first open of each version
of a larger file (same path, inode, size and mtime; a stamp under the itrkit cache), so a
COCO-sized store is not re-read in full by every training and evaluation run. Stores written
before ``checksums`` existed are checked against their whole-file ``sha256`` the same way; a
store with neither opens with the size checks only. ``teacher.fingerprint`` (spec + weights)
names the model that made the rows; ``open(expect_model=...)`` refuses another one.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itrkit.errors import StoreError
from itrkit.utils.io import (
    atomic_dir,
    atomic_path,
    atomic_write_json,
    default_cache_dir,
    fingerprint,
    sha256_file,
)

FORMAT = "itrkit-store/1"
PARTIAL_FORMAT = "itrkit-store-partial/1"
HEADER = "header.json"
IDS = "ids.json"
FEATURES = "features.npy"
MANIFEST = "manifest.json"  # progress of a resumable write (only inside ``.<name>.partial``)
LOCK = ".lock"
KINDS = ("image", "text")
DTYPES: dict[str, Any] = {"float16": np.float16, "float32": np.float32}
_SCAN_BYTES = 64 << 20  # chunk size of full-file scans (finite check): bounded memory
CHECK_CHUNK = 64 << 20  # bytes per recorded checksum chunk of features.npy
VERIFY_ALWAYS_BYTES = 1 << 30  # payloads up to this size are verified on every open
SHARD_ITEMS = 4096  # rows per shard of a resumable write (a shard is the unit of work kept)
_READ_BLOCK = 8 << 20  # read size of checksum passes (bounded memory per thread)


def partial_path(path: str | os.PathLike) -> Path:
    """The fixed folder a resumable write of ``path`` builds in (``.<name>.partial`` beside it)."""
    path = Path(path)
    return path.with_name(f".{path.name}.partial")


def data_fingerprint(kind: str, ids: Sequence[str], items: Sequence[Any]) -> str | None:
    """What the store's rows were computed from: the ids and, per item, the caption text or the
    image file's name and size (not its folder or mtime: a copied data set keeps its stores).
    None when the items are neither strings nor paths."""
    sigs: list[Any] = []
    for x in items:
        if kind == "text" and isinstance(x, str):
            sigs.append(x)
        elif isinstance(x, str | os.PathLike):
            try:
                sigs.append([Path(x).name, os.stat(x).st_size])
            except OSError:
                sigs.append([Path(x).name, None])
        else:
            return None
    return fingerprint(kind, [str(i) for i in ids], sigs)


def _teacher_dict(teacher: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(teacher, dict):
        if not teacher.get("name"):
            raise StoreError("teacher description needs a 'name'")
        return dict(teacher)
    return {"name": str(teacher)}


def _npy_layout(path: Path) -> tuple[tuple[int, ...], np.dtype, bool, int]:
    """Shape, dtype, Fortran flag and data offset of an ``.npy`` file, from its header only."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"npy version {version}")
            return tuple(shape), np.dtype(dtype), bool(fortran), f.tell()
    except (ValueError, OSError, SyntaxError) as e:
        raise StoreError(f"{path}: not a readable .npy file ({e})") from None


_SERIAL = 1 << 15  # torch converts below this many elements on the calling thread


def _convert(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """float32 ↔ float16 through torch (numpy's half casts are not vectorised: ~20× slower here),
    in row slices small enough that torch does not wake its thread pool for each batch."""
    src = torch.from_numpy(np.ascontiguousarray(arr))
    out = torch.empty(tuple(arr.shape), dtype=torch.from_numpy(np.empty(0, dtype)).dtype)
    step = max(1, _SERIAL // max(1, arr.shape[1]))
    for s in range(0, len(arr), step):
        out[s:s + step].copy_(src[s:s + step])
    return out.numpy()


def _nonfinite_rows(x: np.ndarray) -> np.ndarray:
    if x.dtype == np.float16:  # exponent bits all ones ⇔ Inf/NaN; cheaper than isfinite on halves
        return ((x.view(np.uint16) & 0x7C00) == 0x7C00).any(axis=1)
    return ~np.isfinite(x).all(axis=1)


def _share(folder: Path) -> None:
    """Give the finished folder the user's usual permissions (temporary names are private)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~mask)


def _pread_rows(fd: int, offset: int, row_bytes: int, rows: np.ndarray, out: np.ndarray, name: Path) -> None:
    """Read sorted ``rows`` into ``out``, one ``preadv`` per run of consecutive rows."""
    view = memoryview(out).cast("B")
    breaks = (np.flatnonzero(np.diff(rows) != 1) + 1).tolist()
    first = rows.tolist()
    for a, b in zip([0, *breaks], [*breaks, len(rows)]):
        if b <= a:
            continue
        done, want, pos = 0, (b - a) * row_bytes, offset + first[a] * row_bytes
        while done < want:
            n = os.preadv(fd, [view[a * row_bytes + done:b * row_bytes]], pos + done)
            if n <= 0:
                raise StoreError(f"{name} is truncated (row {first[a] + done // row_bytes})")
            done += n


def _hash_range(fd: int, start: int, size: int, h: Any) -> Any:
    """Feed ``size`` bytes at ``start`` to hasher ``h`` (read in blocks; hashlib releases the GIL)."""
    pos, end = start, start + size
    while pos < end:
        block = os.pread(fd, min(_READ_BLOCK, end - pos), pos)
        if not block:
            break  # short file: the digest will not match
        h.update(block)
        pos += len(block)
    return h


def _chunk_digest(fd: int, start: int, size: int) -> str:
    return _hash_range(fd, start, size, hashlib.sha256()).hexdigest()


def payload_checksums(path: Path, chunk: int | None = None) -> tuple[str, list[str]]:
    """Whole-file SHA-256 and the SHA-256 of each ``chunk`` bytes (default :data:`CHECK_CHUNK`):
    the chunk digests run in a thread beside the whole-file digest (both release the GIL)."""
    chunk = int(chunk or CHECK_CHUNK)
    whole = hashlib.sha256()
    size = path.stat().st_size
    fd = os.open(path, os.O_RDONLY)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            futures = []
            for start in range(0, size, chunk):
                n = min(chunk, size - start)
                # The whole-file hash must see the blocks in order, so it reads; the chunk hash
                # re-reads the same (page-cached) range in the other thread.
                futures.append(pool.submit(_chunk_digest, fd, start, n))
                _hash_range(fd, start, n, whole)
            chunks = [f.result() for f in futures]
    finally:
        os.close(fd)
    return whole.hexdigest(), chunks


def _partial_manifest(folder: Path, job: str) -> dict[str, Any] | None:
    """The manifest of a resumable write in ``folder`` if it is for ``job`` (else None)."""
    try:
        m = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict) or m.get("format") != PARTIAL_FORMAT or m.get("job") != job:
        return None
    need = {"count": int, "dim": int, "dtype": str, "ids_fingerprint": str, "shard_items": int, "layout": str,
            "shards": dict}
    if not all(isinstance(m.get(k), t) for k, t in need.items()):
        return None
    return m


def resume_info(path: str | os.PathLike, job: str) -> dict[str, Any] | None:
    """What an interrupted resumable write of ``path`` for ``job`` left: its manifest (``dim``,
    ``state``, ``shards`` finished, ...), or None when there is nothing to resume."""
    return _partial_manifest(partial_path(path), job)


class StoreWriter:
    """Builds a store folder under a temporary name; :meth:`close` checks and renames it.

    Use as a context manager: an exception inside the block removes everything written.

    **Resumable writes** (``job`` and ``groups`` given): the folder is built under the fixed name
    ``.<name>.partial`` beside ``path``. ``groups`` lists the write units (the row indices of
    each :meth:`write_rows` call, in call order), grouped; units are packed into shards of about
    :data:`SHARD_ITEMS` rows, a group always starting a new shard. When the last row of a shard
    is written, the SHA-256 of its rows (as written) goes into ``manifest.json`` (atomic rename).
    A later writer for the same ``job`` (a fingerprint of everything that determines the rows)
    reopens the folder, re-hashes every finished shard and lists the units it need not compute
    again in :attr:`done_units`; a shard whose rows fail their checksum is computed again. No
    ``fsync`` per shard (it would stall the extraction): a killed process leaves its writes in the
    page cache, and rows a machine crash loses are caught by the re-hash. ``KeyboardInterrupt``
    keeps the folder for the next run; any other exception removes it. An ``flock`` keeps a
    second writer out of a folder in use.
    """

    def __init__(self, path: str | os.PathLike, ids: Sequence[str], dim: int, teacher: str | dict[str, Any],
                 kind: str, reduction: Any = None, source: str | None = None, dtype: str = "float16",
                 overwrite: bool = False, extra: dict[str, Any] | None = None, *, job: str | None = None,
                 groups: Sequence[Sequence[np.ndarray]] | None = None) -> None:
        self.path = Path(path)
        self.ids = [str(i) for i in ids]
        if kind not in KINDS:
            raise StoreError(f"store {self.path}: kind must be 'image' or 'text', not {kind!r}")
        if dtype not in DTYPES:
            raise StoreError(f"store {self.path}: dtype must be float16 or float32, not {dtype!r}")
        if int(dim) <= 0:
            raise StoreError(f"store {self.path}: dimension must be positive, got {dim}")
        if not self.ids:
            raise StoreError(f"store {self.path}: no ids to store")
        seen: set[str] = set()
        for r, i in enumerate(self.ids):
            if not i or "\x00" in i:
                raise StoreError(f"store {self.path}: empty or NUL-containing id at row {r}")
            if i in seen:
                raise StoreError(f"store {self.path}: duplicate id '{i}'")
            seen.add(i)
        if self.path.exists() and not overwrite:
            raise StoreError(f"{self.path} already exists (delete it or pass overwrite)")
        if (job is None) != (groups is None):
            raise StoreError(f"store {self.path}: a resumable write needs both a job key and its write groups")
        self.dim, self.kind, self.dtype = int(dim), kind, dtype
        self.overwrite = overwrite
        self.teacher = _teacher_dict(teacher)
        self.reduction, self.source = reduction, source
        self.extra: dict[str, Any] = dict(extra or {})
        self._np_dtype = np.dtype(DTYPES[dtype])
        self._row_bytes = self.dim * self._np_dtype.itemsize
        self._written = np.zeros(len(self.ids), dtype=bool)
        self._files: list[str] = []
        self._file_sums: dict[str, str] = {}
        self.store: FeatureStore | None = None
        self._stack = contextlib.ExitStack()
        self._fd: int | None = None
        self._lock_fd: int | None = None
        self._bg: concurrent.futures.ThreadPoolExecutor | None = None  # shard hashing + manifest writes
        self._bg_jobs: list[concurrent.futures.Future] = []
        self.job = job
        self.done_units: set[int] = set()
        self.resumed_rows = 0
        self.state: dict[str, Any] = {}  # the caller's state, saved with each manifest
        try:
            if job is None:
                self._tmp = self._stack.enter_context(atomic_dir(self.path, overwrite=overwrite))
                self._open_features()
            else:
                assert groups is not None
                self._tmp = partial_path(self.path)
                self._open_partial(job, groups)
        except BaseException as e:
            self.abort(e)
            raise

    def _open_features(self) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(self._np_dtype), "fortran_order": False,
                  "shape": (len(self.ids), self.dim)}
        f = open(self._tmp / FEATURES, "wb")
        with f:
            np.lib.format.write_array_header_1_0(f, header)
            self._offset = f.tell()
            # A sparse file of the final size: rows land at fixed offsets, in any order.
            f.truncate(self._offset + len(self.ids) * self._row_bytes)
        self._fd = os.open(self._tmp / FEATURES, os.O_RDWR)

    # --- resumable writes ----------------------------------------------------------------------------
    def _plan(self, groups: Sequence[Sequence[np.ndarray]], shard_items: int) -> None:
        """Units → shards (whole units, ~shard_items rows each, each group starting a new shard)."""
        self._shard_items = int(shard_items)
        self._units = [np.asarray(u, dtype=np.int64).reshape(-1) for g in groups for u in g]
        self._shard_units: list[list[int]] = []
        k = 0
        for g in groups:
            size = self._shard_items
            for _ in g:
                if size >= self._shard_items:
                    self._shard_units.append([])
                    size = 0
                self._shard_units[-1].append(k)
                size += len(self._units[k])
                k += 1
        self._row_shard = np.full(len(self.ids), -1, dtype=np.int64)
        self._shard_rows = np.zeros(len(self._shard_units), dtype=np.int64)
        for s, us in enumerate(self._shard_units):
            for u in us:
                rows = self._units[u]
                if len(rows) and (rows.min() < 0 or rows.max() >= len(self.ids) or (self._row_shard[rows] >= 0).any()):
                    raise StoreError(f"store {self.path}: write units overlap or fall outside the {len(self.ids)} rows")
                self._row_shard[rows] = s
                self._shard_rows[s] += len(rows)
        if (self._row_shard < 0).any():
            raise StoreError(f"store {self.path}: the write units leave out id "
                             f"'{self.ids[int(np.argmax(self._row_shard < 0))]}'")
        self._shard_count = np.zeros(len(self._shard_units), dtype=np.int64)
        self._shard_hash = [hashlib.sha256() for _ in self._shard_units]
        self._shard_done: dict[int, str] = {}
        self._layout = fingerprint([[len(self._units[u]) for u in us] for us in self._shard_units])

    def _clear_partial(self) -> None:
        for p in self._tmp.iterdir():
            if p.name != LOCK:
                shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()

    def _open_partial(self, job: str, groups: Sequence[Sequence[np.ndarray]]) -> None:
        tmp = self._tmp
        tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = os.open(tmp / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise StoreError(f"{self.path} is being written by another process (it holds the lock on {tmp}); "
                             f"wait for it to finish or stop it") from None
        m = _partial_manifest(tmp, job)
        usable = (m is not None and m["count"] == len(self.ids) and m["dim"] == self.dim
                  and m["dtype"] == self.dtype and m["ids_fingerprint"] == fingerprint(self.ids))
        if usable:
            assert m is not None
            self._plan(groups, m["shard_items"])
            usable = m["layout"] == self._layout and self._side_files_intact(m) and self._reopen_features()
        if not usable:
            self._clear_partial()
            self._plan(groups, SHARD_ITEMS)
            self._open_features()
            self._write_manifest()
            return
        assert m is not None
        self.state = dict(m.get("state") or {})
        self.extra.update(m.get("extra") or {})
        self._files = [str(f) for f in m.get("files") or []]
        self._file_sums = {str(k): str(v) for k, v in (m.get("file_sha256") or {}).items()}
        redo = 0
        for key, digest in m["shards"].items():
            s = int(key) if str(key).isdigit() else -1
            if 0 <= s < len(self._shard_units) and self._shard_digest(s) == digest:
                self._shard_done[s] = digest
                for u in self._shard_units[s]:
                    self.done_units.add(u)
                    self._written[self._units[u]] = True
                self._shard_count[s] = self._shard_rows[s]
                self.resumed_rows += int(self._shard_rows[s])
            else:
                redo += 1
        if redo:
            print(f"{self.path}: {redo} finished shard(s) of the interrupted run fail their checksum; "
                  f"computing them again", file=sys.stderr)
            self._write_manifest()

    def _reopen_features(self) -> bool:
        fp = self._tmp / FEATURES
        try:
            shape, dtype, fortran, offset = _npy_layout(fp)
        except StoreError:
            return False
        if (shape != (len(self.ids), self.dim) or dtype != self._np_dtype or fortran
                or fp.stat().st_size != offset + len(self.ids) * self._row_bytes):
            return False
        self._offset = offset
        self._fd = os.open(fp, os.O_RDWR)
        return True

    def _side_files_intact(self, manifest: dict[str, Any]) -> bool:
        sums = manifest.get("file_sha256") or {}
        if not isinstance(sums, dict):
            return False
        for name, digest in sums.items():
            p = self._tmp / str(name)
            if "/" in str(name) or not p.is_file() or sha256_file(p) != digest:
                return False
        return True

    def _shard_digest(self, s: int) -> str:
        """SHA-256 of shard ``s`` as :meth:`write_rows` hashes it: each unit's rows in row order."""
        assert self._fd is not None
        h = hashlib.sha256()
        for u in self._shard_units[s]:
            rows = np.sort(self._units[u])
            buf = np.empty((len(rows), self.dim), dtype=self._np_dtype)
            _pread_rows(self._fd, self._offset, self._row_bytes, rows, buf, self._tmp / FEATURES)
            h.update(memoryview(buf).cast("B"))
        return h.hexdigest()

    def _write_manifest(self) -> None:
        atomic_write_json(self._tmp / MANIFEST, {
            "format": PARTIAL_FORMAT, "job": self.job, "path": str(self.path), "count": len(self.ids),
            "dim": self.dim, "dtype": self.dtype, "ids_fingerprint": fingerprint(self.ids),
            "shard_items": self._shard_items, "layout": self._layout, "n_shards": len(self._shard_units),
            "shards": {str(k): v for k, v in sorted(self._shard_done.items())}, "state": self.state,
            "extra": self.extra, "files": self._files, "file_sha256": self._file_sums,
        })

    def _account(self, rows: np.ndarray, cast: np.ndarray) -> None:
        """Add one write (rows sorted) to its shard; a completed shard goes into the manifest.

        The hashing and the manifest write run in one background thread, in order (hashlib
        releases the GIL), so the extraction loop does not wait for them; at most a few writes
        are queued (bounded memory)."""
        s = int(self._row_shard[rows[0]])
        if not (self._row_shard[rows] == s).all():
            raise StoreError(f"store {self.path}: one write spans two shards (write whole units, see StoreWriter)")
        if self._shard_count[s] + len(rows) > self._shard_rows[s] or s in self._shard_done:
            raise StoreError(f"store {self.path}: rows of shard {s} written twice (id '{self.ids[int(rows[0])]}')")
        self._shard_count[s] += len(rows)
        self._in_background(self._hash_rows, s, cast, bool(self._shard_count[s] == self._shard_rows[s]))

    def _hash_rows(self, s: int, cast: np.ndarray, complete: bool) -> None:
        self._shard_hash[s].update(memoryview(cast).cast("B"))
        if complete:
            self._shard_done[s] = self._shard_hash[s].hexdigest()
            self._write_manifest()

    def _in_background(self, fn: Any, *args: Any) -> None:
        if self._bg is None:
            self._bg = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-shards")
        while len(self._bg_jobs) >= 4:
            self._bg_jobs.pop(0).result()  # re-raises a failure of the background work here
        pending = []
        for f in self._bg_jobs:
            if f.done():
                f.result()
            else:
                pending.append(f)
        self._bg_jobs = [*pending, self._bg.submit(fn, *args)]

    def _drain(self) -> None:
        """Wait for the queued hashing / manifest writes (re-raising their errors)."""
        jobs, self._bg_jobs = self._bg_jobs, []
        try:
            for f in jobs:
                f.result()
        finally:
            if self._bg is not None:
                self._bg.shutdown(wait=True)
                self._bg = None

    @property
    def shards_done(self) -> int:
        """Finished shards (counting those kept from an interrupted run); 0 unless resumable."""
        return len(self._shard_done) if self.job is not None else 0

    @property
    def n_shards(self) -> int:
        return len(self._shard_units) if self.job is not None else 0

    @property
    def folder(self) -> Path:
        """The folder being built (side files an interrupted run saved are read from here)."""
        return self._tmp

    # --- writing -------------------------------------------------------------------------------
    def write(self, rows_start: int, array: Any) -> None:
        """Write rows ``rows_start … rows_start+len(array)-1``."""
        arr = self._as_rows(array)
        self.write_rows(np.arange(rows_start, rows_start + len(arr)), arr)

    def write_rows(self, rows: Any, array: Any) -> None:
        """Write ``array[k]`` to row ``rows[k]`` (any order). Refuses non-finite values, naming the id."""
        if self._fd is None:
            raise StoreError(f"store {self.path}: writer is closed")
        arr = self._as_rows(array)
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if len(rows) != len(arr):
            raise StoreError(f"store {self.path}: {len(arr)} rows of features for {len(rows)} row indices")
        if len(rows) and (rows.min() < 0 or rows.max() >= len(self.ids)):
            raise StoreError(f"store {self.path}: row index out of range 0…{len(self.ids) - 1}")
        bad = ~np.isfinite(arr).all(axis=1)
        if bad.any():
            r = int(rows[np.argmax(bad)])
            raise StoreError(f"store {self.path}: non-finite feature (NaN/Inf) for id '{self.ids[r]}'")
        cast = _convert(arr, self._np_dtype)
        bad = _nonfinite_rows(cast)
        if bad.any():  # finite in float32 but beyond float16's ±65504
            r = int(rows[np.argmax(bad)])
            raise StoreError(f"store {self.path}: feature of id '{self.ids[r]}' exceeds the {self.dtype} range "
                             f"(max {float(np.finfo(self._np_dtype).max):g}); normalise it or use float32")
        if len(rows) > 1 and not (np.diff(rows) > 0).all():
            order = np.argsort(rows, kind="stable")
            rows, cast = rows[order], cast[order]
        # One pwrite per run of consecutive rows (a whole batch when rows are in order).
        breaks = (np.flatnonzero(np.diff(rows) != 1) + 1).tolist()
        view, first = memoryview(cast).cast("B"), rows.tolist()
        for a, b in zip([0, *breaks], [*breaks, len(rows)]):
            if b <= a:
                continue
            data = view[a * self._row_bytes:b * self._row_bytes]
            pos = self._offset + first[a] * self._row_bytes
            while len(data):
                n = os.pwrite(self._fd, data, pos)
                data, pos = data[n:], pos + n
        self._written[rows] = True
        if self.job is not None and len(rows):
            self._account(rows, cast)

    def _as_rows(self, array: Any) -> np.ndarray:
        if isinstance(array, torch.Tensor):
            array = array.detach().to("cpu", torch.float32).numpy()
        arr = np.asarray(array, dtype=np.float32)
        if arr.ndim == 1:
            arr = arr[None]
        if arr.ndim != 2 or arr.shape[1] != self.dim:
            raise StoreError(f"store {self.path}: features of shape {tuple(arr.shape)} do not match "
                             f"the store dimension {self.dim}")
        return arr

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        """A safetensors side file in the store folder (e.g. ``pca.safetensors``); its SHA-256 goes
        into the header (and, when resumable, into the manifest, so a resumed run can reuse it)."""
        from safetensors.torch import save_file

        if "/" in name or not name.endswith(".safetensors"):
            raise StoreError(f"store {self.path}: side file name must be a plain '*.safetensors', not {name!r}")
        with atomic_path(self._tmp / name) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        if name not in self._files:
            self._files.append(name)
        self._file_sums[name] = sha256_file(self._tmp / name)
        if self.job is not None:
            self._in_background(self._write_manifest)

    # --- finishing -------------------------------------------------------------------------------
    def close_extraction(self, seconds: float, batch_size: int, computed: int | None = None) -> FeatureStore:
        """:meth:`close`, recording the extraction's speed in the header (``extraction``).

        ``computed``: rows this run computed (fewer than the store's when it resumed a run)."""
        n = len(self.ids) if computed is None else int(computed)
        self.extra["extraction"] = {"seconds": round(seconds, 3), "items_per_s": round(n / max(seconds, 1e-9), 2),
                                    "batch_size": batch_size}
        if self.resumed_rows:
            self.extra["extraction"]["resumed_rows"] = self.resumed_rows
        return self.close()

    def close(self) -> FeatureStore:
        """Check that every row was written, write ids + header, rename the folder into place."""
        if self.store is not None:
            return self.store
        try:
            missing = np.flatnonzero(~self._written)
            if len(missing):
                raise StoreError(f"store {self.path}: {len(missing)} of {len(self.ids)} rows were never written "
                                 f"(first: id '{self.ids[missing[0]]}')")
            assert self._fd is not None
            self._drain()
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            (self._tmp / IDS).write_text(json.dumps(self.ids), encoding="utf-8")
            chunk = CHECK_CHUNK
            whole, chunks = payload_checksums(self._tmp / FEATURES, chunk)
            extra = {k: v for k, v in self.extra.items() if k != "resumed_rows"}
            header = {
                "format": FORMAT, "teacher": self.teacher, "kind": self.kind, "dim": self.dim,
                "count": len(self.ids), "dtype": self.dtype, "ids_fingerprint": fingerprint(self.ids),
                "reduction": self.reduction, "source": self.source,
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "sha256": whole, "checksums": {"algo": "sha256", "chunk_bytes": chunk, "chunks": chunks},
                "files": self._files, "file_sha256": {f: self._file_sums[f] for f in self._files}, **extra,
            }
            atomic_write_json(self._tmp / HEADER, header)
            if self.job is not None:
                (self._tmp / MANIFEST).unlink(missing_ok=True)
                (self._tmp / LOCK).unlink(missing_ok=True)
            _share(self._tmp)
            if self.job is not None:
                self._rename_partial()
        except BaseException as e:
            self.abort(e)
            raise
        self._stack.close()  # a plain write: renames the temporary folder onto self.path
        self._release_lock()
        self.store = FeatureStore.open(self.path, verify=False)  # just written and hashed
        return self.store

    def _rename_partial(self) -> None:
        if self.path.exists():
            if not self.overwrite:
                raise StoreError(f"{self.path} already exists (delete it or pass overwrite)")
            old = self.path.with_name(f".{self.path.name}.old")
            if old.exists():
                shutil.rmtree(old)
            os.replace(self.path, old)
            os.replace(self._tmp, self.path)
            shutil.rmtree(old)
        else:
            os.replace(self._tmp, self.path)

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing drops the flock
            self._lock_fd = None

    def abort(self, exc: BaseException | None = None) -> None:
        """Remove the temporary folder; nothing appears under :attr:`path`.

        A resumable write interrupted by ``KeyboardInterrupt`` keeps its folder: the same command
        run again continues from the finished shards."""
        err = exc if exc is not None else StoreError(f"store {self.path}: aborted")
        if self._bg is not None:
            with contextlib.suppress(Exception):  # finish recording the shards already written
                self._drain()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.job is not None:
            if isinstance(err, KeyboardInterrupt) and self._tmp.is_dir():
                print(f"interrupted: {self.shards_done} of {self.n_shards} shards of {self.path} are kept in "
                      f"{self._tmp}; run the same command again to continue", file=sys.stderr)
            elif self._lock_fd is not None:  # only the lock holder may remove the folder
                shutil.rmtree(self._tmp, ignore_errors=True)
            self._release_lock()
            return
        with contextlib.suppress(BaseException):
            self._stack.__exit__(type(err), err, err.__traceback__)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, et: Any, e: BaseException | None, tb: Any) -> None:
        if e is None:
            self.close()
        else:
            self.abort(e)


class _IdIndex:
    """id → row without a Python dict: UTF-8 ids in a fixed-width bytes array + binary search.

    About ``2·len(id) + 8`` bytes per id (a dict of str costs ~150), so a 1M-row store's index is
    ~30 MB; a lookup of B ids is O(B log N).
    """

    def __init__(self, ids: Sequence[str]) -> None:
        self.by_row = np.array([i.encode("utf-8") for i in ids], dtype=np.bytes_)
        self.order = np.argsort(self.by_row, kind="stable")
        self.sorted = self.by_row[self.order]

    def __len__(self) -> int:
        return len(self.by_row)

    def find(self, ids: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Row of each id and a mask of the ids that exist."""
        if not len(ids):
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
        enc = [i.encode("utf-8") for i in ids]
        width = self.sorted.dtype.itemsize
        # Casting to the index's width would truncate longer ids, and numpy drops trailing NULs:
        # such ids cannot be stored (the writer refuses NULs), so they are simply not found.
        ok = np.fromiter((len(e) <= width and b"\0" not in e for e in enc), dtype=bool, count=len(enc))
        q = np.array([e if k else b"" for e, k in zip(enc, ok)] if not ok.all() else enc, dtype=self.sorted.dtype)
        pos = np.minimum(np.searchsorted(self.sorted, q), len(self.sorted) - 1)
        found = ok & (self.sorted[pos] == q)
        return self.order[pos], found

    def id_of(self, row: int) -> str:
        return bytes(self.by_row[row]).decode("utf-8")

    def all(self) -> list[str]:
        return [bytes(b).decode("utf-8") for b in self.by_row]



def _read_json(path: Path, missing: str, damaged: str) -> Any:
    """A store's JSON part, or a one-line StoreError saying which part is missing or damaged."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreError(f"{path} {missing}") from None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as e:
        raise StoreError(f"{path}: {damaged} ({e.__class__.__name__})") from None

class FeatureStore:
    """A read-only teacher store. Reads are O(batch); the rows are never loaded whole.

    :meth:`rows` reads exactly the requested rows with ``os.preadv`` into the output buffer. We
    measured it against fancy-indexing the ``np.load(mmap_mode="r")`` map (``benchmarks/bench_store.py``):
    random 128-row lookups were faster with ``preadv``, and the map's resident set grew to the whole
    file because the kernel maps whole page-cache folios around each fault, whereas ``preadv`` keeps
    the process's memory flat. The map is still available as :attr:`features` for array-style access.
    """

    def __init__(self, path: Path, header: dict[str, Any], ids: Sequence[str]) -> None:
        self.path = path
        self.header = header
        self._index = _IdIndex(ids)
        self._fd: int | None = None
        self._mm: np.memmap | None = None
        self._map()

    # --- opening ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | os.PathLike, ids: Sequence[str], dim: int, teacher: str | dict[str, Any],
               kind: str, reduction: Any = None, source: str | None = None, dtype: str = "float16",
               overwrite: bool = False, extra: dict[str, Any] | None = None, *, job: str | None = None,
               groups: Sequence[Sequence[np.ndarray]] | None = None) -> StoreWriter:
        """Start writing a store; see :class:`StoreWriter` (``job`` + ``groups``: resumable)."""
        return StoreWriter(path, ids, dim, teacher, kind, reduction=reduction, source=source, dtype=dtype,
                           overwrite=overwrite, extra=extra, job=job, groups=groups)

    @classmethod
    def open(cls, path: str | os.PathLike, expect_kind: str | None = None, expect_dim: int | None = None,
             expect_ids: Sequence[str] | None = None, dataset: Any = None, check_finite: bool = False,
             verify: bool | None = None, expect_model: Any = None) -> FeatureStore:
        """Open and check a store.

        ``expect_ids`` (or ``dataset``: its image ids for an image store, caption ids for a text
        store) must all be in the store; a superset store is fine since rows are looked up by id.
        ``check_finite`` scans every row in bounded chunks. ``verify``: None (default) checks the
        payload checksums by the policy in the module docstring (every open up to 1 GiB, else the
        first open of each file version); True checks them now; False skips them (sizes only).
        ``expect_model``: a tower (its ``fingerprint()``), a fingerprint string or a teacher name
        the rows must come from (see :meth:`check_model`).
        Every read also refuses non-finite rows, so a damaged row can never reach a loss.
        """
        path = Path(path)
        if not path.is_dir():
            raise StoreError(f"no feature store at {path} (run 'itrkit teach')")
        header = cls._read_header(path)
        store = cls(path, header, cls._read_ids(path, header))
        if expect_kind is not None and store.kind != expect_kind:
            raise StoreError(f"{path} holds {store.kind} features, expected {expect_kind} features")
        if expect_dim is not None and store.dim != int(expect_dim):
            raise StoreError(f"{path} has dimension {store.dim} (teacher {store.teacher}), "
                             f"but {expect_dim} is configured")
        if dataset is not None and expect_ids is None:
            expect_ids = dataset.image_ids if store.kind == "image" else dataset.caption_ids
        if verify or (verify is None and store._needs_verify()):
            store.verify()
            store._stamp_verified()
        if expect_model is not None:
            store.check_model(expect_model)
        if expect_ids is not None:
            store.check_ids(expect_ids, source=getattr(dataset, "name", None))
        if check_finite:
            store.check_finite()
        return store

    @staticmethod
    def _read_header(path: Path) -> dict[str, Any]:
        hp = path / HEADER
        header = _read_json(hp, "is missing (not a feature store)", "damaged header")
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            fmt = header.get("format") if isinstance(header, dict) else None
            raise StoreError(f"{hp}: unknown store format {fmt!r} (expected {FORMAT})")
        for key, typ in (("kind", str), ("dim", int), ("count", int), ("dtype", str), ("ids_fingerprint", str)):
            if not isinstance(header.get(key), typ) or isinstance(header.get(key), bool):
                raise StoreError(f"{hp}: missing or invalid key '{key}'")
        if header["kind"] not in KINDS:
            raise StoreError(f"{hp}: kind must be image or text, not {header['kind']!r}")
        if header["dtype"] not in DTYPES:
            raise StoreError(f"{hp}: unsupported dtype {header['dtype']!r}")
        if header["dim"] <= 0 or header["count"] <= 0:
            raise StoreError(f"{hp}: dim and count must be positive")
        if not isinstance(header.get("teacher"), dict) or not header["teacher"].get("name"):
            raise StoreError(f"{hp}: missing or invalid key 'teacher'")
        return header

    @staticmethod
    def _read_ids(path: Path, header: dict[str, Any]) -> list[str]:
        ip = path / IDS
        ids = _read_json(ip, "is missing", "damaged id list")
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise StoreError(f"{ip}: expected a JSON list of string ids")
        if len(ids) != header["count"]:
            raise StoreError(f"{ip} lists {len(ids)} ids but the header says {header['count']}")
        if fingerprint(ids) != header["ids_fingerprint"]:
            raise StoreError(f"{ip} does not match the ids fingerprint in {path / HEADER} (damaged store)")
        return ids

    def _map(self) -> None:
        fp = self.path / FEATURES
        if not fp.is_file():
            raise StoreError(f"{fp} is missing")
        shape, dtype, fortran, offset = _npy_layout(fp)
        want = np.dtype(DTYPES[self.header["dtype"]])
        if shape != (self.count, self.dim) or dtype != want or fortran:
            raise StoreError(f"{fp} holds {dtype} {shape}, the header says {want} ({self.count}, {self.dim})")
        expected = offset + self.count * self.dim * want.itemsize
        size = fp.stat().st_size
        if size < expected:
            raise StoreError(f"{fp} is truncated: {size} bytes, expected {expected} "
                             f"({self.count}×{self.dim} {want})")
        if size > expected:
            raise StoreError(f"{fp} has {size - expected} unexpected trailing bytes (damaged store)")
        self._np_dtype = want
        self._offset = offset
        self._row_bytes = self.dim * want.itemsize
        self._fd = os.open(fp, os.O_RDONLY)

    def close(self) -> None:
        """Release the file descriptor and the map (also done when the object is collected)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._mm = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- pickling (data-loader workers): never ship rows or descriptors, reopen in the worker ---------
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "header": self.header, "index": self._index}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.header, self._index = state["path"], state["header"], state["index"]
        self._fd, self._mm = None, None
        self._map()

    # --- properties ------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.header["kind"]

    @property
    def dim(self) -> int:
        return int(self.header["dim"])

    @property
    def count(self) -> int:
        return int(self.header["count"])

    @property
    def dtype(self) -> str:
        return self.header["dtype"]

    @property
    def ids(self) -> list[str]:
        """All ids in row order (built on each call: O(count))."""
        return self._index.all()

    @property
    def teacher(self) -> str:
        return str(self.header["teacher"]["name"])

    @property
    def teacher_spec(self) -> dict[str, Any]:
        return dict(self.header["teacher"])

    @property
    def reduction(self) -> Any:
        return self.header.get("reduction")

    @property
    def features(self) -> np.memmap:
        """The ``[count, dim]`` rows as a read-only ``np.load(mmap_mode="r")`` map, made on first use.

        Pages touched through the map stay in this process's resident set (file-backed, reclaimable);
        prefer :meth:`rows` for batch reads.
        """
        if self._mm is None:
            self._mm = np.load(self.path / FEATURES, mmap_mode="r")
        return self._mm

    def __len__(self) -> int:
        return self.count

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, kind={self.kind}, teacher={self.teacher!r}, {self.count}×{self.dim})"

    # --- checks ----------------------------------------------------------------------------------
    def check_ids(self, ids: Sequence[str], source: str | None = None) -> None:
        """Every id must have a row (extra rows are fine); names how many are missing and the first."""
        if len(ids) == self.count and fingerprint(list(ids)) == self.header["ids_fingerprint"]:
            return
        _, found = self._index.find(ids)
        if not found.all():
            made = f" (written for '{self.header['source']}')" if self.header.get("source") else ""
            data = f" of '{source}'" if source else ""
            raise StoreError(f"{self.path}{made} has no {self.kind} features for {int((~found).sum())} of "
                             f"{len(ids)} ids{data} (first missing: '{ids[int(np.argmin(found))]}'); "
                             f"re-run 'itrkit teach' on this data")

    def check_finite(self) -> None:
        """Scan all rows in chunks (plain reads, bounded memory) for NaN/Inf; name the first bad id."""
        chunk_rows = max(1, _SCAN_BYTES // self._row_bytes)
        for start in range(0, self.count, chunk_rows):
            bad = _nonfinite_rows(self._read_run(start, min(chunk_rows, self.count - start)))
            if bad.any():
                r = start + int(np.argmax(bad))
                raise StoreError(f"{self.path / FEATURES}: non-finite value (NaN/Inf) in the features of id "
                                 f"'{self._index.id_of(r)}' (row {r}); the store is damaged, re-run 'itrkit teach'")

    def verify(self) -> bool:
        """Recompute the checksums of ``features.npy`` and compare them with the header: the
        64 MiB chunk digests (``checksums``, in parallel threads) or, for stores written before
        those, the whole-file ``sha256``. Names the first damaged byte range."""
        fp = self.path / FEATURES
        sums = self.header.get("checksums")
        if isinstance(sums, dict) and sums.get("algo") == "sha256" and isinstance(sums.get("chunks"), list):
            chunk, want = int(sums.get("chunk_bytes") or 0), [str(c) for c in sums["chunks"]]
            size = fp.stat().st_size
            if chunk <= 0 or len(want) != -(-size // chunk):
                raise StoreError(f"{fp}: {len(want)} chunk checksums in {self.path / HEADER} do not fit its "
                                 f"{size} bytes (damaged store; delete it and build it again)")
            fd = os.open(fp, os.O_RDONLY)
            try:
                workers = max(1, min(8, os.cpu_count() or 1, len(want)))
                with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
                    got = list(pool.map(lambda k: _chunk_digest(fd, k * chunk, min(chunk, size - k * chunk)),
                                        range(len(want))))
            finally:
                os.close(fd)
            for k, (g, w) in enumerate(zip(got, want)):
                if g != w:
                    a, b = k * chunk, min(size, (k + 1) * chunk)
                    raise StoreError(f"{fp} fails its checksum in bytes {a}…{b} (sha256 {g[:12]}…, header "
                                     f"says {w[:12]}…): the store is damaged; delete {self.path} and build it again")
            return True
        want = self.header.get("sha256")
        if not want:
            raise StoreError(f"{self.path / HEADER} records no checksum to verify against")
        got = sha256_file(fp)
        if got != want:
            raise StoreError(f"{fp} fails its checksum (sha256 {got[:12]}…, header says {want[:12]}…): "
                             f"the store is damaged; delete {self.path} and build it again")
        return True

    def _stamp(self) -> Path | None:
        """Where the "verified" stamp of this version of ``features.npy`` lives (None if unknown)."""
        fp = self.path / FEATURES
        try:
            st = fp.stat()
            key = fingerprint(str(fp.resolve()), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns,
                              self.header.get("sha256"))
        except OSError:
            return None
        return default_cache_dir() / "verified" / key

    def _needs_verify(self) -> bool:
        """The default policy: small payloads on every open, large ones once per file version;
        stores that record no checksum open with the size checks only."""
        if not (self.header.get("checksums") or self.header.get("sha256")):
            return False
        if self.count * self._row_bytes <= VERIFY_ALWAYS_BYTES:
            return True
        stamp = self._stamp()
        return stamp is None or not stamp.exists()

    def _stamp_verified(self) -> None:
        if self.count * self._row_bytes <= VERIFY_ALWAYS_BYTES:
            return
        stamp = self._stamp()
        if stamp is not None:
            with contextlib.suppress(OSError):  # a read-only cache only costs a re-check next time
                stamp.parent.mkdir(parents=True, exist_ok=True)
                stamp.write_text(str(self.path), encoding="utf-8")

    def check_model(self, expected: Any) -> None:
        """Refuse rows made by another model than ``expected``: a tower (compared by its
        ``fingerprint()``, or by its spec when the store predates fingerprints), a 16-hex
        fingerprint, or a teacher name."""
        t = self.header["teacher"]
        got_fp = t.get("fingerprint")
        if hasattr(expected, "fingerprint") and callable(expected.fingerprint):
            want_fp = expected.fingerprint()
            if got_fp is None:
                spec = getattr(expected, "spec", None)
                if t.get("spec") is not None and spec is not None and t.get("spec") == spec:
                    return
                raise StoreError(f"{self.path} records no model fingerprint and its teacher {t.get('name')!r} "
                                 f"(spec {t.get('spec')}) is not the expected {spec}; rebuild the store")
            if got_fp != want_fp:
                raise StoreError(f"{self.path} was made by model {t.get('name')!r} with fingerprint {got_fp}, "
                                 f"not by the expected model (fingerprint {want_fp}: other weights or spec); "
                                 f"delete it and build it again")
            return
        want = str(expected)
        is_fp = len(want) == 16 and all(c in "0123456789abcdef" for c in want)
        if is_fp and got_fp != want:
            raise StoreError(f"{self.path} was made by model {t.get('name')!r} with fingerprint {got_fp}, "
                             f"not the expected {want}; delete it and build it again")
        if not is_fp and t.get("name") != want:
            raise StoreError(f"{self.path} was made by teacher {t.get('name')!r}, not the expected {want!r}")

    # --- reading ---------------------------------------------------------------------------------
    def index_for(self, ids: Sequence[str]) -> np.ndarray:
        """Row index of each id (int64); the trainer computes this once per dataset."""
        rows, found = self._index.find(ids)
        if not found.all():
            raise StoreError(f"{self.path} has no {self.kind} features for id '{ids[int(np.argmin(found))]}' "
                             f"({int((~found).sum())} of {len(ids)} ids missing)")
        return rows.astype(np.int64, copy=False)

    def _read_into(self, out: np.ndarray, first_row: int) -> None:
        if self._fd is None:
            raise StoreError(f"{self.path}: store is closed")
        view = memoryview(out).cast("B")
        pos, done = self._offset + first_row * self._row_bytes, 0
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], pos + done)
            if n <= 0:
                raise StoreError(f"{self.path / FEATURES} is truncated (row {first_row + done // self._row_bytes})")
            done += n

    def _read_run(self, start: int, n: int) -> np.ndarray:
        out = np.empty((n, self.dim), dtype=self._np_dtype)
        self._read_into(out, start)
        return out

    def rows(self, row_indices: Any) -> torch.Tensor:
        """``[B, dim]`` float32 rows, read one run of consecutive rows at a time (O(batch))."""
        if isinstance(row_indices, torch.Tensor):
            row_indices = row_indices.cpu().numpy()
        idx = np.asarray(row_indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.count):
            bad = int(idx[(idx < 0) | (idx >= self.count)][0])
            raise StoreError(f"{self.path}: row {bad} out of range (store has {self.count} rows)")
        if self._fd is None:
            raise StoreError(f"{self.path}: store is closed")
        uniq, inverse = np.unique(idx, return_inverse=True)
        buf = np.empty((len(uniq), self.dim), dtype=self._np_dtype)
        view, rb, fd, off = memoryview(buf).cast("B"), self._row_bytes, self._fd, self._offset
        breaks = (np.flatnonzero(np.diff(uniq) != 1) + 1).tolist()
        first = uniq.tolist()
        for s, e in zip([0, *breaks], [*breaks, len(uniq)]):
            # One syscall per run, straight into the output buffer; short reads finish in _read_into.
            n = os.preadv(fd, [view[s * rb:e * rb]], off + first[s] * rb)
            if n != (e - s) * rb:
                self._read_into(buf[s:e], first[s])
        bad = _nonfinite_rows(buf)
        if bad.any():
            r = int(uniq[int(np.argmax(bad))])
            raise StoreError(f"{self.path / FEATURES}: non-finite value (NaN/Inf) in the features of id "
                             f"'{self._index.id_of(r)}' (row {r}); the store is damaged, re-run 'itrkit teach'")
        out = _convert(buf, np.dtype(np.float32))
        if len(uniq) != len(idx) or not np.array_equal(uniq, idx):
            out = out[inverse.reshape(-1)]
        return torch.from_numpy(out)

    def lookup(self, ids: Sequence[str]) -> torch.Tensor:
        """``[B, dim]`` float32 features of these ids, in this order."""
        return self.rows(self.index_for(ids))

    def check_side_file(self, name: str) -> Path:
        """The side file's path, once it passes the SHA-256 the header records (stores written
        before ``file_sha256`` existed: presence only). Side files are small: checked every load."""
        fp = self.path / name
        if not fp.is_file():
            raise StoreError(f"{fp} is missing")
        want = (self.header.get("file_sha256") or {}).get(name)
        if want and sha256_file(fp) != want:
            raise StoreError(f"{fp} fails its checksum (the header records another sha256): the store is "
                             f"damaged; delete {self.path} and build it again")
        return fp

    def load_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """A safetensors side file of this store (e.g. ``pca.safetensors``)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        fp = self.check_side_file(name)
        try:
            return load_file(str(fp))
        except (SafetensorError, OSError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise StoreError(f"{fp}: damaged side file ({msg})") from None
