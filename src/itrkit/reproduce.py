"""``itrkit reproduce flickr8k``: the SPEC §5 protocol on real photos, every method tuned alike.

Official Flickr8k split: train on the 6,000 training images, select on the 1,000 dev images (the
epoch inside a run and the hyper-parameters across runs), report on the 1,000 test images.
Frozen EfficientNet-Lite0 + all-MiniLM-L6-v2 features are cached once and shared by every run;
teachers (EfficientNet-Lite2 + all-mpnet-base-v2 by default) are extracted once into stores.

Fairness rules built in:
- every tuned method gets the same number of dev runs (``len(grid)``), the baseline's temperature
  and learning rate included; ablations (``csa``, ``usa``) and the control take CUSA's choice;
- seeds are paired: run ``s`` of every method starts from the same head initialisation and sees
  the same batch order;
- a control (``cusa-shuffled``) keeps CUSA's chosen settings but permutes the teacher rows among
  training items, so soft labels keep their shape and lose the teacher's knowledge.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from itrkit.config import load_config, to_dict
from itrkit.data.records import Dataset
from itrkit.errors import ConfigError
from itrkit.train.config import TrainConfig
from itrkit.utils.io import atomic_write_json, atomic_write_text

# Architecture shared by every method: a trainable residual trunk per modality feeds both the
# cross head and the USA head (FINDINGS F1: otherwise USA cannot touch retrieval).
BASE = [
    "model.image_tower=efficientnet-lite0", "model.text_tower=minilm", "model.cached_features=true",
    "model.trunk=mlp", "model.trunk_hidden=1024", "model.usa_heads=true", "model.embed_dim=256",
    "batch_size=128", "stages.0.lr=0.001", "stages.0.weight_decay=0.01", "log_every=100",
]


@dataclass
class Method:
    name: str
    overrides: list[str]
    grid: list[list[str]] = field(default_factory=list)  # dev-tuned alternatives (same count for all)
    inherits: str = ""  # take the chosen base settings of this method first
    copy_choice_of: str = ""  # a control or ablation: reuse another method's chosen grid point, no tuning
    after: list[str] = field(default_factory=list)  # applied after the chosen grid point (ablations)
    teachers: bool = False
    description: str = ""


METHODS: dict[str, Method] = {m.name: m for m in [
    Method("infonce", ["loss.contrastive=1"], [
        ["loss.tau=0.05", "loss.tau_learnable=true"], ["loss.tau=0.05", "loss.tau_learnable=false"],
        ["loss.tau=0.1", "loss.tau_learnable=false"], ["loss.tau=0.1", "loss.tau_learnable=false", "stages.0.lr=0.0003"],
    ], description="InfoNCE, temperature and lr tuned on dev"),
    # Ablations: CUSA's chosen setting with one term switched off (the paper's Table 5 rows).
    Method("csa", ["loss.contrastive=1"], copy_choice_of="cusa", after=["loss.usa=0"], inherits="infonce",
           teachers=True, description="ablation: CUSA's setting, USA off (InfoNCE + α·CSA)"),
    Method("usa", ["loss.contrastive=1"], copy_choice_of="cusa", after=["loss.csa=0"], inherits="infonce",
           teachers=True, description="ablation: CUSA's setting, CSA off (InfoNCE + β·USA)"),
    Method("cusa", ["loss.contrastive=1"], [
        ["loss.csa=1", "loss.usa=1", "loss.tau_teacher=0.1"], ["loss.csa=3", "loss.usa=3", "loss.tau_teacher=0.1"],
        ["loss.csa=1", "loss.usa=3", "loss.tau_teacher=0.05"], ["loss.csa=3", "loss.usa=1", "loss.tau_teacher=0.05"],
    ], inherits="infonce", teachers=True, description="InfoNCE + α·CSA + β·USA"),
    Method("cusa-shuffled", ["loss.contrastive=1", "teacher.shuffle=true"], copy_choice_of="cusa", inherits="infonce",
           teachers=True, description="control: CUSA with teacher rows permuted"),
    Method("vse++", ["loss.contrastive=0", "loss.triplet=1"], [
        ["loss.margin=0.2"], ["loss.margin=0.1"], ["loss.margin=0.2", "stages.0.lr=0.0003"], ["loss.margin=0.05"],
    ], description="VSE++ hardest-negative triplet"),
    Method("icone-stage1", ["loss.contrastive=0", "loss.instance=1"], [
        ["stages.0.lr=0.001"], ["stages.0.lr=0.003"], ["stages.0.lr=0.0003"], ["stages.0.lr=0.001", "stages.0.weight_decay=0.1"],
    ], description="IConE stage I: instance loss only (towers frozen)"),
    Method("icone", ["loss.contrastive=0", "loss.instance=1", "stages.0.name=stage1",
                     "stages.1.name=stage2", "stages.1.loss={contrastive: 1.0, instance: 1.0}",
                     "stages.1.lr=0.0003", "loss.tau=0.05", "loss.tau_learnable=false"], [
        ["stages.1.lr=0.0003"], ["stages.1.lr=0.001"], ["stages.1.loss={contrastive: 1.0, instance: 0.1}"],
        ["stages.1.lr=0.001", "loss.tau=0.1"],
    ], description="IConE: stage I instance, stage II instance + InfoNCE"),
    # IConE + CUSA is not tuned again: IConE's dev choice plus CUSA's chosen weights (α=β=1,
    # τ_teacher=0.1 on this data) added to stage II, so the row isolates what CUSA adds to IConE.
    Method("icone+cusa", ["loss.contrastive=0", "loss.instance=1", "stages.0.name=stage1",
                          "stages.1.name=stage2", "stages.1.loss={contrastive: 1.0, instance: 1.0}",
                          "stages.1.lr=0.0003", "loss.tau=0.05", "loss.tau_learnable=false"],
           copy_choice_of="icone", after=["stages.1.loss.csa=1.0", "stages.1.loss.usa=1.0", "loss.tau_teacher=0.1"],
           teachers=True, description="IConE's chosen setting + CUSA terms (α=β=1, τ_t=0.1) in stage II"),
]}
DEFAULT_METHODS = ["infonce", "csa", "usa", "cusa", "cusa-shuffled"]


def _epochs(method: Method, epochs: int) -> list[str]:
    if any(o.startswith("stages.1.") for o in method.overrides):
        return [f"stages.0.epochs={max(1, epochs // 2)}", f"stages.1.epochs={max(1, epochs - epochs // 2)}"]
    return [f"stages.0.epochs={epochs}"]


class Reproduction:
    def __init__(self, data: Path, out: Path, methods: list[str], seeds: int, epochs: int, cache: str | None,
                 image_teacher: str, text_teacher: str, max_train_images: int = 0, tune: bool = True,
                 fixed: dict[str, int] | None = None, fusion_epochs: int | None = None) -> None:
        from itrkit.reproduce_fusion import METHODS as FUSION_METHODS

        unknown = [m for m in [*methods, *(fixed or {})] if m not in METHODS and m not in FUSION_METHODS]
        if unknown or any(m in FUSION_METHODS for m in fixed or {}):
            raise ConfigError(f"unknown method(s) {unknown or list(fixed or {})} (known: {', '.join(METHODS)}; "
                              f"fusion, untuned: {', '.join(FUSION_METHODS)})")
        self.fusion = [m for m in methods if m in FUSION_METHODS]
        methods = [m for m in methods if m not in FUSION_METHODS]
        self.fusion_epochs = fusion_epochs
        for name, gi in (fixed or {}).items():
            if not 0 <= gi < len(METHODS[name].grid):
                raise ConfigError(f"--choice {name}={gi}: {name} has grid points 0..{len(METHODS[name].grid) - 1}")
        self.fixed = dict(fixed or {})  # method → grid index chosen earlier on dev (no tuning again)
        self.out = out
        self.methods = methods
        self.seeds = seeds
        self.epochs = epochs
        self.cache = cache or ""
        self.tune = tune
        self.max_train = max_train_images
        self.image_teacher, self.text_teacher = image_teacher, text_teacher
        self.dataset_dir = self._prepare(data)
        self.choices: dict[str, list[str]] = {}
        self.timings: dict[str, float] = {}

    def _prepare(self, data: Path) -> Path:
        if (data / "dataset.json").is_file():
            return data
        from itrkit.data.prepare import prepare_dataset

        target = self.out / "data"
        if not (target / "dataset.json").is_file():
            print(f"preparing Flickr8k from {data} → {target}", file=sys.stderr)
            prepare_dataset("flickr8k", data, target, check_images=False)
        return target

    def _teachers(self) -> list[str]:
        from itrkit.teachers.extract import teach

        tdir = self.out / "teachers"
        if not ((tdir / "image.store").exists() and (tdir / "text.store").exists()):
            t0 = time.time()
            ds = Dataset.load(self.dataset_dir).split("train").subset(self.max_train or None)
            teach(ds, self.image_teacher, self.text_teacher, tdir)
            self.timings["teachers_s"] = round(time.time() - t0, 1)
        return [f"teacher.image_store={tdir / 'image.store'}", f"teacher.text_store={tdir / 'text.store'}"]

    def config(self, method: Method, extra: list[str], seed: int, run_dir: Path) -> TrainConfig:
        ov = BASE + [f"data.path={self.dataset_dir}", f"seed={seed}", f"out={run_dir}"] + _epochs(method, self.epochs)
        if self.cache:
            ov.append(f"cache_dir={self.cache}")
        if self.max_train:
            ov.append(f"data.max_train_images={self.max_train}")
        if method.teachers:
            ov += self._teachers()
        if method.inherits:
            ov += self.choices.get(method.inherits, [])
        ov += method.overrides + extra + method.after
        return load_config(TrainConfig, None, overrides=ov)

    def _run(self, cfg: TrainConfig) -> dict[str, Any]:
        from itrkit.train.trainer import train

        run_dir = Path(cfg.out)
        if (run_dir / "metrics.json").is_file():  # finished earlier: reuse (the command is resumable)
            return json.loads((run_dir / "metrics.json").read_text())
        return train(cfg, resume=(run_dir / "config.yaml").is_file(), progress=False)

    def tune_method(self, method: Method) -> list[str]:
        if method.copy_choice_of:
            return self.choices[method.copy_choice_of]
        if method.name in self.fixed:
            return method.grid[self.fixed[method.name]]
        if not self.tune or len(method.grid) <= 1:
            return method.grid[0] if method.grid else []
        scores = []
        for gi, extra in enumerate(method.grid):
            m = self._run(self.config(method, extra, 0, self.out / "tune" / method.name / f"g{gi}"))
            scores.append(m["val"]["rsum"])
            print(f"  tune {method.name} g{gi} {extra}: dev rsum {m['val']['rsum']:.2f}", file=sys.stderr)
        best = int(np.argmax(scores))
        return method.grid[best]

    def run(self) -> dict[str, Any]:
        order = sorted(self.methods, key=lambda m: (METHODS[m].inherits != "", METHODS[m].copy_choice_of != ""))
        for dep in {METHODS[m].inherits for m in order} | {METHODS[m].copy_choice_of for m in order}:
            if dep and dep not in order:
                order.insert(0, dep)  # a method needs its base's choice; tune the base too
        results: dict[str, Any] = {}
        for name in order:
            method = METHODS[name]
            t0 = time.time()
            print(f"[{name}] {method.description}", file=sys.stderr)
            self.choices[name] = self.tune_method(method)
            if name not in self.methods:  # a dependency: only its choice is needed, not its seed runs
                continue
            runs = []
            for s in range(self.seeds):
                m = self._run(self.config(method, self.choices[name], s, self.out / "runs" / name / f"seed{s}"))
                runs.append({"seed": s, **m["test"], "val_rsum": m["val"]["rsum"], "best_epoch": m["best"]["epoch"]})
                print(f"  {name} seed {s}: test rsum {m['test']['rsum']:.2f}", file=sys.stderr)
            rs = np.array([r["rsum"] for r in runs])
            chosen = (self.choices.get(method.inherits, []) if method.inherits else []) + self.choices[name] + method.after
            results[name] = {"rsum_mean": float(rs.mean()), "rsum_std": float(rs.std(ddof=1)) if len(rs) > 1 else 0.0,
                             "chosen": chosen, "runs": runs}
            self.timings[name] = round(time.time() - t0, 1)
        for name in self.fusion:
            t0 = time.time()
            results.update(self.run_fusion(name))
            self.timings[name] = round(time.time() - t0, 1)
        self._write(results)
        return results

    def run_fusion(self, name: str) -> dict[str, Any]:
        """A fusion family (:mod:`itrkit.reproduce_fusion`): its recipe as bundled, paired seeds."""
        from itrkit.reproduce_fusion import ENSEMBLES, TRAINED, run_method

        print(f"[{name}] fusion matcher ({', '.join(ENSEMBLES.get(name, (name,)))})", file=sys.stderr)
        over = [f"data.max_train_images={self.max_train}"] if self.max_train else []
        if self.fusion_epochs:
            over.append(f"stages.0.epochs={self.fusion_epochs}")
        per = run_method(name, self.dataset_dir, self.out, self.seeds, None, self.image_teacher, self.text_teacher,
                         over, progress=False)
        results = {}
        for m, runs in per.items():
            if m != name and m not in self.methods and m not in self.fusion:
                continue  # an ensemble's member that was not asked for itself
            rs = np.array([r["rsum"] for r in runs])
            recipe = TRAINED[m][0] if m in TRAINED else " + ".join(ENSEMBLES[m])
            results[m] = {"rsum_mean": float(rs.mean()), "rsum_std": float(rs.std(ddof=1)) if len(rs) > 1 else 0.0,
                          "chosen": [f"recipe={recipe}", *over],
                          "runs": [{"seed": s, **r} for s, r in enumerate(runs)]}
        return results

    def _write(self, results: dict[str, Any]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.out / "results.json", results)
        atomic_write_json(self.out / "timings.json", self.timings)
        atomic_write_text(self.out / "results.md", results_table(results))
        plot_results(results, self.out / "results.png")
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

    from itrkit.utils.io import atomic_path

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
                       fusion_epochs=a.fusion_epochs)
    rep.run()
    print(f"results: {a.out}/results.json, results.md, results.png")
    return 0


def add_parsers(sub: Any) -> None:
    r = sub.add_parser("reproduce", help="the papers' comparisons on real photos (SPEC §5)")
    r.add_argument("dataset", choices=["flickr8k"])
    r.add_argument("--data", required=True, help="Flickr8k folder (official layout) or a prepared dataset folder")
    r.add_argument("--out", required=True)
    r.add_argument("--methods", default=None,
                   help=f"comma-separated, from: {', '.join(METHODS)}; fusion matchers (bundled recipes, not tuned): "
                        "sgr, saf, sgraf, sgr+cusa, saf+cusa, sgraf+cusa, rerank, rerank+cusa")
    r.add_argument("--fusion-epochs", type=int, default=None, help="epochs of the fusion runs (default: the recipe's)")
    r.add_argument("--seeds", type=int, default=3)
    r.add_argument("--epochs", type=int, default=10)
    r.add_argument("--cache", default=None, help="tower-feature cache folder")
    r.add_argument("--image-teacher", default="efficientnet-lite2")
    r.add_argument("--text-teacher", default="mpnet")
    r.add_argument("--max-train-images", type=int, default=0, help="use only the first N training images")
    r.add_argument("--no-tune", action="store_true", help="take each method's first grid point (quick look)")
    r.add_argument("--choice", action="append", metavar="METHOD=INDEX",
                   help="reuse a dev choice made earlier (the grid index printed by 'tune'), e.g. icone=2; "
                        "repeatable; a method needed only as a base is then not trained at all")
    r.set_defaults(func=_cmd)


__all__ = ["METHODS", "Reproduction", "results_table", "to_dict"]
