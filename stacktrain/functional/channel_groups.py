"""Tracing a network and finding its coupled channel groups (Torch-Pruning's ``DependencyGraph``).

A group is every tensor slice that must be pruned together: the convolution(s) producing the
channels, their norms, the layers consuming them, across residual adds, concatenations and
depthwise convolutions. Grouped convolutions are pruned in units of one position in every conv
group (so each conv group keeps the same width and the layer can be physically shrunk).
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = ["ChannelSlice", "ChannelGroup", "find_channel_groups", "trace_dependency_graph"]


@dataclass(frozen=True)
class ChannelSlice:
    """One tensor slice of a group: ``getattr(model.get_submodule(module), param)`` along ``dim``;
    ``grid[u]`` are the positions along ``dim`` that belong to unit ``u`` (same count for every unit).

    ``role``: "producer" makes the channels (its weights are the CSS columns), "norm" is a
    per-channel norm or activation parameter, "stats" a norm's running statistics (restored on
    regrow, never zeroed), "consumer" reads the channels (its input slice)."""

    module: str
    param: str
    dim: int
    grid: torch.Tensor
    role: str

    @property
    def key(self) -> str:
        return f"{self.module}.{self.param}" if self.module else self.param

    @property
    def zeroed(self) -> bool:
        """Whether masking zeroes this slice (running statistics are only saved and restored)."""
        return self.role != "stats"


@dataclass
class ChannelGroup:
    """Coupled channels pruned together. ``name`` is the root convolution; the group has
    ``num_units`` units of ``unit_channels`` channels each."""

    name: str
    num_units: int
    unit_channels: int
    slices: list[ChannelSlice] = field(default_factory=list)
    #: more than one (non-depthwise) layer writes these channels: a residual stream joined by adds
    residual: bool = False

    @property
    def channels(self) -> int:
        return self.num_units * self.unit_channels

    def dead_channels(self, mask: torch.Tensor) -> list[int]:
        """Channel indices of the root convolution's output that ``mask`` prunes (channel c belongs
        to unit ``c % num_units``)."""
        dead_units = set((~mask).nonzero().flatten().tolist())
        return [c for c in range(self.channels) if c % self.num_units in dead_units]


# --------------------------------------------------------------------------------------- groups
_DUMMY_OPS = ("ELEMENTWISE", "RESHAPE", "CONCAT", "SPLIT", "SLICE", "UNBIND", "EXPAND")


def trace_dependency_graph(
    model: nn.Module, example_inputs: Any, forward_fn: Callable[[nn.Module, Any], Any] | None = None
) -> Any:
    """Torch-Pruning's ``DependencyGraph`` of ``model`` traced on ``example_inputs`` (the training
    flags of every submodule are restored afterwards; the trace runs in eval mode). The graph gets
    ``output_modules``: the modules whose output tensor is itself an output of the network."""
    import torch_pruning as tp

    forward = forward_fn or (lambda m, x: m(x))
    produced: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    outputs: list[Any] = []

    def record(module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):
            produced[id(output)] = (module, output)  # the reference keeps the id unique

    def run(module: nn.Module, inputs: Any) -> Any:
        result = forward(module, inputs)
        outputs.append(result)
        return result

    flags = {module: module.training for module in model.modules()}
    handles = [m.register_forward_hook(record) for m in model.modules() if m is not model]
    try:
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(model, example_inputs, forward_fn=run, verbose=False)
    finally:
        for handle in handles:
            handle.remove()
        for module, training in flags.items():
            module.training = training
    leaves = _tensors(outputs[0]) if outputs else []
    graph.output_modules = {produced[id(t)][0] for t in leaves if id(t) in produced}
    return graph


def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors(item)]
    return []


def find_channel_groups(
    model: nn.Module,
    example_inputs: Any,
    *,
    ignore: Sequence[str] = (),
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
    graph: Any = None,
    prune_residual: bool = True,
) -> list[ChannelGroup]:
    """The prunable channel groups of ``model``, each rooted at a convolution, in module order.

    A group is left out when its channels are an output of the network (a convolutional classifier
    head), when it contains a layer this module cannot mask exactly (LayerNorm, GroupNorm,
    attention, transposed convolutions, bare parameters), or when one of its producing layers
    matches a pattern in ``ignore`` (``fnmatch`` on module names, e.g. ``"model.head*"``).
    ``prune_residual=False`` also leaves out the residual streams (groups several layers write, as
    the adds of a ResNet join them), as the CHEX reference does: only the blocks' inner widths shrink.
    """
    graph = graph or trace_dependency_graph(model, example_inputs, forward_fn)
    names = {module: name for name, module in model.named_modules()}
    ignored = [m for name, m in model.named_modules() if name and any(fnmatch.fnmatch(name, p) for p in ignore)]
    order = {name: i for i, name in enumerate(names.values())}
    groups = []
    for group in graph.get_all_groups(ignored_layers=ignored, root_module_types=(nn.modules.conv._ConvNd,)):
        described = _describe_group(group, graph, names)
        if described is not None:
            groups.append(described)
    groups = _consistent(groups, model)
    if not prune_residual:
        groups = [g for g in groups if not g.residual]
    groups.sort(key=lambda g: order.get(g.name, len(order)))
    return groups


def _consistent(groups: list[ChannelGroup], model: nn.Module) -> list[ChannelGroup]:
    """Drop groups whose index mapping cannot be right: a producing layer must give all of its output
    channels to one group, and no tensor position may belong to two groups. (Torch-Pruning loses the
    offsets of a concatenation whose result is flattened into a linear layer, for instance.)"""
    bad: set[int] = set()
    owners: dict[tuple[str, int], list[tuple[int, set[int]]]] = {}
    for index, group in enumerate(groups):
        for s in group.slices:
            tensor = getattr(model.get_submodule(s.module), s.param)
            positions = set(s.grid.flatten().tolist())
            if s.role == "producer" and s.dim == 0 and len(positions) != tensor.shape[0]:
                bad.add(index)
            owners.setdefault((s.key, s.dim), []).append((index, positions))
    for entries in owners.values():
        for i, (a, first) in enumerate(entries):
            for b, second in entries[i + 1:]:
                if a != b and first & second:
                    bad.update((a, b))
    return [g for i, g in enumerate(groups) if i not in bad]


def _describe_group(group: Any, graph: Any, names: dict[nn.Module, str]) -> ChannelGroup | None:
    root_module = group[0].dep.target.module
    root_name = names.get(root_module)
    if root_name is None or not isinstance(root_module, nn.modules.conv._ConvNd):
        return None
    channels = len(group[0].idxs)
    raw: list[tuple[str, str, int, list[int], list[int], str]] = []  # module, param, dim, positions, channels, role
    conv_groups = 1
    writers: set[str] = set()  # layers (not depthwise) whose outputs are these channels
    for item in group.items:
        dep = item.dep
        target = dep.target
        kind = target.type.name if hasattr(target.type, "name") else str(target.type)
        if kind in _DUMMY_OPS:
            continue
        if kind == "OUTPUT":
            return None  # these channels are the network's output
        module = target.module
        name = names.get(module) if isinstance(module, nn.Module) else None
        if name is None:
            return None  # a bare parameter
        plain = [int(i) for i in item.idxs]
        roots = [int(i) for i in item.root_idxs]
        is_out = graph.is_out_channel_pruning_fn(dep.handler)
        consumer = not is_out and isinstance(module, (nn.Linear, nn.modules.conv._ConvNd)) and not (
            isinstance(module, nn.modules.conv._ConvNd) and module.groups == module.out_channels > 1
        )
        if not consumer and module in getattr(graph, "output_modules", ()):
            return None  # these channels are the network's output
        if isinstance(module, nn.modules.conv._ConvNd):
            if module.transposed:
                return None
            depthwise = module.groups == module.out_channels and module.out_channels > 1
            if depthwise or is_out:
                if not depthwise:
                    writers.add(name)
                if module.groups > 1 and not depthwise:
                    conv_groups = math.lcm(conv_groups, module.groups)
                raw.append((name, "weight", 0, plain, roots, "producer"))
                if module.bias is not None:
                    raw.append((name, "bias", 0, plain, roots, "producer"))
            else:
                if module.groups > 1:
                    if plain != roots:
                        return None
                    conv_groups = math.lcm(conv_groups, module.groups)
                    per_group = module.in_channels // module.groups
                    plain = [p % per_group for p in plain]
                raw.append((name, "weight", 1, plain, roots, "consumer"))
        elif isinstance(module, nn.Linear):
            if is_out:
                writers.add(name)
                raw.append((name, "weight", 0, plain, roots, "producer"))
                if module.bias is not None:
                    raw.append((name, "bias", 0, plain, roots, "producer"))
            else:
                raw.append((name, "weight", 1, plain, roots, "consumer"))
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.affine:
                raw.append((name, "weight", 0, plain, roots, "norm"))
                raw.append((name, "bias", 0, plain, roots, "norm"))
            if module.track_running_stats and module.running_mean is not None:
                raw.append((name, "running_mean", 0, plain, roots, "stats"))
                raw.append((name, "running_var", 0, plain, roots, "stats"))
        elif isinstance(module, nn.PReLU):
            if module.num_parameters > 1:
                raw.append((name, "weight", 0, plain, roots, "norm"))
        else:
            return None  # a layer we cannot mask so that the compact network computes the same
    if channels % conv_groups:
        return None
    num_units = channels // conv_groups
    slices = []
    for name, param, dim, positions, roots, role in raw:
        units = torch.tensor(roots, dtype=torch.long) % num_units
        pairs = torch.unique(torch.stack([units, torch.tensor(positions, dtype=torch.long)], dim=1), dim=0)
        if pairs[:, 1].unique().numel() != pairs.shape[0]:
            return None  # one position would belong to two units
        counts = torch.bincount(pairs[:, 0], minlength=num_units)
        if bool((counts == 0).any()) or bool((counts != counts[0]).any()):
            return None
        slices.append(ChannelSlice(name, param, dim, pairs[:, 1].reshape(num_units, -1).contiguous(), role))
    if not any(s.role == "producer" and s.param == "weight" for s in slices):
        return None
    return ChannelGroup(root_name, num_units, conv_groups, slices, residual=len(writers) > 1)
