"""Training on a configured device: every tensor a training step feeds to the model and to the
loss is on that device (forward hooks asserting ``.device``), the loss modules' temperatures and
buffers live there too, each batch goes through ``move_to`` to it, ``device: cpu`` trains bitwise
what the code trained before (the golden metrics), and an unavailable device is one line naming
it, with nothing written.

This machine may have no GPU: the hook test runs on every device torch sees (the CPU always, CUDA
and MPS where present: run this file on a GPU machine for the CUDA case), and ``move_to``'s calls
are recorded so the CPU case still proves each batch was sent to the configured device.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from itrkit.errors import ItrkitError
from itrkit.train import trainer as trainer_mod
from itrkit.train.trainer import Trainer
from itrkit.utils import device as dev
from itrkit.utils.device import DeviceError

from ..test_golden import CASES, GOLDEN, golden_inputs  # noqa: F401 (a fixture)
from .conftest import tiny_config


def _devices() -> list[str]:
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    if dev.mps_available():
        out.append("mps")
    return out


def _tensors(x: Any, path: str = "") -> list[tuple[str, torch.Tensor]]:
    """Every tensor inside hook arguments (dicts, sequences, dataclasses such as FusionBatch)."""
    if isinstance(x, torch.Tensor):
        return [(path, x)]
    if isinstance(x, dict) or hasattr(x, "items") and callable(x.items):
        return [t for k, v in x.items() for t in _tensors(v, f"{path}.{k}")]
    if isinstance(x, list | tuple):
        return [t for i, v in enumerate(x) for t in _tensors(v, f"{path}[{i}]")]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return [t for f in dataclasses.fields(x) for t in _tensors(getattr(x, f.name), f"{path}.{f.name}")]
    return []


class DeviceAudit:
    """Forward pre-hooks on every module of the model and of the loss recording each tensor input's
    device, and a spy on the trainer's ``move_to``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, want: torch.device) -> None:
        self.want = want
        self.wrong: list[str] = []
        self.inputs = 0
        self.moves: list[torch.device] = []
        self.modules: list[str] = []
        orig_build, audit = Trainer._build, self

        def build(tr: Trainer) -> None:
            orig_build(tr)
            for top, mod in (("model", tr.task.model), ("loss", tr.task.loss)):
                for name, m in mod.named_modules():
                    audit.modules.append(f"{top}.{name}")
                    m.register_forward_pre_hook(audit.hook(f"{top}.{name}" if name else top), with_kwargs=True)
            audit.task = tr.task

        orig_move = trainer_mod.move_to

        def move(obj: Any, device: Any, non_blocking: bool = False) -> Any:
            audit.moves.append(torch.device(device))
            return orig_move(obj, device, non_blocking=non_blocking)

        monkeypatch.setattr(Trainer, "_build", build)
        monkeypatch.setattr(trainer_mod, "move_to", move)

    def hook(self, name: str) -> Any:
        def check(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            if not module.training:  # validation / test embedding: checked by the embeddings' own path
                return
            for where, t in _tensors((args, kwargs)):
                self.inputs += 1
                if t.device.type != self.want.type or (self.want.index is not None and t.device != self.want):
                    self.wrong.append(f"{name}{where}: {t.device}")
        return check


def _check_params(audit: DeviceAudit) -> None:
    for top, mod in (("model", audit.task.model), ("loss", audit.task.loss)):
        for n, t in [*mod.named_parameters(), *mod.named_buffers()]:
            assert t.device.type == audit.want.type, f"{top}.{n} on {t.device}"


@pytest.mark.parametrize("device", _devices())
def test_every_tensor_entering_model_and_loss_is_on_the_device_dual_encoder(
        tmp_path: Path, synth_dir: Path, teacher_stores: list[str], monkeypatch: pytest.MonkeyPatch,
        device: str) -> None:
    want = dev.resolve_device(device)
    audit = DeviceAudit(monkeypatch, want)
    # CUSA (teacher rows), instance (labels), learnable temperatures, a trunk: every kind of batch entry.
    cfg = tiny_config(tmp_path / "r", synth_dir, f"device={device}", "stages.0.epochs=1", "model.trunk=mlp",
                      "model.usa_heads=true", "loss.csa=1", "loss.usa=1", "loss.instance=0.5",
                      "loss.tau_teacher=0.1", *teacher_stores)
    m = Trainer(cfg, progress=False).fit()
    assert m["test"]["rsum"] > 0
    steps = m["steps"]
    assert audit.moves == [want] * steps  # each training batch went to the configured device
    assert audit.inputs > 10 * steps and not audit.wrong, audit.wrong[:5]
    assert "loss.cusa" in audit.modules and "loss.instance" in audit.modules
    _check_params(audit)


@pytest.fixture(scope="module")
def grid_store(tmp_path_factory: pytest.TempPathFactory, synth_dir: Path) -> str:
    from itrkit.data.records import Dataset

    from ..conftest import pixel_grid_store

    return str(pixel_grid_store(Dataset.load(synth_dir), tmp_path_factory.mktemp("grid") / "grid.store"))


@pytest.mark.parametrize("device", _devices())
def test_every_tensor_entering_model_and_loss_is_on_the_device_fusion(
        tmp_path: Path, synth_dir: Path, teacher_stores: list[str], grid_store: str,
        monkeypatch: pytest.MonkeyPatch, device: str) -> None:
    from itrkit.train.config import load_train_config

    want = dev.resolve_device(device)
    audit = DeviceAudit(monkeypatch, want)
    sets = ["model.name=sgr", "model.embed_dim=16", "model.sim_dim=8", "model.word_dim=16", "model.text_hidden=16",
            "model.sgr_steps=2", "model.word_init=random", "batch_size=16", "stages.0.epochs=1", "threads=1",
            "loss.contrastive=0", "loss.triplet=1", "loss.csa=1", "loss.tau_teacher=0.1", "data.max_val_images=20",
            "data.max_test_images=20", f"data.grid_store={grid_store}", f"data.path={synth_dir}",
            f"out={tmp_path / 'r'}", f"device={device}", *teacher_stores]
    m = Trainer(load_train_config(None, sets), progress=False).fit()
    assert m["test"]["rsum"] > 0
    assert audit.moves == [want] * m["steps"]
    assert audit.inputs > 5 * m["steps"] and not audit.wrong, audit.wrong[:5]
    _check_params(audit)


@pytest.mark.parametrize("name", ["infonce", "cusa", "sgr_cusa"])
def test_device_cpu_trains_bitwise_what_it_trained_before(
        name: str, golden_inputs: dict[str, str], tmp_path: Path) -> None:  # noqa: F811
    from itrkit.cli import main

    argv, sets = CASES[name]
    out = tmp_path / name
    args = [*argv, "--data", golden_inputs["data"], "--out", str(out), "--quiet", "--set", "device=cpu"]
    for s in sets:
        args += ["--set", s.format(**golden_inputs)]
    assert main(args) == 0
    got = json.loads((out / "metrics.json").read_text())
    want = json.loads(GOLDEN.read_text())[name]  # recorded before the device work, see tests/test_golden.py
    assert got["val"] == want["val"] and got["test"] == want["test"]  # exact float equality
    assert yaml_device(out) == "cpu"


def yaml_device(run: Path) -> str:
    import yaml

    return yaml.safe_load((run / "config.yaml").read_text())["device"]


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "mps_available", lambda: False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


@pytest.mark.parametrize("spec", ["cuda", "cuda:1", "mps", "gpu"])
def test_an_unavailable_device_is_one_line_before_anything_is_written(
        no_gpu: None, tmp_path: Path, synth_dir: Path, spec: str) -> None:
    out = tmp_path / "run"
    with pytest.raises(DeviceError) as info:
        Trainer(tiny_config(out, synth_dir, f"device={spec}"), progress=False).fit()
    assert isinstance(info.value, ItrkitError) and "\n" not in str(info.value) and repr(spec) in str(info.value)
    assert not out.exists()


def test_device_cuda_through_the_cli_exits_2_with_one_line_and_no_run_folder(
        no_gpu: None, tmp_path: Path, synth_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from itrkit.cli import main

    out = tmp_path / "run"
    code = main(["train", "--data", str(synth_dir), "--out", str(out), "--quiet", "--set", "device=cuda",
                 "--set", "model.image_tower=tiny-image", "--set", "model.text_tower=tiny-text"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: device 'cuda' is not available: torch"), err
    assert not out.exists()


def test_compile_is_opt_in_and_keeps_parameter_and_checkpoint_names(tmp_path: Path, synth_dir: Path) -> None:
    # Only the wrapping is checked here (compiling the first step takes ~30 s on two CPU cores; the
    # compiled run trains to the same validation RSUM, measured once by hand).
    names = {}
    for flag in ("false", "true"):
        tr = Trainer(tiny_config(tmp_path / flag, synth_dir, f"compile={flag}"), progress=False)
        tr._build()
        fwd = tr.module._forward_model[0]
        assert (fwd is tr.module.model) == (flag == "false")
        assert (type(fwd).__name__ == "OptimizedModule") == (flag == "true")
        names[flag] = [n for n, _ in tr.module.named_parameters()], sorted(tr.module.state_dict())
    assert names["true"] == names["false"]
