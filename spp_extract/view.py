"""The output file a user opens: a view over a run's shards, checked before it is read, and
``merge`` for a self-contained copy.

``<output>``'s ``features`` dataset is an HDF5 virtual dataset over the shards (fill value
NaN, so a missing shard can never read as plausible zeros); all other datasets are real
copies. HDF5 would read a missing source as fill values, so ``check_sources`` opens every
shard before a view is read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import ConfigError, OutputError, option, printable
from .shards import Record, read_state
from .storage import (
    BYTES,
    ROW_FIELDS,
    STATUS_FAILED,
    STATUS_OK,
    STR,
    bytes_array,
    check_space,
    copy_as_merged,
    key_text,
    shards_root,
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


def _vds_unname(name: str) -> str:
    return re.sub("%%", "%", name)


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
            f"rerun with {option('resume')}"
        )
    wanted = [k for k in wanted if k in state.records]
    records = [(k, state.records[k]) for k in wanted]
    ok = [(k, r) for k, r in records if r.status == STATUS_OK]
    failed = [(k, r) for k, r in records if r.status == STATUS_FAILED]
    check_space(output.parent, len(records) * 400 + (1 << 20))
    with written_atomically(output) as tmp:
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


def _write_rows(
    group: h5py.Group, records: Sequence[tuple[bytes, Record]], handles: dict[int, h5py.File]
) -> None:
    group.create_dataset("paths", data=[key_text(k) for k, _ in records], dtype=STR)
    group.create_dataset("path_bytes", data=bytes_array([k for k, _ in records]), dtype=BYTES)
    for name, (dtype, width) in ROW_FIELDS.items():
        group.create_dataset(name, data=_gather(records, handles, name, dtype, width), dtype=dtype)


def _write_failed(
    group: h5py.Group, records: Sequence[tuple[bytes, Record]], handles: dict[int, h5py.File]
) -> None:
    _write_rows(group, records, handles)
    group.create_dataset(
        "error_class", data=_gather(records, handles, "error_class", STR, None), dtype=STR
    )
    group.create_dataset("errors", data=_gather(records, handles, "error", STR, None), dtype=STR)


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
    advice = "nothing was written; free space or choose another destination, then run merge again"
    with (
        written_atomically(dest, advice) as tmp,
        h5py.File(source, "r", locking=False) as src,
        h5py.File(tmp, "w") as out,
    ):
        features = src["features"]
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
            target[start : start + block_rows] = features[start : start + block_rows]
        copy_as_merged(src, out)
    return n
