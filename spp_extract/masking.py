"""Exact batching of images of different sizes ("masked padding").

Images are padded at the bottom/right to a common size. Zero padding alone changes features
near the padded edges (cosine ~0.98 against per-image runs on ResNet). It becomes exact for
trunks made only of local ops when, before every op that mixes neighbouring positions (a conv
with kernel > 1, a max/avg pool), each image's activation outside its own valid region is
replaced by what the per-image run would see there: 0 for convs and average pools (their
zero padding), -inf for max pools (theirs). The valid region at every such point is the
feature-map size the per-image run has there, found once per side length by running the trunk
on the meta device (no compute). The trunk output is then cropped to each image's valid size.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.models.convnext import CNBlock, LayerNorm2d
from torchvision.models.densenet import _DenseBlock, _DenseLayer
from torchvision.models.googlenet import BasicConv2d as GoogLeNetConv
from torchvision.models.googlenet import Inception
from torchvision.models.mnasnet import _InvertedResidual as MNASNetBlock
from torchvision.models.mobilenetv2 import InvertedResidual as MobileNetV2Block
from torchvision.models.regnet import ResBottleneckBlock
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.shufflenetv2 import InvertedResidual as ShuffleNetBlock
from torchvision.models.squeezenet import Fire
from torchvision.ops import Permute, StochasticDepth

Size = tuple[int, int]


def _mixes_positions(module: nn.Module) -> bool:
    """Whether the module reads neighbouring positions or its own padding (masked before it)."""
    if isinstance(module, nn.Conv2d):
        padded = isinstance(module.padding, tuple) and any(module.padding)
        return module.kernel_size != (1, 1) or padded
    return isinstance(module, (nn.MaxPool2d, nn.AvgPool2d))


# An allow-list: only what has been checked exact under masking passes; anything else (squeeze-
# excitation, adaptive or functional pooling, attention, group/instance norm, a block whose
# forward() has not been read) refuses, so a new module can never be batched inexactly.
_POINTWISE = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Sigmoid,
    nn.Tanh,
    nn.LeakyReLU,
    nn.Identity,
    LayerNorm2d,
)
# Evaluation mode only: in training mode these use batch statistics or randomness.
_POINTWISE_IN_EVAL = (nn.Dropout, nn.Dropout2d, StochasticDepth)
# Blocks whose forward() only runs their children and adds, concatenates, splits or shuffles
# channels: exact when their children are.
_BLOCKS = (
    BasicBlock,
    Bottleneck,
    _DenseBlock,
    _DenseLayer,
    MobileNetV2Block,
    ResBottleneckBlock,
    CNBlock,
    Fire,
    ShuffleNetBlock,
    MNASNetBlock,
    GoogLeNetConv,
    Inception,
)
# Per-position only where the channels are the last axis: inside a ConvNeXt block, between its
# two Permutes (Linear and LayerNorm over channels).
_CHANNELS_LAST = (Permute, nn.LayerNorm, nn.Linear)


def _refusal(module: nn.Module, in_convnext_block: bool = False) -> str | None:
    """Why ``module`` is not known to be exact under masked padding; None when it and all its
    children are."""
    if isinstance(module, nn.Conv2d):
        if module.padding_mode != "zeros":  # reflect/replicate/circular: copies of the border
            return f"{module} pads with {module.padding_mode!r}, not zeros"
    elif isinstance(module, nn.AvgPool2d):
        if module.ceil_mode:  # the last window's divisor depends on where the image ends
            return f"{module} has ceil_mode=True"
        if module.padding and not module.count_include_pad:
            return f"{module} excludes its padding from the average"
    elif isinstance(module, nn.BatchNorm2d):
        if module.training or not module.track_running_stats:
            return f"{module} normalises with the batch's statistics"
    elif isinstance(module, _POINTWISE_IN_EVAL):
        if module.training:
            return f"{module} is in training mode"
    elif isinstance(module, _CHANNELS_LAST) and not isinstance(module, LayerNorm2d):
        if not in_convnext_block:
            return f"{module} outside a ConvNeXt block may mix positions"
    elif not (
        isinstance(module, (nn.MaxPool2d, *_POINTWISE, *_BLOCKS))
        or type(module).forward is nn.Sequential.forward
        or getattr(type(module), "pointwise", False) is True
    ):
        return f"{type(module).__name__} is not known to be exact under masking"
    inner = in_convnext_block or isinstance(module, CNBlock)
    for child in module.children():
        if (reason := _refusal(child, inner)) is not None:
            return reason
    return None


def meta_copy(module: nn.Module) -> nn.Module:
    """The same architecture on the meta device, in eval mode, for sizes, fields and memory
    traces; no parameter or buffer is copied (each is mapped straight to its meta twin)."""
    memo: dict[int, object] = {}
    for t in [*module.parameters(), *module.buffers()]:
        meta = t.to("meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy.deepcopy(module, memo).eval()


# Modules that keep their input's shape: in the copy that only finds sizes they are skipped
# (on the meta device BatchNorm and LayerNorm run as Python decompositions, ~10x the rest).
_SAME_SHAPE = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, *_POINTWISE, *_POINTWISE_IN_EVAL)


def _shape_copy(trunk: nn.Module) -> nn.Module:
    """``meta_copy(trunk)`` with the modules that keep shapes replaced by Identity: the sizes
    at every conv and pool are the same, found in a fraction of the time (profiled: finding
    them was 58% of a run on small images of many sizes)."""
    meta = meta_copy(trunk)
    for parent in list(meta.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, _SAME_SHAPE):
                setattr(parent, name, nn.Identity())
    return meta


def maskable(trunk: nn.Module) -> bool:
    """Whether ``trunk`` gives each image of a masked padded batch exactly its own result: the
    one decision on masked padding (``MaskedTrunk`` refuses other trunks). Tiling rests on the
    same locality and is attempted only on maskable trunks (see ``compute``).

    A module may declare itself per-position with a class attribute ``pointwise = True``."""
    return _refusal(trunk) is None


Reach = tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int]]


def _pair(value: object) -> tuple[int, int] | None:
    if isinstance(value, int):
        return value, value
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return value  # type: ignore[return-value]
    return None


def _reach(module: nn.Module) -> Reach | None:
    """(kernel, stride, padding, dilation) of a conv or average pool, each as (rows, cols);
    None when they are not plain numbers (then the whole padded region is masked)."""
    if isinstance(module, nn.Conv2d):
        parts = (module.kernel_size, module.stride, module.padding, module.dilation)
    elif isinstance(module, nn.AvgPool2d) and not module.ceil_mode:
        parts = (module.kernel_size, module.stride or module.kernel_size, module.padding, 1)
    else:
        return None
    pairs = [_pair(p) for p in parts]
    return None if any(p is None for p in pairs) else tuple(pairs)  # type: ignore[return-value]


def _last_read(out: int, reach: Reach, axis: int) -> int:
    """The last input position (rows: axis 0) that the ``out`` valid outputs read."""
    kernel, stride, padding, dilation = (part[axis] for part in reach)
    return (out - 1) * stride - padding + (kernel - 1) * dilation


def valid_mask(sizes: Tensor, height: int, width: int) -> Tensor:
    """``sizes: Tensor[N, 2]`` valid (h, w) per image -> ``Tensor[N, 1, height, width]`` bool,
    True inside each image's top-left ``h x w`` region."""
    inside_rows = torch.arange(height, device=sizes.device)[None, :] < sizes[:, :1]  # (N, H)
    inside_cols = torch.arange(width, device=sizes.device)[None, :] < sizes[:, 1:]  # (N, W)
    return (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None]


