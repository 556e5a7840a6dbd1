"""Teacher feature store: write speed, random batch lookups, and resident memory as the store grows.

For synthetic float16 stores of 10k, 100k and 1M rows × 768 (1.5 GB; ``--quick``: 10k and 100k):
- write throughput of :class:`StoreWriter` (rows are pwrite'n, checked finite, SHA-256 at close),
- random lookups of 128 ids through ``FeatureStore.lookup`` (id index + ``os.preadv`` of the rows +
  finite check + float32), side by side with fancy-indexing the same rows (given as row numbers,
  left in float16) through ``np.load(mmap_mode="r")``: the map does less work per lookup but
  keeps every page it touched resident,
- resident memory before/after each reader (anonymous and file-backed parts): it must stay flat
  while the store grows. Peak RSS of the whole run at the end.

The file was just written, so both readers read from the page cache (a warm store, as during
training). Run: ``.venv/bin/python benchmarks/bench_store.py [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from itrkit.teachers.store import FeatureStore
from itrkit.utils.io import atomic_write_text


def mem_mb() -> dict[str, float]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile"):
                out[key] = int(line.split()[1]) / 1024
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_store(path: Path, n: int, dim: int, chunk: int = 16384) -> float:
    ids = [f"img{i:08d}" for i in range(n)]
    base = np.random.default_rng(0).standard_normal((chunk, dim), dtype=np.float32)
    t = time.perf_counter()
    with FeatureStore.create(path, ids, dim, "synthetic", "image", source=f"synthetic-{n}") as w:
        for s in range(0, n, chunk):
            m = min(chunk, n - s)
            w.write(s, base[:m] * np.float32(1 + s / n))  # cheap distinct rows: generation is not measured
    return time.perf_counter() - t


def fmt(d: dict[str, float]) -> str:
    return f"RSS {d['VmRSS']:.0f} MB (anon {d['RssAnon']:.0f}, file {d['RssFile']:.0f})"


def delta(a: dict[str, float], b: dict[str, float]) -> str:
    return (f"ΔRSS {b['VmRSS'] - a['VmRSS']:+.0f} MB (anon {b['RssAnon'] - a['RssAnon']:+.0f}, "
            f"file {b['RssFile'] - a['RssFile']:+.0f})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10k and 100k rows only, fewer lookups")
    ap.add_argument("--dim", type=int, default=768)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lookups", type=int, default=0, help="lookups per reader (default 2000; quick 500)")
    ap.add_argument("--dir", default=None, help="where to write the stores (default: a temp folder)")
    ap.add_argument("--json", default="", help="also write the figures (one row per store size) here")
    a = ap.parse_args()
    sizes = [10_000, 100_000] if a.quick else [10_000, 100_000, 1_000_000]
    lookups = a.lookups or (500 if a.quick else 2000)
    root = Path(tempfile.mkdtemp(prefix="bench-store-", dir=a.dir))
    print(f"stores in {root}; dim {a.dim} float16; {lookups} lookups of {a.batch} random ids per reader")
    print(f"start: {fmt(mem_mb())}")
    rows_out = []
    try:
        for n in sizes:
            path = root / f"s{n}.store"
            m0 = mem_mb()
            secs = write_store(path, n, a.dim)
            m1 = mem_mb()
            gb = n * a.dim * 2 / 1e9
            print(f"\n== {n:,} rows ({gb:.2f} GB) ==")
            print(f"write: {secs:.1f} s, {n / secs:,.0f} rows/s, {gb * 1000 / secs:.0f} MB/s; {delta(m0, m1)}")
            rng = np.random.default_rng(1)
            batches = [rng.choice(n, a.batch, replace=False) for _ in range(lookups)]
            with FeatureStore.open(path) as store:
                ids = [[f"img{i:08d}" for i in b] for b in batches]
                store.lookup(ids[0])  # warm-up
                before = mem_mb()
                t = time.perf_counter()
                for q in ids:
                    store.lookup(q)
                dt_ours = time.perf_counter() - t
                after = mem_mb()
                print(f"lookup (ids → preadv → float32): {lookups / dt_ours:,.0f} lookups/s, "
                      f"{lookups * a.batch / dt_ours:,.0f} rows/s; {delta(before, after)}")
                mm = np.load(path / "features.npy", mmap_mode="r")
                mm[batches[0]]
                before_mm = mem_mb()
                t = time.perf_counter()
                for b in batches:
                    mm[b]  # raw float16 rows: no id index, no cast, no finite check (a lower bound)
                dt_mm = time.perf_counter() - t
                after_mm = mem_mb()
                del mm
                print(f"memmap fancy index (rows only): {lookups / dt_mm:,.0f} lookups/s, "
                      f"{lookups * a.batch / dt_mm:,.0f} rows/s; {delta(before_mm, after_mm)}")
                print(f"ratio lookups/s store/memmap: {dt_mm / dt_ours:.2f}×; now {fmt(mem_mb())}")
                rows_out.append((n, lookups / dt_ours, after["VmRSS"] - before["VmRSS"], lookups / dt_mm,
                                 after_mm["VmRSS"] - before_mm["VmRSS"], after["RssAnon"]))
            shutil.rmtree(path)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\nrows        store lookups/s  ΔRSS MB   memmap lookups/s  ΔRSS MB   anon RSS after (MB)")
    for n, lo, dr, lm, dm, anon in rows_out:
        print(f"{n:>9,}  {lo:>15,.0f}  {dr:>+7.0f}  {lm:>16,.0f}  {dm:>+7.0f}  {anon:>10.0f}")
    print(f"peak RSS of the run: {peak_rss_mb():.0f} MB")
    if a.json:
        keys = ("n", "store_lookups_per_s", "store_drss_mb", "memmap_lookups_per_s", "memmap_drss_mb", "anon_rss_mb")
        atomic_write_text(a.json, json.dumps({"rows": [dict(zip(keys, r)) for r in rows_out], "dim": a.dim,
                                              "batch": a.batch, "lookups": lookups,
                                              "peak_rss_mb": round(peak_rss_mb(), 1)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
