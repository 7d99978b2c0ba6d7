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

This is the only module that knows h5py.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import OutputError

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


def _disk_error(exc: Exception, path: Path) -> OutputError:
    code = getattr(exc, "errno", None)
    full = code in (errno.ENOSPC, errno.EDQUOT) or "No space left" in str(exc) or "errno = 28" in str(exc)
    what = "the disk is full" if full else f"cannot write ({exc})"
    return OutputError(
        f"stopped: {what} while writing {path}; everything committed so far is kept — free "
        "space, then rerun the same command with --resume"
    )


class OutputLock:
    """One writer per output: an advisory lock on ``<output>.shards/.lock`` (released by the
    kernel when the process dies, so a killed run never leaves a stale lock)."""

    def __init__(self, output: Path) -> None:
        self.path = shards_root(output) / ".lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputError(
                f"another spp-extract run is writing this output (it holds {self.path}); wait "
                "for it to finish or stop it first"
            ) from None
        self._fd = fd

    def held_elsewhere(self) -> bool:
        """True if another process holds the lock (checked without creating anything)."""
        if self._fd is not None or not self.path.exists():
            return False
        try:
            self.acquire()
        except OutputError:
            return True
        self.release()
        return False

    def release(self) -> None:
        if self._fd is not None:
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
    error_class: str = ""
    error: str = ""


class ShardWriter:
    """One window of images -> one shard file. Rows are positions in the window (sorted order);
    vectors are written as they arrive, metadata at commit."""

    def __init__(
        self, directory: Path, name: str, keys: Sequence[bytes], dim: int, dtype: str,
        attrs: dict[str, Any],
    ) -> None:  # fmt: skip
        self.final = directory / name
        self.tmp = directory / (name + ".tmp")
        self.keys = list(keys)
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
            f.create_dataset("paths", data=[_text(k) for k in self.keys], dtype=_STR)
            f.create_dataset("status", data=self.status)
            metas = [m or RowMeta() for m in self.meta]
            for name, (dtype, _width) in ROW_FIELDS.items():
                f.create_dataset(name, data=[getattr(m, name) for m in metas], dtype=dtype)
            f.create_dataset("error_class", data=[m.error_class for m in metas], dtype=_STR)
            f.create_dataset("error", data=[m.error for m in metas], dtype=_STR)
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


@dataclass
class RunState:
    """Everything committed in a run directory, latest result per image."""

    shards: list[Path]
    records: dict[bytes, Record] = field(default_factory=dict)

    def done(self, key: bytes, file_size: int, mtime_ns: int, retry_failed: bool) -> bool:
        """True if this image (unchanged since) already has a result that need not be redone."""
        record = self.records.get(key)
        if record is None or (record.file_size, record.mtime_ns) != (file_size, mtime_ns):
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
        except (OSError, KeyError) as exc:
            raise OutputError(
                f"shard {path} is unreadable ({exc}); move it away and rerun with --resume to "
                "redo its images"
            ) from None
        for row, key in enumerate(keys):
            if status[row] != STATUS_MISSING:  # later shards supersede earlier ones
                state.records[key] = Record(index, row, int(status[row]), int(sizes[row]),
                                            int(mtimes[row]))  # fmt: skip
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


def _atomic_h5(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def _finish_atomic(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def assemble(
    output: Path, run_dir: Path, keys: Sequence[bytes] | None, dim: int, dtype: str,
    attrs: dict[str, Any],
) -> tuple[int, int]:  # fmt: skip
    """Write ``output`` as a view over the run's shards, rows in ``keys`` order (sorted paths);
    ``keys=None`` takes every image with a result. Returns (rows, failures)."""
    state = read_state(run_dir)
    wanted = keys if keys is not None else sorted(state.records)
    missing = [k for k in wanted if k not in state.records]
    if missing:
        raise OutputError(
            f"{len(missing)} images have no committed result (first: {_text(missing[0])!r}); "
            "rerun with --resume"
        )
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
                        source_path, "features", shape=handles[shard]["features"].shape
                    )
                    layout[start : start + count] = source[row : row + count]
                out.create_virtual_dataset("features", layout, fillvalue=np.nan)
                _write_rows(out, ok, handles)
                _write_failed(out.create_group("failed"), failed, handles)
                out.attrs.update(attrs)
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


def check_sources(path: Path) -> None:
    """Refuse a view whose shard files are missing (HDF5 would read them as fill values)."""
    with h5py.File(path, "r") as f:
        if "features" not in f:
            raise OutputError(f"{path} has no 'features' dataset; is it an spp-extract file?")
        ds = f["features"]
        if not ds.is_virtual:
            return
        missing = sorted({
            m.file_name for m in ds.virtual_sources()
            if not (path.parent / m.file_name).is_file()
        })  # fmt: skip
    if missing:
        raise OutputError(
            f"{path} is a view over shard files, and {len(missing)} are missing (first: "
            f"{missing[0]}); keep {path.name}.shards/ beside it, or use `spp-extract merge` "
            "for a self-contained copy"
        )


def merge(source: Path, dest: Path, *, block_rows: int = 1024) -> int:
    """Copy a view (or any spp-extract file) into a self-contained file; returns rows."""
    check_sources(source)
    tmp = _atomic_h5(dest)
    try:
        with h5py.File(source, "r") as src, h5py.File(tmp, "w") as out:
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
        raise _disk_error(exc, dest) from None
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


def read_features(path: str | os.PathLike[str]) -> Features:
    """Load a whole spp-extract HDF5 file (view or merged) after checking its shards exist."""
    path = Path(path)
    check_sources(path)
    with h5py.File(path, "r") as f:
        return Features(
            features=f["features"][:],
            paths=list(f["paths"].asstr()[:]),
            image_size=f["image_size"][:],
            feature_map_size=f["feature_map_size"][:],
            failed_paths=list(f["failed/paths"].asstr()[:]),
            failed_errors=list(f["failed/errors"].asstr()[:]),
            attrs=dict(f.attrs),
        )


def summary(path: Path, rows: int = 3) -> list[str]:
    """Human-readable lines for `spp-extract inspect`."""
    with h5py.File(path, "r") as f:
        features = f["features"]
        n, dim = features.shape
        lines = [f"{path}: {n} images, {dim}-dim {features.dtype}, layout {f.attrs.get('layout', '?')}",
                 "configuration:"]  # fmt: skip
        lines += [f"  {line}" for line in str(f.attrs.get("config", "")).splitlines()]
        for key in ("spp_extract_version", "torch_version", "torchvision_version", "created"):
            lines.append(f"{key}: {f.attrs.get(key)}")
        failed = f["failed"]
        lines.append(f"failures: {failed['paths'].shape[0]}")
        for p, k, e in zip(failed["paths"].asstr()[:], failed["error_class"].asstr()[:],
                           failed["errors"].asstr()[:], strict=True):  # fmt: skip
            lines.append(f"  {p}: {k}: {e}")
        paths = f["paths"].asstr()
        for i in range(min(rows, n)):
            head = ", ".join(f"{v:.4g}" for v in features[i][:4])
            size = tuple(int(v) for v in f["image_size"][i])
            fmap = tuple(int(v) for v in f["feature_map_size"][i])
            lines.append(f"row {i}: {paths[i]}  size {size}  map {fmap}  [{head}, ...]")
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
