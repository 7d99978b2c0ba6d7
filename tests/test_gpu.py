"""GPU checks; skipped where no CUDA device is present (CI has none; run them on a GPU box)."""

import pytest
import torch
from conftest import assert_vectors_close, reference_vector, rel_err

from spp_extract import Config, extract, read_features
from spp_extract.backbones import build_trunk

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("backbone", ["resnet50", "vgg11"])
def test_padded_batches_on_gpu_equal_per_image_cpu_runs(tmp_path, example_dir, backbone):
    config = Config(
        backbone=backbone,
        weights="none",
        device="cuda",
        batching="padded",
        batch_size=16,
        workers=2,
    )
    out = tmp_path / "f.h5"
    extract([example_dir], out, config=config)
    data = read_features(out)
    assert data.attrs["device"] == "cuda" and data.attrs["batching"] == "padded"
    trunk = build_trunk(config.replace(device="cpu"))
    for row, name in enumerate(data.paths):
        assert_vectors_close(
            data.features[row],
            reference_vector(trunk, example_dir / name, (4, 2, 1)),
            rel=1e-4,
            err_msg=name,
        )


def test_bf16_is_close_but_opt_in(tmp_path, example_dir):
    fp32, bf16 = tmp_path / "fp32.h5", tmp_path / "bf16.h5"
    base = Config(backbone="resnet50", weights="none", device="cuda")
    extract([example_dir], fp32, config=base)
    extract([example_dir], bf16, config=base.replace(precision="bf16"))
    a, b = read_features(fp32).features, read_features(bf16).features
    assert 0 < rel_err(b, a) < 0.05
    # opt-in: the default is exact fp32 with TF32 off, and the file says which ran
    assert base.precision == "fp32" and read_features(fp32).attrs["precision"] == "fp32"
    assert read_features(bf16).attrs["precision"] == "bf16"
    assert not torch.backends.cuda.matmul.allow_tf32
