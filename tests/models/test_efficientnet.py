"""EfficientNet-Lite towers: real ImageNet weights recognise dogs in real Flickr8k photos."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from itrkit.models.towers import build_tower

DOG_CLASSES = range(151, 269)  # ImageNet ids 151–268 are dog breeds


def _photos(root: Path) -> tuple[list[Path], list[Path]]:
    """10 photos most captions call a dog, 10 whose captions mention no animal at all."""
    caps: dict[str, list[str]] = collections.defaultdict(list)
    for line in (root / "Flickr8k.token.txt").read_text(encoding="utf-8").splitlines():
        key, text = line.split("\t", 1)
        caps[key.split("#")[0]].append(text.lower())

    def says(word: str, text: str) -> bool:
        return re.search(rf"\b{word}s?\b", text) is not None

    animals = ("dog", "puppy", "animal", "pet", "wolf", "fox", "cat", "horse")
    dogs = sorted(k for k, v in caps.items() if sum(says("dog", c) for c in v) >= 4)[:10]
    others = sorted(k for k, v in caps.items() if not any(says(w, c) for c in v for w in animals))[:10]
    return [root / "images" / k for k in dogs], [root / "images" / k for k in others]


@pytest.fixture(scope="module")
def lite0():
    return build_tower("efficientnet-lite0", "image")


def _dog_in_top5(tower, files: list[Path]) -> int:
    with torch.inference_mode():
        top5 = tower.classify(tower.prepare(files)).topk(5).indices
    return sum(any(int(c) in DOG_CLASSES for c in row) for row in top5)


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.parametrize("variant", ["efficientnet-lite0", "efficientnet-lite2"])
def test_imagenet_classifier_finds_dogs_in_flickr8k(shared_data: Path, variant: str, lite0) -> None:
    tower = lite0 if variant == "efficientnet-lite0" else build_tower(variant, "image")
    dogs, others = _photos(shared_data / "flickr8k")
    assert len(dogs) == len(others) == 10
    assert _dog_in_top5(tower, dogs) >= 8
    assert _dog_in_top5(tower, others) <= 2  # control: no dog classes without dogs


@pytest.mark.shared
def test_features_are_pooled_head_activations(shared_data: Path, lite0) -> None:
    path = sorted((shared_data / "flickr8k" / "images").glob("*.jpg"))[0]
    x = lite0.prepare([path, Image.open(path)])
    # Flickr8k photos here are 224×224 already: preprocessing is exactly (x − 127) / 128.
    ref = (np.asarray(Image.open(path).convert("RGB"), np.float32) - 127.0) / 128.0
    np.testing.assert_allclose(x[0].numpy(), ref.transpose(2, 0, 1), atol=1e-6)
    assert torch.equal(x[0], x[1])
    with torch.inference_mode():
        feats = lite0(x)
        head = lite0.net.extract_features(x)
        logits = lite0.net(x)  # the package's own forward: pool → dropout (off in eval) → fc
    assert feats.shape == (2, 1280) and lite0.output_dim == 1280
    torch.testing.assert_close(feats, head.mean(dim=(2, 3)))
    torch.testing.assert_close(lite0.classify(x), logits)
    assert (feats >= 0).all() and (feats <= 6).all()  # ReLU6 activations


def test_spec_sizes_and_blocks(lite0) -> None:
    assert lite0.spec == {"name": "efficientnet-lite0", "image_size": 224}
    assert build_tower({"name": "efficientnet-lite1"}, "image").spec["image_size"] == 240
    small = build_tower({"name": "efficientnet-lite0", "image_size": 128}, "image")
    assert small.prepare([Image.new("RGB", (300, 200))]).shape == (1, 3, 128, 128)
    assert small.fingerprint() != lite0.fingerprint()
    blocks = lite0.blocks()
    assert len(blocks) == 1 + 16 + 1  # stem, 16 MBConv blocks, head conv
    assert sum(p.numel() for b in blocks for p in b.parameters()) + 1280 * 1000 + 1000 == \
        sum(p.numel() for p in lite0.parameters())


def test_partly_unfrozen_tower_keeps_frozen_batchnorm_statistics() -> None:
    tower = build_tower("efficientnet-lite0", "image")
    tower.set_trainable("top:2")
    trainable = [n for n, p in tower.named_parameters() if p.requires_grad]
    assert all(n.startswith(("net._blocks.15.", "net._conv_head.", "net._bn1.")) for n in trainable) and trainable
    before = tower.net._blocks[3]._bn1.running_mean.clone()
    head_before = tower.net._bn1.running_mean.clone()
    tower.train()
    out = tower(torch.randn(2, 3, 224, 224))
    out.sum().backward()
    assert torch.equal(tower.net._blocks[3]._bn1.running_mean, before)  # frozen block: eval-mode BN
    assert not torch.equal(tower.net._bn1.running_mean, head_before)  # trained head: batch statistics
    assert tower.net._fc.weight.grad is None and tower.net._blocks[0]._depthwise_conv.weight.grad is None
