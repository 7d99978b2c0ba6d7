"""The HDF5 layout: shard files, committed atomically, presented as one file.

Work is written in shard files under ``<output>.shards/<run_id>/``. A shard covers one
contiguous window of the run's sorted image list; it is written as ``*.tmp``, closed,
fsync'd and renamed, and the directory is fsync'd, so a shard either exists whole or not at
all (appending to one HDF5 file did not survive SIGKILL in our tests). When the run ends,
``<output>`` is written the same way: its ``features`` dataset is an HDF5 virtual dataset
over the shards (fill value NaN, so a missing shard can never read as plausible zeros); all
other datasets are real copies. ``merge`` writes a self-contained copy.

HDF5's own file locks are off for these files (``locking=False``): forked decode workers
inherit open descriptors and would keep them locked; ``OutputLock`` guards the output instead.

This module and ``retrieval`` (which writes its own derived files with the helpers here) are
the ones that know h5py.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import hashlib
import os
import re
import shutil
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import ConfigError, OutputError, option, printable

FORMAT_VERSION = 1
STATUS_MISSING, STATUS_OK, STATUS_FAILED = 0, 1, 2
_STR = h5py.string_dtype("utf-8")
_BYTES = h5py.vlen_dtype(np.dtype("uint8"))
_SHARD = re.compile(r"^a(\d{4})-r(\d{4})-(\d{6})\.h5$")
# per-row metadata copied from shards into the output: name -> (dtype, width or None)
ROW_FIELDS: dict[str, tuple[Any, int | None]] = {
    "image_size": (np.int32, 2),
    "input_size": (np.int32, 2),
    "feature_map_size": (np.int32, 2),
    "mode": (_STR, None),
    "truncated": (np.bool_, None),
    "file_size": (np.int64, None),
    "mtime_ns": (np.int64, None),
    "tiles": (np.int32, None),  # 0: not tiled; absent from shards of older versions (read as 0)
}


def shards_root(output: Path) -> Path:
    return output.with_name(output.name + ".shards")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _text(key_bytes: bytes) -> str:
    return key_bytes.decode("utf-8", errors="replace")


def _check_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise _disk_error(OSError(errno.ENOSPC, f"{free} bytes free, {needed} needed"), directory)


def _disk_error(exc: Exception, path: Path, advice: str | None = None) -> OutputError:
    code = getattr(exc, "errno", None)
    full = code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc) or "errno = 28" in str(exc)
    what = "the disk is full" if full else f"cannot write ({printable(' '.join(str(exc).split()))})"
    if advice is None:
        advice = (f"everything committed so far is kept — {'free space' if full else 'fix that'}, "
                  f"then rerun the same command with {option('resume')}")  # fmt: skip
    return OutputError(f"stopped: {what} while writing {path}; {advice}")


_HELD_LOCKS: set[int] = set()


def _drop_inherited_locks() -> None:
    # A forked child (a decode worker) shares the lock's open file description: closing its
    # copies means a killed parent's lock is released at once, not when the last worker exits.
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


class OutputLock:
    """One writer per output: an advisory lock on ``<output>.shards/.lock`` (released by the
    kernel when the process dies, so a killed run never leaves a stale lock). Forked children
    do not hold it."""

    def __init__(self, output: Path) -> None:
        self.path = shards_root(output) / ".lock"
        self._fd: int | None = None
        self.created_root = False  # the shards folder did not exist before acquire()

    def acquire(self) -> None:
        root = self.path.parent
        if root.exists() and not root.is_dir():
            raise ConfigError(f"'{root}' exists and is not a folder; move it away or choose another -o")
        self.created_root = not root.exists()
        root.mkdir(exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputError(
                f"another spp-extract run is writing this output (it holds {self.path}); wait "
                "for it to finish or stop it first"
            ) from None
        self._fd = fd
        _HELD_LOCKS.add(fd)

    def release(self, *, remove_if_unused: bool = False) -> None:
        """Release the lock; ``remove_if_unused``: also remove the shards folder if this run
        created it and wrote nothing into it (a refusal must leave no trace)."""
        if self._fd is None:
            return
        if remove_if_unused and self.created_root:
            with contextlib.suppress(OSError):
                if [p.name for p in self.path.parent.iterdir()] == [".lock"]:
                    self.path.unlink()
                    self.path.parent.rmdir()
        _HELD_LOCKS.discard(self._fd)
        os.close(self._fd)
        self._fd = None


@dataclass
class RowMeta:
    """What is stored beside one image's vector (or its failure)."""

    image_size: tuple[int, int] = (0, 0)
    input_size: tuple[int, int] = (0, 0)
    feature_map_size: tuple[int, int] = (0, 0)
    mode: str = ""
    truncated: bool = False
    file_size: int = -1
    mtime_ns: int = -1
    tiles: int = 0  # how many tiles the trunk ran on (0: the whole image at once)
    error_class: str = ""
    error: str = ""


