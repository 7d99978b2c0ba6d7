"""Wires the stages: paths -> headers -> plan -> decode (workers) -> trunk -> SPP -> shards.

Devices, ranks, resume and signals live here. One process, or one process per rank under
torchrun.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import logging
import os
import queue
import re
import signal
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
import torchvision
from torch.utils.data import DataLoader

from . import __version__, images
from .backbones import ResolvedModel, Trunk, build_trunk, resolve
from .compute import Extractor, resolve_maskable
from .config import AUTO, MODEL_KEYS, Config, to_toml
from .decoding import (
    Batch,
    Collate,
    DecodeDataset,
    Item,
    collate,
    file_stat,
    ignore_sigint,
    isolated_decode,
    read_sizes,
)  # fmt: skip
from .errors import ConfigError, ImageError, OutputError, SppError, option, printable
from .memory import memory_budget, module_bytes
from .planning import BUCKET, Planner, partition
from .pooling import spp_dim
from .writer import (
    OutputLock,
    ShardWriter,
    assemble,
    identify,
    next_attempt,
    read_state,
    remove_partial,
    remove_stale_tmp,
    remove_tree,
    run_attrs,
    shard_name,
    shards_root,
)  # fmt: skip

log = logging.getLogger(__name__)

class Interrupted(SppError):
    """SIGINT/SIGTERM: committed work is kept; the exit status is 128 + signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}; work up to now is "
                         "committed; rerun the same command with --resume to finish")  # fmt: skip
        self.exit_code = 128 + signum


@dataclass
class Result:
    """What a run did (the CLI's one-line summary)."""

    output: Path
    images: int  # rows in the output
    failed: int
    feature_dim: int
    seconds: float
    processed: int  # images computed by this run (fewer than `images` when resuming)
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (path, class, message)
    overlaps: int = 0  # files left out because an earlier input already named them


# ----------------------------------------------------------------------------- environment


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1


def _dist_from_env() -> Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    return Dist(int(os.environ["RANK"]), world, int(os.environ.get("LOCAL_RANK", "0")),
                int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))  # fmt: skip


def _device(config: Config, ctx: Dist) -> torch.device:
    name = config.device
    if name == AUTO:
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available() and not ctx.active:
            name = "mps"
        else:
            name = "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} requested but CUDA is not available; use {option('device', 'cpu')}")
        if name == "cuda":
            name = f"cuda:{ctx.local_rank if ctx.active else 0}"
        if int(name.split(":")[1]) >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r} does not exist; {torch.cuda.device_count()} CUDA devices")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device 'mps' requested but MPS is not available; use {option('device', 'cpu')}")
    return torch.device(name)


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _workers(config: Config, device: torch.device, ctx: Dist) -> int:
    if config.workers != AUTO:
        return int(config.workers)
    cores = max(1, _cores() // ctx.local_world)
    if device.type == "cpu":
        # Decoding takes ~10% of CPU compute; a worker would steal a core from compute threads.
        return 0 if cores <= 2 else max(1, cores // 4)
    return max(1, min(8, cores - 1))


def _batch_limits(config: Config, device: torch.device, fit_pixels: int | None = None) -> tuple[int, int]:
    """``fit_pixels``: the most pixels one forward may take within the memory budget
    (``batch_pixels = auto`` stays within it)."""
    gpu = device.type != "cpu"
    size = config.batch_size if config.batch_size != AUTO else (64 if gpu else 8)
    pixels = config.batch_pixels if config.batch_pixels != AUTO else (64 if gpu else 8) * 512 * 512
    if config.batch_pixels == AUTO and fit_pixels is not None:
        pixels = max(1, min(pixels, fit_pixels))
    return int(size), int(pixels)


def fingerprint(config: Config, resolved: ResolvedModel) -> dict[str, Any]:
    """The resolved values that decide the vectors; a resumed run must match them all."""
    values = {
        "backbone": resolved.backbone, "layer": resolved.layer, "weights": resolved.weights_id,
        "levels": list(config.levels), "pooling": config.pooling, "mean": list(resolved.mean),
        "std": list(resolved.std), "dtype": config.dtype, "precision": config.precision,
    }  # fmt: skip
    assert set(values) | {"seed"} == set(MODEL_KEYS)
    return values


def resolved_config(config: Config, resolved: ResolvedModel) -> dict[str, Any]:
    """The full configuration with defaults filled in (printed by `spp-extract config`)."""
    values = config.to_dict()
    values.update(layer=resolved.layer, mean=list(resolved.mean), std=list(resolved.std))
    return values


# ----------------------------------------------------------------------------- writing


class BackgroundWriter:
    """Runs shard writes on a thread, in order, so HDF5 I/O overlaps compute."""

    def __init__(self) -> None:
        self._queue: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=8)
        self.error: BaseException | None = None
        # In the caller's context: messages built there use the caller's terms (errors.option).
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._loop,),
                                        name="spp-writer", daemon=True)  # fmt: skip
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


