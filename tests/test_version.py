"""``itrkit --version`` names the installed version, the one pyproject.toml declares."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import itrkit
from itrkit.cli import package_version

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))


def test_itrkit_version_prints_the_pyproject_version() -> None:
    want = PYPROJECT["project"]["version"]
    out = subprocess.run([sys.executable, "-m", "itrkit", "--version"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"itrkit {want}"
    assert itrkit.__version__ == want == package_version()


def test_version_falls_back_to_the_source_tree_when_not_installed(monkeypatch) -> None:
    import importlib.metadata as md

    def missing(name: str) -> str:
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "version", missing)
    assert package_version() == itrkit.__version__
