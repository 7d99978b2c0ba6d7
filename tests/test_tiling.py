"""Exact tiled inference (issue 10): tiled == whole image, streamed SPP, receptive fields,
the memory budget and what a run does with an image over it."""

from __future__ import annotations

import functools
import math
import time

import pytest
import torch
from conftest import assert_vectors_close, make_extractor, run_python

from spp_extract.backbones import build_trunk
from spp_extract.config import Config
from spp_extract.pooling import spatial_pyramid_pool
from spp_extract.runtime import Runtime
from spp_extract.tiling import (
    NotTileable,
    fitting_core,
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


# (backbone, input size, tiles per side): sizes are not multiples of the stride; the first of
# each backbone is 2 x 2, the second many tiles (core of one or two output cells).
SLOW = pytest.mark.slow
CASES = [
    ("resnet18", (150, 190), (2, 2)),
    pytest.param("resnet18", (700, 180), (6, 3), marks=SLOW),
    pytest.param("resnet50", (150, 190), (2, 2), marks=SLOW),
    pytest.param("resnet50", (230, 100), (4, 2), marks=SLOW),
    pytest.param("vgg11", (150, 190), (2, 2), marks=SLOW),
    pytest.param("vgg11", (401, 299), (5, 4), marks=SLOW),
    pytest.param("densenet121", (150, 190), (2, 2), marks=SLOW),
    pytest.param("densenet121", (200, 130), (4, 3), marks=SLOW),
    pytest.param("convnext_tiny", (150, 190), (2, 2), marks=SLOW),
    pytest.param("convnext_tiny", (200, 130), (4, 3), marks=SLOW),
    ("mobilenet_v2", (150, 190), (2, 2)),
    pytest.param("mobilenet_v2", (600, 97), (6, 2), marks=SLOW),
    pytest.param("googlenet", (150, 190), (2, 2), marks=SLOW),
    pytest.param("googlenet", (420, 110), (5, 2), marks=SLOW),
]


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
    assert_vectors_close(tiled, whole, rel=1e-4)  # and the norm bound the README states


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("levels", [(4, 2, 1), (6, 3, 1)], ids=str)
@pytest.mark.parametrize(
    ("backbone", "size", "core"),
    [
        ("vgg11", (333, 170), (3, 2)),
        pytest.param("resnet18", (300, 500), (3, 5), marks=SLOW),
    ],
    ids=str,
)
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
FIELD_CASES = [
    ("resnet18", 560, (270, 283, 301)),
    ("vgg11", 300, (140, 151, 166)),
    ("mobilenet_v2", 620, (300, 317, 330)),
    ("googlenet", 480, (220, 239, 250)),
]


@pytest.mark.parametrize(("backbone", "rows", "pixels"), FIELD_CASES, ids=str)
def test_receptive_field_bounds_what_one_pixel_changes(backbone, rows, pixels):
    """Changing one input pixel changes no output cell whose computed field misses it, and
    the computed field is at most twice the extent actually observed."""
    module = _trunk(backbone).module
    field = receptive_field(module).rows
    double = module.to(torch.float64)  # in place: put back to float32 below
    try:
        x = torch.randn(
            1, 3, rows, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
        )
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


# ----------------------------------------------------------------------------- in a run


def _images(folder, sizes):  # noqa: ANN001, ANN202
    from conftest import photo
    from PIL import Image

    folder.mkdir()
    for name, (h, w) in sizes.items():
        Image.fromarray(photo(h, w, seed=len(name))).save(folder / f"{name}.png")
    return folder


def _rows(path):  # noqa: ANN001, ANN202
    import h5py

    with h5py.File(path, "r") as f:
        return {
            p: (f["features"][i], int(f["tiles"][i]), tuple(f["feature_map_size"][i]))
            for i, p in enumerate(f["paths"].asstr()[:])
        }


@pytest.mark.slow
def test_image_over_max_memory_is_tiled_and_equals_the_untiled_row(tmp_path):
    from spp_extract import extract
    from spp_extract.inspection import summary
    from spp_extract.memory import memory_model

    inputs = _images(tmp_path / "in", {"big": (300, 410), "small": (60, 70)})
    config = Config(backbone="vgg11", weights="none", workers=0)
    need = memory_model(_trunk("vgg11").module).peak(300, 410)
    plain = extract([inputs], tmp_path / "plain.h5", config=config)
    budget = f"{int(need * 0.6)}B"  # under the big image's need, over the small one's
    tiled = extract([inputs], tmp_path / "tiled.h5", config=config.replace(max_memory=budget))
    assert (plain.images, plain.failed, tiled.images, tiled.failed) == (2, 0, 2, 0)
    want, got = _rows(tmp_path / "plain.h5"), _rows(tmp_path / "tiled.h5")
    assert want["big.png"][1] == 0 and got["big.png"][1] > 1 and got["small.png"][1] == 0
    assert got["big.png"][2] == want["big.png"][2]  # the whole image's map size
    for name in want:
        torch.testing.assert_close(
            torch.from_numpy(got[name][0]), torch.from_numpy(want[name][0]), rtol=1e-4, atol=1e-5
        )
    lines = summary(tmp_path / "tiled.h5")
    assert "tiled: 1 of 2 images (over max_memory)" in lines
    assert any(
        line.startswith("row 0: big.png") and f"tiles {got['big.png'][1]}" in line for line in lines
    )


@pytest.mark.slow
def test_untileable_backbone_over_max_memory_is_too_large_and_the_rest_done(tmp_path):
    from spp_extract import extract
    from spp_extract.memory import memory_model, show_size
    from spp_extract.reader import read_features

    inputs = _images(tmp_path / "in", {"big": (300, 410), "small": (60, 70)})
    model = memory_model(_trunk("mobilenet_v3_small").module)
    budget = (model.peak(300, 410) + model.peak(60, 70)) // 2  # between the two images' needs
    config = Config(
        backbone="mobilenet_v3_small", weights="none", workers=0, max_memory=f"{budget}B"
    )
    result = extract([inputs], tmp_path / "out.h5", config=config)
    assert (result.images, result.failed) == (1, 1)
    [(path, kind, message)] = result.failures
    assert path == "big.png" and kind == "too_large"
    assert f"needs about {show_size(model.peak(300, 410))}" in message
    assert f"max_memory = {show_size(budget)}" in message
    assert "cannot be tiled" in message and "resnet50" in message
    features = read_features(tmp_path / "out.h5")
    assert features.paths == ["small.png"] and features.failed_paths == ["big.png"]


def _extractor(backbone, budget):  # noqa: ANN001, ANN202
    config = Config(backbone=backbone, weights="none")
    return make_extractor(_trunk(backbone), config, padded=False, budget=budget)


def _one(extractor, h, w, seed=0):  # noqa: ANN001, ANN202
    from spp_extract.records import RowMeta

    pixels = torch.randint(
        0, 256, (1, 3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )
    return extractor(pixels, [RowMeta(image_size=(h, w), input_size=(h, w))])[0]


@pytest.mark.slow
def test_streamed_spp_when_the_map_leaves_no_room():
    whole = _one(_extractor("vgg11", None), 200, 230)
    streamed = _one(_extractor("vgg11", 2_000_000), 200, 230)
    assert streamed.tiles == 6 * 7  # one output cell per tile: the map's own size
    assert streamed.feature_map_size == whole.feature_map_size == (6, 7)
    torch.testing.assert_close(streamed.values, whole.values, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_single_image_out_of_memory_falls_back_to_tiles(monkeypatch):
    """(CUDA's case, simulated with the CPU allocator's error.)"""
    extractor = _extractor("vgg11", None)
    whole = _one(extractor, 200, 230).values
    forward = type(extractor.model.trunk).forward

    def small_only(self, x):  # noqa: ANN001, ANN202
        if x.device.type != "meta" and x.shape[-2] * x.shape[-1] >= 200 * 230:
            raise RuntimeError(
                "[enforce fail at alloc_cpu.cpp] DefaultCPUAllocator: can't allocate memory"
            )
        return forward(self, x)

    monkeypatch.setattr(type(extractor.model.trunk), "forward", small_only)
    tiled = _one(extractor, 200, 230)
    assert tiled.tiles > 1
    torch.testing.assert_close(tiled.values, whole, rtol=1e-4, atol=1e-5)

    def never(self, x):  # noqa: ANN001, ANN202
        if x.device.type != "meta":
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return forward(self, x)

    monkeypatch.setattr(type(extractor.model.trunk), "forward", never)
    failed = _one(extractor, 200, 230)
    assert failed.kind == "out_of_memory"


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("flag", "value", "stored"),
    [
        ("--max-memory", "2GB", 'max_memory = "2GB"'),
        ("--max-memory", "512MiB", 'max_memory = "512MiB"'),
        ("--max-memory", "auto", 'max_memory = "auto"'),
        ("--max-memory", "1.5GB", 'max_memory = "1.5GB"'),
        ("--max-pixels", "none", 'max_pixels = "none"'),
        ("--max-pixels", "1000", "max_pixels = 1000"),
    ],
)
def test_memory_and_pixel_flags_parse(flag, value, stored):
    from typer.testing import CliRunner

    from spp_extract.cli import app

    result = CliRunner().invoke(app, ["config", "--weights", "none", flag, value])
    assert result.exit_code == 0, result.output
    assert stored in result.output.splitlines()


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--max-memory", "lots"),
        ("--max-memory", "0.5MB"),
        ("--max-memory", "-1GB"),
        ("--max-memory", "2 PB"),
        ("--max-memory", "1e9"),
        ("--max-memory", ""),
        ("--max-pixels", "None"),
        ("--max-pixels", "0"),
        ("--max-pixels", "auto"),
        ("--max-pixels", "1.5"),
    ],
)
def test_bad_memory_and_pixel_flags_exit_2_with_one_line(flag, value):
    from typer.testing import CliRunner

    from spp_extract.cli import app

    result = CliRunner().invoke(app, ["config", "--weights", "none", flag, value])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    key = flag.removeprefix("--").replace("-", "_")  # range checks name the key, as for others
    assert len(lines) == 1 and lines[0].startswith(
        ("spp-extract: error: " + flag, "spp-extract: error: " + key)
    ), result.output
    assert "invalid" in lines[0]


