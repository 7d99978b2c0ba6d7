"""The commands that read output files: inspect, merge, reduce, neighbors."""

from __future__ import annotations

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
from .errors import printable


def inspect(
    path: Annotated[Path, typer.Argument(help="An spp-extract HDF5 file.")],
    rows: Annotated[int, typer.Option(help="How many rows to show.")] = 3,
) -> None:
    """Print count, dimension, configuration, failures and a few rows of an output file."""
    from .reader import summary

    with reported():
        typer.echo("\n".join(summary(path, rows)))


def merge(
    source: Annotated[Path, typer.Argument(help="An spp-extract output (a view over shards).")],
    dest: Annotated[Path, typer.Argument(help="Self-contained HDF5 file to write.")],
    overwrite: Overwrite = False,
) -> None:
    """Copy an output and its shards into one self-contained HDF5 file."""
    from .view import merge as do_merge

    with reported(), stopped_by_signals():
        rows = do_merge(source, dest, overwrite=overwrite)
    typer.echo(f"{rows} rows -> {printable(str(dest))}", err=True)


def reduce(
    source: Annotated[Path, typer.Argument(help="An spp-extract HDF5 file.")],
    dest: Annotated[
        Path, typer.Argument(help="HDF5 file to write (reduced vectors and the transform).")
    ],
    dim: Annotated[int, typer.Option("--dim", help="Output dimension.")],
    whiten: Annotated[
        bool, typer.Option("--whiten", help="PCA-whitening (unit variance per axis).")
    ] = False,
    power: Annotated[
        float | None,
        typer.Option(
            "--power",
            help="Signed power normalisation first, e.g. 0.5 (default: off).",
            show_default=False,
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
    seed: Annotated[int, typer.Option("--seed", help="Seed of the row sample.")] = 0,
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
    source: Annotated[Path, typer.Argument(help="An spp-extract HDF5 file (full or reduced).")],
    k: Annotated[int, typer.Option("-k", "--k", help="Neighbours per row (itself excluded).")] = 10,
    output: Annotated[
        Path | None,
        typer.Option(
            "--output",
            "-o",
            help="HDF5 file: neighbors/index, neighbors/similarity, paths.",
            show_default=False,
        ),
    ] = None,
    pairs: Annotated[
        Path | None,
        typer.Option(
            "--pairs",
            help="CSV of near-duplicate pairs: path_a,path_b,similarity.",
            show_default=False,
        ),
    ] = None,
    threshold: Annotated[
        float, typer.Option("--threshold", help="Least cosine similarity of a pair in --pairs.")
    ] = 0.95,
    device: DeviceOption = "auto",
    overwrite: Overwrite = False,
    quiet: QuietOption = False,
) -> None:
    """Exact cosine top-k neighbours of every row; near-duplicate pairs with --pairs."""
    progress = ProgressBar(sys.stderr, enabled=not quiet)
    with reported(progress), stopped_by_signals():
        from .neighbors import find_neighbors, pairs_above

        found = find_neighbors(
            source,
            output,
            k,
            pairs=pairs,
            threshold=threshold,
            overwrite=overwrite,
            device=device,
            progress=progress,
        )
    progress.close()
    if not quiet:
        written = [printable(str(p)) for p in (output, pairs) if p is not None]
        count = f", {len(pairs_above(found, threshold)[0])} pairs >= {threshold}" if pairs else ""
        typer.echo(f"{len(found.index)} rows, k = {k}{count} -> {', '.join(written)}", err=True)
        if len(found.excluded):
            first = ", ".join(printable(p) for p in found.excluded_paths[:3])
            typer.echo(
                f"  note: {len(found.excluded)} rows left out (not finite), in no list: {first}"
                + (", ..." if len(found.excluded) > 3 else ""),
                err=True,
            )


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
