"""Build and read a retrieval index folder: image and caption embeddings of one trained model.

Folder layout (written at once with :func:`itrkit.utils.io.atomic_dir`)::

    manifest.json        {"format": "itrkit-index/2", "model_fingerprint", "data_fingerprint", "run_dir",
                          "backend", "backend_params", "dim", "uni_dim", "counts", "dataset", "created",
                          "calibration" (approximate backends: per matrix, the calibrated search
                          "params" and the measured "recall_at_10" against exact search),
                          "files": {name: {"bytes", "sha256"}}, "manifest_sha256"}
    images.safetensors   image_embeds [N, d] (cross head), image_uni [N, d'] (USA head, if any)
    captions.safetensors text_embeds [M, d] (cross head)
    items.json           image ids, absolute image paths, SHA-256 of each image file, captions per
                         image, caption -> image index
    *.faiss              one file per searchable matrix when the backend is faiss

Integrity: the manifest records the size and SHA-256 of every other file and a SHA-256 of itself
(``manifest_sha256``, over its other keys); the reader checks them all before parsing anything, so a
truncated or bit-flipped file is one :class:`StoreError` naming it. The model fingerprint ties the
index to the encoder that must embed the queries; the data fingerprint (ids, captions and image
bytes) names the data it was built from, and the service serves an image only while its bytes still
hash to the indexed SHA-256.

Resumable: the embeddings are computed in shards of about :data:`SHARD_ITEMS` items (whole
batches), each saved with its checksum to ``.<name>.partial/`` beside the index as it finishes (see
:class:`_Shards`). A build that is killed or interrupted and then run again with the same model,
data and batch size embeds only the shards it had not finished; the index it writes has the same
bytes as an uninterrupted build (the manifest differs only in ``created``).
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from itrkit.data.records import Caption, Dataset, ImageRecord
from itrkit.errors import DataError, StoreError
from itrkit.index.backends import (
    DEFAULT_TARGET_RECALL,
    ExactIndex,
    VectorIndex,
    build_calibrated,
    choose_backend,
    load_backend,
)
from itrkit.utils.io import atomic_dir, atomic_path, atomic_write_json, fingerprint, sha256_file

FORMAT = "itrkit-index/2"
# Formats this reader refuses with a hint, rather than as unknown.
OLD_FORMATS = ("itrkit-index/1",)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# Matrix name in the safetensors files -> faiss file name for that matrix.
FAISS_FILES = {"image_embeds": "image_embeds.faiss", "image_uni": "image_uni.faiss",
               "text_embeds": "text_embeds.faiss"}
# Resumable builds (see _Shards): items per shard of an embedding pass, rounded up to whole batches.
SHARD_ITEMS = 4096
PARTIAL_FORMAT = "itrkit-index-partial/1"
_PARTIAL_MANIFEST = "manifest.json"
_LOCK = ".lock"


@runtime_checkable
class Encoder(Protocol):
    """What an index needs from a model (``itrkit.models.DualEncoder`` implements it)."""

    def encode_images(self, items: list[Path | Image.Image]) -> np.ndarray: ...

    def encode_texts(self, texts: list[str]) -> np.ndarray: ...

    def encode_images_uni(self, items: list[Path | Image.Image]) -> np.ndarray | None: ...

    def encode_texts_uni(self, texts: list[str]) -> np.ndarray | None: ...

    def fingerprint(self) -> str: ...


# --- inputs ----------------------------------------------------------------------------------------
def dataset_from_source(source: str | Path, split: str | None = None) -> Dataset:
    """A prepared dataset folder / ``dataset.json``, or a plain folder of images (no captions)."""
    source = Path(source)
    if (source.is_file() and source.suffix == ".json") or (source / "dataset.json").is_file():
        ds = Dataset.load(source)
        return ds.split(*split.split("+")) if split else ds
    if not source.is_dir():
        raise DataError(f"--images must be a dataset folder or a folder of images: {source} not found")
    if split:
        raise DataError(f"{source} is a plain image folder: it has no splits (drop --split)")
    files = sorted(p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {source}")
    records = [ImageRecord(id=p.relative_to(source).as_posix(), path=p.resolve(), captions=[])
               for p in files]
    return Dataset(records, name=source.resolve().name)


# --- building --------------------------------------------------------------------------------------
def partial_path(out_dir: str | Path) -> Path:
    """The fixed folder a build of ``out_dir`` keeps its finished shards in (``.<name>.partial``)."""
    out_dir = Path(out_dir)
    return out_dir.with_name(f".{out_dir.name}.partial")


class _Shards:
    """Finished embedding shards of a build: ``.<index>.partial/`` beside the index folder.

    One safetensors file per shard of a pass (``image_embeds``, ``image_uni``, ``text_embeds``):
    its float32 rows and, for an image pass, the SHA-256 of each image file it embedded (hashed
    right after the cross-head embedding). ``manifest.json`` (rewritten atomically after each shard)
    names the job, the shard size and the SHA-256 of every finished shard file; a file it does not
    list, or one that fails its checksum, is computed again. ``shard_items`` comes from the
    manifest when it is for this job, so a resumed run cuts its shards where the killed one did.
    An ``flock`` keeps a second build of the same index out of the folder.
    """

    def __init__(self, out_dir: Path, job: str) -> None:
        self.folder = partial_path(out_dir)
        self.job = job
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd: int | None = os.open(self.folder / _LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise StoreError(f"{out_dir} is being built by another process (it holds the lock on {self.folder}); "
                             "wait for it to finish or stop it") from None
        m = self._read_manifest()
        if m is not None:
            self.shard_items: int = m["shard_items"]
            self.done: dict[str, str] = {str(k): str(v) for k, v in m["shards"].items()}
        else:  # nothing, or another job's shards (other model, data or batch size): start afresh
            for p in self.folder.iterdir():
                if p.name != _LOCK:
                    shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
            self.shard_items, self.done = SHARD_ITEMS, {}
            self._write_manifest()

    def _read_manifest(self) -> dict[str, Any] | None:
        try:
            m = json.loads((self.folder / _PARTIAL_MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if (not isinstance(m, dict) or m.get("format") != PARTIAL_FORMAT or m.get("job") != self.job
                or not isinstance(m.get("shard_items"), int) or m["shard_items"] <= 0
                or not isinstance(m.get("shards"), dict)):
            return None
        return m

    def _write_manifest(self) -> None:
        atomic_write_json(self.folder / _PARTIAL_MANIFEST, {"format": PARTIAL_FORMAT, "job": self.job,
                                                            "shard_items": self.shard_items,
                                                            "shards": dict(sorted(self.done.items()))})

    def per_shard(self, batch_size: int) -> int:
        """Items per shard of a pass: whole batches, so a resumed pass sees the same batches."""
        return -(-self.shard_items // batch_size) * batch_size

    @staticmethod
    def _name(name: str, k: int) -> str:
        return f"{name}-{k:05d}"

    def is_done(self, name: str, k: int) -> bool:
        return self._name(name, k) in self.done

    def load(self, name: str, k: int, n: int) -> tuple[np.ndarray, list[str] | None] | None:
        """The rows (and image hashes) of finished shard ``k`` of ``n`` items; None when its file
        is missing, damaged (fails the SHA-256 the manifest records) or does not fit."""
        from safetensors.numpy import load_file

        key = self._name(name, k)
        digest = self.done[key]
        path = self.folder / f"{key}.safetensors"
        try:
            ok = path.is_file() and sha256_file(path) == digest
            tensors = load_file(str(path)) if ok else {}
        except Exception:  # unreadable: computed again
            tensors = {}
        rows, sums = tensors.get("rows"), tensors.get("image_sha256")
        if (rows is None or rows.ndim != 2 or len(rows) != n or rows.dtype != np.float32
                or (sums is not None and sums.shape != (n, 32))):
            return None
        return rows, [bytes(s).hex() for s in sums] if sums is not None else None

    def save(self, name: str, k: int, rows: np.ndarray, image_sha256: list[str] | None) -> None:
        """Write shard ``k`` of pass ``name`` (atomic rename), then record it in the manifest."""
        from safetensors.numpy import save_file

        key = self._name(name, k)
        tensors = {"rows": np.ascontiguousarray(rows, dtype=np.float32)}
        if image_sha256 is not None:
            tensors["image_sha256"] = np.frombuffer(b"".join(bytes.fromhex(s) for s in image_sha256),
                                                    dtype=np.uint8).reshape(-1, 32)
        with atomic_path(self.folder / f"{key}.safetensors") as tmp:
            save_file(tensors, str(tmp), metadata={"format": PARTIAL_FORMAT})
        self._record(key, sha256_file(self.folder / f"{key}.safetensors"))

    def _record(self, key: str, digest: str) -> None:
        self.done[key] = digest
        self._write_manifest()

    def close(self, remove: bool) -> None:
        """Release the lock; ``remove``: delete the folder (the build finished or failed)."""
        if remove:
            shutil.rmtree(self.folder, ignore_errors=True)
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def _check_batch(out: Any, n: int, what: str, ids: list[str], start: int) -> np.ndarray:
    """An encoder's output for ``n`` inputs as finite float32 [n, d] rows."""
    out = np.asarray(out, dtype=np.float32)
    if out.ndim != 2 or len(out) != n:
        raise StoreError(f"encoder returned {what} of shape {tuple(out.shape)} for {n} inputs")
    bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
    if len(bad):
        raise DataError(f"non-finite {what} for '{ids[start + int(bad[0])]}'")
    return out


