"""Dual encoder + fusion re-ranker (ALBEF / X2VLM style), with optional CUSA soft labels.

Two heads share one image and one text encoder:

- **ITC** (the dual encoder): image = mean of the projected region states → Linear; text = mean of
  the projected GRU word states over real tokens → Linear; symmetric multi-positive InfoNCE with a
  learnable clamped temperature (SPEC §1 ``info_nce``).
- **ITM** (the fusion head): ``layers`` pre-LN blocks in which the caption's word states attend to
  themselves (self-attention), then to the image's region states (cross-attention), then an MLP;
  the final word states are pooled (mean over real words, or the first word) → Linear → one match
  logit per (image, caption) pair.

Training (``forward``): ``L = itc_loss + itm_loss`` (+ ``csa_loss + usa_loss`` with CUSA). The ITM
head sees the B positive pairs and 2B in-batch hard negatives (ALBEF §3.2, X2VLM): for each image
one caption and for each caption one image, drawn from the softmax of the (detached) ITC
similarities with every positive (same ``img_id``) masked, by inverse-CDF sampling with uniforms
from a ``torch.Generator`` seeded from ``mining_seed`` and the step counter buffer
``mining_step`` (saved in the state dict, so a resumed run mines the same negatives). The ITM loss
is the mean binary cross-entropy over all mined pairs.

CUSA (AAAI 2024 appendix, α=0.3, β=0.75 for X2VLM): CSA (Eq. 6) and USA (Eqs. 7–8) on the ITC part
(USA heads: Linear-ReLU-Linear on the pooled image / text states) and soft labels on the ITM loss
of the hard negatives. The appendix only says "soft labels for the ITM loss of hard negatives"; the
target used here is the teacher's soft label of the negative relative to the anchor's own::

    image-anchored negative (image of row i, caption of row j):  y = s · p_I[i, j] / p_I[i, i]
    caption-anchored negative (caption of row j, image of row i): y = s · p_T[j, i] / p_T[j, j]

with ``(p_I, p_T) = teacher_probs(t_img, t_txt, τ_s, teacher_mode, center_teacher)``, the CSA
soft labels of the same batch at temperature ``τ_s = soft_itm_tau`` (default: ``tau_teacher``),
and ``s = soft_itm``. Because a softmax row shares its normaliser, ``p[i, j] / p[i, i] =
exp((T_ij − T_ii) / τ_s)`` with ``T`` the teacher cosine matrix: ``y ∈ (0, s]``, ``y = s`` for a
pair the teacher cannot tell from the anchor, ``y → 0`` for an unrelated one. Positives keep the
target 1. (With centred teacher features and τ_s = 0.1 the targets of real hard negatives are
~1e-4, i.e. inert; τ_s ≈ 0.25–0.5 gives targets of a few hundredths.)

Retrieval (X2VLM inference): ITC embeddings rank the whole gallery, then each query's top
``rerank_k`` candidates are re-scored by the ITM head and put, in ITM order, above every other
candidate, which keep their ITC order (:func:`make_rerank`). ``rerank_k=0`` is the dual encoder.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itrkit.errors import ConfigError, DataError, ItrkitError
from itrkit.eval.rerank import make_rerank
from itrkit.eval.retrieval import Rerank, evaluate_retrieval
from itrkit.losses.contrastive import clamp_temperature_, make_temperature
from itrkit.losses.functional import (
    TEACHER_MODES,
    csa_from_probs,
    info_nce,
    teacher_probs,
    usa_from_probs,
)
from itrkit.models.fusion_base import FusionBatch, FusionMatcher


# --------------------------------------------------------------------------------------------
# hard-negative mining and the ITM loss
# --------------------------------------------------------------------------------------------
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
    b = sim.shape[0]
    if sim.ndim != 2 or sim.shape[1] != b:
        raise ItrkitError(f"similarities must be a square B×B matrix, got shape {tuple(sim.shape)}")
    ids = img_ids.reshape(-1).to(sim.device)
    if ids.numel() != b:
        raise ItrkitError(f"img_ids has {ids.numel()} entries but the batch has {b} rows")
    u = torch.rand(2, b, generator=generator, dtype=torch.float64)
    neg = ids[:, None] != ids[None, :]
    s = sim.detach().to(torch.float64)
    return _inverse_cdf(s, neg, u[0]), _inverse_cdf(s.T, neg.T, u[1])


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

    Image row i with caption row ``neg_txt[i]``: ``scale · p_img[i, j] / p_img[i, i]``; caption row
    j with image row ``neg_img[j]``: ``scale · p_txt[j, i] / p_txt[j, j]``. Rows with index -1 are
    dropped: the results align with ``neg_txt[neg_txt >= 0]`` and ``neg_img[neg_img >= 0]``.
    """
    rows_i = (neg_txt >= 0).nonzero().squeeze(1)
    rows_t = (neg_img >= 0).nonzero().squeeze(1)
    y_i = p_img[rows_i, neg_txt[rows_i]] / p_img[rows_i, rows_i]
    y_t = p_txt[rows_t, neg_img[rows_t]] / p_txt[rows_t, rows_t]
    return scale * y_i, scale * y_t