@pytest.mark.parametrize("value", ["3 XB", "lots", 5, "0B", "GB"])
def test_bad_max_memory_in_config_is_refused(value):
    from spp_extract.errors import ConfigError

    with pytest.raises(ConfigError, match="max_memory = .* is invalid; expected a size"):
        Config(max_memory=value)


@pytest.mark.slow
def test_shards_without_tiles_read_as_zero(tmp_path):
    """Shards written before the field existed: their rows read as not tiled."""
    import h5py

    from spp_extract import extract
    from spp_extract.outputs import identify
    from spp_extract.storage import shards_root
    from spp_extract.view import assemble

    inputs = _images(tmp_path / "in", {"a": (40, 50), "b": (50, 40)})
    out = tmp_path / "out.h5"
    extract([inputs], out, config=Config(backbone="resnet18", weights="none", workers=0))
    [run] = shards_root(out).glob("run-*")
    for shard in run.glob("*.h5"):
        with h5py.File(shard, "r+") as f:
            del f["tiles"]
    attrs = identify(out)
    assemble(out, run, None, int(attrs["feature_dim"]), "float32", attrs)
    assert [row[1] for row in _rows(out).values()] == [0, 0]


# ----------------------------------------------------------------------------- memory model

_MEASURE = """
import sys, warnings
warnings.filterwarnings("ignore")
import dataclasses
import torch
from spp_extract.backbones import build_trunk
from spp_extract.compute import Extractor
from spp_extract.config import Config
from spp_extract.records import RowMeta
from spp_extract.runtime import Runtime
name, h, w = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
config = Config(backbone=name, weights="none")
trunk = build_trunk(config)
runtime = Runtime.resolve(config, trunk, device=torch.device("cpu"))
extractor = Extractor(trunk, config, dataclasses.replace(runtime, padded=False, budget=None))
estimate = extractor.memory.peak(h, w)
extractor(torch.zeros(1, 3, 64, 64, dtype=torch.uint8), [RowMeta(image_size=(64, 64), input_size=(64, 64))])
pixels = torch.randint(0, 255, (1, 3, h, w), dtype=torch.uint8)
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
base = status("VmRSS:") - pixels.numel()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak (VmHWM) to the current RSS
extractor(pixels, [RowMeta(image_size=(h, w), input_size=(h, w))])
print(estimate, status("VmHWM:") - base)
"""


