"""Image decoding, preprocessing against explicit loops, the cache and the image check."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import itrkit.data.images as images
from itrkit.data.images import ImageCache, ImageTransform, check_image, check_images, load_image, preprocess
from itrkit.data.records import Caption, Dataset, ImageRecord
from itrkit.errors import DataError


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


# --------------------------------------------------------------------------------------------
# load_image
# --------------------------------------------------------------------------------------------
def test_modes_to_rgb(tmp_path: Path) -> None:
    Image.new("L", (4, 3), 77).save(tmp_path / "grey.png")
    assert np.all(np.asarray(load_image(tmp_path / "grey.png")) == 77)

    # alpha is composited on white: a transparent pixel is white, half-transparent red is pink
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 0)
    rgba[0, 1] = (255, 0, 0, 128)
    rgba[1, :] = (0, 0, 255, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "alpha.png")
    got = np.asarray(load_image(tmp_path / "alpha.png")).astype(int)
    assert got[0, 0].tolist() == [255, 255, 255]
    a = 128 / 255
    assert np.abs(got[0, 1] - np.array([255, 255 * (1 - a), 255 * (1 - a)])).max() <= 1
    assert got[1, 0].tolist() == [0, 0, 255]

    pal = Image.new("P", (3, 3), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.save(tmp_path / "pal.gif")
    assert np.asarray(load_image(tmp_path / "pal.gif"))[1, 1].tolist() == [10, 200, 30]
    pal.info["transparency"] = 1
    pal.save(tmp_path / "pal_t.png", transparency=1)
    assert np.asarray(load_image(tmp_path / "pal_t.png"))[1, 1].tolist() == [255, 255, 255]

    # 16-bit greyscale is scaled to 8 bits (not clipped at 255)
    g16 = np.array([[0, 257 * 100, 65535]], np.uint16)
    Image.fromarray(g16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert np.asarray(load_image(tmp_path / "g16.png"))[0, :, 0].tolist() == [0, 100, 255]

    Image.fromarray(_noise(8, 8)).convert("CMYK").save(tmp_path / "cmyk.jpg")
    im = load_image(tmp_path / "cmyk.jpg")
    assert im.mode == "RGB" and im.size == (8, 8)


def test_exif_orientation(tmp_path: Path) -> None:
    arr = np.zeros((20, 40, 3), np.uint8)  # landscape 40×20, left half red, right half blue
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    Image.fromarray(arr).save(tmp_path / "rot.jpg", quality=95, exif=exif.tobytes())
    im = np.asarray(load_image(tmp_path / "rot.jpg")).astype(int)
    assert im.shape == (40, 20, 3)  # portrait once oriented
    assert im[2, 10, 0] > 200 and im[2, 10, 2] < 60  # red on top
    assert im[37, 10, 2] > 200 and im[37, 10, 0] < 60  # blue at the bottom


def test_content_not_extension(tmp_path: Path) -> None:
    Image.fromarray(_noise(5, 6)).save(tmp_path / "really_a_png.jpg", format="PNG")
    assert np.array_equal(np.asarray(load_image(tmp_path / "really_a_png.jpg")), _noise(5, 6))


def _truncated_jpeg(path: Path) -> Path:
    Image.fromarray(_noise(64, 64)).save(path.with_suffix(".full.jpg"), quality=90)
    data = path.with_suffix(".full.jpg").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_bad_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="image file not found: .*nope.jpg"):
        load_image(tmp_path / "nope.jpg")
    (tmp_path / "zero.jpg").write_bytes(b"")
    with pytest.raises(DataError, match=r"image file is empty \(0 bytes\): .*zero.jpg"):
        load_image(tmp_path / "zero.jpg")
    (tmp_path / "junk.png").write_bytes(b"this is not an image at all")
    with pytest.raises(DataError, match="cannot decode image .*junk.png"):
        load_image(tmp_path / "junk.png")
    with pytest.raises(DataError, match="cannot decode image .*cut.jpg: image file is truncated"):
        load_image(_truncated_jpeg(tmp_path / "cut.jpg"))
    Image.fromarray(_noise(32, 32)).save(tmp_path / "full.png")
    data = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) - 200])
    with pytest.raises(DataError, match="cannot decode image .*cut.png"):
        load_image(tmp_path / "cut.png")
    with pytest.raises(DataError, match="image path is not a file"):
        load_image(tmp_path)


# --------------------------------------------------------------------------------------------
# preprocess against explicit loops
# --------------------------------------------------------------------------------------------
def _reference(img: Image.Image, size: int, mean, std, scale: str) -> np.ndarray:
    """Slow reference: resize the shorter side, crop by explicit offsets, normalise pixel by pixel."""
    w, h = img.size
    if w <= h:
        nw, nh = size, int(round(h * size / w))
    else:
        nw, nh = int(round(w * size / h)), size
    big = np.asarray(img.resize((nw, nh), Image.Resampling.BICUBIC)).astype(np.float64)
    top, left = int(round((nh - size) / 2)), int(round((nw - size) / 2))
    out = np.zeros((3, size, size))
    for c in range(3):
        for y in range(size):
            for x in range(size):
                v = big[top + y, left + x, c]
                if scale == "unit":
                    v = v / 255.0
                out[c, y, x] = (v - mean[c]) / std[c]
    return out


@pytest.mark.parametrize("wh", [(30, 17), (17, 30), (12, 12)])
def test_preprocess_matches_loops(wh: tuple[int, int]) -> None:
    img = Image.fromarray(_noise(wh[1], wh[0], seed=wh[0]))
    t = ImageTransform.clip(8)
    got = t(img)
    assert got.shape == (3, 8, 8) and got.dtype == np.float32
    np.testing.assert_allclose(got, _reference(img, 8, t.mean, t.std, "unit"), atol=1e-5)
    got = preprocess(img, 8, 127.0, 128.0, scale="byte")
    np.testing.assert_allclose(got, _reference(img, 8, (127.0,) * 3, (128.0,) * 3, "byte"), atol=1e-5)


def test_preprocess_efficientnet_values_and_squash(tmp_path: Path) -> None:
    img = Image.new("RGB", (50, 20), (0, 127, 255))
    x = ImageTransform.efficientnet_lite(16)(img)
    # (x − 127) / 128 on 0–255 values
    assert np.allclose(x[0], -127 / 128) and np.allclose(x[1], 0.0) and np.allclose(x[2], 1.0)
    arr = np.zeros((20, 50, 3), np.uint8)
    arr[:, :5] = 255  # a white strip on the far left survives squashing but not centre cropping
    sq = preprocess(Image.fromarray(arr), 10, resize="squash")
    cc = preprocess(Image.fromarray(arr), 10)
    assert sq.shape == cc.shape == (3, 10, 10)
    assert sq[:, :, 0].mean() > 0.9 and cc.max() < 0.05
    Image.fromarray(arr).save(tmp_path / "a.png")
    assert np.array_equal(preprocess(tmp_path / "a.png", 10), cc)  # a path is loaded first
    with pytest.raises(ValueError, match="scale"):
        preprocess(img, 8, scale="percent")


# --------------------------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------------------------
def test_cache_lru_budget(tmp_path: Path) -> None:
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(_noise(10, 10, seed=i)).save(paths[-1])
    t = ImageTransform(8)
    one = 3 * 8 * 8 * 4
    cache = ImageCache(max_bytes=2 * one)
    a = cache.get(paths[0], t)
    assert np.array_equal(a, t(load_image(paths[0]))) and not a.flags.writeable
    assert cache.get(paths[0], t) is a and (cache.hits, cache.misses) == (1, 1)
    cache.get(paths[1], t)
    cache.get(paths[0], t)  # 0 is now the most recent
    cache.get(paths[2], t)  # evicts 1
    assert len(cache) == 2 and cache.nbytes == 2 * one
    cache.get(paths[1], t)
    assert cache.misses == 4
    assert cache.get(paths[0], ImageTransform(4)).shape == (3, 4, 4)  # another size, another entry
    assert cache.get_batch(paths, t).shape == (3, 3, 8, 8)


def test_cache_decodes_once_across_threads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.fromarray(_noise(10, 10)).save(tmp_path / "x.png")
    calls = []
    real = images.load_image

    def slow_load(p):
        calls.append(p)
        time.sleep(0.05)  # keep the decode in flight while the other threads arrive
        return real(p)

    monkeypatch.setattr(images, "load_image", slow_load)
    cache = ImageCache()
    barrier = threading.Barrier(6)
    out: list[np.ndarray] = []

    def worker() -> None:
        barrier.wait()
        out.append(cache.get(tmp_path / "x.png", ImageTransform(8)))

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(calls) == 1 and len(out) == 6 and all(o is out[0] for o in out)


# --------------------------------------------------------------------------------------------
# check_images
# --------------------------------------------------------------------------------------------
def test_check_images(tmp_path: Path) -> None:
    good = tmp_path / "good.jpg"
    Image.fromarray(_noise(16, 16)).save(good)
    cut = _truncated_jpeg(tmp_path / "cut.jpg")
    Image.fromarray(_noise(16, 16)).save(tmp_path / "crc.png")
    data = bytearray((tmp_path / "crc.png").read_bytes())
    data[60] ^= 0xFF  # damage the IDAT data: verify() catches the CRC mismatch
    (tmp_path / "crc.png").write_bytes(bytes(data))
    assert check_image(good) is None and check_image(cut) is not None
    assert "checksum" in (check_image(tmp_path / "crc.png") or "")
    assert check_image(cut, decode=True) is not None

    ds = Dataset([ImageRecord(n, tmp_path / f, [Caption(n, "x")]) for n, f in
                  [("g", "good.jpg"), ("c", "cut.jpg"), ("p", "crc.png"), ("m", "missing.jpg")]])
    with pytest.raises(DataError, match="image 'c': cannot decode image .*cut.jpg"):
        check_images(ds, progress=False)
    bad = check_images(ds, skip_bad=True, progress=False)
    assert sorted(bad) == ["c", "m", "p"] and "image file not found" in bad["m"]
