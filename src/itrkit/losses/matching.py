"""Objectives of the fusion matchers, built from the shared terms (one implementation each):

- :class:`MatchingLoss` (SGR / SAF, CUSA appendix for SGRAF): the VSE++ hinge on the B×B fusion
  score matrix (sum over negatives for the first ``sum_warmup_epochs``, VSE∞'s warm-up, then the
  hardest negative), ``+ α·CSA`` on the same matrix ``+ β·USA`` on the pooled features.
- :class:`ReRankLoss` (dual encoder + ITM head, ALBEF / X2VLM; CUSA appendix α=0.3, β=0.75):
  ITC = multi-positive InfoNCE, ITM on in-batch hard negatives (soft targets with CUSA), CSA on
  the ITC cosine matrix, USA on the USA heads' outputs. With a frozen first-stage dual encoder
  (the re-ranker's ``model.itc_run``) the negatives are that encoder's hardest in-batch ones.

Both return ``*_loss`` terms (weighted) plus detached diagnostics under other keys.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itrkit.errors import ConfigError, DataError
from itrkit.losses.contrastive import ContrastiveLoss
from itrkit.losses.functional import triplet_from_scores
from itrkit.losses.itm import (
    hardest_negatives,
    itm_bce,
    mined_pairs,
    mining_generator,
    sample_hard_negatives,
    soft_negative_targets,
)
from itrkit.losses.soft_labels import SoftLabelLoss


def _float32(t: Tensor | None) -> Tensor | None:
    """Teacher rows in float32 at least (stores hold float16; float64 stays float64)."""
    return None if t is None else t.to(torch.promote_types(t.dtype, torch.float32))


class MatchingLoss(nn.Module):
    """``forward(scores, img_ids, teacher_image, teacher_text, image_uni, text_uni)``."""

    def __init__(self, triplet: float = 1.0, margin: float = 0.2, sum_warmup_epochs: int = 1,
                 soft: SoftLabelLoss | None = None) -> None:
        super().__init__()
        if margin < 0 or sum_warmup_epochs < 0 or triplet < 0:
            raise ConfigError("loss.triplet, loss.margin and loss.sum_warmup_epochs must be >= 0")
        self.triplet, self.margin, self.sum_warmup_epochs = float(triplet), float(margin), int(sum_warmup_epochs)
        self.soft = soft
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by the training task at each epoch start (0-based): decides the hinge's warm-up."""
        self.epoch = int(epoch)

    @property
    def hardest(self) -> bool:
        return self.epoch >= self.sum_warmup_epochs

    def forward(self, scores: Tensor, img_ids: Tensor, teacher_image: Tensor | None = None,
                teacher_text: Tensor | None = None, image_uni: Tensor | None = None,
                text_uni: Tensor | None = None) -> dict[str, Tensor]:
        out = {"triplet_loss": self.triplet * triplet_from_scores(scores, img_ids, self.margin, hardest=self.hardest)}
        if self.soft is not None and self.soft.active:
            out.update(self.soft(teacher_image, teacher_text, scores=scores, image_uni=image_uni, text_uni=text_uni))
        with torch.no_grad():
            out["pos_score"] = scores.diagonal().mean().detach()
        return out


