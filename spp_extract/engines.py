"""The search engines behind ``neighbors``: FAISS's exact inner-product index (``IndexFlatIP``)
with spp-extract's tie order restored, FAISS's HNSW graph for millions of rows with its recall
measured on a sample, and the saved-index file that lets a collection be searched again
without rebuilding. FAISS is the optional extra ``spp-extract[faiss]``; without it, exact search
runs on torch (``exact.py``), slower."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from . import __version__
from .errors import ConfigError
from .storage import FORMAT_VERSION

INDEX_KINDS = ("exact", "approx", "auto")
INDEX_FILE_KIND = "neighbors-index"  # the kind attribute of a --save-index file
HNSW_M = 32  # graph degree: FAISS's usual choice for 0.95-0.99 recall
HNSW_EF_CONSTRUCTION = 64
HNSW_EF_SEARCH = 128  # at least 2 k; measured recall@10 >= 0.98 at 1M x 256 (benchmarks/)
AUTO_EXACT_ROWS = 200_000  # auto: exact up to here (about 3 minutes on 2 cores at 256 dims)
RECALL_SAMPLE = 1000  # queries whose approximate lists are checked against exact search
QUERY_BLOCK = 16384  # queries searched at a time: bounds the result arrays, not the index
INSTALL = 'pip install "spp-extract[faiss]"'


def faiss_module(why: str) -> Any:
    """``import faiss``, or one line saying how to install it."""
    try:
        import faiss
    except ImportError:
        raise ConfigError(f"{why} needs FAISS, which is not installed; {INSTALL}") from None
    return faiss


def have_faiss() -> bool:
    try:
        import faiss  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass
class Database:
    """The finite rows of a file, L2-normalised, as one float32 array (row-major), with the
    file row each one is."""

    vectors: np.ndarray  # (m, d) float32, C-contiguous
    rows: np.ndarray  # (m,) int64, ascending: file row of each vector


@dataclass
class Built:
    """A FAISS index over a Database, and how it was made."""

    index: Any
    rows: np.ndarray  # file row of each index position
    kind: str  # "exact" or "approx"
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0  # building (or loading) it


def build(db: Database, kind: str) -> Built:
    """``exact``: ``IndexFlatIP``; ``approx``: ``IndexHNSWFlat`` (inner product, M = 32)."""
    faiss = faiss_module("approximate search" if kind == "approx" else "a saved index")
    start = time.perf_counter()
    d = db.vectors.shape[1]
    if kind == "exact":
        index, settings = faiss.IndexFlatIP(d), {"index_type": "IndexFlatIP"}
    else:
        index = faiss.IndexHNSWFlat(d, HNSW_M, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        settings = {
            "index_type": "IndexHNSWFlat",
            "hnsw_m": HNSW_M,
            "hnsw_ef_construction": HNSW_EF_CONSTRUCTION,
        }
    index.add(db.vectors)
    return Built(index, db.rows, kind, settings, time.perf_counter() - start)


def search(
    built: Built,
    queries: np.ndarray,
    query_rows: np.ndarray | None,
    k: int,
    block: int = QUERY_BLOCK,
    done: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` of each query (float32 (q, d), normalised) in ``built``; ``query_rows``: the
    queries' own file rows when they are rows of the same file (a row is never its own
    neighbour), else None. Returns (file rows (q, k) int64, -1 where fewer exist;
    similarities (q, k) float32, descending, equal ones by lower row; ``cut`` (q,) bool:
    rows whose k-th similarity equals the next one's, so that a tied row FAISS did not return
    might belong in the list (exact search redoes those)). ``block``: queries searched at a
    time; ``done(count)`` after each."""
    extra = 1 if query_rows is not None else 0
    want = k + extra + 1  # one more than kept: shows a tie across the cut
    if built.kind == "approx":
        built.index.hnsw.efSearch = max(HNSW_EF_SEARCH, 2 * want)
    rows = np.empty((len(queries), k), np.int64)
    sims = np.empty((len(queries), k), np.float32)
    cut = np.zeros(len(queries), bool)
    for start in range(0, len(queries), block):
        stop = min(start + block, len(queries))
        own = None if query_rows is None else query_rows[start:stop]
        s, i = built.index.search(queries[start:stop], want)
        rows[start:stop], sims[start:stop], cut[start:stop] = _ordered(built.rows, s, i, own, k)
        if done is not None:
            done(stop)
    return rows, sims, cut


