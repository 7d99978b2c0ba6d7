"""HDF5 building blocks: the file format's constants, atomic writes (temporary name, fsync,
rename, directory fsync), disk errors in the user's terms.

HDF5's own file locks are off for every file (``locking=False``): forked decode workers
inherit open descriptors and would keep them locked; ``rundir.OutputLock`` guards the output
instead. ``storage``, ``shards``, ``view``, ``reader`` and ``retrieval`` are the modules that
know h5py.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import io
import os
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import ConfigError, OutputError, option, printable

FORMAT_VERSION = 1
STATUS_MISSING, STATUS_OK, STATUS_FAILED = 0, 1, 2
STR = h5py.string_dtype("utf-8")
BYTES = h5py.vlen_dtype(np.dtype("uint8"))
# per-row metadata copied from shards into the output: name -> (dtype, width or None)
ROW_FIELDS: dict[str, tuple[Any, int | None]] = {
    "image_size": (np.int32, 2),
    "input_size": (np.int32, 2),
    "feature_map_size": (np.int32, 2),
    "mode": (STR, None),
    "truncated": (np.bool_, None),
    "file_size": (np.int64, None),
    "mtime_ns": (np.int64, None),
    "tiles": (np.int32, None),  # 0: not tiled; absent from shards of older versions (read as 0)
}


# The datasets with one entry per row, in the output and in failed/ (besides features).
PER_ROW = ("paths", "path_bytes", "root", *ROW_FIELDS)


def shards_root(output: Path) -> Path:
    return output.with_name(output.name + ".shards")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def key_text(key_bytes: bytes) -> str:
    return key_bytes.decode("utf-8", errors="replace")


def check_space(
    directory: Path, needed: int, advice: str | None = None, path: Path | None = None
) -> None:
    """Refuse up front (disk_error, naming ``path`` or ``directory``) when ``needed`` bytes
    will not fit in ``directory``."""
    free = shutil.disk_usage(directory).free
    if free < needed:
        error = OSError(errno.ENOSPC, f"{free} bytes free, {needed} needed")
        raise disk_error(error, path or directory, advice)


def disk_error(exc: Exception, path: Path, advice: str | None = None) -> OutputError:
    code = getattr(exc, "errno", None)
    full = (
        code in (errno.ENOSPC, errno.EDQUOT)
        or "No space left" in str(exc)
        or "errno = 28" in str(exc)
    )
    what = "the disk is full" if full else f"cannot write ({printable(' '.join(str(exc).split()))})"
    if advice is None:
        advice = (
            f"everything committed so far is kept — {'free space' if full else 'fix that'}, "
            f"then rerun the same command with {option('mode', 'resume')}"
        )
    return OutputError(f"stopped: {what} while writing {path}; {advice}")


def bytes_array(items: Sequence[bytes]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = [np.frombuffer(b, dtype=np.uint8) for b in items]
    return out


def tmp_prefix(path: Path) -> str:
    """Temporary files beside ``path`` start with this; short whatever the name's length."""
    digest = hashlib.sha1(os.fsencode(path.name)).hexdigest()[:12]
    return f".spp-{digest}-"


def atomic_path(path: Path) -> Path:
    return path.with_name(f"{tmp_prefix(path)}{os.getpid()}-{threading.get_ident()}.tmp")


