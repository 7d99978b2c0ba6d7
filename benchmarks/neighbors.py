"""`neighbors` at scale, side by side with FAISS on the same file, in one run:

  (1) spp-extract exact      neighbors(--index exact): FAISS IndexFlatIP + tie order + checks
  (2) FAISS IndexFlatIP      the same file read with h5py, normalised, searched directly
  (3) spp-extract approx     neighbors(--index approx): HNSW, recall@k measured by the tool
  (4) FAISS HNSW             the same index built and searched directly (--faiss-hnsw)

Each step runs in its own process, so its peak RSS is its own; times include reading the file.
Exact steps run up to --exact-max-rows rows (exact search is quadratic). Examples:

    python benchmarks/neighbors.py --rows 100000                      # about 4 minutes, 2 cores
    python benchmarks/neighbors.py --rows 1000000 --exact-max-rows 0  # approx only, ~14 min

Rows: synthetic, 256-d, non-negative with a decaying spectrum (benchmarks/retrieval.py's).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


def _vectors(path: Path) -> np.ndarray:
    import h5py

    with h5py.File(path, "r") as f:
        x = f["features"][:].astype(np.float32)
    x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    return x


def step(args: argparse.Namespace) -> None:
    """One timed step in this process; prints a JSON line."""
    path, k = Path(args.file), args.k
    started = time.perf_counter()
    result: dict[str, float] = {}
    if args.step in ("exact", "approx"):
        from spp_extract.neighbors import neighbors

        found = neighbors(path, k, index=args.step)
        result.update(build_s=found.build_seconds, search_s=found.search_seconds)
        if found.recall is not None:
            result["recall"] = found.recall
        np.save(Path(args.save), found.index)
    else:
        import faiss

        x = _vectors(path)
        d = x.shape[1]
        if args.step == "faiss-flat":
            index = faiss.IndexFlatIP(d)
        else:
            index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction = 64
        index.add(x)
        if args.step == "faiss-hnsw":
            index.hnsw.efSearch = 128
        _, found = index.search(x, k + 1)
        np.save(Path(args.save), found)
    result["seconds"] = time.perf_counter() - started
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def _run(name: str, file: Path, k: int, save: Path) -> dict[str, float]:
    out = subprocess.run(
        [sys.executable, __file__, "--step", name, "--file", str(file), "-k", str(k)]
        + ["--save", str(save)],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _agree(ours: np.ndarray, faiss_lists: np.ndarray, k: int) -> float:
    """Share of our lists' members that FAISS's own lists (itself removed) hold too."""
    hits = 0
    for row, (a, b) in enumerate(zip(ours, faiss_lists, strict=True)):
        b = [j for j in b.tolist() if j != row][:k]
        hits += len(set(a.tolist()) & set(b))
    return hits / ours.size


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("-k", "--k", type=int, default=10)
    parser.add_argument("--exact-max-rows", type=int, default=200_000)
    parser.add_argument("--faiss-hnsw", action="store_true", help="also time raw FAISS HNSW")
    parser.add_argument("--folder", default=None, help="where the files go (default: temp)")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.step:
        step(args)
        return
    import faiss
    from retrieval import make_file

    print(
        f"{os.cpu_count()} cores, faiss {faiss.__version__}, k = {args.k}, {args.dim}-d "
        "float32 rows; times include reading the file"
    )
    for rows in args.rows:
        with tempfile.TemporaryDirectory(dir=args.folder) as tmp:
            folder = Path(tmp)
            file = folder / "x.h5"
            started = time.perf_counter()
            make_file(file, rows, args.dim, "float32")
            print(f"\n{rows:,} rows ({time.perf_counter() - started:.0f} s to write the file)")
            lists = {}
            names = ["exact", "faiss-flat"] if rows <= args.exact_max_rows else []
            names += ["approx"] + (["faiss-hnsw"] if args.faiss_hnsw else [])
            results = {}
            for name in names:
                lists[name] = folder / f"{name}.npy"
                results[name] = r = _run(name, file, args.k, lists[name])
                extra = f", recall@{args.k} {r['recall']:.4f}" if "recall" in r else ""
                print(
                    f"  {name:11s} {r['seconds']:8.1f} s  peak RSS {r['peak_rss_mib']:7.0f} MiB"
                    + extra,
                    flush=True,
                )
            if "exact" in results:
                ratio = results["exact"]["seconds"] / results["faiss-flat"]["seconds"]
                same = _agree(np.load(lists["exact"]), np.load(lists["faiss-flat"]), args.k)
                print(f"  exact / FAISS flat = {ratio:.2f}; same neighbours: {same:.5f}")
                recall = _agree(np.load(lists["approx"]), np.load(lists["exact"]), args.k)
                print(f"  approx recall@{args.k} on every row (against exact): {recall:.4f}")


if __name__ == "__main__":
    main()