def _ordered(
    positions_rows: np.ndarray,
    s: np.ndarray,
    i: np.ndarray,
    own: np.ndarray | None,
    k: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FAISS's (similarity, position) lists -> file rows without the query itself, in the
    documented order (similarity descending, lower row first), cut to ``k``."""
    rows = np.where(i >= 0, positions_rows[np.maximum(i, 0)], -1)
    s = np.where(i >= 0, s, -np.inf).astype(np.float32)
    if own is not None:  # drop the query's own row, or else the last column
        mine = rows == own[:, None]
        drop = np.where(mine.any(1), mine.argmax(1), rows.shape[1] - 1)
        keep = np.ones(rows.shape, bool)
        keep[np.arange(len(rows)), drop] = False
        rows = rows[keep].reshape(len(rows), -1)
        s = s[keep].reshape(len(s), -1)
    # FAISS breaks ties arbitrarily: (similarity descending, row ascending; -1 last)
    order = np.lexsort((np.where(rows >= 0, rows, np.iinfo(np.int64).max), -s), axis=1)
    rows = np.take_along_axis(rows, order, 1)
    s = np.take_along_axis(s, order, 1)
    cut = (s[:, k - 1] == s[:, k]) & (rows[:, k] >= 0) if s.shape[1] > k else np.zeros(len(s), bool)
    rows, s = rows[:, :k], s[:, :k]
    s[rows < 0] = 0.0
    return rows, s, cut


def recall_at_k(found: np.ndarray, exact: np.ndarray) -> float:
    """Mean over queries of |found ∩ exact| / k (rows -1 never count)."""
    k = exact.shape[1]
    hits = [
        len(set(a[a >= 0].tolist()) & set(b[b >= 0].tolist()))
        for a, b in zip(found, exact, strict=True)
    ]
    return float(np.mean(hits)) / k if hits else 1.0


def sample_queries(n: int, sample: int = RECALL_SAMPLE, seed: int = 0) -> np.ndarray:
    """Which of ``n`` queries to check: all up to ``sample``, else a seeded random choice."""
    if n <= sample:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, sample, replace=False))


# -- saved indexes ------------------------------------------------------------------------------


def collection_id(f: h5py.File) -> str:
    """What a saved index must match: the collection's rows (paths in order) and the
    vectors' configuration."""
    digest = hashlib.sha256()
    paths = f["paths"]
    for start in range(0, len(paths), 65536):
        for p in paths.asstr(errors="surrogateescape")[start : start + 65536]:
            digest.update(p.encode("utf-8", "surrogateescape") + b"\0")
    digest.update(str(f.attrs.get("config", "")).encode("utf-8", "surrogatepass"))
    digest.update(str(f["features"].shape).encode())
    if "reduce" in f:
        for name in sorted(f["reduce"]):
            digest.update(f["reduce"][name][:].tobytes())
    return digest.hexdigest()


def save_index(built: Built, path: Path, source: Path, source_id: str, rows: int) -> None:
    """An HDF5 file holding the serialised FAISS index, its positions' file rows, and what
    it was built from."""
    faiss = faiss_module("--save-index")
    data = faiss.serialize_index(built.index)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as out:
            out.create_dataset("faiss", data=data)
            out.create_dataset("rows", data=built.rows)
            out.attrs.update(
                kind=INDEX_FILE_KIND,
                format_version=FORMAT_VERSION,
                spp_extract_version=__version__,
                faiss_version=faiss.__version__,
                index=built.kind,
                source_file=source.name,
                source_rows=rows,
                source_id=source_id,
                **built.settings,
            )
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_index(path: Path, source: Path, source_id: str) -> Built:
    """A ``--save-index`` file, refused unless it was built from ``source`` as it is now."""
    faiss = faiss_module("--index-file")
    start = time.perf_counter()
    try:
        with h5py.File(path, "r", locking=False) as f:
            if f.attrs.get("kind") != INDEX_FILE_KIND:
                raise ConfigError(
                    f"'{path}' is not an index spp-extract saved; make one with --save-index"
                )
            attrs = dict(f.attrs)
            data, rows = f["faiss"][:], f["rows"][:].astype(np.int64)
    except OSError as exc:
        raise ConfigError(f"cannot read index file '{path}': {exc}") from None
    if attrs.get("source_id") != source_id:
        raise ConfigError(
            f"'{path}' was built from {attrs.get('source_file')!r} as it was then, not from "
            f"'{source}' as it is now (rows, paths or configuration differ); rebuild it with "
            "--save-index"
        )
    index = faiss.deserialize_index(data)
    settings = {k: attrs[k] for k in ("index_type", "hnsw_m", "hnsw_ef_construction") if k in attrs}
    kind = str(attrs.get("index", "exact"))
    return Built(index, rows, kind, settings, time.perf_counter() - start)
