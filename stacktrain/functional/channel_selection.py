"""CHEX channel exploration, the math (no Lightning).

* `find_channel_groups`: the coupled channels of a network from Torch-Pruning's ``DependencyGraph``.
  A group is every tensor slice that must be pruned together: the convolution(s) producing the
  channels, their norms, the layers consuming them, across residual adds, concatenations and
  depthwise convolutions. Grouped convolutions are pruned in units of one position in every conv
  group (so each conv group keeps the same width and the layer can be physically shrunk).
* `ChannelPlan`: the groups plus the network's FLOPs per layer (from the shared flop counter). It
  counts the FLOPs and the channel sparsity of masked widths, zeroes masked slices, and keeps the
  most recently used values of pruned channels so that regrown channels get them back.
* `css_scores` (column-subset-selection leverage scores, L1 fallback), `projection_residuals` and
  `sample_regrow`: choosing channels inside a layer; `Allocation`: how many channels each layer
  keeps, from one global ranking of BN ``|gamma|`` under a channel-sparsity or FLOPs budget;
  `explore_group`: one prune-then-regrow step of one group.

Masks are boolean tensors over a group's units (one unit = one channel, except for grouped
convolutions). Everything here is deterministic given the weights and the ``torch.Generator``.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from stacktrain.functional.flops import flops_by_module

__all__ = [
    "ChannelSlice",
    "ChannelGroup",
    "ChannelPlan",
    "Allocation",
    "find_channel_groups",
    "trace_dependency_graph",
    "css_scores",
    "l1_scores",
    "projection_residuals",
    "sample_regrow",
    "explore_group",
    "cosine_regrow_fraction",
    "mask_digest",
]

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
) -> list[ChannelGroup]:
    """The prunable channel groups of ``model``, each rooted at a convolution, in module order.

    A group is left out when its channels are an output of the network (a convolutional classifier
    head), when it contains a layer this module cannot mask exactly (LayerNorm, GroupNorm,
    attention, transposed convolutions, bare parameters), or when one of its producing layers
    matches a pattern in ``ignore`` (``fnmatch`` on module names, e.g. ``"model.head*"``).
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
    return ChannelGroup(root_name, num_units, conv_groups, slices)


# --------------------------------------------------------------------------------------- scores
def l1_scores(matrix: torch.Tensor) -> torch.Tensor:
    """L1 norm of every column: the cheap criterion."""
    return matrix.abs().sum(dim=0)


def css_scores(matrix: torch.Tensor, keep: int) -> torch.Tensor:
    """Rank-``keep`` leverage scores of the columns of ``matrix`` ((C_in*k*k) x C_out): the squared
    row norms of the top-``keep`` right singular vectors. Column subset selection keeps the columns
    with the largest scores. Falls back to `l1_scores` where leverage cannot rank the columns:
    fewer rows than columns (as in the CHEX code) or nothing to drop.

    The right singular vectors are the eigenvectors of the Gram matrix ``M^T M`` (C_out x C_out),
    computed in float64: the same subspace as the SVD at a fraction of its cost for tall matrices."""
    rows, columns = matrix.shape
    if keep >= columns or rows < columns or columns == 0 or keep <= 0:
        return l1_scores(matrix)
    work = matrix.detach().to(torch.float64)
    try:
        _, vectors = torch.linalg.eigh(work.T @ work)  # ascending eigenvalues
    except RuntimeError:  # LAPACK did not converge
        return l1_scores(matrix)
    return vectors[:, -keep:].pow(2).sum(dim=1).to(matrix.dtype)


