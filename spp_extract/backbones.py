"""A model name and layer -> a ready torchvision trunk with its weights, and what a
configuration would make without building it.

Normalisation uses the weights' mean/std only, never their resize/crop preset. The families and
the meta-device probing are in ``families``; the torch-free facts in ``catalog``.
"""

from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from torch import nn

from . import catalog
from .config import Config
from .errors import ConfigError
from .families import cut, family_named, live_names, meta_model, min_side, output_shape, probe_facts
from .masking import maskable
from .pooling import spp_dim
from .provenance import Provenance, Resolved
from .weights import load_model, load_state_file

log = logging.getLogger(__name__)

resolve = catalog.resolve  # what a config's backbone, layer and weights mean (no model built)


def list_backbones() -> list[str]:
    """The torchvision models spp-extract can use, by name (``get_model`` names)."""
    return catalog.names()


@dataclass
class Trunk:
    """A ready trunk: eval mode, no grad, on CPU; plus what the pipeline needs to know."""

    module: nn.Sequential
    resolved: Resolved
    channels: int
    min_side: int  # smallest input side the trunk accepts; smaller images are padded up to it

    @functools.cached_property
    def maskable(self) -> bool:
        """Each image of a masked padded batch gets exactly its own result (``masking``); the
        same locality makes the trunk tileable."""
        return maskable(self.module)


def describe(backbone: str, layer: str = "") -> tuple[str, int, bool]:
    """(resolved layer, channels, maskable) without weights or compute: from the catalog at
    the default layer, else probed on the meta device."""
    known = catalog.facts(backbone)
    layer = layer or known.default_layer
    if layer == known.default_layer:
        return layer, known.channels, known.maskable
    resolve(Config(backbone=backbone, layer=layer, weights="none"))  # a layer it has
    trunk = cut(family_named(backbone).chain(meta_model(backbone)), layer).eval()
    probe = output_shape(trunk, 224, 224)
    if probe is None:
        raise ConfigError(f"{backbone} {layer} does not accept a 224 px input")
    return layer, probe[0], maskable(trunk)


def provenance_of(config: Config) -> Provenance:
    """What ``config`` would make (``Provenance``), vector length included, without weights
    or compute."""
    resolved = resolve(config)
    _, channels, _ = describe(resolved.backbone, resolved.layer)
    return Provenance.of_run(config, resolved, spp_dim(channels, config.levels))


def write_catalog(path: Path | None = None) -> Path:
    """Probe every backbone and write the catalog (``spp_extract/backbones.json``): after a
    torchvision upgrade, or when tests/test_backbones.py says the table is stale."""
    path = path or Path(__file__).with_name(catalog.TABLE)
    table = {
        "torchvision": metadata.version("torchvision"),  # as catalog reads it
        "backbones": {name: probe_facts(name) for name in live_names()},
    }
    path.write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    return path


def build_trunk(config: Config, resolved: Resolved | None = None) -> Trunk:
    """Build the trunk with its weights. Raises ConfigError for anything the user can fix.
    ``resolved``: ``resolve(config)`` if the caller has it (it hashes a weights file)."""
    resolved = resolved or resolve(config)
    family = family_named(config.backbone)
    model = load_model(config, resolved).eval()
    trunk = cut(family.chain(model), resolved.layer)
    if resolved.weights.startswith("file:"):
        load_state_file(model, trunk, Path(config.weights), config.backbone)
    trunk.eval().requires_grad_(False)
    known = catalog.facts(config.backbone) if catalog.available() else None
    if known is not None and resolved.layer == known.default_layer:
        return Trunk(trunk, resolved, known.channels, known.min_side)  # the table's probe
    # Sizes do not depend on weights: probe the same architecture built on the meta device.
    meta = cut(family.chain(meta_model(config.backbone)), resolved.layer)
    side = min_side(meta.eval())
    probe = output_shape(meta, max(side, 224), max(side, 224))
    assert probe is not None  # min_side just proved some size works
    return Trunk(trunk, resolved, probe[0], side)
