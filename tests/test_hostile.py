"""Hostile inputs during a run: decoder crashes and hangs, odd names, files that vanish."""

import os
import shutil
import time

import h5py
import numpy as np
import pytest
import torch
from conftest import assert_vectors_close, make_extractor, photo, reference_vector
from PIL import Image

from spp_extract import Config, decoding, extract, images, read_features
from spp_extract.backbones import build_trunk
from spp_extract.discovery import ImageRef
from spp_extract.records import Failure

CONFIG = Config(backbone="resnet18", weights="none", batch_size=2, decode_timeout=3)


@pytest.fixture
def folder(tmp_path, example_dir):
    target = tmp_path / "in"
    shutil.copytree(example_dir, target)
    return target


def _failed(out):
    with h5py.File(out, "r") as f:
        return dict(
            zip(f["failed/paths"].asstr()[:], f["failed/error_class"].asstr()[:], strict=True)
        )


@pytest.mark.slow
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
        assert_vectors_close(
            data.features[row],
            reference_vector(trunk, folder / path, (4, 2, 1)),
            rel=1e-4,
            err_msg=path,
        )


def test_non_utf8_file_names_are_stored_losslessly(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    raw = b"caf\xe9.png"  # latin-1, not valid UTF-8
    Image.fromarray(photo(20, 30)).save(
        os.path.join(os.fsencode(folder), raw).decode("utf-8", "surrogateescape")
    )
    Image.fromarray(photo(20, 30, 1)).save(folder / "plain.png")
    out = tmp_path / "out.h5"
    extract([folder], out, config=CONFIG.replace(workers=0))
    with h5py.File(out, "r") as f:
        assert [bytes(b) for b in f["path_bytes"][:]] == [b"caf\xe9.png", b"plain.png"]
        assert list(f["paths"].asstr()[:]) == ["caf\ufffd.png", "plain.png"]
    assert read_features(out).features.shape[0] == 2


@pytest.mark.slow
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


@pytest.mark.slow
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


def _items(paths, min_side):
    return [
        decoding.decode_item(ImageRef(p.name, str(p)), i, min_side, CONFIG)
        for i, p in enumerate(paths)
    ]


def _solo(trunk, path):
    """Reference vector and feature-map size of one image run alone."""
    decoded = images.decode(str(path), max_pixels=10**9)
    with torch.inference_mode():
        x = decoded.pixels.float().div(255)[None]
        fmap = trunk.module(
            (x - torch.tensor(trunk.resolved.mean).view(3, 1, 1))
            / torch.tensor(trunk.resolved.std).view(3, 1, 1)
        )
    return reference_vector(trunk, path, CONFIG.levels), tuple(fmap.shape[-2:])


@pytest.mark.slow
def test_an_image_whose_decoded_size_differs_from_its_batch_gets_its_own_vector(tmp_path):
    # Planned as three 64x64 images (header scan); one decodes to 48x80 (replaced since, or an
    # orientation the header reader saw differently). Unmasked trunk: no padding may reach it.
    paths = []
    for name, (h, w) in [("a.png", (64, 64)), ("b.png", (48, 80)), ("c.png", (64, 64))]:
        Image.fromarray(photo(h, w, len(paths))).save(tmp_path / name)
        paths.append(tmp_path / name)
    trunk = build_trunk(CONFIG)
    extractor = make_extractor(trunk, CONFIG, padded=False)
    batch = decoding.collate(_items(paths, trunk.min_side))
    results = extractor(batch.pixels, batch.metas)
    for path, meta, vector in zip(paths, batch.metas, results, strict=True):
        want, fmap_size = _solo(trunk, path)
        np.testing.assert_allclose(
            vector.values.numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max()
        )
        assert vector.feature_map_size == fmap_size, path.name
        assert meta.feature_map_size == (0, 0)  # the decoder's record is not changed


@pytest.mark.slow
@pytest.mark.parametrize(
    "error",
    [
        RuntimeError(
            "[enforce fail at alloc_cpu.cpp:118] DefaultCPUAllocator: can't allocate memory: "
            "you tried to allocate 123456789 bytes. Error code 12 (Cannot allocate memory)"
        ),
        RuntimeError("DefaultCPUAllocator: not enough memory: you tried to allocate 9999 bytes."),
        MemoryError(),
    ],
)
def test_cpu_out_of_memory_splits_the_batch_tiles_the_image_then_records_it(tmp_path, error):
    paths = []
    for name in ["a.png", "big.png", "c.png", "d.png"]:
        Image.fromarray(photo(40, 40, len(paths))).save(tmp_path / name)
        paths.append(tmp_path / name)
    trunk = build_trunk(CONFIG)
    extractor = make_extractor(trunk, CONFIG, padded=False)
    batch = decoding.collate(_items(paths, trunk.min_side))
    real_run = extractor._run
    big = batch.metas[1]

    def run(pixels, metas):
        if len(metas) > 1 or metas[0] is big:
            raise error
        return real_run(pixels, metas)

    extractor._run = run
    results = extractor(batch.pixels, batch.metas)
    for i in (0, 1, 2, 3):  # the image that did not fit whole ran in tiles: the same vector
        want = reference_vector(trunk, paths[i], CONFIG.levels)
        np.testing.assert_allclose(
            results[i].values.numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max()
        )
    assert results[1].tiles > 0

    def tiled(*_args):
        raise error

    extractor._tiled = tiled  # not even the smallest tiles fit: recorded, the others done
    results = extractor(batch.pixels, batch.metas)
    assert isinstance(results[1], Failure) and results[1].kind == "out_of_memory"
    for i in (0, 2, 3):
        want = reference_vector(trunk, paths[i], CONFIG.levels)
        np.testing.assert_allclose(
            results[i].values.numpy(), want, rtol=1e-4, atol=1e-4 * np.abs(want).max()
        )


def test_other_runtime_errors_are_not_taken_for_out_of_memory(tmp_path):
    Image.fromarray(photo(40, 40)).save(tmp_path / "a.png")
    trunk = build_trunk(CONFIG)
    extractor = make_extractor(trunk, CONFIG, padded=False)
    batch = decoding.collate(_items([tmp_path / "a.png"], trunk.min_side))

    def run(pixels, metas):
        raise RuntimeError("Given groups=1, weight of size [64, 3, 7, 7], expected input ...")

    extractor._run = run
    with pytest.raises(RuntimeError, match="groups=1"):
        extractor(batch.pixels, batch.metas)


@pytest.mark.slow
def test_isolated_decode_returns_the_pixels_with_the_dataloader_imported(tmp_path):
    import torch.utils.data  # noqa: F401 - as in a run: torch's fd-passing pickler is registered

    path = tmp_path / "good.png"
    Image.fromarray(photo(300, 400)).save(path)
    want = images.decode(str(path), max_pixels=10**9).pixels
    ref = ImageRef("good.png", str(path))
    for _ in range(10):
        item = decoding.isolated_decode(ref, 7, 1, CONFIG)
        assert item.meta.error_class == "" and item.index == 7
        assert torch.equal(item.pixels, want)


@pytest.mark.slow
def test_a_crashing_decoder_sharing_its_batch_with_same_size_images(tmp_path, monkeypatch):
    folder = tmp_path / "in"
    folder.mkdir()
    for i, name in enumerate(["a.png", "b.png", "crash.png", "d.png", "e.png"]):
        Image.fromarray(photo(40, 40, i)).save(folder / name)
    real_decode = images.decode

    def hostile(path, **kwargs):
        if path.endswith("crash.png"):
            os.kill(os.getpid(), 9)
        return real_decode(path, **kwargs)

    monkeypatch.setattr(images, "decode", hostile)
    out = tmp_path / "out.h5"
    result = extract([folder], out, config=CONFIG.replace(workers=2, batch_size=8))
    assert _failed(out) == {"crash.png": "decoder_crashed"}
    assert (result.images, result.failed) == (4, 1)
    trunk = build_trunk(CONFIG)
    data = read_features(out)
    assert data.paths == ["a.png", "b.png", "d.png", "e.png"]
    for row, path in enumerate(data.paths):
        assert_vectors_close(
            data.features[row],
            reference_vector(trunk, folder / path, (4, 2, 1)),
            rel=1e-4,
            err_msg=path,
        )


@pytest.mark.slow
def test_a_decoder_crashing_while_the_main_process_computes(tmp_path, monkeypatch):
    """torch reports a dead worker (SIGCHLD) wherever the main thread is; a crash during
    compute must not lose the batch in hand or end the run: the crashed image is recorded,
    every other image has its vector, and the caller's SIGCHLD handler is back afterwards."""
    import signal

    from spp_extract import compute

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(8):
        Image.fromarray(photo(40, 40, i)).save(folder / f"{i}.png")
    real_decode, real_call = images.decode, compute.Extractor.__call__

    def hostile(path, **kwargs):
        if path.endswith("5.png"):
            time.sleep(0.5)  # the main process is inside a slow compute by now
            os.kill(os.getpid(), 9)
        return real_decode(path, **kwargs)

    def slow(self, *args, **kwargs):
        time.sleep(1.5)  # compute outlasts the crash, as big images on CPU do
        return real_call(self, *args, **kwargs)

    monkeypatch.setattr(images, "decode", hostile)
    monkeypatch.setattr(compute.Extractor, "__call__", slow)
    out = tmp_path / "out.h5"
    result = extract([folder], out, config=CONFIG.replace(workers=1, batch_size=1))
    assert _failed(out) == {"5.png": "decoder_crashed"}
    assert (result.images, result.failed) == (7, 1)
    # torch's own handler is back (it installs it once per process and never again)
    assert callable(signal.getsignal(signal.SIGCHLD))
    trunk = build_trunk(CONFIG)
    data = read_features(out)
    for row, path in enumerate(data.paths):
        assert_vectors_close(
            data.features[row], reference_vector(trunk, folder / path, (4, 2, 1)), rel=1e-4
        )
