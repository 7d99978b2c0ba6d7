"""The run configuration: a frozen dataclass, TOML loading, overrides and validation.

Precedence: command-line flag > config file > built-in default. Unknown keys and wrong types
are errors that name the key (and the file and line when it came from a file).
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, get_args

from . import rules
from .errors import ConfigError, option, printable
from .rules import (
    AUTO,
    MAX_BATCH,
    MAX_PIXELS,
    MAX_WORKERS,
    MEAN_RANGE,
    NONE,
    SEED_RANGE,
    STD_RANGE,
    Key,
    flag,
    key,
    parse_levels,
)

# The keys with a fixed set of values: their types, and what the checks accept.
Pooling = Literal["max", "avg"]
Dtype = Literal["float32", "float16"]
Precision = Literal["fp32", "bf16", "fp16"]
Batching = Literal["auto", "same-size", "padded"]

# ----------------------------------------------------------------------------- the keys


@dataclass(frozen=True)
class Config:
    """Everything that decides what a run computes and how; each key's rules are declared on
    its field (``key``). Checked on construction."""

    backbone: str = key(
        "resnet50",
        help="torchvision model name, e.g. resnet50.",
        check=rules.text(empty=False),
        vectors=True,
    )
    layer: str = key(  # "": the backbone's default layer (`spp-extract backbones` lists them)
        "",
        help="Layer to pool, e.g. layer3 (default: the backbone's last conv stage).",
        check=rules.text(empty=True),
        vectors=True,
    )
    weights: str = key(  # DEFAULT, a torchvision weights name, "none", or a state-dict file
        "DEFAULT",
        help="DEFAULT, a weights name (IMAGENET1K_V2), 'none' (seeded random init) or a state-dict file.",
        check=rules.text(empty=False),
        vectors=True,
    )
    levels: tuple[int, ...] = key(
        (4, 2, 1),
        help="Pyramid levels, comma-separated, e.g. 6,3,2,1 (1-8 levels, each 1-16).",
        check=rules.levels,
        parse=lambda _flag, text: parse_levels(text),
        metavar="N,N,...",
        vectors=True,
    )
    pooling: Pooling = key(
        "max", help="max or avg.", check=rules.choice(get_args(Pooling)), vectors=True
    )
    mean: tuple[float, ...] = key(  # (): the weights' own (ImageNet's for files and "none")
        (),
        help="Normalisation mean, three numbers (default: the weights' own).",
        check=rules.rgb(*MEAN_RANGE),
        parse=rules.parse_rgb,
        metavar="R,G,B",
        vectors=True,
    )
    std: tuple[float, ...] = key(
        (),
        help="Normalisation std, three numbers (set with --mean).",
        check=rules.rgb(*STD_RANGE),
        parse=rules.parse_rgb,
        metavar="R,G,B",
        vectors=True,
    )
    seed: int = key(
        0,
        help="Seed of the random init for --weights none.",
        check=rules.integer(*SEED_RANGE),
        parse=rules.parse_int(),
        metavar="N",
        vectors=True,
    )
    dtype: Dtype = key(
        "float32",
        help="Stored precision: float32 or float16.",
        check=rules.choice(get_args(Dtype)),
        vectors=True,
        rounding=True,
    )
    precision: Precision = key(  # bf16/fp16 use autocast and are not exact
        "fp32",
        help="Compute precision: fp32 (exact), bf16 or fp16.",
        check=rules.choice(get_args(Precision)),
        vectors=True,
        rounding=True,
    )
    device: str = key(AUTO, help="auto, cpu, cuda, cuda:N or mps.", check=rules.device_name)
    batching: Batching = key(
        "auto",
        help="auto, same-size or padded (exact masked padding).",
        check=rules.choice(get_args(Batching)),
    )
    batch_size: int | str = key(
        AUTO,
        help="Most images per batch, or auto.",
        check=rules.integer(1, MAX_BATCH, auto=True),
        parse=rules.parse_int(auto=True),
        metavar="N|auto",
    )
    batch_pixels: int | str = key(
        AUTO,
        help="Most padded pixels per batch, or auto.",
        check=rules.integer(1, MAX_PIXELS, auto=True),
        parse=rules.parse_int(auto=True),
        metavar="N|auto",
    )
    workers: int | str = key(
        AUTO,
        help="Decode processes, or auto.",
        check=rules.integer(0, MAX_WORKERS, auto=True),
        parse=rules.parse_int(auto=True),
        metavar="N|auto",
    )
    max_pixels: int | str = key(  # Pillow's decompression-bomb limit
        89_478_485,
        help="Refuse (per image) images with more pixels; none: no limit (trusted inputs).",
        check=rules.integer(1, MAX_PIXELS, none=True),
        parse=rules.parse_int(none=True),
        metavar="N|none",
    )
    max_memory: str = key(
        AUTO,
        help="Memory one image's forward may use, e.g. 4GB (auto: half the free memory; GPU: 80% of free device memory). Larger images are tiled, exactly.",
        check=rules.memory,
        parse=rules.parse_size,
        metavar="SIZE|auto",
    )
    allow_truncated: bool = key(
        False, help="Decode truncated files and mark their rows.", check=rules.boolean
    )
    decode_timeout: float = key(
        120.0,
        help="Seconds one batch's decoding may take before its images are isolated.",
        check=rules.seconds,
        parse=rules.parse_float,
        metavar="SECONDS",
    )
    fetch_timeout: float = key(
        30.0,
        help="Seconds one remote read (a URL, a remote tar's range) may take; each is tried 3 times.",
        check=rules.seconds,
        parse=rules.parse_float,
        metavar="SECONDS",
    )
    commit_seconds: float = key(
        30.0,
        help="Finished work is committed to a shard at least this often (seconds).",
        check=rules.seconds,
        parse=rules.parse_float,
        metavar="SECONDS",
    )
    follow_symlinks: bool = key(
        False, help="Follow directory symlinks while walking.", check=rules.boolean
    )
    # Not configuration: where keys read from a file came from ("configs/x.toml line 3"), so
    # that a conflict with a flag can name the file. Not compared, not written out.
    origins: Mapping[str, str] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        for name in KEYS:
            value = _normalise(name, getattr(self, name))
            object.__setattr__(self, name, value)
            check(name, value)
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

    def came_from(self, *keys: str) -> str:
        """' (layer came from FILE line N; pass --layer or remove it there)' for the keys a
        config file set, so that a conflict with a flag says where the other value came from."""
        notes = [
            f"{key} came from {self.origins[key]}; pass {option(key, None)} or remove it there"
            for key in keys
            if key in self.origins
        ]
        return f" ({'; '.join(notes)})" if notes else ""


RULES: dict[str, Key] = {f.name: f.metadata["key"] for f in fields(Config) if "key" in f.metadata}
KEYS = tuple(RULES)
# Keys whose values change the vectors: a resumed run must agree on all of them.
MODEL_KEYS = tuple(name for name, rules in RULES.items() if rules.vectors)


def check(name: str, value: Any) -> None:
    """Raise ConfigError if ``value`` is not acceptable for key ``name`` (its ``Key.check``)."""
    if isinstance(value, str) and _has_surrogates(value):
        # A file name that is not UTF-8 (os.fsdecode's surrogate escapes) cannot be stored as
        # TOML or HDF5 text, so a run could never record or resume it.
        fix = "; rename the file to a UTF-8 name" if name == "weights" else ""
        raise ConfigError(f"{name} = '{printable(value)}' is invalid: it is not valid UTF-8{fix}")
    RULES[name].check(name, value)


def from_command_line(name: str, text: Any) -> Any:
    """A flag's value: parsed by its key's ``parse`` (text), or as typer gave it (bool)."""
    rules = RULES[name]
    return rules.parse(flag(name), text) if rules.parse and isinstance(text, str) else text


def pixel_limit(config: Config) -> int:
    """``max_pixels`` as a number (``none``: no limit)."""
    return 2**62 if config.max_pixels == NONE else int(config.max_pixels)


def _has_surrogates(text: str) -> bool:
    return any(0xD800 <= ord(ch) <= 0xDFFF for ch in text)


def _normalise(name: str, value: Any) -> Any:
    """Lists (TOML arrays) become tuples; ints are accepted where floats are expected."""
    if isinstance(value, list):
        value = tuple(value)
    if (
        name in ("decode_timeout", "fetch_timeout", "commit_seconds")
        and rules.is_int(value)
        and abs(value) < 2**53
    ):
        return float(value)
    return value


def _unknown_key(key: str, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, KEYS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(KEYS)}"
    return ConfigError(f"unknown config key {rules.show(key)}{where}{hint}")


def _line_of(text: str, key: str) -> int | None:
    for number, line in enumerate(text.splitlines(), start=1):
        if re.match(rf"^\s*{re.escape(key)}\s*=", line):
            return number
    return None


def shipped_configs() -> dict[str, Any]:
    """The configurations that come with the package (``configs/`` in a checkout), by name:
    name -> a readable resource."""
    folder = resources.files("spp_extract.configs")
    return {p.name.removesuffix(".toml"): p for p in folder.iterdir() if p.name.endswith(".toml")}


def load_config(path: str | Path | None = None, **overrides: Any) -> Config:
    """Built-in defaults, then the TOML file at ``path`` (or the shipped config of that name,
    ``sppnet_vgg16``, when no such file exists here), then ``overrides`` (None = not given).

    ``origins`` of the result names the file and line of each key the file set."""
    values: dict[str, Any] = {}
    origins: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        shown = printable(str(path))
        shipped = shipped_configs()
        try:
            if not path.exists() and path.name == str(path) and path.stem in shipped:
                text, shown = shipped[path.stem].read_text(encoding="utf-8"), path.stem
            else:
                text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            names = ", ".join(sorted(shipped))
            raise ConfigError(
                f"cannot read config file '{shown}': it does not exist; give a TOML file, or "
                f"the name of a "
                f"shipped config: {names} (spp-extract configs lists them)"
            ) from None
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
                check(key, value)
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
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


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
        f"{key if _BARE_KEY.fullmatch(key) else _toml_string(key)} = {_toml_value(value)}\n"
        for key, value in values.items()
    )
