"""Import shim: fusion matchers train through the one loop (:mod:`itrkit.train.trainer`, task
:class:`itrkit.train.tasks.FusionTask`) and are evaluated by :mod:`itrkit.eval.fusion`."""

from __future__ import annotations

from typing import Any

from itrkit.eval.fusion import (  # noqa: F401  # noqa: F401
    FusionSplit,
    evaluate_fusion_runs,
    load_scores,
    run_scores,
    save_scores,
    split_metrics,
    split_scores,
)
from itrkit.models.io import load_fusion_model, save_fusion_model  # noqa: F401
from itrkit.models.registry import build_fusion_model, register_fusion_model  # noqa: F401
from itrkit.train.config import TrainConfig, load_train_config
from itrkit.train.config import resolve_config as resolve_fusion_config  # noqa: F401
from itrkit.train.trainer import Trainer as FusionTrainer  # noqa: F401
from itrkit.train.trainer import train


def load_fusion_config(path: Any = None, overrides: list[str] | None = None) -> TrainConfig:
    """``load_train_config`` with the fusion trainer's old default model (``sgr``)."""
    given = any(o.startswith("model.name=") for o in overrides or [])
    return load_train_config(path, list(overrides or []) if path or given else ["model.name=sgr", *(overrides or [])])


def train_fusion(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """``itrkit.train.trainer.train`` (one loop for every family)."""
    return train(cfg, resume=resume, progress=progress)
