"""bf16 autocast trains like fp32 (losses close, not identical); gradient checkpointing changes
memory, not the math (same loss and gradients as without); both refuse what they cannot do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from itrkit.errors import ConfigError
from itrkit.models.dual_encoder import DualEncoder, ModelConfig, build_model
from itrkit.models.hf_text import minilm_path
from itrkit.train.trainer import train

from .conftest import tiny_config


def _losses(run: Path) -> list[float]:
    lines = [json.loads(x) for x in (run / "train.log").read_text().splitlines()]
    return [r["loss"] for r in lines if "loss" in r]


def test_bf16_trains_close_to_fp32(tmp_path: Path, synth_dir: Path) -> None:
    fp32 = train(tiny_config(tmp_path / "fp32", synth_dir), progress=False)
    bf16 = train(tiny_config(tmp_path / "bf16", synth_dir, "precision=bf16"), progress=False)
    a, b = _losses(tmp_path / "fp32"), _losses(tmp_path / "bf16")
    assert len(a) == len(b)
    # Same init, same first batch: the first loss differs only by bf16 rounding in the forward.
    assert a[0] != b[0], "bf16 autocast had no effect"
    assert b[0] == pytest.approx(a[0], rel=2e-2)
    # Both learn: the last loss is well below the first, and within 15% of each other.
    assert b[-1] < 0.8 * b[0] and b[-1] == pytest.approx(a[-1], rel=0.15)
    chance = 6 * (100 * 10 / 60)  # synthetic val: 60 images; R@K of random ranking ≈ K / N
    assert bf16["val"]["rsum"] > chance and abs(bf16["val"]["rsum"] - fp32["val"]["rsum"]) < 60


def test_bf16_autocast_reaches_the_heads(tmp_path: Path, synth_dir: Path) -> None:
    seen: list[torch.dtype] = []
    orig = DualEncoder.forward_features

    def spy(self: DualEncoder, *args, **kwargs):  # type: ignore[no-untyped-def]
        out = orig(self, *args, **kwargs)
        if self.training:
            seen.append(out["image_embeds"].dtype)
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(DualEncoder, "forward_features", spy)
    try:
        train(tiny_config(tmp_path / "r", synth_dir, "precision=bf16", "stages.0.epochs=1"), progress=False)
    finally:
        mp.undo()
    assert seen and set(seen) == {torch.bfloat16}


def test_unknown_precision_is_a_config_error(tmp_path: Path, synth_dir: Path) -> None:
    with pytest.raises(ConfigError, match="precision must be fp32, bf16 or fp16"):
        train(tiny_config(tmp_path / "r", synth_dir, "precision=fp8"), progress=False)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import AutoTokenizer, BertConfig, BertModel

    root = tmp_path_factory.mktemp("tiny-bert")
    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                     attention_probs_dropout_prob=0.0)
    BertModel(cfg).save_pretrained(root)
    tok.save_pretrained(root)
    return root


def _step(model: DualEncoder, texts: list[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor], int]:
    """Loss and gradients of one step, and how many times the BERT layers ran forward."""
    calls = 0

    def count(*_: object) -> None:
        nonlocal calls
        calls += 1

    # A sub-module of each layer: HF checkpoints the layer's forward, so its inner modules run again.
    hooks = [m.intermediate.register_forward_hook(count) for m in model.text_tower.model.encoder.layer]
    model.train()
    out = model({"text_inputs": model.text_tower.prepare(texts)})
    loss = out["text_embeds"].pow(2).sum() + out["text_embeds"][:, 0].sum()
    loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, calls


def test_gradient_checkpointing_same_gradients_fewer_stored_activations(tiny_bert: Path) -> None:
    texts = ["a dog runs on the grass", "two people ride bikes", "a red car", "children play football outside"]
    runs = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        cfg = ModelConfig(image_tower="tiny-image", text_tower=f"hf:{tiny_bert}", text_trainable="all",
                          cached_features=False, embed_dim=16, grad_checkpointing=ckpt)
        runs.append(_step(build_model(cfg), texts))
    (l0, g0, c0), (l1, g1, c1) = runs
    assert c0 == 3 and c1 == 6  # checkpointed layers run forward again during backward
    assert torch.equal(l0, l1)
    assert g0.keys() == g1.keys() and any(k.startswith("text_tower.") for k in g0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-5, atol=1e-7, msg=k)


def test_gradient_checkpointing_refused_where_it_cannot_apply() -> None:
    with pytest.raises(ConfigError, match="tower 'tiny-image' does not support gradient checkpointing"):
        build_model(ModelConfig(image_tower="tiny-image", text_tower="tiny-text", image_trainable="all",
                                cached_features=False, grad_checkpointing=True))
    with pytest.raises(ConfigError, match="needs a trainable tower"):
        ModelConfig(image_tower="tiny-image", text_tower="tiny-text", grad_checkpointing=True).validate()
