"""Fusion-matcher methods of ``itrkit reproduce`` (SGR, SAF, SGRAF and the ITM re-ranker, each
with and without CUSA).

Layout under ``out_dir`` (shared with :mod:`itrkit.reproduce`):

    data/                   the prepared dataset (when ``data_dir`` is a raw Flickr8k folder)
    grid.store/             EfficientNet-Lite0 7×7 grid features of the train/val/test images (once)
    teachers/{image,text}.store   CUSA teachers on the training split (the dual-encoder runs' stores)
    runs/<method>/seed<s>/  one fusion run each (``metrics.json`` reused when present: resumable)

``sgraf`` is not trained: it is the mean of the score matrices of the same-seed ``sgr`` and
``saf`` runs (``sgraf+cusa`` of ``sgr+cusa`` and ``saf+cusa``), as in the SGRAF paper. Seeds are
paired: run ``s`` of every method starts from seed ``s`` and sees the same batches and captions.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from itrkit.data.records import Dataset
from itrkit.errors import ConfigError
from itrkit.utils.io import atomic_write_json

# method → (bundled recipe, extra overrides); CUSA weights from the paper's appendix for SGRAF.
TRAINED: dict[str, tuple[str, list[str]]] = {
    "sgr": ("sgr", []),
    "saf": ("saf", []),
    "sgr+cusa": ("sgr_cusa", []),
    "saf+cusa": ("saf_cusa", []),
    "rerank": ("rerank", []),
    "rerank+cusa": ("rerank_cusa", []),
}
ENSEMBLES: dict[str, tuple[str, str]] = {"sgraf": ("sgr", "saf"), "sgraf+cusa": ("sgr+cusa", "saf+cusa")}
METHODS = (*TRAINED, *ENSEMBLES)


def _prepared(data_dir: Path, out_dir: Path) -> Path:
    if (data_dir / "dataset.json").is_file():
        return data_dir
    from itrkit.data.prepare import prepare_dataset

    target = out_dir / "data"
    if not (target / "dataset.json").is_file():
        print(f"preparing Flickr8k from {data_dir} → {target}", file=sys.stderr)
        prepare_dataset("flickr8k", data_dir, target, check_images=False)
    return target


def grid_store(dataset_dir: Path, out_dir: Path, progress: bool = False) -> Path:
    """``out_dir/grid.store`` over the train, val and test images (built once, then reused)."""
    from itrkit.teachers.grid import build_grid_store

    path = out_dir / "grid.store"
    ds = Dataset.load(dataset_dir)
    build_grid_store(ds.split("train", "val", "test"), path, progress=progress)
    return path


def teacher_stores(dataset_dir: Path, out_dir: Path, image_teacher: str, text_teacher: str) -> list[str]:
    """The CUSA teacher stores of :mod:`itrkit.reproduce` (``out_dir/teachers``), extracted if missing."""
    from itrkit.teachers.extract import teach

    tdir = out_dir / "teachers"
    if not ((tdir / "image.store").exists() and (tdir / "text.store").exists()):
        teach(Dataset.load(dataset_dir).split("train"), image_teacher, text_teacher, tdir)
    return [f"teacher.image_store={tdir / 'image.store'}", f"teacher.text_store={tdir / 'text.store'}"]


def _train_run(method: str, seed: int, epochs: int | None, dataset_dir: Path, out_dir: Path, grid: Path,
               teachers: list[str], overrides: list[str], progress: bool) -> dict[str, Any]:
    from itrkit.train.fusion import load_fusion_config, resolve_fusion_config, train_fusion

    run = out_dir / "runs" / method / f"seed{seed}"
    if (run / "metrics.json").is_file():  # finished earlier: reuse
        return json.loads((run / "metrics.json").read_text())
    recipe, extra = TRAINED[method]
    ov = [f"data.path={dataset_dir}", f"data.grid_store={grid}", f"out={run}", f"seed={seed}",
          *([f"stages.0.epochs={epochs}"] if epochs else []), *extra, *(teachers if method.endswith("+cusa") else []), *overrides]
    cfg = load_fusion_config(resolve_fusion_config(recipe), ov)
    return train_fusion(cfg, resume=(run / "config.yaml").is_file(), progress=progress)


def _ensemble_run(method: str, seed: int, out_dir: Path, progress: bool) -> dict[str, Any]:
    from itrkit.train.fusion import evaluate_fusion_runs

    run = out_dir / "runs" / method / f"seed{seed}"
    if (run / "metrics.json").is_file():
        return json.loads((run / "metrics.json").read_text())
    members = [out_dir / "runs" / m / f"seed{seed}" for m in ENSEMBLES[method]]
    test = evaluate_fusion_runs(members, progress=progress)  # mean of the members' test score matrices
    out = {"test": test, "members": [str(m) for m in members]}
    atomic_write_json(run / "metrics.json", out)
    return out


def run_method(name: str, data_dir: str | Path, out_dir: str | Path, seeds: int = 1, epochs: int | None = None,
               image_teacher: str = "efficientnet-lite2", text_teacher: str = "mpnet",
               overrides: list[str] | None = None, progress: bool = False) -> dict[str, list[dict[str, float]]]:
    """Train / evaluate one fusion method for seeds ``0 … seeds-1``; returns ``{method: [test metrics per seed]}``
    (an ensemble also returns its members' lists). ``epochs``: None = the recipe's. ``overrides`` are
    ``--set`` items for every trained run."""
    if name not in METHODS:
        raise ConfigError(f"unknown fusion method '{name}' (known: {', '.join(METHODS)})")
    if seeds < 1 or (epochs is not None and epochs < 1):
        raise ConfigError("seeds and epochs must be >= 1")
    out_dir = Path(out_dir)
    dataset_dir = _prepared(Path(data_dir), out_dir)
    grid = grid_store(dataset_dir, out_dir, progress=progress)
    members = list(ENSEMBLES.get(name, (name,)))
    teachers: list[str] = []
    if any(m.endswith("+cusa") for m in members):
        teachers = teacher_stores(dataset_dir, out_dir, image_teacher, text_teacher)
    results: dict[str, list[dict[str, float]]] = {m: [] for m in members}
    for seed in range(seeds):
        for m in members:
            metrics = _train_run(m, seed, epochs, dataset_dir, out_dir, grid, teachers, list(overrides or []), progress)
            sel = metrics.get("val") or {}
            results[m].append({**metrics["test"], "val_rsum": sel.get("rsum"), "best_epoch": metrics["best"]["epoch"]})
            print(f"  {m} seed {seed}: test rsum {metrics['test']['rsum']:.2f}", file=sys.stderr)
        if name in ENSEMBLES:
            results.setdefault(name, []).append(_ensemble_run(name, seed, out_dir, progress)["test"])
            print(f"  {name} seed {seed}: test rsum {results[name][-1]['rsum']:.2f}", file=sys.stderr)
    return results
