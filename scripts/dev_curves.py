"""Dev curves of training runs: the per-epoch validation metric each run's ``train.log`` records.

Reads the ``"event": "val"`` lines of every ``RUN/train.log`` (any model family) and plots the
``--metric`` (default ``rsum``) against the epoch, one line per run, with the first stage's
(``itc_``) curve dashed where a re-ranker logs one. ``--json`` writes the curves; the plot shows
whether a budget was enough (a curve still rising at its last epoch was cut short).

    .venv/bin/python scripts/dev_curves.py runs/sgr runs/saf --out curves.png --json curves.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from itrkit.errors import DataError
from itrkit.utils.io import atomic_path, atomic_write_json


def curves(run: Path, metric: str = "rsum") -> dict[str, Any]:
    """``{"epoch": [...], metric: [...], "itc_" + metric: [...] (when logged)}`` of one run."""
    log = run / "train.log"
    if not log.is_file():
        raise DataError(f"{log}: no training log")
    out: dict[str, list[float]] = {"epoch": [], metric: []}
    epochs = 0
    for line in log.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("event") != "val":
            continue
        val = rec["val"]
        if metric not in val:
            raise DataError(f"{log}: validation records hold no '{metric}'")
        epochs += 1  # epochs count across stages (a two-stage run's stage II continues the axis)
        out["epoch"].append(epochs)
        out[metric].append(float(val[metric]))
        if f"itc_{metric}" in val:
            out.setdefault(f"itc_{metric}", []).append(float(val[f"itc_{metric}"]))
    if not out["epoch"]:
        raise DataError(f"{log}: no validation records")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--metric", default="rsum")
    ap.add_argument("--labels", default="", help="comma-separated line labels (default: the run folders' names)")
    ap.add_argument("--title", default="")
    ap.add_argument("--out", type=Path, help="PNG path")
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    labels = a.labels.split(",") if a.labels else [r.name for r in a.runs]
    if len(labels) != len(a.runs):
        raise SystemExit(f"--labels: {len(labels)} labels for {len(a.runs)} runs")
    data = {lab: curves(r, a.metric) for lab, r in zip(labels, a.runs)}
    for lab, c in data.items():
        tail = c[a.metric][-1] - c[a.metric][-2] if len(c[a.metric]) > 1 else float("nan")
        print(f"{lab}: {len(c['epoch'])} epochs, best {max(c[a.metric]):.1f} (epoch "
              f"{c['epoch'][c[a.metric].index(max(c[a.metric]))]}), last {c[a.metric][-1]:.1f} (last step {tail:+.1f})")
    if a.json:
        atomic_write_json(a.json, {"metric": a.metric, "runs": {lab: {"run": str(r), **data[lab]}
                                                                 for lab, r in zip(labels, a.runs)}})
    if a.out:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.5, 4))
        for lab, c in data.items():
            line, = ax.plot(c["epoch"], c[a.metric], marker="o", label=lab)
            if f"itc_{a.metric}" in c:
                ax.plot(c["epoch"], c[f"itc_{a.metric}"], ls="--", color=line.get_color(), label=f"{lab}: first stage")
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"dev {a.metric}")
        ax.set_title(a.title or f"dev {a.metric} per epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        with atomic_path(a.out) as tmp:
            fig.savefig(tmp, dpi=120, format="png")
        plt.close(fig)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
