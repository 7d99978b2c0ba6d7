"""Shard files: one window of the sorted image list per file, committed atomically
(``ShardWriter``), filled from a run's outcomes (``ShardSink``), and the run state read back
from them for resume (``read_state``).

Work is written in shard files under ``<output>.shards/<run>/``. A shard is written as
``*.tmp``, closed, fsync'd and renamed, and the directory is fsync'd, so a shard either
exists whole or not at all (appending to one HDF5 file did not survive SIGKILL in our tests).
"""

from __future__ import annotations

import contextvars
import os
import queue
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
import numpy as np

from .discovery import ImageRef
from .errors import OutputError, option, printable
from .planning import Planner
from .records import Failure, Outcome, RowMeta
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

if TYPE_CHECKING:
    from .decoding import Batch

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


class ShardSink:
    """Outcomes in, committed shards out. Each window of the plan is one shard, committed when
    the batches move on to the next window; writes run in order on a background thread so
    HDF5 I/O overlaps compute. The time a window took is what the planner learns its speed
    from (``Planner.learn``)."""

    def __init__(
        self,
        work: Sequence[ImageRef],
        planner: Planner,
        run_dir: Path,
        name: Callable[[int], str],
        dim: int,
        dtype: str,
        attrs: dict[str, Any],
    ) -> None:
        self.work, self.planner, self.run_dir = work, planner, run_dir
        self.name, self.dim, self.dtype, self.attrs = name, dim, dtype, attrs
        self.writer = BackgroundWriter()
        self.open: dict[int, ShardWriter] = {}
        self.failures: list[tuple[str, str, str]] = []  # (path, error class, message)
        self.done = 0  # images handled (vectors or failures)
        self.window = -1
        self.window_started = time.monotonic()

    def moves_on(self, batch: Batch) -> bool:
        """Whether ``batch`` would commit the open window (``begin``)."""
        return self.window >= 0 and batch.window != self.window

    def begin(self, batch: Batch) -> None:
        """Called before ``batch`` is computed: a new window commits the one before."""
        if batch.window != self.window:
            if self.window >= 0:
                self.planner.learn(self.window, time.monotonic() - self.window_started)
                self._commit(self.window)
            self.window, self.window_started = batch.window, time.monotonic()

    def record(self, batch: Batch, outcomes: Sequence[Outcome]) -> None:
        """``outcomes``: one per decoded image of ``batch`` (a vector or a failure); each row's
        metadata is the decoder's, completed with what compute found."""
        shard = self._shard(self.window)
        start = self.planner.windows[self.window].start
        for item in batch.failures:
            self._fail(shard, item.index - start, item.index, item.meta)
        positions, vectors, metas = [], [], []
        for index, meta, result in zip(batch.indices, batch.metas, outcomes, strict=True):
            if isinstance(result, Failure):
                failed = replace(meta, error_class=result.kind, error=result.message)
                self._fail(shard, index - start, index, failed)
            else:
                positions.append(index - start)
                vectors.append(result.values.numpy())
                metas.append(
                    replace(meta, feature_map_size=result.feature_map_size, tiles=result.tiles)
                )
        if positions:
            block = np.stack(vectors)
            self.writer.submit(lambda: shard.put(positions, block, metas))
        self.done += len(batch.indices) + len(batch.failures)
        self.writer.check()

    def finish(self) -> None:
        if self.window >= 0:
            self._commit(self.window)
        self.writer.drain()

    def keep(self) -> None:
        """After an interruption: commit every open shard as it is (missing rows stay missing)."""
        for window in list(self.open):
            self._commit(window)
        self.writer.drain()

    def abandon(self) -> None:
        self.writer.close()  # runs what is queued, or skips it after a write error
        for shard in self.open.values():
            shard.discard()

    def close(self) -> None:
        self.writer.close()

    def _shard(self, window: int) -> ShardWriter:
        if window not in self.open:
            w = self.planner.windows[window]
            refs = self.work[w.start : w.stop]
            # h5py serialises calls itself, so the writer thread may be busy with the last one
            self.open[window] = ShardWriter(
                self.run_dir,
                self.name(window),
                [r.key_bytes for r in refs],
                [r.source for r in refs],
                self.dim,
                self.dtype,
                {**self.attrs, "window": window},
            )
        return self.open[window]

    def _commit(self, window: int) -> None:
        shard = self.open.pop(window, None)
        if shard is not None:
            self.writer.submit(shard.commit)

    def _fail(self, shard: ShardWriter, position: int, index: int, meta: RowMeta) -> None:
        self.failures.append((self.work[index].key, meta.error_class, meta.error))
        self.writer.submit(lambda: shard.fail(position, meta))


class BackgroundWriter:
    """Runs shard writes on a thread, in order, so HDF5 I/O overlaps compute."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        # In the caller's context: messages built there use the caller's terms (errors.option).
        self._thread = threading.Thread(
            target=contextvars.copy_context().run,
            args=(self._loop,),
            name="spp-writer",
            daemon=True,
        )
        self._thread.start()

    def _loop(self) -> None:
        while (task := self._queue.get()) is not None:
            try:
                if self.error is None:
                    task()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                self.error = exc
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def submit(self, task: Callable[[], None]) -> None:
        self.check()
        self._queue.put(task)

    def drain(self) -> None:
        self._queue.join()
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


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
        self, key: bytes, source: bytes, stat: tuple[int, int] | None, retry_failed: bool
    ) -> bool:
        """True if this image (the same file, unchanged since: ``stat`` is its size and
        modification time, None for a URL, which is not asked again) already has a result that
        need not be redone. Same stored path but another file (other input folders with the
        same names, sizes and times, as after ``cp -p``) is redone; a URL is the same image
        whichever list named it."""
        record = self.records.get(key)
        if record is None or (stat is not None and (record.file_size, record.mtime_ns) != stat):
            return False
        # a URL is its own identity: the same URL from another list is the same image
        if stat is not None and record.source is not None and record.source != source:
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
                f"{option('mode', 'resume')} to redo its images"
            ) from None
        for row, key in enumerate(keys):
            if status[row] != STATUS_MISSING:  # later shards supersede earlier ones
                state.records[key] = Record(
                    index, row, int(status[row]), int(sizes[row]), int(mtimes[row]), sources[row]
                )
    return state
