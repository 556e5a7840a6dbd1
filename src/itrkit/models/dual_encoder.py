"""``DualEncoder``: image tower + text tower (+ trainable trunk) + cross heads (+ USA heads).

docs/method.md §2. The towers turn raw inputs into pooled features; everything after them is small and
trainable. With frozen towers the tower features can be cached once and training only runs
:meth:`DualEncoder.forward_features` (seconds per epoch on a CPU).

The optional *trunk* (one residual MLP block per modality) is shared by the cross head and the
USA head: with frozen towers it is the only place where the USA loss can shape cross-modal
retrieval (docs/method.md §5.1, F1: separate projectors on frozen features are a no-op for retrieval).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from itrkit.models.base import Tower
from itrkit.utils.device import move_to
from itrkit.utils.io import fingerprint as _fp

# What encode_images takes: paths, PIL images, arrays, a list of them, or an N×H×W×C array.
ImageInputs = Any


def _image_list(items: ImageInputs) -> list[Any]:
    """One image or many → a list of single images (what the towers' ``prepare`` takes)."""
    from pathlib import PurePath

    if isinstance(items, str | PurePath) or hasattr(items, "getpixel"):  # a path or a PIL image
        return [items]
    if isinstance(items, np.ndarray):
        return list(items) if items.ndim == 4 else [items]
    if isinstance(items, torch.Tensor):
        from itrkit.errors import DataError

        raise DataError("encode_images takes paths, PIL images or NumPy arrays; for tower features use "
                        "embed_features")
    return list(items)


def _text_list(texts: str | list[str]) -> list[str]:
    return [texts] if isinstance(texts, str) else list(texts)


@dataclass
class ModelConfig:
    """What to build. Tower specs are those of :func:`itrkit.models.towers.build_tower`."""

    name: str = "dual_encoder"  # the model family (fusion matchers have their own options classes)
    image_tower: str = "efficientnet-lite0"
    text_tower: str = "minilm"
    image_trainable: str = "frozen"  # frozen | all | top:N
    text_trainable: str = "frozen"
    trainable: str = ""  # shorthand: both towers' mode (image_trainable / text_trainable follow it)
    # Cache what is frozen: pooled features of frozen towers, the frozen prefix's states of top:N
    # towers (only their top blocks run per step); false = every tower runs live.
    cached_features: bool = True
    prefix_dtype: str = "float16"  # how cached prefix states are stored (float16 | float32)
    embed_dim: int = 256
    trunk: str = "none"  # none | mlp (residual MLP shared by the cross and USA heads)
    trunk_hidden: int = 1024
    usa_heads: bool = False
    usa_dim: int = 256
    image_size: int = 0  # 0 = the tower's native size
    grad_checkpointing: bool = False  # recompute trainable towers' activations in backward (HF towers)

    def __post_init__(self) -> None:
        if self.trainable:
            from itrkit.errors import ConfigError

            for side in ("image", "text"):
                own = getattr(self, f"{side}_trainable")
                if own not in ("frozen", self.trainable):
                    raise ConfigError(f"model.trainable={self.trainable} and model.{side}_trainable={own} disagree "
                                      "(set one of them)")
                setattr(self, f"{side}_trainable", self.trainable)

    def validate(self) -> None:
        from itrkit.errors import ConfigError

        if self.name != "dual_encoder":
            raise ConfigError(f"model.name '{self.name}' is not a model (dual_encoder, or a fusion model: sgr, saf, rerank)")
        if self.trunk not in ("none", "mlp"):
            raise ConfigError(f"model.trunk: unknown trunk '{self.trunk}' (use none or mlp)")
        if self.embed_dim <= 0:
            raise ConfigError(f"model.embed_dim must be positive, got {self.embed_dim}")
        for side in ("image", "text"):
            mode = getattr(self, f"{side}_trainable")
            if mode not in ("frozen", "all") and not (mode.startswith("top:") and mode[4:].isdigit()):
                raise ConfigError(f"model.{side}_trainable: unknown mode '{mode}' (use frozen, all or top:N)")
            if self.cached_features and mode == "all":
                raise ConfigError(f"model.cached_features with model.{side}_trainable=all: nothing is frozen to "
                                  "cache (use top:N, or set model.cached_features=false to train the towers live)")
        if self.prefix_dtype not in ("float16", "float32"):
            raise ConfigError(f"model.prefix_dtype: unknown dtype '{self.prefix_dtype}' (use float16 or float32)")
        if self.grad_checkpointing and self.image_trainable == "frozen" and self.text_trainable == "frozen":
            raise ConfigError("model.grad_checkpointing needs a trainable tower (model.image_trainable or "
                              "model.text_trainable other than frozen): frozen towers store no activations")


def _head(in_dim: int, out_dim: int) -> nn.Sequential:
    """LayerNorm + Linear, Linear initialised N(0, 0.02) with zero bias (docs/method.md §5.1, F1 heads)."""
    lin = nn.Linear(in_dim, out_dim)
    nn.init.normal_(lin.weight, std=0.02)
    nn.init.zeros_(lin.bias)
    return nn.Sequential(nn.LayerNorm(in_dim), lin)


class ResidualMLP(nn.Module):
    """x + W2·GELU(W1·LN(x)); W2 starts at zero so the block starts as the identity."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        nn.init.normal_(self.fc1.weight, std=0.02)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


class DualEncoder(nn.Module):
    def __init__(self, image_tower: Tower, text_tower: Tower, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.image_tower = image_tower
        self.text_tower = text_tower
        di, dt = image_tower.output_dim, text_tower.output_dim
        mk = (lambda d: ResidualMLP(d, config.trunk_hidden)) if config.trunk == "mlp" else (lambda d: nn.Identity())
        # Creation order is fixed (cross heads first, USA heads last) so that two methods with the
        # same seed start from the same cross heads whatever else they add (paired comparisons).
        self.image_head = _head(di, config.embed_dim)
        self.text_head = _head(dt, config.embed_dim)
        self.image_trunk = mk(di)
        self.text_trunk = mk(dt)
        self.image_usa: nn.Module | None = _head(di, config.usa_dim) if config.usa_heads else None
        self.text_usa: nn.Module | None = _head(dt, config.usa_dim) if config.usa_heads else None
        self.image_tower.set_trainable(config.image_trainable)
        self.text_tower.set_trainable(config.text_trainable)
        if config.grad_checkpointing:
            for tower, mode in ((self.image_tower, config.image_trainable), (self.text_tower, config.text_trainable)):
                if mode != "frozen":
                    tower.enable_gradient_checkpointing()

    # --- training path ---------------------------------------------------------------------
    @property
    def has_usa(self) -> bool:
        return self.image_usa is not None

    def forward_features(self, image_features: torch.Tensor | None = None,
                         text_features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Tower features → ``image_embeds``/``text_embeds`` (cross) and ``image_uni``/``text_uni``."""
        out: dict[str, torch.Tensor] = {}
        if image_features is not None:
            h = self.image_trunk(image_features)
            out["image_hidden"] = h
            out["image_embeds"] = self.image_head(h)
            if self.image_usa is not None:
                out["image_uni"] = self.image_usa(h)
        if text_features is not None:
            h = self.text_trunk(text_features)
            out["text_hidden"] = h
            out["text_embeds"] = self.text_head(h)
            if self.text_usa is not None:
                out["text_uni"] = self.text_usa(h)
        return out

    def forward(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """A batch holds ``image_features`` (cached pooled features), ``image_states`` (a cached frozen
        prefix: the top blocks run) or ``image_inputs`` (the whole tower runs); same for text."""
        return self.forward_features(self._tower_features(batch, "image"), self._tower_features(batch, "text"))

    def _tower_features(self, batch: dict[str, Any], side: str) -> torch.Tensor | None:
        tower = self.image_tower if side == "image" else self.text_tower
        if f"{side}_features" in batch:
            return batch[f"{side}_features"]
        if f"{side}_states" in batch:
            return tower.forward_from(batch[f"{side}_states"], self.prefix_cut(side))
        if f"{side}_inputs" in batch:
            return tower(batch[f"{side}_inputs"])
        return None

    def prefix_cut(self, side: str) -> int | None:
        """Leading tower blocks served from the prefix cache (``top:N`` + ``cached_features``); None =
        the tower is frozen (pooled features cached) or runs live."""
        mode = getattr(self.config, f"{side}_trainable")
        if not self.config.cached_features or not mode.startswith("top:"):
            return None
        cuts = self.__dict__.setdefault("_cuts", {})  # the config is fixed: walk the blocks once, not per step
        if side not in cuts:
            cuts[side] = (self.image_tower if side == "image" else self.text_tower).cut_for(mode)
        return cuts[side]

    @torch.inference_mode()
    def features_from_prefix(self, side: str, states: Any, batch_size: int = 256) -> torch.Tensor:
        """Pooled tower features of every row of a prefix cache (``states.batch(idx)``), in eval mode."""
        tower = self.image_tower if side == "image" else self.text_tower
        cut = self.prefix_cut(side)
        assert cut is not None
        was_training = tower.training
        tower.eval()
        try:
            outs = [tower.forward_from(move_to(states.batch(np.arange(s, min(s + batch_size, len(states)))),
                                               self.device), cut).float().cpu()
                    for s in range(0, len(states), batch_size)]
        finally:
            tower.train(was_training)
        return torch.cat(outs) if outs else torch.zeros(0, tower.output_dim)

    # --- inference (the Encoder protocol used by eval, index and serve) -------------------
    @property
    def device(self) -> torch.device:
        """Where the heads live (``model.to(device)`` moves everything): inputs go there, embeddings
        come back to the CPU as NumPy arrays."""
        return next(self.image_head.parameters()).device

    @torch.inference_mode()
    def _encode(self, items: list[Any], tower: Tower, key: str, batch_size: int) -> np.ndarray | None:
        if key.endswith("_uni") and not self.has_usa:
            return None
        was_training = self.training
        self.eval()
        outs = []
        for i in range(0, len(items), batch_size):
            feats = tower(move_to(tower.prepare(items[i:i + batch_size]), self.device, non_blocking=True))
            res = self.forward_features(feats, None) if tower is self.image_tower else self.forward_features(None, feats)
            outs.append(F.normalize(res[key].float(), dim=-1).cpu())
        self.train(was_training)
        if not outs:
            return np.zeros((0, self.config.embed_dim), np.float32)
        return torch.cat(outs).numpy()

    def encode_images(self, items: ImageInputs, batch_size: int = 32) -> np.ndarray:
        """Images → L2-normalised cross-modal embeddings ``(N, embed_dim)`` float32 on the CPU.

        ``items``: a list of image paths, PIL images or ``H×W×3`` / ``H×W`` arrays (uint8, or
        floats in [0, 1]), or one of them alone (then ``N = 1``); an ``N×H×W×3`` array is N images.
        """
        return self._encode(_image_list(items), self.image_tower, "image_embeds", batch_size)  # type: ignore[return-value]

    def encode_texts(self, texts: str | list[str], batch_size: int = 64) -> np.ndarray:
        """Captions (a list, or one string) → L2-normalised embeddings ``(N, embed_dim)`` float32."""
        return self._encode(_text_list(texts), self.text_tower, "text_embeds", batch_size)  # type: ignore[return-value]

    def encode_images_uni(self, items: ImageInputs, batch_size: int = 32) -> np.ndarray | None:
        """Uni-modal (USA head) image embeddings, or None for a model without USA heads."""
        return self._encode(_image_list(items), self.image_tower, "image_uni", batch_size)

    def encode_texts_uni(self, texts: str | list[str], batch_size: int = 64) -> np.ndarray | None:
        """Uni-modal (USA head) caption embeddings, or None for a model without USA heads."""
        return self._encode(_text_list(texts), self.text_tower, "text_uni", batch_size)

    @torch.inference_mode()
    def embed_features(self, image_features: np.ndarray | torch.Tensor | None, text_features: np.ndarray | torch.Tensor | None,
                       batch_size: int = 4096) -> dict[str, np.ndarray]:
        """Cached tower features → L2-normalised embeddings of every head (eval on cached features)."""
        was_training = self.training
        self.eval()
        out: dict[str, list[torch.Tensor]] = {}
        for name, feats in (("image", image_features), ("text", text_features)):
            if feats is None:
                continue
            feats = torch.as_tensor(feats, dtype=torch.float32)
            device = self.device
            for i in range(0, len(feats), batch_size):
                chunk = move_to(feats[i:i + batch_size], device, non_blocking=True)
                res = self.forward_features(chunk, None) if name == "image" else self.forward_features(None, chunk)
                for k, v in res.items():
                    if k.endswith("_hidden"):
                        continue
                    out.setdefault(k, []).append(F.normalize(v.float(), dim=-1).cpu())
        self.train(was_training)
        return {k: torch.cat(v).numpy() for k, v in out.items()}

    # --- identity ----------------------------------------------------------------------------
    def saved_state(self) -> dict[str, torch.Tensor]:
        """Parameters a saved model must carry: heads, trunks, and towers that are not rebuilt from a wheel."""
        keep = {}
        for k, v in self.state_dict().items():
            if k.startswith("image_tower."):
                if not _tower_needs_saving(self.image_tower, self.config.image_trainable):
                    continue
            elif k.startswith("text_tower.") and not _tower_needs_saving(self.text_tower, self.config.text_trainable):
                continue
            keep[k] = v.detach().contiguous().clone()
        return keep

    def fingerprint(self) -> str:
        with torch.no_grad():
            # On the CPU: the same weights give the same fingerprint whichever device they live on.
            digest = [round(float(v.cpu().double().sum()), 6) for v in self.saved_state().values() if v.is_floating_point()]
        return _fp(self.image_tower.fingerprint(), self.text_tower.fingerprint(), digest)


def _tower_needs_saving(tower: Tower, trainable: str) -> bool:
    # Pretrained towers that stay frozen are rebuilt from their spec (wheel or folder); anything
    # trained or randomly initialised must travel with the model.
    name = str(tower.spec.get("name", ""))
    return trainable != "frozen" or bool(tower.spec.get("random_init")) or name.startswith(("tiny", "gru", "lstm"))


def build_model(config: ModelConfig) -> DualEncoder:
    from itrkit.models.towers import build_tower

    image_spec: Any = config.image_tower
    if config.image_size:
        image_spec = {"name": config.image_tower, "image_size": config.image_size}
    return DualEncoder(build_tower(image_spec, "image"), build_tower(config.text_tower, "text"), config)
