import pytest

from spp_extract import Config, ConfigError, load_config
from spp_extract.config import parse_levels, to_toml


def test_defaults():
    c = load_config()
    assert (c.backbone, c.layer, c.weights, c.levels, c.pooling) == ("resnet50", "", "DEFAULT", (4, 2, 1), "max")


def test_precedence_flag_over_file_over_default(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('backbone = "vgg16"\nlevels = [6, 3, 2, 1]\npooling = "avg"\n')
    c = load_config(path, pooling="max", layer=None)
    assert (c.backbone, c.levels, c.pooling, c.layer) == ("vgg16", (6, 3, 2, 1), "max", "")


def test_unknown_key_names_key_file_line_and_suggestion(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('backbone = "resnet18"\n\nlevles = [4, 2, 1]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "'levles'" in message and str(path) in message and "line 3" in message
    assert "did you mean 'levels'" in message


@pytest.mark.parametrize(
    "text, fragment",
    [
        ("levels = []", "levels = [] is invalid"),
        ("levels = [4, 0]", "distinct positive integers"),
        ("levels = [2, -1]", "distinct positive integers"),
        ("levels = [2, 2]", "distinct positive integers"),
        ('levels = "4,2,1"', "levels = '4,2,1' is invalid"),
        ('pooling = "median"', "pooling = 'median' is invalid"),
        ("batch_size = 0", "batch_size = 0 is invalid"),
        ('workers = "many"', "workers = 'many' is invalid"),
        ('device = "gpu"', "device = 'gpu' is invalid"),
        ("mean = [0.5, 0.5]", "mean = (0.5, 0.5) is invalid"),
        ('dtype = "float64"', "dtype = 'float64' is invalid"),
        ("allow_truncated = 1", "expected true or false"),
    ],
)
def test_wrong_values_name_the_key(tmp_path, text, fragment):
    path = tmp_path / "c.toml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError, match="line 1") as info:
        load_config(path)
    assert fragment in str(info.value)


def test_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("levels = [4, 2\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.toml")


def test_mean_and_std_go_together():
    with pytest.raises(ConfigError, match="together"):
        Config(mean=(0.5, 0.5, 0.5)).replace()


def test_cli_levels_parsing():
    assert parse_levels("6,3,2,1") == (6, 3, 2, 1)
    with pytest.raises(ConfigError, match="comma-separated"):
        parse_levels("4;2")


def test_to_toml_round_trips(tmp_path):
    c = Config(backbone="vgg16", levels=(6, 3, 2, 1), mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    path = tmp_path / "round.toml"
    path.write_text(to_toml({k: v for k, v in c.to_dict().items()}))
    assert load_config(path) == c


def test_shipped_configs_load(tmp_path):
    from pathlib import Path

    from spp_extract.backbones import resolve

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.toml"))
    assert len(configs) >= 4
    for path in configs:
        resolve(load_config(path))  # backbone, layer and weights names all valid