class ShardWriter:
    """One window of images -> one shard file. Rows are positions in the window (sorted order);
    vectors are written as they arrive, metadata at commit."""

    def __init__(
        self, directory: Path, name: str, keys: Sequence[bytes], sources: Sequence[bytes],
        dim: int, dtype: str, attrs: dict[str, Any],
    ) -> None:  # fmt: skip
        self.final = directory / name
        self.tmp = directory / (name + ".tmp")
        self.keys = list(keys)
        self.sources = list(sources)  # absolute path of each file: a resume checks it too
        self.status = np.zeros(len(keys), np.int8)
        self.meta: list[RowMeta | None] = [None] * len(keys)
        self.dtype = np.dtype(dtype)
        # HDF5 does not recover from a write that runs out of space (errors at flush, crashes
        # at close), so refuse up front when the whole shard would not fit.
        _check_space(directory, len(keys) * (dim * self.dtype.itemsize + 512) + (1 << 20))
        try:
            self._file = h5py.File(self.tmp, "w", libver="latest", locking=False)
            rows = max(1, min(len(keys), (1 << 20) // max(1, dim * self.dtype.itemsize)))
            self._features = self._file.create_dataset(
                "features", shape=(len(keys), dim), dtype=self.dtype, chunks=(rows, dim)
            )
            self._file.attrs.update(attrs)
        except (OSError, RuntimeError) as exc:
            raise _disk_error(exc, self.tmp) from None

    def put(self, positions: Sequence[int], vectors: np.ndarray, metas: Sequence[RowMeta]) -> None:
        """Store vectors (``ndarray[n, D]``) for the given window positions."""
        order = np.argsort(positions)
        try:
            self._features[np.asarray(positions)[order]] = vectors[order].astype(self.dtype)
        except (OSError, RuntimeError) as exc:
            raise _disk_error(exc, self.tmp) from None
        for position, meta in zip(positions, metas, strict=True):
            self.status[position] = STATUS_OK
            self.meta[position] = meta

    def fail(self, position: int, meta: RowMeta) -> None:
        self.status[position] = STATUS_FAILED
        self.meta[position] = meta

    @property
    def done(self) -> int:
        return int(np.count_nonzero(self.status))

    def commit(self) -> Path | None:
        """Make the shard durable and visible. A shard with nothing done is discarded."""
        if self.done == 0:
            self.discard()
            return None
        f = self._file
        try:
            f.create_dataset("path_bytes", data=_bytes_array(self.keys), dtype=_BYTES)
            f.create_dataset("source_bytes", data=_bytes_array(self.sources), dtype=_BYTES)
            f.create_dataset("paths", data=[_text(k) for k in self.keys], dtype=_STR)
            f.create_dataset("status", data=self.status)
            metas = [m or RowMeta() for m in self.meta]
            for name, (dtype, _width) in ROW_FIELDS.items():
                f.create_dataset(name, data=[getattr(m, name) for m in metas], dtype=dtype)
            f.create_dataset("error_class", data=[m.error_class for m in metas], dtype=_STR)
            f.create_dataset("error", data=[printable(m.error) for m in metas], dtype=_STR)
            f.flush()
            f.close()
            with open(self.tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(self.tmp, self.final)
            fsync_dir(self.final.parent)
        except (OSError, RuntimeError) as exc:
            self.discard()
            raise _disk_error(exc, self.tmp) from None
        return self.final

    def discard(self) -> None:
        try:
            self._file.close()
        except Exception:  # noqa: BLE001 - closing a broken file must not hide the real error
            pass
        self.tmp.unlink(missing_ok=True)


def _bytes_array(items: Sequence[bytes]) -> np.ndarray:
    out = np.empty(len(items), dtype=object)
    out[:] = [np.frombuffer(b, dtype=np.uint8) for b in items]
    return out


def shard_name(attempt: int, rank: int, seq: int) -> str:
    return f"a{attempt:04d}-r{rank:04d}-{seq:06d}.h5"


def list_shards(run_dir: Path) -> list[Path]:
    """Committed shards in (attempt, rank, seq) order."""
    return sorted(p for p in run_dir.iterdir() if _SHARD.match(p.name))


def next_attempt(run_dir: Path) -> int:
    attempts = [int(m.group(1)) for p in run_dir.iterdir() if (m := _SHARD.match(p.name))]
    return max(attempts, default=-1) + 1


def remove_partial(run_dir: Path) -> int:
    """Delete half-written shards (``*.tmp``) left by a killed run; returns how many."""
    removed = 0
    for path in run_dir.glob("*.tmp"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


@dataclass
class Record:
    """Where one image's latest result lives."""

    shard: int
    row: int
    status: int
    file_size: int
    mtime_ns: int
    source: bytes | None  # the file's absolute path (None in shards of older versions)


@dataclass
class RunState:
    """Everything committed in a run directory, latest result per image."""

    shards: list[Path]
    records: dict[bytes, Record] = field(default_factory=dict)

    def done(self, key: bytes, source: bytes, file_size: int, mtime_ns: int,
             retry_failed: bool) -> bool:  # fmt: skip
        """True if this image (the same file, unchanged since) already has a result that need
        not be redone. Same stored path but another file (other input folders with the same
        names, sizes and times, as after ``cp -p``) is redone."""
        record = self.records.get(key)
        if record is None or (record.file_size, record.mtime_ns) != (file_size, mtime_ns):
            return False
        if record.source is not None and record.source != source:
            return False
        return record.status == STATUS_OK or not retry_failed


def read_state(run_dir: Path) -> RunState:
    shards = list_shards(run_dir)
    state = RunState(shards)
    for index, path in enumerate(shards):
        try:
            with h5py.File(path, "r", locking=False) as f:
                keys = [bytes(k) for k in f["path_bytes"][:]]
                status = f["status"][:]
                sizes = f["file_size"][:]
                mtimes = f["mtime_ns"][:]
                sources = ([bytes(k) for k in f["source_bytes"][:]] if "source_bytes" in f
                           else [None] * len(keys))  # fmt: skip
        except (OSError, KeyError, ValueError) as exc:
            raise OutputError(
                f"shard {path} is unreadable ({printable(str(exc))}); move it away and rerun with "
                f"{option('resume')} to redo its images"
            ) from None
        for row, key in enumerate(keys):
            if status[row] != STATUS_MISSING:  # later shards supersede earlier ones
                state.records[key] = Record(index, row, int(status[row]), int(sizes[row]),
                                            int(mtimes[row]), sources[row])  # fmt: skip
    return state


def _runs(rows: Iterable[tuple[int, int]]) -> list[tuple[int, int, int, int]]:
    """(shard, row) in output order -> (shard, first row, count, output start) runs."""
    runs: list[tuple[int, int, int, int]] = []
    for out, (shard, row) in enumerate(rows):
        if runs and runs[-1][0] == shard and runs[-1][1] + runs[-1][2] == row:
            s, r, n, o = runs[-1]
            runs[-1] = (s, r, n + 1, o)
        else:
            runs.append((shard, row, 1, out))
    return runs


def _tmp_prefix(path: Path) -> str:
    """Temporary files beside ``path`` start with this; short whatever the name's length."""
    digest = hashlib.sha1(os.fsencode(path.name)).hexdigest()[:12]
    return f".spp-{digest}-"


def _atomic_h5(path: Path) -> Path:
    return path.with_name(f"{_tmp_prefix(path)}{os.getpid()}.tmp")


def remove_stale_tmp(path: Path) -> None:
    """Remove temporary files a killed view or merge of ``path`` left behind."""
    for stale in path.parent.glob(f"{_tmp_prefix(path)}*.tmp"):
        stale.unlink(missing_ok=True)


def _vds_name(path: str) -> str:
    # HDF5 reads virtual-dataset source file names as printf-like patterns ("%b" = the view's
    # own name, "%%" = "%"), so a literal "%" must be doubled.
    return path.replace("%", "%%")


def _vds_unname(name: str) -> str:
    return re.sub("%%", "%", name)


def _finish_atomic(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def assemble(
    output: Path, run_dir: Path, keys: Sequence[bytes] | None, dim: int, dtype: str,
    attrs: dict[str, Any], *, complete: bool = True, keep_prefixes: Sequence[bytes] = (),
) -> tuple[int, int]:  # fmt: skip
    """Write ``output`` as a view over the run's shards, rows in ``keys`` order (sorted paths);
    ``keys=None`` takes every image with a result. ``complete=False`` (an interrupted run):
    the images of ``keys`` that have a result so far, and root attribute ``complete = false``.
    ``keep_prefixes``: earlier results whose path starts with one of these stay although
    ``keys`` lacks them (a folder that could not be listed this time). Returns (rows, failures)."""
    state = read_state(run_dir)
    wanted = list(keys) if keys is not None else sorted(state.records)
    if keep_prefixes:
        listed = set(wanted)
        kept = [k for k in state.records if k not in listed and k.startswith(tuple(keep_prefixes))]
        wanted = sorted(wanted + kept)
    missing = [k for k in wanted if k not in state.records]
    if missing and complete:
        raise OutputError(
            f"{len(missing)} images have no committed result (first: {printable(_text(missing[0]))!r}); "
            f"rerun with {option('resume')}"
        )
    wanted = [k for k in wanted if k in state.records]
    records = [(k, state.records[k]) for k in wanted]
    ok = [(k, r) for k, r in records if r.status == STATUS_OK]
    failed = [(k, r) for k, r in records if r.status == STATUS_FAILED]
    tmp = _atomic_h5(output)
    _check_space(output.parent, len(records) * 400 + (1 << 20))
    try:
        handles = {i: h5py.File(p, "r", locking=False) for i, p in enumerate(state.shards)}
        try:
            with h5py.File(tmp, "w", locking=False) as out:
                layout = h5py.VirtualLayout(shape=(len(ok), dim), dtype=np.dtype(dtype))
                for shard, row, count, start in _runs((r.shard, r.row) for _, r in ok):
                    source_path = os.path.relpath(state.shards[shard], output.parent)
                    source = h5py.VirtualSource(
                        _vds_name(source_path), "features", shape=handles[shard]["features"].shape
                    )
                    layout[start : start + count] = source[row : row + count]
                out.create_virtual_dataset("features", layout, fillvalue=np.nan)
                _write_rows(out, ok, handles)
                _write_failed(out.create_group("failed"), failed, handles)
                out.attrs.update(attrs)
                out.attrs["complete"] = complete
                out.attrs["layout"] = "view"
                out.attrs["shards"] = os.path.relpath(run_dir, output.parent)
        finally:
            for handle in handles.values():
                handle.close()
        _finish_atomic(tmp, output)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        raise _disk_error(exc, output) from None
    return len(ok), len(failed)


def _gather(records: Sequence[tuple[bytes, Record]], handles: dict[int, h5py.File], name: str,
            dtype: Any, width: int | None) -> np.ndarray:  # fmt: skip
    shape = (len(records), width) if width else (len(records),)
    out = np.empty(shape, dtype=object if dtype in (_STR,) else dtype)
    cache: dict[int, np.ndarray] = {}
    for i, (_, r) in enumerate(records):
        if r.shard not in cache:
            if name not in handles[r.shard]:  # a shard written before the field existed
                cache[r.shard] = np.zeros((handles[r.shard]["status"].shape[0], *shape[1:]), dtype)
            else:
                data = handles[r.shard][name]
                cache[r.shard] = data.asstr()[:] if dtype == _STR else data[:]
        out[i] = cache[r.shard][r.row]
    return out


def _write_rows(group: h5py.Group, records: Sequence[tuple[bytes, Record]],
                handles: dict[int, h5py.File]) -> None:  # fmt: skip
    group.create_dataset("paths", data=[_text(k) for k, _ in records], dtype=_STR)
    group.create_dataset("path_bytes", data=_bytes_array([k for k, _ in records]), dtype=_BYTES)
    for name, (dtype, width) in ROW_FIELDS.items():
        group.create_dataset(name, data=_gather(records, handles, name, dtype, width), dtype=dtype)


def _write_failed(group: h5py.Group, records: Sequence[tuple[bytes, Record]],
                  handles: dict[int, h5py.File]) -> None:  # fmt: skip
    _write_rows(group, records, handles)
    group.create_dataset("error_class", data=_gather(records, handles, "error_class", _STR, None),
                         dtype=_STR)  # fmt: skip
    group.create_dataset("errors", data=_gather(records, handles, "error", _STR, None), dtype=_STR)


def identify(path: Path) -> dict[str, Any]:
    """The root attributes of an spp-extract file; ConfigError (one line) for anything else:
    a missing path, a folder, a file that is not HDF5, an HDF5 file this tool did not write."""
    if path.is_dir():
        raise ConfigError(f"'{path}' is a folder; give an spp-extract .h5 file")
    if not path.exists():
        raise ConfigError(f"'{path}' does not exist")
    try:
        with h5py.File(path, "r", locking=False) as f:
            attrs = dict(f.attrs)
            names = set(f.keys())
    except OSError as exc:
        detail = "not an HDF5 file" if not h5py.is_hdf5(path) else printable(str(exc))
        raise ConfigError(f"'{path}' is not an spp-extract file ({detail})") from None
    if "format_version" not in attrs or not {"features", "paths", "failed"} <= names:
        raise ConfigError(
            f"'{path}' is an HDF5 file that spp-extract did not write (no format_version "
            "attribute or no features/paths datasets)"
        )
    return attrs


def check_sources(path: Path) -> None:
    """Refuse a view whose shard files are missing or unreadable (HDF5 would read them as fill
    values): each source is opened as HDF5 would open it, relative to the view's folder."""
    identify(path)
    with h5py.File(path, "r", locking=False) as f:
        ds = f["features"]
        if not ds.is_virtual:
            return
        sources = sorted({_vds_unname(m.file_name) for m in ds.virtual_sources()})
        dim = ds.shape[1]
    missing, broken = [], []
    for name in sources:
        source = path.parent / name
        if not source.is_file():
            missing.append(name)
            continue
        try:
            with h5py.File(source, "r", locking=False) as shard:
                if shard["features"].shape[1] != dim:
                    broken.append(name)
        except (OSError, KeyError):
            broken.append(name)
    if missing:
        expected = os.path.dirname(os.path.dirname(missing[0])) or "."
        raise OutputError(
            f"{path} is a view over shard files, and {len(missing)} are missing (first: "
            f"{missing[0]}); it expects its shards folder at '{path.parent / expected}' — keep "
            "or rename that folder back beside it (renaming the output alone is fine), or use "
            "`spp-extract merge` for a self-contained copy"
        )
    if broken:
        raise OutputError(
            f"{path} is a view over shard files, and {len(broken)} cannot be read (first: "
            f"{broken[0]}); move it away and continue the run that wrote it with "
            f"{option('resume')} to redo its images"
        )


def merge(source: Path, dest: Path, *, block_rows: int = 1024) -> int:
    """Copy a view (or any spp-extract file) into a self-contained file; returns rows."""
    check_sources(source)
    if dest.is_dir():
        raise ConfigError(f"'{dest}' is a folder; give a file name for the merged copy")
    if not dest.parent.is_dir():
        raise ConfigError(f"folder '{dest.parent}' does not exist; create it first")
    root = shards_root(source).resolve()
    if dest.resolve() == source.resolve() or dest.resolve().is_relative_to(root):
        raise ConfigError(
            f"'{dest}' is {source.name} itself or inside its shards folder; write the merged "
            "copy somewhere else"
        )
    tmp = _atomic_h5(dest)
    try:
        with h5py.File(source, "r", locking=False) as src, h5py.File(tmp, "w") as out:
            features = src["features"]
            n, dim = features.shape
            rows = max(1, min(max(n, 1), (1 << 20) // max(1, dim * features.dtype.itemsize)))
            target = out.create_dataset("features", shape=(n, dim), dtype=features.dtype,
                                        chunks=(rows, dim), maxshape=(None, dim))  # fmt: skip
            for start in range(0, n, block_rows):
                target[start : start + block_rows] = features[start : start + block_rows]
            for name, obj in src.items():
                if name != "features":
                    src.copy(obj, out, name=name)
            out.attrs.update(src.attrs)
            out.attrs["layout"] = "merged"
            if "shards" in out.attrs:
                del out.attrs["shards"]
        _finish_atomic(tmp, dest)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        raise _disk_error(exc, dest, "nothing was written; free space or choose another "
                                     "destination, then run merge again") from None  # fmt: skip
    return n


@dataclass
class Features:
    """An spp-extract file in memory (``read_features``)."""

    features: np.ndarray  # (N, D)
    paths: list[str]
    image_size: np.ndarray  # (N, 2) height, width
    feature_map_size: np.ndarray  # (N, 2)
    failed_paths: list[str]
    failed_errors: list[str]
    attrs: dict[str, Any]
    complete: bool  # False: written by an interrupted run, rows so far only (resume it)


RowSelection = slice | Sequence[int] | np.ndarray


def _row_index(rows: RowSelection, n: int) -> np.ndarray:
    """``rows`` (a slice, indices in any order, negative from the end, or a boolean mask of
    length N) as an int64 array of row numbers in the caller's order."""
    if isinstance(rows, slice):
        return np.arange(n, dtype=np.int64)[rows]
    index = np.asarray(rows)
    if index.dtype == np.bool_:
        if index.shape != (n,):
            raise IndexError(f"a boolean row mask must have shape ({n},), not {index.shape}")
        return np.flatnonzero(index)
    if index.ndim != 1 or (index.size and not np.issubdtype(index.dtype, np.integer)):
        raise IndexError(f"rows must be a slice, a 1-D array of row numbers or a mask, not {rows!r}")
    index = index.astype(np.int64)
    bad = (index < -n) | (index >= n)
    if bad.any():
        raise IndexError(f"row {int(index[bad][0])} is out of range for a file of {n} rows")
    return np.where(index < 0, index + n, index)


def read_rows(dataset: h5py.Dataset, index: np.ndarray, block_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Rows ``index`` (sorted, unique) of ``dataset`` as (positions in ``index``, rows) blocks
    of at most ``block_rows`` file rows each. h5py wants increasing indices, and a fancy read
    costs a selection per row: a dense run is read as one slice and picked from in memory."""
    start = 0
    while start < len(index):
        first = int(index[start])
        stop = int(np.searchsorted(index, first + block_rows, side="left"))
        picked = index[start:stop]
        last = int(picked[-1]) + 1
        if len(picked) * 4 >= last - first:  # dense: one contiguous read
            block = dataset[first:last][picked - first]
        else:
            block = dataset[picked]
        yield np.arange(start, stop), block
        start = stop


def _take(dataset: h5py.Dataset, index: np.ndarray, block_rows: int) -> np.ndarray:
    """``dataset[index]`` for any int64 ``index`` (unsorted, repeated), read in sorted blocks."""
    unique, inverse = np.unique(index, return_inverse=True)
    out = np.empty((len(unique), *dataset.shape[1:]), dtype=dataset.dtype)
    for positions, block in read_rows(dataset, unique, block_rows):
        out[positions] = block
    return out[inverse]


def _block_rows(dim: int, itemsize: int, cap: int = 65536) -> int:
    """Rows per block so that a block of features is at most about 256 MiB."""
    return max(1, min(cap, (256 << 20) // max(1, dim * itemsize)))


def read_features(path: str | os.PathLike[str], rows: RowSelection | None = None) -> Features:
    """Load an spp-extract HDF5 file (view or merged) after checking its shards exist.

    ``rows``: only these rows (a slice, row numbers in any order — read in sorted blocks and
    returned in the order given — or a boolean mask); ``paths``, ``image_size`` and
    ``feature_map_size`` follow them. The failure lists are always whole. ``None``: everything.
    """
    path = Path(path)
    check_sources(path)
    with h5py.File(path, "r", locking=False) as f:
        if rows is None:
            features = f["features"][:]
            paths = list(f["paths"].asstr()[:])
            image_size, feature_map_size = f["image_size"][:], f["feature_map_size"][:]
        else:
            ds = f["features"]
            index = _row_index(rows, ds.shape[0])
            step = _block_rows(ds.shape[1], ds.dtype.itemsize)
            features = _take(ds, index, step)
            paths = list(_take(f["paths"], index, 1 << 20).astype(object))
            paths = [p.decode("utf-8") if isinstance(p, bytes) else p for p in paths]
            image_size = _take(f["image_size"], index, 1 << 20)
            feature_map_size = _take(f["feature_map_size"], index, 1 << 20)
        return Features(
            features=features,
            paths=paths,
            image_size=image_size,
            feature_map_size=feature_map_size,
            failed_paths=list(f["failed/paths"].asstr()[:]),
            failed_errors=list(f["failed/errors"].asstr()[:]),
            attrs=dict(f.attrs),
            complete=bool(f.attrs.get("complete", True)),
        )


def iter_features(path: str | os.PathLike[str], block_rows: int | None = None,
                  ) -> Iterator[tuple[int, np.ndarray, list[str]]]:  # fmt: skip
    """Blocks of an spp-extract file, in row order: ``(start, features[start:start+n],
    paths[start:start+n])``, features as stored (float32 or float16). ``block_rows``: rows
    per block (default: about 256 MiB of features, at most 65,536 rows). Memory stays at one
    block whatever the file's size; the shards are checked first."""
    path = Path(path)
    check_sources(path)
    with h5py.File(path, "r", locking=False) as f:
        ds = f["features"]
        n, dim = ds.shape
        step = block_rows or _block_rows(dim, ds.dtype.itemsize)
        if step < 1:
            raise ValueError(f"block_rows must be at least 1, not {block_rows}")
        paths = f["paths"].asstr()
        for start in range(0, n, step):
            yield start, ds[start : start + step], list(paths[start : start + step])


# what the run actually used, shown by `inspect` (the configuration may say "auto")
_RECORDED = ("device", "batching", "world_size", "weights", "complete", "spp_extract_version",
             "torch_version", "torchvision_version", "created")  # fmt: skip


def summary(path: Path, rows: int = 3) -> list[str]:
    """Human-readable lines for `spp-extract inspect` (call check_sources first)."""
    with h5py.File(path, "r", locking=False) as f:
        features = f["features"]
        n, dim = features.shape
        lines = [f"{path}: {n} images, {dim}-dim {features.dtype}, layout {f.attrs.get('layout', '?')}"]
        if not f.attrs.get("complete", True):
            lines.append("INCOMPLETE: written by an interrupted run; rerun it with --resume")
        lines.append("configuration:")
        lines += [f"  {line}" for line in str(f.attrs.get("config", "")).splitlines()]
        for key in _RECORDED:
            if key in f.attrs:
                value = f.attrs[key]
                lines.append(f"{key}: {str(value).lower() if isinstance(value, np.bool_ | bool) else value}")
        failed = f["failed"]
        lines.append(f"failures: {failed['paths'].shape[0]}")
        for p, k, e in zip(failed["paths"].asstr()[:], failed["error_class"].asstr()[:],
                           failed["errors"].asstr()[:], strict=True):  # fmt: skip
            lines.append(f"  {printable(p)}: {k}: {printable(e)}")
        paths = f["paths"].asstr()
        tiles = f["tiles"][:] if "tiles" in f else np.zeros(n, np.int32)
        if n:
            lines.append(f"tiled: {int(np.count_nonzero(tiles))} of {n} images (over max_memory)")
        for i in range(min(rows, n)):
            head = ", ".join(f"{v:.4g}" for v in features[i][:4])
            size = tuple(int(v) for v in f["image_size"][i])
            fmap = tuple(int(v) for v in f["feature_map_size"][i])
            tiled = f"  tiles {int(tiles[i])}" if tiles[i] else ""
            lines.append(f"row {i}: {printable(paths[i])}  size {size}  map {fmap}{tiled}  [{head}, ...]")
    return lines


def run_attrs(**values: Any) -> dict[str, Any]:
    """Root attributes: HDF5 wants arrays, not tuples, and no None."""
    attrs: dict[str, Any] = {"format_version": FORMAT_VERSION,
                             "created": datetime.datetime.now(datetime.UTC).isoformat()}  # fmt: skip
    for key, value in values.items():
        attrs[key] = np.asarray(value) if isinstance(value, (tuple, list)) else value
    return attrs


def remove_tree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
