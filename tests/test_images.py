"""Finding files and decoding them at native size, including hostile inputs."""

import io
import os
import struct
import threading

import numpy as np
import pytest
from conftest import photo, refuse_listing
from PIL import Image, ImageFile

from spp_extract import ConfigError, ImageError
from spp_extract.discovery import find_images
from spp_extract.images import decode, read_size


def _decode(path, **kw):
    return decode(str(path), max_pixels=kw.pop("max_pixels", 10**8), **kw)


def test_walk_sorts_filters_extensions_any_case_and_ignores_other_files(tmp_path):
    for name in [
        "b.JPG",
        "a.png",
        "z/c.TiFf",
        "z/d.webp",
        "notes.txt",
        "e.jpeg",
        "f.bmp",
        "g.gif",
        "h.tif",
    ]:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    keys = [r.key for r in find_images([tmp_path]).refs]
    assert keys == ["a.png", "b.JPG", "e.jpeg", "f.bmp", "g.gif", "h.tif", "z/c.TiFf", "z/d.webp"]


def test_files_from_and_missing_input(tmp_path):
    (tmp_path / "a.png").write_bytes(b"x")
    (tmp_path / "b.png").write_bytes(b"x")
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'b.png'}\n\n{tmp_path / 'a.png'}\n")
    assert [r.key for r in find_images([], files_from=listing).refs] == [
        str(tmp_path / "a.png"),
        str(tmp_path / "b.png"),
    ]
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
    assert [r.key for r in find_images([tmp_path]).refs] == ["d/a.png"]
    followed = [r.key for r in find_images([tmp_path], follow_symlinks=True).refs]
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


def _exif(tag_type: int, count: int, value: bytes) -> bytes:
    """Raw EXIF holding only an orientation entry, encoded as asked (value: 4 bytes)."""
    ifd = struct.pack("<HHHI", 1, 0x0112, tag_type, count) + value + struct.pack("<I", 0)
    return b"Exif\0\0II*\0" + struct.pack("<I", 8) + ifd


@pytest.mark.parametrize(
    "exif, displayed",
    [
        (_exif(3, 1, struct.pack("<HH", 6, 0)), (50, 30)),  # SHORT 6: rotate
        (_exif(2, 2, b"6\0\0\0"), (30, 50)),  # ASCII "6": not an orientation, ignored
        (_exif(3, 2, struct.pack("<HH", 6, 3)), (50, 30)),  # two values: Pillow takes the first
        (_exif(4, 1, struct.pack("<I", 6)), (50, 30)),  # LONG 6: a number all the same
        (_exif(3, 1, struct.pack("<HH", 9, 0)), (30, 50)),  # out of range: ignored
    ],
    ids=["short-6", "ascii-6", "two-shorts", "long-6", "short-9"],
)
def test_header_and_decoder_agree_on_odd_orientation_tags(tmp_path, exif, displayed):
    path = tmp_path / "o.jpg"
    Image.fromarray(photo(30, 50)).save(path, quality=95, exif=exif)
    assert read_size(str(path)) == displayed
    assert tuple(_decode(path).pixels.shape[1:]) == displayed


def test_16_bit_gray_with_transparent_colour_is_scaled_then_composited(tmp_path):
    values = np.full((20, 30), 257 * 128, np.uint16)
    values[:5, :] = 0  # the transparent colour
    path = tmp_path / "t16.png"
    Image.fromarray(values).save(path, transparency=0)
    pixels = _decode(path).pixels.numpy()
    assert (pixels[:, :5] == 255).all()  # transparent: white
    assert (pixels[:, 5:] == 128).all()  # the rest keeps its scaled value
    assert abs(pixels.mean() - (0.25 * 255 + 0.75 * 128)) < 0.5


