"""Throughput, side by side in one process, on the same images:

  (a) naive: the loop a user would write from the paper — decode, trunk, SPP, write one row
  (b) compute limit: pre-decoded tensors, already on the device, through trunk + SPP, no I/O
  (t) the trunk alone, batched: random tensors of the images' sizes in 64-px size buckets of
      up to 32, each padded to its largest; no masks, no SPP, no I/O (what the machine can do
      on these images when batching costs nothing)
  (c) spp-extract end to end (decode workers, planning, batching, shard writes, final view)

and the ratios c/a, c/b and c/t, plus peak RSS. ``--corpus small``: sides from 32 to 256 px,
every size mixed (web thumbnails, dataset crops). Example:

    python benchmarks/throughput.py --backbone resnet18 --images 48
    python benchmarks/throughput.py --backbone resnet18 --corpus small --images 2000
    python benchmarks/throughput.py --folder PHOTOS/ --device cuda --batching padded
    python benchmarks/throughput.py --device cuda --precision bf16 --compare-batching --images 2000
"""

from __future__ import annotations

import argparse
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.models import get_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from make_examples import photo  # noqa: E402

from spp_extract import Config, extract, images  # noqa: E402
from spp_extract.backbones import build_trunk  # noqa: E402
from spp_extract.compute import Extractor  # noqa: E402
from spp_extract.decoding import collate, decode_item  # noqa: E402
from spp_extract.discovery import ImageRef  # noqa: E402
from spp_extract.planning import Planner  # noqa: E402
from spp_extract.pooling import spatial_pyramid_pool  # noqa: E402
from spp_extract.runtime import Runtime, batching_name  # noqa: E402


def make_corpus(folder: Path, count: int, seed: int = 0) -> None:
    """ImageNet-like mix: mostly 500x375 / 375x500, the rest with sides from 200 to 1200 px."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        r = rng.random()
        if r < 0.4:
            h, w = 375, 500
        elif r < 0.6:
            h, w = 500, 375
        else:
            h, w = (int(v) for v in rng.integers(200, 1201, 2))
        Image.fromarray(photo(h, w, seed=i)).save(folder / f"img_{i:05d}.jpg", quality=90)


def make_small_corpus(folder: Path, count: int, seed: int = 0) -> None:
    """Small images: both sides uniform in 32..256 px, nearly every size different."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        h, w = (int(v) for v in rng.integers(32, 257, 2))
        Image.fromarray(photo(h, w, seed=i)).save(folder / f"small_{i:05d}.jpg", quality=90)


