"""Where a run computes: this process's place among torchrun's ranks, the device (``auto``:
CUDA, then MPS, then the CPU; checked to exist) and the CPU cores it may use. Light: no
torchvision, so that ``reduce`` and ``neighbors`` start quickly."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .config import AUTO, Config
from .errors import ConfigError, option

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Dist:
    """This process's place under torchrun (``WORLD_SIZE`` etc.); one rank without it."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @property
    def active(self) -> bool:
        return self.world > 1

    @classmethod
    def from_env(cls) -> Dist:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls()
        return cls(
            int(os.environ["RANK"]),
            world,
            int(os.environ.get("LOCAL_RANK", "0")),
            int(os.environ.get("LOCAL_WORLD_SIZE", str(world))),
        )


def resolve_device(config: Config, ctx: Dist) -> torch.device:
    """``config.device`` (``auto``: CUDA, then MPS on one rank, then CPU), checked to exist."""
    import torch

    name = config.device
    if name == AUTO:
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available() and not ctx.active:
            name = "mps"
        else:
            name = "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(
                f"device {name!r} requested but CUDA is not available; use {option('device', 'cpu')}"
            )
        count = torch.cuda.device_count()
        if name == "cuda":
            if ctx.active and ctx.local_rank >= count:
                raise ConfigError(
                    f"this machine has {count} CUDA device(s) but torchrun started "
                    f"{ctx.local_world} ranks on it; use --nproc-per-node={count} "
                    "(one rank per GPU: NCCL cannot share a device between ranks)"
                )
            name = f"cuda:{ctx.local_rank if ctx.active else 0}"
        if int(name.split(":")[1]) >= count:
            raise ConfigError(
                f"device {name!r} does not exist; {torch.cuda.device_count()} CUDA devices"
            )
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(
            f"device 'mps' requested but MPS is not available; use {option('device', 'cpu')}"
        )
    return torch.device(name)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def device_named(name: str | torch.device | None) -> torch.device:
    """A device by the extraction's rules (``auto``/None: CUDA, then MPS, then CPU), for one
    process; ConfigError, one line, for a bad or unavailable one."""
    import torch

    if isinstance(name, torch.device):
        name = str(name)
    return resolve_device(Config(device=str(name or AUTO)), Dist())
