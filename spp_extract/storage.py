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
import hashlib
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import OutputError, option, printable

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


def check_space(directory: Path, needed: int) -> None:
    free = shutil.disk_usage(directory).free
    if free < needed:
        raise disk_error(OSError(errno.ENOSPC, f"{free} bytes free, {needed} needed"), directory)


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
            f"then rerun the same command with {option('resume')}"
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
    return path.with_name(f"{tmp_prefix(path)}{os.getpid()}.tmp")


def remove_stale_tmp(path: Path) -> None:
    """Remove temporary files a killed view or merge of ``path`` left behind."""
    for stale in path.parent.glob(f"{tmp_prefix(path)}*.tmp"):
        stale.unlink(missing_ok=True)


def finish_atomic(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@contextlib.contextmanager
def written_atomically(path: Path, advice: str | None = None) -> Iterator[Path]:
    """Write ``path`` whole or not at all: the body writes the temporary file yielded, which
    then replaces ``path`` (fsync'd, renamed, folder fsync'd). On any error the temporary file
    is removed; a disk error becomes an OutputError naming ``path`` and ``advice``."""
    tmp = atomic_path(path)
    try:
        yield tmp
        finish_atomic(tmp, path)
    except (OSError, RuntimeError) as exc:
        tmp.unlink(missing_ok=True)
        raise disk_error(exc, path, advice) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def copy_as_merged(src: h5py.File, out: h5py.File, skip: Sequence[str] = ("features",)) -> None:
    """Every dataset and attribute of ``src`` but ``skip`` into ``out``, a self-contained file
    (``layout = merged``, no shards folder)."""
    for name, obj in src.items():
        if name not in skip:
            src.copy(obj, out, name=name)
    out.attrs.update(src.attrs)
    out.attrs["layout"] = "merged"
    if "shards" in out.attrs:
        del out.attrs["shards"]


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
