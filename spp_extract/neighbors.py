"""Cosine nearest neighbours of the rows of an spp-extract file, among its own rows or
against a collection of comparable vectors, and what is made of them: near-duplicate pairs,
groups, a page, a neighbors file. The search itself: FAISS (``engines``) when installed,
exact or approximate with measured recall; torch in blocks (``exact``) otherwise. Rows are
L2-normalised; rows that are not finite are left out."""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import Tensor

from . import __version__, engines
from .errors import ConfigError
from .exact import block_step, k_check, topk_cosine, torch_search
from .listing import PathNames, write_pairs
from .outputs import OutputFile, open_output
from .pca import l2_normalize
from .provenance import Provenance
from .records import Neighbors, Progress
from .storage import FORMAT_VERSION, check_destinations, written_together

NEIGHBORS_KIND = "neighbors"  # the kind attribute of the files `neighbors -o` writes


def neighbors(
    path: str | os.PathLike[str],
    k: int,
    *,
    against: str | os.PathLike[str] | None = None,
    index: str = "auto",
    use_faiss: bool | None = None,
    index_file: str | os.PathLike[str] | None = None,
    save_index: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    block_rows: int | None = None,
    memory_bytes: int = 2 << 30,
    progress: Progress | None = None,
) -> Neighbors:
    """Cosine top-``k`` of every row of an spp-extract file among its other rows, or, with
    ``against``, among the rows of another file (a collection) whose vectors are comparable.

    ``index``: ``exact`` (FAISS's flat index when FAISS is installed and the rows fit
    ``memory_bytes``, else torch in blocks: a few blocks of ``block_rows`` in memory, default
    about 256 MiB of float32 and at most 4,096 rows, plus the database when it fits
    ``memory_bytes``), ``approx`` (FAISS HNSW; recall@k measured against exact search on a
    sample of queries and returned) or ``auto`` (exact up to ``engines.AUTO_EXACT_ROWS``
    rows, approx beyond when FAISS is installed). ``use_faiss``: None (when installed),
    False (torch only). ``index_file``: a collection's index saved earlier with
    ``save_index`` (refused unless it was built from that collection as it is now). Rows are
    L2-normalised (a zero row has similarity 0 with everything); rows that are not finite are
    in no list and have none."""
    with contextlib.ExitStack() as stack:
        opened = stack.enter_context(open_output(path))
        collection = stack.enter_context(open_output(against)) if against is not None else None
        return search(
            opened,
            k,
            collection=collection,
            index=index,
            use_faiss=use_faiss,
            index_file=Path(index_file) if index_file is not None else None,
            save_index=Path(save_index) if save_index is not None else None,
            device=device,
            block_rows=block_rows,
            memory_bytes=memory_bytes,
            progress=progress,
        )


def search(
    opened: OutputFile,
    k: int,
    *,
    collection: OutputFile | None = None,
    index: str = "auto",
    use_faiss: bool | None = None,
    index_file: Path | None = None,
    save_index: Path | None = None,
    device: str | torch.device | None = None,
    block_rows: int | None = None,
    memory_bytes: int = 2 << 30,
    progress: Progress | None = None,
) -> Neighbors:
    """``neighbors`` of an open file (and collection)."""
    if index not in engines.INDEX_KINDS:
        raise ConfigError(
            f"index {index!r} is invalid; expected one of: {', '.join(engines.INDEX_KINDS)}"
        )
    if collection is not None:
        check_comparable(opened, collection)
    base = collection if collection is not None else opened
    if use_faiss is None:
        use_faiss = engines.have_faiss() or index_file is not None or save_index is not None
    elif use_faiss:
        engines.faiss_module("use_faiss")
    n, d = base.rows, base.dim
    fits = n * d * 4 <= memory_bytes
    method = _method(index, n, use_faiss, index_file)
    if method == "approx":
        engines.faiss_module("approximate search (--index approx)")
        _check_memory(n, d, base.path)
    if (index_file or save_index) and not fits and method == "exact":
        raise ConfigError(
            f"{base.path.name}'s {n} x {d} vectors need {n * d * 4 / 2**30:.1f} GiB for an "
            "index, over the memory allowed; reduce them first (spp-extract reduce --dim 256)"
        )
    if use_faiss and (fits or method == "approx" or index_file is not None):
        return _faiss_search(
            opened, collection, k, method, index_file, save_index, device, block_rows, progress
        )
    return torch_search(opened, collection, k, device, block_rows, memory_bytes, progress)


