"""Exact tiled inference (issue 10): tiled == whole image, streamed SPP, receptive fields,
the memory budget and what a run does with an image over it."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from spp_extract.backbones import build_trunk
from spp_extract.config import Config
from spp_extract.pooling import spatial_pyramid_pool
from spp_extract.tiling import (
    NotTileable,
    meta_copy,
    output_size,
    plan_tiles,
    receptive_field,
    tiled_spp,
    tiled_trunk,
)


@functools.cache
def _trunk(backbone: str):  # noqa: ANN202
    return build_trunk(Config(backbone=backbone, weights="none"))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


# (backbone, input size, tiles per side): sizes are not multiples of the stride; the first of
# each backbone is 2 x 2, the second many tiles (core of one or two output cells).
SLOW = pytest.mark.slow
CASES = [
    ("resnet18", (150, 190), (2, 2)), pytest.param("resnet18", (700, 180), (6, 3), marks=SLOW),
    ("resnet50", (150, 190), (2, 2)), pytest.param("resnet50", (230, 100), (4, 2), marks=SLOW),
    ("vgg11", (150, 190), (2, 2)), ("vgg11", (401, 299), (5, 4)),
    ("densenet121", (150, 190), (2, 2)), pytest.param("densenet121", (200, 130), (4, 3), marks=SLOW),
    ("convnext_tiny", (150, 190), (2, 2)), pytest.param("convnext_tiny", (200, 130), (4, 3), marks=SLOW),
    ("mobilenet_v2", (150, 190), (2, 2)), ("mobilenet_v2", (600, 97), (6, 2)),
    ("googlenet", (150, 190), (2, 2)), pytest.param("googlenet", (420, 110), (5, 2), marks=SLOW),
]  # fmt: skip


@pytest.mark.parametrize(("backbone", "size", "grid"), CASES, ids=str)
def test_tiled_equals_whole_image(backbone, size, grid):
    trunk = _trunk(backbone)
    field = receptive_field(trunk.module)
    out_size = output_size(meta_copy(trunk.module), *size)
    core = tuple(math.ceil(o / g) for o, g in zip(out_size, grid, strict=True))
    plan = plan_tiles(field, size, out_size, core)
    assert len(plan) == math.prod(math.ceil(o / c) for o, c in zip(out_size, core, strict=True))
    assert len(plan) >= 4
    for tile in plan.tiles:  # origins on the stride grid
        assert tile.rows[0] % field.rows.stride == 0 and tile.cols[0] % field.cols.stride == 0
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        whole = trunk.module(x)
        tiled = tiled_trunk(trunk.module, x, plan)
    assert tiled.shape == whole.shape
    torch.testing.assert_close(tiled, whole, rtol=1e-4, atol=1e-4 * float(whole.abs().max()))
    assert _rel(tiled, whole) <= 1e-4


@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("levels", [(4, 2, 1), (6, 3, 1)], ids=str)
@pytest.mark.parametrize(("backbone", "size", "core"), [
    ("vgg11", (333, 170), (3, 2)), pytest.param("resnet18", (300, 500), (3, 5), marks=SLOW),
], ids=str)  # fmt: skip
def test_streamed_spp_equals_spp_of_stitched_map(backbone, size, core, levels, mode):
    trunk = _trunk(backbone)
    field = receptive_field(trunk.module)
    plan = plan_tiles(field, size, output_size(meta_copy(trunk.module), *size), core)
    assert len(plan) >= 9
    x = torch.randn(1, 3, *size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        stitched = tiled_trunk(trunk.module, x, plan)
        streamed = tiled_spp(trunk.module, x, plan, levels, mode)
    expected = spatial_pyramid_pool(stitched, levels, mode)
    torch.testing.assert_close(streamed, expected, rtol=1e-5, atol=1e-6)


# backbone, input rows (more than the field), perturbed rows (different phases of the stride)
FIELD_CASES = [("resnet18", 560, (270, 283, 301)), ("vgg11", 300, (140, 151, 166)),
               ("mobilenet_v2", 620, (300, 317, 330)), ("googlenet", 480, (220, 239, 250))]  # fmt: skip


@pytest.mark.parametrize(("backbone", "rows", "pixels"), FIELD_CASES, ids=str)
def test_receptive_field_bounds_what_one_pixel_changes(backbone, rows, pixels):
    """Changing one input pixel changes no output cell whose computed field misses it, and
    the computed field is at most twice the extent actually observed."""
    module = _trunk(backbone).module
    field = receptive_field(module).rows
    double = module.to(torch.float64)  # in place: put back to float32 below
    try:
        x = torch.randn(1, 3, rows, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
        with torch.inference_mode():
            base = double(x)
            seen_lo, seen_hi = math.inf, -math.inf
            for py in pixels:
                y = x.clone()
                y[0, :, py, 20] += 1.0
                changed = (double(y) != base).any(dim=1)[0].any(dim=1)  # (h,) rows that changed
                cells = changed.nonzero().flatten().tolist()
                assert cells, "the perturbation changed nothing"
                for j in cells:  # py must lie inside cell j's computed field
                    assert field.lo <= py - j * field.stride <= field.hi, (j, py, field)
                seen_lo = min(seen_lo, min(py - j * field.stride for j in cells))
                seen_hi = max(seen_hi, max(py - j * field.stride for j in cells))
    finally:
        module.to(torch.float32)
    assert field.hi - field.lo <= 2 * (seen_hi - seen_lo), (field, seen_lo, seen_hi)


@pytest.mark.parametrize("backbone", ["mobilenet_v3_small", "efficientnet_b0"])
def test_global_ops_are_not_tileable(backbone):
    with pytest.raises(NotTileable, match="adaptive_avg_pool2d"):
        receptive_field(_trunk(backbone).module)


def test_resnet50_field_is_the_textbook_one():
    field = receptive_field(_trunk("resnet50").module)
    assert field.stride == (32, 32)
    assert field.rows.hi - field.rows.lo + 1 == 427  # the theoretical receptive field
