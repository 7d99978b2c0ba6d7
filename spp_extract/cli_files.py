"""The commands that read output files: inspect, merge, reduce, neighbors."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .cli_support import (
    DeviceOption,
    Overwrite,
    ProgressBar,
    QuietOption,
    reported,
    stopped_by_signals,
)
from .errors import ConfigError, printable


def inspect(
    path: Annotated[Path, typer.Argument(help="An spp-extract HDF5 file.", metavar="FILE")],
    rows: Annotated[int, typer.Option(help="How many rows to show.", metavar="N")] = 3,
) -> None:
    """Describe any file spp-extract writes: an extraction (count, dimension, inputs,
    configuration, failures, a few rows), a reduce output (the reduction too), a neighbors
    output (k, source, similarities, a few lists)."""
    from .inspection import summary

    with reported():
        typer.echo("\n".join(summary(path, rows)))


def merge(
    source: Annotated[
        Path, typer.Argument(help="An spp-extract output (a view over shards).", metavar="SOURCE")
    ],
    dest: Annotated[
        Path, typer.Argument(help="Self-contained HDF5 file to write.", metavar="DEST")
    ],
    overwrite: Overwrite = False,
) -> None:
    """Copy an output and its shards into one self-contained HDF5 file."""
    from .view import merge as do_merge

    with reported(), stopped_by_signals():
        rows = do_merge(source, dest, overwrite=overwrite)
    typer.echo(f"{rows} rows -> {printable(str(dest))}", err=True)


def reduce(
    source: Annotated[Path, typer.Argument(help="An spp-extract HDF5 file.", metavar="SOURCE")],
    dest: Annotated[
        Path,
        typer.Argument(
            help="HDF5 file to write (reduced vectors and the transform).", metavar="DEST"
        ),
    ],
    dim: Annotated[int, typer.Option("--dim", help="Output dimension.", metavar="N")],
    whiten: Annotated[
        bool, typer.Option("--whiten", help="PCA-whitening (unit variance per axis).")
    ] = False,
    power: Annotated[
        float | None,
        typer.Option(
            "--power",
            help="Signed power normalisation first, e.g. 0.5 (default: off).",
            show_default=False,
            metavar="P",
        ),
    ] = None,
    l2: Annotated[
        bool | None,
        typer.Option(
            "--l2/--no-l2",
            help="L2-normalise rows before centring and after projecting (default: on with --whiten).",
            show_default=False,
        ),
    ] = None,
    sample: Annotated[
        int | None,
        typer.Option(
            "--sample",
            metavar="N",
            help="Rows to fit on (default: 100000, at most ~2 GiB of float32, at most all).",
            show_default=False,
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the row sample.", metavar="N")] = 0,
    device: DeviceOption = "auto",
    overwrite: Overwrite = False,
    quiet: QuietOption = False,
) -> None:
    """PCA (--whiten: PCA-whitening) fitted on a sample, applied to every row: power, L2,
    centre, project, whiten, L2."""
    progress = ProgressBar(sys.stderr, enabled=not quiet)
    with reported(progress), stopped_by_signals():
        from .projection import reduce as do_reduce

        fitted = do_reduce(
            source,
            dest,
            dim=dim,
            whiten=whiten,
            power=power,
            l2=l2,
            sample=sample,
            seed=seed,
            overwrite=overwrite,
            device=device,
            progress=progress,
        )
    progress.close()
    if not quiet:
        kept = float(fitted.explained_variance.sum()) / max(
            fitted.settings["total_variance"], 1e-30
        )
        typer.echo(
            f"{fitted.settings['source_rows']} rows, {fitted.input_dim} -> {fitted.dim} dims "
            f"(fitted on {fitted.settings['sample_rows']} rows, {kept:.1%} of their variance)"
            f" -> {printable(str(dest))}",
            err=True,
        )
        for note in reduce_notes(fitted, dest):
            typer.echo(f"  note: {note}", err=True)


def neighbors(
    source: Annotated[
        Path, typer.Argument(help="An spp-extract HDF5 file (full or reduced).", metavar="SOURCE")
    ],
    k: Annotated[
        int, typer.Option("-k", "--k", help="Neighbours per row (itself excluded).", metavar="K")
    ] = 10,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="HDF5 file: neighbors/index, neighbors/similarity, paths.",
            show_default=False,
            metavar="FILE",
        ),
    ] = None,
    pairs: Annotated[
        Path | None,
        typer.Option(
            "--pairs",
            help="CSV of near-duplicate pairs: path_a,path_b,similarity.",
            show_default=False,
            metavar="FILE",
        ),
    ] = None,
    threshold: Annotated[
        float,
        typer.Option(
            "--threshold", help="Least cosine similarity of a pair in --pairs.", metavar="COSINE"
        ),
    ] = 0.95,
    fmt: Annotated[
        str | None,
        typer.Option(
            "--format",
            help="Print the lists on stdout as text, csv or jsonl (default: text when no file "
            "is written).",
            show_default=False,
            metavar="text|csv|jsonl",
        ),
    ] = None,
    absolute: Annotated[
        bool,
        typer.Option(
            "--absolute",
            help="Paths joined with the input folder each image was read from, so they open "
            "from anywhere (default: as stored, relative to it).",
        ),
    ] = False,
    device: DeviceOption = "auto",
    overwrite: Overwrite = False,
    quiet: QuietOption = False,
) -> None:
    """Exact cosine top-k neighbours of every row, printed or written (-o); near-duplicate
    pairs with --pairs; a histogram of nearest-neighbour similarities to choose --threshold."""
    from .listing import FORMATS

    progress = ProgressBar(sys.stderr, enabled=not quiet)
    with reported(progress), stopped_by_signals():
        if fmt is None and output is None and pairs is None:
            fmt = "text"
        if fmt is not None and fmt not in FORMATS:
            raise ConfigError(f"format {fmt!r} is invalid; expected one of: {', '.join(FORMATS)}")
        from .neighbors import find_neighbors, pairs_above

        found = find_neighbors(
            source,
            output,
            k,
            pairs=pairs,
            threshold=threshold,
            absolute=absolute,
            overwrite=overwrite,
            device=device,
            progress=progress,
        )
        progress.close()
        if fmt is not None:
            _print_lists(source, found, fmt, absolute)
    if not quiet:
        written = [printable(str(p)) for p in (output, pairs) if p is not None]
        count = f", {len(pairs_above(found, threshold)[0])} pairs >= {threshold}" if pairs else ""
        where = f" -> {', '.join(written)}" if written else ""
        typer.echo(f"{len(found.index)} rows, k = {k}{count}{where}", err=True)
        _similarity_histogram(found, threshold)
        if len(found.excluded):
            first = ", ".join(printable(p) for p in found.excluded_paths[:3])
            typer.echo(
                f"  note: {len(found.excluded)} rows left out (not finite), in no list: {first}"
                + (", ..." if len(found.excluded) > 3 else ""),
                err=True,
            )


def _print_lists(source: Path, found: Any, fmt: str, absolute: bool) -> None:
    """The lists on stdout; a reader that stops early (``| head``) ends it quietly."""
    import h5py

    from .listing import PathNames, write_lists

    try:
        with h5py.File(source, "r", locking=False) as f:
            names = PathNames(f, absolute)
            write_lists(sys.stdout, found, names, names, fmt)
            sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # no second error when Python flushes at exit
        raise typer.Exit(0) from None


def _similarity_histogram(found: Any, threshold: float) -> None:
    import numpy as np

    from .listing import histogram

    kept = np.ones(len(found.index), bool)
    kept[found.excluded] = False
    nearest = found.similarity[kept, 0] if found.index.shape[1] else found.similarity[:0, 0]
    lines = histogram(nearest, threshold)
    if lines:
        typer.echo("similarity of each row's nearest neighbour:", err=True)
        typer.echo("\n".join(lines), err=True)


def reduce_notes(fitted: Any, dest: Path) -> list[str]:
    """What ``reduce`` did beyond the asked (capped dimension, rows left out)."""
    import h5py

    notes = []
    settings = fitted.settings
    if settings.get("requested_dim", fitted.dim) > fitted.dim:
        notes.append(
            f"the sample has numerical rank {settings['rank']}, under --dim "
            f"{settings['requested_dim']}: whitened to {fitted.dim} axes (the others hold "
            "rounding noise, which whitening would blow up)"
        )
    with h5py.File(dest, "r", locking=False) as f:
        left_out = int((f["failed/error_class"].asstr(errors="replace")[:] == "non_finite").sum())
    if left_out:
        notes.append(f"{left_out} rows are not finite: moved to failed/ (class non_finite)")
    return notes
