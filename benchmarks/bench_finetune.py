"""Training pairs/s of partial fine-tuning on a cached frozen prefix vs live towers, and the cache's RSS.

Settings (EfficientNet-Lite0 at 224 px + all-MiniLM-L6-v2, InfoNCE, linear heads, batch ``--batch``),
each a trainer step through itrkit's own task and training module (make_batch, forward, backward, AdamW):

- ``frozen``: both towers frozen, pooled features cached (the heads-only CPU recipe);
- ``top1`` / ``top2``: ``model.image_trainable=top:N model.text_trainable=top:N`` over the cached
  frozen prefix (``model.cached_features=true``): only the top N blocks of each tower run;
- ``live_top2``: the same trainable blocks with the towers run live (``model.cached_features=false``);
- ``live_all``: fully trainable live towers (what a GPU user runs).

Each setting runs in its own process, one after another (so each reports its own peak RSS); the
caches are built before timing. Then the prefix cache's memory: text prefix caches of ``n`` and
``4n`` captions are read end to end in random batches, and the growth of the process's RSS is
reported for each (rows are read with positioned reads, so it stays flat as the data grows).

    .venv/bin/python benchmarks/bench_finetune.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SETTINGS = {
    "frozen": ["model.cached_features=true"],
    "top1": ["model.cached_features=true", "model.image_trainable=top:1", "model.text_trainable=top:1"],
    "top2": ["model.cached_features=true", "model.image_trainable=top:2", "model.text_trainable=top:2"],
    "live_top2": ["model.cached_features=false", "model.image_trainable=top:2", "model.text_trainable=top:2"],
    "live_all": ["model.cached_features=false", "model.image_trainable=all", "model.text_trainable=all"],
}


def _peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _data(work: Path, n_images: int) -> Path:
    from itrkit.data.synthetic import make_synthetic

    data = work / f"synth{n_images}"
    if not (data / "dataset.json").is_file():
        make_synthetic(data, n_images=n_images, captions_per_image=5, seed=0, size=96, progress=False)
    return data


def run_setting(name: str, data: Path, cache: Path, batch: int, steps: int) -> dict[str, float]:
    """One setting in this process: build the task (caches), warm up, time ``steps`` trainer steps."""
    from itrkit.config import load_config
    from itrkit.data.records import Dataset
    from itrkit.train.config import TrainConfig
    from itrkit.train.tasks import DualEncoderTask
    from itrkit.train.trainer import TrainModule, make_adamw
    from itrkit.utils.device import move_to

    over = [f"data.path={data}", f"batch_size={batch}", f"cache_dir={cache}", "loss.tau=0.05", *SETTINGS[name]]
    torch.manual_seed(0)
    task = DualEncoderTask(load_config(TrainConfig, None, overrides=over), Dataset.load(data))
    task.set_weights(task.cfg.weights(task.cfg.stages[0]))
    module = TrainModule(task, gather=False)
    module.train()
    opt = make_adamw([{"params": [p for p in module.parameters() if p.requires_grad]}], lr=1e-4)  # the trainer's
    batches = task.epoch_batches(0, 0)
    times = []
    for k in range(steps + 2):  # two warm-up steps
        t0 = time.perf_counter()
        out = module(move_to(task.make_batch(batches[k % len(batches)]), torch.device("cpu")))
        loss = sum(v for key, v in out.items() if key.endswith("_loss"))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if k >= 2:
            times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    return {"step_ms": med * 1e3, "pairs_per_s": batch / med, "peak_rss_mb": _peak_rss_mb(), "steps": steps,
            "trainable_params": trainable, "loss": float(loss)}


def rss_growth(data: Path, cache: Path, n: int) -> dict[str, float]:
    """RSS growth while reading a MiniLM top:2 prefix cache of ``n`` captions end to end."""
    from itrkit.data.records import Dataset
    from itrkit.models.prefix import cached_prefix
    from itrkit.models.towers import build_tower

    texts = Dataset.load(data).texts
    texts = [f"{texts[i % len(texts)]} ({i // len(texts)})" for i in range(n)]  # distinct rows
    tower = build_tower("minilm", "text")
    states = cached_prefix(tower, tower.cut_for("top:2"), texts, texts, cache, batch_size=128)
    before = _rss_mb()
    order = np.random.default_rng(0).permutation(n)
    for s in range(0, n, 128):
        states.batch(order[s:s + 128])
    on_disk = sum(f.stat().st_size for f in states.folder.glob("*.npy")) / 2**20
    return {"n": n, "cache_mb": on_disk, "rss_growth_mb": _rss_mb() - before}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer steps and images (a smoke run)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=0, help="timed steps of the cached settings (default 20, quick 6)")
    ap.add_argument("--live-steps", type=int, default=0, help="timed steps of the live settings (default 5, quick 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default="")
    ap.add_argument("--json", default="")
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: run one setting, print JSON
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    steps = a.steps or (6 if a.quick else 20)
    live_steps = a.live_steps or (2 if a.quick else 5)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(a.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        data = _data(work, 80 if a.quick else 200)
        cache = work / "cache"
        if a.one:
            n = live_steps if a.one.startswith("live") else steps
            print("RESULT " + json.dumps(run_setting(a.one, data, cache, a.batch, n)))
            return
        rows: dict[str, dict[str, float]] = {}
        for name in SETTINGS:
            cmd = [sys.executable, __file__, "--one", name, "--workdir", str(work), "--batch", str(a.batch),
                   "--threads", str(a.threads), "--steps", str(steps), "--live-steps", str(live_steps)]
            if a.quick:
                cmd.append("--quick")
            res = subprocess.run(cmd, capture_output=True, text=True, check=False)
            line = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
            if res.returncode or not line:
                raise SystemExit(f"setting {name} failed:\n{res.stderr[-2000:]}")
            rows[name] = json.loads(line[-1][7:])
            r = rows[name]
            print(f"{name:10s} {r['pairs_per_s']:8.1f} pairs/s  step {r['step_ms']:8.1f} ms  "
                  f"peak RSS {r['peak_rss_mb']:7.0f} MB  trainable {r['trainable_params'] / 1e6:6.2f} M")
        live = rows["live_all"]["pairs_per_s"]
        ratios = {f"{k}_vs_live_all": rows[k]["pairs_per_s"] / live for k in rows if k != "live_all"}
        ratios["top2_vs_live_top2"] = rows["top2"]["pairs_per_s"] / rows["live_top2"]["pairs_per_s"]
        for k, v in ratios.items():
            print(f"  {k}: {v:.1f}x")
        n = 1000 if a.quick else 10000
        growth = [rss_growth(data, cache, m) for m in (n, 4 * n)]
        for g in growth:
            print(f"  text prefix cache of {g['n']} captions ({g['cache_mb']:.0f} MB on disk): RSS growth while "
                  f"reading it all {g['rss_growth_mb']:.1f} MB")
        out = {"batch": a.batch, "threads": a.threads, "settings": rows, **ratios, "rss": growth,
               "quick": a.quick}
        if a.json:
            from itrkit.utils.io import atomic_write_text

            atomic_write_text(Path(a.json), json.dumps(out, indent=2) + "\n")
            print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
