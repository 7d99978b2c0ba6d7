"""Trust at the edges: no non-finite vector, no stale read, no noise axis, no crash, in every
command (issue 16). Each test failed on the code before its fix."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import FAST_CONFIG, FAST_FLAGS, cli, one_line, run_python, synthetic
from PIL import Image

from spp_extract import ConfigError, OutputError, extract, read_features
from spp_extract.neighbors import neighbors
from spp_extract.projection import Projection, fit_projection, project_file, reduce
from spp_extract.reader import iter_features
from spp_extract.records import Failure
from spp_extract.storage import shards_root
from spp_extract.view import merge

_run, _one_line = cli, one_line


# ----------------------------------------------------------------------------- 1: non-finite


def test_stored_values_are_cast_and_checked():
    from spp_extract.compute import Vector, stored

    vector = Vector(torch.tensor([1.0, -2.0, 70000.0]), (1, 1))
    overflow = stored(vector, torch.float16)
    assert isinstance(overflow, Failure) and overflow.kind == "non_finite"
    assert "float16 overflow" in overflow.message and "7e+04" in overflow.message
    ok = stored(vector, torch.float32)
    assert isinstance(ok, Vector) and ok.values.dtype == torch.float32
    half = stored(Vector(torch.tensor([1.0, 2.5]), (1, 1)), torch.float16)
    assert isinstance(half, Vector) and half.values.dtype == torch.float16
    for bad, word in ((float("nan"), "NaN"), (float("inf"), "inf")):
        failed = stored(Vector(torch.tensor([1.0, bad]), (1, 1)), torch.float32)
        assert isinstance(failed, Failure) and failed.kind == "non_finite"
        assert word in failed.message and "1 of 2 values" in failed.message


def test_a_non_finite_vector_is_a_failure_row_never_stored(tmp_path):
    """float16 storage of a white picture under a tiny std overflows: that row fails
    (``non_finite``), the black pictures are stored, and no stored value is NaN or inf."""
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        Image.new("RGB", (40 + i, 40), (0, 0, 0)).save(folder / f"black{i}.png")
    Image.new("RGB", (40, 40), (255, 255, 255)).save(folder / "white.png")
    config = FAST_CONFIG.replace(dtype="float16", mean=(0.0, 0.0, 0.0), std=(1e-5,) * 3)
    result = extract([folder], tmp_path / "f.h5", config=config)
    assert (result.images, result.failed) == (3, 1)
    assert result.failures[0][:2] == ("white.png", "non_finite")
    assert "float16 overflow" in result.failures[0][2]
    data = read_features(tmp_path / "f.h5")
    assert np.isfinite(data.features).all() and len(data.paths) == 3
    assert data.failed_paths == ["white.png"]


@pytest.mark.parametrize(
    ("flags", "fix"),
    [
        (["--dtype", "float16"], "use --dtype float32"),
        pytest.param(
            ["--precision", "fp16"],
            "use --precision bf16 or fp32",
            marks=pytest.mark.slow,  # fp16 is emulated on most CPUs
        ),
    ],
    ids=["float16-overflow", "fp16-compute"],
)
def test_a_setting_that_makes_every_vector_non_finite_stops_in_one_line(
    tmp_path, example_dir, flags, fix
):
    config = tmp_path / "tiny_std.toml"
    config.write_text("mean = [0.5, 0.5, 0.5]\nstd = [1e-6, 1e-6, 1e-6]\n")
    out = tmp_path / "f.h5"
    args = ["extract", example_dir, "-o", out, "--backbone", "resnet18", "--weights", "none"]
    line = _one_line(_run(*args, "--workers", "0", "-c", config, *flags), 2)
    assert "non-finite vectors" in line and fix in line and "std = [1e-06" in line
    assert not out.exists() and not shards_root(out).exists()  # nothing kept


# ----------------------------------------------------------------------------- 2: readers


@pytest.fixture
def with_bad_rows(tmp_path, real_h5):
    """A merged copy of the example file in which row 2 is NaN and row 5 holds one inf."""
    path = tmp_path / "bad.h5"
    merge(real_h5, path)
    with h5py.File(path, "r+") as f:
        x = f["features"][:]
        x[2] = np.nan
        x[5, 7] = np.inf
        f["features"][...] = x
    return path


def _brute_force(x: np.ndarray, usable: np.ndarray, k: int) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x = x.astype(np.float64) / np.where(norm > 0, norm, 1)
    sim = x @ x.T
    sim[:, ~usable] = -np.inf
    np.fill_diagonal(sim, -np.inf)
    return np.argsort(-sim, axis=1, kind="stable")[:, :k]


def test_neighbors_leave_non_finite_rows_out_of_every_list(tmp_path, with_bad_rows):
    data = read_features(with_bad_rows)
    usable = np.isfinite(data.features).all(axis=1)
    found = neighbors(with_bad_rows, 3)
    np.testing.assert_array_equal(found.excluded, [2, 5])
    assert not np.isin(found.index, [2, 5]).any()
    assert (found.index[[2, 5]] == -1).all() and (found.similarity[[2, 5]] == 0).all()
    assert np.isfinite(found.similarity).all()
    expected = _brute_force(np.nan_to_num(data.features, posinf=0), usable, 3)
    np.testing.assert_array_equal(found.index[usable], expected[usable])
    result = _run(
        "neighbors", with_bad_rows, "-k", "2", "-o", tmp_path / "nn.h5",
        "--pairs", tmp_path / "p.csv", "--threshold", "-1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "2 rows left out (not finite)" in result.stderr
    assert data.paths[2] in result.stderr
    with h5py.File(tmp_path / "nn.h5") as f:
        np.testing.assert_array_equal(f["neighbors/excluded"][:], [2, 5])
        assert np.isfinite(f["neighbors/similarity"][:]).all()
    text = (tmp_path / "p.csv").read_text()
    assert text.count("\n") > 1 and data.paths[2] not in text and "nan" not in text


def test_reduce_and_projection_treat_non_finite_rows_as_failed(tmp_path, with_bad_rows):
    dest = tmp_path / "r.h5"
    result = _run("reduce", with_bad_rows, dest, "--dim", "4", "--whiten")
    assert result.exit_code == 0, result.output
    fitted = Projection.load(dest)
    assert fitted.settings["sample_non_finite"] == 2 and fitted.settings["sample_rows"] == 10
    source = read_features(with_bad_rows)
    reduced = read_features(dest)
    assert np.isfinite(reduced.features).all() and len(reduced.paths) == len(source.paths) - 2
    assert reduced.paths == [p for i, p in enumerate(source.paths) if i not in (2, 5)]
    moved = dict(zip(reduced.failed_paths, reduced.failed_errors, strict=True))
    assert set(source.failed_paths) | {source.paths[2], source.paths[5]} == set(moved)
    assert "NaN or inf" in moved[source.paths[2]]
    assert reduced.failed_paths == sorted(reduced.failed_paths, key=os.fsencode)
    with h5py.File(dest) as f:
        assert (f["failed/error_class"].asstr()[:] == "non_finite").sum() == 2
        assert f["image_size"].shape[0] == f["features"].shape[0]
    with pytest.raises(ValueError, match="2 vectors hold NaN or inf"):
        fitted(source.features)


# ----------------------------------------------------------------------------- 3: races


def _view_with_two_shards(tmp_path: Path, example_dir: Path) -> Path:
    out = tmp_path / "f.h5"
    extract([example_dir], out, config=FAST_CONFIG.replace(batch_size=2, commit_seconds=0.01))
    with h5py.File(out) as f:
        assert len({m.file_name for m in f["features"].virtual_sources()}) >= 2
    return out


@pytest.mark.slow
def test_readers_racing_overwrite_read_the_old_output_whole(tmp_path, example_dir):
    """A reader holds the view's run folder: ``--overwrite`` replaces the output but leaves
    the folder for a later run to remove, so every reader, merge, reduce and neighbours
    started before it reads the old rows (never the view's NaN fill value)."""
    out = _view_with_two_shards(tmp_path, example_dir)
    old = read_features(out).features
    other = FAST_CONFIG.replace(seed=1)  # other vectors: a stale read cannot pass for new

    def overwrite() -> None:
        extract([example_dir], out, config=other, mode="overwrite")

    blocks = iter_features(out, block_rows=2)
    first = next(blocks)[1]
    overwrite()  # while the reader is half-way
    rest = [block for _, block, _ in blocks]
    np.testing.assert_array_equal(np.concatenate([first, *rest]), old)
    old_runs = sorted(shards_root(out).glob("run-*"))
    assert len(old_runs) == 2, "the old run folder is kept while it is read"
    fresh = read_features(out).features
    assert not np.array_equal(fresh, old)

    # merge, reduce and neighbours, each racing an overwrite in the middle of its reading
    import spp_extract.outputs as outputs

    for name, command in (
        ("merge", lambda: merge(out, tmp_path / "m.h5")),
        ("reduce", lambda: reduce(out, tmp_path / "r.h5", dim=3)),
        ("neighbors", lambda: neighbors(out, 2)),
    ):
        before = read_features(out).features
        real_read, calls = outputs.OutputFile.read, []

        def read(self, start, stop, real_read=real_read, calls=calls):  # noqa: ANN001, ANN202
            if not calls:
                calls.append(1)
                overwrite()
            return real_read(self, start, stop)

        outputs.OutputFile.read = read
        try:
            result = command()
        finally:
            outputs.OutputFile.read = real_read
        assert calls, name
        if name == "merge":
            np.testing.assert_array_equal(read_features(tmp_path / "m.h5").features, before)
        elif name == "reduce":
            assert np.isfinite(read_features(tmp_path / "r.h5").features).all()
        else:
            assert np.isfinite(result.similarity).all() and (result.index >= 0).all()
    # a later run removes the folders no reader holds any more
    extract([example_dir], out, config=other, mode="overwrite")
    assert len(list(shards_root(out).glob("run-*"))) == 1


def test_a_shard_removed_under_a_reader_is_an_error_not_nan(tmp_path, example_dir):
    out = _view_with_two_shards(tmp_path, example_dir)
    blocks = iter_features(out, block_rows=2)
    next(blocks)
    for shard in sorted(shards_root(out).rglob("a*.h5"))[1:]:  # removed by hand meanwhile
        shard.unlink()
    with pytest.raises(OutputError, match="read as the view's fill value"):
        list(blocks)


# ----------------------------------------------------------------------------- 4: whitening


def test_whitening_never_blows_up_rounding_noise(tmp_path, real_h5):
    """16 rows, 4 of them the same vector (12 others in a 12-d affine subspace): the centred
    sample's rank is 12, so whitening to 14 axes keeps 12 (a note says so); the projection of
    held-out rows keeps their neighbours."""
    rng = np.random.default_rng(0)
    d = 256
    basis = np.linalg.qr(rng.standard_normal((d, 12)))[0]
    train = rng.standard_normal((12, 12)) * np.linspace(3, 1, 12) @ basis.T + 5
    same = np.repeat(rng.standard_normal((1, d)) * 0.01 + 5, 4, axis=0)
    x = np.vstack([train, same]).astype(np.float32)
    src = synthetic(tmp_path / "x.h5", x, real_h5)
    result = _run("reduce", src, tmp_path / "r.h5", "--dim", "14", "--whiten")
    assert result.exit_code == 0, result.output
    rank = np.linalg.matrix_rank(x.astype(np.float64) - x.mean(0, dtype=np.float64))
    assert rank == 12
    assert "rank 12" in result.stderr and "12 axes" in result.stderr
    fitted = Projection.load(tmp_path / "r.h5")
    assert fitted.dim == 12 and fitted.settings["requested_dim"] == 14
    assert fitted.scale.max() / fitted.scale.min() < 100  # no axis scaled by millions
    # held-out rows: two noisy copies of each training row; each copy's nearest neighbour
    # must be its twin, as it is in the original space (noise axes would scramble that)
    copies = np.repeat(train, 2, axis=0) + rng.standard_normal((24, d)) * 0.01
    projected = fitted(copies.astype(np.float32))
    assert (np.abs(np.linalg.norm(projected, axis=1) - 1) < 1e-5).all()

    def nearest(v: np.ndarray) -> np.ndarray:
        v = v / np.linalg.norm(v, axis=1, keepdims=True)
        sim = v @ v.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)

    twins = np.arange(24) ^ 1
    np.testing.assert_array_equal(nearest(copies - copies.mean(0)), twins)
    np.testing.assert_array_equal(nearest(projected), twins)


