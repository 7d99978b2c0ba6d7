"""Finding image files and decoding one at its native size to RGB.

Decoding rules (documented in the README):
- EXIF orientation is applied, so the stored size is the displayed size. It is decided once,
  from the header (:func:`orientation`), for the size read before decoding and for decoding.
- Files are opened by content as one of :data:`FORMATS` only, whatever their name; anything
  but a regular file (FIFO, socket, device) is refused without being opened for reading.
- Multi-frame files (GIF, TIFF): the first frame.
- Transparency (RGBA, LA, PA, P or L/RGB with a transparent colour) is composited onto white.
- 16-bit integer modes (I;16*, I) are scaled by 255/65535; float (F) images are taken as [0, 1]
  when their maximum is <= 1, else as [0, 255]; both clipped. ``convert("RGB")`` would clip them
  to near-white or black. A transparent grey level then becomes white.
- CMYK is converted through its embedded ICC profile to sRGB when it has one.
- A file that cannot be used raises :class:`ImageError` with a stable ``kind``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
import struct
import threading
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageFile, UnidentifiedImageError

from . import isolation
from .errors import ImageError
from .sources import Blob, open_file

log = logging.getLogger(__name__)

# The Pillow formats a file may be opened as, whatever its name says: never EPS (Ghostscript)
# or any other plugin reached by content. Pillow's JPEG opener also returns MPO files.
FORMATS = ("JPEG", "PNG", "BMP", "GIF", "TIFF", "WEBP")
BACKGROUND = (255, 255, 255)  # transparent pixels are composited onto white
_ORIENTATION = 0x0112


@functools.cache
def _formats() -> list[str]:
    """FORMATS this Pillow can open (a build without libwebp has no WEBP opener)."""
    Image.init()
    return [name for name in FORMATS if name in Image.OPEN]


_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


@functools.cache
def _pillow_orients_tiff() -> bool:
    """Whether this Pillow applies a TIFF's orientation itself (newer versions report the
    displayed size at open and transpose while loading): then there is nothing left to do."""
    exif = Image.Exif()
    exif[_ORIENTATION] = 6
    buf = io.BytesIO()
    Image.new("L", (2, 1)).save(buf, "TIFF", exif=exif)
    with Image.open(buf) as img:
        return img.size == (1, 2)


def orientation(img: Image.Image) -> int:
    """The EXIF orientation (1-8) still to apply to a just-opened image, from its header: the
    one decision that both :func:`read_size` and :func:`decode` use. A tag that is not a single
    number 1-8 (ASCII ``"6"``, 9, broken EXIF) counts as 1. Pixel data is never loaded: a PNG
    ``eXIf`` chunk after the image data is not looked for (``PngImageFile.getexif`` would
    decode the whole image to find one). 1 for a TIFF that Pillow orients itself."""
    if img.format == "TIFF" and _pillow_orients_tiff():
        return 1
    try:
        value = Image.Image.getexif(img).get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - broken EXIF is ignored, the pixels still decode
        return 1
    return value if type(value) is int and 1 <= value <= 8 else 1


def read_size(source: str | Blob) -> tuple[int, int] | None:
    """(height, width) as displayed (EXIF orientation applied), from the header only, of a
    file or of bytes (a header's worth is enough). None when the header cannot be read (or
    ``source`` is not a regular file); decoding will then record why."""
    try:
        with _opened(source) as fh, _settings(truncated=False):
            with Image.open(fh, formats=_formats()) as img:
                width, height = img.size
                if orientation(img) in (5, 6, 7, 8):
                    width, height = height, width
                return height, width
    except Exception:  # noqa: BLE001 - any header problem is reported by decode()
        return None


def _composite(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, BACKGROUND + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _scaled_to_uint8(img: Image.Image) -> Image.Image:
    raw = np.asarray(img)
    if img.mode == "F":
        values = raw.astype(np.float32)
        finite = values[np.isfinite(values)]
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        values = np.nan_to_num(values * scale, nan=0.0, posinf=255.0, neginf=0.0)
    else:  # I;16, I;16B, I;16L, I;16N, I
        values = raw.astype(np.float32) * (255.0 / 65535.0)
    gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
    transparent = img.info.get("transparency")
    if type(transparent) is int:  # a transparent grey level (PNG tRNS), after scaling
        gray[raw == transparent] = BACKGROUND[0]
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
    if mode.startswith("I") or mode == "F":  # before transparency: compositing would clip first
        return _scaled_to_uint8(img)
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info:
        return _composite(img)
    if mode == "CMYK":
        return _cmyk_to_rgb(img)
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise ImageError(
            "unsupported_mode", f"cannot convert mode {mode!r} to RGB: {exc}"
        ) from None


def rgb_tensor(img: Image.Image) -> torch.Tensor:
    """A Pillow image -> ``Tensor[3, H, W]`` uint8 RGB, by the rules :func:`decode` applies
    to files (EXIF orientation, transparency on white, 16-bit and float scaling, CMYK)."""
    turn = orientation(img)
    img.load()
    rgb = to_rgb(img)
    if turn in _TRANSPOSE:
        rgb = rgb.transpose(_TRANSPOSE[turn])
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1)  # (3, H, W)


@dataclass
class Decoded:
    """A decoded image: ``pixels: Tensor[3, H, W]`` uint8 RGB, plus what it was."""

    pixels: torch.Tensor
    mode: str  # the file's own mode, before conversion
    truncated: bool  # decoded from a truncated file (only with allow_truncated)
    file_size: int
    mtime_ns: int


def _open(fh: BinaryIO, max_pixels: int) -> Image.Image:
    """``Image.open`` by content, as one of FORMATS. Pillow refuses an image over twice its
    own ``MAX_IMAGE_PIXELS`` (a decompression bomb); ``max_pixels`` is the tool's limit, which
    may be higher: only then are Pillow's settings changed (``_settings``), never in a process
    where a caller's threads may use Pillow too."""
    try:
        return Image.open(fh, formats=_formats())
    except Image.DecompressionBombError:
        limit = Image.MAX_IMAGE_PIXELS
        if limit is not None and max_pixels > 2 * limit and not isolation.private():
            raise _NeedsSettings from None
        raise


