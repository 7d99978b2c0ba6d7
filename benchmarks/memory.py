"""Peak RSS of spp-extract for N and 10 x N images: memory must not grow with the image count.

    python benchmarks/memory.py --images 300

Each run is its own process (so peaks do not mix); tiny generated images keep it quick.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

CHILD = """
import json, resource, sys
from spp_extract import Config, extract
r = extract([sys.argv[1]], sys.argv[2], config=Config(backbone=sys.argv[3], weights="none"))
print(json.dumps({"images": r.images, "seconds": r.seconds,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        h, w = (int(v) for v in rng.integers(24, 65, 2))
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
            folder / f"{i:06d}.png"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--backbone", default="resnet18")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="spp-mem-"))
    results = {}
    for n in (args.images, 10 * args.images):
        make(tmp / str(n), n)
        done = subprocess.run(
            [sys.executable, "-c", CHILD, str(tmp / str(n)), str(tmp / f"{n}.h5"), args.backbone],
            capture_output=True,
            text=True,
            check=True,
        )
        results[n] = json.loads(done.stdout.strip().splitlines()[-1])
        print(
            f"{n:6d} images: peak RSS {results[n]['peak_mib']:7.0f} MiB, {results[n]['images'] / results[n]['seconds']:.0f} img/s"
        )
    small, large = (results[n]["peak_mib"] for n in (args.images, 10 * args.images))
    print(f"growth from {args.images} to {10 * args.images} images: {large - small:+.0f} MiB")


if __name__ == "__main__":
    main()
