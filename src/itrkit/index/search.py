"""Query an index: text → images (cross head), image → images (USA head), image → captions (cross head).

Every search returns a list of result dicts, best first::

    {"id": image id, "score": cosine, "url": "/images/<id>", "captions": [...], "path": str}

Caption results (``search_image(..., mode="caption")``) also carry ``caption_id`` and ``text``, the
matched caption. ``path`` is for local use (CLI); the web service drops it.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from itrkit.errors import DataError, StoreError
from itrkit.index.build import Encoder, IndexReader

try:  # the project's decoder: alpha on white, 16-bit greyscale scaled (itrkit.data.images)
    from itrkit.data.images import to_rgb as _to_rgb
except ModuleNotFoundError as err:  # pragma: no cover - only while that module is absent
    if not (err.name or "").startswith("itrkit"):
        raise

    def _to_rgb(img: Image.Image) -> Image.Image:
        return img.convert("RGB")

MAX_QUERY_CHARS = 500
# Larger than any real photo a person uploads, small enough that decoding cannot exhaust memory.
MAX_PIXELS = 40_000_000


class QueryError(DataError):
    """A query the index cannot answer: empty or too long text, bad k, an upload that is no image."""


class NotAnImageError(QueryError):
    """Bytes or a file that do not decode as an image."""


class ImageTooLargeError(QueryError):
    """An image with more pixels than :data:`MAX_PIXELS` (a decompression bomb included)."""


def image_url(image_id: str) -> str:
    return f"/images/{quote(image_id, safe='/')}"


def check_text(text: Any) -> str:
    if not isinstance(text, str) or not text.strip():
        raise QueryError("empty query: type some words to search for")
    if len(text) > MAX_QUERY_CHARS:
        raise QueryError(f"query too long: {len(text)} characters (at most {MAX_QUERY_CHARS})")
    return text.strip()


def check_k(k: Any, max_k: int | None = None) -> int:
    try:
        k_int = int(k)
    except (TypeError, ValueError):
        raise QueryError(f"k must be an integer, got {k!r}") from None
    if k_int < 1 or (max_k is not None and k_int > max_k):
        raise QueryError(f"k must be between 1 and {max_k if max_k is not None else 'the index size'}, got {k_int}")
    return k_int


def _decode(fh: Any, name: str, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():
        # Pillow only warns about moderate decompression bombs; make that an error too.
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img_cm = Image.open(fh)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            # Pillow's own check, from the header, for images far above any sane size.
            raise ImageTooLargeError(f"{name}: image is too large: more than {Image.MAX_IMAGE_PIXELS} pixels "
                                     f"(a decompression bomb; at most {max_pixels} pixels)") from None
        with img_cm as img:
            w, h = img.size  # from the header, before any pixel is decoded
            if w * h > max_pixels:
                raise ImageTooLargeError(f"{name}: image of {w}x{h} pixels is too large "
                                         f"(at most {max_pixels} pixels)")
            img.load()
            img = ImageOps.exif_transpose(img) or img
            return _to_rgb(img).copy()


def open_image(source: str | Path | bytes | Image.Image, name: str = "upload",
               max_pixels: int | None = None) -> Image.Image:
    """Decode an image (a path, raw bytes or a PIL image) to RGB; anything else is a :class:`QueryError`.

    The pixel count is checked from the header before anything is decoded: at most ``max_pixels``
    (default :data:`MAX_PIXELS`), so a few-kilobyte PNG that would decode to gigapixels is refused
    with :class:`ImageTooLargeError` without allocating its pixels.
    """
    if isinstance(source, Image.Image):
        return _to_rgb(source)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise NotAnImageError(f"image not found: {path}")
        name, fh = str(path), path
    else:
        fh = io.BytesIO(source)
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    try:
        return _decode(fh, name, limit)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):  # raised while decoding frames
        raise ImageTooLargeError(f"{name}: image is too large (a decompression bomb; at most {limit} pixels)") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
        raise NotAnImageError(f"{name}: not a readable image ({e.__class__.__name__})") from None


def _one_row(out: np.ndarray | None, what: str) -> np.ndarray:
    if out is None:
        raise StoreError(f"the query encoder has no {what}")
    out = np.asarray(out, dtype=np.float32)
    if out.ndim != 2 or len(out) != 1 or not np.isfinite(out).all():
        raise StoreError(f"the query encoder returned an invalid {what} of shape {tuple(out.shape)}")
    return out


def _image_results(index: IndexReader, scores: np.ndarray, rows: np.ndarray) -> list[dict]:
    out = []
    for s, i in zip(scores.tolist(), rows.tolist()):
        image_id = index.image_ids[i]
        out.append({"id": image_id, "score": float(s), "url": image_url(image_id),
                    "captions": [c.text for c in index.captions[i]], "path": str(index.image_paths[i])})
    return out


def search_text(index: IndexReader, encoder: Encoder, text: str, k: int = 10) -> list[dict]:
    """Images whose cross-head embedding best matches the caption ``text``."""
    text = check_text(text)
    k = check_k(k)
    index.check_encoder(encoder)
    q = _one_row(encoder.encode_texts([text]), "text embedding")
    scores, rows = index.image_index.search(q, k)
    return _image_results(index, scores[0], rows[0])


def search_image(index: IndexReader, encoder: Encoder, path_or_pil: str | Path | bytes | Image.Image,
                 k: int = 10, mode: str = "image", max_pixels: int | None = None) -> list[dict]:
    """``mode="image"``: similar images via the USA head; ``mode="caption"``: captions via the cross head."""
    if mode not in ("image", "caption"):
        raise QueryError(f"unknown image search mode '{mode}' (use image or caption)")
    k = check_k(k)
    img = open_image(path_or_pil, max_pixels=max_pixels)
    index.check_encoder(encoder)
    if mode == "image":
        if not index.has_uni:
            raise QueryError(f"{index.folder}: the model has no USA head, so image→image search is not "
                             "available (use mode 'caption')")
        q = _one_row(encoder.encode_images_uni([img]), "USA image embedding")
        scores, rows = index.image_uni_index.search(q, k)  # type: ignore[union-attr]
        return _image_results(index, scores[0], rows[0])
    if not index.caption_list:
        raise QueryError(f"{index.folder}: the index holds no captions (it was built from a plain image folder)")
    q = _one_row(encoder.encode_images([img]), "image embedding")
    scores, rows = index.caption_index.search(q, k)
    out = []
    for s, j in zip(scores[0].tolist(), rows[0].tolist()):
        cap = index.caption_list[j]
        i = int(index.caption_image[j])
        image_id = index.image_ids[i]
        out.append({"id": image_id, "score": float(s), "url": image_url(image_id), "captions": [cap.text],
                    "caption_id": cap.id, "text": cap.text, "path": str(index.image_paths[i])})
    return out


def format_results(results: list[dict], fmt: str = "table") -> str:
    """``json``: ``{"results": [...]}`` as the web API returns it (plus paths); ``table``: one line per hit."""
    if fmt == "json":
        return json.dumps({"results": results}, indent=2, ensure_ascii=False)
    if fmt != "table":
        raise QueryError(f"unknown output format '{fmt}' (use table or json)")
    if not results:
        return "no results"
    id_w = min(max(len("id"), *(len(r["id"]) for r in results)), 40)
    lines = [f"{'rank':>4}  {'score':>7}  {'id':<{id_w}}  caption"]
    for rank, r in enumerate(results, 1):
        caption = r.get("text") or (r["captions"][0] if r["captions"] else "")
        if len(caption) > 70:
            caption = caption[:67] + "..."
        lines.append(f"{rank:>4}  {r['score']:>7.4f}  {r['id']:<{id_w}}  {caption}")
    return "\n".join(lines)
