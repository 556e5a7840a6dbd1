"""Tower features computed once and cached on disk (SPEC §2: "replaced by cached features").

A cache entry is ``<root>/features/<tower fingerprint>-<data fingerprint>.safetensors`` (one
float32 tensor ``features`` ``[N, D]``) with a JSON sidecar of the same stem (tower spec, count,
dim, fingerprints, creation time); ``root`` is ``cache_dir`` or :func:`default_cache_dir`.
The tower fingerprint covers its spec and weights; the data fingerprint covers the item keys and,
for images, each file's resolved path, size and modification time (for texts, the text itself),
so an edited image or a retrained tower never reuses stale features. A damaged entry is
recomputed (it is a cache) with a one-line notice on stderr.
"""

from __future__ import annotations

import hashlib
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from itrkit.errors import ConfigError, DataError
from itrkit.models.base import Tower
from itrkit.utils.io import atomic_path, atomic_write_json, default_cache_dir, fingerprint

FEATURES_FORMAT = "itrkit-features/1"


def compute_features(tower: Tower, items: list[Any], batch_size: int = 64, desc: str | None = None) -> np.ndarray:
    """Run ``tower`` over ``items`` in eval mode → float32 ``[N, output_dim]`` in item order."""
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    n, dim = len(items), int(tower.output_dim)
    out = np.empty((n, dim), dtype=np.float32)
    # Texts run longest first (as sentence-transformers does): batches of similar length waste
    # little on padding. Rows go back to item order; the order is a pure function of the texts.
    order = np.arange(n)
    if tower.modality == "text" and n and all(isinstance(t, str) for t in items):
        order = np.argsort([-len(t) for t in items], kind="stable")
    was_training = tower.training
    tower.eval()
    try:
        with torch.inference_mode(), tqdm(total=n, desc=desc or f"{tower.modality} features",
                                          unit=tower.modality, disable=None) as bar:
            for start in range(0, n, batch_size):
                rows = order[start:start + batch_size]
                batch = [items[int(i)] for i in rows]
                feats = tower(tower.prepare(batch)).float().cpu().numpy()
                if feats.shape != (len(batch), dim):
                    raise RuntimeError(f"tower {tower.spec.get('name')} returned {feats.shape}, "
                                       f"expected {(len(batch), dim)}")
                bad = ~np.isfinite(feats).all(axis=1)
                if bad.any():
                    raise DataError(f"non-finite {tower.modality} features for item "
                                    f"{batch[int(np.argmax(bad))]!r}")
                out[rows] = feats
                bar.update(len(batch))
    finally:
        tower.train(was_training)
    return out


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


def cache_path(tower: Tower, items: list[Any], item_keys: list[str], cache_dir: str | Path | None = None,
               kind: str | None = None) -> Path:
    """Where :func:`cached_features` keeps the features of ``items`` under ``tower``."""
    kind = kind or tower.modality
    if kind not in ("image", "text"):
        raise ConfigError(f"unknown feature kind '{kind}' (use image or text)")
    if kind != tower.modality:
        raise ConfigError(f"{kind} features asked from the {tower.modality} tower {tower.spec.get('name')}")
    if len(item_keys) != len(items):
        raise DataError(f"{len(item_keys)} item keys for {len(items)} items")
    data_fp = fingerprint(kind, [str(k) for k in item_keys], [_item_signature(x, kind) for x in items])
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return root / "features" / f"{tower.fingerprint()}-{data_fp}.safetensors"


def _read_entry(path: Path, meta_path: Path, count: int, dim: int) -> np.ndarray | None:
    """The cached array, or None when the entry is damaged or does not fit."""
    from safetensors.numpy import load_file

    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        feats = load_file(str(path))["features"]
    except Exception:  # any damage (truncated, not JSON, wrong header) means: recompute
        return None
    if (meta.get("format") != FEATURES_FORMAT or meta.get("count") != count or meta.get("dim") != dim
            or feats.shape != (count, dim) or feats.dtype != np.float32 or not np.isfinite(feats).all()):
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
    if path.exists() or meta_path.exists():
        feats = _read_entry(path, meta_path, n, dim)
        if feats is not None:
            return feats
        print(f"cache file {path} damaged, recomputing", file=sys.stderr)
    feats = compute_features(tower, items, batch_size=batch_size, desc=desc)
    with atomic_path(path) as tmp:
        save_file({"features": feats}, str(tmp), metadata={"format": FEATURES_FORMAT})
    atomic_write_json(meta_path, {
        "format": FEATURES_FORMAT, "tower": tower.spec, "modality": tower.modality,
        "tower_fingerprint": path.stem.split("-", 1)[0], "data_fingerprint": path.stem.split("-", 1)[1],
        "count": n, "dim": dim, "dtype": "float32",
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    })
    return feats
