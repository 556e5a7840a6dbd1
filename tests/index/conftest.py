"""A small deterministic encoder that genuinely looks at pixels and words, and images to index.

Cross head (dim 32): images → share of pixels nearest to each of 8 named colours (dims 0..7);
texts → bag of words where colour words land on the same 8 dims and every other word is hashed
into dims 8..31. So "red" finds red images because red pixels and the word red share a dimension.
USA head (dim 27): images → 3x3x3 RGB histogram; texts → words hashed into 27 dims.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from itrkit.data.records import Caption, Dataset, ImageRecord
from itrkit.utils.io import fingerprint

PALETTE = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 60, 220), "yellow": (240, 220, 40),
    "white": (245, 245, 245), "black": (15, 15, 15), "orange": (245, 140, 20), "purple": (130, 40, 170),
}
COLOURS = list(PALETTE)
DIM, UNI_DIM = 32, 27


def _pixels(item: Path | Image.Image) -> np.ndarray:
    img = item if isinstance(item, Image.Image) else Image.open(item)
    img = img.convert("RGB").resize((24, 24), Image.NEAREST)
    return np.asarray(img, dtype=np.float64).reshape(-1, 3)


def _normalise(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=-1, keepdims=True)
    return (v / np.maximum(n, 1e-12)).astype(np.float32)


def _hash(word: str, n: int) -> int:
    return int(hashlib.md5(word.encode()).hexdigest(), 16) % n


class ColourEncoder:
    """Implements itrkit.index.build.Encoder; ``with_uni=False`` models a network without a USA head."""

    def __init__(self, with_uni: bool = True, salt: str = "") -> None:
        self.with_uni = with_uni
        self.salt = salt
        self.calls = 0
        self._palette = np.array([PALETTE[c] for c in COLOURS], dtype=np.float64)

    def encode_images(self, items: list) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(items), DIM))
        for i, item in enumerate(items):
            px = _pixels(item)
            nearest = ((px[:, None, :] - self._palette[None]) ** 2).sum(-1).argmin(1)
            out[i, :len(COLOURS)] = np.bincount(nearest, minlength=len(COLOURS)) / len(px)
        return _normalise(out)

    def encode_texts(self, texts: list[str]) -> np.ndarray:
        self.calls += 1
        out = np.zeros((len(texts), DIM))
        for i, t in enumerate(texts):
            for w in re.findall(r"[a-z]+", t.lower()):
                j = COLOURS.index(w) if w in PALETTE else len(COLOURS) + _hash(w, DIM - len(COLOURS))
                out[i, j] += 1.0
        return _normalise(out)

    def encode_images_uni(self, items: list) -> np.ndarray | None:
        if not self.with_uni:
            return None
        out = np.zeros((len(items), UNI_DIM))
        for i, item in enumerate(items):
            q = np.minimum(_pixels(item) // 86, 2).astype(int)
            out[i] = np.bincount(q[:, 0] * 9 + q[:, 1] * 3 + q[:, 2], minlength=UNI_DIM)
        return _normalise(out)

    def encode_texts_uni(self, texts: list[str]) -> np.ndarray | None:
        if not self.with_uni:
            return None
        out = np.zeros((len(texts), UNI_DIM))
        for i, t in enumerate(texts):
            for w in re.findall(r"[a-z]+", t.lower()):
                out[i, _hash(w, UNI_DIM)] += 1.0
        return _normalise(out)

    def fingerprint(self) -> str:
        return fingerprint("colour-encoder/1", self.with_uni, self.salt)


def solid(colour: str, size: int = 48) -> Image.Image:
    return Image.new("RGB", (size, size), PALETTE[colour])


def stripes(a: str, b: str, size: int = 48, width: int = 6) -> Image.Image:
    arr = np.zeros((size, size, 3), np.uint8)
    for x in range(size):
        arr[:, x] = PALETTE[a] if (x // width) % 2 == 0 else PALETTE[b]
    return Image.fromarray(arr)


# id -> (image, captions)
SCENES = {
    "red": (lambda: solid("red"), ["a red square", "a plain red picture"]),
    "green": (lambda: solid("green"), ["a green square", "grass green everywhere"]),
    "blue": (lambda: solid("blue"), ["a blue square", "deep blue sea colour"]),
    "yellow": (lambda: solid("yellow"), ["a yellow square", "bright yellow like the sun"]),
    "purple": (lambda: solid("purple"), ["a purple square", "purple paint"]),
    "orange": (lambda: solid("orange"), ["an orange square", "orange like a fruit"]),
    "red-white": (lambda: stripes("red", "white"), ["red and white stripes", "a striped flag"]),
    "blue-black": (lambda: stripes("blue", "black"), ["blue and black stripes", "dark striped cloth"]),
}


def make_colour_dataset(folder: Path) -> Dataset:
    folder.mkdir(parents=True, exist_ok=True)
    records = []
    for image_id, (draw, caps) in SCENES.items():
        path = folder / f"{image_id}.png"
        draw().save(path)
        records.append(ImageRecord(id=image_id, path=path, split="test",
                                   captions=[Caption(f"{image_id}#{j}", t) for j, t in enumerate(caps)]))
    return Dataset(records, name="colours")


@pytest.fixture
def make_encoder() -> type[ColourEncoder]:
    """The encoder class itself, for tests that need a variant (no USA head, other weights)."""
    return ColourEncoder


@pytest.fixture
def colour_encoder() -> ColourEncoder:
    return ColourEncoder()


@pytest.fixture
def colour_dataset(tmp_path: Path) -> Dataset:
    return make_colour_dataset(tmp_path / "images")


@pytest.fixture
def colour_index(tmp_path: Path, colour_dataset: Dataset, colour_encoder: ColourEncoder) -> Path:
    from itrkit.index.build import build_index

    return build_index(colour_encoder, colour_dataset, tmp_path / "index", run_dir=tmp_path / "run",
                       progress=False)
