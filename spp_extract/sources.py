"""Where an image's bytes are, and reading them: a local file (opened by ``images``), a member
of an uncompressed tar read in place at its offset (an index of member offsets is made once,
from the headers; nothing is unpacked), or a URL read through fsspec (``https://``, ``s3://``,
``gs://``, ... with the ``[remote]`` extra), whole or a range, with bounded retries.

Remote failures have their own classes: ``not_found``, ``permission_denied``, ``unreachable``
(refused, dropped, a server error, a name that does not resolve), ``timeout``, ``http_error``
(another refusal) and ``invalid_url`` (a URL that cannot be asked at all). The
transient ones (``unreachable``, ``timeout``) are tried ``ATTEMPTS`` times, waiting
``BACKOFF`` s, then twice that. Nothing is written to disk."""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import os
import posixpath
import re
import ssl
import stat
import tarfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, BinaryIO, TypeVar

from .errors import ConfigError, ImageError, printable

INSTALL = 'pip install "spp-extract[remote]"'
HEADER_BYTES = 1 << 16  # read for an image's size (planning): most headers fit in far less
ATTEMPTS = 3
BACKOFF = 0.5
FETCH_THREADS = 16  # remote reads in flight per decode worker
TAR_BLOCK = 1 << 22  # a remote tar's headers are read through a 4 MiB read-ahead
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


def _classify(exc: BaseException) -> tuple[str, bool]:
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


def _remote(call: Callable[[], bytes], timeout: float, attempts: int = ATTEMPTS) -> bytes:
    last: BaseException | None = None
    for attempt in range(attempts):
        if attempt:
            time.sleep(BACKOFF * 2 ** (attempt - 1))
        try:
            return call()
        except ConfigError:
            raise
        except Exception as exc:  # noqa: BLE001 - every remote failure becomes a class
            kind, again = _classify(exc)
            last = exc
            if not again:
                raise ImageError(kind, _message(exc, timeout)) from None
    assert last is not None
    kind, _ = _classify(last)
    tries = f" (after {attempts} attempts)" if attempts > 1 else ""
    raise ImageError(kind, _message(last, timeout) + tries) from None


def _message(exc: BaseException, timeout: float) -> str:
    if _classify(exc)[0] == "timeout":
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

    return _remote(call, timeout, attempts)


# --- tar members ---------------------------------------------------------------------------


def read_member(tar: str, member: Member, timeout: float, limit: int | None = None) -> bytes:
    """A member's data (its first ``limit`` bytes only, when given), read in place. Shorter
    than asked only if the tar ends early."""
    count = member.size if limit is None else min(limit, member.size)
    if is_url(tar):
        return fetch(tar, timeout, member.offset, member.offset + count) if count else b""
    try:
        with open_file(tar) as fh:
            fh.seek(member.offset)
            return fh.read(count)
    except FileNotFoundError:
        raise ImageError(
            "missing", "the tar holding it was not found (removed after the scan?)"
        ) from None
    except PermissionError as exc:
        raise ImageError("permission_denied", str(exc)) from None
    except OSError as exc:
        raise ImageError("unreadable", f"reading the tar: {exc.strerror or exc}") from None


def load(ref: Any, timeout: float, header: bool = False) -> str | Blob:
    """What ``images`` decodes for ``ref`` (a ``discovery.ImageRef``): a local file's path, or
    the bytes of a tar member or URL (with ``header``, the first HEADER_BYTES only). Raises
    ImageError."""
    member: Member | None = ref.member
    if member is not None:
        data = read_member(ref.path, member, timeout, HEADER_BYTES if header else None)
        if not header and len(data) < member.size:
            raise ImageError(
                "truncated",
                f"the tar ends inside this member: {len(data)} of {member.size} bytes",
            )
        return Blob(data, member.size, member.mtime_ns)
    if not is_url(ref.path):
        return ref.path
    # a header is read once: if that fails, decoding tries again and records why
    data = fetch(ref.path, timeout, 0, HEADER_BYTES, 1) if header else fetch(ref.path, timeout)
    return Blob(data, -1 if header else len(data), -1)


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


def _split_tar(location: str) -> tuple[str, str] | None:
    """(tar, member) for a location inside a tar (``…/00000.tar/key.jpg``), at the last
    ``.tar/`` of it; None otherwise."""
    at = location.lower().rfind(".tar/")
    return None if at < 0 else (location[: at + 4], location[at + 5 :])


@functools.lru_cache(maxsize=8)
def _members_of(tar: str, timeout: float) -> dict[str, Member]:
    return {m.name: m for m in index_tar(tar, timeout, lambda _name: True).members}


def read_location(location: str, timeout: float = 30.0) -> bytes:
    """The bytes of the image at a row's location (its root joined with its path, as
    ``read_features(...).absolute_paths()`` gives it): a file, a URL, or a tar member named
    ``…/00000.tar/key.jpg`` (the tar's index is kept for the next member). Raises OSError
    or ImageError."""
    inside = _split_tar(location)
    if inside is None or (not is_url(location) and os.path.lexists(location)):
        if not is_url(location):
            with open_file(location) as fh:
                return fh.read()
        return fetch(location, timeout)
    if is_url(location):  # a folder named like a tar, on a web server?
        try:
            return fetch(location, timeout, attempts=1)
        except ImageError as exc:
            if exc.kind != "not_found":
                raise
    tar, name = inside
    member = _members_of(tar, timeout).get(member_name(name))
    if member is None:
        raise FileNotFoundError(f"no member {name!r} in {tar}")
    return read_member(tar, member, timeout)


