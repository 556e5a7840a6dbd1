"""``itrkit index build``, ``itrkit search`` and ``itrkit serve``: thin layers over the index API."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from itrkit.index.backends import BACKENDS
from itrkit.utils.optional import require


def load_encoder(run_dir: str | Path):
    """The trained model of a run folder (``itrkit.models.load_model``); tests replace this."""
    from itrkit.models import load_model

    return load_model(run_dir)


def _encoder_for(index, run: str | None):
    run_dir = run or index.run_dir
    if not run_dir:
        from itrkit.errors import ConfigError

        raise ConfigError(f"{index.folder}/manifest.json names no model run; pass --run RUN_DIR")
    encoder = load_encoder(run_dir)
    index.check_encoder(encoder)
    return encoder


def cmd_index_build(args: argparse.Namespace) -> int:
    from itrkit.index.build import build_index, dataset_from_source

    if args.backend.startswith("faiss"):  # before any embedding work
        require("faiss", "index", f"itrkit index build --backend {args.backend}")
    dataset = dataset_from_source(args.images, split=args.split)
    encoder = load_encoder(args.run)
    out = build_index(encoder, dataset, args.out, backend=args.backend, run_dir=args.run,
                      batch_size=args.batch_size, overwrite=args.overwrite, hnsw_m=args.hnsw_m,
                      ef_construction=args.ef_construction, ef_search=args.ef_search, progress=not args.quiet)
    print(f"indexed {len(dataset)} images and {len(dataset.captions)} captions ({args.backend}) → {out}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from itrkit.index.build import load_index
    from itrkit.index.search import format_results, search_image, search_text

    index = load_index(args.index)
    encoder = _encoder_for(index, args.run)
    if args.text is not None:
        results = search_text(index, encoder, args.text, args.k)
    else:
        results = search_image(index, encoder, args.image, args.k, mode=args.mode)
    print(format_results(results, args.format))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    require("fastapi", "serve", "itrkit serve")
    uvicorn = require("uvicorn", "serve", "itrkit serve")

    from itrkit.serve.app import create_app

    # With --run the model loads now (and must match the index); without, on the first query.
    app = create_app(args.index, encoder=load_encoder(args.run) if args.run else None)
    print(f"serving {args.index} on http://{args.host}:{args.port}  (Ctrl-C to stop)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``index build``, ``search`` and ``serve`` on the top-level ``itrkit`` subparsers."""
    ix = sub.add_parser("index", help="build a search index of images and captions")
    ixsub = ix.add_subparsers(dest="index_cmd", required=True)
    b = ixsub.add_parser("build", help="embed images (and their captions) with a trained model")
    b.add_argument("--run", required=True, help="run folder (or model folder) of the trained model")
    b.add_argument("--images", required=True, help="prepared dataset folder, or a plain folder of images")
    b.add_argument("--out", required=True, help="index folder to write")
    b.add_argument("--split", default=None, help="dataset split(s) to index, e.g. test or train+val (default: all)")
    b.add_argument("--backend", default="exact", choices=BACKENDS,
                   help="exact: chunked matrix product; faiss-flat / faiss-hnsw for large galleries")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node")
    b.add_argument("--ef-construction", type=int, default=200)
    b.add_argument("--ef-search", type=int, default=128)
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(func=cmd_index_build)

    s = sub.add_parser("search", help="query an index by text or by photo")
    s.add_argument("--index", required=True)
    q = s.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", help="find images matching this description")
    q.add_argument("--image", help="find images similar to this photo (or captions, with --mode caption)")
    s.add_argument("-k", type=int, default=5)
    s.add_argument("--mode", default="image", choices=("image", "caption"),
                   help="for --image: similar images (USA head) or matching captions (cross head)")
    s.add_argument("--format", default="table", choices=("table", "json"))
    s.add_argument("--run", default=None, help="model run folder (default: the one the index was built with)")
    s.set_defaults(func=cmd_search)

    v = sub.add_parser("serve", help="web page and JSON API over an index")
    v.add_argument("--index", required=True)
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--run", default=None, help="model run folder (default: the one the index was built with)")
    v.add_argument("--quiet", action="store_true")
    v.set_defaults(func=cmd_serve)