def _embed(fn: Any, items: list[Any], name: str, what: str, ids: list[str], batch_size: int, progress: bool,
           shards: _Shards, image_sha256: list[str] | None = None, hash_files: bool = False) -> np.ndarray | None:
    """Run an encoder method over ``items`` in batches, one shard at a time (None when it returns
    None: a model without a USA head).

    A finished shard of an interrupted run is kept when its file passes its checksum and, for an
    image pass, while its images' SHA-256s (``image_sha256``) are the ones it recorded: an image
    edited since is embedded again. ``hash_files`` (the first image pass): hash each file right
    after embedding it (or, for a kept shard, now) into ``image_sha256``; the other image pass
    compares with those."""
    from itrkit.utils.progress import progress as progress_lines

    per = shards.per_shard(batch_size)
    bounds = [(a, min(a + per, len(items))) for a in range(0, len(items), per)]
    parts: dict[int, np.ndarray] = {}
    damaged = changed = 0
    for k, (a, b) in enumerate(bounds):
        if not shards.is_done(name, k):
            continue
        got = shards.load(name, k, b - a)
        if got is None:
            damaged += 1
            continue
        rows, sums = got
        if image_sha256 is not None:
            now = [sha256_file(p) for p in items[a:b]] if hash_files else image_sha256[a:b]
            if sums != now:
                changed += 1
                continue
            image_sha256[a:b] = now
        parts[k] = rows
    where = shards.folder
    if parts:
        kept = sum(bounds[k][1] - bounds[k][0] for k in parts)
        print(f"resuming {where}: {what}: {len(parts)} of {len(bounds)} shards ({kept} of {len(items)} items) "
              "kept from an interrupted run", file=sys.stderr)
    if damaged:
        print(f"{where}: {damaged} finished shard(s) of {what} fail their checksum; computing them again",
              file=sys.stderr)
    if changed:
        print(f"{where}: {what}: the image files of {changed} finished shard(s) changed since the interrupted "
              "run; embedding them again", file=sys.stderr)
    reused = len(parts)
    todo = [k for k in range(len(bounds)) if k not in parts]
    # A pass kept whole from an interrupted run has nothing to report.
    bar = progress_lines(total=-(-len(items) // batch_size), desc=f"embedding {what}", unit="batch",
                         enabled=progress and bool(todo), what=f"computing {what} of {len(items)} items for the "
                         "index", cached_at=where, where_label="finished shards kept in")
    try:
        bar.skip(sum(-(-(bounds[k][1] - bounds[k][0]) // batch_size) for k in parts))
        for k in todo:
            a, b = bounds[k]
            outs: list[np.ndarray] = []
            for start in range(a, b, batch_size):
                stop = min(start + batch_size, b)
                out = fn(items[start:stop])
                if out is None:
                    if outs or parts:
                        raise StoreError(f"encoder returned no {what} for batch at {start} after returning some"
                                         + (f" (kept in {where})" if reused else ""))
                    return None
                outs.append(_check_batch(out, stop - start, what, ids, start))
                bar.update(1)
            sums = None
            if image_sha256 is not None:
                if hash_files:  # right after embedding: a file the encoder read is the file recorded
                    image_sha256[a:b] = [sha256_file(p) for p in items[a:b]]
                sums = image_sha256[a:b]
            parts[k] = np.concatenate(outs)
            shards.save(name, k, parts[k], sums)
    finally:
        bar.close()
    dims = sorted({p.shape[1] for p in parts.values()})
    if len(dims) > 1:
        raise StoreError(f"encoder returned {what} of dimensions {dims} in different shards of {where}")
    return np.concatenate([parts[k] for k in range(len(bounds))])


def build_index(encoder: Encoder, dataset: Dataset, out_dir: str | Path, backend: str = "auto",
                run_dir: str | Path | None = None, batch_size: int = 32, overwrite: bool = False,
                hnsw_m: int = 32, ef_construction: int = 200, ef_search: int = 128,
                progress: bool = True, target_recall: float = DEFAULT_TARGET_RECALL) -> Path:
    """Embed every image (cross head and USA head when present) and caption of ``dataset`` into ``out_dir``.

    ``backend="auto"``: chosen by the largest matrix (:func:`itrkit.index.backends.choose_backend`).
    An approximate backend's search parameters are calibrated to ``target_recall`` (recall@10
    against exact search; ``ef_search`` is only the starting value) and the manifest's
    ``calibration`` records, per matrix, the chosen parameters and the measured recall.
    """
    backend = choose_backend(max(len(dataset), len(dataset.captions)), backend)
    if len(dataset) == 0:
        raise DataError(f"dataset '{dataset.name}' has no images to index")
    dataset.validate(check_files=True)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise StoreError(f"{out_dir} already exists (use --overwrite to replace it)")
    ids = dataset.image_ids
    paths = [Path(p).resolve() for p in dataset.image_paths]
    texts = dataset.texts
    cap_ids = dataset.caption_ids
    captions = [[(c.id, c.text) for c in r.captions] for r in dataset.records]
    model_fp = encoder.fingerprint()
    text_batch = max(batch_size, 64)
    # Everything that determines the embeddings (the device too: CPU and GPU differ in the last
    # bits); the image bytes are checked per shard instead, so a resumed run reads each file once.
    job = fingerprint(PARTIAL_FORMAT, model_fp, str(getattr(encoder, "device", "")), ids,
                      [str(p) for p in paths], captions, batch_size, text_batch)
    shards = _Shards(out_dir, job)
    try:
        image_sha256: list[str] = [""] * len(paths)
        image_embeds = _embed(encoder.encode_images, paths, "image_embeds", "image embeddings", ids, batch_size,
                              progress, shards, image_sha256=image_sha256, hash_files=True)
        image_uni = _embed(encoder.encode_images_uni, paths, "image_uni", "image USA embeddings", ids, batch_size,
                           progress, shards, image_sha256=image_sha256)
        assert image_embeds is not None  # len(dataset) > 0
        dim = image_embeds.shape[1]
        text_embeds = _embed(encoder.encode_texts, texts, "text_embeds", "caption embeddings", cap_ids,
                             text_batch, progress, shards) if texts else np.zeros((0, dim), np.float32)
        if text_embeds is None or text_embeds.shape[1] != dim:
            raise StoreError(f"encoder's caption embeddings do not match its image embeddings (dim {dim})")
        _write_index(out_dir, overwrite, encoder_fp=model_fp, dataset=dataset, paths=paths,
                     image_sha256=image_sha256, captions=captions, run_dir=run_dir, backend=backend,
                     hnsw_m=hnsw_m, ef_construction=ef_construction, ef_search=ef_search,
                     target_recall=target_recall, image_embeds=image_embeds, image_uni=image_uni, text_embeds=text_embeds)
    except KeyboardInterrupt:
        print(f"interrupted: {len(shards.done)} finished shard(s) of {out_dir} are kept in {shards.folder}; "
              "run the same command again to continue", file=sys.stderr)
        shards.close(remove=False)
        raise
    except BaseException:  # bad data, a broken encoder, a full disk: nothing is kept
        shards.close(remove=True)
        raise
    shards.close(remove=True)
    return out_dir


def _write_index(out_dir: Path, overwrite: bool, *, encoder_fp: str, dataset: Dataset, paths: list[Path],
                 image_sha256: list[str], captions: list[list[tuple[str, str]]], run_dir: str | Path | None,
                 backend: str, hnsw_m: int, ef_construction: int, ef_search: int, target_recall: float,
                 image_embeds: np.ndarray,
                 image_uni: np.ndarray | None, text_embeds: np.ndarray) -> None:
    """Write the index folder (atomically: a folder with a manifest is a complete index)."""
    ids = dataset.image_ids
    dim = image_embeds.shape[1]
    data_fp = fingerprint(ids, image_sha256, captions)
    params = {"m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search} \
        if backend == "faiss-hnsw" else {}
    manifest = {
        "format": FORMAT,
        "model_fingerprint": encoder_fp,
        "data_fingerprint": data_fp,
        "run_dir": str(Path(run_dir).resolve()) if run_dir is not None else None,
        "backend": backend,
        "backend_params": params,
        "dim": int(dim),
        "uni_dim": int(image_uni.shape[1]) if image_uni is not None else None,
        "counts": {"images": len(ids), "captions": len(text_embeds)},
        "dataset": dataset.name,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    items = {
        "image_ids": ids,
        "image_paths": [str(p) for p in paths],
        "image_sha256": image_sha256,
        "captions": [[{"id": c.id, "text": c.text} for c in r.captions] for r in dataset.records],
        "caption_image": dataset.txt2img.tolist(),
    }
    from safetensors.numpy import save_file

    with atomic_dir(out_dir, overwrite=overwrite) as tmp:
        images = {"image_embeds": image_embeds}
        if image_uni is not None:
            images["image_uni"] = image_uni
        save_file(images, str(tmp / "images.safetensors"), metadata={"format": FORMAT})
        save_file({"text_embeds": text_embeds}, str(tmp / "captions.safetensors"), metadata={"format": FORMAT})
        atomic_write_json(tmp / "items.json", items)
        if backend != "exact":
            # Held-out calibration queries: the query side of each search (captions for the image
            # index, images for the caption index); image->image search samples the gallery itself.
            query_for = {"image_embeds": text_embeds, "text_embeds": image_embeds, "image_uni": None}
            manifest["calibration"] = {}
            for key, mat in {**images, "text_embeds": text_embeds}.items():
                if len(mat) == 0:
                    continue
                index, info = build_calibrated(backend, mat, query_for[key], target_recall, **params)
                if not info["reached"]:
                    print(f"{out_dir}: {key}: recall@10 {info['recall_at_10']} is below the target "
                          f"{target_recall} at the largest {info['params']}", file=sys.stderr)
                manifest["calibration"][key] = info
                index.save(tmp / FAISS_FILES[key])
        manifest["files"] = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
                             for f in sorted(tmp.iterdir()) if f.is_file()}
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        # The manifest goes last: a folder with a manifest is a complete index.
        atomic_write_json(tmp / "manifest.json", manifest)


def _manifest_digest(manifest: dict[str, Any]) -> str:
    """SHA-256 of the manifest's keys other than ``manifest_sha256``, in canonical JSON."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


# --- reading ---------------------------------------------------------------------------------------
class IndexReader:
    """A loaded index folder: embeddings, items, and one :class:`VectorIndex` per searchable matrix."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.manifest = self._read_manifest()
        items = self._read_json("items.json")
        try:
            self.image_ids: list[str] = [str(x) for x in items["image_ids"]]
            self.image_paths: list[Path] = [Path(p) for p in items["image_paths"]]
            self.image_sha256: list[str] = [str(x) for x in items["image_sha256"]]
            self.captions: list[list[Caption]] = [[Caption(str(c["id"]), str(c["text"])) for c in caps]
                                                  for caps in items["captions"]]
            self.caption_image = np.asarray(items["caption_image"], dtype=np.int64)
        except (KeyError, TypeError) as e:
            raise StoreError(f"{self.folder / 'items.json'}: missing or malformed entry {e}") from None
        self.caption_list: list[Caption] = [c for caps in self.captions for c in caps]

        images = self._read_tensors("images.safetensors")
        captions = self._read_tensors("captions.safetensors")
        if "image_embeds" not in images or "text_embeds" not in captions:
            raise StoreError(f"{self.folder}: images.safetensors needs image_embeds and captions.safetensors "
                             "needs text_embeds")
        self.image_embeds: np.ndarray = images["image_embeds"]
        self.image_uni: np.ndarray | None = images.get("image_uni")
        self.text_embeds: np.ndarray = captions["text_embeds"]
        self._check_consistency()

        self.backend: str = self.manifest["backend"]
        self.image_index = self._searcher("image_embeds", self.image_embeds)
        self.image_uni_index = self._searcher("image_uni", self.image_uni) if self.image_uni is not None else None
        self.caption_index = self._searcher("text_embeds", self.text_embeds)
        self.positions = {image_id: i for i, image_id in enumerate(self.image_ids)}
        self._verified: Any = None

    # --- helpers -----------------------------------------------------------------------------
    def _read_manifest(self) -> dict[str, Any]:
        path = self.folder / "manifest.json"
        if not path.is_file():
            raise StoreError(f"not an itrkit index: {path} is missing")
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StoreError(f"{path}: not valid JSON (damaged or truncated; rebuild the index)") from None
        if not isinstance(manifest, dict):
            raise StoreError(f"{path}: not an index manifest")
        fmt = manifest.get("format")
        if fmt in OLD_FORMATS:
            raise StoreError(f"{path}: index format {fmt} has no checksums; rebuild it with itrkit index build")
        if fmt != FORMAT:
            raise StoreError(f"{path}: unknown index format {fmt!r} (expected {FORMAT})")
        if manifest.get("manifest_sha256") != _manifest_digest(manifest):
            raise StoreError(f"{path}: checksum does not match its contents (damaged or edited; rebuild the index)")
        files = manifest.get("files")
        if not isinstance(files, dict) or not all(isinstance(v, dict) for v in files.values()):
            raise StoreError(f"{path}: no file checksums")
        return manifest

    def _listed(self, name: str) -> tuple[Path, dict]:
        """``name``'s path and manifest entry; one line if it is not listed or missing."""
        path = self.folder / name
        expected = self.manifest["files"].get(name)
        if expected is None:
            raise StoreError(f"{path}: not listed in {self.folder / 'manifest.json'} (rebuild the index)")
        if not path.is_file():
            raise StoreError(f"index file missing: {path}")
        return path, expected

    def _verified_bytes(self, name: str) -> bytes:
        """The bytes of ``name``, after checking its size and SHA-256 against the manifest."""
        path, expected = self._listed(name)
        data = path.read_bytes()
        self._check_digest(path, len(data), hashlib.sha256(data).hexdigest(), expected)
        return data

    def _verify_file(self, name: str) -> Path:
        """Check a large file (embeddings, faiss) by streaming it through SHA-256; return its path."""
        path, expected = self._listed(name)
        size = path.stat().st_size
        self._check_digest(path, size, sha256_file(path) if size == expected.get("bytes") else "", expected)
        return path

    @staticmethod
    def _check_digest(path: Path, size: int, digest: str, expected: dict[str, Any]) -> None:
        if size != expected.get("bytes"):
            raise StoreError(f"{path}: {size} bytes, the manifest records {expected.get('bytes')} "
                             "(truncated or changed after the index was built; rebuild it)")
        if digest != expected.get("sha256"):
            raise StoreError(f"{path}: SHA-256 does not match the manifest (damaged or changed after the "
                             "index was built; rebuild it)")

    def _read_json(self, name: str) -> dict:
        path = self.folder / name
        data = self._verified_bytes(name)
        try:
            return json.loads(data.decode("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise StoreError(f"{path}: not valid JSON") from None

    def _read_tensors(self, name: str) -> dict[str, np.ndarray]:
        from safetensors import SafetensorError
        from safetensors.numpy import load_file

        # Hashed by streaming, then loaded: one copy of a large gallery in memory, not two.
        path = self._verify_file(name)
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise StoreError(f"{path}: cannot read embeddings ({e.__class__.__name__})") from None

    def _check_consistency(self) -> None:
        n, m = len(self.image_ids), len(self.caption_list)
        counts = self.manifest.get("counts", {})
        where = self.folder
        if counts.get("images") != n or counts.get("captions") != m:
            raise StoreError(f"{where}: manifest counts {counts} do not match items.json ({n} images, {m} captions)")
        if len(self.image_paths) != n or len(self.captions) != n or len(self.image_sha256) != n:
            raise StoreError(f"{where}/items.json: image ids, paths, hashes and captions have different lengths")
        if len(self.caption_image) != m or (m and (self.caption_image.min() < 0 or self.caption_image.max() >= n)):
            raise StoreError(f"{where}/items.json: caption_image does not map {m} captions to {n} images")
        dim = self.manifest.get("dim")
        if self.image_embeds.shape != (n, dim) or self.text_embeds.shape != (m, dim):
            raise StoreError(f"{where}: embeddings {self.image_embeds.shape} / {self.text_embeds.shape} do not "
                             f"match {n} images, {m} captions of dimension {dim}")
        if self.image_uni is not None and self.image_uni.shape != (n, self.manifest.get("uni_dim")):
            raise StoreError(f"{where}: image_uni {self.image_uni.shape} does not match {n} images")

    def _searcher(self, key: str, matrix: np.ndarray) -> VectorIndex:
        if self.backend == "exact":
            return ExactIndex.from_vectors(matrix, copy=False)
        stored = self.manifest.get("calibration", {}).get(key, {}).get("params")  # the calibrated ones
        index = load_backend(self.backend, self._verify_file(FAISS_FILES[key]), params=stored, vectors=matrix)
        if index.ntotal != len(matrix) or index.dim != matrix.shape[1]:
            raise StoreError(f"{self.folder / FAISS_FILES[key]}: holds {index.ntotal} x {index.dim} vectors, "
                             f"expected {len(matrix)} x {matrix.shape[1]}")
        return index

    # --- public ------------------------------------------------------------------------------
    @property
    def has_uni(self) -> bool:
        return self.image_uni_index is not None

    @property
    def fingerprint(self) -> str:
        return str(self.manifest.get("model_fingerprint"))

    @property
    def data_fingerprint(self) -> str:
        return str(self.manifest.get("data_fingerprint"))

    @property
    def run_dir(self) -> str | None:
        return self.manifest.get("run_dir")

    def __len__(self) -> int:
        return len(self.image_ids)

    def check_encoder(self, encoder: Encoder) -> None:
        """Raise :class:`StoreError` unless ``encoder`` is the model the index was built with."""
        if self._verified is encoder:
            return
        got = encoder.fingerprint()
        if got != self.fingerprint:
            raise StoreError(f"{self.folder / 'manifest.json'}: index was built with model {self.fingerprint}, "
                             f"the query encoder is {got} (rebuild the index or pass the matching run)")
        self._verified = encoder

    def image_path(self, image_id: str) -> Path:
        """The file of an indexed image; only ids in the index resolve (no path from the caller)."""
        pos = self.positions.get(image_id)
        if pos is None:
            raise DataError(f"unknown image id '{image_id}'")
        return self.image_paths[pos]

    def image_bytes(self, image_id: str, max_bytes: int | None = None) -> bytes:
        """The bytes of an indexed image, only while they still hash to the SHA-256 recorded at build.

        Reading, checking and returning the same bytes leaves no window for the file to be swapped
        between the check and the use.
        """
        path = self.image_path(image_id)
        try:
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1) if max_bytes is not None else f.read()
        except OSError:
            raise DataError(f"image file for id '{image_id}' is missing on the server") from None
        if max_bytes is not None and len(data) > max_bytes:
            raise DataError(f"image file for id '{image_id}' is larger than {max_bytes} bytes")
        if hashlib.sha256(data).hexdigest() != self.image_sha256[self.positions[image_id]]:
            raise DataError(f"image file for id '{image_id}' changed since the index was built")
        return data


def load_index(folder: str | Path) -> IndexReader:
    return IndexReader(folder)