def _method(index: str, rows: int, use_faiss: bool, index_file: Path | None) -> str:
    if index_file is not None:
        return "saved"
    if index == "auto":
        return "approx" if use_faiss and rows > engines.AUTO_EXACT_ROWS else "exact"
    return index


def _check_memory(n: int, d: int, path: Path) -> None:
    from .memory import available_bytes

    need = n * (d * 4 + engines.HNSW_M * 2 * 4 + 64)  # vectors, graph links, levels
    if need > available_bytes():
        raise ConfigError(
            f"an approximate index of {path.name}'s {n} x {d} vectors needs about "
            f"{need / 2**30:.1f} GiB, more than is available; reduce them first "
            "(spp-extract reduce --dim 256)"
        )


def load_database(
    opened: OutputFile, block_rows: int | None = None, progress: Progress | None = None
) -> engines.Database:
    """Every finite row of ``opened``, L2-normalised, in one float32 array (one pass)."""
    n, d = opened.rows, opened.dim
    step = block_step(opened, block_rows)
    vectors = np.empty((n, d), np.float32)
    rows = np.empty(n, np.int64)
    filled = 0
    with torch.inference_mode():
        for start in range(0, n, step):
            block = opened.read(start, start + step)
            finite = np.isfinite(block).all(axis=1)
            picked = np.flatnonzero(finite)
            x = l2_normalize(torch.from_numpy(np.ascontiguousarray(block[finite])).float())
            vectors[filled : filled + len(picked)] = x.numpy()
            rows[filled : filled + len(picked)] = picked + start
            filled += len(picked)
            if progress is not None:
                progress(min(start + step, n), n)
    if filled < n:  # rows left out: a compact copy (rare; they are failures)
        vectors, rows = vectors[:filled].copy(), rows[:filled].copy()
    return engines.Database(vectors, rows)


def _blocks_of(db: engines.Database, step: int) -> Iterator[tuple[int, Tensor, None]]:
    for start in range(0, len(db.rows), step):
        yield start, torch.from_numpy(db.vectors[start : start + step]), None


def _faiss_search(
    opened: OutputFile,
    collection: OutputFile | None,
    k: int,
    method: str,
    index_file: Path | None,
    save_index: Path | None,
    device: str | torch.device | None,
    block_rows: int | None,
    progress: Progress | None,
) -> Neighbors:
    base = collection if collection is not None else opened
    db = load_database(base, block_rows)
    same = collection is None
    k_check(k, len(db.rows), base.rows, base.path, same)
    queries = db if same else load_database(opened, block_rows)
    saved = index_file is not None or save_index is not None
    source_id = engines.collection_id(base.file) if saved else ""  # reads every path: once
    if index_file is not None:
        built = engines.load_index(index_file, base.path, source_id)
    else:
        built = engines.build(db, method)
    if save_index is not None:
        engines.save_index(built, save_index, base.path, source_id, base.rows)
    started = time.perf_counter()
    positions = np.arange(len(db.rows)) if same else None
    step = block_step(base, block_rows)

    def done(count: int) -> None:
        if progress is not None:
            at = int(queries.rows[count]) if count < len(queries.rows) else opened.rows
            progress(at, opened.rows)

    rows, sims, cut = engines.search(
        built,
        queries.vectors,
        db.rows if same else None,
        k,
        block_rows or engines.QUERY_BLOCK,
        done,
    )
    with torch.inference_mode():
        if built.kind == "exact" and cut.any():  # a tie across the cut: redo those exactly
            redo = np.flatnonzero(cut)
            own = torch.from_numpy(positions[redo]) if positions is not None else None
            at, s = topk_cosine(
                torch.from_numpy(queries.vectors[redo]), own, _blocks_of(db, step), k
            )
            rows[redo], sims[redo] = db.rows[at.numpy()], s.numpy()
        recall, sample = None, 0
        if built.kind == "approx":
            picked = engines.sample_queries(len(queries.rows))
            own = torch.from_numpy(positions[picked]) if positions is not None else None
            at, _ = topk_cosine(
                torch.from_numpy(queries.vectors[picked]), own, _blocks_of(db, step), k
            )
            recall, sample = engines.recall_at_k(rows[picked], db.rows[at.numpy()]), len(picked)
    seconds = time.perf_counter() - started
    found = _full(opened, queries.rows, rows, sims)
    found.method, found.engine, found.settings = built.kind, "faiss", dict(built.settings)
    found.recall, found.recall_queries = recall, sample
    found.build_seconds, found.search_seconds = built.seconds, seconds
    return found


