"""Plain records handed from stage to stage (no h5py, no torch)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RowMeta:
    """What is stored beside one image's vector (or its failure)."""

    image_size: tuple[int, int] = (0, 0)
    input_size: tuple[int, int] = (0, 0)
    feature_map_size: tuple[int, int] = (0, 0)
    mode: str = ""
    truncated: bool = False
    file_size: int = -1
    mtime_ns: int = -1
    tiles: int = 0  # how many tiles the trunk ran on (0: the whole image at once)
    error_class: str = ""
    error: str = ""
