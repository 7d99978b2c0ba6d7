"""Start-up: how long each command takes from the shell, against what importing torch and
torchvision costs by itself, side by side in one run.

    python benchmarks/startup.py [--repeat 3]

Each command runs in a fresh interpreter (``python -m spp_extract ...``, as the console script
does), ``--repeat`` times; the median is printed. Files to inspect and merge are made first
(the example folder through resnet18, random weights).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples" / "images"


def timed(args: list[str], cwd: Path, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(args, cwd=cwd, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    repeat = parser.parse_args().repeat
    tool = [sys.executable, "-m", "spp_extract"]
    fast = ["--backbone", "resnet18", "--weights", "none", "-q"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        subprocess.run([*tool, "extract", EXAMPLES, "-o", "f.h5", *fast], cwd=work, check=True)
        subprocess.run([*tool, "neighbors", "f.h5", "-k", "2", "-o", "n.h5", "-q"], cwd=work)
        (work / "one").mkdir()
        (work / "one" / "a.png").write_bytes((EXAMPLES / "landscape.jpg").read_bytes())
        cases = {
            "python -c 'import torch'": [sys.executable, "-c", "import torch"],
            "python -c 'import torch, torchvision'": [
                sys.executable,
                "-c",
                "import torch, torchvision.models",
            ],
            "spp-extract --version": [*tool, "--version"],
            "spp-extract --help": [*tool, "--help"],
            "spp-extract config": [*tool, "config"],
            "spp-extract config --config sppnet_vgg16": [*tool, "config", "-c", "sppnet_vgg16"],
            "spp-extract backbones": [*tool, "backbones"],
            "spp-extract inspect f.h5": [*tool, "inspect", "f.h5"],
            "spp-extract inspect n.h5 (neighbors)": [*tool, "inspect", "n.h5"],
            "spp-extract merge f.h5 m.h5": [*tool, "merge", "f.h5", "m.h5", "--overwrite"],
            "1-image run, resnet18": [
                *tool,
                "extract",
                "one",
                "-o",
                "one.h5",
                "--overwrite",
                *fast,
            ],
        }
        results = {name: timed(args, work, repeat) for name, args in cases.items()}
    width = max(map(len, results))
    print(f"median of {repeat} runs, fresh interpreter each")
    for name, seconds in results.items():
        print(f"{name:<{width}}  {seconds:6.2f} s")
    imports = results["python -c 'import torch, torchvision'"]
    run = results["1-image run, resnet18"]
    print(f"1-image run beyond importing torch and torchvision: {run - imports:.2f} s")


if __name__ == "__main__":
    main()
