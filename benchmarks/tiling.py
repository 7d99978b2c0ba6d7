"""Peak RSS against image size under a memory budget, and the time cost of exact tiling.

    python benchmarks/tiling.py                          # resnet50, 1/4/12 MP at 2GB; ratio at 4 MP
    python benchmarks/tiling.py --sizes 1 4 12 48 --backbone vgg16

(a) each size runs `extract()` on one generated photo in a fresh process with
``max_memory = --budget`` and reports its peak RSS and tiles: flat once over the budget.
(b) one size where both fit runs twice in fresh processes, with ``--ratio-budget`` (tiled) and
unlimited (whole image), and reports the time ratio and how many tiles were used.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = """
import json, resource, sys, time, h5py
from spp_extract import Config, extract
folder, out, backbone, budget = sys.argv[1:5]
config = Config(backbone=backbone, weights="none", workers=0, max_pixels="none", max_memory=budget)
start = time.monotonic()
r = extract([folder], out, config=config)
seconds = time.monotonic() - start
with h5py.File(out) as f:
    tiles = int(f["tiles"][0]) if len(f["tiles"]) else -1
print(json.dumps({"images": r.images, "failed": r.failed, "seconds": seconds, "tiles": tiles,
                  "peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}))
"""


def make(folder: Path, megapixels: float) -> tuple[int, int]:
    """One smooth photo-like PNG of about this many megapixels (4:3)."""
    folder.mkdir(parents=True, exist_ok=True)
    h = int(math.sqrt(megapixels * 1e6 * 3 / 4))
    w = int(h * 4 / 3)
    rng = np.random.default_rng(0)
    small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
    image = Image.fromarray(small).resize((w, h), Image.BILINEAR)
    image.save(folder / "photo.png", compress_level=1)
    return h, w


def run(folder: Path, out: Path, backbone: str, budget: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), str(out), backbone, budget],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backbone", default="resnet50")
    parser.add_argument("--budget", default="2GB")
    parser.add_argument("--sizes", type=float, nargs="+", default=[1, 4, 12], help="megapixels")
    parser.add_argument("--ratio-size", type=float, default=4.0, help="megapixels; 0 skips (b)")
    parser.add_argument("--ratio-budget", default="500MB")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="spp-tiling-"))
    print(f"(a) {args.backbone}, max_memory = {args.budget}")
    for mp in args.sizes:
        h, w = make(tmp / f"{mp}", mp)
        r = run(tmp / f"{mp}", tmp / f"{mp}.h5", args.backbone, args.budget)
        print(
            f"  {h}x{w} ({h * w / 1e6:.1f} MP): peak RSS {r['peak_gb']:.2f} GB, tiles {r['tiles']}, "
            f"{r['seconds']:.1f} s, failed {r['failed']}"
        )
    if args.ratio_size:
        h, w = make(tmp / "ratio", args.ratio_size)
        tiled = run(tmp / "ratio", tmp / "tiled.h5", args.backbone, args.ratio_budget)
        whole = run(tmp / "ratio", tmp / "whole.h5", args.backbone, "1PB")
        print(
            f"(b) {h}x{w}: tiled ({args.ratio_budget}, {tiled['tiles']} tiles) {tiled['seconds']:.1f} s, "
            f"peak {tiled['peak_gb']:.2f} GB; whole {whole['seconds']:.1f} s, peak "
            f"{whole['peak_gb']:.2f} GB; tiled/whole time {tiled['seconds'] / whole['seconds']:.2f}x"
        )


if __name__ == "__main__":
    main()
