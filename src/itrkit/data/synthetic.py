"""The built-in captioned-image set: Pillow-rendered scenes with known attributes, no download.

Each PNG shows 1–3 filled shapes (8 shapes × 8 colours, small or large, on the left / right /
top / bottom / centre) over a plain or textured background. Captions come from 10 templates that
mention colours, shapes, sizes, positions, relations and backgrounds, so captions of different
images share words. ``labels`` holds each image's set of ``"<colour> <shape>"`` objects; images
with equal sets are *true positives* of each other (:func:`synthetic_positives`), which is what
soft-label methods such as CUSA claim to recover.

Everything is drawn from one ``numpy`` generator seeded by ``seed``, and Pillow writes PNGs
without timestamps, so the same seed gives byte-identical files. Shapes are drawn at twice the
size and box-downsampled, which anti-aliases their edges like a photograph's.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from itrkit.data.records import Caption, Dataset, ImageRecord
from itrkit.errors import DataError
from itrkit.utils.io import atomic_write_json

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35), "green": (40, 150, 45), "blue": (35, 75, 215), "yellow": (240, 205, 25),
    "orange": (245, 125, 20), "purple": (125, 45, 170), "pink": (240, 115, 185), "black": (30, 30, 30),
}
SHAPES = ("circle", "square", "triangle", "star", "ring", "cross", "diamond", "hexagon")
# Background name → how captions call it ("on a <phrase> background").
BACKGROUNDS = ("white", "grey", "beige", "striped", "dotted", "gradient", "checkered")
_PLAIN = {"white": (250, 250, 250), "grey": (195, 195, 195), "beige": (236, 222, 188)}
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.22, 0.5), "right": (0.78, 0.5), "top": (0.5, 0.22), "bottom": (0.5, 0.78), "centre": (0.5, 0.5)}
_POS_PHRASE = {"left": "on the left", "right": "on the right", "top": "near the top", "bottom": "at the bottom",
               "centre": "in the centre"}
_RADIUS = {"small": 0.10, "large": 0.16}  # fraction of the image side
_COUNT_WORD = {1: "one", 2: "two", 3: "three"}
SPLIT_FRACTIONS = {"val": 0.15, "test": 0.15}  # the rest is train


@dataclass(frozen=True)
class Obj:
    colour: str
    shape: str
    size: str
    position: str

    @property
    def label(self) -> str:
        return f"{self.colour} {self.shape}"

    def phrase(self, with_size: bool = False) -> str:
        words = f"{self.size + ' ' if with_size else ''}{self.colour} {self.shape}"
        return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str


# --------------------------------------------------------------------------------------------
# sampling
# --------------------------------------------------------------------------------------------
def sample_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.choice([1, 2, 3], p=[0.4, 0.4, 0.2]))
    # One object may sit in the centre; several take distinct edge places so they never overlap.
    places = list(POSITIONS) if n == 1 else ["left", "right", "top", "bottom"]
    pos = rng.choice(places, size=n, replace=False)
    objs: list[Obj] = []
    labels: set[str] = set()
    while len(objs) < n:
        o = Obj(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES)), str(rng.choice(["small", "large"])),
                str(pos[len(objs)]))
        if o.label not in labels:  # an image's labels form a set: no two identical objects
            labels.add(o.label)
            objs.append(o)
    return Scene(tuple(objs), str(rng.choice(BACKGROUNDS)))


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------
def _background(name: str, side: int, rng: np.random.Generator) -> Image.Image:
    if name in _PLAIN:
        return Image.new("RGB", (side, side), _PLAIN[name])
    img = Image.new("RGB", (side, side), (248, 248, 248))
    d = ImageDraw.Draw(img)
    tone = (200, 200, 205)
    step = side // int(rng.integers(6, 10))
    if name == "striped":
        w = max(2, step // 3)
        for k in range(-side, 2 * side, step):  # diagonal stripes
            d.line([(k, 0), (k + side, side)], fill=tone, width=w)
    elif name == "dotted":
        r = max(2, step // 7)
        for y in range(step // 2, side, step):
            for x in range(step // 2, side, step):
                d.ellipse([x - r, y - r, x + r, y + r], fill=tone)
    elif name == "checkered":
        for y in range(0, side, step):
            for x in range(0, side, step):
                if (x // step + y // step) % 2:
                    d.rectangle([x, y, x + step - 1, y + step - 1], fill=(222, 222, 226))
    elif name == "gradient":
        top, bottom = np.array([170, 205, 240], np.float32), np.array([250, 250, 250], np.float32)
        t = np.linspace(0.0, 1.0, side, dtype=np.float32)[:, None, None]
        arr = (top * (1 - t) + bottom * t).repeat(side, axis=1)
        img = Image.fromarray(np.rint(arr).astype(np.uint8), "RGB")
    else:
        raise ValueError(f"unknown background {name!r}")
    return img


def _polygon(cx: float, cy: float, r: float, n: int, start_deg: float = -90.0) -> list[tuple[float, float]]:
    return [(cx + r * math.cos(math.radians(start_deg + 360.0 * k / n)),
             cy + r * math.sin(math.radians(start_deg + 360.0 * k / n))) for k in range(n)]


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill: tuple[int, int, int]) -> None:
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "ring":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fill, width=max(2, int(0.33 * r)))
    elif shape == "square":
        h = 0.85 * r
        d.rectangle([cx - h, cy - h, cx + h, cy + h], fill=fill)
    elif shape == "triangle":
        d.polygon(_polygon(cx, cy + 0.15 * r, 1.1 * r, 3), fill=fill)
    elif shape == "diamond":
        d.polygon(_polygon(cx, cy, r, 4), fill=fill)
    elif shape == "hexagon":
        d.polygon(_polygon(cx, cy, r, 6, start_deg=0.0), fill=fill)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            a = math.radians(-90.0 + 36.0 * k)
            pts.append((cx + rad * math.cos(a), cy + 0.08 * r + rad * math.sin(a)))
        d.polygon(pts, fill=fill)
    elif shape == "cross":
        a = 0.3 * r
        d.rectangle([cx - r, cy - a, cx + r, cy + a], fill=fill)
        d.rectangle([cx - a, cy - r, cx + a, cy + r], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


def render_scene(scene: Scene, size: int, rng: np.random.Generator) -> Image.Image:
    """Draw at 2× and box-downsample (anti-aliased edges); small jitter in place, size and colour."""
    side = 2 * size
    img = _background(scene.background, side, rng)
    d = ImageDraw.Draw(img)
    for o in scene.objects:
        fx, fy = POSITIONS[o.position]
        jx, jy = rng.uniform(-0.03, 0.03, size=2)
        r = _RADIUS[o.size] * float(rng.uniform(0.92, 1.08)) * side
        base = np.array(COLOURS[o.colour])
        fill = tuple(int(v) for v in np.clip(base + rng.integers(-12, 13, size=3), 0, 255))
        _draw_shape(d, o.shape, (fx + jx) * side, (fy + jy) * side, r, fill)
    return img.reduce(2)


# --------------------------------------------------------------------------------------------
# captions
# --------------------------------------------------------------------------------------------
def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _bg(scene: Scene) -> str:
    return f"a {scene.background} background"


def _relation(a: Obj, b: Obj) -> str | None:
    pair = (a.position, b.position)
    words = {("left", "right"): "to the left of", ("right", "left"): "to the right of",
             ("top", "bottom"): "above", ("bottom", "top"): "below"}
    return f"{a.phrase()} {words[pair]} {b.phrase()}" if pair in words else None


def _t_positions(s: Scene, objs: list[Obj]) -> str:
    return _join([f"{o.phrase(True)} {_POS_PHRASE[o.position]}" for o in objs])


def _t_count(s: Scene, objs: list[Obj]) -> str:
    n = len(objs)
    return f"{_COUNT_WORD[n]} object{'s' if n > 1 else ''}: {_join([o.phrase() for o in objs])}"


def _t_there_is(s: Scene, objs: list[Obj]) -> str:
    return f"there is {_join([f'{o.phrase(True)} {_POS_PHRASE[o.position]}' for o in objs])} on {_bg(s)}"


def _t_relation(s: Scene, objs: list[Obj]) -> str:
    for i, a in enumerate(objs):
        for b in objs[i + 1:]:
            rel = _relation(a, b)
            if rel:
                rest = [o.phrase() for o in objs if o is not a and o is not b]
                return rel + (f" with {_join(rest)}" if rest else "")
    if len(objs) == 1:
        return f"{objs[0].phrase()} alone {_POS_PHRASE[objs[0].position]}"
    return f"{_join([o.phrase() for o in objs])} placed apart"


def _t_picture(s: Scene, objs: list[Obj]) -> str:
    return f"a picture of {_join([o.phrase() for o in objs])}"


def _t_background_first(s: Scene, objs: list[Obj]) -> str:
    return f"{_bg(s)} with {_join([o.phrase(True) for o in objs])}"


def _t_showing(s: Scene, objs: list[Obj]) -> str:
    return f"an image showing {_join([o.phrase() for o in objs])}, with {_bg(s)}"


def _t_the_is(s: Scene, objs: list[Obj]) -> str:
    return _join([f"the {o.shape} {_POS_PHRASE[o.position]} is {o.colour}" for o in objs])


def _t_on_bg(s: Scene, objs: list[Obj]) -> str:
    return f"{_join([o.phrase() for o in objs])} on {_bg(s)}"


def _t_drawing(s: Scene, objs: list[Obj]) -> str:
    n = len(objs)
    sizes = _join([f"{o.size} {o.colour} {o.shape}" for o in objs])
    return f"a simple drawing of {_COUNT_WORD[n]} shape{'s' if n > 1 else ''}: {sizes}"


TEMPLATES: tuple[Callable[[Scene, list[Obj]], str], ...] = (
    _t_positions, _t_count, _t_there_is, _t_relation, _t_picture, _t_background_first, _t_showing,
    _t_the_is, _t_on_bg, _t_drawing)


def captions_for(scene: Scene, k: int, rng: np.random.Generator) -> list[str]:
    """``k`` captions from distinct templates (repeating only when ``k`` > number of templates)."""
    picks = rng.choice(len(TEMPLATES), size=k, replace=k > len(TEMPLATES))
    out = []
    for t in picks:
        objs = [scene.objects[i] for i in rng.permutation(len(scene.objects))]  # vary the mention order
        out.append(TEMPLATES[int(t)](scene, objs))
    return out


# --------------------------------------------------------------------------------------------
# the data set
# --------------------------------------------------------------------------------------------
def split_names(n: int, rng: np.random.Generator) -> list[str]:
    """Deterministic 70/15/15 train/val/test assignment (each split non-empty when ``n`` ≥ 3)."""
    n_val = max(1, round(SPLIT_FRACTIONS["val"] * n)) if n >= 3 else 0
    n_test = max(1, round(SPLIT_FRACTIONS["test"] * n)) if n >= 3 else 0
    names = np.array(["train"] * n, dtype=object)
    order = rng.permutation(n)
    names[order[:n_val]] = "val"
    names[order[n_val:n_val + n_test]] = "test"
    return [str(s) for s in names]


def write_dataset_json(ds: Dataset, folder: str | os.PathLike) -> Path:
    """``folder/dataset.json`` (atomic) with ``image_root`` "." so the folder can be moved."""
    folder = Path(folder)
    data = ds.to_json(folder)
    data["image_root"] = "."
    path = folder / "dataset.json"
    atomic_write_json(path, data)
    return path


def make_synthetic(out_dir: str | os.PathLike, n_images: int = 600, captions_per_image: int = 5, seed: int = 0,
                   size: int = 224, progress: bool | None = None) -> Dataset:
    """Render ``n_images`` scenes into ``out_dir/images/`` and write ``out_dir/dataset.json``.

    ``dataset.json`` is written last (atomically), so a folder holding it is complete.
    """
    if n_images < 1 or captions_per_image < 1 or size < 16:
        raise ValueError("need n_images ≥ 1, captions_per_image ≥ 1 and size ≥ 16")
    out = Path(out_dir).resolve()
    img_dir = out / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    splits = split_names(n_images, rng)
    width = max(5, len(str(n_images - 1)))
    recs = []
    for i in tqdm(range(n_images), desc="rendering scenes", unit="img",
                  disable=None if progress is None else not progress, leave=False):
        scene = sample_scene(rng)
        img = render_scene(scene, size, rng)
        iid = f"syn{i:0{width}d}"
        path = img_dir / f"{iid}.png"
        img.save(path, format="PNG", compress_level=3)
        caps = [Caption(f"{iid}#{k}", t) for k, t in enumerate(captions_for(scene, captions_per_image, rng))]
        recs.append(ImageRecord(iid, path, caps, split=splits[i], labels=[o.label for o in scene.objects]))
    ds = Dataset(recs, name="synthetic")
    write_dataset_json(ds, out)
    return ds


def synthetic_positives(dataset: Dataset) -> dict[str, set[str]]:
    """``{image id: ids of images with the same label set}``; each set includes the image itself."""
    groups: dict[tuple[str, ...], set[str]] = {}
    keys = {}
    for r in dataset.records:
        if not r.labels:
            raise DataError(f"image '{r.id}' of dataset '{dataset.name}' has no labels (not a synthetic set?)")
        key = tuple(sorted(set(r.labels)))
        keys[r.id] = key
        groups.setdefault(key, set()).add(r.id)
    return {iid: set(groups[k]) for iid, k in keys.items()}
