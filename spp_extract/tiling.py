"""Exact tiled inference: a trunk run tile by tile equals the trunk run on the whole image.

The receptive field is computed, not looked up: the trunk runs once on the meta device (no
memory, no compute) under a torch function mode that follows every tensor derived from the
input and composes, at each conv and pool, its kernel, stride, padding and dilation into the
field of that tensor: output cell ``j`` of a tensor depends on input rows
``[j*S + lo, j*S + hi]`` (per axis). Ops that keep positions (pointwise, BN, LayerNorm over
channels, add, cat, permute) take the union of their inputs' fields, so branches (ResNet,
DenseNet, GoogLeNet) give the longest path, not a sum. Ops that mix all positions or move
them (adaptive pooling, interpolation, padding, ...) make the trunk untileable.

Tiling rule (the same "valid region" idea as masked padding): output cells are cut into
cores; each tile's input starts on a multiple of the total stride ``S`` (so every layer's
grid lines up with the whole image's) and reaches ``-lo`` before and ``hi`` after its core's
cells (the halo), clipped at the image's true borders, where the tile's own zero padding is
the whole image's. The core of each tile's output then equals the whole-image map there, and
the stitched map has the whole-image size whatever the trunk's floor/ceil rules, because a
tile that starts at a multiple of every layer's stride has exactly the whole image's output
grid, shifted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .masking import meta_copy, valid_mask
from .memory import MemoryModel
from .pooling import PoolingMode

Span = tuple[int, int]  # [start, stop)


@dataclass(frozen=True)
class Field:
    """Where output cell ``j`` looks along one axis: input ``[j*stride + lo, j*stride + hi]``."""

    stride: int = 1
    lo: int = 0
    hi: int = 0

    def then(self, kernel: int, stride: int, padding: int, dilation: int) -> Field:
        """The field after one more conv/pool with these settings."""
        return Field(
            self.stride * stride,
            self.lo - padding * self.stride,
            self.hi + (dilation * (kernel - 1) - padding) * self.stride,
        )

    def union(self, other: Field) -> Field:
        if self.stride != other.stride:
            raise NotTileable(f"branches with strides {self.stride} and {other.stride} meet")
        return Field(self.stride, min(self.lo, other.lo), max(self.hi, other.hi))

    @property
    def radius(self) -> int:
        return max(-self.lo, self.hi, 0)


@dataclass(frozen=True)
class ReceptiveField:
    """Per axis (rows, columns) field of a trunk's output cells in input pixels."""

    rows: Field
    cols: Field

    @property
    def stride(self) -> tuple[int, int]:
        return self.rows.stride, self.cols.stride

    @property
    def radius(self) -> tuple[int, int]:
        return self.rows.radius, self.cols.radius


class NotTileable(ValueError):
    """The trunk has an op whose output is not a local function of its input."""


_POSITIONAL = {  # argument names after the input, in order
    "conv2d": ("weight", "bias", "stride", "padding", "dilation", "groups"),
    "max_pool2d": ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    "max_pool2d_with_indices": ("kernel_size", "stride", "padding", "dilation", "ceil_mode"),
    "avg_pool2d": ("kernel_size", "stride", "padding", "ceil_mode"),
}
# Ops that mix or move positions: a trunk using one on its activations cannot be tiled.
_GLOBAL_OPS = (
    "adaptive",
    "interpolate",
    "upsample",
    "pad",
    "unfold",
    "fold",
    "roll",
    "flip",
    "grid_sample",
    "pixel_shuffle",
    "pixel_unshuffle",
    "matmul",
    "bmm",
    "softmax",
    "scaled_dot_product",
    "multi_head",
    "instance_norm",
    "group_norm",
    "local_response_norm",
)
Dims = tuple[int, int]  # which axes of a tensor are (rows, columns)


def _pair(value: object) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return (int(value[0]), int(value[-1]))
    return (int(value), int(value))  # type: ignore[call-overload]


class _Tracer(TorchFunctionMode):
    """Follows the field (and spatial axes) of every tensor derived from the input through
    one forward."""

    def __init__(self) -> None:
        super().__init__()
        # id -> (tensor, kept alive so that ids stay unique; field; its spatial axes)
        self.fields: dict[int, tuple[Tensor, ReceptiveField, Dims]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat, _ = tree_flatten((args, kwargs))
        known = [
            (t, *self.fields[id(t)][1:])
            for t in flat
            if isinstance(t, Tensor) and id(t) in self.fields
        ]
        if not known:
            return out
        name = getattr(func, "__name__", "").lstrip("_")
        source, _, dims = known[0]
        if any(word in name for word in _GLOBAL_OPS):
            raise NotTileable(f"it applies {name}, which is not a local op")
        if name in _POSITIONAL:
            if dims != (source.dim() - 2, source.dim() - 1):
                raise NotTileable(f"{name} on a tensor whose spatial axes are {dims}")
            field = self._layer(name, known[0][1], args, kwargs)
        else:
            field = _union([f for _, f, _ in known])
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, Tensor) and tensor.dim() >= 2:
                self.fields[id(tensor)] = (
                    tensor,
                    field,
                    _spatial(name, args, source, dims, tensor),
                )
        return out

    @staticmethod
    def _layer(name: str, field: ReceptiveField, args: tuple, kwargs: dict) -> ReceptiveField:
        values = dict(zip(_POSITIONAL[name], args[1:], strict=False)) | kwargs
        if name == "conv2d":
            kernel = tuple(values["weight"].shape[-2:])
            padding = values.get("padding", 0)
            dilation = _pair(values.get("dilation", 1))
            if padding == "same":
                padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
            elif padding == "valid":
                padding = 0
        else:
            kernel = _pair(values["kernel_size"])
            padding = values.get("padding", 0)
            dilation = _pair(values.get("dilation", 1))
        stride = values.get("stride") or kernel  # pools: stride None means the kernel size
        s, p = _pair(stride), _pair(padding)
        return ReceptiveField(
            field.rows.then(kernel[0], s[0], p[0], dilation[0]),
            field.cols.then(kernel[1], s[1], p[1], dilation[1]),
        )


