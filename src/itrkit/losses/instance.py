"""``InstanceLoss``: IConE's instance classification over image/text groups (IConE Eqs. 1–5).

One class per training image (the image and all its captions); the classifier ``W`` (C×d,
bias-free) is shared by both modalities so that both land in one space. Memory: ``W`` is C×d
float32 (113k COCO images × 512 = 231 MB, plus 2× for Adam); logits are B×C at once unless
``chunk_classes`` streams them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from itrkit.errors import ConfigError
from itrkit.losses.functional import instance


class InstanceLoss(nn.Module):
    """``forward(image_embeds, text_embeds, labels) -> {"instance_loss": weight · (CE_v + CE_t)}``.

    ``labels[i]`` is the class (training-image index in ``[0, num_classes)``) of row ``i``.
    ``chunk_classes``: compute the softmax over class chunks of this size (same value and
    gradient, memory O(B·chunk) instead of O(B·C)); ``None`` = all classes at once.
    """

    def __init__(self, num_classes: int, dim: int, weight: float = 1.0, init_std: float = 0.02,
                 chunk_classes: int | None = None) -> None:
        super().__init__()
        if num_classes <= 0 or dim <= 0:
            raise ConfigError(f"InstanceLoss needs num_classes > 0 and dim > 0, got {num_classes} and {dim}")
        if chunk_classes is not None and chunk_classes <= 0:
            raise ConfigError(f"chunk_classes must be positive or None, got {chunk_classes}")
        self.num_classes, self.dim = int(num_classes), int(dim)
        self.weight = float(weight)
        self.chunk_classes = chunk_classes
        self.classifier = nn.Parameter(torch.empty(num_classes, dim))
        nn.init.normal_(self.classifier, std=init_std)

    def forward(self, image_embeds: Tensor, text_embeds: Tensor, labels: Tensor) -> dict[str, Tensor]:
        loss = instance(image_embeds, text_embeds, labels, self.classifier, self.chunk_classes)
        return {"instance_loss": self.weight * loss}

    def extra_repr(self) -> str:
        return (f"num_classes={self.num_classes}, dim={self.dim}, weight={self.weight}, "
                f"chunk_classes={self.chunk_classes}")
