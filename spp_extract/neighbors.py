"""Exact cosine nearest neighbours of the rows of an spp-extract file, and near-duplicate
pairs. Rows are L2-normalised; query blocks are multiplied by database blocks and a running
top-k is kept, with exact, deterministic ties; rows that are not finite are left out."""

from __future__ import annotations

import io
import math
import os
from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np
import torch
from torch import Tensor

from . import __version__
from .devices import device_named
from .errors import ConfigError
from .listing import PathNames, write_pairs
from .outputs import OutputFile, open_output
from .pca import l2_normalize
from .reader import block_rows_for
from .records import Neighbors, Progress
from .storage import FORMAT_VERSION, check_destinations, written_together

_LOW = (1 << 32) - 1
NEIGHBORS_KIND = "neighbors"  # the kind attribute of the files `neighbors -o` writes


def _keys(sim: Tensor, rows: Tensor) -> Tensor:
    """Similarities (Tensor[q, m] float32) of database ``rows`` (int64, broadcastable) ->
    int64 keys whose order is (similarity descending, row ascending): the float's
    order-preserving bits above, ``2^32 - 1 - row`` below. ``topk`` on the keys gives exact,
    deterministic ties."""
    bits = (sim + 0.0).view(torch.int32)  # + 0.0: -0.0 becomes 0.0, one value for zero
    ordered = torch.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(torch.int64)
    return (ordered << 32) | (_LOW - rows)


def _block_topk(sim: Tensor, first: int, k: int) -> Tensor:
    """Keys of the top-``k`` of one block (Tensor[q, m]; columns are rows ``first...``). A
    float ``topk`` first (cheap); rows where values equal to the k-th cross the cut (ties
    ``topk`` may break either way) are redone exactly on keys."""
    k = min(k, sim.shape[1])
    values, columns = sim.topk(k, dim=1)  # (q, k)
    keys = _keys(values, columns + first)
    crowded = ((sim >= values[:, -1:]).sum(1) > k).nonzero().flatten()
    if len(crowded):
        every = torch.arange(first, first + sim.shape[1], device=sim.device, dtype=torch.int64)
        keys[crowded] = _keys(sim[crowded], every).topk(k, dim=1).values
    return keys


def _unkey(keys: Tensor) -> tuple[Tensor, Tensor]:
    ordered = (keys >> 32).to(torch.int32)
    bits = torch.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    return _LOW - (keys & _LOW), bits.view(torch.float32)


