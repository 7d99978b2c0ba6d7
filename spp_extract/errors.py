"""The project's exception types; every module may import this one."""

from __future__ import annotations


class SppError(Exception):
    """Base class: the CLI turns these into a one-line message instead of a traceback."""

    exit_code = 1


class ConfigError(SppError):
    """A problem with the configuration or the command line, found before anything is written."""

    exit_code = 2


class OutputError(SppError):
    """The output cannot be written or continued (locked, disk full, inconsistent shards)."""

    exit_code = 1


class ImageError(Exception):
    """One image could not be used; becomes a failure record, never stops the run.

    ``kind`` is a stable, machine-readable class (``truncated``, ``not_an_image``, ...);
    the message is for people.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message

    def __reduce__(self) -> tuple[type, tuple[str, str]]:  # picklable across worker processes
        return (type(self), (self.kind, self.message))
