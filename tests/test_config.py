from __future__ import annotations

from pathlib import Path

import pytest

from itrkit.config import load_config, save_config, to_dict
from itrkit.errors import ConfigError
from itrkit.train.config import TrainConfig


def test_yaml_then_overrides(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("seed: 3\nloss:\n  csa: 0.5\nstages:\n  - name: a\n    epochs: 2\n")
    cfg = load_config(TrainConfig, f, ["loss.csa=1.5", "stages.1.name=b", "stages.1.lr=1e-4", "model.usa_heads=true"])
    assert cfg.seed == 3 and cfg.loss.csa == 1.5 and cfg.model.usa_heads is True
    assert [s.name for s in cfg.stages] == ["a", "b"] and cfg.stages[1].lr == 1e-4 and cfg.stages[1].epochs == 10
    # the saved config reloads to the same object
    save_config(cfg, tmp_path / "out.yaml")
    assert to_dict(load_config(TrainConfig, tmp_path / "out.yaml")) == to_dict(cfg)


@pytest.mark.parametrize("override, message", [
    ("lossx.csa=1", "unknown config key 'lossx' (did you mean 'loss'?)"),
    ("loss.alpha=1", "unknown config key 'loss.alpha'"),
    ("batch_size=1.5", "batch_size: expected an integer"),
    ("model.usa_heads=maybe", "model.usa_heads: expected true/false"),
    ("stages.0.lr=-0.1", "lr must be > 0"),
    ("loss.teacher_mode=mean", "unknown mode 'mean'"),
    ("stages.0.loss={cas: 1}", "did you mean 'csa'"),
    ("stages.0.freeze=[tower]", "cannot freeze unknown part 'tower'"),
    ("stages.3.lr=1", "not a valid index"),
    ("noequals", "not of the form key=value"),
])
def test_bad_config_one_line(override: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, None, [override])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_yaml_file(tmp_path: Path) -> None:
    f = tmp_path / "bad.yaml"
    f.write_text("seed: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        load_config(TrainConfig, f)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(TrainConfig, tmp_path / "missing.yaml")
