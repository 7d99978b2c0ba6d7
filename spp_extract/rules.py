"""The rules of configuration values, for ``config.Config``'s key declarations: a ``Key`` per
field (help, check, command-line parser, whether it changes the vectors), the checks, the
command-line parsers (ASCII digits only), and sizes such as ``4GB``."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError, printable

AUTO = "auto"
NONE = "none"
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:[0-9]{1,4})?)$")
# Bounds: beyond them a value is a typo or an attack, never a plan (and would fail mid-run).
MAX_LEVEL, MAX_LEVELS = 16, 8  # 8 levels of up to 16 x 16 bins: <= 1,496 bins per channel
MAX_SECONDS = 7 * 24 * 3600.0  # decode_timeout, fetch_timeout, commit_seconds: one week
MAX_PIXELS = 2**40  # max_pixels, batch_pixels (about 10^12)
MAX_BATCH, MAX_WORKERS = 65_536, 1024
MEAN_RANGE, STD_RANGE = (-1000.0, 1000.0), (1e-6, 1000.0)  # pixels are in [0, 1]
SEED_RANGE = (-(2**63), 2**63 - 1)  # what torch.manual_seed accepts and TOML can hold
MIN_MEMORY, MAX_MEMORY = 10**6, 10**15  # max_memory: 1 MB to 1 PB


@dataclass(frozen=True)
class Key:
    """One configuration key's rules, declared once on its field (``key(...)``): the check of
    a value, the command-line flag (help, parser, metavar) and whether it changes the vectors.
    The checks, the TOML loader, the CLI's flags and the provenance are made from these."""

    help: str
    check: Callable[[str, Any], None]  # raises ConfigError for a bad value
    parse: Callable[[str, str], Any] | None = None  # (flag, text) -> value; None: the text
    metavar: str | None = None
    vectors: bool = False  # changes the vectors: a resume must match it
    rounding: bool = False  # changes them only by rounding (a projection accepts it)


def key(default: Any, **rules: Any) -> Any:
    """A Config field with its ``Key`` rules (see there)."""
    return field(default=default, metadata={"key": Key(**rules)})


# ----------------------------------------------------------------------------- checks


def show(value: Any) -> str:
    """``repr(value)`` for a one-line message: short, escaped, never raising."""
    if isinstance(value, tuple):
        value = list(value)
    try:
        text = repr(value)
    except ValueError:  # an int with more than 4300 digits
        return f"<an integer of about {int(value.bit_length() * 0.30103)} digits>"
    return text if len(text) <= 120 else text[:100] + "..." + text[-10:]


def invalid(name: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"{name} = {show(value)} is invalid; expected {expected}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _in_range(value: Any, low: float, high: float) -> bool:
    return _is_number(value) and math.isfinite(value) and low <= value <= high


def choice(options: tuple[str, ...]) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if value not in options:
            raise invalid(name, value, "one of " + ", ".join(repr(c) for c in options))

    return check


def text(*, empty: bool) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if not isinstance(value, str) or (not empty and not value):
            raise invalid(name, value, "a non-empty string" if not empty else "a string")

    return check


def integer(low: int, high: int, *, auto: bool = False, none: bool = False):  # noqa: ANN202
    def check(name: str, value: Any) -> None:
        if (auto and value == AUTO) or (none and value == NONE):
            return
        if not is_int(value) or not low <= value <= high:
            extra = " or 'auto'" if auto else " or 'none'" if none else ""
            raise invalid(name, value, f"an integer from {low} to {high}{extra}")

    return check


def seconds(name: str, value: Any) -> None:
    if not _in_range(value, 0.0, MAX_SECONDS) or value <= 0:
        raise invalid(
            name, value, f"a number of seconds > 0 and at most {MAX_SECONDS:g} (one week)"
        )


def boolean(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise invalid(name, value, "true or false")


def levels(name: str, value: Any) -> None:
    if (
        not isinstance(value, tuple)
        or not 1 <= len(value) <= MAX_LEVELS
        or not all(is_int(n) and 1 <= n <= MAX_LEVEL for n in value)
        or len(set(value)) != len(value)
    ):
        raise invalid(
            name,
            value,
            f"1 to {MAX_LEVELS} distinct integers from 1 to {MAX_LEVEL}, such as [4, 2, 1]",
        )


def rgb(low: float, high: float) -> Callable[[str, Any], None]:
    def check(name: str, value: Any) -> None:
        if (
            not isinstance(value, tuple)
            or len(value) not in (0, 3)
            or not all(_in_range(v, low, high) for v in value)
        ):
            raise invalid(
                name, value, f"three finite numbers (one per RGB channel) from {low:g} to {high:g}"
            )

    return check


def device_name(name: str, value: Any) -> None:
    if not isinstance(value, str) or not _DEVICE.match(value):
        raise invalid(name, value, "auto, cpu, cuda, cuda:N or mps")


def memory(name: str, value: Any) -> None:
    size = memory_size(value) if isinstance(value, str) else None
    if value != AUTO and (size is None or not MIN_MEMORY <= size <= MAX_MEMORY):
        raise invalid(
            name, value, "a size from 1MB to 1PB such as '512MB', '4GB' or '2GiB', or 'auto'"
        )


# ----------------------------------------------------------------------------- command line

# Command-line numbers: ASCII digits only (int() would also take "٤", " 4", "4_000").
_LEVELS = re.compile(r"^ *[0-9]+ *(, *[0-9]+ *)*$")
_INT = re.compile(r"^ *-?[0-9]+ *$")
_FLOAT = re.compile(r"^ *-?[0-9]+(\.[0-9]*)?([eE][-+]?[0-9]+)? *$")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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
    return functools.partial(parse_int(auto=allow_auto), f"--{name}")


def parse_int(*, auto: bool = False, none: bool = False) -> Callable[[str, str], Any]:
    def parse(flag: str, text: str) -> Any:
        if (auto and text == AUTO) or (none and text == NONE):
            return text
        if not _INT.match(text):
            extra = " or 'auto'" if auto else " or 'none'" if none else ""
            raise ConfigError(f"{flag} '{printable(text)}' is invalid; expected an integer{extra}")
        return _int(text)

    return parse


def parse_float(flag: str, text: str) -> float:
    if not _FLOAT.match(text):
        raise ConfigError(f"{flag} '{printable(text)}' is invalid; expected a number")
    return float(text)


def parse_rgb(flag: str, text: str) -> tuple[float, ...]:
    parts = text.split(",")
    if len(parts) != 3 or not all(_FLOAT.match(p) for p in parts):
        raise ConfigError(
            f"{flag} '{printable(text)}' is invalid; expected three comma-separated numbers "
            "like 0.485,0.456,0.406"
        )
    return tuple(float(p) for p in parts)


def parse_size(flag: str, text: str) -> str:
    size = memory_size(text)
    if text != AUTO and (size is None or not MIN_MEMORY <= size <= MAX_MEMORY):
        raise ConfigError(
            f"{flag} '{printable(text)}' is invalid; expected a size from 1MB "
            "to 1PB such as 512MB, 4GB or 2GiB, or 'auto'"
        )
    return text.strip()


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
