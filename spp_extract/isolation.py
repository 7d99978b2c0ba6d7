"""One call in a throw-away process: what a crash, a hang or a change of process-wide state
(Pillow's ``LOAD_TRUNCATED_IMAGES``) does stays in that process.

Processes spp-extract owns (decode workers, these throw-away processes) are *private*: there,
process-wide settings may be changed freely, since no caller's thread shares them.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from typing import Any

_private = False


def private() -> bool:
    """Whether this process is one spp-extract owns (a decode worker or throw-away process)."""
    return _private


def make_private() -> None:
    global _private
    _private = True


class Died(Exception):
    """The call's process ended without an answer (``exitcode``: its status)."""

    def __init__(self, exitcode: int | None, problem: str = "the process died") -> None:
        super().__init__(f"{problem} (exit {exitcode})")
        self.exitcode = exitcode


class TimedOut(Exception):
    """The call took longer than its timeout; its process was killed."""


def call_isolated(fn: Callable[..., Any], *args: Any, timeout: float) -> Any:
    """``fn(*args)`` in a forked process that is private (``make_private``) and thrown away;
    its result must pickle as plain data (numpy arrays, not tensors: torch would pass those
    by file descriptor, connecting back to a process that has exited). An exception ``fn``
    raises is raised here. Raises ``Died`` or ``TimedOut``."""
    ctx = multiprocessing.get_context(
        "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    )
    parent, child = ctx.Pipe(duplex=False)

    def target() -> None:
        make_private()
        try:
            child.send((True, fn(*args)))
        except BaseException as exc:  # noqa: BLE001 - the caller raises it
            child.send((False, exc))

    process = ctx.Process(target=target, daemon=True)
    process.start()
    child.close()
    problem = "the process died"
    try:
        if not parent.poll(timeout):
            process.kill()
            raise TimedOut(f"took longer than {timeout:g} s")
        try:
            ok, value = parent.recv()
        except EOFError:
            ok, value = False, None
        except Exception as exc:  # noqa: BLE001 - whatever came back is unusable
            ok, value = False, None
            problem = f"its result could not be received ({type(exc).__name__}: {exc})"
    finally:
        process.join(5)
        parent.close()
    if ok:
        return value
    if isinstance(value, BaseException):
        raise value
    raise Died(process.exitcode, problem)
