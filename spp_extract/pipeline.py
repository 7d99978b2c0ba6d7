"""``extract()``: the composition root. The data flow, top to bottom:

    inputs -> rundir.setup (output checks under the lock, image list, run folder)
           -> build_trunk -> Runtime.resolve (device, workers, threads, batching, limits)
           -> runner.run_share (what is left -> headers -> plan -> decode -> trunk -> SPP
              -> shards) on each rank -> view.assemble (the output file) on rank 0

One process, or one process per rank under torchrun.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torchvision

from . import __version__, rundir
from .backbones import ResolvedModel, Trunk, build_trunk, resolve
from .config import Config, fingerprint, resolved_config, to_toml
from .errors import ConfigError, Interrupted, OutputError, SppError
from .outputs import remove_run
from .pooling import spp_dim
from .runner import Failure, run_share
from .runtime import (
    Dist,
    Runtime,
    on_every_rank,
    on_rank0,
    process_settings_restored,
    resolve_device,
)
from .shards import list_shards
from .storage import remove_tree, run_attrs, shards_root
from .view import assemble

log = logging.getLogger(__name__)

__all__ = ["Interrupted", "Result", "extract"]


@dataclass
class Result:
    """What a run did (the CLI's one-line summary)."""

    output: Path
    images: int  # rows in the output
    failed: int
    feature_dim: int
    seconds: float
    processed: int  # images computed by this run (fewer than `images` when resuming)
    failures: list[Failure] = field(default_factory=list)  # (path, class, message)
    overlaps: int = 0  # files left out because an earlier input already named them
    runtime: Runtime | None = None  # what `auto` settled to on this rank


def extract(
    inputs: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    *,
    config: Config | None = None,
    files_from: str | os.PathLike[str] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    retry_failed: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> Result:
    """Extract one SPP vector per image into the HDF5 file ``output``.

    ``inputs``: a folder or file, or a list of them. Configuration problems raise ConfigError
    before anything is written; images that cannot be used become failure records.
    ``progress(done, total)`` is called after each batch. Under torchrun (WORLD_SIZE > 1)
    every rank calls this with the same arguments.
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    with process_settings_restored():
        return _extract(
            inputs,
            Path(output).absolute(),
            config or Config(),
            files_from,
            resume,
            overwrite,
            retry_failed,
            progress,
        )


def _extract(
    inputs: Sequence[str | os.PathLike[str]],
    output: Path,
    config: Config,
    files_from: str | os.PathLike[str] | None,
    resume: bool,
    overwrite: bool,
    retry_failed: bool,
    progress: Callable[[int, int], None] | None,
) -> Result:
    started = time.monotonic()
    ctx = Dist.from_env()
    resolved = resolve(config)
    device = resolve_device(config, ctx)
    fp = fingerprint(config, resolved)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_process_group(ctx, device))
        lock = rundir.OutputLock(output) if ctx.rank == 0 else None
        if lock is not None:
            stack.callback(lock.release, remove_if_unused=True)
        # Rank 0 takes the lock first, then checks what is there, and holds it to the end:
        # nothing can change the output between the check and the writing.
        setup = on_rank0(
            ctx,
            lambda: rundir.setup(inputs, output, files_from, config, fp, lock, resume, overwrite),
        )
        # Loads weights (may still raise ConfigError) and sizes memory, on every rank.
        trunk, runtime = on_every_rank(
            ctx, lambda: _model(config, resolved, ctx, device), "build the model"
        )
        runtime.apply()
        # From here on, things are written; a signal is noted, and acted on between batches.
        caught = stack.enter_context(_signals())
        attempt = on_rank0(ctx, lambda: rundir.prepare(output, setup.run_dir, fp, config, resolved))
        attrs = _attrs(config, resolved, trunk, runtime)
        keys, keep = [r.key_bytes for r in setup.refs], rundir.unlisted(setup.refs)
        dim = attrs["feature_dim"]
        try:
            processed, failures = run_share(
                setup.refs,
                setup.run_dir,
                attempt,
                trunk,
                config,
                runtime,
                retry_failed=retry_failed,
                progress=progress,
                caught=caught,
            )
        except (Interrupted, OutputError):
            if ctx.rank == 0 and not setup.keep_old_output:
                _partial_view(output, setup.run_dir, keys, dim, config.dtype, attrs, keep)
            raise
        except ConfigError:  # found once work began (every vector non-finite): leave no trace
            if ctx.rank == 0 and not list_shards(setup.run_dir):
                remove_tree(setup.run_dir)
            raise
        if ctx.active:
            dist.barrier()

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
        return Result(
            output,
            rows,
            failed,
            dim,
            time.monotonic() - started,
            processed,
            failures,
            setup.overlaps,
            runtime,
        )


def _model(
    config: Config, resolved: ResolvedModel, ctx: Dist, device: torch.device
) -> tuple[Trunk, Runtime]:
    trunk = build_trunk(config, resolved)
    return trunk, Runtime.resolve(config, trunk, ctx, device)


def _attrs(
    config: Config, resolved: ResolvedModel, trunk: Trunk, runtime: Runtime
) -> dict[str, Any]:
    """The output's root attributes: the configuration and what the run actually used."""
    return run_attrs(
        backbone=resolved.backbone,
        layer=resolved.layer,
        weights=resolved.weights,
        weights_id=resolved.weights_id,
        levels=list(config.levels),
        pooling=config.pooling,
        channels=trunk.channels,
        feature_dim=spp_dim(trunk.channels, config.levels),
        dtype=config.dtype,
        mean=list(resolved.mean),
        std=list(resolved.std),
        precision=config.precision,
        config=to_toml(resolved_config(config, resolved)),
        spp_extract_version=__version__,
        torch_version=str(torch.__version__),
        torchvision_version=str(torchvision.__version__),
        device=runtime.device.type,
        batching="padded" if runtime.padded else "same-size",
        world_size=runtime.dist.world,
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
