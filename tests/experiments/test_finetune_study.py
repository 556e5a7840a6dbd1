"""The issue-16 study's experiment side: ``reproduce --finetune`` / ``--set`` reach every tuned run
(two-stage methods fine-tune in stage II only), the regime is recorded and guarded, and every
dual-encoder seed run gets the Flickr8k human-judgment metrics (cached per run, a notice when the
annotations are absent)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from itrkit.cli import main
from itrkit.data.records import Caption, Dataset, ImageRecord
from itrkit.errors import ConfigError
from itrkit.eval.flickr8k_human import CROWDFLOWER_FILE, EXPERT_FILE
from itrkit.eval.protocols import flickr8k_human_metrics
from itrkit.experiments import runner as runner_mod
from itrkit.experiments.flickr8k import Reproduction
from itrkit.experiments.methods import METHODS, parse_finetune
from itrkit.experiments.runner import HUMAN_KEYS, Runner, results_table
from itrkit.train.config import TrainConfig, load_train_config

STUDY = ["infonce", "csa", "usa", "cusa", "cusa-shuffled", "cusa-smooth", "icone", "icone+cusa"]
KEYS = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"]


def test_finetune_specs_parse_and_bad_ones_are_refused() -> None:
    assert parse_finetune("top:2") == {"image": "top:2", "text": "top:2"}
    assert parse_finetune("image=top:1,text=top:3") == {"image": "top:1", "text": "top:3"}
    assert parse_finetune("text=top:2") == {"image": "frozen", "text": "top:2"}
    assert parse_finetune("image=top:4, text=frozen") == {"image": "top:4", "text": "frozen"}
    for bad in ("top:0", "top:x", "all", "image=all", "image=top:1,image=top:2", "vision=top:1", "top:2,"):
        with pytest.raises(ConfigError, match=f"--finetune '{bad}'"):
            parse_finetune(bad)


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from itrkit.data.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("synth-ft")
    make_synthetic(out, n_images=12, captions_per_image=2, seed=3, size=16)
    return out


def _fake_runs(monkeypatch: pytest.MonkeyPatch) -> list[TrainConfig]:
    """Runner.run records each config, saves random test embeddings (as a finished dual-encoder
    run does) and returns metrics; dev RSUM grows with the grid index."""
    from itrkit.models.io import save_state_file

    seen: list[TrainConfig] = []

    def run(self: Runner, cfg: TrainConfig) -> dict[str, Any]:
        seen.append(cfg)
        out = Path(cfg.out)
        test_ds = Dataset.load(cfg.data.path).split("test")
        out.mkdir(parents=True, exist_ok=True)
        save_state_file({"image_embeds": torch.randn(len(test_ds), 4), "text_embeds": torch.randn(len(test_ds.caption_ids), 4)},
                        out / "test_embeddings.safetensors")
        gi = int(out.name[1:]) if out.parent.parent.name == "tune" else 0
        test = {k: 10.0 + cfg.seed for k in KEYS}
        return {"val": {"rsum": 100.0 + gi}, "test": {**test, "rsum": sum(test.values())}, "best": {"epoch": 1}}

    monkeypatch.setattr(Runner, "run", run)
    return seen


def test_finetune_and_set_reach_every_tuned_run_of_the_study(tmp_path: Path, synth: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    seen = _fake_runs(monkeypatch)
    out = tmp_path / "study"
    assert main(["reproduce", "flickr8k", "--data", str(synth), "--out", str(out), "--methods", ",".join(STUDY),
                 "--finetune", "top:2", "--set", "loss.center_teacher=true", "--set", "stages.*.warmup_steps=7",
                 "--seeds", "2", "--epochs", "2", "--image-teacher", "tiny-image", "--text-teacher", "tiny-text",
                 "--dev-budget", "2"]) == 0
    runs = {(Path(c.out).parent.name, Path(c.out).name): c for c in seen}
    # 3 tuned methods (infonce, cusa, icone) with 2 dev runs each (the first 2 grid points), then 2 seeds of every method
    assert len(seen) == 3 * 2 + 2 * len(STUDY) and {n for n, s in runs if s == "seed1"} == set(STUDY)
    assert {(Path(c.out).parent.name, Path(c.out).name) for c in seen if Path(c.out).parent.parent.name == "tune"} \
        == {(m, f"g{g}") for m in ("infonce", "cusa", "icone") for g in (0, 1)}
    for (name, _), c in runs.items():
        assert (c.model.image_trainable, c.model.text_trainable, c.model.cached_features) == ("top:2", "top:2", True)
        assert c.loss.center_teacher is True and c.stages[0].warmup_steps == 7, name  # --set, after the method's
        if name.startswith("icone"):  # stage I on frozen towers, stage II fine-tunes them (the paper's recipe)
            assert [s.freeze for s in c.stages] == [["towers"], []], name
            assert c.stages[1].warmup_steps == 7, name  # stages.* reaches both stages
        else:
            assert len(c.stages) == 1 and c.stages[0].freeze == [], name
    # dev choice = the last point tried; CUSA's second is the paper's own (α=0.1, β=0.5, T=1, learnable τ)
    cusa = runs[("cusa", "seed0")]
    assert (cusa.loss.csa, cusa.loss.usa, cusa.loss.tau_teacher, cusa.loss.tau_learnable) == (0.1, 0.5, 1.0, True)
    for name, (shuffle, smooth) in {"cusa": (False, False), "cusa-shuffled": (True, False),
                                    "cusa-smooth": (False, True), "infonce": (False, False)}.items():
        c = runs[(name, "seed1")]
        assert (c.teacher.shuffle, c.teacher.smooth) == (shuffle, smooth), name
    for name in ("cusa-shuffled", "cusa-smooth", "csa", "usa"):  # controls and ablations copy CUSA's choice
        c = runs[(name, "seed0")]
        assert c.teacher.image_store.endswith("image.store") and c.loss.tau_teacher == 1.0, name
    assert (runs[("csa", "seed0")].loss.usa, runs[("usa", "seed0")].loss.csa) == (0, 0)
    res = json.loads((out / "results.json").read_text())
    assert set(res) == set(STUDY)
    assert {n: r["dev_runs"] for n, r in res.items()} == {n: 2 if n in ("infonce", "cusa", "icone") else 0 for n in STUDY}
    for r in res.values():
        assert r["finetune"] == {"image": "top:2", "text": "top:2"}
        assert r["overrides"] == ["loss.center_teacher=true", "stages.*.warmup_steps=7"]
    md = (out / "results.md").read_text()
    assert "Tuned runs: fine-tuning image=top:2, text=top:2; --set loss.center_teacher=true stages.*.warmup_steps=7." in md
    assert json.loads((out / "study.json").read_text())["finetune"] == {"image": "top:2", "text": "top:2"}
    # synthetic data has no annotation files: one notice line, not silence, not an error
    err = capsys.readouterr().err
    assert err.count("human-judgment metrics are skipped") == 1
    # another regime into the same out would reuse the first one's finished runs: refused
    with pytest.raises(ConfigError, match="holds runs of another regime"):
        Reproduction(synth, out, ["infonce"], 1, 1, None, "tiny-image", "tiny-text").run()
    with pytest.raises(ConfigError, match="holds runs of another regime"):
        Reproduction(synth, out, ["infonce"], 1, 1, None, "tiny-image", "tiny-text", finetune="top:1",
                     overrides=["loss.center_teacher=true", "stages.*.warmup_steps=7"]).run()


def test_frozen_regime_and_bad_specs(tmp_path: Path, synth: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    seen = _fake_runs(monkeypatch)
    rep = Reproduction(synth, tmp_path / "f", ["icone"], 1, 2, None, "tiny-image", "tiny-text", tune=False,
                       finetune="image=frozen,text=frozen")
    rep.run()
    assert all(c.model.image_trainable == c.model.text_trainable == "frozen" for c in seen)
    assert all(s.freeze == [] for c in seen for s in c.stages)
    capsys.readouterr()
    assert json.loads((tmp_path / "f" / "results.json").read_text())["icone"]["finetune"] is None
    rep = Reproduction(synth, tmp_path / "t", ["icone"], 1, 2, None, "tiny-image", "tiny-text", tune=False,
                       finetune="text=top:1")
    c = rep.config(METHODS["icone"], [], 0, tmp_path / "x")
    assert (c.model.image_trainable, c.model.text_trainable, c.stages[0].freeze) == ("frozen", "top:1", ["towers"])
    for args, word in ((["--finetune", "top:0"], "--finetune 'top:0'"),
                       (["--set", "loss.nope=1"], "loss.nope"), (["--set", "noequals"], "noequals"),
                       (["--dev-budget", "5"], "--dev-budget 5: use 1..4")):
        assert main(["reproduce", "flickr8k", "--data", str(synth), "--out", str(tmp_path / "r"),
                     "--methods", "infonce", *args]) == 2
        err = capsys.readouterr().err
        assert word in err and err.count("\n") == 1, err
    assert not (tmp_path / "r" / "runs").exists()


# --- human judgments ---------------------------------------------------------------------------
def _f8k(tmp_path: Path, with_annotations: bool = True) -> Path:
    """A prepared Flickr8k-style dataset: 2 train, 4 test images (2 captions each), annotation
    files beside images/ judging some cross-image test pairs."""
    from PIL import Image

    root = tmp_path / "f8k"
    (root / "images").mkdir(parents=True)
    recs = []
    for k, s in enumerate(["p", "q", "a", "b", "c", "d"]):
        path = root / "images" / f"{s}.jpg"
        Image.fromarray(np.full((8, 8, 3), 30 * k, dtype=np.uint8)).save(path)
        recs.append(ImageRecord(s, path, [Caption(f"{s}.jpg#{j}", f"{s} {j}") for j in range(2)],
                                "train" if s in "pq" else "test"))
    if with_annotations:
        (root / EXPERT_FILE).write_text("a.jpg\tb.jpg#0\t3\t3\t4\nb.jpg\tc.jpg#1\t1\t2\t1\nc.jpg\ta.jpg#0\t2\t2\t3\n"
                                        "d.jpg\ta.jpg#1\t4\t4\t4\nd.jpg\tc.jpg#0\t1\t1\t2\n")
        (root / CROWDFLOWER_FILE).write_text("a.jpg\tc.jpg#0\t0.666666666666667\t2\t1\nb.jpg\ta.jpg#1\t0\t0\t3\n"
                                             "c.jpg\tb.jpg#1\t0.333333333333333\t1\t2\nd.jpg\tb.jpg#0\t1\t3\t0\n")
    Dataset(recs, name="f8k").save(root / "prepared")
    return root / "prepared"


def _finished_run(run: Path, data: Path, seed: int) -> TrainConfig:
    from itrkit.models.io import save_state_file

    rng = np.random.default_rng(seed)
    img = rng.normal(size=(4, 5)).astype(np.float32)
    txt = (np.repeat(img, 2, axis=0) + rng.normal(size=(8, 5))).astype(np.float32)
    save_state_file({"image_embeds": torch.from_numpy(img), "text_embeds": torch.from_numpy(txt)},
                    run / "test_embeddings.safetensors")
    return load_train_config(None, [f"data.path={data}", f"out={run}", f"seed={seed}"])


def test_human_metrics_of_a_run_equal_the_protocol_and_are_cached(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    data = _f8k(tmp_path)
    runner = Runner(tmp_path / "out")
    cfg = _finished_run(tmp_path / "run0", data, 0)
    got = runner.human(cfg)
    test = Dataset.load(data).split("test")
    from safetensors.numpy import load_file

    emb = load_file(str(tmp_path / "run0" / "test_embeddings.safetensors"))
    want = flickr8k_human_metrics(emb["image_embeds"], emb["text_embeds"], test)
    assert list(got) == list(HUMAN_KEYS) and got == {k: float(want[k]) for k in HUMAN_KEYS}
    assert json.loads((tmp_path / "run0" / "human.json").read_text()) == got

    def boom(*a: Any, **k: Any) -> None:
        raise AssertionError("recomputed")

    monkeypatch.setattr("itrkit.eval.protocols.flickr8k_human_metrics", boom)
    assert Runner(tmp_path / "out").human(cfg) == got  # a finished run's human.json is reused
    # aggregated and tabled: mean ± std of the human columns beside RSUM, paired Δ as before
    runs = []
    for s in range(2):
        c = _finished_run(tmp_path / f"r{s}", data, s + 5)
        monkeypatch.setattr("itrkit.eval.protocols.flickr8k_human_metrics", flickr8k_human_metrics)
        h = runner.human(c)
        runs.append({"seed": s, **{k: 20.0 + s for k in KEYS}, "rsum": 120.0 + 6 * s, **h})
    base = [{**r, "rsum": r["rsum"] - 1 + 3 * i} for i, r in enumerate(runs)]
    res = {"infonce": Runner.aggregate(base, []), "cusa": Runner.aggregate(runs, [])}
    t2i = np.array([r["f8k_human_t2i_map@r"] for r in runs])
    assert res["cusa"]["f8k_human_t2i_map@r_mean"] == pytest.approx(t2i.mean())
    assert res["cusa"]["f8k_human_t2i_map@r_std"] == pytest.approx(t2i.std(ddof=1))
    lines = results_table(res).splitlines()
    head, cusa_row = lines[0], lines[3]
    assert "human t2i mAP@R (mean ± std)" in head and "expert τc (mean ± std)" in head
    tau = np.array([r["f8k_expert_tau_c"] for r in runs])
    assert f"{t2i.mean():.1f} ± {t2i.std(ddof=1):.1f}" in cusa_row and f"{tau.mean():.1f} ± {tau.std(ddof=1):.1f}" in cusa_row
    assert "-0.5 ± 2.1 (1/1)" in cusa_row  # paired Δ RSUM: +1 and -2


def test_human_metrics_without_annotations_are_skipped_with_one_notice(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    data = _f8k(tmp_path, with_annotations=False)
    runner = Runner(tmp_path / "out")
    assert runner.human(_finished_run(tmp_path / "r0", data, 0)) == {}
    assert runner.human(_finished_run(tmp_path / "r1", data, 1)) == {}
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"no {EXPERT_FILE}" in err and "skipped" in err
    assert not (tmp_path / "r0" / "human.json").exists()
    assert runner_mod.TABLE_EXTRA[0][0] in HUMAN_KEYS


def test_rerank_de_reranks_the_same_seeds_infonce_run_of_the_study(tmp_path: Path, synth: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """``--methods rerank-de,rerank-de+cusa``: InfoNCE's seed runs are run too (the first stage),
    and re-ranker seed s has ``model.itc_run`` = InfoNCE's seed-s run, the bundled recipe, the
    study's cache; the CUSA variant gets the study's teachers."""
    import itrkit.eval.fusion as fusion_mod

    seen = _fake_runs(monkeypatch)
    monkeypatch.setattr(Runner, "grid", lambda self, d: tmp_path / "grid.store")
    monkeypatch.setattr(Runner, "_annotations", lambda self, ds, where: tmp_path)
    monkeypatch.setattr(Runner, "human", lambda self, cfg: {})  # the dual encoders' own: tested above
    asked = []

    def fake_human(runs, **kw):  # noqa: ANN001, ANN003, ANN202
        asked.append(([Path(r) for r in runs], kw["annotations_dir"]))
        return {k: float(len(asked)) for k in HUMAN_KEYS}

    monkeypatch.setattr(fusion_mod, "fusion_human_metrics", fake_human)
    out = tmp_path / "study"
    rep = Reproduction(synth, out, ["rerank-de", "rerank-de+cusa"], 2, 1, str(tmp_path / "cache"), "tiny-image",
                       "tiny-text", tune=False, finetune="top:2")
    res = rep.run()
    assert set(res) == {"infonce", "rerank-de", "rerank-de+cusa"}
    # every re-ranker seed run gets the human-judgment metrics of its own folder (test only), cached
    for m in ("rerank-de", "rerank-de+cusa"):
        for s, run in enumerate(res[m]["runs"]):
            folder = out / "runs" / m / f"seed{s}"
            assert ([folder], tmp_path) in asked and json.loads((folder / "human.json").read_text()) == \
                {k: run[k] for k in HUMAN_KEYS}
        assert "f8k_human_t2i_map@r_mean" in res[m]
    runs = {(Path(c.out).parent.name, Path(c.out).name): c for c in seen}
    assert set(runs) == {(m, f"seed{s}") for m in ("infonce", "rerank-de", "rerank-de+cusa") for s in (0, 1)}
    for m in ("rerank-de", "rerank-de+cusa"):
        for s in (0, 1):
            c = runs[(m, f"seed{s}")]
            assert c.model.name == "rerank" and c.seed == s and c.model.word_features == "minilm"
            assert c.model.itc_run == str(out / "runs" / "infonce" / f"seed{s}")
            assert c.cache_dir == str(tmp_path / "cache") and c.data.grid_store == str(tmp_path / "grid.store")
            assert bool(c.teacher.image_store) == (m == "rerank-de+cusa")
    assert runs[("rerank-de+cusa", "seed0")].loss.soft_itm > 0
    assert runs[("infonce", "seed0")].model.text_trainable == "top:2"  # the first stage is the study's own run
