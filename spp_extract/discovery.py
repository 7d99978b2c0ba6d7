"""Finding image files: folders walked recursively (sorted, filtered by extension), files
named directly, ``--files-from`` lists; each real file once; folders that cannot be listed
become refs with a ``problem`` (a failure row, never skipped)."""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from . import tables
from .errors import ConfigError, printable
from .sources import (
    Member,
    check_remote,
    compressed_tar_reason,
    filesystem,
    is_compressed_tar,
    is_tar,
    is_url,
    protocol,
)
from .tars import index_tar

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


@dataclass(frozen=True, slots=True)  # slots: ~150 bytes less per image (1M images: 150 MB)
class ImageRef:
    """One input image. ``key`` is the stored path: relative to the input directory it was
    found under, or as given for files named directly; a tar member's is the tar's followed by
    the member's name (``00000.tar/key.jpg``); a URL's is the URL (relative to a remote folder
    given as input). Non-UTF-8 names keep their bytes via ``os.fsencode(key)`` (Python's
    surrogateescape). ``path``: the file, tar or URL to read; ``member``: where in the tar.
    ``origin``: for URLs, what the source starts with (the remote folder, or the list or table
    that named it). ``problem`` (error class, message) marks a folder that could not be listed
    or a tar that could not be read to its end: it becomes a failure row without being opened."""

    key: str
    path: str
    problem: tuple[str, str] | None = None
    member: Member | None = None
    origin: str | None = None

    @property
    def key_bytes(self) -> bytes:
        return os.fsencode(self.key)

    @property
    def remote(self) -> bool:
        return is_url(self.path)

    @property
    def source(self) -> bytes:
        """Where the image is (absolute path, or URL): a resume redoes a stored path that now
        names another image. It ends with the stored path, so that the input root is the
        source less the stored path: a file named directly by a path that leaves the current
        folder (stored as ``../x.jpg``) is the current folder joined with it, not normalised.
        A URL named directly is its own source (it has no root)."""
        if self.origin is not None:
            return os.fsencode(self.origin.rstrip("/") + "/" + self.key)
        if self.remote:
            return os.fsencode(self.key)
        if self.key.split(os.sep)[0] == os.pardir:
            return os.fsencode(os.path.join(os.getcwd(), self.key))
        where = os.path.abspath(self.path)
        if self.member is not None:
            where = os.path.join(where, self.member.name)
        return os.fsencode(where)

    def stat(self) -> tuple[int, int] | None:
        """(size, modification time in ns) that tell a resume whether the image changed: a
        file's, a tar member's (from its header); None for a URL (it is not asked again)."""
        if self.member is not None:
            return self.member.size, self.member.mtime_ns
        if self.remote:
            return None
        return file_stat(self.path)


@dataclass(frozen=True)
class Found:
    """What :func:`find_images` found: ``refs`` sorted by stored path (bytewise), and how many
    files were left out because an earlier input already named them (``overlaps``)."""

    refs: list[ImageRef]
    overlaps: int


def _is_image_name(name: str) -> bool:
    # The last suffix, as `find -iname '*.png'` sees it: os.path.splitext would give ".png"
    # and "..png" no extension at all and leave them out silently.
    stem, dot, suffix = name.rpartition(".")
    return bool(dot) and "." + suffix.lower() in IMAGE_EXTENSIONS


def _is_input_name(name: str) -> bool:
    """An image, or a tar (compressed ones become failure rows: they cannot be read in place)."""
    return _is_image_name(name) or is_tar(name) or is_compressed_tar(name)


def _folder_problem(exc: OSError) -> tuple[str, str]:
    kind = "permission_denied" if exc.errno in (errno.EACCES, errno.EPERM) else "unreadable"
    return kind, f"cannot list this folder: {exc.strerror or exc}"


