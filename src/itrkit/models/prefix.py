"""Cached frozen prefixes for partial fine-tuning (``model.X_trainable=top:N`` + ``model.cached_features``).

With ``top:N`` only a tower's last N blocks train, so the outputs of the frozen blocks before them
never change: they are computed once per (tower, cut point, data) and every training step runs
only the top blocks (:meth:`Tower.forward_from`). Text towers cache token states with their
attention masks and token ids (padded to the data set's longest caption; each batch is cut back to
its own longest), image towers their feature maps (EfficientNet-Lite) or patch-token states (CLIP).

An entry is a folder ``<root>/prefix/<prefix fingerprint>-<data fingerprint>/``: one ``.npy`` per
state (plain arrays, no pickle) and ``meta.json`` (tower spec, cut, shapes, dtype, the BLAKE2b of
every file). The prefix fingerprint covers the tower spec, the cut point and the weights of the
frozen blocks only; the data fingerprint is the feature cache's (item keys + content). Another cut
point or other data is another key, so another entry; an entry whose files fail their checksum or
whose sidecar names another key is rebuilt with a notice, never reused. The folder is written under
a temporary name and renamed (nothing half-written is ever read).

Rows are read with positioned reads (``os.pread``), not a memory map: the process holds only the
batch it asked for (RSS stays flat however large the cache), the OS page cache keeps the hot rows.
Stored as float16 by default (``model.prefix_dtype``; float32 reproduces the live forward to 1e-5).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from itrkit.errors import ConfigError, DataError
from itrkit.models.base import Tower
from itrkit.utils.device import barrier, move_to, work_ranks
from itrkit.utils.io import atomic_write_json, default_cache_dir, fingerprint
from itrkit.utils.progress import progress

PREFIX_FORMAT = "itrkit-prefix/1"
DTYPES = {"float16": np.float16, "float32": np.float32}
_VERIFIED: set[tuple] = set()  # (folder, (file, size, mtime) …) whose checksums passed in this process


def _file_hash(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class _Array:
    """One ``.npy`` file read row by row with ``os.pread`` (never mapped, never fully loaded)."""

    def __init__(self, path: Path) -> None:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
        if fortran:
            raise DataError(f"{path}: Fortran-ordered arrays are not a prefix cache")
        self.path, self.shape, self.dtype = path, tuple(shape), np.dtype(dtype)
        self.row_items = int(np.prod(self.shape[1:], dtype=np.int64))
        self.row_bytes = self.row_items * self.dtype.itemsize
        self.fd = os.open(path, os.O_RDONLY)

    def rows(self, idx: np.ndarray, width: int | None = None) -> np.ndarray:
        """Rows ``idx``; with ``width``, only the first ``width`` entries of axis 1 (token states)."""
        inner = self.shape[1:]
        if width is not None:
            inner = (width, *inner[1:])
        n_items = int(np.prod(inner, dtype=np.int64))
        out = np.empty((len(idx), n_items), dtype=self.dtype)
        nbytes = n_items * self.dtype.itemsize
        for j, i in enumerate(np.asarray(idx, dtype=np.int64)):
            buf = os.pread(self.fd, nbytes, self.offset + int(i) * self.row_bytes)
            if len(buf) != nbytes:
                raise DataError(f"{self.path}: truncated at row {int(i)}")
            out[j] = np.frombuffer(buf, dtype=self.dtype)
        return out.reshape(len(idx), *inner)

    def close(self) -> None:
        os.close(self.fd)


class PrefixStates:
    """An open cache entry: ``batch(idx)`` → the states of rows ``idx`` as float32 / int64 tensors."""

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        self.folder, self.meta = folder, meta
        self.cut = int(meta["cut"])
        self.count = int(meta["count"])
        self.arrays = {name: _Array(folder / f"{name}.npy") for name in meta["arrays"]}
        self.lengths = np.load(folder / "lengths.npy") if "lengths.npy" in meta["files"] else None

    def __len__(self) -> int:
        return self.count

    def batch(self, idx: np.ndarray) -> dict[str, torch.Tensor]:
        idx = np.asarray(idx, dtype=np.int64)
        width = int(self.lengths[idx].max()) if self.lengths is not None and len(idx) else None
        out = {}
        for name, arr in self.arrays.items():
            rows = arr.rows(idx, width)
            t = torch.from_numpy(rows)
            out[name] = t.float() if t.is_floating_point() else t.long()
        return out

    def close(self) -> None:
        for a in self.arrays.values():
            a.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def prefix_path(tower: Tower, cut: int, items: list[Any], item_keys: list[str],
                cache_dir: str | Path | None = None, dtype: str = "float16") -> Path:
    """Where :func:`cached_prefix` keeps the states of ``items`` cut after ``cut`` blocks of ``tower``."""
    from itrkit.models.features import data_fingerprint

    if dtype not in DTYPES:
        raise ConfigError(f"model.prefix_dtype: unknown dtype '{dtype}' (use float16 or float32)")
    data_fp = data_fingerprint(items, item_keys, tower.modality)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "prefix" / f"{fingerprint(tower.prefix_fingerprint(cut), dtype)}-{data_fp}"


def _files_key(folder: Path, names: Any) -> tuple:
    return (str(folder), tuple((n, (folder / n).stat().st_size, (folder / n).stat().st_mtime_ns) for n in sorted(names)))


def _open(folder: Path, want: dict[str, Any]) -> PrefixStates | None:
    """The entry, or None when it is missing, damaged, or was written for another key."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or any(meta.get(k) != v for k, v in want.items()):
        return None
    try:
        # Verified once per process for the same files (a study opens the same entries for every run).
        key = _files_key(folder, meta["files"])
        if key not in _VERIFIED:
            for name, digest in meta["files"].items():
                if _file_hash(folder / name) != digest:
                    return None
            _VERIFIED.add(key)
        return PrefixStates(folder, meta)
    except (OSError, KeyError, ValueError, DataError):
        return None


