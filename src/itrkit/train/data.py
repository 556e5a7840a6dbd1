"""Training pairs of one split: each caption with its image, served in seeded batch orders.

Two ways to feed the model: *cached* (computed once per model and data fingerprint, the CPU path
of docs/method.md §5: pooled features of frozen towers, the frozen prefix's states of ``top:N``
towers, whose top blocks then run each step) or *live* inputs prepared for the towers each step.
Teacher features: the split's rows of each store are read once into RAM (float32) when they fit
the ``teacher.ram_mb`` budget, else looked up on disk per batch (O(batch), constant memory).
Both give the same float32 values (the same read, check and conversion).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from itrkit.data.images import ImageCache
from itrkit.data.records import Dataset
from itrkit.errors import DataError
from itrkit.models.dual_encoder import DualEncoder
from itrkit.models.embed import cached_side, embed_live, image_keys, side_features, split_features  # noqa: F401
from itrkit.train.config import TeacherConfig


class PairData:
    """Rows = captions; ``txt2img`` maps each to its image; ``labels`` = image index (IConE class)."""

    def __init__(self, ds: Dataset, model: DualEncoder, cached: bool, cache_dir: str | Path | None = None,
                 image_cache_mb: int = 0) -> None:
        self.ds = ds
        self.txt2img = ds.txt2img
        self.n_pairs = len(self.txt2img)
        self.cached = cached
        self.model = model
        self.paths = [str(r.path) for r in ds.records]
        self.texts = ds.texts
        self.image_ids = ds.image_ids
        self.caption_ids = ds.caption_ids
        self.image_features: torch.Tensor | None = None
        self.text_features: torch.Tensor | None = None
        # top:N towers: the frozen prefix's states (on disk, read per batch); frozen towers: pooled features.
        self.image_prefix: Any = None
        self.text_prefix: Any = None
        if cached:
            for side, items in (("image", image_keys(ds)), ("text", ds.texts)):
                src = cached_side(model, side, items, cache_dir)
                setattr(self, f"{side}_features" if isinstance(src, torch.Tensor) else f"{side}_prefix", src)
        # (store, store row of each image / caption, in-RAM float32 table of those rows or None)
        self.teacher_image: tuple[Any, np.ndarray, torch.Tensor | None] | None = None
        self.teacher_text: tuple[Any, np.ndarray, torch.Tensor | None] | None = None
        # Live image towers: each image is decoded and preprocessed once, then served from RAM
        # (LRU under the budget; per worker process when a DataLoader forks workers).
        self.image_cache = ImageCache(image_cache_mb << 20) if image_cache_mb > 0 and not cached else None

    def _tower_input(self, img: Any) -> np.ndarray:
        x = self.model.image_tower.prepare([img])
        if not isinstance(x, torch.Tensor):
            raise DataError(f"data.image_cache_mb needs an image tower whose inputs are one tensor; "
                            f"{self.model.image_tower.spec.get('name')} gives {type(x).__name__} (set image_cache_mb=0)")
        return x[0].numpy()

    def image_inputs(self, img_idx: np.ndarray) -> Any:
        paths = [self.paths[i] for i in img_idx]
        if self.image_cache is None:
            return self.model.image_tower.prepare(paths)
        return torch.from_numpy(np.stack([self.image_cache.get(p, self._tower_input) for p in paths]))

    def attach_teachers(self, image_store: Any, text_store: Any, shuffle_seed: int | None = None,
                        ram_mb: int | None = None) -> None:
        """Row indices of each image / caption in the stores; ``shuffle_seed`` permutes them (control).

        ``ram_mb`` (default ``teacher.ram_mb``): the split's rows of both stores together, as
        float32, are read once into memory when they fit; a store that does not fit what is left
        stays on disk (image store first).
        """
        budget = (TeacherConfig.ram_mb if ram_mb is None else int(ram_mb)) << 20
        if image_store is not None:
            rows = image_store.index_for(self.image_ids)
            if shuffle_seed is not None:
                rows = rows[np.random.default_rng([shuffle_seed, 1]).permutation(len(rows))]
            self.teacher_image = (image_store, rows, _in_ram(image_store, rows, budget))
            budget -= _table_bytes(self.teacher_image[2])
        if text_store is not None:
            rows = text_store.index_for(self.caption_ids)
            if shuffle_seed is not None:
                rows = rows[np.random.default_rng([shuffle_seed, 2]).permutation(len(rows))]
            self.teacher_text = (text_store, rows, _in_ram(text_store, rows, budget))

    def teachers_in_ram(self) -> dict[str, bool]:
        """Which attached teacher stores are served from memory."""
        return {k: t[2] is not None for k, t in (("image", self.teacher_image), ("text", self.teacher_text))
                if t is not None}

    def order(self, seed: int, stage: int, epoch: int) -> np.ndarray:
        # Depends only on (seed, stage, epoch): methods with the same seed see the same batches,
        # and a resumed run regenerates the interrupted epoch's order exactly.
        return np.random.default_rng([seed, stage, epoch]).permutation(self.n_pairs)

    def num_batches(self, batch_size: int) -> int:
        full, rest = divmod(self.n_pairs, batch_size)
        return full + (1 if rest >= 2 else 0)  # a last batch of one row has no negatives

    def batch(self, cap_idx: np.ndarray) -> dict[str, Any]:
        cap_idx = np.asarray(cap_idx)
        img_idx = self.txt2img[cap_idx]
        b: dict[str, Any] = {
            "img_ids": torch.from_numpy(img_idx.astype(np.int64)),  # same image ⇔ same id
            "labels": torch.from_numpy(img_idx.astype(np.int64)),
            "caption_index": cap_idx,
        }
        if self.cached:
            for side, idx in (("image", img_idx), ("text", cap_idx)):
                feats, prefix = getattr(self, f"{side}_features"), getattr(self, f"{side}_prefix")
                if prefix is not None:
                    b[f"{side}_states"] = prefix.batch(idx)
                else:
                    b[f"{side}_features"] = feats[torch.from_numpy(idx)]
        else:
            b["image_inputs"] = self.image_inputs(img_idx)
            b["text_inputs"] = self.model.text_tower.prepare([self.texts[i] for i in cap_idx])
        if self.teacher_image is not None:
            b["teacher_image"] = _teacher_rows(self.teacher_image, img_idx)
        if self.teacher_text is not None:
            b["teacher_text"] = _teacher_rows(self.teacher_text, cap_idx)
        return b

    def describe_batch(self, cap_idx: np.ndarray, n: int = 4) -> str:
        ids = [self.caption_ids[i] for i in np.asarray(cap_idx)[:n]]
        return ", ".join(ids) + (" …" if len(cap_idx) > n else "")


_RAM_CHUNK_ROWS = 1 << 14  # rows per read while filling the in-RAM table: bounds the transient copies


def _in_ram(store: Any, rows: np.ndarray, budget_bytes: int) -> torch.Tensor | None:
    """``store.rows(rows)`` read once (in chunks) when the float32 table fits ``budget_bytes``, else None."""
    if len(rows) * int(store.dim) * 4 > budget_bytes:
        return None
    table = torch.empty((len(rows), int(store.dim)), dtype=torch.float32)
    for s in range(0, len(rows), _RAM_CHUNK_ROWS):
        # The per-batch reader itself (finite check, float16 → float32), so values are identical.
        table[s:s + _RAM_CHUNK_ROWS] = store.rows(rows[s:s + _RAM_CHUNK_ROWS])
    return table


def _table_bytes(table: torch.Tensor | None) -> int:
    return 0 if table is None else table.numel() * table.element_size()


def _teacher_rows(teacher: tuple[Any, np.ndarray, torch.Tensor | None], idx: np.ndarray) -> torch.Tensor:
    store, rows, table = teacher
    if table is not None:
        return table[torch.from_numpy(np.asarray(idx, dtype=np.int64))]
    return store.rows(rows[idx])


def embed_split(model: DualEncoder, data: PairData) -> dict[str, np.ndarray]:
    """L2-normalised embeddings of a split's images and captions (every head)."""
    if data.cached:
        img = side_features(model, data.image_features if data.image_prefix is None else data.image_prefix, "image")
        txt = side_features(model, data.text_features if data.text_prefix is None else data.text_prefix, "text")
        return model.embed_features(img, txt)
    return embed_live(model, data.paths, data.texts)


def require_split(ds: Dataset, name: str, limit: int = 0) -> Dataset:
    try:
        part = ds.split(name)
    except DataError:
        raise
    return part.subset(limit or None)


class BatchSource(torch.utils.data.Dataset):
    """Item k = the k-th batch of a fixed list of caption-index arrays, so a ``DataLoader`` with
    worker processes prepares (decodes, tokenises, reads teachers) the next batches while the
    model trains; the batches are the same as without workers."""

    def __init__(self, data: PairData, batches: list[np.ndarray]) -> None:
        self.data, self.batches = data, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> dict[str, Any]:
        return self.data.batch(self.batches[k])


def _as_is(x: Any) -> Any:
    return x


def iterate_batches(data: PairData, batches: list[np.ndarray], num_workers: int) -> Any:
    """Batches in order; prepared by ``num_workers`` processes when > 0 (live towers only)."""
    if num_workers <= 0 or data.cached:
        return (data.batch(b) for b in batches)
    return iter(torch.utils.data.DataLoader(BatchSource(data, batches), batch_size=None, shuffle=False,
                                            num_workers=num_workers, collate_fn=_as_is, prefetch_factor=2))
