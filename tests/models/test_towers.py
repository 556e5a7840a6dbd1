"""Tower registry, specs, trainable modes, and the tiny towers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from itrkit.errors import ConfigError
from itrkit.models.tiny import hash_tokens
from itrkit.models.towers import build_tower, parse_spec, tower_names


def test_parse_spec_forms() -> None:
    assert parse_spec("efficientnet-lite0") == {"name": "efficientnet-lite0"}
    assert parse_spec("clip:/m/clip") == {"name": "clip", "path": "/m/clip"}
    assert parse_spec({"name": "clip:/m/clip", "image_size": 336}) == {"name": "clip", "path": "/m/clip", "image_size": 336}
    assert parse_spec("gru:minilm") == {"name": "gru", "tokenizer": "minilm"}
    assert parse_spec("hf-vision:C:\\models\\vit") == {"name": "hf-vision", "path": "C:\\models\\vit"}
    assert "clip:PATH" in tower_names() and "tiny-text" in tower_names()


@pytest.mark.parametrize("spec, modality, msg", [
    ("resnet50", "image", "unknown tower 'resnet50'"),
    ("foo:bar", "image", "unknown tower 'foo:bar'"),
    ("minilm", "image", "not a image tower"),
    ("efficientnet-lite0", "text", "not a text tower"),
    ("clip", "image", "needs a folder"),
    ({"name": "tiny-image", "widht": 3}, "image", "unknown option(s) widht"),
    ({"name": "clip:/a", "path": "/b"}, "image", "conflicts"),
    ("tiny-image", "audio", "unknown modality"),
    (42, "image", "must be a string or a mapping"),
])
def test_bad_specs_raise_one_line_config_errors(spec, modality, msg) -> None:
    with pytest.raises(ConfigError, match=msg.replace("(", r"\(").replace(")", r"\)")) as e:
        build_tower(spec, modality)
    assert "\n" not in str(e.value)


def test_tiny_towers_are_seeded_and_rebuild_from_spec() -> None:
    img = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 50, 3), dtype=np.uint8)) for i in range(3)]
    a, b = build_tower("tiny-image", "image"), build_tower("tiny-image", "image")
    c = build_tower({"name": "tiny-image", "seed": 1}, "image")
    with torch.inference_mode():
        fa, fb, fc = (t(t.prepare(img)) for t in (a, b, c))
    assert fa.shape == (3, 64) and torch.equal(fa, fb) and not torch.allclose(fa, fc)
    assert a.fingerprint() == b.fingerprint() != c.fingerprint()
    rebuilt = build_tower(c.spec, "image")
    assert rebuilt.spec == c.spec and rebuilt.fingerprint() == c.fingerprint()
    # Building a tower must not move the caller's random stream.
    torch.manual_seed(123)
    x = torch.rand(1)
    torch.manual_seed(123)
    build_tower("tiny-text", "text")
    assert torch.equal(torch.rand(1), x)


def test_tiny_text_equals_explicit_mean_of_word_vectors() -> None:
    t = build_tower({"name": "tiny-text", "buckets": 97}, "text")
    texts = ["A dog runs", "", "dog dog CAT, sat!"]
    with torch.inference_mode():
        out = t(t.prepare(texts))
        table, w, bias = t.embedding.weight, t.proj.weight, t.proj.bias
        for i, s in enumerate(texts):
            ids = hash_tokens(s, 97)
            mean = torch.stack([table[j] for j in ids]).mean(0) if ids else torch.zeros(64)
            torch.testing.assert_close(out[i], w @ mean + bias, atol=1e-6, rtol=1e-5)
    assert hash_tokens("Dog dog", 97)[0] == hash_tokens("dog", 97)[0]


def test_set_trainable_top_n_and_frozen_blocks_stay_in_eval_mode() -> None:
    t = build_tower("tiny-image", "image")
    t.set_trainable("top:1")
    trainable = {n for n, p in t.named_parameters() if p.requires_grad}
    assert trainable == {"conv3.0.weight", "conv3.0.bias"}
    t.train()
    assert t.training and t.conv3.training and not t.conv1.training and not t.conv2.training
    t.set_trainable("frozen")
    t.train()
    assert not any(m.training for m in t.modules())
    t.set_trainable("all")
    t.train()
    assert all(m.training for m in t.modules())
    with pytest.raises(ConfigError, match="unknown trainable mode"):
        t.set_trainable("bottom:2")
