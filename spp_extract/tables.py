"""URL tables as input lists: a column of a CSV/TSV file (stdlib) or of a Parquet file
(pyarrow, the ``[tables]`` extra), the input format of img2dataset. Each value is a URL or a
local path; empty values are counted and left out, and the count is logged."""

from __future__ import annotations

import csv
import logging
import os

from .errors import ConfigError, printable

log = logging.getLogger(__name__)

INSTALL = 'pip install "spp-extract[tables]"'


def entries(path: str, column: str) -> list[tuple[str, str]]:
    """(value, where it came from: `` in row N of FILE``) for each non-empty value of
    ``column``. Rows are numbered from 1, the header not counted."""
    name = printable(path)
    if path.lower().endswith(".parquet"):
        values, columns = _parquet(path, column)
    else:
        values, columns = _csv(path, column, "\t" if path.lower().endswith(".tsv") else ",")
    if values is None:
        raise ConfigError(
            f"{name} has no column {column!r}; its columns: {', '.join(map(repr, columns))} "
            "(choose one with --column)"
        )
    found = [(str(v), f" in row {row} of {name}") for row, v in enumerate(values, 1) if v]
    if len(found) < len(values):
        log.warning(
            "%d of %d rows of %s have no value in column %r: left out",
            len(values) - len(found),
            len(values),
            name,
            column,
        )
    return found


def _csv(path: str, column: str, delimiter: str) -> tuple[list[str] | None, list[str]]:
    try:
        # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the first name
        with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as fh:
            reader = csv.reader(fh, delimiter=delimiter)
            header = next(reader, [])
            if column not in header:
                return None, header
            at = header.index(column)
            return [row[at].strip() if at < len(row) else "" for row in reader], header
    except OSError as exc:
        raise ConfigError(f"cannot read --files-from {printable(path)!r}: {exc.strerror}") from None
    except csv.Error as exc:
        raise ConfigError(f"--files-from {printable(path)!r} is not valid CSV: {exc}") from None


def _parquet(path: str, column: str) -> tuple[list[str] | None, list[str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ConfigError(f"reading a .parquet list needs pyarrow; {INSTALL}") from None
    if not os.path.isfile(path):
        raise ConfigError(f"cannot read --files-from {printable(path)!r}: no such file")
    try:
        schema = pq.read_schema(path)
        if column not in schema.names:
            return None, list(schema.names)
        values = pq.read_table(path, columns=[column]).column(column).to_pylist()
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors for a file that is not Parquet
        raise ConfigError(
            f"--files-from {printable(path)!r} is not a readable Parquet file: {exc}"
        ) from None
    return ["" if v is None else str(v).strip() for v in values], list(schema.names)