def topk_cosine(
    queries: Tensor,
    first_query: int,
    database: Iterator[tuple[int, Tensor, Tensor]],
    k: int,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` database rows by dot product for each query row (all rows L2-normalised, so
    the dot is the cosine). ``queries``: Tensor[q, D], rows ``first_query...`` of the same
    database (a row never matches itself); ``database``: (first row, Tensor[m, D], left out
    Tensor[m] bool) blocks; rows left out are never anyone's neighbour. Returns (index
    Tensor[q, k] int64, similarity Tensor[q, k] float32), similarity descending, equal
    similarities by lower row first."""
    q = queries.shape[0]
    best = torch.full(
        (q, k), torch.iinfo(torch.int64).min, dtype=torch.int64, device=queries.device
    )
    own = torch.arange(q, device=queries.device)
    for first, block, left_out in database:
        sim = queries @ block.T  # (q, m)
        column = own + first_query - first  # where each query's own row is in this block
        mine = (column >= 0) & (column < block.shape[0])
        sim[own[mine], column[mine]] = -math.inf
        sim[:, left_out] = -math.inf
        best = torch.cat([best, _block_topk(sim, first, k)], 1).topk(k, dim=1).values  # (q, k)
    return _unkey(best)


def neighbors(
    path: str | os.PathLike[str],
    k: int,
    *,
    device: str | torch.device | None = None,
    block_rows: int | None = None,
    memory_bytes: int = 2 << 30,
    progress: Progress | None = None,
) -> Neighbors:
    """Exact cosine top-``k`` of every row of an spp-extract file among the other rows.

    Rows are L2-normalised; a zero row has similarity 0 with everything. Query blocks against
    database blocks with a running top-k: memory is a few blocks (``block_rows``, default
    about 256 MiB of float32 and at most 4,096 rows), plus the normalised database itself when
    it fits ``memory_bytes`` (otherwise it is read again for each query block)."""
    with open_output(path) as opened:
        return search(
            opened,
            k,
            device=device,
            block_rows=block_rows,
            memory_bytes=memory_bytes,
            progress=progress,
        )


def search(
    opened: OutputFile,
    k: int,
    *,
    device: str | torch.device | None = None,
    block_rows: int | None = None,
    memory_bytes: int = 2 << 30,
    progress: Progress | None = None,
) -> Neighbors:
    """``neighbors`` of an open file."""
    path, target = opened.path, device_named(device)
    n, d = opened.rows, opened.dim
    step = block_rows or min(4096, block_rows_for(d, 4))

    def read(start: int) -> tuple[int, Tensor, Tensor]:
        block = opened.read(start, start + step)
        left_out = ~np.isfinite(block).all(axis=1)
        x = torch.from_numpy(block).to(target).float()
        x[torch.from_numpy(left_out).to(target)] = 0.0
        return start, l2_normalize(x), torch.from_numpy(left_out).to(target)

    starts = range(0, n, step)
    if n * d * 4 <= memory_bytes:
        cache = [read(s) for s in starts]
        left_out = [b[2].cpu().numpy() for b in cache]
    else:
        cache = None
        left_out = [~np.isfinite(opened.read(s, s + step)).all(axis=1) for s in starts]
    excluded = np.flatnonzero(np.concatenate(left_out)) if n else np.zeros(0, np.int64)
    usable = n - len(excluded)
    if not 1 <= k <= usable - 1:
        not_finite = f" ({len(excluded)} of {n} rows are not finite)" if len(excluded) else ""
        raise ConfigError(
            f"k {k} is invalid for {path.name}: it has {usable} usable rows{not_finite}, so "
            f"each has at most {max(usable - 1, 0)} neighbours; choose k from 1 to "
            f"{max(usable - 1, 0)}"
            if usable > 1
            else f"{path.name} has {usable} usable rows{not_finite}: nothing to compare"
        )

    def database() -> Iterator[tuple[int, Tensor, Tensor]]:
        return iter(cache) if cache is not None else (read(s) for s in starts)

    index = np.empty((n, k), np.int64)
    similarity = np.empty((n, k), np.float32)
    with torch.inference_mode():
        for first, queries, _ in database():
            rows, sims = topk_cosine(queries, first, database(), k)
            index[first : first + len(queries)] = rows.cpu().numpy()
            similarity[first : first + len(queries)] = sims.cpu().numpy()
            if progress is not None:
                progress(first + len(queries), n)
    index[excluded], similarity[excluded] = -1, 0.0  # no list for a row that is not finite
    paths = opened.file["paths"].asstr(errors="replace")
    return Neighbors(index, similarity, excluded, list(paths[excluded]) if len(excluded) else [])


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


def find_neighbors(
    source: str | os.PathLike[str],
    dest: str | os.PathLike[str] | None,
    k: int,
    *,
    pairs: str | os.PathLike[str] | None = None,
    threshold: float = 0.95,
    absolute: bool = False,
    overwrite: bool = False,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
) -> Neighbors:
    """``neighbors`` of ``source`` written to ``dest`` (``neighbors/index``,
    ``neighbors/similarity``, the source's ``paths``, ``path_bytes`` and input roots) and,
    with ``pairs``, the near-duplicate pairs (``pairs_above(threshold)``) as CSV
    ``path_a,path_b,similarity`` (``absolute``: paths joined with their input root). Both are
    written, or neither."""
    source = Path(source)
    if not (math.isfinite(threshold) and -1 <= threshold <= 1):
        raise ConfigError(f"threshold {threshold} is invalid; expected a cosine from -1 to 1")
    with open_output(source) as opened:
        outputs = [Path(out) for out in (dest, pairs) if out is not None]
        check_destinations(outputs, [source], overwrite=overwrite, folders=opened.folders)
        found = search(opened, k, device=device, progress=progress)
        advice = "nothing was written; free space or choose another destination, then run again"
        with written_together(outputs, advice) as files:
            if dest is not None:
                with h5py.File(files[0], "w") as out:
                    _write_result(out, found, opened, source)
            if pairs is not None:
                names = PathNames(opened.file, absolute)
                with io.TextIOWrapper(files[-1], encoding="utf-8", newline="") as text:
                    write_pairs(text, pairs_above(found, threshold), names, names)
    return found


def _write_result(out: h5py.File, found: Neighbors, opened: OutputFile, source: Path) -> None:
    src = opened.file
    group = out.create_group("neighbors")
    group.create_dataset("index", data=found.index)
    group.create_dataset("similarity", data=found.similarity)
    group.create_dataset("excluded", data=found.excluded, dtype=np.int64)
    for name in ("paths", "path_bytes", "roots", "root_bytes", "root"):
        if name in src:
            src.copy(src[name], out, name=name)
    out.attrs.update(
        kind=NEIGHBORS_KIND,
        format_version=FORMAT_VERSION,
        spp_extract_version=__version__,
        k=found.index.shape[1],
        metric="cosine",
        source_file=source.name,
        source_rows=len(found.index),
        ties="equal similarities: lower row first",
        config=str(src.attrs.get("config", "")),
    )
