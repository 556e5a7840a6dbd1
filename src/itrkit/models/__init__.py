"""Dual encoders, their towers, and model persistence."""

from itrkit.models.dual_encoder import DualEncoder, ModelConfig, build_model
from itrkit.models.io import load_model, save_model

__all__ = ["DualEncoder", "ModelConfig", "build_model", "load_model", "save_model"]
