"""The run configuration: a frozen dataclass, TOML loading, overrides and validation.

Precedence: command-line flag > config file > built-in default. Unknown keys and wrong types
are errors that name the key (and the file and line when it came from a file).
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

AUTO = "auto"


@dataclass(frozen=True)
class Config:
    """Everything that decides what a run computes and how."""

    backbone: str = "resnet50"
    layer: str = ""  # "" = the backbone's default layer (`spp-extract backbones` lists them)
    weights: str = "DEFAULT"  # DEFAULT, a torchvision weights name, "none", or a state-dict file
    levels: tuple[int, ...] = (4, 2, 1)
    pooling: str = "max"
    mean: tuple[float, ...] = ()  # () = the weights' own mean/std (ImageNet for files and "none")
    std: tuple[float, ...] = ()
    seed: int = 0  # initialises the model when weights = "none"
    dtype: str = "float32"  # stored precision of the vectors
    precision: str = "fp32"  # compute precision; bf16/fp16 use autocast and are not exact
    device: str = AUTO
    batching: str = AUTO  # same-size | padded (masked padding, exact) | auto (padded on GPU)
    batch_size: int | str = AUTO  # most images in one batch
    batch_pixels: int | str = AUTO  # most padded pixels in one batch
    workers: int | str = AUTO  # decode processes
    max_pixels: int = 89_478_485  # larger images are refused per image (Pillow's bomb guard)
    allow_truncated: bool = False  # decode truncated files and mark the row instead of failing
    decode_timeout: float = 120.0  # seconds one batch's decoding may take before it is isolated
    commit_seconds: float = 30.0  # work is committed to a shard at least this often
    follow_symlinks: bool = False  # follow directory symlinks while walking inputs

    def replace(self, **changes: Any) -> Config:
        return validate(dataclasses.replace(self, **changes))

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


# Keys whose values change the vectors: a resumed run must agree on all of them.
MODEL_KEYS = (
    "backbone", "layer", "weights", "levels", "pooling", "mean", "std", "seed", "dtype", "precision",
)
CHOICES = {
    "pooling": ("max", "avg"),
    "dtype": ("float32", "float16"),
    "precision": ("fp32", "bf16", "fp16"),
    "batching": (AUTO, "same-size", "padded"),
}
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def _positive_int(name: str, value: Any, *, allow_auto: bool = False) -> None:
    if allow_auto and value == AUTO:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        expected = "a positive integer" + (" or 'auto'" if allow_auto else "")
        raise ConfigError(f"{name} = {value!r} is invalid; expected {expected}")


def _check(name: str, value: Any) -> None:
    """Raise ConfigError if ``value`` is not acceptable for field ``name``."""
    if name in CHOICES:
        if value not in CHOICES[name]:
            options = ", ".join(repr(c) for c in CHOICES[name])
            raise ConfigError(f"{name} = {value!r} is invalid; expected one of {options}")
    elif name in ("backbone", "layer", "weights"):
        if not isinstance(value, str) or (name != "layer" and not value):
            raise ConfigError(f"{name} = {value!r} is invalid; expected a non-empty string")
    elif name == "levels":
        if (
            not isinstance(value, tuple)
            or not value
            or any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in value)
            or len(set(value)) != len(value)
        ):
            raise ConfigError(
                f"levels = {list(value) if isinstance(value, tuple) else value!r} is invalid; "
                "expected distinct positive integers such as [4, 2, 1]"
            )
    elif name in ("mean", "std"):
        if not isinstance(value, tuple) or len(value) not in (0, 3) or any(
            isinstance(v, bool) or not isinstance(v, (int, float)) for v in value
        ) or (name == "std" and any(v <= 0 for v in value)):
            raise ConfigError(
                f"{name} = {value!r} is invalid; expected three numbers (one per RGB channel)"
                + (", all > 0" if name == "std" else "")
            )
    elif name == "device":
        if not isinstance(value, str) or not _DEVICE.match(value):
            raise ConfigError(
                f"device = {value!r} is invalid; expected auto, cpu, cuda, cuda:N or mps"
            )
    elif name in ("batch_size", "batch_pixels"):
        _positive_int(name, value, allow_auto=True)
    elif name == "workers":
        if value != AUTO and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise ConfigError(f"workers = {value!r} is invalid; expected 0 or more, or 'auto'")
    elif name in ("max_pixels", "seed"):
        if name == "seed":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"seed = {value!r} is invalid; expected an integer")
        else:
            _positive_int(name, value)
    elif name in ("decode_timeout", "commit_seconds"):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
            raise ConfigError(f"{name} = {value!r} is invalid; expected a number of seconds > 0")
    elif name in ("allow_truncated", "follow_symlinks"):
        if not isinstance(value, bool):
            raise ConfigError(f"{name} = {value!r} is invalid; expected true or false")


def validate(config: Config) -> Config:
    for f in fields(config):
        _check(f.name, getattr(config, f.name))
    if bool(config.mean) != bool(config.std):
        raise ConfigError("mean and std must be set together (three numbers each) or not at all")
    return config


def _normalise(name: str, value: Any) -> Any:
    """TOML arrays become tuples; ints are accepted where floats are expected."""
    if isinstance(value, list):
        return tuple(value)
    if name in ("decode_timeout", "commit_seconds") and isinstance(value, int) and not isinstance(
        value, bool
    ):
        return float(value)
    return value


def _unknown_key(key: str, where: str) -> ConfigError:
    names = [f.name for f in fields(Config)]
    close = difflib.get_close_matches(key, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(names)}"
    return ConfigError(f"unknown config key {key!r}{where}{hint}")


def _line_of(text: str, key: str) -> int | None:
    for number, line in enumerate(text.splitlines(), start=1):
        if re.match(rf"^\s*{re.escape(key)}\s*=", line):
            return number
    return None


def load_config(path: str | Path | None = None, **overrides: Any) -> Config:
    """Built-in defaults, then the TOML file at ``path``, then ``overrides`` (None = not given)."""
    values: dict[str, Any] = {}
    names = {f.name for f in fields(Config)}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from None
        for key, value in data.items():
            line = _line_of(text, key)
            where = f" in {path}" + (f" line {line}" if line else "")
            if key not in names:
                raise _unknown_key(key, where)
            value = _normalise(key, value)
            try:
                _check(key, value)
            except ConfigError as exc:
                raise ConfigError(f"{exc}{where}") from None
            values[key] = value
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in names:
            raise _unknown_key(key, "")
        values[key] = _normalise(key, value)
    return validate(Config(**values))


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(values: Mapping[str, Any]) -> str:
    """Flat mapping -> TOML text (only the value types a Config holds)."""
    return "".join(f"{key} = {_toml_value(value)}\n" for key, value in values.items())


def parse_levels(text: str) -> tuple[int, ...]:
    """'6,3,2,1' -> (6, 3, 2, 1) for the command line."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(
            f"levels {text!r} is invalid; expected comma-separated positive integers like 4,2,1"
        ) from None


def int_or_auto(name: str) -> Callable[[str], int | str]:
    def parse(text: str) -> int | str:
        if text == AUTO:
            return AUTO
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"{name} {text!r} is invalid; expected an integer or 'auto'") from None

    return parse
