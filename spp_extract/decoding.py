"""Decoding, in DataLoader workers (``loader``) or in the main process: one image to an item
(a failure becomes a record), items to one padded uint8 batch, and one image decoded in a
throw-away process when its decoder crashed or hung."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from . import images, sources, tars
from .config import Config, pixel_limit
from .discovery import ImageRef
from .errors import ImageError, printable
from .isolation import Died, TimedOut, call_isolated
from .records import RowMeta

log = logging.getLogger(__name__)

PREFETCH = 4  # batches each decode worker prepares ahead


@dataclass
class Item:
    index: int  # in this rank's work list
    pixels: Tensor | None  # (3, H, W) uint8
    meta: RowMeta
    window: int = -1  # the planned window (shard) it belongs to


def load(ref: ImageRef, timeout: float, header: bool = False) -> str | sources.Blob:
    """What ``images`` decodes for ``ref``: a local file's path, or the bytes of a tar member
    or URL (with ``header``, the first ``HEADER_BYTES`` only). Raises ImageError."""
    member = ref.member
    if member is not None:
        data = tars.read_member(ref.path, member, timeout, sources.HEADER_BYTES if header else None)
        if not header and len(data) < member.size:
            raise ImageError(
                "truncated",
                f"the tar ends inside this member: {len(data)} of {member.size} bytes",
            )
        return sources.Blob(data, member.size, member.mtime_ns)
    if not ref.remote:
        return ref.path
    # a header is read once: if that fails, decoding tries again and records why
    if header:
        data = sources.fetch(ref.path, timeout, 0, sources.HEADER_BYTES, attempts=1)
    else:
        data = sources.fetch(ref.path, timeout)
    return sources.Blob(data, -1 if header else len(data), -1)


# What was read ahead for an image (``load``), or why it could not be; None: nothing.
Loaded = str | sources.Blob | ImageError | None


def decode_item(
    ref: ImageRef,
    index: int,
    min_side: int,
    config: Config,
    window: int = -1,
    loaded: Loaded = None,
) -> Item:
    item = _decode_item(ref, index, min_side, config, loaded)
    item.window = window
    return item


def load_all(refs: Sequence[ImageRef], config: Config, header: bool = False) -> list[Loaded]:
    """Remote images' bytes read ahead together (their reads wait on the network, not the
    CPU); None for the others, which are read when decoded."""
    if not any(r.remote and r.problem is None for r in refs):
        return [None] * len(refs)

    def read(ref: ImageRef) -> Loaded:
        if not ref.remote or ref.problem is not None:
            return None
        try:
            return load(ref, config.fetch_timeout, header=header)
        except ImageError as exc:
            return exc

    return sources.concurrently(read, refs)


def _decode_item(
    ref: ImageRef, index: int, min_side: int, config: Config, loaded: Loaded = None
) -> Item:
    if ref.problem is not None:  # a folder that could not be listed, a damaged tar
        return failure(ref, index, *ref.problem)
    try:
        source = load(ref, config.fetch_timeout) if loaded is None else loaded
        if isinstance(source, ImageError):
            raise source
        decoded = images.decode(
            source, max_pixels=pixel_limit(config), allow_truncated=config.allow_truncated
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
    """``dataset[(window, index)]``: the image ``index`` of the work list, decoded."""

    def __init__(self, refs: Sequence[ImageRef], min_side: int, config: Config) -> None:
        self.refs = refs
        self.min_side = min_side
        self.config = config

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, key: tuple[int, int]) -> Item:
        window, index = key
        return decode_item(self.refs[index], index, self.min_side, self.config, window)

    def __getitems__(self, keys: list[tuple[int, int]]) -> list[Item]:
        """A batch: remote images fetched together, then each decoded."""
        loaded = load_all([self.refs[i] for _, i in keys], self.config)
        return [
            decode_item(self.refs[i], i, self.min_side, self.config, window, ahead)
            for (window, i), ahead in zip(keys, loaded, strict=True)
        ]


@dataclass
class Batch:
    window: int  # the planned window (shard) all its images belong to
    indices: list[int]  # of the decoded images, in batch order
    pixels: Tensor | None  # (N, 3, H, W) uint8, zero-padded at bottom/right
    metas: list[RowMeta]
    failures: list[Item]

    @property
    def first(self) -> int:
        """The lowest work-list index of the batch (decoded or failed)."""
        return min(self.indices + [it.index for it in self.failures])

    def pin_memory(self) -> Batch:
        if self.pixels is not None:
            self.pixels = self.pixels.pin_memory()
        return self


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
    window = items[0].window if items else -1
    if not good:
        return Batch(window, [], None, [], failures)
    height = _round_up(max(it.meta.input_size[0] for it in good), multiple)
    width = _round_up(max(it.meta.input_size[1] for it in good), multiple)
    pixels = torch.zeros(len(good), 3, height, width, dtype=torch.uint8)
    for row, it in enumerate(good):
        assert it.pixels is not None
        h, w = it.meta.image_size
        pixels[row, :, :h, :w] = it.pixels
    return Batch(window, [it.index for it in good], pixels, [it.meta for it in good], failures)


def _decode_plain(ref: ImageRef, index: int, min_side: int, config: Config) -> tuple:
    item = decode_item(ref, index, min_side, config)
    return (None if item.pixels is None else item.pixels.numpy(), item.meta)


def isolated_decode(
    ref: ImageRef, index: int, min_side: int, config: Config, window: int = -1
) -> Item:
    """Decode in a throw-away process: a crash or hang becomes a failure record."""
    item = _isolated(ref, index, min_side, config)
    item.window = window
    return item


def _isolated(ref: ImageRef, index: int, min_side: int, config: Config) -> Item:
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


def failure(ref: ImageRef, index: int, kind: str, message: str) -> Item:
    """A failure record, with the file's stat so that a resume knows if it changed since."""
    size, mtime = ref.stat() or (-1, -1)
    meta = RowMeta(error_class=kind, error=printable(message), file_size=size, mtime_ns=mtime)
    return Item(index, None, meta)


