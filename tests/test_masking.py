"""Masked padding: one decision (``masking.maskable``, an allow-list), and for every family it
accepts, each image of one padded batch gets exactly the vector it gets alone."""

import functools

import pytest
import torch
from conftest import make_extractor
from torch import nn

from spp_extract import Config
from spp_extract.backbones import (
    Trunk,
    build_trunk,
    describe,
    list_backbones,
    resolve,
)
from spp_extract.families import FAMILIES
from spp_extract.masking import MaskedTrunk, maskable
from spp_extract.pooling import spatial_pyramid_pool
from spp_extract.records import RowMeta
from spp_extract.runtime import padded_batching

LEVELS = (4, 2, 1)
SIZES = [(37, 53), (61, 45), (64, 64)]  # odd sizes, all padded to 64 x 64 in one batch
# A fast member of each family; a family not named here is tested with its first model.
FAST_MODEL = {
    "resnet": "resnet18",
    "resnext": "resnext50_32x4d",
    "wide_resnet": "wide_resnet50_2",
    "vgg": "vgg11_bn",
    "densenet": "densenet121",
    "regnet_x": "regnet_x_400mf",
    "convnext": "convnext_tiny",
    "squeezenet": "squeezenet1_1",
    "shufflenet_v2": "shufflenet_v2_x0_5",
    "mnasnet": "mnasnet0_5",
    "mobilenet_v3": "mobilenet_v3_small",
    "regnet_y": "regnet_y_400mf",
}
# over ~2 s on two shared cores
SLOW = {
    "resnext50_32x4d",
    "wide_resnet50_2",
    "densenet121",
    "convnext_tiny",
    "regnet_x_400mf",
    "googlenet",
}


def _member(prefix: str) -> str:
    return FAST_MODEL.get(prefix) or next(n for n in list_backbones() if n.startswith(prefix))


def _by_maskable(wanted: bool) -> list:  # noqa: ANN401
    names = [_member(f.prefix) for f in FAMILIES]
    return [
        pytest.param(n, id=n, marks=[pytest.mark.slow] if n in SLOW else [])
        for n in names
        if describe(n)[2] is wanted
    ]


def _inputs(sizes, min_side, seed=0):  # noqa: ANN001, ANN202
    """uint8 pictures, their padded batch ``Tensor[N, 3, H, W]`` and the rows' metadata."""
    g = torch.Generator().manual_seed(seed)
    pictures = [torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8) for h, w in sizes]
    metas = [
        RowMeta(image_size=(h, w), input_size=(max(h, min_side), max(w, min_side)))
        for h, w in sizes
    ]
    height = max(m.input_size[0] for m in metas)
    width = max(m.input_size[1] for m in metas)
    batch = torch.zeros(len(sizes), 3, height, width, dtype=torch.uint8)
    for i, p in enumerate(pictures):
        batch[i, :, : p.shape[1], : p.shape[2]] = p
    return pictures, batch, metas


def _alone(trunk: Trunk, picture: torch.Tensor) -> torch.Tensor:
    """The reference: that picture by itself (normalised, zero-padded to the minimum side)."""
    mean = torch.tensor(trunk.resolved.mean).view(3, 1, 1)
    std = torch.tensor(trunk.resolved.std).view(3, 1, 1)
    _, h, w = picture.shape
    x = torch.zeros(1, 3, max(h, trunk.min_side), max(w, trunk.min_side))
    x[0, :, :h, :w] = (picture.float() / 255 - mean) / std
    with torch.inference_mode():
        return spatial_pyramid_pool(trunk.module(x), LEVELS, "max")[0]


@functools.cache
def _trunk(backbone: str) -> Trunk:
    return build_trunk(Config(backbone=backbone, weights="none"))


