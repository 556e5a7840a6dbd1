"""The ``index build`` / ``search`` / ``serve`` subcommands, with the model loader replaced."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import itrkit.cli.index as cli
from itrkit.errors import ConfigError, StoreError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="itrkit")
    cli.add_parsers(p.add_subparsers(dest="cmd", required=True))
    return p


def run(argv: list[str]) -> int:
    args = parser().parse_args(argv)
    return args.func(args)


@pytest.fixture
def loader(monkeypatch: pytest.MonkeyPatch, make_encoder):
    seen: list[str] = []

    def fake_load(run_dir):
        seen.append(str(run_dir))
        return make_encoder(salt="" if "other" not in str(run_dir) else "other")

    monkeypatch.setattr(cli, "load_encoder", fake_load)
    return seen


def test_build_then_search_text_and_image(tmp_path: Path, colour_dataset, loader, capsys) -> None:
    colour_dataset.save(tmp_path / "data")
    out = tmp_path / "ix"
    assert run(["index", "build", "--run", str(tmp_path / "run"), "--images", str(tmp_path / "data"),
                "--out", str(out), "--backend", "faiss-flat", "--split", "test", "--quiet"]) == 0
    assert "indexed 8 images and 16 captions (faiss-flat)" in capsys.readouterr().out
    assert (out / "image_embeds.faiss").is_file()

    assert run(["search", "--index", str(out), "--text", "a yellow thing", "-k", "2", "--format", "json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    assert [r["id"] for r in results][0] == "yellow" and len(results) == 2
    # The index remembers its run: search loaded the model from there.
    assert loader[-1] == str((tmp_path / "run").resolve())

    assert run(["search", "--index", str(out), "--image", str(colour_dataset[1].path), "-k", "3"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[1].split()[2] == "green"

    assert run(["search", "--index", str(out), "--image", str(colour_dataset[1].path), "--mode", "caption",
                "-k", "1", "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["results"][0]["caption_id"].startswith("green#")


def test_search_with_a_different_model_is_refused(colour_index: Path, loader) -> None:
    with pytest.raises(StoreError, match="built with model"):
        run(["search", "--index", str(colour_index), "--text", "red", "--run", str(colour_index / "other")])


def test_search_needs_a_run_when_the_index_names_none(tmp_path: Path, colour_dataset, colour_encoder,
                                                      loader) -> None:
    from itrkit.index.build import build_index

    out = build_index(colour_encoder, colour_dataset, tmp_path / "ix", progress=False)
    with pytest.raises(ConfigError, match="--run"):
        run(["search", "--index", str(out), "--text", "red"])
    assert run(["search", "--index", str(out), "--text", "red", "--run", str(tmp_path)]) == 0


def test_argument_errors() -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["search", "--index", "x", "--text", "a", "--image", "b"])
    with pytest.raises(SystemExit):
        parser().parse_args(["index", "build", "--run", "r", "--images", "i", "--out", "o", "--backend", "annoy"])
    args = parser().parse_args(["serve", "--index", "x"])
    assert (args.host, args.port, args.func) == ("127.0.0.1", 8000, cli.cmd_serve)
