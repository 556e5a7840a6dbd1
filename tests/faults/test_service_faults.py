"""``itrkit serve`` faults through the real CLI: a public bind without a token, a weak token, and
what a server started with a token or with ``--insecure-public`` then answers.

Nothing here listens on a network: ``uvicorn.run`` is replaced by a recorder, and the app it would
have served is driven through FastAPI's in-process test client.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import itrkit.cli.index as index_cli
from itrkit.cli import main
from itrkit.index.build import build_index

_spec = importlib.util.spec_from_file_location("itrkit_tests_index_fixtures",
                                               Path(__file__).resolve().parents[1] / "index" / "conftest.py")
assert _spec is not None and _spec.loader is not None
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)

TOKEN = "a-long-enough-test-token-42"


@pytest.fixture
def index(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(index_cli, "load_encoder", lambda run_dir: _fixtures.ColourEncoder())
    monkeypatch.delenv(index_cli.TOKEN_ENV, raising=False)
    ds = _fixtures.make_colour_dataset(tmp_path / "images")
    return build_index(_fixtures.ColourEncoder(), ds, tmp_path / "index", run_dir=tmp_path / "run", progress=False)


@pytest.fixture
def listened(monkeypatch: pytest.MonkeyPatch) -> list:
    import uvicorn

    started: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append((app, kw)))
    return started


def one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "myhost.example"])
def test_a_public_bind_without_a_token_is_refused(index: Path, host: str, listened, capsys) -> None:
    assert main(["serve", "--index", str(index), "--host", host]) == 2
    line = one_error(capsys)
    assert f"--host {host} is not a loopback address" in line and "--token" in line and "--insecure-public" in line
    assert listened == []


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "localhost", "::1"])
def test_loopback_needs_no_token(index: Path, host: str, listened) -> None:
    assert main(["serve", "--index", str(index), "--host", host, "--quiet"]) == 0
    app, kw = listened[0]
    assert kw["host"] == host
    assert TestClient(app).get("/api/search", params={"q": "red"}).status_code == 200


def test_a_short_token_is_refused(index: Path, listened, capsys) -> None:
    assert main(["serve", "--index", str(index), "--host", "0.0.0.0", "--token", "hunter2"]) == 2
    assert "at least 16 characters" in one_error(capsys) and listened == []


@pytest.mark.parametrize("source", ["flag", "env"])
def test_a_public_bind_with_a_token_serves_only_bearers(index: Path, source: str, listened,
                                                        monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    argv = ["serve", "--index", str(index), "--host", "0.0.0.0", "--quiet"]
    if source == "flag":
        argv += ["--token", TOKEN]
    else:  # kept out of the process list
        monkeypatch.setenv(index_cli.TOKEN_ENV, TOKEN)
    assert main(argv) == 0
    assert "bearer token required" in capsys.readouterr().err
    client = TestClient(listened[0][0])
    assert client.get("/api/search", params={"q": "red"}).status_code == 401
    assert client.get("/images/red").status_code == 401
    assert client.get("/api/search", params={"q": "red"}, headers={"Authorization": "Bearer nope"}).status_code == 401
    r = client.get("/api/search", params={"q": "red", "k": 1}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200 and r.json()["results"][0]["id"] == "red"


def test_insecure_public_is_an_explicit_choice_and_says_so(index: Path, listened, capsys) -> None:
    assert main(["serve", "--index", str(index), "--host", "0.0.0.0", "--insecure-public"]) == 0
    assert "no token: anyone who can reach it may search" in capsys.readouterr().err
    assert TestClient(listened[0][0]).get("/images/red").status_code == 200


def test_serve_flags_reach_the_app(index: Path, listened) -> None:
    assert main(["serve", "--index", str(index), "--max-concurrent", "3", "--timeout", "0", "--max-pixels", "100",
                 "--max-upload-mb", "0.5", "--quiet"]) == 0
    app = listened[0][0]
    assert app.state.limits.max_concurrent == 3 and app.state.limits.timeout is None
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (11, 10)).save(buf, format="PNG")
    r = TestClient(app).post("/api/search/image", files={"file": ("p.png", buf.getvalue(), "image/png")})
    assert r.status_code == 413 and "11x10" in r.json()["error"]
    with pytest.raises(SystemExit):
        main(["serve", "--index", str(index), "--max-concurrent", "0"])


def test_an_index_that_names_no_run_is_a_startup_error(tmp_path: Path, listened, capsys,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(index_cli, "load_encoder", lambda run_dir: _fixtures.ColourEncoder())
    ds = _fixtures.make_colour_dataset(tmp_path / "images")
    out = build_index(_fixtures.ColourEncoder(), ds, tmp_path / "ix", progress=False)
    assert main(["serve", "--index", str(out)]) == 2
    assert "names no model run; pass --run" in one_error(capsys) and listened == []
