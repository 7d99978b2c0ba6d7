"""spp-extract: fixed-length CNN features for images at their native size (SPP-net)."""

from __future__ import annotations

import importlib
from importlib import metadata as _metadata
from typing import Any

try:  # one version everywhere: the installed package's (pyproject.toml)
    __version__ = _metadata.version("spp-extract")
except _metadata.PackageNotFoundError:  # a checkout that was not installed
    __version__ = "0.0.0+checkout"

from .config import Config, load_config  # noqa: E402
from .errors import ConfigError, ImageError, OutputError, SppError  # noqa: E402

# The public names of modules that import torch, each loaded on first use (so that
# `spp-extract --help` and `import spp_extract.cli` do not spend seconds importing torch):
# name -> module. This table is the list of them.
_LAZY = {
    # extraction
    "extract": "pipeline",
    "Result": "pipeline",
    "create_model": "model",
    "SppModel": "model",
    "list_backbones": "backbones",
    "SpatialPyramidPooling": "pooling",
    "spatial_pyramid_pool": "pooling",
    "spp_dim": "pooling",
    # reading
    "read_features": "reader",
    "iter_features": "reader",
    "Features": "reader",
    "merge": "view",
    "Provenance": "provenance",
    # reductions
    "reduce": "projection",
    "fit_projection": "projection",
    "project_file": "projection",
    "check_projection": "projection",
    "Projection": "projection",
    # neighbours
    "neighbors": "neighbors",
    "find_neighbors": "neighbors",
    "pairs_above": "neighbors",
    "Neighbors": "records",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [  # noqa: PLE0604 - the eager names, then the lazy ones
    "Config",
    "ConfigError",
    "ImageError",
    "OutputError",
    "SppError",
    "__version__",
    "load_config",
    *_LAZY,
]
