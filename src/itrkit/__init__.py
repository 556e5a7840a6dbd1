"""itrkit: image-text retrieval with dual encoders, CUSA and IConE.

The Python API (loaded on first use, so ``import itrkit`` stays light):

- ``itrkit.train(config, overrides, data=..., out=...)`` → the run's metrics (:mod:`itrkit.train`)
- ``itrkit.load_model(run)`` → a dual encoder (``encode_images``, ``encode_texts``) or a fusion matcher
- ``itrkit.evaluate(run_or_model, data, split="test", protocol="full")`` → retrieval metrics
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "evaluate", "load_model", "train"]


def __getattr__(name: str) -> Any:
    # PEP 562: torch and the models are imported only when the API is first used.
    if name == "train":
        import itrkit.train

        return itrkit.train  # the subpackage, which is callable
    if name in ("load_model", "evaluate"):
        from itrkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'itrkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
