"""``itrkit reproduce``: the papers' comparisons on real photos (docs/method.md §5)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from itrkit.errors import ConfigError
from itrkit.experiments.flickr8k import Reproduction
from itrkit.experiments.methods import DEFAULT_METHODS, METHODS
from itrkit.utils.device import add_device_argument


def _cmd(a: argparse.Namespace) -> int:
    methods = [m.strip() for m in a.methods.split(",")] if a.methods else DEFAULT_METHODS
    fixed: dict[str, int] = {}
    for item in a.choice or []:
        name, sep, idx = item.partition("=")
        if not sep or not idx.strip().isdigit():
            raise ConfigError(f"--choice wants METHOD=GRID_INDEX, got '{item}'")
        fixed[name.strip()] = int(idx)
    rep = Reproduction(Path(a.data), Path(a.out), methods, a.seeds, a.epochs, a.cache, a.image_teacher,
                       a.text_teacher, a.max_train_images, tune=not a.no_tune, fixed=fixed,
                       fusion_epochs=a.fusion_epochs, device=a.device, finetune=a.finetune, overrides=a.set,
                       dev_budget=a.dev_budget, progress=not a.quiet)
    rep.run()
    print(f"results: {a.out}/results.json, results.md, results.png")
    return 0


def add_parsers(sub: Any) -> None:
    r = sub.add_parser("reproduce", help="the papers' comparisons on real photos (docs/method.md §5)")
    r.add_argument("dataset", choices=["flickr8k"])
    r.add_argument("--data", required=True, help="Flickr8k folder (official layout) or a prepared dataset folder")
    r.add_argument("--out", required=True)
    r.add_argument("--methods", default=None,
                   help=f"comma-separated, from: {', '.join(METHODS)}; fusion matchers (bundled recipes, not tuned): "
                        "sgr, saf, sgraf, sgr+cusa, saf+cusa, sgraf+cusa, rerank, rerank+cusa (-minilm: SGR / SAF / "
                        "SGRAF on MiniLM token states); re-rankers of "
                        "the same seed's InfoNCE run (which is run too): rerank-de, rerank-de+cusa")
    r.add_argument("--fusion-epochs", type=int, default=None, help="epochs of the fusion runs (default: the recipe's)")
    r.add_argument("--seeds", type=int, default=3)
    r.add_argument("--epochs", type=int, default=10)
    r.add_argument("--cache", default=None, help="tower-feature cache folder")
    r.add_argument("--finetune", default=None, metavar="SPEC",
                   help="partial fine-tuning of the tuned runs over cached frozen prefixes: top:N (both towers) or "
                        "image=top:N,text=top:M (either may be frozen); two-stage methods (icone) keep the towers "
                        "frozen in stage I. Default: heads on frozen tower features")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every tuned run, after the method's own (repeatable), "
                        "e.g. loss.center_teacher=true; stages.*.KEY=V sets KEY in every stage of each method, "
                        "e.g. stages.*.tower_lr_scale=0.03")
    r.add_argument("--image-teacher", default="efficientnet-lite2",
                   help="a tower spec, or caption-centroid (each image's row = the mean text-teacher row of its "
                        "own training captions)")
    r.add_argument("--text-teacher", default="mpnet")
    r.add_argument("--max-train-images", type=int, default=0, help="use only the first N training images")
    r.add_argument("--no-tune", action="store_true", help="take each method's first grid point (quick look)")
    r.add_argument("--dev-budget", type=int, default=0, metavar="K",
                   help="dev runs per tuned method: the first K points of each grid, the same K for all "
                        "(grids are ordered by priority; default: every point)")
    r.add_argument("--choice", action="append", metavar="METHOD=INDEX",
                   help="reuse a dev choice made earlier (the grid index printed by 'tune'), e.g. icone=2; "
                        "repeatable; a method needed only as a base is then not trained at all")
    r.add_argument("--quiet", action="store_true",
                   help="no progress lines (grid store, teachers, training epochs, scoring) on stderr")
    add_device_argument(r)
    r.set_defaults(func=_cmd)