def test_whitening_identical_rows_is_refused_in_one_line(tmp_path, real_h5):
    x = np.ones((8, 16), np.float32)
    src = synthetic(tmp_path / "x.h5", x, real_h5)
    line = _one_line(_run("reduce", src, tmp_path / "r.h5", "--dim", "2", "--whiten"), 2)
    assert "all the same vector" in line


# ----------------------------------------------------------------------------- 6: embed


@pytest.mark.parametrize("shape", [(3, 0, 10), (3, 10, 0), (3, 0, 0)])
def test_embed_refuses_an_image_without_pixels(shape):
    from spp_extract import create_model

    model = create_model("resnet18", weights="none")
    with pytest.raises(ValueError, match=r"shape \(3, \d+, \d+\) has no pixels"):
        model.embed([torch.zeros(shape, dtype=torch.uint8)])


# ----------------------------------------------------------------------------- 7, 8: writers


def _limited(limit: int):  # noqa: ANN202
    """preexec_fn: writes past ``limit`` bytes fail with EFBIG (as on a full disk)."""

    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _cli(*args: object, limit: int | None = None, timeout: float = 300):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.run(
        [sys.executable, "-m", "spp_extract", *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        preexec_fn=_limited(limit) if limit else None,
    )


@pytest.fixture
def big(tmp_path, real_h5):
    """A 2,000-row file: 20 MB of features to write."""
    x = np.random.default_rng(0).random((2000, 2500), dtype=np.float32)
    return synthetic(tmp_path / "big.h5", x, real_h5)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("command", "limit"),
    [
        (["merge", "{src}", "{dst}"], 3 << 20),  # of 20 MB
        (["reduce", "{src}", "{dst}", "--dim", "8"], 40_000),  # of about 100 KB
        (["neighbors", "{src}", "-k", "2", "-o", "{dst}"], 40_000),
    ],
    ids=["merge", "reduce", "neighbors"],
)
def test_a_full_disk_ends_writers_with_one_line_and_no_file(tmp_path, big, command, limit):
    dst = tmp_path / "out" / "dst.h5"
    dst.parent.mkdir()
    args = [a.format(src=big, dst=dst) for a in command]
    result = _cli(*args, limit=limit)
    assert result.returncode == 1, (result.returncode, result.stderr)  # 139: a segfault
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot write" in lines[0] + "disk is full", result.stderr
    assert os.listdir(dst.parent) == [], "a temporary or partial file was left"


