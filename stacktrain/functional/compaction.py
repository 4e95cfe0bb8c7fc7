"""Physical removal of masked channels (Torch-Pruning) and what training needs afterwards: the
optimizer's parameters and state (momentum, Adam moments) cut to the kept channels. No Lightning."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from stacktrain.functional.channel_selection import ChannelPlan, trace_dependency_graph

__all__ = ["compact_network", "remap_optimizer", "slice_like"]


def _tensor_by_key(model: nn.Module, key: str) -> torch.Tensor:
    module, _, param = key.rpartition(".")
    return getattr(model.get_submodule(module), param)


@torch.no_grad()
def compact_network(
    model: nn.Module,
    plan: ChannelPlan,
    masks: Sequence[torch.Tensor],
    example_inputs: Any,
    forward_fn: Callable[[nn.Module, Any], Any] | None = None,
) -> dict[str, dict[int, torch.Tensor]]:
    """Remove the channels ``masks`` prune from ``model`` in place, group by group, with
    Torch-Pruning's dependency graph (coupled convolutions, norms, residual adds, concatenations,
    depthwise and grouped convolutions shrink together).

    Returns, per tensor name, the positions kept along each shrunk dim: what `remap_optimizer`
    needs. Parameters that were frozen stay frozen. The result is checked against the plan.
    """
    keep = plan.keep_positions(model, masks)
    expected = {}
    for key, dims in keep.items():
        shape = list(_tensor_by_key(model, key).shape)
        for dim, positions in dims.items():
            shape[dim] = positions.numel()
        expected[key] = tuple(shape)
    frozen = {name for name, p in model.named_parameters() if not p.requires_grad}
    graph = trace_dependency_graph(model, example_inputs, forward_fn)
    modules = dict(model.named_modules())
    for index, group in enumerate(plan.groups):
        dead = group.dead_channels(masks[index])
        if not dead:
            continue
        root = modules[group.name]
        pruner = graph.get_pruner_of_module(root)
        graph.get_pruning_group(root, pruner.prune_out_channels, dead).prune()
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    for key, shape in expected.items():
        actual = tuple(_tensor_by_key(model, key).shape)
        if actual != shape:
            raise RuntimeError(f"compaction gave {key} the shape {actual}, the masks imply {shape}")
    return keep


def slice_like(value: Any, shape: torch.Size, keep: dict[int, torch.Tensor]) -> Any:
    """``value`` cut to the kept positions if it is a tensor shaped like the parameter (optimizer
    state such as ``exp_avg``), unchanged otherwise (``step``)."""
    if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(shape):
        return value
    for dim, positions in keep.items():
        value = value.index_select(dim, positions.to(value.device))
    return value.contiguous()


def remap_optimizer(
    optimizer: torch.optim.Optimizer,
    old: dict[str, nn.Parameter],
    new: dict[str, nn.Parameter],
    keep: dict[str, dict[int, torch.Tensor]],
) -> int:
    """Point ``optimizer`` at the compacted parameters (``new``, by name) instead of the dense ones
    (``old``), with its per-parameter state cut to the kept channels. The optimizer object, its
    hyper-parameters and anything holding it (LR schedulers, hooks) stay as they are.
    Returns the number of parameters replaced."""
    names = {id(p): name for name, p in old.items()}
    replaced = 0
    for group in optimizer.param_groups:
        params = group["params"]
        for i, param in enumerate(params):
            name = names.get(id(param))
            if name is None or name not in new or new[name] is param:
                continue
            replacement = new[name]
            state = optimizer.state.pop(param, None)
            if state is not None:
                optimizer.state[replacement] = {
                    k: slice_like(v, param.shape, keep.get(name, {})) for k, v in state.items()
                }
            params[i] = replacement
            replaced += 1
    return replaced