# --- tar index -----------------------------------------------------------------------------


@dataclass
class TarIndex:
    """A tar's image members (in archive order; a hard or symbolic link to a member as that
    member's data under its own name), the image members that cannot be read in place with
    why (a sparse member, a tar inside the tar, a link to nothing), and, if the tar could not
    be read to its end, why: (failure class, message)."""

    members: list[Member]
    problem: tuple[str, str] | None = None
    unreadable: list[tuple[str, tuple[str, str]]] = field(default_factory=list)


class _Members:
    """What :func:`index_tar` collects, header by header."""

    def __init__(self, wanted: Callable[[str], bool]) -> None:
        self.wanted = wanted
        self.members: list[Member] = []
        self.unreadable: list[tuple[str, tuple[str, str]]] = []
        self.data: dict[str, Member] = {}  # every regular member by name (link targets)
        self.links: list[tuple[str, str, bool]] = []  # (name, target, hard)

    def add(self, info: tarfile.TarInfo) -> None:
        name = member_name(info.name)
        if not name:
            return
        if info.isreg():
            member = Member(name, info.offset_data, info.size, int(info.mtime * 1e9))
            self.data[name] = member
            if not (self.wanted(name) or is_tar(name) or is_compressed_tar(name)):
                return
            if info.issparse():
                why = "a sparse member (tar -S) cannot be read in place; make the tar without -S"
                self.unreadable.append((name, ("unsupported_member", why)))
            elif is_tar(name) or is_compressed_tar(name):
                why = "a tar inside a tar is not read; unpack the outer tar and give the inner one"
                self.unreadable.append((name, ("nested_tar", why)))
            else:
                self.members.append(member)
        elif (info.islnk() or info.issym()) and self.wanted(name):
            target = (
                info.linkname
                if info.islnk()
                else posixpath.join(posixpath.dirname(info.name), info.linkname)
            )
            self.links.append((name, member_name(target), info.islnk()))

    def index(self, problem: tuple[str, str] | None) -> TarIndex:
        """The index, links resolved (a symbolic link may point ahead)."""
        for name, target, hard in self.links:
            found = self.data.get(target)
            if found is None:
                kind = "missing" if hard else "dangling_symlink"
                self.unreadable.append((name, (kind, f"link to {target!r}, not in the tar")))
            else:
                self.members.append(Member(name, found.offset, found.size, found.mtime_ns))
        return TarIndex(self.members, problem, self.unreadable)


def member_name(name: str) -> str:
    """The stored form of a member name: normalised, never leaving the tar (no leading ``/``
    or ``..``)."""
    parts = [p for p in posixpath.normpath(name).split("/") if p not in ("", ".", "..")]
    return "/".join(parts)


def index_tar(path: str, timeout: float, wanted: Callable[[str], bool]) -> TarIndex:
    """The members of the uncompressed tar at ``path`` (a local path or a URL) whose names
    ``wanted`` accepts, from their headers (the data is skipped). A damaged or cut tar keeps
    the members before the damage and says where it is."""
    try:
        if is_url(path):
            fs = filesystem(path, timeout)
            size = _remote(lambda: fs.size(path), timeout)  # type: ignore[arg-type,return-value]
            handle: BinaryIO = fs.open(path, "rb", block_size=TAR_BLOCK, cache_type="readahead")
        else:
            handle = open_file(path)
            size = os.fstat(handle.fileno()).st_size
    except ImageError as exc:
        return TarIndex([], (exc.kind, f"cannot open the tar: {exc.message}"))
    except OSError as exc:
        kind = "permission_denied" if isinstance(exc, PermissionError) else "unreadable"
        return TarIndex([], (kind, f"cannot open the tar: {exc.strerror or exc}"))
    collected = _Members(wanted)
    members = collected.members
    try:
        with handle:
            try:
                tf = tarfile.open(fileobj=handle, mode="r:")
            except (tarfile.TarError, EOFError) as exc:
                return TarIndex([], ("corrupt_tar", f"not a readable tar: {exc}"))
            with tf:
                while True:
                    try:
                        info = tf.next()
                    except (tarfile.TarError, EOFError) as exc:
                        after = f"after {members[-1].name!r}" if members else "before any image"
                        cut = "unexpected end" in str(exc)
                        kind = "truncated_tar" if cut else "corrupt_tar"
                        return collected.index((kind, f"{exc}; members {after} are lost"))
                    if info is None:
                        break
                    collected.add(info)
                    tf.members.clear()  # tarfile keeps every header: not ours to hold
                end = tf.offset
            return collected.index(_end_problem(handle, end, size, members))
    except ImageError as exc:  # a remote read failed part way
        return collected.index((exc.kind, f"reading the tar: {exc.message}"))
    except Exception as exc:  # noqa: BLE001 - a remote read's own error
        kind, _ = _classify(exc)
        return collected.index((kind, f"reading the tar: {_message(exc, timeout)}"))


def _end_problem(
    handle: BinaryIO, end: int, size: int, members: list[Member]
) -> tuple[str, str] | None:
    """Why the archive does not end where its last header says it should (tarfile stops
    quietly at damage): None for a tar that ends with its end-of-archive block."""
    after = f"after {members[-1].name!r}" if members else "before any image"
    if end > size:
        return "truncated_tar", f"the tar is cut inside its last member; members {after} are lost"
    handle.seek(end)
    block = handle.read(512)
    if block == bytes(512):
        return None
    if len(block) < 512:
        return "truncated_tar", f"the tar is cut at byte {size}; members {after} are lost"
    return "corrupt_tar", f"the header at byte {end} is damaged; members {after} are lost"
