"""What every export format shares: finding the run, picking the head, the encoder modules."""

from __future__ import annotations

import importlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from itrkit.errors import ConfigError
from itrkit.models.dual_encoder import DualEncoder

FORMATS = ("sentence-transformers", "hf", "onnx")
HEADS = ("cross", "usa")
_MODULES = {"sentence-transformers": "itrkit.export.st", "hf": "itrkit.export.hf",
            "onnx": "itrkit.export.onnx_export"}


class ExportError(ConfigError):
    """A run that cannot be expressed in the asked export format (one line: which tower, what works)."""


@dataclass
class RunInfo:
    """A loaded run: the model plus what the model card tells about it."""

    path: Path  # what the user named
    model_dir: Path  # the folder holding model.json
    run_dir: Path | None  # the run folder (config.yaml, metrics.json), when there is one
    model: DualEncoder
    model_meta: dict[str, Any]
    config: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)


def load_run(path: str | os.PathLike) -> RunInfo:
    """A run folder (``model/`` inside) or a model folder → :class:`RunInfo`."""
    from itrkit.models.io import load_model

    path = Path(path)
    model = load_model(path)  # raises CheckpointError naming the folder when there is no model
    model_dir = path if (path / "model.json").is_file() else path / "model"
    run_dir: Path | None = None
    for cand in (path, model_dir.parent):
        if (cand / "config.yaml").is_file() or (cand / "metrics.json").is_file():
            run_dir = cand
            break
    meta = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))
    info = RunInfo(path=path, model_dir=model_dir, run_dir=run_dir, model=model, model_meta=meta)
    if run_dir is not None:
        if (run_dir / "config.yaml").is_file():
            import yaml

            try:
                info.config = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8")) or {}
            except yaml.YAMLError:
                info.config = {}  # the card then says less; the export itself does not need it
        if (run_dir / "metrics.json").is_file():
            try:
                info.metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError):
                info.metrics = {}
    return info


def check_head(model: DualEncoder, head: str, where: str) -> None:
    if head not in HEADS:
        raise ExportError(f"--head: unknown head '{head}' (use {' or '.join(HEADS)})")
    if head == "usa" and not model.has_usa:
        raise ExportError(f"{where}: --head usa needs a model with USA heads (trained with model.usa_heads=true)")


def tower_name(model: DualEncoder, modality: str) -> str:
    tower = model.image_tower if modality == "image" else model.text_tower
    return str(tower.spec.get("name", type(tower).__name__))


def head_modules(model: DualEncoder, modality: str, head: str) -> tuple[nn.Module, nn.Module]:
    """(trunk, head) of one side: the modules applied to the tower's pooled feature."""
    if modality == "image":
        return model.image_trunk, model.image_head if head == "cross" else model.image_usa  # type: ignore[return-value]
    return model.text_trunk, model.text_head if head == "cross" else model.text_usa  # type: ignore[return-value]


class ImageEncoder(nn.Module):
    """Preprocessed pixels ``[B, 3, H, W]`` → L2-normalised embeddings (tower + trunk + head)."""

    def __init__(self, model: DualEncoder, head: str = "cross") -> None:
        super().__init__()
        self.tower = model.image_tower
        self.trunk, self.head = head_modules(model, "image", head)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(self.trunk(self.tower(pixel_values))), dim=-1)


class TextEncoder(nn.Module):
    """Token ids + attention mask ``[B, L]`` → L2-normalised embeddings (tower + trunk + head)."""

    def __init__(self, model: DualEncoder, head: str = "cross") -> None:
        super().__init__()
        self.tower = model.text_tower
        self.trunk, self.head = head_modules(model, "text", head)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        feats = self.tower({"input_ids": input_ids, "attention_mask": attention_mask})
        return F.normalize(self.head(self.trunk(feats)), dim=-1)


def export_run(run: str | os.PathLike, fmt: str, out: str | os.PathLike, head: str = "cross",
               overwrite: bool = False, command: str | None = None) -> Path:
    """Export ``run`` (a run or model folder) as ``fmt`` into the folder ``out``; returns ``out``.

    The folder is built under a temporary name and renamed into place, so a failed export leaves
    nothing under ``out``. ``command`` is recorded in the model card (default: the equivalent CLI line).
    """
    if fmt not in FORMATS:
        raise ExportError(f"--format: unknown format '{fmt}' (use {', '.join(FORMATS)})")
    if head not in HEADS:
        raise ExportError(f"--head: unknown head '{head}' (use {' or '.join(HEADS)})")
    out = Path(out)
    if out.exists() and not overwrite:
        raise ExportError(f"{out} already exists (use --overwrite to replace it)")
    info = load_run(run)
    if command is None:
        command = f"itrkit export {run} --format {fmt} --out {out}" + (f" --head {head}" if head != "cross" else "")
    module = importlib.import_module(_MODULES[fmt])
    module.check(info, head)  # refuse a run the format cannot express before anything is written
    from itrkit.export.card import write_model_card
    from itrkit.utils.io import atomic_dir

    with atomic_dir(out, overwrite=overwrite) as tmp:
        details = module.export(info, tmp, head, out.name)
        write_model_card(tmp, info, fmt, head, command, details)
        for root, _dirs, files in os.walk(tmp):  # some writers create 0600 files; exports are meant to be shared
            for f in files:
                os.chmod(Path(root) / f, 0o644)
    return out
