"""Hostile inputs during a run: decoder crashes and hangs, odd names, files that vanish."""

import os
import shutil
import time

import h5py
import pytest
from conftest import photo, reference_vector, rel_err
from PIL import Image

from spp_extract import Config, extract, images, read_features
from spp_extract.backbones import build_trunk

CONFIG = Config(backbone="resnet18", weights="none", batch_size=2, decode_timeout=3)


@pytest.fixture
def folder(tmp_path, example_dir):
    target = tmp_path / "in"
    shutil.copytree(example_dir, target)
    return target


def _failed(out):
    with h5py.File(out, "r") as f:
        return dict(zip(f["failed/paths"].asstr()[:], f["failed/error_class"].asstr()[:], strict=True))


def test_decoder_crash_and_hang_in_workers_become_failures(tmp_path, folder, monkeypatch):
    Image.fromarray(photo(40, 40)).save(folder / "crash.png")
    Image.fromarray(photo(40, 40)).save(folder / "hang.png")
    real_decode = images.decode

    def hostile(path, **kwargs):
        if path.endswith("crash.png"):
            os.kill(os.getpid(), 9)  # a segfaulting decoder, as far as the parent can tell
        if path.endswith("hang.png"):
            time.sleep(600)
        return real_decode(path, **kwargs)

    monkeypatch.setattr(images, "decode", hostile)  # workers are forked: they inherit it
    out = tmp_path / "out.h5"
    result = extract([folder], out, config=CONFIG.replace(workers=2))
    assert _failed(out) == {"crash.png": "decoder_crashed", "hang.png": "decode_timeout"}
    assert result.images == 12
    trunk = build_trunk(CONFIG)
    data = read_features(out)
    for row, path in enumerate(data.paths):  # every good row still matches its image
        assert rel_err(data.features[row], reference_vector(trunk, folder / path, (4, 2, 1))) < 1e-4


def test_non_utf8_file_names_are_stored_losslessly(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    raw = b"caf\xe9.png"  # latin-1, not valid UTF-8
    Image.fromarray(photo(20, 30)).save(os.path.join(os.fsencode(folder), raw).decode("utf-8", "surrogateescape"))
    Image.fromarray(photo(20, 30, 1)).save(folder / "plain.png")
    out = tmp_path / "out.h5"
    extract([folder], out, config=CONFIG.replace(workers=0))
    with h5py.File(out, "r") as f:
        assert [bytes(b) for b in f["path_bytes"][:]] == [b"caf\xe9.png", b"plain.png"]
        assert list(f["paths"].asstr()[:]) == ["caf\ufffd.png", "plain.png"]
    assert read_features(out).features.shape[0] == 2


def test_file_vanishing_mid_run_is_recorded(tmp_path, folder, monkeypatch):
    real_read_size = images.read_size

    def read_size_then_delete(path):
        if path.endswith("gray.png") and os.path.exists(path):
            os.unlink(path)  # gone after the scan, before decoding
        return real_read_size(path)

    monkeypatch.setattr(images, "read_size", read_size_then_delete)
    out = tmp_path / "out.h5"
    result = extract([folder], out, config=CONFIG.replace(workers=0))
    assert _failed(out) == {"gray.png": "missing"}
    assert (result.images, result.failed) == (11, 1)


def test_an_unexpected_decoder_exception_is_a_record(tmp_path, folder, monkeypatch):
    real_decode = images.decode

    def buggy(path, **kwargs):
        if path.endswith("gray.png"):
            raise ZeroDivisionError("a decoder bug")
        return real_decode(path, **kwargs)

    monkeypatch.setattr(images, "decode", buggy)
    out = tmp_path / "out.h5"
    result = extract([folder], out, config=CONFIG.replace(workers=0))
    assert _failed(out) == {"gray.png": "decoder_error"}
    assert (result.images, result.failed) == (11, 1)
