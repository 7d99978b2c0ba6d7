"""The `spp-extract` command line: the only place with progress bars and exit codes."""

from __future__ import annotations

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from .config import int_or_auto, load_config, parse_levels, to_toml
from .errors import ConfigError, SppError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fixed-length CNN features for images at their native size (Spatial Pyramid Pooling).",
)

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file (see configs/).")]
BackboneOpt = Annotated[str | None, typer.Option(help="torchvision model name, e.g. resnet50.")]
LayerOpt = Annotated[str | None, typer.Option(help="Layer to pool, e.g. layer3 (default: the backbone's last conv stage).")]
WeightsOpt = Annotated[str | None, typer.Option(help="DEFAULT, a weights name (IMAGENET1K_V2), 'none' (seeded random init) or a state-dict file.")]
LevelsOpt = Annotated[str | None, typer.Option(help="Pyramid levels, comma-separated, e.g. 6,3,2,1.")]
PoolingOpt = Annotated[str | None, typer.Option(help="max or avg.")]


@app.callback()
def _command_line() -> None:
    from .errors import use_command_line_terms

    use_command_line_terms()  # messages name --flags, not Python keywords


def _overrides(**values: Any) -> dict[str, Any]:
    if values.get("levels") is not None:
        values["levels"] = parse_levels(values["levels"])
    for name in ("batch_size", "batch_pixels", "workers"):
        if values.get(name) is not None:
            values[name] = int_or_auto(name.replace("_", "-"))(values[name])
    return values


def _fail(exc: SppError) -> typer.Exit:
    typer.echo(f"spp-extract: error: {exc}", err=True)
    return typer.Exit(exc.exit_code)


