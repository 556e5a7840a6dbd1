"""Real photos end to end through the CLI: Flickr8k official split, frozen EfficientNet-Lite0 +
all-MiniLM-L6-v2 on cached features, heads trained with InfoNCE, scored on held-out test images."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from itrkit.cli import main

pytestmark = pytest.mark.slow

# Subset small enough for CI: 500 train / 200 dev / 200 test images (1,000 test captions).
# Chance RSUM here is about 37; measured 293.4 test (312.4 dev) on 2026-11-23 (README). Wide margin below.
RSUM_FLOOR = 240.0


def test_flickr8k_prepare_train_eval(tmp_path: Path, shared_data: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "flickr8k"
    assert main(["data", "prepare", "--format", "flickr8k", "--source", str(shared_data / "flickr8k"),
                 "--out", str(data)]) == 0
    prepared = json.loads((data / "dataset.json").read_text())
    splits: dict[str, int] = {}
    for im in prepared["images"]:
        splits[im["split"]] = splits.get(im["split"], 0) + 1
    assert (splits["train"], splits["val"], splits["test"]) == (6000, 1000, 1000)

    run = tmp_path / "run"
    assert main(["train", "--config", "infonce", "--data", str(data), "--out", str(run), "--quiet",
                 "--set", "data.max_train_images=500", "--set", "data.max_eval_images=200",
                 "--set", "stages.0.epochs=3", "--set", "loss.tau=0.1", "--set", "loss.tau_learnable=false"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["test"]["rsum"] > RSUM_FLOOR, metrics["test"]
    assert metrics["val"]["rsum"] > RSUM_FLOOR

    # itrkit eval on the same images reuses the cached tower features and gives the same numbers
    cache = Path(os.environ["ITRKIT_CACHE"]) / "features"
    before = sorted(p.name for p in cache.iterdir())
    capsys.readouterr()
    assert main(["eval", "--run", str(run), "--split", "test", "--max-images", "200", "--json", str(tmp_path / "m.json")]) == 0
    assert sorted(p.name for p in cache.iterdir()) == before
    again = json.loads((tmp_path / "m.json").read_text())
    assert again["rsum"] == pytest.approx(metrics["test"]["rsum"], abs=1e-6)
    assert "rsum" in capsys.readouterr().out
