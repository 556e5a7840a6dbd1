"""CUSA (AAAI 2024): ``L = L_base + α·CSA + β·USA`` (CUSA Eq. 9) and the USA projector.

Teacher features come from frozen uni-modal models (offline feature stores); the student's
uni-modal embeddings come from one extra projector per modality (:class:`USAProjector`, owned by
the model, e.g. ``DualEncoder``), which the caller passes as ``image_uni`` / ``text_uni``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from itrkit.errors import ConfigError, ItrkitError
from itrkit.losses.contrastive import ContrastiveLoss, clamp_temperature_, make_temperature
from itrkit.losses.functional import TEACHER_MODES, csa_from_probs, teacher_probs, usa_from_probs


class USAProjector(nn.Sequential):
    """LayerNorm + Linear (Linear init N(0, 0.02), bias 0): CUSA's extra uni-modal head.

    A ``Sequential`` so its state-dict keys are ``0.*`` (LayerNorm) and ``1.*`` (Linear).
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        lin = nn.Linear(in_dim, out_dim)
        nn.init.normal_(lin.weight, std=0.02)
        nn.init.zeros_(lin.bias)
        super().__init__(nn.LayerNorm(in_dim), lin)


class CUSALoss(nn.Module):
    """Plug-and-play CUSA objective around a base ITR loss.

    ``forward(image_embeds, text_embeds, img_ids, teacher_image, teacher_text, image_uni=None,
    text_uni=None)`` returns the base module's dict (e.g. ``contrastive_loss``) plus
    ``csa_loss = α·csa`` (CUSA Eq. 6) and ``usa_loss = β·usa`` (Eq. 8); the total is the sum of the
    values (Eq. 9). A term whose weight is 0 is skipped and its key omitted.

    Temperatures ``tau_c`` (CSA), ``tau_img``, ``tau_txt`` (USA) are learnable 0-dim parameters
    clamped in place into ``[tau_min, tau_max]``; with ``csa_tau_from_base=True`` CSA uses the base
    loss's ``tau`` instead and ``tau_c`` does not exist. ``tau_teacher`` is fixed. Note the
    authors' InfoNCE is divided by B twice, so their α=0.1, β=0.5 act ~B times stronger than here
    (FINDINGS F1): tune α, β on validation data.
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
    ) -> None:
        super().__init__()
        if teacher_mode not in TEACHER_MODES:
            raise ConfigError(f"teacher_mode '{teacher_mode}' is unknown (use one of {', '.join(TEACHER_MODES)})")
        if alpha < 0 or beta < 0:
            raise ConfigError(f"CUSA weights must be >= 0, got alpha={alpha}, beta={beta}")
        if not tau_teacher > 0:
            raise ConfigError(f"tau_teacher must be > 0, got {tau_teacher}")
        self.base = base if base is not None else ContrastiveLoss()
        self.alpha, self.beta = float(alpha), float(beta)
        self.tau_min, self.tau_max = float(tau_min), float(tau_max)
        self.tau_teacher = float(tau_teacher)
        self.teacher_mode = teacher_mode
        self.center_teacher = bool(center_teacher)
        self.csa_tau_from_base = bool(csa_tau_from_base)
        if self.csa_tau_from_base:
            if not isinstance(getattr(self.base, "tau", None), nn.Parameter):
                raise ConfigError("csa_tau_from_base=True needs a base loss with a 'tau' parameter (e.g. ContrastiveLoss)")
            self.tau_c = None
        else:
            self.tau_c = make_temperature("tau_c", tau_c, learnable, tau_min, tau_max)
        self.tau_img = make_temperature("tau_img", tau_img, learnable, tau_min, tau_max)
        self.tau_txt = make_temperature("tau_txt", tau_txt, learnable, tau_min, tau_max)

    def _own_taus(self) -> dict[str, nn.Parameter]:
        taus = {"tau_img": self.tau_img, "tau_txt": self.tau_txt}
        if self.tau_c is not None:
            taus = {"tau_c": self.tau_c, **taus}
        return taus

    def clamp_temperatures_(self) -> None:
        """Clamp every learnable temperature (base included) into its range; call after each step."""
        for t in self._own_taus().values():
            clamp_temperature_(t, self.tau_min, self.tau_max)
        if hasattr(self.base, "clamp_temperatures_"):
            self.base.clamp_temperatures_()

    def temperatures(self) -> dict[str, float]:
        """Current temperatures by name (the base loss's ones included, e.g. ``tau``)."""
        out: dict[str, float] = {}
        if hasattr(self.base, "temperatures"):
            out.update(self.base.temperatures())
        for name, t in self._own_taus().items():
            v = float(t.detach())
            out[name] = min(max(v, self.tau_min), self.tau_max) if t.requires_grad else v
        return out

    def forward(
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
        use_csa, use_usa = self.alpha > 0, self.beta > 0
        if not (use_csa or use_usa):
            return out
        for name, t in (("teacher_image", teacher_image), ("teacher_text", teacher_text)):
            if t is None:
                raise ItrkitError(f"CUSALoss: {name} is None but CSA/USA need teacher features")
            if t.ndim != 2 or t.shape[0] != image_embeds.shape[0]:
                raise ItrkitError(f"CUSALoss: {name} has shape {tuple(t.shape)}, expected "
                                  f"({image_embeds.shape[0]}, dim) to match the batch")
        if use_usa:
            for name, t in (("image_uni", image_uni), ("text_uni", text_uni)):
                if t is None:
                    raise ItrkitError(f"CUSALoss: beta={self.beta} (USA) needs {name} from the USA projectors, got None")
        for t in self._own_taus().values():
            clamp_temperature_(t, self.tau_min, self.tau_max)
        # USA always pairs image↔image-teacher and text↔text-teacher; CSA may combine them.
        need_each = use_usa or self.teacher_mode == "each"
        p_each = teacher_probs(teacher_image, teacher_text, self.tau_teacher, "each",
                               self.center_teacher) if need_each else None
        if use_csa:
            p_csa = p_each if p_each is not None and self.teacher_mode == "each" else teacher_probs(
                teacher_image, teacher_text, self.tau_teacher, self.teacher_mode, self.center_teacher)
            tau_c = self.base.tau if self.tau_c is None else self.tau_c
            out["csa_loss"] = self.alpha * csa_from_probs(image_embeds, text_embeds, *p_csa, tau_c)
        if use_usa:
            assert image_uni is not None and text_uni is not None and p_each is not None
            out["usa_loss"] = self.beta * usa_from_probs(image_uni, text_uni, *p_each, self.tau_img, self.tau_txt)
        return out

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, tau_teacher={self.tau_teacher}, "
                f"teacher_mode={self.teacher_mode}, center_teacher={self.center_teacher}")
