"""Backbone registry: model name -> torchvision convolutional trunk cut at a chosen layer.

A trunk is the model's convolutional part as an ``nn.Sequential`` of its own named children
(``conv1, bn1, ..., layer4`` for ResNets; ``features`` for VGG), so parameter names equal the
full model's and a full-model state dict loads into it. Any layer is selectable by its dotted
name through nested ``Sequential`` containers (``features.29``, ``layer3``, ``features.3.1``).

Normalisation uses the weights' mean/std only, never their resize/crop preset.
"""

from __future__ import annotations

import difflib
import functools
import logging
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import list_models
from torchvision.models.feature_extraction import get_graph_node_names

from .config import Config
from .errors import ConfigError
from .masking import maskable
from .pooling import spp_dim
from .provenance import Provenance, Resolved
from .rng import private_init
from .weights import get_model, load_model, load_state_file, resolve_weights

log = logging.getLogger(__name__)


Chain = list[tuple[str, nn.Module]]


class _GoogLeNetInput(nn.Module):
    """GoogLeNet/Inception-v3 ``transform_input``: their pretrained weights expect it."""

    pointwise = True  # a per-channel affine map: masking.maskable lets it through

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model_transform = model._transform_input  # type: ignore[attr-defined]

    def forward(self, x: Tensor) -> Tensor:
        return self.model_transform(x)


def _children(model: nn.Module, names: list[str]) -> Chain:
    return [(name, getattr(model, name)) for name in names]


