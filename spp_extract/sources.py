"""Where an image's bytes are, and reading them: a local file (opened by ``images``, a
regular file only), a member of an uncompressed tar (``tars``: read in place at its offset),
or a URL read through fsspec (``https://``, ``s3://``, ``gs://``, ... with the ``[remote]``
extra), whole or a range, with bounded retries.

Remote failures have their own classes: ``not_found``, ``permission_denied``, ``unreachable``
(refused, dropped, a server error, a name that does not resolve, an untrusted certificate),
``timeout``, ``http_error`` (another refusal) and ``invalid_url`` (a URL that cannot be asked
at all). The transient ones (``unreachable`` but certificates, ``timeout``) are tried
``ATTEMPTS`` times, waiting ``BACKOFF`` s, then twice that. Nothing is written to disk."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import re
import ssl
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, TypeVar

from .errors import ConfigError, ImageError, printable

INSTALL = 'pip install "spp-extract[remote]"'
HEADER_BYTES = 1 << 16  # read for an image's size (planning): most headers fit in far less
ATTEMPTS = 3
BACKOFF = 0.5
FETCH_THREADS = 16  # remote reads in flight per decode worker
COMPRESSED_TARS = (".tar.gz", ".tgz", ".tar.bz2", ".tbz", ".tbz2", ".tar.xz", ".txz", ".tar.zst")

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(text: str) -> bool:
    return bool(_URL.match(text))


def _name_part(name: str) -> str:
    """A URL's path without its query and fragment (``s.tar?sig=…``); a file name as is."""
    return re.split(r"[?#]", name, maxsplit=1)[0] if is_url(name) else name


def is_tar(name: str) -> bool:
    return _name_part(name).lower().endswith(".tar")


def is_compressed_tar(name: str) -> bool:
    return _name_part(name).lower().endswith(COMPRESSED_TARS)


def compressed_tar_reason(name: str) -> str:
    return (
        f"{printable(name)} is a compressed tar: its members cannot be read in place; "
        "decompress it (gunzip, bunzip2, unxz, unzstd) and give the .tar"
    )


def locate(root: str, key: str) -> str:
    """Where a row's image is: its input root joined with its stored path (a URL is whole)."""
    return key if is_url(key) else os.path.join(root, key)


@dataclass(frozen=True, slots=True)
class Member:
    """A regular file inside a tar: where its data starts, how long it is, when it was made."""

    name: str
    offset: int
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class Blob:
    """An image's bytes read into memory (a tar member, a URL), with what a file's stat gives."""

    data: bytes
    size: int
    mtime_ns: int


_NOT_REGULAR = {
    stat.S_IFDIR: "a directory",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
}
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0)


def _check_regular(st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        what = _NOT_REGULAR.get(stat.S_IFMT(st.st_mode), "not a regular file")
        raise ImageError("not_a_file", f"not a regular file ({what})")


def open_file(path: str) -> BinaryIO:
    """Open a regular file for reading. Anything else (FIFO, socket, device, directory) raises
    ImageError("not_a_file") without being opened for reading: a FIFO would block forever."""
    _check_regular(os.stat(path))
    fd = os.open(path, _OPEN_FLAGS)  # non-blocking: it may have been replaced by a FIFO since
    try:
        _check_regular(os.fstat(fd))
    except BaseException:
        os.close(fd)
        raise
    return os.fdopen(fd, "rb")


# --- remote reads --------------------------------------------------------------------------


def protocol(url: str) -> str:
    return url.split("://", 1)[0].lower()


def check_remote(url: str) -> None:
    """A one-line ConfigError if ``url`` cannot be read here (fsspec or the protocol's package
    missing, an unknown protocol), before any work."""
    filesystem(url, 1.0)


def filesystem(url: str, timeout: float) -> Any:
    """The fsspec file system for ``url``'s protocol, with ``timeout`` per request and no
    retries of its own (ours are counted). One per process: an instance made before a fork
    (its event loop runs on a thread the child does not have) is not used after it."""
    return _filesystem(protocol(url), timeout, os.getpid())


@functools.cache
def _filesystem(proto: str, timeout: float, pid: int) -> Any:
    try:
        import fsspec
    except ImportError:
        raise ConfigError(f"reading {proto}:// inputs needs fsspec; {INSTALL}") from None
    options: dict[str, Any] = {}
    try:
        if proto in ("http", "https"):
            import aiohttp

            options = {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=timeout)}}
        elif proto in ("s3", "s3a"):
            options = {
                "config_kwargs": {
                    "connect_timeout": timeout,
                    "read_timeout": timeout,
                    "retries": {"max_attempts": 1},
                }
            }
            endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            if endpoint:
                options["endpoint_url"] = endpoint
        elif proto in ("gs", "gcs"):
            options = {"timeout": timeout}
        return fsspec.filesystem(proto, **options)
    except ImportError as exc:
        raise ConfigError(
            f"reading {proto}:// inputs needs the package {exc.name!r}; {INSTALL}"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"cannot read {proto}:// inputs: {printable(str(exc))}") from None


