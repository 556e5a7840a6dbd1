"""GRU / LSTM text towers (IConE Table 4's text-encoder variants; the VSE++ style text encoder).

Word embeddings (300-d, randomly initialised from ``seed``) over the word pieces of a Hugging Face
tokenizer (default: all-MiniLM-L6-v2's BERT vocabulary, no special tokens), then ``layers``
bidirectional GRU/LSTM layers (hidden 512 per direction), then mean pooling over the valid tokens.

``combine="mean"`` (default) averages the forward and backward states per token, as VSE-style
text encoders do, so the output is ``hidden``-d; ``combine="concat"`` keeps both, ``2·hidden``-d.
Padded positions never reach the RNN (packed sequences), so the backward direction starts at each
caption's last real token and a caption's feature does not depend on its batch's padding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itrkit.errors import CheckpointError, ConfigError
from itrkit.models.base import Tower
from itrkit.models.hf_text import minilm_path, read_st_folder, resolve_folder


def load_tokenizer(spec: str) -> tuple[Any, str]:
    """A tokenizer from ``minilm`` or a Hugging Face / sentence-transformers folder → (tokenizer, canonical spec)."""
    from transformers import AutoTokenizer

    if spec == "minilm":
        folder, canonical = minilm_path(), "minilm"
    else:
        folder = Path(resolve_folder(spec, "rnn tokenizer"))
        canonical = str(folder)
        if (folder / "modules.json").is_file():
            folder = read_st_folder(folder)["transformer"]
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True), canonical
    except (OSError, ValueError) as e:
        raise CheckpointError(f"no usable tokenizer in {folder} ({e.__class__.__name__})") from None


class RNNTextTower(Tower):
    modality = "text"

    def __init__(self, name: str = "gru", tokenizer: str = "minilm", embed_dim: int = 300, hidden: int = 512,
                 layers: int = 1, combine: str = "mean", max_length: int = 64, seed: int = 0) -> None:
        super().__init__()
        if name not in ("gru", "lstm"):
            raise ConfigError(f"unknown RNN tower '{name}' (use gru or lstm)")
        if combine not in ("mean", "concat"):
            raise ConfigError(f"tower {name}: combine must be mean or concat, got '{combine}'")
        if min(embed_dim, hidden, layers, max_length) <= 0:
            raise ConfigError(f"tower {name}: embed_dim, hidden, layers and max_length must be positive")
        self.tokenizer, tok_spec = load_tokenizer(tokenizer)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.unk_id = self.tokenizer.unk_token_id if self.tokenizer.unk_token_id is not None else self.pad_id
        self.hidden, self.combine, self.max_length = int(hidden), combine, int(max_length)
        rnn_cls = nn.GRU if name == "gru" else nn.LSTM
        # Seeded and isolated from the global RNG: the same spec always builds the same weights.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.embedding = nn.Embedding(len(self.tokenizer), int(embed_dim), padding_idx=self.pad_id)
            nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
            with torch.no_grad():
                self.embedding.weight[self.pad_id].zero_()
            self.rnns = nn.ModuleList(
                rnn_cls(int(embed_dim) if i == 0 else 2 * self.hidden, self.hidden, batch_first=True, bidirectional=True)
                for i in range(int(layers)))
        self.output_dim = self.hidden if combine == "mean" else 2 * self.hidden
        self.spec = {"name": name, "tokenizer": tok_spec, "embed_dim": int(embed_dim), "hidden": self.hidden,
                     "layers": int(layers), "combine": combine, "max_length": self.max_length, "seed": int(seed)}
        self.eval()

    def prepare(self, items: list[str]) -> dict[str, torch.Tensor]:
        if not all(isinstance(t, str) for t in items):
            raise ConfigError(f"tower {self.spec['name']}: every input must be a string")
        ids = [self.tokenizer(t.strip(), add_special_tokens=False, truncation=True,
                              max_length=self.max_length)["input_ids"] or [self.unk_id] for t in items]
        length = max((len(x) for x in ids), default=1)
        out = torch.full((len(ids), length), self.pad_id, dtype=torch.long)
        for i, x in enumerate(ids):
            out[i, :len(x)] = torch.tensor(x, dtype=torch.long)
        return {"input_ids": out, "lengths": torch.tensor([len(x) for x in ids], dtype=torch.long)}

    def token_features(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Per-word features ``(B, L, output_dim)``; padded positions are exactly zero.

        What word-level matchers (SGRAF, the ITM re-ranker) consume instead of the pooled vector.
        """
        ids = input_ids.to(self.device)
        lengths = lengths.cpu()
        total = ids.shape[1]
        x = self.embedding(ids)
        for rnn in self.rnns:
            packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
            x, _ = pad_packed_sequence(rnn(packed)[0], batch_first=True, total_length=total)
        if self.combine == "mean":
            x = (x[..., :self.hidden] + x[..., self.hidden:]) / 2
        return x

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        lengths = inputs["lengths"]
        x = self.token_features(inputs["input_ids"], lengths)
        mask = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths.to(x.device)[:, None]).to(x.dtype)
        return (x * mask.unsqueeze(-1)).sum(1) / lengths.to(x.device, x.dtype).unsqueeze(-1)

    def blocks(self) -> list[nn.Module]:
        return [self.embedding, *self.rnns]
