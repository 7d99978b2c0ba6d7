"""Every ``bash`` and ``python`` example of the README runs as written, in document order, in
a folder that holds the checkout's ``examples/`` (as a checkout does), offline: torchvision's
cache (``TORCH_HOME``) holds random weights under the file names torchvision expects, so the
default ``DEFAULT`` weights load as they would for a user. The install and test commands are
the ones CI runs (``.ci/run``), not run again here."""

import os
import re
import subprocess
import sys

import pytest
import torch
from conftest import ROOT
from torchvision.models import get_model, get_model_weights

from spp_extract.weights import expected_cache_file

README = ROOT / "README.md"
BLOCK = re.compile(r"^```(bash|python|text|console)\n(.*?)^```", re.S | re.M)
NOT_RUN_HERE = ("pip install", "python -m pytest")  # CI runs these: checked against .ci/run
WEIGHTS = ("resnet50",)  # the backbones the README runs with DEFAULT weights


def blocks() -> list[tuple[str, str]]:
    found = BLOCK.findall(README.read_text())
    assert found, "no examples found in README.md"
    return [(kind, code) for kind, code in found if kind in ("bash", "python")]


def test_the_readmes_install_and_test_commands_are_what_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    first = blocks()[0][1].splitlines()
    commands = [line.split("#")[0].strip() for line in first]
    for command in commands:
        if command.startswith(NOT_RUN_HERE):
            assert command in [line.strip() for line in ci], command
    assert any(c.startswith("pip install") for c in commands)
    assert any(c == "python -m pytest" for c in commands)


@pytest.mark.slow  # some 30 commands, each a fresh interpreter importing torch (~3 min)
def test_every_example_in_the_readme_runs_as_written(tmp_path, monkeypatch):
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    for name in WEIGHTS:
        cache = expected_cache_file(get_model_weights(name).DEFAULT.url)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        torch.save(get_model(name, weights=None).state_dict(), cache)
    work = tmp_path / "checkout"
    work.mkdir()
    (work / "examples").symlink_to(ROOT / "examples")
    env = {
        **os.environ,
        "TORCH_HOME": str(home),
        "PATH": f"{os.path.dirname(sys.executable)}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(ROOT),
    }
    for number, (kind, code) in enumerate(blocks(), 1):
        if kind == "bash":
            lines = [line for line in code.splitlines() if not line.startswith(NOT_RUN_HERE)]
            args = ["bash", "-euo", "pipefail", "-c", "\n".join(lines)]
        else:
            args = [sys.executable, "-c", code]
        done = subprocess.run(args, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (
            f"README example {number} ({kind}) failed:\n{code}\n"
            f"stdout: {done.stdout[-2000:]}\nstderr: {done.stderr[-3000:]}"
        )