def _spatial(name: str, args: tuple, source: Tensor, dims: Dims, out: Tensor) -> Dims:
    """Where the rows and columns of ``source`` (at ``dims``) went in ``out``."""
    if name in _POSITIONAL:
        return dims  # a conv or pool: its own output grid, same axes
    if name in ("permute", "transpose", "swapaxes", "swapdims"):
        rest = args[1:]
        if name == "permute":
            order = [
                int(d) % source.dim()
                for d in (
                    rest[0] if len(rest) == 1 and isinstance(rest[0], (tuple, list)) else rest
                )
            ]
        else:
            a, b = (int(d) % source.dim() for d in rest[:2])
            order = list(range(source.dim()))
            order[a], order[b] = order[b], order[a]
        return order.index(dims[0]), order.index(dims[1])
    sizes = (source.shape[dims[0]], source.shape[dims[1]])
    if name == "linear" and source.dim() - 1 in dims:
        raise NotTileable("a linear layer mixes positions along a spatial axis")
    if name == "layer_norm":
        normalized = args[1] if len(args) > 1 else ()
        if source.dim() - len(normalized) <= max(dims):
            raise NotTileable("a layer norm normalises over spatial axes")
    if out.dim() == source.dim() and (out.shape[dims[0]], out.shape[dims[1]]) == sizes:
        return dims
    if dims == (source.dim() - 2, source.dim() - 1) and tuple(out.shape[-2:]) == sizes:
        return out.dim() - 2, out.dim() - 1  # view, unsqueeze, x[:, 0]: rows and columns last
    raise NotTileable(
        f"{name} changes the spatial extent ({tuple(source.shape)} -> {tuple(out.shape)})"
    )


def _union(fields: Sequence[ReceptiveField]) -> ReceptiveField:
    rows, cols = fields[0].rows, fields[0].cols
    for f in fields[1:]:
        rows, cols = rows.union(f.rows), cols.union(f.cols)
    return ReceptiveField(rows, cols)


def receptive_field(module: nn.Module, probe: int = 512) -> ReceptiveField:
    """The field of the trunk's output cells, from one meta-device forward of a
    ``probe x probe`` input. Raises :class:`NotTileable` for trunks with global ops."""
    meta = module if _on_meta(module) else meta_copy(module)
    x = torch.empty(1, 3, probe, probe, device="meta")
    tracer = _Tracer()
    tracer.fields[id(x)] = (x, ReceptiveField(Field(), Field()), (2, 3))
    with torch.inference_mode(), tracer:
        out = meta(x)
    if id(out) not in tracer.fields:
        raise NotTileable("its output does not follow from its input through known ops")
    return tracer.fields[id(out)][1]


def _on_meta(module: nn.Module) -> bool:
    return all(t.device.type == "meta" for t in [*module.parameters(), *module.buffers()])


def output_size(meta: nn.Module, height: int, width: int) -> tuple[int, int]:
    """The trunk's output (h, w) for an input of this size (meta device, no compute)."""
    with torch.inference_mode():
        out = meta(torch.empty(1, 3, height, width, device="meta"))
    return int(out.shape[-2]), int(out.shape[-1])


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
    ch, cw = _pair(core)
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


def normalising(
    mean: Tensor,
    std: Tensor,
    image_size: tuple[int, int],
    dtype: torch.dtype = torch.float32,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> Prepare:
    """A ``prepare`` for uint8 tiles: scale to [0, 1], normalise, and zero what lies outside
    the image (the min-size margin), as the whole-image run does; one tile at a time."""

    def prepare(part: Tensor, tile: Tile) -> Tensor:
        x = part.to(mean.device, non_blocking=True).to(dtype).div_(255.0)
        x = (x - mean) / std
        inside = (image_size[0] - tile.rows[0], image_size[1] - tile.cols[0])
        if inside[0] < x.shape[-2] or inside[1] < x.shape[-1]:
            sizes = torch.tensor([inside], device=x.device).expand(x.shape[0], 2)
            x = torch.where(valid_mask(sizes, x.shape[-2], x.shape[-1]), x, 0.0)
        return x.contiguous(memory_format=memory_format)

    return prepare
