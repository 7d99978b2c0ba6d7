"""Real servers on loopback for the remote-input tests: an HTTP server (real sockets, byte
ranges) over a folder, with misbehaving paths, and moto's S3 server (an emulator of the S3
API, from PyPI) when it is installed."""

from __future__ import annotations

import collections
import http.server
import ipaddress
import os
import re
import socket
import ssl
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
    scheme = "http"

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a client that gave up (the timeout tests) breaks the pipe: expected

    def __init__(self, root: Path, delay: float) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.root, self.delay = root, delay
        self.lock = threading.Lock()
        self.requests: collections.Counter[str] = collections.Counter()

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server_address[1]}"


@contextmanager
def http_server(root: Path, delay: float = 5.0, tls: Path | None = None) -> Iterator[Server]:
    """The server on a free loopback port; with ``tls`` (a folder from :func:`certificate`),
    HTTPS with that certificate."""
    server = Server(root, delay)
    if tls is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls / "cert.pem", tls / "key.pem")
        server.socket = context.wrap_socket(server.socket, server_side=True)
        server.scheme = "https"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def certificate(folder: Path) -> Path:
    """A self-signed certificate for 127.0.0.1 (``cert.pem``, ``key.pem`` in ``folder``): a
    client trusts it with SSL_CERT_FILE=folder/cert.pem."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return folder


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
