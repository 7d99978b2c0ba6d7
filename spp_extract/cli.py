"""The `spp-extract` command line: the only place with progress bars and exit codes."""

from __future__ import annotations

import contextlib
import functools
import inspect as pyinspect
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Annotated, Any

import typer

from .config import (
    Config,
    int_or_auto,
    int_or_none,
    load_config,
    parse_levels,
    size_or_auto,
    to_toml,
)
from .errors import ConfigError, Interrupted, SppError, printable

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain click help: typer's rich panels print "<bool>" beside every flag (even --help),
    # and importing rich makes `--help` slower.
    rich_markup_mode=None,
    help="Fixed-length CNN features for images at their native size (Spatial Pyramid Pooling).",
)

# Every configuration flag, declared once: `extract` and `config` both take all of them (see
# _config_flags). A flag left out is None, "not given", so a config file's value stands.
CONFIG_FLAGS: dict[str, Any] = {
    "config": Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML config file (see configs/).", show_default=False),
    ],
    "backbone": Annotated[
        str | None, typer.Option(help="torchvision model name, e.g. resnet50.", show_default=False)
    ],
    "layer": Annotated[
        str | None,
        typer.Option(
            help="Layer to pool, e.g. layer3 (default: the backbone's last conv stage).",
            show_default=False,
        ),
    ],
    "weights": Annotated[
        str | None,
        typer.Option(
            help="DEFAULT, a weights name (IMAGENET1K_V2), 'none' (seeded random init) or a state-dict file.",
            show_default=False,
        ),
    ],
    "levels": Annotated[
        str | None,
        typer.Option(
            metavar="N,N,...",
            help="Pyramid levels, comma-separated, e.g. 6,3,2,1 (1-8 levels, each 1-16).",
            show_default=False,
        ),
    ],
    "pooling": Annotated[str | None, typer.Option(help="max or avg.", show_default=False)],
    "batch_size": Annotated[
        str | None,
        typer.Option(metavar="N|auto", help="Most images per batch, or auto.", show_default=False),
    ],
    "batch_pixels": Annotated[
        str | None,
        typer.Option(
            metavar="N|auto", help="Most padded pixels per batch, or auto.", show_default=False
        ),
    ],
    "batching": Annotated[
        str | None,
        typer.Option(help="auto, same-size or padded (exact masked padding).", show_default=False),
    ],
    "workers": Annotated[
        str | None,
        typer.Option(metavar="N|auto", help="Decode processes, or auto.", show_default=False),
    ],
    "device": Annotated[
        str | None, typer.Option(help="auto, cpu, cuda, cuda:N or mps.", show_default=False)
    ],
    "dtype": Annotated[
        str | None, typer.Option(help="Stored precision: float32 or float16.", show_default=False)
    ],
    "precision": Annotated[
        str | None,
        typer.Option(help="Compute precision: fp32 (exact), bf16 or fp16.", show_default=False),
    ],
    "max_pixels": Annotated[
        str | None,
        typer.Option(
            metavar="N|none",
            help="Refuse (per image) images with more pixels; none: no limit (trusted inputs).",
            show_default=False,
        ),
    ],
    "max_memory": Annotated[
        str | None,
        typer.Option(
            metavar="SIZE|auto",
            help="Memory one image's forward may use, e.g. 4GB (auto: half the free memory; GPU: 80% of free device memory). Larger images are tiled, exactly.",
            show_default=False,
        ),
    ],
    "allow_truncated": Annotated[
        bool | None,
        typer.Option(
            "--allow-truncated/--no-allow-truncated",
            help="Decode truncated files and mark their rows.",
            show_default=False,
        ),
    ],
    "follow_symlinks": Annotated[
        bool | None,
        typer.Option(
            "--follow-symlinks/--no-follow-symlinks",
            help="Follow directory symlinks while walking.",
            show_default=False,
        ),
    ],
}
_PARSERS: dict[str, Callable[[str], Any]] = {
    "levels": parse_levels,
    "batch_size": int_or_auto("batch-size"),
    "batch_pixels": int_or_auto("batch-pixels"),
    "workers": int_or_auto("workers"),
    "max_pixels": int_or_none("max-pixels"),
    "max_memory": size_or_auto("max-memory"),
}


