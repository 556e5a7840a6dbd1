"""GradCache (``chunk_size``): a chunked step's gradients equal the full-batch step's.

The references are independent: one ordinary backward through the whole batch (float64), one
process on the whole batch for the 2-rank run, and the unchunked training run for the trainer.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file
from torch import nn

from itrkit.errors import ConfigError
from itrkit.models.dual_encoder import ModelConfig, build_model
from itrkit.train.config import TrainConfig, load_train_config
from itrkit.train.gradcache import GradCache, check_supported, chunk_batch, slice_rows
from itrkit.train.objective import Objective
from itrkit.train.tasks import DualEncoderTask, TrainingTask
from itrkit.train.trainer import TrainModule, train

from .conftest import tiny_config

B = 16
# Image 7 has captions in several chunks (and on both ranks): positives span chunks.
IDS = [7, 1, 7, 2, 3, 3, 4, 5, 7, 6, 8, 9, 9, 10, 11, 1]
WORDS = "a dog runs on the grass while two children play near a red boat".split()

LOSSES = {
    "infonce": {"contrastive": 1.0},
    "triplet": {"contrastive": 0.0, "triplet": 1.0},
    "csa": {"contrastive": 0.0, "csa": 1.0},
    "usa": {"contrastive": 0.0, "usa": 1.0},
    "instance": {"contrastive": 0.0, "instance": 1.0},
    "all": {"contrastive": 1.0, "triplet": 0.5, "csa": 2.0, "usa": 3.0, "instance": 0.7},
}


class _Task(TrainingTask):
    """The dual encoder's loss path (gather keys, Objective) around a given model."""

    family = "dual_encoder"
    gather_keys = DualEncoderTask.gather_keys
    batch_gather_keys = DualEncoderTask.batch_gather_keys

    def __init__(self, model: nn.Module, loss: nn.Module) -> None:
        self.model, self.loss = model, loss

    def compute(self, out: dict[str, torch.Tensor], batch: Any) -> dict[str, torch.Tensor]:
        return self.loss(out, batch)


def _module(weights: dict[str, float], dropout: float = 0.0, gather: bool = False,
            dtype: torch.dtype = torch.float64, precision: str = "fp32") -> TrainModule:
    """A float64 (default) dual encoder with live trainable tiny towers, MLP trunks and USA heads."""
    cfg = TrainConfig()
    cfg.model = ModelConfig(image_tower="tiny-image", text_tower="tiny-text", image_trainable="all",
                            text_trainable="all", cached_features=False, embed_dim=8, trunk="mlp",
                            trunk_hidden=16, usa_heads=True, usa_dim=6)
    for k, v in {"contrastive": 0.0, **weights}.items():
        setattr(cfg.loss, k, v)
    cfg.loss.tau_teacher = 0.1
    torch.manual_seed(0)
    model = build_model(cfg.model)
    if dropout:  # test-only: dropout after the trunks, so the two passes must draw the same masks
        model.image_trunk = nn.Sequential(model.image_trunk, nn.Dropout(dropout))
        model.text_trunk = nn.Sequential(model.text_trunk, nn.Dropout(dropout))
    model.train()
    loss = Objective(cfg, num_classes=12, embed_dim=8)
    loss.set_weights(cfg.weights(cfg.stages[0]))
    if loss.instance is not None:
        with torch.no_grad():  # a classifier away from zero, so its gradient is not trivial
            loss.instance.classifier.normal_()
    return TrainModule(_Task(model.to(dtype), loss.to(dtype)), gather=gather, precision=precision)


def _batch(model: nn.Module, rows: slice = slice(None), dtype: torch.dtype = torch.float64) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    captions = [" ".join(WORDS[(3 * i) % 7:(3 * i) % 7 + 2 + i % 5]) for i in range(B)]
    full = {
        "img_ids": torch.tensor(IDS), "labels": torch.tensor(IDS) % 12,
        "image_inputs": torch.randn(B, 3, 32, 32, generator=g, dtype=dtype),
        "teacher_image": torch.randn(B, 10, generator=g, dtype=dtype),
        "teacher_text": torch.randn(B, 7, generator=g, dtype=dtype),
    }
    out = {k: v[rows] for k, v in full.items()}
    out["text_inputs"] = model.text_tower.prepare(captions[rows])
    return out


def _grads(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None}


