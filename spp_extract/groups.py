"""Near-duplicate groups: rows joined by neighbour links of similarity >= threshold, each
group with a representative (the largest image, ties by path) — what a user keeps when
cleaning a collection."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from typing import IO

import numpy as np

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
    ties by path."""
    f = opened.file
    paths = f["paths"]
    groups = []
    for members in connected(opened.rows, a, b):
        sizes = f["image_size"][members] if "image_size" in f else np.ones((len(members), 2))
        pixels = sizes[:, 0].astype(np.int64) * sizes[:, 1]
        names = paths.asstr(errors="replace")[members]
        rep = members[min(range(len(members)), key=lambda i: (-pixels[i], names[i]))]
        vectors = {}
        for at, block in opened.read_rows(members, 4096):
            for i, v in zip(at.tolist(), block, strict=True):
                vectors[int(members[i])] = v
        x = l2_normalize(_tensor(np.stack([vectors[int(m)] for m in members])))
        sims = (x @ x[list(members).index(rep)]).numpy()
        order = sorted(range(len(members)), key=lambda i: (members[i] != rep, -sims[i], names[i]))
        groups.append(Group(members[order], np.clip(sims[order], -1, 1).astype(np.float32)))
    groups.sort(key=lambda g: (-len(g.members), str(paths.asstr(errors="replace")[g.members[0]])))
    return groups


def _tensor(x: np.ndarray):  # noqa: ANN202
    import torch

    return torch.from_numpy(x.astype(np.float32))


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
