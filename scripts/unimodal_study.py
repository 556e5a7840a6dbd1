"""Uni-modal metrics of every run of a reproduce study: STS-B test and COCO-MINI image→image R@1.

For each ``<study>/runs/<method>/seed<k>`` the selected model is loaded and scored as
``itrkit eval --sts`` / ``--unimodal coco:`` would: captions of STS-B through the USA text head when
the run trained one (else the cross head); the 79 COCO-MINI val images with captions, leave-one-out,
a hit when the nearest other image shares an object category. Each run's figures go to its
``unimodal.json`` (reused when present); the summary (mean ± std per method) to ``--out``.

    .venv/bin/python scripts/unimodal_study.py --study repro --sts downloads/sts --coco downloads/coco-mini
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from itrkit.data.formats import load_coco
from itrkit.eval.run import trained_usa, unimodal_metrics
from itrkit.eval.sts import evaluate_sts
from itrkit.models.embed import embed_dataset
from itrkit.models.io import load_model
from itrkit.utils.io import atomic_write_json


def run_metrics(run: Path, sts: Path, coco: Path, cache: str | None) -> dict[str, float]:
    path = run / "unimodal.json"
    if path.is_file():
        return json.loads(path.read_text())
    model = load_model(run)
    ds = load_coco(coco / "annotations" / "captions_val2017.json")
    emb = embed_dataset(model, ds, cache)
    use_usa = trained_usa(run)
    out = unimodal_metrics(model, f"coco:{coco / 'annotations' / 'instances_val2017.json'}", ds, emb, use_usa=use_usa)
    encode = model.encode_texts_uni if model.has_usa and use_usa else model.encode_texts
    out.update(evaluate_sts(encode, sts, tasks=("stsb",)))
    out = {("image_r1" if k.endswith("_coco_R@1") else k): v for k, v in out.items()}
    atomic_write_json(path, out)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--study", required=True, help="the --out folder of itrkit reproduce")
    ap.add_argument("--sts", required=True, help="STS folder (SentEval layout, with STSBenchmark/)")
    ap.add_argument("--coco", required=True, help="COCO-MINI folder (annotations/, val2017/)")
    ap.add_argument("--cache", default=None, help="feature / prefix cache folder")
    ap.add_argument("--out", default="", help="summary JSON (default: <study>/unimodal.json)")
    a = ap.parse_args(argv)
    study = Path(a.study)
    summary: dict[str, dict[str, float | list[float]]] = {}
    for method_dir in sorted((study / "runs").iterdir()):
        runs = sorted(p for p in method_dir.glob("seed*") if (p / "metrics.json").is_file())
        if not runs:
            continue
        per = [run_metrics(r, Path(a.sts), Path(a.coco), a.cache) for r in runs]
        row: dict[str, float | list[float]] = {}
        for key in ("image_r1", "sts_stsb"):
            vals = [float(m[key]) for m in per]
            row[key] = vals
            row[f"{key}_mean"] = float(np.mean(vals))
            row[f"{key}_std"] = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
        summary[method_dir.name] = row
        print(f"{method_dir.name:14s} COCO-MINI image R@1 {row['image_r1_mean']:.1f} ± {row['image_r1_std']:.1f}   "
              f"STS-B {row['sts_stsb_mean']:.1f} ± {row['sts_stsb_std']:.1f}   ({len(per)} seeds)")
    atomic_write_json(Path(a.out) if a.out else study / "unimodal.json", summary)


if __name__ == "__main__":
    main()