@pytest.mark.slow
def test_a_full_disk_during_extract_keeps_committed_shards(tmp_path, example_dir):
    out = tmp_path / "f.h5"
    args = ["extract", example_dir, "-o", out, "--backbone", "resnet18", "--weights", "none"]
    result = _cli(*args, "--batch-size", "1", "-q", limit=200_000)
    assert result.returncode == 1, (result.returncode, result.stderr)
    assert "cannot write" in result.stderr or "disk is full" in result.stderr
    assert not list(shards_root(out).rglob("*.tmp"))


def _slow(tmp_path: Path, *args: object):  # noqa: ANN202
    """The CLI with every block read slowed down; returns (process, marker touched once
    reading has begun)."""
    marker = tmp_path.parent / f"{tmp_path.name}.reading"
    process = run_python(
        Path(__file__).with_name("crash_runner.py"), "slow-read:30", "--", *args,
        env={"SPP_TEST_MARKER": str(marker)}, wait=False,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not marker.exists():
        assert process.poll() is None and time.monotonic() < deadline, process.stderr
        time.sleep(0.05)
    return process


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.parametrize("command", ["merge", "reduce", "neighbors"])
def test_a_signal_ends_writers_cleanly_and_leaves_no_temporary_file(tmp_path, big, command, sig):
    dst = tmp_path / "dst.h5"
    args = {
        "merge": ["merge", big, dst],
        "reduce": ["reduce", big, dst, "--dim", "8"],
        "neighbors": ["neighbors", big, "-k", "2", "-o", dst],
    }[command]
    process = _slow(tmp_path, *args)
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + sig, err
    assert err.strip().splitlines() == [
        f"spp-extract: interrupted by {signal.Signals(sig).name}; nothing was written; "
        "run the command again"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.h5"]


@pytest.mark.slow
def test_a_killed_merge_leaves_a_file_that_the_next_run_removes(tmp_path, big):
    from spp_extract import storage

    dst = tmp_path / "dst.h5"
    process = _slow(tmp_path, "merge", big, dst)
    process.kill()
    process.communicate(timeout=60)
    assert len(list(tmp_path.glob(f"{storage.tmp_prefix(dst)}*"))) == 1
    merge(big, dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.h5", "dst.h5"]


def test_a_temporary_file_being_written_is_never_taken_for_stale(tmp_path):
    from spp_extract import storage

    dst = tmp_path / "x.h5"
    with storage.written_atomically(dst) as fh:
        fh.write(b"partial")
        storage.remove_stale_tmp(dst)  # another run starting meanwhile
        assert len(list(tmp_path.glob(f"{storage.tmp_prefix(dst)}*"))) == 1
    assert dst.read_bytes() == b"partial"


# ----------------------------------------------------------------------------- 9: destinations


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["neighbors", "{src}", "-o", "{tmp}/same.out", "--pairs", "{tmp}/same.out"], "two outputs"),
        (["neighbors", "{src}", "-o", "{src}"], "is the input"),
        (["reduce", "{src}", "{src}", "--dim", "2"], "is the input"),
        (["merge", "{src}", "{src}"], "is the input"),
    ],
    ids=["neighbors-twice", "neighbors-input", "reduce-input", "merge-input"],
)  # fmt: skip
def test_an_output_that_is_another_output_or_an_input_is_refused(tmp_path, real_h5, args, fragment):
    src = tmp_path / "src.h5"
    merge(real_h5, src)
    before = src.read_bytes()
    line = _one_line(_run(*[a.format(src=src, tmp=tmp_path) for a in args], "--overwrite"), 2)
    assert fragment in line
    assert src.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.h5"]


