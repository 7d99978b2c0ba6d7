"""The torchvision model families spp-extract can cut, and what is learnt by building a model
on the meta device (no memory, no weights): its layers, channels, stride, smallest input side.

A trunk is the model's convolutional part as an ``nn.Sequential`` of its own named children
(``conv1, bn1, ..., layer4`` for ResNets; ``features`` for VGG), so parameter names equal the
full model's and a full-model state dict loads into it. Any layer is selectable by its dotted
name through nested ``Sequential`` containers (``features.29``, ``layer3``, ``features.3.1``).

``probe_facts`` makes one entry of the catalog (``catalog``, ``backbones.json``); this module
imports torch, the catalog does not.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import get_model_weights, list_models
from torchvision.models.feature_extraction import get_graph_node_names

from .errors import ConfigError
from .masking import maskable
from .rng import private_init
from .weights import get_model

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


def family_of(name: str) -> Family | None:
    return next((f for f in FAMILIES if name.startswith(f.prefix)), None)


def live_names() -> list[str]:
    """The torchvision models spp-extract can use, by name, asked of torchvision itself."""
    return sorted(n for n in list_models(module=torchvision.models) if family_of(n) is not None)


def family_named(name: str) -> Family:
    family = family_of(name)
    if family is None:  # catalog.check_name has refused anything else
        raise ConfigError(f"unknown backbone {name!r}; (spp-extract backbones lists all)")
    return family


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


def layer_hint(backbone: str, layer: str, names: Sequence[str]) -> str:
    """For a ``layer`` that torchvision's graph of the model has (a node name such as
    ``layer3.1.conv2``, or a module holding some) but that is no cut point: why, and where to
    cut ("" otherwise)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "train and eval graphs differ" for some families
        nodes = get_graph_node_names(meta_model(backbone).eval())[1]
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
# runs are not verified. A name inside a block is explained from torchvision's graph (layer_hint).
def cut(chain: Chain, layer: str) -> nn.Sequential:
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
            out.add_module(name, cut(inner, rest))
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


def output_shape(meta: nn.Module, height: int, width: int) -> tuple[int, int, int] | None:
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
    while output_shape(meta, high, high) is None:
        low, high = high + 1, high * 2
        if high > 4096:
            raise ConfigError("this trunk accepts no input up to 4096 px; choose another layer")
    while low < high:
        mid = (low + high) // 2
        if output_shape(meta, mid, mid) is None:
            low = mid + 1
        else:
            high = mid
    return high


def probe_facts(name: str) -> dict[str, Any]:
    """A backbone's entry of the catalog, probed live: the model built on the meta device,
    its layers, and at the default layer its channels, stride, smallest side, maskable; its
    torchvision weights with their mean and std."""
    family = family_named(name)
    model = meta_model(name)
    chain = family.chain(model)
    trunk = cut(chain, family.default_layer).eval()
    side = min_side(trunk)
    probe, half = output_shape(trunk, 1024, 1024), output_shape(trunk, 512, 512)
    assert probe is not None and half is not None
    enum = get_model_weights(name)
    menu = {}
    for w in enum:
        preset = w.transforms()
        menu[w.name] = {
            "mean": [float(v) for v in preset.mean],
            "std": [float(v) for v in preset.std],
        }
    return {
        "default_layer": family.default_layer,
        "layers": _layer_names(chain),
        "channels": probe[0],
        "stride": round(512 / (probe[1] - half[1])),  # borders cancel out
        "min_side": side,
        "maskable": maskable(trunk),
        "weights_enum": enum.__name__,
        "weights": menu,
        "default_weights": enum.DEFAULT.name,
    }
