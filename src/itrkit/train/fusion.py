"""Import shim: fusion matchers train through the one loop (:mod:`itrkit.train.trainer`, task
:class:`itrkit.train.tasks.FusionTask`) and are evaluated by :mod:`itrkit.eval.fusion`."""

from __future__ import annotations

from typing import Any

from itrkit.eval.fusion import FusionSplit, evaluate_fusion_runs, run_scores, split_metrics, split_scores  # noqa: F401
from itrkit.models.io import load_fusion_model, save_fusion_model  # noqa: F401
from itrkit.models.registry import build_fusion_model, register_fusion_model  # noqa: F401
from itrkit.train.config import TrainConfig, load_train_config
from itrkit.train.trainer import Trainer, train

load_fusion_config = load_train_config
FusionTrainer = Trainer


def train_fusion(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """``itrkit.train.trainer.train`` (one loop for every family)."""
    return train(cfg, resume=resume, progress=progress)
