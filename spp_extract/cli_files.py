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
    against: Annotated[
        Path | None,
        typer.Option(
            "--against",
            help="Search the rows of this collection (a comparable spp-extract file) instead "
            "of SOURCE's own rows.",
            show_default=False,
            metavar="COLLECTION",
        ),
    ] = None,
    index: Annotated[
        str,
        typer.Option(
            "--index",
            help="exact; approx (FAISS HNSW, recall measured and printed); auto (exact up to "
            "200,000 rows).",
            metavar="exact|approx|auto",
        ),
    ] = "auto",
    save_index: Annotated[
        Path | None,
        typer.Option(
            "--save-index",
            help="Save the collection's index here, to search it again with --index-file.",
            show_default=False,
            metavar="FILE",
        ),
    ] = None,
    index_file: Annotated[
        Path | None,
        typer.Option(
            "--index-file",
            help="Search with an index saved by --save-index (not rebuilt).",
            show_default=False,
            metavar="FILE",
        ),
    ] = None,
    groups: Annotated[
        Path | None,
        typer.Option(
            "--groups",
            help="CSV of near-duplicate groups (rows linked at >= --threshold), one line per "
            "member, with the group's representative (the largest image).",
            show_default=False,
            metavar="FILE",
        ),
    ] = None,
    html: Annotated[
        Path | None,
        typer.Option(
            "--html",
            help="A self-contained page of thumbnails: the groups (or, with --against, each "
            "row's neighbours).",
            show_default=False,
            metavar="FILE",
        ),
    ] = None,
    device: DeviceOption = "auto",
    overwrite: Overwrite = False,
    quiet: QuietOption = False,
) -> None:
    """Cosine top-k neighbours of every row (exact, or approximate with measured recall),
    printed or written (-o), among SOURCE's rows or --against a collection; near-duplicate
    pairs (--pairs), groups (--groups) and a page of thumbnails (--html); a histogram of
    nearest-neighbour similarities to choose --threshold."""
    from .listing import FORMATS

    progress = ProgressBar(sys.stderr, enabled=not quiet)
    with reported(progress), stopped_by_signals():
        if fmt is None and all(x is None for x in (output, pairs, groups, html, save_index)):
            fmt = "text"
        if fmt is not None and fmt not in FORMATS:
            raise ConfigError(f"format {fmt!r} is invalid; expected one of: {', '.join(FORMATS)}")
        from .neighbors import find_neighbors, pairs_above, pairs_across

        found = find_neighbors(
            source,
            output,
            k,
            against=against,
            pairs=pairs,
            groups=groups,
            html=html,
            threshold=threshold,
            absolute=absolute,
            overwrite=overwrite,
            index=index,
            index_file=index_file,
            save_index=save_index,
            device=device,
            progress=progress,
        )
        progress.close()
        if fmt is not None:
            _print_lists(source, against, found, fmt, absolute)
    if not quiet:
        written = [printable(str(p)) for p in (output, pairs, groups, html, save_index) if p]
        linked = pairs_across(found, threshold) if against else pairs_above(found, threshold)
        count = f", {len(linked[0])} pairs >= {threshold}" if pairs or groups else ""
        if found.groups is not None:
            members = sum(len(g.members) for g in found.groups)
            count += f", {len(found.groups)} groups ({members} rows)"
        where = f" -> {', '.join(written)}" if written else ""
        typer.echo(f"{len(found.index)} rows, k = {k}{count}{where}", err=True)
        typer.echo(f"  {_search_line(found)}", err=True)
        _similarity_histogram(found, threshold)
        if len(found.excluded):
            first = ", ".join(printable(p) for p in found.excluded_paths[:3])
            typer.echo(
                f"  note: {len(found.excluded)} rows left out (not finite), in no list: {first}"
                + (", ..." if len(found.excluded) > 3 else ""),
                err=True,
            )


def _search_line(found: Any) -> str:
    """How the search was done: engine, index, times, and for approximate search its
    measured recall."""
    how = f"{found.method} search ({found.engine}"
    if found.settings.get("index_type"):
        how += f" {found.settings['index_type']}"
    how += f"): built in {found.build_seconds:.1f} s, searched in {found.search_seconds:.1f} s"
    if found.recall is not None:
        k = found.index.shape[1]
        how += (
            f"; recall@{k} {found.recall:.4f} against exact search on "
            f"{found.recall_queries} queries"
        )
    return how


def _print_lists(source: Path, against: Path | None, found: Any, fmt: str, absolute: bool) -> None:
    """The lists on stdout; a reader that stops early (``| head``) ends it quietly."""
    import h5py

    from .listing import PathNames, write_lists

    try:
        with (
            h5py.File(source, "r", locking=False) as f,
            h5py.File(against or source, "r", locking=False) as g,
        ):
            write_lists(sys.stdout, found, PathNames(f, absolute), PathNames(g, absolute), fmt)
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