@pytest.mark.slow
@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/clear_refs"), reason="Linux only")
@pytest.mark.parametrize(
    ("backbone", "h", "w"),
    [
        ("resnet50", 1500, 2000),
        ("vgg16", 1200, 1700),
        ("resnet18", 1400, 1400),
        ("densenet121", 2000, 2000),
        ("convnext_tiny", 1500, 2000),
    ],
)
def test_memory_estimate_is_within_25_percent_of_measured_peak_rss(backbone, h, w):
    done = run_python("-c", _MEASURE, backbone, h, w, env={"OMP_NUM_THREADS": "2"})
    assert done.returncode == 0, done.stderr[-2000:]
    estimate, measured = (int(v) for v in done.stdout.split())
    assert abs(estimate - measured) <= 0.25 * measured, (estimate / 1e9, measured / 1e9)


@pytest.mark.slow
def test_a_budget_too_small_to_tile_sensibly_is_refused_not_crawled(tmp_path):
    """Tiles of one output cell are nearly all halo: such an image is refused with the
    budget to give, never computed hundreds of times over."""
    from conftest import photo
    from PIL import Image

    from spp_extract import extract, read_features

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(photo(300, 1200, seed=3)).save(folder / "wide.png")
    Image.fromarray(photo(24, 24, seed=4)).save(folder / "small.png")
    out = tmp_path / "out.h5"
    started = time.monotonic()
    result = extract(
        [folder],
        out,
        config=Config(backbone="resnet18", weights="none", workers=0, max_memory="48MB"),
    )
    assert time.monotonic() - started < 60
    data = read_features(out)
    assert data.paths == ["small.png"] and result.failed == 1
    assert "at least" in data.failed_errors[0] and "times over" in data.failed_errors[0]


