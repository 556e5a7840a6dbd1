"""``itrkit data prepare``: any caption format → a checked dataset folder.

The folder holds ``dataset.json`` (records, splits; images stay where they are, except the
synthetic set, which is rendered inside the folder) and ``prepare_report.json`` (counts per split,
the items skipped). It is built under a temporary name and renamed into place, so an interrupted
or failed run leaves nothing half-written under ``out_dir``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from itrkit.data.formats import apply_split_files, load_dataset
from itrkit.data.images import check_images as _check_images
from itrkit.data.records import Dataset, ImageRecord
from itrkit.errors import DataError, ItrkitError
from itrkit.utils.io import atomic_dir, atomic_write_json

REPORT = "prepare_report.json"


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def split_counts(ds: Dataset) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for r in ds.records:
        c = out.setdefault(r.split, {"images": 0, "captions": 0})
        c["images"] += 1
        c["captions"] += len(r.captions)
    return out


def prepare_dataset(fmt: str, source: str | os.PathLike | None, out_dir: str | os.PathLike, *,
                    image_root: str | os.PathLike | None = None, skip_bad: bool = False, check_images: bool = True,
                    overwrite: bool = False,
                    split_files: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike] | None = None,
                    **options: Any) -> tuple[Dataset, list[str]]:
    """Load ``source`` as ``fmt``, check it, write ``out_dir/{dataset.json, prepare_report.json}``.

    ``split_files`` ({split: file} or a list of files named after their split) override the
    format's splits. ``check_images`` opens every image (header + verify, JPEG draft decode).
    With ``skip_bad`` bad lines, captions and images are left out and listed in the returned
    messages (also in the report); otherwise the first problem raises :class:`DataError`.
    ``fmt="synthetic"`` ignores ``source`` and renders into ``out_dir`` (``options`` go to
    :func:`~itrkit.data.synthetic.make_synthetic`); other ``options`` go to the loader.
    Returns the dataset as reloaded from ``out_dir`` and the skipped items.
    """
    out = Path(out_dir)
    if fmt != "synthetic" and source is None:  # before anything is written
        raise ItrkitError(f"format '{fmt}' needs a source file or folder (--source)")
    if out.exists() and not overwrite and (not out.is_dir() or any(out.iterdir())):
        raise ItrkitError(f"{out} already exists (use --overwrite to replace it)")
    if fmt != "synthetic":
        # Replacing out_dir must never delete the data it is prepared from.
        for p in (source, image_root):
            if p is not None and out.exists() and _inside(Path(p), out):
                raise ItrkitError(f"output folder {out} holds the source data {p}; choose another --out")
    empty_existing = out.is_dir() and not any(out.iterdir())
    problems: list[str] = []
    with atomic_dir(out, overwrite=overwrite or empty_existing) as tmp:
        if fmt == "synthetic":
            from itrkit.data.synthetic import make_synthetic

            ds = make_synthetic(tmp, **options)
        else:
            assert source is not None
            ds = load_dataset(fmt, source, image_root=image_root, skip_bad=skip_bad, problems=problems, **options)
        if split_files:
            ds = apply_split_files(ds, split_files, skip_bad=skip_bad, problems=problems)
        if check_images:
            bad = _check_images(ds, skip_bad=skip_bad)
            if bad:
                problems.extend(f"image '{i}': {why}" for i, why in bad.items())
                ds = Dataset([r for r in ds.records if r.id not in bad], name=ds.name, validate=False)
        if not len(ds):
            raise DataError(f"nothing left to prepare from {source}: every image was skipped")
        if fmt == "synthetic":
            from itrkit.data.synthetic import write_dataset_json

            write_dataset_json(ds, tmp)  # image_root "." : the images moved with the folder
        else:
            atomic_write_json(tmp / "dataset.json", ds.to_json(_image_root(ds.records, image_root)))
        report = {
            "format": fmt,
            "source": str(Path(source).resolve()) if source is not None and fmt != "synthetic" else None,
            "name": ds.name,
            "images": len(ds),
            "captions": len(ds.captions),
            "splits": split_counts(ds),
            "images_checked": bool(check_images),
            "skipped": problems,
            "ids_fingerprint": ds.ids_fingerprint(),
        }
        atomic_write_json(tmp / REPORT, report)
    return Dataset.load(out), problems


def _image_root(records: list[ImageRecord], image_root: str | os.PathLike | None) -> Path:
    """The folder ``dataset.json`` stores paths relative to: the given root or the images' common folder."""
    if image_root is not None:
        return Path(image_root).resolve()
    parents = {str(Path(p).resolve()) for p in {Path(r.path).parent for r in records}}
    return Path(os.path.commonpath(sorted(parents)))
