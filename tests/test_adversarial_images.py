"""Adversarial generators for what reaches images.py: file names as bytes, image modes with
EXIF orientations stored every which way, and mutated files. Each property is the promise the
README makes, checked on inputs nobody wrote by hand."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import struct
import tempfile

import numpy as np
import pytest
import torch
from conftest import photo
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from spp_extract import ImageError
from spp_extract.discovery import find_images
from spp_extract.images import decode, read_size

# The classes the README documents for failed/error_class that a file's content can cause.
DOCUMENTED = {
    "empty_file",
    "truncated",
    "not_an_image",
    "corrupt",
    "too_large",
    "unsupported_mode",
    "out_of_memory",
}
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@contextlib.contextmanager
def time_limit(seconds: int):
    """A hang fails the example instead of the whole run (Python-level loops only)."""

    def expire(_signum, _frame):
        raise TimeoutError(f"took longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photo(6, 9)).save(buf, "PNG")
    return buf.getvalue()


# ---- (a) file names as raw bytes -----------------------------------------------------------

stems = st.binary(min_size=1, max_size=80).filter(lambda b: b"/" not in b and b"\0" not in b)


@SETTINGS
@given(st.lists(stems, min_size=1, max_size=6, unique=True))
@example(
    [b"-", b"--help", b"%s%n%%", b"a\nb", b"\r\t\x1b[31m", b"caf\xe9", b"\xff\xfe", b" ", b"."]
)
def test_any_file_name_is_found_once_with_its_bytes_and_decodes(stems_):
    png = _png_bytes()
    names = [stem + b".png" for stem in stems_]
    with tempfile.TemporaryDirectory() as folder:
        raw_folder = os.fsencode(folder)
        for name in names:
            with open(os.path.join(raw_folder, name), "wb") as fh:
                fh.write(png)
        found = find_images([folder])
        assert found.overlaps == 0
        assert [ref.key_bytes for ref in found.refs] == sorted(names)
        for ref in found.refs:
            assert ref.problem is None
            assert tuple(decode(ref.path, max_pixels=10**6).pixels.shape) == (3, 6, 9)
            assert read_size(ref.path) == (6, 9)


# ---- (b) modes x formats x EXIF orientation encodings --------------------------------------

SUPPORTED = {  # formats Pillow writes each mode to, among those the tool opens
    "1": ["PNG", "TIFF", "BMP"],
    "L": ["PNG", "JPEG", "TIFF", "BMP", "GIF"],
    "LA": ["PNG", "TIFF"],
    "P": ["PNG", "TIFF", "BMP", "GIF"],
    "P+transparency": ["PNG", "GIF"],
    "RGB": ["PNG", "JPEG", "TIFF", "BMP", "WEBP"],
    "RGBA": ["PNG", "TIFF", "WEBP"],
    "CMYK": ["JPEG", "TIFF"],
    "I;16": ["PNG", "TIFF"],
    "I;16+transparency": ["PNG"],
    "I": ["PNG", "TIFF"],
    "F": ["TIFF"],
}
EXIF_FORMATS = {"PNG", "JPEG", "TIFF", "WEBP"}


def _exif(encoding: str, value: int) -> bytes | None:
    """Raw EXIF with an orientation entry stored as ``encoding``; None: no EXIF at all."""
    entries = {
        "short": (3, 1, struct.pack("<HH", value, 0)),
        "long": (4, 1, struct.pack("<I", value)),
        "ascii": (2, 2, str(value).encode()[:1] + b"\0\0\0"),
        "two-shorts": (3, 2, struct.pack("<HH", value, 1)),
        "out-of-range": (3, 1, struct.pack("<HH", 9 + value, 0)),
    }
    if encoding == "none":
        return None
    if encoding == "garbage":
        return b"Exif\0\0II*\0\xff\xff\xff\x7f" + bytes(value)
    tag_type, count, data = entries[encoding]
    ifd = struct.pack("<HHHI", 1, 0x0112, tag_type, count) + data + struct.pack("<I", 0)
    return b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd


def _image(mode: str, height: int, width: int, seed: int) -> tuple[Image.Image, dict]:
    rng = np.random.default_rng(seed)
    base, _, extra = mode.partition("+")
    if base in ("I;16", "I"):
        img = Image.fromarray(rng.integers(0, 65536, (height, width), dtype=np.uint16))
        img = img if base == "I;16" else img.convert("I")
    elif base == "F":
        img = Image.fromarray(rng.uniform(0, 1, (height, width)).astype(np.float32))
    else:
        img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).convert(
            base
        )
    save = {"transparency": int(np.asarray(img).flat[0])} if extra else {}
    return img, save


@SETTINGS
@given(
    st.sampled_from(sorted(SUPPORTED)).flatmap(
        lambda m: st.tuples(st.just(m), st.sampled_from(SUPPORTED[m]))
    ),
    st.integers(1, 12),
    st.integers(1, 12),
    st.integers(0, 2**16),
    st.integers(1, 8),
    st.sampled_from(["none", "short", "long", "ascii", "two-shorts", "out-of-range", "garbage"]),
)
@example(("RGB", "JPEG"), 3, 5, 0, 6, "ascii")  # issue 8, B6: the header reader used to turn it
@example(("F", "TIFF"), 1, 2, 0, 5, "short")  # found by this test: Pillow 13 turns TIFFs itself
@example(("RGB", "TIFF"), 2, 3, 0, 2, "short")
@example(("RGB", "PNG"), 2, 3, 0, 5, "short")  # every orientation, checked against the oracle
@example(("RGB", "PNG"), 2, 3, 0, 6, "long")
@example(("L", "PNG"), 3, 2, 0, 7, "short")
@example(("RGB", "BMP"), 2, 3, 0, 8, "short")
def test_header_size_is_the_decoded_size_for_every_mode_and_orientation(
    mode_format, height, width, seed, orientation, encoding
):
    mode, fmt = mode_format
    img, save = _image(mode, height, width, seed)
    exif = _exif(encoding, orientation) if fmt in EXIF_FORMATS else None
    if exif is not None:
        save["exif"] = exif
    buf = io.BytesIO()
    try:
        img.save(buf, fmt, **save)
    except Exception:  # noqa: BLE001 - a combination Pillow cannot write is not our input
        assume(False)
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "x." + fmt.lower())
        with open(path, "wb") as fh:
            fh.write(buf.getvalue())
        with time_limit(20):
            size = read_size(path)
            try:
                decoded = decode(path, max_pixels=10**6)
            except ImageError as exc:
                pytest.fail(f"a valid {mode} {fmt} failed: {exc.kind}: {exc.message}")
    assert decoded.pixels.dtype == torch.uint8 and decoded.pixels.shape[0] == 3
    assert size is not None, "the header of a valid image could not be read"
    assert size == tuple(decoded.pixels.shape[1:])
    valid = exif is not None and encoding in ("short", "long", "two-shorts")
    assert size == ((width, height) if valid and orientation >= 5 else (height, width))
    if mode in ("RGB", "L") and fmt in ("PNG", "TIFF", "BMP"):  # lossless: exact pixels
        want = img.convert("RGB")
        if valid:  # the independent oracle: Pillow's own reading of the saved tag
            with Image.open(io.BytesIO(buf.getvalue())) as saved:
                want = ImageOps.exif_transpose(saved).convert("RGB")
        assert np.array_equal(decoded.pixels.permute(1, 2, 0).numpy(), np.asarray(want))


# ---- (c) truncated and bit-flipped files ----------------------------------------------------


def _valid(fmt: str) -> bytes:
    buf = io.BytesIO()
    pixels = photo(24, 32)
    img = Image.fromarray(pixels)
    if fmt == "JPEG":
        exif = Image.Exif()
        exif[0x0112] = 6
        img.save(buf, fmt, quality=90, exif=exif.tobytes())
    elif fmt == "GIF":
        img.convert("P").save(buf, fmt)
    else:
        img.save(buf, fmt)
    return buf.getvalue()


VALID = {fmt: _valid(fmt) for fmt in ["JPEG", "PNG", "GIF", "TIFF", "WEBP", "BMP"]}


@st.composite
def mutated(draw):
    fmt = draw(st.sampled_from(sorted(VALID)))
    data = bytearray(VALID[fmt])
    for _ in range(draw(st.integers(0, 8))):
        position = draw(st.integers(0, len(data) - 1))
        data[position] ^= 1 << draw(st.integers(0, 7))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return fmt, bytes(data)


@SETTINGS
@given(mutated(), st.booleans())
def test_damaged_files_decode_or_fail_with_a_documented_class(case, allow_truncated):
    fmt, data = case
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "x." + fmt.lower())
        with open(path, "wb") as fh:
            fh.write(data)
        with time_limit(20):
            size = read_size(path)
            try:
                decoded = decode(path, max_pixels=10**6, allow_truncated=allow_truncated)
            except ImageError as exc:
                assert exc.kind in DOCUMENTED, exc.kind
                exc.message.encode("utf-8")
                return
    assert decoded.pixels.dtype == torch.uint8 and decoded.pixels.shape[0] == 3
    if size is not None:
        assert size == tuple(decoded.pixels.shape[1:])
