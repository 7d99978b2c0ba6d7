"""Finding image files: folders walked recursively (sorted, filtered by extension), files
named directly, ``--files-from`` lists; each real file once; folders that cannot be listed
become refs with a ``problem`` (a failure row, never skipped)."""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, printable

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})


@dataclass(frozen=True)
class ImageRef:
    """One input file. ``key`` is the stored path: relative to the input directory it was found
    under, or as given for files named directly. Non-UTF-8 names keep their bytes via
    ``os.fsencode(key)`` (Python's surrogateescape). ``problem`` (error class, message) marks a
    folder that could not be listed: it becomes a failure row without being opened."""

    key: str
    path: str
    problem: tuple[str, str] | None = None

    @property
    def key_bytes(self) -> bytes:
        return os.fsencode(self.key)

    @property
    def source(self) -> bytes:
        """Where the file is (absolute path): a resume redoes a stored path that now names
        another file. It ends with the stored path, so that the input root is the source less
        the stored path: a file named directly by a path that leaves the current folder
        (stored as ``../x.jpg``) is the current folder joined with it, not normalised."""
        if self.key.split(os.sep)[0] == os.pardir:
            return os.fsencode(os.path.join(os.getcwd(), self.key))
        return os.fsencode(os.path.abspath(self.path))


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
            if _is_image_name(name):
                found.append((name if rel == "." else os.path.join(rel, name), None))
    for exc in unlisted:
        where = exc.filename if isinstance(exc.filename, str) else root
        found.append((os.path.relpath(where, root), _folder_problem(exc)))
    return found


class _Collector:
    """Stored paths -> refs, each real file once: the first input that names it wins."""

    def __init__(self) -> None:
        self.refs: dict[str, ImageRef] = {}
        self.keys: dict[str, str] = {}  # real location -> stored path
        self.overlaps = 0
        self._real_dirs: dict[str, str] = {}

    def location(self, path: str, *, folder: bool) -> str:
        """Where ``path`` really is: its folder resolved, its own name kept (two symlinks in a
        folder are two files), or for an unlisted folder, the folder resolved."""
        head, name = (path, "") if folder else os.path.split(path)
        if head not in self._real_dirs:
            self._real_dirs[head] = os.path.realpath(head)
        return os.path.join(self._real_dirs[head], name)

    def add(self, key: str, path: str, problem: tuple[str, str] | None = None) -> None:
        key = os.path.normpath(key)
        location = self.location(path, folder=problem is not None)
        if location in self.keys:
            self.overlaps += self.keys[location] != key
            return
        previous = self.refs.get(key)
        if previous is not None:
            raise ConfigError(
                f"two inputs would be stored as the same path {key!r} ({previous.path} and "
                f"{path}); pass their common parent directory instead"
            )
        self.keys[location] = key
        self.refs[key] = ImageRef(key, path, problem)


def _list_entries(files_from: str | Path) -> list[tuple[str, str]]:
    """(path, where it came from) for each non-blank line of a --files-from list."""
    try:
        raw = Path(files_from).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read --files-from {str(files_from)!r}: {exc.strerror}") from None
    name = printable(str(files_from))
    return [
        (os.fsdecode(line.rstrip(b"\r")), f" on line {number} of {name}")
        for number, line in enumerate(raw.split(b"\n"), 1)
        if line.strip()
    ]


def find_images(
    inputs: Sequence[str | Path],
    *,
    files_from: str | Path | None = None,
    follow_symlinks: bool = False,
) -> Found:
    """All images named by ``inputs`` (directories walked recursively, files as given) and by
    ``files_from`` (one path per line, relative to the current folder), sorted by stored path
    (bytewise). A file reached through several inputs (a folder and its subfolder, the same
    folder through a symlink) is kept once, under the first input's stored path. Folders that
    cannot be listed are refs with a ``problem``.

    Raises ConfigError for inputs that do not exist and for two different files that would be
    stored under the same path.
    """
    entries = [(str(p), "") for p in inputs]
    if files_from is not None:
        entries += _list_entries(files_from)
    collector = _Collector()
    for entry, where in entries:
        if os.path.isdir(entry):
            for rel, problem in _walk(entry, follow_symlinks):
                path = entry if rel == "." else os.path.join(entry, rel)
                collector.add(entry if rel == "." else rel, path, problem)
        elif os.path.lexists(entry):
            collector.add(entry, entry)
        elif where:
            raise ConfigError(
                f"input '{printable(entry)}'{where} does not exist "
                "(paths in the list are relative to the current folder)"
            )
        else:
            raise ConfigError(f"input '{printable(entry)}' does not exist; check the path")
    refs = sorted(collector.refs.values(), key=lambda ref: ref.key_bytes)
    return Found(refs, collector.overlaps)


def file_stat(path: str) -> tuple[int, int]:
    """(size, modification time in ns) of a file; (-1, -1) if it cannot be read."""
    try:
        st = os.stat(path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1
