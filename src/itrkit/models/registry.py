"""The model registry (timm style): every fusion matcher by name, with its options dataclass.

``model.name`` in a training config picks the family: ``dual_encoder`` (towers from
:func:`itrkit.models.towers.build_tower`, see :data:`itrkit.models.towers.TOWERS`) or one of the
fusion matchers below. A new fusion model is one file under ``itrkit/models`` plus one
:func:`register_fusion_model` call; the contract test (``tests/models/test_registry.py``) then
checks it like every other entry.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
from dataclasses import dataclass, field
from typing import Any

from itrkit.errors import ConfigError


@dataclass
class FusionEntry:
    options: str  # "module:OptionsDataclass"
    builder: str  # "module:callable(**options) -> FusionMatcher"
    # Training defaults of the family (merged under the user's config): loss weights, clipping.
    defaults: dict[str, Any] = field(default_factory=dict)
    description: str = ""


_FUSION_TRIPLET = {"loss": {"contrastive": 0.0, "triplet": 1.0}, "grad_clip": 2.0}
FUSION_MODELS: dict[str, FusionEntry] = {
    "sgr": FusionEntry("itrkit.models.sgraf:SGRAFOptions", "itrkit.models.sgraf:SGR", _FUSION_TRIPLET,
                       "SGRAF's similarity graph reasoning (Diao et al. 2021)"),
    "saf": FusionEntry("itrkit.models.sgraf:SGRAFOptions", "itrkit.models.sgraf:SAF", _FUSION_TRIPLET,
                       "SGRAF's similarity attention filtration"),
    "rerank": FusionEntry("itrkit.models.rerank:ReRankerOptions", "itrkit.models.rerank:ReRanker",
                          {"loss": {"contrastive": 1.0, "itm": 1.0, "tau_teacher": 0.1}, "grad_clip": 2.0},
                          "dual encoder + cross-attention ITM re-ranker (ALBEF / X2VLM)"),
}


def _resolve(ref: str) -> Any:
    mod, attr = ref.split(":")
    return getattr(importlib.import_module(mod), attr)


def register_fusion_model(name: str, options: str, builder: str, defaults: dict[str, Any] | None = None,
                          description: str = "") -> None:
    """Make ``model.name: <name>`` available to training, evaluation and model folders."""
    FUSION_MODELS[name] = FusionEntry(options, builder, dict(defaults or {}), description)


def list_fusion_models() -> list[str]:
    return sorted(FUSION_MODELS)


def is_fusion_model(name: Any) -> bool:
    return isinstance(name, str) and name in FUSION_MODELS


def _entry(name: str) -> FusionEntry:
    if name not in FUSION_MODELS:
        raise ConfigError(f"model.name '{name}' is not a fusion model (known: {', '.join(list_fusion_models())})")
    return FUSION_MODELS[name]


def fusion_options_class(name: str) -> type:
    """The options dataclass of fusion model ``name`` (SGR and SAF share one; set its ``name``)."""
    return _resolve(_entry(name).options)


def fusion_defaults(name: str) -> dict[str, Any]:
    return copy.deepcopy(_entry(name).defaults)


def build_fusion_model(options: Any) -> Any:
    """Options dataclass (or ``{"name": ..., **options}``) → a FusionMatcher (weights drawn from the
    global torch RNG, so the run's seed decides them)."""
    from itrkit.models.fusion_base import FusionMatcher

    spec = dataclasses.asdict(options) if dataclasses.is_dataclass(options) else dict(options)
    name = spec.get("name")
    model = _resolve(_entry(name).builder)(**spec)
    if not isinstance(model, FusionMatcher):
        raise ConfigError(f"fusion model '{name}' built a {type(model).__name__}, not a FusionMatcher")
    return model
