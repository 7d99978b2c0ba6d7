"""Plain records handed from stage to stage (no h5py, no torch beyond a tensor's values)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# progress(done, total), called as work is done (the CLI draws a bar with it)
Progress = Callable[[int, int], None]


@dataclass
class RowMeta:
    """What is stored beside one image's vector (or its failure)."""

    image_size: tuple[int, int] = (0, 0)
    input_size: tuple[int, int] = (0, 0)
    feature_map_size: tuple[int, int] = (0, 0)
    mode: str = ""
    truncated: bool = False
    file_size: int = -1
    mtime_ns: int = -1
    tiles: int = 0  # how many tiles the trunk ran on (0: the whole image at once)
    error_class: str = ""
    error: str = ""


@dataclass(frozen=True)
class Vector:
    """One image's result: its SPP vector and what the trunk made of the image."""

    values: Any  # Tensor[D] on the CPU, in the stored dtype
    feature_map_size: tuple[int, int]
    tiles: int = 0  # tiles the trunk ran on (0: the whole image at once)


@dataclass(frozen=True)
class Failure:
    """Why an image has no vector: a stable class (``out_of_memory``, ``too_large``,
    ``non_finite``, ...) and a message for people."""

    kind: str
    message: str


Outcome = Vector | Failure  # one per computed image


@dataclass
class Neighbors:
    """Each query row's k nearest rows (``neighbors``)."""

    index: np.ndarray  # (N, k) int64 row numbers; -1 for the rows left out
    similarity: np.ndarray  # (N, k) float32, descending; 0 for the rows left out
    # rows whose vectors are not finite: in no list, and with no list of their own
    excluded: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    excluded_paths: list[str] = field(default_factory=list)
    method: str = "exact"  # or "approx"
    engine: str = "torch"  # or "faiss"
    settings: dict[str, Any] = field(default_factory=dict)  # the index's (type, HNSW M, ...)
    recall: float | None = None  # approx: recall@k against exact search on a sample
    recall_queries: int = 0  # that sample's size
    build_seconds: float = 0.0
    search_seconds: float = 0.0
    groups: list[Any] | None = None  # find_neighbors with groups or html: groups.Group list
