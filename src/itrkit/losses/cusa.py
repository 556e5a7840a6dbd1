"""CUSA (AAAI 2024): ``L = L_base + α·CSA + β·USA`` (CUSA Eq. 9) and the USA projector.

Teacher features come from frozen uni-modal models (offline feature stores); the student's
uni-modal embeddings come from one extra projector per modality (:class:`USAProjector`, owned by
the model, e.g. ``DualEncoder``), which the caller passes as ``image_uni`` / ``text_uni``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from itrkit.errors import ConfigError
from itrkit.losses.contrastive import ContrastiveLoss
from itrkit.losses.soft_labels import SoftLabelLoss


class USAProjector(nn.Sequential):
    """LayerNorm + Linear (Linear init N(0, 0.02), bias 0): CUSA's extra uni-modal head.

    A ``Sequential`` so its state-dict keys are ``0.*`` (LayerNorm) and ``1.*`` (Linear).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        lin = nn.Linear(in_dim, out_dim)
        nn.init.normal_(lin.weight, std=0.02)
        nn.init.zeros_(lin.bias)
        super().__init__(nn.LayerNorm(in_dim), lin)


class CUSALoss(SoftLabelLoss):
    """Plug-and-play CUSA objective around a base ITR loss.

    ``forward(image_embeds, text_embeds, img_ids, teacher_image, teacher_text, image_uni=None,
    text_uni=None)`` returns the base module's dict (e.g. ``contrastive_loss``) plus
    ``csa_loss = α·csa`` (CUSA Eq. 6) and ``usa_loss = β·usa`` (Eq. 8); the total is the sum of the
    values (Eq. 9). A term whose weight is 0 is skipped and its key omitted. The soft-label terms
    are :class:`~itrkit.losses.soft_labels.SoftLabelLoss`, the one implementation every family uses.

    Temperatures ``tau_c`` (CSA), ``tau_img``, ``tau_txt`` (USA) are learnable 0-dim parameters
    clamped in place into ``[tau_min, tau_max]``; with ``csa_tau_from_base=True`` CSA uses the base
    loss's ``tau`` instead and ``tau_c`` does not exist. ``tau_teacher`` is fixed. ``smooth``: CSA on
    label-smoothed teacher rows (the ``cusa-smooth`` control, :func:`~itrkit.losses.soft_labels.smooth_rows`). Note the
    authors' InfoNCE is divided by B twice, so their α=0.1, β=0.5 act ~B times stronger than here
    (docs/method.md): tune α, β on validation data.
    """

    def __init__(
        self,
        base: nn.Module | None = None,
        alpha: float = 0.1,
        beta: float = 0.5,
        tau_c: float = 0.45,
        tau_img: float = 0.45,
        tau_txt: float = 0.45,
        tau_min: float = 0.1,
        tau_max: float = 1.0,
        learnable: bool = True,
        tau_teacher: float = 1.0,
        teacher_mode: str = "each",
        center_teacher: bool = False,
        csa_tau_from_base: bool = False,
        smooth: bool = False,
    ) -> None:
        base = base if base is not None else ContrastiveLoss()
        if csa_tau_from_base and not isinstance(getattr(base, "tau", None), nn.Parameter):
            raise ConfigError("csa_tau_from_base=True needs a base loss with a 'tau' parameter (e.g. ContrastiveLoss)")
        super().__init__(alpha=alpha, beta=beta, tau_c=tau_c, tau_img=tau_img, tau_txt=tau_txt, tau_min=tau_min,
                         tau_max=tau_max, learnable=learnable, tau_teacher=tau_teacher, teacher_mode=teacher_mode,
                         center_teacher=center_teacher, own_tau_c=not csa_tau_from_base, smooth=smooth)
        self.base = base
        self.csa_tau_from_base = bool(csa_tau_from_base)

    def clamp_temperatures_(self) -> None:
        """Clamp every learnable temperature (base included) into its range; call after each step."""
        super().clamp_temperatures_()
        if hasattr(self.base, "clamp_temperatures_"):
            self.base.clamp_temperatures_()

    def temperatures(self) -> dict[str, float]:
        """Current temperatures by name (the base loss's ones included, e.g. ``tau``)."""
        out: dict[str, float] = {}
        if hasattr(self.base, "temperatures"):
            out.update(self.base.temperatures())
        return {**out, **super().temperatures()}

    def forward(  # type: ignore[override]
        self,
        image_embeds: Tensor,
        text_embeds: Tensor,
        img_ids: Tensor | Sequence[Any],
        teacher_image: Tensor | None,
        teacher_text: Tensor | None,
        image_uni: Tensor | None = None,
        text_uni: Tensor | None = None,
    ) -> dict[str, Tensor]:
        out = dict(self.base(image_embeds, text_embeds, img_ids))
        tau_c = self.base.tau if self.tau_c is None and self.active else None
        out.update(super().forward(teacher_image, teacher_text, image_embeds=image_embeds, text_embeds=text_embeds,
                                   image_uni=image_uni, text_uni=text_uni, tau_c=tau_c))
        return out
