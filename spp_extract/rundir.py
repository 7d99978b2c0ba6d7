"""Run management, before and around the work: may this output be written (name, folder,
what is there), the output lock, the run folder and its fingerprint, the inputs' listing.

A run's shards live in ``<output>.shards/run-NNNNNN-<time>-<pid>/`` beside a ``run.toml``
holding the values every resume must match.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from .config import Config, to_toml
from .discovery import IMAGE_EXTENSIONS, ImageRef, find_images
from .errors import ConfigError, OutputError, option, printable
from .outputs import identify
from .provenance import Provenance, Resolved, resolved_config
from .shards import next_attempt, read_state, remove_partial
from .sources import is_compressed_tar, is_tar
from .storage import remove_stale_tmp, shards_root

log = logging.getLogger(__name__)

_HELD_LOCKS: set[int] = set()


def _drop_inherited_locks() -> None:
    # A forked child (a decode worker) shares the lock's open file description: closing its
    # copies means a killed parent's lock is released at once, not when the last worker exits.
    for fd in _HELD_LOCKS:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


class OutputLock:
    """One writer per output: an advisory lock on ``<output>.shards/.lock`` (released by the
    kernel when the process dies, so a killed run never leaves a stale lock). Forked children
    do not hold it."""

    def __init__(self, output: Path) -> None:
        self.path = shards_root(output) / ".lock"
        self._fd: int | None = None
        self.created_root = False  # the shards folder did not exist before acquire()

    def acquire(self) -> None:
        root = self.path.parent
        if root.exists() and not root.is_dir():
            raise ConfigError(
                f"'{root}' exists and is not a folder; move it away or choose another -o"
            )
        self.created_root = not root.exists()
        root.mkdir(exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise OutputError(
                f"another spp-extract run is writing this output (it holds {self.path}); wait "
                "for it to finish or stop it first"
            ) from None
        self._fd = fd
        _HELD_LOCKS.add(fd)

    def release(self, *, remove_if_unused: bool = False) -> None:
        """Release the lock; ``remove_if_unused``: also remove the shards folder if this run
        created it and wrote nothing into it (a refusal must leave no trace)."""
        if self._fd is None:
            return
        if remove_if_unused and self.created_root:
            with contextlib.suppress(OSError):
                if [p.name for p in self.path.parent.iterdir()] == [".lock"]:
                    self.path.unlink()
                    self.path.parent.rmdir()
        _HELD_LOCKS.discard(self._fd)
        os.close(self._fd)
        self._fd = None


def _read_run_toml(run_dir: Path) -> Provenance:
    try:
        return Provenance.of_run_toml((run_dir / "run.toml").read_text(encoding="utf-8"))
    except OSError:
        return Provenance({})


def _write_run_toml(run_dir: Path, provenance: Provenance, config: dict[str, Any]) -> None:
    text = "# spp-extract run: the values every resume of this run must match\n"
    text += provenance.to_run_toml() + "\n[config]\n" + to_toml(config)
    tmp = run_dir / "run.toml.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, run_dir / "run.toml")


RunMode = Literal["new", "resume", "overwrite"]


def check_output_name(output: Path) -> None:
    """What can be refused before anything is touched: the folder, the name."""
    parent = output.parent
    if not parent.is_dir():
        raise ConfigError(f"output folder '{parent}' does not exist; create it first")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output folder '{parent}' is not writable; choose another output")
    if output.is_dir():
        raise ConfigError(f"output '{output}' is a directory; give a file name like features.h5")
    name = os.fsencode(output.name)
    try:
        name.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(
            f"output name '{printable(output.name)}' is not valid UTF-8 (HDF5 stores "
            "it inside the file); choose a UTF-8 name"
        ) from None
    try:
        limit = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    longest = len(name) + len(".shards")
    if longest > limit:
        raise ConfigError(
            f"output name is {len(name)} bytes; its shards folder '{output.name[:20]}"
            f"....shards' would exceed this file system's {limit}-byte limit; "
            f"choose a name of at most {limit - 7} bytes"
        )


def check_existing(output: Path, mode: RunMode) -> bool:
    """Under the output lock: may this run write here? Returns whether an output exists."""
    root = shards_root(output)
    if output.exists():
        attrs = identify_output(output, mode)
        if mode == "resume" and attrs.get("layout") == "merged":
            raise ConfigError(
                f"'{output}' is a merged, self-contained copy (layout = merged); "
                f"{option('mode', 'resume')} continues a run's own output (resume that and merge again), "
                f"or pass {option('mode', 'overwrite')} to start a new run here"
            )
    elif root.is_dir() and [p for p in root.iterdir() if p.name != ".lock"]:  # ours holds .lock
        unexpected = [
            p.name for p in root.iterdir() if p.name != ".lock" and not p.name.startswith("run-")
        ]
        if unexpected:
            raise ConfigError(
                f"'{root}' holds files spp-extract did not write (first: "
                f"{printable(unexpected[0])!r}); move them away or choose another output"
            )
    else:
        return False
    if mode == "new":
        raise ConfigError(
            f"output '{output}' already exists; pass {option('mode', 'resume')} to continue it or "
            f"{option('mode', 'overwrite')} to replace it"
        )
    return output.exists()


def identify_output(output: Path, mode: RunMode) -> dict[str, Any]:
    """An existing output must be this tool's; anything else is never replaced."""
    try:
        return identify(output)
    except ConfigError as exc:
        raise ConfigError(
            f"{exc}; refusing to {dict(new='touch', resume='continue', overwrite='replace')[mode]} "
            "it: move it away or choose another output"
        ) from None