def trunk_batched(paths: list[Path], trunk, device: torch.device) -> float:
    """(t): the trunk alone on tensors of the images' sizes, in 64-px buckets of <= 32."""
    sizes = []
    for p in paths:
        with Image.open(p) as img:
            sizes.append((max(img.size[1], trunk.min_side), max(img.size[0], trunk.min_side)))
    key = lambda i: (-(-sizes[i][0] // 64), -(-sizes[i][1] // 64))  # noqa: E731
    order = sorted(range(len(sizes)), key=lambda i: (key(i), sizes[i]))
    batches: list[list[int]] = []
    for i in order:
        if batches and key(batches[-1][0]) == key(i) and len(batches[-1]) < 32:
            batches[-1].append(i)
        else:
            batches.append([i])
    inputs = [
        torch.randn(len(b), 3, max(sizes[i][0] for i in b), max(sizes[i][1] for i in b))
        .to(device)
        .contiguous(memory_format=torch.channels_last)
        for b in batches
    ]
    module = trunk.module.to(memory_format=torch.channels_last)
    with torch.inference_mode():
        module(inputs[0][:1])  # warm-up
        _sync(device)
        start = time.perf_counter()
        for x in inputs:
            module(x)
        _sync(device)
    return time.perf_counter() - start


def naive(paths: list[Path], config: Config, device: torch.device, out: Path) -> float:
    """Times the whole loop, model set-up included, as (c) includes its own."""
    start = time.perf_counter()
    torch.manual_seed(0)
    model = get_model(config.backbone, weights=None).eval().to(device)
    trunk = torch.nn.Sequential(*list(model.children())[:-2])  # ResNet-style: drop pool and fc
    levels = config.levels
    mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)
    with h5py.File(out, "w") as f:
        ds = None
        for i, path in enumerate(paths):
            img = np.array(Image.open(path).convert("RGB"))
            x = torch.from_numpy(img).permute(2, 0, 1)[None].to(device).float() / 255
            with torch.inference_mode():
                v = spatial_pyramid_pool(trunk((x - mean) / std), levels).cpu().numpy()
            if ds is None:
                ds = f.create_dataset(
                    "features", shape=(0, v.shape[1]), maxshape=(None, v.shape[1]), dtype="f4"
                )
            ds.resize(i + 1, axis=0)
            ds[i] = v[0]
    _sync(device)
    return time.perf_counter() - start


def compute_limit(paths: list[Path], trunk, config: Config, runtime: Runtime) -> float:
    """(b): the run's own batches (as its planner makes them), pre-decoded, on the device."""
    device = runtime.device
    refs = [ImageRef(p.name, str(p)) for p in paths]
    items = [decode_item(r, i, trunk.min_side, config) for i, r in enumerate(refs)]
    sizes = [it.meta.input_size for it in items]
    planner = Planner(
        sizes,
        padded=runtime.padded,
        pad_pixels=runtime.pad_pixels,
        batch_size=runtime.batch_size,
        batch_pixels=runtime.batch_pixels,
        commit_seconds=1e9,
    )
    batches = [collate([items[i] for i in plan.indices]) for plan in planner]
    for b in batches:
        b.pixels = b.pixels.to(device)
    extractor = Extractor(trunk, config, runtime)
    _sync(device)
    start = time.perf_counter()
    for b in batches:
        extractor(b.pixels, b.metas)
    _sync(device)
    return time.perf_counter() - start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--backbone", default="resnet50", help="a ResNet-family model (the naive loop cuts it)"
    )
    parser.add_argument("--images", type=int, default=48)
    parser.add_argument(
        "--corpus", choices=("photos", "small"), default="photos", help="generated images"
    )
    parser.add_argument(
        "--folder", type=Path, help="use these images instead of a generated corpus"
    )
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batching", default="auto")
    parser.add_argument("--batch-size", default="auto")
    parser.add_argument("--workers", default="auto")
    parser.add_argument("--precision", default="fp32")
    parser.add_argument(
        "--compare-batching",
        action="store_true",
        help="also run (c) with padded and with same-size batching, and print the speed-up",
    )
    args = parser.parse_args()

    auto = lambda v: v if v == "auto" else int(v)  # noqa: E731
    config = Config(
        backbone=args.backbone,
        weights="none",
        device=args.device,
        batching=args.batching,
        batch_size=auto(args.batch_size),
        workers=auto(args.workers),
        precision=args.precision,
    )
    tmp = Path(tempfile.mkdtemp(prefix="spp-bench-"))
    if args.folder:
        paths = [Path(r.path) for r in images.find_images([args.folder])][: args.images]
    else:
        (tmp / "corpus").mkdir()
        (make_small_corpus if args.corpus == "small" else make_corpus)(tmp / "corpus", args.images)
        paths = sorted((tmp / "corpus").iterdir())
    device = torch.device(
        "cuda"
        if args.device == "auto" and torch.cuda.is_available()
        else ("cpu" if args.device == "auto" else args.device)
    )
    cores = len(__import__("os").sched_getaffinity(0))
    torch.set_num_threads(cores)
    trunk = build_trunk(config)
    trunk.module.to(device)
    runtime = Runtime.resolve(config, trunk, device=device)
    print(
        f"device: {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or platform.machine()}, {cores} cores)"
    )
    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, backbone {args.backbone}, "
        f"{len(paths)} images, mean {np.mean([Image.open(p).size[0] * Image.open(p).size[1] for p in paths]) / 1e6:.2f} MP, "
        f"batching {batching_name(runtime)}, precision {args.precision}"
    )

    naive(paths[:2], config, device, tmp / "warm.h5")  # warm-up
    t_a = naive(paths, config, device, tmp / "naive.h5")
    torch.set_num_threads(cores)
    t_b = compute_limit(paths, trunk, config, runtime)
    t_t = trunk_batched(paths, trunk, device)
    start = time.perf_counter()
    extract(paths, tmp / "spp.h5", config=config)
    t_c = time.perf_counter() - start
    n = len(paths)
    a, b, c, t = n / t_a, n / t_b, n / t_c, n / t_t
    print(f"(a) naive loop          {a:8.2f} img/s   (model set-up included)")
    print(f"(b) compute limit       {b:8.2f} img/s")
    print(f"(t) trunk alone, batched {t:7.2f} img/s   (64-px buckets of <= 32, no masks, no SPP)")
    print(
        f"(c) spp-extract         {c:8.2f} img/s   (model set-up, header reads and the final view included)"
    )
    print(f"c/a = {c / a:.2f}   c/b = {c / b:.2f}   c/t = {c / t:.2f}")
    if args.compare_batching:
        timings = {}
        for batching in ("padded", "same-size"):
            start = time.perf_counter()
            extract(paths, tmp / f"{batching}.h5", config=config.replace(batching=batching))
            timings[batching] = n / (time.perf_counter() - start)
            print(f"(c) with {batching:9s}   {timings[batching]:8.2f} img/s")
        print(f"masked padded / same-size = {timings['padded'] / timings['same-size']:.2f}")
    print(
        f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB (whole benchmark process)"
    )


if __name__ == "__main__":
    main()
