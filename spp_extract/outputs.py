"""Opening an spp-extract file for reading: the one way every reader (``read_features``,
``iter_features``, ``inspect``, ``merge``, ``reduce``, projections, neighbours) gets at it.

- ``identify``: the root attributes say this tool wrote it.
- ``validate``: one check of the layout — shapes, dtypes, lengths that match, a declared size
  that the file (or a view's shard files) really holds. A file that fails it is refused with
  one line (ConfigError, exit 2) before anything reads it.
- A view's run folder is *held* (a shared ``flock`` on the folder) while the file is open: a
  run that replaces the output (``--overwrite``) leaves a folder that is being read for a
  later run to remove (``remove_run``), instead of deleting it under the reader.
- Rows read from a view are never its fill value: a row that reads as all NaN means a shard
  vanished under the reader (someone removed it by hand); that read raises OutputError.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import ConfigError, OutputError, option, printable
from .storage import ROW_FIELDS


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
    if attrs.get("kind") == "neighbors" or "neighbors" in names:
        source = attrs.get("source_file", "")
        made_from = f" ({printable(str(source))})" if source else ""
        raise ConfigError(
            f"'{path}' holds neighbour lists (spp-extract neighbors wrote it), not vectors; "
            f"give the features file it was made from{made_from} (spp-extract inspect shows it)"
        )
    if "format_version" not in attrs or not {"features", "paths", "failed"} <= names:
        raise ConfigError(
            f"'{path}' is an HDF5 file that spp-extract did not write (no format_version "
            "attribute or no features/paths datasets)"
        )
    return attrs


def vds_unname(name: str) -> str:
    """A virtual-dataset source name as a file name (HDF5 doubles a literal '%')."""
    return re.sub("%%", "%", name)


def check_sources(path: Path, f: h5py.File | None = None) -> None:
    """Refuse a view whose shard files are missing, unreadable or shorter than the rows it
    maps from them (HDF5 would read those as fill values): each source is opened as HDF5
    would open it, relative to the view's folder."""
    with contextlib.ExitStack() as stack:
        if f is None:
            identify(path)
            f = stack.enter_context(h5py.File(path, "r", locking=False))
        ds = f["features"]
        if not ds.is_virtual:
            return
        needed: dict[str, int] = {}  # source -> rows the view maps from it
        spans: dict[str, list[tuple[int, int]]] = {}
        mapped = 0
        for mapping in ds.virtual_sources():
            name = vds_unname(mapping.file_name)
            if mapping.dset_name != "features":
                raise ConfigError(
                    f"'{path}' is not a well-formed spp-extract file: its view maps "
                    f"{printable(mapping.dset_name)!r} of {printable(name)}, not features"
                )
            (first, _), (last, _) = mapping.src_space.get_select_bounds()
            needed[name] = max(needed.get(name, 0), last + 1)
            spans.setdefault(name, []).append((first, last + 1))
            mapped += last + 1 - first
        dim = ds.shape[1]
        if mapped < ds.shape[0]:
            raise ConfigError(
                f"'{path}' is not a well-formed spp-extract file: its view declares "
                f"{ds.shape[0]} rows and maps {mapped}"
            )
    missing, broken = [], []
    for name in sorted(needed):
        source = path.parent / name
        if not source.is_file():
            missing.append(name)
            continue
        try:
            with h5py.File(source, "r", locking=False) as shard:
                features = shard["features"]
                rows, width = features.shape
                if width != dim or rows < needed[name] or not _holds_rows(features, spans[name]):
                    broken.append(name)
        except (OSError, KeyError, ValueError, TypeError):
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
            f"{option('mode', 'resume')} to redo its images"
        )


def _shape(obj: object) -> str:
    if isinstance(obj, h5py.Dataset):
        return f"a {obj.dtype} dataset of shape {obj.shape}"
    return "a group" if isinstance(obj, h5py.Group) else "missing"


