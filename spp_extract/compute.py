"""Trunk + SPP on one device: uint8 batches in, one vector (or an out-of-memory failure) per
image out. An image whose forward would exceed the memory budget runs tile by tile (exact), or,
on a trunk that cannot be tiled, is refused (``too_large``) without being attempted."""

from __future__ import annotations

import collections
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .backbones import Trunk
from .config import Config
from .errors import ImageError
from .masking import MaskedTrunk, maskable, meta_copy, valid_mask
from .memory import MemoryModel, memory_model, show_size
from .model import SppModel
from .pooling import spatial_pyramid_pool
from .records import RowMeta
from .tiling import (
    NotTileable,
    ReceptiveField,
    choose_tiling,
    normalising,
    output_size,
    receptive_field,
    smallest_budget,
    smallest_tile,
    tiled_spp,
    tiled_trunk,
)

# Suggested instead of a backbone that cannot be tiled.
TILEABLE_HINT = "resnet50, convnext_tiny or densenet121"


@dataclass(frozen=True)
class Vector:
    """One image's result: its SPP vector and what the trunk made of the image."""

    values: Tensor  # (D,) on the CPU
    feature_map_size: tuple[int, int]
    tiles: int = 0  # tiles the trunk ran on (0: the whole image at once)


Result = Vector | ImageError  # one per image: its vector, or why there is none


