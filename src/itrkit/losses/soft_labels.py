"""CUSA's soft-label terms, once for every model family (CUSA, AAAI 2024, Eqs. 5–8).

``SoftLabelLoss`` owns the CSA temperature ``tau_c`` and the USA temperatures ``tau_img`` /
``tau_txt`` (learnable, clamped), turns a batch's frozen teacher features into soft labels
(``teacher_probs``, Eq. 5), and returns

- ``csa_loss = α·CSA`` (Eq. 6) on any B×B image-text score matrix: the cosine matrix of a dual
  encoder's embeddings, or a fusion matcher's pair scores;
- ``usa_loss = β·USA`` (Eqs. 7–8) on uni-modal embeddings (the USA heads' outputs).

A term whose weight is 0 is skipped and its key omitted. USA always pairs images with the image
teacher and captions with the text teacher; CSA may combine the two teachers (``teacher_mode``).

``smooth=True`` is the label-smoothing control (``cusa-smooth``, README "Flickr8k with the encoders fine-tuned"): CSA's targets keep
each teacher row's diagonal mass and spread the rest uniformly over the row's off-diagonal
entries (:func:`smooth_rows`), so CSA keeps the shape of its soft labels (the diagonal the largest
entry, FINDINGS F3) and loses what the teacher knows about which other items are alike. USA's
targets are left as the teacher's.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from itrkit.errors import ConfigError, ItrkitError
from itrkit.losses.contrastive import clamp_temperature_, make_temperature
from itrkit.losses.functional import (
    TEACHER_MODES,
    csa_from_probs,
    csa_from_scores,
    soft_labels_with_plogp,
    teacher_logits_modes,
    teacher_probs,
    teacher_probs_modes,
    usa_from_probs,
)


@torch.no_grad()
def smooth_rows(p: Tensor) -> Tensor:
    """Label-smoothed rows with ``p``'s diagonal: ``q_ii = p_ii``, ``q_ij = (1 - p_ii)/(B - 1)`` for
    ``j ≠ i`` (rows of ``p`` sum to 1, so rows of ``q`` do). A 1×1 matrix is returned as it is."""
    b = p.shape[0]
    if p.ndim != 2 or p.shape[1] != b:
        raise ItrkitError(f"soft labels must be a square B×B matrix, got shape {tuple(p.shape)}")
    if b < 2:
        return p.clone()
    d = p.diagonal()
    q = ((1.0 - d) / (b - 1)).unsqueeze(1).expand(b, b).clone()
    q.diagonal().copy_(d)
    return q


# Fused by default: equal to the unfused terms to float rounding (tests/losses), and the golden CUSA
# runs of tests/test_golden.py keep their metrics bit for bit with it; fused=False is the old path.
FUSED_DEFAULT = True


class SoftLabelLoss(nn.Module):
    """``forward(teacher_image, teacher_text, scores=… | image_embeds=…, text_embeds=…,
    image_uni=…, text_uni=…) -> {"csa_loss", "usa_loss"}`` (weighted by ``alpha``, ``beta``).

    ``own_tau_c=False``: CSA uses a temperature the caller passes (``tau_c=``), e.g. the base
    InfoNCE's ``tau``; ``tau_c`` then does not exist.

    ``fused`` (default :data:`FUSED_DEFAULT`): each KL term as one autograd node (:func:`~itrkit.losses.functional.kl_logits`) with
    ``Σ p log p`` shared between CSA and USA; equal to the unfused terms to float rounding.
    """

    def __init__(self, alpha: float = 0.1, beta: float = 0.5, tau_c: float = 0.45, tau_img: float = 0.45,
                 tau_txt: float = 0.45, tau_min: float = 0.1, tau_max: float = 1.0, learnable: bool = True,
                 tau_teacher: float = 1.0, teacher_mode: str = "each", center_teacher: bool = False,
                 own_tau_c: bool = True, fused: bool | None = None, smooth: bool = False) -> None:
        super().__init__()
        self.smooth = bool(smooth)  # CSA targets → label-smoothed rows of the teacher's diagonal (control)
        self.fused = FUSED_DEFAULT if fused is None else bool(fused)  # read at build time
        if teacher_mode not in TEACHER_MODES:
            raise ConfigError(f"teacher_mode '{teacher_mode}' is unknown (use one of {', '.join(TEACHER_MODES)})")
        if alpha < 0 or beta < 0:
            raise ConfigError(f"CUSA weights must be >= 0, got alpha={alpha}, beta={beta}")
        if not tau_teacher > 0:
            raise ConfigError(f"tau_teacher must be > 0, got {tau_teacher}")
        self.alpha, self.beta = float(alpha), float(beta)
        self.tau_min, self.tau_max = float(tau_min), float(tau_max)
        self.tau_teacher = float(tau_teacher)
        self.teacher_mode = teacher_mode
        self.center_teacher = bool(center_teacher)
        self.tau_c = make_temperature("tau_c", tau_c, learnable, tau_min, tau_max) if own_tau_c else None
        self.tau_img = make_temperature("tau_img", tau_img, learnable, tau_min, tau_max)
        self.tau_txt = make_temperature("tau_txt", tau_txt, learnable, tau_min, tau_max)

    @property
    def active(self) -> bool:
        return self.alpha > 0 or self.beta > 0

    def _own_taus(self) -> dict[str, nn.Parameter]:
        taus = {"tau_img": self.tau_img, "tau_txt": self.tau_txt}
        if self.tau_c is not None:
            taus = {"tau_c": self.tau_c, **taus}
        return taus

    def clamp_temperatures_(self) -> None:
        """Clamp every learnable temperature into its range; call after each optimizer step."""
        for t in self._own_taus().values():
            clamp_temperature_(t, self.tau_min, self.tau_max)

    def temperatures(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, t in self._own_taus().items():
            v = float(t.detach())
            out[name] = min(max(v, self.tau_min), self.tau_max) if t.requires_grad else v
        return out

    def teacher_probs(self, teacher_image: Tensor, teacher_text: Tensor, mode: str | None = None,
                      tau_teacher: float | None = None) -> tuple[Tensor, Tensor]:
        """Soft labels of this batch (Eq. 5) with this loss's teacher settings."""
        return teacher_probs(teacher_image, teacher_text, self.tau_teacher if tau_teacher is None else tau_teacher,
                             mode or self.teacher_mode, self.center_teacher)

    @staticmethod
    def check_teachers(teacher_image: Tensor | None, teacher_text: Tensor | None, rows: int) -> None:
        for name, t in (("teacher_image", teacher_image), ("teacher_text", teacher_text)):
            if t is None:
                raise ConfigError(f"{name} is None but CSA/USA need teacher features: set teacher.image_store "
                                  "and teacher.text_store")
            if t.ndim != 2 or t.shape[0] != rows:
                raise ItrkitError(f"{name} has shape {tuple(t.shape)}, expected ({rows}, dim) to match the batch")

    def forward(self, teacher_image: Tensor | None, teacher_text: Tensor | None, *, scores: Tensor | None = None,
                image_embeds: Tensor | None = None, text_embeds: Tensor | None = None,
                image_uni: Tensor | None = None, text_uni: Tensor | None = None,
                tau_c: Tensor | float | None = None) -> dict[str, Tensor]:
        use_csa, use_usa = self.alpha > 0, self.beta > 0
        if not (use_csa or use_usa):
            return {}
        rows = scores.shape[0] if scores is not None else (image_embeds.shape[0] if image_embeds is not None else
                                                           (image_uni.shape[0] if image_uni is not None else -1))
        self.check_teachers(teacher_image, teacher_text, rows)
        assert teacher_image is not None and teacher_text is not None
        if use_usa:
            for name, u in (("image_uni", image_uni), ("text_uni", text_uni)):
                if u is None:
                    raise ItrkitError(f"beta={self.beta} (USA) needs {name} from the USA heads, got None")
        self.clamp_temperatures_()
        out: dict[str, Tensor] = {}
        # The teacher's soft labels once per batch, on the batch's device: one pair of teacher
        # cosine matrices for every mode the active terms need (USA: each; CSA: teacher_mode).
        modes = (["each"] if use_usa else []) + ([self.teacher_mode] if use_csa else [])
        modes = list(dict.fromkeys(modes))
        ent: dict[str, tuple[Tensor, Tensor]] = {}
        if self.fused:
            # Σ p log p of each soft-label matrix once (from the logits), shared by CSA and USA.
            probs: dict[str, tuple[Tensor, Tensor]] = {}
            for m, (z_i, z_t) in teacher_logits_modes(teacher_image, teacher_text, self.tau_teacher, modes,
                                                      self.center_teacher).items():
                (p_i, h_i) = soft_labels_with_plogp(z_i)
                (p_t, h_t) = (p_i, h_i) if z_t is z_i else soft_labels_with_plogp(z_t)
                probs[m], ent[m] = (p_i, p_t), (h_i, h_t)
        else:
            probs = teacher_probs_modes(teacher_image, teacher_text, self.tau_teacher, modes, self.center_teacher)
        if use_csa:
            p_csa = probs[self.teacher_mode]
            plogp_csa = ent.get(self.teacher_mode)
            if self.smooth:
                # New tensors: USA's "each" rows (possibly the same ones) stay the teacher's. The
                # teacher features here are the global batch's (gathered under DDP), so is this B×B.
                p_i, p_t = p_csa
                q_i = smooth_rows(p_i)
                p_csa, plogp_csa = (q_i, q_i if p_t is p_i else smooth_rows(p_t)), None
            tau = self.tau_c if tau_c is None else tau_c
            if tau is None:
                raise ItrkitError("SoftLabelLoss(own_tau_c=False) needs tau_c= from the caller")
            kw = {"fused": self.fused, "plogp_sums": plogp_csa}
            if scores is not None:
                out["csa_loss"] = self.alpha * csa_from_scores(scores, *p_csa, tau, **kw)
            else:
                if image_embeds is None or text_embeds is None:
                    raise ItrkitError("CSA needs scores= or image_embeds= and text_embeds=")
                out["csa_loss"] = self.alpha * csa_from_probs(image_embeds, text_embeds, *p_csa, tau, **kw)
        if use_usa:
            assert image_uni is not None and text_uni is not None
            out["usa_loss"] = self.beta * usa_from_probs(image_uni, text_uni, *probs["each"], self.tau_img,
                                                         self.tau_txt, fused=self.fused, plogp_sums=ent.get("each"))
        return out

    def extra_repr(self) -> str:
        return (f"alpha={self.alpha}, beta={self.beta}, tau_teacher={self.tau_teacher}, "
                f"teacher_mode={self.teacher_mode}, center_teacher={self.center_teacher}, smooth={self.smooth}")
