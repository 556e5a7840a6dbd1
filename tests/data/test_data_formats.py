"""Caption-format loaders on small fixtures written to tmp_path (real tiny PNG files)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from PIL import Image

from itrkit.data.formats import (
    apply_split_files,
    load_coco,
    load_csv,
    load_dataset,
    load_flickr8k,
    load_jsonl,
    load_karpathy,
)
from itrkit.errors import ConfigError, DataError


def _png(path: Path, colour: tuple[int, int, int] = (200, 30, 30)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), colour).save(path, format="PNG")
    return path


# --------------------------------------------------------------------------------------------
# Karpathy
# --------------------------------------------------------------------------------------------
def _karpathy(tmp_path: Path, images: list[dict] | None = None) -> Path:
    root = tmp_path / "coco"
    for sub, name in [("val2014", "a.jpg"), ("train2014", "b.jpg"), ("", "c.jpg")]:
        _png(root / sub / name)
    if images is None:
        images = [
            {"filepath": "val2014", "filename": "a.jpg", "cocoid": 42, "imgid": 0, "split": "test",
             "sentences": [{"raw": " A dog. ", "sentid": 7, "imgid": 0}, {"raw": "A cat", "sentid": 8, "imgid": 0}]},
            {"filepath": "train2014", "filename": "b.jpg", "cocoid": 43, "imgid": 1, "split": "restval",
             "sentences": [{"raw": "Two birds", "sentid": 9, "imgid": 1}]},
            {"filename": "c.jpg", "imgid": 2, "split": "train", "sentences": [{"raw": "A tree", "sentid": 10}]},
        ]
    p = tmp_path / "dataset_coco.json"
    p.write_text(json.dumps({"dataset": "coco", "images": images}), encoding="utf-8")
    return p


def test_karpathy(tmp_path: Path) -> None:
    ds = load_karpathy(_karpathy(tmp_path), tmp_path / "coco")
    assert ds.name == "coco"
    assert ds.image_ids == ["42", "43", "c"]  # cocoid when present, else the file stem
    assert ds.caption_ids == ["7", "8", "9", "10"]
    assert ds.texts == ["A dog.", "A cat", "Two birds", "A tree"]
    assert [r.split for r in ds] == ["test", "restval", "train"]
    assert ds[0].path == tmp_path / "coco" / "val2014" / "a.jpg"
    assert ds[2].path == tmp_path / "coco" / "c.jpg"  # no filepath


@pytest.mark.parametrize("mutate, match", [
    (lambda ims: ims[1].update(cocoid=42), r"dataset_coco.json: images\[1\]: duplicate image id '42'"),
    (lambda ims: ims[1]["sentences"][0].update(sentid=7), r"images\[1\].sentences\[0\]: duplicate caption id '7'"),
    (lambda ims: ims[0]["sentences"][1].update(raw="   "), r"images\[0\].sentences\[1\]: empty caption '8'"),
    (lambda ims: ims[0]["sentences"][1].update(imgid=5), r"caption '8' refers to imgid 5"),
    (lambda ims: ims[2].pop("split"), r"images\[2\]: malformed entry \(lacks split\)"),
    (lambda ims: ims[2].update(filename="missing.jpg"), r"image file not found: .*missing.jpg \(image 'missing'\)"),
])
def test_karpathy_errors(tmp_path: Path, mutate, match: str) -> None:
    good = json.loads(_karpathy(tmp_path).read_text())["images"]
    mutate(good)
    path = _karpathy(tmp_path, good)
    with pytest.raises(DataError, match=match):
        load_karpathy(path, tmp_path / "coco")
    problems: list[str] = []
    ds = load_karpathy(path, tmp_path / "coco", skip_bad=True, problems=problems)
    # the first message is the one raised; an image losing its only caption is reported as well
    assert problems and re.search(match, problems[0]) and len(ds) >= 2
    assert len(problems) == 1 or problems[1].endswith("image '43' has no captions")


def test_json_file_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found: .*nope.json"):
        load_karpathy(tmp_path / "nope.json")
    bad = tmp_path / "dataset_x.json"
    bad.write_text('{"images": [\n  {"filename": "a.jpg",\n  oops}\n]}', encoding="utf-8")
    with pytest.raises(DataError, match=r"dataset_x.json:3:3: invalid JSON"):
        load_karpathy(bad)
    bad.write_bytes(b'{"images": [],\n "x": "\xff"}')
    with pytest.raises(DataError, match=r"dataset_x.json:2: not UTF-8 text \(byte 0xff\)"):
        load_karpathy(bad)
    bad.write_text('{"annotations": []}', encoding="utf-8")
    with pytest.raises(DataError, match="not a Karpathy split file"):
        load_karpathy(bad)


# --------------------------------------------------------------------------------------------
# COCO
# --------------------------------------------------------------------------------------------
def _coco(tmp_path: Path, images: list[dict] | None = None, anns: list[dict] | None = None) -> Path:
    _png(tmp_path / "val2017" / "000000000139.jpg")
    _png(tmp_path / "val2017" / "000000000285.jpg")
    images = images if images is not None else [{"id": 139, "file_name": "000000000139.jpg"},
                                                 {"id": 285, "file_name": "000000000285.jpg"}]
    anns = anns if anns is not None else [{"id": 1, "image_id": 285, "caption": "A bear."},
                                          {"id": 2, "image_id": 139, "caption": "A room\n"},
                                          {"id": 3, "image_id": 139, "caption": "A tv"}]
    p = tmp_path / "annotations" / "captions_val2017.json"
    p.parent.mkdir(exist_ok=True)
    p.write_text(json.dumps({"images": images, "annotations": anns}), encoding="utf-8")
    return p


def test_coco(tmp_path: Path) -> None:
    ds = load_coco(_coco(tmp_path))  # image folder found beside annotations/, split from the name
    assert ds.name == "coco-val2017" and ds.splits() == {"val": 2}
    assert ds.image_ids == ["139", "285"]
    assert [[c.id for c in r.captions] for r in ds] == [["2", "3"], ["1"]]
    assert ds.texts == ["A room", "A tv", "A bear."]
    assert ds[0].path == tmp_path / "val2017" / "000000000139.jpg"
    assert load_coco(_coco(tmp_path), tmp_path / "val2017", split="test").splits() == {"test": 2}


@pytest.mark.parametrize("images, anns, match", [
    ([{"id": 139, "file_name": "000000000139.jpg"}, {"id": 139, "file_name": "000000000285.jpg"}],
     [{"id": 1, "image_id": 139, "caption": "x"}], r"images\[1\]: duplicate image id '139'"),
    (None, [{"id": 1, "image_id": 139, "caption": "x"}, {"id": 2, "image_id": 999, "caption": "y"},
            {"id": 3, "image_id": 285, "caption": "z"}],
     r"annotations\[1\]: caption '2' refers to image '999' that is not in the image list"),
    (None, [{"id": 1, "image_id": 139, "caption": "x"}, {"id": 1, "image_id": 285, "caption": "y"},
            {"id": 3, "image_id": 285, "caption": "z"}], r"annotations\[1\]: duplicate caption id '1'"),
    (None, [{"id": 1, "image_id": 139, "caption": "x"}, {"id": 2, "image_id": 285, "caption": ""},
            {"id": 3, "image_id": 285, "caption": "z"}], r"annotations\[1\]: empty caption '2' for image '285'"),
    (None, [{"id": 1, "image_id": 139, "caption": "x"}], r"images\[1\]: image '285' has no captions"),
    ([{"id": 139, "file_name": "000000000139.jpg"}, {"id": 7, "file_name": "gone.jpg"}],
     [{"id": 1, "image_id": 139, "caption": "x"}, {"id": 2, "image_id": 7, "caption": "y"}],
     r"image file not found: .*gone.jpg \(image '7'\)"),
])
def test_coco_errors(tmp_path: Path, images, anns, match: str) -> None:
    path = _coco(tmp_path, images, anns)
    with pytest.raises(DataError, match=match):
        load_coco(path)
    problems: list[str] = []
    ds = load_coco(path, skip_bad=True, problems=problems)
    assert len(problems) == 1 and re.search(match, problems[0]) and len(ds) >= 1


def test_coco_split_from_name(tmp_path: Path) -> None:
    p = _coco(tmp_path)
    q = p.with_name("my_captions.json")
    q.write_text(p.read_text())
    with pytest.raises(DataError, match="my_captions.json: cannot tell the split"):
        load_coco(q, tmp_path / "val2017")
    assert load_coco(q, tmp_path / "val2017", split="val").splits() == {"val": 2}


# --------------------------------------------------------------------------------------------
# Flickr8k, official layout
# --------------------------------------------------------------------------------------------
NAMES = ["1000_aa.jpg", "1001_bb.jpg", "1002_cc.jpg", "1003_dd.jpg", "1004_ee.jpg"]


def _flickr8k(tmp_path: Path, tokens: str | bytes | None = None, splits: dict[str, str] | None = None,
              image_dir: str = "images", text_dir: str = ".") -> Path:
    root = tmp_path / "f8k"
    for i, n in enumerate(NAMES):
        _png(root / image_dir / n, (40 * i, 100, 100))
    text = root / text_dir
    text.mkdir(parents=True, exist_ok=True)
    if tokens is None:
        tokens = "".join(f"{n}#{k}\tcaption {k} of {n}\n" for n in NAMES for k in range(2))
    (text / "Flickr8k.token.txt").write_bytes(tokens if isinstance(tokens, bytes) else tokens.encode())
    if splits is None:
        splits = {"train": "1000_aa.jpg\n1001_bb.jpg\n", "dev": "1002_cc.jpg\n", "test": "1003_dd.jpg\n"}
    for s, body in splits.items():
        (text / f"Flickr_8k.{s}Images.txt").write_text(body)
    return root


def test_flickr8k_official(tmp_path: Path) -> None:
    ds = load_flickr8k(_flickr8k(tmp_path))
    assert ds.image_ids == [Path(n).stem for n in NAMES]
    assert ds.caption_ids[:2] == ["1000_aa.jpg#0", "1000_aa.jpg#1"]
    assert ds.texts[1] == "caption 1 of 1000_aa.jpg"
    assert [r.split for r in ds] == ["train", "train", "val", "test", "extra"]  # unlisted → extra
    assert ds[4].path == tmp_path / "f8k" / "images" / "1004_ee.jpg"


def test_flickr8k_original_folder_names(tmp_path: Path) -> None:
    # Flickr8k_text/ for the text and Flicker8k_Dataset/ (sic) for the photos, as in the release zips
    root = _flickr8k(tmp_path, image_dir="Flicker8k_Dataset", text_dir="Flickr8k_text")
    ds = load_flickr8k(root)
    assert len(ds) == 5 and ds[0].path.parent.name == "Flicker8k_Dataset"
    assert load_flickr8k(root / "Flickr8k_text" / "Flickr8k.token.txt").image_ids == ds.image_ids


def test_flickr8k_no_split_files_all_train(tmp_path: Path) -> None:
    assert load_flickr8k(_flickr8k(tmp_path, splits={})).splits() == {"train": 5}


def _tokens_with(line_no: int, line: bytes) -> bytes:
    lines = [f"{n}#{k}\tcaption {k} of {n}".encode() for n in NAMES for k in range(2)]
    lines[line_no - 1] = line
    return b"\n".join(lines) + b"\n"


@pytest.mark.parametrize("line, match", [
    (b"1000_aa.jpg#1 caption without a tab", r"Flickr8k.token.txt:2: malformed line"),
    (b"1000_aa.jpg\tno hash", r"Flickr8k.token.txt:2: malformed line"),
    (b"1000_aa.jpg#1\t   ", r"Flickr8k.token.txt:2: empty caption '1000_aa.jpg#1' for image '1000_aa'"),
    (b"1000_aa.jpg#0\tagain", r"Flickr8k.token.txt:2: duplicate caption id '1000_aa.jpg#0'"),
    (b"1000_aa.jpg#1\tcaf\xe9", r"Flickr8k.token.txt:2: not UTF-8 text \(byte 0xe9 at column 18\)"),
    (b"9999_zz.jpg#0\tghost", r"Flickr8k.token.txt:2: caption refers to image '9999_zz.jpg' that is not in"),
])
def test_flickr8k_caption_errors(tmp_path: Path, line: bytes, match: str) -> None:
    root = _flickr8k(tmp_path, tokens=_tokens_with(2, line))
    with pytest.raises(DataError, match=match):
        load_flickr8k(root)
    problems: list[str] = []
    ds = load_flickr8k(root, skip_bad=True, problems=problems)
    assert len(problems) == 1 and "Flickr8k.token.txt:2" in problems[0]
    assert len(ds.captions) == 9 and len(ds) == 5


@pytest.mark.parametrize("splits, match", [
    ({"train": "1000_aa.jpg\nnope.jpg\n", "dev": "1002_cc.jpg\n", "test": "1003_dd.jpg\n"},
     r"Flickr_8k.trainImages.txt:2: split file names unknown image 'nope.jpg'"),
    ({"train": "1000_aa.jpg\n", "dev": "\n\n", "test": "1003_dd.jpg\n"},
     r"Flickr_8k.devImages.txt: split file lists no images"),
    ({"train": "1000_aa.jpg\n", "dev": "1002_cc.jpg\n", "test": "1003_dd.jpg\n1000_aa.jpg\n"},
     r"Flickr_8k.testImages.txt:2: image '1000_aa.jpg' is already in split 'train'"),
])
def test_flickr8k_split_errors(tmp_path: Path, splits: dict[str, str], match: str) -> None:
    root = _flickr8k(tmp_path, splits=splits)
    with pytest.raises(DataError, match=match):
        load_flickr8k(root)
    problems: list[str] = []
    ds = load_flickr8k(root, skip_bad=True, problems=problems)
    assert len(problems) == 1 and len(ds) == 5


def test_flickr8k_missing_things(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="Flickr8k source not found"):
        load_flickr8k(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no Flickr8k captions in .*empty"):
        load_flickr8k(tmp_path / "empty")
    root = _flickr8k(tmp_path, image_dir="photos")
    with pytest.raises(DataError, match="no Flickr8k image folder found"):
        load_flickr8k(root)
    assert len(load_flickr8k(root, image_root=root / "photos")) == 5


# --------------------------------------------------------------------------------------------
# Flickr8k, captions.txt CSV variant
# --------------------------------------------------------------------------------------------
def test_flickr8k_captions_csv(tmp_path: Path) -> None:
    root = tmp_path / "kaggle"
    for n in NAMES[:3]:
        _png(root / "Images" / n)
    (root / "captions.txt").write_text(
        "image,caption\n"
        "1000_aa.jpg,A dog runs .\n"
        '1000_aa.jpg,"A dog, brown, runs ."\n'
        "1001_bb.jpg,A cat .\n"
        "1002_cc.jpg,A bird .\n", encoding="utf-8")
    ds = load_flickr8k(root)
    assert ds.image_ids == ["1000_aa", "1001_bb", "1002_cc"]
    assert ds.caption_ids == ["1000_aa#0", "1000_aa#1", "1001_bb#0", "1002_cc#0"]
    assert ds.texts[1] == "A dog, brown, runs ." and ds.splits() == {"train": 3}
    (root / "Flickr_8k.testImages.txt").write_text("1002_cc.jpg\n")
    assert [r.split for r in load_flickr8k(root)] == ["extra", "extra", "test"]


def test_flickr8k_captions_csv_errors(tmp_path: Path) -> None:
    root = tmp_path / "kaggle"
    _png(root / "Images" / "1000_aa.jpg")
    (root / "captions.txt").write_text("image,caption\n1000_aa.jpg,ok\n1000_aa.jpg,a,b\n")
    with pytest.raises(DataError, match=r"captions.txt:3: malformed line \(3 fields, header has 2\)"):
        load_flickr8k(root)
    (root / "captions.txt").write_text("img,text\n1000_aa.jpg,ok\n")
    with pytest.raises(DataError, match=r"captions.txt:1: header lacks column\(s\) image, caption"):
        load_flickr8k(root / "captions.txt")


# --------------------------------------------------------------------------------------------
# generic CSV / JSONL
# --------------------------------------------------------------------------------------------
def test_csv_groups_rows(tmp_path: Path) -> None:
    _png(tmp_path / "img" / "a.png")
    _png(tmp_path / "img" / "b.png")
    p = tmp_path / "pairs.csv"
    p.write_text("filepath,caption,split\nimg/a.png,one,test\nimg/b.png,two,\nimg/a.png,three,test\n")
    ds = load_csv(p)
    assert ds.name == "pairs" and ds.image_ids == ["img/a.png", "img/b.png"]
    assert ds.caption_ids == ["img/a.png#0", "img/a.png#1", "img/b.png#0"]
    assert ds.texts == ["one", "three", "two"] and [r.split for r in ds] == ["test", "train"]
    q = tmp_path / "ids.csv"
    q.write_text("caption_id,filepath,image_id,caption,split\nc1,a.png,A,one,dev\nc2,b.png,B,two,train\n")
    ds = load_csv(q, tmp_path / "img")
    assert ds.image_ids == ["A", "B"] and ds.caption_ids == ["c1", "c2"] and ds[0].split == "val"


@pytest.mark.parametrize("body, match", [
    ("path,caption\na.png,x\n", r"ids.csv:1: header lacks column\(s\) filepath"),
    ("filepath,caption\na.png,x\nb.png\n", r"ids.csv:3: malformed line \(1 fields, header has 2\)"),
    ("filepath,caption,split\na.png,x,train\na.png,y,test\n", r"ids.csv:3: split 'test' differs from 'train'"),
    ("filepath,caption,image_id\na.png,x,A\nb.png,y,A\n", r"ids.csv:3: duplicate image id 'A'"),
    ("filepath,caption,caption_id\na.png,x,c\nb.png,y,c\n", r"ids.csv:3: duplicate caption id 'c'"),
    ("filepath,caption\na.png,x\nb.png,\"  \"\n", r"ids.csv:3: empty caption 'b.png#0' for image 'b.png'"),
    ("filepath,caption\na.png,x\nc.png,y\n", r"ids.csv:3: image file not found: .*c.png"),
])
def test_csv_errors(tmp_path: Path, body: str, match: str) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    p = tmp_path / "ids.csv"
    p.write_text(body)
    with pytest.raises(DataError, match=match):
        load_csv(p)


def test_jsonl(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    p = tmp_path / "pairs.jsonl"
    rows = [{"filepath": "a.png", "caption": "one", "image_id": 5}, {"filepath": "b.png", "caption": "two"},
            {"filepath": "a.png", "caption": "three", "caption_id": 77}]
    p.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    ds = load_jsonl(p)
    assert ds.image_ids == ["5", "b.png"] and ds.caption_ids == ["5#0", "77", "b.png#0"]
    p.write_text('{"filepath": "a.png", "caption": "one"}\n{"filepath": "b.png", caption}\n[1]\n')
    with pytest.raises(DataError, match=r"pairs.jsonl:2: malformed line \(invalid JSON"):
        load_jsonl(p)
    problems: list[str] = []
    ds = load_jsonl(p, skip_bad=True, problems=problems)
    assert len(ds) == 1 and len(problems) == 2 and "pairs.jsonl:3: malformed line (expected a JSON object)" in problems[1]


# --------------------------------------------------------------------------------------------
# split files and the dispatcher
# --------------------------------------------------------------------------------------------
def test_apply_split_files_by_name(tmp_path: Path) -> None:
    ds = load_flickr8k(_flickr8k(tmp_path, splits={}))
    (tmp_path / "my_dev.txt").write_text("1000_aa\n")  # a stem works too
    (tmp_path / "my_test.txt").write_text("1001_bb.jpg\n")
    out = apply_split_files(ds, [tmp_path / "my_dev.txt", tmp_path / "my_test.txt"])
    assert [r.split for r in out] == ["val", "test", "extra", "extra", "extra"]
    with pytest.raises(ConfigError, match="cannot tell the split of .*other.txt"):
        apply_split_files(ds, [tmp_path / "other.txt"])


def test_load_dataset_dispatch(tmp_path: Path) -> None:
    root = _flickr8k(tmp_path)
    assert load_dataset("flickr8k", root).image_ids == load_flickr8k(root).image_ids
    assert load_dataset("coco", _coco(tmp_path), split="train").splits() == {"train": 2}
    with pytest.raises(ConfigError, match="unknown data format 'tsv'"):
        load_dataset("tsv", root)
