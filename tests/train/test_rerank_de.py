"""The re-ranker on a trained dual-encoder run (``model.itc_run``) through ``itrkit train`` and
``itrkit eval --run``: a tiny InfoNCE run, then the bundled ``minilm/rerank_de`` recipe on it.
The first stage of the recorded metrics is the dual encoder's own ranking, the saved (k, w) is the
best of an explicit dev-grid loop, ``itrkit eval --run`` recomputes the recorded test metrics
with it, and a bad ``itc_run`` is a one-line error naming the folder."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from itrkit.data.records import Dataset
from tests.conftest import pixel_grid_store

TINY_DE = ["model.image_tower=tiny-image", "model.text_tower=tiny-text", "model.embed_dim=16", "batch_size=8",
           "stages.0.epochs=1", "stages.0.lr=0.01", "log_every=1", "threads=1", "device=cpu"]
TINY_RR = ["model.embed_dim=8", "model.width=16", "model.heads=2", "batch_size=8", "stages.0.epochs=1",
           "stages.0.lr=0.003", "stages.0.warmup_steps=1", "log_every=1", "threads=1", "device=cpu",
           "data.max_val_images=0", "model.prefix_dtype=float32"]


def _train(config: str, data: Path, out: Path, sets: list[str]) -> int:
    from itrkit.cli import main

    argv = ["train", "--config", config, "--data", str(data), "--out", str(out), "--quiet"]
    for s in sets:
        argv += ["--set", s]
    return main(argv)


@pytest.fixture(scope="module")
def de_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from itrkit.data.synthetic import make_synthetic

    root = tmp_path_factory.mktemp("rerank_de")
    make_synthetic(root / "syn", n_images=40, captions_per_image=2, seed=4, size=32)
    ds = Dataset.load(root / "syn")
    paths = {"root": root, "data": root / "syn", "grid": pixel_grid_store(ds, root / "grid.store"),
             "cache": root / "cache", "de": root / "de"}
    threads = torch.get_num_threads()
    try:
        assert _train("infonce", paths["data"], paths["de"], [*TINY_DE, f"cache_dir={paths['cache']}"]) == 0
    finally:
        torch.set_num_threads(threads)
    return paths


def _rerank_sets(p: dict[str, Path], itc_run: Path | str) -> list[str]:
    return [f"data.grid_store={p['grid']}", f"cache_dir={p['cache']}", f"model.itc_run={itc_run}", *TINY_RR]


def test_rerank_on_a_dual_encoder_run_trains_chooses_on_dev_and_reevaluates_to_the_recorded_test(
        de_run: dict[str, Path], tmp_path: Path) -> None:
    from itrkit.cli import main
    from itrkit.eval.fusion import evaluate_reranker, open_split
    from itrkit.eval.retrieval import evaluate_retrieval
    from itrkit.models.embed import embed_dataset
    from itrkit.models.io import load_fusion_model, load_model

    run = tmp_path / "rr"
    threads = torch.get_num_threads()
    try:
        assert _train("minilm/rerank_de", de_run["data"], run, _rerank_sets(de_run, de_run["de"])) == 0
        recorded = json.loads((run / "metrics.json").read_text())["test"]
        log = [json.loads(x) for x in (run / "train.log").read_text().splitlines()]
        assert sum("itm_loss" in r for r in log) >= 2  # it trained ITM steps
        # The first stage of the recorded test metrics is the dual encoder's own ranking.
        full = Dataset.load(de_run["data"])
        test = full.split("test")
        de = load_model(de_run["de"])
        emb = embed_dataset(de, test, de_run["cache"])
        own = evaluate_retrieval(emb["image_embeds"], emb["text_embeds"], test.txt2img)
        assert {k[4:]: v for k, v in recorded.items() if k.startswith("itc_")} == own
        # The saved (k, w) is the best dev RSUM of an explicit loop over the recipe's grid.
        meta = json.loads((run / "model" / "model.json").read_text())
        choice = meta["rerank_choice"]
        assert choice == json.loads((run / "metrics.json").read_text())["rerank_choice"]
        assert (meta["model"]["rerank_k"], meta["model"]["itm_weight"]) == (choice["rerank_k"], choice["itm_weight"])
        assert meta["model"]["itc_run"] == str(de_run["de"].resolve()) and "selected" in meta
        model, _ = load_fusion_model(run)
        val = open_split(model, full.split("val"), str(de_run["grid"]), de_run["cache"], dataset=full)
        best = None
        for k in (8, 16, 32):
            for w in (0.0, 0.1, 0.3, 1.0, 3.0, math.inf):
                r = evaluate_reranker(model, val.regions(np.arange(len(val))), val.tokens, val.lengths, val.txt2img,
                                      progress=False, rerank_k=k, itm_weight=w, word_states=val.word_reader(),
                                      first_stage=val.itc_embeds)["rerank"]["rsum"]
                if best is None or r > best[2]:
                    best = (k, w, r)
        assert (choice["rerank_k"], choice["itm_weight"]) == best[:2] and choice["rsum"] == pytest.approx(best[2])
        # itrkit eval --run recomputes the recorded test metrics with the saved choice (and the
        # same numbers when k and w are given explicitly).
        out = tmp_path / "eval.json"
        assert main(["eval", "--run", str(run), "--quiet", "--json", str(out), "--device", "cpu"]) == 0
        again = json.loads(out.read_text())
        assert {k: again[k] for k in recorded} == recorded and set(again) == {*recorded, "runs", "split"}
        w_arg = "inf" if math.isinf(choice["itm_weight"]) else str(choice["itm_weight"])
        assert main(["eval", "--run", str(run), "--quiet", "--json", str(out), "--device", "cpu",
                     "--rerank-k", str(choice["rerank_k"]), "--itm-weight", w_arg]) == 0
        assert {k: json.loads(out.read_text())[k] for k in recorded} == recorded
        # ITM-only ordering: the same top k by the ITM logit alone (w = inf), reported beside a finite w.
        assert main(["eval", "--run", str(run), "--quiet", "--json", str(out), "--device", "cpu",
                     "--itm-weight", "0"]) == 0
        zero = json.loads(out.read_text())
        assert {k: zero[k] for k in own} == own and "itm_only_rsum" in zero
    finally:
        torch.set_num_threads(threads)


def test_itc_run_that_is_missing_a_fusion_run_or_for_other_data_is_a_one_line_error_naming_it(
        de_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from itrkit.data.synthetic import make_synthetic
    from itrkit.models.io import save_fusion_model
    from itrkit.models.rerank import ReRanker

    missing = tmp_path / "no_such_run"
    fusion = tmp_path / "a_fusion_run"
    save_fusion_model(ReRanker(region_dim=12, embed_dim=8, width=8, heads=2), fusion / "model")
    other = tmp_path / "other_data_run"
    shutil.copytree(de_run["de"], other)
    make_synthetic(tmp_path / "syn2", n_images=40, captions_per_image=2, seed=5, size=32)
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["data"]["path"] = str(tmp_path / "syn2")
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    for bad, why in ((missing, "no run folder"), (fusion, "is a fusion run"), (other, "other data")):
        capsys.readouterr()
        assert _train("minilm/rerank_de", de_run["data"], tmp_path / "rr", _rerank_sets(de_run, bad)) == 2
        err = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
        assert len(err) == 1 and str(bad) in err[0] and why in err[0] and "model.itc_run" in err[0], err
    # The recipe without a first stage would train nothing that ranks: refused, naming the keys.
    assert _train("minilm/rerank_de", de_run["data"], tmp_path / "rr", _rerank_sets(de_run, "")) == 2
    assert "model.itc_run" in capsys.readouterr().err


def test_training_batches_carry_the_dual_encoders_rows_and_the_loss_mines_with_its_cosine(
        de_run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from itrkit.models.embed import embed_dataset
    from itrkit.models.io import load_model
    from itrkit.train.config import load_train_config, resolve_config
    from itrkit.train.tasks import build_task

    sets = [*_rerank_sets(de_run, de_run["de"]), "model.word_features=gru", "model.text_tower.embed_dim=8",
            "model.text_tower.hidden=8", f"data.path={de_run['data']}", f"out={tmp_path / 'rr'}"]
    task = build_task(load_train_config(resolve_config("minilm/rerank_de"), sets), Dataset.load(de_run["data"]))
    emb = embed_dataset(load_model(de_run["de"]), task.train.ds, de_run["cache"])
    idx = task.epoch_batches(0, 0)[0]
    batch = task.make_batch(idx)
    caps = task.caps[idx]
    zi, zt = torch.from_numpy(emb["image_embeds"][idx]), torch.from_numpy(emb["text_embeds"][caps])
    torch.testing.assert_close(batch.itc_image, zi)
    torch.testing.assert_close(batch.itc_text, zt)
    seen = {}
    forward = type(task.loss).forward

    def spy(self, *args, **kwargs):
        seen.update(kwargs)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(task.loss), "forward", spy)
    task.compute(task.model(batch), batch)
    torch.testing.assert_close(seen["mining_sim"], zi @ zt.T)  # the dual encoder's cosine, not the model's ITC


def test_residual_match_logits_add_the_dual_encoders_cosine_of_each_mined_pair(
        de_run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``model.itm_residual=true``: the logits the loss sees are the head's own output plus
    s · the dual encoder's cosine of each (image, caption) pair of the batch."""
    from itrkit.models.embed import embed_dataset
    from itrkit.models.io import load_model
    from itrkit.train.config import load_train_config, resolve_config
    from itrkit.train.tasks import build_task

    sets = [*_rerank_sets(de_run, de_run["de"]), "model.word_features=gru", "model.text_tower.embed_dim=8",
            "model.text_tower.hidden=8", f"data.path={de_run['data']}", f"out={tmp_path / 'rr'}",
            "model.itm_residual=true", "model.itm_residual_init=20"]
    task = build_task(load_train_config(resolve_config("minilm/rerank_de"), sets), Dataset.load(de_run["data"]))
    emb = embed_dataset(load_model(de_run["de"]), task.train.ds, de_run["cache"])
    idx = task.epoch_batches(0, 0)[0]
    batch = task.make_batch(idx)
    sim = torch.from_numpy(emb["image_embeds"][idx]) @ torch.from_numpy(emb["text_embeds"][task.caps[idx]]).T
    seen = {}
    forward = type(task.loss).forward

    def spy(self, out, ids, t_img, t_txt, itm_pairs, **kwargs):
        seen["out"], seen["itm_pairs"] = out, itm_pairs
        return forward(self, out, ids, t_img, t_txt, itm_pairs, **kwargs)

    monkeypatch.setattr(type(task.loss), "forward", spy)
    task.compute(task.model(batch), batch)
    i, t = torch.tensor([0, 1, 2, 5, 5]), torch.tensor([0, 3, 2, 1, 7])
    m, out = task.model, seen["out"]
    with torch.no_grad():
        got = seen["itm_pairs"](i, t)
        head = m.itm_pairs(out["img_state"], out["words"][t], out["lengths"][t], i, torch.zeros(len(i)))
    assert m.itm_sim_scale.item() == 20.0
    # the offset was set once, from this batch: −s · midpoint of the mean positive cosine and the mean
    # hardest other-image cosine (explicit loops)
    ids = batch.img_ids.tolist()
    hard = [max(float(sim[r, c]) for c in range(len(ids)) if ids[c] != ids[r]) for r in range(len(ids))]
    mid = 0.5 * (sum(float(sim[r, r]) for r in range(len(ids))) / len(ids) + sum(hard) / len(hard))
    assert bool(m.residual_offset_ready) and m.itm_head.bias.item() == pytest.approx(-20.0 * mid, rel=1e-5)
    before = m.itm_head.bias.item()
    task.compute(task.model(batch), batch)  # not again
    assert m.itm_head.bias.item() == before
    torch.testing.assert_close(got, head + 20.0 * sim[i, t].to(head.dtype), rtol=1e-5, atol=1e-5)
