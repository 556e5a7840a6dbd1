"""Dual encoder + fusion re-ranker (ALBEF / X2VLM style), with optional CUSA soft labels.

Two heads share one image and one text encoder:

- **ITC** (the dual encoder): image = mean of the projected region states → Linear; text = mean of
  the projected word states over real tokens → Linear (word states: the GRU's, or with
  ``word_features="minilm"`` frozen all-MiniLM-L6-v2 token states, [CLS]/[SEP] kept, from the
  prefix cache; see :mod:`itrkit.models.fusion_base`); symmetric multi-positive InfoNCE with a
  learnable clamped temperature (docs/method.md §1 ``info_nce``).
- **ITM** (the fusion head): ``layers`` pre-LN blocks in which the caption's word states attend to
  themselves (self-attention), then to the image's region states (cross-attention), then an MLP;
  the final word states are pooled (mean over real words, or the first word) → Linear → one match
  logit per (image, caption) pair.

Training: the model returns the ITC embeddings and pooled states of a batch and scores any
(image, caption) pairs with :meth:`ReRanker.itm_pairs`; the objective (ITC + ITM on in-batch hard
negatives, CUSA's CSA / USA / soft ITM targets) is :class:`itrkit.losses.matching.ReRankLoss`.

Retrieval (X2VLM inference): ITC embeddings rank the whole gallery, then each query's top
``rerank_k`` candidates are re-scored and put, in that order, above every other candidate, which
keep their ITC order (:func:`itrkit.eval.rerank.make_rerank`). ``rerank_k=0`` is the dual encoder.
The re-score of a candidate is ``s = itc + itm_weight · itm`` (itc: the first stage's cosine,
itm: the ITM logit); ``itm_weight=inf`` (the default, X2VLM) orders the top k by ITM alone.

``itc_run`` (a trained itrkit dual-encoder run folder, e.g. ``itrkit train --config infonce``):
the first stage is that frozen dual encoder instead of the model's own ITC head. Its cosine
ranks the gallery at evaluation and picks the ITM's hard negatives in training
(:func:`itrkit.losses.itm.hardest_negatives`); only the re-ranker's own layers train.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itrkit.errors import ConfigError, DataError
from itrkit.models.fusion_base import (
    MINILM_DIM,
    FusionBatch,
    FusionMatcher,
    MiniLMTop,
    WordStates,
    check_word_states,
    take_word_states,
    validate_word_features,
)


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


def _length_mask(lengths: Tensor, total: int) -> Tensor:
    return torch.arange(total, device=lengths.device)[None, :] < lengths[:, None]


def _masked_mean(x: Tensor, lengths: Tensor) -> Tensor:
    mask = _length_mask(lengths.to(x.device), x.shape[1]).to(x.dtype)
    return (x * mask.unsqueeze(-1)).sum(1) / lengths.to(x.device, x.dtype).unsqueeze(-1)


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------
@dataclass
class RNNTowerOptions:
    """Options of the re-ranker's word encoder, an :class:`itrkit.models.rnn.RNNTextTower`."""

    name: str = "gru"  # gru | lstm
    tokenizer: str = "minilm"
    embed_dim: int = 300
    hidden: int = 512
    layers: int = 1
    combine: str = "mean"
    max_length: int = 32
    seed: int = 0


@dataclass
class ReRankerOptions:
    """Everything that defines one re-ranker (saved with the run as ``model:``)."""

    name: str = "rerank"
    region_dim: int = 1280  # C of the (R, C) region / grid features (set from the grid store)
    # gru: the text_tower below; minilm: frozen all-MiniLM-L6-v2 token states from the prefix cache
    # (text_tower unused)
    word_features: str = "gru"
    prefix_dtype: str = "float16"  # word_features=minilm: dtype of the cached states (float32: exact to 1e-5)
    text_trainable: str = "frozen"  # word_features=minilm: frozen | top:N (MiniLM's last N layers train)
    text_tower: RNNTowerOptions = field(default_factory=RNNTowerOptions)
    embed_dim: int = 256  # ITC (and USA) embedding size
    width: int = 256  # fusion width (region and word states)
    layers: int = 1  # fusion blocks
    heads: int = 4
    mlp_ratio: float = 2.0
    pool: str = "mean"  # mean | first: word states → match logit
    # match logit = fusion output + learned scale · ITC cosine (not X2VLM); with itc_run the cosine is
    # the frozen first stage's, so the head learns a correction of the ranking it re-ranks
    itm_residual: bool = False
    itm_residual_init: float = 5.0  # initial scale of the residual cosine (1/τ of the first stage: its logits)
    usa_heads: bool = False  # USA heads on the pooled states (CUSA's USA term)
    rerank_k: int = 16  # candidates re-scored per query at evaluation (0 = ITC only)
    pair_batch: int = 512  # pairs per ITM forward at inference
    # first stage: "" = the model's own ITC head; a dual-encoder run folder = that frozen model
    itc_run: str = ""
    # re-score of the top k = itc cosine + itm_weight · ITM logit; inf = ITM order alone (X2VLM)
    itm_weight: float = math.inf

    def validate(self) -> None:
        validate_word_features(self.word_features, self.prefix_dtype, self.text_trainable)
        if min(self.region_dim, self.embed_dim, self.width, self.layers, self.heads) <= 0:
            raise ConfigError("model: region_dim, embed_dim, width, layers and heads must be positive")
        if self.pool not in ("mean", "first"):
            raise ConfigError(f"model.pool must be mean or first, got '{self.pool}'")
        if self.mlp_ratio <= 0:
            raise ConfigError("model.mlp_ratio must be > 0")
        if self.width % self.heads:
            raise ConfigError(f"model.width {self.width} is not divisible by model.heads {self.heads}")
        if self.rerank_k < 0 or self.pair_batch < 1:
            raise ConfigError("model.rerank_k must be >= 0 and model.pair_batch >= 1")
        if not self.itm_weight >= 0:  # also refuses NaN
            raise ConfigError(f"model.itm_weight must be >= 0 (inf: ITM order alone), got {self.itm_weight}")


