"""Optional dependencies: the core imports without the extras, and a command that needs one says which.

itrkit's core (data, models, losses, train, retrieval metrics) needs torch and a few light packages.
The web stack, faiss and the plotting/statistics packages live in extras, so a GPU user who
installs ``itrkit`` beside their own CUDA torch does not pull them::

    pip install 'itrkit[serve]'   # fastapi, uvicorn, python-multipart: itrkit serve
    pip install 'itrkit[index]'   # faiss-cpu: the faiss-flat / faiss-hnsw index backends
    pip install 'itrkit[eval]'    # matplotlib, scikit-learn, scipy, eccv-caption: report, STS, ECCV
    pip install 'itrkit[export]'  # onnx, onnxruntime: itrkit export --format onnx
    pip install 'itrkit[all]'     # all of the above

Modules that use an extra import it at the use site through :func:`require`, which turns a
missing package into one :class:`MissingDependencyError` line (the CLI prints it and exits 2).
"""

from __future__ import annotations

import importlib
from types import ModuleType

from itrkit.errors import ItrkitError

# Import name -> (extra that provides it, distribution name in that extra). tests/utils/test_optional.py
# checks every entry against pyproject.toml, so a renamed extra cannot leave a stale hint behind.
EXTRAS: dict[str, tuple[str, str]] = {
    "fastapi": ("serve", "fastapi"),
    "uvicorn": ("serve", "uvicorn"),
    "python_multipart": ("serve", "python-multipart"),
    "faiss": ("index", "faiss-cpu"),
    "matplotlib": ("eval", "matplotlib"),
    "sklearn": ("eval", "scikit-learn"),
    "scipy": ("eval", "scipy"),
    "eccv_caption": ("eval", "eccv-caption"),
    "onnx": ("export", "onnx"),
    "onnxruntime": ("export", "onnxruntime"),
}


class MissingDependencyError(ItrkitError):
    """A command needs a package from an itrkit extra that is not installed (or does not import)."""


def pip_hint(extra: str) -> str:
    """The command that installs ``extra``: ``pip install 'itrkit[extra]'`` (quoted for zsh)."""
    return f"pip install 'itrkit[{extra}]'"


def missing_message(module: str, extra: str, what: str, cause: str | None = None) -> str:
    """``"<what> needs <module>: pip install 'itrkit[<extra>]'"``, with the import failure if it differs."""
    detail = f" ({cause})" if cause else ""
    return f"{what} needs {module}{detail}: {pip_hint(extra)}"


def require(module: str, extra: str | None = None, what: str = "this command") -> ModuleType:
    """Import ``module`` (e.g. ``"faiss"`` or ``"sklearn.manifold"``) or raise a one-line hint.

    ``extra`` defaults to the one :data:`EXTRAS` lists for the top-level package; ``what`` names
    the command or function that needs it (``"itrkit serve"``). A package that is installed but
    fails to import because one of *its* dependencies is missing gets the same hint, with the
    missing name in parentheses: reinstalling the extra is the fix in both cases.
    """
    top = module.split(".")[0]
    if extra is None:
        if top not in EXTRAS:
            raise KeyError(f"no itrkit extra is known for {module!r}; pass extra=")
        extra = EXTRAS[top][0]
    try:
        return importlib.import_module(module)
    except ImportError as e:
        # e.name is the module that failed: ours (not installed, or blocked) or a dependency of it.
        cause = None if e.name in (None, module, top) else f"it cannot import {e.name}"
        raise MissingDependencyError(missing_message(top, extra, what, cause)) from None

