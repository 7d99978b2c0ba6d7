"""Near-duplicate groups: rows joined by neighbour links of similarity >= threshold, each
group with a representative (the largest image, ties by path) — what a user keeps when
cleaning a collection."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import IO

import numpy as np
import torch

from .listing import PathNames
from .outputs import OutputFile
from .pca import l2_normalize


@dataclass
class Group:
    members: np.ndarray  # file rows, representative first, then by similarity to it
    similarity: np.ndarray  # cosine of each member with the representative (1 for itself)


def connected(n: int, a: np.ndarray, b: np.ndarray) -> list[np.ndarray]:
    """Connected components of ``n`` nodes linked by edges (a[i], b[i]) that have 2 or more
    members, each as its sorted rows (union-find with path halving)."""
    parent = np.arange(n)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for x, y in zip(a.tolist(), b.tolist(), strict=True):
        rx, ry = root(x), root(y)
        if rx != ry:
            parent[max(rx, ry)] = min(rx, ry)
    labels = np.array([root(x) for x in range(n)]) if n else np.zeros(0, np.int64)
    order = np.argsort(labels, kind="stable")
    cuts = np.flatnonzero(np.diff(labels[order])) + 1
    return [c for c in np.split(order, cuts) if len(c) > 1]


def find_groups(opened: OutputFile, a: np.ndarray, b: np.ndarray) -> list[Group]:
    """Groups of ``opened``'s rows linked by the pairs (a, b); largest groups first (then by
    the representative's path). The representative is the member with the most pixels,
    ties by path. The grouped rows' sizes, paths and vectors are read once, together."""
    f = opened.file
    parts = connected(opened.rows, a, b)
    rows = np.sort(np.concatenate(parts)) if parts else np.zeros(0, np.int64)
    at = {int(r): i for i, r in enumerate(rows.tolist())}  # file row -> position in ``rows``
    sizes = f["image_size"][rows] if "image_size" in f else np.ones((len(rows), 2))
    pixels = sizes[:, 0].astype(np.int64) * sizes[:, 1]
    names = f["paths"].asstr(errors="replace")[rows] if len(rows) else []
    vectors = np.empty((len(rows), opened.dim), np.float32)
    for where, block in opened.read_rows(rows, 4096):
        vectors[where] = block
    with torch.inference_mode():
        x = l2_normalize(torch.from_numpy(vectors)).numpy()
    groups, keys = [], []
    for members in parts:
        pos = [at[int(m)] for m in members]
        rep = min(pos, key=lambda p: (-pixels[p], names[p]))
        sims = x[pos] @ x[rep]
        order = sorted(range(len(pos)), key=lambda i: (pos[i] != rep, -sims[i], names[pos[i]]))
        groups.append(Group(members[order], np.clip(sims[order], -1, 1).astype(np.float32)))
        keys.append((-len(members), names[rep]))
    return [g for _, g in sorted(zip(keys, groups, strict=True), key=lambda kg: kg[0])]


def write_groups(
    stream: IO[str], groups: list[Group], names: PathNames, opened: OutputFile
) -> None:
    """CSV: group,size,representative,path,similarity,width,height — one line per member,
    group 1 the largest; ``similarity``: cosine with the representative."""
    writer = csv.writer(stream, lineterminator="\r\n")
    writer.writerow(["group", "size", "representative", "path", "similarity", "width", "height"])
    sizes = opened.file["image_size"] if "image_size" in opened.file else None
    for number, group in enumerate(groups, 1):
        named = names(group.members)
        rep = named[int(group.members[0])]
        for row, sim in zip(group.members.tolist(), group.similarity.tolist(), strict=True):
            h, w = (int(v) for v in sizes[row]) if sizes is not None else ("", "")
            writer.writerow([number, len(group.members), rep, named[row], f"{sim:.6f}", w, h])
