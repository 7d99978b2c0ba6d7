"""torchrun on CPU (gloo): rows equal a single-process run; a dead rank is redone on resume."""

import shutil
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
from conftest import (
    CRASH_RUNNER,
    TORCHRUN,
    assert_same,
    crash_cli,
    fast_commits,
    keyed,
    photo,
    run_python,
)
from PIL import Image

from spp_extract import merge, read_features
from spp_extract.storage import shards_root

pytestmark = pytest.mark.slow  # every test runs models or starts processes (> 1 s each)

FAILED = ["broken.png"]
ARGS = ["--backbone", "resnet18", "--weights", "none", "--workers", "0", "--batch-size", "2", "-q"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, example_dir):
    folder = tmp_path_factory.mktemp("dist_inputs")
    shutil.copytree(example_dir, folder, dirs_exist_ok=True)
    for i in range(6):
        Image.fromarray(photo(40 + 16 * i, 72, seed=200 + i)).save(folder / f"more_{i}.png")
    (folder / "broken.png").write_text("not an image")
    return folder


def _run(inputs, out, *extra, fault="none", nproc=2, wait=True, env=None):
    launcher = [*TORCHRUN, f"--nproc-per-node={nproc}"] if nproc else []
    return run_python(
        *launcher,
        CRASH_RUNNER,  # the launcher runs it: no crash_cli here
        fault,
        "--",
        "extract",
        inputs,
        "-o",
        out,
        *ARGS,
        "--config",
        fast_commits(out.parent),
        *extra,
        wait=wait,
        env=env,
        timeout=600,
    )


@pytest.fixture(scope="module")
def single(tmp_path_factory, inputs):
    out = tmp_path_factory.mktemp("single") / "single.h5"
    assert _run(inputs, out, nproc=0).returncode == 0
    return keyed(out)


def test_two_ranks_equal_one_process_and_merge_equals_view(tmp_path, inputs, single):
    out = tmp_path / "out.h5"
    result = _run(inputs, out)
    assert result.returncode == 0, result.stderr
    assert_same(keyed(out), single, FAILED)
    shards = sorted(p.name for p in shards_root(out).rglob("a*.h5"))
    assert any("-r0000-" in s for s in shards) and any("-r0001-" in s for s in shards)
    merged = tmp_path / "merged.h5"
    merge(out, merged)
    with h5py.File(out, "r") as a, h5py.File(merged, "r") as b:
        assert a["features"].is_virtual and not b["features"].is_virtual
        np.testing.assert_array_equal(a["features"][:], b["features"][:])
        assert list(a["paths"].asstr()[:]) == list(b["paths"].asstr()[:])
        assert dict(a.attrs)["feature_dim"] == dict(b.attrs)["feature_dim"]
    shutil.rmtree(shards_root(out))
    assert_same(keyed(merged), single, FAILED)  # self-contained