def _full_step(module: TrainModule, batch: dict[str, Any]) -> tuple[float, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    loss = sum(module(batch).values())
    loss.backward()
    return float(loss.detach()), _grads(module)


def _chunked_step(module: TrainModule, batch: dict[str, Any], k: int, world: int = 1,
                  replay: bool = True) -> tuple[float, dict[str, torch.Tensor]]:
    module.zero_grad(set_to_none=True)
    gc = GradCache(module, k, world)
    gc.replay_rng = replay
    terms, backward = gc.forward(batch)
    loss = sum(terms.values())
    backward(loss)
    return float(loss.detach()), _grads(module)


def _assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    assert got.keys() == want.keys(), what
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-8, atol=1e-10, msg=f"{what}: {n}")


@pytest.mark.parametrize("name", list(LOSSES))
def test_chunked_step_gradients_equal_the_full_batch_step(name: str) -> None:
    module = _module(LOSSES[name])
    batch = _batch(module.model)
    loss_ref, ref = _full_step(module, batch)
    # Towers, trunks, heads and the loss modules' parameters all get a gradient.
    assert any(n.startswith("model.image_tower.") for n in ref) and any(n.startswith("model.text_tower.") for n in ref)
    if name in ("instance", "all"):
        assert "loss.instance.classifier" in ref
    loss, got = _chunked_step(module, batch, 5)  # 5 + 5 + 5 + 1 rows: uneven, a one-row chunk
    assert loss == pytest.approx(loss_ref, rel=1e-12)
    _assert_same(got, ref, name)


def test_rng_replay_gives_the_same_dropout_masks_and_is_needed() -> None:
    """With dropout, GradCache equals a full-graph backward through the same chunk-wise forwards
    (same seed, same masks); without replaying the RNG state the gradients are wrong."""
    module = _module(LOSSES["all"], dropout=0.3)
    batch = _batch(module.model)
    module.zero_grad(set_to_none=True)
    torch.manual_seed(5)
    outs = [module.encode(part) for _, _, part in chunk_batch(batch, 4)]
    full = {k: torch.cat([o[k] for o in outs]) for k in outs[0]}
    loss_ref = sum(module.losses(full, batch).values())
    loss_ref.backward()
    ref = _grads(module)
    torch.manual_seed(5)
    loss, got = _chunked_step(module, batch, 4)
    assert loss == pytest.approx(float(loss_ref.detach()), rel=1e-12)
    _assert_same(got, ref, "dropout, replayed")
    torch.manual_seed(5)
    _, wrong = _chunked_step(module, batch, 4, replay=False)
    assert max(float((wrong[n] - ref[n]).abs().max()) for n in ref) > 1e-3


def test_slicing_cuts_embedding_bag_inputs_at_their_offsets() -> None:
    module = _module(LOSSES["infonce"])
    batch = _batch(module.model)
    parts = [slice_rows(batch, B, s, min(s + 6, B)) for s in range(0, B, 6)]
    tower = module.model.text_tower
    whole = tower(batch["text_inputs"])
    # To float32 rounding: the bag sums of a slice may run in another order (wrong offsets differ by O(1)).
    torch.testing.assert_close(torch.cat([tower(p["text_inputs"]) for p in parts]), whole, rtol=1e-5, atol=1e-6)
    assert [len(p["img_ids"]) for p in parts] == [6, 6, 4]
    # Tokenizer-style (B, L) inputs and per-row lists are cut by rows; other entries pass through.
    tok = {"input_ids": torch.arange(B * 3).view(B, 3), "attention_mask": torch.ones(B, 3), "ids": list(range(B))}
    part = slice_rows({"text_inputs": tok, "note": "x", "scale": torch.tensor(2.0)}, B, 4, 9)
    assert torch.equal(part["text_inputs"]["input_ids"], tok["input_ids"][4:9])
    assert part["text_inputs"]["ids"] == [4, 5, 6, 7, 8] and part["note"] == "x" and float(part["scale"]) == 2.0


def _worker(r: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=r, world_size=2)
    try:
        module = _module(LOSSES["all"], gather=True)
        n = B // 2
        batch = _batch(module.model, slice(r * n, (r + 1) * n))
        loss, grads = _chunked_step(module, batch, 3, world=2)  # 3 + 3 + 2 rows per rank
        save_file({**grads, "loss": torch.tensor(loss, dtype=torch.float64)}, str(Path(out_dir) / f"rank{r}.safetensors"))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip gloo's teardown (see tests/losses/test_losses_distributed.py)


def test_two_gloo_ranks_chunked_equal_one_process_unchunked(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    module = _module(LOSSES["all"])
    loss_ref, ref = _full_step(module, _batch(module.model))
    for r in range(2):
        got = load_file(str(tmp_path / f"rank{r}.safetensors"))
        assert float(got.pop("loss")) == pytest.approx(loss_ref, rel=1e-12)
        _assert_same(got, ref, f"rank {r}")


def _losses(run: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "train.log").read_text().splitlines()) if "loss" in r]


