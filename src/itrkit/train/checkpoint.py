"""Resumable checkpoints: ``checkpoints/ckpt-<step>.safetensors`` + a JSON header with a checksum.

The weights file is written first (temporary name, then rename), the JSON header last, so a
header only ever names a complete file. On resume the newest checkpoint whose checksum matches
is used; a truncated or corrupted one is reported and skipped.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from itrkit.errors import CheckpointError
from itrkit.models.io import save_state_file
from itrkit.utils.io import atomic_write_json, sha256_file

CKPT_FORMAT = "itrkit-checkpoint/1"


def save_checkpoint(run_dir: str | Path, state: dict[str, torch.Tensor], meta: dict[str, Any], keep: int = 2) -> Path:
    folder = Path(run_dir) / "checkpoints"
    folder.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{int(meta['step']):08d}"
    weights = folder / f"{name}.safetensors"
    save_state_file(state, weights)
    header = {"format": CKPT_FORMAT, **meta, "weights": weights.name, "sha256": sha256_file(weights)}
    atomic_write_json(folder / f"{name}.json", header)
    for old in sorted(folder.glob("ckpt-*.json"))[:-keep]:
        (folder / old.name.replace(".json", ".safetensors")).unlink(missing_ok=True)
        old.unlink(missing_ok=True)
    return folder / f"{name}.json"


def load_latest_checkpoint(run_dir: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    folder = Path(run_dir) / "checkpoints"
    headers = sorted(folder.glob("ckpt-*.json"), reverse=True) if folder.is_dir() else []
    problems = []
    for h in headers:
        try:
            meta = json.loads(h.read_text(encoding="utf-8"))
            if meta.get("format") != CKPT_FORMAT:
                raise ValueError(f"unknown format {meta.get('format')!r}")
            weights = folder / meta["weights"]
            if not weights.is_file():
                raise ValueError(f"{weights.name} is missing")
            if sha256_file(weights) != meta["sha256"]:
                raise ValueError(f"{weights.name} fails its checksum (truncated or corrupted)")
            state = load_file(str(weights))
        except (ValueError, KeyError, json.JSONDecodeError, UnicodeDecodeError, SafetensorError, OSError) as e:
            problems.append(f"{h.name}: {e}")
            print(f"warning: checkpoint {h} is unusable ({e}); trying the previous one", file=sys.stderr)
            continue
        return state, meta
    if problems:
        raise CheckpointError(f"no usable checkpoint in {folder}: {'; '.join(problems)}")
    return None
