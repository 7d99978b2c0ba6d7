"""End to end: each HDF5 row equals that image run alone through the trunk and a loop SPP."""

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import assert_vectors_close, reference_vector, rel_err
from torchvision.models import get_model

from spp_extract import Config, extract, images, read_features
from spp_extract.backbones import build_trunk

EXPECTED = [
    "cmyk.jpg",
    "deep_16bit.png",
    "gray.png",
    "landscape.jpg",
    "palette.gif",
    "portrait.png",
    "rotated_exif.jpg",
    "strip_3x500.png",
    "sub/UPPER.TIFF",
    "sub/nested.bmp",
    "tiny_1x1.png",
    "transparent.png",
]


def _check_against_reference(out: Path, config: Config, example_dir: Path) -> None:
    trunk = build_trunk(config)
    data = read_features(out)
    assert data.paths == EXPECTED
    assert data.failed_paths == []
    assert data.features.shape == (
        len(EXPECTED),
        trunk.channels * sum(n * n for n in config.levels),
    )
    for row, name in enumerate(data.paths):
        expected = reference_vector(trunk, example_dir / name, config.levels, config.pooling)
        assert_vectors_close(data.features[row], expected, rel=1e-4, err_msg=name)
        decoded = images.decode(str(example_dir / name), max_pixels=10**9)
        assert tuple(data.image_size[row]) == tuple(decoded.pixels.shape[1:])


@pytest.mark.slow
@pytest.mark.parametrize(
    "backbone, levels, pooling",
    [("resnet18", (4, 2, 1), "max"), ("vgg11", (6, 3, 2, 1), "avg")],
)
def test_rows_equal_each_image_alone(tmp_path, example_dir, backbone, levels, pooling):
    config = Config(backbone=backbone, weights="none", levels=levels, pooling=pooling, workers=0)
    out = tmp_path / "features.h5"
    result = extract([example_dir], out, config=config)
    assert (result.images, result.failed) == (len(EXPECTED), 0)
    _check_against_reference(out, config, example_dir)


@pytest.mark.slow
def test_state_dict_file_weights(tmp_path, example_dir):
    torch.manual_seed(123)
    model = get_model("resnet18", weights=None)
    weights = tmp_path / "my_resnet18.pt"
    torch.save(model.state_dict(), weights)
    config = Config(backbone="resnet18", weights=str(weights), levels=(3, 1), workers=0)
    out = tmp_path / "features.h5"
    extract([example_dir], out, config=config)
    _check_against_reference(out, config, example_dir)
    # and the weights really were the file's, not a random init
    seeded = read_features(out).features
    extract([example_dir], tmp_path / "none.h5", config=config.replace(weights="none"))
    assert rel_err(read_features(tmp_path / "none.h5").features, seeded) > 0.1


@pytest.fixture(scope="module")
def one_image_a_batch(tmp_path_factory, example_dir):
    """The baseline the batched runs are compared with: batch size 1, no workers."""
    out = tmp_path_factory.mktemp("one_a_batch") / "b1-w0-same-size.h5"
    extract(
        [example_dir],
        out,
        config=Config(backbone="resnet18", weights="none", batch_size=1, workers=0),
    )
    return read_features(out)


@pytest.mark.slow
@pytest.mark.parametrize(
    "batch_size, workers, batching",
    [(8, 0, "same-size"), (8, 2, "same-size"), (8, 2, "padded")],
)
def test_vectors_do_not_depend_on_batch_size_workers_or_batching(
    tmp_path, example_dir, one_image_a_batch, batch_size, workers, batching
):
    config = Config(
        backbone="resnet18",
        weights="none",
        batch_size=batch_size,
        workers=workers,
        batching=batching,
    )
    out = tmp_path / f"b{batch_size}-w{workers}-{batching}.h5"
    extract([example_dir], out, config=config)
    data, base = read_features(out), one_image_a_batch
    assert data.paths == base.paths
    for row in range(len(base.paths)):
        assert_vectors_close(
            data.features[row], base.features[row], rel=1e-4, err_msg=base.paths[row]
        )


