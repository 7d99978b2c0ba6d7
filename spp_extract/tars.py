"""Tar shards read in place: the index of a tar's members made once from its headers (the
data is skipped; a damaged or cut tar keeps what comes before the damage and says where it
is; links resolve to their target's data; sparse members and tars inside tars are named, not
read), a member's bytes read at its offset (a local file or a byte range of a remote tar), and
a row's location read back (``…/00000.tar/key.jpg``, for the neighbours page)."""

from __future__ import annotations

import functools
import os
import posixpath
import tarfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

from .errors import ImageError
from .sources import (
    Member,
    classify,
    failure_message,
    fetch,
    filesystem,
    is_compressed_tar,
    is_tar,
    is_url,
    open_file,
    retried,
)

TAR_BLOCK = 1 << 22  # a remote tar's headers are read through a 4 MiB read-ahead


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
            size = retried(lambda: fs.size(path), timeout)  # type: ignore[arg-type,return-value]
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
        kind, _ = classify(exc)
        return collected.index((kind, f"reading the tar: {failure_message(exc, timeout)}"))


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
