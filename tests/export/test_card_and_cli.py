"""The model card says what was trained, how, and how well; ``add_export_parser`` wires the command."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from itrkit.cli.export import add_export_parser
from itrkit.errors import ItrkitError
from itrkit.export import ExportError
from itrkit.export.card import method_name


@pytest.fixture(scope="module")
def cusa_run(synth_dir: Path, teacher_stores: list[str], tmp_path_factory) -> Path:
    from itrkit.config import load_config
    from itrkit.train.config import TrainConfig
    from itrkit.train.trainer import train

    out = tmp_path_factory.mktemp("cusa-run") / "run"
    cfg = load_config(TrainConfig, None, overrides=[
        f"out={out}", f"data.path={synth_dir}", "model.image_tower=tiny-image", "model.text_tower=tiny-text",
        "model.embed_dim=16", "model.usa_heads=true", "model.usa_dim=8", "batch_size=16", "stages.0.epochs=2",
        "stages.0.lr=0.01", "loss.csa=1.0", "loss.usa=1.0", *teacher_stores])
    train(cfg, progress=False)
    return out


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="itrkit")
    add_export_parser(p.add_subparsers(dest="cmd", required=True))
    return p


def test_export_command_writes_a_model_card_with_data_method_recipe_metrics_and_command(cusa_run, tmp_path,
                                                                                         capsys) -> None:
    out = tmp_path / "exported"
    args = _parser().parse_args(["export", str(cusa_run), "--format", "hf", "--out", str(out)])
    assert args.func(args) == 0
    assert "model card" in capsys.readouterr().out
    card = (out / "README.md").read_text(encoding="utf-8")
    for section in ("## Use", "## Data", "## Method", "## Recipe", "## Metrics", "## The command"):
        assert section in card
    metrics = json.loads((cusa_run / "metrics.json").read_text())
    assert "InfoNCE + CUSA (CSA + USA)" in card
    assert f"| test | {metrics['test']['i2t_R@1']:.1f} |" in card  # the run's own numbers, first column i2t R@1
    assert f"{metrics['test']['rsum']:.1f}" in card and "docs/method.md §4" in card and "selected on validation rsum" in card
    assert "csa 1.0, usa 1.0" in card and "teacher temperature" in card and "tiny-image" in card
    assert f"itrkit export {cusa_run} --format hf --out {out}" in card
    assert "60 images" in card  # the dataset folder was read: the synthetic set's size
    assert oct((out / "model.safetensors").stat().st_mode & 0o777) == "0o644"


def test_the_parser_rejects_unknown_formats_and_export_errors_are_itrkit_errors(tmp_path) -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["export", "run", "--format", "tflite", "--out", str(tmp_path / "x")])
    assert issubclass(ExportError, ItrkitError)  # the CLI prints one line and exits 2
    args = _parser().parse_args(["export", str(tmp_path / "nothing"), "--format", "onnx", "--out", str(tmp_path / "x")])
    with pytest.raises(ItrkitError, match="no trained model at"):
        args.func(args)


@pytest.mark.parametrize(("config", "name"), [
    ({"loss": {"contrastive": 1.0}}, "InfoNCE"),
    ({"loss": {"contrastive": 0.0, "triplet": 1.0}}, "VSE++ (hardest-negative triplet)"),
    ({"loss": {"contrastive": 1.0, "csa": 0.5}}, "InfoNCE + CSA"),
    ({"loss": {"contrastive": 0.0, "instance": 1.0},
      "stages": [{"name": "I", "loss": {}}, {"name": "II", "loss": {"contrastive": 1.0, "csa": 1, "usa": 1}}]},
     "IConE (instance loss + InfoNCE) + CUSA (CSA + USA)"),
    ({}, "unknown (no config.yaml beside the model)"),
])
def test_method_name_follows_the_loss_weights_of_every_stage(config: dict, name: str) -> None:
    assert method_name(config) == name
