"""Training throughput in pairs/s: cached features vs live towers, CUSA vs InfoNCE, bf16 vs fp32.

Every configuration runs itrkit's own training module (``TrainModule``: DualEncoder + Objective)
for a full step (forward, loss, backward, AdamW) on fixed batches, with the real towers
EfficientNet-Lite0 (224 px) and all-MiniLM-L6-v2, trunk ``mlp`` as in the Flickr8k recipes:

- ``cached``: heads on cached tower features (B=128), the CPU recipe; InfoNCE and CUSA (+USA
  heads, teacher features 1280-d / 768-d as read from a store);
- ``live``: the towers run every step (B=32): frozen (forward only), last block of each tower
  trainable, and the same in bf16 autocast;
- ``data``: preparing a live batch (JPEG decode + resize + tokenise) without and with the
  decoded-image cache, to see whether loading keeps up with the step.

Configurations alternate round by round in one process so they share the machine's state; each
figure is the median over rounds, ratios are of medians. Peak RSS at the end.

    .venv/bin/python benchmarks/bench_train.py [--quick] [--threads 2]
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
from types import SimpleNamespace

import numpy as np
import torch

from itrkit.config import load_config
from itrkit.data.records import Dataset
from itrkit.data.synthetic import make_synthetic
from itrkit.models.dual_encoder import ModelConfig, build_model
from itrkit.train.config import TrainConfig
from itrkit.train.data import PairData
from itrkit.train.objective import Objective
from itrkit.train.trainer import TrainModule, make_adamw
from itrkit.utils.io import atomic_write_text


def _peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def _module(cusa: bool, live: str | None, precision: str = "fp32") -> tuple[TrainModule, torch.optim.Optimizer]:
    torch.manual_seed(0)
    trainable = live or "frozen"
    mc = ModelConfig(image_tower="efficientnet-lite0", text_tower="minilm", cached_features=live is None,
                     image_trainable=trainable, text_trainable=trainable, trunk="mlp", usa_heads=cusa)
    over = ["loss.csa=1", "loss.usa=1"] if cusa else []
    cfg = load_config(TrainConfig, None, overrides=over + [f"precision={precision}"])
    model = build_model(mc)
    objective = Objective(cfg, num_classes=10, embed_dim=mc.embed_dim)
    objective.set_weights(cfg.weights(cfg.stages[0]))
    # The loop's module over a minimal task: the dual encoder's forward and its objective.
    task = SimpleNamespace(model=model, loss=objective, gather=None, after_gather=lambda out: out,
                           compute=lambda out, batch: objective(out, batch))
    module = TrainModule(task, gather=False, precision=precision)
    module.train()
    opt = make_adamw([{"params": [p for p in module.parameters() if p.requires_grad]}], lr=1e-4)  # the trainer's
    return module, opt


def _step_fn(module: TrainModule, opt: torch.optim.Optimizer, batch: dict) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad(set_to_none=True)
        loss = sum(module(batch).values())
        loss.backward()
        opt.step()
    return step


def _teachers(b: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    return {"teacher_image": torch.randn(b, 1280, generator=g), "teacher_text": torch.randn(b, 768, generator=g)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (a smoke run)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    ap.add_argument("--rounds", type=int, default=0)
    ap.add_argument("--json", default="", help="also write the figures (pairs/s per configuration, ratios) here")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    rounds = a.rounds or (2 if a.quick else 5)
    g = torch.Generator().manual_seed(1)

    with tempfile.TemporaryDirectory() as tmp:
        make_synthetic(tmp, n_images=64, captions_per_image=2, seed=0, size=320, progress=False)
        ds = Dataset.load(tmp).split("train")
        cases: dict[str, tuple[int, Callable[[], None]]] = {}
        bc, bl = 128, 32
        ids_c = torch.arange(bc) // 2
        for cusa in (False, True):
            mod, opt = _module(cusa, None)
            batch = {"image_features": torch.randn(bc, 1280, generator=g), "text_features": torch.randn(bc, 384, generator=g),
                     "img_ids": ids_c, "labels": ids_c, **(_teachers(bc, g) if cusa else {})}
            cases["cached " + ("CUSA" if cusa else "InfoNCE")] = (bc, _step_fn(mod, opt, batch))
        live_cases = [("live frozen towers", "frozen", "fp32"), ("live top:1 trainable", "top:1", "fp32"),
                      ("live top:1 trainable bf16", "top:1", "bf16")]
        for name, mode, prec in live_cases:
            mod, opt = _module(False, mode, prec)
            data = PairData(ds, mod.model, cached=False)
            batch = data.batch(np.arange(bl))
            cases[name] = (bl, _step_fn(mod, opt, batch))
        plain = PairData(ds, mod.model, cached=False)
        cached = PairData(ds, mod.model, cached=False, image_cache_mb=512)
        cached.batch(np.arange(len(ds.texts)))  # warm the cache: every image decoded once
        cases["data: prepare live batch"] = (bl, lambda: plain.batch(np.arange(bl)))
        cases["data: prepare, image cache warm"] = (bl, lambda: cached.batch(np.arange(bl)))

        for _, fn in cases.values():  # warm-up (allocator, lazy init)
            fn()
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(rounds):
            for k, (_, fn) in cases.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) for k, v in times.items()}
    pps = {k: cases[k][0] / med[k] for k in cases}
    print(f"torch threads {torch.get_num_threads()}, rounds {rounds}; batch {bc} cached, {bl} live")
    print(f"{'configuration':34s} {'s/step':>8s} {'pairs/s':>9s}")
    for k in cases:
        print(f"{k:34s} {med[k]:8.4f} {pps[k]:9.1f}")
    print("ratios (pairs/s):")
    print(f"  CUSA / InfoNCE, cached features        {pps['cached CUSA'] / pps['cached InfoNCE']:.2f}")
    print(f"  live frozen / cached InfoNCE           {pps['live frozen towers'] / pps['cached InfoNCE']:.4f}")
    print(f"  live top:1 bf16 / fp32                 {pps['live top:1 trainable bf16'] / pps['live top:1 trainable']:.2f}")
    print(f"  data prep (cache warm) / live top:1    {pps['data: prepare, image cache warm'] / pps['live top:1 trainable']:.1f}")
    print(f"  data prep (no cache) / live top:1      {pps['data: prepare live batch'] / pps['live top:1 trainable']:.1f}")
    print(f"peak RSS {_peak_rss_mb():.0f} MB")
    if a.json:
        ratios = {"cusa_over_infonce_cached": pps["cached CUSA"] / pps["cached InfoNCE"],
                  "live_frozen_over_cached": pps["live frozen towers"] / pps["cached InfoNCE"],
                  "bf16_over_fp32_live_top1": pps["live top:1 trainable bf16"] / pps["live top:1 trainable"]}
        atomic_write_text(a.json, json.dumps({"pairs_per_s": pps, "seconds_per_step": med, "ratios": ratios,
                                              "rounds": rounds, "threads": torch.get_num_threads(),
                                              "peak_rss_mb": round(_peak_rss_mb(), 1)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
