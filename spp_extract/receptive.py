"""The receptive field of a trunk's output cells, computed, not looked up.

The trunk runs once on the meta device (no memory, no compute) under a torch function mode
that follows every tensor derived from the input and composes, at each conv and pool, its
kernel, stride, padding and dilation into the field of that tensor: output cell ``j`` of a
tensor depends on input rows ``[j*S + lo, j*S + hi]`` (per axis). Ops that keep positions
(pointwise, BN, LayerNorm over channels, add, cat, permute) take the union of their inputs'
fields, so branches (ResNet, DenseNet, GoogLeNet) give the longest path, not a sum. Ops that
mix all positions or move them (adaptive pooling, interpolation, padding, ...) make the trunk
untileable (``NotTileable``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

from .masking import meta_copy


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


def pair(value: object) -> tuple[int, int]:
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
            dilation = pair(values.get("dilation", 1))
            if padding == "same":
                padding = tuple(d * (k - 1) // 2 for k, d in zip(kernel, dilation, strict=True))
            elif padding == "valid":
                padding = 0
        else:
            kernel = pair(values["kernel_size"])
            padding = values.get("padding", 0)
            dilation = pair(values.get("dilation", 1))
        stride = values.get("stride") or kernel  # pools: stride None means the kernel size
        s, p = pair(stride), pair(padding)
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
