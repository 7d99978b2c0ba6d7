"""What `spp-extract inspect` prints: every file the tool writes described — an extraction
(a view over shards, or merged), a ``reduce`` output (the reduction too), a ``neighbors``
output (k, source, similarities)."""

from __future__ import annotations

import io
import os
from collections import Counter
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .errors import ConfigError, printable
from .listing import PathNames, histogram, write_lists
from .outputs import identify, open_output
from .records import Neighbors

SHOWN_FAILURES = 20

# what the run actually used, shown by `inspect` (the configuration may say "auto")
_RECORDED = (
    "device",
    "batching",
    "world_size",
    "weights",
    "complete",
    "spp_extract_version",
    "torch_version",
    "torchvision_version",
    "created",
)


def summary(path: str | os.PathLike[str], rows: int = 3) -> list[str]:
    """Human-readable lines describing any file spp-extract writes. ConfigError for a file
    it did not write or that is not well formed."""
    path = Path(path)
    if _is_neighbors(path):
        return _neighbors(path, rows)
    return _features(path, rows)


def _is_neighbors(path: Path) -> bool:
    try:
        identify(path)
    except ConfigError as exc:
        if "holds neighbour lists" in str(exc):
            return True
        raise
    return False


def _features(path: Path, rows: int) -> list[str]:
    with open_output(path) as opened:
        f, features = opened.file, opened.features
        n, dim = features.shape
        lines = [
            f"{path}: {n} images, {dim}-dim {features.dtype}, layout {f.attrs.get('layout', '?')}"
        ]
        if not f.attrs.get("complete", True):
            lines.append("INCOMPLETE: written by an interrupted run; rerun it with --resume")
        lines += _inputs(f)
        if "reduce" in f:
            lines += _reduction(f["reduce"], n)
        lines.append("configuration:")
        lines += [f"  {line}" for line in str(f.attrs.get("config", "")).splitlines()]
        for key in _RECORDED:
            if key in f.attrs:
                lines.append(f"{key}: {_shown(f.attrs[key])}")
        lines += _failures(f["failed"])
        paths = f["paths"].asstr(errors="replace")
        tiles = f["tiles"][:] if "tiles" in f else np.zeros(n, np.int32)
        if n:
            lines.append(f"tiled: {int(np.count_nonzero(tiles))} of {n} images (over max_memory)")
        for i in range(min(rows, n)):
            head = ", ".join(f"{v:.4g}" for v in features[i][:4])
            size = tuple(int(v) for v in f["image_size"][i])
            fmap = tuple(int(v) for v in f["feature_map_size"][i])
            tiled = f"  tiles {int(tiles[i])}" if tiles[i] else ""
            lines.append(
                f"row {i}: {printable(paths[i])}  size {size}  map {fmap}{tiled}  [{head}, ...]"
            )
    return lines


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, np.bool_ | bool) else str(value)


def _inputs(f: h5py.File) -> list[str]:
    """The input roots and how many rows came from each."""
    if "roots" not in f:
        return []
    roots = f["roots"].asstr(errors="replace")[:]
    counts = np.bincount(f["root"][:].clip(-1) + 1, minlength=len(roots) + 1)
    lines = ["inputs (rows from each; a row's file is its root joined with its path, or its URL):"]
    lines += [f"  {printable(r)}  ({c} rows)" for r, c in zip(roots, counts[1:], strict=True)]
    if counts[0]:
        lines.append(f"  (unknown root: {counts[0]} rows)")
    return lines


def _reduction(group: h5py.Group, rows: int) -> list[str]:
    """What `reduce` did: method, settings, kept variance, the sample and the source."""
    a = dict(group.attrs)
    whiten = bool(a.get("whiten", False))
    steps = [f"power {a['power']:g}" if a.get("power") is not None else "", "PCA"]
    steps[1] = "PCA-whitening" if whiten else "PCA"
    l2 = "L2 before and after" if a.get("l2") else "no L2"
    dim, source_dim = int(a.get("dim", 0)), int(a.get("source_dim", 0))
    lines = ["reduction:", f"  method: {', '.join(s for s in steps if s)}, {l2}"]
    asked = int(a.get("requested_dim", dim))
    capped = (
        f" (asked {asked}; the sample's numerical rank is {int(a['rank'])})" if asked > dim else ""
    )
    lines.append(f"  dim: {dim} of {source_dim}{capped}")
    total = float(a.get("total_variance", 0.0))
    if "explained_variance" in group and total > 0:
        share = float(np.sum(group["explained_variance"][:], dtype=np.float64)) / total
        lines.append(f"  explained variance: {share:.1%} of the sample's")
    non_finite = int(a.get("sample_non_finite", 0))
    left = f"; {non_finite} rows not finite, left out" if non_finite else ""
    lines.append(
        f"  fitted on: {int(a.get('sample_rows', 0))} of {int(a.get('source_rows', rows))} rows "
        f"of {printable(str(a.get('source_file', '?')))} (seed {a.get('seed', '?')}{left})"
    )
    if "source_config_sha256" in a:
        lines.append(f"  source config sha256: {a['source_config_sha256']}")
    lines.append(f"  order: {a.get('order', '?')}")
    return lines


