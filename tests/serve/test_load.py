"""Load test: 8 client threads x 250 mixed requests against a real server process on 127.0.0.1.

Good requests (text search, photo search by image and by caption, image download, health) and bad
ones (empty or over-long query, bad k, unknown id, path traversal, a non-image, a 1.6-gigapixel
PNG of 200 kB, a 64-megapixel one, an upload over the byte limit, no or a wrong token) are
interleaved. Claims: no 5xx and no dropped connection, every good request 200, every bad one the
expected 4xx, and the server's resident memory grows by at most 50 MB over the run (a decoded bomb
alone would add over 60 MB). Bounded: at most 250 requests per thread and 60 s in all; it stops by
itself. Figures (p50 / p99 latency, RSS before / after) are printed: ``pytest -s tests/serve/test_load.py``.
The request count and time bound can be raised for a soak (see ``PER_THREAD``).
"""

from __future__ import annotations

import http.client
import io
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.serve._helpers import bilevel_png

REPO = Path(__file__).resolve().parents[2]
# A longer soak: ITRKIT_LOAD_PER_THREAD=2500 ITRKIT_LOAD_SECONDS=300 pytest -s tests/serve/test_load.py
THREADS = 8
PER_THREAD = int(os.environ.get("ITRKIT_LOAD_PER_THREAD", "250"))
MAX_SECONDS = float(os.environ.get("ITRKIT_LOAD_SECONDS", "60"))
TOKEN = "load-test-token-0123456789abcdef"
MAX_UPLOAD = 1024 * 1024
RSS_GROWTH_LIMIT_MB = 50.0


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _multipart(fields: dict[str, str], file: bytes | None) -> tuple[bytes, str]:
    boundary = "itrkitloadtestboundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    if file is not None:
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="q.png"\r\n'
                     f"Content-Type: image/png\r\n\r\n".encode() + file + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def _vm(pid: int) -> dict[str, float]:
    """VmRSS (now) and VmHWM (peak) of ``pid`` in MB, from /proc."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


class Request:
    """One request of the mix: what to send and which status it must get."""

    def __init__(self, kind: str, method: str, path: str, expect: int, body: bytes | None = None,
                 headers: dict[str, str] | None = None, expect_continue: bool = False) -> None:
        self.kind, self.method, self.path, self.expect = kind, method, path, expect
        self.body, self.headers, self.expect_continue = body, headers or {}, expect_continue


def make_mix(rng: random.Random) -> list[Request]:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black"]
    photos = [_png(Image.new("RGB", (rng.randint(16, 200), rng.randint(16, 200)),
                             tuple(rng.randint(0, 255) for _ in range(3)))) for _ in range(6)]
    photos.append(_png(Image.effect_noise((256, 256), 80).convert("RGB")))

    def upload(kind: str, expect: int, file: bytes | None, **fields: str) -> Request:
        body, ctype = _multipart(fields, file)
        return Request(kind, "POST", "/api/search/image", expect, body, {**auth, "Content-Type": ctype})

    good = [
        lambda: Request("text", "GET", f"/api/search?q=a+{rng.choice(colours)}+{rng.choice(colours)}+square"
                        f"&k={rng.randint(1, 20)}", 200, headers=auth),
        lambda: upload("photo", 200, rng.choice(photos), k=str(rng.randint(1, 8)), mode="image"),
        lambda: upload("photo", 200, rng.choice(photos), k=str(rng.randint(1, 8)), mode="caption"),
        lambda: Request("image", "GET", f"/images/{rng.choice(['red', 'blue', 'red-white'])}", 200, headers=auth),
        lambda: Request("health", "GET", "/api/health", 200, headers=auth),
    ]
    big_body, big_type = _multipart({}, b"\0" * (MAX_UPLOAD + 100_000))
    bad = [
        lambda: Request("bad", "GET", "/api/search?q=", 400, headers=auth),
        lambda: Request("bad", "GET", "/api/search?q=" + "x" * 501, 400, headers=auth),
        lambda: Request("bad", "GET", "/api/search?q=red&k=0", 400, headers=auth),
        lambda: Request("bad", "GET", "/api/search?q=red&k=ten", 400, headers=auth),
        lambda: Request("bad", "GET", "/images/no-such-id", 404, headers=auth),
        lambda: Request("bad", "GET", "/images/..%2F..%2Fetc%2Fpasswd", 404, headers=auth),
        lambda: upload("bad", 415, b"this is not an image"),
        lambda: upload("bad", 400, None, k="3"),
        lambda: upload("bad", 400, photos[0], mode="sideways"),
        lambda: upload("bomb", 413, bilevel_cache["giga"]),
        lambda: upload("bomb", 413, bilevel_cache["mega"]),
        # Sent the way a careful client sends a big upload: headers first, body only after "100 Continue".
        lambda: Request("bad", "POST", "/api/search/image", 413, big_body,
                        {**auth, "Content-Type": big_type}, expect_continue=True),
        lambda: Request("bad", "GET", "/api/search?q=red", 401),
        lambda: Request("bad", "GET", "/images/red", 401, headers={"Authorization": "Bearer wrong-token"}),
    ]
    # Two good requests for each bad one, in a shuffled but seeded order.
    makers = good * 6 + bad
    return [rng.choice(makers)() for _ in range(PER_THREAD)]


bilevel_cache: dict[str, bytes] = {}


def send(conn: http.client.HTTPConnection, req: Request) -> int:
    if req.expect_continue:
        conn.putrequest(req.method, req.path)
        for k, v in {**req.headers, "Content-Length": str(len(req.body or b"")), "Expect": "100-continue"}.items():
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()  # the server answers before any body byte is sent
        r.read()
        conn.close()  # the body it refused is never sent: this connection cannot be reused
        return r.status
    conn.request(req.method, req.path, body=req.body, headers=req.headers)
    r = conn.getresponse()
    r.read()
    if r.getheader("connection", "").lower() == "close":
        conn.close()
    return r.status


def client(port: int, reqs: list[Request], deadline: float, out: list[tuple[str, int, int, float]]) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for req in reqs:
        if time.monotonic() > deadline:
            break
        t0 = time.perf_counter()
        try:
            status = send(conn, req)
        except (OSError, http.client.HTTPException) as e:  # a dropped connection counts as a failure
            status = -1
            print(f"connection error on {req.method} {req.path[:60]}: {e!r}", file=sys.stderr)
            conn.close()
        out.append((req.kind, req.expect, status, time.perf_counter() - t0))


@pytest.fixture
def server(colour_index: Path, tmp_path: Path):
    log = open(tmp_path / "server.log", "w")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_load_server.py")), str(colour_index),
                             TOKEN, str(MAX_UPLOAD)], stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith("port "):
            proc.kill()
            pytest.fail(f"server did not start: {(tmp_path / 'server.log').read_text()[-2000:]}")
        yield proc, int(line.split()[1])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_concurrent_mixed_load_has_no_5xx_every_bad_request_a_4xx_and_flat_memory(server) -> None:
    proc, port = server
    bilevel_cache["giga"] = bilevel_png(40000, 40000)  # 1.6 Gpx, ~200 kB
    bilevel_cache["mega"] = bilevel_png(8000, 8000)  # 64 Mpx, ~8 kB
    rngs = [random.Random(1000 + t) for t in range(THREADS)]
    mixes = [make_mix(r) for r in rngs]
    # Warm-up through every route (first imports, allocator pools), then the baseline.
    warm: list[tuple[str, int, int, float]] = []
    client(port, make_mix(random.Random(7))[:60], time.monotonic() + MAX_SECONDS, warm)
    assert all(s == e for _, e, s, _ in warm), [w for w in warm if w[1] != w[2]]
    before = _vm(proc.pid)

    results: list[list[tuple[str, int, int, float]]] = [[] for _ in range(THREADS)]
    start = time.monotonic()
    deadline = start + MAX_SECONDS
    threads = [threading.Thread(target=client, args=(port, mixes[t], deadline, results[t])) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - start
    after = _vm(proc.pid)
    assert proc.poll() is None, "the server died"

    flat = [r for rs in results for r in rs]
    lat = np.array([r[3] for r in flat]) * 1000
    figures = {
        "requests": len(flat), "threads": THREADS, "seconds": round(wall, 1),
        "requests_per_s": round(len(flat) / wall, 1),
        "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
        "by_kind_p50_p99_ms": {k: [round(float(np.percentile(lat[[r[0] == k for r in flat]], q)), 1)
                                   for q in (50, 99)] for k in sorted({r[0] for r in flat})},
        "status_counts": {str(s): sum(1 for r in flat if r[2] == s) for s in sorted({r[2] for r in flat})},
        "rss_mb_before": round(before["VmRSS"], 1), "rss_mb_after": round(after["VmRSS"], 1),
        "peak_rss_mb_before": round(before["VmHWM"], 1), "peak_rss_mb_after": round(after["VmHWM"], 1),
    }
    print("\nload test:", json.dumps(figures))

    assert len(flat) >= THREADS * 50, f"only {len(flat)} requests in {MAX_SECONDS} s"  # the run did real work
    wrong = [r for r in flat if r[2] != r[1]]
    assert not [r for r in flat if r[2] >= 500 or r[2] < 0], wrong[:10]
    assert not wrong, wrong[:10]  # every good request 200, every bad one its 4xx
    assert sum(1 for r in flat if r[0] == "bomb") >= THREADS
    assert after["VmRSS"] - before["VmRSS"] <= RSS_GROWTH_LIMIT_MB, figures
    # No bomb was ever decoded: the peak did not move by anything near one decoded image either.
    assert after["VmHWM"] - before["VmHWM"] <= RSS_GROWTH_LIMIT_MB, figures
