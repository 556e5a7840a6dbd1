"""The top-level Python API (issue 18): ``itrkit.train``, ``itrkit.load_model``, ``itrkit.evaluate``,
``model.encode_images(paths | PIL images | arrays)`` and ``model.encode_texts``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import itrkit
from itrkit.errors import ConfigError, DataError

TINY = {"model.image_tower": "tiny-image", "model.text_tower": "tiny-text", "model.embed_dim": 32,
        "batch_size": 16, "stages.0.epochs": 2, "device": "cpu"}


@pytest.fixture(scope="module")
def run(synth_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("api") / "run"
    metrics = itrkit.train(None, TINY, data=synth_dir, out=out, progress=False)
    return out, metrics


def test_import_itrkit_loads_no_torch_until_the_api_is_used() -> None:
    code = ("import sys, itrkit; assert 'torch' not in sys.modules, 'torch at import';"
            "itrkit.load_model; assert 'itrkit.api' in sys.modules; print(sorted(itrkit.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['__version__', 'evaluate', 'load_model', 'train']"


def test_itrkit_train_is_callable_and_still_the_subpackage() -> None:
    import itrkit.train.trainer
    from itrkit.train import config, trainer

    assert callable(itrkit.train) and itrkit.train.trainer is trainer and itrkit.train.config is config
    import inspect

    params = inspect.signature(itrkit.train).parameters
    assert list(params)[:2] == ["config", "overrides"] and "resume" in params
    with pytest.raises(AttributeError):
        itrkit.no_such_thing  # noqa: B018


def test_train_returns_the_metrics_it_writes(run: tuple[Path, dict]) -> None:
    out, metrics = run
    import json

    assert metrics["test"] == json.loads((out / "metrics.json").read_text())["test"]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert (cfg["model"]["image_tower"], cfg["model"]["embed_dim"], cfg["stages"][0]["epochs"]) == ("tiny-image", 32, 2)


def test_overrides_as_list_dict_and_double_underscore_keywords_agree(synth_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import itrkit.train.trainer as trainer_mod

    seen = []
    monkeypatch.setattr(trainer_mod, "train", lambda cfg, **kw: seen.append(cfg) or {})
    itrkit.train("infonce", ["loss.csa=0.5", "stages.0.epochs=1"], data=synth_dir, out=tmp_path / "a")
    itrkit.train("infonce", {"loss.csa": 0.5, "stages.0.epochs": 1}, data=synth_dir, out=tmp_path / "a")
    itrkit.train("infonce", data=synth_dir, out=tmp_path / "a", loss__csa=0.5, stages__0__epochs=1)
    a, b, c = seen
    assert a == b == c
    assert (a.loss.csa, a.stages[0].epochs, a.data.path, a.out) == (0.5, 1, str(synth_dir), str(tmp_path / "a"))
    itrkit.train(a, {"loss.usa": 0.25})  # a TrainConfig, with overrides on top
    assert seen[-1].loss.usa == 0.25 and seen[-1].loss.csa == 0.5
    itrkit.train({"loss": {"csa": 0.75}, "out": str(tmp_path / "d")}, data=synth_dir)  # a dict as a YAML file
    assert seen[-1].loss.csa == 0.75 and seen[-1].out == str(tmp_path / "d")
    with pytest.raises(ConfigError, match="batch_sise"):
        itrkit.train(None, {"batch_sise": 4}, data=synth_dir)
    with pytest.raises(ConfigError, match="must be a path"):
        itrkit.train(3)


def test_load_model_and_evaluate_agree_with_the_run(run: tuple[Path, dict], synth_dir: Path) -> None:
    from itrkit.models.dual_encoder import DualEncoder

    out, metrics = run
    model = itrkit.load_model(out)
    assert isinstance(model, DualEncoder) and not model.training
    by_run = itrkit.evaluate(out)  # data: the run's own
    by_model = itrkit.evaluate(model, synth_dir, split="test")
    for k, v in metrics["test"].items():
        assert by_run[k] == pytest.approx(v, abs=1e-9) and by_model[k] == pytest.approx(v, abs=1e-9), k
    with pytest.raises(ConfigError, match="data="):
        itrkit.evaluate(model)


def test_evaluate_on_a_model_matches_a_bare_numpy_recall_at_1(run: tuple[Path, dict], synth_dir: Path) -> None:
    from itrkit.data.records import Dataset

    model = itrkit.load_model(run[0])
    ds = Dataset.load(synth_dir).split("test")
    img = model.encode_images([r.path for r in ds.records])
    txt = model.encode_texts(ds.texts)
    owner = np.asarray(ds.txt2img)
    t2i_r1 = 100.0 * np.mean(np.argmax(txt @ img.T, axis=1) == owner)  # ties: first index, as itrkit
    assert itrkit.evaluate(model, synth_dir)["t2i_R@1"] == pytest.approx(t2i_r1, abs=1e-6)


def test_encode_images_takes_paths_pil_images_and_arrays_alike(run: tuple[Path, dict], synth_dir: Path) -> None:
    from itrkit.data.records import Dataset

    model = itrkit.load_model(run[0])
    paths = [r.path for r in Dataset.load(synth_dir).records[:3]]
    ref = model.encode_images([str(p) for p in paths])
    pil = [Image.open(p).convert("RGB") for p in paths]
    u8 = [np.asarray(im) for im in pil]
    assert ref.shape == (3, 32) and ref.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ref, axis=1), 1.0, atol=1e-5)
    for variant in (paths, pil, u8, np.stack(u8), [a.astype(np.float32) / 255 for a in u8],
                    [np.moveaxis(a, -1, 0) for a in u8]):
        np.testing.assert_allclose(model.encode_images(variant), ref, atol=1e-6)
    np.testing.assert_allclose(model.encode_images(paths[0]), ref[:1], atol=1e-6)  # one image alone
    np.testing.assert_allclose(model.encode_images(pil[1]), ref[1:2], atol=1e-6)
    np.testing.assert_allclose(model.encode_texts("a red circle"), model.encode_texts(["a red circle"]), atol=0)
    assert model.encode_images([]).shape == (0, 32)
    with pytest.raises(DataError, match="shape"):
        model.encode_images([np.zeros((5, 5, 7), np.uint8)])
