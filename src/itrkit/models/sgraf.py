"""SGRAF (Diao et al., AAAI 2021, "Similarity Reasoning and Filtration for Image-Text Matching")
on grid features, with optional CUSA terms (CUSA, AAAI 2024, appendix settings for SGRAF).

Per (image, caption) pair the model builds *similarity vectors* instead of a scalar:

- regions ``v_i = l2norm(W_v r_i)`` (grid cells projected to ``embed_dim``), words
  ``t_j = l2norm(W_t h_j)`` (bi-GRU states projected to ``embed_dim``);
  global image ``v̄`` = self-attention pooling of the regions guided by their mean (paper §3.1,
  ``image_pool="attention"``) or their mean; global text ``t̄`` = l2norm(mean of the words);
- text-to-image attention (paper Eq. 2, SCAN style): ``c_ij = LeakyReLU_0.1(v_iᵀ t_j)``,
  l2-normalised over the caption's words for each region, ``α_ij = softmax_i(λ c_ij)`` with
  λ = 9, and the attended context ``a_j = l2norm(Σ_i α_ij v_i)``;
- similarity representation (paper Eq. 1): ``s(x, y; W) = W |x − y|² / ‖W |x − y|²‖₂`` with
  the square taken element-wise: one global vector ``s_g = s(v̄, t̄; W_g)`` and one local vector
  per word ``s_j = s(a_j, t_j; W_l)``, each ``sim_dim``-d;
- **SGR** (paper Eqs. 3–4): the ``1 + L`` vectors are graph nodes; per step, edges
  ``A = softmax_q((W_in N)(W_out N)ᵀ)`` over the caption's nodes and ``N ← ReLU(W_r A N)``;
  after ``sgr_steps`` steps, score = ``sigmoid(w_eᵀ n_g + b)`` of the global node;
- **SAF** (paper Eq. 5): weights ``β_p = σ(BN(w_fᵀ s_p + b))`` over the caption's nodes,
  ``s_f = Σ β_p s_p / Σ β_p``, score = ``sigmoid(w_eᵀ s_f + b)``;
- ``SGRAF`` = mean of a trained SGR's and a trained SAF's scores (trained separately).

Differences from the paper, all forced by CPU scale or grid inputs: 49 grid cells replace 36
detector regions; ``embed_dim`` 128 / ``sim_dim`` 64 by default (paper 1024 / 256); no dropout; the
word vectors come from :class:`~itrkit.models.rnn.RNNTextTower` (word-piece vocabulary), or with
``word_features="minilm"`` from frozen all-MiniLM-L6-v2 token states (the cached ``last_hidden_state``,
[CLS]/[SEP] kept, see :mod:`itrkit.models.fusion_base`) through the trainable ``W_t``. Captions
are batched with padding, so padded words are masked out of the attention normalisation, of the
graph's edges and of SAF's weights and BatchNorm statistics (the paper's code loops over captions).

CUSA (the paper's appendix for SGRAF): USA heads (Linear-ReLU-Linear) on ``v̄`` and ``t̄``
(``usa_heads``); the objective ``L = triplet(margin) + α·CSA + β·USA``, with CSA on the B×B
fusion score matrix, is :class:`itrkit.losses.matching.MatchingLoss`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itrkit.errors import ConfigError
from itrkit.models.fusion_base import (
    MINILM_DIM,
    FusionBatch,
    FusionMatcher,
    MiniLMTop,
    check_word_states,
    validate_word_features,
)

KINDS = ("sgr", "saf")
EPS = 1e-8


def l2norm(x: Tensor, dim: int = -1) -> Tensor:
    return x / (x.norm(dim=dim, keepdim=True) + EPS)


def word_mask(lengths: Tensor, total: int) -> Tensor:
    """(N, total) bool: True at real words."""
    return torch.arange(total, device=lengths.device)[None, :] < lengths[:, None]


def attend(regions: Tensor, words: Tensor, mask: Tensor, lam: float) -> Tensor:
    """Word-attended region context ``a_j`` for every (image, caption) pair (paper Eq. 2).

    ``regions`` (Ni, R, D), ``words`` (Nt, L, D) (both row-normalised, padded words zero),
    ``mask`` (Nt, L). Returns (Ni, Nt, L, D), l2-normalised per word.
    """
    c = F.leaky_relu(torch.einsum("ird,tld->itrl", regions, words), 0.1)
    # Normalise over the caption's words for each region; padded words have c = 0 so they add
    # nothing to the norm, and they are zeroed explicitly in case of a negative slope artefact.
    c = c * mask[None, :, None, :].to(c.dtype)
    c = l2norm(c, dim=3)
    alpha = torch.softmax(lam * c, dim=2)  # over regions
    return l2norm(torch.einsum("itrl,ird->itld", alpha, regions))


def sim_vector(x: Tensor, y: Tensor, proj: nn.Linear) -> Tensor:
    """``s(x, y; W) = W |x − y|² / ‖W |x − y|²‖₂`` (paper Eq. 1), element-wise square."""
    return l2norm(proj((x - y).pow(2)))


class SGRStep(nn.Module):
    """One graph-reasoning step (paper Eqs. 3–4): ``N ← ReLU(W_r · softmax(QKᵀ) · N)``."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.update = nn.Linear(dim, dim)

    def edges(self, nodes: Tensor, mask: Tensor) -> Tensor:
        """(…, P, P) row-softmax of query·key over the caption's real nodes (``mask`` (…, P))."""
        logits = self.query(nodes) @ self.key(nodes).transpose(-1, -2)
        logits = logits.masked_fill(~mask[..., None, :], float("-inf"))
        return torch.softmax(logits, dim=-1)

    def forward(self, nodes: Tensor, mask: Tensor) -> Tensor:
        return F.relu(self.update(self.edges(nodes, mask) @ nodes))