def _full(
    opened: OutputFile, query_rows: np.ndarray, rows: np.ndarray, sims: np.ndarray
) -> Neighbors:
    """Lists of the finite query rows -> lists for every row of the file (-1 and 0 for the
    rows left out)."""
    n, k = opened.rows, rows.shape[1]
    index = np.full((n, k), -1, np.int64)
    similarity = np.zeros((n, k), np.float32)
    index[query_rows], similarity[query_rows] = rows, sims
    excluded = np.setdiff1d(np.arange(n), query_rows)
    paths = opened.file["paths"].asstr(errors="replace")
    return Neighbors(index, similarity, excluded, list(paths[excluded]) if len(excluded) else [])


def check_comparable(queries: OutputFile, collection: OutputFile) -> None:
    """Refuse (one line, each difference) two files whose vectors cannot be compared: made by
    another model, layer, levels, pooling, weights or seed, or reduced otherwise."""
    a = Provenance.of_attrs(queries.attrs).projection_values()
    b = Provenance.of_attrs(collection.attrs).projection_values()
    diff = [
        f"{key}: {a.get(key)!r} vs {b.get(key)!r}"
        for key in {**a, **b}
        if a.get(key) != b.get(key) and key != "feature_dim"
    ]
    ra, rb = _reduction(queries.file), _reduction(collection.file)
    if ra != rb:
        diff.append(
            "reduction: "
            + ("none" if ra is None else "a projection")
            + " vs "
            + ("none" if rb is None else "another projection" if ra else "a projection")
        )
    if not diff and queries.dim != collection.dim:
        diff.append(f"dimension: {queries.dim} vs {collection.dim}")
    if diff:
        raise ConfigError(
            f"the vectors of {queries.path.name} and {collection.path.name} are not comparable ("
            + "; ".join(diff)
            + "); extract both with the same settings (and --project the same reduce output)"
        )


def _reduction(f: h5py.File) -> str | None:
    """What a file's vectors were projected with: a digest of its ``reduce/`` group."""
    if "reduce" not in f:
        return None
    group = f["reduce"]
    digest = hashlib.sha256()
    for name in sorted(group):
        digest.update(name.encode() + group[name][:].tobytes())
    for key in ("power", "l2", "whiten"):
        digest.update(f"{key}={group.attrs.get(key)!r}".encode())
    return digest.hexdigest()


