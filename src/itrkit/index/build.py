"""Build and read a retrieval index folder: image and caption embeddings of one trained model.

Folder layout (written at once with :func:`itrkit.utils.io.atomic_dir`)::

    manifest.json        {"format": "itrkit-index/2", "model_fingerprint", "data_fingerprint", "run_dir",
                          "backend", "backend_params", "dim", "uni_dim", "counts", "dataset", "created",
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
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from itrkit.data.records import Caption, Dataset, ImageRecord
from itrkit.errors import DataError, StoreError
from itrkit.index.backends import BACKENDS, ExactIndex, VectorIndex, load_backend, make_index
from itrkit.utils.io import atomic_dir, atomic_write_json, fingerprint, sha256_file

FORMAT = "itrkit-index/2"
# Formats this reader refuses with a hint, rather than as unknown.
OLD_FORMATS = ("itrkit-index/1",)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
# Matrix name in the safetensors files -> faiss file name for that matrix.
FAISS_FILES = {"image_embeds": "image_embeds.faiss", "image_uni": "image_uni.faiss",
               "text_embeds": "text_embeds.faiss"}


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
def _embed(fn: Any, items: list[Any], what: str, ids: list[str], batch_size: int,
           progress: bool) -> np.ndarray | None:
    """Run an encoder method over ``items`` in batches; check it returns finite [n, d] float rows."""
    from itrkit.utils.progress import progress as progress_lines

    outs: list[np.ndarray] = []
    starts = range(0, len(items), batch_size)
    for start in progress_lines(starts, desc=f"embedding {what}", unit="batch", enabled=progress,
                                what=f"computing {what} of {len(items)} items for the index"):
        out = fn(items[start:start + batch_size])
        if out is None:
            if outs:
                raise StoreError(f"encoder returned no {what} for batch at {start} after returning some")
            return None
        out = np.asarray(out, dtype=np.float32)
        n = len(items[start:start + batch_size])
        if out.ndim != 2 or len(out) != n:
            raise StoreError(f"encoder returned {what} of shape {tuple(out.shape)} for {n} inputs")
        bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
        if len(bad):
            raise DataError(f"non-finite {what} for '{ids[start + int(bad[0])]}'")
        outs.append(out)
    return np.concatenate(outs) if outs else None


def build_index(encoder: Encoder, dataset: Dataset, out_dir: str | Path, backend: str = "exact",
                run_dir: str | Path | None = None, batch_size: int = 32, overwrite: bool = False,
                hnsw_m: int = 32, ef_construction: int = 200, ef_search: int = 128,
                progress: bool = True) -> Path:
    """Embed every image (cross head and USA head when present) and caption of ``dataset`` into ``out_dir``."""
    if backend not in BACKENDS:
        from itrkit.errors import ConfigError

        raise ConfigError(f"unknown index backend '{backend}' (use {', '.join(BACKENDS)})")
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

    image_embeds = _embed(encoder.encode_images, paths, "image embeddings", ids, batch_size, progress)
    image_uni = _embed(encoder.encode_images_uni, paths, "image USA embeddings", ids, batch_size, progress)
    assert image_embeds is not None  # len(dataset) > 0
    dim = image_embeds.shape[1]
    text_embeds = _embed(encoder.encode_texts, texts, "caption embeddings", cap_ids, max(batch_size, 64),
                         progress) if texts else np.zeros((0, dim), np.float32)
    if text_embeds is None or text_embeds.shape[1] != dim:
        raise StoreError(f"encoder's caption embeddings do not match its image embeddings (dim {dim})")

    # Hashed after embedding, so a file the encoder read is the file recorded.
    image_sha256 = [sha256_file(p) for p in paths]
    data_fp = fingerprint(ids, image_sha256, [[(c.id, c.text) for c in r.captions] for r in dataset.records])
    params = {"m": hnsw_m, "ef_construction": ef_construction, "ef_search": ef_search} \
        if backend == "faiss-hnsw" else {}
    manifest = {
        "format": FORMAT,
        "model_fingerprint": encoder.fingerprint(),
        "data_fingerprint": data_fp,
        "run_dir": str(Path(run_dir).resolve()) if run_dir is not None else None,
        "backend": backend,
        "backend_params": params,
        "dim": int(dim),
        "uni_dim": int(image_uni.shape[1]) if image_uni is not None else None,
        "counts": {"images": len(ids), "captions": len(texts)},
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
            for key, mat in {**images, "text_embeds": text_embeds}.items():
                index = make_index(backend, mat.shape[1], **params)
                index.add(mat)
                index.save(tmp / FAISS_FILES[key])
        manifest["files"] = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
                             for f in sorted(tmp.iterdir()) if f.is_file()}
        manifest["manifest_sha256"] = _manifest_digest(manifest)
        # The manifest goes last: a folder with a manifest is a complete index.
        atomic_write_json(tmp / "manifest.json", manifest)
    return out_dir


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

    def _verified_bytes(self, name: str) -> bytes:
        """The bytes of ``name``, after checking its size and SHA-256 against the manifest."""
        path = self.folder / name
        expected = self.manifest["files"].get(name)
        if expected is None:
            raise StoreError(f"{path}: not listed in {self.folder / 'manifest.json'} (rebuild the index)")
        if not path.is_file():
            raise StoreError(f"index file missing: {path}")
        data = path.read_bytes()
        self._check_digest(path, len(data), hashlib.sha256(data).hexdigest(), expected)
        return data

    def _verify_file(self, name: str) -> Path:
        """Check a large file (embeddings, faiss) by streaming it through SHA-256; return its path."""
        path = self.folder / name
        expected = self.manifest["files"].get(name)
        if expected is None:
            raise StoreError(f"{path}: not listed in {self.folder / 'manifest.json'} (rebuild the index)")
        if not path.is_file():
            raise StoreError(f"index file missing: {path}")
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
        index = load_backend(self.backend, self._verify_file(FAISS_FILES[key]))
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
