"""Fusion trainer on a tiny synthetic set with a tiny pixel grid store: learning, exact resume,
saved config, CUSA terms, refused stores, NaN guard, ensembles."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from itrkit.config import load_yaml
from itrkit.data.records import Dataset
from itrkit.errors import NonFiniteLossError, StoreError
from itrkit.eval.retrieval import metrics_from_scores
from itrkit.teachers.store import FeatureStore
from itrkit.train.fusion import FusionTrainer, evaluate_fusion_runs, load_fusion_config, train_fusion
from tests.conftest import pixel_grid_store

TINY = ["model.embed_dim=16", "model.sim_dim=8", "model.word_dim=16", "model.text_hidden=16", "model.sgr_steps=2"]



@pytest.fixture(scope="module")
def fusion_data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from itrkit.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("fusion")
    make_synthetic(root / "syn", n_images=120, captions_per_image=2, seed=3, size=32)
    ds = Dataset.load(root / "syn")
    return {"data": root / "syn", "grid": pixel_grid_store(ds, root / "grid.store")}


def _cfg(fusion_data: dict[str, Path], out: Path, *extra: str):
    return load_fusion_config(None, [f"data.path={fusion_data['data']}", f"data.grid_store={fusion_data['grid']}",
                                     f"out={out}", "batch_size=16", "epochs=2", "lr=0.003", "log_every=1", "threads=1", *TINY,
                                     *extra])


def _chance_rsum(n_img: int, txt2img: np.ndarray) -> float:
    g = np.random.default_rng(0)
    return float(np.mean([metrics_from_scores(g.random((n_img, len(txt2img))), txt2img)["rsum"] for _ in range(20)]))


def test_learns_beyond_chance_and_saves_config(tmp_path: Path, fusion_data: dict[str, Path]) -> None:
    # Validation on the training images: the claim is that the trainer learns, on a set this small.
    cfg = _cfg(fusion_data, tmp_path / "run", "epochs=8", "data.val_split=train", "model.sum_warmup_epochs=8")
    out = train_fusion(cfg, progress=False)
    log = [json.loads(x) for x in (tmp_path / "run" / "train.log").read_text().splitlines()]
    losses = [r["triplet_loss"] for r in log if "triplet_loss" in r]
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])
    train = Dataset.load(fusion_data["data"]).split("train")
    assert out["best"]["metric"] > 1.3 * _chance_rsum(len(train), train.txt2img)
    assert set(out) >= {"best", "steps", "val", "test", "history"} and out["test"]["rsum"] > 0
    saved = load_fusion_config(tmp_path / "run" / "config.yaml")
    assert saved == cfg
    assert load_yaml(tmp_path / "run" / "config.yaml")["model"]["embed_dim"] == 16
    # The selected model re-evaluates to the recorded test metrics (and its cached scores are reused).
    again = evaluate_fusion_runs([tmp_path / "run"], progress=False)
    assert again == out["test"]


def test_resume_is_bitwise_identical(tmp_path: Path, fusion_data: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    full = train_fusion(_cfg(fusion_data, tmp_path / "full", "checkpoint_every=2"), progress=False)
    from itrkit.train import fusion as F

    real = F.FusionSplit.batch
    calls = {"n": 0}

    def failing(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 10:  # epoch 2 (6 batches per epoch), after the mid-epoch checkpoint of step 8
            raise KeyboardInterrupt
        return real(self, *a, **k)

    monkeypatch.setattr(F.FusionSplit, "batch", failing)
    cfg = _cfg(fusion_data, tmp_path / "cut", "checkpoint_every=2")
    with pytest.raises(KeyboardInterrupt):
        train_fusion(cfg, progress=False)
    monkeypatch.setattr(F.FusionSplit, "batch", real)
    resumed = train_fusion(cfg, resume=True, progress=False)
    assert resumed["test"] == full["test"] and resumed["best"] == full["best"]
    a, b = load_file(str(tmp_path / "full" / "model" / "model.safetensors")), load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match="already holds a run"):
        train_fusion(cfg, progress=False)


def test_cusa_terms_present_and_finite(tmp_path: Path, fusion_data: dict[str, Path]) -> None:
    from itrkit.teachers.extract import teach

    paths = teach(Dataset.load(fusion_data["data"]), "tiny-image", "tiny-text", tmp_path / "teachers")
    cfg = _cfg(fusion_data, tmp_path / "run", "epochs=1", "model.name=saf", "model.alpha=1.0", "model.beta=0.75",
               f"teacher.image_store={paths['image']}", f"teacher.text_store={paths['text']}")
    out = train_fusion(cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "train.log").read_text().splitlines() if '"csa_loss"' in x]
    assert rows and all(np.isfinite([r["csa_loss"], r["usa_loss"], r["triplet_loss"]]).all() for r in rows)
    assert all(r["csa_loss"] > 0 and r["usa_loss"] > 0 for r in rows)
    assert {"tau_c", "tau_img", "tau_txt"} <= set(out["history"][-1])


def test_grid_store_for_other_ids_is_refused(tmp_path: Path, fusion_data: dict[str, Path]) -> None:
    ds = Dataset.load(fusion_data["data"])
    small = pixel_grid_store(ds.subset(10), tmp_path / "small.store")
    cfg = load_fusion_config(None, [f"data.path={fusion_data['data']}", f"data.grid_store={small}",
                                    f"out={tmp_path / 'run'}", *TINY])
    with pytest.raises(StoreError) as e:
        train_fusion(cfg, progress=False)
    assert "\n" not in str(e.value) and "first missing" in str(e.value) and str(small) in str(e.value)
    assert not (tmp_path / "run").exists()


def test_nan_loss_names_the_step(tmp_path: Path, fusion_data: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    from itrkit.models.sgraf import SGRAFModel

    real = SGRAFModel.batch_outputs
    calls = {"n": 0}

    def nan_on_third(self, batch):
        calls["n"] += 1
        out = real(self, batch)
        if calls["n"] == 3:
            out["scores"] = out["scores"] * float("nan")
        return out

    monkeypatch.setattr(SGRAFModel, "batch_outputs", nan_on_third)
    with pytest.raises(NonFiniteLossError, match="step 3"):
        FusionTrainer(_cfg(fusion_data, tmp_path / "run")).fit()


def test_grid_store_cells_pool_to_the_tower_feature(tmp_path: Path, fusion_data: dict[str, Path]) -> None:
    """Real EfficientNet-Lite0 on 3 images: the 49 cells average to the tower's pooled feature."""
    from itrkit.models.efficientnet import EfficientNetLiteTower
    from itrkit.teachers.grid import build_grid_store, read_regions

    ds = Dataset.load(fusion_data["data"]).subset(3)
    store = build_grid_store(ds, tmp_path / "g.store", batch_size=2, progress=False)
    assert store.header["grid"] == [49, 1280] and store.count == 3 and store.ids == ds.image_ids
    cells = read_regions(store, [0, 1, 2])
    tower = EfficientNetLiteTower("efficientnet-lite0")
    with torch.no_grad():
        pooled = tower(tower.prepare([str(p) for p in ds.image_paths]))
    torch.testing.assert_close(cells.mean(dim=1), pooled, atol=2e-3, rtol=2e-3)  # float16 rows
    again = build_grid_store(ds.subset(2), tmp_path / "g.store", progress=False)  # covered ids: reused
    assert again.header["sha256"] == store.header["sha256"]
    with pytest.raises(StoreError, match="first missing"):
        build_grid_store(Dataset.load(fusion_data["data"]).subset(5), tmp_path / "g.store", progress=False)


