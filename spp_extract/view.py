"""The output file a user opens: a view over a run's shards, checked before it is read, and
``merge`` for a self-contained copy.

``<output>``'s ``features`` dataset is an HDF5 virtual dataset over the shards (fill value
NaN, so a missing shard can never read as plausible zeros); all other datasets are real
copies. HDF5 would read a missing source as fill values, so ``check_sources`` opens every
shard before a view is read.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import OutputError, option, printable
from .outputs import OutputFile, open_output
from .shards import Record, read_state
from .sources import is_url
from .storage import (
    BYTES,
    ROW_FIELDS,
    STATUS_FAILED,
    STATUS_OK,
    STR,
    bytes_array,
    check_destinations,
    check_space,
    copy_as_merged,
    key_text,
    written_atomically,
)


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


def _vds_name(path: str) -> str:
    # HDF5 reads virtual-dataset source file names as printf-like patterns ("%b" = the view's
    # own name, "%%" = "%"), so a literal "%" must be doubled.
    return path.replace("%", "%%")


def assemble(
    output: Path,
    run_dir: Path,
    keys: Sequence[bytes] | None,
    dim: int,
    dtype: str,
    attrs: dict[str, Any],
    *,
    complete: bool = True,
    keep_prefixes: Sequence[bytes] = (),
) -> tuple[int, int]:
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
            f"{len(missing)} images have no committed result (first: {printable(key_text(missing[0]))!r}); "
            f"rerun with {option('mode', 'resume')}"
        )
    wanted = [k for k in wanted if k in state.records]
    records = [(k, state.records[k]) for k in wanted]
    ok = [(k, r) for k, r in records if r.status == STATUS_OK]
    failed = [(k, r) for k, r in records if r.status == STATUS_FAILED]
    check_space(output.parent, len(records) * 400 + (1 << 20))
    with written_atomically(output) as fh:
        handles = {i: h5py.File(p, "r", locking=False) for i, p in enumerate(state.shards)}
        try:
            with h5py.File(fh, "w") as out:
                layout = h5py.VirtualLayout(shape=(len(ok), dim), dtype=np.dtype(dtype))
                for shard, row, count, start in _runs((r.shard, r.row) for _, r in ok):
                    source_path = os.path.relpath(state.shards[shard], output.parent)
                    source = h5py.VirtualSource(
                        _vds_name(source_path), "features", shape=handles[shard]["features"].shape
                    )
                    layout[start : start + count] = source[row : row + count]
                out.create_virtual_dataset("features", layout, fillvalue=np.nan)
                roots = sorted({_root(k, r) for k, r in records} - {None})  # type: ignore[type-var]
                out.create_dataset("roots", data=[key_text(r) for r in roots], dtype=STR)
                out.create_dataset("root_bytes", data=bytes_array(roots), dtype=BYTES)
                _write_rows(out, ok, handles, roots)
                _write_failed(out.create_group("failed"), failed, handles, roots)
                out.attrs.update(attrs)
                out.attrs["complete"] = complete
                out.attrs["layout"] = "view"
                out.attrs["shards"] = os.path.relpath(run_dir, output.parent)
        finally:
            for handle in handles.values():
                handle.close()
    return len(ok), len(failed)


def _gather(
    records: Sequence[tuple[bytes, Record]],
    handles: dict[int, h5py.File],
    name: str,
    dtype: Any,
    width: int | None,
) -> np.ndarray:
    shape = (len(records), width) if width else (len(records),)
    out = np.empty(shape, dtype=object if dtype in (STR,) else dtype)
    cache: dict[int, np.ndarray] = {}
    for i, (_, r) in enumerate(records):
        if r.shard not in cache:
            if name not in handles[r.shard]:  # a shard written before the field existed
                cache[r.shard] = np.zeros((handles[r.shard]["status"].shape[0], *shape[1:]), dtype)
            else:
                data = handles[r.shard][name]
                cache[r.shard] = data.asstr()[:] if dtype == STR else data[:]
        out[i] = cache[r.shard][r.row]
    return out


def _root(key: bytes, record: Record) -> bytes | None:
    """The input root a row came from: its absolute location less its stored path (a folder,
    a remote folder, the list or table that named a URL). None for rows of shards written
    before locations were kept, and for URLs named directly."""
    source = record.source
    if source is None or (source == key and is_url(os.fsdecode(key))):
        return None  # a URL named directly: it is whole
    if source.endswith(b"/" + key):
        return source[: -len(key) - 1] or b"/"
    return os.path.dirname(source) if source != key else b"/"


def _write_rows(
    group: h5py.Group,
    records: Sequence[tuple[bytes, Record]],
    handles: dict[int, h5py.File],
    roots: Sequence[bytes],
) -> None:
    group.create_dataset("paths", data=[key_text(k) for k, _ in records], dtype=STR)
    group.create_dataset("path_bytes", data=bytes_array([k for k, _ in records]), dtype=BYTES)
    index = {root: i for i, root in enumerate(roots)}
    which = [index.get(_root(k, r), -1) for k, r in records]  # type: ignore[arg-type]
    group.create_dataset("root", data=np.asarray(which, np.int32), dtype=np.int32)
    for name, (dtype, width) in ROW_FIELDS.items():
        group.create_dataset(name, data=_gather(records, handles, name, dtype, width), dtype=dtype)


def _write_failed(
    group: h5py.Group,
    records: Sequence[tuple[bytes, Record]],
    handles: dict[int, h5py.File],
    roots: Sequence[bytes],
) -> None:
    _write_rows(group, records, handles, roots)
    group.create_dataset(
        "error_class", data=_gather(records, handles, "error_class", STR, None), dtype=STR
    )
    group.create_dataset("errors", data=_gather(records, handles, "error", STR, None), dtype=STR)


def merge(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    block_rows: int = 1024,
) -> int:
    """Copy a view (or any spp-extract file) into a self-contained file; returns rows. An
    existing ``dest`` is replaced only with ``overwrite``."""
    source, dest = Path(source), Path(dest)
    advice = "nothing was written; free space or choose another destination, then run merge again"
    with open_output(source) as opened:
        check_destinations([dest], [source], overwrite=overwrite, folders=opened.folders)
        n, dim, itemsize = opened.rows, opened.dim, opened.features.dtype.itemsize
        check_space(dest.parent, n * dim * itemsize + (1 << 20), advice, dest)
        with written_atomically(dest, advice) as fh, h5py.File(fh, "w") as out:
            _copy(opened, out, block_rows, fh.check)
    return n


def _copy(opened: OutputFile, out: h5py.File, block_rows: int, check: Callable[[], None]) -> None:
    """``opened`` into ``out`` as one self-contained file, ``block_rows`` rows at a time;
    ``check()`` after each block raises a write error or a signal's exception at once."""
    src, features = opened.file, opened.features
    n, dim = features.shape
    rows = max(1, min(max(n, 1), (1 << 20) // max(1, dim * features.dtype.itemsize)))
    target = out.create_dataset(
        "features",
        shape=(n, dim),
        dtype=features.dtype,
        chunks=(rows, dim),
        maxshape=(None, dim),
    )
    for start in range(0, n, block_rows):
        target[start : start + block_rows] = opened.read(start, start + block_rows)
        check()
    copy_as_merged(src, out)
