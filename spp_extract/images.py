"""Finding image files and decoding one at its native size to RGB.

Decoding rules (documented in the README):
- EXIF orientation is applied, so the stored size is the displayed size.
- Multi-frame files (GIF, TIFF): the first frame.
- Transparency (RGBA, LA, PA, P or L/RGB with a transparent colour) is composited onto white.
- 16-bit integer modes (I;16*, I) are scaled by 255/65535; float (F) images are taken as [0, 1]
  when their maximum is <= 1, else as [0, 255]; both clipped. ``convert("RGB")`` would clip them
  to near-white or black.
- CMYK is converted through its embedded ICC profile to sRGB when it has one.
- A file that cannot be used raises :class:`ImageError` with a stable ``kind``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import struct
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import ConfigError, ImageError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white
_ORIENTATION = 0x0112


@dataclass(frozen=True)
class ImageRef:
    """One input file. ``key`` is the stored path: relative to the input directory it was found
    under, or as given for files named directly. Non-UTF-8 names keep their bytes via
    ``os.fsencode(key)`` (Python's surrogateescape)."""

    key: str
    path: str

    @property
    def key_bytes(self) -> bytes:
        return os.fsencode(self.key)


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _walk(root: str, follow_symlinks: bool) -> Iterable[str]:
    """Image files under ``root`` (relative paths). Directory symlinks are followed only on
    request, and then each real directory is entered once, so symlink loops end."""
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=follow_symlinks):
        if follow_symlinks:
            st = os.stat(dirpath)
            if (st.st_dev, st.st_ino) in seen:
                dirnames[:] = []
                continue
            seen.add((st.st_dev, st.st_ino))
        dirnames.sort()
        rel = os.path.relpath(dirpath, root)
        for name in filenames:
            if _is_image_name(name):
                yield name if rel == "." else os.path.join(rel, name)


def find_images(
    inputs: Sequence[str | Path],
    *,
    files_from: str | Path | None = None,
    follow_symlinks: bool = False,
) -> list[ImageRef]:
    """All images named by ``inputs`` (directories walked recursively, files as given) and by
    ``files_from`` (one path per line), sorted by stored path (bytewise), duplicates removed.

    Raises ConfigError for inputs that do not exist and for two different files that would be
    stored under the same path.
    """
    found: dict[str, ImageRef] = {}

    def add(key: str, path: str) -> None:
        key = os.path.normpath(key)
        previous = found.get(key)
        if previous is not None and os.path.normpath(previous.path) != os.path.normpath(path):
            raise ConfigError(
                f"two inputs would be stored as the same path {key!r} ({previous.path} and "
                f"{path}); pass their common parent directory instead"
            )
        found.setdefault(key, ImageRef(key, path))

    entries = [str(p) for p in inputs]
    if files_from is not None:
        try:
            raw = Path(files_from).read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot read --files-from {str(files_from)!r}: {exc.strerror}") from None
        entries += [os.fsdecode(line.rstrip(b"\r")) for line in raw.split(b"\n") if line.strip()]
    for entry in entries:
        if os.path.isdir(entry):
            for rel in _walk(entry, follow_symlinks):
                add(rel, os.path.join(entry, rel))
        elif os.path.lexists(entry):
            add(entry, entry)
        else:
            raise ConfigError(f"input {entry!r} does not exist; check the path")
    return sorted(found.values(), key=lambda ref: ref.key_bytes)


