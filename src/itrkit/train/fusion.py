"""Import shim: fusion matchers train through the one loop (``itrkit.train.tasks.FusionTask``)."""

from __future__ import annotations

from typing import Any

from itrkit.eval import fusion as _ev
from itrkit.models import io as _io
from itrkit.models import registry as _reg
from itrkit.train.config import TrainConfig, load_train_config
from itrkit.train.config import resolve_config as resolve_fusion_config  # noqa: F401
from itrkit.train.trainer import Trainer as FusionTrainer  # noqa: F401
from itrkit.train.trainer import train

FusionSplit, evaluate_fusion_runs, load_scores, run_scores = _ev.FusionSplit, _ev.evaluate_fusion_runs, _ev.load_scores, _ev.run_scores
save_scores, split_metrics, split_scores = _ev.save_scores, _ev.split_metrics, _ev.split_scores
load_fusion_model, save_fusion_model = _io.load_fusion_model, _io.save_fusion_model
build_fusion_model, register_fusion_model = _reg.build_fusion_model, _reg.register_fusion_model


def load_fusion_config(path: Any = None, overrides: list[str] | None = None) -> TrainConfig:
    """``load_train_config`` with the fusion trainer's old default model (``sgr``)."""
    given = any(o.startswith("model.name=") for o in overrides or [])
    return load_train_config(path, list(overrides or []) if path or given else ["model.name=sgr", *(overrides or [])])


def train_fusion(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """``itrkit.train.trainer.train`` (one loop for every family)."""
    return train(cfg, resume=resume, progress=progress)
