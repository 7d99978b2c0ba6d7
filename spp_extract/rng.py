"""Random numbers, drawn without touching the caller's.

A random model init (``weights = "none"``) draws from a generator of its own, seeded with
``seed`` (``private_init``): torchvision initialises through ``torch.nn.init``'s functions,
which take a ``generator``; while a build runs, thin wrappers around them hand that generator
to the calls made by the building thread only (every other thread's calls pass through
unchanged), so no other thread's use of torch's global generator can change the weights, and
the build changes nothing of it. The same sequence as seeding the global generator: both are
MT19937 from the same seed, drawn in the same order.

``seeded`` is for what takes no generator (``torch.svd_lowrank``): the global generator,
seeded, one block at a time in the process (a lock), the caller's state put back after.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.nn import init

_LOCK = threading.RLock()
_RANDOM_INITS = (
    "uniform_",
    "normal_",
    "trunc_normal_",
    "kaiming_uniform_",
    "kaiming_normal_",
    "xavier_uniform_",
    "xavier_normal_",
    "orthogonal_",
    "sparse_",
)
_local = threading.local()
_installed: dict[str, Callable[..., Any]] = {}  # name -> the original, while builds run
_builds = [0]


def _handing(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def initialise(*args: Any, **kwargs: Any) -> Any:
        generator = getattr(_local, "generator", None)
        if generator is not None and kwargs.get("generator") is None:
            kwargs["generator"] = generator
        return original(*args, **kwargs)

    return initialise


@contextlib.contextmanager
def private_init(seed: int) -> Iterator[None]:
    """Random inits made by this thread inside this block draw from a generator seeded with
    ``seed``, never from torch's global one."""
    with _LOCK:
        if _builds[0] == 0:
            for name in _RANDOM_INITS:
                _installed[name] = getattr(init, name)
                setattr(init, name, _handing(_installed[name]))
        _builds[0] += 1
    outer = getattr(_local, "generator", None)
    _local.generator = torch.Generator().manual_seed(seed)
    try:
        yield
    finally:
        _local.generator = outer
        with _LOCK:
            _builds[0] -= 1
            if _builds[0] == 0:
                for name, original in _installed.items():
                    setattr(init, name, original)
                _installed.clear()


@contextlib.contextmanager
def seeded(seed: int | None, devices: Sequence[torch.device] = ()) -> Iterator[None]:
    """Draws on torch's global generator (and on ``devices``' CUDA generators) inside this
    block come from ``seed`` (None: from whatever state it has) and leave it as it was; one
    block at a time in the process."""
    cuda = [d for d in devices if d.type == "cuda"]
    with _LOCK, torch.random.fork_rng(devices=cuda):
        if seed is not None:
            torch.manual_seed(seed)
        yield