class MaskedTrunk:
    """Runs a trunk on a padded batch so that each image's result equals its own run."""

    def __init__(self, trunk: nn.Module) -> None:
        if (reason := _refusal(trunk)) is not None:
            raise ValueError(f"masked padding would not be exact for this trunk: {reason}")
        self.trunk = trunk
        self.points = [m for m in trunk.modules() if _mixes_positions(m)]
        self._meta = _shape_copy(trunk)
        self._meta_points = [m for m in self._meta.modules() if _mixes_positions(m)]
        # side length -> valid sizes along that axis: (in, out) at each point, then final
        self._rows: dict[int, tuple[int, ...]] = {}
        self._cols: dict[int, tuple[int, ...]] = {}
        self._batch: Tensor | None = None  # (P, 2, N, 2): per point, in/out, image, (h, w)
        # per point, (kernel, stride, padding, dilation) as (rows, cols) pairs, for a conv or
        # average pool whose reach is known: only the strip its valid outputs read beyond each
        # image is zeroed (in place), not the whole padded region
        self._reach = [_reach(m) for m in self.points]
        self._strips: list[list[tuple[int, int, int, int, int]]] | None = None
        for index, module in enumerate(self.points):
            fill = float("-inf") if isinstance(module, nn.MaxPool2d) else 0.0
            module.register_forward_pre_hook(self._pre_hook(index, fill))
            if isinstance(module, nn.MaxPool2d):
                module.register_forward_hook(self._post_hook(index))

    def _trace(self, height: int, width: int) -> None:
        count = len(self._meta_points)
        shapes: list[Size] = [(0, 0)] * (2 * count + 1)
        calls = [0] * count

        def recorder(index: int):  # noqa: ANN202
            def record(_m: nn.Module, args: tuple[Tensor, ...], out: Tensor) -> None:
                calls[index] += 1
                shapes[2 * index] = tuple(args[0].shape[-2:])
                shapes[2 * index + 1] = tuple(out.shape[-2:])

            return record

        hooks = [m.register_forward_hook(recorder(i)) for i, m in enumerate(self._meta_points)]
        try:
            out = self._meta(torch.empty(1, 3, height, width, device="meta"))
        finally:
            for hook in hooks:
                hook.remove()
        if any(c != 1 for c in calls):
            raise ValueError("masked padding needs every conv/pool module to run exactly once")
        shapes[-1] = tuple(out.shape[-2:])
        self._rows[height] = tuple(s[0] for s in shapes)
        self._cols[width] = tuple(s[1] for s in shapes)

    def sizes(self, size: Size) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Valid heights and widths at every point (in, out, in, out, ..., final) for one image."""
        height, width = size
        if height not in self._rows or width not in self._cols:
            self._trace(height, width)
            if height not in self._rows:  # widths were cached; trace the missing height alone
                self._trace(height, height)
            if width not in self._cols:
                self._trace(width, width)
        return self._rows[height], self._cols[width]

    def output_size(self, size: Size) -> Size:
        rows, cols = self.sizes(size)
        return rows[-1], cols[-1]

    def _mask(self, index: int, which: int, x: Tensor) -> Tensor:
        assert self._batch is not None
        return valid_mask(self._batch[2 * index + which], x.shape[-2], x.shape[-1])

    def _pre_hook(self, index: int, fill: float):  # noqa: ANN202
        def hook(_module: nn.Module, args: tuple[Tensor, ...]) -> tuple[Tensor, ...] | None:
            if self._batch is None:
                return None
            x = args[0]
            strips = self._strips is not None and x.device.type == "cpu"
            if strips and fill == 0.0 and self._reach[index] is not None:
                # What lies beyond a strip is never read by a valid output: the padded region
                # there may hold anything (only ever other positions outside the valid region).
                # On a CPU only: a GPU's FFT or Winograd convolutions combine whole tiles, so
                # what lies beyond could move valid outputs by rounding; masking is cheap there.
                for n, h, bottom, w, right in self._strips[index]:  # type: ignore[index]
                    x[n, :, h:bottom, :right] = 0.0
                    x[n, :, :bottom, w:right] = 0.0
                return None
            return (torch.where(self._mask(index, 0, x), x, fill),)  # a scalar: no tensor per call

        return hook

    def _post_hook(self, index: int):  # noqa: ANN202
        def hook(_module: nn.Module, _args: tuple[Tensor, ...], out: Tensor) -> Tensor | None:
            if self._batch is None:
                return None
            # Positions outside the valid region may hold -inf; keep them finite for what follows.
            return torch.where(self._mask(index, 1, out), out, 0.0)

        return hook

    def __call__(self, x: Tensor, sizes: Sequence[Size]) -> tuple[Tensor, list[Size]]:
        """``x: Tensor[N, 3, H, W]`` padded batch; ``sizes``: each image's (h, w) within it.
        Returns the trunk output ``Tensor[N, C, h', w']`` and each image's valid output size."""
        traces = [self.sizes(s) for s in sizes]
        finals = [(rows[-1], cols[-1]) for rows, cols in traces]
        if all(tuple(s) == tuple(x.shape[-2:]) for s in sizes):
            return self.trunk(x), finals  # nothing padded: no masks needed
        # (N, 2, 2P+1) -> (2P+1, N, 2)
        table = torch.tensor([[rows, cols] for rows, cols in traces], dtype=torch.int64)
        self._batch = table.permute(2, 0, 1).contiguous().to(x.device)  # one copy per batch
        self._strips = self._strips_for(traces)
        try:
            return self.trunk(x), finals
        finally:
            self._batch = self._strips = None

    def _strips_for(
        self, traces: Sequence[tuple[tuple[int, ...], tuple[int, ...]]]
    ) -> list[list[tuple[int, int, int, int, int]]]:
        """Per point, per image whose valid region there is smaller than the tensor: (image,
        valid height, last row read + 1, valid width, last column read + 1). A valid output
        reads input rows up to ``(out - 1) * stride - padding + (kernel - 1) * dilation``."""
        strips: list[list[tuple[int, int, int, int, int]]] = []
        for index, reach in enumerate(self._reach):
            rows_at = [(rows[2 * index], rows[2 * index + 1]) for rows, _ in traces]
            cols_at = [(cols[2 * index], cols[2 * index + 1]) for _, cols in traces]
            here: list[tuple[int, int, int, int, int]] = []
            if reach is not None:  # (slices past the tensor's end are empty: its own padding)
                for n, ((h, h_out), (w, w_out)) in enumerate(zip(rows_at, cols_at, strict=True)):
                    bottom = max(h, _last_read(h_out, reach, 0) + 1)
                    right = max(w, _last_read(w_out, reach, 1) + 1)
                    if bottom > h or right > w:
                        here.append((n, h, bottom, w, right))
            strips.append(here)
        return strips
