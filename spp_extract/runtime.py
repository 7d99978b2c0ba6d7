"""Runtime decisions: the ranks, the device and what ``auto`` settles to (decode workers,
compute threads, batching, memory limits), resolved once per run into a frozen ``Runtime``;
and ``on_rank0``, the one way work done by rank 0 reaches every rank."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .backbones import Trunk
from .config import AUTO, Config
from .devices import Dist, cores
from .errors import ConfigError, Interrupted, OutputError, SppError, option, printable
from .memory import MemoryModel, decode_bytes, memory_budget, memory_model, module_bytes

log = logging.getLogger(__name__)


def decode_workers(config: Config, device: torch.device, ctx: Dist) -> int:
    if config.workers != AUTO:
        return int(config.workers)
    share = max(1, cores() // ctx.local_world)
    if device.type == "cpu":
        # Decoding takes ~10% of CPU compute; a worker would steal a core from compute threads.
        return 0 if share <= 2 else max(1, share // 4)
    return max(1, min(8, share - 1))


def batch_limits(
    config: Config, device: torch.device, fit_pixels: int | None = None
) -> tuple[int, int]:
    """(images, pixels) per batch. ``fit_pixels``: the most pixels one forward may take within
    the memory budget (``batch_pixels = auto`` stays within it)."""
    gpu = device.type != "cpu"
    size = config.batch_size if config.batch_size != AUTO else (64 if gpu else 32)
    pixels = config.batch_pixels if config.batch_pixels != AUTO else (64 if gpu else 8) * 512 * 512
    if config.batch_pixels == AUTO and fit_pixels is not None:
        pixels = max(1, min(pixels, fit_pixels))
    return int(size), int(pixels)


# On a CPU, a batch of one small image leaves most of the machine idle (resnet18, 64 px sides:
# 78 img/s one at a time, 304 in batches of 32), while from about 400 px sides batches gain
# nothing and padding only costs: ``auto`` pads images up to this many pixels only.
SMALL_PIXELS = 384 * 384
EVERY_SIZE = 2**62


def padded_batching(config: Config, device: torch.device, trunk: Trunk) -> int:
    """Up to how many pixels an image may share a batch with other sizes (masked padding):
    every size when asked for ``padded`` (``auto``: on a GPU), images up to SMALL_PIXELS for
    ``auto`` on a CPU, none for ``same-size`` or a trunk where masking is not exact."""
    if config.batching == "same-size":
        return 0
    if not trunk.maskable:
        if config.batching == "padded":
            log.info(
                "%s cannot use masked padding (it has global ops); batching identical sizes only",
                config.backbone,
            )
        return 0
    if config.batching == "padded" or device.type == "cuda":
        return EVERY_SIZE
    return SMALL_PIXELS if device.type == "cpu" else 0  # MPS: same-size, as it was


def batching_name(runtime: Runtime) -> str:
    """How a run batched, as its output's ``batching`` attribute says."""
    if not runtime.padded:
        return "same-size"
    if runtime.pad_pixels >= EVERY_SIZE:
        return "padded"
    return f"padded up to {runtime.pad_pixels} pixels"


ONE_PROCESS = Dist()


