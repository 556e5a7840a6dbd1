"""The web service: a search page and a JSON API over one index folder.

Routes
- ``GET /``                    the search page (``static/index.html`` + ``app.js`` + ``style.css``)
- ``GET /api/health``          index size, backend, whether the model is loaded
- ``GET /api/search?q=&k=``    text → images
- ``POST /api/search/image``   multipart ``file`` (+ ``k``, ``mode=image|caption``): search by photo
- ``GET /images/{id}``         an indexed image, looked up by id only (never a path from the request),
                               served only while its bytes hash to the SHA-256 recorded in the index

Every error is ``{"error": "..."}`` with a 4xx status; one bad request never stops the server.
5xx means: 503 + ``Retry-After`` when ``max_concurrent`` requests are already in flight or a request
ran past ``request_timeout`` (408 if the client had not finished sending it), 503 when the model
cannot be loaded or does not match the index, 500 only for bugs. Uploads are refused by bytes
(``Content-Length`` and what was read) and by pixels (from the image header, before decoding).
With ``token`` set, ``/api/*`` and ``/images/*`` need ``Authorization: Bearer <token>`` (compared in
constant time); the page and its static files carry no data and stay open. The model is loaded on
the first query unless an encoder is injected (``itrkit serve`` loads it at startup).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import mimetypes
import threading
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from itrkit.errors import DataError, ItrkitError
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
from itrkit.serve.settings import (
    MAX_CONCURRENT,
    MAX_K,
    MAX_UPLOAD_BYTES,
    MULTIPART_SLACK,
    PUBLIC_PATHS,
    PUBLIC_PREFIXES,
    REQUEST_TIMEOUT_S,
    RETRY_AFTER_S,
)

STATIC = Path(__file__).resolve().parent / "static"


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


async def _send_json(send: Any, status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    payload = json.dumps(body).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": payload})


class BearerAuth:
    """ASGI middleware: every non-public path needs ``Authorization: Bearer <token>``."""

    def __init__(self, app: Any, token: str) -> None:
        self.app = app
        # Compare digests: equal length whatever is sent, so the comparison time says nothing.
        self._digest = hashlib.sha256(token.encode()).digest()

    def _allowed(self, scope: dict[str, Any]) -> bool:
        path = scope.get("path", "")
        if path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES):
            return True
        given = b""
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                scheme, _, cred = value.partition(b" ")
                if scheme.lower() == b"bearer":
                    given = cred.strip()
        return hmac.compare_digest(hashlib.sha256(given).digest(), self._digest)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        await _send_json(send, 401, {"error": "missing or wrong access token (send Authorization: Bearer TOKEN)"},
                         {"WWW-Authenticate": 'Bearer realm="itrkit"'})


class Limits:
    """ASGI middleware: at most ``max_concurrent`` requests in flight, each answered within ``timeout`` s.

    Over the limit a request is refused at once (503 + ``Retry-After``) instead of queueing. A request
    still running after ``timeout`` seconds gets 503 (408 if its body had not fully arrived) at once;
    its work is left to finish with its output dropped (a query inside the model thread cannot be
    interrupted; a handler waiting for the rest of a body is woken by the server with a disconnect),
    and its slot is freed only then, so timed-out requests can never pile up beyond the limit.
    ``/api/health`` is not counted: it is how a monitor sees that a busy server is alive.
    """

    def __init__(self, app: Any, max_concurrent: int, timeout: float | None) -> None:
        self.app = app
        self.max_concurrent = int(max_concurrent)
        self.timeout = timeout
        self.in_flight = 0
        self.refused = 0
        self.timed_out = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") == "/api/health":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.max_concurrent:
            self.refused += 1
            await _send_json(send, 503, {"error": f"server busy: {self.in_flight} requests in progress, "
                                                  f"retry in {RETRY_AFTER_S} s"},
                             {"Retry-After": str(RETRY_AFTER_S)})
            return
        self.in_flight += 1
        state = {"started": False, "body_done": False, "abandoned": False}

        async def guarded_receive() -> dict[str, Any]:
            message = await receive()
            if message["type"] == "http.request" and not message.get("more_body", False):
                state["body_done"] = True
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if state["abandoned"]:
                return  # the client already has its timeout answer
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        task = asyncio.ensure_future(self.app(scope, guarded_receive, guarded_send))
        task.add_done_callback(self._release)
        done, _ = await asyncio.wait({task}, timeout=self.timeout)
        if done:
            task.result()  # re-raise what the app raised
            return
        self.timed_out += 1
        state["abandoned"] = True
        if state["started"]:
            return  # half a response is out: nothing better than closing it
        if not state["body_done"] and scope.get("method") in ("POST", "PUT"):
            await _send_json(send, 408, {"error": f"request body not received within {self.timeout:g} s"})
        else:
            await _send_json(send, 503, {"error": f"request took longer than {self.timeout:g} s"},
                             {"Retry-After": str(RETRY_AFTER_S)})

    def _release(self, task: asyncio.Future) -> None:
        self.in_flight -= 1
        if not task.cancelled():
            # Retrieved, so asyncio does not log it: a timed-out request's late error (e.g. the
            # client disconnect) has no one left to answer.
            task.exception()


def _public(results: list[dict]) -> list[dict]:
    # File system paths stay on the server.
    return [{k: v for k, v in r.items() if k != "path"} for r in results]


def create_app(index_dir: str | Path | IndexReader, encoder: Encoder | None = None,
               max_upload_bytes: int = MAX_UPLOAD_BYTES, max_pixels: int | None = None,
               max_concurrent: int = MAX_CONCURRENT, request_timeout: float | None = REQUEST_TIMEOUT_S,
               token: str | None = None) -> FastAPI:
    """A FastAPI app serving ``index_dir`` (a folder or a loaded index).

    ``encoder`` skips loading the model from the run; ``max_pixels`` overrides
    :data:`itrkit.index.search.MAX_PIXELS`; ``token`` makes the data routes need a bearer token.
    """
    if max_concurrent < 1:
        raise ValueError(f"max_concurrent must be at least 1, got {max_concurrent}")
    index = index_dir if isinstance(index_dir, IndexReader) else load_index(index_dir)
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
                return search_image(index, enc, data, k_int, mode=mode, max_pixels=max_pixels)

        results = await run_in_threadpool(run)
        return {"mode": mode, "k": k_int, "results": _public(results)}

    @app.get("/images/{image_id:path}")
    def image(image_id: str) -> Response:
        pos = index.positions.get(image_id)
        if pos is None:
            raise ApiError(404, f"unknown image id '{image_id}'")
        try:
            data = index.image_bytes(image_id)
        except DataError as e:  # missing, or not the file that was indexed
            raise ApiError(404, str(e)) from None
        kind = mimetypes.guess_type(index.image_paths[pos].name)[0] or "application/octet-stream"
        return Response(data, media_type=kind, headers={"Cache-Control": "max-age=3600",
                                                        "X-Content-Type-Options": "nosniff"})

    limits = Limits(None, max_concurrent, request_timeout)  # wired to the inner app by _Outer
    app.add_middleware(_Outer, limits=limits, token=token)
    app.state.limits = limits
    return app


class _Outer:
    """Puts :class:`BearerAuth` (outermost: a request without the token takes no slot) and
    :class:`Limits` in front of FastAPI's own error handling."""

    def __init__(self, app: Any, limits: Limits, token: str | None) -> None:
        limits.app = app
        self.app: Any = BearerAuth(limits, token) if token is not None else limits

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)
