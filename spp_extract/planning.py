"""Planning batches and shares from image sizes (read from headers, before decoding).

A window is a contiguous run of the sorted work list and becomes one shard; within a window,
images are grouped by size so that a batch holds identical sizes or, for padded batching,
sizes in the same 64-px bucket under a pixel budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

BUCKET = 64  # padded batching groups images whose sides round up to the same multiple of this


@dataclass
class Window:
    start: int  # indices into this rank's work list
    stop: int


@dataclass(frozen=True)
class Planned:
    """One batch: indices into the work list, all in one window (one shard)."""

    window: int
    indices: list[int]


class Planner:
    """Yields ``Planned`` batches, window by window.

    A window is a contiguous run of the sorted work list and becomes one shard; its size in
    pixels follows the measured speed (``learn``) so that a shard is committed about every
    ``commit_seconds`` however image sizes vary along the list. The first window is small
    (twice the batch size) so that the first commit comes soon. Within a window, images are
    grouped by size: identical sizes only (``padded=False``) or into 64-px buckets padded to
    their largest member (``padded=True``; with ``pad_pixels``, only the images up to that
    many pixels: larger ones batch with their own size).
    """

    def __init__(
        self,
        sizes: Sequence[tuple[int, int] | None],
        *,
        padded: bool,
        pad_pixels: int | None = None,
        batch_size: int,
        batch_pixels: int,
        commit_seconds: float,
    ) -> None:
        self.sizes = sizes
        self.padded = padded
        self.pad_pixels = pad_pixels  # padded: only images up to this size (None: all)
        self.batch_size = batch_size
        self.batch_pixels = batch_pixels
        self.commit_seconds = commit_seconds
        self.windows: list[Window] = []
        self._rate: float | None = None  # pixels per second, measured (``learn``)
        known = [h * w for s in sizes if s is not None for h, w in [s]]
        typical = int(np.median(known)) if known else 512 * 512
        self.pixels = [s[0] * s[1] if s is not None else typical for s in sizes]

    def learn(self, window: int, seconds: float) -> None:
        """``window`` took ``seconds``: later windows are sized by that speed."""
        self._rate = self.window_pixels(window) / max(seconds, 1e-3)

    def window_pixels(self, window: int) -> int:
        w = self.windows[window]
        return sum(self.pixels[w.start : w.stop])

    def _window_stop(self, start: int) -> int:
        """End of the window that starts at ``start``: at least one image, at most 100,000."""
        if self._rate is None:  # a first commit soon; then sized by the measured speed
            count, budget = 2 * self.batch_size, float("inf")
        else:
            count, budget = 100_000, self._rate * self.commit_seconds
        stop, total = start, 0
        limit = min(len(self.sizes), start + count)
        while stop < limit and (stop == start or total + self.pixels[stop] <= budget):
            total += self.pixels[stop]
            stop += 1
        return stop

    def _plan_window(self, start: int, stop: int) -> list[list[int]]:
        known = [i for i in range(start, stop) if self.sizes[i] is not None]
        unknown = [[i] for i in range(start, stop) if self.sizes[i] is None]

        def group(i: int) -> tuple[int, int, bool]:
            h, w = self.sizes[i]  # type: ignore[misc]
            if self.padded and (self.pad_pixels is None or h * w <= self.pad_pixels):
                return math.ceil(h / BUCKET), math.ceil(w / BUCKET), True
            return h, w, False

        known.sort(key=lambda i: (group(i), self.sizes[i], i))
        batches: list[list[int]] = []
        batch: list[int] = []
        height = width = 0
        for i in known:
            h, w = self.sizes[i]  # type: ignore[misc]
            nh, nw = max(height, h), max(width, w)
            fits = (
                batch
                and group(batch[0]) == group(i)
                and len(batch) < self.batch_size
                and (len(batch) + 1) * nh * nw <= self.batch_pixels
            )
            if batch and not fits:
                batches.append(batch)
                batch, nh, nw = [], h, w
            batch.append(i)
            height, width = nh, nw
        if batch:
            batches.append(batch)
        return batches + unknown

    def __iter__(self) -> Iterator[Planned]:
        start = 0
        while start < len(self.sizes):
            stop = self._window_stop(start)
            self.windows.append(Window(start, stop))
            window = len(self.windows) - 1
            for batch in self._plan_window(start, stop):
                yield Planned(window, batch)
            start = stop


def partition(sizes: Sequence[tuple[int, int] | None], parts: int) -> list[int]:
    """Cut points splitting the list into ``parts`` contiguous runs of about equal pixels."""
    known = [h * w for s in sizes if s is not None for h, w in [s]]
    typical = int(np.median(known)) if known else 1
    cumulative = np.cumsum([s[0] * s[1] if s is not None else typical for s in sizes])
    total = int(cumulative[-1]) if len(sizes) else 0
    cuts = (
        [0]
        + [
            int(np.searchsorted(cumulative, total * p / parts, side="left")) + 1
            for p in range(1, parts)
        ]
        + [len(sizes)]
    )
    cuts = [min(max(c, 0), len(sizes)) for c in cuts]
    return [max(cuts[: i + 1]) for i in range(len(cuts))]  # monotone
