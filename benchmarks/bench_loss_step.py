"""A full CUSA training step vs an InfoNCE step, through itrkit's own task and training module.

Each step is the trainer's loop body: ``task.make_batch`` (tower features or inputs, and for CUSA
the teacher rows from real on-disk stores), ``TrainModule`` forward (model, objective), backward,
the trainer's AdamW (fused where torch has it), temperature clamping. Both methods use the same
model settings (CUSA adds the two USA heads and the teacher stores: 1280-d image, 768-d text,
float16 as ``itrkit teach`` writes them) and the same batches in the same order. Settings:

- ``cached`` (B=128, cached EfficientNet-Lite0 / MiniLM features), two models: ``recipe`` (the
  bundled ``configs/cusa.yaml`` model: residual MLP trunk shared by cross and USA heads, 256-d)
  and ``heads`` (linear heads only, ``configs/infonce.yaml``), each also with ``csa`` (CSA alone,
  no USA heads). ``step_ratio_cached`` is the recipe's CUSA / InfoNCE;
- ``top2`` (``--top2``): ``model.image_trainable=top:2 model.text_trainable=top:2`` over the cached
  frozen prefix (the top blocks dominate), or with ``--top2-live`` the towers run live
  (``model.cached_features=false``), B=``--top2-batch``.

Each variant's matmul FLOPs per step (forward + backward, ``torch.utils.flop_counter``) are
counted too: with heads only, CUSA's two USA heads are as large as the model InfoNCE trains, so
its arithmetic, not its overhead, sets the ratio there (``flop_ratio_*``).

Variants alternate step by step in one process, with the order rotated each round, so load noise
from other jobs hits all alike; ratios are of medians. ``--compare`` adds CUSA as it was
(teacher rows from disk per batch, unfused KL: ``cusa_disk``) and with in-RAM rows but the
unfused KL (``cusa_unfused``) to the recipe setting. ``--profile N`` prints where a CUSA step's
time goes (torch.profiler over N steps) instead. ``--json PATH`` writes the figures
(``step_ratio_cached``, ``step_ratio_cached_heads``, ``step_ratio_cached_heads_csa``,
``flop_ratio_*``, ``step_ratio_top2``, medians in ms).

    .venv/bin/python benchmarks/bench_loss_step.py [--quick] [--top2] [--json PATH] [--profile 50]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from itrkit.config import load_config
from itrkit.data.records import Dataset
from itrkit.data.synthetic import make_synthetic
from itrkit.losses import soft_labels
from itrkit.teachers.store import FeatureStore
from itrkit.train.config import TrainConfig
from itrkit.train.tasks import DualEncoderTask
from itrkit.train.trainer import TrainModule, make_adamw
from itrkit.utils.device import move_to
from itrkit.utils.io import atomic_write_text

# The bundled recipes' models (configs/cusa.yaml: shared residual MLP trunk; configs/infonce.yaml: heads).
RECIPE = ["model.trunk=mlp", "model.trunk_hidden=1024", "model.embed_dim=256", "model.usa_dim=256"]
HEADS = ["model.trunk=none", "model.embed_dim=256", "model.usa_dim=256"]


def _peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def _prepare(work: Path, n_images: int) -> tuple[Path, list[str]]:
    """A synthetic data set and random float16 teacher stores for it (reused when present)."""
    data = work / f"synth{n_images}"
    if not (data / "dataset.json").is_file():
        make_synthetic(data, n_images=n_images, captions_per_image=2, seed=0, size=64, progress=False)
    ds = Dataset.load(data)
    g = np.random.default_rng(0)
    over = []
    for kind, ids, dim in (("image", ds.image_ids, 1280), ("text", ds.caption_ids, 768)):
        path = work / f"{kind}{n_images}.store"
        if not path.is_dir():
            w = FeatureStore.create(path, ids, dim, {"name": f"random-{kind}"}, kind)
            w.write(0, g.standard_normal((len(ids), dim)).astype(np.float32))
            w.close()
        over.append(f"teacher.{kind}_store={path}")
    return data, over


class Case:
    """One method's task, training module and optimizer; ``step()`` = one trainer step."""

    def __init__(self, cusa: bool | str, data: Path, teachers: list[str], batch: int, live: bool | str, work: Path,
                 extra: list[str], fused: bool | None = None, ram_mb: int | None = None) -> None:
        over = [f"data.path={data}", f"batch_size={batch}", f"cache_dir={work / 'cache'}", "loss.tau=0.05",
                "model.trunk=none", *extra]
        if live:  # top:2 trainable: over the cached frozen prefix, or (live == "towers") the live towers
            over += [f"model.cached_features={'false' if live == 'towers' else 'true'}",
                     "model.image_trainable=top:2", "model.text_trainable=top:2"]
        if cusa == "csa":  # CSA alone: no USA heads, no USA term
            over += ["loss.csa=1", "loss.tau_teacher=0.1", *teachers]
        elif cusa:
            over += ["loss.csa=1", "loss.usa=1", "model.usa_heads=true", "loss.tau_teacher=0.1", *teachers]
        cfg = load_config(TrainConfig, None, overrides=over)
        torch.manual_seed(0)
        soft_labels.FUSED_DEFAULT, was = (soft_labels.FUSED_DEFAULT if fused is None else fused), soft_labels.FUSED_DEFAULT
        try:
            self.task = DualEncoderTask(cfg, Dataset.load(data))
        finally:
            soft_labels.FUSED_DEFAULT = was
        if cusa and ram_mb is not None:  # re-attach under another budget (0 = per-batch disk reads)
            td = self.task.train_data
            assert td.teacher_image is not None and td.teacher_text is not None
            td.attach_teachers(td.teacher_image[0], td.teacher_text[0], ram_mb=ram_mb)
        self.task.set_weights(cfg.weights(cfg.stages[0]))
        self.module = TrainModule(self.task, gather=False)
        self.module.train()
        # The trainer's optimizer (fused AdamW where torch has it), one group: both methods alike.
        self.opt = make_adamw([{"params": [p for p in self.module.parameters() if p.requires_grad],
                                "weight_decay": 0.01}], lr=1e-4)
        self.batches = self.task.epoch_batches(0, 0)
        self.k = 0
        self.device = next(self.module.parameters()).device
        self.last: dict[str, float] = {}

    def step(self) -> None:
        idx = self.batches[self.k % len(self.batches)]
        self.k += 1
        batch = move_to(self.task.make_batch(idx), self.device)
        out = self.module(batch)
        losses = {k: v for k, v in out.items() if k.endswith("_loss")}
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite loss {float(loss)}")
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.task.clamp_temperatures_()
        self.last = {k: float(v.detach()) for k, v in losses.items()}


