"""spp-extract: fixed-length CNN features for images at their native size (SPP-net)."""

__version__ = "0.1.0"

from .config import Config, load_config  # noqa: E402
from .errors import ConfigError, ImageError, OutputError, SppError  # noqa: E402
from .pipeline import Result, extract  # noqa: E402
from .pooling import SpatialPyramidPooling, spatial_pyramid_pool, spp_dim  # noqa: E402
from .writer import Features, merge, read_features  # noqa: E402

__all__ = [
    "Config", "ConfigError", "Features", "ImageError", "OutputError", "Result",
    "SpatialPyramidPooling", "SppError", "__version__", "extract", "load_config", "merge",
    "read_features", "spatial_pyramid_pool", "spp_dim",
]  # fmt: skip
