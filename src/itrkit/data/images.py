"""Image decoding and tower preprocessing with Pillow + numpy (no torchvision).

- :func:`load_image`: any file Pillow reads → 8-bit RGB, EXIF orientation applied, transparency
  composited on white, 16-bit greyscale scaled down; bad files raise a one-line DataError.
- :func:`preprocess` / :class:`ImageTransform`: resize (bicubic), centre crop, normalise →
  float32 CHW. EfficientNet-Lite wants ``(x − 127) / 128`` on 0–255 (``scale="byte"``); CLIP
  wants ``x / 255`` then ``(x − mean) / std`` (``scale="unit"``).
- :class:`ImageCache`: decode + preprocess once per (path, transform), LRU under a byte budget,
  thread-safe.
- :func:`check_images`: which images of a dataset do not open.

Truncated files are errors: ``ImageFile.LOAD_TRUNCATED_IMAGES`` is never set, and ``.load()``
is always called so a JPEG cut short fails here rather than decoding to grey.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm import tqdm

from itrkit.data.records import Dataset
from itrkit.errors import DataError

# Errors Pillow raises for unreadable content (truncation is an OSError).
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError,
                  EOFError)

EFFICIENTNET_MEAN, EFFICIENTNET_STD = (127.0, 127.0, 127.0), (128.0, 128.0, 128.0)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_path(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError(f"image file not found: {p}")
    if not p.is_file():
        raise DataError(f"image path is not a file: {p}")
    if p.stat().st_size == 0:
        raise DataError(f"image file is empty (0 bytes): {p}")
    return p


def _reason(e: BaseException) -> str:
    msg = " ".join(str(e).split()) or e.__class__.__name__
    return msg if len(msg) < 120 else msg[:117] + "..."


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB; alpha is composited on white (not dropped to black)."""
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # 16/32-bit greyscale: Pillow's convert("L") clips at 255, so scale explicitly.
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or a.max(initial=0) > 255 else 255.0
        if im.mode == "F" and a.max(initial=0) <= 1.0:
            top = 1.0
        a = np.clip(np.rint(a * (255.0 / top)), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if im.mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    elif im.mode in ("LA", "La", "PA", "RGBa"):
        im = im.convert("RGBA")
    elif im.mode == "L" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        white = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, im).convert("RGB")
    return im.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def load_image(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully into an RGB image (EXIF orientation applied).

    The format comes from the file's content, not its extension (a PNG named ``.jpg`` loads).
    Missing, empty, truncated or undecodable files raise :class:`DataError` naming the file.
    """
    p = _check_path(path)
    try:
        with warnings.catch_warnings():
            # A decompression-bomb *warning* is only a warning; the error is still raised.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(p) as im:
                im.load()  # forces the full decode: truncated data fails here
                im = ImageOps.exif_transpose(im) or im
                return to_rgb(im).copy()
    except _DECODE_ERRORS as e:
        raise DataError(f"cannot decode image {p}: {_reason(e)}") from None


def preprocess(img: Image.Image | str | os.PathLike, size: int, mean: float | Sequence[float] = 0.0,
               std: float | Sequence[float] = 1.0, scale: str = "unit", resize: str = "shorter",
               crop: str = "center") -> np.ndarray:
    """An image → float32 array (3, size, size) ready for a tower.

    ``resize="shorter"``: bicubic resize so the shorter side is ``size``, then (``crop="center"``)
    a centre crop to ``size × size``. ``resize="squash"``: straight to ``size × size``.
    ``scale="unit"``: ``(x/255 − mean)/std``; ``scale="byte"``: ``(x − mean)/std`` on 0–255.
    """
    if not isinstance(img, Image.Image):
        img = load_image(img)
    elif img.mode != "RGB":
        img = to_rgb(img)
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    w, h = img.size
    if resize == "squash":
        img = img.resize((size, size), Image.Resampling.BICUBIC)
    elif resize == "shorter":
        if w <= h:
            nw, nh = size, max(size, int(round(h * size / w)))
        else:
            nw, nh = max(size, int(round(w * size / h))), size
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.Resampling.BICUBIC)
        if crop == "center":
            left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
            img = img.crop((left, top, left + size, top + size))
        elif crop != "none":
            raise ValueError(f"crop must be 'center' or 'none', got {crop!r}")
    else:
        raise ValueError(f"resize must be 'shorter' or 'squash', got {resize!r}")
    x = np.asarray(img, dtype=np.float32)
    if scale == "unit":
        x = x / 255.0
    elif scale != "byte":
        raise ValueError(f"scale must be 'unit' or 'byte', got {scale!r}")
    m = np.asarray(mean, dtype=np.float32).reshape(-1)
    s = np.asarray(std, dtype=np.float32).reshape(-1)
    x = (x - m) / s
    return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


@dataclass(frozen=True)
class ImageTransform:
    """The arguments of :func:`preprocess`, hashable (a cache key) and callable."""

    size: int
    mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    std: tuple[float, ...] = (1.0, 1.0, 1.0)
    scale: str = "unit"
    resize: str = "shorter"
    crop: str = "center"

    def __call__(self, img: Image.Image | str | os.PathLike) -> np.ndarray:
        return preprocess(img, self.size, self.mean, self.std, self.scale, self.resize, self.crop)

    @classmethod
    def efficientnet_lite(cls, size: int = 224) -> ImageTransform:
        """EfficientNet-Lite: RGB ``(x − 127)/128`` on 0–255."""
        return cls(size, EFFICIENTNET_MEAN, EFFICIENTNET_STD, scale="byte")

    @classmethod
    def clip(cls, size: int = 224, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> ImageTransform:
        """CLIP: ``x/255`` then ``(x − mean)/std`` per channel."""
        return cls(size, tuple(float(v) for v in mean), tuple(float(v) for v in std), scale="unit")


class ImageCache:
    """Preprocessed arrays keyed by (resolved path, transform): each decoded once while cached.

    LRU eviction keeps the total under ``max_bytes``. Safe to share between threads: a path that
    several threads ask for at once is decoded by one of them while the others wait.
    Returned arrays are read-only (they are shared).
    """

    def __init__(self, max_bytes: int = 512 << 20) -> None:
        self.max_bytes = int(max_bytes)
        self._data: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self._pending: dict[tuple, threading.Event] = {}
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._data)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get(self, path: str | os.PathLike, transform: ImageTransform | Callable[[Image.Image], np.ndarray]) -> np.ndarray:
        key = (str(Path(path).resolve()), transform)
        while True:
            with self._lock:
                if key in self._data:
                    self._data.move_to_end(key)
                    self.hits += 1
                    return self._data[key]
                ev = self._pending.get(key)
                if ev is None:  # we decode it
                    ev = self._pending[key] = threading.Event()
                    self.misses += 1
                    break
            ev.wait()  # another thread is decoding it; then look again (it may not fit the budget)
            with self._lock:
                if key not in self._data and key not in self._pending:
                    # It was too large to keep (or failed): decode ourselves below.
                    ev = self._pending[key] = threading.Event()
                    self.misses += 1
                    break
        try:
            arr = transform(load_image(path))
            arr.setflags(write=False)
            with self._lock:
                self._put(key, arr)
            return arr
        finally:
            with self._lock:
                self._pending.pop(key, None)
            ev.set()

    def _put(self, key: tuple, arr: np.ndarray) -> None:
        if arr.nbytes > self.max_bytes:
            return
        self._data[key] = arr
        self._bytes += arr.nbytes
        while self._bytes > self.max_bytes:
            _, old = self._data.popitem(last=False)
            self._bytes -= old.nbytes

    def get_batch(self, paths: Sequence[str | os.PathLike], transform: ImageTransform) -> np.ndarray:
        """Stacked ``(N, 3, H, W)`` float32 for ``paths``."""
        return np.stack([self.get(p, transform) for p in paths])

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0


def check_image(path: str | os.PathLike, decode: bool = False) -> str | None:
    """``None`` if the image opens, else a one-line reason.

    Fast path: header + ``verify()`` (PNG chunk CRCs), then for JPEG a reduced-size draft decode,
    which still reads every scan so a truncated file is caught. ``decode=True``: full
    :func:`load_image`.
    """
    try:
        p = _check_path(path)
        if decode:
            load_image(p)
            return None
        with Image.open(p) as im:
            fmt = im.format
            im.verify()
        if fmt == "JPEG":
            with Image.open(p) as im:
                im.draft("RGB", (max(1, im.size[0] // 8), max(1, im.size[1] // 8)))
                im.load()
    except DataError as e:
        return str(e)
    except _DECODE_ERRORS as e:
        return f"cannot decode image {path}: {_reason(e)}"
    return None


def check_images(dataset: Dataset, skip_bad: bool = False, decode: bool = False, workers: int = 2,
                 progress: bool | None = None) -> dict[str, str]:
    """Open every image of ``dataset``; ``{image id: reason}`` for the bad ones.

    Without ``skip_bad`` the first bad image (in dataset order) raises :class:`DataError`.
    Pillow releases the GIL while decoding, so ``workers`` threads overlap the reads.
    """
    paths = [r.path for r in dataset.records]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(tqdm(pool.map(lambda p: check_image(p, decode), paths), total=len(paths),
                            desc="checking images", unit="img", disable=None if progress is None else not progress,
                            leave=False))
    bad = {r.id: why for r, why in zip(dataset.records, results) if why is not None}
    if bad and not skip_bad:
        first = next(iter(bad))
        raise DataError(f"image '{first}': {bad[first]}")
    return bad
