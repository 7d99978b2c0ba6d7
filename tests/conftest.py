from __future__ import annotations

import errno
import io
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
CRASH_RUNNER = Path(__file__).with_name("crash_runner.py")  # the CLI with a fault injected
TORCHRUN = ("-m", "torch.distributed.run", "--standalone")
sys.path.insert(0, str(ROOT / "examples"))

import h5py  # noqa: E402
from make_examples import make_examples  # noqa: E402
from make_examples import photo as make_examples_photo  # noqa: E402

import spp_extract  # noqa: E402
from spp_extract import Config, images  # noqa: E402
from spp_extract.storage import ROW_FIELDS  # noqa: E402

FAST_CONFIG = Config(backbone="resnet18", weights="none", workers=0)
# The same on the command line (quiet).
FAST_FLAGS = ["--backbone", "resnet18", "--weights", "none", "--workers", "0", "-q"]
_runner = CliRunner()


def cli(*args: object):
    """The CLI in this process (typer's CliRunner); ``result.stderr`` holds its messages."""
    from spp_extract.cli import app

    return _runner.invoke(app, [str(a) for a in args])


def one_line(result, code: int) -> str:  # noqa: ANN001
    """The one stderr line of a command that exited with ``code``."""
    assert result.exit_code == code, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


class Terminal(io.StringIO):
    """A stream that says it is a terminal (progress bars draw only on one)."""

    def isatty(self) -> bool:
        return True


from spp_extract.backbones import Trunk  # noqa: E402


