"""``extract()``: the composition root. The stages, top to bottom:

    request checked (mode, projection) -> rundir.setup (rank 0, under the output lock: may
    this output be written, the image list, the run folder)
    -> build_trunk + Runtime.resolve (every rank: every `auto` decided once)
    -> rundir.open_run (rank 0: run.toml, the attempt number)
    -> this rank's share: what is left -> header sizes -> its part -> Planner
    -> the loop: DecodeLoader -> Extractor -> ShardSink
    -> view.assemble (rank 0: the output) -> the projection (rank 0, with ``project``)

One process, or one process per rank under torchrun; every collective goes through the rank
helpers of ``runtime`` (a rank that fails never leaves the others waiting).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torchvision

from . import __version__, rundir
from .backbones import Trunk, build_trunk, resolve
from .compute import Extractor
from .config import Config, to_toml
from .decoding import read_sizes
from .devices import Dist, resolve_device
from .discovery import ImageRef
from .errors import ConfigError, Interrupted, OutputError, SppError, option, raising_signals
from .loader import DecodeLoader
from .outputs import remove_run
from .planning import BUCKET, Planner, partition
from .pooling import spp_dim
from .provenance import Provenance, Resolved, resolved_config
from .records import Failure, Outcome, Progress
from .rundir import RunMode
from .runtime import (
    Runtime,
    batching_name,
    gathered,
    on_every_rank,
    on_rank0,
    process_settings_restored,
)
from .shards import ShardSink, list_shards, shard_name
from .storage import remove_tree, run_attrs, shards_root
from .view import assemble

log = logging.getLogger(__name__)

__all__ = ["Interrupted", "Result", "extract"]

Failed = tuple[str, str, str]  # (path, error class, message)


@dataclass(frozen=True)
class Result:
    """What a run did (the CLI's one-line summary)."""

    output: Path
    images: int  # rows in the output
    failed: int
    feature_dim: int  # of the output's vectors (the projection's, with ``project``)
    seconds: float
    processed: int  # images computed by this run (fewer than `images` when resuming)
    failures: tuple[Failed, ...] = ()  # (path, class, message) of this rank's failures
    overlaps: int = 0  # files left out because an earlier input already named them
    runtime: Runtime | None = None  # what `auto` settled to on this rank
    main: bool = True  # this process is rank 0 (under torchrun, the one that reports)


def extract(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    config: Config | None = None,
    mode: RunMode = "new",
    files_from: str | os.PathLike[str] | None = None,
    column: str | None = None,
    retry_failed: bool = False,
    project: str | os.PathLike[str] | None = None,
    progress: Progress | None = None,
) -> Result:
    """Extract one SPP vector per image into the HDF5 file ``output``.

    ``inputs``: a folder, file, tar or URL, or a list of them; ``files_from``: a list of
    them (one per line) or a .csv/.tsv/.parquet table whose ``column`` (``url`` if None)
    holds them. ``mode``: ``"new"`` (refused if the
    output exists), ``"resume"`` (continue it, or start) or ``"overwrite"`` (replace it once
    the new run has finished). ``project``: a file written by ``reduce``; ``output`` then holds
    the vectors projected by its transform, the full ones going to ``<output>.full.h5``.
    Configuration problems raise ConfigError before anything is written; images that cannot
    be used become failure records. ``progress(done, total)`` is called after each batch.
    Under torchrun (WORLD_SIZE > 1) every rank calls this with the same arguments.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    if mode not in ("new", "resume", "overwrite"):
        raise ConfigError(f"mode {mode!r} is invalid; expected 'new', 'resume' or 'overwrite'")
    with process_settings_restored():
        return _extract(
            list(inputs),
            Path(output).absolute(),
            config=config or Config(),
            mode=mode,
            files_from=files_from,
            column=column,
            retry_failed=retry_failed,
            project=None if project is None else Path(project),
            progress=progress,
        )


def _extract(
    inputs: list[str | os.PathLike[str]],
    output: Path,
    *,
    config: Config,
    mode: RunMode,
    files_from: str | os.PathLike[str] | None,
    column: str | None,
    retry_failed: bool,
    project: Path | None,
    progress: Progress | None,
) -> Result:
    started = time.monotonic()
    ctx = Dist.from_env()
    resolved = resolve(config)
    device = resolve_device(config, ctx)
    projection = None
    if project is not None:  # checked before anything is written
        from .projection import full_output, load_for_extract

        projection = load_for_extract(project, config, output, mode)
        output, final = full_output(output), output
    with contextlib.ExitStack() as stack:
        stack.enter_context(_process_group(ctx, device))
        lock = rundir.OutputLock(output) if ctx.rank == 0 else None
        if lock is not None:
            stack.callback(lock.release, remove_if_unused=True)
        # Rank 0 takes the lock first, then checks what is there, and holds it to the end:
        # nothing can change the output between the check and the writing.
        resumable = Provenance.of_run(config, resolved)  # what a resume must match
        setup = on_rank0(
            ctx,
            lambda: rundir.setup(
                inputs, output, (files_from, column), config, resumable, lock, mode
            ),
        )
        # Loads weights (may still raise ConfigError) and sizes memory, on every rank.
        trunk, runtime = on_every_rank(
            ctx, lambda: _model(config, resolved, ctx, device), "build the model"
        )
        runtime.apply()
        if ctx.rank == 0:
            runtime.warn_about_precision()
        # From here on, things are written; a signal is noted, and acted on between batches.
        caught = stack.enter_context(_signals())
        provenance = Provenance.of_run(config, resolved, spp_dim(trunk.channels, config.levels))
        attempt = on_rank0(
            ctx, lambda: rundir.open_run(output, setup.run_dir, provenance, config, resolved)
        )
        attrs = _attrs(config, resolved, trunk, runtime, provenance)
        keys, keep = [r.key_bytes for r in setup.refs], rundir.unlisted(setup.refs)
        dim = attrs["feature_dim"]
        try:
            processed, failures = on_every_rank(
                ctx,
                lambda: _share(
                    setup.refs,
                    setup.run_dir,
                    attempt,
                    trunk,
                    config,
                    runtime,
                    retry_failed=retry_failed,
                    progress=progress,
                    caught=caught,
                ),
                "extract",
            )
        except (Interrupted, OutputError):
            if ctx.rank == 0 and not setup.keep_old_output:
                _partial_view(output, setup.run_dir, keys, dim, config.dtype, attrs, keep)
            raise
        except ConfigError:  # found once work began (every vector non-finite): leave no trace
            if ctx.rank == 0 and not list_shards(setup.run_dir):
                remove_tree(setup.run_dir)
            raise

        def finish() -> tuple[int, int]:
            counts = assemble(
                output, setup.run_dir, keys, dim, config.dtype, attrs, keep_prefixes=keep
            )
            for other in shards_root(output).glob("run-*"):
                # Runs replaced (--overwrite) or left by a reader that held them then.
                if other != setup.run_dir and not remove_run(other):
                    log.info("%s is being read; a later run on this output removes it", other)
            return counts

        rows, failed = on_rank0(ctx, finish)
    if projection is not None:
        from .projection import project_file

        then = (
            f"the full vectors are in {output.name}; rerun the same command with "
            f"{option('mode', 'resume')} to write the projected copy"
        )

        def project() -> int:
            with raising_signals(then):
                return project_file(output, final, projection, overwrite=True)

        on_rank0(ctx, project)  # every rank waits for rank 0 to write the projected copy
        output, dim = final, projection.dim
    return Result(
        output=output,
        images=rows,
        failed=failed,
        feature_dim=dim,
        seconds=time.monotonic() - started,
        processed=processed,
        failures=tuple(failures),
        overlaps=setup.overlaps,
        runtime=runtime,
        main=ctx.rank == 0,
    )


def _model(
    config: Config, resolved: Resolved, ctx: Dist, device: torch.device
) -> tuple[Trunk, Runtime]:
    trunk = build_trunk(config, resolved)
    return trunk, Runtime.resolve(config, trunk, device=device, ctx=ctx)


def _attrs(
    config: Config, resolved: Resolved, trunk: Trunk, runtime: Runtime, provenance: Provenance
) -> dict[str, Any]:
    """The output's root attributes: what made the vectors, the configuration, and what the
    run actually used."""
    return run_attrs(
        **provenance.to_attrs(resolved.weights),
        channels=trunk.channels,
        config=to_toml(resolved_config(config, resolved)),
        spp_extract_version=__version__,
        torch_version=str(torch.__version__),
        torchvision_version=str(torchvision.__version__),
        device=runtime.device.type,
        batching=batching_name(runtime),
        world_size=runtime.dist.world,
    )


# ----------------------------------------------------------------------------- one rank's share


def _share(
    refs: Sequence[ImageRef],
    run_dir: Path,
    attempt: int,
    trunk: Trunk,
    config: Config,
    runtime: Runtime,
    *,
    retry_failed: bool,
    progress: Progress | None,
    caught: list[int],
) -> tuple[int, list[Failed]]:
    """This rank's share of ``refs``, computed and committed to shards in ``run_dir``: the
    stages built, then the loop. Returns (images computed, their failures)."""
    ctx = runtime.dist
    todo = on_rank0(ctx, lambda: rundir.left_to_do(refs, run_dir, retry_failed))
    sizes = _header_sizes([refs[i] for i in todo], runtime, config)
    cuts = partition(sizes, ctx.world)
    lo, hi = cuts[ctx.rank], cuts[ctx.rank + 1]
    work = [refs[i] for i in todo[lo:hi]]
    side = trunk.min_side  # the sizes the trunk sees: sides under its minimum are padded up
    planner = Planner(
        [None if s is None else (max(s[0], side), max(s[1], side)) for s in sizes[lo:hi]],
        padded=runtime.padded,
        pad_pixels=runtime.pad_pixels,
        batch_size=runtime.batch_size,
        batch_pixels=runtime.batch_pixels,
        commit_seconds=config.commit_seconds,
    )
    if progress:
        progress(0, len(work))
    if not work:
        return 0, []
    loader = DecodeLoader(
        work,
        planner,
        side,
        config,
        workers=runtime.workers,
        # rounded up on a GPU (fewer shapes, fewer per-shape set-ups); a CPU computes exactly
        multiple=BUCKET if runtime.padded and runtime.device.type == "cuda" else 1,
        pin_memory=runtime.device.type == "cuda",
        caught=caught,
    )
    sink = ShardSink(
        work,
        planner,
        run_dir,
        lambda window: shard_name(attempt, ctx.rank, window),
        spp_dim(trunk.channels, config.levels),
        config.dtype,
        {"attempt": attempt, "rank": ctx.rank},
    )
    _loop(loader, Extractor(trunk, config, runtime), sink, config, progress, caught, len(work))
    return len(work), sink.failures


def _loop(
    loader: DecodeLoader,
    extractor: Extractor,
    sink: ShardSink,
    config: Config,
    progress: Progress | None,
    caught: list[int],
    total: int,
) -> None:
    """Decoded batches -> outcomes -> shards, until the plan ends or a signal was caught."""
    batches = iter(loader)
    first: list[Outcome] | None = []  # the first outcomes, judged before the first commit
    try:
        with contextlib.closing(batches):  # on any exit: the decode workers stop at once
            for batch in batches:
                if first is not None and (len(first) >= FIRST_IMAGES or sink.moves_on(batch)):
                    refuse_if_mostly_non_finite(first, config)
                    first = None
                sink.begin(batch)
                outcomes = extractor(batch.pixels, batch.metas) if batch.pixels is not None else []
                if first is not None:
                    first += outcomes
                sink.record(batch, outcomes)
                if progress:
                    progress(sink.done, total)
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


def _header_sizes(
    refs: Sequence[ImageRef], runtime: Runtime, config: Config
) -> list[tuple[int, int] | None]:
    """Each image's size from its header: each rank reads a strided share, all get all."""
    ctx = runtime.dist
    parts = gathered(ctx, lambda: read_sizes(refs[ctx.rank :: ctx.world], runtime.workers, config))
    sizes: list[Any] = [None] * len(refs)
    for rank, part in enumerate(parts):
        sizes[rank :: ctx.world] = part
    return sizes


# A run's first outcomes (at least this many, or all before its first commit) are judged
# together: if at least half are non-finite vectors, a setting is the cause.
FIRST_IMAGES = 16


def refuse_if_mostly_non_finite(first: Sequence[Outcome], config: Config) -> None:
    """If at least half of a run's ``first`` outcomes are non-finite vectors, a setting, not
    the images, is the likely cause: the run stops (ConfigError) instead of filling the file
    with failures."""
    failures = [r for r in first if isinstance(r, Failure) and r.kind == "non_finite"]
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


def _partial_view(
    output: Path,
    run_dir: Path,
    keys: list[bytes],
    dim: int,
    dtype: str,
    attrs: dict[str, Any],
    keep: list[bytes],
) -> None:
    """After an interruption: the output shows what is committed (``complete = false``)."""
    try:
        assemble(output, run_dir, keys, dim, dtype, attrs, complete=False, keep_prefixes=keep)
    except SppError as exc:
        log.info("could not write the partial output (%s)", exc)  # the run's own error says more


@contextlib.contextmanager
def _process_group(ctx: Dist, device: torch.device) -> Iterator[None]:
    """Under torchrun, a process group for the run (unless the caller made one)."""
    own = ctx.active and not dist.is_initialized()
    if own:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        if own and dist.is_initialized():
            dist.destroy_process_group()


@contextlib.contextmanager
def _signals() -> Iterator[list[int]]:
    """SIGINT/SIGTERM are collected into the list yielded instead of killing the process
    (the run stops between batches); a second one stops at once."""
    caught: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield caught
        return

    def handler(signum: int, _frame: Any) -> None:
        if caught:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        caught.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield caught
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
