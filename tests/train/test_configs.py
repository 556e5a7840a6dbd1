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


# --- the recipes in sub-folders: Flickr8k dev choices and the fusion matchers ---------------------------
ROOT = Path(__file__).resolve().parents[2] / "configs"
CHOSEN = sorted((ROOT / "flickr8k").glob("*.yaml"))
FUSION = sorted((ROOT / "fusion").glob("*.yaml"))
# CUSA paper, appendix: (alpha, beta) for SGR, SAF and the X2VLM-style re-ranker; 0 = no CUSA.
APPENDIX = {"sgr": (0, 0), "saf": (0, 0), "rerank": (0, 0),
            "sgr_cusa": (0.6, 0.75), "saf_cusa": (1.0, 0.75), "rerank_cusa": (0.3, 0.75)}


@pytest.mark.parametrize("path", CHOSEN, ids=lambda p: p.stem)
def test_flickr8k_choices_load(path: Path) -> None:
    """The published dev choices stay valid configs (a renamed key would make them unusable)."""
    raw = yaml.safe_load(path.read_text())
    cfg = load_config(TrainConfig, path)
    assert len(cfg.stages) == len(raw["stages"]) and cfg.data.path == "data/flickr8k"
    assert (cfg.teacher.image_store != "") == any(
        (s.get("loss") or {}).get(k, raw["loss"][k]) > 0 for s in raw["stages"] for k in ("csa", "usa"))


def test_fusion_recipes_are_there() -> None:
    assert {p.stem for p in FUSION} == set(APPENDIX)


@pytest.mark.parametrize("path", FUSION, ids=lambda p: p.stem)
def test_fusion_recipe_builds_with_the_appendix_weights(path: Path) -> None:
    from itrkit.train.fusion import build_fusion_model, load_fusion_config

    cfg = load_fusion_config(path)  # unknown model keys raise here
    model = build_fusion_model(cfg.model)
    alpha, beta = APPENDIX[path.stem]
    assert (cfg.loss.csa, cfg.loss.usa) == (alpha, beta)  # the same names as the dual encoder's α, β
    assert any(n.startswith("usa") for n, _ in model.named_parameters()) == (beta > 0)


@pytest.mark.parametrize("path", FUSION, ids=lambda p: p.stem)
def test_old_layout_of_each_fusion_recipe_loads_to_the_same_config(path: Path, capsys) -> None:
    """The fusion recipes as written before the one-loop refactor (top-level epochs/lr, loss keys
    under model) are read as the new layout, with a one-line note, to exactly the bundled config."""
    from itrkit.train.config import load_train_config

    legacy = Path(__file__).resolve().parents[1] / "data" / "legacy_fusion" / path.name
    old = load_train_config(legacy)
    assert "old fusion-config layout" in capsys.readouterr().err
    new = load_train_config(path)
    assert capsys.readouterr().err == ""  # the bundled recipes use the new layout
    assert old == new
