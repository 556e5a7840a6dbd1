"""evaluate_retrieval at COCO 5K size against one bare float32 matmul of the same score matrix.

5,000 images × 25,000 captions (5 per image), d = 512, random embeddings (``--quick``: 2,000 ×
10,000, same d). Each measurement runs in its own subprocess so its peak memory can be read
from ``ru_maxrss`` (torch allocations are invisible to tracemalloc): peak = max RSS after the
operation minus RSS once the inputs exist and torch is warm. Measured, alternating, ``--repeats``
times each (other processes share the CPU: the minimum time is reported):

- ``bare``: ``img @ txt.T`` (the N×M float32 matrix it returns is all it does),
- ``ours``: ``evaluate_retrieval`` (one matmul in row blocks, both directions ranked from each block),
- ``two-pass``: the same with an identity ``rerank`` (each direction its own matmul; the path
  any reranker takes), for reference.

Both are warmed first on a few rows (BLAS kernels; for ``ours`` the numba counting loop, compiled
or loaded from its cache once per process). Target: ours / bare ≤ 1.3 in time at 5K × 25K, and
peak memory far below the bare matrix. Run: ``.venv/bin/python benchmarks/bench_eval.py [--quick] [--repeats 3] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def child(kind: str, n: int, caps: int, dim: int) -> None:
    import numpy as np
    import torch

    from itrkit.eval.retrieval import evaluate_retrieval

    gen = torch.Generator().manual_seed(0)
    img = torch.randn(n, dim, generator=gen)
    t2i = np.repeat(np.arange(n), caps)
    txt = img[torch.as_tensor(t2i)] + 6.0 * torch.randn(n * caps, dim, generator=gen)  # mid-range recalls
    img = torch.nn.functional.normalize(img, dim=1)
    txt = torch.nn.functional.normalize(txt, dim=1)
    _ = img[:8] @ txt[:64].T  # load BLAS kernels before the baseline
    if kind != "bare":  # likewise: compile (or load from numba's cache) the counting loop first
        evaluate_retrieval(img[:8], txt[:40], t2i[:40])
    base = rss_mb()
    out: dict = {}
    t = time.perf_counter()
    if kind == "bare":
        s = img @ txt.T
        out["sum"] = float(s[0, 0])
    elif kind == "ours":
        out["metrics"] = evaluate_retrieval(img, txt, t2i)
    elif kind == "two-pass":
        out["metrics"] = evaluate_retrieval(img, txt, t2i, rerank=lambda s, rows, d: s)
    else:
        raise SystemExit(f"unknown kind {kind}")
    out["seconds"] = time.perf_counter() - t
    out["peak_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base
    print(json.dumps(out))


def run(kind: str, n: int, caps: int, dim: int) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", kind, "--n", str(n), "--caps", str(caps),
                          "--dim", str(dim)], capture_output=True, text=True, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2,000 × 10,000, d = 512")
    ap.add_argument("--repeats", type=int, default=0, help="alternating runs of each (default 3; --quick 2)")
    ap.add_argument("--json", default=None, help="also write the figures (key ratio: ours / bare) to this file")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--caps", type=int, default=5, help=argparse.SUPPRESS)
    ap.add_argument("--dim", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    n, dim = (2000, 512) if a.quick else (5000, 512)
    n, dim = a.n or n, a.dim or dim
    if a.child:
        child(a.child, n, a.caps, dim)
        return
    m = n * a.caps
    a.repeats = a.repeats or (2 if a.quick else 3)
    print(f"{n:,} images × {m:,} captions, d = {dim}; score matrix {n * m * 4 / 2**20:.0f} MB in float32; "
          f"{a.repeats} alternating runs each, in subprocesses")
    kinds = ("bare", "ours", "two-pass")
    results: dict[str, list[dict]] = {k: [] for k in kinds}
    for r in range(a.repeats):
        for k in kinds:
            results[k].append(run(k, n, a.caps, dim))
            print(f"  run {r + 1} {k:9s} {results[k][-1]['seconds']:6.2f} s  peak +{results[k][-1]['peak_mb']:.0f} MB",
                  flush=True)
    best = {k: min(x["seconds"] for x in v) for k, v in results.items()}
    peak = {k: max(x["peak_mb"] for x in v) for k, v in results.items()}
    metrics = results["ours"][0]["metrics"]
    assert all(x["metrics"] == metrics for x in results["ours"] + results["two-pass"]), "paths disagree"
    print(f"\nbare matmul      {best['bare']:6.2f} s   peak +{peak['bare']:5.0f} MB")
    print(f"evaluate (ours)  {best['ours']:6.2f} s   peak +{peak['ours']:5.0f} MB   "
          f"ratio {best['ours'] / best['bare']:.2f}× (target ≤ 1.3×)")
    print(f"two-pass/rerank  {best['two-pass']:6.2f} s   peak +{peak['two-pass']:5.0f} MB   "
          f"ratio {best['two-pass'] / best['bare']:.2f}×")
    if a.json:
        from pathlib import Path

        fig = {"ratio": best["ours"] / best["bare"], "ratio_two_pass": best["two-pass"] / best["bare"],
               "seconds": best, "peak_mb": peak, "n": n, "m": m, "dim": dim, "repeats": a.repeats,
               "quick": a.quick, "rsum": metrics["rsum"]}
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(fig, indent=1) + "\n", encoding="utf-8")
    print(f"rsum {metrics['rsum']:.1f}, i2t_R@1 {metrics['i2t_R@1']:.1f}, t2i_R@1 {metrics['t2i_R@1']:.1f} "
          f"(identical on both paths)")


if __name__ == "__main__":
    main()
