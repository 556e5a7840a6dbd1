"""Training: determinism, exact resume after Ctrl-C, stage freezing, NaN guard, selection on val."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from itrkit.errors import ConfigError, ItrkitError, NonFiniteLossError
from itrkit.train.data import PairData
from itrkit.train.trainer import Interrupted, Trainer, train

from .conftest import tiny_config


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model" / "model.safetensors"))


def test_two_runs_same_seed_are_identical(tmp_path: Path, synth_dir: Path) -> None:
    a = train(tiny_config(tmp_path / "a", synth_dir), progress=False)
    b = train(tiny_config(tmp_path / "b", synth_dir), progress=False)
    assert a["test"] == b["test"] and a["best"] == b["best"]
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # the run folder holds what it promises
    for f in ("config.yaml", "train.log", "metrics.json", "model/model.json", "test_embeddings.safetensors"):
        assert (tmp_path / "a" / f).is_file(), f
    assert a["test"]["rsum"] > 0


def test_selection_uses_validation_only(tmp_path: Path, synth_dir: Path) -> None:
    m = train(tiny_config(tmp_path / "r", synth_dir, "stages.0.epochs=4"), progress=False)
    vals = [h["val"]["rsum"] for h in m["history"]]
    assert m["best"]["metric"] == max(vals)
    assert m["val"]["rsum"] == max(vals)
    assert m["best"]["epoch"] == 1 + int(np.argmax(vals))


@pytest.mark.parametrize("stop_at", [5, 9])
def test_ctrl_c_then_resume_is_bitwise_identical(tmp_path: Path, synth_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                   stop_at: int) -> None:
    two_stage = ["stages.0.epochs=2", "stages.1.name=second", "stages.1.epochs=2", "stages.1.lr=0.003"]
    full = train(tiny_config(tmp_path / "full", synth_dir, *two_stage), progress=False)

    calls = {"n": 0}
    orig = PairData.batch

    def batch_with_interrupt(self: PairData, idx: np.ndarray):  # a real SIGINT, as from Ctrl-C
        if self.n_pairs > 100:
            calls["n"] += 1
            if calls["n"] == stop_at:
                os.kill(os.getpid(), signal.SIGINT)
        return orig(self, idx)

    monkeypatch.setattr(PairData, "batch", batch_with_interrupt)
    cfg = tiny_config(tmp_path / "cut", synth_dir, *two_stage)
    with pytest.raises(Interrupted, match="resume"):
        Trainer(cfg, progress=False).fit()
    monkeypatch.setattr(PairData, "batch", orig)
    resumed = train(cfg, resume=True, progress=False)
    assert resumed["test"] == full["test"]
    assert resumed["best"] == full["best"]
    wf, wr = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(wf[k], wr[k]) for k in wf)


def test_refuses_to_overwrite_a_run(tmp_path: Path, synth_dir: Path) -> None:
    train(tiny_config(tmp_path / "r", synth_dir, "stages.0.epochs=1"), progress=False)
    with pytest.raises(ItrkitError, match="already holds a run"):
        train(tiny_config(tmp_path / "r", synth_dir, "stages.0.epochs=1"), progress=False)


def test_two_stage_freezes_towers_then_trains_them(tmp_path: Path, synth_dir: Path) -> None:
    stages = ["model.cached_features=false", "model.image_trainable=all", "model.text_trainable=all",
              "stages.0.epochs=1", "stages.0.freeze=[towers]", "stages.0.name=stage1",
              "loss.contrastive=0", "loss.instance=1",
              "stages.1.name=stage2", "stages.1.epochs=1", "stages.1.lr=0.001",
              "stages.1.loss={contrastive: 1.0, instance: 1.0}"]
    cfg = tiny_config(tmp_path / "ic", synth_dir, *stages)
    tr = Trainer(cfg, progress=False)
    tr._build()
    tower0 = {k: v.clone() for k, v in tr.model.image_tower.state_dict().items()}
    text0 = {k: v.clone() for k, v in tr.model.text_tower.state_dict().items()}
    head0 = tr.model.image_head[1].weight.detach().clone()

    # run stage 1 only
    cfg1 = tiny_config(tmp_path / "ic1", synth_dir, *stages[:-4])
    m1 = Trainer(cfg1, progress=False)
    m1.fit()
    t1 = {k: v for k, v in m1.model.image_tower.state_dict().items()}
    assert all(torch.equal(tower0[k], t1[k]) for k in tower0), "stage I must not touch the image tower"
    assert all(torch.equal(text0[k], v) for k, v in m1.model.text_tower.state_dict().items())
    assert not torch.equal(head0, m1.model.image_head[1].weight), "stage I trains the heads"

    Trainer(cfg, progress=False).fit()
    # the last checkpoint holds the weights at the end of stage II (model/ holds the val-selected ones)
    from itrkit.train.checkpoint import load_latest_checkpoint

    state, meta = load_latest_checkpoint(tmp_path / "ic")
    assert meta["stage"] == 2
    changed = [k for k, v in tower0.items() if v.is_floating_point() and not torch.equal(v, state[f"module.model.image_tower.{k}"])]
    assert changed, "stage II trains the towers"


def test_nan_loss_stops_with_step_and_ids(tmp_path: Path, synth_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    orig = PairData.batch

    def poisoned(self: PairData, idx: np.ndarray):
        b = orig(self, idx)
        if "image_features" in b:
            b["image_features"] = b["image_features"] * float("nan")
        return b

    monkeypatch.setattr(PairData, "batch", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 1 .*captions .*#"):
        train(tiny_config(tmp_path / "nan", synth_dir), progress=False)


def test_bad_config_values(tmp_path: Path, synth_dir: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        tiny_config(tmp_path, synth_dir, "batch_sise=4")
    with pytest.raises(ConfigError, match="lr must be > 0"):
        tiny_config(tmp_path, synth_dir, "stages.0.lr=-1")
    with pytest.raises(ConfigError, match="expected an integer"):
        tiny_config(tmp_path, synth_dir, "batch_size=abc")
    with pytest.raises(ConfigError, match="larger than"):
        train(tiny_config(tmp_path / "big", synth_dir, "batch_size=100000"), progress=False)
    assert not (tmp_path / "big" / "metrics.json").exists()


def test_log_is_json_lines(tmp_path: Path, synth_dir: Path) -> None:
    train(tiny_config(tmp_path / "r", synth_dir, "stages.0.epochs=1"), progress=False)
    lines = (tmp_path / "r" / "train.log").read_text().splitlines()
    recs = [json.loads(x) for x in lines]
    assert any(r.get("event") == "val" for r in recs)
    assert all(np.isfinite(r["loss"]) for r in recs if "loss" in r)