def _failures(failed: h5py.Group) -> list[str]:
    count = failed["paths"].shape[0]
    classes = Counter(failed["error_class"].asstr(errors="replace")[:])
    by_class = ", ".join(f"{k} {v}" for k, v in sorted(classes.items()))
    lines = [f"failures: {count}" + (f" ({by_class})" if count else "")]
    shown = min(count, SHOWN_FAILURES)
    for p, k, e in zip(
        failed["paths"].asstr(errors="replace")[:shown],
        failed["error_class"].asstr(errors="replace")[:shown],
        failed["errors"].asstr(errors="replace")[:shown],
        strict=True,
    ):
        lines.append(f"  {printable(p)}: {k}: {printable(e)}")
    if count > shown:
        lines.append(f"  ... and {count - shown} more (read_features(path).failed_paths has all)")
    return lines


def _neighbors(path: Path, rows: int) -> list[str]:
    try:
        with h5py.File(path, "r", locking=False) as f:
            index, similarity = f["neighbors/index"], f["neighbors/similarity"]
            n, k = index.shape
            if similarity.shape != (n, k) or f["paths"].shape != (n,):
                raise ValueError("shapes differ")
            excluded = f["neighbors/excluded"][:] if "neighbors/excluded" in f else []
            attrs = dict(f.attrs)
            nearest = similarity[:, 0] if k else np.zeros(0, np.float32)
            kept = np.ones(n, bool)
            kept[np.asarray(excluded, np.int64)] = False
            lines = [
                f"{path}: neighbour lists of {n} rows of "
                f"{printable(str(attrs.get('source_file', '?')))}, k = {k}, "
                f"{attrs.get('metric', 'cosine')} similarity"
            ]
            if "against_file" in attrs:
                lines.append(
                    f"against: {printable(str(attrs['against_file']))} "
                    f"({attrs.get('against_rows', '?')} rows)"
                )
            if "index" in attrs:
                how = f"search: {attrs['index']} ({attrs.get('engine', '?')}"
                how += f" {attrs['index_type']})" if "index_type" in attrs else ")"
                if "recall_at_k" in attrs:
                    how += (
                        f", recall@{k} {float(attrs['recall_at_k']):.4f} measured on "
                        f"{attrs.get('recall_queries', '?')} queries"
                    )
                lines.append(how)
            if len(excluded):
                lines.append(f"excluded: {len(excluded)} rows (not finite): in no list")
            if kept.any():
                near, every = nearest[kept], similarity[:][kept]
                lines.append(
                    f"nearest neighbour: min {near.min():.4f}, median {np.median(near):.4f}, "
                    f"max {near.max():.4f}; all {k} neighbours: min {every.min():.4f}, "
                    f"max {every.max():.4f}"
                )
                lines.append("nearest-neighbour similarity of each row:")
                lines += histogram(near)
            for key in ("ties", "spp_extract_version"):
                if key in attrs:
                    lines.append(f"{key}: {attrs[key]}")
            shown = min(rows, n)
            if shown:
                found = Neighbors(index[:shown], similarity[:shown], np.asarray(excluded))
                text = io.StringIO()
                names = PathNames(f)
                other = PathNames(f["against"]) if "against" in f else names
                write_lists(text, found, names, other)
                lines += ["first rows:"] + [f"  {line}" for line in text.getvalue().splitlines()]
    except (KeyError, ValueError, TypeError, OSError) as exc:
        raise ConfigError(
            f"'{path}' is not a well-formed spp-extract neighbors file ({printable(str(exc))})"
        ) from None
    return lines