def pairs_above(found: Neighbors, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unordered pairs (i < j) where one row has the other among its k neighbours with
    similarity >= ``threshold``, each once, sorted by (i, j); the similarity is the one seen
    from row i when i lists j (else from j). Returns (i, j, similarity)."""
    n, k = found.index.shape
    a = np.repeat(np.arange(n, dtype=np.int64), k)
    b = found.index.ravel()
    s = found.similarity.ravel()
    keep = (s >= threshold) & (b >= 0)  # -1: a row left out has no list
    a, b, s = a[keep], b[keep], s[keep]
    lo, hi = np.minimum(a, b), np.maximum(a, b)
    order = np.lexsort((a != lo, hi, lo))  # by (lo, hi), the lower row's own view first
    lo, hi, s = lo[order], hi[order], s[order]
    first = np.ones(len(lo), bool)
    first[1:] = (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])
    return lo[first], hi[first], s[first]


def pairs_across(found: Neighbors, threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query row, collection row, similarity) for each listed neighbour >= ``threshold``,
    by query row, then rank."""
    n, k = found.index.shape
    a = np.repeat(np.arange(n, dtype=np.int64), k)
    b, s = found.index.ravel(), found.similarity.ravel()
    keep = (s >= threshold) & (b >= 0)
    return a[keep], b[keep], s[keep]


def find_neighbors(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str] | None,
    k: int,
    *,
    against: str | os.PathLike[str] | None = None,
    pairs: str | os.PathLike[str] | None = None,
    groups: str | os.PathLike[str] | None = None,
    html: str | os.PathLike[str] | None = None,
    threshold: float = 0.95,
    absolute: bool = False,
    overwrite: bool = False,
    index: str = "auto",
    use_faiss: bool | None = None,
    index_file: str | os.PathLike[str] | None = None,
    save_index: str | os.PathLike[str] | None = None,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> Neighbors:
    """``neighbors`` of ``source`` (among its rows, or ``against`` a collection) written to
    ``dest`` (``neighbors/index``, ``neighbors/similarity``, the source's ``paths``,
    ``path_bytes`` and input roots; with ``against``, the collection's under ``against/``),
    and: ``pairs``, the pairs at or above ``threshold`` as CSV ``path_a,path_b,similarity``;
    ``groups``, the groups those pairs link (``groups.write_groups``); ``html``, a page of
    the groups (or of each query's neighbours with ``against``). Paths with ``absolute``:
    joined with their input root. All are written, or none."""
    source = Path(source)
    if not (math.isfinite(threshold) and -1 <= threshold <= 1):
        raise ConfigError(f"threshold {threshold} is invalid; expected a cosine from -1 to 1")
    if against is not None and groups is not None:
        raise ConfigError(
            "--groups groups the rows of one file; run it on the collection (or on a file "
            "merged from both), without --against"
        )
    with contextlib.ExitStack() as stack:
        opened = stack.enter_context(open_output(source))
        collection = stack.enter_context(open_output(against)) if against is not None else None
        outputs = [Path(out) for out in (dest, pairs, groups, html) if out is not None]
        if save_index is not None:
            outputs.append(Path(save_index))
        folders = opened.folders + (collection.folders if collection is not None else [])
        inputs = [source] + ([Path(against)] if against is not None else [])
        check_destinations(outputs, inputs, overwrite=overwrite, folders=folders)
        if save_index is not None:
            outputs.pop()  # written by the search itself
        found = search(
            opened,
            k,
            collection=collection,
            index=index,
            use_faiss=use_faiss,
            index_file=Path(index_file) if index_file is not None else None,
            save_index=Path(save_index) if save_index is not None else None,
            device=device,
            progress=progress,
        )
        base = collection if collection is not None else opened
        names = PathNames(opened.file, absolute)
        other = PathNames(base.file, absolute)
        if collection is None:
            linked = pairs_above(found, threshold)
        else:
            linked = pairs_across(found, threshold)
        found_groups = None
        if groups is not None or (html is not None and collection is None):
            from .groups import find_groups

            found_groups = find_groups(opened, linked[0], linked[1])
        advice = "nothing was written; free space or choose another destination, then run again"
        with written_together(outputs, advice) as files:
            at = iter(files)
            if dest is not None:
                with h5py.File(next(at), "w") as out:
                    _write_result(out, found, opened, source, collection)
            if pairs is not None:
                with io.TextIOWrapper(next(at), encoding="utf-8", newline="") as text:
                    write_pairs(text, linked, names, other)
            if groups is not None:
                from .groups import write_groups

                with io.TextIOWrapper(next(at), encoding="utf-8", newline="") as text:
                    write_groups(text, found_groups or [], names, opened)
            if html is not None:
                from .report import write_report

                with io.TextIOWrapper(next(at), encoding="utf-8", newline="") as text:
                    write_report(text, found, found_groups, opened, base, threshold)
    found.groups = found_groups
    return found


def _write_result(
    out: h5py.File,
    found: Neighbors,
    opened: OutputFile,
    source: Path,
    collection: OutputFile | None = None,
) -> None:
    src = opened.file
    group = out.create_group("neighbors")
    group.create_dataset("index", data=found.index)
    group.create_dataset("similarity", data=found.similarity)
    group.create_dataset("excluded", data=found.excluded, dtype=np.int64)
    for name in ("paths", "path_bytes", "roots", "root_bytes", "root"):
        if name in src:
            src.copy(src[name], out, name=name)
    extra: dict[str, Any] = {}
    if collection is not None:
        target = out.create_group("against")
        for name in ("paths", "path_bytes", "roots", "root_bytes", "root"):
            if name in collection.file:
                collection.file.copy(collection.file[name], target, name=name)
        extra.update(against_file=collection.path.name, against_rows=collection.rows)
    if found.recall is not None:
        extra.update(recall_at_k=found.recall, recall_queries=found.recall_queries)
    out.attrs.update(
        kind=NEIGHBORS_KIND,
        format_version=FORMAT_VERSION,
        spp_extract_version=__version__,
        k=found.index.shape[1],
        metric="cosine",
        index=found.method,
        engine=found.engine,
        source_file=source.name,
        source_rows=len(found.index),
        ties="equal similarities: lower row first"
        if found.method == "exact"
        else "approximate (HNSW): equal similarities among those found, lower row first",
        config=str(src.attrs.get("config", "")),
        **{k: v for k, v in found.settings.items()},
        **extra,
    )