def test_python_merge_replaces_an_existing_file_only_when_asked(tmp_path, real_h5):
    dest = tmp_path / "m.h5"
    dest.write_text("mine")
    with pytest.raises(ConfigError, match="overwrite=True"):
        merge(real_h5, dest)
    assert dest.read_text() == "mine"
    assert merge(real_h5, dest, overwrite=True) == len(read_features(real_h5).paths)


# ----------------------------------------------------------------------------- 10: bad files


def _copy_with(tmp_path: Path, real_h5: Path, change) -> Path:  # noqa: ANN001
    path = tmp_path / "bad.h5"
    merge(real_h5, path)
    with h5py.File(path, "r+") as f:
        change(f)
    return path


def _replace(f: h5py.File, name: str, **kwargs) -> None:  # noqa: ANN003
    del f[name]
    f.create_dataset(name, **kwargs)


CHANGES = {
    "1-d features": lambda f: _replace(f, "features", data=np.zeros(5, np.float32)),
    "failed is a dataset": lambda f: (f.__delitem__("failed"), f.create_dataset("failed", data=[1])),
    "0 columns": lambda f: _replace(f, "features", shape=(f["paths"].shape[0], 0), dtype="f4"),
    "short paths": lambda f: _replace(f, "paths", data=["a.jpg"], dtype=h5py.string_dtype()),
    "integer features": lambda f: _replace(f, "features", data=np.zeros((f["paths"].shape[0], 4), int)),
    "declared too large": lambda f: (
        f.__delitem__("features"),
        f.__delitem__("paths"),
        f.create_dataset("features", shape=(2**31, 10752), dtype="f4", chunks=(1, 10752)),
        f.create_dataset("paths", shape=(2**31,), dtype=h5py.string_dtype(), chunks=(1024,)),
    ),
}  # fmt: skip


