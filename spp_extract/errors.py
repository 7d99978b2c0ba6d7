"""The project's exception types; every module may import this one."""

from __future__ import annotations

import contextlib
import contextvars
import signal
import threading
from collections.abc import Iterator


def printable(text: str) -> str:
    """``text`` as one line of valid UTF-8: bytes that were not UTF-8 (kept by Python's
    surrogateescape, as in ``os.fsdecode``) become ``\\xe9``, control and other unprintable
    characters their escape (``\\n``, ``\\x1b``, ``\\u200b``). Idempotent."""
    out = []
    for char in text:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # surrogateescape of one undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char.isprintable():
            out.append(char)
        else:
            out.append(repr(char)[1:-1])
    return "".join(out)


class SppError(Exception):
    """Base class: the CLI turns these into a one-line message instead of a traceback."""

    exit_code = 1


class ConfigError(SppError):
    """A problem with the configuration or the command line, found before anything is written."""

    exit_code = 2


class OutputError(SppError):
    """The output cannot be written or continued (locked, disk full, inconsistent shards)."""

    exit_code = 1


class Interrupted(SppError):
    """SIGINT/SIGTERM; the exit status is 128 + signal. ``then``: what became of the work (for
    an extraction: committed, to be resumed)."""

    def __init__(
        self,
        signum: int,
        then: str = "work up to now is committed; rerun the same command with --resume to finish",
    ) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}; {then}")
        self.signum = signum
        self.exit_code = 128 + signum

    def __reduce__(self) -> tuple[type, tuple[int, str]]:
        return (type(self), (self.signum, str(self).partition("; ")[2]))


@contextlib.contextmanager
def raising_signals(then: str) -> Iterator[None]:
    """SIGINT and SIGTERM raise ``Interrupted(signum, then)`` instead of ending the process
    where it stands, so that what is being written is cleaned up on the way out (in the main
    thread only: signals are delivered there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        raise Interrupted(signum, then)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


class ImageError(Exception):
    """One image could not be used; becomes a failure record, never stops the run.

    ``kind`` is a stable, machine-readable class (``truncated``, ``not_an_image``, ...);
    the message is for people, kept :func:`printable` (it may quote file names or OS text).
    """

    def __init__(self, kind: str, message: str) -> None:
        message = printable(message)
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # picklable across worker processes
        return (type(self), (self.kind, self.message))


# Messages name options in the caller's terms: ``--resume`` on the command line,
# ``resume=True`` in Python. The CLI sets this for the duration of a command (threads that
# build messages run in a copy of the caller's context).
COMMAND_LINE: contextvars.ContextVar[bool] = contextvars.ContextVar("command_line", default=False)


def option(name: str, value: object = True) -> str:
    """``option("layer", None)`` -> ``--layer`` (command line) or ``layer=...`` (Python);
    ``option("device", "cpu")`` -> ``--device cpu`` or ``device='cpu'``; ``option("retry")``
    -> ``--retry`` or ``retry=True``. The run mode is one value in Python and a flag of its own
    on the command line: ``option('mode', 'resume')`` -> ``--resume`` or ``mode='resume'``."""
    if COMMAND_LINE.get():
        if name == "mode":
            return "--" + str(value)
        flag = "--" + name.replace("_", "-")
        return flag if value is True or value is None else f"{flag} {value}"
    return f"{name}=..." if value is None else f"{name}={value!r}"
