"""Tower features computed once and cached on disk (docs/method.md §2: "replaced by cached features").

A cache entry is ``<root>/features/<tower fingerprint>-<data fingerprint>.safetensors`` (one
float32 tensor ``features`` ``[N, D]``) with a JSON sidecar of the same stem (tower spec, count,
dim, fingerprints, creation time); ``root`` is ``cache_dir`` or :func:`default_cache_dir`.
The tower fingerprint covers its spec and weights; the data fingerprint covers the item keys and,
for images, each file's resolved path, size and modification time (for texts, the text itself),
so an edited image or a retrained tower never reuses stale features. The sidecar records the
SHA-256 of the feature bytes: a damaged entry (truncated, bit-flipped, or a sidecar naming another
tower) is recomputed (it is a cache) with a one-line notice on stderr; entries written before the
checksum existed are still read (without it).

Computing is resumable: every :data:`SHARD_ITEMS` items (whole batches) the rows computed so far
go to ``<stem>.partial/shard-NNNNN.safetensors`` (atomic; in a background thread, so the towers
do not wait for the disk), each with the SHA-256 of its rows. A run killed part-way and started
again loads the shards that pass their checksum, computes the rest in the same batches, and
writes the same bytes as an uninterrupted run; the partial folder is removed at the end.

Towers run where their parameters are (``tower.to(device)``); features come back to the CPU.
Under ``torchrun`` every rank calls :func:`cached_features` with the same items (as training
does): the ranks agree on a cache hit, otherwise batches are dealt round-robin over them, gathered
in batch order so every rank holds every row, and rank 0 alone writes the shards and the entry —
the same bytes one process writes.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import shutil
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itrkit.errors import ConfigError, DataError
from itrkit.models.base import Tower
from itrkit.utils.device import all_agree, barrier, broadcast_flags, move_to, sharded, work_ranks
from itrkit.utils.io import atomic_path, atomic_write_json, default_cache_dir, fingerprint
from itrkit.utils.progress import progress

FEATURES_FORMAT = "itrkit-features/1"
PARTIAL_FORMAT = "itrkit-features-partial/1"
SHARD_ITEMS = 4096  # items per resumable shard (rounded up to whole batches)


def compute_features(tower: Tower, items: list[Any], batch_size: int = 64, desc: str | None = None) -> np.ndarray:
    """Run ``tower`` over ``items`` in eval mode → float32 ``[N, output_dim]`` in item order."""
    return _compute(tower, items, batch_size, desc)


def _order(tower: Tower, items: list[Any]) -> np.ndarray:
    # Texts run longest first (as sentence-transformers does): batches of similar length waste
    # little on padding. Rows go back to item order; the order is a pure function of the texts.
    n = len(items)
    if tower.modality == "text" and n and all(isinstance(t, str) for t in items):
        return np.argsort([-len(t) for t in items], kind="stable")
    return np.arange(n)


def _tower_device(tower: Tower) -> torch.device:
    p = next(iter(tower.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def _compute(tower: Tower, items: list[Any], batch_size: int, desc: str | None,
             partial: _Partial | None = None) -> np.ndarray:
    """:func:`compute_features`; with ``partial``, finished shards are loaded and new ones saved
    (under torchrun only rank 0 passes one; the others learn its finished shards)."""
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    n, dim = len(items), int(tower.output_dim)
    out = np.empty((n, dim), dtype=np.float32)
    order = _order(tower, items)
    rank, world = work_ranks()
    skip: set[int] = set()
    if partial is not None:
        skip = partial.load(out, order)
    shard_items = partial.shard_items if partial is not None else -(-SHARD_ITEMS // batch_size) * batch_size
    starts = list(range(0, n, batch_size))
    if world > 1:
        # Rank 0 holds the partial folder: every rank skips the shards it kept.
        n_shards = -(-n // shard_items)
        flags = broadcast_flags([k in skip for k in range(n_shards)])
        skip = {k for k, f in enumerate(flags) if f}
    saving = partial is not None
    device = _tower_device(tower)
    was_training = tower.training
    tower.eval()

    def encode(mine: list[int]) -> Any:
        for start in mine:
            batch = [items[int(i)] for i in order[start:start + batch_size]]
            yield tower(move_to(tower.prepare(batch), device, non_blocking=True)).float().cpu()

    try:
        # The first line names the tower and the cache entry: a first Flickr8k run spends minutes here.
        what = f"computing {tower.modality} features with the {tower.spec.get('name', '?')} tower"
        cached_at = partial.folder.with_suffix(".safetensors") if partial is not None else None
        with torch.inference_mode(), progress(total=n, desc=desc or f"{tower.modality} features",
                                              unit=tower.modality, what=what, cached_at=cached_at,
                                              enabled=rank == 0) as bar, \
                concurrent.futures.ThreadPoolExecutor(max_workers=1) as saver:
            pending: concurrent.futures.Future | None = None
            todo = [st for st in starts if (st // shard_items if world > 1 or saving else -1) not in skip]
            bar.skip(n - sum(min(batch_size, n - st) for st in todo))
            mine = todo[rank::world] if world > 1 else todo
            for start, got in sharded(todo, None, mine=encode(mine)):
                shard = start // shard_items
                rows = order[start:start + batch_size]
                feats = got.numpy()
                if feats.shape != (len(rows), dim):
                    raise RuntimeError(f"tower {tower.spec.get('name')} returned {feats.shape}, "
                                       f"expected {(len(rows), dim)}")
                bad = ~np.isfinite(feats).all(axis=1)
                if bad.any():
                    raise DataError(f"non-finite {tower.modality} features for item "
                                    f"{items[int(rows[int(np.argmax(bad))])]!r}")
                out[rows] = feats
                bar.update(len(rows))
                end = start + len(rows)
                if partial is not None and (end % partial.shard_items == 0 or end == n):
                    a = shard * partial.shard_items
                    if pending is not None:
                        pending.result()  # at most one shard in flight: bounded memory
                    pending = saver.submit(partial.save, shard, out[order[a:end]])
            if pending is not None:
                pending.result()
    finally:
        tower.train(was_training)
    return out


class _Partial:
    """The shards of an unfinished cache entry: ``<stem>.partial/`` beside it.

    ``shard_items`` (a multiple of the batch size) comes from the folder's manifest when it has
    one for this entry, so a resumed run cuts its shards where the killed one did."""

    def __init__(self, entry: Path, n: int, dim: int, batch_size: int) -> None:
        self.folder = entry.with_suffix(".partial")
        self.n, self.dim, self.batch_size = n, dim, batch_size
        want = {"format": PARTIAL_FORMAT, "entry": entry.name, "count": n, "dim": dim, "batch_size": batch_size}
        try:
            manifest = json.loads((self.folder / "manifest.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            manifest = None
        if (isinstance(manifest, dict) and {k: manifest.get(k) for k in want} == want
                and isinstance(manifest.get("shard_items"), int) and manifest["shard_items"] > 0
                and manifest["shard_items"] % batch_size == 0):
            self.shard_items = int(manifest["shard_items"])
        else:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.shard_items = -(-SHARD_ITEMS // batch_size) * batch_size
            try:
                atomic_write_json(self.folder / "manifest.json", {**want, "shard_items": self.shard_items})
            except OSError:
                pass  # no resumability, but the features are still computed

    def _file(self, shard: int) -> Path:
        return self.folder / f"shard-{shard:05d}.safetensors"

    def load(self, out: np.ndarray, order: np.ndarray) -> set[int]:
        """Fill ``out`` from the shards that pass their checksum; their numbers."""
        from safetensors.numpy import safe_open

        done: set[int] = set()
        kept = 0
        for shard in range(-(-self.n // self.shard_items)):
            a, b = shard * self.shard_items, min(self.n, (shard + 1) * self.shard_items)
            try:
                with safe_open(str(self._file(shard)), framework="np") as f:
                    meta = f.metadata() or {}
                    rows = f.get_tensor("features")
            except Exception:  # missing or damaged: computed again
                continue
            if (rows.shape != (b - a, self.dim) or rows.dtype != np.float32
                    or hashlib.sha256(np.ascontiguousarray(rows).data).hexdigest() != meta.get("sha256")):
                continue
            out[order[a:b]] = rows
            done.add(shard)
            kept += b - a
        if done:
            print(f"resuming {self.folder}: {len(done)} shards ({kept} of {self.n} items) kept from an "
                  f"interrupted run", file=sys.stderr)
        return done

    def save(self, shard: int, rows: np.ndarray) -> None:
        from safetensors.numpy import save_file

        rows = np.ascontiguousarray(rows)
        try:
            with atomic_path(self._file(shard)) as tmp:
                save_file({"features": rows}, str(tmp),
                          metadata={"sha256": hashlib.sha256(rows.data).hexdigest(), "shard": str(shard)})
        except OSError:
            pass  # a shard that cannot be saved is only computed again after a kill

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


# (resolved path, size, mtime) -> content digest, so that the many runs of one process hash each file once.
_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(p: Path) -> str:
    try:
        st = p.stat()
        memo = (str(p.resolve()), st.st_size, st.st_mtime_ns)
        if memo not in _DIGESTS:
            with open(p, "rb") as f:
                _DIGESTS[memo] = hashlib.file_digest(f, "blake2b").hexdigest()[:32]
    except OSError:
        raise DataError(f"image not found: {p}") from None
    return _DIGESTS[memo]


def _item_signature(item: Any, kind: str) -> Any:
    """What identifies an item's content: the file's bytes (a digest), the pixels, or the text.

    Not the file's mtime: copies and re-provisioned data sets (same bytes, new mtimes) keep their
    cache entries, while any change of content gives a new key."""
    if kind == "text":
        if not isinstance(item, str):
            raise DataError(f"text item {item!r} is not a string")
        return item
    if isinstance(item, str | Path):
        return _file_digest(Path(item))
    if hasattr(item, "tobytes"):  # PIL image or numpy array: digest of the pixels
        shape = list(getattr(item, "size", ())) + list(getattr(item, "shape", ()))
        return [type(item).__name__, shape, getattr(item, "mode", ""),
                hashlib.sha256(item.tobytes()).hexdigest()]
    raise DataError(f"cannot use {type(item).__name__} as an image (give a path or a PIL image)")


def data_fingerprint(items: list[Any], item_keys: list[str], kind: str) -> str:
    """The item keys and each item's content (file digest, pixels or text): keys every cache entry."""
    if len(item_keys) != len(items):
        raise DataError(f"{len(item_keys)} item keys for {len(items)} items")
    return fingerprint(kind, [str(k) for k in item_keys], [_item_signature(x, kind) for x in items])