class MaskedBatchNorm(nn.Module):
    """BatchNorm of one scalar feature over the *valid* entries only (SAF's BN over nodes).

    Takes a list of blocks (captions grouped by length) whose valid entries together form the
    batch. Training: normalise with the mean / biased variance of all valid entries and update
    running statistics (momentum 0.1, unbiased variance) like ``nn.BatchNorm1d``; evaluation:
    running statistics.
    """

    def __init__(self, momentum: float = 0.1, eps: float = 1e-5) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps
        self.weight = nn.Parameter(torch.ones(()))
        self.bias = nn.Parameter(torch.zeros(()))
        self.register_buffer("running_mean", torch.zeros(()))
        self.register_buffer("running_var", torch.ones(()))

    def forward(self, xs: list[Tensor], masks: list[Tensor]) -> list[Tensor]:
        if self.training:
            vals = torch.cat([x[m.expand_as(x)] for x, m in zip(xs, masks)])
            n = vals.numel()
            mean = vals.mean()
            var = vals.var(unbiased=False)
            with torch.no_grad():
                unbiased = var * n / max(n - 1, 1)
                self.running_mean.lerp_(mean.detach(), self.momentum)
                self.running_var.lerp_(unbiased.detach(), self.momentum)
        else:
            mean, var = self.running_mean, self.running_var
        return [(x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias for x in xs]


class SAFHead(nn.Module):
    """Similarity attention filtration (paper Eq. 5) → aggregated vectors, one block per caption group."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, 1)
        self.bn = MaskedBatchNorm()

    def weights(self, nodes: list[Tensor], masks: list[Tensor]) -> list[Tensor]:
        """Normalised aggregation weights (…, P): ``β_p / Σ_q β_q`` over each caption's real nodes."""
        logits = self.bn([self.gate(n).squeeze(-1) for n in nodes], masks)
        out = []
        for z, m in zip(logits, masks):
            beta = torch.sigmoid(z) * m.to(z.dtype)
            out.append(beta / beta.sum(dim=-1, keepdim=True))
        return out

    def forward(self, nodes: list[Tensor], masks: list[Tensor]) -> list[Tensor]:
        return [(w.unsqueeze(-1) * n).sum(dim=-2) for w, n in zip(self.weights(nodes, masks), nodes)]


def _usa_head(dim: int, out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, out))


