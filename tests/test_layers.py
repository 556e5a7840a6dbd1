"""Layers point down (data → models → losses → train → experiments → index/serve → cli): a walk over
every module's imports, those inside functions included (issue 14, docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "itrkit"
# Each package may import only the packages listed (besides itself and the base modules).
BASE = {"errors", "config", "utils"}
ALLOWED: dict[str, set[str]] = {
    "errors": set(), "config": set(), "utils": set(),
    "data": set(),
    "models": {"data"},
    "losses": set(),
    "teachers": {"data", "models"},
    "eval": {"data", "models", "teachers", "losses"},
    "train": {"data", "models", "teachers", "losses", "eval"},
    "experiments": {"data", "models", "teachers", "losses", "eval", "train", "index"},
    "index": {"data", "models", "eval"},
    "serve": {"data", "models", "index"},
    "export": {"data", "models", "eval", "train"},
    "api": {"data", "models", "eval", "train"},  # itrkit.load_model / train / evaluate (lazy top-level API)
    "cli": {"data", "models", "teachers", "losses", "eval", "train", "experiments", "index", "serve", "export"},
}
# Import shims kept for old import paths (no logic): top-level modules re-exporting a package.
SHIMS = {"reproduce": {"experiments", "config"}, "reproduce_fusion": {"experiments"},
         "demo": {"experiments"}, "__main__": {"cli"}, "__init__": {"api", "train"}}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _imports(path: Path) -> set[str]:
    """Every ``itrkit.*`` module a file imports, anywhere in it (functions included)."""
    rel = path.relative_to(SRC.parent).with_suffix("")
    here = ".".join(rel.parts)
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("itrkit")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")[: -node.level] if path.name != "__init__.py" else here.split(".")[: len(here.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.startswith("itrkit"):
                out.add(mod)
                out |= {f"{mod}.{a.name}" for a in node.names}  # `from itrkit import x` names a module
    return out


def _graph() -> dict[str, set[str]]:
    top = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()} | \
          {p.stem for p in SRC.glob("*.py")}
    edges: dict[str, set[str]] = {}
    for path in SRC.rglob("*.py"):
        src = _package("itrkit." + ".".join(path.relative_to(SRC).with_suffix("").parts))
        for mod in _imports(path):
            dst = _package(mod)
            if dst and dst != src and dst in top:
                edges.setdefault(src, set()).add(dst)
    return edges


def test_every_package_imports_only_lower_layers() -> None:
    bad = []
    for src, dsts in sorted(_graph().items()):
        allowed = ALLOWED.get(src, SHIMS.get(src))
        assert allowed is not None, f"package itrkit.{src} has no layer: add it to ALLOWED"
        for dst in sorted(dsts - BASE - allowed):
            bad.append(f"itrkit.{src} imports itrkit.{dst}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle_between_packages() -> None:
    graph = {k: v - {"utils", "config", "errors"} for k, v in _graph().items()}
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                pytest.fail("import cycle: " + " → ".join([*path, node, nxt]))
            if not state.get(nxt):
                visit(nxt, [*path, node])
        state[node] = 2

    for n in list(graph):
        if not state.get(n):
            visit(n, [])


def test_argparse_lives_in_the_cli_package() -> None:
    users = sorted(str(p.relative_to(SRC)) for p in SRC.rglob("*.py")
                   if "argparse" in p.read_text(encoding="utf-8") and p.relative_to(SRC).parts[0] != "cli")
    assert not users, users