def config_from_flags(config: Path | None = None, **flags: Any) -> Config:
    """The configuration from a config file and the flags given (None = not given)."""
    values = {k: _PARSERS[k](v) if k in _PARSERS and v is not None else v for k, v in flags.items()}
    return load_config(config, **values)


def _config_flags(command: Callable[..., None]) -> Callable[..., None]:
    """Give ``command`` every configuration flag, in place of its ``cfg`` parameter, and call it
    with the resulting Config as ``cfg`` (a bad value exits 2 before the command runs)."""
    own = pyinspect.signature(command, eval_str=True)
    params: list[pyinspect.Parameter] = []
    for name, param in own.parameters.items():
        if name != "cfg":
            params.append(param.replace(kind=pyinspect.Parameter.KEYWORD_ONLY))
            continue
        params += [
            pyinspect.Parameter(
                flag, pyinspect.Parameter.KEYWORD_ONLY, default=None, annotation=annotation
            )
            for flag, annotation in CONFIG_FLAGS.items()
        ]

    @functools.wraps(command)
    def with_config(**kwargs: Any) -> None:
        flags = {name: kwargs.pop(name) for name in CONFIG_FLAGS}
        try:
            cfg = config_from_flags(**flags)
        except SppError as exc:
            raise _fail(exc) from None
        command(cfg=cfg, **kwargs)

    with_config.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
    with_config.__annotations__ = {p.name: p.annotation for p in params}
    return with_config


def _fail(exc: SppError) -> typer.Exit:
    if not getattr(exc, "reported_by_rank0", False):  # under torchrun: one line, not one a rank
        prefix = "" if exc.exit_code >= 128 else "error: "  # an interruption is no error
        typer.echo(f"spp-extract: {prefix}{printable(str(exc))}", err=True)
    return typer.Exit(exc.exit_code)


def _version() -> str:
    from . import __version__

    return __version__


def _show_version(value: bool) -> None:
    if value:
        typer.echo(f"spp-extract {_version()}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_show_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Fixed-length CNN features for images at their native size (Spatial Pyramid Pooling)."""
    from .errors import COMMAND_LINE

    token = COMMAND_LINE.set(True)  # messages name --flags, not Python keywords
    ctx.call_on_close(lambda: COMMAND_LINE.reset(token))


@contextlib.contextmanager
def _stopped_by_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise ``Interrupted`` (exit 130/143, one line) instead of ending the
    process where it stands: the command's temporary file is removed on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: Any) -> None:
        raise Interrupted(signum, "nothing was written; run the command again")

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class Progress:
    """The progress display on ``stream``: a one-line status and a tqdm bar, only on a terminal
    (a log gets the summary line instead) and only when there is work to show."""

    def __init__(self, stream: IO[str], *, enabled: bool = True) -> None:
        self.stream = stream
        self.enabled = enabled and stream.isatty()
        self.bar: Any = None

    def status(self, text: str) -> None:
        if self.enabled:
            print(f"spp-extract: {text}", file=self.stream, flush=True)

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or (self.bar is None and total == 0):
            return
        if (
            self.bar is not None and self.bar.total != total
        ):  # the next phase (reduce: fit, project)
            self.close()
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="img", dynamic_ncols=True, file=self.stream)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _program(argv0: str) -> list[str]:
    """How the user started us: `python -m spp_extract` (also under torchrun) or `spp-extract`."""
    if Path(argv0).name == "__main__.py":
        return [os.path.basename(sys.executable) or "python", "-m", "spp_extract"]
    return ["spp-extract"]


def _shell_word(word: str) -> str:
    """``word`` quoted for a POSIX shell; non-UTF-8 bytes and control characters as $'\\xe9'."""
    if printable(word) == word:
        return shlex.quote(word)
    return "$'" + printable(word.replace("\\", "\\\\").replace("'", "\\'")) + "'"


def resume_command(
    program: list[str], command: str, given: list[tuple[str, Any]], inputs: list[str]
) -> str:
    """The command line that continues a run: ``given`` are (option, value) pairs from the
    parsed arguments (value True for a flag); --overwrite is dropped and --resume added once."""
    words = [*program, command]
    for option, value in given:
        if option in ("--overwrite", "--resume"):
            continue
        words += [option] if value is True else [option, str(value)]
    words.append("--resume")
    if any(i.startswith("-") for i in inputs):
        words.append("--")
    return " ".join(_shell_word(w) for w in [*words, *inputs])


