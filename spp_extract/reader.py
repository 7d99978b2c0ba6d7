"""Reading spp-extract files: all of it, chosen rows, or block by block at any size."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from .outputs import OutputFile, open_output
from .sources import is_url, locate


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
    roots: list[str] = field(default_factory=list)  # the input roots the rows came from
    root: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # (N,), -1: unknown
    failed_classes: list[str] = field(default_factory=list)  # "corrupt", "not_found", ...

    def absolute_paths(self) -> list[str | None]:
        """Each row's file where it was read: its input root joined with its path, or its URL
        (None for rows written before roots were recorded)."""
        return [
            locate(self.roots[r], p) if 0 <= r < len(self.roots) else (p if is_url(p) else None)
            for r, p in zip(self.root.tolist(), self.paths, strict=True)
        ]


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
        raise IndexError(
            f"rows must be a slice, a 1-D array of row numbers or a mask, not {rows!r}"
        )
    index = index.astype(np.int64)
    bad = (index < -n) | (index >= n)
    if bad.any():
        raise IndexError(f"row {int(index[bad][0])} is out of range for a file of {n} rows")
    return np.where(index < 0, index + n, index)


def _take_features(opened: OutputFile, index: np.ndarray) -> np.ndarray:
    """Feature rows ``index`` (any int64: unsorted, repeated), read in sorted blocks."""
    unique, inverse = np.unique(index, return_inverse=True)
    ds = opened.features
    out = np.empty((len(unique), ds.shape[1]), dtype=ds.dtype)
    step = block_rows_for(ds.shape[1], ds.dtype.itemsize)
    for positions, block in opened.read_rows(unique, step):
        out[positions] = block
    return out[inverse]


def _take(dataset: h5py.Dataset, index: np.ndarray) -> np.ndarray:
    """``dataset[index]`` of a small per-row dataset (paths, sizes) for any int64 ``index``."""
    unique, inverse = np.unique(index, return_inverse=True)
    return dataset[unique][inverse] if len(unique) else dataset[:0]


def block_rows_for(dim: int, itemsize: int, cap: int = 65536) -> int:
    """Rows per block so that a block of features is at most about 256 MiB."""
    return max(1, min(cap, (256 << 20) // max(1, dim * itemsize)))


def read_features(path: str | os.PathLike[str], rows: RowSelection | None = None) -> Features:
    """Load an spp-extract HDF5 file (view or merged) after checking its shards exist.

    ``rows``: only these rows (a slice, row numbers in any order — read in sorted blocks and
    returned in the order given — or a boolean mask); ``paths``, ``image_size`` and
    ``feature_map_size`` follow them. The failure lists are always whole. ``None``: everything.
    """
    with open_output(path) as opened:
        f = opened.file
        if rows is None:
            features = opened.read(0, opened.rows)
            paths = list(f["paths"].asstr(errors="replace")[:])
            image_size, feature_map_size = f["image_size"][:], f["feature_map_size"][:]
            root = f["root"][:] if "root" in f else np.full(opened.rows, -1, np.int32)
        else:
            index = _row_index(rows, opened.rows)
            features = _take_features(opened, index)
            paths = list(_take(f["paths"], index).astype(object))
            paths = [p.decode("utf-8", "replace") if isinstance(p, bytes) else p for p in paths]
            image_size = _take(f["image_size"], index)
            feature_map_size = _take(f["feature_map_size"], index)
            root = _take(f["root"], index) if "root" in f else np.full(len(index), -1, np.int32)
        return Features(
            features=features,
            paths=paths,
            image_size=image_size,
            feature_map_size=feature_map_size,
            failed_paths=list(f["failed/paths"].asstr(errors="replace")[:]),
            failed_errors=list(f["failed/errors"].asstr(errors="replace")[:]),
            attrs=dict(f.attrs),
            complete=bool(f.attrs.get("complete", True)),
            roots=list(f["roots"].asstr(errors="replace")[:]) if "roots" in f else [],
            root=root,
            failed_classes=list(f["failed/error_class"].asstr(errors="replace")[:]),
        )


def iter_features(
    path: str | os.PathLike[str],
    block_rows: int | None = None,
) -> Iterator[tuple[int, np.ndarray, list[str]]]:
    """Blocks of an spp-extract file, in row order: ``(start, features[start:start+n],
    paths[start:start+n])``, features as stored (float32 or float16). ``block_rows``: rows
    per block (default: about 256 MiB of features, at most 65,536 rows). Memory stays at one
    block whatever the file's size; the shards are checked first."""
    if block_rows is not None and block_rows < 1:
        raise ValueError(f"block_rows must be at least 1, not {block_rows}")
    with open_output(path) as opened:
        n, dim = opened.rows, opened.dim
        step = block_rows or block_rows_for(dim, opened.features.dtype.itemsize)
        paths = opened.file["paths"].asstr(errors="replace")
        for start in range(0, n, step):
            yield start, opened.read(start, start + step), list(paths[start : start + step])
