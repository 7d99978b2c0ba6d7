"""The class, not the instances: generated output names, and kills at random moments of
incremental runs, each checked against a plain uninterrupted run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_same, crash_cli, fast_commits, keyed, photo
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from spp_extract import Config, ConfigError, extract, merge, read_features
from spp_extract.storage import shards_root

CONFIG = Config(backbone="resnet18", weights="none", workers=0, batch_size=2, levels=(2, 1))


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> tuple[Path, np.ndarray]:
    folder = tmp_path_factory.mktemp("small")
    for i in range(2):
        Image.fromarray(photo(24, 32, seed=i)).save(folder / f"{i}.png")
    out = tmp_path_factory.mktemp("ref") / "ref.h5"
    extract([folder], out, config=CONFIG)
    return folder, read_features(out).features


NAME_CHARS = st.characters(codec="utf-8", exclude_characters="/\x00")


@pytest.mark.slow
@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    name=st.text(NAME_CHARS, min_size=1, max_size=40),
    suffix=st.sampled_from([".h5", "", ".H5", ".%b"]),
)
def test_any_output_name_works_or_is_refused_before_writing(tmp_path_factory, small, name, suffix):
    folder, reference = small
    directory = tmp_path_factory.mktemp("names")
    out = directory / (name + suffix)
    if name in (".", "..") or (name + suffix) in (".", ".."):
        return
    try:
        extract([folder], out, config=CONFIG)
    except ConfigError:
        assert sorted(os.listdir(directory)) == [], "a refusal wrote something"
        return
    data = read_features(out)
    np.testing.assert_allclose(data.features, reference, rtol=1e-6)
    merged = directory / "merged.h5"
    if out != merged:
        merge(out, merged)
        np.testing.assert_allclose(read_features(merged).features, reference, rtol=0)
    assert not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


FAULTS = ["kill-in-commit", "kill-after-commit", "kill-in-put", "kill-in-assemble"]


def _cli(fault: str, folder: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return crash_cli(
        fault,
        "extract",
        folder,
        "-o",
        out,
        "--backbone",
        "resnet18",
        "--weights",
        "none",
        "--workers",
        "0",
        "--batch-size",
        "2",
        "--levels",
        "2,1",
        "-q",
        "--config",
        fast_commits(out.parent),
        *extra,
    )


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kills_at_random_moments_of_incremental_runs(tmp_path, seed):
    """Extract, then grow, change and shrink the folder and resume, killing the resumes at
    random moments: the end result equals one uninterrupted run over the final folder."""
    rng = random.Random(seed)
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(photo(24 + 4 * i, 32, seed=i)).save(folder / f"a_{i}.png")
    out = tmp_path / "out.h5"
    assert _cli("none", folder, out).returncode == 0
    for step in range(2):
        for i in range(rng.randint(1, 4)):  # new images
            Image.fromarray(photo(28, 20 + 4 * i, seed=100 * step + i)).save(
                folder / f"n{step}_{i}.png"
            )
        victim = rng.choice(sorted(folder.iterdir()))
        Image.fromarray(photo(30, 30, seed=999 + step)).save(victim.with_suffix(".png"))  # changed
        if step == 1:
            rng.choice(sorted(folder.iterdir())).unlink()  # removed
        fault = rng.choice(FAULTS)
        if fault != "kill-in-assemble":
            fault += f":{rng.randint(1, 3)}"
        killed = _cli(fault, folder, out, "--resume")
        assert killed.returncode in (0, -signal.SIGKILL), killed.stderr
        resumed = _cli("none", folder, out, "--resume")
        assert resumed.returncode == 0, resumed.stderr
    reference = tmp_path / "ref" / "ref.h5"
    reference.parent.mkdir()
    assert _cli("none", folder, reference).returncode == 0
    assert_same(keyed(out), keyed(reference), [])
    assert not list(shards_root(out).rglob("*.tmp"))