def test_a_dead_rank_is_redone_on_resume(tmp_path, inputs, single):
    out = tmp_path / "out.h5"
    died = _run(inputs, out, fault="rank=1/kill-after-commit:1")
    assert died.returncode != 0
    assert not out.exists() or not read_features(out).complete  # at most a partial view
    assert list(shards_root(out).rglob("a*-r0001-*.h5"))  # rank 1's committed work survived
    resumed = _run(inputs, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same(keyed(out), single, FAILED)


def test_sigterm_under_torchrun_keeps_work(tmp_path, inputs, single):
    """torchrun passes SIGTERM on to its ranks: each stops between batches, keeps what it has
    committed, says how to resume and exits 128 + SIGTERM; --resume then finishes the run."""
    out = tmp_path / "out.h5"
    exits = tmp_path / "exits"
    exits.mkdir()
    process = _run(inputs, out, fault="slow:0.2", wait=False, env={"SPP_TEST_EXIT_DIR": str(exits)})

    def ranks_with_shards() -> set[str]:
        return {
            rank
            for p in shards_root(out).rglob("a*.h5")
            for rank in ("-r0000-", "-r0001-")
            if rank in p.name
        }

    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline and len(ranks_with_shards()) < 2:
        time.sleep(0.05)
    committed = {p: p.read_bytes() for p in shards_root(out).rglob("a*.h5")}
    assert process.poll() is None, f"the run ended before the signal: {process.communicate()[1]}"
    assert len(ranks_with_shards()) == 2, "not every rank committed work in time"
    process.send_signal(signal.SIGTERM)
    try:
        _, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError("torchrun did not stop after SIGTERM") from None
    # Every rank exits 143, as Interrupted defines it; torchrun itself (its agent raises
    # SignalException) exits 1.
    assert {p.name: p.read_text() for p in exits.iterdir()} == {"rank0": "143", "rank1": "143"}, (
        stderr
    )
    assert process.returncode == 1, stderr
    assert stderr.count("interrupted by SIGTERM") == 2, stderr
    assert stderr.count("rerun the same command with --resume") == 2, stderr
    assert "resume with: " in stderr and "--resume" in stderr.split("resume with: ", 1)[1], stderr
    # the work committed before the signal is still there, untouched, and the view says
    # the run is not finished
    assert all(p.read_bytes() == data for p, data in committed.items())
    partial = read_features(out)
    assert not partial.complete and len(partial.paths) < len(single["rows"])
    resumed = _run(inputs, out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert_same(keyed(out), single, FAILED)
    assert all(p.read_bytes() == data for p, data in committed.items())  # reused, not redone


def _ranks_by_hand(inputs, out, *extra, fault="none"):
    """Two ranks started without torchrun (which would kill the survivors of a failed rank),
    so each rank's own exit status and messages can be seen."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    processes = []
    for rank in range(2):
        env = {
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
        }
        processes.append(
            crash_cli(fault, "extract", inputs, "-o", out, *ARGS, *extra, env=env, wait=False)
        )
    results = []
    for process in processes:
        try:
            _, stderr = process.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            for p in processes:
                p.kill()
            raise AssertionError("a rank was left waiting") from None
        results.append((process.returncode, stderr))
    return results


def test_an_error_on_rank0_ends_every_rank_with_one_line(tmp_path, inputs):
    out = tmp_path / "out.h5"
    assert _run(inputs, out).returncode == 0
    shard = sorted(shards_root(out).rglob("a*.h5"))[0]
    shard.write_bytes(b"not an HDF5 file any more")
    started = time.monotonic()
    (code0, err0), (code1, err1) = _ranks_by_hand(inputs, out, "--resume")
    assert time.monotonic() - started < 60
    assert code0 == code1 == 1, (err0, err1)
    lines = err0.strip().splitlines()
    assert len(lines) == 1 and "unreadable" in lines[0] and "--resume" in lines[0], err0
    assert err1.strip() == ""  # rank 0 reports it


def test_a_model_error_on_one_rank_ends_every_rank_with_one_line(tmp_path, inputs):
    """Rank 1 alone cannot build the model (weights missing on its machine): rank 0 must not
    wait for it in a collective; the failing rank says why, once, and every rank exits 2."""
    out = tmp_path / "out.h5"
    started = time.monotonic()
    (code0, err0), (code1, err1) = _ranks_by_hand(inputs, out, fault="build-fails-on-rank:1")
    assert time.monotonic() - started < 60
    assert code0 == code1 == 2, (err0, err1)
    lines = err1.strip().splitlines()
    assert len(lines) == 1 and "w.pt" in lines[0] and "does not exist" in lines[0], err1
    assert err0.strip() == ""  # rank 1 reports it
    assert not out.exists()


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_more_ranks_than_gpus_is_one_line_naming_nproc(monkeypatch, device):
    """Two ranks on a 1-GPU machine: NCCL cannot share a device, so the run refuses up front
    (seen on an H200: 'device cuda:1 does not exist' said nothing of torchrun)."""
    import torch

    from spp_extract import Config
    from spp_extract.devices import Dist, resolve_device
    from spp_extract.errors import ConfigError

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device(Config(device=device), Dist(0, 2, 0, 2)) == torch.device("cuda:0")
    with pytest.raises(ConfigError, match=r"2 ranks on it; use --nproc-per-node=1"):
        resolve_device(Config(device=device), Dist(1, 2, 1, 2))
