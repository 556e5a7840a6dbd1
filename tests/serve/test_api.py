"""The JSON API and the page, through FastAPI's test client."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from itrkit.index.build import build_index, load_index
from itrkit.index.search import search_text
from itrkit.serve.app import MAX_UPLOAD_BYTES, create_app


@pytest.fixture
def client(colour_index: Path, colour_encoder) -> TestClient:
    return TestClient(create_app(colour_index, encoder=colour_encoder))


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def assert_error(response, status: int, match: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and match in body["error"], body


def test_health_and_page(client: TestClient) -> None:
    h = client.get("/api/health").json()
    assert h == {"status": "ok", "images": 8, "captions": 16, "backend": "exact", "dim": 32,
                 "image_search": True, "caption_search": True, "model_loaded": True, "dataset": "colours"}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script src="/static/app.js">' in page.text and 'id="q"' in page.text
    for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        r = client.get(f"/static/{name}")
        assert r.status_code == 200 and kind in r.headers["content-type"]
    # Nothing outside the static folder is reachable through it.
    assert client.get("/static/../app.py").status_code == 404


def test_text_search(client: TestClient, colour_index: Path, colour_encoder) -> None:
    r = client.get("/api/search", params={"q": "a red square", "k": 3})
    assert r.status_code == 200
    body = r.json()
    assert body["query"] == "a red square" and body["k"] == 3
    expected = search_text(load_index(colour_index), colour_encoder, "a red square", 3)
    assert body["results"] == [{k: v for k, v in e.items() if k != "path"} for e in expected]
    # "a red square": one of three unit words lands on the red bin of a pure red image.
    assert body["results"][0] == {"id": "red", "score": pytest.approx(3 ** -0.5, abs=1e-6), "url": "/images/red",
                                  "captions": ["a red square", "a plain red picture"]}
    assert all("path" not in res for res in body["results"])


@pytest.mark.parametrize("params,match", [
    ({}, "empty query"), ({"q": ""}, "empty query"), ({"q": "   "}, "empty query"),
    ({"q": "x" * 501}, "too long"), ({"q": "red", "k": "0"}, "between 1 and 100"),
    ({"q": "red", "k": "101"}, "between 1 and 100"), ({"q": "red", "k": "ten"}, "integer"),
])
def test_bad_text_queries_are_400_and_the_server_keeps_serving(client: TestClient, params, match) -> None:
    assert_error(client.get("/api/search", params=params), 400, match)
    assert client.get("/api/search", params={"q": "blue", "k": 1}).json()["results"][0]["id"] == "blue"


def test_images_are_served_by_id_only(client: TestClient, colour_dataset) -> None:
    r = client.get("/images/red")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content == colour_dataset[0].path.read_bytes()
    assert_error(client.get("/images/nope"), 404, "unknown image id 'nope'")
    assert_error(client.get("/images/..%2F..%2Fetc%2Fpasswd"), 404, "unknown image id")
    # An absolute path of an indexed file is not an id either.
    assert_error(client.get(f"/images/{colour_dataset[0].path}"), 404, "unknown image id")


def test_missing_image_file_is_404(client: TestClient, colour_dataset) -> None:
    colour_dataset[3].path.unlink()
    assert_error(client.get("/images/yellow"), 404, "missing on the server")


def test_unknown_route_is_json_404(client: TestClient) -> None:
    assert_error(client.get("/api/nothing"), 404, "Not Found")


def test_search_by_photo(client: TestClient, colour_dataset) -> None:
    data = colour_dataset[6].path.read_bytes()  # red/white stripes
    r = client.post("/api/search/image", files={"file": ("me.png", data, "image/png")}, data={"k": "3"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["mode"] == "image" and body["k"] == 3
    assert body["results"][0]["id"] == "red-white" and body["results"][0]["score"] == pytest.approx(1.0, abs=1e-6)
    assert all("path" not in res for res in body["results"])
    photo = png(Image.new("RGB", (40, 30), (40, 60, 210)))
    r = client.post("/api/search/image", files={"file": ("blue.png", photo, "image/png")},
                    data={"k": "2", "mode": "caption"})
    res = r.json()["results"]
    assert [x["id"] for x in res] == ["blue", "blue"] and {x["caption_id"] for x in res} == {"blue#0", "blue#1"}


def test_bad_uploads(client: TestClient) -> None:
    url = "/api/search/image"
    assert_error(client.post(url, files={"file": ("a.png", b"this is text", "image/png")}), 415,
                 "not a readable image")
    assert_error(client.post(url, files={"file": ("a.png", b"", "image/png")}), 400, "empty")
    assert_error(client.post(url, data={"k": "3"}), 400, "no file")
    good = png(Image.new("RGB", (8, 8), (1, 2, 3)))
    assert_error(client.post(url, files={"file": ("a.png", good, "image/png")}, data={"mode": "x"}), 400,
                 "unknown mode")
    assert_error(client.post(url, files={"file": ("a.png", good, "image/png")}, data={"k": "500"}), 400,
                 "between 1 and 100")
    # One byte over the 10 MB limit.
    big = b"\x89PNG" + b"\0" * (MAX_UPLOAD_BYTES - 3)
    assert_error(client.post(url, files={"file": ("big.png", big, "image/png")}), 413, "too large")
    assert client.get("/api/health").status_code == 200


def test_upload_limit_is_checked_before_and_after_parsing(colour_index: Path, colour_encoder) -> None:
    small = TestClient(create_app(colour_index, encoder=colour_encoder, max_upload_bytes=1000))
    url = "/api/search/image"
    photo = png(Image.effect_noise((64, 64), 60).convert("RGB"))
    assert len(photo) > 1000
    # Within the multipart slack: refused after reading at most limit + 1 bytes of the file.
    assert_error(small.post(url, files={"file": ("n.png", photo, "image/png")}), 413, "too large")
    # Far over: refused from the Content-Length header alone.
    assert_error(small.post(url, files={"file": ("n.png", b"\0" * 200_000, "image/png")}), 413, "too large")


def test_upload_with_too_many_pixels_is_413(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    import itrkit.index.search as search_mod

    monkeypatch.setattr(search_mod, "MAX_PIXELS", 100)
    photo = png(Image.new("RGB", (20, 20)))
    assert_error(client.post("/api/search/image", files={"file": ("p.png", photo, "image/png")}), 413, "20x20")


def test_model_is_loaded_lazily_from_the_run(colour_index: Path, make_encoder,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    import itrkit.models

    calls: list[str] = []

    def fake_load_model(run_dir):
        calls.append(run_dir)
        return make_encoder()

    monkeypatch.setattr(itrkit.models, "load_model", fake_load_model)
    client = TestClient(create_app(colour_index))
    assert client.get("/api/health").json()["model_loaded"] is False and calls == []
    assert client.get("/api/search", params={"q": "orange"}).json()["results"][0]["id"] == "orange"
    assert client.get("/api/search", params={"q": "green"}).json()["results"][0]["id"] == "green"
    assert calls == [load_index(colour_index).run_dir]
    assert client.get("/api/health").json()["model_loaded"] is True


def test_a_model_that_does_not_match_is_503_and_health_still_answers(colour_index: Path, make_encoder,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import itrkit.models

    monkeypatch.setattr(itrkit.models, "load_model", lambda run_dir: make_encoder(salt="retrained"))
    client = TestClient(create_app(colour_index))
    assert_error(client.get("/api/search", params={"q": "red"}), 503, "built with model")
    assert client.get("/api/health").status_code == 200


def test_index_without_run_or_usa_head(tmp_path: Path, colour_dataset, make_encoder) -> None:
    enc = make_encoder(with_uni=False)
    out = build_index(enc, colour_dataset, tmp_path / "ix", progress=False)
    assert_error(TestClient(create_app(out)).get("/api/search", params={"q": "red"}), 503, "model run")
    client = TestClient(create_app(out, encoder=enc))
    assert client.get("/api/health").json()["image_search"] is False
    photo = colour_dataset[0].path.read_bytes()
    assert_error(client.post("/api/search/image", files={"file": ("r.png", photo, "image/png")}), 400,
                 "no USA head")
