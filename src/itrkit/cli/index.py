"""``itrkit index build``, ``itrkit search`` and ``itrkit serve``: thin layers over the index API."""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from itrkit.index.backends import AUTO_EXACT_MAX, BACKEND_CHOICES, DEFAULT_TARGET_RECALL, choose_backend
from itrkit.utils.device import add_device_argument, resolve_device
from itrkit.utils.optional import require


def load_encoder(run_dir: str | Path):
    """The trained model of a run folder (``itrkit.models.load_model``); tests replace this."""
    from itrkit.models import load_model

    return load_model(run_dir)


def _on_device(encoder, spec: str):
    """The encoder on ``--device`` (a model's embeddings still come back as CPU arrays)."""
    device = resolve_device(spec)
    to = getattr(encoder, "to", None)
    return to(device) if callable(to) else encoder


def _encoder_for(index, run: str | None, device: str = "auto"):
    run_dir = run or index.run_dir
    if not run_dir:
        from itrkit.errors import ConfigError

        raise ConfigError(f"{index.folder}/manifest.json names no model run; pass --run RUN_DIR")
    encoder = _on_device(load_encoder(run_dir), device)
    index.check_encoder(encoder)
    return encoder


def cmd_index_build(args: argparse.Namespace) -> int:
    from itrkit.errors import ConfigError
    from itrkit.index.build import build_index, dataset_from_source

    target = getattr(args, "target_recall", DEFAULT_TARGET_RECALL)
    if not 0.0 < target <= 1.0:
        raise ConfigError(f"--target-recall must be in (0, 1], got {target}")
    if args.backend.startswith("faiss"):  # before any embedding work
        require("faiss", "index", f"itrkit index build --backend {args.backend}")
    device = getattr(args, "device", "auto")
    resolve_device(device)  # before any embedding work
    dataset = dataset_from_source(args.images, split=args.split)
    backend = choose_backend(max(len(dataset), len(dataset.captions)), args.backend)
    if backend.startswith("faiss"):  # auto chose an approximate index: still before any embedding work
        require("faiss", "index", f"itrkit index build of more than {AUTO_EXACT_MAX} items (--backend {backend})")
    encoder = _on_device(load_encoder(args.run), device)
    out = build_index(encoder, dataset, args.out, backend=backend, run_dir=args.run,
                      batch_size=args.batch_size, overwrite=args.overwrite, hnsw_m=args.hnsw_m,
                      ef_construction=args.ef_construction, ef_search=args.ef_search, progress=not args.quiet,
                      target_recall=target)
    print(f"indexed {len(dataset)} images and {len(dataset.captions)} captions ({backend}) → {out}")
    return 0


