"""``itrkit reproduce flickr8k``: the papers' comparisons on real photos (docs/method.md §5).

Official Flickr8k split: train on the 6,000 training images, select on the 1,000 dev images (the
epoch inside a run and the hyper-parameters across runs), report on the 1,000 test images.
Frozen EfficientNet-Lite0 + all-MiniLM-L6-v2 features are cached once and shared by every run;
teachers (EfficientNet-Lite2 + all-mpnet-base-v2 by default) are extracted once into stores.
Methods come from :data:`itrkit.experiments.methods.METHODS` (tuned, recipe, ensemble).

Regime of the tuned runs: ``finetune`` (``top:N`` or ``image=top:N,text=top:M``) trains
the top blocks of the towers over cached frozen prefixes (:func:`~itrkit.experiments.methods.finetune_overrides`);
``overrides`` (``--set``) apply to every tuned run after the method's own. Both are recorded with
each tuned method's results and in ``out/study.json`` (a later call into the same ``out`` must
match, so no finished run of another regime is reused). Every dual-encoder seed run also gets the
Flickr8k human-judgment metrics (docs/method.md §4.5) when the annotation files are beside the test images.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from itrkit.config import save_config, to_dict
from itrkit.errors import ConfigError
from itrkit.experiments.methods import (
    BASE,
    FUSION_METHODS,
    METHODS,
    Method,
    epochs_overrides,
    expand_stages,
    finetune_overrides,
    parse_finetune,
)
from itrkit.experiments.runner import Runner
from itrkit.train.config import TrainConfig, load_train_config
from itrkit.utils.io import atomic_write_json


class Reproduction:
    def __init__(self, data: Path, out: Path, methods: list[str], seeds: int, epochs: int, cache: str | None,
                 image_teacher: str, text_teacher: str, max_train_images: int = 0, tune: bool = True,
                 fixed: dict[str, int] | None = None, fusion_epochs: int | None = None,
                 fusion_overrides: list[str] | None = None, device: str = "auto",
                 finetune: str | dict[str, str] | None = None, overrides: list[str] | None = None,
                 dev_budget: int = 0, progress: bool = False) -> None:
        unknown = [m for m in [*methods, *(fixed or {})] if m not in METHODS]
        if unknown or any(METHODS[m].kind != "tuned" for m in fixed or {}):
            raise ConfigError(f"unknown method(s) {unknown or list(fixed or {})} (known: "
                              f"{', '.join(m for m in METHODS if m not in FUSION_METHODS)}; "
                              f"fusion, untuned: {', '.join(FUSION_METHODS)})")
        if seeds < 1 or epochs < 1 or (fusion_epochs is not None and fusion_epochs < 1):
            raise ConfigError("seeds and epochs must be >= 1")
        self.fusion = [m for m in methods if m in FUSION_METHODS]
        methods = [m for m in methods if m not in FUSION_METHODS]
        for name in self.fusion:  # a re-ranker's first stage: that method's seed runs are needed too
            dep = METHODS[name].first_stage
            if dep and dep not in methods:
                print(f"{name} re-ranks {dep}'s runs: {dep} is run (or reused) too", file=sys.stderr)
                methods.append(dep)
        self.fusion_epochs = fusion_epochs
        self.fusion_extra = list(fusion_overrides or [])  # --set items for every fusion run
        for name, gi in (fixed or {}).items():
            if not 0 <= gi < len(METHODS[name].grid):
                raise ConfigError(f"--choice {name}={gi}: {name} has grid points 0..{len(METHODS[name].grid) - 1}")
        self.fixed = dict(fixed or {})  # method → grid index chosen earlier on dev (no tuning again)
        # Dev runs per tuned method: the first ``dev_budget`` points of each grid (0: the whole grid),
        # the same number for every method.
        sizes = [len(m.grid) for m in METHODS.values() if m.grid]
        if not 0 <= dev_budget <= min(sizes):
            raise ConfigError(f"--dev-budget {dev_budget}: use 1..{min(sizes)} grid points per tuned method "
                              "(0: every point)")
        self.dev_budget = dev_budget or max(sizes)
        self.finetune = (parse_finetune(finetune) if isinstance(finetune, str) else dict(finetune)) if finetune \
            else None
        if self.finetune and all(m == "frozen" for m in self.finetune.values()):
            self.finetune = None  # both frozen: the default regime
        self.overrides = list(overrides or [])  # --set items for every tuned run, after the method's own
        for name in methods:  # every tuned method's config is checked (keys, values) before anything runs
            if METHODS[name].kind == "tuned":
                load_train_config(None, [*BASE, *METHODS[name].overrides, *finetune_overrides(METHODS[name], self.finetune),
                                         *expand_stages(METHODS[name], self.overrides)])
        self.runner = Runner(out, progress=progress, device=device)
        self.out = Path(out)
        self.methods = methods
        self.seeds = seeds
        self.epochs = epochs
        self.cache = cache or ""
        self.tune = tune
        self.max_train = max_train_images
        self.image_teacher, self.text_teacher = image_teacher, text_teacher
        self.dataset_dir = self.runner.prepare(Path(data))
        self.choices: dict[str, list[str]] = {}

    @property
    def timings(self) -> dict[str, float]:
        return self.runner.timings

    def _teachers(self, max_train: int | None = None) -> list[str]:
        return self.runner.teachers(self.dataset_dir, self.image_teacher, self.text_teacher,
                                    self.max_train if max_train is None else max_train)

    def config(self, method: Method, extra: list[str], seed: int, run_dir: Path) -> TrainConfig:
        ov = BASE + [f"data.path={self.dataset_dir}", f"seed={seed}", f"out={run_dir}"] + epochs_overrides(method, self.epochs)
        if self.cache:
            ov.append(f"cache_dir={self.cache}")
        if self.max_train:
            ov.append(f"data.max_train_images={self.max_train}")
        if method.teachers:
            ov += self._teachers()
        if method.inherits:
            ov += self.choices.get(method.inherits, [])
        ov += (method.overrides + extra + method.after + finetune_overrides(method, self.finetune)
               + expand_stages(method, self.overrides))
        return load_train_config(None, ov)

    def _check_study(self) -> None:
        """``out/study.json`` records the tuned runs' regime; another regime in the same ``out``
        would reuse finished runs of the first, so it is refused (an ``out`` from before this file
        existed counts as the frozen regime)."""
        path = self.out / "study.json"
        now = {"finetune": self.finetune, "overrides": self.overrides}
        tuned_dirs = [self.out / d / n for d in ("runs", "tune") for n, m in METHODS.items() if m.kind == "tuned"]
        if path.is_file():
            old = json.loads(path.read_text())
        elif any(d.exists() for d in tuned_dirs):
            old = {"finetune": None, "overrides": []}
        else:
            old = now
        if old != now:
            raise ConfigError(f"{self.out} holds runs of another regime (--finetune {old.get('finetune')}, --set "
                              f"{old.get('overrides')}); use another --out for --finetune {self.finetune}, "
                              f"--set {self.overrides}")
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, now)

    def tune_method(self, method: Method) -> list[str]:
        if method.copy_choice_of:
            return self.choices[method.copy_choice_of]
        if method.name in self.fixed:
            return method.grid[self.fixed[method.name]]
        if not self.tune or len(method.grid) <= 1:
            return method.grid[0] if method.grid else []
        scores = []
        for gi, extra in enumerate(method.grid[:self.dev_budget]):
            m = self.runner.run(self.config(method, extra, 0, self.out / "tune" / method.name / f"g{gi}"))
            scores.append(m["val"]["rsum"])
            print(f"  tune {method.name} g{gi} {extra}: dev rsum {m['val']['rsum']:.2f}", file=sys.stderr)
        return method.grid[int(np.argmax(scores))]

    def dev_runs(self, method: Method) -> int:
        """How many dev runs chose this method's setting (0: copied from another method, fixed by
        ``--choice`` or ``--no-tune``)."""
        if method.copy_choice_of or method.name in self.fixed or not self.tune or len(method.grid) <= 1:
            return 0
        return min(self.dev_budget, len(method.grid))

    def adopt_dev_run(self, method: Method, cfg: TrainConfig) -> bool:
        """Seed 0 of a tuned method is its chosen grid point's dev run: that run's config differs only
        in ``out`` (and the device), so its finished files are hard-linked into ``cfg.out`` instead of
        training the same run again (runs are deterministic on CPU). ``config.yaml`` is written anew
        for the new folder; ``checkpoints/`` stay behind (they name the dev folder, and a finished run
        is never resumed). The folder appears whole or not at all (built beside it, then renamed).
        Returns whether it adopted a run."""
        target = Path(cfg.out)
        extra = self.choices.get(method.name)
        if target.exists() or method.copy_choice_of or extra is None or extra not in method.grid:
            return False
        dev = self.out / "tune" / method.name / f"g{method.grid.index(extra)}"
        if not (dev / "metrics.json").is_file() or not (dev / "config.yaml").is_file():
            return False
        def key(c: TrainConfig) -> dict[str, Any]:
            return {k: v for k, v in to_dict(c).items() if k not in ("out", "device")}

        if key(cfg) != key(load_train_config(dev / "config.yaml")):
            return False
        tmp = target.parent / f".{target.name}.adopt-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)

        def link(src: str, dst: str) -> None:
            try:
                os.link(src, dst)
            except OSError:  # another file system, or links not allowed: a copy
                shutil.copy2(src, dst)

        try:
            shutil.copytree(dev, tmp, copy_function=link,
                            ignore=lambda d, names: [n for n in names if n in ("checkpoints", "config.yaml",
                                                                                 "metrics.json", "human.json")
                                                     or n.startswith(".")] if Path(d) == dev else [])
            save_config(cfg, tmp / "config.yaml")
            link(str(dev / "metrics.json"), str(tmp / "metrics.json"))  # last: it marks the run finished
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        print(f"  {method.name} seed 0 = its dev run {dev} (same config; linked, not trained again)", file=sys.stderr)
        return True

    def run(self) -> dict[str, Any]:
        if self.methods:
            self._check_study()
        order = sorted(self.methods, key=lambda m: (METHODS[m].inherits != "", METHODS[m].copy_choice_of != ""))
        for dep in {METHODS[m].inherits for m in order} | {METHODS[m].copy_choice_of for m in order}:
            if dep and dep not in order:
                order.insert(0, dep)  # a method needs its base's choice; tune the base too
        results: dict[str, Any] = {}
        for name in order:
            method = METHODS[name]
            t0, trained0 = time.time(), self.runner.trained
            print(f"[{name}] {method.description}", file=sys.stderr)
            self.choices[name] = self.tune_method(method)
            if name not in self.methods:  # a dependency: only its choice is needed, not its seed runs
                continue
            runs = []
            for s in range(self.seeds):
                cfg = self.config(method, self.choices[name], s, self.out / "runs" / name / f"seed{s}")
                if s == 0:
                    self.adopt_dev_run(method, cfg)
                m = self.runner.run(cfg)
                human = self.runner.human(cfg)  # test-only: never part of any selection
                runs.append({"seed": s, **m["test"], **human, "val_rsum": m["val"]["rsum"],
                             "best_epoch": m["best"]["epoch"]})
                print(f"  {name} seed {s}: test rsum {m['test']['rsum']:.2f}{_human_note(human)}", file=sys.stderr)
            chosen = (self.choices.get(method.inherits, []) if method.inherits else []) + self.choices[name] + method.after
            results[name] = {**Runner.aggregate(runs, chosen), "finetune": self.finetune,
                             "overrides": list(self.overrides), "dev_runs": self.dev_runs(method)}
            if self.runner.trained > trained0:  # else every run was reused: its earlier timing stands
                self.timings[name] = round(time.time() - t0, 1)
        for name in self.fusion:
            t0, trained0 = time.time(), self.runner.trained
            results.update(self.run_fusion(name))
            if self.runner.trained > trained0:
                self.timings[name] = round(time.time() - t0, 1)
        self.runner.write(results)
        return results

    # --- fusion matchers: bundled recipes and ensembles ---------------------------------------------
    def _fusion_overrides(self) -> list[str]:
        over = [f"data.max_train_images={self.max_train}"] if self.max_train else []
        if self.fusion_epochs:
            over.append(f"stages.0.epochs={self.fusion_epochs}")
        return over

    def fusion_config(self, name: str, seed: int, grid: Path, extra: list[str]) -> TrainConfig:
        from itrkit.train.config import resolve_config

        method = METHODS[name]
        run = self.out / "runs" / name / f"seed{seed}"
        first = [f"model.itc_run={self.out / 'runs' / method.first_stage / f'seed{seed}'}"] if method.first_stage else []
        if self.cache:
            first.append(f"cache_dir={self.cache}")
        ov = [f"data.path={self.dataset_dir}", f"data.grid_store={grid}", f"out={run}", f"seed={seed}", *first,
              *(self._teachers(0) if method.teachers else []), *extra, *self.fusion_extra]
        return load_train_config(resolve_config(method.recipe), ov)

    def run_fusion(self, name: str) -> dict[str, Any]:
        """A fusion method (recipe, or ensemble of recipes) for paired seeds; its members' rows too
        when they were asked for."""
        method = METHODS[name]
        members = list(method.members) if method.kind == "ensemble" else [name]
        print(f"[{name}] fusion matcher ({', '.join(members)})", file=sys.stderr)
        over = self._fusion_overrides()
        grid = self.runner.grid(self.dataset_dir)
        per: dict[str, list[dict[str, Any]]] = {m: [] for m in members}
        for seed in range(self.seeds):
            for m in members:
                cfg = self.fusion_config(m, seed, grid, over)
                metrics = self.runner.run(cfg)
                human = self.runner.fusion_human(Path(cfg.out), [Path(cfg.out)], self.dataset_dir)  # test only
                sel = metrics.get("val") or {}
                per[m].append({"seed": seed, **metrics["test"], **human, "val_rsum": sel.get("rsum"),
                               "best_epoch": metrics["best"]["epoch"]})
                print(f"  {m} seed {seed}: test rsum {metrics['test']['rsum']:.2f}{_human_note(human)}", file=sys.stderr)
            if method.kind == "ensemble":
                run = self.out / "runs" / name / f"seed{seed}"
                parts = [self.out / "runs" / m / f"seed{seed}" for m in members]
                ens = self.runner.ensemble(run, parts)
                human = self.runner.fusion_human(run, parts, self.dataset_dir)
                per.setdefault(name, []).append({"seed": seed, **ens["test"], **human})
                print(f"  {name} seed {seed}: test rsum {ens['test']['rsum']:.2f}{_human_note(human)}", file=sys.stderr)
        results = {}
        for m, runs in per.items():
            if m != name and m not in self.methods and m not in self.fusion:
                continue  # an ensemble's member that was not asked for itself
            recipe = METHODS[m].recipe if METHODS[m].kind == "recipe" else " + ".join(METHODS[m].members)
            results[m] = Runner.aggregate(runs, [f"recipe={recipe}", *over])
        return results


def _human_note(human: dict[str, float]) -> str:
    return f", human t2i mAP@R {human['f8k_human_t2i_map@r']:.2f}" if human else ""


def run_method(name: str, data_dir: str | Path, out_dir: str | Path, seeds: int = 1, epochs: int | None = None,
               image_teacher: str = "efficientnet-lite2", text_teacher: str = "mpnet",
               overrides: list[str] | None = None, progress: bool = False) -> dict[str, list[dict[str, float]]]:
    """One fusion method for seeds ``0 … seeds-1`` → ``{method: [test metrics per seed]}`` (an
    ensemble also returns its members' lists). ``epochs``: None = the recipe's; ``overrides`` are
    ``--set`` items for every trained run."""
    if name not in FUSION_METHODS:
        raise ConfigError(f"unknown fusion method '{name}' (known: {', '.join(FUSION_METHODS)})")
    rep = Reproduction(Path(data_dir), Path(out_dir), [name], seeds, 1, None, image_teacher, text_teacher,
                       fusion_epochs=epochs, fusion_overrides=overrides)
    rep.runner.progress = progress
    rep.fusion = [name, *METHODS[name].members]  # an ensemble's members' rows too
    res = rep.run_fusion(name)
    return {m: [{k: v for k, v in r.items() if k != "seed"} for r in agg["runs"]] for m, agg in res.items()}
