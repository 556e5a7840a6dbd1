"""Helpers for the service tests: a live loopback server, small PNGs that decode to huge images."""

from __future__ import annotations

import struct
import zlib


def live_server(app, port: int = 0):
    """Run ``app`` under uvicorn on a free 127.0.0.1 port in a thread; a context manager yielding the base URL."""
    import contextlib
    import socket
    import threading

    import uvicorn

    @contextlib.contextmanager
    def _run():
        # IPPROTO_TCP, so asyncio sets TCP_NODELAY on accepted connections (as on its own sockets).
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        ready = threading.Event()
        for _ in range(400):  # up to ~20 s for the server to start
            if srv.started or not thread.is_alive():
                break
            ready.wait(0.05)
        if not srv.started:
            raise RuntimeError("uvicorn did not start")
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            srv.should_exit = True
            thread.join(timeout=10)
            sock.close()

    return _run()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bilevel_png(width: int, height: int) -> bytes:
    """A valid all-black 1-bit PNG of ``width`` x ``height``: a few kB per hundred million pixels.

    Written row by row through zlib, so making a gigapixel file never holds its pixels in memory.
    """
    row = b"\0" * (1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    comp = zlib.compressobj(9)
    parts = [comp.compress(row) for _ in range(height)]
    idat = b"".join(parts) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)  # bit depth 1, greyscale
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
