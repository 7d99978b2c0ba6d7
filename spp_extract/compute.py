"""Trunk + SPP on one device: uint8 batches in, one vector (or an out-of-memory failure) per
image out."""

from __future__ import annotations

import collections
from collections.abc import Sequence

import torch
from torch import Tensor

from .backbones import Trunk
from .config import Config
from .errors import ImageError
from .masking import MaskedTrunk, can_mask, valid_mask
from .pooling import spatial_pyramid_pool, spp_dim
from .writer import RowMeta


class Extractor:
    """Trunk + SPP on one device: uint8 batches in, vectors out. Exact batching of mixed
    sizes when ``padded`` (masked padding), identical sizes otherwise."""

    def __init__(self, trunk: Trunk, config: Config, device: torch.device, *, padded: bool) -> None:
        self.trunk = trunk
        self.config = config
        self.device = device
        self.module = trunk.module.to(device)
        self.channels_last = device.type in ("cuda", "cpu")
        if self.channels_last:
            self.module = self.module.to(memory_format=torch.channels_last)
        self.masked = MaskedTrunk(self.module) if padded else None
        self.mean = torch.tensor(trunk.resolved.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(trunk.resolved.std, device=device).view(1, 3, 1, 1)
        self.dim = spp_dim(trunk.channels, config.levels)
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)

    def _run(self, pixels: Tensor, metas: Sequence[RowMeta]) -> Tensor:
        x = pixels.to(self.device, non_blocking=True).float().div_(255.0)
        x = (x - self.mean) / self.std
        sizes = [m.image_size for m in metas]
        if any(tuple(s) != tuple(x.shape[-2:]) for s in sizes):
            # Outside each image (padding, and the min-size margin): exactly 0 after normalising.
            mask = valid_mask(torch.tensor(sizes, device=self.device), x.shape[-2], x.shape[-1])
            x = torch.where(mask, x, 0.0)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        inputs = [m.input_size for m in metas]
        with torch.autocast(self.device.type, dtype=self.autocast, enabled=self.autocast is not None):
            if self.masked is not None:
                out, finals = self.masked(x, inputs)
            else:
                out = self.module(x)
                finals = [tuple(out.shape[-2:])] * len(metas)
        out = out.float()
        vectors = torch.empty(len(metas), self.dim, device=out.device)
        groups: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
        for row, size in enumerate(finals):
            groups[tuple(size)].append(row)
        for (h, w), rows in groups.items():
            index = torch.tensor(rows, device=out.device)
            part = out.index_select(0, index)[:, :, :h, :w]  # (n, C, h, w)
            vectors[index] = spatial_pyramid_pool(part, self.config.levels, self.config.pooling)  # type: ignore[arg-type]
        for meta, size in zip(metas, finals, strict=True):
            meta.feature_map_size = (int(size[0]), int(size[1]))
        return vectors

    def __call__(self, pixels: Tensor, metas: list[RowMeta]) -> list[Tensor | ImageError]:
        """One result per image, in order: its vector, or an out-of-memory failure.

        Without masking, padding is not exact, so a batch whose images differ in size (a file
        that changed since its header was read, a header that disagrees with its pixels) runs
        as one sub-batch per size, each cropped to its own size."""
        if self.masked is not None:
            return self._fitting(pixels, metas)
        by_size: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
        for row, meta in enumerate(metas):
            by_size[tuple(meta.input_size)].append(row)  # type: ignore[arg-type]
        if len(by_size) == 1:
            (h, w), _ = by_size.popitem()
            return self._fitting(pixels[:, :, :h, :w], metas)
        results: list[Tensor | ImageError | None] = [None] * len(metas)
        for (h, w), rows in by_size.items():
            part = pixels[torch.tensor(rows)][:, :, :h, :w]  # (n, 3, h, w)
            for row, result in zip(rows, self._fitting(part, [metas[r] for r in rows]), strict=True):
                results[row] = result
        return results  # type: ignore[return-value]

    def _fitting(self, pixels: Tensor, metas: list[RowMeta]) -> list[Tensor | ImageError]:
        """A batch that does not fit is split in halves and retried; only a single image that
        still fails is recorded."""
        try:
            with torch.inference_mode():
                vectors = self._run(pixels, metas)
            return list(vectors.to("cpu", non_blocking=False).unbind(0))
        except (RuntimeError, MemoryError) as exc:
            if not _out_of_memory(exc):
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(metas) == 1:
                return [ImageError("out_of_memory", "this image does not fit in device memory")]
            half = len(metas) // 2
            return self._fitting(pixels[:half], metas[:half]) + self._fitting(pixels[half:], metas[half:])


def _out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA, MPS), MemoryError, or the plain RuntimeError that torch's
    CPU allocator raises ("DefaultCPUAllocator: can't allocate memory", "not enough memory")."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(exc)
    return "DefaultCPUAllocator" in message or any(
        phrase in message.lower() for phrase in ("can't allocate memory", "not enough memory", "out of memory")
    )


def resolve_maskable(trunk: Trunk) -> bool:
    return trunk.resolved.maskable and can_mask(trunk.module)
