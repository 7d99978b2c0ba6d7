"""The class, not the instances (issue 16): generated not-quite-output files and generated
non-finite rows fed to every reader; threads running extraction, embedding and decoding at
once; kills at random moments of merge, reduce and neighbours."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import FAST_CONFIG, run_python, synthetic
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from spp_extract import (
    ConfigError,
    OutputError,
    create_model,
    extract,
    images,
    iter_features,
    merge,
    read_features,
)
from spp_extract.inspection import summary
from spp_extract.neighbors import neighbors
from spp_extract.projection import Projection, fit_projection, project_file

SLOW_SETTINGS = settings(
    max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def template(tmp_path_factory, real_h5) -> Path:
    """A small, valid, merged file with a reduce/ group: 12 rows of 16 values."""
    folder = tmp_path_factory.mktemp("template")
    x = np.random.default_rng(0).random((12, 16), dtype=np.float32)
    src = synthetic(folder / "src.h5", x, real_h5)
    project_file(src, folder / "reduced.h5", fit_projection(src, dim=3))
    return folder / "reduced.h5"


def _replace(f: h5py.File, name: str, **kwargs) -> None:  # noqa: ANN003
    if name in f:
        del f[name]
    f.create_dataset(name, **kwargs)


def _mutations(f: h5py.File, rng: random.Random) -> str:
    """One random change that leaves an HDF5 file which looks like an output."""
    n = f["paths"].shape[0] if isinstance(f.get("paths"), h5py.Dataset) else 12
    names = [name for name in f if isinstance(f[name], h5py.Dataset)]
    choice = rng.randrange(10)
    if choice in (3, 4) and not isinstance(f.get("failed"), h5py.Group):
        choice = 8
    if choice == 6 and not isinstance(f.get("reduce"), h5py.Group):
        choice = 8
    if choice == 8 and not len(f.attrs):
        choice = 0
    if choice == 0:
        name = rng.choice(names)
        del f[name]
        return f"no {name}"
    if choice == 1:
        name = rng.choice(names)
        shape = rng.choice([(), (n + rng.choice([-1, 1, 7]),), (n, 3, 2), (0,), (n, 0)])
        _replace(f, name, shape=shape, dtype=rng.choice(["f4", "i8", "u1"]))
        return f"{name} of shape {shape}"
    if choice == 2:
        _replace(f, "features", data=np.zeros((n, 3), rng.choice([np.int32, np.bool_])))
        return "features not floats"
    if choice == 3:
        del f["failed"]
        f.create_dataset("failed", data=[1, 2])
        return "failed a dataset"
    if choice == 4 and len(f["failed"]):
        failed = f["failed"]
        name = rng.choice(list(failed))
        del failed[name]
        failed.create_dataset(name, data=np.arange(rng.choice([0, 3])))
        return f"failed/{name} of another length"
    if choice == 5:
        rows = rng.choice([2**31, 10**9, n + 10**6])
        _replace(f, "features", shape=(rows, 3), dtype="f4", chunks=(1, 3))
        _replace(f, "paths", shape=(rows,), dtype=h5py.string_dtype(), chunks=(1024,))
        return f"declares {rows} rows"
    if choice == 6 and len(f["reduce"]):
        group = f["reduce"]
        name = rng.choice(list(group))
        del group[name]
        if rng.random() < 0.5:
            group.create_dataset(name, data=np.zeros(rng.choice([1, 5, 7]), np.float32))
        return f"reduce/{name} broken"
    if choice == 7:
        f.attrs["layout"] = "view"
        f.attrs["shards"] = rng.choice(["nowhere.shards/run-0", "", "../.."])
        return "claims to be a view"
    if choice == 8:
        attr = rng.choice(list(f.attrs))
        del f.attrs[attr]
        return f"no {attr} attribute"
    if not len(f.attrs):
        return "nothing"
    f.attrs[rng.choice(list(f.attrs))] = rng.choice([np.nan, -1, "x", np.zeros(3)])
    return "an odd attribute"


READERS = {
    "read_features": lambda src, tmp: read_features(src),
    "iter_features": lambda src, tmp: list(iter_features(src, block_rows=5)),
    "inspect": lambda src, tmp: summary(src),
    "merge": lambda src, tmp: merge(src, tmp / "m.h5", overwrite=True),
    "neighbors": lambda src, tmp: neighbors(src, 2),
    "fit": lambda src, tmp: fit_projection(src, dim=1),
    "project": lambda src, tmp: project_file(
        src, tmp / "p.h5", Projection.load(src), overwrite=True
    ),
    "Projection.load": lambda src, tmp: Projection.load(src),
}


@pytest.mark.slow
@SLOW_SETTINGS
@given(seed=st.integers(0, 2**32 - 1), changes=st.integers(1, 3))
def test_every_reader_refuses_a_file_that_only_looks_like_an_output(
    tmp_path_factory, template, seed, changes
):
    """Whatever the damage, each reader either reads the file (finite, consistent results) or
    refuses it with ConfigError or OutputError: never another exception, never a crash."""
    folder = tmp_path_factory.mktemp("bad")
    src = folder / "bad.h5"
    src.write_bytes(template.read_bytes())
    rng = random.Random(seed)
    with h5py.File(src, "r+") as f:
        done = [_mutations(f, rng) for _ in range(changes)]
    for name, read in READERS.items():
        try:
            read(src, folder)
        except (ConfigError, OutputError) as exc:
            assert "\n" not in str(exc), (name, done, str(exc))
        except ValueError as exc:  # only Projection's own refusal of its input
            assert name == "project" and "vectors" in str(exc), (name, done, exc)


@pytest.mark.slow
@SLOW_SETTINGS
@given(
    seed=st.integers(0, 2**32 - 1),
    bad=st.integers(0, 11),
    whole_rows=st.booleans(),
    half=st.booleans(),
)
def test_non_finite_rows_never_reach_an_output(
    tmp_path_factory, real_h5, seed, bad, whole_rows, half
):
    """Rows holding NaN or inf (whole rows or single values, float32 or float16 files): left
    out of every neighbour list and every fit, moved to the failures of a reduced file; no
    output holds NaN."""
    folder = tmp_path_factory.mktemp("nonfinite")
    rng = np.random.default_rng(seed)
    x = rng.random((12, 16), dtype=np.float32)
    rows = rng.choice(12, size=bad, replace=False)
    for row in rows:
        value = rng.choice([np.nan, np.inf, -np.inf])
        if whole_rows:
            x[row] = value
        else:
            x[row, rng.integers(16)] = value
    src = synthetic(folder / "src.h5", x.astype(np.float16 if half else np.float32), real_h5)
    usable = 12 - bad
    try:
        found = neighbors(src, 1)
    except ConfigError as exc:
        assert usable < 2 and "usable rows" in str(exc)
    else:
        assert sorted(found.excluded.tolist()) == sorted(rows.tolist())
        assert not np.isin(found.index, rows).any() and np.isfinite(found.similarity).all()
    try:
        fitted = fit_projection(src, dim=2)
    except ConfigError as exc:
        assert usable < 3 and "sampled rows" in str(exc)
        return
    assert fitted.settings["sample_non_finite"] == bad
    written = project_file(src, folder / "p.h5", fitted)
    out = read_features(folder / "p.h5")
    assert written == usable == len(out.paths) and np.isfinite(out.features).all()
    assert out.failed_errors.count(out.failed_errors[-1]) >= 1 if bad else True
    assert len(out.failed_paths) == len(read_features(src).failed_paths) + bad


# ----------------------------------------------------------------------------- threads


@pytest.mark.slow
def test_threads_extracting_embedding_and_decoding_at_once_get_the_single_thread_results(
    tmp_path, example_dir
):
    """Four threads (two extractions with random weights, two embeddings), while two more
    decode a truncated file (allowed) and an image over Pillow's own limit (max_pixels none),
    give exactly the single-thread vectors and leave Pillow's settings as they were."""
    config = FAST_CONFIG
    single = read_features(extract([example_dir], tmp_path / "one.h5", config=config).output)
    pictures = [Image.open(example_dir / "landscape.jpg"), Image.open(example_dir / "portrait.png")]
    embedded = create_model("resnet18", weights="none").embed(pictures)
    truncated = tmp_path / "cut.jpg"
    data = (example_dir / "landscape.jpg").read_bytes()
    truncated.write_bytes(data[: len(data) * 2 // 3])
    huge = tmp_path / "huge.png"
    Image.new("L", (12000, 15000)).save(huge)  # 180 MP: over twice Pillow's default limit
    pillow = (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES)
    results: dict[str, object] = {}
    errors: list[BaseException] = []

    def run(name: str, work) -> None:  # noqa: ANN001
        try:
            results[name] = work()
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    work = {
        "extract0": lambda: read_features(extract([example_dir], tmp_path / "a.h5", config=config).output),
        "extract1": lambda: read_features(extract([example_dir], tmp_path / "b.h5", config=config).output),
        "embed0": lambda: create_model("resnet18", weights="none").embed(pictures),
        "embed1": lambda: create_model("resnet18", weights="none").embed(pictures),
        "truncated": lambda: [
            images.decode(str(truncated), max_pixels=10**9, allow_truncated=True)
            for _ in range(5)
        ],
        "huge": lambda: images.decode(str(huge), max_pixels=2**40),
    }  # fmt: skip
    threads = [threading.Thread(target=run, args=item) for item in work.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    for name in ("extract0", "extract1"):
        assert results[name].paths == single.paths
        np.testing.assert_array_equal(results[name].features, single.features)
    for name in ("embed0", "embed1"):
        torch.testing.assert_close(results[name], embedded, rtol=0, atol=0)
    assert all(d.truncated for d in results["truncated"])
    assert tuple(results["huge"].pixels.shape) == (3, 15000, 12000)
    assert (Image.MAX_IMAGE_PIXELS, ImageFile.LOAD_TRUNCATED_IMAGES) == pillow


@pytest.mark.slow  # builds regnet_y_400mf many times
def test_building_a_regnet_touches_no_other_threads_modules():
    from spp_extract.families import meta_model

    stop = threading.Event()
    devices: set[str] = set()

    def build_convs() -> None:
        while not stop.is_set():
            conv = torch.nn.Conv2d(3, 8, 3)
            devices.add(conv.weight.device.type)

    other = threading.Thread(target=build_convs)
    other.start()
    try:
        for _ in range(3):
            assert next(meta_model("regnet_y_400mf").parameters()).device.type == "meta"
    finally:
        stop.set()
        other.join()
    assert devices == {"cpu"}


# ----------------------------------------------------------------------------- kills


@pytest.mark.slow
@pytest.mark.parametrize("command", ["merge", "reduce", "neighbors"])
def test_kills_at_random_moments_leave_no_half_file(tmp_path, real_h5, command):
    """SIGKILL at random moments of a run (block reads slowed down, so that the writing takes
    a while): the destination is absent or whole; the next run of the same command removes
    what a killed one left and completes."""
    from spp_extract.storage import tmp_prefix

    x = np.random.default_rng(1).random((2000, 2000), dtype=np.float32)
    src = synthetic(tmp_path / "src.h5", x, real_h5)
    dst = tmp_path / "dst.h5"
    args = {
        "merge": ["merge", src, dst, "--overwrite"],
        "reduce": ["reduce", src, dst, "--dim", "4", "--overwrite"],
        "neighbors": ["neighbors", src, "-k", "1", "-o", dst, "--overwrite"],
    }[command]
    crash_runner = Path(__file__).with_name("crash_runner.py")
    marker = tmp_path.parent / f"{tmp_path.name}.reading"
    env = {"SPP_TEST_MARKER": str(marker)}
    started = time.monotonic()
    assert run_python(crash_runner, "slow-read:0.3", "--", *args, env=env).returncode == 0
    duration = time.monotonic() - started
    rng = random.Random(command)
    left = 0
    for attempt in range(3):
        marker.unlink(missing_ok=True)
        process = run_python(crash_runner, "slow-read:0.3", "--", *args, env=env, wait=False)
        if attempt == 0:  # once surely while reading (merge and reduce: while writing too)
            while not marker.exists() and process.poll() is None:
                time.sleep(0.02)
        else:
            time.sleep(rng.uniform(0.3, 1.0) * duration)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
        with h5py.File(dst) as f:  # the last whole one, never a half-written one
            assert f.attrs.get("layout") == "merged" or "neighbors" in f
        left += len(list(tmp_path.glob(f"{tmp_prefix(dst)}*")))
    if command != "neighbors":  # it writes only after reading everything
        assert left, "no kill landed while the file was written: the test proves nothing"
    finished = run_python("-m", "spp_extract", *args)
    assert finished.returncode == 0, finished.stderr
    assert sorted(os.listdir(tmp_path)) == ["dst.h5", "src.h5"]
    if command == "merge":
        np.testing.assert_array_equal(read_features(dst).features, x)
