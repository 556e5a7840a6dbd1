"""``itrkit grid``: grid (region) features for the fusion matchers."""

from __future__ import annotations

import argparse
from typing import Any

from itrkit.teachers.grid import GRID_MODELS, build_grid_store, grid_shape
from itrkit.utils.device import add_device_argument


def _cmd_grid(a: argparse.Namespace) -> int:
    from itrkit.data.records import Dataset

    ds = Dataset.load(a.data)
    if a.split:
        ds = ds.split(*a.split.split(","))
    store = build_grid_store(ds, a.out, model=a.model, batch_size=a.batch_size, overwrite=a.overwrite,
                             device=a.device)
    print(f"{store.path}: {store.count} images × grid {grid_shape(store)}")
    return 0


def add_parsers(sub: Any) -> None:
    g = sub.add_parser("grid", help="extract grid (region) features for fusion matchers (SGRAF)")
    g.add_argument("data", help="prepared dataset folder")
    g.add_argument("--out", required=True, help="store folder to write (e.g. grid.store)")
    g.add_argument("--model", default="efficientnet-lite0", choices=GRID_MODELS)
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--split", default=None, help="only these splits (comma-separated; default: every image)")
    g.add_argument("--overwrite", action="store_true")
    add_device_argument(g)
    g.set_defaults(func=_cmd_grid)
