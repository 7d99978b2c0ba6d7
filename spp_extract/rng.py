"""torch's global random number generator, used the one safe way.

torchvision initialises models (and ``torch.svd_lowrank`` draws its test matrix) from torch's
process-wide generator, which has no per-call handle. Every draw the library makes happens
inside ``seeded``: one block at a time in the process (a lock, so threads never interleave
their draws or their seeds), from a known seed, and the caller's generator state is put back
at the end.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch

_LOCK = threading.RLock()


@contextlib.contextmanager
def seeded(seed: int | None, devices: Sequence[torch.device] = ()) -> Iterator[None]:
    """Draws on torch's global generator (and on ``devices``' CUDA generators) inside this
    block come from ``seed`` (None: from whatever state it has) and leave it as it was."""
    cuda = [d for d in devices if d.type == "cuda"]
    with _LOCK, torch.random.fork_rng(devices=cuda):
        if seed is not None:
            torch.manual_seed(seed)
        yield
