"""Exact cosine top-k on torch, in blocks: query blocks are multiplied by database blocks and
a running top-k is kept, with exact, deterministic ties (equal similarities: lower row first).
What ``neighbors`` runs without FAISS, or when the rows do not fit in memory (then the
database is read again for each query block), and what checks FAISS's lists at a tie."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .devices import device_named
from .errors import ConfigError
from .outputs import OutputFile
from .pca import l2_normalize
from .reader import block_rows_for
from .records import Neighbors, Progress

_LOW = (1 << 32) - 1


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
    positions: Tensor | None,
    database: Iterator[tuple[int, Tensor, Tensor | None]],
    k: int,
) -> tuple[Tensor, Tensor]:
    """Top-``k`` database rows by dot product for each query row (all rows L2-normalised, so
    the dot is the cosine). ``queries``: Tensor[q, D]; ``positions``: each query's own row in
    the database (a row never matches itself), or None when the queries are not database
    rows; ``database``: (first row, Tensor[m, D], left out Tensor[m] bool or None) blocks;
    rows left out are never anyone's neighbour. Returns (index Tensor[q, k] int64,
    similarity Tensor[q, k] float32), similarity descending, equal similarities by lower row
    first."""
    q = queries.shape[0]
    best = torch.full(
        (q, k), torch.iinfo(torch.int64).min, dtype=torch.int64, device=queries.device
    )
    own = torch.arange(q, device=queries.device)
    for first, block, left_out in database:
        sim = queries @ block.T  # (q, m)
        if positions is not None:
            column = positions - first  # where each query's own row is in this block
            mine = (column >= 0) & (column < block.shape[0])
            sim[own[mine], column[mine]] = -math.inf
        if left_out is not None:
            sim[:, left_out] = -math.inf
        best = torch.cat([best, _block_topk(sim, first, k)], 1).topk(k, dim=1).values  # (q, k)
    return _unkey(best)


def k_check(k: int, usable: int, n: int, path: Path, same_file: bool) -> None:
    most = usable - 1 if same_file else usable
    if not 1 <= k <= most:
        not_finite = f" ({n - usable} of {n} rows are not finite)" if usable < n else ""
        raise ConfigError(
            f"k {k} is invalid for {path.name}: it has {usable} usable rows{not_finite}, so "
            f"each has at most {max(most, 0)} neighbours; choose k from 1 to {max(most, 0)}"
            if most >= 1
            else f"{path.name} has {usable} usable rows{not_finite}: nothing to compare"
        )


def block_step(opened: OutputFile, block_rows: int | None) -> int:
    return block_rows or min(4096, block_rows_for(opened.dim, 4))


def torch_search(
    opened: OutputFile,
    collection: OutputFile | None,
    k: int,
    device: str | torch.device | None,
    block_rows: int | None,
    memory_bytes: int,
    progress: Progress | None,
) -> Neighbors:
    """Exact search on torch: query blocks against database blocks, a running top-k."""
    target = device_named(device)
    base = collection if collection is not None else opened
    n, d = base.rows, base.dim
    step = block_step(base, block_rows)

    def reader(f: OutputFile) -> Any:
        def read(start: int) -> tuple[int, Tensor, Tensor]:
            block = f.read(start, start + step)
            left_out = ~np.isfinite(block).all(axis=1)
            x = torch.from_numpy(block).to(target).float()
            x[torch.from_numpy(left_out).to(target)] = 0.0
            return start, l2_normalize(x), torch.from_numpy(left_out).to(target)

        return read

    read = reader(base)
    starts = range(0, n, step)
    if n * d * 4 <= memory_bytes:
        cache = [read(s) for s in starts]
        left_out = [b[2].cpu().numpy() for b in cache]
    else:
        cache = None
        left_out = [~np.isfinite(base.read(s, s + step)).all(axis=1) for s in starts]
    usable = n - int(np.concatenate(left_out).sum()) if n else 0
    k_check(k, usable, n, base.path, collection is None)

    def database() -> Iterator[tuple[int, Tensor, Tensor]]:
        return iter(cache) if cache is not None else (read(s) for s in starts)

    queries = database() if collection is None else map(reader(opened), range(0, opened.rows, step))
    started = time.perf_counter()
    nq = opened.rows
    index = np.empty((nq, k), np.int64)
    similarity = np.empty((nq, k), np.float32)
    excluded = []
    with torch.inference_mode():
        for first, block, out in queries:
            own = None
            if collection is None:
                own = torch.arange(first, first + len(block), device=block.device)
            rows, sims = topk_cosine(block, own, database(), k)
            index[first : first + len(block)] = rows.cpu().numpy()
            similarity[first : first + len(block)] = sims.cpu().numpy()
            excluded.append(np.flatnonzero(out.cpu().numpy()) + first)
            if progress is not None:
                progress(first + len(block), nq)
    excluded_rows = np.concatenate(excluded) if excluded else np.zeros(0, np.int64)
    index[excluded_rows], similarity[excluded_rows] = -1, 0.0  # no list for those rows
    paths = opened.file["paths"].asstr(errors="replace")
    found = Neighbors(
        index,
        similarity,
        excluded_rows,
        list(paths[excluded_rows]) if len(excluded_rows) else [],
    )
    found.search_seconds = time.perf_counter() - started
    return found
