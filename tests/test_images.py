"""Finding files and decoding them at native size, including hostile inputs."""

import io
import os

import numpy as np
import pytest
from conftest import photo
from PIL import Image

from spp_extract import ConfigError, ImageError
from spp_extract.images import decode, find_images, read_size


def _decode(path, **kw):
    return decode(str(path), max_pixels=kw.pop("max_pixels", 10**8), **kw)


def test_walk_sorts_filters_extensions_any_case_and_ignores_other_files(tmp_path):
    for name in ["b.JPG", "a.png", "z/c.TiFf", "z/d.webp", "notes.txt", "e.jpeg", "f.bmp", "g.gif", "h.tif"]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    keys = [r.key for r in find_images([tmp_path])]
    assert keys == ["a.png", "b.JPG", "e.jpeg", "f.bmp", "g.gif", "h.tif", "z/c.TiFf", "z/d.webp"]


def test_files_from_and_missing_input(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'b.png'}\n\n{tmp_path / 'a.png'}\n")
    assert [r.key for r in find_images([], files_from=listing)] == [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
    with pytest.raises(ConfigError, match="does not exist"):
        find_images([tmp_path / "nope"])


def test_same_relative_path_from_two_folders_is_refused(tmp_path):
    for d in ("one", "two"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "x.png").write_bytes(b"x")
    with pytest.raises(ConfigError, match="same path 'x.png'"):
        find_images([tmp_path / "one", tmp_path / "two"])


def test_directory_symlink_loops_do_not_hang(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.png").write_bytes(b"x")
    os.symlink(tmp_path / "d", tmp_path / "d" / "loop")
    assert [r.key for r in find_images([tmp_path])] == ["d/a.png"]
    followed = [r.key for r in find_images([tmp_path], follow_symlinks=True)]
    assert followed == ["d/a.png"]  # the loop is entered once at most


def test_exif_orientation_is_applied(tmp_path):
    pixels = photo(30, 50, 1)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise for display
    path = tmp_path / "r.png"
    Image.fromarray(pixels).save(path, exif=exif.tobytes())
    decoded = _decode(path)
    assert tuple(decoded.pixels.shape) == (3, 50, 30)
    expected = np.rot90(pixels, k=-1)  # clockwise
    assert np.array_equal(decoded.pixels.permute(1, 2, 0).numpy(), expected)
    assert read_size(str(path)) == (50, 30)


def test_alpha_is_composited_on_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half fully transparent
    path = tmp_path / "a.png"
    Image.fromarray(rgba).save(path)
    out = _decode(path).pixels
    assert out[:, 0, 0].tolist() == [200, 0, 0]
    assert out[:, 3, 0].tolist() == [255, 255, 255]


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (3, 3), 0)
    img.putpalette([10, 20, 30] + [0, 0, 0] * 255)
    img.info["transparency"] = 0
    path = tmp_path / "p.png"
    img.save(path, transparency=0)
    assert _decode(path).pixels[:, 1, 1].tolist() == [255, 255, 255]


def test_16_bit_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535]], np.uint16)
    path = tmp_path / "d.png"
    Image.fromarray(values).save(path)
    decoded = _decode(path)
    assert decoded.pixels[0, 0].tolist() == [0, 100, 255]
    assert decoded.mode.startswith("I")


def test_float_images_are_scaled(tmp_path):
    path = tmp_path / "f.tif"
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32)).save(path)
    assert _decode(path).pixels[1, 0].tolist() == [0, 128, 255]


def test_bilevel_gray_cmyk_and_first_frame(tmp_path):
    Image.new("1", (2, 2), 1).save(tmp_path / "b.png")
    assert _decode(tmp_path / "b.png").pixels.unique().tolist() == [255]
    Image.new("L", (2, 2), 77).save(tmp_path / "g.png")
    assert _decode(tmp_path / "g.png").pixels[:, 0, 0].tolist() == [77, 77, 77]
    Image.new("CMYK", (2, 2), (0, 255, 255, 0)).save(tmp_path / "c.jpg")
    red = _decode(tmp_path / "c.jpg").pixels[:, 0, 0].tolist()
    assert red[0] > 200 and red[1] < 60 and red[2] < 60
    frames = [Image.new("RGB", (4, 4), c) for c in [(255, 0, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "m.gif", save_all=True, append_images=frames[1:])
    first = _decode(tmp_path / "m.gif").pixels[:, 0, 0].tolist()
    assert first[0] > 200 and first[2] < 60


def _jpeg(h=64, w=64):
    buf = io.BytesIO()
    Image.fromarray(photo(h, w)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    "make, kind",
    [
        (lambda p: p.write_bytes(b""), "empty_file"),
        (lambda p: p.write_bytes(_jpeg()[:400]), "truncated"),
        (lambda p: p.write_text("hello, I am text"), "not_an_image"),
        (lambda p: os.symlink(p.parent / "gone.png", p), "dangling_symlink"),
    ],
)
def test_hostile_files_raise_a_stable_kind(tmp_path, make, kind):
    path = tmp_path / "bad.png"
    make(path)
    with pytest.raises(ImageError) as info:
        _decode(path)
    assert info.value.kind == kind


def test_corrupt_png_body(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(photo(32, 32)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    data[100:200] = bytes(100)  # zero out part of the IDAT stream
    path = tmp_path / "c.png"
    path.write_bytes(bytes(data))
    with pytest.raises(ImageError) as info:
        _decode(path)
    assert info.value.kind in ("corrupt", "truncated")


def test_bomb_is_refused_by_max_pixels(tmp_path):
    path = tmp_path / "big.png"
    Image.new("L", (300, 300)).save(path)
    with pytest.raises(ImageError) as info:
        _decode(path, max_pixels=10_000)
    assert info.value.kind == "too_large" and "max_pixels = 10000" in info.value.message


def test_truncated_accepted_on_request_and_marked(tmp_path):
    path = tmp_path / "t.jpg"
    path.write_bytes(_jpeg(128, 128)[:-2000])
    decoded = _decode(path, allow_truncated=True)
    assert decoded.truncated and tuple(decoded.pixels.shape) == (3, 128, 128)
    whole = tmp_path / "ok.jpg"
    whole.write_bytes(_jpeg())
    assert not _decode(whole, allow_truncated=True).truncated
