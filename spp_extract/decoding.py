"""Decoding in DataLoader workers: items, padded uint8 batches in the planner's order, and
isolating a decoder that crashes or hangs in a throw-away process."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.signal_handling import _error_if_any_worker_fails

from . import images
from .config import Config, pixel_limit
from .errors import ImageError, Interrupted, printable
from .isolation import Died, TimedOut, call_isolated, make_private
from .planning import Planner
from .records import RowMeta

log = logging.getLogger(__name__)

PREFETCH = 4  # batches each decode worker prepares ahead


@dataclass
class Item:
    index: int
    pixels: Tensor | None  # (3, H, W) uint8
    meta: RowMeta


def decode_item(ref: images.ImageRef, index: int, min_side: int, config: Config) -> Item:
    if ref.problem is not None:  # a folder that could not be listed: nothing to open
        return failure(ref, index, *ref.problem)
    try:
        decoded = images.decode(
            ref.path, max_pixels=pixel_limit(config), allow_truncated=config.allow_truncated
        )
    except ImageError as exc:
        return failure(ref, index, exc.kind, exc.message)
    except Exception as exc:  # noqa: BLE001 - one image must never stop the run
        return failure(ref, index, "decoder_error", f"{type(exc).__name__}: {exc}")
    _, height, width = decoded.pixels.shape
    meta = RowMeta(
        image_size=(height, width),
        input_size=(max(height, min_side), max(width, min_side)),
        mode=decoded.mode,
        truncated=decoded.truncated,
        file_size=decoded.file_size,
        mtime_ns=decoded.mtime_ns,
    )
    return Item(index, decoded.pixels, meta)


class DecodeDataset(Dataset):
    def __init__(self, refs: Sequence[images.ImageRef], min_side: int, config: Config) -> None:
        self.refs = refs
        self.min_side = min_side
        self.config = config

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> Item:
        return decode_item(self.refs[index], index, self.min_side, self.config)


@dataclass
class Batch:
    indices: list[int]  # of the decoded images, in batch order
    pixels: Tensor | None  # (N, 3, H, W) uint8, zero-padded at bottom/right
    metas: list[RowMeta]
    failures: list[Item]

    def pin_memory(self) -> Batch:
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


def init_worker(_worker: int) -> None:
    """A decode worker is a process spp-extract owns (``isolation.private``). Ctrl-C reaches
    the whole process group; the main process decides when to stop."""
    make_private()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Collate:
    """Items -> one zero-padded uint8 batch. ``multiple`` > 1 rounds the padded size up to a
    multiple of it (padded batching), so batch shapes repeat and cuDNN's autotuner pays off."""

    def __init__(self, multiple: int = 1) -> None:
        self.multiple = multiple

    def __call__(self, items: list[Item]) -> Batch:
        sizes = {it.meta.input_size for it in items if it.pixels is not None}
        return collate(items, self.multiple if len(sizes) > 1 else 1)  # same sizes: no padding


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def collate(items: list[Item], multiple: int = 1) -> Batch:
    good = [it for it in items if it.pixels is not None]
    failures = [it for it in items if it.pixels is None]
    if not good:
        return Batch([], None, [], failures)
    height = _round_up(max(it.meta.input_size[0] for it in good), multiple)
    width = _round_up(max(it.meta.input_size[1] for it in good), multiple)
    pixels = torch.zeros(len(good), 3, height, width, dtype=torch.uint8)
    for row, it in enumerate(good):
        assert it.pixels is not None
        h, w = it.meta.image_size
        pixels[row, :, :h, :w] = it.pixels
    return Batch([it.index for it in good], pixels, [it.meta for it in good], failures)


def _decode_plain(ref: images.ImageRef, index: int, min_side: int, config: Config) -> tuple:
    item = decode_item(ref, index, min_side, config)
    return (None if item.pixels is None else item.pixels.numpy(), item.meta)


def isolated_decode(ref: images.ImageRef, index: int, min_side: int, config: Config) -> Item:
    """Decode in a throw-away process: a crash or hang becomes a failure record."""
    try:
        pixels, meta = call_isolated(
            _decode_plain, ref, index, min_side, config, timeout=config.decode_timeout
        )
    except TimedOut:
        message = f"decoding took longer than {config.decode_timeout:g} s"
        return failure(ref, index, "decode_timeout", message)
    except Died as exc:
        return failure(ref, index, "decoder_crashed", f"decoding: {exc}")
    return Item(index, None if pixels is None else torch.from_numpy(pixels), meta)


