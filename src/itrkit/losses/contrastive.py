"""``ContrastiveLoss``: multi-positive InfoNCE with a learnable, clamped temperature (docs/method.md §1)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from itrkit.errors import ConfigError
from itrkit.losses.functional import info_nce, info_nce_from_scores


def make_temperature(name: str, value: float, learnable: bool, lo: float, hi: float) -> nn.Parameter:
    """A 0-dim temperature parameter, checked against its clamp range.

    Stored as a parameter even when fixed (``requires_grad=False``) so checkpoints have the same
    keys whatever ``learnable`` is. Its name contains ``tau`` so trainers can keep it out of weight
    decay (docs/method.md §5.1, F1: no weight decay on temperatures).
    """
    if not (lo > 0 and hi >= lo):
        raise ConfigError(f"{name}: clamp range [{lo}, {hi}] must satisfy 0 < min <= max")
    if not value > 0:
        raise ConfigError(f"{name} must be > 0, got {value}")
    if learnable and not lo <= value <= hi:
        raise ConfigError(f"{name}={value} is outside its clamp range [{lo}, {hi}]")
    return nn.Parameter(torch.tensor(float(value)), requires_grad=learnable)


@torch.no_grad()
def clamp_temperature_(tau: nn.Parameter, lo: float, hi: float) -> None:
    """Clamp a learnable temperature in place (its value, not its gradient path: open_clip style).

    Only writes when the value is out of range: an in-place write bumps the parameter's version,
    which would break backward through an earlier forward (gradient accumulation) for nothing.
    """
    if tau.requires_grad and not lo <= float(tau) <= hi:
        tau.clamp_(lo, hi)


class ContrastiveLoss(nn.Module):
    """Symmetric multi-positive InfoNCE (CUSA Eqs. 1–4, IConE Eqs. 6–8) over a (gathered) batch.

    ``forward(image_embeds, text_embeds, img_ids) -> {"contrastive_loss": weight · info_nce}``.
    A learnable ``tau`` is clamped in place into ``[tau_min, tau_max]`` before every use; call
    :meth:`clamp_temperatures_` after ``optimizer.step()`` to keep the stored value in range too.
    A fixed ``tau`` (``learnable=False``) is used as given.
    """

    def __init__(self, tau: float = 0.05, learnable: bool = True, tau_min: float = 0.01, tau_max: float = 0.1,
                 weight: float = 1.0) -> None:
        super().__init__()
        self.tau = make_temperature("tau", tau, learnable, tau_min, tau_max)
        self.tau_min, self.tau_max = float(tau_min), float(tau_max)
        self.weight = float(weight)

    @property
    def temperature(self) -> float:
        t = float(self.tau.detach())
        return min(max(t, self.tau_min), self.tau_max) if self.tau.requires_grad else t

    def clamp_temperatures_(self) -> None:
        clamp_temperature_(self.tau, self.tau_min, self.tau_max)

    def temperatures(self) -> dict[str, float]:
        return {"tau": self.temperature}

    def forward(self, image_embeds: Tensor, text_embeds: Tensor, img_ids: Tensor | Sequence[Any],
                scores: Tensor | None = None) -> dict[str, Tensor]:
        """``scores``: ``cos(image_embeds, text_embeds)`` when the caller already has it (shared
        with other terms); the embeddings are then not used again."""
        self.clamp_temperatures_()
        loss = (info_nce(image_embeds, text_embeds, img_ids, self.tau) if scores is None
                else info_nce_from_scores(scores, img_ids, self.tau))
        return {"contrastive_loss": self.weight * loss}

    def extra_repr(self) -> str:
        return (f"tau={self.temperature:.4g}, learnable={self.tau.requires_grad}, "
                f"range=[{self.tau_min}, {self.tau_max}], weight={self.weight}")
