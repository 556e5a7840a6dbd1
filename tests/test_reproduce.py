"""`itrkit reproduce` end to end on the synthetic set: paired seeds, choices carried between
methods (IConE+CUSA = IConE's choice + CUSA terms in stage II), results files, and resumability
(a second invocation reuses every finished run instead of training again)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from itrkit.cli import main


def _reproduce(synth_dir: Path, out: Path) -> int:
    return main(["reproduce", "flickr8k", "--data", str(synth_dir), "--out", str(out), "--methods",
                 "infonce,icone+cusa", "--seeds", "2", "--epochs", "2", "--no-tune", "--choice", "icone=2",
                 "--image-teacher", "tiny-image", "--text-teacher", "tiny-text"])


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough training pairs for the recipes' batch of 128."""
    from itrkit.data.synthetic import make_synthetic

    out = tmp_path_factory.mktemp("synth-repro")
    make_synthetic(out, n_images=90, captions_per_image=3, seed=2, size=64)
    return out


def test_reproduce_runs_carries_choices_and_resumes(tmp_path: Path, synth_dir: Path,
                                                    capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "repro"
    monkeypatch.setenv("ITRKIT_PROGRESS", "lines")  # what a log file gets (nohup, CI)
    monkeypatch.setenv("ITRKIT_PROGRESS_SECONDS", "0")
    assert _reproduce(synth_dir, out) == 0
    err = capsys.readouterr().err  # a multi-hour study says what it is doing (--quiet: nothing)
    assert "[itrkit]" in err and "%" in err, err[-2000:]
    res = json.loads((out / "results.json").read_text())
    # icone+cusa copies IConE's choice; IConE itself is not asked for: its choice (grid point 2,
    # given by --choice) is taken without training it.
    assert set(res) == {"infonce", "icone+cusa"}
    assert not (out / "runs" / "icone").exists() and not (out / "tune").exists()
    for name, r in res.items():
        assert [x["seed"] for x in r["runs"]] == [0, 1]
        rs = [x["rsum"] for x in r["runs"]]
        assert r["rsum_mean"] == pytest.approx(sum(rs) / 2) and all(0 <= v <= 600 for v in rs), name
    assert res["icone+cusa"]["chosen"] == ["stages.1.loss={contrastive: 1.0, instance: 0.1}",
                                           "stages.1.loss.csa=1.0", "stages.1.loss.usa=1.0", "loss.tau_teacher=0.1"]
    cfg = yaml.safe_load((out / "runs" / "icone+cusa" / "seed1" / "config.yaml").read_text())
    assert [s["name"] for s in cfg["stages"]] == ["stage1", "stage2"]
    assert cfg["stages"][1]["loss"] == {"contrastive": 1.0, "instance": 0.1, "csa": 1.0, "usa": 1.0}
    assert cfg["seed"] == 1 and cfg["teacher"]["image_store"].endswith("image.store")
    for f in ("results.md", "results.png", "timings.json"):
        assert (out / f).stat().st_size > 0
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/metrics.json")}
    assert len(stamps) == 4
    timings = json.loads((out / "timings.json").read_text())
    assert timings["infonce"] > 0 and timings["icone+cusa"] > 0
    capsys.readouterr()
    assert _reproduce(synth_dir, out) == 0  # everything finished: nothing is trained again
    assert {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/metrics.json")} == stamps
    assert json.loads((out / "timings.json").read_text()) == timings  # a reused method keeps its time
    assert json.loads((out / "results.json").read_text())["icone+cusa"]["runs"] == res["icone+cusa"]["runs"]


def test_bad_choice_is_one_line_error(tmp_path: Path, synth_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for bad, word in (("icone=9", "grid points 0..3"), ("icone", "METHOD=GRID_INDEX"), ("nope=0", "unknown method")):
        assert main(["reproduce", "flickr8k", "--data", str(synth_dir), "--out", str(tmp_path / "r"),
                     "--methods", "infonce", "--choice", bad]) == 2
        err = capsys.readouterr().err
        assert word in err and err.count("\n") == 1, err
    assert not (tmp_path / "r" / "runs").exists()


def test_seed0_of_a_tuned_method_is_its_dev_run_linked_and_equal_to_training_it(
        tmp_path: Path, synth_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The chosen grid point's dev run is seed 0 (same config but ``out``): it is hard-linked, not
    trained again, and training that config afresh gives the same test metrics and embeddings."""
    import dataclasses

    from safetensors.numpy import load_file

    from itrkit.experiments.flickr8k import Reproduction
    from itrkit.experiments.methods import METHODS
    from itrkit.experiments.runner import Runner

    monkeypatch.setattr(METHODS["infonce"], "grid", METHODS["infonce"].grid[:2])  # two dev runs are enough here
    out = tmp_path / "repro"
    rep = Reproduction(synth_dir, out, ["infonce"], 1, 1, str(tmp_path / "cache"), "tiny-image", "tiny-text",
                       overrides=["model.image_tower=tiny-image", "model.text_tower=tiny-text"])
    res = rep.run()
    dev_rsums = [json.loads((out / "tune" / "infonce" / f"g{g}" / "metrics.json").read_text())["val"]["rsum"]
                 for g in (0, 1)]
    chosen = out / "tune" / "infonce" / f"g{dev_rsums.index(max(dev_rsums))}"
    seed0 = out / "runs" / "infonce" / "seed0"
    for f in ("metrics.json", "test_embeddings.safetensors", "model/model.safetensors", "train.log"):
        assert (seed0 / f).stat().st_ino == (chosen / f).stat().st_ino, f  # linked, not trained again
    assert not (seed0 / "checkpoints").exists() and not list(out.glob("runs/infonce/.*"))
    assert yaml.safe_load((seed0 / "config.yaml").read_text())["out"] == str(seed0)
    assert res["infonce"]["runs"][0]["rsum"] == json.loads((chosen / "metrics.json").read_text())["test"]["rsum"]
    # the slow reference: the same config trained from scratch in another folder
    cfg = rep.config(METHODS["infonce"], rep.choices["infonce"], 0, tmp_path / "fresh")
    fresh = Runner(tmp_path / "x").run(cfg)
    assert fresh["test"] == json.loads((seed0 / "metrics.json").read_text())["test"]
    a, b = load_file(str(seed0 / "test_embeddings.safetensors")), load_file(str(tmp_path / "fresh" / "test_embeddings.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)
    # another config (here: another seed) is never adopted; nor is a folder that exists already
    assert not rep.adopt_dev_run(METHODS["infonce"], dataclasses.replace(cfg, seed=1, out=str(tmp_path / "s1")))
    assert not rep.adopt_dev_run(METHODS["infonce"], dataclasses.replace(cfg, out=str(seed0)))
    assert not (tmp_path / "s1").exists()
