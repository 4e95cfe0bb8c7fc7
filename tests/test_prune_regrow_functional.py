"""`stacktrain.functional.prune_regrow`: one CHEX update in a plain PyTorch loop (no Lightning), the gradual
prune-only schedule, the uniform baseline, and residual streams left whole."""

from __future__ import annotations

import timm
import torch
from torch import nn

from stacktrain.functional.channel_selection import ChannelPlan
from stacktrain.functional.prune_regrow import (
    Budget, apply_prune_regrow, decide_masks, gradual_limit, prune_regrow_update, uniform_masks,
)
from test_channel_selection import CoupledNet, group_of


def test_gradual_limit_is_dense_at_the_start_and_the_budget_at_t_max():
    assert gradual_limit(0.25, 0, 100) == 1.0
    assert gradual_limit(0.25, 50, 100) == 0.25 + 0.75 * 0.125  # the cubic: 0.34375
    assert gradual_limit(0.25, 100, 100) == gradual_limit(0.25, 150, 100) == 0.25
    assert gradual_limit(0.5, 3, 0) == 0.5


def test_uniform_masks_keep_the_same_fraction_of_every_group_within_the_budget():
    model = timm.create_model("test_resnet", in_chans=1, num_classes=10)
    plan = ChannelPlan.build(model, torch.zeros(1, 1, 16, 16))
    masks = uniform_masks(plan, Budget.flops(plan, 0.25))
    ratios = [int(m.sum()) / m.numel() for m in masks]
    assert max(ratios) - min(ratios) <= 0.07  # one ratio, up to rounding to whole channels
    assert 0.22 <= plan.flops_ratio(masks) <= 0.25
    assert all(bool(m[: int(m.sum())].all()) for m in masks)  # the first channels


def test_residual_streams_are_found_and_can_stay_whole():
    model = CoupledNet()
    example = torch.zeros(1, 3, 8, 8)
    groups = ChannelPlan.build(model, example).groups
    # stem and conv write the channels their add joins: one residual group; the others are not
    residual = [g for g in groups if g.residual]
    assert len(residual) == 1 and residual[0] is group_of(groups, "stem") is group_of(groups, "conv")
    assert not group_of(groups, "grouped").residual and not group_of(groups, "right").residual
    whole = ChannelPlan.build(model, example, prune_residual=False).groups
    assert [g.name for g in whole] == [g.name for g in groups if not g.residual] and len(whole) == len(groups) - 1


def test_apply_prune_regrow_plans_without_changing_the_model():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", in_chans=1, num_classes=10)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    plan = apply_prune_regrow(model, torch.zeros(1, 1, 16, 16), prune_residual=False)
    assert isinstance(plan, ChannelPlan) and plan.groups
    whole = ChannelPlan.build(model, torch.zeros(1, 1, 16, 16))
    assert len(plan.groups) < len(whole.groups)  # the option reached the plan: residual groups left out
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[name], value) for name, value in before.items())


def test_prune_regrow_update_in_a_plain_loop_regrows_lands_on_the_budget_and_restores_weights():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", in_chans=1, num_classes=10)
    plan = apply_prune_regrow(model, torch.zeros(1, 1, 16, 16))
    budget = Budget.flops(plan, 0.5)
    with torch.no_grad():  # distinct |gamma|, as training gives them: the allocation moves between updates
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.1, 1.0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    masks, memory, history = None, {}, []
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))
    for step in range(7):
        if step % 2 == 0 or step == 6:
            old = masks
            masks = prune_regrow_update(model, plan, masks, memory, budget, step=step, t_max=6,
                                generator=torch.Generator().manual_seed(step))
            history.append((old, masks))
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        plan.apply_masks(model, masks)
    # uniform start 0.3 above the budget (here: dense), then the budget exactly at T_max
    assert plan.flops_ratio(history[0][1]) > 0.6 and 0.47 <= plan.flops_ratio(masks) <= 0.5
    regrown = [(n & ~o) for old, new in history[1:] for n, o in zip(new, old)]
    assert sum(int(r.sum()) for r in regrown) > 0
    # every pruned slice is zero in the weights, and the memory holds the pruned values
    alive = plan.element_alive(model.conv1[0].weight.shape, "conv1.0.weight", masks)
    assert model.conv1[0].weight[~alive].abs().sum() == 0 and bool(alive.any()) and bool((~alive).any())
    assert memory["conv1.0.weight"][~alive].abs().sum() > 0


def test_prune_only_decision_starts_dense_and_never_regrows():
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", in_chans=1, num_classes=10)
    plan = ChannelPlan.build(model, torch.zeros(1, 1, 16, 16))
    budget, memory = Budget.flops(plan, 0.25), {}
    with torch.no_grad():  # distinct |gamma| so the global allocation differs from uniform
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.1, 1.0)
    first = prune_regrow_update(model, plan, None, memory, budget, step=0, t_max=10, regrow_fraction=0.0)
    assert all(bool(m.all()) for m in first)
    middle = prune_regrow_update(model, plan, first, memory, budget, step=5, t_max=10, regrow_fraction=0.0)
    last = decide_masks(model, plan, middle, memory, budget, step=10, t_max=10, regrow_fraction=0.0)
    assert 0.25 < plan.flops_ratio(middle) <= gradual_limit(0.25, 5, 10) and plan.flops_ratio(last) <= 0.25
    assert all(not bool((b & ~a).any()) for a, b in zip(middle, last))  # nothing came back
    ratios = {round(int(m.sum()) / m.numel(), 2) for m in last}
    assert len(ratios) > 2  # the BatchNorm allocation gives layers different widths
