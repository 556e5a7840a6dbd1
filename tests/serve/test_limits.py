"""The service's limits: concurrency (503 + Retry-After), request timeout, pixel limit, bearer token.

Concurrency and timeouts run against a real uvicorn server on 127.0.0.1 with an encoder that blocks
until the test lets it go, so "in flight" is a fact of the test, not a race.
"""

from __future__ import annotations

import functools
import http.client
import io
import json
import socket
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from itrkit.serve.app import create_app
from tests.serve._helpers import bilevel_png, live_server

TOKEN = "s3cret-token-for-tests-0123456789"


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def assert_error(response, status: int, match: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and match in body["error"], body


@functools.cache
def bomb(side: int) -> bytes:
    return bilevel_png(side, side)


def request(base: str, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], dict]:
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, json.loads(r.read() or b"{}")
    finally:
        conn.close()


def wait_until(cond, what: str) -> None:
    deadline = time.monotonic() + 30
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.01)


@pytest.fixture
def gated(make_encoder):
    """An encoder whose text queries block until ``gate`` is set; ``entered`` counts queries that began."""

    class Gated(make_encoder):
        gate = threading.Event()
        entered = 0

        def encode_texts(self, texts):
            if texts and texts[0].startswith("slow"):
                type(self).entered += 1
                assert self.gate.wait(60)
            return super().encode_texts(texts)

    yield Gated()
    Gated.gate.set()  # never leave a server thread blocked


def test_saturated_server_answers_503_with_retry_after(colour_index: Path, gated) -> None:
    app = create_app(colour_index, encoder=gated, max_concurrent=2)
    limits = app.state.limits
    with live_server(app) as base:
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(request(base, "GET", "/api/search?q=slow+red")[0]))
                   for _ in range(2)]
        for t in threads:
            t.start()
        wait_until(lambda: limits.in_flight == 2, "two requests in flight")
        status, headers, body = request(base, "GET", "/api/search?q=blue")
        assert status == 503 and headers["retry-after"] == "1" and "server busy" in body["error"]
        status, _, body = request(base, "GET", "/images/red")  # every data route counts
        assert status == 503
        # The health check is not counted, so a monitor still sees the server.
        assert request(base, "GET", "/api/health")[0] == 200
        gated.gate.set()
        for t in threads:
            t.join()
        assert results == [200, 200] and limits.refused == 2
        wait_until(lambda: limits.in_flight == 0, "slots freed")
        status, _, body = request(base, "GET", "/api/search?q=blue&k=1")
        assert status == 200 and body["results"][0]["id"] == "blue"


def test_a_request_past_the_timeout_is_503_and_keeps_its_slot_until_the_work_stops(colour_index: Path,
                                                                                  gated) -> None:
    app = create_app(colour_index, encoder=gated, max_concurrent=1, request_timeout=0.3)
    limits = app.state.limits
    with live_server(app) as base:
        status, headers, body = request(base, "GET", "/api/search?q=slow+red")
        assert status == 503 and headers["retry-after"] == "1"
        assert body == {"error": "request took longer than 0.3 s"}
        # The query is still inside the model: its slot stays taken, so timed-out work cannot pile up.
        assert gated.entered == 1 and limits.in_flight == 1 and limits.timed_out == 1
        assert request(base, "GET", "/api/search?q=blue")[0] == 503
        gated.gate.set()
        wait_until(lambda: limits.in_flight == 0, "the slot freed once the query finished")
        status, _, body = request(base, "GET", "/api/search?q=green&k=1")
        assert status == 200 and body["results"][0]["id"] == "green"


