"""``--device``: auto/cpu/cuda/cuda:N/mps resolve as documented, torchrun's LOCAL_RANK picks the GPU,
an unavailable or malformed device is one line naming it, and ``move_to`` moves nested batches.

This machine has no GPU, so CUDA's presence is simulated by patching ``torch.cuda``'s queries;
the real ``torch.device`` objects and error paths are exercised either way.
"""

from __future__ import annotations

import argparse
from collections import OrderedDict, namedtuple

import pytest
import torch

from itrkit.errors import ItrkitError
from itrkit.utils import device as dev
from itrkit.utils.device import DeviceError, add_device_argument, move_to, resolve_device


@pytest.fixture
def no_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dev, "mps_available", lambda: False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)


@pytest.fixture
def four_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(dev, "mps_available", lambda: True)  # CUDA still wins over MPS in auto
    monkeypatch.delenv("LOCAL_RANK", raising=False)


def test_auto_without_any_gpu_is_the_cpu(no_gpu: None) -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device() == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_auto_prefers_mps_when_there_is_no_cuda(no_gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dev, "mps_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    assert resolve_device("mps") == torch.device("mps")


@pytest.mark.parametrize("spec", ["cuda", "cuda:0", "cuda:1"])
def test_cuda_without_cuda_is_one_line_naming_the_device(no_gpu: None, spec: str) -> None:
    with pytest.raises(DeviceError) as info:
        resolve_device(spec)
    msg = str(info.value)
    assert msg.startswith(f"device {spec!r} is not available: torch {torch.__version__}") and "\n" not in msg
    assert isinstance(info.value, ItrkitError)  # the CLI prints it and exits 2


def test_mps_without_mps_is_one_line_naming_the_device(no_gpu: None) -> None:
    with pytest.raises(DeviceError, match=r"^device 'mps' is not available"):
        resolve_device("mps")


@pytest.mark.parametrize("spec", ["gpu", "cuda:", "cuda:-1", "cuda:x", "cuda:0:1", "", "tpu", "cpu:0x"])
def test_malformed_devices_are_refused_with_the_accepted_forms(no_gpu: None, spec: str) -> None:
    with pytest.raises(DeviceError) as info:
        resolve_device(spec)
    assert str(info.value) == f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps"


def test_with_gpus_auto_and_cuda_are_the_current_gpu_and_cuda_n_is_kept(four_gpus: None) -> None:
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("cuda") == torch.device("cuda", 0)
    assert resolve_device(" CUDA:3 ") == torch.device("cuda", 3)
    assert resolve_device(torch.device("cuda", 2)) == torch.device("cuda", 2)


def test_a_gpu_index_past_the_visible_ones_names_the_range(four_gpus: None) -> None:
    with pytest.raises(DeviceError) as info:
        resolve_device("cuda:4")
    assert str(info.value) == "device 'cuda:4' is not available: 4 CUDA GPU(s) visible (cuda:0..cuda:3)"


def test_under_torchrun_auto_and_cuda_mean_cuda_local_rank(four_gpus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert resolve_device("auto") == torch.device("cuda", 2)
    assert resolve_device("cuda") == torch.device("cuda", 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1)  # an explicit index is the user's choice
    assert resolve_device("cpu") == torch.device("cpu")


def test_under_torchrun_without_cuda_auto_is_the_cpu(no_gpu: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "1")  # gloo ranks on a CPU machine, as in tests/train/test_ddp.py
    assert resolve_device("auto") == torch.device("cpu")


def test_under_torchrun_more_ranks_than_gpus_is_one_line(four_gpus: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOCAL_RANK", "5")
    with pytest.raises(DeviceError) as info:
        resolve_device("cuda")
    assert str(info.value) == "device 'cuda' under torchrun: LOCAL_RANK=5 but only 4 CUDA GPU(s) are visible"


@pytest.mark.parametrize("raw", ["x", "-1", "1.5"])
def test_a_malformed_local_rank_is_one_line(four_gpus: None, monkeypatch: pytest.MonkeyPatch, raw: str) -> None:
    monkeypatch.setenv("LOCAL_RANK", raw)
    with pytest.raises(DeviceError) as info:
        resolve_device("auto")
    assert str(info.value) == f"LOCAL_RANK={raw!r} is not a non-negative integer"


def test_device_argument_defaults_to_auto() -> None:
    p = argparse.ArgumentParser()
    add_device_argument(p)
    assert p.parse_args([]).device == "auto"
    assert p.parse_args(["--device", "cuda:1"]).device == "cuda:1"


Pair = namedtuple("Pair", "images ids")


def test_move_to_moves_every_tensor_of_a_nested_batch_and_keeps_the_rest() -> None:
    meta = torch.device("meta")  # a real second device on a CPU-only machine
    batch = {
        "images": torch.zeros(2, 3),
        "text": OrderedDict(input_ids=torch.ones(2, 4, dtype=torch.long), mask=[torch.ones(2), "keep"]),
        "pair": Pair(torch.zeros(1), 7),
        "tuple": (torch.zeros(1), None, 1.5),
        "names": ["a", "b"],
    }
    out = move_to(batch, meta)
    assert out["images"].device == meta and out["images"].shape == (2, 3)
    assert isinstance(out["text"], OrderedDict) and out["text"]["input_ids"].device == meta
    assert out["text"]["input_ids"].dtype == torch.long
    assert out["text"]["mask"][0].device == meta and out["text"]["mask"][1] == "keep"
    assert isinstance(out["pair"], Pair) and out["pair"].images.device == meta and out["pair"].ids == 7
    assert isinstance(out["tuple"], tuple) and out["tuple"][1:] == (None, 1.5)
    assert out["names"] == ["a", "b"]
    assert batch["images"].device == torch.device("cpu")  # the input is not modified


def test_move_to_the_same_device_returns_the_same_tensors() -> None:
    x = torch.arange(3)
    assert move_to({"x": x}, "cpu")["x"] is x


def test_move_to_pins_host_memory_only_for_a_non_blocking_copy_to_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, object]] = []

    class Spy(torch.Tensor):
        # Records pin_memory / to instead of touching a GPU this machine does not have.
        def pin_memory(self, *a, **k):  # type: ignore[override]
            calls.append(("pin", None))
            return self

        def is_pinned(self, *a, **k):  # type: ignore[override]
            return False

        def to(self, *a, **k):  # type: ignore[override]
            calls.append(("to", (str(a[0]), k.get("non_blocking"))))
            return self

    x = torch.zeros(2).as_subclass(Spy)
    move_to([x], "cuda:1", non_blocking=True)
    assert calls == [("pin", None), ("to", ("cuda:1", True))]
    calls.clear()
    move_to([x], "cuda:1")  # blocking: no pinning
    assert calls == [("to", ("cuda:1", False))]
    calls.clear()
    move_to([x], "meta", non_blocking=True)  # not CUDA: no pinning, and a blocking copy
    assert calls == [("to", ("meta", False))]


def test_train_with_device_cuda_on_a_machine_without_cuda_exits_2_writing_nothing(
        no_gpu: None, tmp_path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest) -> None:
    from itrkit.cli import build_parser, main

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if not any("--device" in a.option_strings for a in sub.choices["train"]._actions):
        pytest.skip("itrkit train has no --device option yet (itrkit.utils.device.add_device_argument)")
    data = request.getfixturevalue("synth_dir")
    out = tmp_path / "run"
    code = main(["train", "--data", str(data), "--out", str(out), "--device", "cuda", "--quiet",
                 "--set", "model.image_tower=tiny-image", "--set", "model.text_tower=tiny-text"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: device 'cuda' is not available"), err
    assert not out.exists()


def test_move_to_moves_the_tensor_fields_of_a_dataclass_batch_and_keeps_the_original() -> None:
    from itrkit.models.fusion_base import FusionBatch

    meta = torch.device("meta")
    b = FusionBatch(regions=torch.zeros(2, 3, 4), tokens=torch.ones(2, 5, dtype=torch.long),
                    lengths=torch.tensor([5, 3]), img_ids=torch.tensor([0, 1]), t_img=torch.zeros(2, 8))
    out = move_to(b, meta)
    assert isinstance(out, FusionBatch) and out is not b
    assert all(getattr(out, f).device == meta for f in ("regions", "tokens", "lengths", "img_ids", "t_img"))
    assert out.t_txt is None and out.tokens.dtype == torch.long and out.regions.shape == (2, 3, 4)
    assert b.regions.device == torch.device("cpu")


def test_without_a_process_group_the_sharding_helpers_are_the_identity() -> None:
    assert dev.work_ranks() == (0, 1)
    with dev.every_rank():
        assert dev.work_ranks() == (0, 1)
    x = torch.arange(6.0).reshape(2, 3)
    assert dev.all_gather_tensor(x)[0].equal(x) and dev.all_gather_tensor(None) == [None]
    assert dev.broadcast_flags([True, False]) == [True, False] and dev.all_agree(False) is False
    got = list(dev.sharded([1, 2, 3], lambda units: (torch.tensor([u * 10]) for u in units)))
    assert [(u, int(t)) for u, t in got] == [(1, 10), (2, 20), (3, 30)]


@pytest.mark.parametrize("cmd", ["teach", "grid", "index build", "demo", "reproduce", "report"])
def test_every_computing_command_with_device_cuda_and_no_cuda_exits_2_writing_nothing(
        no_gpu: None, tmp_path, capsys: pytest.CaptureFixture[str], request: pytest.FixtureRequest, cmd: str) -> None:
    from itrkit.cli import main

    data = str(request.getfixturevalue("synth_dir"))
    out = tmp_path / "out"
    argv = {"teach": ["teach", "--data", data, "--out", str(out), "--image-teacher", "tiny-image",
                      "--text-teacher", "tiny-text"],
            "grid": ["grid", data, "--out", str(out)],
            "index build": ["index", "build", "--run", str(tmp_path / "no-run"), "--images", data, "--out", str(out)],
            "demo": ["demo", "--out", str(out), "--quick"],
            "reproduce": ["reproduce", "flickr8k", "--data", data, "--out", str(out), "--methods", "infonce"],
            "report": ["report", str(tmp_path / "no-run"), "--out", str(out)]}[cmd]
    code = main([*argv, "--device", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: device 'cuda' is not available"), err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == []
