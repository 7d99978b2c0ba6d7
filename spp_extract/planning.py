"""Planning batches and shares from image sizes (read from headers, before decoding).

A window is a contiguous run of the sorted work list and becomes one shard; within a window,
images are grouped by size so that a batch holds identical sizes or, for padded batching,
sizes in the same 64-px bucket under a pixel budget.
"""

from __future__ import annotations

import bisect
import collections
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

BUCKET = 64  # padded batching groups images whose sides round up to the same multiple of this


@dataclass
class Window:
    start: int  # indices into this rank's work list
    stop: int


class Planner:
    """Yields batches (lists of indices into the work list), window by window.

    A window is a contiguous run of the sorted work list and becomes one shard; its size in
    pixels follows the measured speed (``rate``, pixels per second) so that a shard is
    committed about every ``commit_seconds`` however image sizes vary along the list. The
    first window is small (twice the batch size) so that the first commit comes soon.
    Within a window, images are grouped by size: identical sizes only (``padded=False``) or
    into 64-px buckets padded to their largest member (``padded=True``).

    Batches handed out but not yet received are kept, so a new DataLoader can start again
    from the first one not received (after a decoder crash).
    """

    def __init__(
        self,
        sizes: Sequence[tuple[int, int] | None],
        *,
        padded: bool,
        batch_size: int,
        batch_pixels: int,
        commit_seconds: float,
    ) -> None:
        self.sizes = sizes
        self.padded = padded
        self.batch_size = batch_size
        self.batch_pixels = batch_pixels
        self.commit_seconds = commit_seconds
        self.windows: list[Window] = []
        self._starts: list[int] = []
        self.rate: float | None = None  # pixels per second, set by the consumer (measured)
        known = [h * w for s in sizes if s is not None for h, w in [s]]
        typical = int(np.median(known)) if known else 512 * 512
        self.pixels = [s[0] * s[1] if s is not None else typical for s in sizes]
        self._next = 0
        self._issued: collections.deque[list[int]] = collections.deque()
        self._pending: collections.deque[list[int]] = collections.deque()

    def window_of(self, index: int) -> int:
        return bisect.bisect_right(self._starts, index) - 1

    def window_pixels(self, window: int) -> int:
        w = self.windows[window]
        return sum(self.pixels[w.start : w.stop])

    def _window_stop(self, start: int) -> int:
        """End of the window that starts at ``start``: at least one image, at most 100,000."""
        if self.rate is None:  # a first commit soon; then sized by the measured speed
            count, budget = 2 * self.batch_size, float("inf")
        else:
            count, budget = 100_000, self.rate * self.commit_seconds
        stop, total = start, 0
        limit = min(len(self.sizes), start + count)
        while stop < limit and (stop == start or total + self.pixels[stop] <= budget):
            total += self.pixels[stop]
            stop += 1
        return stop

    def _plan_window(self, start: int, stop: int) -> list[list[int]]:
        known = [i for i in range(start, stop) if self.sizes[i] is not None]
        unknown = [[i] for i in range(start, stop) if self.sizes[i] is None]

        def group(i: int) -> tuple[int, int]:
            h, w = self.sizes[i]  # type: ignore[misc]
            return (math.ceil(h / BUCKET), math.ceil(w / BUCKET)) if self.padded else (h, w)

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

    def __iter__(self) -> Iterator[list[int]]:
        while True:
            if self._pending:
                batch = self._pending.popleft()
            else:
                if self._next >= len(self.sizes):
                    return
                start, stop = self._next, self._window_stop(self._next)
                self.windows.append(Window(start, stop))
                self._starts.append(start)
                self._next = stop
                self._pending.extend(self._plan_window(start, stop))
                continue
            self._issued.append(batch)
            yield batch

    def received(self) -> list[int]:
        return self._issued.popleft()

    def rewind(self) -> None:
        """Hand out the issued-but-not-received batches again (a fresh DataLoader)."""
        self._pending.extendleft(reversed(self._issued))
        self._issued.clear()


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
