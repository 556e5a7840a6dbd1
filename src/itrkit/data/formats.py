"""Caption-file loaders: every public format → one :class:`~itrkit.data.records.Dataset`.

Formats (docs/method.md §3): Karpathy JSON (``dataset_flickr30k.json``, ``dataset_coco.json``), COCO
``captions_*.json``, Flickr8k (official ``Flickr8k.token.txt`` layout and the ``captions.txt`` CSV
variant), generic CSV / JSONL (``filepath,caption``), the built-in synthetic set, and an already
prepared folder. Ids are strings everywhere; caption texts are stripped of surrounding whitespace.

Every problem is one line naming the file (and line number, or JSON position) at fault. By default
the first problem raises :class:`~itrkit.errors.DataError`; with ``skip_bad=True`` the bad item
(line, caption, image) is left out and the message appended to ``problems`` instead, which is what
``itrkit data prepare --skip-bad`` lists.

Split names: ``dev`` is stored as ``val``; Karpathy's ``restval`` stays ``restval``. Images that a
set of split files does not list (91 photos of the official Flickr8k release) get split ``extra``.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itrkit.data.records import Caption, Dataset, ImageRecord
from itrkit.errors import ConfigError, DataError

FORMATS = ("karpathy", "coco", "flickr8k", "csv", "jsonl", "synthetic", "prepared")
EXTRA_SPLIT = "extra"  # images a set of split files does not mention

FLICKR8K_TOKEN = "Flickr8k.token.txt"
FLICKR8K_CSV = "captions.txt"
FLICKR8K_SPLIT_FILES = {"train": "Flickr_8k.trainImages.txt", "val": "Flickr_8k.devImages.txt",
                        "test": "Flickr_8k.testImages.txt"}
# Image folder names seen in the official release, the Kaggle copy and common mirrors.
FLICKR8K_IMAGE_DIRS = ("images", "Images", "Flicker8k_Dataset", "Flickr8k_Dataset",
                       "Flickr8k_Dataset/Flicker8k_Dataset")
FLICKR8K_TEXT_DIRS = (".", "Flickr8k_text", "text")


# --------------------------------------------------------------------------------------------
# problem collection
# --------------------------------------------------------------------------------------------
class Problems:
    """Raise on the first problem, or (``skip_bad``) record it so the caller can skip the item."""

    def __init__(self, skip_bad: bool = False, into: list[str] | None = None) -> None:
        self.skip_bad = skip_bad
        self.messages: list[str] = into if into is not None else []

    def bad(self, message: str) -> None:
        if not self.skip_bad:
            raise DataError(message)
        self.messages.append(" ".join(message.split()))


def normalise_split(name: str) -> str:
    s = str(name).strip().lower()
    return "val" if s == "dev" else s


# --------------------------------------------------------------------------------------------
# reading text files
# --------------------------------------------------------------------------------------------
def require_file(path: str | os.PathLike, what: str = "file") -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError(f"{what} not found: {p}")
    if not p.is_file():
        raise DataError(f"{what} is not a file: {p}")
    return p


def read_lines(path: str | os.PathLike, problems: Problems) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of every line, decoded as strict UTF-8 (a BOM is dropped).

    A line that is not UTF-8 is a problem naming the file, line and byte; with ``skip_bad`` it is
    left out and the others still come through.
    """
    p = require_file(path)
    data = p.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    for i, raw in enumerate(lines, start=1):
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        try:
            yield i, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.bad(f"{p}:{i}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1})")


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; damaged JSON cannot be partly skipped, so it always raises."""
    p = require_file(path)
    data = p.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(f"{p}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{p}:{e.lineno}:{e.colno}: invalid JSON ({e.msg})") from None


# --------------------------------------------------------------------------------------------
# building records with located errors
# --------------------------------------------------------------------------------------------
@dataclass
class _Img:
    id: str
    path: Path
    split: str
    where: str
    captions: list[Caption] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)


class RecordBuilder:
    """Accumulate images and captions in order, checking ids as they arrive.

    ``where`` strings (``file:line`` or ``file: images[3]``) locate each problem.
    """

    def __init__(self, problems: Problems) -> None:
        self.problems = problems
        self.images: dict[str, _Img] = {}
        self.dropped: set[str] = set()  # image ids refused (duplicates): their captions are skipped too
        self.caption_ids: set[str] = set()

    def add_image(self, image_id: str, path: Path, split: str, where: str) -> bool:
        if not image_id:
            self.problems.bad(f"{where}: empty image id")
            return False
        if image_id in self.images:
            self.problems.bad(f"{where}: duplicate image id '{image_id}' (first at {self.images[image_id].where})")
            return False
        self.images[image_id] = _Img(image_id, path, normalise_split(split), where)
        return True

    def add_caption(self, image_id: str, caption_id: str, text: Any, where: str) -> bool:
        if image_id not in self.images:
            self.problems.bad(f"{where}: caption '{caption_id}' refers to image '{image_id}' that is not "
                              f"in the image list")
            return False
        if not isinstance(text, str) or not text.strip():
            self.problems.bad(f"{where}: empty caption '{caption_id}' for image '{image_id}'")
            return False
        if not caption_id:
            self.problems.bad(f"{where}: empty caption id for image '{image_id}'")
            return False
        if caption_id in self.caption_ids:
            self.problems.bad(f"{where}: duplicate caption id '{caption_id}'")
            return False
        self.caption_ids.add(caption_id)
        self.images[image_id].captions.append(Caption(caption_id, text.strip()))
        return True

    def build(self, name: str, check_files: bool = True, listing: set[str] | None = None) -> Dataset:
        """The dataset; images without captions or (``check_files``) without a file are problems.

        ``listing`` (names in the image folder) replaces one ``stat`` per image when given.
        """
        recs = []
        for im in self.images.values():
            if not im.captions:
                self.problems.bad(f"{im.where}: image '{im.id}' has no captions")
                continue
            if check_files:
                found = im.path.name in listing if listing is not None else im.path.is_file()
                if not found:
                    self.problems.bad(f"{im.where}: image file not found: {im.path} (image '{im.id}')")
                    continue
            recs.append(ImageRecord(im.id, im.path, im.captions, split=im.split, labels=im.labels))
        if not recs:
            raise DataError(f"dataset '{name}' has no usable images")
        return Dataset(recs, name=name)


# --------------------------------------------------------------------------------------------
# splits from files
# --------------------------------------------------------------------------------------------
def read_split_file(path: str | os.PathLike, problems: Problems) -> list[tuple[int, str]]:
    """Non-blank entries of a split file (one image file name or id per line)."""
    entries = [(i, s.strip()) for i, s in read_lines(path, problems) if s.strip()]
    if not entries:
        problems.bad(f"{path}: split file lists no images")
    return entries


def split_file_map(split_files: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike]) -> dict[str, Path]:
    """``{split: path}``; a bare list of paths names each split after its file (``*dev*`` → val)."""
    if isinstance(split_files, Mapping):
        return {normalise_split(k): Path(v) for k, v in split_files.items()}
    out: dict[str, Path] = {}
    for f in split_files:
        low = Path(f).name.lower()
        hits = [s for s in ("restval", "train", "dev", "val", "test") if s in low]
        # "restval" contains "val": prefer the longest match
        if not hits:
            raise ConfigError(f"cannot tell the split of {f} from its name (give a mapping split → file)")
        split = normalise_split(max(hits, key=len))
        if split in out:
            raise ConfigError(f"two split files for split '{split}': {out[split]} and {f}")
        out[split] = Path(f)
    return out


def apply_split_files(ds: Dataset, split_files: Mapping[str, str | os.PathLike] | Sequence[str | os.PathLike],
                      *, skip_bad: bool = False, problems: list[str] | None = None) -> Dataset:
    """Re-split ``ds`` from split files naming images by file name, file stem or id.

    Images no file lists get split ``extra``; a name no image has, an image listed under two
    splits, or a split file without entries are problems.
    """
    probs = Problems(skip_bad, problems)
    by_key: dict[str, int] = {}
    for i, r in enumerate(ds.records):
        for key in (r.id, Path(r.path).name, Path(r.path).stem):
            by_key.setdefault(key, i)
    assigned: dict[int, tuple[str, str]] = {}
    for split, path in split_file_map(split_files).items():
        for line, name in read_split_file(path, probs):
            idx = by_key.get(name)
            if idx is None:
                probs.bad(f"{path}:{line}: split file names unknown image '{name}'")
                continue
            if idx in assigned and assigned[idx][0] != split:
                probs.bad(f"{path}:{line}: image '{name}' is already in split '{assigned[idx][0]}' "
                          f"({assigned[idx][1]})")
                continue
            assigned.setdefault(idx, (split, f"{path}:{line}"))
    recs = [ImageRecord(r.id, r.path, r.captions, split=assigned[i][0] if i in assigned else EXTRA_SPLIT,
                        labels=r.labels) for i, r in enumerate(ds.records)]
    return Dataset(recs, name=ds.name, validate=False)


# --------------------------------------------------------------------------------------------
# Karpathy JSON
# --------------------------------------------------------------------------------------------
def load_karpathy(json_path: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
                  skip_bad: bool = False, problems: list[str] | None = None, check_files: bool = True) -> Dataset:
    """Karpathy's ``dataset_{flickr8k,flickr30k,coco}.json``.

    image id = ``cocoid`` if present else the file stem; caption id = ``sentid``;
    path = ``image_root/filepath/filename`` (``filepath`` may be absent). ``image_root``
    defaults to the folder holding the JSON.
    """
    probs = Problems(skip_bad, problems)
    jp = Path(json_path)
    data = read_json(jp)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{jp}: not a Karpathy split file (no 'images' list)")
    root = Path(image_root) if image_root is not None else jp.parent
    b = RecordBuilder(probs)
    for i, im in enumerate(data["images"]):
        where = f"{jp}: images[{i}]"
        if not isinstance(im, dict):
            probs.bad(f"{where}: not an object")
            continue
        missing = [k for k in ("filename", "split", "sentences") if k not in im]
        if missing or not isinstance(im["sentences"], list):
            probs.bad(f"{where}: malformed entry (lacks {', '.join(missing) or 'a sentences list'})")
            continue
        fname = str(im["filename"])
        image_id = str(im["cocoid"]) if im.get("cocoid") is not None else Path(fname).stem
        path = root / str(im["filepath"]) / fname if im.get("filepath") else root / fname
        if not b.add_image(image_id, path, str(im["split"]), where):
            continue
        for j, s in enumerate(im["sentences"]):
            swhere = f"{where}.sentences[{j}]"
            if not isinstance(s, dict) or "raw" not in s or "sentid" not in s:
                probs.bad(f"{swhere}: malformed sentence (needs 'raw' and 'sentid')")
                continue
            if "imgid" in s and "imgid" in im and s["imgid"] != im["imgid"]:
                # The sentence says it belongs to another image than the one it sits under.
                probs.bad(f"{swhere}: caption '{s['sentid']}' refers to imgid {s['imgid']} but sits under "
                          f"imgid {im['imgid']}")
                continue
            b.add_caption(image_id, str(s["sentid"]), s["raw"], swhere)
    return b.build(str(data.get("dataset") or jp.stem), check_files=check_files)


# --------------------------------------------------------------------------------------------
# COCO captions_*.json
# --------------------------------------------------------------------------------------------
_COCO_SPLIT = re.compile(r"(train|val|test)(\d{4})")


def load_coco(captions_json: str | os.PathLike, image_dir: str | os.PathLike | None = None,
              split: str | None = None, *, skip_bad: bool = False, problems: list[str] | None = None,
              check_files: bool = True) -> Dataset:
    """COCO ``captions_<split><year>.json``: image id = ``images[].id``, caption id = ``annotations[].id``.

    ``split`` defaults to the file name's (``captions_val2017.json`` → val); ``image_dir`` defaults
    to ``<split><year>/`` beside the ``annotations/`` folder (the official layout).
    """
    probs = Problems(skip_bad, problems)
    jp = Path(captions_json)
    data = read_json(jp)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list) \
            or not isinstance(data.get("annotations"), list):
        raise DataError(f"{jp}: not a COCO captions file (needs 'images' and 'annotations' lists)")
    m = _COCO_SPLIT.search(jp.name)
    if split is None:
        if m is None:
            raise DataError(f"{jp}: cannot tell the split from the file name; pass split=")
        split = m.group(1)
    if image_dir is None:
        cands = [jp.parent.parent / m.group(0), jp.parent / m.group(0)] if m else []
        found = [c for c in cands if c.is_dir()]
        if not found:
            raise DataError(f"{jp}: no image folder found (tried {', '.join(map(str, cands)) or 'none'}); "
                            f"pass the image folder")
        image_dir = found[0]
    img_dir = Path(image_dir)
    if not img_dir.is_dir():
        raise DataError(f"image folder not found: {img_dir}")
    b = RecordBuilder(probs)
    for i, im in enumerate(data["images"]):
        where = f"{jp}: images[{i}]"
        if not isinstance(im, dict) or "id" not in im or "file_name" not in im:
            probs.bad(f"{where}: malformed entry (needs 'id' and 'file_name')")
            continue
        b.add_image(str(im["id"]), img_dir / str(im["file_name"]), split, where)
    for i, a in enumerate(data["annotations"]):
        where = f"{jp}: annotations[{i}]"
        if not isinstance(a, dict) or "id" not in a or "image_id" not in a or "caption" not in a:
            probs.bad(f"{where}: malformed entry (needs 'id', 'image_id' and 'caption')")
            continue
        b.add_caption(str(a["image_id"]), str(a["id"]), a["caption"], where)
    name = f"coco-{m.group(0)}" if m else f"coco-{jp.stem}"
    listing = set(os.listdir(img_dir)) if check_files else None
    return b.build(name, check_files=check_files, listing=listing)


# --------------------------------------------------------------------------------------------
# Flickr8k
# --------------------------------------------------------------------------------------------
def _find_flickr8k(source: Path) -> tuple[Path, str]:
    """(caption file, 'token' | 'csv') from a folder or a caption file."""
    if source.is_file():
        if source.name == FLICKR8K_TOKEN or source.suffix == ".token":
            return source, "token"
        if source.name == FLICKR8K_CSV or source.suffix == ".csv":
            return source, "csv"
        with open(source, "rb") as f:
            head = f.readline().decode("utf-8", "replace").strip().lstrip("\ufeff").lower()
        return source, ("csv" if head.replace(" ", "").startswith("image,caption") else "token")
    if not source.is_dir():
        raise DataError(f"Flickr8k source not found: {source}")
    for sub in FLICKR8K_TEXT_DIRS:
        if (source / sub / FLICKR8K_TOKEN).is_file():
            return source / sub / FLICKR8K_TOKEN, "token"
    if (source / FLICKR8K_CSV).is_file():
        return source / FLICKR8K_CSV, "csv"
    raise DataError(f"no Flickr8k captions in {source} (expected {FLICKR8K_TOKEN} or {FLICKR8K_CSV})")


def _find_image_dir(bases: Iterable[Path]) -> Path:
    tried = []
    for base in bases:
        for name in FLICKR8K_IMAGE_DIRS:
            cand = base / name
            tried.append(str(cand))
            if cand.is_dir():
                return cand
    raise DataError(f"no Flickr8k image folder found (tried {', '.join(tried)}); pass image_root")


def load_flickr8k(source: str | os.PathLike, image_root: str | os.PathLike | None = None, *,
                  skip_bad: bool = False, problems: list[str] | None = None, check_files: bool = True) -> Dataset:
    """Flickr8k in its official layout or as the ``captions.txt`` CSV variant.

    Official: ``Flickr8k.token.txt`` lines ``name.jpg#k<TAB>caption`` (caption id ``name.jpg#k``)
    and ``Flickr_8k.{train,dev,test}Images.txt`` → train / val / test. CSV variant: header
    ``image,caption``; caption id ``<stem>#<k>`` counting per image. image id = file stem. Split
    files beside the captions are used when present (else every image is ``train``); images they
    do not list get split ``extra`` (91 of the 8,091 official photos). The image folder is
    ``image_root`` or the first of ``images/``, ``Images/``, ``Flicker8k_Dataset/``… that exists.
    """
    probs = Problems(skip_bad, problems)
    src = Path(source)
    cap_file, kind = _find_flickr8k(src)
    text_dir = cap_file.parent
    if image_root is not None:
        img_dir = Path(image_root)
        if not img_dir.is_dir():
            raise DataError(f"image folder not found: {img_dir}")
    else:
        # The image folder sits beside the captions, or one level up (``Flickr8k_text/`` layout).
        bases = list(dict.fromkeys(([src] if src.is_dir() else []) + [text_dir, text_dir.parent]))
        img_dir = _find_image_dir(bases)
    listing = set(os.listdir(img_dir))

    b = RecordBuilder(probs)
    if kind == "token":
        rows = _flickr8k_token_rows(cap_file, probs)
    else:
        rows = _flickr8k_csv_rows(cap_file, probs)
    per_image: dict[str, int] = {}
    for where, fname, cap_id, text in rows:
        stem = Path(fname).stem
        if stem not in b.images and stem not in b.dropped:
            if fname not in listing:
                probs.bad(f"{where}: caption refers to image '{fname}' that is not in {img_dir}")
                b.dropped.add(stem)
                continue
            if not b.add_image(stem, img_dir / fname, "train", where):
                b.dropped.add(stem)
                continue
        elif stem in b.dropped:
            continue
        elif b.images[stem].path.name != fname:
            probs.bad(f"{where}: duplicate image id '{stem}' ({fname} and {b.images[stem].path.name})")
            continue
        if cap_id is None:  # CSV variant: number captions per image
            k = per_image.get(stem, 0)
            per_image[stem] = k + 1
            cap_id = f"{stem}#{k}"
        b.add_caption(stem, cap_id, text, where)

    ds = b.build("flickr8k", check_files=False)  # every image was checked against the folder listing
    split_files = {s: text_dir / n for s, n in FLICKR8K_SPLIT_FILES.items() if (text_dir / n).is_file()}
    if split_files:
        ds = apply_split_files(ds, split_files, skip_bad=skip_bad, problems=probs.messages)
    return ds


def _flickr8k_token_rows(path: Path, probs: Problems) -> Iterator[tuple[str, str, str | None, str]]:
    for line, text in read_lines(path, probs):
        if not text.strip():
            continue
        where = f"{path}:{line}"
        key, tab, caption = text.partition("\t")
        key = key.strip()
        fname, _, k = key.rpartition("#")
        if not tab or not fname or not k.isdigit():
            probs.bad(f"{where}: malformed line (expected 'name.jpg#k<TAB>caption')")
            continue
        yield where, fname, key.strip(), caption


def _flickr8k_csv_rows(path: Path, probs: Problems) -> Iterator[tuple[str, str, str | None, str]]:
    for where, row in _csv_dicts(path, probs, required=("image", "caption")):
        yield where, row["image"].strip(), None, row["caption"]


# --------------------------------------------------------------------------------------------
# generic CSV / JSONL
# --------------------------------------------------------------------------------------------
def _csv_dicts(path: Path, probs: Problems, required: Sequence[str]) -> Iterator[tuple[str, dict[str, str]]]:
    """Rows of a CSV with a header, keys lower-cased; ``where`` = ``file:line`` of the row's start."""
    consumed: list[int] = []

    def lines() -> Iterator[str]:
        for n, text in read_lines(path, probs):
            consumed.append(n)
            yield text + "\n"

    reader = csv.reader(lines())
    try:
        header = [h.strip().lower() for h in next(reader)]
    except StopIteration:
        raise DataError(f"{path}: empty file (expected a header with {', '.join(required)})") from None
    except csv.Error as e:
        raise DataError(f"{path}:1: malformed header ({e})") from None
    lacking = [c for c in required if c not in header]
    if lacking:
        raise DataError(f"{path}:1: header lacks column(s) {', '.join(lacking)} (has {', '.join(header)})")
    while True:
        start = len(consumed)
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            probs.bad(f"{path}:{consumed[-1] if consumed else 1}: malformed CSV ({e})")
            continue
        line = consumed[start] if start < len(consumed) else consumed[-1]
        if not row or all(not c.strip() for c in row):
            continue
        if len(row) != len(header):
            probs.bad(f"{path}:{line}: malformed line ({len(row)} fields, header has {len(header)})")
            continue
        yield f"{path}:{line}", dict(zip(header, row))


