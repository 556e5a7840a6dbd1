"""``itrkit.train(...)``: train a model from Python the way ``itrkit train`` does from the shell."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from itrkit.errors import ConfigError

# Keyword shortcuts, as the command line has them (--data, --out, --device).
SHORTCUTS = {"data": "data.path", "out": "out", "device": "device"}


def _as_overrides(overrides: Sequence[str] | Mapping[str, Any] | None, keys: Mapping[str, Any]) -> list[str]:
    """``["a.b=1"]``, ``{"a.b": 1}`` and ``a__b=1`` keywords → ``["a.b=1", ...]`` (values as YAML)."""
    items: list[str] = []
    if isinstance(overrides, Mapping):
        items += [f"{k}={json.dumps(v)}" for k, v in overrides.items()]
    elif isinstance(overrides, str):
        items.append(overrides)
    elif overrides is not None:
        items += [str(o) for o in overrides]
    for k, v in keys.items():
        if v is None:
            continue
        key = SHORTCUTS.get(k, k.replace("__", "."))
        items.append(f"{key}={json.dumps(str(v) if isinstance(v, Path) else v)}")
    return items


def train(config: str | Path | Mapping[str, Any] | Any | None = None,
          overrides: Sequence[str] | Mapping[str, Any] | None = None, *, resume: bool = False,
          progress: bool = True, dataset: Any = None, **keys: Any) -> dict[str, Any]:
    """Train a dual encoder or a fusion matcher; returns the run's ``metrics.json`` as a dict.

    ``config``: a YAML path, a bundled config name (``"infonce"``, ``"cusa"``, ``"sgr"``, ...), a
    dict of config keys, a :class:`~itrkit.train.config.TrainConfig`, or None (the defaults).
    ``overrides``: ``["loss.csa=0.5", ...]`` or ``{"loss.csa": 0.5}``, as ``--set`` takes them.
    Keywords: ``data=`` (a prepared dataset folder), ``out=`` (the run folder), ``device=``, and
    any config key with ``__`` for its dots (``loss__csa=0.5``, ``stages__0__epochs=2``).
    ``dataset``: an already loaded :class:`~itrkit.data.records.Dataset` (then ``data`` may be empty).

    >>> metrics = itrkit.train("infonce", data="data/f8k", out="runs/infonce")  # doctest: +SKIP
    >>> metrics["test"]["rsum"]  # doctest: +SKIP
    """
    from itrkit.config import apply_overrides, from_dict, to_dict
    from itrkit.train.config import TrainConfig, load_train_config, resolve_config
    from itrkit.train.trainer import train as run_training

    items = _as_overrides(overrides, keys)
    if isinstance(config, TrainConfig):
        cfg = from_dict(TrainConfig, apply_overrides(to_dict(config), items)) if items else config
    elif isinstance(config, Mapping):
        # A dict is a config file's content: the same defaults and checks as a YAML file.
        cfg = load_train_config(None, _flatten(config) + items)
    elif config is None or isinstance(config, str | Path):
        cfg = load_train_config(resolve_config(str(config)) if config is not None else None, items)
    else:
        raise ConfigError(f"itrkit.train: config must be a path, a bundled name, a dict or a TrainConfig, "
                          f"not {type(config).__name__}")
    return run_training(cfg, dataset=dataset, resume=resume, progress=progress)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[str]:
    """``{"loss": {"csa": 1}}`` → ``["loss.csa=1"]`` (lists are set whole)."""
    out: list[str] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out += _flatten(v, f"{key}.")
        else:
            out.append(f"{key}={json.dumps(v)}")
    return out