# ----------------------------------------------------------------------------- the run


def _read_run_toml(run_dir: Path) -> dict[str, Any]:
    try:
        return tomllib.loads((run_dir / "run.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return {}


def _write_run_toml(run_dir: Path, fp: dict[str, Any], config: dict[str, Any]) -> None:
    text = "# spp-extract run: the values every resume of this run must match\n"
    text += "[fingerprint]\n" + to_toml(fp) + "\n[config]\n" + to_toml(config)
    tmp = run_dir / "run.toml.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, run_dir / "run.toml")


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [f"{key}: {old.get(key)!r} -> {new.get(key)!r}" for key in new if old.get(key) != new.get(key)]


def _check_output_name(output: Path, resume: bool, overwrite: bool) -> None:
    """What can be refused before anything is touched: the folder, the name."""
    if resume and overwrite:
        raise ConfigError(f"{option('resume')} and {option('overwrite')} exclude each other; pick one")
    parent = output.parent
    if not parent.is_dir():
        raise ConfigError(f"output folder '{parent}' does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output folder '{parent}' is not writable; choose another output")
    if output.is_dir():
        raise ConfigError(f"output '{output}' is a directory; give a file name like features.h5")
    name = os.fsencode(output.name)
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"output name '{printable(output.name)}' is not valid UTF-8 (HDF5 stores "
                          "it inside the file); choose a UTF-8 name") from None  # fmt: skip
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    longest = len(name) + len(".shards")
    if longest > limit:
        raise ConfigError(f"output name is {len(name)} bytes; its shards folder '{output.name[:20]}"
                          f"....shards' would exceed this file system's {limit}-byte limit; "
                          f"choose a name of at most {limit - 7} bytes")  # fmt: skip


def _check_existing(output: Path, resume: bool, overwrite: bool) -> bool:
    """Under the output lock: may this run write here? Returns whether an output exists."""
    root = shards_root(output)
    if output.exists():
        attrs = identify_output(output, resume, overwrite)
        if resume and attrs.get("layout") == "merged":
            raise ConfigError(
                f"'{output}' is a merged, self-contained copy (layout = merged); "
                f"{option('resume')} continues a run's own output (resume that and merge again), "
                f"or pass {option('overwrite')} to start a new run here"
            )
    elif root.is_dir() and [p for p in root.iterdir() if p.name != ".lock"]:  # ours holds .lock
        unexpected = [p.name for p in root.iterdir() if p.name != ".lock" and not p.name.startswith("run-")]
        if unexpected:
            raise ConfigError(
                f"'{root}' holds files spp-extract did not write (first: "
                f"{printable(unexpected[0])!r}); move them away or choose another output"
            )
    else:
        return False
    if not (resume or overwrite):
        raise ConfigError(
            f"output '{output}' already exists; pass {option('resume')} to continue it or "
            f"{option('overwrite')} to replace it"
        )
    return output.exists()


def identify_output(output: Path, resume: bool, overwrite: bool) -> dict[str, Any]:
    """An existing output must be this tool's; anything else is never replaced."""
    try:
        return identify(output)
    except ConfigError as exc:
        raise ConfigError(
            f"{exc}; refusing to {'continue' if resume else 'replace' if overwrite else 'touch'} "
            "it: move it away or choose another output"
        ) from None


_RUN = re.compile(r"^run-(\d{6})-")


def _run_order(path: Path) -> tuple[int, str]:
    # New runs are numbered (not timed: clocks and time zones move); older names sort first.
    match = _RUN.match(path.name)
    return (int(match.group(1)) if match else -1, path.name)


def _run_dir(output: Path, fp: dict[str, Any], resume: bool) -> Path:
    """The run to continue (newest, when resuming) or a new one. Raises on a mismatch."""
    root = shards_root(output)
    runs = sorted((p for p in root.glob("run-*") if p.is_dir()), key=_run_order) if root.is_dir() else []
    if resume and runs:
        run_dir = runs[-1]
        old = _read_run_toml(run_dir).get("fingerprint", {})
        diff = _differences(old, fp)
        if diff:
            raise ConfigError(
                f"{option('resume')}: the configuration differs from the run in {run_dir.name} ("
                + "; ".join(diff) + f"); use the same settings, or {option('overwrite')} to start again"
            )
        return run_dir
    number = _run_order(runs[-1])[0] + 1 if runs else 0
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return root / f"run-{max(number, 0):06d}-{stamp}-{os.getpid()}"


@contextlib.contextmanager
def _process_settings_restored() -> Iterator[None]:
    """extract() sets compute threads, TF32/cuDNN flags and the CUDA device for its run; the
    caller gets its own back afterwards."""
    threads = torch.get_num_threads()
    flags = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
             torch.backends.cudnn.benchmark)  # fmt: skip
    cuda_device = torch.cuda.current_device() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32,
         torch.backends.cudnn.benchmark) = flags  # fmt: skip
        if cuda_device is not None:
            torch.cuda.set_device(cuda_device)