class ReRankLoss(nn.Module):
    """``forward(out, img_ids, teacher_image, teacher_text, itm_pairs)`` where ``out`` holds the
    ITC embeddings (``image_embeds``, ``text_embeds``; USA heads' ``image_uni``, ``text_uni``) and
    ``itm_pairs(img_idx, txt_idx)`` gives the model's match logits of those batch pairs.

    The hard-negative draw of a step is seeded by ``mining_seed`` and the ``mining_step`` buffer
    (training-mode calls so far; in the state dict, so a resumed run mines the same negatives).
    ``mining_sim`` (B, B), when given, is a frozen dual encoder's image × caption cosine of the
    batch: the negatives are then its hardest ones (:func:`itrkit.losses.itm.hardest_negatives`)
    instead of draws from the model's own ITC softmax. Either way the ITM targets are ALBEF's: the
    B positives, one negative caption per image and one negative image per caption, one BCE mean.
    """

    def __init__(self, contrastive: ContrastiveLoss, itm: float = 1.0, soft_itm: float = 0.0,
                 soft_itm_tau: float = 0.0, mining_seed: int = 0, soft: SoftLabelLoss | None = None) -> None:
        super().__init__()
        if itm < 0 or soft_itm < 0 or soft_itm_tau < 0:
            raise ConfigError("loss.itm, loss.soft_itm and loss.soft_itm_tau must be >= 0")
        if soft_itm > 1:
            raise ConfigError(f"loss.soft_itm scales a probability target and must be <= 1, got {soft_itm}")
        if soft_itm > 0 and soft is None:
            raise ConfigError("loss.soft_itm > 0 needs the teacher settings (a SoftLabelLoss)")
        self.contrastive = contrastive
        self.itm, self.soft_itm = float(itm), float(soft_itm)
        self.soft = soft
        self.soft_itm_tau = float(soft_itm_tau) or (soft.tau_teacher if soft is not None else 0.0)
        self.mining_seed = int(mining_seed)
        self.register_buffer("mining_step", torch.zeros((), dtype=torch.long))

    @property
    def uses_teacher(self) -> bool:
        return self.soft_itm > 0 or (self.soft is not None and self.soft.active)

    def forward(self, out: dict[str, Tensor], img_ids: Tensor, teacher_image: Tensor | None,
                teacher_text: Tensor | None, itm_pairs: Callable[[Tensor, Tensor], Tensor],
                mining_sim: Tensor | None = None) -> dict[str, Tensor]:
        ids = img_ids.reshape(-1)
        b = len(ids)
        if b < 2:
            raise DataError(f"a training batch needs >= 2 pairs, got {b}")
        if self.uses_teacher and (teacher_image is None or teacher_text is None):
            raise ConfigError("CUSA terms (loss.csa, loss.usa or loss.soft_itm > 0) need teacher features: "
                              "set teacher.image_store and teacher.text_store")
        zi, zt = out["image_embeds"], out["text_embeds"]
        terms: dict[str, Tensor] = {"contrastive_loss": self.contrastive(zi, zt, ids)["contrastive_loss"]}
        step = int(self.mining_step)
        if self.training:
            self.mining_step += 1
        if mining_sim is not None:
            if tuple(mining_sim.shape) != (b, b):
                raise DataError(f"mining similarities must be {b}×{b} for this batch, got {tuple(mining_sim.shape)}")
            neg_txt, neg_img = hardest_negatives(mining_sim, ids)
        else:
            tau = self.contrastive.tau
            sim = (F.normalize(zi.detach().float(), dim=1) @ F.normalize(zt.detach().float(), dim=1).T) / float(tau.detach())
            neg_txt, neg_img = sample_hard_negatives(sim, ids, mining_generator(self.mining_seed, step))
        img_idx, txt_idx, n_neg = mined_pairs(neg_txt, neg_img)
        logits = itm_pairs(img_idx, txt_idx)
        t_img, t_txt = _float32(teacher_image), _float32(teacher_text)
        if self.soft_itm > 0:
            assert self.soft is not None and t_img is not None and t_txt is not None
            q_i, q_t = self.soft.teacher_probs(t_img, t_txt, tau_teacher=self.soft_itm_tau)
            y_i, y_t = soft_negative_targets(q_i, q_t, neg_txt, neg_img, self.soft_itm)
            neg_y = torch.cat([y_i, y_t]).to(logits.dtype)
        else:
            neg_y = torch.zeros(n_neg, dtype=logits.dtype, device=logits.device)
        targets = torch.cat([torch.ones(b, dtype=logits.dtype, device=logits.device), neg_y])
        terms["itm_loss"] = self.itm * itm_bce(logits, targets)
        if self.soft is not None and self.soft.active:
            terms.update(self.soft(t_img, t_txt, image_embeds=zi, text_embeds=zt, image_uni=out.get("image_uni"),
                                   text_uni=out.get("text_uni")))
        with torch.no_grad():
            pred = (logits.detach() > 0).float()
            terms["itm_acc"] = (pred == (targets > 0.5).float()).float().mean()
            terms["soft_target_mean"] = neg_y.mean() if n_neg else torch.zeros((), device=logits.device)
        return terms