@pytest.fixture(autouse=True)
def _no_downloads(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every test sees an empty torch hub cache and no network for weights."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))

    def refuse(*_args: object, **_kwargs: object) -> None:
        raise OSError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


@pytest.fixture(scope="session")
def example_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("examples")
    make_examples(folder)
    return folder


@pytest.fixture(scope="session")
def real_h5(example_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example photos through resnet18 (random weights): a view over shards."""
    out = tmp_path_factory.mktemp("real") / "features.h5"
    spp_extract.extract([example_dir], out, config=FAST_CONFIG)
    return out


def synthetic(path: Path, features: np.ndarray, template: Path) -> Path:
    """An spp-extract file (merged layout) holding ``features``, attributes and failures
    taken from a real file, per-row datasets made up."""
    n, d = features.shape
    with h5py.File(template, "r") as src, h5py.File(path, "w") as out:
        out.create_dataset("features", data=features)
        names = [f"img{i:05d}.jpg" for i in range(n)]
        out.create_dataset("paths", data=names, dtype=h5py.string_dtype("utf-8"))
        raw = np.empty(n, dtype=object)
        raw[:] = [np.frombuffer(p.encode(), np.uint8) for p in names]
        out.create_dataset("path_bytes", data=raw, dtype=h5py.vlen_dtype(np.dtype("uint8")))
        for name, (dtype, width) in ROW_FIELDS.items():
            shape = (n, width) if width else (n,)
            data = (
                np.full(shape, "RGB", object)
                if name == "mode"
                else np.arange(np.prod(shape)).reshape(shape)
            )
            out.create_dataset(name, data=data, dtype=dtype)
        src.copy(src["failed"], out, name="failed")
        out.attrs.update(src.attrs)
        out.attrs.update(layout="merged", feature_dim=d)
        del out.attrs["shards"]
    return path


def refuse_listing(monkeypatch: pytest.MonkeyPatch, folder_name: str) -> None:
    """Listing a folder whose path ends in ``folder_name`` fails with EACCES (as chmod 000
    does for a normal user; tests run as root, which could still list it)."""
    real_scandir = os.scandir

    def scandir(path="."):  # noqa: ANN001, ANN202
        if os.fspath(path).rstrip("/").endswith(folder_name):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)


def photo(height: int, width: int, seed: int = 0) -> np.ndarray:
    return make_examples_photo(height, width, seed)


def make_extractor(
    trunk: Trunk, config: Config, *, padded: bool = False, budget: int | None = None
):
    """An Extractor on the CPU with the run's decisions, but padded batching and the memory
    budget as the test says."""
    import dataclasses

    from spp_extract.compute import Extractor
    from spp_extract.runtime import Runtime

    runtime = Runtime.resolve(config, trunk, device=torch.device("cpu"))
    return Extractor(trunk, config, dataclasses.replace(runtime, padded=padded, budget=budget))


def loop_spp(x: torch.Tensor, levels: tuple[int, ...], mode: str) -> torch.Tensor:
    """Reference SPP for x: (C, H, W): a plain loop over bins, [floor(i*a/n), ceil((i+1)*a/n))."""
    c, h, w = x.shape
    blocks = []
    for n in levels:
        block = torch.empty(c, n, n, dtype=x.dtype)
        for i in range(n):
            r0, r1 = math.floor(i * h / n), math.ceil((i + 1) * h / n)
            for j in range(n):
                c0, c1 = math.floor(j * w / n), math.ceil((j + 1) * w / n)
                cell = x[:, r0:r1, c0:c1].reshape(c, -1)
                block[:, i, j] = cell.amax(1) if mode == "max" else cell.mean(1)
        blocks.append(block.flatten())
    return torch.cat(blocks)


def reference_vector(
    trunk: Trunk, path: Path, levels: tuple[int, ...], mode: str = "max"
) -> np.ndarray:
    """That image alone: decode, normalise, pad to the trunk's minimum side, trunk, loop SPP."""
    decoded = images.decode(str(path), max_pixels=10**9)
    x = decoded.pixels.float().div(255)
    mean = torch.tensor(trunk.resolved.mean).view(3, 1, 1)
    std = torch.tensor(trunk.resolved.std).view(3, 1, 1)
    x = (x - mean) / std
    _, h, w = x.shape
    padded = torch.zeros(3, max(h, trunk.min_side), max(w, trunk.min_side))
    padded[:, :h, :w] = x
    with torch.inference_mode():
        fmap = trunk.module(padded[None])[0]
    return loop_spp(fmap, levels, mode).numpy()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """||a - b|| / ||b||: only for asserting that two results *differ* by at least so much;
    closeness is checked with assert_vectors_close, which says where and by how much."""
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def assert_vectors_close(
    actual: object, expected: object, rel: float = 1e-4, err_msg: str = ""
) -> None:
    """The tool's documented exactness, ``||actual - expected|| <= rel * ||expected||``, checked
    element by element: ``|a - e| <= rel/2 * |e| + rel/2 * rms(expected)``. Summed over the
    elements that bound implies the norm one, so it is never looser; a failure names the
    elements and the largest differences."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    rms = float(np.sqrt(np.mean(expected**2))) if expected.size else 0.0
    np.testing.assert_allclose(actual, expected, rtol=rel / 2, atol=rel / 2 * rms, err_msg=err_msg)


def run_python(
    *args: object,
    env: dict[str, str] | None = None,
    wait: bool = True,
    new_session: bool = False,
    timeout: float = 300,
    cwd: Path | None = None,
):
    """``python ARGS`` in a fresh interpreter that imports this checkout's spp_extract: the one
    way tests start the CLI (``run_python(CRASH_RUNNER, fault, "--", "extract", ...)``), torchrun
    (``run_python(*TORCHRUN, ...)``) or a snippet (``run_python("-c", code)``).

    wait: run to the end and return the CompletedProcess (stdout and stderr as text); else
    return the Popen at once, stderr piped, stdout inherited. new_session: its own process
    group, like a job in a terminal. env: added to (and overriding) this process's environment.
    cwd: where it runs (``python -m`` puts that folder first on the import path).
    """
    command = [sys.executable, *map(str, args)]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    if not wait:
        return subprocess.Popen(
            command,
            env=full_env,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=new_session,
            cwd=cwd,
        )
    return subprocess.run(
        command,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        start_new_session=new_session,
        cwd=cwd,
    )


def crash_cli(fault: str, *args: object, **kwargs: object):
    """The CLI in a fresh interpreter with ``fault`` injected (see crash_runner.py);
    ``kwargs`` go to run_python."""
    return run_python(CRASH_RUNNER, fault, "--", *args, **kwargs)


def fast_commits(folder: Path) -> Path:
    """A config file that commits a shard per batch: many commits to interrupt."""
    path = folder / "fast.toml"
    path.write_text("commit_seconds = 0.01\n")
    return path


def keyed(out: Path) -> dict:
    """An output's rows by path, checking there are no duplicates and no fill-value rows."""
    from spp_extract import read_features

    data = read_features(out)
    assert len(set(data.paths)) == len(data.paths), "a path appears twice"
    assert not np.isnan(data.features).any(), "fill-value rows"
    return {
        "rows": dict(zip(data.paths, data.features, strict=True)),
        "failed": sorted(data.failed_paths),
    }


def assert_same(got: dict, want: dict, failed: list[str]) -> None:
    """Same paths, vectors within 1e-4 relative, and exactly the expected failures."""
    assert sorted(got["rows"]) == sorted(want["rows"])
    for path, vector in want["rows"].items():
        assert_vectors_close(got["rows"][path], vector, rel=1e-4, err_msg=path)
    assert got["failed"] == want["failed"] == failed
