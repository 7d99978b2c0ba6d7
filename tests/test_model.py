"""The in-memory API: create_model gives the vectors the command line writes."""

import pytest
import torch
from conftest import assert_vectors_close
from PIL import Image

from spp_extract import Config, ConfigError, SppModel, create_model, extract, read_features
from spp_extract.pooling import spp_dim


@pytest.mark.slow
def test_embed_equals_the_files_rows(tmp_path, example_dir):
    out = tmp_path / "f.h5"
    extract(
        [example_dir],
        out,
        config=Config(backbone="resnet18", weights="none", workers=0, levels=(3, 1), seed=3),
    )
    data = read_features(out)
    model = create_model("resnet18", weights="none", levels=(3, 1), seed=3)
    pictures = [Image.open(example_dir / p) for p in data.paths]
    got = model.embed(pictures).numpy()
    # the tool's documented exactness: <= 1e-4 relative per vector (the CLI runs channels-last)
    for row, path in enumerate(data.paths):
        assert_vectors_close(got[row], data.features[row], rel=1e-4, err_msg=path)
    # uint8 tensors, mixed sizes, one at a time: the same
    from spp_extract.images import decode

    tensors = [decode(str(example_dir / p), max_pixels=10**9).pixels for p in data.paths[:3]]
    for row, vector in enumerate(model.embed(tensors).numpy()):
        assert_vectors_close(vector, data.features[row], rel=1e-4, err_msg=data.paths[row])


@pytest.mark.slow
def test_the_module_and_its_facts():
    model = create_model("vgg11", weights="none", levels=(2, 1), pooling="avg")
    assert isinstance(model, SppModel) and isinstance(model, torch.nn.Module)
    assert (model.channels, model.dim, model.min_side, model.layer) == (
        512,
        spp_dim(512, (2, 1)),
        32,
        "features",
    )
    assert model.mean == pytest.approx((0.485, 0.456, 0.406))
    with torch.inference_mode():
        y = model(torch.randn(2, 3, 40, 70))
    assert y.shape == (2, model.dim)
    tiny = model.embed([torch.zeros(3, 1, 1, dtype=torch.uint8)])  # padded up to 32 px
    assert tiny.shape == (1, model.dim) and torch.isfinite(tiny).all()


@pytest.mark.parametrize(
    "backbone, pooling, message",
    [("resnet5", "max", "unknown backbone"), ("resnet18", "median", "pooling")],
    ids=["backbone", "pooling"],
)
def test_bad_choices_are_config_errors(backbone, pooling, message):
    with pytest.raises(ConfigError, match=message):
        create_model(backbone, weights="none", pooling=pooling)  # type: ignore[arg-type]
