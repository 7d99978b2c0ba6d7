"""The command line as a contract: exit codes, one-line messages, nothing written on refusal."""

import importlib.metadata
import io
import os
import shlex
import shutil
import sys
from pathlib import Path

import h5py
import pytest
import torch
import typer
from conftest import FAST_FLAGS, Terminal, photo, run_python
from conftest import cli as _run
from PIL import Image

from spp_extract import cli
from spp_extract.cli import CONFIG_FLAGS, ProgressBar, app, resume_command

FAST = FAST_FLAGS


def _nothing_written(folder: Path) -> bool:
    return not any(p.name.startswith("out") for p in folder.iterdir())


def test_help_texts():
    result = _run("--help")
    assert result.exit_code == 0
    for command in ("extract", "backbones", "config", "inspect", "merge"):
        assert command in result.output
    result = _run("extract", "--help")
    assert result.exit_code == 0
    for flag in (
        "--config",
        "--backbone",
        "--layer",
        "--weights",
        "--levels",
        "--pooling",
        "--batch-size",
        "--workers",
        "--device",
        "--dtype",
        "--overwrite",
        "--resume",
        "--files-from",
        "--quiet",
        "--strict",
        "--retry-failed",
    ):
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
        (["--levels", "4,0"], "distinct integers from 1 to 16"),
        (["--levels", "2,2"], "distinct integers from 1 to 16"),
        (["--levels", "1000"], "levels = [1000] is invalid"),
        (["--levels", "4,,2"], "levels '4,,2' is invalid"),
        (["--levels", "\u0664,2"], "levels '\u0664,2' is invalid"),
        (["--max-pixels", "\u0664"], "--max-pixels '\u0664' is invalid"),
        (["--workers", "5000"], "workers = 5000 is invalid"),
        (["--layer", "layer9"], "unknown layer 'layer9'"),
        (["--weights", "missing.pt"], "neither a file nor a weights name"),
        (
            ["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"],
            "cuda",
        ),
        (["--pooling", "sum"], "pooling = 'sum' is invalid"),
    ],
)
def test_refusals_exit_2(tmp_path, example_dir, args, fragment):
    result = _run("extract", example_dir, "-o", tmp_path / "out.h5", *FAST, *args)
    assert result.exit_code == 2, result.output
    assert fragment in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert _nothing_written(tmp_path)


def test_no_images_and_a_missing_output_folder(tmp_path):
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
        monkeypatch.setattr(
            os, "access", lambda p, m: False if Path(p) == locked else real_access(p, m)
        )
    result = _run("extract", example_dir, "-o", locked / "out.h5", *FAST)
    assert result.exit_code == 2 and "not writable" in result.stderr
    assert not any(locked.iterdir())


@pytest.mark.slow
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


@pytest.mark.slow
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
        failed = dict(
            zip(f["failed/paths"].asstr()[:], f["failed/error_class"].asstr()[:], strict=True)
        )
        assert failed == {
            "cut.jpg": "truncated",
            "dangling.png": "dangling_symlink",
            "empty.jpg": "empty_file",
            "huge.png": "too_large",
            "text.png": "not_an_image",
        }
        assert all(f["failed/errors"].asstr()[:])
        assert f["features"].shape[0] == 12 and "cut.jpg" not in list(f["paths"].asstr()[:])
    result = _run(*args, "--overwrite", "--strict")
    assert result.exit_code == 1


def test_config_command_prints_resolved_toml(tmp_path):
    result = _run("config", "--backbone", "vgg16", "--levels", "6,3,2,1")
    assert result.exit_code == 0
    assert 'layer = "features"' in result.output and "levels = [6, 3, 2, 1]" in result.output
    assert "mean = [0.485, 0.456, 0.406]" in result.output


@pytest.mark.slow
def test_backbones_command_lists_dims():
    result = _run("backbones", "--levels", "2,1")
    assert result.exit_code == 0
    line = next(line for line in result.output.splitlines() if line.startswith("resnet50 "))
    assert "layer4" in line and "2048" in line and str(2048 * 5) in line


