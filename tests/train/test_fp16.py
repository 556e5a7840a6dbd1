"""fp16 mixed precision: autocast to float16 around the model (losses stay float32) with a dynamic
gradient scaler whose state (scale, growth counter) is in the checkpoint, so a run interrupted
and resumed ends bitwise where the uninterrupted run ends.

Runs on the CPU: torch >= 2.3 has float16 autocast and ``GradScaler("cpu")`` there. The scale is
made to move within a few steps (a start of 2^18 overflows the float16 gradients, so the first
steps are skipped and the scale halves; growth every 3 clean steps), so a resume that lost the
scaler's state would diverge.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from itrkit.errors import ItrkitError
from itrkit.models.dual_encoder import DualEncoder
from itrkit.train import trainer as trainer_mod
from itrkit.train.checkpoint import load_latest_checkpoint
from itrkit.train.data import PairData
from itrkit.train.trainer import Interrupted, Trainer, train

from .conftest import tiny_config

FP16 = ["precision=fp16", "stages.0.epochs=3", "checkpoint_every=5"]  # 8 steps an epoch


@pytest.fixture(autouse=True)
def moving_scale(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trainer_mod, "FP16_INIT_SCALE", 2.0 ** 18)
    monkeypatch.setattr(trainer_mod, "FP16_GROWTH_INTERVAL", 3)


STOP = 12


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "train.log").read_text().splitlines()) if "loss" in r]


def test_fp16_autocasts_the_model_and_keeps_the_losses_in_float32(tmp_path: Path, synth_dir: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[torch.dtype] = []
    orig = DualEncoder.forward_features

    def spy(self: DualEncoder, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = orig(self, *args, **kwargs)
        if self.training:
            seen.append(out["image_embeds"].dtype)
        return out

    monkeypatch.setattr(DualEncoder, "forward_features", spy)
    fp16 = train(tiny_config(tmp_path / "fp16", synth_dir, "precision=fp16"), progress=False)
    monkeypatch.setattr(DualEncoder, "forward_features", orig)
    fp32 = train(tiny_config(tmp_path / "fp32", synth_dir), progress=False)
    assert seen and set(seen) == {torch.float16}
    a, b = _losses(tmp_path / "fp32"), _losses(tmp_path / "fp16")
    assert len(a) == len(b) and a[0] != b[0]  # autocast changed the forward ...
    assert b[0] == pytest.approx(a[0], rel=1e-2)  # ... by float16 rounding only
    assert b[-1] < 0.8 * b[0]  # and it learns, although the first steps were skipped (overflow)
    assert abs(fp16["val"]["rsum"] - fp32["val"]["rsum"]) < 60


def _final_state(run: Path) -> dict[str, torch.Tensor]:
    """The last checkpoint of a finished run: the weights, Adam's moments and the scaler after the
    last step (``model/`` holds the model selected on validation, possibly from before the cut)."""
    ckpt = load_latest_checkpoint(run)
    assert ckpt is not None
    return ckpt[0]


def test_fp16_checkpoint_holds_the_scaler_and_resume_is_bitwise(tmp_path: Path, synth_dir: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    scales: list[float] = []
    orig_step = Trainer._backward_step

    def record(self: Trainer, loss: torch.Tensor) -> None:
        orig_step(self, loss)
        assert self.scaler is not None
        scales.append(self.scaler.get_scale())

    monkeypatch.setattr(Trainer, "_backward_step", record)
    full = train(tiny_config(tmp_path / "full", synth_dir, *FP16), progress=False)
    full_scales = list(scales)
    scales.clear()

    calls = {"n": 0}
    orig_batch = PairData.batch

    def batch_with_interrupt(self: PairData, idx: np.ndarray):  # a real SIGINT, as from Ctrl-C
        if self.n_pairs > 100:
            calls["n"] += 1
            if calls["n"] == STOP:  # in epoch 2, after a checkpoint at step 10
                os.kill(os.getpid(), signal.SIGINT)
        return orig_batch(self, idx)

    monkeypatch.setattr(PairData, "batch", batch_with_interrupt)
    cfg = tiny_config(tmp_path / "cut", synth_dir, *FP16)
    with pytest.raises(Interrupted, match="resume"):
        Trainer(cfg, progress=False).fit()
    monkeypatch.setattr(PairData, "batch", orig_batch)

    ckpt = load_latest_checkpoint(tmp_path / "cut")
    assert ckpt is not None
    state, meta = ckpt
    assert int(meta["step"]) == STOP and scales == full_scales[:STOP] and full["steps"] == 24
    # The checkpoint holds the scale the run had reached, which is not where it started: the first
    # steps overflowed (halving it) and clean steps grew it again.
    assert float(state["scaler.scale"]) == scales[-1] != 2.0 ** 18 and len(set(scales)) > 2
    assert state["scaler.scale"].dtype == torch.float64 and "scaler.growth_tracker" in state
    scales.clear()

    resumed = train(cfg, resume=True, progress=False)
    assert scales == full_scales[STOP:]  # the resumed steps overflow and grow where the uninterrupted ones did
    assert resumed["test"] == full["test"] and resumed["best"] == full["best"]
    a, b = _final_state(tmp_path / "full"), _final_state(tmp_path / "cut")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), \
        [k for k in a if not torch.equal(a[k], b[k])][:5]


def test_resuming_an_fp32_checkpoint_as_fp16_is_refused(tmp_path: Path, synth_dir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    orig_batch = PairData.batch

    def batch_with_interrupt(self: PairData, idx: np.ndarray):
        if self.n_pairs > 100:
            calls["n"] += 1
            if calls["n"] == 5:
                os.kill(os.getpid(), signal.SIGINT)
        return orig_batch(self, idx)

    monkeypatch.setattr(PairData, "batch", batch_with_interrupt)
    with pytest.raises(Interrupted):
        Trainer(tiny_config(tmp_path / "r", synth_dir, "stages.0.epochs=2"), progress=False).fit()
    monkeypatch.setattr(PairData, "batch", orig_batch)
    with pytest.raises(ItrkitError, match="no fp16 gradient-scaler state"):
        train(tiny_config(tmp_path / "r", synth_dir, "stages.0.epochs=2", "precision=fp16"), resume=True,
              progress=False)


def test_fp16_clips_the_unscaled_gradients(tmp_path: Path, synth_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Clipping must see the true gradients: on the scaled ones (x 4096 and more here) every step
    # would be clipped to a tiny fraction of itself.
    norms: dict[str, list[float]] = {"fp32": [], "fp16": []}
    orig = torch.nn.utils.clip_grad_norm_
    key = ["fp32"]

    def spy(params, max_norm, *args, **kwargs):  # type: ignore[no-untyped-def]
        total = orig(params, max_norm, *args, **kwargs)
        norms[key[0]].append(float(total))
        return total

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    train(tiny_config(tmp_path / "fp32", synth_dir, "grad_clip=100"), progress=False)
    key[0] = "fp16"
    m = train(tiny_config(tmp_path / "fp16", synth_dir, "grad_clip=100", "precision=fp16"), progress=False)
    finite = [n for n in norms["fp16"] if np.isfinite(n)]
    assert len(norms["fp16"]) == m["steps"] and len(finite) >= m["steps"] // 2  # overflowed steps: inf, skipped
    ref = float(np.median(norms["fp32"]))
    assert 0.2 * ref < float(np.median(finite)) < 5 * ref  # unscaled: the size of fp32's gradients