def test_an_upload_that_stops_halfway_is_408(colour_index: Path, colour_encoder) -> None:
    app = create_app(colour_index, encoder=colour_encoder, request_timeout=0.3)
    with live_server(app) as base:
        url = urlsplit(base)
        with socket.create_connection((url.hostname, url.port), timeout=30) as s:
            s.sendall(b"POST /api/search/image HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                      b"boundary=b\r\nContent-Length: 5000\r\n\r\n--b\r\n")  # then nothing
            reply = b""
            while b"\r\n\r\n" not in reply or not reply.rstrip().endswith(b"}"):
                chunk = s.recv(4096)
                if not chunk:
                    break
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 408 ") and b"request body not received within 0.3 s" in reply
        # The abandoned handler is woken by the server (client gone) and frees its slot.
        wait_until(lambda: app.state.limits.in_flight == 0, "the upload's slot freed")
        assert request(base, "GET", "/api/health")[0] == 200


@pytest.mark.parametrize("side,match", [(8000, "8000x8000 pixels is too large"),
                                        (40000, "decompression bomb")])
def test_a_small_png_that_decodes_to_a_huge_image_is_413(colour_index: Path, colour_encoder, side: int,
                                                         match: str) -> None:
    data = bomb(side)
    assert len(data) < 250_000  # tiny on the wire: 64 Mpx / 1.6 Gpx once decoded
    client = TestClient(create_app(colour_index, encoder=colour_encoder))
    r = client.post("/api/search/image", files={"file": ("b.png", data, "image/png")})
    assert_error(r, 413, match)
    # The same image small enough is a valid query: the refusal is about pixels, not the format.
    ok = client.post("/api/search/image", files={"file": ("s.png", bilevel_png(64, 64), "image/png")},
                     data={"k": "1", "mode": "caption"})
    assert ok.status_code == 200 and ok.json()["results"][0]["id"] == "blue-black"


def test_the_pixel_limit_is_a_setting(colour_index: Path, colour_encoder) -> None:
    client = TestClient(create_app(colour_index, encoder=colour_encoder, max_pixels=30 * 30))
    photo = png(Image.new("RGB", (31, 30), (220, 30, 30)))
    assert_error(client.post("/api/search/image", files={"file": ("p.png", photo, "image/png")}), 413,
                 "31x30 pixels is too large (at most 900 pixels)")
    photo = png(Image.new("RGB", (30, 30), (220, 30, 30)))
    r = client.post("/api/search/image", files={"file": ("p.png", photo, "image/png")}, data={"k": "1"})
    assert r.status_code == 200 and r.json()["results"][0]["id"] == "red"


def test_with_a_token_data_needs_the_bearer_header_and_the_page_does_not(colour_index: Path,
                                                                          colour_encoder) -> None:
    client = TestClient(create_app(colour_index, encoder=colour_encoder, token=TOKEN))
    good = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/api/search?q=red", "/api/health", "/images/red", "/images/nope", "/api/nothing"):
        r = client.get(path)
        assert_error(r, 401, "access token")
        assert r.headers["www-authenticate"].startswith("Bearer")
        for bad in ({"Authorization": f"Bearer {TOKEN[:-1]}"}, {"Authorization": f"Bearer {TOKEN}x"},
                    {"Authorization": f"Basic {TOKEN}"}, {"Authorization": "Bearer"}):
            assert client.get(path, headers=bad).status_code == 401
    r = client.post("/api/search/image", files={"file": ("r.png", png(Image.new("RGB", (8, 8))), "image/png")})
    assert r.status_code == 401
    assert client.get("/api/search", params={"q": "red", "k": 1}, headers=good).json()["results"][0]["id"] == "red"
    assert client.get("/images/red", headers=good).status_code == 200
    assert client.get("/images/nope", headers=good).status_code == 404
    # The page and its scripts hold no data: a browser loads them, then asks for the token.
    assert client.get("/").status_code == 200 and client.get("/static/app.js").status_code == 200
    assert "Authorization" in client.get("/static/app.js").text


def test_an_image_changed_after_indexing_is_not_served(colour_index: Path, colour_encoder,
                                                       colour_dataset) -> None:
    client = TestClient(create_app(colour_index, encoder=colour_encoder))
    path = colour_dataset[0].path
    assert client.get("/images/red").content == path.read_bytes()
    Image.new("RGB", (48, 48), (0, 0, 0)).save(path)  # another picture under the indexed name
    assert_error(client.get("/images/red"), 404, "image file for id 'red' changed since the index was built")
    assert client.get("/images/green").status_code == 200
