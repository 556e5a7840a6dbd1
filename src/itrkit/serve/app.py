"""The web service: a search page and a JSON API over one index folder.

Routes
- ``GET /``                    the search page (``static/index.html`` + ``app.js`` + ``style.css``)
- ``GET /api/health``          index size, backend, whether the model is loaded
- ``GET /api/search?q=&k=``    text → images
- ``POST /api/search/image``   multipart ``file`` (+ ``k``, ``mode=image|caption``): search by photo
- ``GET /images/{id}``         an indexed image, looked up by id only (never a path from the request)

Every error is ``{"error": "..."}`` with a 4xx status (5xx only for bugs); one bad request never
stops the server. The model is loaded on the first query unless an encoder is injected.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from itrkit.errors import ItrkitError
from itrkit.index.build import Encoder, IndexReader, load_index
from itrkit.index.search import (
    ImageTooLargeError,
    NotAnImageError,
    QueryError,
    check_k,
    check_text,
    search_image,
    search_text,
)

STATIC = Path(__file__).resolve().parent / "static"
MAX_K = 100
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# Multipart framing (boundaries, part headers, the k and mode fields) on top of the file itself.
MULTIPART_SLACK = 64 * 1024


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _LazyEncoder:
    """Loads ``itrkit.models.load_model(run_dir)`` once, on first use, under a lock."""

    def __init__(self, index: IndexReader, encoder: Encoder | None) -> None:
        self.index = index
        self._encoder = encoder
        self._lock = threading.Lock()

    @property
    def loaded(self) -> bool:
        return self._encoder is not None

    def get(self) -> Encoder:
        with self._lock:
            if self._encoder is None:
                run_dir = self.index.run_dir
                if not run_dir:
                    raise ApiError(503, "the index does not name the model run it was built with")
                from itrkit.models import load_model

                self._encoder = load_model(run_dir)
            return self._encoder


def _public(results: list[dict]) -> list[dict]:
    # File system paths stay on the server.
    return [{k: v for k, v in r.items() if k != "path"} for r in results]


def create_app(index_dir: str | Path, encoder: Encoder | None = None,
               max_upload_bytes: int = MAX_UPLOAD_BYTES) -> FastAPI:
    """A FastAPI app serving ``index_dir``; pass ``encoder`` to skip loading the model from the run."""
    index = load_index(index_dir)
    if encoder is not None:
        index.check_encoder(encoder)
    model = _LazyEncoder(index, encoder)
    # One query at a time through the model: torch already uses every core for one query.
    infer_lock = threading.Lock()

    app = FastAPI(title="itrkit search", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.index = index
    app.state.encoder = model

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"error": exc.message}, status_code=exc.status)

    @app.exception_handler(ItrkitError)
    async def _itrkit_error(_: Request, exc: ItrkitError) -> JSONResponse:
        # Bad queries are the client's fault; anything else (model or index that cannot load, a model
        # that does not match the index) means this server cannot answer at the moment.
        if isinstance(exc, NotAnImageError):
            status = 415
        elif isinstance(exc, ImageTooLargeError):
            status = 413
        elif isinstance(exc, QueryError):
            status = 400
        else:
            status = 503
        return JSONResponse({"error": str(exc)}, status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()))
        return JSONResponse({"error": f"{where}: {first.get('msg', 'invalid request')}"}, status_code=422)

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"error": f"internal error ({exc.__class__.__name__})"}, status_code=500)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/api/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "images": len(index), "captions": len(index.caption_list),
                "backend": index.backend, "dim": index.manifest.get("dim"), "image_search": index.has_uni,
                "caption_search": bool(index.caption_list), "model_loaded": model.loaded,
                "dataset": index.manifest.get("dataset")}

    @app.get("/api/search")
    def api_search(q: str | None = None, k: str | None = "10") -> dict[str, Any]:
        text = check_text(q)
        k_int = check_k(k, MAX_K)
        enc = model.get()
        with infer_lock:
            results = search_text(index, enc, text, k_int)
        return {"query": text, "k": k_int, "results": _public(results)}

    @app.post("/api/search/image")
    async def api_search_image(request: Request) -> dict[str, Any]:
        # Refuse oversized bodies before the multipart parser spools them to disk.
        length = request.headers.get("content-length")
        if length is None:
            raise ApiError(411, "upload needs a Content-Length header")
        try:
            length_int = int(length)
        except ValueError:
            raise ApiError(400, "bad Content-Length header") from None
        if length_int > max_upload_bytes + MULTIPART_SLACK:
            raise ApiError(413, f"upload too large: at most {max_upload_bytes // (1024 * 1024)} MB")
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as e:  # multipart parse errors from Starlette/python-multipart
            raise ApiError(400, f"bad multipart upload ({e.__class__.__name__})") from None
        try:
            upload = form.get("file")
            if upload is None or isinstance(upload, str):
                raise ApiError(400, "no file in the upload (multipart field 'file')")
            data = await upload.read(max_upload_bytes + 1)
        finally:
            await form.close()  # removes the spooled temporary file
        if len(data) > max_upload_bytes:
            raise ApiError(413, f"upload too large: at most {max_upload_bytes // (1024 * 1024)} MB")
        if not data:
            raise ApiError(400, "the uploaded file is empty")
        k_int = check_k(form.get("k") or "10", MAX_K)
        mode = str(form.get("mode") or "image")
        if mode not in ("image", "caption"):
            raise ApiError(400, f"unknown mode '{mode}' (use image or caption)")
        from starlette.concurrency import run_in_threadpool

        def run() -> list[dict]:
            enc = model.get()
            with infer_lock:
                return search_image(index, enc, data, k_int, mode=mode)

        results = await run_in_threadpool(run)
        return {"mode": mode, "k": k_int, "results": _public(results)}

    @app.get("/images/{image_id:path}")
    def image(image_id: str) -> FileResponse:
        pos = index.positions.get(image_id)
        if pos is None:
            raise ApiError(404, f"unknown image id '{image_id}'")
        path = index.image_paths[pos]
        if not path.is_file():
            raise ApiError(404, f"image file for id '{image_id}' is missing on the server")
        return FileResponse(path, headers={"Cache-Control": "max-age=3600"})

    return app
