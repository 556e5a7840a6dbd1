"""Packaging: the library asks only ``torch>=2.1`` (pip keeps a user's own CUDA torch), the CPU pin
lives in the constraints file that make and CI use, and the core runs without any extra.

The "keeps the user's torch" claim is checked with pip itself, offline: a fresh virtual environment
gets a stand-in ``torch 2.99.0+cu999`` (what a CUDA user has), then ``pip install --dry-run
--report`` of ``itrkit[all]`` resolves against a local folder holding the itrkit wheel built from
this checkout, a tiny stand-in wheel for every other requirement, and a ``torch 2.13.0`` wheel that
pip *could* switch to. Stand-ins instead of the real wheels keep it offline and a few seconds long,
and pip's resolver, the thing under test, is the real one. With the old ``torch==2.13.0`` pin the
report lists torch (pip would replace the user's build) and the test fails.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
USER_TORCH = "2.99.0+cu999"  # a CUDA build newer than anything pinned here


def _requirements(extra: str | None = None) -> list[Requirement]:
    project = PYPROJECT["project"]
    raw = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return [Requirement(r) for r in raw]


def _all_requirements() -> list[Requirement]:
    reqs = _requirements()
    for extra in PYPROJECT["project"]["optional-dependencies"]:
        reqs += _requirements(extra)
    return reqs


# --------------------------------------------------------------------------------------------
# What pyproject.toml, the constraints file and the Makefile say
# --------------------------------------------------------------------------------------------
def test_torch_is_required_as_at_least_2_1_with_no_pin_or_ceiling() -> None:
    torch = [r for r in _all_requirements() if canonicalize_name(r.name) == "torch"]
    assert [str(r.specifier) for r in torch] == [">=2.1"], "torch appears once, in the core, as torch>=2.1"
    assert not any(s.operator in ("==", "===", "<", "<=", "~=", "!=") for s in torch[0].specifier)
    assert torch[0].marker is None
    assert torch[0].specifier.contains(USER_TORCH) and not torch[0].specifier.contains("2.0.1")


def test_python_3_11_and_3_12_are_supported() -> None:
    from packaging.specifiers import SpecifierSet

    spec = SpecifierSet(PYPROJECT["project"]["requires-python"])
    assert spec.contains("3.11.0") and spec.contains("3.12.1")
    classifiers = PYPROJECT["project"]["classifiers"]
    for v in ("3.11", "3.12"):
        assert f"Programming Language :: Python :: {v}" in classifiers


def test_core_leaves_the_web_stack_faiss_and_plotting_to_extras() -> None:
    core = {canonicalize_name(r.name) for r in _requirements()}
    heavy = {"fastapi": "serve", "uvicorn": "serve", "python-multipart": "serve", "faiss-cpu": "index",
             "matplotlib": "eval", "scikit-learn": "eval", "scipy": "eval", "selenium": "dev"}
    for dist, extra in heavy.items():
        assert dist not in core, f"{dist} must not be a core dependency"
        assert dist in {canonicalize_name(r.name) for r in _requirements(extra)}, f"{dist} belongs in [{extra}]"
    # [all] = the three user extras (a GPU user's one-liner); dev tools stay out of it.
    (all_req,) = _requirements("all")
    assert canonicalize_name(all_req.name) == "itrkit" and {"serve", "index", "eval"} <= all_req.extras
    assert "dev" not in all_req.extras


def test_make_and_ci_install_through_the_cpu_constraints_file() -> None:
    pins = [Requirement(line) for line in (REPO / "constraints" / "cpu.txt").read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    (torch_pin,) = [r for r in pins if r.name == "torch"]
    assert str(torch_pin.specifier).startswith("==")
    pinned = str(torch_pin.specifier)[2:]
    (lib,) = [r for r in _requirements() if r.name == "torch"]
    assert lib.specifier.contains(pinned), "the tested torch must satisfy the library's own requirement"
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # -n: print, do not run; -B: as on a fresh machine, where the stamp does not exist.
    out = subprocess.run(["make", "-n", "-B", "install"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    installs = [line for line in out.splitlines() if " pip install" in line and "-e " in line]
    assert len(installs) == 1 and "-c constraints/cpu.txt" in installs[0] and ".[all,dev]" in installs[0], out
    assert "torch==" not in out, "no torch pin outside the constraints file"
    assert "make test" in (REPO / ".ci" / "run").read_text()


# --------------------------------------------------------------------------------------------
# pip keeps a user's torch: a real resolution in a fresh venv, offline
# --------------------------------------------------------------------------------------------
def _wheel(folder: Path, name: str, version: str, files: dict[str, str] | None = None) -> Path:
    """A minimal valid pure-Python wheel with no dependencies (METADATA, WHEEL, RECORD with hashes)."""
    stem = f"{re.sub(r'[-_.]+', '_', name)}-{version}"
    info = f"{stem}.dist-info"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
    content = {**(files or {}), f"{info}/METADATA": meta,
               f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: itrkit-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, text in content.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    record.append(f"{info}/RECORD,,")
    out = folder / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(out, "w") as z:
        for path, text in content.items():
            z.writestr(path, text)
        z.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return out


def _version_for(req: Requirement) -> str:
    """A version the requirement accepts: its pinned or lower-bound version."""
    for s in req.specifier:
        if s.operator in ("==", ">=", "~=") and req.specifier.contains(s.version):
            return s.version
    assert not req.specifier, f"no version chosen for {req}"
    return "1.0"


def _pip_env() -> dict[str, str]:
    # Ignore every pip config file and PIP_* variable (this machine's global find-links and torch cap):
    # the resolution must depend only on the folder passed with --find-links.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}


def _pip(python: Path, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    # The test environment's pip drives the bare venv (--python): no pip download, no network.
    cmd = [sys.executable, "-m", "pip", "--python", str(python), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_pip_env(), cwd=cwd)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def local_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A --find-links folder: itrkit built from this checkout + stand-ins for all its requirements."""
    pytest.importorskip("setuptools", reason="building the itrkit wheel needs setuptools (torch depends on it)")
    work = tmp_path_factory.mktemp("pkg")
    # Build from a copy, so no build/ or egg-info lands in the working tree other engineers share.
    src = work / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "src" / "itrkit", src / "src" / "itrkit",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    links = work / "links"
    links.mkdir()
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                           "-w", str(links), str(src)], capture_output=True, text=True, env=_pip_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = {"itrkit"}
    for req in _all_requirements():
        name = canonicalize_name(req.name)
        if name not in seen:
            seen.add(name)
            _wheel(links, req.name, _version_for(req))
    # The tested CPU torch, as PyPI would offer it: pip may switch to it, but must not need to.
    _wheel(links, "torch", "2.13.0")
    return links


