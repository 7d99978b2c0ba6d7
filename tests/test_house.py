"""The shape of the code (issue 18): a configuration key is declared in one place; modules
import each other without cycles; the one private torch function the loader uses exists."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest
from conftest import ROOT, run_python

PACKAGE = ROOT / "spp_extract"

DUMMY_KEY = """    dummy: int = key(
        0,
        help="A key added in one place by a test.",
        check=rules.integer(0, 9),
        parse=rules.parse_int(),
        metavar="N",
        vectors=True,
    )
"""


@pytest.mark.slow
def test_a_key_declared_once_reaches_the_flags_the_file_and_the_checks(tmp_path, example_dir):
    """Add one field to Config, touching nothing else: the CLI takes ``--dummy``, the output
    records it, a resume with another value is refused, and a bad value is refused."""
    copy = tmp_path / "pkg"
    shutil.copytree(PACKAGE, copy / "spp_extract", ignore=shutil.ignore_patterns("__pycache__"))
    config = copy / "spp_extract" / "config.py"
    text = config.read_text()
    anchor = "    dtype: Dtype = key("
    assert anchor in text
    config.write_text(text.replace(anchor, DUMMY_KEY + anchor, 1))
    env = {"PYTHONPATH": str(copy)}

    def cli(*args: object):  # noqa: ANN202
        return run_python("-m", "spp_extract", *args, env=env, cwd=tmp_path)

    assert "--dummy" in cli("extract", "--help").stdout
    out = tmp_path / "f.h5"
    fast = ["--backbone", "resnet18", "--weights", "none", "--workers", "0", "-q"]
    done = cli("extract", example_dir, "-o", out, *fast, "--dummy", "3")
    assert done.returncode == 0, done.stderr
    read = (
        "import h5py, sys; f = h5py.File(sys.argv[1]); print(f.attrs['dummy'], f.attrs['config'])"
    )
    attrs = run_python("-c", read, out, env=env, cwd=tmp_path).stdout
    assert attrs.startswith("3 ") and "dummy = 3" in attrs
    refused = cli("extract", example_dir, "-o", out, *fast, "--dummy", "4", "--resume")
    assert refused.returncode == 2 and "dummy: 3 -> 4" in refused.stderr
    bad = cli("config", "--dummy", "12")
    assert bad.returncode == 2 and "dummy = 12 is invalid" in bad.stderr


def _imports(path: Path) -> set[str]:
    """The spp_extract modules ``path`` imports, at the top or anywhere (TYPE_CHECKING and
    function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found - {path.stem}


def test_no_import_cycles_even_under_type_checking_or_in_functions():
    modules = {p.stem: _imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    modules = {name: {m for m in deps if m in modules} for name, deps in modules.items()}
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        assert state.get(name) != "open", " -> ".join([*path, name])
        state[name] = "open"
        for dep in sorted(modules[name]):
            visit(dep, [*path, name])
        state[name] = "done"

    for name in sorted(modules):
        visit(name, [])


def test_modules_stay_small_unless_a_comment_says_why():
    for path in PACKAGE.glob("*.py"):
        lines = path.read_text().splitlines()
        if len(lines) > 460:
            assert any("long because" in line for line in lines[:30]), (path.name, len(lines))


def test_the_private_torch_function_the_loader_uses_exists():
    """loader.py calls torch's own check for dead DataLoader workers, a private function: if
    torch renames or moves it, this fails (and so does importing the loader)."""
    from torch.utils.data._utils.signal_handling import _error_if_any_worker_fails

    from spp_extract import loader

    assert loader._error_if_any_worker_fails is _error_if_any_worker_fails
    _error_if_any_worker_fails()  # no workers registered: nothing to report
