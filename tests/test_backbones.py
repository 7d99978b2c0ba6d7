import os
import pickle

import pytest
import torch
from conftest import photo
from torchvision.models import get_model, get_model_weights

from spp_extract import Config, ConfigError, extract, read_features
from spp_extract.backbones import build_trunk, describe, list_backbones, resolve
from spp_extract.families import FAMILIES
from spp_extract.weights import expected_cache_file


@pytest.mark.slow
def test_every_family_has_models_and_a_valid_default_layer():
    names = list_backbones()
    for family in FAMILIES:
        members = [n for n in names if n.startswith(family.prefix)]
        assert members, family.prefix
        layer, channels, _ = describe(members[0])
        assert layer == family.default_layer and channels > 0
    for required in (
        "resnet50",
        "resnext50_32x4d",
        "wide_resnet50_2",
        "vgg16_bn",
        "alexnet",
        "densenet121",
        "mobilenet_v2",
        "mobilenet_v3_large",
        "efficientnet_b0",
        "efficientnet_v2_s",
        "regnet_y_400mf",
        "convnext_tiny",
        "squeezenet1_1",
        "shufflenet_v2_x1_0",
        "mnasnet1_0",
        "googlenet",
    ):
        assert required in names


def test_channels_of_known_layers():
    assert describe("resnet50")[:2] == ("layer4", 2048)
    assert describe("resnet50", "layer3")[:2] == ("layer3", 1024)
    assert describe("vgg16", "features.29")[:2] == ("features.29", 512)


def test_unknown_backbone_suggests_close_names():
    with pytest.raises(ConfigError) as info:
        resolve(Config(backbone="resnet5"))
    message = str(info.value)
    assert "unknown backbone 'resnet5'" in message and "'resnet50'" in message
    assert "spp-extract backbones" in message


def test_vision_transformers_are_refused_with_reason():
    with pytest.raises(ConfigError, match="vision transformer"):
        resolve(Config(backbone="vit_b_16"))


def test_unknown_layer_lists_valid_ones():
    with pytest.raises(ConfigError) as info:
        resolve(Config(backbone="resnet18", layer="layer5"))
    assert "unknown layer 'layer5'" in str(info.value) and "layer4" in str(info.value)


def test_weights_names_and_normalisation():
    r = resolve(Config(backbone="resnet50", weights="IMAGENET1K_V1"))
    assert r.weights == "ResNet50_Weights.IMAGENET1K_V1"
    assert r.mean == pytest.approx((0.485, 0.456, 0.406))
    assert resolve(Config(backbone="resnet50")).weights == "ResNet50_Weights.IMAGENET1K_V2"
    custom = resolve(Config(backbone="resnet18", weights="none", mean=(0.5,) * 3, std=(0.25,) * 3))
    assert custom.mean == (0.5,) * 3 and custom.std == (0.25,) * 3
    with pytest.raises(ConfigError, match="IMAGENET1K_V1"):
        resolve(Config(backbone="resnet50", weights="IMAGENET9K"))


def test_default_weights_offline_without_cache_names_the_cache_file(tmp_path):
    with pytest.raises(ConfigError) as info:
        build_trunk(Config(backbone="resnet18"))
    message = str(info.value)
    expected = expected_cache_file(get_model_weights("resnet18").DEFAULT.url)
    assert str(expected) in message and "weights='FILE'" in message  # Python terms: an API call
    assert "weights='none'" in message
    assert str(expected).startswith(os.environ["TORCH_HOME"])


@pytest.mark.slow
def test_default_weights_come_from_torchvisions_cache(tmp_path):
    """The real DEFAULT path: a state dict placed under torchvision's own file name."""
    torch.manual_seed(5)
    model = get_model("resnet18", weights=None)
    cache = expected_cache_file(get_model_weights("resnet18").DEFAULT.url)
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cache)
    trunk = build_trunk(Config(backbone="resnet18", weights="DEFAULT"))
    assert trunk.resolved.weights == "ResNet18_Weights.IMAGENET1K_V1"
    torch.testing.assert_close(trunk.module.conv1.weight, model.conv1.weight)
    # end to end through the CLI-facing API, too
    folder = tmp_path / "imgs"
    folder.mkdir()
    from PIL import Image

    Image.fromarray(photo(70, 90)).save(folder / "a.png")
    extract([folder], tmp_path / "f.h5", config=Config(backbone="resnet18", workers=0))
    assert read_features(tmp_path / "f.h5").attrs["weights"] == "ResNet18_Weights.IMAGENET1K_V1"