def own_generator() -> torch.Generator:
    """A DataLoader draws its workers' base seed from this, not from torch's global generator
    (which would shift the caller's random numbers, and another thread's seeded model init)."""
    return torch.Generator().manual_seed(0)


class _Headers(Dataset):
    def __init__(self, refs: Sequence[ImageRef], config: Config) -> None:
        self.refs = refs
        self.config = config

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, index: int) -> tuple[int, int] | None:
        return header_size(self.refs[index], self.config)

    def __getitems__(self, indices: list[int]) -> list[tuple[int, int] | None]:
        return header_sizes([self.refs[i] for i in indices], self.config)


def header_size(ref: ImageRef, config: Config, loaded: Loaded = None) -> tuple[int, int] | None:
    """The displayed size from the header (a tar member's or URL's first HEADER_BYTES); None
    for a folder that could not be listed, or a header that cannot be read (decoding will
    record why)."""
    if ref.problem is not None or isinstance(loaded, ImageError):
        return None
    try:
        source = loaded or load(ref, config.fetch_timeout, header=True)
    except ImageError:
        return None
    return images.read_size(source)


def header_sizes(refs: Sequence[ImageRef], config: Config) -> list[tuple[int, int] | None]:
    loaded = load_all(refs, config, header=True)
    return [header_size(r, config, ahead) for r, ahead in zip(refs, loaded, strict=True)]


def read_sizes(
    refs: Sequence[ImageRef], workers: int, config: Config | None = None
) -> list[tuple[int, int] | None]:
    config = config or Config()
    if workers == 0 or len(refs) < 64:  # 64 at a time: a remote header is held until read
        return [
            s for at in range(0, len(refs), 64) for s in header_sizes(refs[at : at + 64], config)
        ]
    loader = DataLoader(
        _Headers(refs, config),
        batch_size=64,
        num_workers=workers,
        collate_fn=list,
        generator=own_generator(),
    )
    return [size for chunk in loader for size in chunk]
