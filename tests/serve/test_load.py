"""Load test: 8 client threads x 250 mixed requests against a real server process on 127.0.0.1.

Good requests (text search, photo search by image and by caption, image download, health) and bad
ones (empty or over-long query, bad k, unknown id, path traversal, a non-image, a 1.6-gigapixel
PNG of 200 kB, a 64-megapixel one, an upload over the byte limit, no or a wrong token) are
interleaved. Claims: no 5xx and no dropped connection, every good request 200, every bad one the
expected 4xx, and the server's resident memory grows by at most 50 MB over the run (a decoded bomb
alone would add over 60 MB). Bounded by count (250 requests per thread, a 30 s socket timeout per
request); it stops by itself and reads no clock: latency and throughput are measured by
``benchmarks/bench_serve_load.py`` (the same mix, the same server). RSS before / after is printed:
``pytest -s tests/serve/test_load.py``. ``ITRKIT_LOAD_PER_THREAD`` raises the count for a soak.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import random
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image

from tests.serve._helpers import bilevel_png

REPO = Path(__file__).resolve().parents[2]
# A longer soak: ITRKIT_LOAD_PER_THREAD=2500 pytest -s tests/serve/test_load.py
THREADS = 8
PER_THREAD = int(os.environ.get("ITRKIT_LOAD_PER_THREAD", "250"))
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


def client(port: int, reqs: list[Request], out: list[tuple[str, int, int, float]],
           clock: Callable[[], float] | None = None) -> None:
    """Send ``reqs`` in order on one connection; ``out`` gets (kind, expected, status, seconds).
    Seconds are measured only with a ``clock`` (the benchmark's); the test passes none."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    for req in reqs:
        t0 = clock() if clock else 0.0
        try:
            status = send(conn, req)
        except (OSError, http.client.HTTPException) as e:  # a dropped connection counts as a failure
            status = -1
            print(f"connection error on {req.method} {req.path[:60]}: {e!r}", file=sys.stderr)
            conn.close()
        out.append((req.kind, req.expect, status, (clock() - t0) if clock else 0.0))


def run_load(port: int, clock: Callable[[], float] | None = None) -> list[tuple[str, int, int, float]]:
    """THREADS clients, each with its own seeded mix of PER_THREAD requests, at once."""
    bilevel_cache["giga"] = bilevel_png(40000, 40000)  # 1.6 Gpx, ~200 kB
    bilevel_cache["mega"] = bilevel_png(8000, 8000)  # 64 Mpx, ~8 kB
    mixes = [make_mix(random.Random(1000 + t)) for t in range(THREADS)]
    results: list[list[tuple[str, int, int, float]]] = [[] for _ in range(THREADS)]
    threads = [threading.Thread(target=client, args=(port, mixes[t], results[t], clock)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for rs in results for r in rs]


@contextlib.contextmanager
def load_server(index: Path, folder: Path) -> Iterator[tuple[subprocess.Popen, int]]:
    """The real service in its own process on 127.0.0.1 (a free port), with a token and an upload limit."""
    log = open(folder / "server.log", "w")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), str(REPO)])}
    proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("_load_server.py")), str(index),
                             TOKEN, str(MAX_UPLOAD)], stdout=subprocess.PIPE, stderr=log, text=True, env=env)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        if not line.startswith("port "):
            proc.kill()
            raise RuntimeError(f"server did not start: {(folder / 'server.log').read_text()[-2000:]}")
        yield proc, int(line.split()[1])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.fixture
def server(colour_index: Path, tmp_path: Path):
    with load_server(colour_index, tmp_path) as srv:
        yield srv


def test_concurrent_mixed_load_has_no_5xx_every_bad_request_a_4xx_and_flat_memory(server) -> None:
    proc, port = server
    # Warm-up through every route (first imports, allocator pools), then the baseline.
    warm: list[tuple[str, int, int, float]] = []
    bilevel_cache["giga"] = bilevel_png(40000, 40000)
    bilevel_cache["mega"] = bilevel_png(8000, 8000)
    client(port, make_mix(random.Random(7))[:60], warm)
    assert all(s == e for _, e, s, _ in warm), [w for w in warm if w[1] != w[2]]
    before = _vm(proc.pid)
    flat = run_load(port)
    after = _vm(proc.pid)
    assert proc.poll() is None, "the server died"
    figures = {
        "requests": len(flat), "threads": THREADS,
        "status_counts": {str(s): sum(1 for r in flat if r[2] == s) for s in sorted({r[2] for r in flat})},
        "rss_mb_before": round(before["VmRSS"], 1), "rss_mb_after": round(after["VmRSS"], 1),
        "peak_rss_mb_before": round(before["VmHWM"], 1), "peak_rss_mb_after": round(after["VmHWM"], 1),
    }
    print("\nload test:", json.dumps(figures))

    assert len(flat) == THREADS * PER_THREAD  # every request was sent and answered
    wrong = [r for r in flat if r[2] != r[1]]
    assert not [r for r in flat if r[2] >= 500 or r[2] < 0], wrong[:10]
    assert not wrong, wrong[:10]  # every good request 200, every bad one its 4xx
    assert sum(1 for r in flat if r[0] == "bomb") >= THREADS
    assert after["VmRSS"] - before["VmRSS"] <= RSS_GROWTH_LIMIT_MB, figures
    # No bomb was ever decoded: the peak did not move by anything near one decoded image either.
    assert after["VmHWM"] - before["VmHWM"] <= RSS_GROWTH_LIMIT_MB, figures
