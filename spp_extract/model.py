"""The in-memory API: a backbone trunk and SPP as one ``nn.Module``, like timm's
``features_only`` models or torchvision's ``create_feature_extractor``.

    model = create_model("resnet50", weights="DEFAULT", levels=(4, 2, 1))
    vectors = model.embed([Image.open(p) for p in paths])    # Tensor[N, model.dim]

``model(x)`` takes a batch that is already normalised (``Tensor[N, 3, H, W]`` float, every
image the same size, each side at least ``model.min_side``); ``model.embed`` takes Pillow
images or uint8 tensors of any sizes and gives exactly the vectors ``spp-extract extract``
writes for the same pictures.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor, nn

from .backbones import Trunk, build_trunk
from .config import Config
from .images import rgb_tensor
from .masking import valid_mask
from .pooling import PoolingMode, SpatialPyramidPooling


class SppModel(nn.Module):
    """Trunk cut at ``layer`` followed by spatial pyramid pooling."""

    def __init__(self, trunk: Trunk, levels: Sequence[int], pooling: PoolingMode) -> None:
        super().__init__()
        self.trunk = trunk.module
        self.spp = SpatialPyramidPooling(levels, pooling)
        self.backbone = trunk.resolved.backbone
        self.layer = trunk.resolved.layer
        self.weights = trunk.resolved.weights
        self.channels = trunk.channels
        self.dim = self.spp.output_dim(trunk.channels)
        self.mean = trunk.resolved.mean
        self.std = trunk.resolved.std
        self.min_side = trunk.min_side
        # normalisation as buffers: they follow the module to its device
        self.register_buffer("pixel_mean", torch.tensor(self.mean).view(1, 3, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(self.std).view(1, 3, 1, 1), False)

    def forward(self, x: Tensor) -> Tensor:
        """``x: Tensor[N, 3, H, W]`` normalised, H, W >= ``min_side`` -> ``Tensor[N, dim]``."""
        return self.spp(self.trunk(x))

    def normalize(self, pixels: Tensor, sizes: Sequence[tuple[int, int]] | None = None) -> Tensor:
        """uint8 ``Tensor[N, 3, H, W]`` (on any device) -> the float input the trunk is fed, on
        this module's device: scaled to [0, 1], normalised, and exactly 0 outside each image's
        top-left ``sizes[i]`` (padding, and the margin up to ``min_side``). The one place the
        tool normalises pixels: whole batches, tiles and ``embed``."""
        x = pixels.to(self.pixel_mean.device, non_blocking=True).float().div_(255.0)
        x = (x - self.pixel_mean) / self.pixel_std
        if sizes is not None and any(tuple(s) != tuple(x.shape[-2:]) for s in sizes):
            inside = torch.tensor([list(s) for s in sizes], device=x.device)  # (N, 2)
            x = torch.where(valid_mask(inside, x.shape[-2], x.shape[-1]), x, 0.0)
        return x

    def to_input(self, image: Image.Image | Tensor) -> Tensor:
        """One picture -> the normalised ``Tensor[3, H', W']`` the trunk is fed: a Pillow image
        is made RGB by the tool's rules (EXIF orientation, transparency on white, 16-bit
        scaling); a uint8 ``Tensor[3, H, W]`` is taken as RGB. Sides under ``min_side`` are
        padded at the bottom/right with zeros after normalisation, as the tool does."""
        pixels = rgb_tensor(image) if isinstance(image, Image.Image) else image
        if pixels.dtype != torch.uint8 or pixels.dim() != 3 or pixels.shape[0] != 3:
            raise ValueError(
                f"expected a Pillow image or a uint8 Tensor[3, H, W], got "
                f"{pixels.dtype} {tuple(pixels.shape)}"
            )
        if min(pixels.shape[1:]) < 1:
            raise ValueError(
                f"an image of shape {tuple(pixels.shape)} has no pixels; every side must be at "
                "least 1"
            )
        _, h, w = pixels.shape
        padded = pixels.new_zeros(1, 3, max(h, self.min_side), max(w, self.min_side))
        padded[0, :, :h, :w] = pixels
        return self.normalize(padded, [(h, w)])[0]

    @torch.inference_mode()
    def embed(self, images: Sequence[Image.Image | Tensor], *, batch_size: int = 8) -> Tensor:
        """Pictures of any sizes -> ``Tensor[N, dim]`` on the CPU, in the given order. Images
        of the same size run together (identical results to running each alone)."""
        inputs = [self.to_input(image) for image in images]
        out = torch.empty(len(inputs), self.dim)
        by_size: dict[tuple[int, int], list[int]] = collections.defaultdict(list)
        for i, x in enumerate(inputs):
            by_size[(x.shape[1], x.shape[2])].append(i)
        for rows in by_size.values():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                batch = torch.stack([inputs[i] for i in chunk])  # (n, 3, H, W)
                out[chunk] = self(batch).float().cpu()
        return out

    def extra_repr(self) -> str:
        return f"backbone={self.backbone!r}, layer={self.layer!r}, dim={self.dim}"


def create_model(
    backbone: str = "resnet50",
    *,
    layer: str | None = None,
    weights: str = "DEFAULT",
    levels: Sequence[int] = (4, 2, 1),
    pooling: PoolingMode = "max",
    seed: int = 0,
) -> SppModel:
    """A ready ``SppModel`` (eval mode, no gradients, CPU): the same backbone, layer, weights
    and pyramid choices as the configuration keys of the same names. Raises ConfigError."""
    config = Config(
        backbone=backbone,
        layer=layer or "",
        weights=weights,
        levels=tuple(levels),
        pooling=pooling,
        seed=seed,
    )
    return SppModel(build_trunk(config), config.levels, config.pooling).eval()
