"""The command line as a contract: exit codes, one-line messages, nothing written on refusal."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch
from conftest import photo
from PIL import Image
from typer.testing import CliRunner

from spp_extract.cli import app

runner = CliRunner()
FAST = ["--backbone", "resnet18", "--weights", "none", "--workers", "0", "-q"]


def _run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def _nothing_written(folder: Path) -> bool:
    return not any(p.name.startswith("out") for p in folder.iterdir())


def test_help_texts():
    result = _run("--help")
    assert result.exit_code == 0
    for command in ("extract", "backbones", "config", "inspect", "merge"):
        assert command in result.output
    result = _run("extract", "--help")
    assert result.exit_code == 0
    for flag in ("--config", "--backbone", "--layer", "--weights", "--levels", "--pooling",
                 "--batch-size", "--workers", "--device", "--dtype", "--overwrite", "--resume",
                 "--files-from", "--quiet", "--strict", "--retry-failed"):  # fmt: skip
        assert flag in result.output, flag


def test_unknown_backbone_exit_2_one_line_nothing_written(tmp_path, example_dir):
    result = _run("extract", example_dir, "-o", tmp_path / "out.h5", "--backbone", "resnet5")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown backbone 'resnet5'" in lines[0] and "'resnet50'" in lines[0]
    assert _nothing_written(tmp_path)


def test_unknown_config_key_exit_2_nothing_written(tmp_path, example_dir):
    config = tmp_path / "c.toml"
    config.write_text('backbone = "resnet18"\npoolling = "max"\n')
    result = _run("extract", example_dir, "-o", tmp_path / "out.h5", "--config", config)
    assert result.exit_code == 2
    assert "'poolling'" in result.stderr and "line 2" in result.stderr
    assert _nothing_written(tmp_path)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--levels", "4,0"], "distinct positive integers"),
        (["--levels", "2,2"], "distinct positive integers"),
        (["--layer", "layer9"], "unknown layer 'layer9'"),
        (["--weights", "missing.pt"], "neither a file nor a weights name"),
        (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "cuda"),
        (["--pooling", "sum"], "pooling = 'sum' is invalid"),
    ],
)
def test_refusals_exit_2(tmp_path, example_dir, args, fragment):
    result = _run("extract", example_dir, "-o", tmp_path / "out.h5", *FAST, *args)
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert _nothing_written(tmp_path)


def test_no_images_and_unwritable_output(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    result = _run("extract", empty, "-o", tmp_path / "out.h5", *FAST)
    assert result.exit_code == 2 and "no images found" in result.stderr
    result = _run("extract", empty, "-o", tmp_path / "nodir" / "out.h5", *FAST)
    assert result.exit_code == 2 and "does not exist" in result.stderr


def test_unwritable_output_folder(tmp_path, example_dir, monkeypatch):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.geteuid() == 0:  # root may write anywhere: make the permission check say no
        real_access = os.access
        monkeypatch.setattr(os, "access", lambda p, m: False if Path(p) == locked else real_access(p, m))
    result = _run("extract", example_dir, "-o", locked / "out.h5", *FAST)
    assert result.exit_code == 2 and "not writable" in result.stderr
    assert not any(locked.iterdir())


def test_extract_summary_then_existing_output_is_refused(tmp_path, example_dir):
    out = tmp_path / "out.h5"
    result = _run("extract", example_dir, "-o", out, *FAST[:-1])
    assert result.exit_code == 0, result.output
    assert "12 images, 0 failed, 10752-dim vectors" in result.stderr
    before = out.stat().st_mtime_ns
    result = _run("extract", example_dir, "-o", out, *FAST)
    assert result.exit_code == 2 and "--resume" in result.stderr and "--overwrite" in result.stderr
    assert out.stat().st_mtime_ns == before
    result = _run("inspect", out)
    assert result.exit_code == 0 and "12 images, 10752-dim float32" in result.output
    assert 'backbone = "resnet18"' in result.output


def test_hostile_folder_records_failures_and_strict_exits_1(tmp_path, example_dir):
    folder = tmp_path / "in"
    shutil.copytree(example_dir, folder)
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("not a png")
    good = (folder / "landscape.jpg").read_bytes()
    (folder / "cut.jpg").write_bytes(good[: len(good) // 3])
    os.symlink(folder / "vanished.png", folder / "dangling.png")
    Image.fromarray(photo(400, 400)).save(folder / "huge.png")
    out = tmp_path / "out.h5"
    args = ["extract", folder, "-o", out, *FAST, "--max-pixels", "100000"]
    result = _run(*args)
    assert result.exit_code == 0, result.output
    with h5py.File(out, "r") as f:
        failed = dict(zip(f["failed/paths"].asstr()[:], f["failed/error_class"].asstr()[:], strict=True))
        assert failed == {"cut.jpg": "truncated", "dangling.png": "dangling_symlink",
                          "empty.jpg": "empty_file", "huge.png": "too_large",
                          "text.png": "not_an_image"}  # fmt: skip
        assert all(f["failed/errors"].asstr()[:])
        assert f["features"].shape[0] == 12 and "cut.jpg" not in list(f["paths"].asstr()[:])
    result = _run(*args, "--overwrite", "--strict")
    assert result.exit_code == 1


def test_config_command_prints_resolved_toml(tmp_path):
    result = _run("config", "--backbone", "vgg16", "--levels", "6,3,2,1")
    assert result.exit_code == 0
    assert 'layer = "features"' in result.output and "levels = [6, 3, 2, 1]" in result.output
    assert "mean = [0.485, 0.456, 0.406]" in result.output


def test_backbones_command_lists_dims():
    result = _run("backbones", "--levels", "2,1")
    assert result.exit_code == 0
    line = next(line for line in result.output.splitlines() if line.startswith("resnet50 "))
    assert "layer4" in line and "2048" in line and str(2048 * 5) in line


def test_python_dash_m_works(tmp_path, example_dir):
    done = subprocess.run([sys.executable, "-m", "spp_extract", "extract", str(example_dir),
                           "-o", str(tmp_path / "out.h5"), *FAST], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.h5").is_file()
