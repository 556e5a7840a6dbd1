"""Image-text matching (ITM) on in-batch hard negatives (ALBEF §3.2, X2VLM), with CUSA's soft
ITM targets (CUSA appendix: "soft labels for the ITM loss of hard negatives").

For each image row one caption and for each caption row one image are drawn from the softmax of
the (detached) ITC similarities with every positive (same ``img_id``) masked, by inverse-CDF
sampling from a ``torch.Generator`` seeded by ``(mining_seed, step)``, so a resumed run mines the
same negatives. The ITM loss is the mean binary cross-entropy over the B positives and the mined
negatives. With CUSA, a mined negative's target is the teacher's soft label relative to the
anchor's own::

    image-anchored negative (image i, caption j):  y = s · min(1, p_I[i, j] / p_I[i, i])
    caption-anchored negative (caption j, image i): y = s · min(1, p_T[j, i] / p_T[j, j])

``p[i, j] / p[i, i] = exp((T_ij − T_ii) / τ_s)`` (a softmax row shares its normaliser), so
``y ∈ (0, s]``: ``s`` for a pair the teacher cannot tell from the anchor (or ranks above it: the
ratio exceeds 1 there, and a BCE target must stay ≤ 1), → 0 for an unrelated one.

A re-ranker on top of a trained, frozen dual encoder (``model.itc_run``) mines with
:func:`hardest_negatives` instead: for each row the single most similar non-positive under the
dual encoder's cosine (argmax, ties by the lower index), the negatives its ranking puts highest and
the re-ranker must therefore learn to push down. Both miners return the same ``(neg_txt, neg_img)``
layout, so :func:`mined_pairs` and the ITM loss are shared.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from itrkit.errors import ItrkitError


@torch.no_grad()
def sample_hard_negatives(sim: Tensor, img_ids: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """One in-batch hard negative per image row and per caption row (ALBEF / X2VLM).

    ``sim`` (B, B): image row i × caption row j similarity logits (ITC cosine / τ). Image row i
    draws a caption row from ``softmax_j(sim[i, j])`` over ``j`` with ``img_ids[j] ≠ img_ids[i]``;
    caption row j draws an image row from ``softmax_i(sim[i, j])`` over ``i`` with a different id.
    Sampling is by inverse CDF in float64 with ``u = torch.rand(2, B, generator=generator,
    dtype=torch.float64)`` (``u[0]`` for image rows, ``u[1]`` for caption rows): the chosen index
    is the first whose cumulative weight exceeds ``u · total``. Returns ``(neg_txt, neg_img)``,
    each (B,) int64, ``-1`` where the row has no negative in the batch (all rows share its id).
    """
    s, neg = _mining_inputs(sim, img_ids)
    u = torch.rand(2, s.shape[0], generator=generator, dtype=torch.float64).to(sim.device)  # the CPU stream
    return _inverse_cdf(s, neg, u[0]), _inverse_cdf(s.T, neg.T, u[1])


@torch.no_grad()
def hardest_negatives(sim: Tensor, img_ids: Tensor) -> tuple[Tensor, Tensor]:
    """The most similar in-batch negative of each image row and each caption row.

    ``sim`` (B, B): image row i × caption row j similarity. Image row i takes
    ``argmax_j sim[i, j]`` over ``j`` with ``img_ids[j] ≠ img_ids[i]`` (never a caption of its own
    image), caption row j takes ``argmax_i sim[i, j]`` over ``i`` with a different id; ties go to
    the lower index. Returns ``(neg_txt, neg_img)``, each (B,) int64, ``-1`` where the row has no
    negative in the batch (the layout of :func:`sample_hard_negatives`).
    """
    s, neg = _mining_inputs(sim, img_ids)
    return _argmax_allowed(s, neg), _argmax_allowed(s.T, neg.T)


def _mining_inputs(sim: Tensor, img_ids: Tensor) -> tuple[Tensor, Tensor]:
    """(float64 similarities, mask of allowed negatives: pairs of different images), checked."""
    b = sim.shape[0]
    if sim.ndim != 2 or sim.shape[1] != b:
        raise ItrkitError(f"similarities must be a square B×B matrix, got shape {tuple(sim.shape)}")
    ids = img_ids.reshape(-1).to(sim.device)
    if ids.numel() != b:
        raise ItrkitError(f"img_ids has {ids.numel()} entries but the batch has {b} rows")
    return sim.detach().to(torch.float64), ids[:, None] != ids[None, :]


def _argmax_allowed(x: Tensor, allowed: Tensor) -> Tensor:
    """Row-wise index of the largest allowed entry (first one on ties), -1 if none is allowed."""
    if bool(torch.isnan(x).any()):
        raise ItrkitError("similarities for hard-negative mining contain NaN")
    # torch.argmax returns the first maximal index; -inf marks the excluded entries.
    idx = x.masked_fill(~allowed, float("-inf")).argmax(dim=1)
    return torch.where(allowed.any(1), idx, torch.full_like(idx, -1))


def _inverse_cdf(logits: Tensor, allowed: Tensor, u: Tensor) -> Tensor:
    """Row-wise draw from ``softmax(logits)`` restricted to ``allowed`` (float64), -1 if none."""
    masked = logits.masked_fill(~allowed, float("-inf"))
    has = allowed.any(1)
    w = torch.softmax(masked.masked_fill(~has[:, None], 0.0), dim=1) * allowed
    cdf = torch.cumsum(w, dim=1)
    x = (u * cdf[:, -1]).unsqueeze(1)
    idx = torch.searchsorted(cdf, x, right=True).squeeze(1)
    # u·total can round up to total: fall back to the last allowed column (the searchsorted
    # result is otherwise always an allowed column, since zero weights do not raise the CDF).
    last = allowed.shape[1] - 1 - torch.flip(allowed, dims=[1]).to(torch.int8).argmax(1)
    idx = torch.where(idx >= allowed.shape[1], last, idx)
    return torch.where(has, idx, torch.full_like(idx, -1))


@torch.no_grad()
def soft_negative_targets(p_img: Tensor, p_txt: Tensor, neg_txt: Tensor, neg_img: Tensor,
                          scale: float) -> tuple[Tensor, Tensor]:
    """CUSA ITM soft labels of the mined negatives (see the module doc).

    Image row i with caption row ``neg_txt[i]``: ``scale · min(1, p_img[i, j] / p_img[i, i])``;
    caption row j with image row ``neg_img[j]``: ``scale · min(1, p_txt[j, i] / p_txt[j, j])``. Rows with index -1 are
    dropped: the results align with ``neg_txt[neg_txt >= 0]`` and ``neg_img[neg_img >= 0]``.
    """
    rows_i = (neg_txt >= 0).nonzero().squeeze(1)
    rows_t = (neg_img >= 0).nonzero().squeeze(1)
    y_i = (p_img[rows_i, neg_txt[rows_i]] / p_img[rows_i, rows_i]).clamp(max=1.0)
    y_t = (p_txt[rows_t, neg_img[rows_t]] / p_txt[rows_t, rows_t]).clamp(max=1.0)
    return scale * y_i, scale * y_t


def mining_generator(mining_seed: int, step: int) -> torch.Generator:
    """The generator that draws step ``step``'s hard negatives."""
    return torch.Generator().manual_seed(int(mining_seed) * 1_000_003 + int(step))


def mined_pairs(neg_txt: Tensor, neg_img: Tensor) -> tuple[Tensor, Tensor, int]:
    """``(img_idx, txt_idx, n_neg)`` of the ITM pairs: the B positives, then the image-anchored
    negatives, then the caption-anchored ones (rows without a negative dropped)."""
    b = len(neg_txt)
    rows_i = (neg_txt >= 0).nonzero().squeeze(1)
    rows_t = (neg_img >= 0).nonzero().squeeze(1)
    pos = torch.arange(b, device=neg_txt.device)
    img_idx = torch.cat([pos, rows_i, neg_img[rows_t]])
    txt_idx = torch.cat([pos, neg_txt[rows_i], rows_t])
    return img_idx, txt_idx, len(rows_i) + len(rows_t)


def itm_bce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean binary cross-entropy of the match logits, in float32 at least."""
    dt = torch.promote_types(logits.dtype, torch.float32)
    return F.binary_cross_entropy_with_logits(logits.to(dt), targets.to(dt))
