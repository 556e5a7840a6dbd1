"""The experiments runner: data, teachers and grid features prepared once; runs trained or reused;
paired seeds aggregated; results written as JSON, a Markdown table and a plot.

Layout under ``out``::

    data/                    the prepared dataset (when given a raw Flickr8k folder)
    teachers/{image,text}.store   CUSA teachers on the training split (extracted once)
    grid.store/              region features for the fusion matchers (train/val/test, once)
    tune/<method>/g<k>/      dev runs of a tuned method's grid point k (seed 0)
    runs/<method>/seed<s>/   the reported runs; ``metrics.json`` present = finished (reused)
    results.{json,md,png}, timings.json
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from itrkit.data.records import Dataset
from itrkit.train.config import TrainConfig
from itrkit.utils.io import atomic_path, atomic_write_json, atomic_write_text


class Runner:
    def __init__(self, out: Path, progress: bool = False, device: str = "auto") -> None:
        from itrkit.utils.device import resolve_device

        resolve_device(device)  # an unavailable device is one line before anything is written
        self.out = Path(out)
        self.progress = progress
        self.device = device  # every run's and the teachers' device (auto: CUDA, else MPS, else CPU)
        self.timings: dict[str, float] = {}

    # --- inputs, once ---------------------------------------------------------------------------
    def prepare(self, data: Path, fmt: str = "flickr8k") -> Path:
        """A prepared dataset folder: ``data`` itself, or ``out/data`` prepared from the raw release."""
        data = Path(data)
        if (data / "dataset.json").is_file():
            return data
        from itrkit.data.prepare import prepare_dataset

        target = self.out / "data"
        if not (target / "dataset.json").is_file():
            print(f"preparing {fmt} from {data} → {target}", file=sys.stderr)
            prepare_dataset(fmt, data, target, check_images=False)
        return target

    def teachers(self, dataset_dir: Path, image_teacher: str, text_teacher: str, max_train: int = 0) -> list[str]:
        """``out/teachers`` stores of the training split (extracted once), as config overrides."""
        from itrkit.teachers.extract import teach

        tdir = self.out / "teachers"
        if not ((tdir / "image.store").exists() and (tdir / "text.store").exists()):
            t0 = time.time()
            ds = Dataset.load(dataset_dir).split("train").subset(max_train or None)
            teach(ds, image_teacher, text_teacher, tdir, device=self.device)
            self.timings["teachers_s"] = round(time.time() - t0, 1)
        return [f"teacher.image_store={tdir / 'image.store'}", f"teacher.text_store={tdir / 'text.store'}"]

    def grid(self, dataset_dir: Path) -> Path:
        """``out/grid.store`` over the train, val and test images (built once, then reused)."""
        from itrkit.teachers.grid import build_grid_store

        path = self.out / "grid.store"
        ds = Dataset.load(dataset_dir)
        build_grid_store(ds.split("train", "val", "test"), path, progress=self.progress)
        return path

    # --- runs -----------------------------------------------------------------------------------
    def run(self, cfg: TrainConfig) -> dict[str, Any]:
        """Train ``cfg`` (any family), or reuse its finished run, or resume its unfinished one."""
        from itrkit.train.trainer import train

        run_dir = Path(cfg.out)
        cfg.device = self.device
        if (run_dir / "metrics.json").is_file():  # finished earlier: reuse (experiments are resumable)
            return json.loads((run_dir / "metrics.json").read_text())
        return train(cfg, resume=(run_dir / "config.yaml").is_file(), progress=self.progress)

    def ensemble(self, run_dir: Path, members: list[Path]) -> dict[str, Any]:
        """The mean of the members' test score matrices (SGRAF = SGR + SAF), evaluated once."""
        from itrkit.eval.fusion import evaluate_fusion_runs

        if (run_dir / "metrics.json").is_file():
            return json.loads((run_dir / "metrics.json").read_text())
        out = {"test": evaluate_fusion_runs(members, progress=self.progress, device=self.device),
               "members": [str(m) for m in members]}
        atomic_write_json(run_dir / "metrics.json", out)
        return out

    # --- results --------------------------------------------------------------------------------
    @staticmethod
    def aggregate(runs: list[dict[str, Any]], chosen: list[str]) -> dict[str, Any]:
        """Mean ± std (ddof 1) of the runs' test RSUM; the runs keep their seeds (paired Δ in tables)."""
        rs = np.array([r["rsum"] for r in runs])
        return {"rsum_mean": float(rs.mean()), "rsum_std": float(rs.std(ddof=1)) if len(rs) > 1 else 0.0,
                "chosen": chosen, "runs": runs}

    def write(self, results: dict[str, Any], plot: bool = True) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "results.json", results)
        atomic_write_json(self.out / "timings.json", self.timings)
        atomic_write_text(self.out / "results.md", results_table(results))
        if plot:
            import importlib.util

            if importlib.util.find_spec("matplotlib") is not None:
                plot_results(results, self.out / "results.png")
            else:
                print("results.png skipped: matplotlib is missing (pip install 'itrkit[eval]')", file=sys.stderr)
        print(results_table(results))


def results_table(results: dict[str, Any]) -> str:
    keys = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"]
    lines = ["| method | " + " | ".join(keys) + " | RSUM (mean ± std) | Δ vs infonce (paired) | n |",
             "|---" * (len(keys) + 4) + "|"]
    base = results.get("infonce")
    for name, r in results.items():
        runs = r["runs"]
        cells = [f"{np.mean([x[k] for x in runs]):.1f}" for k in keys]
        delta = ""
        if base and name != "infonce" and len(base["runs"]) == len(runs):
            d = np.array([x["rsum"] for x in runs]) - np.array([x["rsum"] for x in base["runs"]])
            delta = f"{d.mean():+.1f} ± {d.std(ddof=1) if len(d) > 1 else 0:.1f} ({int((d > 0).sum())}/{int((d < 0).sum())})"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['rsum_mean']:.1f} ± {r['rsum_std']:.1f} | {delta} | {len(runs)} |")
    return "\n".join(lines) + "\n"


def plot_results(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt


    names = list(results)
    means = [results[n]["rsum_mean"] for n in names]
    stds = [results[n]["rsum_std"] for n in names]
    fig, ax = plt.subplots(figsize=(1.4 * len(names) + 2, 4))
    ax.bar(names, means, yerr=stds, capsize=4, color="#4c72b0")
    for i, n in enumerate(names):
        ax.scatter([i] * len(results[n]["runs"]), [r["rsum"] for r in results[n]["runs"]], color="k", s=10, zorder=3)
    lo = min(m - s for m, s in zip(means, stds))
    ax.set_ylim(max(0, lo - 10), max(m + s for m, s in zip(means, stds)) + 5)
    ax.set_ylabel("test RSUM (Flickr8k 1K)")
    ax.set_title("Flickr8k test 1K: mean ± std over seeds (dots: seeds)")
    plt.xticks(rotation=20)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


