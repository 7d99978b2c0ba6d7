"""The run configuration: a frozen dataclass, TOML loading, overrides and validation.

Precedence: command-line flag > config file > built-in default. Unknown keys and wrong types
are errors that name the key (and the file and line when it came from a file).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal, get_args

from .errors import ConfigError, printable

if TYPE_CHECKING:
    from .backbones import ResolvedModel

AUTO = "auto"
NONE = "none"

# The keys with a fixed set of values: their types, and (CHOICES) what the checks accept.
Pooling = Literal["max", "avg"]
Dtype = Literal["float32", "float16"]
Precision = Literal["fp32", "bf16", "fp16"]
Batching = Literal["auto", "same-size", "padded"]


@dataclass(frozen=True)
class Config:
    """Everything that decides what a run computes and how. Checked on construction."""

    backbone: str = "resnet50"
    layer: str = ""  # "" = the backbone's default layer (`spp-extract backbones` lists them)
    weights: str = "DEFAULT"  # DEFAULT, a torchvision weights name, "none", or a state-dict file
    levels: tuple[int, ...] = (4, 2, 1)
    pooling: Pooling = "max"
    mean: tuple[float, ...] = ()  # () = the weights' own mean/std (ImageNet for files and "none")
    std: tuple[float, ...] = ()
    seed: int = 0  # initialises the model when weights = "none"
    dtype: Dtype = "float32"  # stored precision of the vectors
    precision: Precision = "fp32"  # compute precision; bf16/fp16 use autocast and are not exact
    device: str = AUTO
    batching: Batching = "auto"  # same-size | padded (masked padding, exact) | auto (padded on GPU)
    batch_size: int | str = AUTO  # most images in one batch
    batch_pixels: int | str = AUTO  # most padded pixels in one batch
    workers: int | str = AUTO  # decode processes
    max_pixels: int | str = 89_478_485  # larger images are refused per image (Pillow's bomb
    # guard); "none": no limit (trusted inputs)
    max_memory: str = AUTO  # "1GB", "512MB", "2GiB": what one forward may use; larger images
    # are tiled (or refused, for trunks that cannot be tiled)
    allow_truncated: bool = False  # decode truncated files and mark the row instead of failing
    decode_timeout: float = 120.0  # seconds one batch's decoding may take before it is isolated
    commit_seconds: float = 30.0  # work is committed to a shard at least this often
    follow_symlinks: bool = False  # follow directory symlinks while walking inputs
    # Not configuration: where keys read from a file came from ("configs/x.toml line 3"), so
    # that a conflict with a flag can name the file. Not compared, not written out.
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in KEYS:
            value = _normalise(name, getattr(self, name))
            object.__setattr__(self, name, value)
            _check(name, value)
        if bool(self.mean) != bool(self.std):
            raise ConfigError(
                "mean and std must be set together (three numbers each) or not at all"
            )
        object.__setattr__(self, "origins", MappingProxyType(dict(self.origins)))

    def replace(self, **changes: Any) -> Config:
        origins = {k: v for k, v in self.origins.items() if k not in changes}
        return dataclasses.replace(self, origins=origins, **changes)

    def to_dict(self) -> dict[str, Any]:
        """The configuration keys and values (``origins`` is not one of them)."""
        return {name: getattr(self, name) for name in KEYS}


KEYS = tuple(f.name for f in fields(Config) if f.name != "origins")
# Keys whose values change the vectors: a resumed run must agree on all of them.
MODEL_KEYS = (
    "backbone",
    "layer",
    "weights",
    "levels",
    "pooling",
    "mean",
    "std",
    "seed",
    "dtype",
    "precision",
)


def fingerprint(config: Config, resolved: ResolvedModel) -> dict[str, Any]:
    """The resolved values that decide the vectors; a resumed run must match them all."""
    values = {
        "backbone": resolved.backbone,
        "layer": resolved.layer,
        "weights": resolved.weights_id,
        "levels": list(config.levels),
        "pooling": config.pooling,
        "mean": list(resolved.mean),
        "std": list(resolved.std),
        "dtype": config.dtype,
        "precision": config.precision,
    }
    assert set(values) | {"seed"} == set(MODEL_KEYS)
    if config.weights == "none":
        values["seed"] = config.seed  # random weights: the seed decides them
    return values


def resolved_config(config: Config, resolved: ResolvedModel) -> dict[str, Any]:
    """The full configuration with defaults filled in (printed by `spp-extract config`)."""
    values = config.to_dict()
    values.update(layer=resolved.layer, mean=list(resolved.mean), std=list(resolved.std))
    return values


CHOICES: dict[str, tuple[str, ...]] = {
    "pooling": get_args(Pooling),
    "dtype": get_args(Dtype),
    "precision": get_args(Precision),
    "batching": get_args(Batching),
}
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]{1,4})?)$")
# Bounds: beyond them a value is a typo or an attack, never a plan (and would fail mid-run).
MAX_LEVEL, MAX_LEVELS = 16, 8  # 8 levels of up to 16 x 16 bins: <= 1,496 bins per channel
MAX_SECONDS = 7 * 24 * 3600.0  # decode_timeout, commit_seconds: at most one week
MAX_PIXELS = 2**40  # max_pixels, batch_pixels (about 10^12)
MAX_BATCH, MAX_WORKERS = 65_536, 1024
MEAN_RANGE, STD_RANGE = (-1000.0, 1000.0), (1e-6, 1000.0)  # pixels are in [0, 1]
SEED_RANGE = (-(2**63), 2**63 - 1)  # what torch.manual_seed accepts and TOML can hold
MIN_MEMORY, MAX_MEMORY = 10**6, 10**15  # max_memory: 1 MB to 1 PB
_SIZE = re.compile(r"^ *([0-9]{1,16}(?:\.[0-9]{1,6})?) *([KMGTP]i?B|B)? *$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "pb": 10**15,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
    "pib": 2**50,
}


def memory_size(text: str) -> int | None:
    """'512MB' -> 512_000_000, '2GiB' -> 2**31, '1.5GB' -> 1_500_000_000 (bytes without a
    unit); None if ``text`` is not a size."""
    match = _SIZE.match(text)
    if match is None:
        return None
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])


def pixel_limit(config: Config) -> int:
    """``max_pixels`` as a number (``none``: no limit)."""
    return 2**62 if config.max_pixels == NONE else int(config.max_pixels)


def _show(value: Any) -> str:
    """``repr(value)`` for a one-line message: short, escaped, never raising."""
    if isinstance(value, tuple):
        value = list(value)
    try:
        text = repr(value)
    except ValueError:  # an int with more than 4300 digits
        return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
    return text if len(text) <= 120 else text[:100] + "..." + text[-10:]


def _invalid(name: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{name} = {_show(value)} is invalid; expected {expected}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _in_range(value: Any, low: float, high: float) -> bool:
    return _is_number(value) and math.isfinite(value) and low <= value <= high


def _check_int(name: str, value: Any, low: int, high: int, *, allow_auto: bool = False) -> None:
    if allow_auto and value == AUTO:
        return
    if not _is_int(value) or not low <= value <= high:
        expected = f"an integer from {low} to {high}" + (" or 'auto'" if allow_auto else "")
        raise _invalid(name, value, expected)


def _has_surrogates(text: str) -> bool:
    return any(0xD800 <= ord(ch) <= 0xDFFF for ch in text)


def _check(name: str, value: Any) -> None:
    """Raise ConfigError if ``value`` is not acceptable for key ``name``: each key's rules."""
    if isinstance(value, str) and _has_surrogates(value):
        # A file name that is not UTF-8 (os.fsdecode's surrogate escapes) cannot be stored as
        # TOML or HDF5 text, so a run could never record or resume it.
        fix = "; rename the file to a UTF-8 name" if name == "weights" else ""
        raise ConfigError(f"{name} = '{printable(value)}' is invalid: it is not valid UTF-8{fix}")
    if name in CHOICES:
        if value not in CHOICES[name]:
            raise _invalid(name, value, "one of " + ", ".join(repr(c) for c in CHOICES[name]))
    elif name in ("backbone", "layer", "weights"):
        if not isinstance(value, str) or (name != "layer" and not value):
            raise _invalid(name, value, "a non-empty string")
    elif name == "levels":
        if (
            not isinstance(value, tuple)
            or not 1 <= len(value) <= MAX_LEVELS
            or not all(_is_int(n) and 1 <= n <= MAX_LEVEL for n in value)
            or len(set(value)) != len(value)
        ):
            raise _invalid(
                name,
                value,
                f"1 to {MAX_LEVELS} distinct integers from 1 to {MAX_LEVEL}, such as [4, 2, 1]",
            )
    elif name in ("mean", "std"):
        low, high = MEAN_RANGE if name == "mean" else STD_RANGE
        if (
            not isinstance(value, tuple)
            or len(value) not in (0, 3)
            or not all(_in_range(v, low, high) for v in value)
        ):
            raise _invalid(
                name, value, f"three finite numbers (one per RGB channel) from {low:g} to {high:g}"
            )
    elif name == "device":
        if not isinstance(value, str) or not _DEVICE.match(value):
            raise _invalid(name, value, "auto, cpu, cuda, cuda:N or mps")
    elif name == "batch_size":
        _check_int(name, value, 1, MAX_BATCH, allow_auto=True)
    elif name == "batch_pixels":
        _check_int(name, value, 1, MAX_PIXELS, allow_auto=True)
    elif name == "workers":
        _check_int(name, value, 0, MAX_WORKERS, allow_auto=True)
    elif name == "max_pixels":
        if value != NONE and (not _is_int(value) or not 1 <= value <= MAX_PIXELS):
            raise _invalid(name, value, f"an integer from 1 to {MAX_PIXELS} or 'none'")
    elif name == "max_memory":
        size = memory_size(value) if isinstance(value, str) else None
        if value != AUTO and (size is None or not MIN_MEMORY <= size <= MAX_MEMORY):
            raise _invalid(
                name, value, "a size from 1MB to 1PB such as '512MB', '4GB' or '2GiB', or 'auto'"
            )
    elif name == "seed":
        _check_int(name, value, *SEED_RANGE)
    elif name in ("decode_timeout", "commit_seconds"):
        if not _in_range(value, 0.0, MAX_SECONDS) or value <= 0:
            raise _invalid(
                name, value, f"a number of seconds > 0 and at most {MAX_SECONDS:g} (one week)"
            )
    elif name in ("allow_truncated", "follow_symlinks"):
        if not isinstance(value, bool):
            raise _invalid(name, value, "true or false")