class Extractor:
    """Trunk + SPP on one device: uint8 batches in, vectors out. Exact batching of mixed
    sizes when ``padded`` (masked padding), identical sizes otherwise."""

    def __init__(
        self,
        trunk: Trunk,
        config: Config,
        device: torch.device,
        *,
        padded: bool,
        budget: int | None = None,
        memory: MemoryModel | None = None,
    ) -> None:
        """``budget``: bytes one image's forward may use (None: no limit; a single image that
        runs out of memory is still retried tiled). ``memory``: the trunk's memory model, if
        already made (``Runtime.memory``)."""
        self.trunk = trunk
        self.budget = budget
        # Tiling is attempted on the trunks masking accepts (the same locality: each output
        # cell a function of a bounded input window, zero padding); receptive_field's trace then
        # checks every op and may still refuse (NotTileable).
        self.tileable = maskable(trunk.module)  # tiling is attempted on maskable trunks only
        self._memory = memory
        self._field: ReceptiveField | None = None
        self._meta: torch.nn.Module | None = None
        self.config = config
        self.device = device
        # The in-memory API's module: this class adds what a file of mixed sizes needs around
        # it (uint8 in, masks, per-image crops, memory limits).
        self.model = SppModel(trunk, config.levels, config.pooling).to(device)
        self.channels_last = device.type in ("cuda", "cpu")
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.module = self.model.trunk
        self.masked = MaskedTrunk(self.module) if padded else None
        self.mean = torch.tensor(self.model.mean, device=device).view(1, 3, 1, 1)
        self.std = torch.tensor(self.model.std, device=device).view(1, 3, 1, 1)
        self.dim = self.model.dim
        self.autocast = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision)
        self.stored_dtype = getattr(torch, config.dtype)

    def _run(
        self, pixels: Tensor, metas: Sequence[RowMeta]
    ) -> tuple[Tensor, list[tuple[int, int]]]:
        """(vectors ``Tensor[N, D]``, each image's feature map size)."""
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
        with torch.autocast(
            self.device.type, dtype=self.autocast, enabled=self.autocast is not None
        ):
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
            vectors[index] = self.model.spp(part)
        return vectors, [(int(h), int(w)) for h, w in finals]

    @property
    def memory(self) -> MemoryModel:
        if self._memory is None:
            self._memory = memory_model(self.trunk.module, self.config.precision, self.device.type)
        return self._memory

    def __call__(self, pixels: Tensor, metas: list[RowMeta]) -> list[Result]:
        """One result per image, in order: its ``Vector`` (values in the stored dtype, every
        one finite), or a failure (``too_large``, ``out_of_memory``, ``non_finite``). Images
        over the budget run alone, tiled. ``metas`` are read only."""
        return [stored(result, self.stored_dtype) for result in self._results(pixels, metas)]

    def _results(self, pixels: Tensor, metas: list[RowMeta]) -> list[Result]:
        if self.budget is None:
            return self._batch(pixels, metas)
        large = [self.memory.peak(*m.input_size) > self.budget for m in metas]
        if not any(large):
            return self._batch(pixels, metas)
        results: list[Result | None] = [None] * len(metas)
        rest = [row for row, big in enumerate(large) if not big]
        if rest:
            part = pixels.index_select(0, torch.tensor(rest))  # (n, 3, H, W)
            for row, result in zip(rest, self._batch(part, [metas[r] for r in rest]), strict=True):
                results[row] = result
        for row in (r for r, big in enumerate(large) if big):
            results[row] = self._large(pixels[row : row + 1], metas[row], self.budget)
        return results  # type: ignore[return-value]

    def _batch(self, pixels: Tensor, metas: list[RowMeta]) -> list[Result]:
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
        results: list[Result | None] = [None] * len(metas)
        for (h, w), rows in by_size.items():
            part = pixels[torch.tensor(rows)][:, :, :h, :w]  # (n, 3, h, w)
            for row, result in zip(
                rows, self._fitting(part, [metas[r] for r in rows]), strict=True
            ):
                results[row] = result
        return results  # type: ignore[return-value]

    def _fitting(self, pixels: Tensor, metas: list[RowMeta]) -> list[Result]:
        """A batch that does not fit is split in halves and retried; only a single image that
        still fails is recorded."""
        try:
            with torch.inference_mode():
                vectors, maps = self._run(pixels, metas)
            cpu = vectors.to("cpu", non_blocking=False).unbind(0)
            return [Vector(v, size) for v, size in zip(cpu, maps, strict=True)]
        except (RuntimeError, MemoryError) as exc:
            if not _out_of_memory(exc):
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(metas) == 1:
                if self.tileable:  # e.g. a GPU whose free memory was less than estimated
                    h, w = metas[0].input_size
                    return [self._large(pixels, metas[0], self.memory.peak(h, w) // 4)]
                return [ImageError("out_of_memory", "this image does not fit in device memory")]
            half = len(metas) // 2
            return self._fitting(pixels[:half], metas[:half]) + self._fitting(
                pixels[half:], metas[half:]
            )

    def _large(self, pixels: Tensor, meta: RowMeta, budget: int) -> Result:
        """One image over ``budget``: tiled when the trunk allows it (smaller tiles after an
        out-of-memory error), else refused before anything is allocated."""
        h, w = meta.input_size
        need = self.memory.peak(h, w)
        if not self.tileable:
            name = self.config.backbone
            return ImageError(
                "too_large",
                f"{h}x{w} needs about {show_size(need)} through {name}, over max_memory = "
                f"{show_size(budget)}; {name} cannot be tiled (it has global ops such as "
                f"squeeze-excitation), so the image was not attempted; use a tileable backbone "
                f"({TILEABLE_HINT}) or a larger max_memory",
            )
        while True:
            try:
                with torch.inference_mode():
                    return self._tiled(pixels[..., :h, :w], meta, budget)
            except NotTileable as exc:  # the tracer knows better than the module deny-list
                return ImageError(
                    "too_large",
                    f"{h}x{w} needs about {show_size(need)}, over "
                    f"max_memory = {show_size(budget)}, and {self.config.backbone} "
                    f"cannot be tiled ({exc}); use a larger max_memory",
                )
            except (RuntimeError, MemoryError) as exc:
                if not _out_of_memory(exc):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if self._at_minimum(budget, h, w):
                    return ImageError(
                        "out_of_memory",
                        f"{h}x{w} does not fit in memory even in the smallest tiles",
                    )
                budget //= 4

    def _at_minimum(self, budget: int, height: int, width: int) -> bool:
        """Whether ``budget`` already gives tiles of one output cell (nothing smaller to try)."""
        side = smallest_tile(self._tiling()[0])
        return self.memory.peak(side, side) + 3 * height * width >= budget

    def _tiling(self) -> tuple[ReceptiveField, torch.nn.Module]:
        if self._field is None or self._meta is None:
            self._meta = meta_copy(self.trunk.module)
            self._field = receptive_field(self._meta)
        return self._field, self._meta

    def _tiled(self, x: Tensor, meta: RowMeta, budget: int) -> Result:
        """``x: Tensor[1, 3, h, w]`` uint8 -> its vector, with the tiles used. Tiles are sized to fit
        ``budget`` with the uint8 image and the stitched map; where the map itself leaves no
        room, SPP bins are accumulated tile by tile instead. No full-size float copy."""
        field, meta_trunk = self._tiling()
        h, w = x.shape[-2:]
        out_size = output_size(meta_trunk, h, w)
        facts = (field, (h, w), out_size, self.trunk.channels, self.memory)
        tiling = choose_tiling(*facts, budget)
        if not tiling.sensible:
            # Tiles so small that halos and per-tile calls are nearly all the work: refuse.
            better = smallest_budget(*facts, budget)
            return ImageError(
                "too_large",
                f"{h}x{w}: max_memory = {show_size(budget)} leaves room only for tiles that "
                f"would compute the image {tiling.times_over:.0f} times over (halos of "
                f"{self.config.backbone}'s receptive field, and a call per tile); not "
                f"attempted — give max_memory at least {show_size(better, up=True)}",
            )
        plan = tiling.plan
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format
        prepare = normalising(self.mean, self.std, meta.image_size, memory_format=memory_format)
        levels, mode = self.config.levels, self.config.pooling
        with torch.autocast(
            self.device.type, dtype=self.autocast, enabled=self.autocast is not None
        ):
            if tiling.stream:
                vector = tiled_spp(self.module, x, plan, levels, mode, prepare=prepare)  # type: ignore[arg-type]
            else:
                stitched = tiled_trunk(
                    self.module, x, plan, prepare=prepare
                ).float()  # (1, C, h', w')
                vector = spatial_pyramid_pool(stitched, levels, mode)  # type: ignore[arg-type]
        return Vector(vector[0].to("cpu"), (int(out_size[0]), int(out_size[1])), len(plan))


FLOAT16_MAX = float(torch.finfo(torch.float16).max)


def stored(result: Result, dtype: torch.dtype) -> Result:
    """``result`` with its values cast to the stored ``dtype``, or a ``non_finite`` failure:
    no row ever holds NaN or inf (the trunk's, or a float16 overflow)."""
    if not isinstance(result, Vector):
        return result
    values = result.values
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        kinds = " and ".join(
            name
            for name, found in (("NaN", values.isnan().any()), ("inf", values.isinf().any()))
            if found
        )
        return ImageError(
            "non_finite",
            f"the trunk gave {kinds} in {bad} of {values.numel()} values (look at std, the "
            "weights and precision)",
        )
    cast = values.to(dtype)
    if not bool(torch.isfinite(cast).all()):
        largest = float(values.abs().max())
        return ImageError(
            "non_finite",
            f"float16 overflow: values reach {largest:.3g}, over float16's largest "
            f"{FLOAT16_MAX:g} (use dtype = float32, or look at std and the weights)",
        )
    return replace(result, values=cast)


def _out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA, MPS), MemoryError, or the plain RuntimeError that torch's
    CPU allocator raises ("DefaultCPUAllocator: can't allocate memory", "not enough memory")."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(exc)
    return "DefaultCPUAllocator" in message or any(
        phrase in message.lower()
        for phrase in ("can't allocate memory", "not enough memory", "out of memory")
    )
