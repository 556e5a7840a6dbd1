"""Live-tower data loading: worker processes and the decoded-image cache change speed, not batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from itrkit.data.records import Dataset
from itrkit.models.dual_encoder import ModelConfig, build_model
from itrkit.train.data import PairData, iterate_batches
from itrkit.train.trainer import train

from .conftest import tiny_config

LIVE = ["model.cached_features=false", "model.image_trainable=all", "model.text_trainable=all", "stages.0.epochs=1"]


def test_image_cache_serves_the_same_inputs(synth_dir: Path) -> None:
    ds = Dataset.load(synth_dir).split("train")
    model = build_model(ModelConfig(image_tower="tiny-image", text_tower="tiny-text", cached_features=False))
    plain, cached = PairData(ds, model, False), PairData(ds, model, False, image_cache_mb=64)
    idx = np.arange(12)
    first, again = cached.batch(idx), cached.batch(idx)
    ref = plain.batch(idx)
    assert torch.equal(first["image_inputs"], ref["image_inputs"]) and torch.equal(again["image_inputs"], ref["image_inputs"])
    n_img = len(set(ds.txt2img[idx]))
    assert cached.image_cache.misses == n_img and cached.image_cache.hits == 24 - n_img


def test_workers_yield_the_same_batches_in_order(synth_dir: Path) -> None:
    ds = Dataset.load(synth_dir).split("train")
    model = build_model(ModelConfig(image_tower="tiny-image", text_tower="tiny-text", cached_features=False))
    data = PairData(ds, model, False)
    order = [np.array([3, 1, 4]), np.array([1, 5, 9, 2]), np.array([6, 5])]
    for a, b in zip(iterate_batches(data, order, 0), iterate_batches(data, order, 2), strict=True):
        assert torch.equal(a["image_inputs"], b["image_inputs"]) and torch.equal(a["img_ids"], b["img_ids"])
        assert all(torch.equal(a["text_inputs"][k], b["text_inputs"][k]) for k in a["text_inputs"])


def test_live_run_with_workers_and_cache_equals_plain_run(tmp_path: Path, synth_dir: Path) -> None:
    train(tiny_config(tmp_path / "plain", synth_dir, *LIVE, "data.image_cache_mb=0"), progress=False)
    train(tiny_config(tmp_path / "fast", synth_dir, *LIVE, "data.num_workers=2"), progress=False)
    a = load_file(str(tmp_path / "plain" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "fast" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("image_tower.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
