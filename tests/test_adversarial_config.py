"""Adversarial configs: random TOML files and command-line values. Whatever comes in, the
answer is a valid Config or one ConfigError line naming the key: never another exception,
never a traceback."""

import math
import tomllib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from spp_extract import Config, ConfigError, load_config
from spp_extract.cli import app
from spp_extract.config import KEYS, to_toml

SETTINGS = settings(
    max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

_hostile_text = st.one_of(
    st.text(max_size=20),
    st.sampled_from(
        [
            "",
            " ",
            "auto",
            "none",
            "DEFAULT",
            "resnet18",
            "layer3",
            "cuda:0",
            "max",
            "a\nb",
            "\x00",
            "\x1b[2J",
            "\x7f",
            "\u0664",
            "\uff12",
            "\u2028",
            "'\"\\",
        ]
    ),
)
_numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**63, 2**64, 10**30, -(10**30)]),
    st.floats(),  # nan, inf, -inf, subnormals, -0.0
    st.sampled_from([math.nan, math.inf, -math.inf, 5e-324, 1e308]),
)
_scalar = st.one_of(_hostile_text, _numbers, st.booleans())
_value = st.one_of(
    _scalar, st.lists(_scalar, max_size=10), st.lists(st.integers(-3, 20), max_size=10)
)
_key = st.one_of(st.sampled_from(KEYS), st.sampled_from(KEYS).map(str.upper), st.text(max_size=12))
_raw = st.sampled_from(
    [
        "levels = [",
        "x.y = 1",
        "[table]\na = 1",
        "levels = [[4]]",
        "mean = {r = 1}",
        'backbone = """\n"""',
        "seed = 1979-05-27",
        "levels = [4, 2, 1]\nlevels = [2]",
        "= 1",
        "seed = " + "9" * 5000,
        "mean = [nan, nan, nan]\nstd = [1, 1, 1]",
        "commit_seconds = inf",
        "\ufeffbackbone = 'x'",
    ]
)


# Valid items too, so that both outcomes are exercised, and mixtures of good and bad.
_good_item = st.sampled_from(
    [
        ("levels", [6, 3, 2, 1]),
        ("levels", [16, 1]),
        ("seed", 2**62),
        ("seed", -3),
        ("commit_seconds", 0.5),
        ("decode_timeout", 604800),
        ("workers", 0),
        ("batch_size", "auto"),
        ("max_pixels", 2**40),
        ("pooling", "avg"),
        ("dtype", "float16"),
        ("device", "cuda:3"),
        ("allow_truncated", True),
        ("weights", '/w/\u00e9\n"x".pt'),
        ("layer", "a\tb"),
        ("backbone", "\x00"),
    ]
)
_items = st.lists(st.one_of(_good_item, _good_item, st.tuples(_key, _value)), max_size=6).map(dict)


def _names_a_key(message: str, keys: list[str]) -> bool:
    return any(k in message or repr(k) in message or repr(k)[1:-1] in message for k in keys)


@pytest.mark.slow
@SETTINGS
@given(data=_items, raw=st.lists(_raw, max_size=1))
def test_random_config_files_give_a_config_or_one_line_naming_the_key(tmp_path_factory, data, raw):
    path = tmp_path_factory.mktemp("c") / "c.toml"
    text = to_toml(data) + "\n".join(raw)
    path.write_text(text, encoding="utf-8")
    try:
        config = load_config(path)
    except ConfigError as exc:
        message = str(exc)
        assert "\n" not in message and "\r" not in message and len(message) < 2000, message
        message.encode("utf-8")  # printable: no lone surrogates
        try:
            parsed = tomllib.loads(text)
        except (tomllib.TOMLDecodeError, ValueError):
            assert str(path) in message
            return
        assert _names_a_key(message, list(parsed)), message
        return
    assert isinstance(config, Config)
    again = tomllib.loads(to_toml(config.to_dict()))  # a valid Config is always writable
    assert (
        load_config(**{k: tuple(v) if isinstance(v, list) else v for k, v in again.items()})
        == config
    )


@SETTINGS
@given(values=_items.map(lambda d: {k: v for k, v in d.items() if k in KEYS}))
def test_random_python_configs_give_a_config_or_a_config_error(values):
    try:
        config = Config(**values)
    except ConfigError as exc:
        assert "\n" not in str(exc) and _names_a_key(str(exc), [*values, "mean and std"]), str(exc)
        return
    for key in ("mean", "std", "decode_timeout", "commit_seconds"):
        assert all(
            math.isfinite(v)
            for v in (getattr(config, key) if key in ("mean", "std") else [getattr(config, key)])
        )
    assert 1 <= len(config.levels) <= 8 and all(1 <= n <= 16 for n in config.levels)


_OPTIONS = [
    "--levels",
    "--batch-size",
    "--batch-pixels",
    "--workers",
    "--max-pixels",
    "--device",
    "--pooling",
    "--dtype",
    "--precision",
    "--batching",
    "--layer",
    "--weights",
    "--backbone",
]
_cli_value = st.one_of(
    _hostile_text,
    st.from_regex(r"\A[ ,0-9\-]{0,12}\Z"),
    st.integers(-5, 10**25).map(str),
    st.lists(st.integers(-2, 40), max_size=10).map(lambda xs: ",".join(map(str, xs))),
    st.sampled_from(["\udce9", "4,\u0664", "1_0", "0x10", "1e3", "nan", "inf", "9" * 5000]),
)
_good_option = st.sampled_from(
    [
        ("--levels", "4,2,1"),
        ("--levels", " 6, 3 ,2,1"),
        ("--batch-size", "auto"),
        ("--batch-size", "8"),
        ("--workers", "0"),
        ("--max-pixels", "1000"),
        ("--device", "cpu"),
        ("--pooling", "avg"),
        ("--dtype", "float16"),
        ("--precision", "bf16"),
        ("--batching", "padded"),
        ("--layer", "layer3"),
    ]
)
runner = CliRunner()


@SETTINGS
@given(
    options=st.lists(
        st.one_of(_good_option, _good_option, st.tuples(st.sampled_from(_OPTIONS), _cli_value)),
        max_size=4,
    )
)
def test_random_command_line_values_exit_0_or_2_with_one_line(options):
    args = ["config", "--backbone", "resnet18", "--weights", "none"]
    args += [f"{option}={value}" for option, value in options]  # "=": a value may start with "-"
    result = runner.invoke(app, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code in (0, 2), (args, result.exit_code, result.output)
    assert "Traceback" not in result.output
    if result.exit_code == 2:
        # One line as a terminal shows it. (printable() leaves U+2028/U+2029 as they are, which
        # str.splitlines() would count as line breaks.)
        lines = result.stderr.removesuffix("\n").split("\n")
        assert (
            len(lines) == 1 and "\r" not in lines[0] and lines[0].startswith("spp-extract: error: ")
        ), (args, result.stderr)
        assert result.stdout == ""
    else:
        assert tomllib.loads(result.stdout)["backbone"] in (
            "resnet18",
            *(v for o, v in options if o == "--backbone"),
        )