def read_size(path: str) -> tuple[int, int] | None:
    """(height, width) as displayed (EXIF orientation applied), from the header only.
    None when the header cannot be read; decoding will then record why."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(path) as img:
                width, height = img.size
                if _orientation(img) in (5, 6, 7, 8):
                    width, height = height, width
                return height, width
    except Exception:  # noqa: BLE001 - any header problem is reported by decode()
        return None


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(_ORIENTATION, 1))
    except Exception:  # noqa: BLE001 - broken EXIF is ignored, the pixels still decode
        return 1


def _composite(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _scaled_to_uint8(img: Image.Image) -> Image.Image:
    if img.mode == "F":
        values = np.asarray(img, dtype=np.float32)
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        values = np.nan_to_num(values * scale, nan=0.0, posinf=255.0, neginf=0.0)
    else:  # I;16, I;16B, I;16L, I;16N, I
        values = np.asarray(img).astype(np.float32) * (255.0 / 65535.0)
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")


def _cmyk_to_rgb(img: Image.Image) -> Image.Image:
    icc = img.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            source = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            target = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(img, source, target, outputMode="RGB")
        except Exception as exc:  # noqa: BLE001 - a broken profile falls back to the plain formula
            log.debug("ICC conversion failed (%s); using Pillow's CMYK formula", exc)
    return img.convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB, as documented in this module's docstring."""
    mode = img.mode
    if mode == "RGB" and "transparency" not in img.info:
        return img
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
        return _composite(img)
    if mode.startswith("I") or mode == "F":
        return _scaled_to_uint8(img)
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError("unsupported_mode", f"cannot convert mode {mode!r} to RGB: {exc}") from None


@dataclass
class Decoded:
    """A decoded image: ``pixels: Tensor[3, H, W]`` uint8 RGB, plus what it was."""

    pixels: torch.Tensor
    mode: str  # the file's own mode, before conversion
    truncated: bool  # decoded from a truncated file (only with allow_truncated)
    file_size: int
    mtime_ns: int


def _load(fh: io.BufferedReader, max_pixels: int) -> tuple[Image.Image, str]:
    img = Image.open(fh)
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            "too_large",
            f"{width}x{height} = {width * height} pixels exceeds max_pixels = {max_pixels}",
        )
    mode = img.mode
    img.load()
    return img, mode


@contextlib.contextmanager
def _no_pillow_bomb_check() -> Iterator[None]:
    """Our own check in _load() applies max_pixels and names it; restore Pillow's after."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def decode(path: str, *, max_pixels: int, allow_truncated: bool = False) -> Decoded:
    """Decode ``path`` at native size. Raises ImageError; never returns a substitute."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            if st.st_size == 0:
                raise ImageError("empty_file", "file is empty (0 bytes)")
            truncated = False
            try:
                with warnings.catch_warnings(), _no_pillow_bomb_check():
                    warnings.simplefilter("ignore")
                    img, mode = _load(fh, max_pixels)
            except OSError as exc:
                message = str(exc)
                if "truncated" not in message.lower() and "broken data stream" not in message:
                    raise
                if not allow_truncated:
                    raise ImageError("truncated", f"truncated file: {message}") from None
                fh.seek(0)
                ImageFile.LOAD_TRUNCATED_IMAGES = True
                try:
                    with _no_pillow_bomb_check():
                        img, mode = _load(fh, max_pixels)
                finally:
                    ImageFile.LOAD_TRUNCATED_IMAGES = False
                truncated = True
            with img:
                if _orientation(img) != 1:
                    img = ImageOps.exif_transpose(img)
                rgb = to_rgb(img)
                array = np.asarray(rgb, dtype=np.uint8)  # (H, W, 3), one copy, read-only
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # read-only is fine: the pixels are only read
                pixels = torch.from_numpy(array)
            return Decoded(pixels.permute(2, 0, 1), mode, truncated, st.st_size, st.st_mtime_ns)
    except ImageError:
        raise
    except FileNotFoundError:
        if os.path.islink(path):
            raise ImageError("dangling_symlink", f"symlink target missing: {os.readlink(path)}") from None
        raise ImageError("missing", "file not found (removed after the scan?)") from None
    except PermissionError as exc:
        raise ImageError("permission_denied", str(exc)) from None
    except IsADirectoryError:
        raise ImageError("not_an_image", "is a directory") from None
    except UnidentifiedImageError:
        raise ImageError("not_an_image", "not an image file Pillow can identify") from None
    except Image.DecompressionBombError as exc:
        raise ImageError("too_large", str(exc)) from None
    except MemoryError:
        raise ImageError("out_of_memory", "not enough memory to decode this image") from None
    except (OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError, EOFError,
            struct.error, zlib.error, RuntimeError) as exc:  # fmt: skip
        # Pillow's decoders raise all of these for corrupt data.
        raise ImageError("corrupt", f"{type(exc).__name__}: {exc}") from None
