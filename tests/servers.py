"""Real servers on loopback for the remote-input tests: an HTTP server (real sockets, byte
ranges) over a folder, with misbehaving paths, and moto's S3 server (an emulator of the S3
API, from PyPI) when it is installed."""

from __future__ import annotations

import collections
import http.server
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


class Handler(http.server.BaseHTTPRequestHandler):
    """GET (with ``Range: bytes=a-b``) and HEAD of the files under ``server.root``. Paths
    under ``/slow/`` answer after ``server.delay`` seconds; under ``/drop/`` the connection is
    closed after half the body; under ``/flaky/`` the first request of each path is dropped
    before any answer and later ones are served; anything else missing is a 404."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:  # noqa: N802 - the http.server convention
        self._serve(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        server = self.server
        path = self.path.split("?", 1)[0]
        with server.lock:
            server.requests[path] += 1
            count = server.requests[path]
        kind, _, rest = path.lstrip("/").partition("/")
        if kind == "flaky" and count == 1:
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if kind == "slow":
            time.sleep(server.delay)
        relative = rest if kind in ("slow", "drop", "flaky") else path.lstrip("/")
        file = Path(server.root, relative)
        if not file.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = file.read_bytes()
        status, start, stop = 200, 0, len(data)
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        if match:
            start = int(match.group(1))
            stop = min(len(data), int(match.group(2)) + 1) if match.group(2) else len(data)
            status = 206
        part = data[start:stop]
        self.send_response(status)
        self.send_header("Content-Length", str(len(part)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{stop - 1}/{len(data)}")
        self.end_headers()
        if not body:
            return
        if kind == "drop":
            self.wfile.write(part[: len(part) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        self.wfile.write(part)


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that gave up (the timeout tests) breaks the pipe: expected

    def __init__(self, root: Path, delay: float) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.root, self.delay = root, delay
        self.lock = threading.Lock()
        self.requests: collections.Counter[str] = collections.Counter()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


@contextmanager
def http_server(root: Path, delay: float = 5.0) -> Iterator[Server]:
    server = Server(root, delay)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def s3_server() -> Iterator[str]:
    """moto's S3-compatible server on loopback (``moto[server]``); its endpoint URL. The
    AWS_* variables point s3fs at it for the duration."""
    from moto.server import ThreadedMotoServer

    port = unused_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    saved = {k: os.environ.get(k) for k in _AWS}
    os.environ.update(
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL_S3=endpoint,
    )
    try:
        yield endpoint
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_AWS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3")
