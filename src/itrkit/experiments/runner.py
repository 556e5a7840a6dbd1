"""The experiments runner: data, teachers and grid features prepared once; runs trained or reused;
paired seeds aggregated; results written as JSON, a Markdown table and a plot.

Layout under ``out``::

    data/                    the prepared dataset (when given a raw Flickr8k folder)
    teachers/{image,text}.store   CUSA teachers on the training split (extracted once)
    grid.store/              region features for the fusion matchers (train/val/test, once)
    tune/<method>/g<k>/      dev runs of a tuned method's grid point k (seed 0)
    runs/<method>/seed<s>/   the reported runs; ``metrics.json`` present = finished (reused);
                             ``human.json``: its Flickr8k human-judgment metrics (docs/method.md §4.5, test only)
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
from itrkit.errors import ConfigError, DataError
from itrkit.train.config import TrainConfig
from itrkit.utils.io import atomic_path, atomic_write_json, atomic_write_text

# The Flickr8k human-judgment metrics merged into every dual-encoder run's test entry (docs/method.md §4.5).
HUMAN_KEYS = ("f8k_expert_tau_c", "f8k_cf_tau_b", "f8k_human_i2t_map@r", "f8k_human_t2i_map@r",
              "f8k_human_i2t_rp", "f8k_human_t2i_rp")
# results.md columns beside RSUM: (key, header), shown when every run of some method has the key
TABLE_EXTRA = (("f8k_human_t2i_map@r", "human t2i mAP@R"), ("f8k_expert_tau_c", "expert τc"))


class Runner:
    def __init__(self, out: Path, progress: bool = False, device: str = "auto") -> None:
        from itrkit.utils.device import resolve_device

        resolve_device(device)  # an unavailable device is one line before anything is written
        self.out = Path(out)
        self.progress = progress
        self.device = device  # every run's and the teachers' device (auto: CUDA, else MPS, else CPU)
        self.timings: dict[str, float] = {}
        self.trained = 0  # runs trained (not reused) by this runner: a reused method keeps its earlier timing
        self._teacher_ov: dict[tuple[str, str, int], list[str]] = {}
        self._test_sets: dict[tuple[str, str, int], Dataset] = {}
        self._human_noted = False

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
        """``out/teachers`` stores of the training split (extracted once), as config overrides.

        ``image_teacher="caption-centroid"``: the image rows are the means of the text teacher's
        rows of each image's training captions. Stores of other teachers there are refused."""
        from itrkit.teachers.extract import CAPTION_CENTROID, centroid_teacher_name, teach
        from itrkit.teachers.store import FeatureStore

        key = (image_teacher, text_teacher, max_train)
        if key in self._teacher_ov:
            return self._teacher_ov[key]
        tdir = self.out / "teachers"
        want = {"image": centroid_teacher_name(text_teacher) if image_teacher == CAPTION_CENTROID else image_teacher,
                "text": text_teacher}
        if (tdir / "image.store").exists() and (tdir / "text.store").exists():
            for kind, name in want.items():
                have = FeatureStore.open(tdir / f"{kind}.store", verify=False).teacher
                if have != name:
                    raise ConfigError(f"{tdir / f'{kind}.store'} holds the {kind} teacher '{have}', not '{name}': "
                                      "use another --out (or delete that store)")
        else:
            t0 = time.time()
            ds = Dataset.load(dataset_dir).split("train").subset(max_train or None)
            teach(ds, image_teacher, text_teacher, tdir, device=self.device)
            self.timings["teachers_s"] = round(time.time() - t0, 1)
        self._teacher_ov[key] = [f"teacher.image_store={tdir / 'image.store'}",
                                 f"teacher.text_store={tdir / 'text.store'}"]
        return self._teacher_ov[key]

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
        self.trained += 1
        return train(cfg, resume=(run_dir / "config.yaml").is_file(), progress=self.progress)

    def human(self, cfg: TrainConfig) -> dict[str, float]:
        """The Flickr8k human-judgment metrics (:data:`HUMAN_KEYS`) of a finished dual-encoder run,
        from its saved test embeddings; cached in the run folder as ``human.json``.

        Empty (with one notice line on stderr per runner) when the annotation files are not beside
        the test images, or when the run saved no test embeddings (fusion runs: :meth:`fusion_human`)."""
        from itrkit.eval.protocols import flickr8k_human_metrics

        run_dir = Path(cfg.out)
        cached = run_dir / "human.json"
        if cached.is_file():
            return json.loads(cached.read_text())
        emb_path = run_dir / "test_embeddings.safetensors"
        if not emb_path.is_file() or not cfg.data.test_split:
            return {}
        key = (str(cfg.data.path), cfg.data.test_split, cfg.data.limit("test"))
        if key not in self._test_sets:
            self._test_sets[key] = Dataset.load(cfg.data.path).split(cfg.data.test_split).subset(key[2] or None)
        ds = self._test_sets[key]
        ann = self._annotations(ds, cfg.data.path)
        if ann is None:
            return {}
        from safetensors.numpy import load_file

        emb = load_file(str(emb_path))
        img, txt = emb["image_embeds"], emb["text_embeds"]
        if len(img) != len(ds) or len(txt) != len(ds.caption_ids):
            raise DataError(f"{emb_path} holds {len(img)}×{len(txt)} image×caption rows, but the {cfg.data.test_split} "
                            f"split of {cfg.data.path} has {len(ds)}×{len(ds.caption_ids)}")
        metrics = flickr8k_human_metrics(img, txt, ds, ann)
        out = {k: float(metrics[k]) for k in HUMAN_KEYS}
        atomic_write_json(cached, out)
        return out

    def _annotations(self, ds: Dataset, data_path: Any) -> Path | None:
        """The folder of the Flickr8k judgments beside ``ds``'s images, or None (one notice per runner)."""
        from itrkit.eval.flickr8k_human import CROWDFLOWER_FILE, EXPERT_FILE, find_annotations_dir

        ann = find_annotations_dir(ds.image_paths)
        if ann is None and not self._human_noted:
            where = Path(ds.image_paths[0]).parent if len(ds) else data_path
            print(f"note: no {EXPERT_FILE} and {CROWDFLOWER_FILE} beside the test images ({where}): the Flickr8k "
                  "human-judgment metrics are skipped", file=sys.stderr)
            self._human_noted = True
        return ann

    def fusion_human(self, run_dir: Path, members: list[Path], dataset_dir: Path) -> dict[str, float]:
        """:data:`HUMAN_KEYS` of a fusion run (``members == [run_dir]``) or of an ensemble of runs
        (their mean score matrix; a re-ranker: its final rankings and pair scores), on the test
        split; cached as ``run_dir/human.json``. Empty when the annotation files are absent."""
        from itrkit.eval.fusion import fusion_human_metrics

        cached = run_dir / "human.json"
        if cached.is_file():
            return json.loads(cached.read_text())
        ann = self._annotations(Dataset.load(dataset_dir).split("test"), dataset_dir)
        if ann is None:
            return {}
        metrics = fusion_human_metrics(members, progress=self.progress, device=self.device, annotations_dir=ann)
        out = {k: float(metrics[k]) for k in HUMAN_KEYS}
        atomic_write_json(cached, out)
        return out

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
        """Mean ± std (ddof 1) of the runs' test RSUM (and of the human-judgment metrics, when every
        run has them); the runs keep their seeds (paired Δ in tables)."""
        out: dict[str, Any] = {}
        for key in ("rsum", *HUMAN_KEYS):
            if not runs or not all(key in r for r in runs):
                continue
            v = np.array([r[key] for r in runs], dtype=np.float64)
            out[f"{key}_mean"] = float(v.mean())
            out[f"{key}_std"] = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        return {**out, "chosen": chosen, "runs": runs}

    def write(self, results: dict[str, Any], plot: bool = True) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "results.json", results)
        old = self.out / "timings.json"  # times of what this call only reused stay as first measured
        atomic_write_json(old, {**(json.loads(old.read_text()) if old.is_file() else {}), **self.timings})
        atomic_write_text(self.out / "results.md", results_table(results))
        if plot:
            import importlib.util

            if importlib.util.find_spec("matplotlib") is not None:
                plot_results(results, self.out / "results.png")
            else:
                print("results.png skipped: matplotlib is missing (pip install 'itrkit[eval]')", file=sys.stderr)
        print(results_table(results))


