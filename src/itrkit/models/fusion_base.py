"""The contract between fusion matchers (SGRAF, the ITM re-ranker) and their trainer / evaluator.

A fusion matcher scores an (image, caption) pair jointly from image *regions* (grid cells or
detector regions) and caption *words*, so retrieval cannot be a single matmul: every pair of the
test set goes through the model. Both families here implement this interface so one training
task (``itrkit.train.tasks.FusionTask``) and one evaluation path (``itrkit.eval.fusion``) serve them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn


@dataclass
class FusionBatch:
    """One training batch of B (image, caption) pairs; rows with equal ``img_ids`` are positives."""

    regions: Tensor  # (B, R, C) float32 region / grid features of each row's image
    tokens: Tensor  # (B, L) int64 word-piece ids, right-padded
    lengths: Tensor  # (B,) int64 number of real tokens (≥ 1)
    img_ids: Tensor  # (B,) int64 image-group id of each row
    t_img: Tensor | None = None  # (B, D_ti) frozen image-teacher features (CUSA only)
    t_txt: Tensor | None = None  # (B, D_tt) frozen text-teacher features (CUSA only)


class FusionMatcher(nn.Module):
    """Subclasses implement ``encode_images``, ``encode_texts``, ``score`` and ``forward``.

    ``forward(batch)`` returns the tensors the family's loss needs (scores, embeddings); the loss
    itself lives in :mod:`itrkit.losses`. ``options`` is the model's options dataclass (saved with
    the model); ``prepare_texts`` tokenises captions with the model's text tower.
    """

    options: Any

    def prepare_texts(self, texts: list[str]) -> dict[str, Tensor]:
        """Captions → ``{"input_ids": (N, L), "lengths": (N,)}`` with the model's tokenizer."""
        return self.text_tower.prepare(texts)

    def encode_images(self, regions: Tensor) -> Tensor:
        """(N, R, C) raw region features → per-image state consumed by ``score`` (first dim N)."""
        raise NotImplementedError

    def encode_texts(self, tokens: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """(N, L) tokens → (word features (N, L, D), lengths (N,))."""
        raise NotImplementedError

    def score(self, img_state: Tensor, words: Tensor, lengths: Tensor) -> Tensor:
        """Similarity of every image with every caption: (N_img, N_txt)."""
        raise NotImplementedError

    @torch.no_grad()
    def score_all(self, regions: Tensor, tokens: Tensor, lengths: Tensor, img_chunk: int = 100,
                  txt_chunk: int = 500, progress: bool = True) -> Tensor:
        """The full (N_img, N_txt) score matrix, computed in blocks so memory stays bounded."""
        from itrkit.utils.progress import progress as progress_lines

        was_training = self.training
        self.eval()
        try:
            img = torch.cat([self.encode_images(regions[s:s + img_chunk]) for s in range(0, len(regions), img_chunk)])
            enc = [self.encode_texts(tokens[s:s + txt_chunk], lengths[s:s + txt_chunk])
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
