"""Decoded batches in the planner's order, from DataLoader worker processes that are replaced
when one crashes or hangs.

After a worker failure, the batches handed to the DataLoader but not yet received are handed
out again by a fresh DataLoader, except the first of them (the suspect), which is decoded one
image at a time, each in its own throw-away process: a crash or hang becomes that image's
failure record. With prefetching the culprit may be in a later batch, which the next restart
reaches the same way.

torch's SIGCHLD handler would raise a dead worker's error wherever the main thread is (in the
middle of compute it would lose the batch in hand), so SIGCHLD is left to its default as soon
as each DataLoader has started its workers, and torch's handler is put back at the end; a
dead worker is found by the check before each batch (``_error_if_any_worker_fails``, what
torch's handler calls) or by torch's own poll while it waits for a batch.
"""

from __future__ import annotations

import collections
import logging
import queue
import signal
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from torch.utils.data import DataLoader

# The one private torch function spp-extract uses (tests/test_loader.py fails if it moves).
from torch.utils.data._utils.signal_handling import _error_if_any_worker_fails

from .config import Config
from .decoding import (
    PREFETCH,
    Batch,
    Collate,
    DecodeDataset,
    collate,
    isolated_decode,
    own_generator,
)
from .discovery import ImageRef
from .errors import Interrupted
from .isolation import make_private
from .planning import Planned

log = logging.getLogger(__name__)


def init_worker(_worker: int) -> None:
    """A decode worker is a process spp-extract owns (``isolation.private``). Ctrl-C reaches
    the whole process group; the main process decides when to stop."""
    make_private()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Replay:
    """The planned batches as a DataLoader's batch sampler, able to hand out again the ones a
    failed DataLoader took but never delivered (``rewind``)."""

    def __init__(self, planned: Iterable[Planned]) -> None:
        self._source = iter(planned)
        self._issued: collections.deque[Planned] = collections.deque()
        self._pending: collections.deque[Planned] = collections.deque()

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        while True:
            planned = self._pending.popleft() if self._pending else next(self._source, None)
            if planned is None:
                return
            self._issued.append(planned)
            yield [(planned.window, i) for i in planned.indices]

    def received(self) -> Planned:
        """The oldest batch handed out has arrived."""
        return self._issued.popleft()

    def rewind(self) -> Planned | None:
        """A DataLoader failed: the batches it took but never delivered are handed out again,
        but the first (the suspect), which is returned instead."""
        self._pending.extendleft(reversed(self._issued))
        self._issued.clear()
        return self._pending.popleft() if self._pending else None


_END = object()


def _ahead(batches: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """``batches``, made by a thread up to ``depth`` ahead of the consumer; its exception is
    raised here, in order. Closing this iterator stops the thread after its current batch."""
    ready: queue.Queue[Any] = queue.Queue(depth)
    stop = threading.Event()

    def put(item: Any) -> bool:
        """Hand ``item`` over, unless the consumer has stopped (then False)."""
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for batch in batches:
                if not put(batch):
                    return
            put(_END)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            put(exc)

    thread = threading.Thread(target=produce, name="spp-extract-prefetch", daemon=True)
    thread.start()
    try:
        while (item := ready.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


class DecodeLoader:
    """The ``planned`` batches of ``refs``, decoded by ``workers`` processes (0: in this
    process), in order; iterate it once. A worker that crashes or hangs (``decode_timeout``)
    is replaced (see the module's text). ``caught``: the signals received so far (a worker
    lost to one ends the loop as ``Interrupted``). Closing the iterator stops the workers."""

    def __init__(
        self,
        refs: Sequence[ImageRef],
        planned: Iterable[Planned],
        min_side: int,
        config: Config,
        *,
        workers: int,
        multiple: int,
        pin_memory: bool,
        caught: list[int],
    ) -> None:
        self.refs, self.min_side, self.config = refs, min_side, config
        self.dataset = DecodeDataset(refs, min_side, config)
        self.replay = Replay(planned)
        self.workers, self.multiple, self.pin_memory = workers, multiple, pin_memory
        self.caught = caught
        self.watch = workers > 0 and threading.current_thread() is threading.main_thread()

    def __iter__(self) -> Iterator[Batch]:
        if self.workers == 0 and any(r.remote for r in self.refs):
            # no decode process (a machine of two cores): remote reads wait on the network,
            # so a thread reads and decodes the next batches while this one computes
            return _ahead(self._batches(), PREFETCH)
        return self._batches()

    def _batches(self) -> Iterator[Batch]:
        self._torch_handler: Any = None  # what torch installed for SIGCHLD (once per process)
        try:
            while True:
                yield from self._until_a_worker_fails()
                suspect = self.replay.rewind()
                if suspect is None:
                    return
                yield collate(
                    [
                        isolated_decode(self.refs[i], i, self.min_side, self.config, suspect.window)
                        for i in suspect.indices
                    ]
                )
        finally:
            if self._torch_handler is not None:  # as torch left the process
                signal.signal(signal.SIGCHLD, self._torch_handler)

    def _until_a_worker_fails(self) -> Iterator[Batch]:
        """Batches from one DataLoader, until the plan ends or a worker fails."""
        workers = self.workers
        loader = DataLoader(
            self.dataset,
            batch_sampler=self.replay,
            num_workers=workers,
            collate_fn=Collate(self.multiple),
            pin_memory=self.pin_memory,
            timeout=self.config.decode_timeout if workers else 0,
            prefetch_factor=PREFETCH if workers else None,
            persistent_workers=False,
            worker_init_fn=init_worker,
            generator=own_generator(),
        )
        batches = iter(loader)
        if self.watch:
            if self._torch_handler is None:
                self._torch_handler = signal.getsignal(signal.SIGCHLD)
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # see the module's text
        try:
            while True:
                try:
                    if workers:
                        _error_if_any_worker_fails()
                    batch = next(batches)
                except StopIteration:
                    return
                except RuntimeError as exc:  # the DataLoader's: a worker died, or timed out
                    if workers == 0:
                        raise
                    if self.caught:
                        raise Interrupted(self.caught[0]) from None
                    log.warning("a decode worker failed (%s); isolating its images", exc)
                    return
                self.replay.received()
                yield batch
        finally:
            del batches  # shuts the remaining workers down (a hung one is terminated)
