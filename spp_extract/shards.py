"""Shard files: one window of the sorted image list per file, committed atomically, and the
run state read back from them for resume.

Work is written in shard files under ``<output>.shards/<run>/``. A shard is written as
``*.tmp``, closed, fsync'd and renamed, and the directory is fsync'd, so a shard either
exists whole or not at all (appending to one HDF5 file did not survive SIGKILL in our tests).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import OutputError, option, printable
from .records import RowMeta
from .storage import (
    BYTES,
    ROW_FIELDS,
    STATUS_FAILED,
    STATUS_MISSING,
    STATUS_OK,
    STR,
    GuardedFile,
    bytes_array,
    check_space,
    disk_error,
    fsync_dir,
    key_text,
)

_SHARD = re.compile(r"^a(\d{4})-r(\d{4})-(\d{6})\.h5$")


class ShardWriter:
    """One window of images -> one shard file. Rows are positions in the window (sorted order);
    vectors are written as they arrive, metadata at commit."""

    def __init__(
        self,
        directory: Path,
        name: str,
        keys: Sequence[bytes],
        sources: Sequence[bytes],
        dim: int,
        dtype: str,
        attrs: dict[str, Any],
    ) -> None:
        self.final = directory / name
        self.tmp = directory / (name + ".tmp")
        self.keys = list(keys)
        self.sources = list(sources)  # absolute path of each file: a resume checks it too
        self.status = np.zeros(len(keys), np.int8)
        self.meta: list[RowMeta | None] = [None] * len(keys)
        self.dtype = np.dtype(dtype)
        # HDF5 does not recover from a write that runs out of space (errors at flush, crashes
        # at close), so refuse up front when the whole shard would not fit.
        check_space(directory, len(keys) * (dim * self.dtype.itemsize + 512) + (1 << 20))
        try:
            self._guard = GuardedFile(self.tmp)  # HDF5 never sees a failed write (see there)
            self._file = h5py.File(self._guard, "w", libver="latest")
            rows = max(1, min(len(keys), (1 << 20) // max(1, dim * self.dtype.itemsize)))
            self._features = self._file.create_dataset(
                "features", shape=(len(keys), dim), dtype=self.dtype, chunks=(rows, dim)
            )
            self._file.attrs.update(attrs)
        except (OSError, RuntimeError) as exc:
            raise disk_error(exc, self.tmp) from None

    def put(self, positions: Sequence[int], vectors: np.ndarray, metas: Sequence[RowMeta]) -> None:
        """Store vectors (``ndarray[n, D]``) for the given window positions."""
        order = np.argsort(positions)
        try:
            self._features[np.asarray(positions)[order]] = vectors[order].astype(
                self.dtype, copy=False
            )
            self._guard.check()
        except (OSError, RuntimeError) as exc:
            raise disk_error(exc, self.tmp) from None
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
            f.create_dataset("path_bytes", data=bytes_array(self.keys), dtype=BYTES)
            f.create_dataset("source_bytes", data=bytes_array(self.sources), dtype=BYTES)
            f.create_dataset("paths", data=[key_text(k) for k in self.keys], dtype=STR)
            f.create_dataset("status", data=self.status)
            metas = [m or RowMeta() for m in self.meta]
            for name, (dtype, _width) in ROW_FIELDS.items():
                f.create_dataset(name, data=[getattr(m, name) for m in metas], dtype=dtype)
            f.create_dataset("error_class", data=[m.error_class for m in metas], dtype=STR)
            f.create_dataset("error", data=[printable(m.error) for m in metas], dtype=STR)
            f.close()
            self._guard.check()
            os.fsync(self._guard.fd)
            os.replace(self.tmp, self.final)
            fsync_dir(self.final.parent)
        except (OSError, RuntimeError) as exc:
            error = self._guard.error or exc
            self.discard()
            raise disk_error(error, self.tmp) from None
        self._guard.release()
        return self.final

    def discard(self) -> None:
        try:
            self._file.close()
        except Exception:  # noqa: BLE001 - closing a broken file must not hide the real error
            pass
        self.tmp.unlink(missing_ok=True)
        self._guard.release()


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

    def done(
        self, key: bytes, source: bytes, file_size: int, mtime_ns: int, retry_failed: bool
    ) -> bool:
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
                sources = (
                    [bytes(k) for k in f["source_bytes"][:]]
                    if "source_bytes" in f
                    else [None] * len(keys)
                )
        except (OSError, KeyError, ValueError) as exc:
            raise OutputError(
                f"shard {path} is unreadable ({printable(str(exc))}); move it away and rerun with "
                f"{option('resume')} to redo its images"
            ) from None
        for row, key in enumerate(keys):
            if status[row] != STATUS_MISSING:  # later shards supersede earlier ones
                state.records[key] = Record(
                    index, row, int(status[row]), int(sizes[row]), int(mtimes[row]), sources[row]
                )
    return state
