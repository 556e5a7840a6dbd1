"""``itrkit serve`` under load: latency and throughput of the test suite's mixed request load.

8 client threads × 250 mixed requests (text and photo searches, image downloads, health, bad
requests: empty / over-long queries, unknown ids, path traversal, decompression bombs, missing
tokens) against the real service in its own process on 127.0.0.1, with a bearer token and a
1 MB upload limit. The correctness claims (no 5xx, every bad request its 4xx, flat memory) are
``tests/serve/test_load.py``; this script times the same load. Prints and writes JSON
(``--json PATH``): requests/s, p50 / p99 ms (overall and per request kind), status counts, server
RSS before / after.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="100 requests per thread")
    ap.add_argument("--per-thread", type=int, default=250)
    ap.add_argument("--json", default=None, help="write the figures here")
    a = ap.parse_args()
    os.environ["ITRKIT_LOAD_PER_THREAD"] = str(100 if a.quick else a.per_thread)
    from itrkit.index.build import build_index
    from tests.index.conftest import ColourEncoder, make_colour_dataset
    from tests.serve import test_load as load

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        index = build_index(ColourEncoder(), make_colour_dataset(root / "data"), root / "index", run_dir=root / "run",
                            progress=False)
        with load.load_server(index, root) as (proc, port):
            warm: list = []
            load.bilevel_cache["giga"] = load.bilevel_png(40000, 40000)
            load.bilevel_cache["mega"] = load.bilevel_png(8000, 8000)
            load.client(port, load.make_mix(random.Random(7))[:60], warm)
            before = load._vm(proc.pid)
            t0 = time.perf_counter()
            flat = load.run_load(port, clock=time.perf_counter)
            wall = time.perf_counter() - t0
            after = load._vm(proc.pid)
    lat = np.array([r[3] for r in flat]) * 1000
    kinds = sorted({r[0] for r in flat})
    figures = {
        "requests": len(flat), "threads": load.THREADS, "seconds": round(wall, 2),
        "requests_per_s": round(len(flat) / wall, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "by_kind_p50_p99_ms": {k: [round(float(np.percentile(lat[[r[0] == k for r in flat]], q)), 1) for q in (50, 99)]
                               for k in kinds},
        "status_counts": {str(s): sum(1 for r in flat if r[2] == s) for s in sorted({r[2] for r in flat})},
        "server_5xx": sum(1 for r in flat if r[2] >= 500 or r[2] < 0),
        "rss_mb_before": round(before["VmRSS"], 1), "rss_mb_after": round(after["VmRSS"], 1),
    }
    print(json.dumps(figures, indent=1))
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(figures, indent=1) + "\n")


if __name__ == "__main__":
    main()