@pytest.mark.parametrize("backbone", _by_maskable(True))
def test_masked_padded_batch_equals_each_image_alone(backbone):
    trunk = _trunk(backbone)
    config = Config(backbone=backbone, weights="none", levels=LEVELS)
    assert padded_batching(Config(backbone=backbone, batching="padded"), torch.device("cpu"), trunk)
    extractor = make_extractor(trunk, config, padded=True)
    assert extractor.masked is not None
    extra = max(0, trunk.min_side - min(min(s) for s in SIZES))  # every image over min_side
    pictures, batch, metas = _inputs([(h + extra, w + extra) for h, w in SIZES], trunk.min_side)
    assert len({m.input_size for m in metas}) == len(metas)  # really mixed sizes
    vectors = extractor(batch, metas)
    for picture, vector in zip(pictures, vectors, strict=True):
        expected = _alone(trunk, picture)
        torch.testing.assert_close(
            vector.values, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max())
        )


@pytest.mark.slow  # a model per backbone (the quick loop keeps the exactness test above)
@pytest.mark.parametrize("backbone", _by_maskable(True))
def test_sizes_found_without_shape_keeping_modules_are_the_full_traces(backbone):
    """The masks' sizes come from a meta copy without BatchNorm, LayerNorm and activations
    (fast); they equal a trace of the whole trunk at every conv and pool."""
    from spp_extract.masking import _mixes_positions, meta_copy

    masked = MaskedTrunk(_trunk(backbone).module)
    full = meta_copy(_trunk(backbone).module)
    points = [m for m in full.modules() if _mixes_positions(m)]
    side = _trunk(backbone).min_side  # the smallest input the trunk is given
    for size in [(side, side), (side + 1, side + 14), (side + 31, 200), (255, side + 64)]:
        seen: list[tuple[int, ...]] = []
        hooks = [
            m.register_forward_hook(
                lambda _m, a, o, seen=seen: seen.extend(
                    [tuple(a[0].shape[-2:]), tuple(o.shape[-2:])]
                )
            )
            for m in points
        ]
        out = full(torch.empty(1, 3, *size, device="meta"))
        for hook in hooks:
            hook.remove()
        rows, cols = masked.sizes(size)
        assert list(zip(rows, cols, strict=True)) == [*seen, tuple(out.shape[-2:])]


@pytest.mark.parametrize("backbone", _by_maskable(False))
def test_families_not_maskable_refuse_masked_padding(backbone):
    trunk = _trunk(backbone)
    assert not maskable(trunk.module)
    assert not padded_batching(
        Config(backbone=backbone, batching="padded"), torch.device("cpu"), trunk
    )
    with pytest.raises(ValueError, match="not be exact"):
        MaskedTrunk(trunk.module)


class _Unknown(nn.Module):
    """A module whose forward() nobody has checked (here harmless): refused all the same."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


# Exact per image, but not under masks: the border is copied (reflect), or the last window's
# divisor depends on where the image ends (ceil_mode). A deny-list let both through.
NOT_EXACT = {
    "reflect_padded_conv": lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"),
    "avg_pool_ceil_mode": lambda: nn.AvgPool2d(3, stride=2, ceil_mode=True),
    "avg_pool_without_padding_in_count": lambda: nn.AvgPool2d(3, 2, 1, count_include_pad=False),
    "global_pool": lambda: nn.AdaptiveAvgPool2d(5),
    "unknown_module": lambda: _Unknown(),
}


@pytest.mark.parametrize("layer", NOT_EXACT.values(), ids=NOT_EXACT.keys())
def test_trunk_with_an_op_not_exact_under_masks_batches_same_size_only(layer):
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), layer(), nn.Conv2d(4, 4, 3, padding=1)
    )
    module.eval().requires_grad_(False)
    trunk = Trunk(module, resolve(Config(backbone="resnet18", weights="none")), 4, 1)
    assert not maskable(trunk.module)
    with pytest.raises(ValueError, match="not be exact"):
        MaskedTrunk(module)
    config = Config(backbone="resnet18", weights="none", batching="padded", levels=LEVELS)
    padded = padded_batching(config, torch.device("cpu"), trunk)
    assert not padded
    extractor = make_extractor(trunk, config, padded=padded)
    pictures, batch, metas = _inputs([(23, 31), (30, 17), (16, 16)], 1, seed=1)
    for picture, vector in zip(pictures, extractor(batch, metas), strict=True):
        expected = _alone(trunk, picture)
        torch.testing.assert_close(
            vector.values, expected, rtol=1e-4, atol=1e-5 * float(expected.abs().max())
        )
