"""A wheel built from this checkout installs into a fresh virtual environment and runs the main job
from outside the source tree: ``itrkit demo --quick`` end to end (the main job: synthetic data,
teachers, InfoNCE and CUSA, index; the suite's one run of it), the serve page's static
files inside the installed package, ``itrkit --version``, the Python API, and ``itrkit train --config
infonce`` (the bundled configs ship in the package).

Offline: ``pip wheel --no-deps --no-build-isolation`` from a copy of the checkout; the venv is bare
(its own site-packages first) and reaches the dependencies already installed here through a
``.pth`` line naming this environment's site-packages, which is not a site directory there — so
this checkout's editable install is not seen and ``import itrkit`` is the wheel's.
Slow: about 2.5 minutes on 2 busy cores (the quick demo itself is most of it).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_") and k != "PYTHONPATH"}
    return {**env, "PIP_CONFIG_FILE": os.devnull, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1",
            "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _run(cmd: list[str], cwd: Path, timeout: int = 900, **env: str) -> subprocess.CompletedProcess[str]:
    # Bytes decoded by hand: text mode would turn a "\r" into "\n" and hide tqdm frames.
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, env={**_env(), **env}, timeout=timeout)
    out, err = proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n{out[-2000:]}\n{err[-3000:]}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    work = tmp_path_factory.mktemp("wheel")
    src = work / "src"  # a copy: no build/ or egg-info in the shared working tree
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "src" / "itrkit", src / "src" / "itrkit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
          str(work / "dist"), str(src)], cwd=work)
    (whl,) = (work / "dist").glob("itrkit-*.whl")
    return whl


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("venv") / "v"
    _run([sys.executable, "-m", "venv", "--without-pip", str(root)], cwd=root.parent)
    py = root / "bin" / "python"
    purelib = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # The dependencies (torch, transformers, ...) from this environment, after the venv's own packages.
    (Path(purelib) / "itrkit-test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", str(wheel)],
         cwd=root.parent)
    return root


def test_the_wheel_holds_the_serve_page(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"itrkit/serve/static/index.html", "itrkit/serve/static/app.js", "itrkit/serve/static/style.css"} <= names
    assert "itrkit/utils/progress.py" in names and "itrkit/cli/runs.py" in names
    assert {"itrkit/configs/infonce.yaml", "itrkit/configs/cusa.yaml", "itrkit/configs/fusion/sgr.yaml"} <= names


def test_installed_wheel_runs_the_quick_demo_outside_the_source_tree(venv: Path, tmp_path: Path) -> None:
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    py, exe = venv / "bin" / "python", venv / "bin" / "itrkit"
    where = _run([str(py), "-c", "import itrkit, itrkit.serve.app as a; print(itrkit.__file__); print(a.STATIC)"], cwd=cwd)
    pkg, static = (Path(p) for p in where.stdout.split())
    assert venv in pkg.parents and REPO not in pkg.parents, "itrkit must come from the wheel"
    assert {p.name for p in static.iterdir()} >= {"index.html", "app.js", "style.css"} and venv in static.parents
    assert _run([str(exe), "--version"], cwd=cwd).stdout.strip().startswith("itrkit ")

    out = tmp_path / "demo"
    demo = _run([str(exe), "demo", "--quick", "--out", str(out)], cwd=cwd)
    summary = json.loads((out / "summary.json").read_text())
    rows = summary["retrieval"]
    assert set(rows) == {"InfoNCE (test)", "CUSA (test)"}
    # 22 test images × 5 captions: chance RSUM ≈ 135 (i2t ≈ 4.5+21+37, t2i ≈ 4.5+23+45); measured ≈ 550
    assert all(r["rsum"] > 400 for r in rows.values()), rows
    assert set(summary["unimodal"]) == {"frozen towers", "InfoNCE (cross head)", "CUSA (cross head)", "CUSA (USA head)"}
    assert (out / "index" / "manifest.json").is_file()
    assert (out / "teachers" / "image.store").exists() and (out / "runs" / "cusa" / "metrics.json").is_file()
    assert "CUSA (test)" in demo.stdout and "itrkit serve --index" in demo.stdout
    assert not any(p.name.endswith(".tmp") for p in out.rglob("*"))  # nothing half-written
    assert "\r" not in demo.stderr, "tqdm carriage-return frames in a log"
    # The Python API of the installed package on the demo's run.
    run = next(p.parent for p in (tmp_path / "demo" / "runs").rglob("metrics.json"))
    code = ("import sys, itrkit; m = itrkit.load_model(sys.argv[1]); "
            "print(m.encode_texts('a red circle').shape, sorted(itrkit.evaluate(sys.argv[1]))[:2])")
    out = _run([str(py), "-c", code, str(run)], cwd=cwd).stdout
    assert out.startswith("(1, ") and "i2t_R@1" in out

    # A bundled config by name, from the installed package (no configs/ here), on the demo's data
    # and tower-feature cache, with output to a log: progress lines, no tqdm frames.
    trained = _run([str(exe), "train", "--config", "infonce", "--data", str(tmp_path / "demo" / "data"),
                    "--out", str(tmp_path / "infonce"), "--set", "stages.0.epochs=1",
                    "--set", f"cache_dir={tmp_path / 'demo' / 'cache'}"], cwd=cwd, ITRKIT_PROGRESS_SECONDS="0")
    assert (tmp_path / "infonce" / "metrics.json").is_file()
    assert "\r" not in trained.stderr and "[itrkit] main epoch 1/1: training stage 'main'" in trained.stderr
