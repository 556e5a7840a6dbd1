"""``ItrkitCLIPModel``: a Hugging Face ``CLIPModel`` whose projections carry itrkit's trunk and head.

Standalone on purpose (torch + transformers only): an exported folder carries this file as
``modeling_itrkit_clip.py`` and its ``config.json`` maps ``AutoModel`` to the class, so

    model = AutoModel.from_pretrained(DIR, trust_remote_code=True)   # an instance of CLIPModel
    model.get_image_features(pixel_values=...).pooler_output        # = itrkit's image embeddings
    model.get_text_features(input_ids=..., attention_mask=...).pooler_output

(L2-normalise them, as ``CLIPModel.forward`` does; on transformers 4.x the two methods return the
tensor itself). ``visual_projection`` / ``text_projection`` become ``proj`` (CLIP's own projection)
→ ``trunk`` (itrkit's residual MLP, or identity) → ``norm`` + ``linear`` (the cross head), so
everything else in ``CLIPModel`` (``forward``, logits, processors) works unchanged; ``logit_scale``
holds 1/τ of the trained run.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPModel


class ItrkitResidualMLP(nn.Module):
    """x + fc2(GELU(fc1(LayerNorm(x)))): the itrkit trunk (``model.trunk=mlp``)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class ItrkitProjection(nn.Module):
    """CLIP projection → trunk → LayerNorm + Linear (itrkit's cross head)."""

    def __init__(self, in_dim: int, proj_dim: int, trunk_hidden: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(in_dim, proj_dim, bias=False)
        self.trunk = ItrkitResidualMLP(proj_dim, trunk_hidden) if trunk_hidden else nn.Identity()
        self.norm = nn.LayerNorm(proj_dim)
        self.linear = nn.Linear(proj_dim, embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.norm(self.trunk(self.proj(x))))


class ItrkitCLIPModel(CLIPModel):
    """``CLIPModel`` with itrkit's heads inside its two projections (see the module docstring)."""

    def __init__(self, config) -> None:
        super().__init__(config)
        head = dict(getattr(config, "itrkit_head", None) or {})
        trunk_hidden = int(head.get("trunk_hidden", 0))
        embed_dim = int(head["embed_dim"])
        proj = int(config.projection_dim)
        self.visual_projection = ItrkitProjection(config.vision_config.hidden_size, proj, trunk_hidden, embed_dim)
        self.text_projection = ItrkitProjection(config.text_config.hidden_size, proj, trunk_hidden, embed_dim)