@pytest.mark.parametrize("change", CHANGES.values(), ids=CHANGES.keys())
@pytest.mark.parametrize(
    "command",
    [
        ["inspect", "{src}"],
        ["merge", "{src}", "{tmp}/m.h5"],
        ["neighbors", "{src}", "-k", "1", "-o", "{tmp}/n.h5"],
        ["reduce", "{src}", "{tmp}/r.h5", "--dim", "1"],
    ],
    ids=["inspect", "merge", "neighbors", "reduce"],
)
def test_a_file_that_only_looks_like_an_output_is_refused_in_one_line(
    tmp_path, real_h5, change, command
):
    src = _copy_with(tmp_path, real_h5, change)
    started = time.monotonic()
    line = _one_line(_run(*[a.format(src=src, tmp=tmp_path) for a in command]), 2)
    assert "not a well-formed spp-extract file" in line
    assert time.monotonic() - started < 30
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.h5"]
    with pytest.raises(ConfigError, match="not a well-formed"):
        read_features(src)
    with pytest.raises(ConfigError, match="not a well-formed"):
        next(iter_features(src))


def test_merge_checks_free_space_before_writing(tmp_path, real_h5, monkeypatch):
    import shutil

    from spp_extract import storage

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(storage.shutil, "disk_usage", lambda _p: usage._replace(free=10_000))
    line = _one_line(_run("merge", real_h5, tmp_path / "m.h5"), 1)
    assert "disk is full" in line and "nothing was written" in line
    assert not (tmp_path / "m.h5").exists()


