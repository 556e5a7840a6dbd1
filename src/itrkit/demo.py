"""``itrkit demo``: the main job on the embedded synthetic data, no download, nothing from outside.

1. render the synthetic captioned-image set (known multi-positive relations),
2. cache frozen EfficientNet-Lite0 / all-MiniLM-L6-v2 features (both ship in PyPI wheels),
3. train the InfoNCE baseline heads, selecting the epoch on validation,
4. evaluate the selected model on the held-out test images and print the table,
5. build a search index of the test images and print the ``itrkit serve`` command.
Everything is written under ``--out``.
"""

from __future__ import annotations

import time
from pathlib import Path

from itrkit.config import load_config


def demo_config(out: Path, data: Path, quick: bool):
    from itrkit.train.config import TrainConfig

    overrides = [
        f"out={out / 'runs' / 'infonce'}", f"data.path={data}", f"cache_dir={out / 'cache'}",
        "batch_size=64", "stages.0.epochs=" + ("3" if quick else "12"), "stages.0.lr=0.001",
        "loss.tau=0.1", "loss.tau_learnable=false", "log_every=20",
    ]
    return load_config(TrainConfig, None, overrides=overrides)


def run_demo(out: Path, quick: bool = False) -> dict:
    from itrkit.data.synthetic import make_synthetic
    from itrkit.eval.table import format_table
    from itrkit.train.trainer import train

    t0 = time.time()
    out = out.resolve()
    data = out / "data"
    n = 150 if quick else 600
    if not (data / "dataset.json").is_file():
        print(f"[1/5] rendering {n} synthetic scenes with 5 captions each → {data}")
        make_synthetic(data, n_images=n, captions_per_image=5, seed=0)
    else:
        print(f"[1/5] synthetic data already at {data}")
    cfg = demo_config(out, data, quick)
    run_dir = Path(cfg.out)
    if (run_dir / "metrics.json").is_file():
        import json

        print(f"[2-4/5] run already complete at {run_dir}")
        metrics = json.loads((run_dir / "metrics.json").read_text())
    else:
        print("[2/5] caching frozen EfficientNet-Lite0 and all-MiniLM-L6-v2 features (once per model and data)")
        print("[3/5] training the InfoNCE baseline heads; the epoch is picked on validation")
        metrics = train(cfg, resume=(run_dir / "config.yaml").is_file())
    print("[4/5] held-out test images:")
    print(format_table({"InfoNCE (val, selected)": metrics["val"], "InfoNCE (test)": metrics["test"]}))
    index_dir = out / "index"
    try:
        from itrkit.data.records import Dataset
        from itrkit.index.build import build_index
        from itrkit.models.io import load_model
    except ModuleNotFoundError as e:  # the index module is optional only while it is being built
        print(f"[5/5] search index skipped: {e}")
    else:
        print(f"[5/5] building a search index of the test images → {index_dir}")
        model = load_model(run_dir)
        build_index(model, Dataset.load(data).split("test"), index_dir, run_dir=run_dir, overwrite=True)
        print(f"try it:  itrkit serve --index {index_dir}   (then open http://127.0.0.1:8000)")
        print(f"         itrkit search --index {index_dir} --text \"a red circle\" -k 5")
    print(f"done in {time.time() - t0:.0f} s; the run lives in {run_dir}")
    return metrics
