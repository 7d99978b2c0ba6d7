"""What made a file's vectors, as one record.

A ``Provenance`` holds the value of every configuration key that changes the vectors (the
keys declared with ``vectors=True`` in ``config``), resolved (the default layer filled in,
the weights by what identifies their values, the mean and std used), and the vector length.
It is written to the output's root attributes and to its run folder's ``run.toml``, read back
from either, and compared: a resume must match every key, a projection every key but those
that change the vectors only by rounding (``rounding=True``: dtype, precision).
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import MODEL_KEYS, RULES, Config, to_toml

# Keys that only say how the vectors were rounded: a projection takes vectors that differ in
# them (dtype, precision).
ROUNDING = tuple(name for name in MODEL_KEYS if RULES[name].rounding)


def plain(value: Any) -> Any:
    """A value as TOML and comparisons want it: numpy scalars and arrays, tuples -> Python."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value


@dataclass(frozen=True)
class Resolved:
    """What a configuration's model keys mean once resolved (``backbones.resolve``): the
    values that differ from the configuration's own."""

    backbone: str
    layer: str
    weights: str  # "none", "ResNet50_Weights.IMAGENET1K_V2", or "file:<path>"
    weights_id: str  # what identifies the values: the enum name, "none", or "sha256:<hex>"
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class Provenance:
    """Key -> value for every key that changes the vectors (``seed`` only for random
    weights), plus ``feature_dim``."""

    values: Mapping[str, Any]

    @classmethod
    def of_run(
        cls, config: Config, resolved: Resolved, feature_dim: int | None = None
    ) -> Provenance:
        """A run's (``feature_dim``: once the trunk is known; a resume does not compare it)."""
        values = {name: plain(getattr(config, name)) for name in MODEL_KEYS}
        values.update(
            backbone=resolved.backbone,
            layer=resolved.layer,
            weights=resolved.weights_id,
            mean=list(resolved.mean),
            std=list(resolved.std),
        )
        if feature_dim is not None:
            values["feature_dim"] = int(feature_dim)
        if resolved.weights != "none":  # the seed decides random weights only
            values.pop("seed")
        return cls(values)

    @classmethod
    def of_attrs(cls, attrs: Mapping[str, Any]) -> Provenance:
        """From a file's root attributes (``outputs.validate`` has checked their types)."""
        values = {
            name: plain(attrs[name]) for name in (*MODEL_KEYS, "feature_dim") if name in attrs
        }
        if "weights_id" in attrs:  # what identifies the values ("weights" may be a file name)
            values["weights"] = plain(attrs["weights_id"])
        values = _compatible(values)
        if values.get("weights") == "none" and "seed" not in values:
            values["seed"] = _seed_in(attrs.get("config", ""))  # files before the seed attribute
        elif values.get("weights") != "none":
            values.pop("seed", None)
        return cls(values)

    @classmethod
    def of_run_toml(cls, text: str) -> Provenance:
        """From a run folder's ``run.toml`` (its ``[fingerprint]`` table)."""
        try:
            table = tomllib.loads(text).get("fingerprint", {})
        except tomllib.TOMLDecodeError:
            table = {}
        return cls(_compatible(dict(table)))

    def to_attrs(self, weights: str) -> dict[str, Any]:
        """Root attributes: every value, ``weights`` as resolved (``file:<path>`` for a file)
        and ``weights_id``, what identifies them."""
        return {**self.values, "weights": weights, "weights_id": self.values["weights"]}

    def to_run_toml(self) -> str:
        """The ``[fingerprint]`` table of ``run.toml``: what a resume must match."""
        return "[fingerprint]\n" + to_toml(self.resume_values())

    def resume_values(self) -> dict[str, Any]:
        return {k: v for k, v in self.values.items() if k != "feature_dim"}

    def projection_values(self) -> dict[str, Any]:
        return {k: v for k, v in self.values.items() if k not in ROUNDING}

    @staticmethod
    def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
        """``key: old -> new`` for each key whose values differ."""
        return [
            f"{key}: {old.get(key)!r} -> {new.get(key)!r}"
            for key in _keys(old, new)
            if old.get(key) != new.get(key)
        ]


def _keys(*tables: Mapping[str, Any]) -> Iterable[str]:
    seen: dict[str, None] = {}
    for table in tables:
        seen.update(dict.fromkeys(table))
    return seen


def _compatible(values: dict[str, Any]) -> dict[str, Any]:
    """Values written by earlier versions, as this one writes them: random weights were
    "none (seed N)"."""
    weights = values.get("weights")
    if isinstance(weights, str) and weights.startswith("none (seed "):
        values["weights"] = "none"
        values.setdefault("seed", int(weights.removeprefix("none (seed ").rstrip(")")))
    return values


def _seed_in(config_toml: Any) -> int | None:
    try:
        return tomllib.loads(plain(config_toml) or "").get("seed")
    except (tomllib.TOMLDecodeError, TypeError):
        return None


def resolved_config(config: Config, resolved: Resolved) -> dict[str, Any]:
    """The full configuration with defaults filled in (``spp-extract config``, the output's
    ``config`` attribute)."""
    values = config.to_dict()
    values.update(layer=resolved.layer, mean=list(resolved.mean), std=list(resolved.std))
    return values
