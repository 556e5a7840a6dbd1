"""Teacher feature stores: one row per image id or caption id, float16 on disk, read O(batch).

A store is a folder ``<name>.store/``::

    header.json       {"format": "itrkit-store/1", "teacher": {"name", "spec", ...}, "kind",
                       "dim", "count", "dtype", "ids_fingerprint", "reduction", "created",
                       "sha256", "source", "files", ...}
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
place only once every row has been written and checked (finite, within float16 range).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itrkit.errors import StoreError
from itrkit.utils.io import atomic_dir, atomic_write_json, fingerprint, sha256_file

FORMAT = "itrkit-store/1"
HEADER = "header.json"
IDS = "ids.json"
FEATURES = "features.npy"
KINDS = ("image", "text")
DTYPES: dict[str, Any] = {"float16": np.float16, "float32": np.float32}
_SCAN_BYTES = 64 << 20  # chunk size of full-file scans (finite check): bounded memory


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


class StoreWriter:
    """Builds a store folder under a temporary name; :meth:`close` checks and renames it.

    Use as a context manager: an exception inside the block removes everything written.
    """

    def __init__(self, path: str | os.PathLike, ids: Sequence[str], dim: int, teacher: str | dict[str, Any],
                 kind: str, reduction: Any = None, source: str | None = None, dtype: str = "float16",
                 overwrite: bool = False, extra: dict[str, Any] | None = None) -> None:
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
        self.dim, self.kind, self.dtype = int(dim), kind, dtype
        self.teacher = _teacher_dict(teacher)
        self.reduction, self.source = reduction, source
        self.extra: dict[str, Any] = dict(extra or {})
        self._np_dtype = np.dtype(DTYPES[dtype])
        self._row_bytes = self.dim * self._np_dtype.itemsize
        self._written = np.zeros(len(self.ids), dtype=bool)
        self._files: list[str] = []
        self.store: FeatureStore | None = None
        self._stack = contextlib.ExitStack()
        self._tmp = self._stack.enter_context(atomic_dir(self.path, overwrite=overwrite))
        self._fd: int | None = None
        try:
            self._open_features()
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
        self._fd = os.open(self._tmp / FEATURES, os.O_WRONLY)

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
        """A safetensors side file in the store folder (e.g. ``pca.safetensors``)."""
        from safetensors.torch import save_file

        if "/" in name or not name.endswith(".safetensors"):
            raise StoreError(f"store {self.path}: side file name must be a plain '*.safetensors', not {name!r}")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(self._tmp / name),
                  metadata=metadata)
        self._files.append(name)

    # --- finishing -------------------------------------------------------------------------------
    def close_extraction(self, seconds: float, batch_size: int) -> FeatureStore:
        """:meth:`close`, recording the extraction's speed in the header (``extraction``)."""
        n = len(self.ids)
        self.extra["extraction"] = {"seconds": round(seconds, 3), "items_per_s": round(n / max(seconds, 1e-9), 2),
                                    "batch_size": batch_size}
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
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = None
            (self._tmp / IDS).write_text(json.dumps(self.ids), encoding="utf-8")
            header = {
                "format": FORMAT, "teacher": self.teacher, "kind": self.kind, "dim": self.dim,
                "count": len(self.ids), "dtype": self.dtype, "ids_fingerprint": fingerprint(self.ids),
                "reduction": self.reduction, "source": self.source,
                "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "sha256": sha256_file(self._tmp / FEATURES), "files": self._files, **self.extra,
            }
            atomic_write_json(self._tmp / HEADER, header)
            _share(self._tmp)
        except BaseException as e:
            self.abort(e)
            raise
        self._stack.close()  # renames the temporary folder onto self.path
        self.store = FeatureStore.open(self.path)
        return self.store

    def abort(self, exc: BaseException | None = None) -> None:
        """Remove the temporary folder; nothing appears under :attr:`path`."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        err = exc if exc is not None else StoreError(f"store {self.path}: aborted")
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
               overwrite: bool = False, extra: dict[str, Any] | None = None) -> StoreWriter:
        """Start writing a store; see :class:`StoreWriter`."""
        return StoreWriter(path, ids, dim, teacher, kind, reduction=reduction, source=source, dtype=dtype,
                           overwrite=overwrite, extra=extra)

    @classmethod
    def open(cls, path: str | os.PathLike, expect_kind: str | None = None, expect_dim: int | None = None,
             expect_ids: Sequence[str] | None = None, dataset: Any = None, check_finite: bool = False,
             verify: bool = False) -> FeatureStore:
        """Open and check a store.

        ``expect_ids`` (or ``dataset``: its image ids for an image store, caption ids for a text
        store) must all be in the store; a superset store is fine since rows are looked up by id.
        ``check_finite`` scans every row in bounded chunks; ``verify`` checks the SHA-256.
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
        if expect_ids is not None:
            store.check_ids(expect_ids, source=getattr(dataset, "name", None))
        if verify:
            store.verify()
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
        """Recompute the SHA-256 of ``features.npy`` and compare it with the header."""
        want = self.header.get("sha256")
        fp = self.path / FEATURES
        if not want:
            raise StoreError(f"{self.path / HEADER} records no sha256 to verify against")
        got = sha256_file(fp)
        if got != want:
            raise StoreError(f"{fp} fails its checksum (sha256 {got[:12]}…, header says {want[:12]}…)")
        return True

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

    def load_tensors(self, name: str) -> dict[str, torch.Tensor]:
        """A safetensors side file of this store (e.g. ``pca.safetensors``)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        fp = self.path / name
        if not fp.is_file():
            raise StoreError(f"{fp} is missing")
        try:
            return load_file(str(fp))
        except (SafetensorError, OSError, ValueError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise StoreError(f"{fp}: damaged side file ({msg})") from None
