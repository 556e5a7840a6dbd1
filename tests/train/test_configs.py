"""Every bundled recipe in configs/ loads and trains end to end (tiny towers, one epoch per stage)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from itrkit.config import load_config
from itrkit.train.config import TrainConfig
from itrkit.train.trainer import train

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_the_recipes_are_there() -> None:
    assert {"infonce", "cusa", "csa", "usa", "vsepp", "icone", "icone_cusa"} <= {p.stem for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_recipe_trains(path: Path, tmp_path: Path, synth_dir: Path, teacher_stores: list[str]) -> None:
    raw = yaml.safe_load(path.read_text())
    n_stages = len(raw.get("stages", [{}]))
    over = [f"out={tmp_path / 'run'}", f"data.path={synth_dir}", "model.image_tower=tiny-image",
            "model.text_tower=tiny-text", "model.embed_dim=32", "batch_size=16", "model.trunk_hidden=32"]
    over += [f"stages.{i}.epochs=1" for i in range(n_stages)]
    if raw.get("teacher") is not None:
        over += teacher_stores
    cfg = load_config(TrainConfig, path, overrides=over)
    metrics = train(cfg, progress=False)
    assert metrics["test"]["rsum"] > 0
    assert len({h["stage"] for h in metrics["history"]}) == n_stages
    assert (tmp_path / "run" / "config.yaml").is_file()
