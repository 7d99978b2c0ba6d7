"""One rank's share of a run, top to bottom: what is left to do -> header sizes -> this
rank's part -> plan -> decoded batches -> vectors -> shards (written on a background thread,
one per window, committed when the plan moves on)."""

from __future__ import annotations

import contextlib
import contextvars
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch.distributed as dist

from . import images
from .backbones import Trunk
from .compute import Extractor, Result
from .config import Config
from .decoding import Batch, Item, decoded_batches, file_stat, read_sizes
from .errors import ConfigError, ImageError, Interrupted, option
from .planning import BUCKET, Planner, partition
from .records import RowMeta
from .rundir import source_of
from .runtime import Dist, Runtime, on_rank0
from .shards import ShardWriter, read_state, shard_name

Failure = tuple[str, str, str]  # (path, error class, message)
Progress = Callable[[int, int], None]


def run_share(
    refs: Sequence[images.ImageRef],
    run_dir: Path,
    attempt: int,
    trunk: Trunk,
    config: Config,
    runtime: Runtime,
    *,
    retry_failed: bool,
    progress: Progress | None,
    caught: list[int],
) -> tuple[int, list[Failure]]:
    """This rank's share of ``refs``, computed and committed to shards in ``run_dir``; returns
    (images computed, their failures). ``caught``: signals received (stop between batches)."""
    ctx = runtime.dist
    todo = on_rank0(ctx, lambda: left_to_do(refs, run_dir, retry_failed))
    work, work_sizes = my_part(
        refs, todo, header_sizes([refs[i] for i in todo], runtime), ctx, trunk.min_side
    )
    extractor = Extractor(
        trunk,
        config,
        runtime.device,
        padded=runtime.padded,
        budget=runtime.budget,
        memory=runtime.memory,
    )
    planner = Planner(
        work_sizes,
        padded=runtime.padded,
        batch_size=runtime.batch_size,
        batch_pixels=runtime.batch_pixels,
        commit_seconds=config.commit_seconds,
    )
    if progress:
        progress(0, len(work))
    if not work:
        return 0, []
    sink = ShardSink(
        work,
        planner,
        run_dir,
        lambda window: shard_name(attempt, ctx.rank, window),
        extractor.dim,
        config.dtype,
        {"attempt": attempt, "rank": ctx.rank},
    )
    batches = decoded_batches(
        work,
        planner,
        trunk.min_side,
        config,
        workers=runtime.workers,
        multiple=BUCKET if runtime.padded else 1,
        pin_memory=runtime.device.type == "cuda",
        caught=caught,
    )
    first: list[Result] | None = []  # the first results, judged before the first commit
    try:
        with contextlib.closing(batches):  # on any exit: the decode workers stop at once
            for batch in batches:
                if first is not None and (len(first) >= FIRST_IMAGES or sink.moves_on(batch)):
                    refuse_if_mostly_non_finite(first, config)
                    first = None
                sink.begin(batch)
                results = extractor(batch.pixels, batch.metas) if batch.pixels is not None else []
                if first is not None:
                    first += results
                sink.record(batch, results)
                if progress:
                    progress(sink.done, len(work))
                if caught:
                    raise Interrupted(caught[0])
        if first is not None:
            refuse_if_mostly_non_finite(first, config)
        sink.finish()
    except Interrupted:
        sink.keep()  # everything computed so far, the open shard with its missing rows
        raise
    except BaseException:
        sink.abandon()
        raise
    finally:
        sink.close()
    return len(work), sink.failures


# A run's first results (at least this many, or all before its first commit) are judged
# together: if at least half are non-finite vectors, a setting is the cause.
FIRST_IMAGES = 16


def refuse_if_mostly_non_finite(first: Sequence[Result], config: Config) -> None:
    """If at least half of a run's ``first`` results are non-finite vectors, a setting, not
    the images, is the likely cause: the run stops (ConfigError) instead of filling the file
    with failures."""
    failures = [r for r in first if isinstance(r, ImageError) and r.kind == "non_finite"]
    if not failures or 2 * len(failures) < len(first):
        return
    if any("float16 overflow" in f.message for f in failures):
        cause = f"{option('dtype', 'float16')} overflows; use {option('dtype', 'float32')}"
    elif config.precision == "fp16":
        cause = (
            f"{option('precision', 'fp16')} overflows; use {option('precision', 'bf16')} or fp32"
        )
    else:
        cause = "the trunk itself gives NaN or inf; check the weights"
    if config.std and min(config.std) < 1e-3:
        cause += f", and std = {list(config.std)} (tiny values blow the inputs up)"
    raise ConfigError(
        f"{len(failures)} of the first {len(first)} images gave non-finite vectors "
        f"({failures[0].message}): {cause}; nothing was kept"
    )


def left_to_do(refs: Sequence[images.ImageRef], run_dir: Path, retry_failed: bool) -> list[int]:
    """Indices of ``refs`` without a result in the run (or whose file changed since)."""
    state = read_state(run_dir)
    return [
        i
        for i, r in enumerate(refs)
        if not state.done(r.key_bytes, source_of(r), *file_stat(r), retry_failed)
    ]


def my_part(
    refs: Sequence[images.ImageRef],
    todo: list[int],
    sizes: list[tuple[int, int] | None],
    ctx: Dist,
    min_side: int,
) -> tuple[list[images.ImageRef], list[tuple[int, int] | None]]:
    """This rank's contiguous part of ``todo`` (pixel-balanced across ranks), with the sizes
    the trunk will see (sides under ``min_side`` padded up)."""
    cuts = partition(sizes, ctx.world)
    lo, hi = cuts[ctx.rank], cuts[ctx.rank + 1]
    grown = [
        None if s is None else (max(s[0], min_side), max(s[1], min_side)) for s in sizes[lo:hi]
    ]
    return [refs[i] for i in todo[lo:hi]], grown


