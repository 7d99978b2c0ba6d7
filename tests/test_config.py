import dataclasses
import math
import tomllib
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from spp_extract import Config, ConfigError, load_config
from spp_extract.config import KEYS, to_toml
from spp_extract.rules import int_or_auto, parse_levels

ROOT = Path(__file__).resolve().parents[1]


def test_defaults():
    c = load_config()
    assert (c.backbone, c.layer, c.weights, c.levels, c.pooling) == (
        "resnet50",
        "",
        "DEFAULT",
        (4, 2, 1),
        "max",
    )


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
        ("levels = [4, 0]", "distinct integers from 1 to 16"),
        ("levels = [2, -1]", "distinct integers from 1 to 16"),
        ("levels = [2, 2]", "distinct integers from 1 to 16"),
        ('levels = "4,2,1"', "levels = '4,2,1' is invalid"),
        ('pooling = "median"', "pooling = 'median' is invalid"),
        ("batch_size = 0", "batch_size = 0 is invalid"),
        ('workers = "many"', "workers = 'many' is invalid"),
        ('device = "gpu"', "device = 'gpu' is invalid"),
        ("mean = [0.5, 0.5]", "mean = [0.5, 0.5] is invalid"),
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
    assert parse_levels(" 4, 2 ,1 ") == (4, 2, 1)  # spaces around numbers are fine
    with pytest.raises(ConfigError, match="comma-separated"):
        parse_levels("4;2")


@pytest.mark.parametrize(
    "text", ["4,,2", "4,2,", ",4", "", " ", "\u0664,2", "4,\uff12", "+4", "4_0", "0x4"]
)
def test_cli_levels_take_ascii_digits_and_no_empty_parts(text):
    with pytest.raises(ConfigError, match="expected comma-separated integers from 1 to 16"):
        parse_levels(text)


@pytest.mark.parametrize("text", ["\u0664", "1_000", "+5", "5.0", "", "auto2", "0x10"])
def test_cli_integers_take_ascii_digits_only(text):
    parse = int_or_auto("batch-size")
    with pytest.raises(
        ConfigError, match="--batch-size '.*' is invalid; expected an integer or 'auto'"
    ):
        parse(text)
    assert parse("auto") == "auto" and parse(" 12 ") == 12


def test_cli_huge_integer_is_refused_by_the_range_check():
    value = int_or_auto("batch-size")("9" * 5000)  # int() itself refuses > 4300 digits
    with pytest.raises(
        ConfigError, match="batch_size = .* is invalid; expected an integer from 1 to 65536"
    ):
        load_config(batch_size=value)
    with pytest.raises(ConfigError, match="levels = .* is invalid"):
        load_config(levels=parse_levels("1000"))  # ~2 GB per vector


