"""The server side of the load test, run as its own process so its memory is measured alone.

    python tests/serve/_load_server.py INDEX_DIR TOKEN MAX_UPLOAD_BYTES

Serves INDEX_DIR with the colour encoder of tests/index/conftest.py on a free 127.0.0.1 port,
prints ``port N`` on stdout once listening, and runs until terminated.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import time
from pathlib import Path

import uvicorn

from itrkit.serve.app import create_app


def main() -> None:
    index_dir, token, max_upload = sys.argv[1], sys.argv[2], int(sys.argv[3])
    spec = importlib.util.spec_from_file_location("itrkit_tests_index_fixtures",
                                                  Path(__file__).resolve().parents[1] / "index" / "conftest.py")
    assert spec is not None and spec.loader is not None
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    app = create_app(index_dir, encoder=fixtures.ColourEncoder(), token=token, max_upload_bytes=max_upload)
    # Port 0 through uvicorn's own bind, the path `itrkit serve` takes (a socket made here by hand
    # would lack TCP_NODELAY and add Nagle's 40 ms to every keep-alive response).
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))

    def announce() -> None:
        while not server.started:
            time.sleep(0.02)
        print(f"port {server.servers[0].sockets[0].getsockname()[1]}", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    server.run()


if __name__ == "__main__":
    main()
