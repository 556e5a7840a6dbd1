"""GradCache: peak memory and time of one training step of a large batch, chunked vs unchunked.

A step is itrkit's own path (``TrainModule``: DualEncoder + Objective with InfoNCE, CSA, USA and
the instance loss; :class:`itrkit.train.gradcache.GradCache` when chunked; AdamW) on a batch of
``--batch`` (1024) rows with **live trainable towers**: by default the tiny towers (``tiny-image``
at ``--image-size`` px, ``tiny-text``), trunk ``mlp``; ``--text-tower minilm`` puts a real
transformer (all-MiniLM-L6-v2, trainable, with dropout) on the text side. Each setting (unchunked,
``--chunk`` rows) runs in its own process:

- CPU: peak memory = the process's peak RSS during the first step minus its RSS just before it
  (model, optimizer and the batch built, one 4-row warm-up step done), so it counts what the step
  allocates;
- CUDA: ``torch.cuda.max_memory_allocated`` during the first step minus the allocation before it.

Time = median seconds per step over ``--steps`` rounds in one more process, the two settings
alternating round by round (a shared machine's load hits both alike). ``peak_ratio`` = chunked / unchunked peak
(target ≤ 0.25 at batch 1024, chunk 128), ``time_ratio`` = chunked / unchunked step time (the
second forward costs about one forward more).

    .venv/bin/python benchmarks/bench_gradcache.py [--quick] [--device cuda] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

WORDS = ("a dog runs on the grass while two children play near a red boat in the park at sunset "
         "man woman bike street city water beach snow mountain").split()


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 2**20 if sys.platform == "darwin" else r / 1024


def _setup(args: argparse.Namespace) -> tuple[Any, dict[str, Any], torch.optim.Optimizer]:
    from itrkit.models.dual_encoder import ModelConfig, build_model
    from itrkit.train.config import TrainConfig
    from itrkit.train.objective import Objective
    from itrkit.train.tasks import DualEncoderTask, TrainingTask
    from itrkit.train.trainer import TrainModule, make_adamw
    from itrkit.utils.device import move_to

    class Task(TrainingTask):
        family = "dual_encoder"
        gather_keys = DualEncoderTask.gather_keys
        batch_gather_keys = DualEncoderTask.batch_gather_keys

        def __init__(self, model: nn.Module, loss: nn.Module) -> None:
            self.model, self.loss = model, loss

        def compute(self, out: dict[str, torch.Tensor], batch: Any) -> dict[str, torch.Tensor]:
            return self.loss(out, batch)

    device = torch.device(args.device)
    cfg = TrainConfig()
    cfg.model = ModelConfig(image_tower="tiny-image", text_tower=args.text_tower, image_trainable="all",
                            text_trainable="all", cached_features=False, trunk="mlp", usa_heads=True,
                            image_size=args.image_size)
    for k, v in {"contrastive": 1.0, "csa": 1.0, "usa": 1.0, "instance": 0.5, "tau_teacher": 0.1}.items():
        setattr(cfg.loss, k, v)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    model.train()
    n_img = args.batch // 2  # two captions per image: positives beyond the diagonal
    loss = Objective(cfg, num_classes=n_img, embed_dim=cfg.model.embed_dim)
    loss.set_weights(cfg.weights(cfg.stages[0]))
    module = TrainModule(Task(model, loss), gather=False, precision=args.precision).to(device)
    g = torch.Generator().manual_seed(1)
    ids = torch.arange(args.batch) // 2
    captions = [" ".join(WORDS[(7 * i) % 20:(7 * i) % 20 + 6 + i % 7]) for i in range(args.batch)]
    batch = {"img_ids": ids, "labels": ids,
             "image_inputs": torch.randn(args.batch, 3, args.image_size, args.image_size, generator=g),
             "text_inputs": model.text_tower.prepare(captions),
             "teacher_image": torch.randn(args.batch, 1280, generator=g),
             "teacher_text": torch.randn(args.batch, 768, generator=g)}
    batch = move_to(batch, device)
    opt = make_adamw([{"params": [p for p in module.parameters() if p.requires_grad]}], lr=1e-4)  # the trainer's
    return module, batch, opt


def _step(module: Any, batch: dict[str, Any], opt: torch.optim.Optimizer, chunk: int) -> float:
    from itrkit.train.gradcache import GradCache

    opt.zero_grad(set_to_none=True)
    if chunk:
        terms, backward = GradCache(module, chunk).forward(batch)
        loss = sum(terms.values())
        backward(loss)
    else:
        loss = sum(module(batch).values())
        loss.backward()
    opt.step()
    return float(loss.detach())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _warm_up(module: Any, batch: dict[str, Any], opt: torch.optim.Optimizer, chunk: int) -> None:
    """One step on 4 rows first: lazy one-time allocations (kernels' scratch, AdamW's moments,
    thread pools) are not the step's memory."""
    from itrkit.train.gradcache import slice_rows

    n = len(batch["img_ids"])
    _step(module, slice_rows(batch, n, 0, 4), opt, min(chunk, 2))