@contextlib.contextmanager
def _signals(caught: list[int]) -> Iterator[None]:
    """Collect SIGINT/SIGTERM into ``caught`` instead of dying; a second one stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        if caught:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        caught.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


T = TypeVar("T")


def on_rank0(ctx: Dist, work: Callable[[], T]) -> T:
    """Rank 0 does ``work``; every rank returns its result or raises the same error, so no
    rank is left waiting in a collective after rank 0 failed. An OSError becomes an
    OutputError (one line, exit 1); anything else unexpected is re-raised on rank 0 and
    reported to the other ranks as an OutputError."""
    result: Any = None
    error: BaseException | None = None
    if ctx.rank == 0:
        try:
            result = work()
        except SppError as exc:
            error = exc
        except OSError as exc:
            error = OutputError(f"cannot write the output ({printable(str(exc))})")
        except BaseException as exc:
            if not ctx.active:
                raise
            error = OutputError(f"rank 0 failed: {type(exc).__name__}: {printable(str(exc))}")
            _share(ctx, (None, error))
            raise
    if ctx.active:
        result, error = _share(ctx, (result, error))
        if error is not None and ctx.rank != 0:
            error.reported_by_rank0 = True  # type: ignore[attr-defined]  # rank 0 prints it
    if error is not None:
        raise error
    return result


def _share(ctx: Dist, value: Any) -> Any:
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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
    # Building models (on the meta device too) draws on torch's RNG: the caller's is kept.
    with torch.random.fork_rng(devices=[]):
        return _extract(inputs, Path(output), config or Config(), files_from, resume, overwrite,
                        retry_failed, progress)  # fmt: skip


def _extract(inputs: Sequence[str | os.PathLike[str]], output: Path, config: Config,
             files_from: str | os.PathLike[str] | None, resume: bool, overwrite: bool,
             retry_failed: bool, progress: Callable[[int, int], None] | None) -> Result:  # fmt: skip
    output = output.absolute()
    ctx = _dist_from_env()
    started = time.monotonic()
    resolved = resolve(config)
    device = _device(config, ctx)
    fp = fingerprint(config, resolved)
    if config.weights == "none":
        fp["seed"] = config.seed
    own_group = ctx.active and not dist.is_initialized()
    if own_group:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    lock = OutputLock(output) if ctx.rank == 0 else None
    caught: list[int] = []
    stack = contextlib.ExitStack()
    stack.enter_context(_process_settings_restored())
    try:
        # Rank 0 takes the lock first, then checks what is there, and holds it to the end:
        # nothing can change the output between the check and the writing.
        setup = on_rank0(ctx, lambda: _setup(inputs, output, files_from, config, fp, lock,
                                             resume, overwrite))  # fmt: skip
        trunk = build_trunk(config, resolved)  # loads weights: may still raise ConfigError
        # From here on, things are written; a signal is noted, and acted on between batches.
        stack.enter_context(_signals(caught))
        attempt = on_rank0(ctx, lambda: _prepare(output, setup.run_dir, fp, config, resolved))
        padded = _padded(config, device, trunk)
        dim = spp_dim(trunk.channels, config.levels)
        attrs = run_attrs(
            backbone=resolved.backbone, layer=resolved.layer, weights=resolved.weights,
            weights_id=resolved.weights_id, levels=list(config.levels), pooling=config.pooling,
            channels=trunk.channels,
            feature_dim=dim, dtype=config.dtype, mean=list(resolved.mean),
            std=list(resolved.std), precision=config.precision,
            config=to_toml(resolved_config(config, resolved)),
            spp_extract_version=__version__, torch_version=str(torch.__version__),
            torchvision_version=str(torchvision.__version__), device=device.type,
            batching="padded" if padded else "same-size", world_size=ctx.world,
        )  # fmt: skip
        refs, run_dir = setup.refs, setup.run_dir
        keys, keep = [r.key_bytes for r in refs], _unlisted(refs)
        try:
            processed, failures = _run_rank(
                refs, run_dir, attempt, trunk, config, device, padded, ctx, retry_failed,
                progress, caught,
            )  # fmt: skip
        except (Interrupted, OutputError):
            if ctx.rank == 0 and not setup.keep_old_output:
                _partial_view(output, run_dir, keys, dim, config.dtype, attrs, keep)
            raise
        if ctx.active:
            dist.barrier()

        def finish() -> tuple[int, int]:
            counts = assemble(output, run_dir, keys, dim, config.dtype, attrs, keep_prefixes=keep)
            for other in shards_root(output).glob("run-*"):
                if other != run_dir:  # an --overwrite'n run: the new file is in place now
                    remove_tree(other)
            return counts

        rows, failed = on_rank0(ctx, finish)
        return Result(output, rows, failed, dim, time.monotonic() - started, processed, failures,
                      setup.overlaps)  # fmt: skip
    finally:
        stack.close()
        if lock is not None:
            lock.release(remove_if_unused=True)
        if own_group and dist.is_initialized():
            dist.destroy_process_group()


@dataclass(frozen=True)
class _Setup:
    run_dir: Path
    refs: list[images.ImageRef]
    overlaps: int  # files named by more than one input (used once)
    keep_old_output: bool  # --overwrite of an existing output: it stays until the new one is done


def _setup(inputs: Sequence[str | os.PathLike[str]], output: Path,
           files_from: str | os.PathLike[str] | None, config: Config, fp: dict[str, Any],
           lock: OutputLock | None, resume: bool, overwrite: bool) -> _Setup:  # fmt: skip
    """Rank 0, before anything is written: the output may be written, the inputs, the run."""
    assert lock is not None
    _check_output_name(output, resume, overwrite)
    lock.acquire()
    existed = _check_existing(output, resume, overwrite)
    found = images.find_images(inputs, files_from=files_from,
                               follow_symlinks=config.follow_symlinks)  # fmt: skip
    if not found.refs:
        raise ConfigError("no images found in the inputs (looked for "
                          + ", ".join(sorted(images.IMAGE_EXTENSIONS)) + ")")  # fmt: skip
    return _Setup(_run_dir(output, fp, resume), found.refs, found.overlaps, overwrite and existed)


def _prepare(output: Path, run_dir: Path, fp: dict[str, Any], config: Config,
             resolved: ResolvedModel) -> int:  # fmt: skip
    """Rank 0: the run folder, cleaned of half-written files, with its run.toml; returns the
    number of this attempt (shard names start with it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(output)  # a view or merge killed before its rename
    if remove_partial(run_dir):
        log.info("discarded half-written shards from an interrupted run")
    _write_run_toml(run_dir, fp, resolved_config(config, resolved))
    return next_attempt(run_dir)


def _partial_view(output: Path, run_dir: Path, keys: list[bytes], dim: int, dtype: str,
                  attrs: dict[str, Any], keep: list[bytes]) -> None:  # fmt: skip
    """After an interruption: the output shows what is committed (``complete = false``)."""
    try:
        assemble(output, run_dir, keys, dim, dtype, attrs, complete=False, keep_prefixes=keep)
    except SppError as exc:
        log.info("could not write the partial output (%s)", exc)  # the run's own error says more


def _unlisted(refs: Sequence[images.ImageRef]) -> list[bytes]:
    """Path prefixes of folders that could not be listed: their earlier rows are kept. An
    input folder that cannot be listed at all keeps every earlier row."""
    return [b"" if os.path.normpath(r.key) == os.path.normpath(r.path) else r.key_bytes + b"/"
            for r in refs if r.problem]  # fmt: skip


def _source(ref: images.ImageRef) -> bytes:
    """Where the file is: a resume redoes a stored path that now names another file."""
    return os.fsencode(os.path.abspath(ref.path))


def _padded(config: Config, device: torch.device, trunk: Trunk) -> bool:
    """Whether mixed sizes share batches (masked padding) in this run."""
    padded = config.batching == "padded" or (config.batching == AUTO and device.type == "cuda")
    if padded and not resolve_maskable(trunk):
        log.info("%s cannot use masked padding (it has global ops); batching identical sizes only",
                 config.backbone)  # fmt: skip
        return False
    return padded


def _run_rank(
    refs: Sequence[images.ImageRef], run_dir: Path, attempt: int, trunk: Trunk, config: Config,
    device: torch.device, padded: bool, ctx: Dist, retry_failed: bool,
    progress: Callable[[int, int], None] | None, caught: list[int],
) -> tuple[int, list[tuple[str, str, str]]]:  # fmt: skip
    """This rank's share: work out what is left, plan it, run it, commit shards."""

    def left_to_do() -> list[int]:
        state = read_state(run_dir)
        stats = [file_stat(r) for r in refs]
        return [i for i, r in enumerate(refs)
                if not state.done(r.key_bytes, _source(r), *stats[i], retry_failed)]  # fmt: skip

    todo = on_rank0(ctx, left_to_do)
    workers = _workers(config, device, ctx)
    if device.type == "cpu":
        torch.set_num_threads(max(1, _cores() // ctx.local_world - workers))
    # Header sizes: each rank reads a strided share, then all share them.
    mine = todo[ctx.rank :: ctx.world]
    sizes_mine = read_sizes([refs[i] for i in mine], workers)
    if ctx.active:
        gathered: list[Any] = [None] * ctx.world
        dist.all_gather_object(gathered, sizes_mine)
        sizes = [None] * len(todo)
        for r, part in enumerate(gathered):
            sizes[r :: ctx.world] = part
    else:
        sizes = sizes_mine
    cuts = partition(sizes, ctx.world)
    lo, hi = cuts[ctx.rank], cuts[ctx.rank + 1]
    work = [refs[i] for i in todo[lo:hi]]
    work_sizes = [None if s is None else (max(s[0], trunk.min_side), max(s[1], trunk.min_side))
                  for s in sizes[lo:hi]]  # fmt: skip
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = config.precision != "fp32"  # fp32 stays exact
        torch.backends.cudnn.allow_tf32 = config.precision != "fp32"
        # Padded batches come in few shapes (64-px buckets), so autotuning pays; exact sizes
        # would tune for every new shape.
        torch.backends.cudnn.benchmark = padded
    budget = memory_budget(config.max_memory, device, module_bytes(trunk.module))
    extractor = Extractor(trunk, config, device, padded=padded, budget=budget)
    batch_size, batch_pixels = _batch_limits(config, device, extractor.memory.pixels_within(budget))
    planner = Planner(work_sizes, padded=padded, batch_size=batch_size,
                      batch_pixels=batch_pixels, commit_seconds=config.commit_seconds)  # fmt: skip
    total = len(work)
    if progress:
        progress(0, total)
    if not work:
        return 0, []
    writer = BackgroundWriter()
    shards: dict[int, ShardWriter] = {}
    failures: list[tuple[str, str, str]] = []
    done = 0
    current = -1
    window_started = time.monotonic()

    def shard_for(window: int) -> ShardWriter:
        if window not in shards:
            w = planner.windows[window]
            keys = [r.key_bytes for r in work[w.start : w.stop]]
            sources = [_source(r) for r in work[w.start : w.stop]]
            attrs = {"attempt": attempt, "rank": ctx.rank, "window": window}
            # h5py serialises calls itself, so the writer thread may be busy with the last one
            shards[window] = ShardWriter(run_dir, shard_name(attempt, ctx.rank, window), keys,
                                         sources, extractor.dim, config.dtype, attrs)  # fmt: skip
        return shards[window]

    def commit(window: int) -> None:
        shard = shards.pop(window, None)
        if shard is not None:
            writer.submit(shard.commit)

    def record_failure(shard: ShardWriter, position: int, item: Item) -> None:
        failures.append((work[item.index].key, item.meta.error_class, item.meta.error))
        writer.submit(lambda: shard.fail(position, item.meta))

    def handle(batch: Batch) -> None:
        nonlocal done, current, window_started
        indices = batch.indices + [it.index for it in batch.failures]
        window = planner.window_of(indices[0])
        if window != current:
            if current >= 0:
                elapsed = time.monotonic() - window_started
                planner.rate = planner.window_pixels(current) / max(elapsed, 1e-3)
                commit(current)
            current, window_started = window, time.monotonic()
        shard = shard_for(window)
        start = planner.windows[window].start
        for item in batch.failures:
            record_failure(shard, item.index - start, item)
        if batch.pixels is not None:
            results = extractor(batch.pixels, batch.metas)
            good_pos, good_vec, good_meta = [], [], []
            for index, meta, result in zip(batch.indices, batch.metas, results, strict=True):
                if isinstance(result, ImageError):
                    meta.error_class, meta.error = result.kind, result.message
                    record_failure(shard, index - start, Item(index, None, meta))
                else:
                    good_pos.append(index - start)
                    good_vec.append(result.numpy())
                    good_meta.append(meta)
            if good_pos:
                vectors = np.stack(good_vec)
                writer.submit(lambda: shard.put(good_pos, vectors, good_meta))
        done += len(indices)
        if progress:
            progress(done, total)

    dataset = DecodeDataset(work, trunk.min_side, config)
    try:
        while True:
            loader = DataLoader(
                dataset, batch_sampler=planner, num_workers=workers,
                collate_fn=Collate(BUCKET if padded else 1),
                pin_memory=device.type == "cuda", timeout=config.decode_timeout if workers else 0,
                prefetch_factor=4 if workers else None, persistent_workers=False,
                worker_init_fn=ignore_sigint,
            )  # fmt: skip
            batches = iter(loader)
            try:
                for batch in batches:
                    planner.received()
                    handle(batch)
                    writer.check()
                    if caught:
                        raise Interrupted(caught[0])
                break
            except RuntimeError as exc:
                if workers == 0 or "DataLoader" not in str(exc):
                    raise
                if caught:
                    raise Interrupted(caught[0]) from None
                # A decoder crashed or hung: isolate the images of the batch it was working on.
                log.warning("a decode worker failed (%s); isolating its images", exc)
                del batches  # shuts the remaining workers down (a hung one is terminated)
                planner.rewind()
                suspect = next(iter(planner))  # the first batch not received
                planner.received()
                handle(collate([isolated_decode(work[i], i, trunk.min_side, config)
                                 for i in suspect]))  # fmt: skip
        if current >= 0:
            commit(current)
        writer.drain()
    except Interrupted:
        # Keep everything computed so far: the open shard is committed with its missing rows.
        for window in list(shards):
            commit(window)
        writer.drain()
        raise
    except BaseException:
        writer.close()  # runs what is queued, or skips it after a write error
        for shard in shards.values():
            shard.discard()
        raise
    finally:
        writer.close()
    return total, failures