@pytest.mark.parametrize(("workers", "batch_pixels"), [(0, 8 * 512 * 512), (3, 1 << 20)])
def test_auto_budget_leaves_room_for_the_model_and_decoding(monkeypatch, workers, batch_pixels):
    """max_memory = auto on CPU: half of what is available, less the model and what decoding
    holds (each worker and its prefetched batches, and the batch in hand)."""
    from spp_extract import memory

    monkeypatch.setattr(memory, "available_bytes", lambda: 20 << 30)
    decoding = memory.decode_bytes(workers, batch_pixels)
    assert decoding == workers * (memory.WORKER_BYTES + 4 * 3 * batch_pixels) + 3 * batch_pixels
    budget = memory.memory_budget("auto", torch.device("cpu"), 100 << 20, decoding)
    assert budget == (10 << 30) - (100 << 20) - decoding
    assert memory.memory_budget("1GB", torch.device("cpu"), 100 << 20, decoding) == 10**9
    # the run's own decision uses it
    config = Config(backbone="resnet18", weights="none", workers=workers, batch_pixels=batch_pixels)
    runtime = Runtime.resolve(config, build_trunk(config), device=torch.device("cpu"))
    model = memory.module_bytes(build_trunk(config).module)
    assert runtime.budget == (10 << 30) - model - decoding
    assert runtime.workers == workers and runtime.batch_pixels <= batch_pixels


@pytest.mark.parametrize(
    ("size", "tile_pixels"),
    [((3000, 4000), 2.2e6), ((6000, 8000), 4e6), ((1501, 1999), 1e6), ((700, 90), 5e4)],
    ids=str,
)
def test_fitting_core_fits_the_budget_and_computes_no_more_than_square_cores(size, tile_pixels):
    """Per-axis, balanced cores: every tile (halos included) within ``tile_pixels``, and no
    more pixels computed than the best square core (the plan before per-axis cores)."""
    field = receptive_field(meta_copy(_trunk("resnet50").module))
    out_size = output_size(meta_copy(_trunk("resnet50").module), *size)

    def work(plan) -> int:  # noqa: ANN001
        return sum((t.rows[1] - t.rows[0]) * (t.cols[1] - t.cols[0]) for t in plan.tiles)

    def largest(plan) -> int:  # noqa: ANN001
        return max((t.rows[1] - t.rows[0]) * (t.cols[1] - t.cols[0]) for t in plan.tiles)

    core = fitting_core(field, size, out_size, tile_pixels)
    plan = plan_tiles(field, size, out_size, core)
    assert largest(plan) <= tile_pixels
    squares = [plan_tiles(field, size, out_size, c) for c in range(1, max(out_size) + 1)]
    best_square = min(work(p) for p in squares if largest(p) <= tile_pixels)
    assert work(plan) <= best_square
    # the whole map is covered once: the cores tile it exactly
    cells = sum(
        (t.out_rows[1] - t.out_rows[0]) * (t.out_cols[1] - t.out_cols[0]) for t in plan.tiles
    )
    assert cells == out_size[0] * out_size[1]
