"""Tiny seeded random towers for tests: fast, no files, deterministic for a given seed.

``tiny-image``: 32×32 RGB → three stride-2 3×3 convolutions (16, 32, 64 channels, ReLU) → global
average → 64-d. ``tiny-text``: a hashing tokenizer (lower-cased words, blake2b into ``buckets``
ids, no vocabulary file) → mean of word embeddings (``EmbeddingBag``) → Linear → 64-d.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

import torch
from torch import nn

from itrkit.errors import ConfigError
from itrkit.models.base import Tower
from itrkit.models.towers import images_to_tensor

_WORD = re.compile(r"[a-z0-9]+")


class TinyImageTower(Tower):
    modality = "image"

    def __init__(self, image_size: int = 32, dim: int = 64, seed: int = 0) -> None:
        super().__init__()
        if image_size < 8 or dim <= 0:
            raise ConfigError(f"tower tiny-image: image_size ≥ 8 and dim > 0 needed, got {image_size}, {dim}")
        self.image_size, self.output_dim = int(image_size), int(dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.conv1 = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU())
            self.conv2 = nn.Sequential(nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU())
            self.conv3 = nn.Sequential(nn.Conv2d(32, self.output_dim, 3, stride=2, padding=1), nn.ReLU())
        self.spec = {"name": "tiny-image", "image_size": self.image_size, "dim": self.output_dim, "seed": int(seed)}
        self.eval()

    def prepare(self, items: list[Any]) -> torch.Tensor:
        return images_to_tensor(items, self.image_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), scale="unit")

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.conv3(self.conv2(self.conv1(inputs.to(self.device))))
        return x.mean(dim=(2, 3))

    def blocks(self) -> list[nn.Module]:
        return [self.conv1, self.conv2, self.conv3]


def hash_tokens(text: str, buckets: int) -> list[int]:
    """Lower-cased alphanumeric words → stable bucket ids (same on every machine and run)."""
    return [int.from_bytes(hashlib.blake2b(w.encode(), digest_size=8).digest(), "little") % buckets
            for w in _WORD.findall(text.lower())]


class TinyTextTower(Tower):
    modality = "text"

    def __init__(self, buckets: int = 4096, dim: int = 64, seed: int = 0) -> None:
        super().__init__()
        if buckets <= 0 or dim <= 0:
            raise ConfigError(f"tower tiny-text: buckets and dim must be positive, got {buckets}, {dim}")
        self.buckets, self.output_dim = int(buckets), int(dim)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.embedding = nn.EmbeddingBag(self.buckets, self.output_dim, mode="mean")
            self.proj = nn.Linear(self.output_dim, self.output_dim)
        self.spec = {"name": "tiny-text", "buckets": self.buckets, "dim": self.output_dim, "seed": int(seed)}
        self.eval()

    def prepare(self, items: list[str]) -> dict[str, torch.Tensor]:
        if not all(isinstance(t, str) for t in items):
            raise ConfigError("tower tiny-text: every input must be a string")
        ids, offsets = [], []
        for t in items:
            offsets.append(len(ids))
            ids.extend(hash_tokens(t, self.buckets))
        return {"ids": torch.tensor(ids, dtype=torch.long), "offsets": torch.tensor(offsets, dtype=torch.long)}

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        dev = self.device
        # An empty caption is an empty bag: its mean is the zero vector, then the Linear's bias.
        return self.proj(self.embedding(inputs["ids"].to(dev), inputs["offsets"].to(dev)))

    def blocks(self) -> list[nn.Module]:
        return [self.embedding, self.proj]
