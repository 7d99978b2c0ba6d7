"""Neighbour lists and pairs as text people and programs read: the lists on a terminal or as
CSV/JSON lines, the near-duplicate pairs as CSV, and a histogram of similarities that shows
where a threshold cuts. Paths as stored (relative to their input root) or, with ``absolute``,
joined with the root they were read from, so that they open from anywhere."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from typing import IO

import h5py
import numpy as np

from .errors import printable
from .records import Neighbors
from .sources import locate

FORMATS = ("text", "csv", "jsonl")
BLOCK = 4096  # rows of lists written at a time: paths are read for one block only


class PathNames:
    """The paths of an spp-extract file's rows (a features file or a neighbors file), read
    for the rows asked only; ``absolute``: joined with the input root of each row (rows of a
    file written before roots were recorded keep their stored path)."""

    def __init__(self, f: h5py.File | h5py.Group, absolute: bool = False) -> None:
        self.paths = f["paths"]
        self.roots = list(f["roots"].asstr(errors="replace")[:]) if "roots" in f else []
        self.root = f["root"] if (absolute and "root" in f) else None

    def __call__(self, rows: np.ndarray) -> dict[int, str]:
        """{row: path} for the rows >= 0 among ``rows`` (any order, repeats)."""
        unique = np.unique(rows[rows >= 0])
        if not len(unique):
            return {}
        paths = self.paths.asstr(errors="replace")[unique]
        if self.root is not None:
            roots = self.root[unique]
            paths = [
                locate(self.roots[r], p) if 0 <= r < len(self.roots) else p
                for r, p in zip(roots.tolist(), paths, strict=True)
            ]
        return {int(r): printable(str(p)) for r, p in zip(unique.tolist(), paths, strict=True)}


def write_lists(
    stream: IO[str],
    found: Neighbors,
    queries: PathNames,
    database: PathNames,
    fmt: str = "text",
) -> None:
    """Each query row's neighbours, in row order: ``text`` (the query's path, then one
    indented line per neighbour: rank, similarity, path), ``csv`` (query,rank,neighbor,
    similarity) or ``jsonl`` (one object per query: path, neighbors [{path, similarity}])."""
    writer = csv.writer(stream, lineterminator="\n") if fmt == "csv" else None
    if writer is not None:
        writer.writerow(["query", "rank", "neighbor", "similarity"])
    excluded = set(found.excluded.tolist())
    for start, index, similarity in _blocks(found):
        rows = np.arange(start, start + len(index))
        names, neighbours = queries(rows), database(index.ravel())
        for row, ids, sims in zip(rows.tolist(), index.tolist(), similarity.tolist(), strict=True):
            pairs = [(neighbours[i], s) for i, s in zip(ids, sims, strict=True) if i >= 0]
            if fmt == "text":
                stream.write(f"{names[row]}\n")
                if row in excluded:
                    stream.write("   (left out: its vector is not finite)\n")
                for rank, (name, sim) in enumerate(pairs, 1):
                    stream.write(f"  {rank:>3}  {sim:.4f}  {name}\n")
            elif writer is not None:
                for rank, (name, sim) in enumerate(pairs, 1):
                    writer.writerow([names[row], rank, name, f"{sim:.6f}"])
            else:
                item = {
                    "path": names[row],
                    "neighbors": [{"path": n, "similarity": round(s, 6)} for n, s in pairs],
                }
                if row in excluded:
                    item["excluded"] = "not finite"
                stream.write(json.dumps(item, ensure_ascii=False) + "\n")


def _blocks(found: Neighbors) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    for start in range(0, len(found.index), BLOCK):
        yield start, found.index[start : start + BLOCK], found.similarity[start : start + BLOCK]


def write_pairs(
    stream: IO[str],
    pairs: tuple[np.ndarray, np.ndarray, np.ndarray],
    queries: PathNames,
    database: PathNames,
) -> None:
    """``path_a,path_b,similarity``, one line per pair (``neighbors.pairs_above``)."""
    writer = csv.writer(stream, lineterminator="\r\n")
    writer.writerow(["path_a", "path_b", "similarity"])
    lo, hi, sims = pairs
    for start in range(0, len(lo), BLOCK):
        a, b = lo[start : start + BLOCK], hi[start : start + BLOCK]
        names_a, names_b = queries(a), database(b)
        writer.writerows(
            (names_a[i], names_b[j], f"{s:.6f}")
            for i, j, s in zip(
                a.tolist(), b.tolist(), sims[start : start + BLOCK].tolist(), strict=True
            )
        )


def histogram(
    values: np.ndarray, threshold: float | None = None, bins: int = 10, width: int = 40
) -> list[str]:
    """A compact text histogram of similarities (one line per bin: range, bar, count), with a
    line where ``threshold`` cuts it and how many values are at or above it."""
    values = values[np.isfinite(values)]
    if not len(values):
        return []
    low, high = float(values.min()), float(values.max())
    step = _nice_step((high - low) / bins) if high > low else 0.01
    first = math.floor(low / step) * step
    edges = [round(first + i * step, 10) for i in range(bins + 2) if first + (i - 1) * step < high]
    edges = edges if len(edges) > 1 else [first, first + step]
    if threshold is not None and edges[0] < threshold < edges[-1]:
        edges = sorted({*edges, threshold})  # the cut is an edge: no bin straddles it
    counts = np.histogram(values, bins=edges)[0]
    most = max(int(counts.max()), 1)
    digits = max(2, -math.floor(math.log10(step)))
    lines = []
    cut_shown = threshold is None
    for a, b, count in zip(edges, edges[1:], counts.tolist(), strict=False):
        if not cut_shown and threshold <= a:
            lines.append(_cut_line(values, threshold))
            cut_shown = True
        bar = "#" * max(1 if count else 0, round(width * count / most))
        lines.append(
            f"  {a:>{digits + 3}.{digits}f} - {b:<{digits + 3}.{digits}f} {bar:<{width}} {count}"
        )
    if not cut_shown:
        lines.append(_cut_line(values, threshold))  # type: ignore[arg-type]
    return lines


def _cut_line(values: np.ndarray, threshold: float) -> str:
    above = int((values >= threshold).sum())
    return f"  ---- threshold {threshold:g}: {above} of {len(values)} at or above ----"


def _nice_step(raw: float) -> float:
    """1, 2 or 5 times a power of ten, at least ``raw``."""
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