def cache_path(tower: Tower, items: list[Any], item_keys: list[str], cache_dir: str | Path | None = None,
               kind: str | None = None) -> Path:
    """Where :func:`cached_features` keeps the features of ``items`` under ``tower``."""
    kind = kind or tower.modality
    if kind not in ("image", "text"):
        raise ConfigError(f"unknown feature kind '{kind}' (use image or text)")
    if kind != tower.modality:
        raise ConfigError(f"{kind} features asked from the {tower.modality} tower {tower.spec.get('name')}")
    data_fp = data_fingerprint(items, item_keys, kind)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "features" / f"{tower.fingerprint()}-{data_fp}.safetensors"


def _read_entry(path: Path, meta_path: Path, count: int, dim: int) -> np.ndarray | None:
    """The cached array, or None when the entry is damaged, fails its checksum, or does not fit."""
    from safetensors.numpy import load_file

    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        feats = load_file(str(path))["features"]
    except Exception:  # any damage (truncated, not JSON, wrong header) means: recompute
        return None
    if (meta.get("format") != FEATURES_FORMAT or meta.get("count") != count or meta.get("dim") != dim
            or feats.shape != (count, dim) or feats.dtype != np.float32 or not np.isfinite(feats).all()):
        return None
    if meta.get("tower_fingerprint") not in (None, path.stem.split("-", 1)[0]):
        return None  # a sidecar of another tower's entry
    want = meta.get("sha256")  # absent in entries written before it was recorded
    if want is not None and hashlib.sha256(np.ascontiguousarray(feats).data).hexdigest() != want:
        return None
    return feats


