"""GRU / LSTM text towers against a one-caption-at-a-time reference (no padding, no packing)."""

from __future__ import annotations

import pytest
import torch

from itrkit.errors import ConfigError
from itrkit.models.towers import build_tower

TEXTS = ["a dog runs on the beach", "two children", "", "a man in a red shirt climbs a rock wall"]


def _reference(tower, text: str) -> torch.Tensor:
    """Run each layer's RNN on the caption alone, then combine directions and average over tokens."""
    ids = tower.tokenizer(text, add_special_tokens=False)["input_ids"] or [tower.unk_id]
    x = tower.embedding(torch.tensor([ids]))
    for rnn in tower.rnns:
        x = rnn(x)[0]
    h = tower.hidden
    if tower.combine == "mean":
        x = (x[..., :h] + x[..., h:]) / 2
    return x[0].mean(0)


@pytest.mark.parametrize("spec, dim", [
    ({"name": "gru:minilm", "embed_dim": 16, "hidden": 12}, 12),
    ({"name": "lstm", "tokenizer": "minilm", "embed_dim": 16, "hidden": 12, "layers": 2, "combine": "concat"}, 24),
])
def test_rnn_tower_equals_per_caption_reference(spec, dim) -> None:
    tower = build_tower(spec, "text")
    assert tower.output_dim == dim
    with torch.inference_mode():
        batch = tower(tower.prepare(TEXTS))
        alone = tower(tower.prepare(TEXTS[:1]))
        for i, text in enumerate(TEXTS):
            torch.testing.assert_close(batch[i], _reference(tower, text), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(alone[0], batch[0], atol=1e-6, rtol=1e-5)  # padding does not leak in
    assert build_tower(tower.spec, "text").fingerprint() == tower.fingerprint()
    assert len(tower.blocks()) == 1 + tower.spec["layers"]


def test_rnn_defaults_and_errors() -> None:
    tower = build_tower("gru:minilm", "text")
    assert tower.output_dim == 512 and tower.embedding.embedding_dim == 300
    assert tower.spec == {"name": "gru", "tokenizer": "minilm", "embed_dim": 300, "hidden": 512, "layers": 1,
                          "combine": "mean", "max_length": 64, "seed": 0}
    assert tower.prepare(["word " * 100])["input_ids"].shape == (1, 64)
    with pytest.raises(ConfigError, match="combine must be"):
        build_tower({"name": "gru:minilm", "combine": "sum"}, "text")
    tower.set_trainable("top:1")
    assert not tower.embedding.weight.requires_grad and all(p.requires_grad for p in tower.rnns[0].parameters())
