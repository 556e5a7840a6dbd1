"""One record type for every caption format: an image, its captions, its split.

A prepared dataset folder holds ``dataset.json``::

    {"format": "itrkit-dataset/1", "name": str, "image_root": str,
     "images": [{"id": str, "file": str, "split": str, "labels": [str],
                 "captions": [{"id": str, "text": str}]}]}

``file`` is relative to ``image_root`` (absolute, or relative to the folder holding
``dataset.json``). Images are never copied.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from itrkit.errors import DataError
from itrkit.utils.io import atomic_write_json, fingerprint

FORMAT = "itrkit-dataset/1"
SPLITS = ("train", "val", "test", "restval")


@dataclass(frozen=True)
class Caption:
    id: str
    text: str


@dataclass
class ImageRecord:
    id: str
    path: Path
    captions: list[Caption]
    split: str = "train"
    labels: list[str] = field(default_factory=list)


class Dataset:
    """An ordered list of :class:`ImageRecord` with the views retrieval needs."""

    def __init__(self, records: Iterable[ImageRecord], name: str = "dataset", validate: bool = True) -> None:
        self.records: list[ImageRecord] = list(records)
        self.name = name
        if validate:
            self.validate()

    # --- views -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[ImageRecord]:
        return iter(self.records)

    def __getitem__(self, i: int) -> ImageRecord:
        return self.records[i]

    @property
    def image_ids(self) -> list[str]:
        return [r.id for r in self.records]

    @property
    def image_paths(self) -> list[Path]:
        return [r.path for r in self.records]

    @property
    def captions(self) -> list[Caption]:
        return [c for r in self.records for c in r.captions]

    @property
    def caption_ids(self) -> list[str]:
        return [c.id for r in self.records for c in r.captions]

    @property
    def texts(self) -> list[str]:
        return [c.text for r in self.records for c in r.captions]

    @property
    def txt2img(self) -> np.ndarray:
        """Index of each caption's image in ``records`` (caption order as in :attr:`captions`)."""
        return np.repeat(np.arange(len(self.records)), [len(r.captions) for r in self.records])

    def splits(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            out[r.split] = out.get(r.split, 0) + 1
        return out

    def split(self, *names: str) -> Dataset:
        """The records of the given split(s); ``val`` also accepts ``dev``."""
        wanted = {("val" if n == "dev" else n) for n in names}
        recs = [r for r in self.records if r.split in wanted]
        if not recs:
            raise DataError(f"split {'/'.join(names)} of dataset '{self.name}' has no images "
                            f"(splits present: {self.splits()})")
        return Dataset(recs, name=f"{self.name}:{'+'.join(names)}", validate=False)

    def subset(self, n: int | None) -> Dataset:
        """The first ``n`` images (all when ``n`` is None or larger)."""
        if n is None or n >= len(self.records):
            return self
        return Dataset(self.records[:n], name=f"{self.name}[:{n}]", validate=False)

    def fingerprint(self) -> str:
        """Hash of ids, captions and image files: keys cached features and teacher stores."""
        return fingerprint([(r.id, str(r.path), [(c.id, c.text) for c in r.captions]) for r in self.records])

    def ids_fingerprint(self) -> str:
        return fingerprint(self.image_ids, self.caption_ids)

    # --- checks ----------------------------------------------------------------------------
    def validate(self, check_files: bool = False) -> None:
        seen_img: set[str] = set()
        seen_cap: set[str] = set()
        for r in self.records:
            if not r.id:
                raise DataError(f"image with an empty id: {r.path}")
            if r.id in seen_img:
                raise DataError(f"duplicate image id '{r.id}' ({r.path})")
            seen_img.add(r.id)
            if check_files and not Path(r.path).is_file():
                raise DataError(f"image file not found: {r.path} (image id '{r.id}')")
            for c in r.captions:
                if c.id in seen_cap:
                    raise DataError(f"duplicate caption id '{c.id}' (image '{r.id}')")
                seen_cap.add(c.id)
                if not c.text or not c.text.strip():
                    raise DataError(f"empty caption '{c.id}' for image '{r.id}'")

    # --- persistence -----------------------------------------------------------------------
    def to_json(self, image_root: Path, folder: Path | None = None) -> dict:
        """``image_root`` is stored relative to ``folder`` when it lies inside it (movable datasets)."""
        images = []
        root = image_root.resolve()
        for r in self.records:
            p = Path(r.path).resolve()
            try:
                rel = str(p.relative_to(root))
            except ValueError:
                rel = str(p)
            images.append({"id": r.id, "file": rel, "split": r.split, "labels": list(r.labels),
                           "captions": [{"id": c.id, "text": c.text} for c in r.captions]})
        root_str = str(root)
        if folder is not None:
            try:
                root_str = str(root.relative_to(folder.resolve())) or "."
            except ValueError:
                pass
        return {"format": FORMAT, "name": self.name, "image_root": root_str, "images": images}

    def save(self, folder: str | Path, image_root: str | Path | None = None) -> Path:
        """Write ``folder/dataset.json`` atomically (images stay where they are)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        root = Path(image_root) if image_root is not None else _common_root(self.image_paths)
        path = folder / "dataset.json"
        atomic_write_json(path, self.to_json(root, folder))
        return path

    @classmethod
    def load(cls, folder: str | Path) -> Dataset:
        """Load a prepared dataset folder (or a ``dataset.json`` path)."""
        folder = Path(folder)
        path = folder / "dataset.json" if folder.is_dir() else folder
        if not path.is_file():
            raise DataError(f"no prepared dataset at {folder} (expected {path}; run 'itrkit data prepare')")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not a valid dataset file ({e.__class__.__name__})") from None
        if data.get("format") != FORMAT:
            raise DataError(f"{path}: unknown dataset format {data.get('format')!r} (expected {FORMAT})")
        root = Path(data["image_root"])
        if not root.is_absolute():
            root = path.parent / root
        recs = []
        for i, im in enumerate(data["images"]):
            try:
                recs.append(ImageRecord(
                    id=str(im["id"]), path=root / im["file"], split=im.get("split", "train"),
                    labels=[str(x) for x in im.get("labels", [])],
                    captions=[Caption(str(c["id"]), c["text"]) for c in im["captions"]]))
            except (KeyError, TypeError) as e:
                raise DataError(f"{path}: image entry {i} lacks {e}") from None
        return cls(recs, name=data.get("name", folder.name))


def _common_root(paths: list[Path]) -> Path:
    import os

    if not paths:
        return Path(".").resolve()
    parents = [str(Path(p).resolve().parent) for p in paths]
    return Path(os.path.commonpath(parents))