def failure(ref: images.ImageRef, index: int, kind: str, message: str) -> Item:
    """A failure record, with the file's stat so that a resume knows if it changed since."""
    size, mtime = file_stat(ref)
    meta = RowMeta(error_class=kind, error=printable(message), file_size=size, mtime_ns=mtime)
    return Item(index, None, meta)


def file_stat(ref: images.ImageRef) -> tuple[int, int]:
    try:
        st = os.stat(ref.path)
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def _own_generator() -> torch.Generator:
    """A DataLoader draws its workers' base seed from this, not from torch's global generator
    (which would shift the caller's random numbers, and another thread's seeded model init)."""
    return torch.Generator().manual_seed(0)


class _Headers(Dataset):
    def __init__(self, refs: Sequence[images.ImageRef]) -> None:
        self.refs = refs

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> tuple[int, int] | None:
        return header_size(self.refs[index])


def header_size(ref: images.ImageRef) -> tuple[int, int] | None:
    """The displayed size from the header; None for a folder that could not be listed."""
    return None if ref.problem is not None else images.read_size(ref.path)


def read_sizes(refs: Sequence[images.ImageRef], workers: int) -> list[tuple[int, int] | None]:
    if workers == 0 or len(refs) < 64:
        return [header_size(r) for r in refs]
    loader = DataLoader(
        _Headers(refs),
        batch_size=64,
        num_workers=workers,
        collate_fn=list,
        generator=_own_generator(),
    )
    return [size for chunk in loader for size in chunk]


def decoded_batches(
    refs: Sequence[images.ImageRef],
    planner: Planner,
    min_side: int,
    config: Config,
    *,
    workers: int,
    multiple: int,
    pin_memory: bool,
    caught: list[int],
) -> Iterator[Batch]:
    """The planner's batches of ``refs``, decoded by ``workers`` processes. A worker that
    crashes or hangs (``decode_timeout``) is replaced: the batch it was working on is decoded
    again one image at a time in throw-away processes, and the rest goes on. ``caught``: the
    signals received so far (a worker lost to one ends the loop as ``Interrupted``)."""
    dataset = DecodeDataset(refs, min_side, config)
    # torch's SIGCHLD handler raises a dead worker's error wherever the main thread is: in the
    # middle of compute it would lose the batch in hand. It is on only while waiting for the
    # next batch; a worker that died meanwhile is reported as that wait begins.
    watch = workers > 0 and threading.current_thread() is threading.main_thread()
    torch_handler: Any = None
    try:
        while True:
            loader = DataLoader(
                dataset,
                batch_sampler=planner,
                num_workers=workers,
                collate_fn=Collate(multiple),
                pin_memory=pin_memory,
                timeout=config.decode_timeout if workers else 0,
                prefetch_factor=PREFETCH if workers else None,
                persistent_workers=False,
                worker_init_fn=init_worker,
                generator=_own_generator(),
            )
            batches = iter(loader)
            if watch and torch_handler is None:
                torch_handler = signal.getsignal(signal.SIGCHLD)
            while True:
                try:
                    if watch:
                        signal.signal(signal.SIGCHLD, torch_handler)
                        _error_if_any_worker_fails()
                    batch = next(batches)
                except StopIteration:
                    return
                except RuntimeError as exc:
                    if workers == 0 or "DataLoader" not in str(exc):
                        raise
                    if caught:
                        raise Interrupted(caught[0]) from None
                    log.warning("a decode worker failed (%s); isolating its images", exc)
                    break
                finally:
                    if watch:
                        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                planner.received()
                yield batch
            del batches  # shuts the remaining workers down (a hung one is terminated)
            planner.rewind()
            suspect = next(iter(planner))  # the first batch not received
            planner.received()
            yield collate([isolated_decode(refs[i], i, min_side, config) for i in suspect])
    finally:
        if torch_handler is not None:
            signal.signal(signal.SIGCHLD, torch_handler)
