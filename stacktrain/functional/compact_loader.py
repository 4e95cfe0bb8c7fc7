"""Load a network that stacktrain's PruneRegrow compacted, with torch alone (no stacktrain needed).

`stacktrain.export_compact` copies this file beside every export, so that in any process::

    import timm
    from load_compact import load_compact

    model = timm.create_model("resnet18", num_classes=10, in_chans=1)  # the dense architecture
    load_compact(model, "export_dir")  # shrinks the pruned layers and loads the compact weights

The export directory holds ``channels.json`` (the new sizes of every shrunk layer) and
``state_dict.pt`` (the compact weights, loadable with ``torch.load(weights_only=True)``).
Only ``torch``, ``json`` and ``os`` are imported here.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch
from torch import nn

__all__ = [
    "CONFIG_FILE",
    "STATE_FILE",
    "layer_sizes",
    "channel_config",
    "config_from_state_dict",
    "resize_modules",
    "load_compact_state_dict",
    "load_compact",
]

CONFIG_FILE = "channels.json"
STATE_FILE = "state_dict.pt"


def layer_sizes(module: nn.Module) -> dict[str, Any] | None:
    """The size attributes of a layer whose channels can be pruned (None for other modules)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return {"kind": "conv", "in_channels": module.in_channels, "out_channels": module.out_channels,
                "groups": module.groups}
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return {"kind": "batchnorm", "num_features": module.num_features}
    if isinstance(module, nn.Linear):
        return {"kind": "linear", "in_features": module.in_features, "out_features": module.out_features}
    if isinstance(module, nn.PReLU):
        return {"kind": "prelu", "num_parameters": module.num_parameters}
    return None


def channel_config(model: nn.Module, reference: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Sizes of every prunable layer of ``model``; with ``reference`` (the dense sizes), only the
    layers whose sizes differ from it."""
    config = {}
    for name, module in model.named_modules():
        sizes = layer_sizes(module)
        if sizes is None or not name:
            continue
        if reference is None or reference.get(name) != sizes:
            config[name] = sizes
    return config


def config_from_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """The sizes that make ``model``'s layers match the tensor shapes in ``state_dict`` (for layers
    whose shapes differ): what a compacted checkpoint implies."""
    config = {}
    for name, module in model.named_modules():
        sizes = layer_sizes(module)
        prefix = f"{name}." if name else ""
        weight = state_dict.get(prefix + "weight")
        if sizes is None or not name:
            continue
        kind = sizes["kind"]
        if kind == "batchnorm":
            stats = state_dict.get(prefix + "running_mean")
            source = weight if weight is not None else stats
            if source is not None and source.shape[0] != module.num_features:
                config[name] = dict(sizes, num_features=int(source.shape[0]))
        elif weight is None or tuple(weight.shape) == tuple(module.weight.shape):
            continue
        elif kind == "conv":
            out_channels = int(weight.shape[0])
            depthwise = module.groups == module.out_channels and module.groups > 1
            groups = out_channels if depthwise else module.groups
            config[name] = dict(sizes, out_channels=out_channels, groups=groups, in_channels=int(weight.shape[1]) * groups)
        elif kind == "linear":
            config[name] = dict(sizes, out_features=int(weight.shape[0]), in_features=int(weight.shape[1]))
        elif kind == "prelu":
            config[name] = dict(sizes, num_parameters=int(weight.numel()))
    return config


def resize_modules(model: nn.Module, config: dict[str, dict[str, Any]], state_dict: dict[str, torch.Tensor]) -> None:
    """Give the layers named in ``config`` their sizes, with empty parameters and buffers shaped like
    the tensors in ``state_dict`` (which `torch.nn.Module.load_state_dict` then fills)."""
    for name, sizes in config.items():
        module = model.get_submodule(name)
        for attribute, value in sizes.items():
            if attribute != "kind":
                setattr(module, attribute, value)
        prefix = f"{name}."
        for key, tensor in state_dict.items():
            if not key.startswith(prefix) or "." in key[len(prefix):]:
                continue
            leaf = key[len(prefix):]
            current = getattr(module, leaf, None)
            if not isinstance(current, torch.Tensor) or tuple(current.shape) == tuple(tensor.shape):
                continue
            empty = torch.empty(tensor.shape, dtype=current.dtype, device=current.device)
            if isinstance(current, nn.Parameter):
                setattr(module, leaf, nn.Parameter(empty, requires_grad=current.requires_grad))
            else:
                module._buffers[leaf] = empty


def load_compact_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], config: dict[str, dict[str, Any]] | None = None
) -> nn.Module:
    """Shrink ``model``'s layers to ``config`` (default: what the state dict's shapes imply) and load
    ``state_dict`` strictly."""
    resize_modules(model, config if config is not None else config_from_state_dict(model, state_dict), state_dict)
    model.load_state_dict(state_dict)
    return model


def load_compact(model: nn.Module, directory: str) -> nn.Module:
    """Load an export of `stacktrain.export_compact` into ``model`` (built with the dense
    architecture, e.g. ``timm.create_model(...)``); returns it in eval mode."""
    with open(os.path.join(directory, CONFIG_FILE), encoding="utf-8") as handle:
        config = json.load(handle)
    state_dict = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
    load_compact_state_dict(model, state_dict, config["layers"])
    return model.eval()
