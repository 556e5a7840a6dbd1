"""Grid (region) features for fusion matchers: the CNN's pre-pool feature map, one row per image.

SGRAF (Diao et al., AAAI 2021) matches caption words against image *regions*; the paper uses
36 detector regions, and grid cells of a CNN are the standard detector-free substitute. Here the
regions are the 7×7 cells of EfficientNet-Lite0's last feature map at 224 px (the head activation
before average pooling, ``net.extract_features``): 49 regions × 1280 channels per image.

A grid store is an ordinary :class:`~itrkit.teachers.store.FeatureStore` of kind ``image`` keyed
by the dataset's image ids (the ids teacher image stores use), whose row is the cell-major map
flattened to ``49·1280`` float16 values; its header records ``"grid": [49, 1280]`` so readers can
reshape rows to ``(regions, channels)``. 8,091 Flickr8k images take about 1 GB.

The extraction is resumable (the shards and manifest of :class:`~itrkit.teachers.store.StoreWriter`,
keyed by the model's fingerprint, the ids, each image's path, size and mtime and the batch size):
run again after a kill, it computes only the unfinished shards and writes the same bytes.
"""

from __future__ import annotations

import concurrent.futures
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itrkit.errors import ConfigError, StoreError
from itrkit.teachers.store import FeatureStore, data_fingerprint, resume_info
from itrkit.utils.device import (
    barrier,
    broadcast_flags,
    every_rank,
    init_distributed,
    move_to,
    resolve_device,
    sharded,
    work_ranks,
)
from itrkit.utils.progress import Progress

GRID_MODELS = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")


def grid_shape(store: FeatureStore) -> tuple[int, int]:
    """``(regions, channels)`` of a grid store (refuses a store that is not one)."""
    g = store.header.get("grid")
    if not (isinstance(g, list) and len(g) == 2 and all(isinstance(v, int) and v > 0 for v in g)):
        raise StoreError(f"{store.path} is not a grid store (no 'grid' shape in its header; run 'itrkit grid')")
    if g[0] * g[1] != store.dim:
        raise StoreError(f"{store.path}: grid shape {g} does not match the row dimension {store.dim}")
    return int(g[0]), int(g[1])


def open_grid_store(path: str | Path, ids: Sequence[str] | None = None, source: str | None = None) -> FeatureStore:
    """Open a grid store and check it has a row for every id in ``ids`` (one-line StoreError otherwise)."""
    path = Path(path)
    if not path.is_dir():
        raise StoreError(f"no grid store at {path} (run 'itrkit grid DATA --out {path}')")
    store = FeatureStore.open(path, expect_kind="image")
    grid_shape(store)
    if ids is not None:
        require_ids(store, ids, source)
    return store


def require_ids(store: FeatureStore, ids: Sequence[str], source: str | None = None) -> None:
    """One-line StoreError unless the open grid ``store`` has a row for every id in ``ids``
    (checked on the open store: no second open, no second checksum pass)."""
    _, found = store._index.find(list(ids))
    if not found.all():
        first = list(ids)[int(np.argmin(found))]
        data = f" of '{source}'" if source else ""
        raise StoreError(f"grid store {store.path} (built for '{store.header.get('source')}') has no features for "
                         f"{int((~found).sum())} of {len(found)} image ids{data} (first missing: '{first}')")


def read_regions(store: FeatureStore, rows: Any) -> torch.Tensor:
    """``(B, R, C)`` float32 region features of store rows ``rows``."""
    r, c = grid_shape(store)
    return store.rows(rows).view(-1, r, c)


class _GridEncoder:
    """EfficientNet-Lite's head activation map, cell-major: ``(B, H·W, 1280)``."""

    def __init__(self, model: str) -> None:
        from itrkit.models.efficientnet import EfficientNetLiteTower

        if model not in GRID_MODELS:
            raise ConfigError(f"unknown grid model '{model}' (use one of {', '.join(GRID_MODELS)})")
        self.tower = EfficientNetLiteTower(model)
        self.tower.eval()
        self.spec = dict(self.tower.spec)

    def prepare(self, paths: list[str]) -> torch.Tensor:
        return self.tower.prepare(paths)

    def to(self, device: torch.device) -> _GridEncoder:
        self.tower.to(device)
        self.device = device
        return self

    device = torch.device("cpu")

    @torch.inference_mode()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.tower.net.extract_features(move_to(x, self.device, non_blocking=True))  # (B, C, H, W)
        return fmap.flatten(2).transpose(1, 2).contiguous().cpu()  # (B, H·W, C): one row per cell


def _encode_grid(enc: _GridEncoder, paths: list[str], chunks: list[list[int]]) -> Any:
    """The cell maps of each chunk, in order; the next batch's images are decoded in a thread
    while the network runs on the current one."""
    if not chunks:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        nxt = pool.submit(enc.prepare, [paths[i] for i in chunks[0]])
        for k in range(len(chunks)):
            x = nxt.result()
            if k + 1 < len(chunks):
                nxt = pool.submit(enc.prepare, [paths[i] for i in chunks[k + 1]])
            yield enc(x)