def cached_prefix(tower: Tower, cut: int, items: list[Any], item_keys: list[str],
                  cache_dir: str | Path | None = None, dtype: str = "float16", batch_size: int = 64,
                  desc: str | None = None) -> PrefixStates:
    """The frozen prefix states of ``items`` (``tower.prepare`` inputs, named by ``item_keys``):
    read from the cache, or computed once (in eval mode, on the tower's device), stored, and read."""
    folder = prefix_path(tower, cut, items, item_keys, cache_dir, dtype)
    want = {"format": PREFIX_FORMAT, "key": folder.name, "cut": int(cut), "count": len(items)}
    rank, world = work_ranks()
    if rank == 0:
        hit = _open(folder, want)
        if hit is None:
            if folder.exists():
                print(f"prefix cache {folder} damaged or for another key, rebuilding", file=sys.stderr)
            _build(tower, cut, items, folder, want, dtype, batch_size, desc)
    if world > 1:
        barrier()  # rank 0 built the entry; every rank reads the same files
    states = _open(folder, want)
    if states is None:
        raise DataError(f"prefix cache {folder} cannot be read after it was written")
    return states


def _order(tower: Tower, items: list[Any]) -> np.ndarray:
    # Longest captions first: batches of similar length waste little on padding.
    if tower.modality == "text":
        return np.argsort([-len(t) for t in items], kind="stable")
    return np.arange(len(items))


