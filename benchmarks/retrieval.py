"""Time `reduce` and `neighbors` on a synthetic spp-extract file; peak RSS per step.

    python benchmarks/retrieval.py                                  # 20k x 43,008 float16
    python benchmarks/retrieval.py --rows 100000                    # the issue's 100k (8.6 GB file)
    python benchmarks/retrieval.py --rows 2000 --nn-rows 1000       # a quick look

Rows are non-negative (like max-pooled ReLU maps) with a decaying spectrum. Each step runs in
its own process, so `ru_maxrss` is that step's peak: (1) fit + project to --dim (`reduce`),
(2) neighbours on the reduced file, (3) neighbours on the first --nn-rows full-size rows.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_file(path: Path, rows: int, dim: int, dtype: str, seed: int = 0) -> None:
    """Write a synthetic spp-extract file (merged layout) in blocks of 1,000 rows."""
    from spp_extract.storage import ROW_FIELDS, run_attrs

    rng = np.random.default_rng(seed)
    rank = 64
    basis = rng.standard_normal((rank, dim)).astype(np.float32) * (0.9 ** np.arange(rank))[
        :, None
    ].astype(np.float32)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset(
            "features",
            shape=(rows, dim),
            dtype=dtype,
            chunks=(max(1, (1 << 20) // (dim * np.dtype(dtype).itemsize)), dim),
        )
        for start in range(0, rows, 1000):
            n = min(1000, rows - start)
            block = rng.standard_normal((n, rank), dtype=np.float32) @ basis
            block += rng.standard_normal((n, dim), dtype=np.float32)
            ds[start : start + n] = np.maximum(block, 0).astype(dtype)
        names = [f"img{i:07d}.jpg" for i in range(rows)]
        f.create_dataset("paths", data=names, dtype=h5py.string_dtype("utf-8"))
        raw = np.empty(rows, dtype=object)
        raw[:] = [np.frombuffer(p.encode(), np.uint8) for p in names]
        f.create_dataset("path_bytes", data=raw, dtype=h5py.vlen_dtype(np.dtype("uint8")))
        for name, (kind, width) in ROW_FIELDS.items():
            data = (
                ["RGB"] * rows
                if name == "mode"
                else np.zeros((rows, width) if width else rows, kind)
            )
            f.create_dataset(name, data=data, dtype=kind)
        failed = f.create_group("failed")
        for name in ("paths", "error_class", "errors"):
            failed.create_dataset(name, shape=(0,), dtype=h5py.string_dtype("utf-8"))
        f.attrs.update(
            run_attrs(
                backbone="resnet50",
                layer="layer4",
                weights="none",
                levels=[4, 2, 1],
                pooling="max",
                channels=dim // 21,
                feature_dim=dim,
                dtype=dtype,
                mean=[0.485, 0.456, 0.406],
                std=[0.229, 0.224, 0.225],
                config='weights = "none"\nseed = 0\n',
                layout="merged",
            )
        )


def step(args: argparse.Namespace) -> None:
    """One timed step in this process; prints a JSON line."""
    from spp_extract.neighbors import find_neighbors
    from spp_extract.projection import fit_projection, project_file

    folder = Path(args.folder)
    started = time.perf_counter()
    result: dict[str, float] = {}
    if args.step == "reduce":
        fitted = fit_projection(folder / "full.h5", dim=args.dim, sample=args.sample)
        result["fit_s"] = time.perf_counter() - started
        result["sample_rows"] = fitted.settings["sample_rows"]
        project_file(folder / "full.h5", folder / "small.h5", fitted, overwrite=True)
    elif args.step == "nn-small":
        find_neighbors(folder / "small.h5", folder / "nn.h5", args.k, overwrite=True)
    else:
        find_neighbors(folder / "nn_full.h5", folder / "nn2.h5", args.k, overwrite=True)
    result["seconds"] = time.perf_counter() - started
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--features", type=int, default=43_008, help="D (resnet50 {4,2,1}: 43,008)")
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument(
        "--sample", type=int, default=None, help="rows to fit on (default: reduce's)"
    )
    parser.add_argument("-k", "--k", type=int, default=10)
    parser.add_argument("--nn-rows", type=int, default=5_000, help="rows for full-size neighbours")
    parser.add_argument(
        "--folder", default=None, help="where the files go (default: a temp folder)"
    )
    parser.add_argument("--step", choices=["reduce", "nn-small", "nn-full"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        step(args)
        return
    with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
        folder = Path(tmp)
        started = time.perf_counter()
        make_file(folder / "full.h5", args.rows, args.features, args.dtype)
        make_file(folder / "nn_full.h5", args.nn_rows, args.features, args.dtype, seed=1)
        size = (folder / "full.h5").stat().st_size / 2**30
        print(
            f"synthetic {args.rows} x {args.features} {args.dtype} ({size:.2f} GiB) and "
            f"{args.nn_rows} x {args.features}: {time.perf_counter() - started:.0f} s to write"
        )
        for name, rows, what in [
            ("reduce", args.rows, f"reduce to {args.dim}"),
            ("nn-small", args.rows, f"neighbors k={args.k} on the {args.dim}-dim file"),
            ("nn-full", args.nn_rows, f"neighbors k={args.k} on {args.features}-dim rows"),
        ]:
            command = [
                sys.executable,
                __file__,
                "--step",
                name,
                "--folder",
                str(folder),
                "--dim",
                str(args.dim),
                "-k",
                str(args.k),
            ]
            if args.sample:
                command += ["--sample", str(args.sample)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            extra = (
                f", fit {result['fit_s']:.1f} s on {result['sample_rows']} rows"
                if "fit_s" in result
                else ""
            )
            print(
                f"{what}: {rows} rows in {result['seconds']:.1f} s = {rows / result['seconds']:,.0f} rows/s"
                f"{extra}; peak RSS {result['peak_rss_mib']:,.0f} MiB",
                flush=True,
            )


if __name__ == "__main__":
    main()