@app.command()
def extract(
    inputs: Annotated[list[Path] | None, typer.Argument(help="Image files and folders (walked recursively).", show_default=False)] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="HDF5 file to write.")] = Path("features.h5"),
    config: ConfigOpt = None,
    backbone: BackboneOpt = None,
    layer: LayerOpt = None,
    weights: WeightsOpt = None,
    levels: LevelsOpt = None,
    pooling: PoolingOpt = None,
    batch_size: Annotated[str | None, typer.Option(help="Most images per batch, or auto.")] = None,
    batch_pixels: Annotated[str | None, typer.Option(help="Most padded pixels per batch, or auto.")] = None,
    batching: Annotated[str | None, typer.Option(help="auto, same-size or padded (exact masked padding).")] = None,
    workers: Annotated[str | None, typer.Option(help="Decode processes, or auto.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = None,
    dtype: Annotated[str | None, typer.Option(help="Stored precision: float32 or float16.")] = None,
    precision: Annotated[str | None, typer.Option(help="Compute precision: fp32 (exact), bf16 or fp16.")] = None,
    max_pixels: Annotated[int | None, typer.Option(help="Refuse (per image) images with more pixels.")] = None,
    allow_truncated: Annotated[bool | None, typer.Option("--allow-truncated", help="Decode truncated files and mark their rows.", show_default=False)] = None,
    follow_symlinks: Annotated[bool | None, typer.Option("--follow-symlinks", help="Follow directory symlinks while walking.", show_default=False)] = None,
    files_from: Annotated[Path | None, typer.Option(help="File with one image path per line.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue an interrupted or earlier run (starts one if none).")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output once the new run has finished.")] = False,
    retry_failed: Annotated[bool, typer.Option(help="With --resume: try the failed images again.")] = False,
    strict: Annotated[bool, typer.Option(help="Exit 1 if any image failed.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")] = False,
) -> None:
    """Extract one SPP vector per image into an HDF5 file."""
    from .pipeline import extract as run

    logging.basicConfig(level=logging.WARNING, format="spp-extract: %(message)s")
    bar = None
    try:
        cfg = load_config(config, **_overrides(
            backbone=backbone, layer=layer, weights=weights, levels=levels, pooling=pooling,
            batch_size=batch_size, batch_pixels=batch_pixels, batching=batching, workers=workers,
            device=device, dtype=dtype, precision=precision, max_pixels=max_pixels,
            allow_truncated=allow_truncated, follow_symlinks=follow_symlinks,
        ))  # fmt: skip
        if not inputs and files_from is None:
            raise ConfigError("no inputs; give image folders or files, or --files-from LIST")

        main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 reports

        def progress(done: int, total: int) -> None:
            nonlocal bar
            if quiet or not main_rank:
                return
            if bar is None:
                from tqdm import tqdm

                bar = tqdm(total=total, unit="img", dynamic_ncols=True, file=sys.stderr)
            bar.update(done - bar.n)

        result = run(inputs or [], output, config=cfg, files_from=files_from, resume=resume,
                     overwrite=overwrite, retry_failed=retry_failed, progress=progress)  # fmt: skip
    except KeyboardInterrupt:  # before anything was written (loading the model, say)
        typer.echo("spp-extract: interrupted before any work was done", err=True)
        raise typer.Exit(130) from None
    except SppError as exc:
        if bar is not None:
            bar.close()
        if exc.exit_code >= 128:
            command = " ".join(shlex.quote(a) for a in sys.argv)
            if "--resume" not in sys.argv:
                command += " --resume"
            typer.echo(f"spp-extract: {exc}\n  resume with: {command}", err=True)
            raise typer.Exit(exc.exit_code) from None
        raise _fail(exc) from None
    if bar is not None:
        bar.close()
    if not quiet and main_rank:
        typer.echo(
            f"{result.images} images, {result.failed} failed, {result.feature_dim}-dim vectors, "
            f"{result.seconds:.1f} s -> {result.output}", err=True,
        )  # fmt: skip
        if result.overlaps:
            typer.echo(f"  note: {result.overlaps} files named by more than one input were "
                       "used once (under the first input's path)", err=True)  # fmt: skip
        for path, kind, message in result.failures[:10]:
            typer.echo(f"  failed: {path}: {kind}: {message}", err=True)
        if len(result.failures) > 10:
            typer.echo(f"  ... {len(result.failures) - 10} more (spp-extract inspect lists all)", err=True)
    if strict and result.failed:
        raise typer.Exit(1)


@app.command()
def backbones(
    levels: Annotated[str, typer.Option(help="Pyramid levels for the vector length.")] = "4,2,1",
) -> None:
    """List supported backbones: default layer, channels, vector length, exact mixed batching."""
    from .backbones import describe, supported_backbones
    from .pooling import spp_dim

    try:
        pyramid = parse_levels(levels)
        load_config(None, levels=pyramid)
    except SppError as exc:
        raise _fail(exc) from None
    typer.echo(f"{'backbone':<22}{'default layer':<16}{'channels':>9}{'dim':>10}  padded batching")
    for name in supported_backbones():
        layer, channels, maskable = describe(name)
        dim = spp_dim(channels, pyramid)
        typer.echo(f"{name:<22}{layer:<16}{channels:>9}{dim:>10}  {'yes' if maskable else 'no (same-size)'}")


@app.command("config")
def show_config(
    config: ConfigOpt = None,
    backbone: BackboneOpt = None,
    layer: LayerOpt = None,
    weights: WeightsOpt = None,
    levels: LevelsOpt = None,
    pooling: PoolingOpt = None,
) -> None:
    """Print the resolved configuration as TOML (file < flags, defaults filled in)."""
    from .backbones import resolve
    from .pipeline import resolved_config

    try:
        cfg = load_config(config, **_overrides(
            backbone=backbone, layer=layer, weights=weights, levels=levels, pooling=pooling))
        typer.echo(to_toml(resolved_config(cfg, resolve(cfg))), nl=False)
    except SppError as exc:
        raise _fail(exc) from None


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="An spp-extract HDF5 file.")],
    rows: Annotated[int, typer.Option(help="How many rows to show.")] = 3,
) -> None:
    """Print count, dimension, configuration, failures and a few rows of an output file."""
    from .writer import check_sources, summary

    try:
        check_sources(path)
        typer.echo("\n".join(summary(path, rows)))
    except SppError as exc:
        raise _fail(exc) from None


@app.command()
def merge(
    source: Annotated[Path, typer.Argument(help="An spp-extract output (a view over shards).")],
    dest: Annotated[Path, typer.Argument(help="Self-contained HDF5 file to write.")],
    overwrite: Annotated[bool, typer.Option(help="Replace DEST if it exists.")] = False,
) -> None:
    """Copy an output and its shards into one self-contained HDF5 file."""
    from .writer import merge as do_merge

    try:
        if dest.exists() and not overwrite:
            raise ConfigError(f"'{dest}' exists; pass --overwrite to replace it")
        rows = do_merge(source, dest)
    except SppError as exc:
        raise _fail(exc) from None
    typer.echo(f"{rows} rows -> {dest}", err=True)


def main() -> None:
    app(prog_name="spp-extract")


__all__ = ["app", "main"]