def _build(tower: Tower, cut: int, items: list[Any], folder: Path, want: dict[str, Any], dtype: str,
           batch_size: int, desc: str | None) -> None:
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    n = len(items)
    if n == 0:
        raise DataError("no items to cache a prefix for")
    np_dtype = DTYPES[dtype]
    order = _order(tower, items)
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    files: dict[str, Any] = {}
    lengths = np.zeros(n, dtype=np.int32) if tower.modality == "text" else None
    width = 0
    tokens: dict[str, torch.Tensor] | None = None
    if lengths is not None:
        # Token counts first, so every row has the data set's width. With a right-padding tokenizer
        # the encodings are kept and each batch is cut from them (what tower.prepare of the batch
        # gives: rows padded to their longest), so captions are tokenised once.
        keep = getattr(getattr(tower, "tokenizer", None), "padding_side", None) == "right"
        chunks = []
        for s in range(0, n, 1024):
            enc = tower.prepare(list(items[s:s + 1024]))
            lengths[s:s + len(enc["attention_mask"])] = enc["attention_mask"].sum(dim=1).numpy()
            if keep:
                chunks.append(enc)
        width = int(lengths.max())
        if keep:  # chunks widened to the data set's width with the tokenizer's own padding values
            pad = {"input_ids": int(tower.tokenizer.pad_token_id or 0)}  # type: ignore[attr-defined]
            tokens = {k: torch.cat([F.pad(c[k], (0, width - c[k].shape[1]), value=pad.get(k, 0)) for c in chunks])
                      for k in chunks[0]}
    was_training = tower.training
    tower.eval()
    what = f"caching the frozen prefix ({cut} of {len(tower.blocks())} blocks) of the {tower.spec.get('name', '?')} tower"
    def store(rows: np.ndarray, states: dict[str, torch.Tensor]) -> None:
        """Check, convert, pad and write one batch (on the writer thread, while the next computes)."""
        for name, t in states.items():
            a = t.detach().cpu()
            if a.is_floating_point():
                if not torch.isfinite(a).all():
                    bad = int(rows[int((~torch.isfinite(a.flatten(1))).any(1).nonzero()[0])])
                    raise DataError(f"non-finite prefix states for item {items[bad]!r}")
                arr = a.numpy().astype(np_dtype)
            else:
                arr = a.numpy().astype(np.int32 if name == "input_ids" else np.uint8)
            if lengths is not None:  # pad the token axis to the data set's width
                arr = np.concatenate([arr, np.zeros((arr.shape[0], width - arr.shape[1], *arr.shape[2:]),
                                                    arr.dtype)], axis=1)
            if name not in files:
                files[name] = _Writer(tmp / f"{name}.npy", (n, *arr.shape[1:]), arr.dtype)
            files[name].write(rows, arr)

    pending: list[Future[None]] = []
    try:
        with torch.inference_mode(), progress(total=n, desc=desc or f"{tower.modality} prefix", unit=tower.modality,
                                              what=what, cached_at=folder) as bar, \
                ThreadPoolExecutor(max_workers=1) as writer:
            for start in range(0, n, batch_size):
                rows = order[start:start + batch_size]
                if tokens is None:
                    x = tower.prepare([items[int(i)] for i in rows])
                else:
                    sel = torch.from_numpy(np.asarray(rows, dtype=np.int64))
                    top = int(lengths[rows].max())
                    x = {k: v[sel, :top] for k, v in tokens.items()}
                x = move_to(x, tower.device, non_blocking=True)
                states = tower.prefix_states(x, cut)
                pending.append(writer.submit(store, rows, states))
                if len(pending) > 1:  # at most one batch waits to be written: memory stays two batches
                    pending.pop(0).result()
                bar.update(len(rows))
            for f in pending:
                f.result()
    except BaseException:
        for f in pending:
            f.cancel()
        for w in files.values():
            w.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        tower.train(was_training)
    for w in files.values():
        w.close()
    names = sorted(files)
    if lengths is not None:
        np.save(tmp / "lengths.npy", lengths, allow_pickle=False)
    digests = {p.name: _file_hash(p) for p in sorted(tmp.glob("*.npy"))}
    shapes = {k: list(files[k].shape) for k in names}
    atomic_write_json(tmp / "meta.json", {
        **want, "arrays": names, "shapes": shapes, "dtype": dtype, "files": digests,
        "tower": tower.spec, "modality": tower.modality, "blocks": len(tower.blocks()),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    })
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(tmp, folder)
    _VERIFIED.add(_files_key(folder, digests))  # hashed from these very bytes a moment ago


class _Writer:
    """Rows written at their positions into a ``.npy`` file (plain writes: no mapped dirty pages)."""

    def __init__(self, path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
        self.shape, self.dtype = shape, np.dtype(dtype)
        self.f = open(path, "wb+")
        np.lib.format.write_array_header_1_0(self.f, {"descr": np.lib.format.dtype_to_descr(self.dtype),
                                                      "fortran_order": False, "shape": shape})
        self.offset = self.f.tell()
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
        self.f.truncate(self.offset + shape[0] * self.row_bytes)

    def write(self, rows: np.ndarray, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        for j, i in enumerate(rows):
            self.f.seek(self.offset + int(i) * self.row_bytes)
            self.f.write(arr[j].tobytes())

    def close(self) -> None:
        if not self.f.closed:
            self.f.close()
