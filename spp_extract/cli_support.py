"""What the commands share: one line and an exit status for an error, the progress bar,
signals that end a command cleanly, and options several commands take."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import IO, Annotated, Any

import typer

from .errors import SppError, printable, raising_signals


class _PlainArgument(typer.core.TyperArgument):
    def display_type(self, ctx: Any) -> str:
        return ""  # the help says what it is; no "<path>" beside it

    def _usage_display_name(self) -> str:
        name = self.display_name_raw if self.required else f"[{self.display_name_raw}]"
        return name + ("..." if self.nargs != 1 else "")


class Command(typer.core.TyperCommand):
    """typer's command with plain argument help: ``merge SOURCE DEST``, not ``{source}
    {dest}``, and no ``<list[Path]>`` beside an argument."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            if type(param) is typer.core.TyperArgument:
                param.__class__ = _PlainArgument


DeviceOption = Annotated[
    str,
    typer.Option(
        "--device", metavar="DEVICE", help="auto (CUDA when present), cpu, cuda or cuda:N."
    ),
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar or summary.")]


Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace the output if it exists.")]


@contextlib.contextmanager
def reported(progress: ProgressBar | None = None) -> Iterator[None]:
    """An SppError becomes its one line and exit status (the progress bar closed first)."""
    try:
        yield
    except SppError as exc:
        if progress is not None:
            progress.close()
        raise fail(exc) from None


def fail(exc: SppError) -> typer.Exit:
    if not getattr(exc, "reported_by_rank0", False):  # under torchrun: one line, not one a rank
        prefix = "" if exc.exit_code >= 128 else "error: "  # an interruption is no error
        typer.echo(f"spp-extract: {prefix}{printable(str(exc))}", err=True)
    return typer.Exit(exc.exit_code)


def stopped_by_signals() -> contextlib.AbstractContextManager[None]:
    """SIGINT and SIGTERM end the command with one line (exit 130/143), its temporary file
    removed on the way out."""
    return raising_signals("nothing was written; run the command again")


class ProgressBar:
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