# ----------------------------------------------------------------------------- 11, 12: budgets


def _budget_of(message: str) -> str:
    return message.split("give max_memory at least ")[1].replace(" ", "")


@pytest.mark.slow
def test_too_large_names_the_smallest_budget_that_works(tmp_path):
    """300x400 through resnet18 under 60 MB: the message's budget runs it (whole or tiled),
    and 1 MB less is refused again."""
    from spp_extract.rules import memory_size

    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (300, 400, 3), np.uint8)).save(
        folder / "a.png"
    )

    def run(budget: str):  # noqa: ANN202
        return extract(
            [folder], tmp_path / f"{budget}.h5", config=FAST_CONFIG.replace(max_memory=budget)
        )

    refused = run("60MB")
    assert refused.failed == 1 and refused.failures[0][1] == "too_large"
    needed = _budget_of(refused.failures[0][2])
    assert run(needed).failed == 0
    less = f"{(memory_size(needed) - 1_000_000) // 1_000_000}MB"
    assert run(less).failed == 1


@pytest.mark.slow
def test_thin_panoramas_under_a_tiny_budget_are_refused_at_once(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (1, 20000, 3), np.uint8)).save(folder / f"{i}.png")
    started = time.monotonic()
    result = extract([folder], tmp_path / "f.h5", config=FAST_CONFIG.replace(max_memory="1MB"))
    assert time.monotonic() - started < 30
    assert result.failed == 3 and all(f[1] == "too_large" for f in result.failures)
    assert "a call per tile" in result.failures[0][2]
    needed = _budget_of(result.failures[0][2])
    ok = extract([folder], tmp_path / "g.h5", config=FAST_CONFIG.replace(max_memory=needed))
    assert ok.failed == 0


def test_fit_projection_alone_leaves_non_finite_rows_out(tmp_path, with_bad_rows):
    fitted = fit_projection(with_bad_rows, dim=3)
    assert fitted.settings["sample_non_finite"] == 2
    assert project_file(with_bad_rows, tmp_path / "p.h5", fitted) == 10


# ----------------------------------------------------------------------------- the second attack
# (an outside review of the fixes above found these; each test failed before its fix)


@pytest.fixture
def merged(tmp_path, real_h5):
    path = tmp_path / "m.h5"
    merge(real_h5, path)
    return path


