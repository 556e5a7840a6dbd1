"""A damaged index or a model that does not match it, through the real CLI (``itrkit.cli.main``).

Every file of a faiss-flat index (manifest, items, both safetensors, the three faiss files) is
truncated or has one bit flipped. ``itrkit search`` and ``itrkit serve`` each answer with one
``error:`` line naming that file and exit 2: no traceback, no wrong results, and the server
never starts listening. The same for an index searched or served with another model.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

import itrkit.cli.index as index_cli
from itrkit.cli import main

_spec = importlib.util.spec_from_file_location("itrkit_tests_index_fixtures",
                                               Path(__file__).resolve().parents[1] / "index" / "conftest.py")
assert _spec is not None and _spec.loader is not None
_fixtures = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_fixtures)
ColourEncoder = _fixtures.ColourEncoder

FILES = ["manifest.json", "items.json", "images.safetensors", "captions.safetensors", "image_embeds.faiss",
         "image_uni.faiss", "text_embeds.faiss"]


@pytest.fixture
def loader(monkeypatch: pytest.MonkeyPatch) -> None:
    # A run folder whose name contains "other" holds a different model (other weights).
    monkeypatch.setattr(index_cli, "load_encoder",
                        lambda run_dir: ColourEncoder(salt="other" if "other" in str(run_dir) else ""))


@pytest.fixture
def no_listen(monkeypatch: pytest.MonkeyPatch) -> list:
    """Replaces uvicorn.run: records a server that would have started."""
    import uvicorn

    started: list = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.append((app, kw)))
    return started


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("integrity")
    data = _fixtures.make_colour_dataset(root / "images")
    data.save(root / "data")
    mp = pytest.MonkeyPatch()
    mp.setattr(index_cli, "load_encoder", lambda run_dir: ColourEncoder())
    try:
        assert main(["index", "build", "--run", str(root / "run"), "--images", str(root / "data"),
                     "--out", str(root / "index"), "--backend", "faiss-flat", "--quiet"]) == 0
    finally:
        mp.undo()
    assert sorted(p.name for p in (root / "index").iterdir()) == sorted(FILES)
    return root / "index"


def one_error(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


def damage(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncated":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:  # one bit in the middle of the file
        data[len(data) // 2] ^= 0x10
        path.write_bytes(bytes(data))


def test_the_intact_index_searches_and_serves(built: Path, loader, no_listen, capsys) -> None:
    assert main(["search", "--index", str(built), "--text", "a red square", "-k", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[2] == "red"
    assert main(["serve", "--index", str(built), "--quiet"]) == 0 and len(no_listen) == 1


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
@pytest.mark.parametrize("name", FILES)
def test_a_damaged_index_file_is_one_line_naming_it(built: Path, tmp_path: Path, name: str, how: str, loader,
                                                    no_listen, capsys) -> None:
    index = tmp_path / "index"
    shutil.copytree(built, index)
    damage(index / name, how)
    assert main(["search", "--index", str(index), "--text", "a red square"]) == 2
    line = one_error(capsys)
    assert f"{index / name}:" in line, line
    assert capsys.readouterr().out == ""  # no results from a damaged index
    # The service refuses to start on it, with the same line, instead of answering 500s.
    assert main(["serve", "--index", str(index), "--quiet"]) == 2
    assert one_error(capsys) == line and no_listen == []


def test_a_model_other_than_the_indexs_is_one_line_at_search_and_at_serve_startup(built: Path, tmp_path: Path,
                                                                                  loader, no_listen,
                                                                                  capsys) -> None:
    other = str(tmp_path / "other-run")
    assert main(["search", "--index", str(built), "--text", "red", "--run", other]) == 2
    line = one_error(capsys)
    assert line.startswith(f"error: {built / 'manifest.json'}: index was built with model ")
    assert main(["serve", "--index", str(built), "--run", other]) == 2
    assert one_error(capsys) == line and no_listen == []


def test_serve_checks_the_model_the_index_names_at_startup(built: Path, monkeypatch: pytest.MonkeyPatch,
                                                           no_listen, capsys) -> None:
    # The run named in the manifest now holds retrained weights.
    monkeypatch.setattr(index_cli, "load_encoder", lambda run_dir: ColourEncoder(salt="retrained"))
    assert main(["serve", "--index", str(built)]) == 2
    assert "index was built with model" in one_error(capsys) and no_listen == []


def test_a_bit_flip_that_keeps_the_manifest_valid_json_is_caught_by_its_own_checksum(built: Path, tmp_path: Path,
                                                                                     loader, capsys) -> None:
    index = tmp_path / "index"
    shutil.copytree(built, index)
    text = (index / "manifest.json").read_text()
    assert '"dim": 32' in text
    # '2' -> '3' is one bit (0x32 ^ 0x01): still JSON, now a different dimension.
    (index / "manifest.json").write_text(text.replace('"dim": 32', '"dim": 33'))
    assert main(["search", "--index", str(index), "--text", "a red square"]) == 2
    assert one_error(capsys) == (f"error: {index / 'manifest.json'}: checksum does not match its contents "
                                 "(damaged or edited; rebuild the index)")
