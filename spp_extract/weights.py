"""Loading weights (what ``weights`` names is resolved by ``catalog``): torchvision's through
its cache (``$TORCH_HOME/hub/checkpoints``), a state-dict file with ``torch.load(weights_only=
True)`` only, or a random init from the seed."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import threading
import urllib.parse
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import get_model as _tv_get_model
from torchvision.models import get_model_weights

from .config import Config
from .errors import ConfigError, option, printable
from .provenance import Resolved
from .rng import private_init

log = logging.getLogger("spp_extract.backbones")  # the CLI shows its "downloading ..." line

# sys.stdout is swapped while torch.hub may print: one thread at a time
_STDOUT = threading.Lock()


def get_model(name: str, **kwargs: object) -> nn.Module:
    with warnings.catch_warnings():
        # GoogLeNet/Inception warn that their default init will change; irrelevant here.
        warnings.filterwarnings("ignore", message="The default weight initialization")
        return _tv_get_model(name, **kwargs)


def load_model(config: Config, resolved: Resolved) -> nn.Module:
    """The whole torchvision model: with torchvision's weights (downloaded once into its
    cache), or randomly initialised from ``config.seed`` (a weights file is loaded into the
    trunk afterwards, ``load_state_file``). Raises ConfigError when the weights cannot be had."""
    if resolved.weights.startswith(("none", "file:")):
        with private_init(config.seed):  # random init is reproducible for weights = "none"
            return get_model(config.backbone, weights=None)
    enum_weights = get_model_weights(config.backbone)[resolved.weights.partition(".")[2]]
    cache = expected_cache_file(enum_weights.url)
    if not cache.is_file():
        log.info("downloading %s to %s", enum_weights.url, cache)
    try:
        # torch.hub prints "Downloading: ..." on stdout, which may be the user's data.
        with _STDOUT, contextlib.redirect_stdout(io.StringIO()), private_init(0):
            return get_model(config.backbone, weights=enum_weights, progress=False)
    except Exception as exc:  # URLError, OSError, hash mismatch, ...
        raise ConfigError(
            f"cannot load {resolved.weights}{config.came_from('weights')} "
            f"({type(exc).__name__}: {printable(' '.join(str(exc).split())[:120])}); it is "
            f"looked up at {cache} — download {enum_weights.url} there, pass "
            f"{option('weights', 'FILE')} with a state dict, or {option('weights', 'none')} for a "
            "seeded random init (trying things out)"
        ) from None


def expected_cache_file(url: str) -> Path:
    """Where torchvision's download (torch.hub) keeps a weights file: TORCH_HOME/hub/checkpoints."""
    name = os.path.basename(urllib.parse.urlparse(url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / name


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, KeyError...
        raise ConfigError(
            f"weights file '{printable(str(path))}' is not a PyTorch state-dict file "
            f"(torch.load(weights_only=True) refused it: {_load_error(exc)}); save one with "
            "torch.save(model.state_dict(), FILE)"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(data, dict) and isinstance(data.get(key), dict) and len(data) <= 3:
            data = data[key]
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise ConfigError(
            f"weights file '{path}' holds a {type(data).__name__}, not a state dict of tensors; "
            "save one with torch.save(model.state_dict(), FILE)"
        )
    return {k.removeprefix("module."): v for k, v in data.items()}


def _load_error(exc: Exception) -> str:
    """What torch.load said, without its advice to turn weights_only off (which would let the
    file run code): the unpickler's own reason where it gives one, else the exception type."""
    lines = [line.strip() for line in str(exc).splitlines()]
    reason = next(
        (
            line.partition("WeightsUnpickler error:")[2].strip()
            for line in lines
            if "WeightsUnpickler error:" in line
        ),
        "",
    )
    reason = reason.split(". ")[0]  # "Unsupported global: GLOBAL os.system was not an allowed ..."
    if not reason and lines and "weights_only" not in lines[0] and "Weights only" not in lines[0]:
        reason = lines[0]
    reason = printable(reason)[:200]
    return f"{type(exc).__name__}: {reason}" if reason else type(exc).__name__


def _summary(keys: list[str]) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")


def load_state_file(model: nn.Module, trunk: nn.Sequential, path: Path, backbone: str) -> None:
    state = _read_state_dict(path)
    trunk_keys = set(trunk.state_dict())
    model_keys = set(model.state_dict())
    missing = sorted(trunk_keys - set(state))
    unexpected = sorted(set(state) - model_keys)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_summary(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_summary(unexpected)}")
        raise ConfigError(
            f"weights file '{path}' does not fit {backbone} ({'; '.join(parts)}); is it for "
            "another architecture?"
        )
    try:
        trunk.load_state_dict({k: state[k] for k in trunk_keys}, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"weights file '{path}' does not fit {backbone}: {detail}") from None
