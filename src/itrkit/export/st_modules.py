"""sentence-transformers module for itrkit's residual MLP trunk (copied into exported folders).

This file is standalone on purpose: an exported folder carries it as ``itrkit_st_modules.py`` and
``SentenceTransformer(DIR, trust_remote_code=True)`` imports it from there, so loading an export
needs torch and sentence-transformers only, not itrkit. sentence-transformers has no built-in
module for ``x + W2·GELU(W1·LN(x))`` (its Dense skips one layer, its LayerNorm normalises the
whole feature), hence this one module; every other stage of an export is a standard module.
"""

from __future__ import annotations

import json
import os

import torch
import torch.nn.functional as F
from torch import nn

CONFIG = "config.json"
WEIGHTS = "model.safetensors"


class ItrkitResidualMLP(nn.Module):
    """``sentence_embedding ← x + fc2(GELU(fc1(LayerNorm(x))))``, the itrkit trunk (``model.trunk=mlp``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.dim, self.hidden = int(dim), int(hidden)
        self.norm = nn.LayerNorm(self.dim)
        self.fc1 = nn.Linear(self.dim, self.hidden)
        self.fc2 = nn.Linear(self.hidden, self.dim)

    def forward(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        x = features["sentence_embedding"]
        features["sentence_embedding"] = x + self.fc2(F.gelu(self.fc1(self.norm(x))))
        return features

    def get_sentence_embedding_dimension(self) -> int:
        return self.dim

    def get_embedding_dimension(self) -> int:
        return self.dim

    def save(self, output_path: str, *args, **kwargs) -> None:
        from safetensors.torch import save_file

        os.makedirs(output_path, exist_ok=True)
        with open(os.path.join(output_path, CONFIG), "w", encoding="utf-8") as f:
            json.dump({"dim": self.dim, "hidden": self.hidden}, f, indent=2)
        save_file({k: v.detach().contiguous() for k, v in self.state_dict().items()},
                  os.path.join(output_path, WEIGHTS))

    @staticmethod
    def load(input_path: str) -> ItrkitResidualMLP:
        from safetensors.torch import load_file

        with open(os.path.join(input_path, CONFIG), encoding="utf-8") as f:
            cfg = json.load(f)
        module = ItrkitResidualMLP(int(cfg["dim"]), int(cfg["hidden"]))
        module.load_state_dict(load_file(os.path.join(input_path, WEIGHTS)), strict=True)
        return module