def child_peak(args: argparse.Namespace) -> dict[str, Any]:
    """Peak memory of one full-size step, in a process of its own (the peak RSS is per process)."""
    torch.set_num_threads(args.threads)
    module, batch, opt = _setup(args)
    _warm_up(module, batch, opt, args.chunk)
    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() / 2**20
    else:
        before = _rss_mb()
    loss = _step(module, batch, opt, args.chunk)
    _sync(args.device)
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda else _peak_rss_mb()) - before
    return {"chunk": args.chunk, "peak_mb": round(peak, 1), "first_loss": loss}


def child_time(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds per step, unchunked and chunked alternating round by round in one process (so both
    see the same machine load); medians over ``--steps`` rounds."""
    torch.set_num_threads(args.threads)
    module, batch, opt = _setup(args)
    _warm_up(module, batch, opt, args.chunk)
    times: dict[int, list[float]] = {0: [], args.chunk: []}
    for _ in range(args.steps):
        for chunk in times:
            t0 = time.perf_counter()
            _step(module, batch, opt, chunk)
            _sync(args.device)
            times[chunk].append(time.perf_counter() - t0)
    return {str(k): round(statistics.median(v), 4) for k, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 px images, 2 timed rounds")
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=128)
    ap.add_argument("--image-size", type=int, default=0, help="tiny-image input size (default 96; --quick 64)")
    ap.add_argument("--text-tower", default="tiny-text", help="tiny-text (default) or minilm (real, trainable)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    ap.add_argument("--steps", type=int, default=0, help="timed rounds (default 5; --quick 2)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the figures to this JSON file")
    ap.add_argument("--child", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.image_size = args.image_size or (64 if args.quick else 96)
    args.steps = args.steps or (2 if args.quick else 5)
    if args.child:
        print(json.dumps(child_time(args) if args.child == "time" else child_peak(args)))
        return

    def run(mode: str, chunk: int) -> dict[str, Any]:
        cmd = [sys.executable, __file__, f"--child={mode}", f"--batch={args.batch}", f"--chunk={chunk}",
               f"--image-size={args.image_size}", f"--text-tower={args.text_tower}", f"--device={args.device}",
               f"--precision={args.precision}", f"--steps={args.steps}", f"--threads={args.threads}"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode:
            sys.exit(f"error: the {mode} run (chunk {chunk}) failed:\n{res.stderr[-2000:]}")
        return json.loads(res.stdout.strip().splitlines()[-1])

    results = {"unchunked": run("peak", 0), "chunked": run("peak", args.chunk)}
    step_s = run("time", args.chunk)
    results["unchunked"]["step_s"], results["chunked"]["step_s"] = step_s["0"], step_s[str(args.chunk)]
    full, part = results["unchunked"], results["chunked"]
    out = {
        "batch": args.batch, "chunk": args.chunk, "device": args.device, "precision": args.precision,
        "towers": f"tiny-image@{args.image_size}px + {args.text_tower}, trainable", "threads": args.threads,
        "unchunked": full, "chunked": part,
        "peak_ratio": round(part["peak_mb"] / full["peak_mb"], 3),
        "time_ratio": round(part["step_s"] / full["step_s"], 3),
        # 0 up to float32 rounding, unless a tower has dropout (MiniLM): chunks draw their own masks
        "first_loss_rel_diff": float(f"{abs(part['first_loss'] - full['first_loss']) / abs(full['first_loss']):.2e}"),
    }
    print(f"batch {args.batch}, {out['towers']}, {args.device} {args.precision}")
    print(f"  unchunked     peak {full['peak_mb']:8.1f} MB   step {full['step_s']:.3f} s")
    print(f"  chunk {args.chunk:<6}  peak {part['peak_mb']:8.1f} MB   step {part['step_s']:.3f} s")
    print(f"  peak_ratio {out['peak_ratio']:.3f} (target <= 0.25), time_ratio {out['time_ratio']:.2f}, "
          f"first-step loss rel. diff {out['first_loss_rel_diff']:.1e}")
    if args.json:
        from itrkit.utils.io import atomic_write_json

        atomic_write_json(Path(args.json), out)


if __name__ == "__main__":
    main()
