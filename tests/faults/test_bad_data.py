"""Bad data through `itrkit data prepare` / `itrkit train`: odd but valid images are converted, broken
ones are refused with one line naming the file (and line), and nothing is written."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itrkit.cli import main
from itrkit.data.images import load_image
from itrkit.data.records import Dataset


def _jpeg(mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    arr = np.random.default_rng(0).integers(0, 256, (40, 40, 3), np.uint8)
    Image.fromarray(arr).convert(mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png(mode: str) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (20, 20), (10, 200, 30, 128)).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def _prepare(tmp_path: Path, files: dict[str, bytes], csv_bytes: bytes, capsys, *extra: str) -> tuple[int, list[str]]:
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "captions.csv").write_bytes(csv_bytes)
    code = main(["data", "prepare", "--format", "csv", "--source", str(tmp_path / "captions.csv"),
                 "--out", str(tmp_path / "out"), *extra])
    return code, [line for line in capsys.readouterr().err.splitlines() if line.strip()]


OK = {"ok.jpg": _jpeg()}


@pytest.mark.parametrize("name, data, needle", [
    ("cut.jpg", _jpeg()[:600], "cut.jpg"),
    ("empty.jpg", b"", "empty.jpg"),
    ("text.jpg", b"hello, I am not a picture", "text.jpg"),
], ids=["truncated-jpeg", "zero-size", "not-an-image"])
def test_broken_images_are_refused(tmp_path: Path, capsys, name: str, data: bytes, needle: str) -> None:
    code, err = _prepare(tmp_path, {**OK, name: data}, f"filepath,caption\nok.jpg,a photo\n{name},another\n".encode(), capsys)
    assert code == 2 and len(err) == 1 and err[0].startswith("error:") and needle in err[0], err
    assert not (tmp_path / "out").exists()


def test_skip_bad_lists_each_skipped_item(tmp_path: Path, capsys) -> None:
    files = {**OK, "cut.jpg": _jpeg()[:600], "empty.jpg": b""}
    csv = b"filepath,caption\nok.jpg,a photo\ncut.jpg,two\nempty.jpg,three\ngone.jpg,four\n"
    code, err = _prepare(tmp_path, files, csv, capsys, "--skip-bad")
    assert code == 0
    text = "\n".join(err)
    assert all(n in text for n in ("cut.jpg", "empty.jpg", "gone.jpg"))
    assert len(Dataset.load(tmp_path / "out")) == 1  # only ok.jpg is left


@pytest.mark.parametrize("name, data", [
    ("png-named.jpg", _png("RGB")), ("cmyk.jpg", _jpeg("CMYK")), ("grey.jpg", _jpeg("L")),
    ("alpha.png", _png("RGBA")), ("palette.png", _png("P")),
], ids=["png-named-jpg", "cmyk", "greyscale", "alpha", "palette"])
def test_odd_but_valid_images_are_converted(tmp_path: Path, capsys, name: str, data: bytes) -> None:
    code, err = _prepare(tmp_path, {**OK, name: data}, f"filepath,caption\nok.jpg,a photo\n{name},odd one\n".encode(),
                         capsys)
    assert code == 0, err
    img = load_image(tmp_path / name)
    assert img.mode == "RGB" and img.size[0] > 0


def test_non_utf8_caption_file_names_the_line(tmp_path: Path, capsys) -> None:
    code, err = _prepare(tmp_path, OK, "filepath,caption\nok.jpg,a photo\nok.jpg,caf\xe9\n".encode("latin-1"), capsys)
    assert code == 2 and len(err) == 1 and "captions.csv" in err[0] and "UTF-8" in err[0].replace("utf-8", "UTF-8"), err


@pytest.mark.parametrize("caption", ["", "   "])
def test_empty_caption(tmp_path: Path, capsys, caption: str) -> None:
    code, err = _prepare(tmp_path, OK, f"filepath,caption\nok.jpg,a photo\nok.jpg,{caption}\n".encode(), capsys)
    assert code == 2 and len(err) == 1 and "captions.csv" in err[0], err


def test_captions_for_unknown_images_flickr8k(tmp_path: Path, capsys) -> None:
    src = tmp_path / "f8k"
    (src / "images").mkdir(parents=True)
    (src / "images" / "a.jpg").write_bytes(_jpeg())
    (src / "Flickr8k.token.txt").write_text("a.jpg#0\ta dog\nb.jpg#0\ta cat\n")
    code = main(["data", "prepare", "--format", "flickr8k", "--source", str(src), "--out", str(tmp_path / "out")])
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code == 2 and len(err) == 1 and "b.jpg" in err[0], err
    assert not (tmp_path / "out").exists()


def test_split_with_no_images_is_refused_at_train(tmp_path: Path, capsys) -> None:
    files = {f"{i}.jpg": _jpeg() for i in range(4)}
    csv = "filepath,caption,split\n" + "".join(f"{i}.jpg,photo {i},train\n" for i in range(4))
    code, _ = _prepare(tmp_path, files, csv.encode(), capsys)
    assert code == 0
    code = main(["train", "--data", str(tmp_path / "out"), "--out", str(tmp_path / "run"), "--quiet",
                 "--set", "model.image_tower=tiny-image", "--set", "model.text_tower=tiny-text", "--set", "batch_size=2"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(err) == 1 and "val" in err[0], err
    assert not (tmp_path / "run").exists()
