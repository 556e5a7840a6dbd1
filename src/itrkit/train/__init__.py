"""Training: the one loop (:mod:`itrkit.train.trainer`) over every model family.

This package is also callable: ``itrkit.train(config, overrides, data=..., out=...)`` trains a run
and returns its metrics (:func:`itrkit.train.api.train`), while ``itrkit.train.trainer``,
``itrkit.train.config`` and the other modules import as usual. (A module attribute cannot be both
the subpackage and a function, so the subpackage itself answers the call.)
"""

from __future__ import annotations

import sys
import types
from typing import Any


def train(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """See :func:`itrkit.train.api.train` (imported on first use: ``import itrkit`` stays light)."""
    from itrkit.train.api import train as _train

    return _train(*args, **kwargs)


class _CallableModule(types.ModuleType):
    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return train(*args, **kwargs)

    @property
    def __signature__(self) -> Any:  # help() and inspect show the real parameters
        import inspect

        from itrkit.train.api import train as _train

        return inspect.signature(_train)


sys.modules[__name__].__class__ = _CallableModule
