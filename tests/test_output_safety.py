"""The output is never lost, replaced or misread: races, foreign files, odd names, partial runs."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import crash_cli, keyed, photo, refuse_listing
from PIL import Image

from spp_extract import Config, ConfigError, OutputError, extract, merge, read_features
from spp_extract.rundir import OutputLock
from spp_extract.storage import shards_root

CONFIG = Config(backbone="resnet18", weights="none", workers=0, batch_size=2)
ARGS = ["--backbone", "resnet18", "--weights", "none", "--workers", "0", "--batch-size", "2", "-q"]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    target = tmp_path / "in"
    target.mkdir()
    for i in range(6):
        Image.fromarray(photo(40 + 8 * i, 48, seed=i)).save(target / f"img_{i}.png")
    return target


def _cli(fault: str, *args: object, wait: bool = True):
    return crash_cli(fault, "extract", *args, *ARGS, wait=wait)


# ----------------------------------------------------------------------------- one writer


@pytest.mark.slow
def test_a_run_that_started_first_holds_the_output_while_its_model_loads(tmp_path, folder):
    """B starts (slow model load), A starts on the same output: A must be refused, never
    finish and then be replaced by B, which would delete A's shards."""
    out = tmp_path / "out.h5"
    slow = _cli("slow-build:15", folder, "-o", out, wait=False)  # outlasts a loaded start-up
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (shards_root(out) / ".lock").exists():
        time.sleep(0.05)
    time.sleep(0.5)
    fast = _cli("none", folder, "-o", out)
    _, slow_err = slow.communicate(timeout=300)
    assert slow.returncode == 0, slow_err
    assert fast.returncode == 1, fast.stderr
    assert "another spp-extract run" in fast.stderr
    assert len(keyed(out)["rows"]) == 6


def _sleep_forever(started) -> None:  # noqa: ANN001
    started.set()
    time.sleep(60)


def test_forked_children_do_not_hold_the_lock(tmp_path):
    out = tmp_path / "out.h5"
    lock = OutputLock(out)
    lock.acquire()
    ctx = multiprocessing.get_context("fork")
    started = ctx.Event()
    child = ctx.Process(target=_sleep_forever, args=(started,), daemon=True)
    child.start()
    try:
        assert started.wait(10)
        lock.release()  # the run is gone; its decode worker lives on
        again = OutputLock(out)
        again.acquire()  # would fail if the child still held the lock
        again.release()
    finally:
        child.kill()
        child.join()