@dataclass(frozen=True)
class Runtime:
    """What one run uses, every ``auto`` resolved. Decided once, before any work (``resolve``),
    then only read: by the run, by the output's attributes, by benchmarks."""

    dist: Dist
    device: torch.device
    workers: int  # decode processes (0: decode in the main process)
    threads: int  # torch compute threads (CPU)
    padded: bool  # mixed sizes share batches (masked padding)
    batch_size: int  # images per batch at most
    batch_pixels: int  # padded pixels per batch at most
    budget: int | None  # bytes one forward may use (max_memory); None: no limit
    memory: MemoryModel  # peak bytes of one forward, by input size
    tf32: bool  # TF32 matmuls/convolutions on CUDA (never in fp32 precision)
    # Tiling is attempted on the trunks masking accepts (the same locality: each output cell a
    # function of a bounded input window, zero padding); receptive.receptive_field's trace
    # then checks every op and may still refuse (NotTileable).
    tileable: bool = False
    channels_last: bool = False  # the trunk runs channels-last (CPU and CUDA: faster)
    autocast: torch.dtype | None = None  # bf16/fp16 precision: autocast to this dtype
    # with ``padded``: images up to this many pixels share batches with other sizes, larger
    # ones with their own size only (``auto`` on a CPU: SMALL_PIXELS)
    pad_pixels: int = EVERY_SIZE

    def autocast_context(self) -> contextlib.AbstractContextManager[Any]:
        return torch.autocast(
            self.device.type, dtype=self.autocast, enabled=self.autocast is not None
        )

    @classmethod
    def resolve(
        cls, config: Config, trunk: Trunk, *, device: torch.device, ctx: Dist = ONE_PROCESS
    ) -> Runtime:
        """Every ``auto`` of ``config`` settled for ``trunk`` on ``device`` (``ctx``: this
        process's place among the ranks; the caller decided both)."""
        workers = decode_workers(config, device, ctx)
        _, planned_pixels = batch_limits(config, device)
        budget = memory_budget(
            config.max_memory,
            device,
            module_bytes(trunk.module),
            decode_bytes(workers, planned_pixels),
        )
        memory = memory_model(trunk.module, config.precision, device.type)
        size, pixels = batch_limits(config, device, memory.pixels_within(budget))
        pad_pixels = padded_batching(config, device, trunk)
        return cls(
            dist=ctx,
            device=device,
            workers=workers,
            threads=max(1, cores() // ctx.local_world - workers),
            padded=pad_pixels > 0,
            pad_pixels=pad_pixels,
            batch_size=size,
            batch_pixels=pixels,
            budget=budget,
            memory=memory,
            tf32=config.precision != "fp32",
            tileable=trunk.maskable,
            channels_last=device.type in ("cuda", "cpu"),
            autocast={"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision),
        )

    def warn_about_precision(self) -> None:
        """bf16/fp16 on a CPU without native support for it is emulated, and far slower than
        fp32 (30x on AVX2-only CPUs): a measured warning, once per run (not a refusal: a run
        resumed there must keep the precision it started with)."""
        if self.device.type != "cpu" or self.autocast is None:
            return
        factor = low_precision_slowdown(self.autocast)
        if factor > 2:
            name = "bf16" if self.autocast == torch.bfloat16 else "fp16"
            log.warning(
                "precision %s runs %.0fx slower than fp32 on this CPU (%s: no native %s); "
                "fp32 is faster here, and exact (%s)",
                name,
                factor,
                torch.backends.cpu.get_cpu_capability(),
                name,
                option("precision", "fp32"),
            )

    def apply(self) -> None:
        """Set this process up for the run (``process_settings_restored`` undoes it)."""
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
            torch.backends.cuda.matmul.allow_tf32 = self.tf32
            torch.backends.cudnn.allow_tf32 = self.tf32
            # No autotuning: it times every algorithm once per new input shape, and photos in
            # 64-px buckets under a pixel budget come in too many shapes to repay it (H200,
            # cuDNN 9.19, resnet50, padded photos: 1.4 img/s with it on 64, 11.9 without on 256).
            torch.backends.cudnn.benchmark = False


def _settings() -> tuple[Any, ...]:
    return (
        torch.get_num_threads(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
        torch.cuda.current_device() if torch.cuda.is_initialized() else None,
    )


def _restore(saved: tuple[Any, ...]) -> None:
    threads, matmul, cudnn, benchmark, cuda_device = saved
    torch.set_num_threads(threads)
    torch.backends.cuda.matmul.allow_tf32 = matmul
    torch.backends.cudnn.allow_tf32 = cudnn
    torch.backends.cudnn.benchmark = benchmark
    if cuda_device is not None:
        torch.cuda.set_device(cuda_device)


_SETTINGS_LOCK = threading.Lock()
_runs_in_process: list[Any] = [0, None]  # runs under way in this process, the caller's settings


def settled(config: Config) -> dict[str, Any]:
    """What every ``auto`` of ``config`` settles to in this process, now (``spp-extract config
    --resolve``): the trunk is built with random weights, which size it the same."""
    from .backbones import build_trunk
    from .devices import resolve_device

    ctx = Dist.from_env()
    device = resolve_device(config, ctx)
    trunk = build_trunk(config.replace(weights="none"))
    runtime = Runtime.resolve(config, trunk, device=device, ctx=ctx)
    return {
        "device": str(runtime.device),
        "workers": runtime.workers,
        "threads": runtime.threads,
        "batching": batching_name(runtime),
        "batch_size": runtime.batch_size,
        "batch_pixels": runtime.batch_pixels,
        "max_memory": runtime.budget if runtime.budget is not None else "none",
        "tiling": runtime.tileable,
        "precision": config.precision,
    }


def low_precision_slowdown(dtype: torch.dtype) -> float:
    """How many times slower a 3x3 convolution runs under CPU autocast to ``dtype`` than in
    fp32, measured (about 0.1 s): CPUs with AVX-512 BF16 or AMX gain, others emulate it."""
    conv = torch.nn.Conv2d(64, 64, 3, padding=1).eval()
    x = torch.zeros(1, 64, 64, 64)

    def best(autocast: torch.dtype | None) -> float:
        times = []
        with (
            torch.inference_mode(),
            torch.autocast("cpu", dtype=autocast, enabled=autocast is not None),
        ):
            conv(x)
            for _ in range(3):
                start = time.perf_counter()
                conv(x)
                times.append(time.perf_counter() - start)
        return min(times)

    return best(dtype) / max(best(None), 1e-6)


@contextlib.contextmanager
def process_settings_restored() -> Iterator[None]:
    """A run sets compute threads, TF32/cuDNN flags and the CUDA device; the caller gets its
    own back afterwards. Runs in several threads at once share them: the settings from
    before the first are put back when the last ends."""
    with _SETTINGS_LOCK:
        if _runs_in_process[0] == 0:
            _runs_in_process[1] = _settings()
        _runs_in_process[0] += 1
    try:
        yield
    finally:
        with _SETTINGS_LOCK:
            _runs_in_process[0] -= 1
            if _runs_in_process[0] == 0:
                _restore(_runs_in_process[1])


T = TypeVar("T")


def on_rank0(ctx: Dist, work: Callable[[], T]) -> T:
    """Rank 0 does ``work``; every rank returns its result or raises the same error, so no
    rank is left waiting in a collective after rank 0 failed. An OSError becomes an
    OutputError (one line, exit 1); anything else unexpected is re-raised on rank 0 and
    reported to the other ranks as an OutputError."""
    result: Any = None
    error: BaseException | None = None
    if ctx.rank == 0:
        result, error = _attempt(work, "write the output")
        if error is not None and not isinstance(error, SppError):  # a bug, not the user's
            if ctx.active:
                name = f"{type(error).__name__}: {printable(str(error))}"
                broadcast(ctx, (None, OutputError(f"rank 0 failed: {name}")))
            raise error
    if ctx.active:
        result, error = broadcast(ctx, (result, error))
        if error is not None and ctx.rank != 0:
            error.reported_by_rank0 = True  # type: ignore[attr-defined]  # rank 0 prints it
    if error is not None:
        raise error
    return result


def on_every_rank(ctx: Dist, work: Callable[[], T], what: str) -> T:
    """Every rank does ``work`` (``what``: "build the model"); if it fails anywhere, every
    rank raises, so no rank goes on into a collective that the failed one never joins. The
    failing rank raises its own error; the others an error of the same kind naming it."""
    return gathered(ctx, work, what, everyone=False)  # type: ignore[return-value]


def gathered(
    ctx: Dist, work: Callable[[], T], what: str = "read the inputs", *, everyone: bool = True
) -> Any:
    """Every rank does ``work``; returns every rank's result (a list, in rank order), or with
    ``everyone=False`` this rank's own. If it fails on any rank, every rank raises (see
    ``on_every_rank``)."""
    result, error = _attempt(work, what)
    if error is not None and not isinstance(error, SppError) and not ctx.active:
        raise error
    results = [result]
    if ctx.active:
        gathered_values: list[Any] = [None] * ctx.world
        # Plain values only: an exception class need not pickle, and a rank that failed to
        # send would leave the others waiting.
        sent = None if error is None else (isinstance(error, ConfigError), str(error))
        dist.all_gather_object(gathered_values, (sent, result if everyone else None))
        failed = [(rank, e) for rank, (e, _) in enumerate(gathered_values) if e is not None]
        if failed:
            first, (config_error, message) = failed[0]
            if error is None:
                kind = ConfigError if config_error else OutputError
                error = kind(f"rank {first}: {message}")
            elif not isinstance(error, SppError):
                raise error  # a bug: its traceback, on the rank that hit it
            if ctx.rank != first and not isinstance(error, Interrupted):
                # rank `first` prints it (a signal reaches every rank: each says so itself)
                error.reported_by_rank0 = True  # type: ignore[attr-defined]
        results = [value for _, value in gathered_values]
    if error is not None:
        raise error
    return results if everyone else result


def _attempt(work: Callable[[], T], what: str) -> tuple[Any, BaseException | None]:
    """(``work()``, None), or (None, the error): an SppError as it is, an OSError as an
    OutputError saying what could not be done, anything else (a bug) as it is."""
    try:
        return work(), None
    except SppError as exc:
        return None, exc
    except OSError as exc:
        return None, OutputError(f"cannot {what} ({printable(str(exc))})")
    except BaseException as exc:  # noqa: BLE001 - the caller re-raises it after telling the ranks
        return None, exc


def broadcast(ctx: Dist, value: Any) -> Any:
    """Rank 0's ``value`` on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
