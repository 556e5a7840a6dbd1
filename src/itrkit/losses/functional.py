"""The docs/method.md §1 objectives as plain functions.

Conventions shared by every function here:

- Row ``i`` of ``img``/``txt`` is one (image, caption) pair; ``img_ids[i]`` names its image, so
  several rows may share an image (e.g. 5 captions of one photo in a batch).
- Similarities are cosine: inputs are L2-normalised inside (except :func:`instance`, whose
  classifier acts on raw features, as in IConE).
- Logits, log-softmax and KL are computed in at least float32 (float64 inputs stay float64), so
  fp16/bf16 features cannot overflow ``exp`` (docs/method.md §5.1, F1: no non-finite loss in 230 runs).
- KL divergences use ``F.kl_div(log_q, p, reduction="batchmean")`` = mean over rows of
  ``Σ_j p_j (log p_j − log q_j)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from itrkit.errors import DataError, ItrkitError

TEACHER_MODES = ("each", "add", "dot")


# --- helpers -------------------------------------------------------------------------------------
def _compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float32 at least; float64 if any input is float64 (tests compare against float64 loops)."""
    dt = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dt = torch.promote_types(dt, t.dtype)
    return dt


def _check_2d(name: str, x: Tensor, rows: int | None = None) -> None:
    if not isinstance(x, Tensor):
        raise ItrkitError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.ndim != 2:
        raise ItrkitError(f"{name} must be 2-D (batch, dim), got shape {tuple(x.shape)}")
    if rows is not None and x.shape[0] != rows:
        raise ItrkitError(f"{name} has {x.shape[0]} rows but the batch has {rows}")


def _as_ids(img_ids: Tensor | Sequence[Any], rows: int, device: torch.device) -> Tensor:
    ids = img_ids if isinstance(img_ids, Tensor) else torch.as_tensor(img_ids)
    ids = ids.reshape(-1).to(device)
    if ids.numel() != rows:
        raise ItrkitError(f"img_ids has {ids.numel()} entries but the batch has {rows} rows")
    return ids


def _norm(x: Tensor, dtype: torch.dtype) -> Tensor:
    return F.normalize(x.to(dtype), dim=-1)


