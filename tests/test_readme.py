"""The README works as written: every Python snippet runs (in order, in one namespace, in a folder
laid out as the snippets assume, on a small synthetic set with the training budget cut to one
epoch), and every ``itrkit`` command line in it parses with today's CLI."""

from __future__ import annotations

import re
import shlex
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import pixel_grid_store

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


def _commands() -> list[str]:
    out = []
    for block in _blocks("bash"):
        text = block.replace("\\\n", " ")
        for line in text.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("torchrun"):
                line = line[line.index("-m itrkit") + len("-m "):] if "-m itrkit" in line else ""
            if line.startswith("itrkit "):
                out.append(line)
    return out


def test_the_readme_has_snippets_and_commands() -> None:
    assert len(_blocks("python")) >= 3 and len(_commands()) >= 20


@pytest.mark.parametrize("line", _commands())
def test_every_cli_command_of_the_readme_parses(line: str) -> None:
    from itrkit.cli import build_parser

    argv = shlex.split(line)[1:]
    args = build_parser().parse_args(argv)  # SystemExit (exit 2) on an unknown command or flag
    assert callable(args.func)



def test_every_python_snippet_of_the_readme_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from itrkit.data.records import Dataset
    from itrkit.data.synthetic import make_synthetic
    from itrkit.teachers.extract import teach
    from itrkit.train import trainer

    make_synthetic(tmp_path / "data" / "f8k", n_images=60, captions_per_image=2, seed=7, size=32)
    ds = Dataset.load(tmp_path / "data" / "f8k")
    teach(ds.split("train"), "tiny-image", "tiny-text", tmp_path / "teachers")
    pixel_grid_store(ds, tmp_path / "grid.store")
    shutil.copytree(REPO / "configs", tmp_path / "configs")
    real = trainer.train
    runs = []

    def small(cfg, *a, **kw):  # the snippets' configs with one short epoch and batches that fit
        cfg.stages = [replace(s, epochs=1) for s in cfg.stages[:1]]
        cfg.batch_size, cfg.threads = 16, 1
        runs.append(cfg.out)
        return real(cfg, *a, **{**kw, "progress": False})

    monkeypatch.setattr(trainer, "train", small)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in _blocks("python"):
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
    assert runs == ["runs/infonce", "runs/cusa", "runs/sgr", "runs/saf", "runs/sgr_cusa"]
    assert all((tmp_path / r / "metrics.json").is_file() for r in runs)