def build_grid_store(dataset: Any, out_path: str | Path, model: str = "efficientnet-lite0", batch_size: int = 32,
                     overwrite: bool = False, progress: bool = True,
                     device: str | torch.device = "auto") -> FeatureStore:
    """Extract the grid features of every image of ``dataset`` into ``out_path`` (atomic folder).

    An existing store of the same model covering the dataset's ids is reused; one built by another
    model (name, or weights by their fingerprint) or for other ids is refused (delete it or pass
    ``overwrite``). A run killed part-way continues from its finished shards.

    The network runs on ``device``. Under ``torchrun`` every rank calls this with the same
    arguments: batches are dealt round-robin over the ranks, gathered in order, and rank 0 writes
    the same store one process writes.
    """
    out_path = Path(out_path)
    ids = [str(i) for i in dataset.image_ids]
    paths = [str(p) for p in dataset.image_paths]
    if not ids:
        raise ConfigError(f"dataset '{getattr(dataset, 'name', '?')}' has no images to extract")
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    device = resolve_device(device)  # before anything is written
    init_distributed(device)
    with every_rank():  # every rank calls this with the same arguments: shard the batches
        return _build_grid_store(dataset, out_path, ids, paths, model, batch_size, overwrite, progress, device)


def _build_grid_store(dataset: Any, out_path: Path, ids: list[str], paths: list[str], model: str, batch_size: int,
                      overwrite: bool, progress: bool, device: torch.device) -> FeatureStore:
    rank, world = work_ranks()
    lead = rank == 0
    if out_path.exists() and not overwrite:
        store = open_grid_store(out_path)
        if store.teacher != model:
            raise StoreError(f"{out_path} holds grid features of '{store.teacher}', not '{model}' "
                             f"(delete it or pass --overwrite)")
        store.check_ids(ids, source=getattr(dataset, "name", None))
        if store.header["teacher"].get("fingerprint"):
            store.check_model(_GridEncoder(model).tower)
        print(f"reusing grid store {out_path} ({store.count} images, grid {grid_shape(store)})", file=sys.stderr)
        return store
    from itrkit.teachers.extract import job_key

    enc = _GridEncoder(model).to(device)
    info = {"name": model, "spec": enc.spec, "class": "grid", "fingerprint": enc.tower.fingerprint()}
    chunks = [list(range(s, min(s + batch_size, len(ids)))) for s in range(0, len(ids), batch_size)]
    groups = [[np.asarray(c, dtype=np.int64) for c in chunks]]
    job = job_key(info, "image", ids, paths, "grid", batch_size)
    writer = None

    def open_writer(grid: list[int]) -> Any:
        return FeatureStore.create(out_path, ids, grid[0] * grid[1], info, "image",
                                   source=getattr(dataset, "name", None), overwrite=overwrite,
                                   extra={"grid": grid, "data_fingerprint": data_fingerprint("image", ids, paths)},
                                   job=job, groups=groups if job else None)

    t0 = time.perf_counter()
    bar = Progress(total=len(ids), desc=f"grid {model}", unit="img", enabled=progress and lead,
                   what=f"computing grid region features with {model}", cached_at=out_path)
    store = None
    try:
        prior = resume_info(out_path, job) if job and lead else None
        if prior is not None and isinstance((prior.get("extra") or {}).get("grid"), list):
            writer = open_writer([int(v) for v in prior["extra"]["grid"]])
            if writer.resumed_rows:
                print(f"resuming {out_path}: {writer.shards_done} of {writer.n_shards} shards "
                      f"({writer.resumed_rows} of {len(ids)} images) kept from the interrupted run", file=sys.stderr)
                bar.skip(writer.resumed_rows)
        done = [writer is not None and k in writer.done_units for k in range(len(chunks))]
        if world > 1:  # every rank skips the batches rank 0 kept
            done = broadcast_flags(done)
        todo = [c for k, c in enumerate(chunks) if not done[k]]
        mine = todo[rank::world] if world > 1 else todo
        for chunk, cells in sharded(todo, None, mine=_encode_grid(enc, paths, mine)):
            if not lead:
                continue
            if writer is None:
                writer = open_writer([int(cells.shape[1]), int(cells.shape[2])])
            writer.write(chunk[0], cells.reshape(len(chunk), -1))
            bar.update(len(chunk))
        if lead:
            assert writer is not None
            seconds = time.perf_counter() - t0
            store = writer.close_extraction(seconds, batch_size, computed=len(ids) - writer.resumed_rows)
    except BaseException as e:
        if writer is not None:
            writer.abort(e)
        raise
    finally:
        bar.close()
    if world > 1:
        barrier()  # the store is in place before any rank reads it
        if not lead:
            return open_grid_store(out_path)
    assert store is not None
    print(f"grid {model}: {len(ids)} images in {seconds:.1f} s ({len(ids) / seconds:.1f} img/s), "
          f"grid {grid_shape(store)} float16 → {out_path}", file=sys.stderr)
    return store




def cached_grid_store(dataset: Any, model: str = "efficientnet-lite0", cache_dir: str | Path | None = None,
                      progress: bool = True, device: str | torch.device = "auto") -> Path:
    """The grid store of ``dataset``'s images in the content-keyed feature cache (what training a
    fusion matcher uses when ``data.grid_store`` is empty): keyed, like the tower-feature cache,
    by the grid model and the images' ids and file contents, so every run and seed on the same
    images shares one store, and changed images get a new one. Built (resumable) on first use."""
    from itrkit.models.features import _item_signature
    from itrkit.utils.io import default_cache_dir, fingerprint

    ids = [str(i) for i in dataset.image_ids]
    paths = [str(p) for p in dataset.image_paths]
    key = fingerprint("grid", model, ids, [_item_signature(p, "image") for p in paths])
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    path = root / "grid" / f"{model}-{key}.store"
    if not (path / "header.json").is_file():
        print(f"grid features ({model}) of {len(ids)} images → {path}", file=sys.stderr)
    build_grid_store(dataset, path, model=model, progress=progress, device=device)
    return path