def header_sizes(refs: Sequence[images.ImageRef], runtime: Runtime) -> list[tuple[int, int] | None]:
    """Each image's size from its header: each rank reads a strided share, all get all."""
    ctx = runtime.dist
    mine = read_sizes(refs[ctx.rank :: ctx.world], runtime.workers)
    if not ctx.active:
        return mine
    gathered: list[Any] = [None] * ctx.world
    dist.all_gather_object(gathered, mine)
    sizes: list[Any] = [None] * len(refs)
    for rank, part in enumerate(gathered):
        sizes[rank :: ctx.world] = part
    return sizes


class ShardSink:
    """Results in, committed shards out. Each window of the plan is one shard, committed when
    the batches move on to the next window; writes run in order on a background thread so
    HDF5 I/O overlaps compute. The time a window took sets the planner's measured speed."""

    def __init__(
        self,
        work: Sequence[images.ImageRef],
        planner: Planner,
        run_dir: Path,
        name: Callable[[int], str],
        dim: int,
        dtype: str,
        attrs: dict[str, Any],
    ) -> None:
        self.work, self.planner, self.run_dir = work, planner, run_dir
        self.name, self.dim, self.dtype, self.attrs = name, dim, dtype, attrs
        self.writer = BackgroundWriter()
        self.open: dict[int, ShardWriter] = {}
        self.failures: list[Failure] = []
        self.done = 0  # images handled (vectors or failures)
        self.window = -1
        self.window_started = time.monotonic()

    def _window_of(self, batch: Batch) -> int:
        return self.planner.window_of((batch.indices + [it.index for it in batch.failures])[0])

    def moves_on(self, batch: Batch) -> bool:
        """Whether ``batch`` would commit the open window (``begin``)."""
        return self.window >= 0 and self._window_of(batch) != self.window

    def begin(self, batch: Batch) -> None:
        """Called before ``batch`` is computed: a new window commits the one before."""
        window = self._window_of(batch)
        if window != self.window:
            if self.window >= 0:
                elapsed = time.monotonic() - self.window_started
                self.planner.rate = self.planner.window_pixels(self.window) / max(elapsed, 1e-3)
                self._commit(self.window)
            self.window, self.window_started = window, time.monotonic()

    def record(self, batch: Batch, results: Sequence[Result]) -> None:
        """``results``: one per decoded image of ``batch`` (a vector or a failure); each row's
        metadata is the decoder's, completed with what compute found."""
        shard = self._shard(self.window)
        start = self.planner.windows[self.window].start
        for item in batch.failures:
            self._fail(shard, item.index - start, item)
        positions, vectors, metas = [], [], []
        for index, meta, result in zip(batch.indices, batch.metas, results, strict=True):
            if isinstance(result, ImageError):
                failed = replace(meta, error_class=result.kind, error=result.message)
                self._fail(shard, index - start, Item(index, None, failed))
            else:
                positions.append(index - start)
                vectors.append(result.values.numpy())
                metas.append(
                    replace(meta, feature_map_size=result.feature_map_size, tiles=result.tiles)
                )
        if positions:
            block = np.stack(vectors)
            self.writer.submit(lambda: shard.put(positions, block, metas))
        self.done += len(batch.indices) + len(batch.failures)
        self.writer.check()

    def finish(self) -> None:
        if self.window >= 0:
            self._commit(self.window)
        self.writer.drain()

    def keep(self) -> None:
        """After an interruption: commit every open shard as it is (missing rows stay missing)."""
        for window in list(self.open):
            self._commit(window)
        self.writer.drain()

    def abandon(self) -> None:
        self.writer.close()  # runs what is queued, or skips it after a write error
        for shard in self.open.values():
            shard.discard()

    def close(self) -> None:
        self.writer.close()

    def _shard(self, window: int) -> ShardWriter:
        if window not in self.open:
            w = self.planner.windows[window]
            refs = self.work[w.start : w.stop]
            # h5py serialises calls itself, so the writer thread may be busy with the last one
            self.open[window] = ShardWriter(
                self.run_dir,
                self.name(window),
                [r.key_bytes for r in refs],
                [source_of(r) for r in refs],
                self.dim,
                self.dtype,
                {**self.attrs, "window": window},
            )
        return self.open[window]

    def _commit(self, window: int) -> None:
        shard = self.open.pop(window, None)
        if shard is not None:
            self.writer.submit(shard.commit)

    def _fail(self, shard: ShardWriter, position: int, item: Item) -> None:
        self.failures.append((self.work[item.index].key, item.meta.error_class, item.meta.error))
        meta: RowMeta = item.meta
        self.writer.submit(lambda: shard.fail(position, meta))


class BackgroundWriter:
    """Runs shard writes on a thread, in order, so HDF5 I/O overlaps compute."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        # In the caller's context: messages built there use the caller's terms (errors.option).
        self._thread = threading.Thread(
            target=contextvars.copy_context().run,
            args=(self._loop,),
            name="spp-writer",
            daemon=True,
        )
        self._thread.start()

    def _loop(self) -> None:
        while (task := self._queue.get()) is not None:
            try:
                if self.error is None:
                    task()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
                self.error = exc
            finally:
                self._queue.task_done()
        self._queue.task_done()

    def submit(self, task: Callable[[], None]) -> None:
        self.check()
        self._queue.put(task)

    def drain(self) -> None:
        self._queue.join()
        self.check()

    def check(self) -> None:
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
