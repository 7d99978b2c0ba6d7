"""How much memory one forward pass needs, and how much a run may use.

The estimate replays the trunk on the meta device (no memory, no compute) under a torch
function mode that acts as a bookkeeping allocator: every tensor an op returns adds its bytes
while it is alive (views and in-place results share their source's bytes), and a weak
reference subtracts them when Python frees it, exactly as inference mode frees activations in
the real run. The peak of that count is what the graph itself keeps alive (a residual
block's input while its branch runs, DenseNet's growing concatenation). Kernels also use
workspace the trace cannot see (oneDNN reorders to blocked layouts, im2col buffers, cuDNN
workspace), so the peak is scaled by a calibrated factor, measured as peak RSS on CPU (see
``benchmarks/tiling.py`` and ``tests/test_tiling.py``).
"""

from __future__ import annotations

import math
import os
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .decoding import PREFETCH
from .masking import meta_copy
from .rules import MIN_MEMORY, memory_size

# Measured peak RSS growth of one forward / traced peak, CPU fp32, channels_last, inference
# mode: 0.99-1.00 for resnet18, resnet50 and vgg16 at 2-3 MP (measured while writing this; the
# slow test checks 25%). DenseNet measures about 0.15 GB above its trace whatever the size
# (1.6x at 0.8 MP, 0.97x at 4 MP): a fixed cost, not per pixel, so large images are right.
CPU_FACTOR = 1.0
CUDA_FACTOR = 1.1  # caching allocator: little beyond the tensors themselves


class _Allocator(TorchFunctionMode):
    """Counts the bytes of the live tensors that ops return; the peak is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0

    def _release(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        inputs = {id(t) for t in tree_flatten((args, kwargs))[0] if isinstance(t, Tensor)}
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, Tensor) or id(tensor) in inputs or tensor._base is not None:
                continue  # in place, or a view: no new memory
            if tensor.dim() < 2:  # shapes, scalars, flags
                continue
            nbytes = tensor.numel() * tensor.element_size()
            self.live += nbytes
            weakref.finalize(tensor, self._release, nbytes)
        self.peak = max(self.peak, self.live)
        return out


def traced_peak(
    meta: nn.Module, height: int, width: int, *, batch: int = 1, dtype: torch.dtype = torch.float32
) -> int:
    """Peak bytes of live activations (input included) of one forward on the meta device."""
    allocator = _Allocator()
    x = torch.empty(batch, 3, height, width, device="meta", dtype=dtype)
    allocator.live = allocator.peak = x.numel() * x.element_size()
    with torch.inference_mode(), allocator:
        out = meta(x)
    del out
    return allocator.peak


@dataclass(frozen=True)
class MemoryModel:
    """Peak bytes of one forward as ``fixed + per_pixel * H * W`` (activations grow with the
    area; the intercept absorbs the fixed-size parts of small maps)."""

    per_pixel: float
    fixed: float

    def peak(self, height: int, width: int, batch: int = 1) -> int:
        """Estimated peak bytes of a forward of a ``batch x 3 x height x width`` input."""
        return int(self.fixed + self.per_pixel * height * width * batch)

    def pixels_within(self, budget: float) -> int:
        """The most input pixels whose forward stays within ``budget`` bytes."""
        return max(0, int((budget - self.fixed) / self.per_pixel))


def memory_model(module: nn.Module, precision: str = "fp32", device: str = "cpu") -> MemoryModel:
    """Fit the model from two meta-device traces (512 and 1024 px squares) of ``module``."""
    meta = meta_copy(module)
    factor = CUDA_FACTOR if device == "cuda" else CPU_FACTOR
    # Autocast keeps weights fp32 but activations in the low precision.
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    meta = meta.to(dtype)
    small, large = 512, 1024
    p_small = traced_peak(meta, small, small, dtype=dtype)
    p_large = traced_peak(meta, large, large, dtype=dtype)
    per_pixel = (p_large - p_small) / (large * large - small * small)
    fixed = max(0.0, p_small - per_pixel * small * small)
    # The decoded uint8 image (3 bytes/px) is counted as well (its float copy is the trace's input).
    # Plus a copy of the weights (oneDNN reorders them for channels_last / blocked layouts).
    extra = 3
    return MemoryModel(per_pixel * factor + extra, fixed * factor + module_bytes(module))


# ----------------------------------------------------------------------------- the budget


def show_size(nbytes: float, *, up: bool = False) -> str:
    """'1.5 GB', '542 MB' (three significant digits); ``up``: rounded up, for a least amount."""
    if up and nbytes >= 1:
        step = 10.0 ** max(0, math.floor(math.log10(nbytes)) - 2)
        nbytes = math.ceil(nbytes / step) * step
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{int(nbytes)} B"


def available_bytes() -> int:
    """Memory the kernel can give this process now: MemAvailable (Linux), the cgroup's limit
    when that is lower; elsewhere half the physical memory as a guess."""
    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
                    break
    except OSError:
        pass
    if available is None:
        try:
            available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
        except (ValueError, OSError, AttributeError):
            available = 4 * 10**9
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        (
            "/sys/fs/cgroup/memory/memory.limit_in_bytes",
            "/sys/fs/cgroup/memory/memory.usage_in_bytes",
        ),
    ):
        try:
            with open(limit_file, encoding="ascii") as f:
                limit = f.read().strip()
            with open(usage_file, encoding="ascii") as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 2**60:
            available = min(available, int(limit) - usage)
    return max(0, available)


CPU_SHARE, CUDA_SHARE = 0.5, 0.8


# What decoding holds beside the forward, per decode worker: the worker process itself (an
# allowance, not a measurement: a forked worker shares most pages with the main process) and
# the batches it has decoded ahead (prefetch, uint8 RGB).
WORKER_BYTES = 256 << 20


def decode_bytes(workers: int, batch_pixels: int) -> int:
    """Host memory the decoding side may hold at once: each worker and its prefetched batches,
    and the batch the main process is working on."""
    return workers * (WORKER_BYTES + PREFETCH * 3 * batch_pixels) + 3 * batch_pixels


def memory_budget(
    max_memory: str, device: torch.device, model_bytes: int = 0, decoding: int = 0
) -> int:
    """Bytes one forward (and the image it runs on) may use: ``max_memory``, or for ``auto`` a
    safe share of what is free when the run starts (host memory on CPU, device memory on
    CUDA), less the model's own size and, on CPU, what decoding holds (``decode_bytes``)."""
    if max_memory != "auto":
        size = memory_size(max_memory)
        if size is None:
            raise ValueError(f"max_memory {max_memory!r} is not a size")
        return size
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return max(MIN_MEMORY, int(free * CUDA_SHARE))
    return max(MIN_MEMORY, int(available_bytes() * CPU_SHARE) - model_bytes - decoding)


def module_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])