@dataclass
class SGRAFOptions:
    """Everything that defines one SGR or SAF model and its loss (saved with the run)."""

    name: str = "sgr"  # sgr | saf
    region_dim: int = 1280
    region_norm: bool = True  # BatchNorm over channels before the projection (grid features are all ≥ 0)
    embed_dim: int = 128
    sim_dim: int = 64
    sgr_steps: int = 3
    lam: float = 9.0  # attention smoothing λ
    image_pool: str = "attention"  # attention | mean
    # gru: the model's own GRU over word pieces (tokenizer, word_dim, word_init, text_hidden, max_words);
    # minilm: frozen all-MiniLM-L6-v2 token states from the prefix cache (those five keys unused)
    word_features: str = "gru"
    prefix_dtype: str = "float16"  # word_features=minilm: dtype of the cached states (float32: exact to 1e-5)
    text_trainable: str = "frozen"  # word_features=minilm: frozen | top:N (MiniLM's last N layers train)
    tokenizer: str = "minilm"
    word_dim: int = 300
    word_init: str = "random"  # random | minilm (all-MiniLM-L6-v2's word-piece embeddings; word_dim 384)
    text_hidden: int = 512
    max_words: int = 32
    usa_heads: bool = False  # USA heads on the pooled image / caption features (CUSA's USA term)
    usa_dim: int = 256
    len_groups: int = 4  # captions of a batch grouped by length (less padding)
    pair_budget: int = 1 << 25  # elements of the (images, captions, words, dim) blocks at evaluation

    @property
    def kind(self) -> str:
        return self.name

    def validate(self) -> None:
        if self.name not in KINDS:
            raise ConfigError(f"model.name must be sgr or saf, got '{self.name}'")
        validate_word_features(self.word_features, self.prefix_dtype, self.text_trainable)
        if self.word_init not in ("random", "minilm"):
            raise ConfigError(f"model.word_init must be random or minilm, got '{self.word_init}'")
        if self.word_init == "minilm" and (self.tokenizer != "minilm" or self.word_dim != 384):
            raise ConfigError("model.word_init=minilm needs tokenizer=minilm and word_dim=384")
        if self.image_pool not in ("attention", "mean"):
            raise ConfigError(f"model.image_pool must be attention or mean, got '{self.image_pool}'")
        for k in ("region_dim", "embed_dim", "sim_dim", "word_dim", "text_hidden", "max_words", "usa_dim",
                  "len_groups", "pair_budget"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"model.{k} must be positive, got {getattr(self, k)}")
        if self.sgr_steps < 0:
            raise ConfigError("model.sgr_steps must be >= 0")