def cached_features(tower: Tower, items: list[Any], item_keys: list[str], cache_dir: str | Path | None = None,
                    kind: str | None = None, batch_size: int = 64, desc: str | None = None) -> np.ndarray:
    """Features of ``items`` from the cache, or computed, stored (atomically) and returned.

    ``items`` are what ``tower.prepare`` takes (image paths / PIL images, or caption strings);
    ``item_keys`` name them (image ids, caption ids). ``kind`` defaults to the tower's modality.
    """
    from safetensors.numpy import save_file

    path = cache_path(tower, items, item_keys, cache_dir, kind)
    meta_path = path.with_suffix(".json")
    n, dim = len(items), int(tower.output_dim)
    rank, world = work_ranks()
    feats = None
    if path.exists() or meta_path.exists():
        feats = _read_entry(path, meta_path, n, dim)
        if feats is None and rank == 0:
            print(f"cache file {path} damaged, recomputing", file=sys.stderr)
    if all_agree(feats is not None):  # under torchrun: a hit only when every rank has one
        assert feats is not None
        return feats
    partial = _Partial(path, n, dim, batch_size) if batch_size > 0 and rank == 0 else None
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    feats = _compute(tower, items, batch_size, desc, partial)
    if rank != 0:
        barrier()  # rank 0 writes the entry
        return feats
    with atomic_path(path) as tmp:
        save_file({"features": feats}, str(tmp), metadata={"format": FEATURES_FORMAT})
    atomic_write_json(meta_path, {
        "format": FEATURES_FORMAT, "tower": tower.spec, "modality": tower.modality,
        "tower_fingerprint": path.stem.split("-", 1)[0], "data_fingerprint": path.stem.split("-", 1)[1],
        "count": n, "dim": dim, "dtype": "float32", "sha256": hashlib.sha256(feats.data).hexdigest(),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    })
    if partial is not None:
        partial.remove()
    barrier()
    return feats