# --------------------------------------------------------------------------------------------
# the fusion head
# --------------------------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head scaled dot-product attention (queries ``x`` (B, Lq, W) over a context (B, Lk, W)).

    ``kv(ctx)`` projects a context once; ``attend(x, k, v, key_mask)`` lets several queries share
    it (pairs of one image reuse its projected regions). ``key_mask`` (B, Lk): True = real key.
    """

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        if width % heads:
            raise ConfigError(f"fusion width {width} is not divisible by heads {heads}")
        self.heads = heads
        self.q, self.k, self.v, self.out = (nn.Linear(width, width) for _ in range(4))

    def _split(self, t: Tensor) -> Tensor:
        b, n, w = t.shape
        return t.reshape(b, n, self.heads, w // self.heads).transpose(1, 2)  # (B, h, L, d)

    def kv(self, ctx: Tensor) -> tuple[Tensor, Tensor]:
        return self._split(self.k(ctx)), self._split(self.v(ctx))

    def attend(self, x: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None = None) -> Tensor:
        b, lq, w = x.shape
        q = self._split(self.q(x))
        logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
        if key_mask is not None:
            logits = logits.masked_fill(~key_mask[:, None, None, :], float("-inf"))
        att = torch.softmax(logits, dim=-1) @ v
        return self.out(att.transpose(1, 2).reshape(b, lq, w))

    def forward(self, x: Tensor, ctx: Tensor, key_mask: Tensor | None = None) -> Tensor:
        return self.attend(x, *self.kv(ctx), key_mask)


class FusionBlock(nn.Module):
    """Pre-LN block: words ← words + SelfAttn(LN(words)); + CrossAttn(LN(words), regions); + MLP(LN(words)).

    ``region_kv`` is ``cross_attn.kv(regions)`` of each pair's image (projected once per image).
    """

    def __init__(self, width: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        hidden = int(round(width * mlp_ratio))
        self.ln_self, self.ln_cross, self.ln_mlp = nn.LayerNorm(width), nn.LayerNorm(width), nn.LayerNorm(width)
        self.self_attn = Attention(width, heads)
        self.cross_attn = Attention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width))

    def forward(self, words: Tensor, word_mask: Tensor, region_kv: tuple[Tensor, Tensor]) -> Tensor:
        x = self.ln_self(words)
        words = words + self.self_attn(x, x, word_mask)
        words = words + self.cross_attn.attend(self.ln_cross(words), *region_kv)
        return words + self.mlp(self.ln_mlp(words))


def _teacher_features(batch: FusionBatch) -> tuple[Tensor, Tensor]:
    """Teacher rows in float32 at least (stores hold float16; float64 stays float64)."""
    return tuple(t.to(torch.promote_types(t.dtype, torch.float32)) for t in (batch.t_img, batch.t_txt))


def _length_mask(lengths: Tensor, total: int) -> Tensor:
    return torch.arange(total, device=lengths.device)[None, :] < lengths[:, None]


def _masked_mean(x: Tensor, lengths: Tensor) -> Tensor:
    mask = _length_mask(lengths.to(x.device), x.shape[1]).to(x.dtype)
    return (x * mask.unsqueeze(-1)).sum(1) / lengths.to(x.device, x.dtype).unsqueeze(-1)


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
class ReRanker(FusionMatcher):
    """Dual encoder (ITC) + cross-attention ITM head; retrieval = ITC top-k re-ranked by ITM.

    ``region_dim``: C of the (R, C) region / grid features. ``text_tower``: an
    :class:`itrkit.models.rnn.RNNTextTower` (or the keyword arguments to build one; default a
    1-layer GRU over the MiniLM word pieces). ``width``/``layers``/``heads``/``mlp_ratio``: the
    fusion head; ``embed_dim``: ITC (and USA) embedding size. ``itm``: weight of the ITM loss.
    ``alpha``/``beta``/``soft_itm``: CUSA weights of CSA, USA and the ITM soft-label scale (0 = off;
    any > 0 needs teacher features in the batch); ``soft_itm_tau``: teacher temperature of the ITM
    soft labels (0 = ``tau_teacher``). ``rerank_k``: candidates re-scored per query at
    evaluation (0 = ITC only). ``pair_batch``: pairs per ITM forward at inference.

    ``itm_residual`` (default off, not in X2VLM): the match logit becomes the fusion head's output
    plus a learnable scale (init 5) times the ITC cosine of the pair. Trained from scratch on CPU
    budgets, the cross-attention head sits on the constant-prediction plateau (ITM loss = H(1/3) ≈
    0.637 with 1 positive per 2 negatives) for hundreds of steps, so its re-ranking is then worse
    than the dual encoder's order; the residual form starts from the ITC ranking and learns a
    correction.
    """

    def __init__(
        self,
        region_dim: int,
        text_tower: nn.Module | dict[str, Any] | None = None,
        embed_dim: int = 256,
        width: int = 256,
        layers: int = 1,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        pool: str = "mean",
        itm: float = 1.0,
        itm_residual: bool = False,
        tau: float = 0.05,
        tau_learnable: bool = True,
        tau_min: float = 0.01,
        tau_max: float = 0.1,
        alpha: float = 0.0,
        beta: float = 0.0,
        soft_itm: float = 0.0,
        soft_itm_tau: float = 0.0,
        tau_uni: float = 0.45,
        tau_uni_min: float = 0.1,
        tau_uni_max: float = 1.0,
        tau_uni_learnable: bool = True,
        tau_teacher: float = 0.1,
        teacher_mode: str = "each",
        center_teacher: bool = False,
        rerank_k: int = 16,
        pair_batch: int = 512,
        mining_seed: int = 0,
    ) -> None:
        super().__init__()
        if min(region_dim, embed_dim, width, layers, heads) <= 0:
            raise ConfigError("rerank: region_dim, embed_dim, width, layers and heads must be positive")
        if pool not in ("mean", "first"):
            raise ConfigError(f"rerank: pool must be mean or first, got '{pool}'")
        if min(itm, alpha, beta, soft_itm) < 0 or mlp_ratio <= 0:
            raise ConfigError("rerank: itm, alpha, beta and soft_itm must be >= 0 and mlp_ratio > 0")
        if soft_itm > 1:
            raise ConfigError(f"rerank: soft_itm scales a probability target and must be <= 1, got {soft_itm}")
        if teacher_mode not in TEACHER_MODES:
            raise ConfigError(f"rerank: teacher_mode '{teacher_mode}' is unknown (one of {', '.join(TEACHER_MODES)})")
        if not tau_teacher > 0:
            raise ConfigError(f"rerank: tau_teacher must be > 0, got {tau_teacher}")
        if rerank_k < 0 or pair_batch < 1:
            raise ConfigError("rerank: rerank_k must be >= 0 and pair_batch >= 1")
        if text_tower is None or isinstance(text_tower, dict):
            from itrkit.models.rnn import RNNTextTower

            text_tower = RNNTextTower(**{"name": "gru", "max_length": 32, **(text_tower or {})})
        self.text_tower = text_tower
        word_dim = int(text_tower.output_dim)
        self.region_dim, self.width, self.embed_dim = int(region_dim), int(width), int(embed_dim)
        self.pool, self.itm_weight, self.itm_residual = pool, float(itm), bool(itm_residual)
        self.alpha, self.beta, self.soft_itm = float(alpha), float(beta), float(soft_itm)
        if soft_itm_tau < 0:
            raise ConfigError(f"rerank: soft_itm_tau must be >= 0 (0 = tau_teacher), got {soft_itm_tau}")
        self.soft_itm_tau = float(soft_itm_tau) or float(tau_teacher)
        self.tau_teacher, self.teacher_mode, self.center_teacher = float(tau_teacher), teacher_mode, bool(center_teacher)
        self.rerank_k, self.pair_batch, self.mining_seed = int(rerank_k), int(pair_batch), int(mining_seed)
        self.tau_range, self.tau_uni_range = (float(tau_min), float(tau_max)), (float(tau_uni_min), float(tau_uni_max))

        # Raw CNN grid features are large and all positive: normalise before projecting.
        self.region_proj = nn.Sequential(nn.LayerNorm(region_dim), nn.Linear(region_dim, width))
        self.word_proj = nn.Linear(word_dim, width)
        self.itc_image = nn.Linear(width, embed_dim)
        self.itc_text = nn.Linear(width, embed_dim)
        self.tau = make_temperature("tau", tau, tau_learnable, tau_min, tau_max)
        self.blocks = nn.ModuleList(FusionBlock(width, heads, mlp_ratio) for _ in range(layers))
        self.ln_final = nn.LayerNorm(width)
        self.itm_head = nn.Linear(width, 1)
        if self.itm_residual:
            # Match logit = fusion output + itm_sim_scale · cos(ITC image, ITC caption): the fusion
            # head learns a correction of the dual encoder (see the class doc).
            self.itm_sim_scale = nn.Parameter(torch.tensor(5.0))
        if self.alpha > 0:
            self.tau_c = make_temperature("tau_c", tau_uni, tau_uni_learnable, tau_uni_min, tau_uni_max)
        if self.beta > 0:
            self.usa_image = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, embed_dim))
            self.usa_text = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, embed_dim))
            self.tau_img = make_temperature("tau_img", tau_uni, tau_uni_learnable, tau_uni_min, tau_uni_max)
            self.tau_txt = make_temperature("tau_txt", tau_uni, tau_uni_learnable, tau_uni_min, tau_uni_max)
        # Training steps seen: seeds hard-negative mining; persistent so resumed runs continue it.
        self.register_buffer("mining_step", torch.zeros((), dtype=torch.long))

    @property
    def uses_teacher(self) -> bool:
        """True when the batch must carry teacher features (``t_img``, ``t_txt``)."""
        return self.alpha > 0 or self.beta > 0 or self.soft_itm > 0

    def tokenize(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Captions → (tokens (N, L) int64, lengths (N,)) with the text tower's tokenizer."""
        out = self.text_tower.prepare(captions)
        return out["input_ids"], out["lengths"]

    # --- encoders -------------------------------------------------------------------------
    def encode_images(self, regions: Tensor) -> Tensor:
        """(N, R, C) region features → (N, R, width) region states."""
        if regions.ndim != 3 or regions.shape[2] != self.region_dim:
            raise DataError(f"region features must be (N, R, {self.region_dim}), got shape {tuple(regions.shape)}")
        return self.region_proj(regions.to(self.region_proj[1].weight.dtype))

    def encode_texts(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """(N, L) tokens → ((N, L', width) word states, lengths), L' = longest real caption."""
        lengths = lengths.reshape(-1).long().cpu()
        if tokens.ndim != 2 or len(lengths) != len(tokens):
            raise DataError(f"tokens must be (N, L) with N lengths, got {tuple(tokens.shape)} and {len(lengths)}")
        if len(lengths) and (int(lengths.min()) < 1 or int(lengths.max()) > tokens.shape[1]):
            raise DataError(f"caption lengths must lie in [1, {tokens.shape[1]}]")
        top = int(lengths.max()) if len(lengths) else 0
        words = self.text_tower.token_features(tokens[:, :top], lengths)
        return self.word_proj(words), lengths

    def embed_images(self, img_state: Tensor) -> Tensor:
        """ITC image embeddings (N, embed_dim) from region states (not normalised)."""
        return self.itc_image(img_state.mean(1))

    def embed_texts(self, words: Tensor, lengths: Tensor) -> Tensor:
        """ITC caption embeddings (N, embed_dim) from word states (not normalised)."""
        return self.itc_text(_masked_mean(words, lengths))

    # --- the ITM head ---------------------------------------------------------------------
    def itm_pairs(self, img_state: Tensor, words: Tensor, lengths: Tensor, img_index: Tensor | None = None) -> Tensor:
        """Match logit of each pair p = (image, words[p, :lengths[p]]): (P,).

        The image of pair p is ``img_state[p]``, or ``img_state[img_index[p]]`` when ``img_index``
        is given (each distinct image's regions are then projected to keys / values once).
        """
        lengths = lengths.to(words.device)
        top = int(lengths.max())
        x, mask = words[:, :top], _length_mask(lengths, top)
        if img_index is None:
            img_index = torch.arange(len(words))
        for block in self.blocks:
            k, v = block.cross_attn.kv(img_state)
            x = block(x, mask, (k[img_index], v[img_index]))
        x = self.ln_final(x)
        pooled = x[:, 0] if self.pool == "first" else _masked_mean(x, lengths)
        logit = self.itm_head(pooled).squeeze(1)
        if self.itm_residual:
            zi = F.normalize(self.embed_images(img_state), dim=1)[img_index]
            zt = F.normalize(self.embed_texts(words, lengths), dim=1)
            logit = logit + self.itm_sim_scale * (zi * zt).sum(1)
        return logit

    def score(self, img_state: Tensor, words: Tensor, lengths: Tensor) -> Tensor:
        """ITM logit of every image with every caption (N_img, N_txt), ``pair_batch`` pairs at a time."""
        n, m = len(img_state), len(words)
        ii, tt = torch.meshgrid(torch.arange(n), torch.arange(m), indexing="ij")
        ii, tt = ii.reshape(-1), tt.reshape(-1)
        out = torch.empty(n * m, dtype=torch.float32)
        for s in range(0, n * m, self.pair_batch):
            i, t = ii[s:s + self.pair_batch], tt[s:s + self.pair_batch]
            uniq, inv = torch.unique(i, return_inverse=True)
            out[s:s + len(i)] = self.itm_pairs(img_state[uniq], words[t], lengths[t], inv).float()
        return out.reshape(n, m)

    # --- training -------------------------------------------------------------------------
    def _clamp_temperatures(self) -> None:
        clamp_temperature_(self.tau, *self.tau_range)
        for name in ("tau_c", "tau_img", "tau_txt"):
            if hasattr(self, name):
                clamp_temperature_(getattr(self, name), *self.tau_uni_range)

    def clamp_temperatures_(self) -> None:
        """Keep learnable temperatures in range (call after ``optimizer.step()``)."""
        self._clamp_temperatures()

    def temperatures(self) -> dict[str, float]:
        """Current temperatures by name (logged by the trainer at each validation)."""
        return {name: float(getattr(self, name).detach()) for name in ("tau", "tau_c", "tau_img", "tau_txt")
                if hasattr(self, name)}

    def mining_generator(self, step: int) -> torch.Generator:
        """The generator that draws step ``step``'s hard negatives."""
        return torch.Generator().manual_seed(self.mining_seed * 1_000_003 + int(step))

    def forward(self, batch: FusionBatch, step: int | None = None) -> dict[str, Tensor]:
        """``{"itc_loss", "itm_loss", ["csa_loss", "usa_loss"]}`` (weighted; the trainer sums them)
        plus detached diagnostics (``tau``, ``itm_acc``, ``soft_target_mean``).

        ``step`` seeds the hard-negative draw; by default the ``mining_step`` buffer, which advances
        by one per training-mode call.
        """
        b = len(batch.img_ids)
        if b < 2:
            raise DataError(f"a training batch needs >= 2 pairs, got {b}")
        if self.uses_teacher and (batch.t_img is None or batch.t_txt is None):
            raise ConfigError("rerank: CUSA terms (alpha, beta or soft_itm > 0) need teacher features in the batch")
        self._clamp_temperatures()
        ids = batch.img_ids.reshape(-1)
        img_state = self.encode_images(batch.regions)
        words, lengths = self.encode_texts(batch.tokens, batch.lengths)
        v, t = img_state.mean(1), _masked_mean(words, lengths)
        zi, zt = self.itc_image(v), self.itc_text(t)
        out: dict[str, Tensor] = {"itc_loss": info_nce(zi, zt, ids, self.tau)}

        if step is None:
            step = int(self.mining_step)
            if self.training:
                self.mining_step += 1
        sim = (F.normalize(zi.detach().float(), dim=1) @ F.normalize(zt.detach().float(), dim=1).T) / float(self.tau.detach())
        neg_txt, neg_img = sample_hard_negatives(sim, ids, self.mining_generator(step))
        rows_i = (neg_txt >= 0).nonzero().squeeze(1)
        rows_t = (neg_img >= 0).nonzero().squeeze(1)
        pos = torch.arange(b)
        img_idx = torch.cat([pos, rows_i, neg_img[rows_t]])
        txt_idx = torch.cat([pos, neg_txt[rows_i], rows_t])
        logits = self.itm_pairs(img_state, words[txt_idx], lengths[txt_idx], img_idx)
        n_neg = len(rows_i) + len(rows_t)
        p_i = p_t = None
        if self.uses_teacher:
            p_i, p_t = teacher_probs(*_teacher_features(batch), self.tau_teacher,
                                     self.teacher_mode, self.center_teacher)
        if self.soft_itm > 0:
            q_i, q_t = (p_i, p_t) if self.soft_itm_tau == self.tau_teacher else teacher_probs(
                *_teacher_features(batch), self.soft_itm_tau, self.teacher_mode, self.center_teacher)
            y_i, y_t = soft_negative_targets(q_i, q_t, neg_txt, neg_img, self.soft_itm)
            neg_y = torch.cat([y_i, y_t]).to(logits.dtype)
        else:
            neg_y = torch.zeros(n_neg, dtype=logits.dtype)
        targets = torch.cat([torch.ones(b, dtype=logits.dtype), neg_y])
        dt = torch.promote_types(logits.dtype, torch.float32)  # BCE in float32 at least
        out["itm_loss"] = self.itm_weight * F.binary_cross_entropy_with_logits(logits.to(dt), targets.to(dt))

        if self.alpha > 0 or self.beta > 0:
            # The "each" soft labels for USA (image teacher ↔ images, text teacher ↔ captions).
            q_i, q_t = (p_i, p_t) if self.teacher_mode == "each" else teacher_probs(
                *_teacher_features(batch), self.tau_teacher, "each", self.center_teacher)
            if self.alpha > 0:
                out["csa_loss"] = self.alpha * csa_from_probs(zi, zt, p_i, p_t, self.tau_c)
            if self.beta > 0:
                out["usa_loss"] = self.beta * usa_from_probs(self.usa_image(v), self.usa_text(t), q_i, q_t,
                                                             self.tau_img, self.tau_txt)
        with torch.no_grad():
            out["tau"] = self.tau.detach().clone()
            pred = (logits.detach() > 0).float()
            out["itm_acc"] = (pred == (targets > 0.5).float()).float().mean()
            out["soft_target_mean"] = neg_y.mean() if n_neg else torch.zeros(())
        return out

    # --- retrieval ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_split(self, regions: Tensor, tokens: Tensor, lengths: Tensor, chunk: int = 256,
                     progress: bool = True) -> dict[str, Tensor]:
        """Region states, word states, lengths and ITC embeddings of a whole split, in chunks."""
        from tqdm.auto import tqdm

        lengths = lengths.reshape(-1).long()
        top = int(lengths.max())
        imgs, zi, words, zt = [], [], [], []
        for s in tqdm(range(0, len(regions), chunk), desc="encode images", leave=False, disable=not progress or None):
            st = self.encode_images(regions[s:s + chunk])
            imgs.append(st)
            zi.append(self.embed_images(st))
        for s in tqdm(range(0, len(tokens), chunk), desc="encode captions", leave=False, disable=not progress or None):
            w, ln = self.encode_texts(tokens[s:s + chunk], lengths[s:s + chunk])
            words.append(F.pad(w, (0, 0, 0, top - w.shape[1])))  # one common length for the split
            zt.append(self.embed_texts(w, ln))
        return {"img_state": torch.cat(imgs), "img_emb": torch.cat(zi), "words": torch.cat(words),
                "lengths": lengths, "txt_emb": torch.cat(zt)}

    def rerank_callback(self, img_state: Tensor, words: Tensor, lengths: Tensor, k: int | None = None,
                        progress: bool = True) -> Rerank:
        """:func:`make_rerank` with this model's ITM head over a split's encoded states."""
        k = self.rerank_k if k is None else int(k)

        def score_pairs(img_idx: Tensor, txt_idx: Tensor) -> Tensor:
            uniq, inv = torch.unique(img_idx, return_inverse=True)
            with torch.no_grad():
                return self.itm_pairs(img_state[uniq], words[txt_idx], lengths[txt_idx], inv)

        return make_rerank(score_pairs, k, batch_size=self.pair_batch, progress=progress)

    def _eval_mode(self) -> bool:
        was = self.training
        self.eval()
        return was

    @torch.no_grad()
    def evaluate(self, regions: Tensor, tokens: Tensor, lengths: Tensor, txt2img: Any,
                 progress: bool = True, rerank_k: int | None = None, chunk_size: int = 1024) -> dict[str, float]:
        """SPEC §4 metrics: ITC ranking of the whole split, top ``rerank_k`` re-ranked by ITM
        (default: the model's ``rerank_k``; 0 = the dual encoder alone)."""
        return self.evaluate_both(regions, tokens, lengths, txt2img, progress, rerank_k, chunk_size,
                                  itc=False)["rerank"]

    @torch.no_grad()
    def evaluate_both(self, regions: Tensor, tokens: Tensor, lengths: Tensor, txt2img: Any,
                      progress: bool = True, rerank_k: int | None = None, chunk_size: int = 1024,
                      itc: bool = True) -> dict[str, dict[str, float]]:
        """``{"itc": metrics before re-ranking, "rerank": after}`` from one encoding of the split."""
        k = self.rerank_k if rerank_k is None else int(rerank_k)
        was = self._eval_mode()
        try:
            enc = self.encode_split(regions, tokens, lengths, progress=progress)
            out: dict[str, dict[str, float]] = {}
            if itc or k == 0:
                out["itc"] = evaluate_retrieval(enc["img_emb"], enc["txt_emb"], txt2img, chunk_size)
            if k == 0:
                out["rerank"] = out["itc"]
            else:
                cb = self.rerank_callback(enc["img_state"], enc["words"], enc["lengths"], k, progress)
                out["rerank"] = evaluate_retrieval(enc["img_emb"], enc["txt_emb"], txt2img, chunk_size, rerank=cb)
        finally:
            self.train(was)
        return out