class GuardedFile(io.RawIOBase):
    """A new file for HDF5 to write through (h5py's file-object driver) whose writes never
    fail inside HDF5: the first error the OS gives (disk full, file size limit) is kept in
    ``error`` and the write reported as done, and so is an exception that a signal handler
    raises during a write (``stopped``). After a failed write HDF5 can no longer close
    the file, and at interpreter exit it crashes (a segfault) trying again; the caller raises
    ``error`` once HDF5 has closed instead. The file is locked (``flock``) while it is open, so
    that ``remove_stale_tmp`` never takes a file still being written for one left by a killed
    process. ``close()`` leaves the descriptor to ``release()`` (the writer fsyncs it)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self.error: OSError | None = None
        # An exception a signal handler raised while HDF5 was calling in: it must not unwind
        # through HDF5 (which then cannot close the file); the write goes on, check() raises.
        self.stopped: BaseException | None = None
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def readable(self) -> bool:
        return True

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return os.lseek(self.fd, offset, whence)

    def tell(self) -> int:
        return os.lseek(self.fd, 0, os.SEEK_CUR)

    def readinto(self, buffer: Any) -> int:
        return os.readv(self.fd, [buffer])

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        done = 0
        while True:
            try:
                if self.error is None:
                    try:
                        while done < len(view):
                            done += os.write(self.fd, view[done:])
                    except OSError as exc:
                        self.error = exc
                if self.error is not None:
                    os.lseek(self.fd, len(view) - done, os.SEEK_CUR)
                return len(view)
            except BaseException as exc:  # noqa: BLE001 - a signal's exception: raised by check()
                self.stopped = self.stopped or exc

    def truncate(self, size: int | None = None) -> int:
        size = self.tell() if size is None else size
        if self.error is None:
            try:
                os.ftruncate(self.fd, size)
            except OSError as exc:
                self.error = exc
        return size

    def check(self) -> None:
        """Raise what stopped the writing: a signal's exception, or the first write error."""
        if self.stopped is not None:
            raise self.stopped
        if self.error is not None:
            raise self.error

    def release(self) -> None:
        """Unlock and close the descriptor (``close()`` keeps it for the final fsync)."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def remove_stale_tmp(path: Path) -> None:
    """Remove temporary files of ``path`` that a killed writer left behind; files that a live
    writer still holds (``GuardedFile``'s lock) stay."""
    for stale in path.parent.glob(f"{tmp_prefix(path)}*.tmp"):
        try:
            fd = os.open(stale, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            stale.unlink(missing_ok=True)
        except OSError:
            pass  # being written
        finally:
            os.close(fd)


def finish_atomic(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def written_atomically(path: Path, advice: str | None = None) -> Iterator[GuardedFile]:
    """Write ``path`` whole or not at all: the body writes the temporary file yielded (a
    ``GuardedFile``: give it to ``h5py.File(f, "w")``, or wrap it in ``io.TextIOWrapper``),
    which then replaces ``path`` (fsync'd, renamed, folder fsync'd). Stale temporary files of
    ``path`` are removed first. On any error or signal the temporary file is removed; a disk
    error becomes an OutputError naming ``path`` and ``advice``."""
    remove_stale_tmp(path)
    tmp = atomic_path(path)
    try:
        guard = GuardedFile(tmp)
    except OSError as exc:
        raise disk_error(exc, path, advice) from None
    try:
        yield guard
        guard.check()
        finish_atomic(tmp, path)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        raise disk_error(guard.error or exc, path, advice) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        guard.release()


@contextlib.contextmanager
def written_together(
    paths: Sequence[Path], advice: str | None = None
) -> Iterator[list[GuardedFile]]:
    """``written_atomically`` for several files at once: the body writes every temporary file
    (yielded in the order of ``paths``); only when all were written does any replace its
    ``path``. On an error or signal in any of them, none is replaced."""
    with contextlib.ExitStack() as stack:
        guards: list[GuardedFile] = []
        for path in paths:
            remove_stale_tmp(path)
            try:
                guard = GuardedFile(atomic_path(path))
            except OSError as exc:
                raise disk_error(exc, path, advice) from None
            stack.callback(guard.release)
            stack.callback(guard.path.unlink, missing_ok=True)
            guards.append(guard)
        try:
            yield guards
        except (OSError, RuntimeError) as exc:  # HDF5 closing a file whose write failed
            failed = next(((p, g) for p, g in zip(paths, guards, strict=True) if g.error), None)
            if failed is None:
                raise
            raise disk_error(failed[1].error or exc, failed[0], advice) from None
        for path, guard in zip(paths, guards, strict=True):
            try:
                guard.check()
            except OSError as exc:
                raise disk_error(exc, path, advice) from None
        for path, guard in zip(paths, guards, strict=True):
            try:
                finish_atomic(guard.path, path)
            except OSError as exc:
                raise disk_error(exc, path, advice) from None


def _same(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def check_destinations(
    outputs: Sequence[Path],
    inputs: Sequence[Path] = (),
    *,
    overwrite: bool = False,
    folders: Sequence[Path] = (),
) -> None:
    """The one check before a command writes files (merge, reduce, neighbours, projections):
    each output is a file name in an existing folder, is none of the ``inputs`` and nothing
    inside their shards folders (or inside ``folders``: a view's real run folder, wherever it
    is), no two outputs are the same file, and an existing output is replaced only with
    ``overwrite``. Raises ConfigError (one line) before anything is written."""
    for number, dest in enumerate(outputs):
        if dest.is_dir():
            raise ConfigError(f"'{dest}' is a folder; give a file name to write")
        if not dest.parent.is_dir():
            raise ConfigError(f"folder '{dest.parent}' does not exist; create it first")
        for source in inputs:
            roots = [shards_root(source), *folders]
            inside = any(dest.resolve().is_relative_to(root.resolve()) for root in roots)
            if _same(dest, source) or inside:
                raise ConfigError(
                    f"'{dest}' is the input {source.name} itself or inside its shards folder; "
                    "write somewhere else"
                )
        for other in outputs[:number]:
            if _same(dest, other):
                raise ConfigError(f"'{dest}' is given for two outputs; give each its own file")
        if dest.exists() and not overwrite:
            raise ConfigError(f"'{dest}' exists; pass {option('overwrite')} to replace it")


def copy_as_merged(
    src: h5py.File,
    out: h5py.File,
    skip: Sequence[str] = ("features",),
    *,
    failing: tuple[np.ndarray, str, str] | None = None,
) -> None:
    """Every dataset and attribute of ``src`` but ``skip`` into ``out``, a self-contained file
    (``layout = merged``, no shards folder). ``failing = (rows, error_class, message)``: those
    rows (sorted row numbers; their vectors were not written) move from the per-row datasets
    to ``failed/``, which stays sorted by path."""
    dropped = failing[0] if failing is not None else np.zeros(0, np.int64)
    for name, obj in src.items():
        if name in skip:
            continue
        if not len(dropped) or (name != "failed" and name not in PER_ROW):
            src.copy(obj, out, name=name)
        elif name != "failed":
            out.create_dataset(name, data=np.delete(obj[:], dropped, axis=0), dtype=obj.dtype)
    if len(dropped):
        _fail_rows(src, out.create_group("failed"), dropped, *failing[1:])  # type: ignore[index]
    out.attrs.update(src.attrs)
    out.attrs["layout"] = "merged"
    if "shards" in out.attrs:
        del out.attrs["shards"]


def _as_bytes(value: Any) -> bytes:
    return value.encode("utf-8", "surrogateescape") if isinstance(value, str) else bytes(value)


def _fail_rows(
    src: h5py.File, group: h5py.Group, rows: np.ndarray, error_class: str, message: str
) -> None:
    """``src``'s failures plus its rows ``rows`` as failures of ``error_class``, by path."""
    failed = src["failed"]
    count = failed["paths"].shape[0]
    columns = {}
    for name, column in failed.items():
        if name == "error_class":
            added = np.array([error_class] * len(rows), dtype=object)
        elif name == "errors":
            added = np.array([message] * len(rows), dtype=object)
        elif name == "root" and name not in src:  # a file from before roots were recorded
            added = np.full(len(rows), -1, column.dtype)
        else:
            added = src[name][rows]
        columns[name] = (np.concatenate([column[:], added]), column.dtype)
    key = columns["path_bytes" if "path_bytes" in columns else "paths"][0]
    order = sorted(range(count + len(rows)), key=lambda i: _as_bytes(key[i]))
    for name, (values, dtype) in columns.items():
        group.create_dataset(name, data=values[order], dtype=dtype)


def run_attrs(**values: Any) -> dict[str, Any]:
    """Root attributes: HDF5 wants arrays, not tuples, and no None."""
    attrs: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.UTC).isoformat(),
    }
    for key, value in values.items():
        attrs[key] = np.asarray(value) if isinstance(value, (tuple, list)) else value
    return attrs


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
