"""``--format onnx``: ``image_encoder.onnx`` and ``text_encoder.onnx`` (tower + trunk + head).

Graphs (opset 17, TorchScript exporter: no onnxscript needed), both with a dynamic batch axis and
an L2-normalised ``embeddings`` output ``[B, D]``:

- ``image_encoder.onnx``: ``pixel_values`` float32 ``[B, 3, S, S]``, preprocessed as
  ``preprocess.json``'s ``image`` entry says (itrkit's :func:`itrkit.data.images.preprocess`:
  bicubic shorter-side resize to S, centre crop, ``(x/255 − mean)/std`` or, for ``scale: byte``,
  ``(x − mean)/std`` on 0–255 values, channels first);
- ``text_encoder.onnx``: ``input_ids`` and ``attention_mask`` int64 ``[B, L]`` (dynamic L) from
  the Hugging Face tokenizer saved in ``tokenizer/`` (strip the caption, lower-case it when
  ``preprocess.json`` says so, truncate to ``max_length``).

Text towers must take token ids from a Hugging Face tokenizer (``minilm``, ``st:``, ``hf:``,
``clip:``); ``tiny-text`` (a hashing tokenizer in Python) and ``gru:``/``lstm:`` (packed
variable-length sequences) stop with a one-line error.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from itrkit.export.common import ExportError, ImageEncoder, RunInfo, TextEncoder, check_head, tower_name
from itrkit.utils.io import atomic_write_json

ONNX_TEXT_TOWERS = ("minilm", "st", "hf", "clip")
OPSET = 17


def check(info: RunInfo, head: str) -> None:
    check_head(info.model, head, str(info.path))
    name = tower_name(info.model, "text")
    if name not in ONNX_TEXT_TOWERS:
        why = "its tokenizer is Python code, not a tokenizer file" if name == "tiny-text" else \
            "packed variable-length RNN sequences do not trace to ONNX"
        raise ExportError(f"{info.path}: text tower '{name}' cannot be expressed as an ONNX graph ({why}); "
                          f"ONNX export needs a Hugging Face tokenizer tower ({', '.join(ONNX_TEXT_TOWERS)}); "
                          "use --format hf")
    try:
        import onnx  # noqa: F401  (torch.onnx.export writes through it)
    except ImportError:
        raise ExportError("--format onnx needs the onnx package: pip install 'itrkit[export]'") from None


def image_preprocessing(tower: nn.Module) -> dict[str, Any]:
    """How raw images become ``pixel_values`` for this tower (the arguments of ``preprocess``)."""
    settings = getattr(tower, "settings", None)  # clip:, hf-vision:
    if isinstance(settings, dict):
        s = dict(settings)
    else:
        name = str(tower.spec.get("name", ""))
        if name.startswith("efficientnet-lite"):
            from itrkit.models.efficientnet import MEAN, STD

            s = {"size": int(tower.image_size), "mean": MEAN, "std": STD, "scale": "byte", "resize": "shorter"}
        elif name == "tiny-image":
            s = {"size": int(tower.image_size), "mean": (0.5,) * 3, "std": (0.5,) * 3, "scale": "unit",
                 "resize": "shorter"}
        else:
            raise ExportError(f"image tower '{name}': unknown preprocessing, cannot export it to ONNX")
    return {"size": int(s["size"]), "mean": [float(v) for v in s["mean"]], "std": [float(v) for v in s["std"]],
            "scale": s["scale"], "resize": s["resize"], "crop": "center" if s["resize"] == "shorter" else "none",
            "resample": "bicubic", "layout": "NCHW", "dtype": "float32"}


def _export(module: nn.Module, args: tuple, path: Path, names: list[str], what: str) -> None:
    axes: dict[str, dict[int, str]] = {n: {0: "batch"} for n in names}
    if "input_ids" in names:
        axes = {n: {0: "batch", 1: "sequence"} for n in names}
    axes["embeddings"] = {0: "batch"}
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about python-side branches on shapes
            torch.onnx.export(module.eval(), args, str(path), dynamo=False, input_names=names,
                              output_names=["embeddings"], dynamic_axes=axes, opset_version=OPSET)
    except Exception as e:  # noqa: BLE001 - an operator ONNX lacks: one line naming the tower
        first = (str(e).strip().splitlines() or [e.__class__.__name__])[0][:200]
        raise ExportError(f"{what}: cannot be expressed as an ONNX graph ({first})") from None


def export(info: RunInfo, out: Path, head: str, name: str) -> dict[str, Any]:
    """Write the export into ``out`` (a temporary folder renamed to ``name`` afterwards); card details."""
    model = info.model.float().eval()
    img_tower, txt_tower = model.image_tower, model.text_tower
    pre_img = image_preprocessing(img_tower)
    size = pre_img["size"]
    _export(ImageEncoder(model, head), (torch.zeros(2, 3, size, size),), out / "image_encoder.onnx",
            ["pixel_values"], f"image tower '{tower_name(model, 'image')}'")
    enc = txt_tower.prepare(["a photo of a dog", "two cats"])
    _export(TextEncoder(model, head), (enc["input_ids"], enc["attention_mask"]), out / "text_encoder.onnx",
            ["input_ids", "attention_mask"], f"text tower '{tower_name(model, 'text')}'")
    txt_tower.tokenizer.save_pretrained(str(out / "tokenizer"))
    pre_txt = {"tokenizer": "tokenizer", "max_length": int(txt_tower.max_length),
               "lowercase": bool(getattr(txt_tower, "lowercase", False)), "strip": True,
               "padding": True, "truncation": True}
    dim = int(model.config.embed_dim if head == "cross" else model.config.usa_dim)
    atomic_write_json(out / "preprocess.json", {"image": pre_img, "text": pre_txt, "head": head, "embed_dim": dim,
                                                "opset": OPSET})
    low = ".lower()" if pre_txt["lowercase"] else ""
    return {
        "what": f"ONNX image and text encoders ({tower_name(model, 'image')} + {tower_name(model, 'text')} towers, "
                f"trunk, {head} head), {dim}-d L2-normalised embeddings",
        "usage": ("```python\nimport json, numpy as np, onnxruntime as ort\n"
                  "from PIL import Image\nfrom transformers import AutoTokenizer\n\n"
                  f"pre = json.load(open(\"{name}/preprocess.json\"))\n"
                  f"tok = AutoTokenizer.from_pretrained(\"{name}/tokenizer\")\n"
                  f"text = ort.InferenceSession(\"{name}/text_encoder.onnx\")\n"
                  f"enc = tok([t.strip(){low} for t in texts], padding=True, truncation=True, "
                  "max_length=pre[\"text\"][\"max_length\"], return_tensors=\"np\")\n"
                  "txt = text.run(None, {\"input_ids\": enc[\"input_ids\"], "
                  "\"attention_mask\": enc[\"attention_mask\"]})[0]\n"
                  f"image = ort.InferenceSession(\"{name}/image_encoder.onnx\")\n"
                  "img = image.run(None, {\"pixel_values\": pixels})[0]  # pixels: float32 [B, 3, S, S], see below\n"
                  "```"),
        "notes": [f"Images: resize the shorter side to {size} px (bicubic), centre-crop {size}×{size}, "
                  + ("then (x − mean)/std on 0–255 values" if pre_img["scale"] == "byte" else "x/255, then (x − mean)/std")
                  + f" with mean {pre_img['mean']}, std {pre_img['std']}, channels first "
                  "(`preprocess.json`; itrkit's `itrkit.data.images.preprocess` does exactly this).",
                  "Texts: the tokenizer in `tokenizer/`; the graph takes `input_ids` and `attention_mask`."],
    }