def _jsonl_dicts(path: Path, probs: Problems) -> Iterator[tuple[str, dict[str, Any]]]:
    for line, text in read_lines(path, probs):
        if not text.strip():
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            probs.bad(f"{path}:{line}: malformed line (invalid JSON: {e.msg})")
            continue
        if not isinstance(obj, dict):
            probs.bad(f"{path}:{line}: malformed line (expected a JSON object)")
            continue
        yield f"{path}:{line}", {str(k).lower(): v for k, v in obj.items()}


def _rows_to_dataset(rows: Iterable[tuple[str, dict[str, Any]]], image_root: Path, name: str,
                     probs: Problems, check_files: bool) -> Dataset:
    """Group ``filepath,caption[,image_id,caption_id,split]`` rows by file into images."""
    b = RecordBuilder(probs)
    by_file: dict[str, str] = {}  # filepath → image id
    per_image: dict[str, int] = {}
    for where, row in rows:
        fp = row.get("filepath")
        if not isinstance(fp, str) or not fp.strip():
            probs.bad(f"{where}: malformed line (no filepath)")
            continue
        fp = fp.strip()
        given_id = _opt_str(row.get("image_id"))
        split = _opt_str(row.get("split")) or "train"
        if fp not in by_file:
            image_id = given_id or fp  # the path itself is unique, a stem might not be
            path = Path(fp) if Path(fp).is_absolute() else image_root / fp
            if not b.add_image(image_id, path, split, where):
                by_file[fp] = ""
                continue
            by_file[fp] = image_id
        image_id = by_file[fp]
        if not image_id:
            continue  # the image itself was refused; its problem is already reported
        im = b.images[image_id]
        if given_id and given_id != image_id:
            probs.bad(f"{where}: image_id '{given_id}' differs from '{image_id}' given earlier for {fp}")
            continue
        if normalise_split(split) != im.split:
            probs.bad(f"{where}: split '{split}' differs from '{im.split}' given earlier for image '{image_id}'")
            continue
        k = per_image.get(image_id, 0)
        per_image[image_id] = k + 1
        cap_id = _opt_str(row.get("caption_id")) or f"{image_id}#{k}"
        b.add_caption(image_id, cap_id, row.get("caption"), where)
    return b.build(name, check_files=check_files)


def _opt_str(v: Any) -> str | None:
    if v is None:
        return None
    s = str(v).strip()
    return s or None


def load_csv(path: str | os.PathLike, image_root: str | os.PathLike | None = None, *, skip_bad: bool = False,
             problems: list[str] | None = None, check_files: bool = True) -> Dataset:
    """CSV with header ``filepath,caption`` (+ optional ``image_id,caption_id,split``).

    Rows of one filepath form one image; image id defaults to the filepath, caption id to
    ``<image id>#<k>``, split to ``train``. ``image_root`` defaults to the CSV's folder.
    """
    probs = Problems(skip_bad, problems)
    p = require_file(path)
    rows = _csv_dicts(p, probs, required=("filepath", "caption"))
    root = Path(image_root) if image_root is not None else p.parent
    return _rows_to_dataset(rows, root, p.stem, probs, check_files)


def load_jsonl(path: str | os.PathLike, image_root: str | os.PathLike | None = None, *, skip_bad: bool = False,
               problems: list[str] | None = None, check_files: bool = True) -> Dataset:
    """JSON Lines, one ``{"filepath": ..., "caption": ...}`` object per line (same keys as CSV)."""
    probs = Problems(skip_bad, problems)
    p = require_file(path)
    root = Path(image_root) if image_root is not None else p.parent
    return _rows_to_dataset(_jsonl_dicts(p, probs), root, p.stem, probs, check_files)