def _holds(ds: h5py.Dataset) -> bool:
    """Whether a (non-virtual) dataset's storage holds every value it declares: a file can
    declare a (2^31, 10752) dataset in a few KB, and reading it would give fill values."""
    if ds.size == 0:
        return True
    if ds.chunks is None:
        return ds.id.get_storage_size() >= ds.size * ds.dtype.itemsize
    chunks = math.prod(-(-side // step) for side, step in zip(ds.shape, ds.chunks, strict=True))
    return ds.id.get_num_chunks() >= chunks


# Per-row datasets every reader may use; the others (ROW_FIELDS) are checked when present.
REQUIRED = ("path_bytes", "image_size", "feature_map_size")


# What each dataset must hold: an HDF5 string, integers, booleans or raw bytes (vlen uint8).
_KIND = {
    "paths": "text",
    "path_bytes": "bytes",
    "image_size": "int",
    "input_size": "int",
    "feature_map_size": "int",
    "mode": "text",
    "truncated": "bool",
    "file_size": "int",
    "mtime_ns": "int",
    "tiles": "int",
    "root": "int",
    "roots": "text",
    "root_bytes": "bytes",
    "error_class": "text",
    "errors": "text",
}
FLOATS = ("float16", "float32", "float64")


def _kind_fits(column: h5py.Dataset, kind: str) -> bool:
    dtype = column.dtype
    if kind == "text":
        return h5py.check_string_dtype(dtype) is not None
    if kind == "bytes":
        vlen = h5py.check_vlen_dtype(dtype)
        return vlen is not None and np.dtype(vlen).kind == "u"
    if kind == "bool":
        return dtype.kind == "b"
    return dtype.kind in "iu"


def _holds_rows(ds: h5py.Dataset, spans: list[tuple[int, int]]) -> bool:
    """Whether a chunked shard dataset has at least as many chunks allocated as the rows a
    view maps from it need (chunks of failed rows alone are never written)."""
    if ds.chunks is None:
        return ds.id.get_storage_size() >= ds.size * ds.dtype.itemsize
    step = ds.chunks[0]
    chunks = {c for start, stop in spans for c in range(start // step, (stop - 1) // step + 1)}
    return ds.id.get_num_chunks() >= len(chunks) * -(-ds.shape[1] // ds.chunks[1])


def validate(f: h5py.File, path: Path) -> None:
    """One check of an spp-extract file's layout, shared by every reader: ConfigError (one
    line, naming what is wrong) for a file whose datasets do not fit together: shapes, types,
    lengths, a declared size the file (or a view's shards) really holds, the attributes."""

    def bad(what: str) -> ConfigError:
        return ConfigError(f"'{path}' is not a well-formed spp-extract file: {what}")

    def column(group: h5py.Group, name: str, shape: tuple[int, ...], where: str = "") -> None:
        data = group.get(name)
        if not isinstance(data, h5py.Dataset) or data.shape != shape:
            raise bad(f"{where}{name} is {_shape(data)}; expected shape {shape}")
        if not _kind_fits(data, _KIND[name]):
            raise bad(f"{where}{name} holds {data.dtype}; expected {_KIND[name]}")
        if not data.is_virtual and not _holds(data):
            raise bad(f"{where}{name} declares {data.shape[0]} rows but the file holds fewer")

    _validate_attrs(f.attrs, bad)
    ds = f.get("features")
    if not isinstance(ds, h5py.Dataset) or ds.ndim != 2:
        raise bad(f"features is {_shape(ds)}; expected a 2-D dataset (rows, values)")
    if ds.dtype.name not in FLOATS:
        raise bad(f"features holds {ds.dtype}; expected float16, float32 or float64")
    rows, dim = ds.shape
    if dim < 1:
        raise bad("features has 0 values per row")
    for name, (_dtype, width) in {
        "paths": (None, None),
        "path_bytes": (None, None),
        **ROW_FIELDS,
    }.items():
        if name in f or name in REQUIRED:
            column(f, name, (rows, width) if width else (rows,))
    failed = f.get("failed")
    if not isinstance(failed, h5py.Group):
        raise bad(f"failed is {_shape(failed)}; expected a group")
    count = failed["paths"].shape[0] if isinstance(failed.get("paths"), h5py.Dataset) else 0
    for name in {"paths", "error_class", "errors", *failed}:
        if name in _KIND and (name in failed or name in ("paths", "error_class", "errors")):
            width = ROW_FIELDS.get(name, (None, None))[1]
            column(failed, name, (count, width) if width else (count,), "failed/")
        elif not isinstance(failed[name], h5py.Dataset) or failed[name].shape[:1] != (count,):
            raise bad(f"failed/{name} is {_shape(failed[name])}; expected {count} entries")
    if "reduce" in f:
        _validate_reduce(f["reduce"], dim, bad)
    if ds.is_virtual:
        if not np.isnan(ds.fillvalue):
            raise bad(f"its view's fill value is {ds.fillvalue}, not NaN")
        check_sources(path, f)
    elif not _holds(ds):
        raise bad(f"features declares {rows} x {dim} values but the file holds fewer")


def _is_text(value: object) -> bool:
    return isinstance(value, (str, bytes))


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _are_numbers(value: object, kind: str, length: int | None = None) -> bool:
    array = np.asarray(value)
    return (
        array.ndim == 1
        and array.dtype.kind in kind
        and length in (None, len(array))
        and bool(np.isfinite(array).all())
    )


# What readers take from the root attributes, when present: checked like the datasets.
_ATTRS = {
    "format_version": ("an integer", _is_int),
    "feature_dim": ("an integer", _is_int),
    "channels": ("an integer", _is_int),
    "levels": ("a list of integers", lambda v: _are_numbers(v, "iu")),
    "mean": ("three finite numbers", lambda v: _are_numbers(v, "iuf", 3)),
    "std": ("three finite numbers", lambda v: _are_numbers(v, "iuf", 3)),
    "layout": ("'view' or 'merged'", lambda v: v in ("view", "merged", b"view", b"merged")),
    "complete": ("true or false", lambda v: isinstance(v, (bool, np.bool_))),
    **{
        key: ("text", _is_text)
        for key in ("backbone", "layer", "weights", "weights_id", "pooling", "dtype", "config")
    },
    "shards": ("text", _is_text),
}


def _validate_attrs(attrs: Any, bad: Any) -> None:
    for key, (expected, fits) in _ATTRS.items():
        if key in attrs and not fits(attrs[key]):
            raise bad(
                f"its attribute {key} is {printable(repr(attrs[key]))[:60]}; expected {expected}"
            )
    if attrs.get("layout") in ("view", b"view") and "shards" not in attrs:
        raise bad("it is a view (layout = view) with no shards attribute")


def _validate_reduce(group: object, dim: int, bad: Any) -> None:
    if not isinstance(group, h5py.Group):
        raise bad(f"reduce is {_shape(group)}; expected a group")
    mean = group.get("mean")
    if not isinstance(mean, h5py.Dataset) or mean.ndim != 1 or mean.dtype.kind != "f":
        raise bad(f"reduce/mean is {_shape(mean)}; expected a vector of floats")
    expected = {
        "components": (dim, mean.shape[0]),
        "explained_variance": (dim,),
        **({"scale": (dim,)} if "scale" in group else {}),
    }
    for name, shape in expected.items():
        column = group.get(name)
        if not isinstance(column, h5py.Dataset) or column.shape != shape:
            raise bad(f"reduce/{name} is {_shape(column)}; expected shape {shape}")
        if column.dtype.kind != "f":
            raise bad(f"reduce/{name} holds {column.dtype}; expected floats")
    power, l2 = group.attrs.get("power"), group.attrs.get("l2")
    if not (isinstance(power, (float, int, np.number)) and math.isfinite(power) and power > 0):
        raise bad(
            f"reduce's power attribute is {printable(repr(power))[:60]}; expected a number > 0"
        )
    if not isinstance(l2, (bool, np.bool_)):
        raise bad(f"reduce's l2 attribute is {printable(repr(l2))[:60]}; expected true or false")


# ----------------------------------------------------------------------------- run folders


def _open_dir(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return None


@contextlib.contextmanager
def held(run_dir: Path) -> Iterator[None]:
    """Hold a view's run folder while reading it: ``remove_run`` leaves it in place."""
    fd = _open_dir(run_dir)
    if fd is None:  # gone already: check_sources says so
        yield
        return
    try:
        with contextlib.suppress(OSError):  # a file system without flock: no hold
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)


def remove_run(run_dir: Path) -> bool:
    """Remove a run folder unless a reader holds it (``held``); returns whether it went. A
    folder left in place is removed by a later run on the same output."""
    fd = _open_dir(run_dir)
    if fd is None:
        return True
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError:
            pass  # no flock here: remove it as before
        shutil.rmtree(run_dir, ignore_errors=True)
        return True
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- reading


@dataclass
class OutputFile:
    """An open, validated spp-extract file (``open_output``)."""

    path: Path
    file: h5py.File
    attrs: dict[str, Any]

    @property
    def features(self) -> h5py.Dataset:
        return self.file["features"]

    @property
    def folders(self) -> list[Path]:
        """Where a view's shards really are (its run folder, from its attributes): no output
        may be written there, whatever the view is called now."""
        shards = self.attrs.get("shards")
        return [self.path.parent / str(shards)] if shards else []

    @property
    def rows(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    def checked(self, block: np.ndarray) -> np.ndarray:
        """``block`` of a view, refused if a row reads as the fill value because a shard
        vanished (a row of NaN stored by an older version is a row that is not finite)."""
        if self.features.is_virtual and len(block) and np.isnan(block).all(axis=1).any():
            try:
                check_sources(self.path, self.file)
            except OutputError:
                raise OutputError(
                    f"{self.path}: rows read as the view's fill value (NaN): a shard file "
                    "vanished while the file was read (its shards folder removed?); read it "
                    "again"
                ) from None
        return block

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of ``features``, as stored."""
        return self.checked(self.features[start:stop])

    def read_rows(
        self, index: np.ndarray, block_rows: int
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Rows ``index`` (sorted, unique) as (positions in ``index``, rows) blocks of at most
        ``block_rows`` file rows each. h5py wants increasing indices, and a fancy read costs a
        selection per row: a dense run is read as one slice and picked from in memory."""
        dataset = self.features
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
            yield np.arange(start, stop), self.checked(block)
            start = stop


@contextlib.contextmanager
def open_output(path: str | os.PathLike[str]) -> Iterator[OutputFile]:
    """An spp-extract file, identified and validated, open for reading; a view's run folder
    is held while it is open. A view replaced between opening it and holding its folder is
    opened again (the new one). ConfigError for a file that is not a well-formed output,
    OutputError for a view whose shards are missing."""
    path = Path(path)
    for again in (True, False):
        attrs = identify(path)
        with h5py.File(path, "r", locking=False) as f:
            opened = os.fstat(f.id.get_vfd_handle()).st_ino
            run_dir = path.parent / str(attrs.get("shards", "")) if "shards" in attrs else None
            with held(run_dir) if run_dir is not None else contextlib.nullcontext():
                try:
                    validate(f, path)
                except OutputError:
                    with contextlib.suppress(OSError):
                        if again and os.stat(path).st_ino != opened:
                            continue  # replaced meanwhile: read the new one
                    raise
                yield OutputFile(path, f, attrs)
                return