def test_huge_finite_vectors_give_the_right_neighbours_and_no_inf(tmp_path, merged):
    """Values whose squares overflow float32 (a broken weights file): normalised without
    overflow, so neighbours are the float64 ones; reduce stays finite; a projection refuses
    what it cannot hold."""
    with h5py.File(merged, "r+") as f:
        x = f["features"][:].astype(np.float64) * 1e18
        f["features"][...] = x.astype(np.float32)
    found = neighbors(merged, 3)
    expected = _brute_force(x, np.ones(len(x), bool), 3)
    np.testing.assert_array_equal(found.index, expected)
    assert (found.similarity > 0).all()
    fitted = reduce(merged, tmp_path / "r.h5", dim=4)
    reduced = read_features(tmp_path / "r.h5")
    assert np.isfinite(reduced.features).all() and np.isfinite(fitted.explained_variance).all()
    with pytest.raises(ValueError, match="project beyond float32"):
        fitted(x.astype(np.float32) * 1e19)


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("mean", np.nan, "reduce/mean holds NaN or inf"),
        ("scale", 0.0, "reduce/scale holds values <= 0"),
    ],
)
def test_a_projection_with_broken_values_is_refused(tmp_path, merged, name, value, fragment):
    reduce(merged, tmp_path / "r.h5", dim=3, whiten=True)
    with h5py.File(tmp_path / "r.h5", "r+") as f:
        f[f"reduce/{name}"][0] = value
    with pytest.raises(ConfigError, match=fragment):
        Projection.load(tmp_path / "r.h5")


def test_a_renamed_views_shards_are_never_a_destination(tmp_path, example_dir):
    out = tmp_path / "rn.h5"
    extract([example_dir], out, config=FAST_CONFIG)
    renamed = tmp_path / "renamed.h5"
    out.rename(renamed)  # the docs say renaming the output alone is fine
    shard = sorted(shards_root(out).rglob("a*.h5"))[0]
    before = read_features(renamed).features
    line = _one_line(_run("merge", renamed, shard, "--overwrite"), 2)
    assert "inside its shards folder" in line
    np.testing.assert_array_equal(read_features(renamed).features, before)


def test_the_projection_file_is_never_the_runs_full_output(tmp_path, merged, example_dir):
    reduce(merged, tmp_path / "q.h5.full.h5", dim=3)
    before = (tmp_path / "q.h5.full.h5").read_bytes()
    args = ["extract", example_dir, "-o", tmp_path / "q.h5", *FAST_FLAGS]
    line = _one_line(_run(*args, "--project", tmp_path / "q.h5.full.h5", "--overwrite"), 2)
    assert "is the input" in line
    assert (tmp_path / "q.h5.full.h5").read_bytes() == before


def _rep(f: h5py.File, name: str, data: object) -> None:
    del f[name]
    f.create_dataset(name, data=data)


BROKEN = {
    "image_size as text": lambda f, n: _rep(f, "image_size", np.array([[b"a", b"b"]] * n)),
    "tiles as text": lambda f, n: _rep(f, "tiles", np.array([b"x"] * n)),
    "failures as numbers": lambda f, n: _rep(
        f, "failed/error_class", np.zeros(f["failed/paths"].shape[0], np.int32)
    ),
    "features in long double": lambda f, n: _rep(
        f, "features", f["features"][:].astype(np.longdouble)
    ),
    "mean of NaN": lambda f, n: f.attrs.__setitem__("mean", np.array([np.nan, 1.0, 1.0])),
}


@pytest.mark.parametrize("change", BROKEN.values(), ids=BROKEN.keys())
@pytest.mark.parametrize("command", ["inspect", "neighbors"])
def test_datasets_of_the_wrong_type_are_refused_in_one_line(merged, change, command):
    with h5py.File(merged, "r+") as f:
        change(f, f["paths"].shape[0])
    args = [merged] if command == "inspect" else [merged, "-k", "1", "-o", merged.parent / "n.h5"]
    assert "not a well-formed" in _one_line(_run(command, *args), 2)