# --------------------------------------------------------------------------------------------
# dispatcher
# --------------------------------------------------------------------------------------------
def load_dataset(fmt: str, source: str | os.PathLike, *, image_root: str | os.PathLike | None = None,
                 skip_bad: bool = False, problems: list[str] | None = None, **kw: Any) -> Dataset:
    """Load ``source`` in format ``fmt`` (one of :data:`FORMATS`).

    ``synthetic`` renders the built-in set into the folder ``source`` (``kw`` go to
    :func:`~itrkit.data.synthetic.make_synthetic`); ``prepared`` reads a dataset folder.
    Extra keywords: ``split`` (coco), ``check_files`` (all file formats).
    """
    loaders: dict[str, Callable[..., Dataset]] = {
        "karpathy": load_karpathy, "coco": load_coco, "flickr8k": load_flickr8k,
        "csv": load_csv, "jsonl": load_jsonl}
    if fmt in loaders:
        return loaders[fmt](source, image_root, skip_bad=skip_bad, problems=problems, **kw)
    if fmt == "synthetic":
        from itrkit.data.synthetic import make_synthetic

        return make_synthetic(source, **kw)
    if fmt == "prepared":
        return Dataset.load(source)
    raise ConfigError(f"unknown data format '{fmt}' (choose from {', '.join(FORMATS)})")