@pytest.mark.parametrize(
    "text, fragment",
    [
        (
            "mean = [nan, 0, 0]\nstd = [1, 1, 1]",
            "mean = [nan, 0, 0] is invalid; expected three finite",
        ),
        (
            "mean = [0, 0, 0]\nstd = [inf, 1, 1]",
            "std = [inf, 1, 1] is invalid; expected three finite",
        ),
        ("mean = [0, 0, 0]\nstd = [1e-300, 1, 1]", "std = [1e-300, 1, 1] is invalid"),
        ("mean = [0, 0, 0]\nstd = [0, 1, 1]", "std = [0, 1, 1] is invalid"),
        (
            "commit_seconds = nan",
            "commit_seconds = nan is invalid; expected a number of seconds > 0",
        ),
        ("commit_seconds = inf", "commit_seconds = inf is invalid"),
        ("commit_seconds = -inf", "commit_seconds = -inf is invalid"),
        ("decode_timeout = inf", "decode_timeout = inf is invalid"),
        ("decode_timeout = 1e9", "at most 604800 (one week)"),
        (
            "levels = [1000]",
            "levels = [1000] is invalid; expected 1 to 8 distinct integers from 1 to 16",
        ),
        ("levels = [1, 2, 3, 4, 5, 6, 7, 8, 9]", "expected 1 to 8 distinct integers"),
        ("levels = [4, 2.0]", "levels = [4, 2.0] is invalid"),
        ("levels = [true]", "levels = [True] is invalid"),
        (
            f"max_pixels = {10**30}",
            f"max_pixels = {10**30} is invalid; expected an integer from 1 to 1099511627776 or 'none'",
        ),
        (
            "batch_size = 100000",
            "batch_size = 100000 is invalid; expected an integer from 1 to 65536 or 'auto'",
        ),
        ("batch_pixels = 2199023255552", "batch_pixels = 2199023255552 is invalid"),
        (
            "workers = 5000",
            "workers = 5000 is invalid; expected an integer from 0 to 1024 or 'auto'",
        ),
        ("seed = 18446744073709551616", "seed = 18446744073709551616 is invalid"),
        ("seed = 1.5", "seed = 1.5 is invalid"),
        ('device = "cuda:\u0664"', "device = 'cuda:\u0664' is invalid"),
    ],
)
def test_non_finite_and_out_of_range_numbers_are_refused(tmp_path, text, fragment):
    path = tmp_path / "c.toml"
    path.write_text(text + "\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="line ") as info:
        load_config(path)
    assert fragment in str(info.value) and str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_numbers_at_the_bounds_are_accepted(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        "levels = [16, 8, 7, 6, 5, 3, 2, 1]\ncommit_seconds = 604800\ndecode_timeout = 0.5\n"
        "workers = 1024\nbatch_size = 65536\nseed = -9223372036854775808\n"
        "mean = [-1000, 0, 1000]\nstd = [1e-6, 1, 1000]\n"
    )
    c = load_config(path)
    assert c.levels == (16, 8, 7, 6, 5, 3, 2, 1) and c.commit_seconds == 604800.0
    assert c.mean == (-1000, 0, 1000) and c.std == (1e-6, 1, 1000) and c.seed == -(2**63)


def test_config_is_checked_on_construction():
    """The Python API cannot bypass the checks: Config(...) itself refuses."""
    with pytest.raises(ConfigError, match=r"mean = \[nan, 0.0, 0.0\] is invalid"):
        Config(mean=(math.nan, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    with pytest.raises(ConfigError, match=r"levels = \[1000\] is invalid"):
        Config(levels=(1000,))
    with pytest.raises(ConfigError, match="commit_seconds = inf is invalid"):
        Config().replace(commit_seconds=math.inf)
    assert Config(levels=[4, 2]).levels == (4, 2)  # lists and ints are normalised
    assert Config(decode_timeout=3).decode_timeout == 3.0


def test_non_utf8_weights_path_is_refused_with_the_fix():
    bad = b"/data/w\xe9ights.pt".decode("utf-8", "surrogateescape")
    with pytest.raises(ConfigError) as info:
        load_config(weights=bad)
    message = str(info.value)
    assert message == (
        "weights = '/data/w\\xe9ights.pt' is invalid: it is not valid UTF-8; "
        "rename the file to a UTF-8 name"
    )
    assert message.encode("utf-8")  # printable as it is


def test_to_toml_round_trips(tmp_path):
    c = Config(backbone="vgg16", levels=(6, 3, 2, 1), mean=(0.5, 0.5, 0.5), std=(0.2, 0.2, 0.2))
    path = tmp_path / "round.toml"
    path.write_text(to_toml({k: v for k, v in c.to_dict().items()}))
    assert load_config(path) == c


HOSTILE = [
    "a\\b",
    'say "hi"',
    "line\nbreak",
    "tab\there",
    "cr\rlf",
    "\x00nul",
    "\x1b[31mred",
    "del\x7f",
    "c1\x85\x9f",
    "\u2028sep",
    "emoji \U0001f600",
    "'''",
    '"""',
    "\\u0041",
    "#x",
    "[t]",
    "\b\f",
]


def test_to_toml_escapes_every_hostile_string():
    values = {f"k{i}": text for i, text in enumerate(HOSTILE)}
    values.update(
        weights='/tmp/x\ny\\z".pt',
        n=math.inf,
        m=-math.inf,
        big=10**40,
        neg=-(2**70),
        tiny=5e-324,
        huge=1e300,
        z=-0.0,
        t=(1, 2.5, "x\ny"),
        flag=False,
    )
    values["key with space"] = "v"
    values['k\n"ey'] = "v"
    text = to_toml(values)
    assert tomllib.loads(text) == {
        k: list(v) if isinstance(v, tuple) else v for k, v in values.items()
    }
    assert "\x00" not in text and "\x7f" not in text and "\x85" not in text and "\x1b" not in text
    assert math.isnan(tomllib.loads(to_toml({"x": math.nan}))["x"])


def test_to_toml_refuses_lone_surrogates():
    with pytest.raises(ValueError, match="lone surrogate"):
        to_toml({"weights": "w\udce9.pt"})


def _same(a, b) -> bool:
    """Equality with nan == nan and tuples compared as lists."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


_text = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)  # Cs: lone surrogates
_scalar = st.one_of(
    _text, st.floats(), st.integers(min_value=-(10**60), max_value=10**60), st.booleans()
)
_value = st.one_of(_scalar, st.lists(_scalar, max_size=4).map(tuple), st.lists(_scalar, max_size=4))


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.one_of(st.sampled_from(KEYS), _text), _value, max_size=8))
@example(
    {"0\n": "", "a b": 1}
)  # "$" matches before a final newline: a key ending in one is not bare
def test_to_toml_round_trips_any_config_typed_mapping(values):
    back = tomllib.loads(to_toml(values))
    assert list(back) == list(values)
    assert all(_same(back[k], values[k]) for k in values), (values, back)


def test_origins_name_the_file_and_line_and_are_not_configuration(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('# comment\nbackbone = "vgg16"\nlayer = "features.29"\n')
    c = load_config(path, layer="features")
    assert dict(c.origins) == {
        "backbone": f"{path} line 2"
    }  # the flag's layer is not from the file
    assert c == Config(backbone="vgg16", layer="features")  # origins are not compared
    assert "origins" not in c.to_dict() and "origins" not in repr(c)
    assert "backbone" not in c.replace(backbone="resnet18").origins
    assert "origins" not in KEYS
    path.write_text('origins = "x"\n')
    with pytest.raises(ConfigError, match="unknown config key 'origins'"):
        load_config(path)


def test_config_file_that_is_not_utf8_or_has_a_huge_integer(tmp_path):
    path = tmp_path / "c.toml"
    path.write_bytes(b'backbone = "\xff"\n')
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        load_config(path)
    path.write_text("seed = " + "9" * 5000 + "\n")
    with pytest.raises(ConfigError, match="Exceeds the limit") as info:
        load_config(path)
    assert len(str(info.value)) < 300


def test_default_toml_names_every_key_and_loads():
    path = ROOT / "configs" / "default.toml"
    lines = [line.lstrip("# ") for line in path.read_text().splitlines()]
    assert [key for key in KEYS if not any(line.startswith(f"{key} =") for line in lines)] == []
    assert load_config(path) == Config()
    assert [f.name for f in dataclasses.fields(Config) if f.name not in KEYS] == ["origins"]


def test_shipped_configs_load(tmp_path):
    from spp_extract.backbones import resolve

    configs = sorted((ROOT / "configs").glob("*.toml"))
    assert len(configs) >= 4
    for path in configs:
        resolve(load_config(path))  # backbone, layer and weights names all valid
