"""Peak RSS of spp-extract for N and 10 x N images: memory must not grow with the image count.

    python benchmarks/memory.py --images 300
    python benchmarks/memory.py --bookkeeping 1000000

Each run is its own process (so peaks do not mix); tiny generated images keep it quick.

``--bookkeeping N``: what a run holds per image before and while it computes, at N images
without computing them: N members of 100 generated tar shards are found and indexed, checked
against an empty run folder, their headers read and their batches planned, as ``extract``
does; it prints the resident memory this adds per image and at N. (The CNN's own memory does
not depend on N; the final view's per-row memory is the growth at the end of a real run.)
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


BOOKKEEPING = """
import json, os, resource, sys, tempfile
from pathlib import Path
from spp_extract import Config
from spp_extract.decoding import read_sizes
from spp_extract.discovery import find_images
from spp_extract.planning import Planner
from spp_extract.rundir import left_to_do
from spp_extract.runtime import batch_limits
import torch

def rss():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

before = rss()
refs = find_images([sys.argv[1]]).refs
found = rss()
todo = left_to_do(refs, Path(tempfile.mkdtemp()), False)
sizes = read_sizes([refs[i] for i in todo], 0, Config())
size, pixels = batch_limits(Config(), torch.device("cpu"))
planner = Planner(sizes, padded=True, pad_pixels=384 * 384, batch_size=size,
                  batch_pixels=pixels, commit_seconds=30)
batches = sum(1 for _ in planner)
after = rss()
print(json.dumps({"images": len(refs), "batches": batches, "found": found - before,
                  "held": after - before,
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def make_shards(folder: Path, count: int, shards: int = 100) -> None:
    """``count`` tiny PNGs (a few sizes, the same bytes reused) as members of ``shards`` tars."""
    import io
    import tarfile

    folder.mkdir(parents=True, exist_ok=True)
    blobs = []
    for side in (24, 40, 64):
        buffer = io.BytesIO()
        Image.new("RGB", (side, side + 5), (side, 80, 160)).save(buffer, "PNG")
        blobs.append(buffer.getvalue())
    per = -(-count // shards)
    for s in range(shards):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tf:
            for i in range(s * per, min(count, (s + 1) * per)):
                data = blobs[i % len(blobs)]
                info = tarfile.TarInfo(f"{i:09d}.png")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


def bookkeeping(count: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="spp-book-"))
    make_shards(tmp / "shards", count)
    done = subprocess.run(
        [sys.executable, "-c", BOOKKEEPING, str(tmp / "shards")],
        capture_output=True,
        text=True,
        check=True,
    )
    r = json.loads(done.stdout.strip().splitlines()[-1])
    n = r["images"]
    print(
        f"{n} images in 100 tar shards, {r['batches']} batches planned: found and indexed "
        f"{r['found'] / n:.0f} B/image, held while computing {r['held'] / n:.0f} B/image "
        f"= {r['held'] / 2**20:.0f} MiB; peak RSS of that process {r['peak_mib']:.0f} MiB"
    )


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
    parser.add_argument("--bookkeeping", type=int, metavar="N", help="see the text above")
    args = parser.parse_args()
    if args.bookkeeping:
        bookkeeping(args.bookkeeping)
        return
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
