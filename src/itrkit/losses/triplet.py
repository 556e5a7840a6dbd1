"""``TripletLoss``: the VSE++ hardest-negative hinge, the classic ITR baseline (docs/method.md §1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from itrkit.errors import ConfigError
from itrkit.losses.functional import triplet


class TripletLoss(nn.Module):
    """``forward(image_embeds, text_embeds, img_ids) -> {"triplet_loss": weight · triplet}``.

    Captions of the same image are never used as negatives of each other.
    """

    def __init__(self, margin: float = 0.2, weight: float = 1.0) -> None:
        super().__init__()
        if margin < 0:
            raise ConfigError(f"triplet margin must be >= 0, got {margin}")
        self.margin = float(margin)
        self.weight = float(weight)

    def forward(self, image_embeds: Tensor, text_embeds: Tensor, img_ids: Tensor | Sequence[Any]) -> dict[str, Tensor]:
        return {"triplet_loss": self.weight * triplet(image_embeds, text_embeds, img_ids, self.margin)}

    def extra_repr(self) -> str:
        return f"margin={self.margin}, weight={self.weight}"
