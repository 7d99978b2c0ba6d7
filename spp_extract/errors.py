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


def printable(text: str) -> str:
    """``text`` safe to print or store as UTF-8: non-UTF-8 bytes (surrogate escapes) and
    control characters are written as Python escapes (``\\xe9``, ``\\n``)."""
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # a byte that was not UTF-8 (os.fsdecode's surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F or 0xD800 <= code <= 0xDFFF or 0x80 <= code < 0xA0:
            out.append(repr(ch)[1:-1] if ch in "\n\r\t" else f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)
