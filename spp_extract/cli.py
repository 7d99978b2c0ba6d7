"""The `spp-extract` command line: the only place with progress bars and exit codes."""

from __future__ import annotations

import functools
import inspect as pyinspect
import logging
import os
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, get_type_hints

import typer

from . import cli_files
from .cli_support import Command, ProgressBar, reported
from .config import RULES, Config, from_command_line, load_config, parse_levels, to_toml
from .errors import ConfigError, printable

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # Plain click help: typer's rich panels print "<bool>" beside every flag (even --help),
    # and importing rich makes `--help` slower.
    rich_markup_mode=None,
    help="Fixed-length CNN features for images at their native size (Spatial Pyramid Pooling).",
)


def _flag(name: str) -> Any:
    """The command-line option of configuration key ``name``, from its ``config.Key``: text
    parsed by the key's parser, or ``--x/--no-x`` for a true/false key. Not given: None, so
    that a config file's value stands."""
    rules, flag = RULES[name], name.replace("_", "-")
    if get_type_hints(Config)[name] is bool:
        option = typer.Option(f"--{flag}/--no-{flag}", help=rules.help, show_default=False)
        return Annotated[bool | None, option]
    metavar = rules.metavar or name.upper()
    option = typer.Option(f"--{flag}", help=rules.help, metavar=metavar, show_default=False)
    return Annotated[str | None, option]


# Every configuration flag, made from the keys' own declarations (config.Config): `extract`
# and `config` both take all of them (see _config_flags).
CONFIG_FLAGS: dict[str, Any] = {
    "config": Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            metavar="FILE|NAME",
            help="TOML config file, or a shipped config by name (spp-extract configs lists them).",
            show_default=False,
        ),
    ],
    **{name: _flag(name) for name in RULES},
}


def config_from_flags(config: Path | None = None, **flags: Any) -> Config:
    """The configuration from a config file and the flags given (None = not given)."""
    values = {k: from_command_line(k, v) for k, v in flags.items() if v is not None}
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
        with reported():
            cfg = config_from_flags(**flags)
        command(cfg=cfg, **kwargs)

    with_config.__signature__ = own.replace(parameters=params)  # type: ignore[attr-defined]
    with_config.__annotations__ = {p.name: p.annotation for p in params}
    return with_config


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


@app.command(cls=Command)
@_config_flags
def extract(
    ctx: typer.Context,
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Image files, folders (walked recursively), tar shards, URLs (https://, s3://, gs://: the [remote] extra).",
            show_default=False,
            metavar="INPUT",
        ),
    ] = None,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="HDF5 file to write.", metavar="FILE")
    ] = Path("features.h5"),
    cfg: Config | None = None,
    files_from: Annotated[
        Path | None,
        typer.Option(
            help="File with one image path or URL per line, or a .csv/.tsv/.parquet table (see --column).",
            show_default=False,
            metavar="FILE",
        ),
    ] = None,
    column: Annotated[
        str | None,
        typer.Option(
            help="The column of a --files-from table that holds the URLs or paths [default: url].",
            show_default=False,
            metavar="NAME",
        ),
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
            metavar="FILE",
        ),
    ] = None,
) -> None:
    """Extract one SPP vector per image into an HDF5 file."""
    assert cfg is not None  # given by _config_flags
    from .devices import Dist  # light: no torch

    logging.basicConfig(level=logging.WARNING, format="spp-extract: %(message)s")
    main_rank = Dist.from_env().rank == 0  # under torchrun, rank 0 reports
    if not quiet and main_rank:
        logging.getLogger("spp_extract.backbones").setLevel(logging.INFO)  # "downloading ..."
    progress = ProgressBar(sys.stderr, enabled=not quiet and main_rank)
    try:
        with reported(progress):
            if not inputs and files_from is None:
                raise ConfigError("no inputs; give image folders or files, or --files-from LIST")
            mode = _mode(resume, overwrite)
            progress.status(f"loading {cfg.backbone} ...")  # before torch's import: seconds
            from .pipeline import extract as run

            result = run(
                inputs or [],
                output,
                config=cfg,
                mode=mode,
                files_from=files_from,
                column=column,
                retry_failed=retry_failed,
                project=project,
                progress=progress,
            )
    except KeyboardInterrupt:  # before anything was written (loading the model, say)
        progress.close()
        typer.echo("spp-extract: interrupted before any work was done", err=True)
        raise typer.Exit(130) from None
    except typer.Exit as done:
        if done.exit_code >= 128:  # interrupted: the command that continues the run
            command = resume_command(
                _program(sys.argv[0]), ctx.info_name or "extract", *_given(ctx)
            )
            typer.echo(f"  resume with: {command}", err=True)
        raise
    progress.close()
    if not quiet and result.main:
        _summary(result)
    if strict and result.failed:
        if result.main:
            typer.echo(f"spp-extract: {result.failed} images failed (--strict)", err=True)
        raise typer.Exit(1)


