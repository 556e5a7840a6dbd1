"""The dual encoder's objective: a weighted sum of the losses of docs/method.md §1, weights set per stage.

``L = w_c·InfoNCE + w_t·triplet + α·CSA + β·USA + w_i·instance``. Each term is computed by its
``itrkit.losses`` module, which owns its temperatures (and the instance classifier); CSA and USA
are :class:`~itrkit.losses.soft_labels.SoftLabelLoss`, shared with the fusion matchers.
Only terms used by some stage are built, so unused temperatures do not appear in checkpoints.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from itrkit.errors import ConfigError
from itrkit.losses import ContrastiveLoss, InstanceLoss, TripletLoss
from itrkit.losses.functional import cosine_matrix
from itrkit.losses.soft_labels import SoftLabelLoss
from itrkit.train.config import LOSS_TERMS, TrainConfig


class Objective(nn.Module):
    def __init__(self, cfg: TrainConfig, num_classes: int, embed_dim: int) -> None:
        super().__init__()
        lc = cfg.loss
        self.weights = {k: 0.0 for k in LOSS_TERMS}
        self.contrastive = ContrastiveLoss(tau=lc.tau, learnable=lc.tau_learnable, tau_min=lc.tau_min, tau_max=lc.tau_max)
        self.triplet = TripletLoss(margin=lc.margin) if cfg.uses("triplet") else None
        self.cusa = None
        if cfg.uses("csa") or cfg.uses("usa"):
            self.cusa = SoftLabelLoss(
                alpha=1.0, beta=1.0, tau_c=lc.tau_c, tau_img=lc.tau_img, tau_txt=lc.tau_txt,
                tau_min=lc.tau_uni_min, tau_max=lc.tau_uni_max, learnable=lc.tau_uni_learnable,
                tau_teacher=lc.tau_teacher, teacher_mode=lc.teacher_mode, center_teacher=lc.center_teacher,
                smooth=cfg.teacher.smooth)
        self.instance = InstanceLoss(num_classes, embed_dim) if cfg.uses("instance") else None

    def set_weights(self, weights: dict[str, float]) -> None:
        self.weights = dict(weights)
        if self.cusa is not None:
            # SoftLabelLoss skips a term whose weight is 0; the objective keeps α, β themselves.
            self.cusa.alpha = 1.0 if weights["csa"] > 0 else 0.0
            self.cusa.beta = 1.0 if weights["usa"] > 0 else 0.0

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        w = self.weights
        img, txt, ids = out["image_embeds"], out["text_embeds"], batch["img_ids"]
        losses: dict[str, torch.Tensor] = {}
        csa_on = w["csa"] > 0 and self.cusa is not None
        # InfoNCE and CSA read the same cosine matrix: computed (and back-propagated) once.
        scores = cosine_matrix(img, txt) if w["contrastive"] > 0 and csa_on else None
        if w["contrastive"] > 0:
            losses["contrastive_loss"] = w["contrastive"] * self.contrastive(img, txt, ids, scores=scores)["contrastive_loss"]
        if w["triplet"] > 0 and self.triplet is not None:
            losses["triplet_loss"] = w["triplet"] * self.triplet(img, txt, ids)["triplet_loss"]
        if (w["csa"] > 0 or w["usa"] > 0) and self.cusa is not None:
            for key in ("teacher_image", "teacher_text"):
                if key not in batch:
                    raise ConfigError(f"CSA/USA need teacher features: set teacher.image_store and teacher.text_store ({key} missing)")
            pair = {"scores": scores} if scores is not None else {"image_embeds": img, "text_embeds": txt}
            terms = self.cusa(batch["teacher_image"], batch["teacher_text"], **pair,
                              image_uni=out.get("image_uni"), text_uni=out.get("text_uni"))
            if "csa_loss" in terms:
                losses["csa_loss"] = w["csa"] * terms["csa_loss"]
            if "usa_loss" in terms:
                losses["usa_loss"] = w["usa"] * terms["usa_loss"]
        if w["instance"] > 0 and self.instance is not None:
            losses["instance_loss"] = w["instance"] * self.instance(img, txt, batch["labels"])["instance_loss"]
        if not losses:
            raise ConfigError("every loss weight is 0 in this stage: nothing to train")
        return losses

    def clamp_temperatures_(self) -> None:
        """Keep learnable temperatures inside their bounds after each optimizer step."""
        self.contrastive.clamp_temperatures_()
        if self.cusa is not None:
            self.cusa.clamp_temperatures_()

    def temperatures(self) -> dict[str, float]:
        t = {"tau": float(self.contrastive.temperature)}
        if self.cusa is not None:
            t.update({k: float(v) for k, v in self.cusa.temperatures().items()})
        return t