def projection_residuals(kept: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Norm of what is left of each candidate column after orthogonal projection onto the span of
    the ``kept`` columns K (projection K (K^T K)^+ K^T, as in the CHEX code): large means the
    candidate adds a direction the kept channels lack."""
    candidates = candidates.detach().to(torch.float64)
    if kept.shape[1] == 0:
        return candidates.norm(dim=0)
    basis = kept.detach().to(torch.float64)
    coefficients = torch.linalg.pinv(basis.T @ basis, hermitian=True) @ (basis.T @ candidates)
    return (candidates - basis @ coefficients).norm(dim=0)


def sample_regrow(residuals: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` distinct candidates, drawn with probability proportional to softmax(residuals)."""
    count = min(int(count), residuals.numel())
    if count <= 0:
        return torch.zeros(0, dtype=torch.long)
    probabilities = torch.softmax(residuals.to(torch.float64), dim=0)
    return torch.multinomial(probabilities, count, replacement=False, generator=generator)


def _top(scores: torch.Tensor, count: int) -> torch.Tensor:
    """Indices of the ``count`` largest scores, ties broken by index (deterministic)."""
    order = torch.sort(-scores.to(torch.float64), stable=True).indices
    return order[:count]


def explore_group(
    matrix: torch.Tensor,
    alive: torch.Tensor,
    keep: int,
    total: int,
    generator: torch.Generator | None,
    criterion: str = "css",
) -> torch.Tensor:
    """One CHEX step on one group: keep ``keep`` of the alive units by CSS (or L1), then regrow
    units until ``total`` are alive, sampled by projection residual onto the kept units.

    ``matrix`` has one column per unit: the producing weights, pruned units holding their most
    recently used values. Returns the new boolean mask.
    """
    num_units = alive.numel()
    active = alive.nonzero().flatten()
    keep = max(0, min(int(keep), active.numel()))
    columns = matrix[:, active]
    scores = css_scores(columns, keep) if criterion == "css" else l1_scores(columns)
    kept = active[_top(scores, keep)]
    new = torch.zeros(num_units, dtype=torch.bool)
    new[kept] = True
    grow = max(0, min(int(total), num_units) - keep)
    if grow:
        candidates = (~new).nonzero().flatten()
        if grow >= candidates.numel() or generator is None:
            chosen = candidates[_top(projection_residuals(matrix[:, kept], matrix[:, candidates]), grow)]
        else:
            residuals = projection_residuals(matrix[:, kept], matrix[:, candidates])
            chosen = candidates[sample_regrow(residuals, grow, generator)]
        new[chosen] = True
    return new


def cosine_regrow_fraction(initial: float, step: int, until: int) -> float:
    """delta_t = delta_0 * (1 + cos(pi * t / T_max)) / 2, and 0 from T_max on."""
    if until <= 0 or step >= until:
        return 0.0
    return float(initial) * (1.0 + math.cos(math.pi * step / until)) / 2.0


def mask_digest(masks: Sequence[torch.Tensor]) -> str:
    """A short fingerprint of a list of masks (to compare ranks and runs cheaply)."""
    import hashlib

    digest = hashlib.sha256()
    for mask in masks:
        digest.update(mask.to(torch.uint8).cpu().numpy().tobytes())
        digest.update(b"|")
    return digest.hexdigest()[:16]


# ----------------------------------------------------------------------------------- allocation
def round_widths(counts: torch.Tensor, multiple: int, minimum: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Each count to its nearest multiple of ``multiple``, then at least the group's minimum (itself
    rounded up to the multiple) and at most the group's size. Non-decreasing in ``counts``."""
    if multiple <= 1:
        return counts
    rounded = torch.div(counts + multiple // 2, multiple, rounding_mode="floor") * multiple
    floor = torch.minimum(torch.div(minimum + multiple - 1, multiple, rounding_mode="floor") * multiple, sizes)
    return torch.minimum(torch.maximum(rounded, floor), sizes)


class Allocation:
    """One global ranking of all units: each group's ``minimum`` best units first, then every other
    unit by score (BN ``|gamma|``), highest first. The top ``k`` units give each group its width,
    so a single threshold over the scores allocates channels across layers."""

    def __init__(self, scores: Sequence[torch.Tensor], minimum: Sequence[int], multiple: int = 1) -> None:
        """``multiple``: round every group's width to a multiple of it (nearest; at least the group's
        minimum, at most its size): CPU and GPU kernels run channel counts like 64 or 56 faster than 61."""
        group_ids, values, mandatory = [], [], []
        for g, score in enumerate(scores):
            order = _top(score, score.numel())
            rank = torch.empty_like(order)
            rank[order] = torch.arange(order.numel())
            group_ids.append(torch.full((score.numel(),), g, dtype=torch.long))
            values.append(score.detach().to(torch.float64).cpu())
            mandatory.append(rank.cpu() < int(minimum[g]))
        self.num_groups = len(scores)
        self.group_ids = torch.cat(group_ids)
        key_score = torch.cat(values)
        key_mandatory = torch.cat(mandatory)
        # mandatory first, then by score, ties by position (stable sorts, least significant first)
        order = torch.sort(-key_score, stable=True).indices
        order = order[torch.sort((~key_mandatory[order]).to(torch.int8), stable=True).indices]
        self.order = order
        self.minimum_total = int(key_mandatory.sum())
        self.total = int(self.group_ids.numel())
        self.multiple = int(multiple)
        self.sizes = torch.tensor([score.numel() for score in scores], dtype=torch.long)
        self.minimum = torch.tensor([int(m) for m in minimum], dtype=torch.long)

    def counts(self, k: int) -> torch.Tensor:
        """Units per group when the top ``k`` units are kept (rounded to ``multiple``; the rounding
        keeps the counts non-decreasing in ``k``, so `largest_within` still bisects)."""
        k = max(self.minimum_total, min(int(k), self.total))
        counts = torch.bincount(self.group_ids[self.order[:k]], minlength=self.num_groups)
        return round_widths(counts, self.multiple, self.minimum, self.sizes)

    def largest_within(self, cost: Callable[[torch.Tensor], float], limit: float) -> int:
        """The largest ``k`` whose allocation costs at most ``limit`` (cost grows with ``k``)."""
        low, high = self.minimum_total, self.total
        if cost(self.counts(low)) > limit:
            return low
        while low < high:
            middle = (low + high + 1) // 2
            if cost(self.counts(middle)) <= limit:
                low = middle
            else:
                high = middle - 1
        return low


# ----------------------------------------------------------------------------------------- plan
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
    ) -> "ChannelPlan":
        """Trace ``model`` once for its groups and once with the flop counter for its layer FLOPs."""
        groups = find_channel_groups(model, example_inputs, ignore=ignore, forward_fn=forward_fn)
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
