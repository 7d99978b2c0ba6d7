"""Exact tiled inference: a trunk run tile by tile equals the trunk run on the whole image.

Tiling rule (the same "valid region" idea as masked padding): output cells are cut into
cores; each tile's input starts on a multiple of the total stride ``S`` (so every layer's
grid lines up with the whole image's) and reaches ``-lo`` before and ``hi`` after its core's
cells (the halo, from ``receptive.receptive_field``), clipped at the image's true borders,
where the tile's own zero padding is the whole image's. The core of each tile's output then
equals the whole-image map there, and the stitched map has the whole-image size whatever the
trunk's floor/ceil rules, because a tile that starts at a multiple of every layer's stride has
exactly the whole image's output grid, shifted.

``Tiler`` is the tiled path of an extraction: tiles sized to a memory budget (``choose_tiling``),
refused when they would cost far more than the whole image, run and stitched (or the SPP bins
accumulated tile by tile when even the map does not fit).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .masking import meta_copy
from .memory import MemoryModel, show_size
from .pooling import PoolingMode, spatial_pyramid_pool
from .receptive import Field, NotTileable, ReceptiveField, output_size, pair, receptive_field
from .records import Failure, Outcome, Vector

if TYPE_CHECKING:
    from .model import SppModel
    from .runtime import Runtime

Span = tuple[int, int]  # [start, stop)
__all__ = [
    "NotTileable",
    "Tiler",
    "fitting_core",
    "meta_copy",
    "output_size",
    "plan_tiles",
    "receptive_field",
    "tiled_spp",
    "tiled_trunk",
]


@dataclass(frozen=True)
class Tile:
    rows: Span  # input pixels [start, stop)
    cols: Span
    out_rows: Span  # the core: whole-map cells this tile provides
    out_cols: Span


@dataclass(frozen=True)
class TilePlan:
    size: tuple[int, int]  # input (H, W)
    out_size: tuple[int, int]  # whole-image map (h, w)
    field: ReceptiveField
    tiles: tuple[Tile, ...]

    def __len__(self) -> int:
        return len(self.tiles)

    @property
    def largest(self) -> tuple[int, int]:
        """The largest tile's input (height, width)."""
        return (
            max(t.rows[1] - t.rows[0] for t in self.tiles),
            max(t.cols[1] - t.cols[0] for t in self.tiles),
        )


def _axis(length: int, cells: int, field: Field, core: int) -> list[tuple[Span, Span]]:
    spans = []
    s = field.stride
    for j0 in range(0, cells, core):
        j1 = min(cells, j0 + core)
        start = max(0, j0 * s + field.lo) // s * s  # on the stride grid, halo >= -lo
        stop = min(length, (j1 - 1) * s + field.hi + 1)  # halo >= hi, none past the border
        spans.append(((start, stop), (j0, j1)))
    return spans


def plan_tiles(
    field: ReceptiveField,
    size: tuple[int, int],
    out_size: tuple[int, int],
    core: int | tuple[int, int],
) -> TilePlan:
    """Cut a ``size`` input whose whole map is ``out_size`` into tiles whose cores are
    ``core`` output cells (``core * stride`` input pixels) per side."""
    ch, cw = pair(core)
    if ch < 1 or cw < 1:
        raise ValueError(f"core must be at least one output cell, got {core}")
    rows = _axis(size[0], out_size[0], field.rows, ch)
    cols = _axis(size[1], out_size[1], field.cols, cw)
    tiles = tuple(Tile(r, c, orr, oc) for r, orr in rows for c, oc in cols)
    return TilePlan(tuple(size), tuple(out_size), field, tiles)  # type: ignore[arg-type]