def _walk(root: str, follow_symlinks: bool) -> list[tuple[str, tuple[str, str] | None]]:
    """Image files under ``root`` (relative paths, problem None), and folders that could not be
    listed (relative paths, ``"."`` for root itself, with their problem). Directory symlinks are
    followed only on request, and then each real directory is entered once, so loops end."""
    found: list[tuple[str, tuple[str, str] | None]] = []
    unlisted: list[OSError] = []  # os.walk skips a folder it cannot list; we record it
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(
        root, onerror=unlisted.append, followlinks=follow_symlinks
    ):
        if follow_symlinks:
            try:
                st = os.stat(dirpath)
            except OSError as exc:
                found.append((os.path.relpath(dirpath, root), _folder_problem(exc)))
                dirnames[:] = []
                continue
            if (st.st_dev, st.st_ino) in seen:
                dirnames[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if _is_input_name(name):
                found.append((name if rel == "." else os.path.join(rel, name), None))
    for exc in unlisted:
        where = exc.filename if isinstance(exc.filename, str) else root
        found.append((os.path.relpath(where, root), _folder_problem(exc)))
    return found


class _Collector:
    """Stored paths -> refs, each real file (or tar member, or URL) once: the first input that
    names it wins."""

    def __init__(self, timeout: float) -> None:
        self.refs: dict[str, ImageRef] = {}
        self.keys: dict[str, str] = {}  # real location -> stored path
        self.overlaps = 0
        self.timeout = timeout
        self._real_dirs: dict[str, str] = {}

    def location(self, path: str, *, folder: bool) -> str:
        """Where ``path`` really is: its folder resolved, its own name kept (two symlinks in a
        folder are two files), or for an unlisted folder, the folder resolved."""
        if is_url(path):
            return path
        head, name = (path, "") if folder else os.path.split(path)
        if head not in self._real_dirs:
            self._real_dirs[head] = os.path.realpath(head)
        return os.path.join(self._real_dirs[head], name)

    def add(
        self,
        key: str,
        path: str,
        problem: tuple[str, str] | None = None,
        member: Member | None = None,
        origin: str | None = None,
    ) -> None:
        key = key if is_url(key) else os.path.normpath(key)
        location = self.location(path, folder=problem is not None and member is None)
        if member is not None:
            location += "\0" + member.name
        elif problem is not None and (is_tar(path) or is_compressed_tar(path)):
            location += "\0"  # a tar's own failure row, beside its members' rows
        if location in self.keys:
            self.overlaps += self.keys[location] != key
            return
        previous = self.refs.get(key)
        if previous is not None:
            raise ConfigError(
                f"two inputs would be stored as the same path {printable(key)!r} "
                f"({printable(previous.path)} and {printable(path)}); pass their common parent "
                "directory instead"
            )
        self.keys[location] = key
        self.refs[key] = ImageRef(key, path, problem, member, origin)

    def add_file(self, key: str, path: str, origin: str | None = None) -> None:
        """An image, or a tar (its image members; a row of its own if it is damaged)."""
        name = path.rstrip("/")
        if is_compressed_tar(name):
            self.add(key, path, ("compressed_tar", compressed_tar_reason(key)), origin=origin)
        elif is_tar(name):
            self.add_tar(key, path, origin)
        else:
            self.add(key, path, origin=origin)

    def add_tar(self, key: str, path: str, origin: str | None = None) -> None:
        index = index_tar(path, self.timeout, _is_image_name)
        members = {m.name: m for m in index.members}  # a later member of the same name wins,
        if len(members) < len(index.members):  # as when the tar is unpacked
            log.warning(
                "%s holds %d image members named like a later one: the later ones are used",
                printable(path),
                len(index.members) - len(members),
            )
        for member in members.values():
            self.add(f"{key}/{member.name}", path, member=member, origin=origin)
        for name, why in index.unreadable:  # a row each, never opened
            self.add(f"{key}/{name}", path, why, member=Member(name, 0, 0, 0), origin=origin)
        if index.problem is not None:
            self.add(key, path, index.problem, origin=origin)


def _list_entries(files_from: str | Path, column: str | None) -> list[tuple[str, str]]:
    """(path, where it came from) for each entry of a --files-from list: a non-blank line, or
    the ``column`` of a .csv or .parquet table (``url`` if not given)."""
    name = printable(str(files_from))
    suffix = os.path.splitext(str(files_from))[1].lower()
    if suffix in (".csv", ".tsv", ".parquet"):
        return tables.entries(str(files_from), column or "url")
    if column is not None:
        raise ConfigError(
            f"--column applies to .csv, .tsv and .parquet lists; {name} is a list of lines "
            "(drop --column)"
        )
    try:
        raw = Path(files_from).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read --files-from {str(files_from)!r}: {exc.strerror}") from None
    return [
        (os.fsdecode(line.rstrip(b"\r")), f" on line {number} of {name}")
        for number, line in enumerate(raw.split(b"\n"), 1)
        if line.strip()
    ]


def find_images(
    inputs: Sequence[str | Path],
    *,
    files_from: str | Path | None = None,
    column: str | None = None,
    follow_symlinks: bool = False,
    timeout: float = 30.0,
) -> Found:
    """All images named by ``inputs`` (directories walked recursively, files as given, tars
    read for their image members, URLs) and by ``files_from`` (one path or URL per line,
    relative to the current folder, or a .csv/.parquet table's ``column``), sorted by stored
    path (bytewise). A file reached through several inputs (a folder and its subfolder, the
    same folder through a symlink) is kept once, under the first input's stored path. Folders
    that cannot be listed and tars that cannot be read to their end are refs with a
    ``problem``. ``timeout``: seconds per remote request (remote folders and tars are read
    here; single remote images are not touched until they are decoded).

    Raises ConfigError for local inputs that do not exist, for compressed tars named directly,
    for remote inputs without the package that reads them, and for two different files that
    would be stored under the same path.
    """
    entries = [(str(p), "", None) for p in inputs]
    if column is not None and files_from is None:
        raise ConfigError("--column names a column of a --files-from table; give --files-from")
    if files_from is not None:
        origin = os.path.abspath(files_from)
        entries += [(e, where, origin) for e, where in _list_entries(files_from, column)]
    collector = _Collector(timeout)
    checked: set[str] = set()
    for entry, where, origin in entries:
        if is_url(entry):
            if protocol(entry) not in checked:
                check_remote(entry)
                checked.add(protocol(entry))
            _add_remote(collector, entry, origin)
        elif is_compressed_tar(entry) and os.path.isfile(entry):
            raise ConfigError(compressed_tar_reason(entry) + where)
        elif os.path.isdir(entry):
            for rel, problem in _walk(entry, follow_symlinks):
                path = entry if rel == "." else os.path.join(entry, rel)
                if problem is None:
                    collector.add_file(rel, path)
                else:
                    collector.add(entry if rel == "." else rel, path, problem)
        elif os.path.lexists(entry):
            collector.add_file(entry, entry)
        elif where:
            raise ConfigError(
                f"input '{printable(entry)}'{where} does not exist "
                "(paths in the list are relative to the current folder)"
            )
        else:
            raise ConfigError(f"input '{printable(entry)}' does not exist; check the path")
    refs = sorted(collector.refs.values(), key=lambda ref: ref.key_bytes)
    return Found(refs, collector.overlaps)


def _add_remote(collector: _Collector, url: str, origin: str | None) -> None:
    """A URL: an image (http(s) URLs are always single files: the web has no listing), a tar,
    or on an object store (s3://, gs://, ...), a folder listed recursively (keys relative to
    it, like a local folder's)."""
    proto = protocol(url)
    if proto not in ("http", "https") and not _is_input_name(url.rstrip("/")):
        fs = filesystem(url, collector.timeout)
        try:
            names = sorted(fs.find(url))
        except Exception as exc:  # noqa: BLE001 - a listing that fails is one failure row
            collector.add(url, url, ("unreachable", f"cannot list: {exc}"), origin=url)
            return
        base = url.rstrip("/")
        prefix = fs._strip_protocol(base)  # noqa: SLF001 - fsspec's own path form
        files = [n for n in names if _is_input_name(n)]
        if names == [prefix]:  # one object, whatever its name
            collector.add_file(url, url, origin)
            return
        if files:
            for name in files:
                rel = name[len(prefix) :].lstrip("/")
                collector.add_file(rel, f"{proto}://{name}", origin=base)
            return
        if names:
            return  # a folder without images, as a local one
    collector.add_file(url, url, origin)


def file_stat(path: str) -> tuple[int, int]:
    """(size, modification time in ns) of a file; (-1, -1) if it cannot be read."""
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1