def test_refusal_leaves_no_trace(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no images found"):
        extract([empty], tmp_path / "out.h5", config=CONFIG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


# ----------------------------------------------------------------------------- what is there


@pytest.mark.parametrize("content", [b"just some text\n", b"\x89HDF\r\n\x1a\n" + b"\0" * 100, None])
@pytest.mark.parametrize("mode", ["resume", "overwrite"])
def test_files_the_tool_did_not_write_are_never_replaced(tmp_path, folder, content, mode):
    out = tmp_path / "out.h5"
    if content is None:  # an HDF5 file of someone else's
        with h5py.File(out, "w") as f:
            f["data"] = np.arange(10)
    else:
        out.write_bytes(content)
    before = out.read_bytes()
    with pytest.raises(ConfigError, match="refusing to") as info:
        extract([folder], out, config=CONFIG, mode=mode)
    assert "spp-extract" in str(info.value)
    assert out.read_bytes() == before
    assert not shards_root(out).exists()


@pytest.mark.slow
def test_existing_output_message_names_the_options_in_the_callers_terms(tmp_path, folder):
    out = tmp_path / "out.h5"
    extract([folder], out, config=CONFIG)
    with pytest.raises(ConfigError, match=r"mode=.resume. .* mode=.overwrite."):
        extract([folder], out, config=CONFIG)
    result = _cli("none", folder, "-o", out)
    assert result.returncode == 2 and "--resume" in result.stderr and "mode=" not in result.stderr


@pytest.mark.slow
def test_resume_on_a_merged_copy_is_refused(tmp_path, folder):
    out = tmp_path / "out.h5"
    extract([folder], out, config=CONFIG)
    portable = tmp_path / "portable.h5"
    merge(out, portable)
    before = portable.read_bytes()
    with pytest.raises(ConfigError, match="merged"):
        extract([folder], portable, config=CONFIG, mode="resume")
    assert portable.read_bytes() == before


def test_renamed_shards_folder_names_the_folder_the_view_expects(tmp_path, folder):
    out = tmp_path / "out.h5"
    extract([folder], out, config=CONFIG)
    out.rename(tmp_path / "renamed.h5")
    shards_root(out).rename(tmp_path / "renamed.h5.shards")
    with pytest.raises(OutputError) as info:
        read_features(tmp_path / "renamed.h5")
    assert f"'{shards_root(out)}" in str(info.value)  # where it must be: out.h5.shards


# ----------------------------------------------------------------------------- names


@pytest.mark.slow
@pytest.mark.parametrize("name", ["top50%%.h5", "top5%_val.h5", "a%b.h5", "x%d%s.h5"])
def test_percent_in_the_output_name(tmp_path, folder, name):
    out = tmp_path / name
    reference = tmp_path / "plain.h5"
    extract([folder], reference, config=CONFIG)
    extract([folder], out, config=CONFIG)
    data = read_features(out)
    assert not np.isnan(data.features).any()
    np.testing.assert_allclose(data.features, read_features(reference).features, rtol=1e-6)
    merged = tmp_path / ("m" + name)
    merge(out, merged)
    np.testing.assert_allclose(read_features(merged).features, data.features, rtol=0)


@pytest.mark.slow
def test_long_output_names(tmp_path, folder):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    fits = tmp_path / ("n" * (limit - len(".shards") - 3) + ".h5")
    extract([folder], fits, config=CONFIG)
    assert len(read_features(fits).paths) == 6
    too_long = tmp_path / ("n" * (limit - 5) + ".h5")
    with pytest.raises(ConfigError, match="bytes"):
        extract([folder], too_long, config=CONFIG)


def test_non_utf8_output_name_is_refused_before_anything_is_written(tmp_path, folder):
    out = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9.h5")))
    with pytest.raises(ConfigError, match="UTF-8"):
        extract([folder], out, config=CONFIG)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


# ----------------------------------------------------------------------------- resume


@pytest.mark.slow
def test_resume_with_another_folder_of_the_same_names_recomputes(tmp_path):
    """Same relative names, sizes and times (as after ``cp -p`` or ``tar x``), other pixels."""
    first, other = tmp_path / "first", tmp_path / "other"
    first.mkdir()
    other.mkdir()
    for i in range(4):  # BMP: the file size depends on the image size only
        Image.fromarray(photo(40, 48, seed=i)).save(first / f"img_{i}.bmp")
        Image.fromarray(photo(40, 48, seed=50 + i)).save(other / f"img_{i}.bmp")
        shutil.copystat(first / f"img_{i}.bmp", other / f"img_{i}.bmp")
    out = tmp_path / "out.h5"
    extract([first], out, config=CONFIG)
    result = extract([other], out, config=CONFIG, mode="resume")
    assert result.processed == 4
    alone = tmp_path / "alone.h5"
    extract([other], alone, config=CONFIG)
    np.testing.assert_allclose(
        read_features(out).features, read_features(alone).features, rtol=1e-5
    )


@pytest.mark.slow
def test_resume_picks_the_newest_run_whatever_the_clock_says(tmp_path, folder):
    out = tmp_path / "out.h5"
    extract([folder], out, config=CONFIG)
    root = shards_root(out)
    (first,) = root.glob("run-*")
    # an older run folder whose time stamp sorts later (a time-zone change, say)
    older = root / "run-99991231-235959-1"
    older.mkdir()
    shutil.copy(first / "run.toml", older / "run.toml")
    result = extract([folder], out, config=CONFIG, mode="resume")
    assert result.processed == 0


def test_api_takes_one_folder_as_a_string(tmp_path, folder):
    result = extract(str(folder), tmp_path / "out.h5", config=CONFIG)
    assert result.images == 6


# ----------------------------------------------------------------------------- interrupted


@pytest.mark.slow
def test_interrupted_run_leaves_a_partial_output_marked_incomplete(tmp_path, folder):
    for i in range(6, 14):
        Image.fromarray(photo(40, 40, seed=i)).save(folder / f"img_{i}.png")
    out = tmp_path / "out.h5"
    config = tmp_path / "fast.toml"
    config.write_text("commit_seconds = 0.01\n")
    process = _cli("slow:0.3", folder, "-o", out, "--config", config, wait=False)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(shards_root(out).glob("run-*/a*.h5")):
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143, stderr
    data = read_features(out)
    assert data.complete is False and 0 < len(data.paths) < 14
    assert not np.isnan(data.features).any()
    from spp_extract.inspection import summary

    assert any("INCOMPLETE" in line for line in summary(out))
    assert _cli("none", folder, "-o", out, "--resume").returncode == 0
    data = read_features(out)
    assert data.complete is True and len(data.paths) == 14


# ----------------------------------------------------------------------------- folders


@pytest.mark.slow
def test_rows_of_a_folder_that_cannot_be_listed_this_time_are_kept(tmp_path, folder, monkeypatch):
    sub = folder / "sub"
    sub.mkdir()
    Image.fromarray(photo(30, 30, seed=9)).save(sub / "inner.png")
    out = tmp_path / "out.h5"
    extract([folder], out, config=CONFIG)
    before = keyed(out)["rows"]
    refuse_listing(monkeypatch, "sub")
    result = extract([folder], out, config=CONFIG, mode="resume")
    data = read_features(out)
    assert "sub/inner.png" in data.paths
    np.testing.assert_allclose(
        data.features[data.paths.index("sub/inner.png")], before["sub/inner.png"]
    )
    assert "sub" in data.failed_paths and result.failed == 1