def test_reproduce_fusion_ensemble_and_reuse(tmp_path: Path, fusion_data: dict[str, Path]) -> None:
    from itrkit.reproduce_fusion import run_method
    from itrkit.train.fusion import load_scores

    out = tmp_path / "repro"
    ds = Dataset.load(fusion_data["data"])
    # A prebuilt grid store under the method's model name is reused (real extraction is tested above).
    w = FeatureStore.create(out / "grid.store", ds.image_ids, 16 * 12, {"name": "efficientnet-lite0"}, "image",
                            extra={"grid": [16, 12]})
    src = FeatureStore.open(fusion_data["grid"])
    w.write(0, src.lookup(ds.image_ids))
    w.close()
    over = [*TINY, "model.word_init=random", "batch_size=16", "threads=1", "lr=0.003"]
    res = run_method("sgraf", fusion_data["data"], out, seeds=1, epochs=1, overrides=over)
    assert set(res) == {"sgr", "saf", "sgraf"} and all(len(v) == 1 for v in res.values())
    test = ds.split("test")
    mats = [load_scores(out / "runs" / m / "seed0" / "scores_test.safetensors", test, "test", str(out / "grid.store"))
            for m in ("sgr", "saf")]
    assert all(m is not None for m in mats)
    assert res["sgraf"][0] == metrics_from_scores((mats[0] + mats[1]) / 2, test.txt2img)
    assert run_method("sgraf", fusion_data["data"], out, seeds=1, epochs=1, overrides=over) == res  # reused