def cmd_search(args: argparse.Namespace) -> int:
    from itrkit.index.build import load_index
    from itrkit.index.search import format_results, search_image, search_text

    index = load_index(args.index)
    encoder = _encoder_for(index, args.run, getattr(args, "device", "auto"))
    if args.text is not None:
        results = search_text(index, encoder, args.text, args.k)
    else:
        results = search_image(index, encoder, args.image, args.k, mode=args.mode)
    print(format_results(results, args.format))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    require("fastapi", "serve", "itrkit serve")
    uvicorn = require("uvicorn", "serve", "itrkit serve")

    app, token = build_serve_app(args)
    auth = "bearer token required" if token else "no token: anyone who can reach it may search"
    print(f"serving {args.index} on http://{args.host}:{args.port}  ({auth}; Ctrl-C to stop)", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning" if args.quiet else "info")
    return 0


TOKEN_ENV = "ITRKIT_SERVE_TOKEN"
MIN_TOKEN_CHARS = 16


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback address (127.0.0.0/8, ::1); ``0.0.0.0``, ``::`` and names are not."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve_token(args: argparse.Namespace) -> str | None:
    """The bearer token for ``itrkit serve``; a public bind without one (or --insecure-public) is refused."""
    from itrkit.errors import ConfigError

    token = args.token if args.token is not None else os.environ.get(TOKEN_ENV) or None
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise ConfigError(f"--token: use at least {MIN_TOKEN_CHARS} characters (e.g. python -c "
                          "'import secrets; print(secrets.token_urlsafe(24))')")
    if token is None and not is_loopback(args.host) and not args.insecure_public:
        raise ConfigError(f"--host {args.host} is not a loopback address: anyone who can reach it could search "
                          f"and download every indexed photo; pass --token TOKEN (or set {TOKEN_ENV}; clients send "
                          "Authorization: Bearer TOKEN), or --insecure-public to serve without one")
    return token


def build_serve_app(args: argparse.Namespace):
    """Everything ``itrkit serve`` checks before it listens: host and token, index integrity, the model."""
    from itrkit.index.build import load_index
    from itrkit.serve.app import create_app

    token = serve_token(args)
    index = load_index(args.index)  # checksums: a damaged index stops here, not at the first query
    # The model loads now: a missing run or a model that does not match the index is a startup error.
    encoder = _encoder_for(index, args.run, getattr(args, "device", "auto"))
    app = create_app(index, encoder=encoder, max_upload_bytes=int(args.max_upload_mb * 1024 * 1024),
                     max_pixels=args.max_pixels, max_concurrent=args.max_concurrent,
                     request_timeout=args.timeout if args.timeout > 0 else None, token=token)
    return app, token


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``index build``, ``search`` and ``serve`` on the top-level ``itrkit`` subparsers."""
    ix = sub.add_parser("index", help="build a search index of images and captions")
    ixsub = ix.add_subparsers(dest="index_cmd", required=True)
    b = ixsub.add_parser("build", help="embed images (and their captions) with a trained model")
    b.add_argument("--run", required=True, help="run folder (or model folder) of the trained model")
    b.add_argument("--images", required=True, help="prepared dataset folder, or a plain folder of images")
    b.add_argument("--out", required=True, help="index folder to write")
    b.add_argument("--split", default=None, help="dataset split(s) to index, e.g. test or train+val (default: all)")
    b.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                   help=f"auto (default): exact up to {AUTO_EXACT_MAX:,} images or captions, faiss-hnsw above; "
                        "exact: chunked matrix product; faiss-flat; faiss-hnsw / faiss-ivf / faiss-ivfpq "
                        "(approximate, calibrated to --target-recall)")
    b.add_argument("--target-recall", type=float, default=DEFAULT_TARGET_RECALL,
                   help="approximate backends: raise ef_search / nprobe until recall@10 against exact search "
                        "on held-out queries reaches this (stored in the manifest with the measured recall)")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--hnsw-m", type=int, default=32, help="HNSW links per node")
    b.add_argument("--ef-construction", type=int, default=200)
    b.add_argument("--ef-search", type=int, default=128,
                   help="HNSW beam; replaced by the value calibrated to --target-recall")
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--quiet", action="store_true")
    add_device_argument(b)
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
    add_device_argument(s)
    s.set_defaults(func=cmd_search)

    from itrkit.serve.settings import MAX_CONCURRENT, MAX_UPLOAD_BYTES, REQUEST_TIMEOUT_S

    v = sub.add_parser("serve", help="web page and JSON API over an index")
    v.add_argument("--index", required=True)
    v.add_argument("--host", default="127.0.0.1",
                   help="address to listen on; anything but loopback needs --token or --insecure-public")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--run", default=None, help="model run folder (default: the one the index was built with)")
    v.add_argument("--token", default=None,
                   help=f"require 'Authorization: Bearer TOKEN' on the API and images (or set {TOKEN_ENV}, "
                        "which keeps it out of the process list)")
    v.add_argument("--insecure-public", action="store_true", help="allow a non-loopback --host without a token")
    v.add_argument("--max-concurrent", type=_positive_int, default=MAX_CONCURRENT,
                   help="requests in flight at once; more are answered 503 with Retry-After")
    v.add_argument("--timeout", type=float, default=REQUEST_TIMEOUT_S,
                   help="seconds before a request is answered 503 (408 for an unfinished upload); 0: none")
    v.add_argument("--max-upload-mb", type=float, default=MAX_UPLOAD_BYTES / (1024 * 1024))
    v.add_argument("--max-pixels", type=_positive_int, default=None,
                   help="largest photo accepted, checked from its header before decoding (default 40 million)")
    v.add_argument("--quiet", action="store_true")
    add_device_argument(v)
    v.set_defaults(func=cmd_serve)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
