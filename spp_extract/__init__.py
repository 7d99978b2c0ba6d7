"""spp-extract: fixed-length CNN features for images at their native size (SPP-net)."""

from __future__ import annotations

import importlib
from importlib import metadata as _metadata
from typing import TYPE_CHECKING, Any

try:  # one version everywhere: the installed package's (pyproject.toml)
    __version__ = _metadata.version("spp-extract")
except _metadata.PackageNotFoundError:  # a checkout that was not installed
    __version__ = "0.1.0"

from .config import Config, load_config  # noqa: E402
from .errors import ConfigError, ImageError, OutputError, SppError  # noqa: E402

if TYPE_CHECKING:
    from .model import SppModel, create_model
    from .pipeline import Result, extract
    from .pooling import SpatialPyramidPooling, spatial_pyramid_pool, spp_dim
    from .reader import Features, iter_features, read_features
    from .retrieval import Neighbors, Projection, check_projection, neighbors, project_file, reduce
    from .view import merge

# Names from modules that import torch, loaded on first use, so that `spp-extract --help`
# and `--version` (and `import spp_extract.cli`) do not spend seconds importing torch.
_LAZY = {
    "extract": "pipeline",
    "Result": "pipeline",
    "SpatialPyramidPooling": "pooling",
    "spatial_pyramid_pool": "pooling",
    "spp_dim": "pooling",
    "create_model": "model",
    "SppModel": "model",
    "Features": "reader",
    "merge": "view",
    "read_features": "reader",
    "iter_features": "reader",
    "Projection": "retrieval",
    "reduce": "retrieval",
    "project_file": "retrieval",
    "check_projection": "retrieval",
    "neighbors": "retrieval",
    "Neighbors": "retrieval",
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


__all__ = [
    "Config",
    "ConfigError",
    "Features",
    "ImageError",
    "Neighbors",
    "OutputError",
    "Projection",
    "Result",
    "SpatialPyramidPooling",
    "SppError",
    "SppModel",
    "__version__",
    "create_model",
    "check_projection",
    "extract",
    "iter_features",
    "load_config",
    "merge",
    "neighbors",
    "project_file",
    "read_features",
    "reduce",
    "spatial_pyramid_pool",
    "spp_dim",
]
