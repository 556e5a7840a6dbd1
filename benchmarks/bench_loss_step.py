"""One training step of the heads with InfoNCE vs with CUSA, measured side by side.

A step = heads forward (LayerNorm + Linear 1280→256 image, 384→256 text; CUSA adds the two USA
heads), loss, backward, AdamW. Inputs are fixed random tower features at B=128 (cached-feature
training, as on CPU); CUSA also reads teacher features (1280-d image, 768-d text). The two steps
alternate in one process so both see the same machine state; the ratio is of medians. The loss
alone (forward + backward on fixed 256-d embeddings) is timed too, to separate the objective's
cost from the extra USA heads.

    .venv/bin/python benchmarks/bench_loss_step.py [--quick] [--batch 128] [--steps 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

from itrkit.losses import ContrastiveLoss, CUSALoss, USAProjector


def _peak_rss_mb() -> float:
    # ru_maxrss is KiB on Linux, bytes on macOS.
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / (1024 * 1024) if sys.platform == "darwin" else r / 1024


def _make_step(use_cusa: bool, batch: int, seed: int) -> Callable[[], float]:
    torch.manual_seed(seed)
    heads = nn.ModuleDict({"img": USAProjector(1280, 256), "txt": USAProjector(384, 256)})
    if use_cusa:
        heads["img_uni"] = USAProjector(1280, 256)
        heads["txt_uni"] = USAProjector(384, 256)
        loss_fn: nn.Module = CUSALoss(alpha=0.1, beta=0.5)
    else:
        loss_fn = ContrastiveLoss()
    params = list(heads.parameters()) + list(loss_fn.parameters())
    opt = torch.optim.AdamW([p for p in params if p.requires_grad], lr=1e-3, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed + 1)
    x_img, x_txt = torch.randn(batch, 1280, generator=g), torch.randn(batch, 384, generator=g)
    t_img, t_txt = torch.randn(batch, 1280, generator=g), torch.randn(batch, 768, generator=g)
    ids = torch.randint(0, 6000, (batch,), generator=g)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        img, txt = heads["img"](x_img), heads["txt"](x_txt)
        if use_cusa:
            out = loss_fn(img, txt, ids, t_img, t_txt, heads["img_uni"](x_img), heads["txt_uni"](x_txt))
        else:
            out = loss_fn(img, txt, ids)
        loss = sum(out.values())
        loss.backward()
        opt.step()
        loss_fn.clamp_temperatures_()
        return float(loss.detach())

    return step


def _make_loss_only(use_cusa: bool, batch: int, seed: int) -> Callable[[], float]:
    """Loss forward + backward on fixed embeddings (no heads, no optimizer): the objective's own cost."""
    g = torch.Generator().manual_seed(seed + 2)
    emb = [torch.randn(batch, 256, generator=g).requires_grad_() for _ in range(4)]
    t_img, t_txt = torch.randn(batch, 1280, generator=g), torch.randn(batch, 768, generator=g)
    ids = torch.randint(0, 6000, (batch,), generator=g)
    loss_fn: nn.Module = CUSALoss(alpha=0.1, beta=0.5) if use_cusa else ContrastiveLoss()

    def step() -> float:
        out = loss_fn(emb[0], emb[1], ids, t_img, t_txt, emb[2], emb[3]) if use_cusa else loss_fn(emb[0], emb[1], ids)
        loss = sum(out.values())
        loss.backward()
        return float(loss.detach())

    return step


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="30 timed steps instead of --steps")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=200)
    # One thread by default: on a shared 2-core machine two threads per process thrash and the
    # timings spread over 10x; pass --threads 0 for torch's default.
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    steps = 30 if args.quick else args.steps

    rss0 = _peak_rss_mb()
    nce = _make_step(False, args.batch, seed=0)
    for _ in range(5):
        nce()
    rss_nce = _peak_rss_mb()
    cusa = _make_step(True, args.batch, seed=0)
    for _ in range(5):
        cusa()
    rss_cusa = _peak_rss_mb()

    fns = {"infonce": nce, "cusa": cusa,
           "infonce_loss_only": _make_loss_only(False, args.batch, 0), "cusa_loss_only": _make_loss_only(True, args.batch, 0)}
    times: dict[str, list[float]] = {k: [] for k in fns}
    losses: dict[str, float] = {}
    names = list(fns)
    for i in range(steps):
        # Rotate the order so drift (thermal, other processes) hits every variant alike.
        for name in names[i % len(names):] + names[:i % len(names)]:
            t0 = time.perf_counter()
            losses[name] = fns[name]()
            times[name].append(time.perf_counter() - t0)

    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    print(f"B={args.batch}, {steps} timed steps each, torch threads={torch.get_num_threads()}")
    for k in names:
        q = statistics.quantiles(times[k], n=10)
        print(f"  {k:18s}: median {med[k]:7.2f} ms  (p10 {q[0] * 1e3:.2f}, p90 {q[-1] * 1e3:.2f})  "
              f"last loss {losses[k]:.4f}")
    print(f"  ratio cusa / infonce, full step: {med['cusa'] / med['infonce']:.2f}x; "
          f"loss forward+backward only: {med['cusa_loss_only'] / med['infonce_loss_only']:.2f}x")
    print(f"  peak RSS: start {rss0:.0f} MB, after InfoNCE warm-up {rss_nce:.0f} MB, "
          f"after CUSA warm-up {rss_cusa:.0f} MB, end {_peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