def _python_312() -> str | None:
    cands = [shutil.which("python3.12"), *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.12*/bin/python3.12")))]
    for c in filter(None, cands):
        ok = subprocess.run([c, "-c", "import sys; assert sys.version_info[:2] == (3, 12)"], capture_output=True)
        if ok.returncode == 0:
            return c
    return None


@pytest.mark.parametrize("python", ["3.11", "3.12"])
def test_pip_install_keeps_the_users_own_torch_build(python: str, local_index: Path, tmp_path: Path) -> None:
    if python == "3.11":
        exe = sys.executable if sys.version_info[:2] == (3, 11) else shutil.which("python3.11")
    else:
        exe = sys.executable if sys.version_info[:2] == (3, 12) else _python_312()
    if not exe:
        pytest.skip(f"no Python {python} interpreter on this machine")
    venv = tmp_path / "venv"
    subprocess.run([exe, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"

    user_torch = _wheel(tmp_path, "torch", USER_TORCH, files={"torch/__init__.py": f"__version__ = {USER_TORCH!r}\n"})
    _pip(py, "install", "--no-index", "--no-deps", str(user_torch))

    report = tmp_path / "report.json"
    _pip(py, "install", "--dry-run", "--no-index", "--find-links", str(local_index), "--report", str(report),
         "itrkit[all]")
    plan = {canonicalize_name(i["metadata"]["name"]): i["metadata"]["version"]
            for i in json.loads(report.read_text())["install"]}
    assert plan.get("itrkit") == "0.1.0"
    assert "torch" not in plan, f"pip would replace the user's torch {USER_TORCH} with {plan.get('torch')}"
    # ... and the extras came along: a GPU user's `pip install "itrkit[all]"` is complete.
    for dist in ("fastapi", "uvicorn", "faiss-cpu", "matplotlib", "scikit-learn", "transformers"):
        assert dist in plan
    # The same resolution for the bare core pulls none of the extras.
    _pip(py, "install", "--dry-run", "--no-index", "--find-links", str(local_index), "--report", str(report), "itrkit")
    core = {canonicalize_name(i["metadata"]["name"]) for i in json.loads(report.read_text())["install"]}
    assert not core & {"fastapi", "uvicorn", "faiss-cpu", "matplotlib", "scikit-learn", "scipy", "torch"}, core
    out = subprocess.run([str(py), "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    assert out.stdout.strip() == USER_TORCH and Version(USER_TORCH).local == "cu999"


# --------------------------------------------------------------------------------------------
# The core runs with every extra missing
# --------------------------------------------------------------------------------------------
# Each of these made unimportable (as if not installed): `import x` fails, find_spec says absent.
BLOCKED = ("fastapi", "starlette", "uvicorn", "python_multipart", "multipart", "faiss", "matplotlib", "sklearn",
           "scipy", "eccv_caption", "selenium", "httpx", "onnx", "onnxruntime")

NO_EXTRAS_SCRIPT = textwrap.dedent("""
    import sys
    sys.modules.update(dict.fromkeys({blocked!r}))  # None in sys.modules: ImportError, find_spec -> None
    import contextlib, importlib, io, json, pkgutil
    from pathlib import Path

    import itrkit
    # Every itrkit module but the web app itself imports without the extras.
    names = sorted(m.name for m in pkgutil.walk_packages(itrkit.__path__, "itrkit."))
    failed = {{}}
    for name in names:
        if name == "itrkit.serve.app":
            continue
        try:
            importlib.import_module(name)
        except Exception as e:
            failed[name] = repr(e)

    from itrkit.cli import main
    from itrkit.data.synthetic import make_synthetic

    tmp = Path(sys.argv[1])
    make_synthetic(tmp / "data", n_images=24, captions_per_image=2, seed=0, size=32)
    tiny = ["--set", "model.image_tower=tiny-image", "--set", "model.text_tower=tiny-text",
            "--set", "model.embed_dim=16", "--set", "batch_size=8", "--set", "stages.0.epochs=1",
            "--set", "threads=1"]
    codes, errors = {{}}, {{}}

    def run(key, argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            codes[key] = main(argv)
        errors[key] = [line for line in err.getvalue().splitlines() if line.strip()]

    run("train", ["train", "--data", str(tmp / "data"), "--out", str(tmp / "run"), "--quiet", *tiny])
    run("eval", ["eval", "--run", str(tmp / "run"), "--json", str(tmp / "eval.json")])
    run("index", ["index", "build", "--run", str(tmp / "run"), "--images", str(tmp / "data"),
                  "--out", str(tmp / "index"), "--quiet"])
    # Commands that need an extra: one line, before any work (the run folder below does not exist).
    run("faiss", ["index", "build", "--run", str(tmp / "nowhere"), "--images", str(tmp / "data"),
                  "--out", str(tmp / "faiss-index"), "--backend", "faiss-hnsw"])
    run("serve", ["serve", "--index", str(tmp / "index")])
    run("report", ["report", str(tmp / "nowhere"), "--out", str(tmp / "report")])
    metrics = json.loads((tmp / "eval.json").read_text())
    print(json.dumps({{"modules": len(names), "failed": failed, "codes": codes, "errors": errors,
                      "rsum": metrics.get("rsum"), "leaked": sorted(n for n in {blocked!r} if sys.modules.get(n)),
                      "written": sorted(p.name for p in tmp.iterdir())}}))
""")


def test_core_trains_evaluates_and_indexes_with_every_extra_missing(tmp_path: Path) -> None:
    script = NO_EXTRAS_SCRIPT.format(blocked=BLOCKED)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["modules"] > 50 and res["failed"] == {}, res["failed"]
    assert res["leaked"] == []
    assert res["codes"]["train"] == 0 and res["codes"]["eval"] == 0 and res["codes"]["index"] == 0, res["errors"]
    assert isinstance(res["rsum"], float) and 0 <= res["rsum"] <= 600
    hints = {"faiss": "error: itrkit index build --backend faiss-hnsw needs faiss: pip install 'itrkit[index]'",
             "serve": "error: itrkit serve needs fastapi: pip install 'itrkit[serve]'",
             "report": "error: itrkit report needs matplotlib: pip install 'itrkit[eval]'"}
    for key, line in hints.items():
        assert res["codes"][key] == 2 and res["errors"][key] == [line], (key, res["errors"][key])
    # Nothing was written by the refused commands.
    assert sorted(res["written"]) == ["data", "eval.json", "index", "run"]