def test_paths_that_are_not_utf8_are_read_with_replacements(merged):
    with h5py.File(merged, "r+") as f:
        raw = np.array([b"ok.jpg", b"caf\xe9.jpg"] * (f["paths"].shape[0] // 2))
        del f["paths"]
        f.create_dataset("paths", data=raw, dtype=h5py.string_dtype("utf-8", None))
    assert "caf\ufffd.jpg" in read_features(merged).paths
    assert _run("inspect", merged).exit_code == 0


VIEW_DAMAGE = {
    "a shard holding nothing": "empty",
    "fill value 0": "fill",
    "another dataset mapped": "name",
    "more rows declared than mapped": "rows",
}


def _damaged_view(tmp_path: Path, example_dir: Path, damage: str) -> Path:
    out = _view_with_two_shards(tmp_path, example_dir)
    shard = sorted(shards_root(out).rglob("a*.h5"))[-1]
    if damage == "empty":
        with h5py.File(shard, "r+") as f:
            shape, chunks = f["features"].shape, f["features"].chunks
            del f["features"]
            f.create_dataset("features", shape=shape, dtype="f4", chunks=chunks)
        return out
    with h5py.File(out, "r+") as f:
        ds = f["features"]
        rows, dim = ds.shape
        maps = list(ds.virtual_sources())
        del f["features"]
        declared = rows + 6 if damage == "rows" else rows
        layout = h5py.VirtualLayout(shape=(declared, dim), dtype="f4")
        for m in maps:
            (first, _), (last, _) = m.src_space.get_select_bounds()
            (start, _), _ = m.vspace.get_select_bounds()
            name = "nope" if damage == "name" else "features"
            source = h5py.VirtualSource(m.file_name, name, shape=(last + 1, dim))
            layout[start : start + last + 1 - first] = source[first : last + 1]
        f.create_virtual_dataset("features", layout, fillvalue=0.0 if damage == "fill" else np.nan)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("damage", VIEW_DAMAGE.values(), ids=VIEW_DAMAGE.keys())
def test_views_that_would_read_zeros_are_refused(tmp_path, example_dir, damage):
    out = _damaged_view(tmp_path, example_dir, damage)
    result = _run("neighbors", out, "-k", "2", "-o", tmp_path / "n.h5")
    assert result.exit_code in (1, 2) and len(result.stderr.strip().splitlines()) == 1
    with pytest.raises((ConfigError, OutputError)):
        read_features(out)


def test_a_nan_row_stored_in_a_view_is_a_row_that_is_not_finite(tmp_path, example_dir):
    out = _view_with_two_shards(tmp_path, example_dir)
    shard = sorted(shards_root(out).rglob("a*.h5"))[0]
    with h5py.File(shard, "r+") as f:
        f["features"][0] = np.nan  # as an older version could have stored it
    found = neighbors(out, 2)
    assert len(found.excluded) == 1 and np.isfinite(found.similarity).all()


def test_a_random_init_does_not_depend_on_other_threads_drawing_random_numbers():
    import threading

    from spp_extract import create_model

    pictures = [torch.randint(0, 256, (3, 40 + i, 50), dtype=torch.uint8) for i in range(2)]
    alone = create_model("resnet18", weights="none").embed(pictures)
    stop = threading.Event()

    def noise() -> None:
        while not stop.is_set():
            torch.rand(1000)

    other = threading.Thread(target=noise)
    other.start()
    try:
        again = [create_model("resnet18", weights="none").embed(pictures) for _ in range(3)]
    finally:
        stop.set()
        other.join()
    for vectors in again:
        torch.testing.assert_close(vectors, alone, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_the_projection_is_written(tmp_path, merged, example_dir, sig):
    reduce(merged, tmp_path / "r.h5", dim=3)
    out = tmp_path / "q.h5"
    args = ["extract", example_dir, "-o", out, *FAST_FLAGS, "--project", tmp_path / "r.h5"]
    process = _slow(tmp_path, *args)  # only the projection reads an spp-extract file
    process.send_signal(sig)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + sig, err
    lines = err.strip().splitlines()
    assert "the full vectors are in q.h5.full.h5" in lines[0] and "--resume" in lines[-1]
    assert not out.exists() and not list(tmp_path.glob(".spp-*"))
