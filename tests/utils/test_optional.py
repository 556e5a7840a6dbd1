"""Optional dependencies: ``require`` imports a package or says in one line which extra installs it."""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from itrkit.errors import ItrkitError
from itrkit.utils.optional import EXTRAS, MissingDependencyError, pip_hint, require

REPO = Path(__file__).resolve().parents[2]


def test_require_returns_the_imported_module_when_it_is_installed() -> None:
    import json

    assert require("json", "eval", "x") is json
    assert require("numpy.linalg", "eval", "x") is sys.modules["numpy.linalg"]


@pytest.mark.parametrize("module, extra, what, line", [
    ("faiss", None, "itrkit index build --backend faiss-flat",
     "itrkit index build --backend faiss-flat needs faiss: pip install 'itrkit[index]'"),
    ("fastapi", "serve", "itrkit serve", "itrkit serve needs fastapi: pip install 'itrkit[serve]'"),
    ("sklearn.manifold", None, "itrkit report", "itrkit report needs sklearn: pip install 'itrkit[eval]'"),
])
def test_a_missing_package_is_one_line_naming_it_and_the_pip_command(
        monkeypatch: pytest.MonkeyPatch, module: str, extra: str | None, what: str, line: str) -> None:
    top = module.split(".")[0]
    for name in [n for n in sys.modules if n == top or n.startswith(top + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, top, None)  # as if not installed
    with pytest.raises(MissingDependencyError) as info:
        require(module, extra, what)
    assert str(info.value) == line
    assert isinstance(info.value, ItrkitError)  # so the CLI prints it as one line and exits 2
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_an_installed_package_whose_own_dependency_is_missing_names_that_dependency(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "fakeplot").mkdir()
    (tmp_path / "fakeplot" / "__init__.py").write_text("import fakeplot_missing_dep\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingDependencyError) as info:
        require("fakeplot", "eval", "itrkit report")
    assert str(info.value) == ("itrkit report needs fakeplot (it cannot import fakeplot_missing_dep): "
                               "pip install 'itrkit[eval]'")


def test_a_module_with_no_known_extra_is_a_programming_error() -> None:
    with pytest.raises(KeyError):
        require("not_an_itrkit_extra_module")


def test_pip_hint_is_quoted_for_shells_that_glob_brackets() -> None:
    assert pip_hint("all") == "pip install 'itrkit[all]'"


def test_every_hinted_extra_exists_in_pyproject_and_lists_the_distribution() -> None:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]["optional-dependencies"]
    for module, (extra, dist) in EXTRAS.items():
        assert extra in extras, f"{module}: extra [{extra}] missing from pyproject.toml"
        names = {canonicalize_name(Requirement(r).name) for r in extras[extra]}
        assert canonicalize_name(dist) in names, f"{module}: {dist} is not in [{extra}]"
    (all_req,) = [Requirement(r) for r in extras["all"]]
    assert {extra for extra, _ in EXTRAS.values()} <= all_req.extras, "itrkit[all] covers every hinted extra"
