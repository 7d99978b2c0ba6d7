"""Never lose work: kills at chosen moments, signals, disk full, resume, overwrite, locking."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_same, crash_cli, fast_commits, keyed, photo
from PIL import Image

from spp_extract import Config, ConfigError, OutputError, extract, read_features
from spp_extract.rundir import OutputLock
from spp_extract.storage import shards_root

pytestmark = pytest.mark.slow  # every test runs models or starts processes (> 1 s each)

FAILED = ["broken.jpg"]
ARGS = ["--backbone", "resnet18", "--weights", "none", "--workers", "0", "--batch-size", "2", "-q"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, example_dir: Path) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    shutil.copytree(example_dir, folder, dirs_exist_ok=True)
    for i in range(8):
        Image.fromarray(photo(48 + 8 * i, 64, seed=100 + i)).save(folder / f"extra_{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    return folder


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, inputs: Path) -> dict:
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    assert _cli("none", inputs, out).returncode == 0
    return keyed(out)


def _cli(fault: str, inputs: Path, out: Path, *extra: str, wait: bool = True):
    # not waited for: its own process group, like a job in a terminal
    return crash_cli(
        fault,
        "extract",
        inputs,
        "-o",
        out,
        *ARGS,
        "--config",
        fast_commits(out.parent),
        *extra,
        wait=wait,
        new_session=not wait,
    )


@pytest.mark.parametrize(
    "fault",
    [
        "kill-in-commit:1",
        "kill-in-put:1",
        "kill-after-commit:1",
        "kill-in-commit:4",
        "kill-after-commit:6",
        "kill-in-put:7",
        "kill-in-assemble",
    ],
)
def test_sigkill_then_resume_equals_uninterrupted_run(tmp_path, inputs, reference, fault):
    out = tmp_path / "out.h5"
    killed = _cli(fault, inputs, out)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not out.exists()
    resumed = _cli("none", inputs, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same(keyed(out), reference, FAILED)
    assert not list(out.parent.glob("*.tmp")) and not list(shards_root(out).rglob("*.tmp"))


def test_repeated_kills_then_resume(tmp_path, inputs, reference):
    out = tmp_path / "out.h5"
    for fault in ["kill-after-commit:2", "kill-in-commit:2", "kill-after-commit:3"]:
        extra = ["--resume"] if shards_root(out).exists() else []
        assert _cli(fault, inputs, out, *extra).returncode == -signal.SIGKILL
    assert _cli("none", inputs, out, "--resume").returncode == 0
    assert_same(keyed(out), reference, FAILED)


@pytest.mark.parametrize(
    "signum, code, workers, group",
    [
        (signal.SIGINT, 130, "0", False),
        (signal.SIGTERM, 143, "0", False),
        (signal.SIGINT, 130, "2", True),
    ],  # Ctrl-C in a terminal: the decode workers get it too
)
def test_signal_stops_keeps_work_and_resumes(
    tmp_path, inputs, reference, signum, code, workers, group
):
    out = tmp_path / "out.h5"
    process = _cli("slow:0.15", inputs, out, "--workers", workers, wait=False)
    root = shards_root(out)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not list(root.glob("run-*/a*.h5")):
        time.sleep(0.05)
    assert list(root.glob("run-*/a*.h5")), "no shard committed in time"
    sent = time.monotonic()
    if group:
        os.killpg(process.pid, signum)
    else:
        process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - sent < 10
    assert process.returncode == code, stderr
    assert "--resume" in stderr and "committed" in stderr
    resumed = _cli("none", inputs, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same(keyed(out), reference, FAILED)


def test_disk_full_stops_cleanly_and_resumes(tmp_path, inputs, reference):
    out = tmp_path / "out.h5"
    full = _cli("enospc-in-put:5", inputs, out)
    assert full.returncode == 1
    lines = full.stderr.strip().splitlines()
    assert len(lines) == 1 and "disk is full" in lines[0] and "--resume" in lines[0]
    assert _cli("none", inputs, out, "--resume").returncode == 0
    assert_same(keyed(out), reference, FAILED)


def test_real_full_tmpfs(tmp_path, inputs):
    mount = tmp_path / "small"
    mount.mkdir()
    if (
        os.geteuid() != 0
        or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mount)], capture_output=True
        ).returncode
    ):
        pytest.skip("needs root and tmpfs mounts")
    try:
        result = _cli("none", inputs, mount / "out.h5")
        assert result.returncode == 1, result.stderr
        assert "disk is full" in result.stderr or "cannot write" in result.stderr
        assert all(p.stat().st_size > 0 for p in shards_root(mount / "out.h5").rglob("a*.h5"))
        for shard in shards_root(mount / "out.h5").rglob("a*.h5"):
            import h5py

            with h5py.File(shard, "r") as f:  # every committed shard opens and is complete
                assert f["status"].shape[0] == f["features"].shape[0]
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_resume_without_output_starts_and_existing_output_is_refused(tmp_path, inputs):
    out = tmp_path / "out.h5"
    config = Config(backbone="resnet18", weights="none", workers=0)
    first = extract([inputs], out, config=config, mode="resume")
    assert first.processed == first.images + first.failed
    with pytest.raises(ConfigError, match="already exists"):
        extract([inputs], out, config=config)
    again = extract([inputs], out, config=config, mode="resume")
    assert again.processed == 0 and again.images == first.images


def test_resume_with_other_settings_lists_differences(tmp_path, inputs):
    out = tmp_path / "out.h5"
    extract([inputs], out, config=Config(backbone="resnet18", weights="none", workers=0))
    other = Config(backbone="resnet18", weights="none", workers=0, levels=(2, 1), pooling="avg")
    with pytest.raises(ConfigError) as info:
        extract([inputs], out, config=other, mode="resume")
    message = str(info.value)
    assert "levels: [4, 2, 1] -> [2, 1]" in message and "pooling: 'max' -> 'avg'" in message
    # settings that do not change the vectors may differ
    extract(
        [inputs],
        out,
        config=Config(backbone="resnet18", weights="none", workers=0, batch_size=1),
        mode="resume",
    )


def test_incremental_new_and_changed_files(tmp_path, inputs):
    folder = tmp_path / "in"
    shutil.copytree(inputs, folder)
    out = tmp_path / "out.h5"
    config = Config(backbone="resnet18", weights="none", workers=0)
    first = extract([folder], out, config=config)
    Image.fromarray(photo(50, 50, seed=7)).save(folder / "new.png")
    Image.fromarray(photo(60, 40, seed=8)).save(folder / "landscape.jpg")  # changed content
    old = dict(zip(read_features(out).paths, read_features(out).features, strict=True))
    result = extract([folder], out, config=config, mode="resume")
    assert result.processed == 2 and result.images == first.images + 1
    data = read_features(out)
    assert data.paths.count("landscape.jpg") == 1
    row = data.paths.index("landscape.jpg")
    assert tuple(data.image_size[row]) == (60, 40)
    assert not np.allclose(data.features[row], old["landscape.jpg"])
    (folder / "new.png").unlink()
    extract([folder], out, config=config, mode="resume")
    assert "new.png" not in read_features(out).paths  # rows follow the current inputs


def test_retry_failed(tmp_path, inputs):
    out = tmp_path / "out.h5"
    config = Config(backbone="resnet18", weights="none", workers=0, max_pixels=5000)
    first = extract([inputs], out, config=config)
    assert first.failed > 1
    same = extract([inputs], out, config=config.replace(max_pixels=10**8), mode="resume")
    assert same.processed == 0 and same.failed == first.failed
    retried = extract(
        [inputs], out, config=config.replace(max_pixels=10**8), mode="resume", retry_failed=True
    )
    assert retried.processed == first.failed and retried.failed == 1  # broken.jpg stays broken


def test_second_writer_is_refused(tmp_path, inputs):
    out = tmp_path / "out.h5"
    lock = OutputLock(out)
    lock.acquire()
    try:
        for mode in ("new", "resume"):
            with pytest.raises(OutputError, match="another spp-extract run"):
                extract(
                    [inputs],
                    out,
                    config=Config(backbone="resnet18", weights="none", workers=0),
                    mode=mode,
                )
    finally:
        lock.release()


def test_overwrite_keeps_old_file_usable_until_the_new_run_finishes(tmp_path, inputs, reference):
    out = tmp_path / "out.h5"
    assert _cli("none", inputs, out).returncode == 0
    assert (
        _cli("kill-after-commit:3", inputs, out, "--overwrite", "--levels", "2,1").returncode == -9
    )
    assert_same(keyed(out), reference, FAILED)  # still the old, complete result
    assert len(list(shards_root(out).glob("run-*"))) == 2
    assert _cli("none", inputs, out, "--overwrite", "--levels", "2,1").returncode == 0
    assert read_features(out).features.shape[1] == 512 * 5
    assert len(list(shards_root(out).glob("run-*"))) == 1


def test_missing_shard_is_an_error_never_fill_values(tmp_path, inputs):
    out = tmp_path / "out.h5"
    extract(
        [inputs],
        out,
        # batches of 2: several shards (a first window is two batches)
        config=Config(
            backbone="resnet18", weights="none", workers=0, commit_seconds=0.01, batch_size=2
        ),
    )
    victim = sorted(shards_root(out).rglob("a*.h5"))[1]
    victim.unlink()
    with pytest.raises(OutputError, match="missing"):
        read_features(out)