@pytest.mark.slow
def test_trunk_only_state_dict_is_accepted(tmp_path):
    torch.manual_seed(9)
    full = build_trunk(Config(backbone="resnet18", weights="none", layer="layer3", seed=9))
    path = tmp_path / "trunk.pt"
    torch.save(full.module.state_dict(), path)
    trunk = build_trunk(Config(backbone="resnet18", weights=str(path), layer="layer3"))
    x = torch.randn(1, 3, 40, 50)
    with torch.inference_mode():
        torch.testing.assert_close(trunk.module(x), full.module(x), rtol=0, atol=0)


def test_state_dict_for_another_architecture_names_keys(tmp_path):
    path = tmp_path / "vgg.pt"
    with torch.device("meta"):  # vgg11's own names; tiny values (a real one is 500 MB to make)
        names = list(get_model("vgg11", weights=None).state_dict())
    torch.save({name: torch.zeros(1) for name in names}, path)
    with pytest.raises(ConfigError) as info:
        build_trunk(Config(backbone="resnet18", weights=str(path)))
    message = str(info.value)
    assert "does not fit resnet18" in message and "missing keys: " in message
    assert "unexpected keys: " in message and "classifier.0.weight" in message


@pytest.mark.parametrize(
    "write, message",
    [
        (lambda path: torch.save([1, 2, 3], path), "not a state dict"),
        (lambda path: path.write_bytes(b"this is not a checkpoint"), "weights_only=True"),
    ],
    ids=["a-list", "garbage"],
)
def test_weights_file_that_is_not_a_state_dict(tmp_path, write, message):
    path = tmp_path / "weights.pt"
    write(path)
    with pytest.raises(ConfigError, match=message):
        build_trunk(Config(backbone="resnet18", weights=str(path)))


class _Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_in_weights_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"conv1.weight": _Evil(str(marker))}, f)
    with pytest.raises(ConfigError, match="weights_only=True"):
        build_trunk(Config(backbone="resnet18", weights=str(path)))
    assert not marker.exists()


def test_missing_weights_file():
    with pytest.raises(ConfigError, match="neither a file nor a weights name"):
        resolve(Config(backbone="resnet18", weights="/nope/w.pt"))


@pytest.mark.slow
def test_minimum_sides():
    assert build_trunk(Config(backbone="resnet18", weights="none")).min_side == 1
    assert build_trunk(Config(backbone="vgg11", weights="none")).min_side == 32


@pytest.mark.parametrize("weights", ["DEFAULT", "IMAGENET1K_V1", "ResNet50_Weights.IMAGENET1K_V2"])
def test_resolving_a_config_never_reads_or_downloads_weights(monkeypatch, weights):
    """resolve() and ``spp-extract config`` name the weights and their normalisation without
    loading them: every cache file torchvision would read holds garbage, and every way to read
    or fetch weights records the call and fails (recorded, so a caller that catches the
    failure cannot hide it)."""
    from torchvision.models import WeightsEnum
    from typer.testing import CliRunner

    from spp_extract.cli import app

    for w in get_model_weights("resnet50"):
        cache = expected_cache_file(w.url)
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_bytes(b"not a checkpoint: resolving must not read this")
    calls = []

    def refuse(name):  # noqa: ANN001, ANN202
        def refused(*_args, **_kwargs):  # noqa: ANN002, ANN003, ANN202
            calls.append(name)
            raise AssertionError(f"{name} called while resolving a config")

        return refused

    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse("load_state_dict_from_url"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse("download_url_to_file"))
    monkeypatch.setattr(WeightsEnum, "get_state_dict", refuse("WeightsEnum.get_state_dict"))
    resolved = resolve(Config(backbone="resnet50", weights=weights))
    assert resolved.weights.startswith("ResNet50_Weights.IMAGENET1K_V")
    assert resolved.mean == pytest.approx((0.485, 0.456, 0.406))
    result = CliRunner().invoke(app, ["config", "--backbone", "resnet50", "--weights", weights])
    assert result.exit_code == 0, result.output
    assert f'weights = "{weights}"' in result.output
    assert "mean = [0.485, 0.456, 0.406]" in result.output  # the weights' own, found without them
    assert calls == []


@pytest.mark.parametrize(
    ("layer", "block"), [("layer3.1.conv2", "layer3.1"), ("layer2.0.downsample", "layer2.0")]
)
def test_a_layer_inside_a_block_names_the_block_to_cut_at(layer, block):
    """torchvision's graph knows the name; the trunk cannot be cut there: say where it can."""
    with pytest.raises(ConfigError) as info:
        resolve(Config(backbone="resnet18", layer=layer))
    message = str(info.value)
    assert f"{layer!r} is inside {block!r}" in message and f"cut at {block!r}" in message
    assert "\n" not in message