def paired_difference(a: list[dict[str, Any]], b: list[dict[str, Any]], key: str = "rsum") -> dict[str, Any] | None:
    """``a − b`` of ``key`` over the seeds both lists of runs have (runs matched by ``seed``): mean,
    std (ddof 1), wins, losses, seeds; None when no seed has the key in both."""
    bs = {x["seed"]: x for x in b if key in x}
    seeds = sorted(x["seed"] for x in a if key in x and x["seed"] in bs)
    if not seeds:
        return None
    av = {x["seed"]: x for x in a}
    d = np.array([float(av[s][key]) - float(bs[s][key]) for s in seeds], dtype=np.float64)
    return {"mean": float(d.mean()), "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
            "wins": int((d > 0).sum()), "losses": int((d < 0).sum()), "seeds": seeds}


def _mean_std(runs: list[dict[str, Any]], key: str) -> str:
    if not runs or not all(key in x for x in runs):
        return ""
    v = np.array([x[key] for x in runs], dtype=np.float64)
    return f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0:.1f}"


def results_table(results: dict[str, Any]) -> str:
    """The Markdown table: R@K means, RSUM mean ± std, the human-judgment columns (when some
    method has them), paired Δ RSUM vs infonce with wins/losses, and the regime of the tuned runs."""
    keys = ["i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10"]
    extra = [(k, h) for k, h in TABLE_EXTRA if any(_mean_std(r["runs"], k) for r in results.values())]
    lines = ["| method | " + " | ".join(keys) + " | RSUM (mean ± std) | "
             + "".join(f"{h} (mean ± std) | " for _, h in extra) + "Δ RSUM vs infonce (paired, wins/losses) | n |",
             "|---" * (len(keys) + 4 + len(extra)) + "|"]
    base = results.get("infonce")
    for name, r in results.items():
        runs = r["runs"]
        cells = [f"{np.mean([x[k] for x in runs]):.1f}" for k in keys]
        p = paired_difference(runs, base["runs"]) if base and name != "infonce" else None
        delta = f"{p['mean']:+.1f} ± {p['std']:.1f} ({p['wins']}/{p['losses']})" if p else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['rsum_mean']:.1f} ± {r['rsum_std']:.1f} | "
                     + "".join(f"{_mean_std(runs, k)} | " for k, _ in extra) + f"{delta} | {len(runs)} |")
    regimes = {(json.dumps(r.get("finetune")), json.dumps(r.get("overrides") or [])) for r in results.values()
               if "finetune" in r}
    for ft, ov in sorted(regimes):
        ft_d, ov_l = json.loads(ft), json.loads(ov)
        ft_s = ", ".join(f"{k}={v}" for k, v in ft_d.items()) if ft_d else "none (heads on frozen tower features)"
        lines.append(f"\nTuned runs: fine-tuning {ft_s}" + (f"; --set {' '.join(ov_l)}" if ov_l else "") + ".")
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


