"""``itrkit export RUN --format sentence-transformers|hf|onnx --out DIR [--head cross|usa]``."""

from __future__ import annotations

import argparse
import shlex
import sys

from itrkit.export.common import FORMATS, HEADS


def _cmd_export(a: argparse.Namespace) -> int:
    from itrkit.export.common import export_run

    command = "itrkit " + " ".join(shlex.quote(x) for x in sys.argv[1:]) if sys.argv[1:2] == ["export"] else None
    out = export_run(a.run, a.format, a.out, head=a.head, overwrite=a.overwrite, command=command)
    print(f"exported {a.run} as {a.format} → {out} (model card: {out}/README.md)")
    return 0


def add_export_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``itrkit export`` on the CLI's subparsers (``sub`` = ``add_subparsers()``)."""
    p = sub.add_parser("export", help="export a trained run for sentence-transformers, transformers or ONNX",
                       description="Export a run for use outside itrkit, with a model card (README.md). "
                                   "See the Export section of README.md.")
    p.add_argument("run", help="run folder (or its model/ folder)")
    p.add_argument("--format", required=True, choices=FORMATS,
                   help="sentence-transformers: the text side; hf: a CLIPModel folder for clip: runs, else an "
                        "itrkit folder with every weight; onnx: image and text encoder graphs")
    p.add_argument("--out", required=True, help="folder to create")
    p.add_argument("--head", default="cross", choices=HEADS,
                   help="cross (cross-modal retrieval, default) or usa (uni-modal heads; sentence-transformers, onnx)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    p.set_defaults(func=_cmd_export)
    return p
