"""Daily use (issue 17): commands that compute nothing import no torch, the backbone table is
the live probe, the configs work from a wheel installed outside the checkout, bf16 on a CPU
that emulates it is said, a torch/torchvision pair that does not import is one line, every
file the tool writes can be inspected, neighbour lists on stdout, input roots that survive."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import FAST_FLAGS, ROOT, cli, crash_cli, fast_commits, one_line, run_python
from PIL import Image

from spp_extract import catalog, read_features
from spp_extract.neighbors import find_neighbors
from spp_extract.projection import reduce

SHIPPED = ("default", "mobile_fast", "resnet50_layer3", "sppnet_vgg16")


@pytest.fixture(scope="module")
def outputs(real_h5, tmp_path_factory):
    """A features file (a view), its neighbors file and its reduced file."""
    folder = tmp_path_factory.mktemp("outputs")
    find_neighbors(real_h5, folder / "n.h5", 3)
    reduce(real_h5, folder / "r.h5", dim=4, whiten=True, power=0.5)
    return real_h5, folder / "n.h5", folder / "r.h5"


def test_commands_that_compute_nothing_never_import_torch(outputs, tmp_path):
    features, near, reduced = outputs
    commands = [
        (["config", "--config", "sppnet_vgg16"], 0),
        (["config", "--backbone", "resnet18", "--layer", "layer3", "--levels", "2,1"], 0),
        (["config", "--backbone", "resnt50"], 2),  # "did you mean 'resnet50'?" from the table
        (["backbones", "--levels", "6,3,2,1"], 0),
        (["configs"], 0),
        (["inspect", str(features)], 0),
        (["inspect", str(near)], 0),
        (["inspect", str(reduced)], 0),
        (["merge", str(features), str(tmp_path / "m.h5")], 0),
    ]
    code = (
        "import json, sys\n"
        "from spp_extract.cli import app\n"
        f"for args, expected in json.loads({json.dumps(json.dumps(commands))}):\n"
        "    try:\n"
        "        app(args, prog_name='spp-extract')\n"
        "    except SystemExit as exit:\n"
        "        assert (exit.code or 0) == expected, (args, exit.code)\n"
        "    assert 'torch' not in sys.modules, ('torch imported by', args)\n"
        "    assert 'torchvision' not in sys.modules, ('torchvision imported by', args)\n"
    )
    done = run_python("-c", code, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "did you mean 'resnet50'" in done.stderr
    assert (tmp_path / "m.h5").is_file()


def test_backbones_lists_the_tables_facts():
    result = cli("backbones", "--levels", "6,3,2,1")
    assert result.exit_code == 0
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()[1:]}
    assert len(rows) == len(catalog.names()) > 60
    # name, layer, channels, stride, min side, dim (2048 * 50), exact batching and tiling
    assert rows["resnet50"][:7] == ["resnet50", "layer4", "2048", "32", "1", "102400", "yes"]
    assert rows["vgg16"][:6] == ["vgg16", "features", "512", "32", "32", "25600"]
    assert rows["efficientnet_b0"][6] == "no"
    assert not any(name.startswith(("vit_", "swin_")) for name in rows)


@pytest.mark.slow  # builds every torchvision CNN on the meta device (~40 s)
def test_the_table_is_the_live_probe_for_every_backbone():
    from spp_extract.families import live_names, probe_facts

    table = json.loads((ROOT / "spp_extract" / catalog.TABLE).read_text())
    from importlib import metadata

    regenerate = (
        "the backbone table is stale; regenerate it with: python -c 'from "
        "spp_extract.backbones import write_catalog; write_catalog()'"
    )
    assert table["torchvision"] == metadata.version("torchvision"), regenerate
    assert sorted(table["backbones"]) == live_names(), regenerate
    for name in live_names():
        assert table["backbones"][name] == json.loads(json.dumps(probe_facts(name))), (
            name,
            regenerate,
        )


def test_without_a_table_for_this_torchvision_the_live_probe_answers(monkeypatch):
    """A table made with another torchvision is not used: the answers come from the models."""
    table = catalog.facts("resnet18")
    monkeypatch.setattr(catalog, "_table", lambda: None)
    assert not catalog.available()
    assert catalog.facts("resnet18") == table
    assert "resnet18" in catalog.names() and "vit_b_16" not in catalog.names()


def test_shipped_configs_by_name_listed_and_named_in_the_error(tmp_path):
    listed = cli("configs")
    assert [line.split()[0] for line in listed.output.splitlines()] == list(SHIPPED)
    shown = cli("config", "--config", "sppnet_vgg16")
    assert shown.exit_code == 0
    assert 'backbone = "vgg16"' in shown.output and "levels = [6, 3, 2, 1]" in shown.output
    by_path = cli("config", "--config", ROOT / "configs" / "sppnet_vgg16.toml")
    assert by_path.output == shown.output
    line = one_line(cli("config", "--config", "sppnet_vgg61"), 2)
    assert "does not exist" in line and "sppnet_vgg16" in line and "spp-extract configs" in line


def test_config_resolve_prints_what_auto_settles_to():
    result = cli("config", "--weights", "none", "--resolve", "--max-memory", "1GB")
    assert result.exit_code == 0, result.output
    resolved = result.output.split("[resolved]")[1]
    assert 'device = "cpu"' in resolved and "max_memory = 1000000000" in resolved
    for key in ("workers", "threads", "batch_size", "batch_pixels", "batching", "precision"):
        assert f"\n{key} = " in resolved
    weights = cli("config", "--backbone", "resnet18", "--resolve")
    assert 'weights = "ResNet18_Weights.IMAGENET1K_V1"' in weights.output.split("[resolved]")[1]


@pytest.mark.parametrize("command", ["extract", "merge", "inspect", "config", "neighbors"])
def test_help_shows_no_types_or_braces(command):
    result = cli(command, "--help")
    assert result.exit_code == 0
    assert "<" not in result.output.replace("file < flags", "")
    assert "{" not in result.output and "}" not in result.output


def test_bf16_on_a_cpu_that_emulates_it_is_said_with_the_measured_factor(
    monkeypatch, tmp_path, example_dir, caplog
):
    from spp_extract import runtime

    image = example_dir / "tiny_1x1.png"
    args = ["extract", image, "--precision", "bf16", *FAST_FLAGS[:-1]]
    monkeypatch.setattr(runtime, "low_precision_slowdown", lambda dtype: 31.0)
    slow = cli(*args, "-o", tmp_path / "a.h5")
    assert slow.exit_code == 0, slow.output
    # the CLI's logging handler writes to the real stderr: read the record itself
    assert "precision bf16 runs 31x slower than fp32 on this CPU" in caplog.text
    assert "--precision fp32" in caplog.text
    caplog.clear()
    monkeypatch.setattr(runtime, "low_precision_slowdown", lambda dtype: 0.6)
    fast = cli(*args, "-o", tmp_path / "b.h5")
    assert fast.exit_code == 0 and "slower than fp32" not in caplog.text


@pytest.mark.slow  # bf16 is emulated on most CPUs
def test_the_slowdown_is_measured():
    import torch

    from spp_extract.runtime import low_precision_slowdown

    factor = low_precision_slowdown(torch.bfloat16)
    assert np.isfinite(factor) and factor > 0


@pytest.mark.slow  # a fresh interpreter importing torch
def test_a_torch_and_torchvision_that_do_not_import_together_are_one_line(tmp_path):
    fake = tmp_path / "fake" / "torchvision"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist')\n"
    )
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    done = run_python(
        "-m",
        "spp_extract",
        "extract",
        image,
        "-o",
        tmp_path / "out.h5",
        "--weights",
        "none",
        env={"PYTHONPATH": f"{tmp_path / 'fake'}{os.pathsep}{ROOT}"},
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-2000:]
    assert "do not work together" in lines[0] and "pip install torch==" in lines[0]
    assert not (tmp_path / "out.h5").exists()


@pytest.mark.slow  # builds a wheel and a virtual environment
def test_the_wheel_works_outside_the_checkout(tmp_path):
    source = tmp_path / "src"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "spp_extract", source / "spp_extract", ignore=ignore)
    shutil.copytree(ROOT / "configs", source / "configs", ignore=ignore)
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    build = ["wheel", "--no-deps", "--no-build-isolation", "-w", tmp_path / "dist", source]
    subprocess.run([*pip, *build], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("spp_extract-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for shipped in SHIPPED:
        assert f"spp_extract/configs/{shipped}.toml" in names
    assert "spp_extract/backbones.json" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)

    env = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", env], check=True)
    python = env / "bin" / "python"
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    # the dependencies from this environment (a path, not its .pth files: not this checkout)
    import sysconfig

    Path(site, "deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    install = ["--python", python, "install", "--no-deps", "--no-index", wheel]
    subprocess.run([*pip, *install], check=True, capture_output=True)

    away = tmp_path / "elsewhere"
    away.mkdir()
    Image.new("RGB", (40, 30), "red").save(away / "one.png")
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}

    def run(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run(
            [env / "bin" / "spp-extract", *map(str, args)],
            cwd=away,
            env=clean,
            capture_output=True,
            text=True,
            timeout=300,
        )

    where = subprocess.run(
        [python, "-c", "import spp_extract; print(spp_extract.__file__)"],
        cwd=away,
        env=clean,
        capture_output=True,
        text=True,
    ).stdout
    assert where.startswith(str(env)), where
    listed = run("configs")
    assert listed.returncode == 0 and "sppnet_vgg16" in listed.stdout
    shown = run("config", "--config", "sppnet_vgg16")
    assert shown.returncode == 0 and "levels = [6, 3, 2, 1]" in shown.stdout, shown.stderr
    done = run("extract", "one.png", "-o", "f.h5", "--config", "mobile_fast", "--weights", "none")
    assert done.returncode == 0, done.stderr
    assert "1 images, 0 failed" in done.stderr
    assert run("backbones").stdout.count("\n") > 60


def _inputs(tmp_path: Path) -> tuple[Path, list[Path]]:
    """Two folders sharing a stored name, a file in the current folder and one beside it."""
    work, photos, more = tmp_path / "work", tmp_path / "photos", tmp_path / "more" / "deep"
    for folder in (work, photos / "2023", more, tmp_path / "one"):
        folder.mkdir(parents=True)
    Image.new("RGB", (70, 50), "red").save(photos / "2023" / "IMG_1007.jpg")
    Image.new("RGB", (64, 64), "blue").save(photos / "landscape.jpg")
    Image.new("RGB", (50, 70), "green").save(more / "pano.png")
    Image.new("RGB", (33, 33), "white").save(work / "one.jpg")
    Image.new("RGB", (34, 33), "gray").save(tmp_path / "one" / "two.jpg")
    return work, [photos, more, work / "one.jpg", tmp_path / "one" / "two.jpg"]


def _opens(paths: list[str | None], folder: Path) -> None:
    for path in paths:
        assert path is not None and os.path.isabs(path) and Path(path).is_file(), path
        assert Path(path).resolve().is_relative_to(folder.resolve())


@pytest.mark.slow  # runs the CLI in a fresh interpreter, killed mid-way, then resumes it
def test_rows_record_their_input_root_through_merge_resume_and_neighbors(tmp_path, monkeypatch):
    work, given = _inputs(tmp_path)
    monkeypatch.chdir(work)  # inputs given relative to here, as a user types them
    inputs = [os.path.relpath(p, work) for p in given]
    flags = [*FAST_FLAGS, "--batch-size", "1", "--config", fast_commits(tmp_path)]
    killed = crash_cli("kill-after-commit:2", "extract", *inputs, "-o", "f.h5", *flags, cwd=work)
    assert killed.returncode == -9
    resumed = cli("extract", *inputs, "-o", "f.h5", *flags, "--resume")
    assert resumed.exit_code == 0, resumed.output
    data = read_features(work / "f.h5")
    stored = ["../one/two.jpg", "2023/IMG_1007.jpg", "landscape.jpg", "one.jpg", "pano.png"]
    assert data.paths == stored
    real = sorted(os.path.realpath(r) for r in data.roots)
    assert real == sorted(str(p.resolve()) for p in given[:2] + [work])
    _opens(data.absolute_paths(), tmp_path)
    assert [Path(p).name for p in data.absolute_paths()] == [Path(p).name for p in data.paths]

    assert cli("merge", "f.h5", "m.h5").exit_code == 0
    merged = read_features(work / "m.h5")
    assert merged.absolute_paths() == data.absolute_paths()

    listed = cli("neighbors", "m.h5", "-k", "1", "--absolute", "--format", "jsonl", "-q")
    assert listed.exit_code == 0, listed.output
    for line in listed.stdout.splitlines():
        item = json.loads(line)
        _opens([item["path"], item["neighbors"][0]["path"]], tmp_path)
    pairs = cli(
        "neighbors", "m.h5", "-k", "4", "--pairs", "p.csv", "--threshold", "-1", "--absolute"
    )
    assert pairs.exit_code == 0
    rows = (work / "p.csv").read_text().splitlines()[1:]
    assert len(rows) == 10
    _opens([cell for row in rows for cell in row.split(",")[:2]], tmp_path)
    shown = cli("inspect", "m.h5")
    for root in merged.roots:
        assert f"  {root}  (" in shown.output


def test_neighbors_print_lists_readably_and_as_csv_and_jsonl(outputs):
    features = outputs[0]
    data = read_features(features)
    found = find_neighbors(features, None, 2)
    text = cli("neighbors", features, "-k", "2")
    assert text.exit_code == 0, text.output
    lines = text.stdout.splitlines()
    assert len(lines) == 3 * len(data.paths)
    for row, path in enumerate(data.paths):
        assert lines[3 * row] == path
        for rank in (1, 2):
            neighbour = found.index[row, rank - 1]
            expected = (
                f"  {rank:>3}  {found.similarity[row, rank - 1]:.4f}  {data.paths[neighbour]}"
            )
            assert lines[3 * row + rank] == expected
    assert "similarity of each row's nearest neighbour:" in text.stderr
    assert "---- threshold 0.95:" in text.stderr

    csv_lines = cli("neighbors", features, "-k", "2", "--format", "csv", "-q").stdout.splitlines()
    assert csv_lines[0] == "query,rank,neighbor,similarity"
    assert len(csv_lines) == 1 + 2 * len(data.paths)
    first = csv_lines[1].split(",")
    assert first[:3] == [data.paths[0], "1", data.paths[found.index[0, 0]]]
    assert float(first[3]) == pytest.approx(found.similarity[0, 0], abs=1e-6)

    jsonl = cli("neighbors", features, "-k", "2", "--format", "jsonl", "-q").stdout.splitlines()
    items = [json.loads(line) for line in jsonl]
    assert [item["path"] for item in items] == data.paths
    assert [n["path"] for n in items[1]["neighbors"]] == [data.paths[i] for i in found.index[1]]
    assert "threshold" not in cli("neighbors", features, "-k", "2", "-q").stderr

    bad = one_line(cli("neighbors", features, "--format", "xml"), 2)
    assert "format 'xml' is invalid" in bad and "jsonl" in bad


def test_the_histogram_counts_every_row_and_marks_the_threshold():
    from spp_extract.listing import histogram

    values = np.array([0.61, 0.62, 0.7, 0.88, 0.955, 0.97, 0.99, 1.0], np.float32)
    lines = histogram(values, 0.95)
    counts = [int(line.split()[-1]) for line in lines if "threshold" not in line]
    assert sum(counts) == len(values)
    cut = [i for i, line in enumerate(lines) if "threshold" in line]
    assert len(cut) == 1 and "4 of 8 at or above" in lines[cut[0]]
    assert sum(counts[: cut[0]]) == 4  # bins above the line hold exactly the values under it


def test_inspect_describes_neighbors_and_reduce_outputs(outputs):
    features, near, reduced = outputs
    shown = cli("inspect", near, "--rows", "1")
    assert shown.exit_code == 0, shown.output
    with h5py.File(near) as f:
        n, k = f["neighbors/index"].shape
        nearest = f["neighbors/similarity"][:, 0]
        first = f["paths"].asstr()[0]
    assert f"neighbour lists of {n} rows of {features.name}, k = {k}" in shown.output
    assert f"min {nearest.min():.4f}, median {np.median(nearest):.4f}" in shown.output
    assert f"\n  {first}\n" in shown.output
    assert sum(int(line.split()[-1]) for line in shown.output.splitlines() if " - " in line) == n

    described = cli("inspect", reduced).output
    with h5py.File(reduced) as f:
        kept = f["reduce/explained_variance"][:].sum() / f["reduce"].attrs["total_variance"]
    assert "method: power 0.5, PCA-whitening, L2 before and after" in described
    assert "dim: 4 of 10752" in described
    assert f"explained variance: {kept:.1%} of the sample's" in described
    assert f"of {features.name} (seed 0)" in described

    refused = one_line(cli("reduce", near, near.parent / "x.h5", "--dim", "2"), 2)
    assert "holds neighbour lists" in refused and features.name in refused
