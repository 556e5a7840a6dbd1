"""Query latency and throughput of the index backends, side by side on the same random vectors.

For each gallery size (10k, 100k, 1M unit vectors, d=256; ``--quick``: 10k and 100k):
- latency: one query at a time (batch 1), median and p95 over repeated queries,
- throughput: queries per second with batches of 256,
- HNSW recall@10 against the exact backend's top 10 (the ground truth),
- build time and the resident memory each index added; peak RSS of the whole run at the end.

Random Gaussian directions in 256-d are close to the worst case for HNSW (no cluster structure),
so its recall here is a floor for real embeddings (``--data clustered`` is closer to them). Run: ``.venv/bin/python benchmarks/bench_index.py``.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import time

import numpy as np

from itrkit.index.backends import ExactIndex, FaissFlatIndex, FaissHNSWIndex, VectorIndex


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


def unit_vectors(n: int, d: int, seed: int, chunk: int = 100_000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        x = rng.standard_normal((min(chunk, n - s), d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s:s + len(x)] = x
    return out


def clustered_vectors(n: int, d: int, seed: int, n_clusters: int = 1000, noise: float = 0.5,
                      chunk: int = 100_000) -> np.ndarray:
    """Unit vectors around ``n_clusters`` random centres: closer to real embeddings than isotropic noise."""
    rng = np.random.default_rng(12345)  # the same centres for gallery and queries
    centres = rng.standard_normal((n_clusters, d), dtype=np.float32)
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        m = min(chunk, n - s)
        x = centres[rng.integers(0, n_clusters, m)] + noise * rng.standard_normal((m, d), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        out[s:s + m] = x
    return out


def time_latency(index: VectorIndex, queries: np.ndarray, k: int, budget_s: float) -> tuple[float, float, int]:
    """Median and p95 milliseconds per single query; stops after ``budget_s`` (at least 5 queries)."""
    times = []
    index.search(queries[:1], k)  # warm-up (faiss thread pool, page faults)
    start = time.perf_counter()
    for i in range(len(queries)):
        t = time.perf_counter()
        index.search(queries[i:i + 1], k)
        times.append((time.perf_counter() - t) * 1000)
        if i >= 4 and time.perf_counter() - start > budget_s:
            break
    return float(np.median(times)), float(np.percentile(times, 95)), len(times)


def time_throughput(index: VectorIndex, queries: np.ndarray, k: int, batch: int, budget_s: float) -> float:
    """Queries per second with batches of ``batch``; at least one batch."""
    done, start = 0, time.perf_counter()
    while True:
        s = (done // batch * batch) % max(1, len(queries) - batch + 1)
        index.search(queries[s:s + batch], k)
        done += batch
        if time.perf_counter() - start > budget_s:
            break
    return done / (time.perf_counter() - start)


def recall_at(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(a) & set(b)) / truth.shape[1] for a, b in zip(found.tolist(), truth.tolist())]))


def run(sizes: list[int], dim: int, k: int, batch: int, hnsw_m: int, ef_construction: int,
        ef_search: list[int], budget_s: float, n_queries: int, data_kind: str = "random") -> list[dict]:
    rows = []
    make_vectors = clustered_vectors if data_kind == "clustered" else unit_vectors
    queries = make_vectors(n_queries, dim, seed=1)
    for n in sizes:
        print(f"\n== {n:,} vectors, d={dim} ==", flush=True)
        data = make_vectors(n, dim, seed=0)
        builders = [("exact", lambda: ExactIndex(dim)), ("faiss-flat", lambda: FaissFlatIndex(dim)),
                    ("faiss-hnsw", lambda: FaissHNSWIndex(dim, m=hnsw_m, ef_construction=ef_construction,
                                                          ef_search=ef_search[0]))]
        truth = None
        for name, make in builders:
            gc.collect()
            before = rss_mb()
            t = time.perf_counter()
            index = make()
            index.add(data)
            build_s = time.perf_counter() - t
            mem = rss_mb() - before
            settings = [None] if name != "faiss-hnsw" else ef_search
            for ef in settings:
                if ef is not None:
                    index.set_ef_search(ef)  # type: ignore[attr-defined]
                _, found = index.search(queries, k)
                if name == "exact":
                    truth = found
                med, p95, nq = time_latency(index, queries, k, budget_s)
                qps = time_throughput(index, queries, k, batch, budget_s)
                row = {"n": n, "backend": name if ef is None else f"{name} ef={ef}", "build_s": build_s,
                       "mem_mb": mem, "lat_ms": med, "p95_ms": p95, "lat_queries": nq, "qps": qps,
                       "recall": recall_at(found, truth)}
                rows.append(row)
                print(f"  {row['backend']:<20} build {build_s:7.1f} s  +{mem:7.0f} MB  "
                      f"latency {med:8.2f} ms (p95 {p95:.2f}, {nq} q)  {qps:10.0f} q/s  "
                      f"recall@{k} {row['recall']:.3f}", flush=True)
            del index
        del data
    return rows


def print_table(rows: list[dict], k: int, batch: int) -> None:
    exact = {r["n"]: r for r in rows if r["backend"] == "exact"}
    print(f"\nside by side (latency = batch 1, throughput = batch {batch}; speed-ups vs exact in the same run)")
    head = (f"{'vectors':>9}  {'backend':<20} {'build s':>8} {'+MB':>7} {'ms/query':>9} {'x exact':>8} "
            f"{'q/s':>9} {'x exact':>8} {'recall@' + str(k):>9}")
    print(head)
    print("-" * len(head))
    for r in rows:
        e = exact[r["n"]]
        print(f"{r['n']:>9,}  {r['backend']:<20} {r['build_s']:>8.1f} {r['mem_mb']:>7.0f} {r['lat_ms']:>9.2f} "
              f"{e['lat_ms'] / r['lat_ms']:>8.2f} {r['qps']:>9.0f} {r['qps'] / e['qps']:>8.2f} {r['recall']:>9.3f}")
    print(f"\npeak resident memory of this run: {peak_rss_mb():.0f} MB")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="10k and 100k only, shorter timing budget")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--hnsw-m", type=int, default=32)
    p.add_argument("--ef-construction", type=int, default=40)
    p.add_argument("--ef-search", type=int, nargs="+", default=[64, 256])
    p.add_argument("--queries", type=int, default=1024)
    p.add_argument("--data", default="random", choices=("random", "clustered"),
                   help="random: isotropic unit vectors (HNSW's hardest case); clustered: 1000 clusters")
    p.add_argument("--threads", type=int, default=None, help="faiss OpenMP and BLAS threads (default: all cores)")
    a = p.parse_args(argv)
    sizes = a.sizes or ([10_000, 100_000] if a.quick else [10_000, 100_000, 1_000_000])
    import faiss

    if a.threads:
        # Both thread pools: faiss's OpenMP and NumPy's BLAS (the exact backend).
        from threadpoolctl import threadpool_limits

        threadpool_limits(a.threads)
        faiss.omp_set_num_threads(a.threads)
    print(f"faiss {faiss.__version__}, {faiss.omp_get_max_threads()} threads; HNSW M={a.hnsw_m}, "
          f"efConstruction={a.ef_construction}, efSearch={a.ef_search}; {a.data} data; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other work skews timings)")
    rows = run(sizes, a.dim, a.k, a.batch, a.hnsw_m, a.ef_construction, a.ef_search,
               budget_s=1.0 if a.quick else 3.0, n_queries=a.queries, data_kind=a.data)
    print_table(rows, a.k, a.batch)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