def _given(ctx: typer.Context) -> tuple[list[tuple[str, Any]], list[str]]:
    """The options given on the command line, as (option, value), and the positional inputs."""
    given: list[tuple[str, Any]] = []
    inputs: list[str] = []
    for param in ctx.command.params:
        name = param.name or ""
        source = ctx.get_parameter_source(name)
        value = ctx.params.get(name)
        if source is None or source.name != "COMMANDLINE" or value is None:
            continue
        if param.param_type_name == "argument":
            inputs = [str(v) for v in value]
        elif getattr(param, "is_flag", False) and isinstance(value, bool):
            opts = param.opts if value else param.secondary_opts
            if opts:  # a one-sided flag given as False cannot happen
                given.append((max(opts, key=len), True))
        else:
            given.append((max(param.opts, key=len), value))
    return given, inputs


@app.command()
@_config_flags
def extract(
    ctx: typer.Context,
    inputs: Annotated[
        list[Path] | None,
        typer.Argument(help="Image files and folders (walked recursively).", show_default=False),
    ] = None,
    output: Annotated[Path, typer.Option("--output", "-o", help="HDF5 file to write.")] = Path(
        "features.h5"
    ),
    cfg: Config | None = None,
    files_from: Annotated[
        Path | None, typer.Option(help="File with one image path per line.", show_default=False)
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue an interrupted or earlier run (starts one if none)."
        ),
    ] = False,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Replace an existing output once the new run has finished."
        ),
    ] = False,
    retry_failed: Annotated[
        bool, typer.Option("--retry-failed", help="With --resume: try the failed images again.")
    ] = False,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict", help="Exit 1 if any image failed (one line says so, even with --quiet)."
        ),
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No status, progress bar or summary.")
    ] = False,
    project: Annotated[
        Path | None,
        typer.Option(
            "--project",
            help="A file written by `reduce`: OUTPUT holds the vectors projected by its transform (the full vectors go to OUTPUT.full.h5).",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Extract one SPP vector per image into an HDF5 file."""
    assert cfg is not None  # given by _config_flags
    logging.basicConfig(level=logging.WARNING, format="spp-extract: %(message)s")
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 reports
    if not quiet and main_rank:
        logging.getLogger("spp_extract.backbones").setLevel(logging.INFO)  # "downloading ..."
    progress = Progress(sys.stderr, enabled=not quiet and main_rank)
    try:
        if not inputs and files_from is None:
            raise ConfigError("no inputs; give image folders or files, or --files-from LIST")
        progress.status(f"loading {cfg.backbone} ...")  # before torch's import: seconds
        from .pipeline import extract as run

        projection, target = None, output
        if project is not None:  # checked before anything is written
            from .retrieval import full_output, load_for_extract

            projection = load_for_extract(project, cfg, output, resume=resume, overwrite=overwrite)
            target = full_output(output)
        result = run(
            inputs or [],
            target,
            config=cfg,
            files_from=files_from,
            resume=resume,
            overwrite=overwrite,
            retry_failed=retry_failed,
            progress=progress,
        )
        if projection is not None:
            from .retrieval import project_file

            progress.close()
            if main_rank:  # under torchrun every rank returns here; one writes the projection
                project_file(target, output, projection, overwrite=True, progress=progress)
            result.output, result.feature_dim = output, projection.dim
    except KeyboardInterrupt:  # before anything was written (loading the model, say)
        progress.close()
        typer.echo("spp-extract: interrupted before any work was done", err=True)
        raise typer.Exit(130) from None
    except SppError as exc:
        progress.close()
        if exc.exit_code >= 128:
            command = resume_command(
                _program(sys.argv[0]), ctx.info_name or "extract", *_given(ctx)
            )
            typer.echo(f"spp-extract: {printable(str(exc))}\n  resume with: {command}", err=True)
            raise typer.Exit(exc.exit_code) from None
        raise _fail(exc) from None
    progress.close()
    if not quiet and main_rank:
        typer.echo(
            f"{result.images} images, {result.failed} failed, {result.feature_dim}-dim vectors, "
            f"{result.seconds:.1f} s -> {printable(str(result.output))}",
            err=True,
        )
        if result.overlaps:
            typer.echo(
                f"  note: {result.overlaps} files named by more than one input were "
                "used once (under the first input's path)",
                err=True,
            )
        for path, kind, message in result.failures[:10]:
            typer.echo(f"  failed: {printable(path)}: {kind}: {printable(message)}", err=True)
        if len(result.failures) > 10:
            typer.echo(
                f"  ... {len(result.failures) - 10} more (spp-extract inspect lists all)", err=True
            )
    if strict and result.failed:
        if main_rank:
            typer.echo(f"spp-extract: {result.failed} images failed (--strict)", err=True)
        raise typer.Exit(1)


@app.command()
def backbones(
    levels: Annotated[str, typer.Option(help="Pyramid levels for the vector length.")] = "4,2,1",
) -> None:
    """List supported backbones: default layer, channels, vector length, exact mixed batching."""
    try:
        pyramid = load_config(None, levels=parse_levels(levels)).levels
    except SppError as exc:
        raise _fail(exc) from None
    from .backbones import describe, supported_backbones
    from .pooling import spp_dim

    typer.echo(f"{'backbone':<22}{'default layer':<16}{'channels':>9}{'dim':>10}  padded batching")
    for name in supported_backbones():
        layer, channels, maskable = describe(name)
        dim = spp_dim(channels, pyramid)
        typer.echo(
            f"{name:<22}{layer:<16}{channels:>9}{dim:>10}  {'yes' if maskable else 'no (same-size)'}"
        )


@app.command("config")
@_config_flags
def show_config(cfg: Config | None = None) -> None:
    """Print the resolved configuration as TOML (file < flags, defaults filled in)."""
    assert cfg is not None  # given by _config_flags
    from .backbones import resolve
    from .config import resolved_config

    try:
        typer.echo(to_toml(resolved_config(cfg, resolve(cfg))), nl=False)
    except SppError as exc:
        raise _fail(exc) from None


@app.command()
def inspect(
    path: Annotated[Path, typer.Argument(help="An spp-extract HDF5 file.")],
    rows: Annotated[int, typer.Option(help="How many rows to show.")] = 3,
) -> None:
    """Print count, dimension, configuration, failures and a few rows of an output file."""
    from .reader import summary

    try:
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
    from .view import merge as do_merge

    try:
        with _stopped_by_signals():
            rows = do_merge(source, dest, overwrite=overwrite)
    except SppError as exc:
        raise _fail(exc) from None
    typer.echo(f"{rows} rows -> {printable(str(dest))}", err=True)


@app.command()
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
    device: Annotated[
        str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")
    ] = "auto",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace DEST if it exists.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")
    ] = False,
) -> None:
    """PCA (--whiten: PCA-whitening) fitted on a sample, applied to every row: power, L2,
    centre, project, whiten, L2."""
    progress = Progress(sys.stderr, enabled=not quiet)
    try:
        from .retrieval import reduce as do_reduce

        with _stopped_by_signals():
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
    except SppError as exc:
        progress.close()
        raise _fail(exc) from None
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


@app.command()
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
    device: Annotated[
        str, typer.Option("--device", help="auto (CUDA when present), cpu, cuda or cuda:N.")
    ] = "auto",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the outputs if they exist.")
    ] = False,
    quiet: Annotated[
        bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")
    ] = False,
) -> None:
    """Exact cosine top-k neighbours of every row; near-duplicate pairs with --pairs."""
    progress = Progress(sys.stderr, enabled=not quiet)
    try:
        from .retrieval import find_neighbors, pairs_above

        with _stopped_by_signals():
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
    except SppError as exc:
        progress.close()
        raise _fail(exc) from None
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
        left_out = int((f["failed/error_class"].asstr()[:] == "non_finite").sum())
    if left_out:
        notes.append(f"{left_out} rows are not finite: moved to failed/ (class non_finite)")
    return notes


def main() -> None:
    app(prog_name="spp-extract")


__all__ = ["app", "main"]
