"""One CHEX update as a plain function (no Lightning): allocate widths by BatchNorm ``|gamma|`` under
the budget, prune inside each group by CSS, regrow, restore the regrown channels' most recently used
weights. A plain PyTorch loop calls `prune_regrow_update` every few steps until T_max and
``plan.apply_masks(model, masks)`` after every optimizer step; the `PruneRegrow` callback only
decides when (and, under DDP, applies rank 0's masks on every rank between `decide_masks` and the transition).

    plan = apply_prune_regrow(model, example)
    budget = Budget.flops(plan, 0.5)
    masks, memory = None, {}
    for step, (x, y) in enumerate(loader):
        if step % 50 == 0 and step <= t_max:
            masks = prune_regrow_update(model, plan, masks, memory, budget, step=step, t_max=t_max)
        ...loss.backward(); optimizer.step()
        plan.apply_masks(model, masks)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stacktrain.functional.channel_allocation import Allocation
from stacktrain.functional.channel_masks import ChannelPlan
from stacktrain.functional.channel_scores import cosine_regrow_fraction, explore_group

__all__ = ["Budget", "apply_prune_regrow", "prune_regrow_update", "decide_masks", "gradual_limit", "uniform_masks"]


@dataclass(frozen=True)
class Budget:
    """What the final network may cost: ``cost(counts) <= limit`` (counts: units kept per group)."""

    cost: Callable[[torch.Tensor], float]
    limit: float

    @classmethod
    def flops(cls, plan: ChannelPlan, ratio: float) -> "Budget":
        """Forward FLOPs at most ``ratio`` of the dense network's."""
        return cls(plan.flops_ratio, float(ratio))

    @classmethod
    def sparsity(cls, plan: ChannelPlan, sparsity: float) -> "Budget":
        """At least ``sparsity`` of the prunable channels removed."""
        return cls(lambda counts: 1.0 - plan.channel_sparsity(counts), 1.0 - float(sparsity))


def gradual_limit(limit: float, step: int, t_max: int) -> float:
    """The prune-only ablation's budget at ``step``: dense (1.0) at step 0, shrinking to ``limit`` at
    T_max along the cubic of gradual pruning (Zhu & Gupta 2017): fast first, gentle at the end."""
    if t_max <= 0 or step >= t_max:
        return float(limit)
    return float(limit) + (1.0 - float(limit)) * (1.0 - step / t_max) ** 3


def uniform_masks(plan: ChannelPlan, budget: Budget) -> list[torch.Tensor]:
    """Every group keeps the same fraction of its units (the first ones), the widest such network within
    the budget: a uniform thin network, the baseline CHEX's allocation must beat."""
    counts = plan.uniform_counts(plan.uniform_ratio_within(budget.cost, budget.limit))
    return [torch.arange(n) < int(c) for n, c in zip(plan.num_units, counts)]


def _widths(
    plan: ChannelPlan, model: nn.Module, old: Sequence[torch.Tensor] | None, budget: Budget, delta: float,
    regrow: bool, multiple: int, step: int, t_max: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Units to keep by CSS and units alive after regrowing, per group."""
    if old is None:
        if not regrow:  # prune-only starts dense and shrinks
            full = plan.full_counts()
            return full, full
        counts = plan.uniform_counts(min(1.0, plan.uniform_ratio_within(budget.cost, budget.limit) + delta))
        return counts, counts
    allocation = Allocation(plan.unit_scores(model), plan.minimum, multiple)
    if not regrow:
        # a group never gets back what it lost, so the (shrinking) budget is met with every group
        # capped at its current width
        cap = plan.counts_of([m.cpu() for m in old])
        limit = gradual_limit(budget.limit, step, t_max)
        k = allocation.largest_within(lambda counts: budget.cost(torch.minimum(counts, cap)), limit)
        keep = torch.minimum(allocation.counts(k), cap)
        return keep, keep
    k = allocation.largest_within(budget.cost, budget.limit)
    return allocation.counts(k), allocation.counts(k + round(delta * allocation.total))


def decide_masks(
    model: nn.Module,
    plan: ChannelPlan,
    old: Sequence[torch.Tensor] | None,
    memory: dict[str, torch.Tensor],
    budget: Budget,
    *,
    step: int,
    t_max: int,
    regrow_fraction: float = 0.3,
    generator: torch.Generator | None = None,
    criterion: str = "css",
    multiple: int = 1,
) -> list[torch.Tensor]:
    """The masks of the update at ``step`` (nothing changes in ``model``). ``old`` None: the first
    update (uniform widths ``delta_0`` above the budget; prune-only: dense). ``regrow_fraction`` 0 is
    the paper's prune-only ablation: the global allocation shrinks to the budget by T_max
    (`gradual_limit`), nothing comes back. The small float64 eigen-problems run on one thread."""
    delta = cosine_regrow_fraction(regrow_fraction, step, t_max)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        keep, total = _widths(plan, model, old, budget, delta, regrow_fraction > 0, multiple, step, t_max)
        alive = [torch.ones(n, dtype=torch.bool) for n in plan.num_units] if old is None else [m.cpu() for m in old]
        masks = []
        for index in range(len(plan.groups)):
            matrix = plan.producer_matrix(model, index, old, memory)
            masks.append(explore_group(matrix, alive[index], int(keep[index]), int(total[index]), generator, criterion))
        return masks
    finally:
        torch.set_num_threads(threads)


def apply_prune_regrow(model: nn.Module, example_inputs: Any, **plan_options: Any) -> ChannelPlan:
    """Prepare ``model`` for prune-and-regrow: trace its coupled channel groups and the FLOPs of every
    layer on ``example_inputs`` (``plan_options``: `ChannelPlan.build`'s ``ignore``, ``minimum_ratio``,
    ``forward_fn``, ``prune_residual``). Returns the plan that `prune_regrow_update` decides masks on
    and whose ``apply_masks`` zeroes the pruned channels after each step; the model itself is not
    changed until the first update."""
    return ChannelPlan.build(model, example_inputs, **plan_options)


def prune_regrow_update(
    model: nn.Module,
    plan: ChannelPlan,
    old: Sequence[torch.Tensor] | None,
    memory: dict[str, torch.Tensor],
    budget: Budget,
    *,
    step: int,
    t_max: int,
    regrow_fraction: float = 0.3,
    generator: torch.Generator | None = None,
    criterion: str = "css",
    multiple: int = 1,
) -> list[torch.Tensor]:
    """One whole CHEX update: `decide_masks`, then move ``model`` to the new masks (pruned channels'
    values saved in ``memory``, regrown ones restored from it, masks applied). Returns the masks."""
    masks = decide_masks(model, plan, old, memory, budget, step=step, t_max=t_max, regrow_fraction=regrow_fraction,
                         generator=generator, criterion=criterion, multiple=multiple)
    plan.transition(model, old, masks, memory)
    return masks