@pytest.mark.slow
def test_python_dash_m_works(tmp_path, example_dir):
    done = run_python("-m", "spp_extract", "extract", example_dir, "-o", tmp_path / "out.h5", *FAST)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.h5").is_file()


ROOT = Path(__file__).resolve().parents[1]
RUN_ONLY = {
    "inputs",
    "output",
    "files_from",
    "column",
    "resume",
    "overwrite",
    "retry_failed",
    "strict",
    "quiet",
    "ctx",
    "project",
}


def test_help_shows_no_type_beside_flags():
    result = _run("extract", "--help")
    assert result.exit_code == 0
    assert "<bool>" not in result.output
    assert "--allow-truncated / --no-allow-truncated" in result.output
    assert "--follow-symlinks / --no-follow-symlinks" in result.output


def test_absent_flag_keeps_the_config_files_value(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text("allow_truncated = true\nfollow_symlinks = true\n")
    result = _run("config", "-c", config, "--weights", "none")
    assert result.exit_code == 0, result.output
    assert "allow_truncated = true" in result.output and "follow_symlinks = true" in result.output
    result = _run("config", "-c", config, "--weights", "none", "--no-allow-truncated")
    assert "allow_truncated = false" in result.output and "follow_symlinks = true" in result.output


def test_config_command_takes_every_configuration_flag_of_extract():
    commands = typer.main.get_command(app).commands
    extract_flags = {p.name for p in commands["extract"].params} - RUN_ONLY
    config_flags = {p.name for p in commands["config"].params} - {"resolve_auto"}
    assert config_flags == extract_flags == set(CONFIG_FLAGS)
    result = _run(
        "config",
        "--weights",
        "none",
        "--batch-size",
        "3",
        "--batch-pixels",
        "1000",
        "--batching",
        "padded",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--dtype",
        "float16",
        "--precision",
        "bf16",
        "--max-pixels",
        "100",
        "--allow-truncated",
        "--follow-symlinks",
    )
    assert result.exit_code == 0, result.output
    for line in (
        "batch_size = 3",
        "batch_pixels = 1000",
        'batching = "padded"',
        "workers = 0",
        'device = "cpu"',
        'dtype = "float16"',
        'precision = "bf16"',
        "max_pixels = 100",
        "allow_truncated = true",
        "follow_symlinks = true",
    ):
        assert line in result.output.splitlines(), line


def test_version():
    result = _run("--version")
    installed = importlib.metadata.version("spp-extract")
    assert result.exit_code == 0 and result.output.strip() == f"spp-extract {installed}"


@pytest.mark.slow
def test_help_and_version_import_no_torch_and_the_api_still_imports():
    code = (
        "import sys\n"
        "from spp_extract.cli import app\n"
        "for args in (['--help'], ['--version'], ['extract', '--help'], ['config', '--help']):\n"
        "    try:\n"
        "        app(args, prog_name='spp-extract')\n"
        "    except SystemExit as exit:\n"
        "        assert exit.code == 0, (args, exit.code)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "from spp_extract import extract, Config, read_features, SpatialPyramidPooling, merge, spp_dim\n"
        "assert 'torch' in sys.modules and callable(extract) and spp_dim(2, (2, 1)) == 10\n"
    )
    done = run_python("-c", code, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_progress_draws_only_on_a_terminal_and_only_with_work():
    tty = Terminal()
    nothing = ProgressBar(tty)
    nothing(0, 0)
    nothing.close()
    assert tty.getvalue() == ""  # a resume with nothing to do: no "0img [00:00, ?img/s]"
    log = io.StringIO()
    piped = ProgressBar(log)
    piped.status("loading resnet50 ...")
    piped(0, 5)
    piped(5, 5)
    piped.close()
    assert log.getvalue() == ""  # not a terminal: the summary line is enough
    shown = ProgressBar(tty)
    shown.status("loading resnet50 ...")
    shown(0, 5)
    shown(5, 5)
    shown.close()
    assert (
        tty.getvalue().startswith("spp-extract: loading resnet50 ...\n") and "5/5" in tty.getvalue()
    )
    quiet = ProgressBar(Terminal(), enabled=False)
    quiet.status("x")
    quiet(0, 5)
    assert quiet.stream.getvalue() == ""


@pytest.mark.slow
def test_summary_strict_quiet_and_escaped_file_names(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    Image.fromarray(photo(40, 50)).save(folder / "good.png")
    (folder / "bad\x1b[31m\nname.png").write_text("not a png")
    out = tmp_path / "out.h5"
    result = _run("extract", folder, "-o", out, *FAST[:-1])
    assert result.exit_code == 0, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 2 and lines[0].startswith("1 images, 1 failed, 10752-dim vectors")
    assert lines[1].startswith("  failed: bad\\x1b[31m\\nname.png: not_an_image: ")
    assert (
        "\x1b" not in result.stderr and "img/s" not in result.stderr and "\r" not in result.stderr
    )
    # nothing left to do: only the summary, no empty progress bars
    result = _run("extract", folder, "-o", out, *FAST[:-1], "--resume")
    assert result.exit_code == 0 and result.stderr.splitlines()[0].startswith("1 images, 1 failed")
    assert "img/s" not in result.stderr and "0img" not in result.stderr
    result = _run("extract", folder, "-o", out, *FAST, "--resume", "--strict")
    assert result.exit_code == 1 and result.stderr == "spp-extract: 1 images failed (--strict)\n"


def test_resume_command_drops_overwrite_and_names_the_module():
    python = os.path.basename(sys.executable)
    command = resume_command(
        cli._program("/x/site-packages/spp_extract/__main__.py"),
        "extract",
        [("--output", "o.h5"), ("--overwrite", True), ("--workers", "0")],
        ["in dir", "-odd"],
    )
    assert shlex.split(command) == [
        python,
        "-m",
        "spp_extract",
        "extract",
        "--output",
        "o.h5",
        "--workers",
        "0",
        "--resume",
        "--",
        "in dir",
        "-odd",
    ]
    command = resume_command(
        cli._program("/usr/bin/spp-extract"), "extract", [("--resume", True)], ["x\udce9\n.png"]
    )
    assert command == "spp-extract extract --resume $'x\\xe9\\n.png'"


def test_interrupted_run_prints_a_resume_command_that_runs(tmp_path, example_dir, monkeypatch):
    import spp_extract.pipeline as pipeline

    calls = []

    def interrupted(inputs, output, *, progress, **kwargs):
        calls.append({"inputs": inputs, "output": output, **kwargs})
        raise pipeline.Interrupted(2)

    monkeypatch.setattr(pipeline, "extract", interrupted)
    monkeypatch.setattr(sys, "argv", ["/x/spp_extract/__main__.py"])  # as under python -m
    config = ROOT / "configs" / "mobile_fast.toml"
    result = _run(
        "extract",
        example_dir,
        "-o",
        tmp_path / "out.h5",
        "-c",
        config,
        "--overwrite",
        "--weights",
        "none",
        "--allow-truncated",
        "-q",
    )
    assert result.exit_code == 130
    line = result.stderr.splitlines()[-1]
    assert line.startswith("  resume with: ")
    words = shlex.split(line.removeprefix("  resume with: "))
    assert words[:4] == [os.path.basename(sys.executable), "-m", "spp_extract", "extract"]
    assert "--overwrite" not in words and words.count("--resume") == 1
    result = _run(*words[3:])  # the printed command parses to the same run, now resumed
    assert result.exit_code == 130
    assert calls[1] == {**calls[0], "mode": "resume"}


def test_config_file_value_is_named_when_it_conflicts_with_a_flag(tmp_path, example_dir):
    config = ROOT / "configs" / "sppnet_vgg16.toml"
    result = _run(
        "extract",
        example_dir,
        "-o",
        tmp_path / "out.h5",
        *FAST,
        "-c",
        config,
        "--backbone",
        "resnet18",
    )
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"spp-extract: error: unknown layer 'features.29' for resnet18 (layer came from {config} "
        "line 5; pass --layer or remove it there); "
    )
    assert _nothing_written(tmp_path)


def test_offline_default_weights_offer_none_and_print_nothing_on_stdout(tmp_path, example_dir):
    result = _run(
        "extract",
        example_dir,
        "-o",
        tmp_path / "out.h5",
        "--backbone",
        "resnet18",
        "--workers",
        "0",
        "-q",
    )
    assert result.exit_code == 2
    assert result.stdout == ""  # torch.hub's "Downloading: ..." line
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--weights none" in lines[0] and "--weights FILE" in lines[0]
    assert str(Path(os.environ["TORCH_HOME"]) / "hub" / "checkpoints") in lines[0]
    assert _nothing_written(tmp_path)


@pytest.mark.parametrize("kind", ["text", "npy", "pickle-of-numpy"])
def test_weights_file_that_is_not_torch_says_so_without_unsafe_advice(tmp_path, example_dir, kind):
    import numpy as np

    path = tmp_path / f"w.{kind}"
    if kind == "text":
        path.write_text("hello\n")
    elif kind == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    else:
        torch.save({"conv1.weight": np.zeros(2)}, path)
    result = _run("extract", example_dir, "-o", tmp_path / "out.h5", *FAST, "--weights", path)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"weights file '{path}' is not a PyTorch state-dict file" in lines[0]
    assert "False" not in lines[0] and "\x1b" not in lines[0]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, example_dir):
    folder = tmp_path_factory.mktemp("finished")
    out = folder / "f.h5"
    assert _run("extract", example_dir, "-o", out, *FAST).exit_code == 0
    return out


def _foreign_h5(path: Path) -> Path:
    with h5py.File(path, "w") as f:
        f["data"] = [1, 2, 3]
    return path


@pytest.mark.parametrize(
    "make, fragment",
    [
        (lambda d: d / "missing.h5", "does not exist"),
        (lambda d: d, "is a folder"),
        (lambda d: (d / "t.txt", (d / "t.txt").write_text("hello"))[0], "not an HDF5 file"),
        (lambda d: _foreign_h5(d / "x.h5"), "did not write"),
    ],
    ids=["missing", "folder", "text", "foreign-hdf5"],
)
@pytest.mark.parametrize("command", ["inspect", "merge"])
def test_inspect_and_merge_refuse_what_is_not_an_output_in_one_line(
    tmp_path, make, fragment, command
):
    source = make(tmp_path)
    args = [command, source] + ([tmp_path / "m.h5"] if command == "merge" else [])
    result = _run(*args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert not (tmp_path / "m.h5").exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "dest, fragment",
    [
        (lambda f: f.parent / "nodir" / "m.h5", "does not exist"),
        (lambda f: f.parent, "is a folder"),
        (lambda f: f.parent / "f.h5.shards" / "m.h5", "inside its shards folder"),
    ],
    ids=["missing-folder", "folder", "own-shards"],
)
def test_merge_refuses_bad_destinations_in_one_line(finished, dest, fragment):
    result = _run("merge", finished, dest(finished))
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], result.stderr
    assert not (finished.parent / "f.h5.shards" / "m.h5").exists()


@pytest.mark.slow
def test_inspect_refuses_a_truncated_shard(tmp_path, example_dir):
    out = tmp_path / "f.h5"
    assert _run("extract", example_dir, "-o", out, *FAST).exit_code == 0
    shard = sorted((tmp_path / "f.h5.shards").rglob("a*.h5"))[0]
    with open(shard, "r+b") as fh:
        fh.truncate(3000)
    result = _run("inspect", out)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot be read" in lines[0] and "--resume" in lines[0]


@pytest.mark.slow  # its fixture runs an extraction
def test_inspect_shows_what_the_run_used(finished):
    result = _run("inspect", finished)
    assert result.exit_code == 0
    assert "device: cpu" in result.output and "complete: true" in result.output