class _NeedsSettings(Exception):
    """Decoding this file needs Pillow's process-wide settings changed (a truncated file that
    may be decoded, an image over Pillow's own size limit): done in a private process."""


@contextlib.contextmanager
def _settings(*, truncated: bool) -> Iterator[None]:
    """Pillow's process-wide settings for one decode: warnings off, and in a private process
    (``isolation.private``) no bomb limit of Pillow's (``max_pixels`` applies) and, for
    ``truncated``, truncated files decoded. Elsewhere only the warnings, one thread at a time
    (``warnings.catch_warnings`` swaps process-wide state)."""
    if not isolation.private():
        with _WARNINGS, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
        return
    warnings.simplefilter("ignore")  # the process is ours: for good
    Image.MAX_IMAGE_PIXELS = None
    ImageFile.LOAD_TRUNCATED_IMAGES = truncated
    yield


_WARNINGS = threading.Lock()


def _load(fh: BinaryIO, max_pixels: int) -> tuple[Image.Image, str, int]:
    """Open, check the size, decide the orientation from the header (as read_size does), then
    load the pixels. Returns the image, its mode and its orientation."""
    img = _open(fh, max_pixels)
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            "too_large",
            f"{width}x{height} = {width * height} pixels exceeds max_pixels = {max_pixels}",
        )
    mode = img.mode
    turn = orientation(img)
    img.load()
    return img, mode, turn


def _opened(source: str | Blob) -> BinaryIO:
    return io.BytesIO(source.data) if isinstance(source, Blob) else open_file(source)


def decode(source: str | Blob, *, max_pixels: int, allow_truncated: bool = False) -> Decoded:
    """Decode ``source`` (a file's path, or bytes read from a tar or a URL) at native size.
    Raises ImageError; never returns a substitute."""
    path = source
    try:
        array, mode, truncated, size, mtime = _decode(path, max_pixels, allow_truncated)
    except _NeedsSettings:
        # In a throw-away process, where changing Pillow's settings harms no caller's thread.
        try:
            found = isolation.call_isolated(
                _decode, path, max_pixels, allow_truncated, timeout=_ISOLATED_SECONDS
            )
        except (isolation.Died, isolation.TimedOut) as exc:
            raise ImageError("decoder_crashed", f"decoding: {exc}") from None
        array, mode, truncated, size, mtime = found
    with _settings(truncated=False):  # torch warns of a read-only array: it is only read
        pixels = torch.from_numpy(array)
    return Decoded(pixels.permute(2, 0, 1), mode, truncated, size, mtime)


_ISOLATED_SECONDS = 3600.0


def _decode(
    path: str | Blob, max_pixels: int, allow_truncated: bool
) -> tuple[np.ndarray, str, bool, int, int]:
    """``decode`` as plain data: (pixels ``ndarray[H, W, 3]`` uint8, mode, truncated, file
    size, modification time)."""
    try:
        with _opened(path) as fh:
            if isinstance(path, Blob):
                length, size, mtime = len(path.data), path.size, path.mtime_ns
            else:
                st = os.fstat(fh.fileno())
                length, size, mtime = st.st_size, st.st_size, st.st_mtime_ns
            if length == 0:
                raise ImageError("empty_file", "file is empty (0 bytes)")
            truncated = False
            try:
                with _settings(truncated=False):
                    img, mode, turn = _load(fh, max_pixels)
            except OSError as exc:
                message = str(exc)
                if "truncated" not in message.lower() and "broken data stream" not in message:
                    raise
                if not allow_truncated:
                    raise ImageError("truncated", f"truncated file: {message}") from None
                if not isolation.private():
                    raise _NeedsSettings from None
                fh.seek(0)
                with _settings(truncated=True):
                    img, mode, turn = _load(fh, max_pixels)
                truncated = True
            with img, _settings(truncated=truncated):
                rgb = to_rgb(img)
                if turn in _TRANSPOSE:
                    rgb = rgb.transpose(_TRANSPOSE[turn])
                array = np.asarray(rgb, dtype=np.uint8)  # (H, W, 3), one copy, read-only
            return array, mode, truncated, size, mtime
    except ImageError:
        raise
    except FileNotFoundError:
        if isinstance(path, str) and os.path.islink(path):
            raise ImageError(
                "dangling_symlink", f"symlink target missing: {os.readlink(path)}"
            ) from None
        raise ImageError("missing", "file not found (removed after the scan?)") from None
    except PermissionError as exc:
        raise ImageError("permission_denied", str(exc)) from None
    except UnidentifiedImageError:
        raise ImageError("not_an_image", "not a JPEG, PNG, BMP, GIF, TIFF or WebP file") from None
    except Image.DecompressionBombError as exc:
        raise ImageError("too_large", str(exc)) from None
    except MemoryError:
        raise ImageError("out_of_memory", "not enough memory to decode this image") from None
    except (
        OSError,
        SyntaxError,
        ValueError,
        TypeError,
        IndexError,
        KeyError,
        EOFError,
        struct.error,
        zlib.error,
        RuntimeError,
    ) as exc:
        # Pillow's decoders raise all of these for corrupt data.
        raise ImageError("corrupt", f"{type(exc).__name__}: {exc}") from None