def classify(exc: BaseException) -> tuple[str, bool]:
    """(failure class, worth another attempt) for an exception raised by a remote read."""
    status = getattr(exc, "status", None) or getattr(exc, "code", None)
    if isinstance(exc, FileNotFoundError) or status == 404:
        return "not_found", False
    if isinstance(exc, PermissionError) or status in (401, 403):
        return "permission_denied", False
    if isinstance(exc, asyncio.TimeoutError | TimeoutError) or "Timeout" in type(exc).__name__:
        return "timeout", True
    if isinstance(status, int) and status != 429 and status < 500:
        return "http_error", False
    if isinstance(exc, ssl.SSLError) or "Certificate" in type(exc).__name__:
        return "unreachable", False  # an untrusted server: asking again will not change it
    if isinstance(exc, ValueError):  # a URL that cannot be asked at all (aiohttp's InvalidURL)
        return "invalid_url", False
    return "unreachable", True


def retried(call: Callable[[], bytes], timeout: float, attempts: int = ATTEMPTS) -> bytes:
    last: BaseException | None = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(BACKOFF * 2 ** (attempt - 1))
        try:
            return call()
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - every remote failure becomes a class
            kind, again = classify(exc)
            last = exc
            if not again:
                raise ImageError(kind, failure_message(exc, timeout)) from None
    assert last is not None
    kind, _ = classify(last)
    tries = f" (after {attempts} attempts)" if attempts > 1 else ""
    raise ImageError(kind, failure_message(last, timeout) + tries) from None


def failure_message(exc: BaseException, timeout: float) -> str:
    if classify(exc)[0] == "timeout":
        return f"no complete answer within {timeout:g} s (fetch_timeout)"
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if type(exc).__name__ not in text else text


def fetch(
    url: str,
    timeout: float,
    start: int | None = None,
    end: int | None = None,
    attempts: int = ATTEMPTS,
) -> bytes:
    """The bytes of ``url`` (``[start, end)`` only, when given), tried ``attempts`` times as
    the module says. Raises ImageError with a remote failure class."""
    fs = filesystem(url, timeout)

    def call() -> bytes:
        data = fs.cat_file(url, start=start, end=end)
        if start is not None and end is not None and len(data) > end - start:
            data = data[start:end]  # a server that ignores Range sends it all
        return bytes(data)

    return retried(call, timeout, attempts)


T = TypeVar("T")
_POOLS: dict[int, concurrent.futures.ThreadPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()


def concurrently(work: Callable[[Any], T], items: Sequence[Any]) -> list[T]:
    """``[work(x) for x in items]``, run by a pool of FETCH_THREADS threads of this process
    (remote reads wait on the network, not the CPU)."""
    if len(items) < 2:
        return [work(x) for x in items]
    with _POOLS_LOCK:
        pool = _POOLS.get(os.getpid())
        if pool is None:  # a forked worker does not inherit its parent's threads
            pool = _POOLS[os.getpid()] = concurrent.futures.ThreadPoolExecutor(FETCH_THREADS)
    return list(pool.map(work, items))
