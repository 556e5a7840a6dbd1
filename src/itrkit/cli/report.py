"""``itrkit report``: compare runs (Markdown table, t-SNE plots, top-5 retrieval pages)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from itrkit.eval.report_cli import report_runs
from itrkit.utils.device import add_device_argument


def _cmd(a: argparse.Namespace) -> int:
    files = report_runs(a.runs, a.out, a.data, a.split, a.names, a.max_images, a.cache, a.embed_images,
                        a.human_judgments, device=a.device)
    print((Path(a.out) / "report.md").read_text(encoding="utf-8").split("\n## ")[0])
    for key, path in files.items():
        print(f"{key}: {path}")
    return 0


def add_parsers(sub: Any) -> None:
    r = sub.add_parser("report", help="compare runs: Markdown table, t-SNE plots, top-5 retrieval pages")
    r.add_argument("runs", nargs="+", help="run folders (each holds model/ and config.yaml)")
    r.add_argument("--out", required=True, help="report folder")
    r.add_argument("--data", default=None, help="dataset folder (default: each run's own)")
    r.add_argument("--split", default="test")
    r.add_argument("--names", default=None, help="comma-separated display names, one per run")
    r.add_argument("--max-images", type=int, default=0, help="only the first N images of the split")
    r.add_argument("--cache", default=None, help="tower-feature cache folder")
    r.add_argument("--embed-images", action="store_true", help="embed thumbnails so the page is self-contained")
    r.add_argument("--human-judgments", default="auto", metavar="DIR|auto|none",
                   help="frame items people judged relevant amber: the folder of the Flickr8k ExpertAnnotations.txt / "
                        "CrowdFlowerAnnotations.txt (auto: beside the images, when present)")
    add_device_argument(r)
    r.set_defaults(func=_cmd)