def test_training_with_chunk_size_follows_the_unchunked_run(tmp_path: Path, synth_dir: Path, teacher_stores: list[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    extra = ["stages.0.epochs=2", "model.trunk=mlp", "model.usa_heads=true", "loss.csa=1", "loss.usa=1",
             "loss.instance=0.5", "loss.tau_teacher=0.1", "threads=1", *teacher_stores]
    a = train(tiny_config(tmp_path / "full", synth_dir, *extra), progress=False)
    calls = []
    forward = GradCache.forward

    def counted(self: GradCache, batch: dict[str, Any]) -> Any:
        calls.append(len(chunk_batch(batch, self.chunk_size)))
        return forward(self, batch)

    monkeypatch.setattr(GradCache, "forward", counted)
    b = train(tiny_config(tmp_path / "chunked", synth_dir, *extra, "chunk_size=5"), progress=False)
    la, lb = _losses(tmp_path / "full"), _losses(tmp_path / "chunked")
    assert len(la) == len(lb) == len(calls) > 10  # every step went through GradCache
    assert max(calls) == 4  # 16 rows in chunks of 5
    assert lb == pytest.approx(la, rel=1e-6)
    assert b["best"]["step"] == a["best"]["step"]


def test_torchrun_two_ranks_chunked_follow_one_process_unchunked(tmp_path: Path, synth_dir: Path) -> None:
    """The trainer's DDP path: each rank embeds its half in chunks, the loss spans the gathered
    global batch, the gradients are averaged as DDP's would be (per-step losses to float32 rounding)."""
    from .test_ddp import TORCHRUN, _train
    from .test_ddp import _losses as ddp_losses

    if not Path(TORCHRUN).exists():
        pytest.skip("torchrun not found")
    extra = ["stages.0.epochs=1", "model.trunk=mlp", "loss.instance=1"]
    _train([], tmp_path / "one", synth_dir, extra, 1)
    _train([], tmp_path / "two", synth_dir, [*extra, "chunk_size=3"], 2)
    one, two = ddp_losses(tmp_path / "one"), ddp_losses(tmp_path / "two")
    assert len(one) == len(two) > 5
    assert two == pytest.approx(one, rel=1e-5)  # measured: 4.5e-7


def test_chunk_size_is_refused_where_chunks_would_change_the_loss(tmp_path: Path, synth_dir: Path) -> None:
    with pytest.raises(ConfigError, match="fusion matcher"):
        load_train_config(None, ["model.name=sgr", "chunk_size=4"])
    with pytest.raises(ConfigError, match="chunk_size must be >= 0"):
        tiny_config(tmp_path / "r", synth_dir, "chunk_size=-1")
    bn = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(ConfigError, match="BatchNorm in training mode"):
        check_supported(bn)
    check_supported(bn.eval())  # eval-mode BatchNorm is per row


def test_fp16_chunked_step_carries_the_loss_scale_into_every_gradient() -> None:
    """fp16 autocast (CPU): backward on the scaled loss gives scale × the gradients: the chunked step
    agrees with the unchunked fp16 step to float16 rounding, and unscaled with float32. (Steps need not overflow alike: a
    chunk's weight gradients sum fewer rows in float16 before the float32 accumulation.)"""
    scale = 2.0 ** 10
    exact = _module(LOSSES["all"], dtype=torch.float32)
    batch = _batch(exact.model, dtype=torch.float32)
    _, ref32 = _full_step(exact, batch)
    module = _module(LOSSES["all"], dtype=torch.float32, precision="fp16")
    module.zero_grad(set_to_none=True)
    (scale * sum(module(batch).values())).backward()
    ref16 = _grads(module)
    module.zero_grad(set_to_none=True)
    terms, backward = GradCache(module, 5).forward(batch)
    backward(scale * sum(terms.values()))
    got = _grads(module)
    assert got.keys() == ref16.keys() == ref32.keys()

    def worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
        return max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-6)) for n in b)

    vs32, vs16 = worst({n: g / scale for n, g in got.items()}, ref32), worst(got, ref16)
    print(f"fp16 chunked vs fp32: {vs32:.1e}, vs unchunked fp16: {vs16:.1e} (of each tensor's largest entry)")
    assert vs16 < 5e-3  # measured 8.7e-4
    assert vs32 < 0.1  # fp16 autocast's own error (measured 3.8e-2); a lost scale would be off by 1024×