def _normalise(name: str, value: Any) -> Any:
    """Lists (TOML arrays) become tuples; ints are accepted where floats are expected."""
    if isinstance(value, list):
        value = tuple(value)
    if name in ("decode_timeout", "commit_seconds") and _is_int(value) and abs(value) < 2**53:
        return float(value)
    return value


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, KEYS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(KEYS)}"
    return ConfigError(f"unknown config key {_show(key)}{where}{hint}")


def _line_of(text: str, key: str) -> int | None:
    for number, line in enumerate(text.splitlines(), start=1):
        if re.match(rf"^\s*{re.escape(key)}\s*=", line):
            return number
    return None


def load_config(path: str | Path | None = None, **overrides: Any) -> Config:
    """Built-in defaults, then the TOML file at ``path``, then ``overrides`` (None = not given).

    ``origins`` of the result names the file and line of each key the file set."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        shown = printable(str(path))
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file '{shown}': {exc.strerror}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"config file '{shown}' is not UTF-8 text (byte {exc.start}); TOML files are UTF-8"
            ) from None
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file '{shown}' is not valid TOML: {exc}") from None
        except ValueError as exc:  # tomllib: an integer of more than 4300 digits
            raise ConfigError(f"config file '{shown}' is not usable: {exc}".split(";")[0]) from None
        for key, value in data.items():
            line = _line_of(text, key)
            where = f" in {shown}" + (f" line {line}" if line else "")
            if key not in KEYS:
                raise _unknown_key(key, where)
            value = _normalise(key, value)
            try:
                _check(key, value)
            except ConfigError as exc:
                raise ConfigError(f"{exc}{where}") from None
            values[key] = value
            origins[key] = where.removeprefix(" in ")
    for key, value in overrides.items():
        if value is None:
            continue
        if key not in KEYS:
            raise _unknown_key(key, "")
        values[key] = value
        origins.pop(key, None)
    return Config(**values, origins=origins)


_ESCAPES = {
    "\\": "\\\\",
    '"': '\\"',
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}
_BARE_KEY = re.compile(r"^[A-Za-z0-9_-]+$")


def _toml_string(text: str) -> str:
    """A TOML basic string holding exactly ``text``: every control character escaped."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif code < 0x20 or 0x7F <= code < 0xA0:  # C0, DEL and C1 controls
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:
            raise ValueError(f"'{printable(text)}' holds a lone surrogate; TOML text is Unicode")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # nan, inf, -inf, 1e+300 and any int are TOML as Python writes them
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, (str, os.PathLike)):
        return _toml_string(os.fspath(value))
    raise TypeError(f"cannot write a {type(value).__name__} as a TOML value")