def _promptly(fn, *args):
    """fn(*args) in a thread; a call still blocked after 10 s fails the test instead of hanging."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(10)
    return thread.is_alive(), result


@pytest.mark.parametrize("reader", ["decode", "read_size"])
def test_fifo_named_like_an_image_is_not_opened(tmp_path, reader):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    fn = _decode if reader == "decode" else lambda p: read_size(str(p))
    blocked, result = _promptly(fn, fifo)
    if blocked:  # unblock the reader so the test process can end
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    assert not blocked, f"{reader} blocked on a FIFO"
    if reader == "decode":
        assert isinstance(result.get("error"), ImageError) and result["error"].kind == "not_a_file"
    else:
        assert result == {"value": None}


def test_messages_escape_non_utf8_bytes_and_control_characters(tmp_path):
    target = os.path.join(os.fsencode(tmp_path), b"gone\xe9\n.png")
    link = tmp_path / "bad.png"
    os.symlink(target, link)
    with pytest.raises(ImageError) as info:
        _decode(link)
    message = info.value.message
    assert info.value.kind == "dangling_symlink"
    message.encode("utf-8")  # valid UTF-8: no surrogates
    assert "gone\\xe9\\n.png" in message and "\n" not in message


def test_printable():
    from spp_extract.errors import printable

    assert printable(os.fsdecode(b"caf\xe9\n\t\x1b[31m.png")) == "caf\\xe9\\n\\t\\x1b[31m.png"
    assert printable("café ok") == "café ok"
    assert printable("\u200b\ud800") == "\\u200b\\ud800"
    assert printable(printable("a\nb")) == "a\\nb"  # idempotent


def _tree(root, names):
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("L", (2, 2), 9).save(path)


def test_overlapping_inputs_give_one_row_per_file_first_input_wins(tmp_path):
    root = tmp_path / "in"
    _tree(root, ["a.png", "sub/b.png"])
    os.symlink(root, tmp_path / "link")
    found = find_images([root, root / "sub", root / "a.png", tmp_path / "link"])
    assert [r.key for r in found.refs] == ["a.png", "sub/b.png"]
    assert found.overlaps == 2  # sub/b.png as b.png, a.png given directly; link: the same keys
    found = find_images([root / "sub", root])
    assert [r.key for r in found.refs] == ["a.png", "b.png"] and found.overlaps == 1


def test_two_symlinked_files_in_a_folder_stay_two_rows(tmp_path):
    _tree(tmp_path, ["real.png"])
    os.symlink("real.png", tmp_path / "one.png")
    os.symlink(tmp_path / "real.png", tmp_path / "two.png")
    found = find_images([tmp_path])
    assert [r.key for r in found.refs] == ["one.png", "real.png", "two.png"] and found.overlaps == 0


def test_folder_that_cannot_be_listed_is_a_failure_row(tmp_path, monkeypatch):
    _tree(tmp_path, ["a.png", "locked/b.png", "z.png"])
    refuse_listing(monkeypatch, "locked")
    refs = find_images([tmp_path]).refs
    assert [(r.key, r.problem) for r in refs] == [
        ("a.png", None),
        ("locked", ("permission_denied", "cannot list this folder: Permission denied")),
        ("z.png", None),
    ]


def test_folder_with_a_path_over_the_os_limit_is_a_failure_row(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)
    names = [f"{i:02d}" + "d" * 240 for i in range(20)]  # ~4.9 kB of path: over PATH_MAX
    try:
        for name in names:
            os.mkdir(name, dir_fd=fd)
            fd, parent = os.open(name, os.O_RDONLY, dir_fd=fd), fd
            os.close(parent)
    finally:
        os.close(fd)
    refs = find_images([tmp_path]).refs
    assert len(refs) == 1
    assert refs[0].problem == ("unreadable", "cannot list this folder: File name too long")
    assert refs[0].key.startswith("/".join(names[:10])) and read_size(refs[0].path) is None


def test_files_from_errors_name_the_list_and_the_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _tree(tmp_path, ["a.png"])
    (tmp_path / "list.txt").write_text("a.png\n\nx.jpg\n")
    with pytest.raises(ConfigError) as info:
        find_images([], files_from="list.txt")
    assert str(info.value) == (
        "input 'x.jpg' on line 3 of list.txt does not exist "
        "(paths in the list are relative to the current folder)"
    )


@pytest.mark.parametrize("orientation", [None, 6])
def test_png_header_is_read_without_decoding_pixels(tmp_path, monkeypatch, orientation):
    path = tmp_path / "p.png"
    exif = b"" if orientation is None else _exif(3, 1, struct.pack("<HH", orientation, 0))
    Image.fromarray(photo(30, 40)).save(path, exif=exif)
    displayed = (30, 40) if orientation is None else (40, 30)
    loads = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(
        ImageFile.ImageFile, "load", lambda self: loads.append(1) or real_load(self)
    )
    assert read_size(str(path)) == displayed
    assert loads == []
    assert tuple(_decode(path).pixels.shape[1:]) == displayed and loads  # the count works


@pytest.mark.parametrize("fmt", ["PPM", "PCX", "EPS"])
def test_formats_the_tool_does_not_list_are_not_opened(tmp_path, fmt):
    path = tmp_path / "other.png"
    Image.new("RGB", (8, 8), (10, 20, 30)).save(path, fmt)
    with pytest.raises(ImageError) as info:
        _decode(path)
    assert info.value.kind == "not_an_image"
    assert read_size(str(path)) is None


def test_an_unlisted_folder_fails_as_a_row_without_being_opened(tmp_path, monkeypatch):
    from spp_extract import Config, decoding, extract, read_features

    _tree(tmp_path / "in", ["a.png", "locked/b.png"])
    refuse_listing(monkeypatch, "locked")
    ref = find_images([tmp_path / "in"]).refs[1]

    def no_decoding(*_args, **_kwargs):
        raise AssertionError("a problem ref was opened")

    monkeypatch.setattr("spp_extract.images.decode", no_decoding)
    monkeypatch.setattr("spp_extract.images.read_size", no_decoding)
    config = Config(backbone="resnet18", weights="none", workers=0)
    item = decoding.decode_item(ref, 3, 1, config)
    assert (item.index, item.pixels, item.meta.error_class) == (3, None, "permission_denied")
    assert decoding.read_sizes([ref], 0) == [None]
    monkeypatch.undo()
    refuse_listing(monkeypatch, "locked")
    result = extract([tmp_path / "in"], tmp_path / "out.h5", config=config)
    data = read_features(tmp_path / "out.h5")
    assert (result.images, result.failed) == (1, 1)
    assert data.paths == ["a.png"] and data.failed_paths == ["locked"]


@pytest.mark.parametrize("orientation", [2, 6])
def test_tiff_orientation_is_applied_once(tmp_path, orientation):
    # Pillow 13 orients TIFFs itself (size at open, pixels at load): no second transpose.
    pixels = photo(30, 50, 2)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / "o.tif"
    Image.fromarray(pixels).save(path, exif=exif)
    want = np.rot90(pixels, k=-1) if orientation == 6 else pixels[:, ::-1]
    assert read_size(str(path)) == want.shape[:2]
    assert np.array_equal(_decode(path).pixels.permute(1, 2, 0).numpy(), want)


def test_names_of_dots_and_an_extension_are_images(tmp_path):
    for name in [".png", "..png", "png", "x.png.", "...JPG"]:
        (tmp_path / name).write_bytes(b"x")
    assert [r.key for r in find_images([tmp_path]).refs] == ["...JPG", "..png", ".png"]