def _resnet(m: nn.Module) -> Chain:
    return _children(m, ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"])


def _densenet(m: nn.Module) -> Chain:
    return [("features", m.features), ("relu", nn.ReLU())]  # DenseNet applies relu in forward()


def _googlenet(m: nn.Module) -> Chain:
    names = [
        "conv1",
        "maxpool1",
        "conv2",
        "conv3",
        "maxpool2",
        "inception3a",
        "inception3b",
        "maxpool3",
        "inception4a",
        "inception4b",
        "inception4c",
        "inception4d",
        "inception4e",
        "maxpool4",
        "inception5a",
        "inception5b",
    ]
    prefix = [("transform_input", _GoogLeNetInput(m))] if m.transform_input else []
    return prefix + _children(m, names)


def _inception3(m: nn.Module) -> Chain:
    names = [
        "Conv2d_1a_3x3",
        "Conv2d_2a_3x3",
        "Conv2d_2b_3x3",
        "maxpool1",
        "Conv2d_3b_1x1",
        "Conv2d_4a_3x3",
        "maxpool2",
        "Mixed_5b",
        "Mixed_5c",
        "Mixed_5d",
        "Mixed_6a",
        "Mixed_6b",
        "Mixed_6c",
        "Mixed_6d",
        "Mixed_6e",
        "Mixed_7a",
        "Mixed_7b",
        "Mixed_7c",
    ]
    prefix = [("transform_input", _GoogLeNetInput(m))] if m.transform_input else []
    return prefix + _children(m, names)


def _attr(name: str) -> Callable[[nn.Module], Chain]:
    return lambda m: [(name, getattr(m, name))]


@dataclass(frozen=True)
class Family:
    """How to take the trunk out of one family of torchvision models."""

    prefix: str
    chain: Callable[[nn.Module], Chain]
    default_layer: str


# Order matters: the first prefix that matches a model name wins.
FAMILIES = (
    Family("resnet", _resnet, "layer4"),
    Family("resnext", _resnet, "layer4"),
    Family("wide_resnet", _resnet, "layer4"),
    Family("vgg", _attr("features"), "features"),
    Family("alexnet", _attr("features"), "features"),
    Family("densenet", _densenet, "relu"),
    Family("mobilenet_v2", _attr("features"), "features"),
    Family("mobilenet_v3", _attr("features"), "features"),
    Family("efficientnet", _attr("features"), "features"),
    Family("regnet_x", lambda m: _children(m, ["stem", "trunk_output"]), "trunk_output"),
    Family("regnet_y", lambda m: _children(m, ["stem", "trunk_output"]), "trunk_output"),
    Family("convnext", _attr("features"), "features"),
    Family("squeezenet", _attr("features"), "features"),
    Family(
        "shufflenet_v2",
        lambda m: _children(m, ["conv1", "maxpool", "stage2", "stage3", "stage4", "conv5"]),
        "conv5",
    ),
    Family("mnasnet", _attr("layers"), "layers"),
    Family("googlenet", _googlenet, "inception5b"),
    Family("inception_v3", _inception3, "Mixed_7c"),
)
REFUSED = ("vit_", "swin_", "maxvit_")  # attention over fixed-size patch grids


def family_of(name: str) -> Family | None:
    return next((f for f in FAMILIES if name.startswith(f.prefix)), None)


def list_backbones() -> list[str]:
    """The torchvision models spp-extract can use, by name (``get_model`` names)."""
    return [n for n in list_models(module=torchvision.models) if family_of(n) is not None]


def _check_backbone(name: str, note: str = "") -> Family:
    family = family_of(name)
    if family is not None and name in list_models(module=torchvision.models):
        return family
    if name.startswith(REFUSED):
        raise ConfigError(
            f"backbone {name!r} is a vision transformer: it needs a fixed input size, so it "
            f"cannot pool native-size images; choose a CNN (spp-extract backbones lists them){note}"
        )
    close = difflib.get_close_matches(name, list_backbones(), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    raise ConfigError(f"unknown backbone {name!r}; {hint}(spp-extract backbones lists all){note}")


def _layer_names(chain: Chain) -> list[str]:
    """Every selectable layer: top-level names and, through Sequentials, their dotted children."""
    names: list[str] = []

    def walk(prefix: str, module: nn.Module) -> None:
        names.append(prefix)
        if isinstance(module, nn.Sequential):
            for child_name, child in module.named_children():
                walk(f"{prefix}.{child_name}", child)

    for name, module in chain:
        walk(name, module)
    return names


def _inside_a_block(model: nn.Module, layer: str, names: list[str]) -> str:
    """For a ``layer`` that torchvision's graph of the model has (a node name such as
    ``layer3.1.conv2``, or a module holding some) but that is no cut point: why, and where to cut."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "train and eval graphs differ" for some families
        nodes = get_graph_node_names(model.eval())[1]
    if not any(n == layer or n.startswith(f"{layer}.") for n in nodes):
        return ""
    block = max((n for n in names if layer.startswith(f"{n}.")), key=len, default="")
    if not block:
        return f"{layer!r} is in the model's graph but is no cut point; "
    return (
        f"{layer!r} is inside {block!r}, which cannot be cut inside (its forward() is more "
        f"than a chain of its children); cut at {block!r} or before it? "
    )


# The trunk is the model's own named children in an nn.Sequential, not torchvision's
# create_feature_extractor: that returns a graph module whose output is a dict (so a wrapper
# would rename every state-dict key), and it could cut inside blocks whose masked and tiled
# runs are not verified. The names are checked against torchvision's graph (_inside_a_block).
def _cut(chain: Chain, layer: str) -> nn.Sequential:
    """The chain up to and including ``layer``, as one Sequential with the model's names."""
    head, _, rest = layer.partition(".")
    out = nn.Sequential()
    for name, module in chain:
        if name != head:
            out.add_module(name, module)
            continue
        if not rest:
            out.add_module(name, module)
        else:
            # Keep the container name so parameter names still match the full model.
            inner = list(module.named_children())
            out.add_module(name, _cut(inner, rest))
        return out
    raise KeyError(layer)


_PATCHING = threading.Lock()


def meta_model(name: str) -> nn.Module:
    """The untrained model built on the meta device: no memory, no init cost; for names,
    shapes and sizes."""
    if not name.startswith("regnet"):
        with private_init(0), torch.device("meta"):
            return get_model(name, weights=None)
    # RegNet's builder computes its stage widths with tensor ops and .tolist(), which fails on
    # meta tensors; there the parameters are made on the CPU one at a time and moved. The
    # patch acts only in this thread: another thread building a module meanwhile is untouched.
    register_parameter, register_buffer = nn.Module.register_parameter, nn.Module.register_buffer
    builder = threading.get_ident()

    def parameter(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register_parameter(self, name, param)
        if param is not None and threading.get_ident() == builder:
            self._parameters[name] = nn.Parameter(param.to("meta"), param.requires_grad)

    def buffer(self: nn.Module, name: str, tensor: Tensor | None, persistent: bool = True) -> None:
        register_buffer(self, name, tensor, persistent)
        if tensor is not None and threading.get_ident() == builder:
            self._buffers[name] = tensor.to("meta")

    with _PATCHING, private_init(0):  # the patch is installed and removed under the lock
        nn.Module.register_parameter = parameter  # type: ignore[method-assign]
        nn.Module.register_buffer = buffer  # type: ignore[method-assign]
        try:
            return get_model(name, weights=None)
        finally:
            nn.Module.register_parameter = register_parameter  # type: ignore[method-assign]
            nn.Module.register_buffer = register_buffer  # type: ignore[method-assign]


def resolve(config: Config) -> Resolved:
    """Check backbone, layer and weights; fill in defaults. Raises ConfigError."""
    family = _check_backbone(config.backbone, config.came_from("backbone"))
    model = meta_model(config.backbone)
    chain = family.chain(model)
    layer = config.layer or family.default_layer
    names = _layer_names(chain)
    if layer not in names:
        close = difflib.get_close_matches(layer, names, n=3)
        hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
        hint = _inside_a_block(model, layer, names) or hint
        shown = ", ".join(names) if len(names) <= 40 else ", ".join(names[:40]) + ", ..."
        raise ConfigError(
            f"unknown layer {layer!r} for {config.backbone}"
            f"{config.came_from('layer', 'backbone')}; {hint}valid layers: {shown}"
        )
    weights, weights_id, mean, std = resolve_weights(config)
    return Resolved(config.backbone, layer, weights, weights_id, mean, std)


@dataclass
class Trunk:
    """A ready trunk: eval mode, no grad, on CPU; plus what the pipeline needs to know."""

    module: nn.Sequential
    resolved: Resolved
    channels: int
    min_side: int  # smallest input side the trunk accepts; smaller images are padded up to it

    @functools.cached_property
    def maskable(self) -> bool:
        """Each image of a masked padded batch gets exactly its own result (``masking``); the
        same locality makes the trunk tileable."""
        return maskable(self.module)


def _probe(meta: nn.Module, height: int, width: int) -> tuple[int, int, int] | None:
    """Output (C, H, W) of a meta-device trunk for an input of this size; None if too small."""
    try:
        out = meta(torch.empty(1, 3, height, width, device="meta"))
    except RuntimeError:
        return None
    if out.dim() != 4 or min(out.shape[-2:]) < 1:
        return None
    return int(out.shape[1]), int(out.shape[2]), int(out.shape[3])


def min_side(meta: nn.Module) -> int:
    """Smallest square input a meta-device trunk accepts (1 for ResNets, 32 for VGG, ...)."""
    low, high = 1, 1
    while _probe(meta, high, high) is None:
        low, high = high + 1, high * 2
        if high > 4096:
            raise ConfigError("this trunk accepts no input up to 4096 px; choose another layer")
    while low < high:
        mid = (low + high) // 2
        if _probe(meta, mid, mid) is None:
            low = mid + 1
        else:
            high = mid
    return high


def describe(backbone: str, layer: str = "") -> tuple[str, int, bool]:
    """(resolved layer, channels, maskable) without weights or compute (meta device)."""
    family = _check_backbone(backbone)
    resolved = resolve(Config(backbone=backbone, layer=layer, weights="none"))
    trunk = _cut(family.chain(meta_model(backbone)), resolved.layer).eval()
    probe = _probe(trunk, 224, 224)
    if probe is None:
        raise ConfigError(f"{backbone} {resolved.layer} does not accept a 224 px input")
    return resolved.layer, probe[0], maskable(trunk)


def provenance_of(config: Config) -> Provenance:
    """What ``config`` would make (``Provenance``), vector length included, without weights
    or compute (meta device)."""
    resolved = resolve(config)
    _, channels, _ = describe(resolved.backbone, resolved.layer)
    return Provenance.of_run(config, resolved, spp_dim(channels, config.levels))


def build_trunk(config: Config, resolved: Resolved | None = None) -> Trunk:
    """Build the trunk with its weights. Raises ConfigError for anything the user can fix.
    ``resolved``: ``resolve(config)`` if the caller has it (it hashes a weights file)."""
    resolved = resolved or resolve(config)
    family = _check_backbone(config.backbone)
    model = load_model(config, resolved).eval()
    trunk = _cut(family.chain(model), resolved.layer)
    if resolved.weights.startswith("file:"):
        load_state_file(model, trunk, Path(config.weights), config.backbone)
    trunk.eval().requires_grad_(False)
    # Sizes do not depend on weights: probe the same architecture built on the meta device.
    meta = _cut(family.chain(meta_model(config.backbone)), resolved.layer)
    side = min_side(meta.eval())
    probe = _probe(meta, max(side, 224), max(side, 224))
    assert probe is not None  # min_side just proved some size works
    return Trunk(trunk, resolved, probe[0], side)