def to_toml(values: Mapping[str, Any]) -> str:
    """Flat mapping -> TOML text that ``tomllib.loads`` reads back as the same values (tuples
    as lists). Raises ValueError for text that is not Unicode (lone surrogates)."""
    return "".join(
        f"{key if _BARE_KEY.match(key) else _toml_string(key)} = {_toml_value(value)}\n"
        for key, value in values.items()
    )


# Command-line numbers: ASCII digits only (int() would also take "٤", " 4", "4_000").
_LEVELS = re.compile(r"^ *[0-9]+ *(, *[0-9]+ *)*$")
_INT = re.compile(r"^ *-?[0-9]+ *$")


def parse_levels(text: str) -> tuple[int, ...]:
    """'6,3,2,1' -> (6, 3, 2, 1) for the command line; spaces around the numbers are allowed,
    empty parts ('4,,2', '4,') are not."""
    if not _LEVELS.match(text):
        raise ConfigError(
            f"levels '{printable(text)}' is invalid; expected comma-separated integers from 1 to "
            f"{MAX_LEVEL} like 4,2,1"
        )
    return tuple(_int(part) for part in text.split(","))


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:  # more than 4300 digits: far out of every range anyway
        return 2**64


def int_or_auto(name: str, *, allow_auto: bool = True) -> Callable[[str], int | str]:
    """A parser for the command-line option ``--name``: ASCII digits (or 'auto')."""

    def parse(text: str) -> int | str:
        if allow_auto and text == AUTO:
            return AUTO
        if not _INT.match(text):
            expected = "an integer" + (" or 'auto'" if allow_auto else "")
            raise ConfigError(f"--{name} '{printable(text)}' is invalid; expected {expected}")
        return _int(text)

    return parse


def int_or_none(name: str) -> Callable[[str], int | str]:
    """A parser for ``--name N|none``."""
    digits = int_or_auto(name, allow_auto=False)

    def parse(text: str) -> int | str:
        if text == NONE:
            return NONE
        if not _INT.match(text):
            raise ConfigError(
                f"--{name} '{printable(text)}' is invalid; expected an integer or 'none'"
            )
        return digits(text)

    return parse


def size_or_auto(name: str) -> Callable[[str], str]:
    """A parser for ``--name SIZE|auto`` ('4GB', '512MB', '2GiB')."""

    def parse(text: str) -> str:
        size = memory_size(text)
        if text != AUTO and (size is None or not MIN_MEMORY <= size <= MAX_MEMORY):
            raise ConfigError(
                f"--{name} '{printable(text)}' is invalid; expected a size from 1MB "
                "to 1PB such as 512MB, 4GB or 2GiB, or 'auto'"
            )
        return text.strip()

    return parse