def _mode(resume: bool, overwrite: bool) -> str:
    """--resume / --overwrite as the library's one ``mode``."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite exclude each other; pick one")
    return "resume" if resume else "overwrite" if overwrite else "new"


def _summary(result: Any) -> None:
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


@app.command(cls=Command)
def backbones(
    levels: Annotated[
        str, typer.Option(help="Pyramid levels for the vector length.", metavar="N,N,...")
    ] = "4,2,1",
    probe: Annotated[
        bool,
        typer.Option("--probe", help="Ask torchvision and the models themselves, not the table."),
    ] = False,
) -> None:
    """List supported backbones: default layer, channels, stride, smallest side, vector
    length, exact mixed batching and tiling."""
    with reported():
        pyramid = load_config(None, levels=parse_levels(levels)).levels
    from . import catalog

    if probe:
        from .families import live_names, probe_facts

        rows = [catalog.BackboneFacts(name=n, **_facts(probe_facts(n))) for n in live_names()]
    else:
        rows = [catalog.facts(name) for name in catalog.names()]
    typer.echo(
        f"{'backbone':<22}{'default layer':<16}{'channels':>9}{'stride':>7}{'min side':>9}"
        f"{'dim':>9}  padded batching, tiling"
    )
    for f in rows:
        exact = "yes" if f.maskable else "no (same-size only, untileable)"
        typer.echo(
            f"{f.name:<22}{f.default_layer:<16}{f.channels:>9}{f.stride:>7}{f.min_side:>9}"
            f"{f.dim(pyramid):>9}  {exact}"
        )


def _facts(entry: dict[str, Any]) -> dict[str, Any]:
    return {**entry, "layers": tuple(entry["layers"])}


@app.command("configs", cls=Command)
def configs() -> None:
    """List the shipped configurations (use one with --config NAME)."""
    from .config import shipped_configs

    for name, resource in sorted(shipped_configs().items()):
        first = resource.read_text(encoding="utf-8").splitlines()[0].lstrip("# ")
        typer.echo(f"{name:<18}{first}")


@app.command("config", cls=Command)
@_config_flags
def show_config(
    cfg: Config | None = None,
    resolve_auto: Annotated[
        bool,
        typer.Option(
            "--resolve",
            help="Also print what every auto settles to here: device, workers, batches, memory.",
        ),
    ] = False,
) -> None:
    """Print the resolved configuration as TOML (file < flags, defaults filled in)."""
    assert cfg is not None  # given by _config_flags
    from .catalog import resolve  # the table: no torch, no model built
    from .provenance import resolved_config

    with reported():
        resolved = resolve(cfg)
        typer.echo(to_toml(resolved_config(cfg, resolved)), nl=False)
        if resolve_auto:
            from .runtime import settled

            typer.echo("\n[resolved]  # what auto settles to on this machine, now")
            typer.echo(to_toml({"weights": resolved.weights, **settled(cfg)}), nl=False)


for command in (cli_files.inspect, cli_files.merge, cli_files.reduce, cli_files.neighbors):
    app.command(cls=Command)(command)


def main() -> None:
    try:
        app(prog_name="spp-extract")
    except (ImportError, RuntimeError) as exc:
        problem = _broken_install(exc)
        if problem is None:
            raise
        typer.echo(f"spp-extract: error: {problem}", err=True)
        raise SystemExit(1) from None


def _broken_install(exc: BaseException) -> str | None:
    """One line for a torch/torchvision pair that does not import together (a CPU torch beside
    a CUDA torchvision: "operator torchvision::nms does not exist"), or a missing one; None
    for anything else."""
    from importlib import metadata

    text = " ".join(str(exc).split())
    missing = isinstance(exc, ModuleNotFoundError) and exc.name in ("torch", "torchvision")
    if not (missing or "torchvision::" in text or "undefined symbol" in text):
        return None

    def version(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "(not installed)"

    torch_version, vision = version("torch"), version("torchvision")
    minor = torch_version.split(".")[1] if torch_version[:2] == "2." else "14"
    pair = f"torch=={torch_version.split('+')[0]} torchvision==0.{int(minor) + 15}.*"
    return (
        f"torch {torch_version} and torchvision {vision} do not work together "
        f"({type(exc).__name__}: {printable(text)[:120]}); install a matching pair from the "
        f"same index (both CPU or both CUDA builds): pip install {pair}"
    )


__all__ = ["app", "main"]
