"""Service defaults, importable without the ``serve`` extra (the CLI's ``--help`` needs them)."""

from __future__ import annotations

MAX_K = 100
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
# Multipart framing (boundaries, part headers, the k and mode fields) on top of the file itself.
MULTIPART_SLACK = 64 * 1024
# Requests in flight at once (queries wait for one model lock; more would only queue and hold memory).
MAX_CONCURRENT = 16
REQUEST_TIMEOUT_S = 30.0
RETRY_AFTER_S = 1
# Open to anyone even with a token: they hold no data.
PUBLIC_PATHS = ("/", "/favicon.ico")
PUBLIC_PREFIXES = ("/static/",)