def test_cli_grid_train_and_eval_rerank(tmp_path: Path, fusion_data: dict[str, Path],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`itrkit grid`, `itrkit train-fusion rerank`, `itrkit eval-fusion` (with --rerank-k) end to end."""
    from itrkit.cli import main

    data = fusion_data["data"]
    test = Dataset.load(data).split("test")
    assert main(["grid", str(data), "--out", str(tmp_path / "g.store"), "--split", "test", "--batch-size", "8"]) == 0
    store = FeatureStore.open(tmp_path / "g.store")
    assert store.count == len(test) and store.header["grid"] == [49, 1280]

    run = tmp_path / "rr"
    sets = [f"data.grid_store={fusion_data['grid']}", "epochs=2", "batch_size=16", "threads=1", "lr=0.003",
            "model.text_tower.embed_dim=16", "model.text_tower.hidden=16", "model.embed_dim=16", "model.width=16",
            "model.heads=2", "model.rerank_k=5", "data.max_val_images=0"]
    argv = ["train-fusion", "rerank", "--data", str(data), "--out", str(run), "--quiet"]
    assert main(argv + [x for s in sets for x in ("--set", s)]) == 0
    m = json.loads((run / "metrics.json").read_text())
    assert {"rsum", "itc_rsum", "i2t_R@1", "itc_t2i_R@10"} <= set(m["test"])
    # eval-fusion repeats the trainer's test protocol; --rerank-k 0 is the dual encoder alone
    assert main(["eval-fusion", str(run), "--json", str(tmp_path / "e.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["rsum"] == pytest.approx(m["test"]["rsum"])
    assert main(["eval-fusion", str(run), "--rerank-k", "0", "--json", str(tmp_path / "e0.json"), "--quiet"]) == 0
    assert json.loads((tmp_path / "e0.json").read_text())["rsum"] == pytest.approx(m["test"]["itc_rsum"])
    capsys.readouterr()
    assert main(["eval-fusion", str(run), str(run), "--quiet"]) == 2  # a re-ranker has no score matrix to average
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note:")]
    assert len(err) == 1 and "re-ranker" in err[0]


def test_itrkit_reproduce_dispatches_fusion_methods(tmp_path: Path, fusion_data: dict[str, Path]) -> None:
    """`itrkit reproduce flickr8k --methods sgraf`: the bundled recipes, members trained, ensemble reported."""
    from itrkit.cli import main

    out = tmp_path / "repro"
    ds = Dataset.load(fusion_data["data"])
    w = FeatureStore.create(out / "grid.store", ds.image_ids, 16 * 12, {"name": "efficientnet-lite0"}, "image",
                            extra={"grid": [16, 12]})
    w.write(0, FeatureStore.open(fusion_data["grid"]).lookup(ds.image_ids))
    w.close()
    assert main(["reproduce", "flickr8k", "--data", str(fusion_data["data"]), "--out", str(out),
                 "--methods", "sgraf", "--seeds", "1", "--fusion-epochs", "1"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert set(res) == {"sgraf"} and res["sgraf"]["chosen"] == ["recipe=sgr + saf", "stages.0.epochs=1"]
    run = res["sgraf"]["runs"][0]
    assert run["seed"] == 0 and run["rsum"] == pytest.approx(res["sgraf"]["rsum_mean"])
    for m in ("sgr", "saf"):
        cfg = load_yaml(out / "runs" / m / "seed0" / "config.yaml")
        assert cfg["model"]["name"] == m and cfg["stages"][0]["epochs"] == 1 and cfg["model"]["embed_dim"] == 128  # the recipe
    assert (out / "results.md").read_text().count("| sgraf |") == 1


def test_grid_features_are_cached_automatically_when_no_store_is_given(tmp_path: Path) -> None:
    """`itrkit train --config sgr` without data.grid_store: EfficientNet-Lite0 grid features of the
    train/val/test images go into the content-keyed cache once; a second run (another seed) reuses
    the same store, and the saved config names it."""
    from itrkit.cli import main
    from itrkit.data.synthetic import make_synthetic

    make_synthetic(tmp_path / "syn", n_images=40, captions_per_image=2, seed=8, size=32)
    sets = [*TINY, "model.word_init=random", "batch_size=8", "stages.0.epochs=1", "threads=1",
            f"cache_dir={tmp_path / 'cache'}", "model.region_norm=false"]
    runs = []
    for seed in (0, 1):
        run = tmp_path / f"r{seed}"
        argv = ["train", "--config", "sgr", "--data", str(tmp_path / "syn"), "--out", str(run), "--quiet"]
        assert main(argv + [x for s in [*sets, f"seed={seed}"] for x in ("--set", s)]) == 0
        runs.append(load_yaml(run / "config.yaml")["data"]["grid_store"])
        if seed == 0:
            header = Path(runs[0]) / "header.json"
            first = header.stat().st_mtime_ns
    assert runs[0] == runs[1] and Path(runs[0]).parent == tmp_path / "cache" / "grid"
    assert header.stat().st_mtime_ns == first  # reused, not rebuilt
    store = FeatureStore.open(runs[0])
    assert store.count == 40 and store.header["grid"] == [49, 1280]
    # another image content → another cache entry
    img = Dataset.load(tmp_path / "syn").records[0].path
    Image.open(img).convert("RGB").rotate(90).save(img)
    run = tmp_path / "changed"
    argv = ["train", "--config", "sgr", "--data", str(tmp_path / "syn"), "--out", str(run), "--quiet"]
    assert main(argv + [x for s in sets for x in ("--set", s)]) == 0
    assert load_yaml(run / "config.yaml")["data"]["grid_store"] != runs[0]


def test_data_workers_give_the_same_fusion_run(tmp_path: Path, fusion_data: dict[str, Path]) -> None:
    """data.num_workers prepares a fusion matcher's batches in DataLoader processes too: bitwise the
    same run as without workers."""
    plain = train_fusion(_cfg(fusion_data, tmp_path / "plain", "epochs=1"), progress=False)
    work = train_fusion(_cfg(fusion_data, tmp_path / "work", "epochs=1", "data.num_workers=2"), progress=False)
    assert plain["test"] == work["test"] and plain["best"] == work["best"]
    a, b = (load_file(str(tmp_path / r / "model" / "model.safetensors")) for r in ("plain", "work"))
    assert all(torch.equal(a[k], b[k]) for k in a)
