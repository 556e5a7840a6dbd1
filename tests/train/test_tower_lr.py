"""``stages.N.tower_lr_scale``: trainable tower blocks learn at a fraction of the heads' rate."""

from __future__ import annotations

from pathlib import Path

import pytest

from itrkit.errors import ConfigError
from itrkit.train.trainer import Trainer
from tests.train.conftest import tiny_config


def _tower_ids(trainer: Trainer) -> set[int]:
    m = trainer.task.model
    return {id(p) for p in [*m.image_tower.parameters(), *m.text_tower.parameters()]}


def test_tower_blocks_get_the_scaled_rate_and_heads_the_stage_rate(synth_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path / "run", synth_dir, "model.cached_features=false", "model.image_trainable=all",
                      "model.text_trainable=all", "stages.0.epochs=1", "stages.0.schedule=constant",
                      "stages.0.tower_lr_scale=0.1", "data.max_train_images=40")
    trainer = Trainer(cfg, progress=False)
    trainer.fit()
    towers = _tower_ids(trainer)
    seen_tower = seen_head = 0
    for g in trainer.optimizer.param_groups:
        ids = {id(p) for p in g["params"]}
        if not ids:
            continue
        assert ids <= towers or not ids & towers  # a group never mixes tower and head parameters
        want = 0.01 * (0.1 if ids <= towers else 1.0)
        assert g["lr"] == pytest.approx(want)
        seen_tower += ids <= towers
        seen_head += not ids & towers
    assert seen_tower and seen_head
    trainable = {id(p) for p in trainer.module.parameters() if p.requires_grad}
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == trainable


def test_tower_lr_scale_must_be_positive(synth_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tower_lr_scale"):
        tiny_config(tmp_path / "run", synth_dir, "stages.0.tower_lr_scale=0")