class SGRAFModel(FusionMatcher):
    """One SGR or SAF matcher (``options.name``). ``SGR(**kw)`` / ``SAF(**kw)`` are shortcuts."""

    def __init__(self, **options: Any) -> None:
        super().__init__()
        from itrkit.config import from_dict

        opts = from_dict(SGRAFOptions, options, prefix="model.")
        self.options = opts
        d, s = opts.embed_dim, opts.sim_dim
        # CNN grid features are non-negative (ReLU6), so every projected region shares one large
        # common direction and all pairs start with nearly equal scores; centring and scaling the
        # channels (BatchNorm, running statistics at evaluation) removes it.
        self.region_bn = nn.BatchNorm1d(opts.region_dim) if opts.region_norm else None
        self.img_fc = nn.Linear(opts.region_dim, d)
        if opts.image_pool == "attention":
            self.pool_local = nn.Linear(d, d)
            self.pool_global = nn.Linear(d, d)
            self.pool_score = nn.Linear(d, 1)
        if opts.word_features == "gru":
            self.text_tower = self._text_tower(opts)
            self.txt_fc = nn.Linear(opts.text_hidden, d)
        else:  # cached MiniLM states come with each batch; W_t (and top:N layers) train on the text side
            self.text_tower = None if opts.text_trainable == "frozen" else MiniLMTop(int(opts.text_trainable[4:]))
            self.txt_fc = nn.Linear(MINILM_DIM, d)
        self.sim_local = nn.Linear(d, s)
        self.sim_global = nn.Linear(d, s)
        if opts.kind == "sgr":
            self.sgr = nn.ModuleList(SGRStep(s) for _ in range(opts.sgr_steps))
        else:
            self.saf = SAFHead(s)
        self.out = nn.Linear(s, 1)
        self.usa_img = self.usa_txt = None
        if opts.usa_heads:
            self.usa_img = _usa_head(d, opts.usa_dim)
            self.usa_txt = _usa_head(d, opts.usa_dim)
        self._init_linear()

    def _init_linear(self) -> None:
        """Xavier-uniform weights, zero biases for every Linear outside the text tower (the SGRAF
        authors' practice). PyTorch's default init leaves the pair-to-pair differences of the
        sigmoid scores so small at the start that the hinge's gradient almost vanishes."""
        for name, mod in self.named_modules():
            if isinstance(mod, nn.Linear) and not name.startswith("text_tower"):
                nn.init.xavier_uniform_(mod.weight)
                nn.init.zeros_(mod.bias)

    @staticmethod
    def _text_tower(opts: SGRAFOptions) -> nn.Module:
        from itrkit.models.rnn import RNNTextTower

        tower = RNNTextTower("gru", tokenizer=opts.tokenizer, embed_dim=opts.word_dim, hidden=opts.text_hidden,
                             layers=1, combine="mean", max_length=opts.max_words)
        # The tower seeds itself; redraw its weights from the global RNG so the run's seed decides
        # every initial weight (paired seeds across methods).
        with torch.no_grad():
            nn.init.uniform_(tower.embedding.weight, -0.1, 0.1)
            tower.embedding.weight[tower.pad_id].zero_()
        for rnn in tower.rnns:
            rnn.reset_parameters()
        if opts.word_init == "minilm":
            # Pretrained word-piece vectors (same vocabulary as the tokenizer): a text encoder trained
            # from scratch needs far more caption-epochs than a CPU budget allows.
            from safetensors import safe_open

            from itrkit.models.hf_text import minilm_path, read_st_folder

            path = Path(read_st_folder(minilm_path())["transformer"]) / "model.safetensors"
            with safe_open(str(path), framework="pt") as f:
                emb = f.get_tensor("embeddings.word_embeddings.weight")
            if tuple(emb.shape) != tuple(tower.embedding.weight.shape):
                raise ConfigError(f"{path}: word embeddings {tuple(emb.shape)} do not fit the tokenizer's "
                                  f"{tuple(tower.embedding.weight.shape)}")
            with torch.no_grad():
                tower.embedding.weight.copy_(emb)
        tower.set_trainable("all")
        return tower

    # --- text preparation (used by the trainer) ---------------------------------------------------
    def prepare_texts(self, texts: list[str]) -> dict[str, Tensor]:
        if self.uses_word_states:
            return super().prepare_texts(texts)  # a one-line error: minilm states come from the cache
        return self.text_tower.prepare(texts)

    # --- encoders --------------------------------------------------------------------------------
    def encode_images(self, regions: Tensor) -> Tensor:
        """(N, R, C) → (N, 1 + R, D): row 0 the global image ``v̄``, rows 1.. the regions ``v_i``."""
        x = regions.to(self.img_fc.weight.dtype)
        if self.region_bn is not None:
            x = self.region_bn(x.reshape(-1, x.shape[-1])).view_as(x)
        v = l2norm(self.img_fc(x))
        if self.options.image_pool == "attention":
            # Paper §3.1: the mean region guides an attention over regions.
            g = torch.tanh(self.pool_global(v.mean(dim=1, keepdim=True)))
            w = torch.softmax(self.pool_score(torch.tanh(self.pool_local(v)) * g).squeeze(-1), dim=1)
            vbar = l2norm((w.unsqueeze(-1) * v).sum(dim=1))
        else:
            vbar = l2norm(v.mean(dim=1))
        return torch.cat([vbar.unsqueeze(1), v], dim=1)

    def encode_texts(self, tokens: Tensor, lengths: Tensor, word_states: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(N, L) word pieces → l2-normalised word vectors (N, L', D), zero at padding; L' = max length.

        ``word_features=minilm``: ``word_states`` (N, ≥ L', 384), the frozen MiniLM token states of
        the captions, replace the GRU; ``lengths`` are their attention masks' sums."""
        lengths = lengths.long().clamp(min=1)
        if self.uses_word_states:
            h = check_word_states(word_states, lengths, MINILM_DIM).to(self.txt_fc.weight.dtype)
            if self.text_tower is not None:  # text_trainable=top:N: MiniLM's last layers over the cached prefix
                h = self.text_tower(h, lengths)
        else:
            tokens = tokens[:, :int(lengths.max())]
            h = self.text_tower.token_features(tokens, lengths)
        mask = word_mask(lengths, h.shape[1])
        return l2norm(self.txt_fc(h)) * mask.unsqueeze(-1).to(h.dtype), lengths

    @staticmethod
    def text_global(words: Tensor, lengths: Tensor) -> Tensor:
        """``t̄`` = l2norm(mean of the real words)."""
        return l2norm(words.sum(dim=1) / lengths.to(words.dtype).unsqueeze(-1))

    # --- similarity graph ------------------------------------------------------------------------
    def sim_nodes(self, img_state: Tensor, words: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Nodes (Ni, Nt, 1 + L, S) (node 0 global, then one per word) and their mask (Nt, 1 + L)."""
        vbar, regions = img_state[:, 0], img_state[:, 1:]
        mask = word_mask(lengths, words.shape[1])
        ctx = attend(regions, words, mask, self.options.lam)
        local = sim_vector(ctx, words.unsqueeze(0), self.sim_local)
        glob = sim_vector(vbar[:, None, :], self.text_global(words, lengths)[None, :, :], self.sim_global)
        nodes = torch.cat([glob.unsqueeze(2), local], dim=2)
        node_mask = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)
        return nodes, node_mask

    def head(self, nodes: list[Tensor], node_masks: list[Tensor]) -> list[Tensor]:
        """Node blocks → scores in (0, 1): SGR reasoning + global node, or SAF filtration.

        A list of blocks (caption groups) because SAF's BatchNorm statistics span all of them."""
        if self.options.kind == "sgr":
            feats = []
            for n, m in zip(nodes, node_masks):
                for step in self.sgr:
                    n = step(n, m)
                feats.append(n[..., 0, :])
        else:
            feats = self.saf(nodes, node_masks)
        return [torch.sigmoid(self.out(f).squeeze(-1)) for f in feats]

    def _groups(self, lengths: Tensor) -> list[Tensor]:
        """Caption indices in ``len_groups`` groups of similar length: each group is padded only
        to its own longest caption (padding would otherwise cost about half the pair compute)."""
        order = torch.argsort(lengths, stable=True)
        k = max(1, min(self.options.len_groups, len(order)))
        return [g for g in torch.tensor_split(order, k) if len(g)]

    def score(self, img_state: Tensor, words: Tensor, lengths: Tensor) -> Tensor:
        """(Ni, Nt) scores. Captions are grouped by length; in evaluation images are also split
        into blocks of at most ``pair_budget`` (image, word, dim) elements so memory stays bounded
        (in training one block per group: SAF's BatchNorm statistics span the whole batch)."""
        lengths = lengths.long()
        groups = self._groups(lengths)
        if self.training:
            nodes, masks = zip(*[self.sim_nodes(img_state, words[g, :int(lengths[g].max())], lengths[g])
                                 for g in groups])
            cols = torch.cat(self.head(list(nodes), list(masks)), dim=1)
        else:
            parts = []
            for g in groups:
                w, lg = words[g, :int(lengths[g].max())], lengths[g]
                step = max(1, self.options.pair_budget // max(1, w.shape[0] * w.shape[1] * w.shape[2]))
                rows = []
                for s in range(0, img_state.shape[0], step):
                    n, m = self.sim_nodes(img_state[s:s + step], w, lg)
                    rows.append(self.head([n], [m])[0])
                parts.append(torch.cat(rows, dim=0))
            cols = torch.cat(parts, dim=1)
        # Back from length order to the caller's caption order.
        inverse = torch.empty_like(lengths)
        inverse[torch.cat(groups)] = torch.arange(len(lengths), device=lengths.device)
        return cols[:, inverse]

    # --- training ------------------------------------------------------------------------------
    def forward(self, batch: FusionBatch) -> dict[str, Tensor]:
        """A training batch → its image states (``img_state``: global image + regions), word
        vectors and lengths; :meth:`batch_outputs` turns states (this rank's, or the gathered
        global batch's under DDP) into scores. The loss
        (:class:`itrkit.losses.matching.MatchingLoss`) is not the model's."""
        img = self.encode_images(batch.regions)
        words, lengths = self.encode_texts(batch.tokens, batch.lengths, batch.word_states)
        return {"img_state": img, "words": words, "lengths": lengths}

    def batch_outputs(self, states: dict[str, Tensor]) -> dict[str, Tensor]:
        """The B×B ``scores`` (every image of the batch with every caption), the pooled
        ``image_global`` / ``text_global`` features and, with USA heads, ``image_uni`` / ``text_uni``."""
        img, words, lengths = states["img_state"], states["words"], states["lengths"]
        out = {"scores": self.score(img, words, lengths), "image_global": img[:, 0],
               "text_global": self.text_global(words, lengths)}
        if self.usa_img is not None and self.usa_txt is not None:
            out["image_uni"] = self.usa_img(out["image_global"])
            out["text_uni"] = self.usa_txt(out["text_global"])
        return out


def SGR(**options: Any) -> SGRAFModel:  # noqa: N802 - a model name, used like a class
    return SGRAFModel(**{**options, "name": "sgr"})


def SAF(**options: Any) -> SGRAFModel:  # noqa: N802
    return SGRAFModel(**{**options, "name": "saf"})
