"""`ChannelPlan`: the channel groups of a network with its FLOPs per layer. It counts the FLOPs and
the channel sparsity of masked widths, zeroes masked slices, and keeps the most recently used values
of pruned channels so that regrown channels get them back. Masks are boolean tensors over a group's
units (one unit = one channel, except for grouped convolutions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stacktrain.functional.channel_groups import ChannelGroup, ChannelSlice, find_channel_groups
from stacktrain.functional.channel_scores import l1_scores
from stacktrain.functional.flops import flops_by_module

__all__ = ["ChannelPlan", "mask_digest"]


def mask_digest(masks: Sequence[torch.Tensor]) -> str:
    """A short fingerprint of a list of masks (to compare ranks and runs cheaply)."""
    import hashlib

    digest = hashlib.sha256()
    for mask in masks:
        digest.update(mask.to(torch.uint8).cpu().numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


@dataclass
class _Layer:
    """A convolution or linear layer's dense FLOPs and the sizes of its weight's first two dims."""

    flops: int
    out_size: int
    in_size: int


class ChannelPlan:
    """The channel groups of a network with its dense FLOPs per layer.

    Args:
        groups: from `find_channel_groups`.
        layer_flops: forward FLOPs of every convolution and linear layer (module name -> FLOPs).
        total_flops: forward FLOPs of the whole network (the flop counter's total).
        model: the network, for the weight shapes of the layers.
        minimum_ratio: every group keeps at least this fraction of its units (and at least one).
    """

    def __init__(
        self,
        groups: Sequence[ChannelGroup],
        layer_flops: dict[str, int],
        total_flops: int,
        model: nn.Module,
        minimum_ratio: float = 0.05,
    ) -> None:
        self.groups = list(groups)
        self.total_flops = int(total_flops)
        self.minimum = [max(1, math.ceil(minimum_ratio * g.num_units)) for g in self.groups]
        self.layers: dict[str, _Layer] = {}
        for name, flops in layer_flops.items():
            weight = model.get_submodule(name).weight
            self.layers[name] = _Layer(int(flops), int(weight.shape[0]), int(weight.shape[1]))
        # per (layer, dim): the slices of that layer's weight, as (group, positions per unit)
        self._layer_slices: dict[tuple[str, int], list[tuple[int, int]]] = {}
        self.slices_by_key: dict[str, list[tuple[int, ChannelSlice]]] = {}
        for g, group in enumerate(self.groups):
            for s in group.slices:
                self.slices_by_key.setdefault(s.key, []).append((g, s))
                if s.param == "weight" and s.module in self.layers and s.dim in (0, 1):
                    self._layer_slices.setdefault((s.module, s.dim), []).append((g, s.grid.shape[1]))
        self._dead_cache: tuple[Any, list[tuple[ChannelSlice, torch.Tensor]]] | None = None

    @classmethod
    def build(
        cls,
        model: nn.Module,
        example_inputs: Any,
        *,
        ignore: Sequence[str] = (),
        minimum_ratio: float = 0.05,
        forward_fn: Callable[[nn.Module, Any], Any] | None = None,
        prune_residual: bool = True,
    ) -> "ChannelPlan":
        """Trace ``model`` once for its groups and once with the flop counter for its layer FLOPs
        (``prune_residual=False``: residual streams stay whole, see `find_channel_groups`)."""
        groups = find_channel_groups(model, example_inputs, ignore=ignore, forward_fn=forward_fn,
                                     prune_residual=prune_residual)
        inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
        per_module = flops_by_module(model, *inputs)
        prefix = type(model).__name__ + "."
        layers = {}
        for name, module in model.named_modules():
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and name:
                flops = per_module.get(prefix + name)
                if flops:
                    layers[name] = flops
        return cls(groups, layers, per_module.get("Global", 0), model, minimum_ratio)

    # ---------------------------------------------------------------------------- sizes and costs
    @property
    def num_units(self) -> list[int]:
        return [g.num_units for g in self.groups]

    def full_counts(self) -> torch.Tensor:
        return torch.tensor(self.num_units, dtype=torch.long)

    @staticmethod
    def counts_of(masks: Sequence[torch.Tensor]) -> torch.Tensor:
        return torch.tensor([int(m.sum()) for m in masks], dtype=torch.long)

    def flops(self, counts: torch.Tensor | Sequence[torch.Tensor]) -> int:
        """Forward FLOPs of the network whose groups keep ``counts`` units (or the given masks):
        each layer's dense FLOPs times its kept fraction of output and input channels."""
        if not isinstance(counts, torch.Tensor):
            counts = self.counts_of(counts)
        values = counts.tolist()
        total = self.total_flops
        for name, layer in self.layers.items():
            out_alive, in_alive = layer.out_size, layer.in_size
            for g, per_unit in self._layer_slices.get((name, 0), ()):
                out_alive -= (self.groups[g].num_units - values[g]) * per_unit
            for g, per_unit in self._layer_slices.get((name, 1), ()):
                in_alive -= (self.groups[g].num_units - values[g]) * per_unit
            if out_alive != layer.out_size or in_alive != layer.in_size:
                kept = layer.flops * out_alive * in_alive // (layer.out_size * layer.in_size)
                total -= layer.flops - kept
        return total

    def flops_ratio(self, counts: torch.Tensor | Sequence[torch.Tensor]) -> float:
        return self.flops(counts) / self.total_flops if self.total_flops else 1.0

    def channel_sparsity(self, counts: torch.Tensor | Sequence[torch.Tensor]) -> float:
        """Fraction of the prunable channels that are pruned."""
        if not isinstance(counts, torch.Tensor):
            counts = self.counts_of(counts)
        total = sum(g.channels for g in self.groups)
        alive = sum(int(c) * g.unit_channels for c, g in zip(counts.tolist(), self.groups))
        return 1.0 - alive / total if total else 0.0

    def widths(self, counts: torch.Tensor | Sequence[torch.Tensor]) -> list[int]:
        """Channels kept per group."""
        if not isinstance(counts, torch.Tensor):
            counts = self.counts_of(counts)
        return [int(c) * g.unit_channels for c, g in zip(counts.tolist(), self.groups)]

    def minimum_flops_ratio(self) -> float:
        return self.flops_ratio(torch.tensor(self.minimum, dtype=torch.long))

    def uniform_counts(self, ratio: float) -> torch.Tensor:
        """Every group keeps ``ratio`` of its units (at least its minimum)."""
        return torch.tensor(
            [min(g.num_units, max(m, round(ratio * g.num_units))) for g, m in zip(self.groups, self.minimum)],
            dtype=torch.long,
        )

    def uniform_ratio_within(self, cost: Callable[[torch.Tensor], float], limit: float) -> float:
        """The largest uniform keep ratio whose widths cost at most ``limit`` (bisection)."""
        low, high = 0.0, 1.0
        if cost(self.uniform_counts(1.0)) <= limit:
            return 1.0
        for _ in range(40):
            middle = (low + high) / 2
            if cost(self.uniform_counts(middle)) <= limit:
                low = middle
            else:
                high = middle
        return low

    # ---------------------------------------------------------------------------- importance
    def unit_scores(self, model: nn.Module) -> list[torch.Tensor]:
        """Per unit: the largest ``|gamma|`` among the group's BatchNorm weights (a channel shared by a
        residual stream matters if any block uses it; the mean would also punish the zero-initialised
        last BN of every timm/torchvision residual block). Groups without a norm use
        the L1 norm of their producing weights, rescaled to the mean ``|gamma|`` of the network (or
        to 1 without any BatchNorm), so that one global threshold can compare all units."""
        scores: list[torch.Tensor | None] = []
        gammas = []
        for group in self.groups:
            norms = [s for s in group.slices if s.role == "norm" and s.param == "weight"]
            norms = [s for s in norms if isinstance(model.get_submodule(s.module), nn.modules.batchnorm._BatchNorm)]
            if not norms:
                scores.append(None)
                continue
            score = torch.zeros(group.num_units, dtype=torch.float64)
            for s in norms:
                values = _tensor(model, s).detach().abs().to(torch.float64).cpu()
                score = torch.maximum(score, values[s.grid].mean(dim=1))
            scores.append(score)
            gammas.append(score[score > 0])
        reference = torch.cat(gammas).mean().item() if gammas and torch.cat(gammas).numel() else 1.0
        out = []
        for index, score in enumerate(scores):
            if score is None:
                l1 = l1_scores(self.producer_matrix(model, index)).to(torch.float64).cpu()
                alive = l1[l1 > 0]
                score = l1 / alive.mean() * reference if alive.numel() else l1
            out.append(score)
        return out

    def producer_matrix(
        self,
        model: nn.Module,
        index: int,
        masks: Sequence[torch.Tensor] | None = None,
        memory: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The group's CSS matrix, float64 on CPU: one column per unit, the rows of every producing
        weight stacked ((C_in*k*k) rows per producer). With ``masks`` and ``memory``, pruned units
        show their most recently used weights, and inputs pruned by other groups are zero."""
        group = self.groups[index]
        blocks = []
        for s in group.slices:
            if s.role != "producer" or s.param != "weight":
                continue
            weight = _tensor(model, s).detach()
            if masks is not None:
                alive = self.element_alive(weight.shape, s.key, masks, weight.device)
                stored = memory.get(s.key) if memory else None
                if stored is not None:
                    others_alive = self._dim_alive(weight.shape, s.key, masks, weight.device, skip_dim=s.dim)
                    weight = torch.where(alive, weight, stored) * others_alive
                else:
                    weight = weight * alive
            moved = weight.movedim(s.dim, 0)[s.grid.to(weight.device)]  # units x per_unit x rest
            blocks.append(moved.reshape(group.num_units, -1).to(torch.float64).cpu())
        return torch.cat(blocks, dim=1).T.contiguous()

    # ---------------------------------------------------------------------------- masks
    def _dim_alive(
        self, shape: torch.Size, key: str, masks: Sequence[torch.Tensor], device: torch.device, skip_dim: int | None = None
    ) -> torch.Tensor:
        alive = torch.ones(shape, dtype=torch.bool, device=device)
        for g, s in self.slices_by_key.get(key, ()):
            if s.dim == skip_dim:
                continue
            dead = s.grid[~masks[g].cpu()].flatten().to(device)
            if dead.numel():
                alive.index_fill_(s.dim, dead, False)
        return alive

    def element_alive(
        self, shape: torch.Size, key: str, masks: Sequence[torch.Tensor], device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Boolean tensor of ``shape``: which elements of tensor ``key`` no group prunes."""
        return self._dim_alive(shape, key, masks, torch.device(device))

    def keep_positions(self, model: nn.Module, masks: Sequence[torch.Tensor]) -> dict[str, dict[int, torch.Tensor]]:
        """Per tensor and dim, the positions that physical compaction keeps."""
        keep: dict[str, dict[int, torch.Tensor]] = {}
        for key, entries in self.slices_by_key.items():
            tensor = _tensor_by_key(model, key)
            dead_by_dim: dict[int, set[int]] = {}
            for g, s in entries:
                dead_by_dim.setdefault(s.dim, set()).update(s.grid[~masks[g].cpu()].flatten().tolist())
            for dim, dead in dead_by_dim.items():
                if dead:
                    kept = [i for i in range(tensor.shape[dim]) if i not in dead]
                    keep.setdefault(key, {})[dim] = torch.tensor(kept, dtype=torch.long)
        return keep

    @torch.no_grad()
    def apply_masks(self, model: nn.Module, masks: Sequence[torch.Tensor]) -> None:
        """Zero every masked slice (weights, biases, norm parameters, consumers' inputs)."""
        cached = self._dead_cache
        if cached is not None and cached[0] is masks:
            plan = cached[1]
        else:
            plan = []
            for g, group in enumerate(self.groups):
                dead = ~masks[g].cpu()
                if not bool(dead.any()):
                    continue
                for s in group.slices:
                    if s.zeroed:
                        plan.append((s, s.grid[dead].flatten()))
            self._dead_cache = (masks, plan)
        for i, (s, dead) in enumerate(plan):
            tensor = _tensor(model, s)
            if dead.device != tensor.device:  # moved once, then cached on the model's device
                dead = dead.to(tensor.device)
                plan[i] = (s, dead)
            tensor.index_fill_(s.dim, dead, 0)

    @torch.no_grad()
    def transition(
        self,
        model: nn.Module,
        old: Sequence[torch.Tensor] | None,
        new: Sequence[torch.Tensor],
        memory: dict[str, torch.Tensor],
    ) -> None:
        """Move from masks ``old`` (None: nothing pruned yet) to ``new``: elements that die are saved
        in ``memory`` (their most recently used values), elements that come back are restored from
        it (weights and BatchNorm statistics), then the new masks are applied."""
        changed = [old is None or not torch.equal(old[g].cpu(), new[g].cpu()) for g in range(len(self.groups))]
        for key, entries in self.slices_by_key.items():
            if not any(changed[g] for g, _ in entries):
                continue
            tensor = _tensor_by_key(model, key)
            after = self.element_alive(tensor.shape, key, new, tensor.device)
            before = (
                torch.ones_like(after) if old is None else self.element_alive(tensor.shape, key, old, tensor.device)
            )
            stored = memory.get(key)
            if stored is None or stored.shape != tensor.shape:
                stored = torch.zeros_like(tensor.detach())
            stored = stored.to(tensor.device)
            memory[key] = torch.where(before & ~after, tensor.detach(), stored)
            tensor.data.copy_(torch.where(after & ~before, stored, tensor.detach()))
        self.apply_masks(model, new)


def _tensor(model: nn.Module, s: ChannelSlice) -> torch.Tensor:
    return getattr(model.get_submodule(s.module), s.param)


def _tensor_by_key(model: nn.Module, key: str) -> torch.Tensor:
    module, _, param = key.rpartition(".")
    return getattr(model.get_submodule(module), param)
