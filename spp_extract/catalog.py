"""What spp-extract knows about each backbone, and what a configuration's backbone, layer and
weights resolve to — without importing torch or torchvision.

The facts come from a table (``backbones.json``, package data) made by probing every model on
the meta device (``families.probe_facts``; ``backbones.write_catalog`` writes the table). A
test checks the table against the live probe for every backbone, so it cannot drift; it is
used only with the torchvision version it was made with, and otherwise every answer comes from
the live probe (slower: torchvision is imported and models are built on the meta device).

Per backbone: its default layer and every layer it can be cut at; at the default layer, the
channels, total stride, smallest input side, and whether mixed sizes batch exactly under masks
(then tiling is attempted too); its torchvision weights, with their mean and std.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import json
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from .config import Config
from .errors import ConfigError
from .provenance import Resolved

TABLE = "backbones.json"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Attention over fixed-size patch grids: refused by name.
REFUSED = ("vit_", "swin_", "maxvit_")


@dataclass(frozen=True)
class BackboneFacts:
    name: str
    default_layer: str
    layers: tuple[str, ...]  # every name it can be cut at (dotted through Sequentials)
    channels: int  # at the default layer
    stride: int  # total stride at the default layer
    min_side: int  # smallest square input the default layer accepts
    maskable: bool  # mixed sizes batch exactly (masked padding); tiling is attempted too
    weights_enum: str  # torchvision's weights class, e.g. ResNet50_Weights
    weights: dict[str, dict[str, Any]]  # short name -> {"mean": [...], "std": [...]}
    default_weights: str  # the short name DEFAULT stands for ("" if none)

    def dim(self, levels: tuple[int, ...]) -> int:
        """The vector length at the default layer for these pyramid levels."""
        return self.channels * sum(n * n for n in levels)


@functools.cache
def _table() -> dict[str, Any] | None:
    """The table, or None when it was made with another torchvision than the one installed."""
    try:
        data = json.loads(resources.files("spp_extract").joinpath(TABLE).read_text())
        installed = metadata.version("torchvision")
    except (OSError, ValueError, metadata.PackageNotFoundError):
        return None
    return data if data.get("torchvision") == installed else None


def available() -> bool:
    """Whether the table applies to the installed torchvision."""
    return _table() is not None


def names() -> list[str]:
    """Every backbone spp-extract can use, by name."""
    table = _table()
    if table is not None:
        return sorted(table["backbones"])
    from .families import live_names

    return live_names()


def facts(name: str, note: str = "") -> BackboneFacts:
    """A backbone's facts, from the table or (when it does not apply) the live probe.
    ConfigError for a name that is no backbone (``note``: where it came from)."""
    check_name(name, names(), note)
    table = _table()
    entry = table["backbones"][name] if table is not None else None
    if entry is None:
        from .families import probe_facts

        entry = probe_facts(name)
    return BackboneFacts(name=name, **{**entry, "layers": tuple(entry["layers"])})


def check_name(name: str, known: list[str], note: str = "") -> None:
    """ConfigError for a ``name`` that is not in ``known``: a vision transformer, or an unknown
    name with the closest known ones."""
    if name in known:
        return
    if name.startswith(REFUSED):
        raise ConfigError(
            f"backbone {name!r} is a vision transformer: it needs a fixed input size, so it "
            f"cannot pool native-size images; choose a CNN (spp-extract backbones lists them){note}"
        )
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise ConfigError(f"unknown backbone {name!r}; {hint}(spp-extract backbones lists all){note}")


def resolve(config: Config) -> Resolved:
    """What ``config``'s backbone, layer, weights and normalisation mean, with defaults filled
    in, nothing loaded (a weights file is hashed). Raises ConfigError."""
    known = facts(config.backbone, config.came_from("backbone"))
    layer = config.layer or known.default_layer
    if layer not in known.layers:
        close = difflib.get_close_matches(layer, known.layers, n=3)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        from .families import layer_hint  # the model's graph: only to explain a refusal

        hint = layer_hint(config.backbone, layer, known.layers) or hint
        names = list(known.layers)
        shown = ", ".join(names) if len(names) <= 40 else ", ".join(names[:40]) + ", ..."
        raise ConfigError(
            f"unknown layer {layer!r} for {config.backbone}"
            f"{config.came_from('layer', 'backbone')}; {hint}valid layers: {shown}"
        )
    weights, weights_id, mean, std = _weights(config, known)
    return Resolved(config.backbone, layer, weights, weights_id, mean, std)


def weights_name(config: Config, known: BackboneFacts) -> str | None:
    """The short torchvision weights name ``config.weights`` stands for (``IMAGENET1K_V2``),
    or None (``none`` or a file). ConfigError for another model's weights."""
    options = ", ".join(["DEFAULT", *known.weights])
    if config.weights == "DEFAULT":
        if not known.default_weights:
            raise ConfigError(
                f"{config.backbone} has no torchvision weights; pass a state-dict file or 'none'"
            )
        return known.default_weights
    if config.weights == "none":
        return None
    if "_Weights." in config.weights and not Path(config.weights).exists():
        enum, _, short = config.weights.partition(".")
        if enum != known.weights_enum or short not in known.weights:
            raise ConfigError(
                f"weights {config.weights!r}{config.came_from('weights')} are not "
                f"{config.backbone}'s ({known.weights_enum}); expected one of: {options}"
            )
        return short
    short = config.weights.split(".")[-1]
    return short if short in known.weights else None


def _weights(
    config: Config, known: BackboneFacts
) -> tuple[str, str, tuple[float, ...], tuple[float, ...]]:
    """(weights as resolved, what identifies their values, mean, std): ``ResNet50_Weights.
    IMAGENET1K_V2`` twice and its own mean/std, ``file:<path>`` and ``sha256:<hex>``, or
    ``none`` twice (the seed decides). Files and ``none`` normalise with ImageNet's mean/std;
    the config's own, if set, win."""
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    short = weights_name(config, known)
    if config.weights == "none":
        weights = weights_id = "none"  # the seed is in the provenance
    elif short is not None:
        weights = weights_id = f"{known.weights_enum}.{short}"
        mean, std = known.weights[short]["mean"], known.weights[short]["std"]
    else:
        path = Path(config.weights)
        try:
            is_file = path.is_file()
        except OSError:  # a name too long for a path, say
            is_file = False
        if not is_file:
            options = ", ".join(["DEFAULT", *known.weights])
            raise ConfigError(
                f"weights {config.weights!r} is neither a file nor a weights name for "
                f"{config.backbone}{config.came_from('weights', 'backbone')}; expected a "
                f"state-dict file, 'none', or one of: {options}"
            )
        weights, weights_id = f"file:{path}", f"sha256:{sha256(path)}"
    if config.mean:
        mean, std = config.mean, config.std
    return weights, weights_id, tuple(float(v) for v in mean), tuple(float(v) for v in std)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