def fitting_core(
    field: ReceptiveField, size: tuple[int, int], out_size: tuple[int, int], tile_pixels: float
) -> tuple[int, int]:
    """The core (output cells, per axis) whose tiles, halos included and clipped at the
    borders, each have at most ``tile_pixels`` input pixels and together compute the fewest
    pixels (fewer tiles on a tie); (1, 1) if none fits. Cores are balanced: n tiles along an
    axis of m cells get ceil(m / n) cells each, so no thin last tile pays a full halo."""

    def options(length: int, cells: int, axis_field: Field) -> list[tuple[int, int, int, int]]:
        """(core, largest tile side, sum of tile sides, tiles) for each distinct core."""
        found = {}
        for n in range(1, cells + 1):
            core = -(-cells // n)
            if core not in found:
                sides = [b - a for (a, b), _ in _axis(length, cells, axis_field, core)]
                found[core] = (core, max(sides), sum(sides), len(sides))
        return list(found.values())

    best: tuple[int, int, int, int] | None = None  # (work, tiles, row core, col core)
    for rc, rmax, rsum, rn in options(size[0], out_size[0], field.rows):
        for cc, cmax, csum, cn in options(size[1], out_size[1], field.cols):
            if rmax * cmax <= tile_pixels:
                candidate = (rsum * csum, rn * cn, rc, cc)
                best = candidate if best is None else min(best, candidate)
    return (1, 1) if best is None else (best[2], best[3])


# Tiling may cost at most this many times what the whole image costs (halos overlap).
MAX_TILING_COST = 32
# What one more tile costs beyond its pixels (a forward call through every layer), in pixels
# of compute: measured on CPU, a resnet18 forward of a 32 x 32 input takes as long as about
# 9,000 pixels of a large input, resnet50's about 10,000.
TILE_CALL_PIXELS = 16_384


@dataclass(frozen=True)
class Tiling:
    """How one image runs within a memory budget: its tiles, and whether the SPP bins are
    accumulated tile by tile (``stream``: the stitched map itself would not fit)."""

    plan: TilePlan
    stream: bool

    @property
    def cost(self) -> int:
        """Pixels computed, halos included, plus each tile's call (``TILE_CALL_PIXELS``)."""
        work = sum((t.rows[1] - t.rows[0]) * (t.cols[1] - t.cols[0]) for t in self.plan.tiles)
        return work + len(self.plan) * TILE_CALL_PIXELS

    @property
    def sensible(self) -> bool:
        """Whether it costs at most ``MAX_TILING_COST`` times the whole image's run."""
        h, w = self.plan.size
        return self.cost <= MAX_TILING_COST * (h * w + TILE_CALL_PIXELS)

    @property
    def times_over(self) -> float:
        h, w = self.plan.size
        return self.cost / (h * w + TILE_CALL_PIXELS)


def smallest_tile(field: ReceptiveField) -> int:
    """Side of the smallest sensible tile: its halos and one output cell."""
    return max(field.rows.hi - field.rows.lo, field.cols.hi - field.cols.lo) + max(field.stride)


def choose_tiling(
    field: ReceptiveField,
    size: tuple[int, int],
    out_size: tuple[int, int],
    channels: int,
    memory: MemoryModel,
    budget: int,
) -> Tiling:
    """Tiles for an input of ``size`` (uint8, held whole) whose whole map is ``out_size``
    with ``channels``, each tile's forward within ``budget`` bytes beside the image and (if
    it fits) the stitched map; without room for the map, SPP is accumulated tile by tile."""
    held = 3 * size[0] * size[1]
    fmap = channels * out_size[0] * out_size[1] * 4
    least = smallest_tile(field)
    stream = budget - held - fmap < memory.peak(least, least)
    room = budget - held - (0 if stream else fmap)
    core = fitting_core(field, size, out_size, memory.pixels_within(room))
    return Tiling(plan_tiles(field, size, out_size, core), stream)


def smallest_budget(
    field: ReceptiveField,
    size: tuple[int, int],
    out_size: tuple[int, int],
    channels: int,
    memory: MemoryModel,
    budget: int,
) -> int:
    """The least budget, from ``budget`` up, under which an input of ``size`` runs whole or
    in sensible tiles (``Tiling.sensible``)."""
    whole = memory.peak(*size)
    low, high = budget, max(budget, whole)  # high always works: the whole image fits
    while low < high:
        middle = (low + high) // 2
        if choose_tiling(field, size, out_size, channels, memory, middle).sensible:
            high = middle
        else:
            low = middle + 1
    return high


Prepare = Callable[[Tensor, Tile], Tensor]


def _tile_outputs(
    module: nn.Module, x: Tensor, plan: TilePlan, prepare: Prepare | None
) -> Iterator[tuple[Tile, Tensor]]:
    """Each tile's core of the trunk output, ``Tensor[N, C, j1-j0, k1-k0]``."""
    sh, sw = plan.field.stride
    for tile in plan.tiles:
        part = x[..., tile.rows[0] : tile.rows[1], tile.cols[0] : tile.cols[1]]
        if prepare is not None:
            part = prepare(part, tile)
        out = module(part)
        r0, c0 = tile.out_rows[0] - tile.rows[0] // sh, tile.out_cols[0] - tile.cols[0] // sw
        r1, c1 = tile.out_rows[1] - tile.rows[0] // sh, tile.out_cols[1] - tile.cols[0] // sw
        if r1 > out.shape[-2] or c1 > out.shape[-1]:
            raise RuntimeError(
                f"tile {tile} gave a {tuple(out.shape[-2:])} map; expected at "
                f"least {(r1, c1)} (receptive field {plan.field})"
            )
        yield tile, out[..., r0:r1, c0:c1]
        del out


def tiled_trunk(
    module: nn.Module, x: Tensor, plan: TilePlan, *, prepare: Prepare | None = None
) -> Tensor:
    """Run ``module`` on ``x: Tensor[N, 3, H, W]`` tile by tile; returns the stitched map
    ``Tensor[N, C, h, w]`` (``plan.out_size``), equal to ``module(x)``.

    ``prepare(part, tile)``: turns each tile's slice of ``x`` into the trunk's input (for
    example uint8 -> normalised float), so no full-size float copy of ``x`` is made."""
    out: Tensor | None = None
    for tile, core in _tile_outputs(module, x, plan, prepare):
        if out is None:
            out = core.new_empty(*core.shape[:-2], *plan.out_size)  # (N, C, h, w)
        out[..., tile.out_rows[0] : tile.out_rows[1], tile.out_cols[0] : tile.out_cols[1]] = core
    assert out is not None
    return out


def _bins(length: int, n: int) -> list[Span]:
    """SPP bin edges along an axis (pooling.py's rule)."""
    return [(i * length // n, -(-(i + 1) * length // n)) for i in range(n)]


def tiled_spp(
    module: nn.Module,
    x: Tensor,
    plan: TilePlan,
    levels: Sequence[int],
    mode: PoolingMode = "max",
    *,
    prepare: Prepare | None = None,
) -> Tensor:
    """``spatial_pyramid_pool(tiled_trunk(...))`` without holding the map: each tile's core
    is folded into the bins (max of maxima; sums and counts for average), bin edges from the
    whole map's size. Returns ``Tensor[N, D]``."""
    if mode not in ("max", "avg"):
        raise ValueError(f"unknown pooling mode {mode!r}; expected 'max' or 'avg'")
    h, w = plan.out_size
    edges = [(_bins(h, n), _bins(w, n)) for n in levels]
    acc: list[Tensor] = []
    for tile, core in _tile_outputs(module, x, plan, prepare):
        core = core.float()
        if not acc:
            fill = float("-inf") if mode == "max" else 0.0
            acc = [core.new_full((*core.shape[:-2], n, n), fill) for n in levels]  # (N, C, n, n)
        for block, (row_bins, col_bins) in zip(acc, edges, strict=True):
            for i, (a0, a1) in enumerate(row_bins):
                r0, r1 = max(a0, tile.out_rows[0]), min(a1, tile.out_rows[1])
                if r0 >= r1:
                    continue
                for j, (b0, b1) in enumerate(col_bins):
                    c0, c1 = max(b0, tile.out_cols[0]), min(b1, tile.out_cols[1])
                    if c0 >= c1:
                        continue
                    cell = core[
                        ...,
                        r0 - tile.out_rows[0] : r1 - tile.out_rows[0],
                        c0 - tile.out_cols[0] : c1 - tile.out_cols[0],
                    ]
                    if mode == "max":
                        block[..., i, j] = torch.maximum(block[..., i, j], cell.amax(dim=(-2, -1)))
                    else:
                        block[..., i, j] += cell.sum(dim=(-2, -1))
        del core
    if mode == "avg":
        for block, (row_bins, col_bins) in zip(acc, edges, strict=True):
            counts = torch.tensor(
                [[(a1 - a0) * (b1 - b0) for b0, b1 in col_bins] for a0, a1 in row_bins],
                dtype=block.dtype,
                device=block.device,
            )
            block /= counts
    return torch.cat([block.flatten(1) for block in acc], dim=1)


class Tiler:
    """The tiled path of an extraction: one uint8 image over the memory budget -> its vector,
    with the tiles used, or a ``too_large`` failure when tiles that fit would cost more than
    ``MAX_TILING_COST`` times the whole image (the least budget that works is named). The
    receptive field is traced once, on first use. No full-size float copy of the image: each
    tile is normalised as it runs (``SppModel.normalize``)."""

    def __init__(self, model: SppModel, runtime: Runtime) -> None:
        self.model = model
        self.runtime = runtime
        self._traced: tuple[ReceptiveField, nn.Module] | None = None

    def _field(self) -> tuple[ReceptiveField, nn.Module]:
        if self._traced is None:
            meta = meta_copy(self.model.trunk)
            self._traced = receptive_field(meta), meta
        return self._traced

    def at_smallest(self, budget: int, size: tuple[int, int]) -> bool:
        """Whether ``budget`` already gives tiles of one output cell (nothing smaller to try)."""
        side = smallest_tile(self._field()[0])
        return self.runtime.memory.peak(side, side) + 3 * size[0] * size[1] >= budget

    def __call__(
        self, pixels: Tensor, image_size: tuple[int, int], budget: int, *, backbone: str
    ) -> Outcome:
        """``pixels: Tensor[1, 3, h, w]`` uint8 (the input, min-size margin included)."""
        field, meta = self._field()
        h, w = pixels.shape[-2:]
        out_size = output_size(meta, h, w)
        facts = (field, (h, w), out_size, self.model.channels, self.runtime.memory)
        tiling = choose_tiling(*facts, budget)
        if not tiling.sensible:
            # Tiles so small that halos and per-tile calls are nearly all the work: refuse.
            better = smallest_budget(*facts, budget)
            return Failure(
                "too_large",
                f"{h}x{w}: max_memory = {show_size(budget)} leaves room only for tiles that "
                f"would compute the image {tiling.times_over:.0f} times over (halos of "
                f"{backbone}'s receptive field, and a call per tile); not attempted — give "
                f"max_memory at least {show_size(better, up=True)}",
            )
        memory_format = (
            torch.channels_last if self.runtime.channels_last else torch.contiguous_format
        )

        def prepare(part: Tensor, tile: Tile) -> Tensor:
            inside = (image_size[0] - tile.rows[0], image_size[1] - tile.cols[0])
            return self.model.normalize(part, [inside]).contiguous(memory_format=memory_format)

        levels, mode = self.model.spp.levels, self.model.spp.mode
        trunk = self.model.trunk
        with self.runtime.autocast_context():
            if tiling.stream:
                vector = tiled_spp(trunk, pixels, tiling.plan, levels, mode, prepare=prepare)
            else:
                stitched = tiled_trunk(trunk, pixels, tiling.plan, prepare=prepare)
                vector = spatial_pyramid_pool(stitched.float(), levels, mode)  # (1, D)
        return Vector(vector[0].to("cpu"), (int(out_size[0]), int(out_size[1])), len(tiling.plan))