@pytest.mark.slow
def test_file_layout_and_attributes(tmp_path, example_dir):
    config = Config(backbone="resnet18", weights="none", dtype="float16", levels=(2, 1), workers=0)
    out = tmp_path / "f.h5"
    extract([example_dir], out, config=config)
    with h5py.File(out, "r") as f:
        assert f["features"].dtype == np.float16
        assert f["features"].shape == (12, 512 * 5)
        for name in (
            "paths",
            "path_bytes",
            "image_size",
            "feature_map_size",
            "input_size",
            "mode",
            "failed/paths",
            "failed/errors",
            "failed/error_class",
        ):
            assert name in f, name
        assert f["image_size"].dtype == np.int32 and f["image_size"].shape == (12, 2)
        attrs = f.attrs
        assert attrs["format_version"] == 1
        assert (attrs["backbone"], attrs["layer"], attrs["weights"]) == (
            "resnet18",
            "layer4",
            "none",
        )
        assert list(attrs["levels"]) == [2, 1] and attrs["pooling"] == "max"
        assert attrs["channels"] == 512 and attrs["feature_dim"] == 2560
        assert attrs["dtype"] == "float16"
        assert 'backbone = "resnet18"' in attrs["config"]
        for key in ("spp_extract_version", "torch_version", "torchvision_version", "created"):
            assert attrs[key]
        # auto on a CPU: small images share batches (masked padding), larger ones batch by size
        assert (attrs["device"], attrs["world_size"]) == ("cpu", 1)
        assert attrs["batching"] == "padded up to 147456 pixels"
        paths = list(f["paths"].asstr()[:])
        rotated = paths.index("rotated_exif.jpg")
        assert tuple(f["image_size"][rotated]) == (160, 120)  # displayed size, EXIF applied
        tiny = paths.index("tiny_1x1.png")
        assert tuple(f["image_size"][tiny]) == (1, 1) and tuple(f["feature_map_size"][tiny]) == (
            1,
            1,
        )
        modes = dict(zip(paths, f["mode"].asstr()[:], strict=True))
        assert modes["cmyk.jpg"] == "CMYK" and modes["deep_16bit.png"] == "I;16"


@pytest.mark.slow
def test_rows_are_sorted_and_keyed_by_relative_path(tmp_path, example_dir):
    out = tmp_path / "f.h5"
    extract(
        [example_dir / "sub", example_dir / "landscape.jpg"],
        out,
        config=Config(backbone="resnet18", weights="none", workers=0),
    )
    paths = read_features(out).paths
    assert paths == sorted(paths, key=lambda p: p.encode())
    assert str(example_dir / "landscape.jpg") in paths  # given directly: stored as given
    assert "nested.bmp" in paths  # found in a folder: relative to it
    # a file inside a folder also given: one row, under the first input's path
    result = extract(
        [example_dir, example_dir / "sub" / "nested.bmp"],
        tmp_path / "g.h5",
        config=Config(backbone="resnet18", weights="none", workers=0),
    )
    paths = read_features(tmp_path / "g.h5").paths
    assert "sub/nested.bmp" in paths and len(paths) == 12 and result.overlaps == 1


@pytest.mark.slow
def test_extract_leaves_the_callers_process_as_it_found_it(tmp_path, example_dir):
    from PIL import ImageFile

    torch.manual_seed(1234)
    rng = torch.random.get_rng_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, threads - 1) if threads > 1 else 1)
    threads = torch.get_num_threads()
    flags = (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32)
    extract(
        [example_dir],
        tmp_path / "f.h5",
        config=Config(backbone="resnet18", weights="none", workers=0, seed=7),
    )
    assert torch.equal(torch.random.get_rng_state(), rng)
    assert torch.get_num_threads() == threads
    assert (torch.backends.cudnn.benchmark, torch.backends.cuda.matmul.allow_tf32) == flags
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_another_models_weights_name_is_refused():
    from spp_extract import ConfigError
    from spp_extract.backbones import resolve

    with pytest.raises(ConfigError, match="not resnet50's"):
        resolve(Config(backbone="resnet50", weights="ResNet18_Weights.IMAGENET1K_V1"))
    assert resolve(
        Config(backbone="resnet50", weights="ResNet50_Weights.IMAGENET1K_V1")
    ).weights.endswith("IMAGENET1K_V1")
