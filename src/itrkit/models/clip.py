"""Hugging Face vision-language and vision towers: ``clip:PATH`` and ``hf-vision:PATH``.

``clip:PATH`` loads a ``CLIPModel`` folder and keeps one half: the image side is
``vision_model`` + ``visual_projection`` (= ``CLIPModel.get_image_features``), the text side
``text_model`` + ``text_projection`` (= ``get_text_features``). ``hf-vision:PATH`` is any
``AutoModel`` vision backbone: its pooled output, or the mean of its last hidden state.

Images are preprocessed with Pillow + numpy from the folder's ``preprocessor_config.json``
(resize the shorter side, centre-crop, rescale 1/255, normalise); without one, CLIP's defaults
(or ImageNet's for ``hf-vision``) at the model's native size. When the resize size and the crop
size differ in the config, the crop size is used for both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from itrkit.errors import CheckpointError, ConfigError
from itrkit.models.base import Tower
from itrkit.models.hf_text import model_blocks, quiet_transformers, resolve_folder, run_from_layer
from itrkit.models.towers import images_to_tensor

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _side(v: Any) -> int | None:
    if isinstance(v, int):
        return v
    if isinstance(v, dict):
        for k in ("shortest_edge", "height", "width"):
            if isinstance(v.get(k), int):
                return int(v[k])
    return None


def image_settings(folder: Path, default_size: int, mean: tuple, std: tuple) -> dict[str, Any]:
    """Size, resize mode, mean and std from ``preprocessor_config.json`` (or the defaults)."""
    cfg: dict[str, Any] = {}
    f = folder / "preprocessor_config.json"
    if f.is_file():
        try:
            cfg = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            raise ConfigError(f"{f}: not valid JSON") from None
    size_cfg = cfg.get("size")
    crop = _side(cfg.get("crop_size")) if cfg.get("do_center_crop", "crop_size" in cfg) else None
    size = crop or _side(size_cfg) or default_size
    # {"height", "width"} without a crop means a plain resize to that size (ViT-style processors).
    squash = isinstance(size_cfg, dict) and "height" in size_cfg and crop is None
    scale = "unit" if cfg.get("do_rescale", True) else "byte"
    if cfg.get("do_normalize", True):
        m, s = tuple(cfg.get("image_mean", mean)), tuple(cfg.get("image_std", std))
    else:
        m, s = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    if scale == "unit" and abs(float(cfg.get("rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
        raise ConfigError(f"{f}: unsupported rescale_factor {cfg.get('rescale_factor')}")
    return {"size": int(size), "resize": "squash" if squash else "shorter", "scale": scale, "mean": m, "std": s}


def _load(cls_name: str, path: str, what: str) -> nn.Module:
    import transformers

    try:
        with quiet_transformers():
            return getattr(transformers, cls_name).from_pretrained(path, local_files_only=True,
                                                                     dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise CheckpointError(f"{what}: cannot load {cls_name} from {path} ({first})") from None


class CLIPTower(Tower):
    """One side of a Hugging Face ``CLIPModel``: projected ``image_embeds`` or ``text_embeds``."""

    def __init__(self, name: str = "clip", modality: str = "image", path: str | None = None,
                 image_size: int | None = None) -> None:
        super().__init__()
        if path is None:
            raise ConfigError("tower 'clip' needs a folder: use 'clip:PATH'")
        folder = resolve_folder(path, "tower clip")
        self.modality = modality
        model = _load("CLIPModel", folder, "tower clip")
        self.spec = {"name": name, "path": folder}
        if modality == "image":
            if image_size is not None:
                self.spec["image_size"] = int(image_size)
            native = int(model.config.vision_config.image_size)
            self.settings = image_settings(Path(folder), native, CLIP_MEAN, CLIP_STD)
            if image_size is not None:
                self.settings["size"] = int(image_size)
            # Other sizes than the native one need interpolated position embeddings.
            self.interpolate = self.settings["size"] != native
            self.vision_model = model.vision_model
            self.projection = model.visual_projection
        else:
            if image_size is not None:
                raise ConfigError("tower 'clip' (text): image_size applies to the image side only")
            from transformers import AutoTokenizer

            try:
                self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
            except (OSError, ValueError) as e:
                raise CheckpointError(f"tower clip: no usable tokenizer in {folder} ({e.__class__.__name__})") from None
            self.max_length = int(model.config.text_config.max_position_embeddings)
            self.text_model = model.text_model
            self.projection = model.text_projection
        self.output_dim = int(self.projection.out_features)
        self.eval()

    def prepare(self, items: list[Any]) -> Any:
        if self.modality == "image":
            s = self.settings
            return images_to_tensor(items, s["size"], s["mean"], s["std"], scale=s["scale"], resize=s["resize"])
        if not all(isinstance(t, str) for t in items):
            raise ConfigError("clip text tower: every input must be a string")
        return dict(self.tokenizer([t.strip() for t in items], padding=True, truncation=True,
                                   max_length=self.max_length, return_tensors="pt"))

    def forward(self, inputs: Any) -> torch.Tensor:
        dev = self.device
        if self.modality == "image":
            out = self.vision_model(pixel_values=inputs.to(dev), interpolate_pos_encoding=self.interpolate)
        else:
            mask = inputs.get("attention_mask")
            out = self.text_model(input_ids=inputs["input_ids"].to(dev),
                                  attention_mask=None if mask is None else mask.to(dev))
        return self.projection(out.pooler_output)

    def blocks(self) -> list[nn.Module]:
        if self.modality == "image":
            v = self.vision_model
            return [nn.ModuleList([v.embeddings, v.pre_layrnorm]), *v.encoder.layers,
                    nn.ModuleList([v.post_layernorm, self.projection])]
        t = self.text_model
        return [t.embeddings, *t.encoder.layers, nn.ModuleList([t.final_layer_norm, self.projection])]

    def prefix_layers(self) -> int:
        return len(self._side().encoder.layers)

    def _side(self) -> nn.Module:
        return self.vision_model if self.modality == "image" else self.text_model

    def prefix_states(self, inputs: Any, cut: int) -> dict[str, torch.Tensor]:
        """Token states entering encoder layer ``cut − 1`` (after the pre-LayerNorm on the image side)."""
        dev = self.device
        if self.modality == "image":
            out = self.vision_model(pixel_values=inputs.to(dev), interpolate_pos_encoding=self.interpolate,
                                    output_hidden_states=True)
            return {"hidden": out.hidden_states[cut - 1]}
        mask = inputs.get("attention_mask")
        ids = inputs["input_ids"].to(dev)
        mask = torch.ones_like(ids) if mask is None else mask.to(dev)
        out = self.text_model(input_ids=ids, attention_mask=mask, output_hidden_states=True)
        return {"hidden": out.hidden_states[cut - 1], "attention_mask": mask, "input_ids": ids}

    def forward_from(self, states: dict[str, torch.Tensor], cut: int) -> torch.Tensor:
        dev = self.device
        hidden = states["hidden"].to(dev)
        side = self._side()
        if self.modality == "image":
            v = self.vision_model
            with run_from_layer(v, [v.embeddings, v.pre_layrnorm], v.encoder.layers, cut - 1, hidden):
                out = v(pixel_values=hidden)
        else:
            with run_from_layer(side, [side.embeddings], side.encoder.layers, cut - 1, hidden):
                out = side(input_ids=states["input_ids"].to(dev).long(), attention_mask=states["attention_mask"].to(dev))
        return self.projection(out.pooler_output)


class HFVisionTower(Tower):
    """Any Hugging Face vision backbone: pooled output, else the mean of the last hidden state."""

    modality = "image"

    def __init__(self, name: str = "hf-vision", path: str | None = None, image_size: int | None = None,
                 pooling: str = "auto") -> None:
        super().__init__()
        if path is None:
            raise ConfigError("tower 'hf-vision' needs a folder: use 'hf-vision:PATH'")
        if pooling not in ("auto", "pooler", "mean"):
            raise ConfigError(f"tower hf-vision: unknown pooling '{pooling}' (use auto, pooler or mean)")
        folder = resolve_folder(path, "tower hf-vision")
        self.model = _load("AutoModel", folder, "tower hf-vision")
        mtype = getattr(self.model.config, "model_type", "")
        if mtype == "clip":
            raise ConfigError(f"{folder} is a CLIP model: use clip:{folder}")
        native = getattr(self.model.config, "image_size", None)
        native = native if isinstance(native, int) else 224
        self.settings = image_settings(Path(folder), native, IMAGENET_MEAN, IMAGENET_STD)
        if image_size is not None:
            self.settings["size"] = int(image_size)
        self.pooling = pooling
        self.spec = {"name": name, "path": folder}
        if image_size is not None:
            self.spec["image_size"] = int(image_size)
        if pooling != "auto":
            self.spec["pooling"] = pooling
        self.eval()
        with torch.inference_mode():
            size = self.settings["size"]
            self.output_dim = int(self.forward(torch.zeros(1, 3, size, size)).shape[-1])

    def prepare(self, items: list[Any]) -> torch.Tensor:
        s = self.settings
        return images_to_tensor(items, s["size"], s["mean"], s["std"], scale=s["scale"], resize=s["resize"])

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(pixel_values=inputs.to(self.device), return_dict=True)
        pooled = getattr(out, "pooler_output", None)
        if self.pooling != "mean" and pooled is not None:
            return pooled.flatten(1)
        if self.pooling == "pooler":
            raise ConfigError(f"tower hf-vision: {self.spec['path']} has no pooled output (use pooling=mean)")
        h = out.last_hidden_state
        return h.mean(dim=(2, 3)) if h.dim() == 4 else h.mean(dim=1)

    def blocks(self) -> list[nn.Module]:
        return model_blocks(self.model)