def _cos(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    return _norm(a, dtype) @ _norm(b, dtype).T


def positive_matrix(img_ids: Tensor) -> Tensor:
    """``P[i,j] = 1[id_i = id_j] / #{k: id_k = id_i}`` (rows sum to 1), float64."""
    same = (img_ids[:, None] == img_ids[None, :]).to(torch.float64)
    return same / same.sum(dim=1, keepdim=True)


def _kl_rows(p: Tensor, logits: Tensor) -> Tensor:
    """Mean over rows of KL(p_i ‖ softmax(logits_i))."""
    return F.kl_div(F.log_softmax(logits, dim=1), p, reduction="batchmean")


# --- contrastive ---------------------------------------------------------------------------------
def info_nce(img: Tensor, txt: Tensor, img_ids: Tensor | Sequence[Any], tau: float | Tensor) -> Tensor:
    """Symmetric multi-positive InfoNCE (CUSA Eqs. 1–4; IConE Eqs. 6–8 with all captions of an image
    as positives).

    ``S = cos(img, txt)/tau``; ``L = ½(mean_i −Σ_j P_ij log_softmax(S)_ij + mean_i −Σ_j P_ij
    log_softmax(Sᵀ)_ij)`` with ``P`` from :func:`positive_matrix`. ``tau`` may be a learnable
    0-dim tensor (gradient flows to it).
    """
    _check_2d("img", img)
    _check_2d("txt", txt, img.shape[0])
    return info_nce_from_scores(_cos(img, txt, _compute_dtype(img, txt)), img_ids, tau)


def cosine_matrix(img: Tensor, txt: Tensor) -> Tensor:
    """``cos(img, txt)`` (B×B, float32 at least): the one matrix InfoNCE, triplet and CSA share
    when several of them train a dual encoder (computed once, back-propagated once)."""
    _check_2d("img", img)
    _check_2d("txt", txt, img.shape[0])
    return _cos(img, txt, _compute_dtype(img, txt))


def info_nce_from_scores(scores: Tensor, img_ids: Tensor | Sequence[Any], tau: float | Tensor) -> Tensor:
    """:func:`info_nce` on a given cosine matrix ``scores`` (image rows, caption columns)."""
    if scores.ndim != 2 or scores.shape[0] != scores.shape[1]:
        raise ItrkitError(f"scores must be a square B×B matrix, got shape {tuple(scores.shape)}")
    dt = scores.dtype if scores.dtype == torch.float64 else torch.float32
    ids = _as_ids(img_ids, scores.shape[0], scores.device)
    s = scores.to(dt) / (tau.to(dt) if isinstance(tau, Tensor) else tau)
    p = positive_matrix(ids).to(dt)
    # P is symmetric (equality of ids), so it also serves as the text→image target.
    l_i2t = -(p * F.log_softmax(s, dim=1)).sum(dim=1).mean()
    l_t2i = -(p * F.log_softmax(s.T, dim=1)).sum(dim=1).mean()
    return 0.5 * (l_i2t + l_t2i)


def triplet(img: Tensor, txt: Tensor, img_ids: Tensor | Sequence[Any], margin: float = 0.2) -> Tensor:
    """VSE++ hinge with the hardest negative in the batch (Faghri et al.; IConE's VSE++ baseline).

    ``s = cos(img, txt)``; ``h_i2t = max_{j: id_j≠id_i} [margin − s_ii + s_ij]₊``,
    ``h_t2i = max_{j: id_j≠id_i} [margin − s_ii + s_ji]₊``; ``L = mean_i (h_i2t + h_t2i)``.
    Rows with no negative in the batch contribute 0.
    """
    _check_2d("img", img)
    _check_2d("txt", txt, img.shape[0])
    dt = _compute_dtype(img, txt)
    return triplet_from_scores(_cos(img, txt, dt), img_ids, margin)


def triplet_from_scores(scores: Tensor, img_ids: Tensor | Sequence[Any], margin: float = 0.2,
                        hardest: bool = True) -> Tensor:
    """The VSE++ hardest-negative hinge of :func:`triplet` on any B×B matrix ``s[i, j]`` = score of
    row i's image with row j's caption (e.g. a fusion matcher's scores, which are not cosines).

    ``hardest=False`` sums the hinge over all negatives instead of taking the max (VSE0, Kiros et
    al.): the usual warm-up before hardest negatives, which stall while all scores are nearly equal.
    """
    b = scores.shape[0] if scores.ndim == 2 else -1
    if scores.ndim != 2 or scores.shape[1] != b:
        raise ItrkitError(f"scores must be a square B×B matrix, got shape {tuple(scores.shape)}")
    ids = _as_ids(img_ids, b, scores.device)
    s = scores if scores.dtype == torch.float64 else scores.float()
    pos = s.diagonal()
    neg = ids[:, None] != ids[None, :]
    # Hinge values are ≥ 0, so masking non-negatives with 0 leaves the max unchanged (or 0 if none).
    cost_i2t = (margin - pos[:, None] + s).clamp(min=0).masked_fill(~neg, 0.0)
    cost_t2i = (margin - pos[:, None] + s.T).clamp(min=0).masked_fill(~neg, 0.0)
    if not hardest:
        return (cost_i2t.sum(dim=1) + cost_t2i.sum(dim=1)).mean()
    return (cost_i2t.max(dim=1).values + cost_t2i.max(dim=1).values).mean()


# --- soft labels (CUSA) --------------------------------------------------------------------------
def _teacher_sim(t: Tensor, dtype: torch.dtype, center: bool) -> Tensor:
    t = t.to(dtype)
    if center:
        # Centring the teacher features on the batch mean removes the component every sample
        # shares (pooled CNN features are all positive), so cosines spread over [-1, 1] and the
        # soft labels stop being near-uniform (docs/method.md §5.1, F1). Subtracting a row's mean similarity
        # would be a no-op under the row softmax, so the centring is done on the features.
        t = t - t.mean(dim=0, keepdim=True)
    n = _norm(t, dtype)  # once: cos(t, t) needs one normalisation, not two (same values)
    return n @ n.T


@torch.no_grad()
def teacher_probs(
    t_img: Tensor,
    t_txt: Tensor,
    tau_teacher: float = 1.0,
    mode: str = "each",
    center: bool = False,
) -> tuple[Tensor, Tensor]:
    """Teacher soft labels ``(p_I, p_T)``: row softmax of teacher cosine similarities (CUSA Eq. 5).

    ``T_I = cos(t_img, t_img)``, ``T_T = cos(t_txt, t_txt)`` (diagonal kept, no gradient).
    ``mode``: ``each`` → ``p_I = softmax(T_I/τ_t)``, ``p_T = softmax(T_T/τ_t)``;
    ``add`` → both from ``(T_I + T_T)/2``; ``dot`` → both from ``sqrt(max(T_I,0)·max(T_T,0))``.
    ``center=True`` subtracts the batch-mean teacher feature (per modality) before the cosine.
    Returned in float32 (float64 if the teacher features are float64).
    """
    return teacher_probs_modes(t_img, t_txt, tau_teacher, (mode,), center)[mode]


@torch.no_grad()
def teacher_probs_modes(
    t_img: Tensor, t_txt: Tensor, tau_teacher: float = 1.0, modes: Sequence[str] = ("each",), center: bool = False,
) -> dict[str, tuple[Tensor, Tensor]]:
    """:func:`teacher_probs` for several ``modes`` of one batch, the teacher cosines computed once
    (e.g. USA's ``each`` and CSA's ``add``); each entry equals ``teacher_probs(…, mode, …)``."""
    logits = teacher_logits_modes(t_img, t_txt, tau_teacher, modes, center)
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for mode, (z_i, z_t) in logits.items():
        p_i = F.softmax(z_i, dim=1)
        out[mode] = (p_i, p_i if z_t is z_i else F.softmax(z_t, dim=1))
    return out


@torch.no_grad()
def teacher_logits_modes(
    t_img: Tensor, t_txt: Tensor, tau_teacher: float, modes: Sequence[str], center: bool = False,
) -> dict[str, tuple[Tensor, Tensor]]:
    """The teacher logits ``(z_I, z_T)`` whose row softmaxes are :func:`teacher_probs_modes`
    (``z_T is z_I`` for the modes that combine the two teachers); checks as there."""
    for mode in modes:
        if mode not in TEACHER_MODES:
            raise ItrkitError(f"teacher mode '{mode}' is unknown (use one of {', '.join(TEACHER_MODES)})")
    _check_2d("teacher_image", t_img)
    _check_2d("teacher_text", t_txt, t_img.shape[0])
    if not float(tau_teacher) > 0:
        raise ItrkitError(f"tau_teacher must be > 0, got {tau_teacher}")
    dt = _compute_dtype(t_img, t_txt)
    t_i = _teacher_sim(t_img, dt, center)
    t_t = _teacher_sim(t_txt, dt, center)
    out: dict[str, tuple[Tensor, Tensor]] = {}
    for mode in modes:
        if mode == "each":
            out[mode] = (t_i / tau_teacher, t_t / tau_teacher)
            continue
        both = 0.5 * (t_i + t_t) if mode == "add" else torch.sqrt(t_i.clamp(min=0) * t_t.clamp(min=0))
        # One matrix serves both directions: the two softmaxes were of the same matrix anyway.
        z = both / tau_teacher
        out[mode] = (z, z)
    return out


@torch.no_grad()
def soft_labels_with_plogp(z: Tensor) -> tuple[Tensor, Tensor]:
    """``(softmax(z), Σ p log p)`` from teacher logits: ``log p`` is ``log_softmax(z)``, so no
    ``xlogy`` pass (the slowest op of the loss on CPU); an underflowed ``p = 0`` adds 0 as in xlogy."""
    p = F.softmax(z, dim=1)
    return p, (p * F.log_softmax(z, dim=1)).sum()


def _tau(tau: float | Tensor, dtype: torch.dtype) -> float | Tensor:
    return tau.to(dtype) if isinstance(tau, Tensor) else tau


@torch.no_grad()
def plogp(p: Tensor) -> Tensor:
    """``Σ_ij p_ij log p_ij`` (0·log 0 = 0): the label-only part of ``KL(p‖q)``, computed once per
    soft-label matrix and shared by every term that uses it (CSA and USA share ``p_I``, ``p_T``)."""
    return torch.xlogy(p, p).sum()


class _KLLogits(torch.autograd.Function):
    """``KL(p‖softmax(s/τ))`` as a row mean in one autograd node.

    Replaces divide → log_softmax → kl_div (three nodes, three B×B temporaries in backward) with
    the closed-form gradient ``∂/∂z = (softmax(z) − p)/B`` (rows of ``p`` sum to 1), ``∂s = ∂z/τ``,
    ``∂τ = −Σ ∂z·z/τ``. ``plogp_sum`` = :func:`plogp` of ``p``.
    """

    @staticmethod
    def forward(ctx: Any, s: Tensor, tau: Tensor, p: Tensor, plogp_sum: Tensor) -> Tensor:  # type: ignore[override]
        z = s / tau
        log_q = torch.log_softmax(z, dim=1)
        rows = s.shape[0]
        ctx.save_for_backward(z, log_q, p, tau)
        return (plogp_sum - (p * log_q).sum()) / rows

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        z, log_q, p, tau = ctx.saved_tensors
        dz = (log_q.exp() - p) * (grad / z.shape[0])
        ds = dz / tau if ctx.needs_input_grad[0] else None
        dtau = -(dz * z).sum() / tau if ctx.needs_input_grad[1] else None
        return ds, dtau, None, None


def kl_logits(p: Tensor, s: Tensor, tau: float | Tensor, plogp_sum: Tensor | None = None) -> Tensor:
    """Fused ``F.kl_div(F.log_softmax(s / tau, 1), p, reduction="batchmean")``: the same value and
    gradients to float rounding, in one autograd node; ``plogp_sum`` (:func:`plogp` of ``p``)
    may be passed when ``p`` serves several terms. ``s``, ``p`` float32 or float64."""
    t = tau.to(s.dtype) if isinstance(tau, Tensor) else torch.tensor(float(tau), dtype=s.dtype, device=s.device)
    p = p.to(s.dtype)
    h = plogp(p) if plogp_sum is None else plogp_sum.to(s.dtype)
    return _KLLogits.apply(s, t, p, h)


def _check_pair_and_probs(a_name: str, a: Tensor, b_name: str, b_: Tensor, p_img: Tensor, p_txt: Tensor) -> None:
    """Two (B, d) feature matrices and two (B, B) teacher soft-label matrices."""
    _check_2d(a_name, a)
    _check_2d(b_name, b_, a.shape[0])
    b = a.shape[0]
    if p_img.shape != (b, b) or p_txt.shape != (b, b):
        raise ItrkitError(f"teacher soft labels must be {b}x{b} to match the batch, got "
                          f"{tuple(p_img.shape)} and {tuple(p_txt.shape)}")


def csa_from_probs(img: Tensor, txt: Tensor, p_img: Tensor, p_txt: Tensor, tau: float | Tensor, *,
                   fused: bool = False, plogp_sums: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """CSA (CUSA Eq. 6) given teacher soft labels: ``½[KL(p_I‖softmax(S/τ)) + KL(p_T‖softmax(Sᵀ/τ))]``
    (``fused``, ``plogp_sums``: see :func:`csa_from_scores`)."""
    _check_pair_and_probs("img", img, "txt", txt, p_img, p_txt)
    dt = _compute_dtype(img, txt)
    return csa_from_scores(_cos(img, txt, dt), p_img, p_txt, tau, fused=fused, plogp_sums=plogp_sums)


def csa_from_scores(scores: Tensor, p_img: Tensor, p_txt: Tensor, tau: float | Tensor, *, fused: bool = False,
                    plogp_sums: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """CSA on any B×B image-text similarity matrix (e.g. a fusion matcher's scores, whose pairs
    are not dot products): ``½[KL(p_I‖softmax(S/τ)) + KL(p_T‖softmax(Sᵀ/τ))]``.

    ``fused=True``: each KL term is one :func:`kl_logits` node (same value to float rounding);
    ``plogp_sums`` = (:func:`plogp` of ``p_img``, of ``p_txt``) when already computed."""
    b = scores.shape[0] if scores.ndim == 2 else -1
    if scores.ndim != 2 or scores.shape[1] != b:
        raise ItrkitError(f"scores must be a square B×B matrix, got shape {tuple(scores.shape)}")
    if p_img.shape != (b, b) or p_txt.shape != (b, b):
        raise ItrkitError(f"teacher soft labels must be {b}x{b} to match the batch, got "
                          f"{tuple(p_img.shape)} and {tuple(p_txt.shape)}")
    dt = scores.dtype if scores.dtype == torch.float64 else torch.float32
    if fused:
        h_i, h_t = plogp_sums if plogp_sums is not None else (None, None)
        s = scores.to(dt)
        return 0.5 * (kl_logits(p_img, s, tau, h_i) + kl_logits(p_txt, s.T, tau, h_t))
    s = scores.to(dt) / _tau(tau, dt)
    return 0.5 * (_kl_rows(p_img.to(dt), s) + _kl_rows(p_txt.to(dt), s.T))


def usa_from_probs(
    img_uni: Tensor, txt_uni: Tensor, p_img: Tensor, p_txt: Tensor,
    tau_img: float | Tensor, tau_txt: float | Tensor, *, fused: bool = False,
    plogp_sums: tuple[Tensor, Tensor] | None = None,
) -> Tensor:
    """USA (CUSA Eqs. 7–8) given teacher soft labels:
    ``½[KL(p_I‖softmax(cos(u_I,u_I)/τ_I)) + KL(p_T‖softmax(cos(u_T,u_T)/τ_T))]``
    (``fused``, ``plogp_sums``: see :func:`csa_from_scores`)."""
    _check_pair_and_probs("img_uni", img_uni, "txt_uni", txt_uni, p_img, p_txt)
    dt = _compute_dtype(img_uni, txt_uni)
    if fused:
        # One normalisation per matrix for cos(u, u): same values, one backward node fewer (the
        # gradient then sums before the normalisation's backward: equal to float rounding).
        n_i, n_t = _norm(img_uni, dt), _norm(txt_uni, dt)
        h_i, h_t = plogp_sums if plogp_sums is not None else (None, None)
        return 0.5 * (kl_logits(p_img, n_i @ n_i.T, tau_img, h_i) + kl_logits(p_txt, n_t @ n_t.T, tau_txt, h_t))
    s_i = _cos(img_uni, img_uni, dt) / _tau(tau_img, dt)
    s_t = _cos(txt_uni, txt_uni, dt) / _tau(tau_txt, dt)
    return 0.5 * (_kl_rows(p_img.to(dt), s_i) + _kl_rows(p_txt.to(dt), s_t))


def csa(
    img: Tensor, txt: Tensor, t_img: Tensor, t_txt: Tensor, tau: float | Tensor,
    tau_teacher: float = 1.0, mode: str = "each", center: bool = False,
) -> Tensor:
    """Cross-modal Soft-label Alignment (CUSA Eqs. 5–6).

    ``S = cos(img, txt)``; ``L = ½[KL(p_I ‖ softmax(S/τ)) + KL(p_T ‖ softmax(Sᵀ/τ))]`` with
    ``(p_I, p_T) = teacher_probs(t_img, t_txt, tau_teacher, mode, center)``.
    """
    _check_2d("teacher_image", t_img, img.shape[0])
    p_i, p_t = teacher_probs(t_img, t_txt, tau_teacher, mode, center)
    return csa_from_probs(img, txt, p_i, p_t, tau)


def usa(
    img_uni: Tensor, txt_uni: Tensor, t_img: Tensor, t_txt: Tensor,
    tau_img: float | Tensor, tau_txt: float | Tensor, tau_teacher: float = 1.0, center: bool = False,
) -> Tensor:
    """Uni-modal Soft-label Alignment (CUSA Eqs. 7–8).

    ``L = ½[KL(p_I ‖ softmax(cos(img_uni, img_uni)/τ_img)) + KL(p_T ‖ softmax(cos(txt_uni, txt_uni)/τ_txt))]``;
    ``p_I`` always comes from the image teacher and ``p_T`` from the text teacher (no modes).
    """
    _check_2d("teacher_image", t_img, img_uni.shape[0])
    p_i, p_t = teacher_probs(t_img, t_txt, tau_teacher, "each", center)
    return usa_from_probs(img_uni, txt_uni, p_i, p_t, tau_img, tau_txt)


# --- instance classification (IConE) -------------------------------------------------------------
def _check_labels(labels: Tensor, rows: int, num_classes: int) -> Tensor:
    if not isinstance(labels, Tensor):
        labels = torch.as_tensor(labels)
    labels = labels.reshape(-1)
    if labels.numel() != rows:
        raise ItrkitError(f"labels has {labels.numel()} entries but the batch has {rows} rows")
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ItrkitError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if rows:
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            bad = lo if lo < 0 else hi
            raise DataError(f"instance label {bad} is outside [0, {num_classes}) (one class per training image)")
    return labels.long()


class _ChunkedCE(torch.autograd.Function):
    """Mean cross-entropy of ``x @ Wᵀ`` whose logits never exist all at once.

    Forward keeps a running logsumexp over class chunks; backward recomputes each chunk's logits,
    so memory is O(B·chunk) beyond W and its gradient instead of O(B·C).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, w: Tensor, labels: Tensor, chunk: int) -> Tensor:  # type: ignore[override]
        b = x.shape[0]
        lse = torch.full((b,), float("-inf"), dtype=x.dtype, device=x.device)
        for start in range(0, w.shape[0], chunk):
            lse = torch.logaddexp(lse, torch.logsumexp(x @ w[start:start + chunk].T, dim=1))
        target = (x * w[labels]).sum(dim=1)
        ctx.save_for_backward(x, w, labels, lse)
        ctx.chunk = chunk
        return (lse - target).mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:
        x, w, labels, lse = ctx.saved_tensors
        scale = grad_out / x.shape[0]
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx = torch.zeros_like(x) if need_x else None
        gw = torch.zeros_like(w) if need_w else None
        for start in range(0, w.shape[0], ctx.chunk):
            wc = w[start:start + ctx.chunk]
            prob = torch.exp(x @ wc.T - lse[:, None])  # softmax restricted to this chunk
            if gx is not None:
                gx.addmm_(prob, wc)
            if gw is not None:
                gw[start:start + ctx.chunk] = prob.T @ x
        # The −onehot part of (softmax − onehot).
        if gx is not None:
            gx -= w[labels]
            gx *= scale
        if gw is not None:
            gw.index_add_(0, labels, x, alpha=-1.0)
            gw *= scale
        return gx, gw, None, None


def _ce(x: Tensor, weight: Tensor, labels: Tensor, chunk_classes: int | None) -> Tensor:
    if chunk_classes is None or chunk_classes >= weight.shape[0]:
        return F.cross_entropy(x @ weight.T, labels)
    return _ChunkedCE.apply(x, weight, labels, int(chunk_classes))


def instance(
    img: Tensor, txt: Tensor, labels: Tensor, weight: Tensor, chunk_classes: int | None = None,
) -> Tensor:
    """IConE instance loss (IConE Eqs. 1–5; Dual-Path's instance loss): ``L = L_v + L_t`` with
    ``L_v = CE(img @ Wᵀ, labels)``, ``L_t = CE(txt @ Wᵀ, labels)``, each a batch mean.

    ``weight`` is the classifier ``W ∈ R^{C×d}`` shared by both modalities (bias-free); inputs are
    NOT normalised. ``chunk_classes`` bounds memory by streaming the softmax over class chunks
    (same value and gradient as the plain path).
    """
    _check_2d("img", img)
    _check_2d("txt", txt, img.shape[0])
    _check_2d("weight", weight)
    if img.shape[1] != weight.shape[1] or txt.shape[1] != weight.shape[1]:
        raise ItrkitError(f"instance classifier has dim {weight.shape[1]} but embeddings have dims "
                          f"{img.shape[1]} (image) and {txt.shape[1]} (text)")
    if chunk_classes is not None and chunk_classes <= 0:
        raise ItrkitError(f"chunk_classes must be a positive number of classes, got {chunk_classes}")
    lab = _check_labels(labels, img.shape[0], weight.shape[0]).to(img.device)
    dt = _compute_dtype(img, txt, weight)
    w = weight.to(dt)
    return _ce(img.to(dt), w, lab, chunk_classes) + _ce(txt.to(dt), w, lab, chunk_classes)