_RUN = re.compile(r"^run-(\d{6})-")


def _run_order(path: Path) -> tuple[int, str]:
    # New runs are numbered (not timed: clocks and time zones move); older names sort first.
    match = _RUN.match(path.name)
    return (int(match.group(1)) if match else -1, path.name)


def choose_run_dir(output: Path, provenance: Provenance, mode: RunMode) -> Path:
    """The run to continue (newest, when resuming) or a new one. Raises on a mismatch."""
    root = shards_root(output)
    runs = (
        sorted((p for p in root.glob("run-*") if p.is_dir()), key=_run_order)
        if root.is_dir()
        else []
    )
    if mode == "resume" and runs:
        run_dir = runs[-1]
        old = _read_run_toml(run_dir).resume_values()
        diff = Provenance.differences(old, provenance.resume_values())
        if diff:
            raise ConfigError(
                f"{option('mode', 'resume')}: the configuration differs from the run in {run_dir.name} ("
                + "; ".join(diff)
                + f"); use the same settings, or {option('mode', 'overwrite')} to start again"
            )
        return run_dir
    number = _run_order(runs[-1])[0] + 1 if runs else 0
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
    return root / f"run-{max(number, 0):06d}-{stamp}-{os.getpid()}"


@dataclass(frozen=True)
class Setup:
    run_dir: Path
    refs: list[ImageRef]
    overlaps: int  # files named by more than one input (used once)
    keep_old_output: bool  # --overwrite of an existing output: it stays until the new one is done


def setup(
    inputs: Sequence[str | os.PathLike[str]],
    output: Path,
    listed: tuple[str | os.PathLike[str] | None, str | None],
    config: Config,
    provenance: Provenance,
    lock: OutputLock | None,
    mode: RunMode,
) -> Setup:
    """Rank 0, before anything is written: the output may be written, the inputs, the run
    (``provenance``: what a resume must match)."""
    assert lock is not None
    check_output_name(output)
    lock.acquire()
    existed = check_existing(output, mode)
    files_from, column = listed  # a --files-from list or table, and the table's column
    found = find_images(
        inputs,
        files_from=files_from,
        column=column,
        follow_symlinks=config.follow_symlinks,
        timeout=config.fetch_timeout,
    )
    if not found.refs:
        raise ConfigError(
            "no images found in the inputs (looked for " + ", ".join(sorted(IMAGE_EXTENSIONS)) + ")"
        )
    return Setup(
        choose_run_dir(output, provenance, mode),
        found.refs,
        found.overlaps,
        mode == "overwrite" and existed,
    )


def open_run(
    output: Path, run_dir: Path, provenance: Provenance, config: Config, resolved: Resolved
) -> int:
    """Rank 0: the run folder, cleaned of half-written files, with its run.toml; returns the
    number of this attempt (shard names start with it)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_tmp(output)  # a view or merge killed before its rename
    if remove_partial(run_dir):
        log.info("discarded half-written shards from an interrupted run")
    _write_run_toml(run_dir, provenance, resolved_config(config, resolved))
    return next_attempt(run_dir)


def left_to_do(refs: Sequence[ImageRef], run_dir: Path, retry_failed: bool) -> list[int]:
    """Indices of ``refs`` without a result in the run (or whose file changed since)."""
    state = read_state(run_dir)
    return [
        i
        for i, r in enumerate(refs)
        if not state.done(r.key_bytes, r.source, r.stat(), retry_failed)
    ]


def unlisted(refs: Sequence[ImageRef]) -> list[bytes]:
    """Path prefixes of folders that could not be listed and of tars that could not be read
    to their end: their earlier rows are kept. An input folder that cannot be listed at all
    keeps every earlier row."""
    return [
        b""
        if os.path.normpath(r.key) == os.path.normpath(r.path) and not _archive(r.path)
        else r.key_bytes + b"/"
        for r in refs
        if r.problem and r.member is None
    ]


def _archive(path: str) -> bool:
    return is_tar(path) or is_compressed_tar(path)