def _time(cases: dict[str, Callable[[], None]], steps: int) -> dict[str, list[float]]:
    for fn in cases.values():  # warm-up: allocator, lazy init, page cache
        fn()
        fn()
    names = list(cases)
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(steps):
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            cases[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def _matmul_flops(case: Case) -> int:
    """Matmul FLOPs of one step (forward + backward; the optimizer's elementwise work is not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        case.step()
    return int(fc.get_total_flops())


def _report(label: str, times: dict[str, list[float]], cases: dict[str, Case]) -> dict[str, float]:
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for k, v in times.items():
        q = statistics.quantiles(v, n=10) if len(v) > 2 else [min(v), max(v)]
        print(f"  {label} {k:8s}: median {med[k]:8.2f} ms (p10 {q[0] * 1e3:.2f}, p90 {q[-1] * 1e3:.2f}) "
              f"last losses {cases[k].last}")
    out = {"ratio": med["cusa"] / med["infonce"], "infonce_ms": med["infonce"], "cusa_ms": med["cusa"]}
    for k in med:
        if k != "infonce":
            out[f"ratio_{k}"] = med[k] / med["infonce"]
            out[f"{k}_ms"] = med[k]
            print(f"  {label}: {k} / infonce full step {med[k] / med['infonce']:.3f}x")
    return out


def _profile(case: Case, steps: int) -> None:
    from torch.profiler import ProfilerActivity, profile, record_function

    for _ in range(3):
        case.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            idx = case.batches[case.k % len(case.batches)]
            case.k += 1
            with record_function("## make_batch (teacher rows)"):
                batch = move_to(case.task.make_batch(idx), case.device)
            with record_function("## forward + loss"):
                out = case.module(batch)
                loss = sum(v for k, v in out.items() if k.endswith("_loss"))
            with record_function("## backward"):
                case.opt.zero_grad(set_to_none=True)
                loss.backward()
            with record_function("## optimizer + clamp"):
                case.opt.step()
                case.task.clamp_temperatures_()
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=40))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    ap.add_argument("--steps", type=int, default=0, help="timed steps per method, cached (default 200, quick 40)")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--top2", action="store_true", help="also time live towers with top:2 trainable")
    ap.add_argument("--top2-live", action="store_true", help="--top2 with the towers run live "
                    "(model.cached_features=false) instead of over the cached frozen prefix")
    ap.add_argument("--top2-batch", type=int, default=32)
    ap.add_argument("--top2-steps", type=int, default=0, help="default 20, quick 6")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default); 1 on a shared machine")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="profile N CUSA cached steps and exit")
    ap.add_argument("--compare", action="store_true", help="also time CUSA as before (teacher rows from disk, "
                    "unfused KL) and with in-RAM rows but the unfused KL")
    ap.add_argument("--set", action="append", default=[], help="extra config override for both methods")
    ap.add_argument("--workdir", default="", help="where the synthetic data, stores and feature cache live "
                    "(default: a temporary folder)")
    ap.add_argument("--json", default="", help="write the figures as JSON here")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    steps = a.steps or (40 if a.quick else 200)
    top2_steps = a.top2_steps or (6 if a.quick else 20)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        # Enough pairs for a few distinct batches of the train split.
        data, teachers = _prepare(work, max(400, 3 * a.batch))
        def cases(batch: int, live: bool | str, extra: list[str], compare: bool = False) -> dict[str, Case]:
            c = {"infonce": Case(False, data, teachers, batch, live, work, extra),
                 "cusa": Case(True, data, teachers, batch, live, work, extra)}
            if compare:
                # The step as it was (teacher rows read from disk per batch, unfused KL), and with
                # only the in-RAM rows (unfused KL): "cusa" is both changes.
                c["cusa_disk"] = Case(True, data, teachers, batch, live, work, extra, fused=False, ram_mb=0)
                c["cusa_unfused"] = Case(True, data, teachers, batch, live, work, extra, fused=False)
            return c

        if a.profile:
            _profile(Case(True, data, teachers, a.batch, False, work, [*RECIPE, *a.set]), a.profile)
            return
        print(f"B={a.batch}, {steps} timed steps each (cached), torch threads={torch.get_num_threads()}")
        res: dict[str, Any] = {"batch": a.batch, "steps": steps, "threads": torch.get_num_threads(),
                               "overrides": a.set}
        for setting, model in (("recipe", RECIPE), ("heads", HEADS)):
            extra = [*model, *a.set]
            cached = cases(a.batch, False, extra, compare=a.compare and setting == "recipe")
            cached["csa"] = Case("csa", data, teachers, a.batch, False, work, extra)
            r = _report(f"cached/{setting}", _time({k: c.step for k, c in cached.items()}, steps), cached)
            flops = {k: _matmul_flops(c) for k, c in cached.items()}
            fr = {k: v / flops["infonce"] for k, v in flops.items()}
            print(f"  cached/{setting}: matmul GFLOP per step " +
                  ", ".join(f"{k} {v / 1e9:.3f} ({fr[k]:.2f}x)" for k, v in flops.items()))
            key = "cached" if setting == "recipe" else "cached_heads"
            res.update({f"step_ratio_{key}": r["ratio"], f"step_ratio_{key}_csa": r["ratio_csa"],
                        f"flop_ratio_{key}": fr["cusa"], f"flop_ratio_{key}_csa": fr["csa"],
                        key: {**{k: round(v, 4) for k, v in r.items()}, "gflop": {k: round(v / 1e9, 4) for k, v in flops.items()},
                              "model": model}})
        if a.top2:
            live = cases(a.top2_batch, "towers" if a.top2_live else True, a.set)
            where = "live towers" if a.top2_live else "the cached frozen prefix (only the top blocks run)"
            print(f"top:2 on {where}, B={a.top2_batch}, {top2_steps} timed steps each")
            r = _report("top2", _time({k: c.step for k, c in live.items()}, top2_steps), live)
            res.update(step_ratio_top2=r["ratio"], top2_batch=a.top2_batch, top2_steps=top2_steps, top2_live=a.top2_live,
                       top2={k: round(v, 4) for k, v in r.items()})
        res["peak_rss_mb"] = round(_peak_rss_mb(), 1)
        print(f"  peak RSS {res['peak_rss_mb']:.0f} MB")
        if a.json:
            atomic_write_text(a.json, json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
