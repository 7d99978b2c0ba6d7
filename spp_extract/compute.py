"""Trunk + SPP on one device: uint8 batches in, one ``Vector`` or ``Failure`` per image out.

What happens to each image, in one place (``Extractor.__call__``): an image whose forward
would exceed the memory budget runs alone, tile by tile (``tiling.run_tiled``), or is refused
(``too_large``) on a trunk that cannot be tiled; the others run together (images of one size
together, or all of them with masked padding); a batch that runs out of memory is split, and
a single image that still does not fit is tiled. Every vector is then cast to the stored
dtype and checked finite (``stored``).
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import torch
from torch import Tensor

from .backbones import Trunk
from .config import Config
from .masking import MaskedTrunk
from .memory import show_size
from .model import SppModel
from .records import Failure, Outcome, RowMeta, Vector
from .runtime import Runtime
from .tiling import NotTileable, Tiler

# Suggested instead of a backbone that cannot be tiled.
TILEABLE_HINT = "resnet50, convnext_tiny or densenet121"
FLOAT16_MAX = float(torch.finfo(torch.float16).max)


class Extractor:
    """Trunk + SPP on the run's device, as ``runtime`` decided: masked padding or not, the
    memory budget and model, channels-last, autocast."""

    def __init__(self, trunk: Trunk, config: Config, runtime: Runtime) -> None:
        self.runtime = runtime
        self.config = config
        self.device = runtime.device
        self.budget = runtime.budget
        self.memory = runtime.memory
        # The in-memory API's module; this class adds what a file of mixed sizes needs around
        # it (uint8 in, masks, per-image crops, memory limits).
        self.model = SppModel(trunk, config.levels, config.pooling).to(runtime.device)
        if runtime.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.masked = MaskedTrunk(self.model.trunk) if runtime.padded else None
        self.tiler = Tiler(self.model, runtime) if runtime.tileable else None
        self.dim = self.model.dim
        self.stored_dtype = getattr(torch, config.dtype)

    def __call__(self, pixels: Tensor, metas: Sequence[RowMeta]) -> list[Outcome]:
        """One outcome per image, in order: its ``Vector`` (values in the stored dtype, every
        one finite) or a ``Failure`` (``too_large``, ``out_of_memory``, ``non_finite``).
        ``pixels: Tensor[N, 3, H, W]`` uint8, zero-padded; ``metas`` are read only."""
        outcomes: list[Outcome | None] = [None] * len(metas)
        for rows, large in self._groups(metas):
            part = pixels if len(rows) == len(metas) else pixels[torch.tensor(rows)]
            chosen = [metas[r] for r in rows]
            if large:
                done = [self._large(part, chosen[0], self.budget)]  # type: ignore[arg-type]
            else:
                done = self._fitting(part, chosen)
            for row, outcome in zip(rows, done, strict=True):
                outcomes[row] = stored(outcome, self.stored_dtype)
        return outcomes  # type: ignore[return-value]

    def _groups(self, metas: Sequence[RowMeta]) -> list[tuple[list[int], bool]]:
        """(rows, large) that run together: each image over the budget alone; the rest as one
        group when masked, else one group per size (padding is exact only under masks: a file
        that changed since its header was read must not share a batch with other sizes)."""
        large = [
            self.budget is not None and self.memory.peak(*m.input_size) > self.budget for m in metas
        ]
        groups: dict[object, list[int]] = collections.defaultdict(list)
        for row, meta in enumerate(metas):
            group = ("large", row) if large[row] else None if self.masked else meta.input_size
            groups[group].append(row)
        return [(rows, large[rows[0]]) for rows in groups.values()]

    def _run(
        self, pixels: Tensor, metas: Sequence[RowMeta]
    ) -> tuple[Tensor, list[tuple[int, int]]]:
        """The forward of one batch: (vectors ``Tensor[N, D]``, each image's feature-map
        size). ``pixels`` may be larger than every image (padding): cropped, or masked."""
        inputs = [tuple(m.input_size) for m in metas]
        if self.masked is None:  # one size: the batch is cropped to it
            h, w = inputs[0]
            pixels = pixels[..., :h, :w]
        x = self.model.normalize(pixels, [m.image_size for m in metas])
        if self.runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.runtime.autocast_context():
            if self.masked is not None:
                out, finals = self.masked(x, inputs)
            else:
                out = self.model.trunk(x)
                finals = [tuple(out.shape[-2:])] * len(metas)
        out = out.float()
        vectors = torch.empty(len(metas), self.dim, device=out.device)
        by_size: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
        for row, size in enumerate(finals):
            by_size[tuple(size)].append(row)
        for (h, w), rows in by_size.items():
            index = torch.tensor(rows, device=out.device)
            vectors[index] = self.model.spp(out.index_select(0, index)[:, :, :h, :w])  # (n, D)
        return vectors, [(int(h), int(w)) for h, w in finals]

    def _fitting(self, pixels: Tensor, metas: Sequence[RowMeta]) -> list[Outcome]:
        """A batch that does not fit is split in halves and retried; a single image that still
        does not fit runs tiled (or is recorded ``out_of_memory``)."""
        try:
            with torch.inference_mode():
                vectors, maps = self._run(pixels, metas)
            cpu = vectors.to("cpu", non_blocking=False).unbind(0)
            return [Vector(v, size) for v, size in zip(cpu, maps, strict=True)]
        except (RuntimeError, MemoryError) as exc:
            if not out_of_memory(exc):
                raise
            self._free()
            if len(metas) > 1:
                half = len(metas) // 2
                return self._fitting(pixels[:half], metas[:half]) + self._fitting(
                    pixels[half:], metas[half:]
                )
            if self.tiler is None:
                return [Failure("out_of_memory", "this image does not fit in device memory")]
            # e.g. a GPU whose free memory was less than estimated
            return [self._large(pixels, metas[0], self.memory.peak(*metas[0].input_size) // 4)]

    def _large(self, pixels: Tensor, meta: RowMeta, budget: int) -> Outcome:
        """One image over ``budget``: tiled when the trunk allows it (smaller tiles after each
        out-of-memory error), else refused before anything is allocated."""
        h, w = meta.input_size
        need = self.memory.peak(h, w)
        name = self.config.backbone
        if self.tiler is None:
            return Failure(
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
            except NotTileable as exc:  # the tracer knows better than the module allow-list
                return Failure(
                    "too_large",
                    f"{h}x{w} needs about {show_size(need)}, over max_memory = "
                    f"{show_size(budget)}, and {name} cannot be tiled ({exc}); use a larger "
                    "max_memory",
                )
            except (RuntimeError, MemoryError) as exc:
                if not out_of_memory(exc):
                    raise
                self._free()
                if self.tiler.at_smallest(budget, (h, w)):
                    return Failure(
                        "out_of_memory",
                        f"{h}x{w} does not fit in memory even in the smallest tiles",
                    )
                budget //= 4

    def _tiled(self, pixels: Tensor, meta: RowMeta, budget: int) -> Outcome:
        assert self.tiler is not None
        return self.tiler(pixels, meta.image_size, budget, backbone=self.config.backbone)

    def _free(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def stored(outcome: Outcome, dtype: torch.dtype) -> Outcome:
    """``outcome`` with its values cast to the stored ``dtype``, or a ``non_finite`` failure:
    no row ever holds NaN or inf (the trunk's, or a float16 overflow)."""
    if not isinstance(outcome, Vector):
        return outcome
    values = outcome.values
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        kinds = " and ".join(
            name
            for name, found in (("NaN", values.isnan().any()), ("inf", values.isinf().any()))
            if found
        )
        return Failure(
            "non_finite",
            f"the trunk gave {kinds} in {bad} of {values.numel()} values (look at std, the "
            "weights and precision)",
        )
    cast = values.to(dtype)
    if not bool(torch.isfinite(cast).all()):
        largest = float(values.abs().max())
        return Failure(
            "non_finite",
            f"float16 overflow: values reach {largest:.3g}, over float16's largest "
            f"{FLOAT16_MAX:g} (use dtype = float32, or look at std and the weights)",
        )
    return Vector(cast, outcome.feature_map_size, outcome.tiles)


def out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA, MPS), MemoryError, or the plain RuntimeError that torch's
    CPU allocator raises ("DefaultCPUAllocator: can't allocate memory", "not enough memory")."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    message = str(exc)
    return "DefaultCPUAllocator" in message or any(
        phrase in message.lower()
        for phrase in ("can't allocate memory", "not enough memory", "out of memory")
    )