class ReRanker(FusionMatcher):
    """Dual encoder (ITC) + cross-attention ITM head; retrieval = ITC top-k re-ranked by ITM.

    Built from :class:`ReRankerOptions` (keyword arguments; a misspelled key is a one-line config
    error). ``itm_residual`` (default off, not in X2VLM): the match logit becomes the fusion head's
    output plus a learnable scale (init 5) times the ITC cosine of the pair. Trained from scratch
    on CPU budgets, the cross-attention head sits on the constant-prediction plateau (ITM loss =
    H(1/3) ≈ 0.637 with 1 positive per 2 negatives) for hundreds of steps, so its re-ranking is then
    worse than the dual encoder's order; the residual form starts from the ITC ranking.
    """

    def __init__(self, **options: Any) -> None:
        super().__init__()
        from itrkit.config import from_dict
        from itrkit.models.rnn import RNNTextTower

        o = from_dict(ReRankerOptions, options, prefix="model.")
        self.options = o
        tt = o.text_tower
        if o.word_features == "gru":
            text_tower = RNNTextTower(name=tt.name, tokenizer=tt.tokenizer, embed_dim=tt.embed_dim, hidden=tt.hidden,
                                      layers=tt.layers, combine=tt.combine, max_length=tt.max_length, seed=tt.seed)
            self.text_tower: nn.Module | None = text_tower
            word_dim = int(text_tower.output_dim)
        else:  # cached MiniLM states come with each batch; word_proj (and top:N layers) train on the text side
            self.text_tower = None if o.text_trainable == "frozen" else MiniLMTop(int(o.text_trainable[4:]))
            word_dim = MINILM_DIM
        self.region_dim, self.width, self.embed_dim = int(o.region_dim), int(o.width), int(o.embed_dim)
        self.pool, self.itm_residual = o.pool, bool(o.itm_residual)
        self.rerank_k, self.pair_batch, self.itm_weight = int(o.rerank_k), int(o.pair_batch), float(o.itm_weight)
        width, embed_dim = self.width, self.embed_dim

        # Raw CNN grid features are large and all positive: normalise before projecting.
        self.region_proj = nn.Sequential(nn.LayerNorm(o.region_dim), nn.Linear(o.region_dim, width))
        self.word_proj = nn.Linear(word_dim, width)
        self.itc_image = nn.Linear(width, embed_dim)
        self.itc_text = nn.Linear(width, embed_dim)
        self.blocks = nn.ModuleList(FusionBlock(width, o.heads, o.mlp_ratio) for _ in range(o.layers))
        self.ln_final = nn.LayerNorm(width)
        self.itm_head = nn.Linear(width, 1)
        if self.itm_residual:
            # Match logit = fusion output + itm_sim_scale · cos(ITC image, ITC caption): the fusion
            # head learns a correction of the dual encoder (see the class doc).
            self.itm_sim_scale = nn.Parameter(torch.tensor(float(o.itm_residual_init)))
            # Zero-initialised output layer: the head starts as a constant, so the first ranking is
            # the cosine's; its offset is set once from the first training batch
            # (:meth:`init_residual_offset`) so BCE starts at the first stage's decision boundary.
            nn.init.zeros_(self.itm_head.weight)
            self.register_buffer("residual_offset_ready", torch.zeros((), dtype=torch.bool))
        self.usa_image = self.usa_text = None
        if o.usa_heads:
            self.usa_image = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, embed_dim))
            self.usa_text = nn.Sequential(nn.Linear(width, width), nn.ReLU(), nn.Linear(width, embed_dim))

    @torch.no_grad()
    def init_residual_offset(self, sim: Tensor, img_ids: Tensor) -> None:
        """Once per run (``itm_residual`` over a frozen first stage): set the ITM bias to
        ``−s · (c̄_pos + c̄_neg) / 2``, the midpoint of the first stage's mean positive cosine and
        mean hardest-negative cosine in this batch (``sim`` (B, B), pair i = image i, caption i;
        negatives: other images). Without it the offset of ``s · cos`` (~10 logits at s = 1/τ)
        would have to be learnt through the bias one lr step at a time."""
        if not self.itm_residual or bool(self.residual_offset_ready):
            return
        ids = img_ids.reshape(-1).to(sim.device)
        other = ids[:, None] != ids[None, :]
        if not bool(other.any()):
            return
        neg = sim.float().masked_fill(~other, float("-inf")).amax(1)
        mid = 0.5 * (sim.float().diagonal().mean() + neg[torch.isfinite(neg)].mean())
        self.itm_head.bias.fill_(float(-self.itm_sim_scale.detach() * mid))
        self.residual_offset_ready.fill_(True)

    def set_rerank(self, rerank_k: int, itm_weight: float) -> None:
        """Use ``rerank_k`` candidates and ``itm_weight`` from now on (and save them with the model)."""
        from dataclasses import replace

        self.options = replace(self.options, rerank_k=int(rerank_k), itm_weight=float(itm_weight))
        self.options.validate()
        self.rerank_k, self.itm_weight = int(rerank_k), float(itm_weight)

    def tokenize(self, captions: list[str]) -> tuple[Tensor, Tensor]:
        """Captions → (tokens (N, L) int64, lengths (N,)) with the text tower's tokenizer."""
        out = self.prepare_texts(captions)
        return out["input_ids"], out["lengths"]

    # --- encoders -------------------------------------------------------------------------
    def encode_images(self, regions: Tensor) -> Tensor:
        """(N, R, C) region features → (N, R, width) region states."""
        if regions.ndim != 3 or regions.shape[2] != self.region_dim:
            raise DataError(f"region features must be (N, R, {self.region_dim}), got shape {tuple(regions.shape)}")
        return self.region_proj(regions.to(self.region_proj[1].weight.dtype))

    def encode_texts(self, tokens: Tensor, lengths: Tensor, word_states: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(N, L) tokens → ((N, L', width) word states, lengths), L' = longest real caption.

        ``word_features=minilm``: ``word_states`` (N, ≥ L', 384), the frozen MiniLM token states of
        the captions, replace the GRU's."""
        lengths = lengths.reshape(-1).long().cpu()
        if tokens.ndim != 2 or len(lengths) != len(tokens):
            raise DataError(f"tokens must be (N, L) with N lengths, got {tuple(tokens.shape)} and {len(lengths)}")
        if len(lengths) and (int(lengths.min()) < 1 or int(lengths.max()) > tokens.shape[1]):
            raise DataError(f"caption lengths must lie in [1, {tokens.shape[1]}]")
        top = int(lengths.max()) if len(lengths) else 0
        if self.uses_word_states:
            words = check_word_states(word_states, lengths, MINILM_DIM).to(self.word_proj.weight.dtype)
            if self.text_tower is not None:  # text_trainable=top:N: MiniLM's last layers over the cached prefix
                words = self.text_tower(words, lengths)
        else:
            words = self.text_tower.token_features(tokens[:, :top], lengths)
        return self.word_proj(words), lengths

    def embed_images(self, img_state: Tensor) -> Tensor:
        """ITC image embeddings (N, embed_dim) from region states (not normalised)."""
        return self.itc_image(img_state.mean(1))

    def embed_texts(self, words: Tensor, lengths: Tensor) -> Tensor:
        """ITC caption embeddings (N, embed_dim) from word states (not normalised)."""
        return self.itc_text(_masked_mean(words, lengths))

    # --- the ITM head ---------------------------------------------------------------------
    def itm_pairs(self, img_state: Tensor, words: Tensor, lengths: Tensor, img_index: Tensor | None = None,
                  itc: Tensor | None = None) -> Tensor:
        """Match logit of each pair p = (image, words[p, :lengths[p]]): (P,).

        The image of pair p is ``img_state[p]``, or ``img_state[img_index[p]]`` when ``img_index``
        is given (each distinct image's regions are then projected to keys / values once).
        ``itc`` (P,): the frozen first stage's cosine of each pair (``itc_run``), the residual's
        cosine with ``itm_residual`` (required then; without ``itc_run`` the model's own ITC is used).
        """
        lengths = lengths.to(words.device)
        top = int(lengths.max())
        x, mask = words[:, :top], _length_mask(lengths, top)
        if img_index is None:
            img_index = torch.arange(len(words), device=words.device)
        for block in self.blocks:
            k, v = block.cross_attn.kv(img_state)
            x = block(x, mask, (k[img_index], v[img_index]))
        x = self.ln_final(x)
        pooled = x[:, 0] if self.pool == "first" else _masked_mean(x, lengths)
        logit = self.itm_head(pooled).squeeze(1)
        if self.itm_residual:
            if itc is None and self.options.itc_run:
                raise ConfigError("model.itm_residual with model.itc_run needs the first stage's cosine of each pair")
            if itc is None:
                zi = F.normalize(self.embed_images(img_state), dim=1)[img_index]
                zt = F.normalize(self.embed_texts(words, lengths), dim=1)
                itc = (zi * zt).sum(1)
            logit = logit + self.itm_sim_scale * itc.to(logit.device, logit.dtype)
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

    def forward(self, batch: FusionBatch) -> dict[str, Tensor]:
        """A training batch → region / word states, ITC embeddings (``image_embeds``,
        ``text_embeds``) and, with USA heads, ``image_uni`` / ``text_uni``. Pair logits of any
        batch pairs come from ``itm_batch_pairs(out, img_idx, txt_idx)``."""
        img_state = self.encode_images(batch.regions)
        words, lengths = self.encode_texts(batch.tokens, batch.lengths, batch.word_states)
        v, t = img_state.mean(1), _masked_mean(words, lengths)
        out = {"img_state": img_state, "words": words, "lengths": lengths,
               "image_embeds": self.itc_image(v), "text_embeds": self.itc_text(t)}
        if self.usa_image is not None and self.usa_text is not None:
            out["image_uni"], out["text_uni"] = self.usa_image(v), self.usa_text(t)
        return out

    def itm_batch_pairs(self, out: dict[str, Tensor], img_idx: Tensor, txt_idx: Tensor,
                        itc: Tensor | None = None) -> Tensor:
        """Match logits of the batch pairs ``(img_idx[p], txt_idx[p])`` from :meth:`forward`'s states
        (``itc``: the first stage's cosine of each pair, see :meth:`itm_pairs`)."""
        return self.itm_pairs(out["img_state"], out["words"][txt_idx], out["lengths"][txt_idx], img_idx, itc)

    # --- retrieval ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_split(self, regions: Tensor, tokens: Tensor, lengths: Tensor, chunk: int = 256,
                     progress: bool = True, word_states: WordStates | None = None) -> dict[str, Tensor]:
        """Region states, word states, lengths and ITC embeddings of a whole split, in chunks
        (``word_states``, with ``word_features=minilm``: a tensor aligned with ``tokens`` or a reader
        of caption rows ``[start, stop)``, called once per chunk)."""
        from tqdm.auto import tqdm

        lengths = lengths.reshape(-1).long()
        top = int(lengths.max())
        imgs, zi, words, zt = [], [], [], []
        for s in tqdm(range(0, len(regions), chunk), desc="encode images", leave=False, disable=not progress or None):
            st = self.encode_images(regions[s:s + chunk])
            imgs.append(st)
            zi.append(self.embed_images(st))
        for s in tqdm(range(0, len(tokens), chunk), desc="encode captions", leave=False, disable=not progress or None):
            ws = take_word_states(word_states, s, s + chunk)
            w, ln = self.encode_texts(tokens[s:s + chunk], lengths[s:s + chunk],
                                      None if ws is None else ws.to(tokens.device))
            words.append(F.pad(w, (0, 0, 0, top - w.shape[1])))  # one common length for the split
            zt.append(self.embed_texts(w, ln))
        return {"img_state": torch.cat(imgs), "img_emb": torch.cat(zi), "words": torch.cat(words),
                "lengths": lengths, "txt_emb": torch.cat(zt)}

    def pair_scorer(self, img_state: Tensor, words: Tensor, lengths: Tensor,
                    first_stage: tuple[Tensor, Tensor] | None = None) -> Any:
        """``score_pairs(img_idx, txt_idx)`` over a split's encoded states (for re-ranking).
        ``first_stage``: the frozen dual encoder's normalised (image, caption) embeddings of the
        split (``itc_run``); their pair cosines feed the residual (``itm_residual``)."""

        def score_pairs(img_idx: Tensor, txt_idx: Tensor) -> Tensor:
            uniq, inv = torch.unique(img_idx, return_inverse=True)
            itc = None
            if self.itm_residual and first_stage is not None:
                zi, zt = first_stage
                itc = (zi[img_idx.cpu()] * zt[txt_idx.cpu()]).sum(1)
            with torch.no_grad():
                return self.itm_pairs(img_state[uniq], words[txt_idx], lengths[txt_idx], inv, itc)

        return score_pairs
