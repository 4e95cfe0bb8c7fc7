"""The CHEX functional core (no Lightning): CSS scores, regrow sampling, allocation, coupled groups
from Torch-Pruning, masks with most-recently-used memory, FLOPs from masks against the flop counter
on the physically compacted network, optimizer-state slicing and the torch-only loader."""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torchvision
from torch import nn

from conftest import TINY_VIT
from stacktrain.functional.channel_selection import (
    Allocation,
    ChannelPlan,
    cosine_regrow_fraction,
    css_scores,
    explore_group,
    find_channel_groups,
    l1_scores,
    mask_digest,
    projection_residuals,
    round_widths,
    sample_regrow,
)
from stacktrain.functional.compact_loader import channel_config, load_compact_state_dict
from stacktrain.functional.compaction import compact_network, remap_optimizer
from stacktrain.functional.flops import forward_flops


class CoupledNet(nn.Module):
    """Every coupling kind in a few layers: a residual add, a depthwise conv, a grouped conv, a
    concatenation into a convolution, a convolution without a norm, a flatten into a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.conv_bn = nn.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 12, 3, padding=1, groups=2, bias=False)
        self.grouped_bn = nn.BatchNorm2d(12)
        self.left = nn.Conv2d(12, 6, 1)
        self.right = nn.Conv2d(12, 4, 1, bias=False)
        self.right_bn = nn.BatchNorm2d(4)
        self.mix = nn.Conv2d(10, 6, 1, bias=False)
        self.mix_bn = nn.BatchNorm2d(6)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(6 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = torch.relu(x + self.conv_bn(self.conv(x)))
        x = torch.relu(self.depthwise_bn(self.depthwise(x)))
        x = torch.relu(self.grouped_bn(self.grouped(x)))
        x = torch.cat([torch.relu(self.left(x)), torch.relu(self.right_bn(self.right(x)))], dim=1)
        x = torch.relu(self.mix_bn(self.mix(x)))
        return self.fc(self.pool(x).flatten(1))


def random_masks(plan: ChannelPlan, seed: int = 0, keep: float = 0.6) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    masks = []
    for group in plan.groups:
        mask = torch.rand(group.num_units, generator=generator) < keep
        mask[0] = True
        masks.append(mask)
    return masks


# ------------------------------------------------------------------------------ selection math
def test_css_scores_are_rank_k_leverage_scores():
    e = torch.eye(6)
    # columns: e0, e0 (a duplicate), e1, a tiny e2
    matrix = torch.stack([e[0], e[0], e[1], 0.01 * e[2]], dim=1)
    scores = css_scores(matrix, keep=2)
    # top-2 right singular vectors: (e0+e0)/sqrt2 with sigma sqrt2, then e1: leverages 1/2, 1/2, 1, 0
    assert torch.allclose(scores, torch.tensor([0.5, 0.5, 1.0, 0.0]), atol=1e-6)
    # CSS keeps the non-redundant column e1 first; the tiny column is never kept
    assert scores.argmax().item() == 2 and scores.argmin().item() == 3


def test_css_falls_back_to_l1_when_leverage_cannot_rank():
    wide = torch.tensor([[1.0, -2.0, 0.5, 3.0]])  # 1 row < 4 columns
    assert torch.equal(css_scores(wide, keep=2), l1_scores(wide))
    tall = torch.randn(10, 3)
    assert torch.equal(css_scores(tall, keep=3), l1_scores(tall))  # keeping everything


def test_projection_residuals_measure_what_the_kept_span_misses():
    e = torch.eye(4)
    kept = e[:, [0]]
    candidates = torch.stack([e[0] + e[1], 2 * e[0], 3 * e[2]], dim=1)
    assert torch.allclose(projection_residuals(kept, candidates), torch.tensor([1.0, 0.0, 3.0], dtype=torch.float64))
    assert torch.allclose(projection_residuals(e[:, :0], candidates), candidates.norm(dim=0).double())


def test_regrow_sampling_is_distinct_seeded_and_follows_the_softmax():
    residuals = torch.tensor([0.0, 0.0, 2.0])
    draws = [sample_regrow(residuals, 2, torch.Generator().manual_seed(s)) for s in range(3)]
    assert all(len(set(d.tolist())) == 2 for d in draws)
    again = sample_regrow(residuals, 2, torch.Generator().manual_seed(0))
    assert torch.equal(draws[0], again)
    first = torch.stack([sample_regrow(residuals, 1, torch.Generator().manual_seed(s)) for s in range(2000)]).flatten()
    expected = torch.softmax(residuals.double(), 0)
    frequency = torch.bincount(first, minlength=3).double() / first.numel()
    assert torch.allclose(frequency, expected, atol=0.03)  # 0.106 / 0.106 / 0.788
    assert sample_regrow(residuals, 0, torch.Generator()).numel() == 0


def test_explore_group_keeps_by_css_and_regrows_the_most_novel_pruned_unit():
    e = torch.eye(5)
    # units 0..4: alive are 0, 1, 2; unit 1 duplicates unit 0; pruned 3 is novel, pruned 4 is in the span
    matrix = torch.stack([e[0], e[0], e[1], e[2] * 5, e[0] + e[1]], dim=1)
    alive = torch.tensor([True, True, True, False, False])
    new = explore_group(matrix, alive, keep=2, total=3, generator=None)
    assert new.tolist() == [True, False, True, True, False]  # kept {0, 2}, regrown 3 (residual 5)
    assert explore_group(matrix, alive, keep=2, total=2, generator=None).sum() == 2


def test_cosine_regrow_fraction_decays_to_zero_at_t_max():
    assert cosine_regrow_fraction(0.3, 0, 100) == pytest.approx(0.3)
    assert cosine_regrow_fraction(0.3, 50, 100) == pytest.approx(0.15)
    assert cosine_regrow_fraction(0.3, 100, 100) == 0.0 and cosine_regrow_fraction(0.3, 150, 100) == 0.0


def test_allocation_is_one_global_threshold_with_per_group_minimums():
    allocation = Allocation([torch.tensor([3.0, 1.0, 0.2]), torch.tensor([0.1, 2.0])], minimum=[1, 1])
    assert allocation.minimum_total == 2
    assert allocation.counts(2).tolist() == [1, 1]  # the best unit of each group first
    assert allocation.counts(3).tolist() == [2, 1]  # then by |gamma|: 1.0 before 0.2 and 0.1
    assert allocation.counts(4).tolist() == [3, 1] and allocation.counts(5).tolist() == [3, 2]
    assert allocation.largest_within(lambda c: float(c.sum()), 3.5) == 3
    assert allocation.largest_within(lambda c: float(c.sum()), 0.5) == 2  # infeasible: the minimum


def test_mask_digest_tells_masks_apart():
    a = [torch.tensor([True, False]), torch.tensor([True])]
    assert mask_digest(a) == mask_digest([m.clone() for m in a])
    assert mask_digest(a) != mask_digest([torch.tensor([False, True]), torch.tensor([True])])


# ------------------------------------------------------------------------------ groups and masks
def group_of(groups, module: str, dim: int = 0):
    """The group holding ``module``'s weight along ``dim``."""
    return next(g for g in groups if any(s.module == module and s.param == "weight" and s.dim == dim for s in g.slices))


def test_groups_follow_every_coupling():
    model = CoupledNet()
    groups = find_channel_groups(model, torch.zeros(1, 3, 8, 8))
    assert len(groups) == 5
    members = lambda g: {(s.module, s.param, s.dim) for s in g.slices}  # noqa: E731
    # the residual add couples the stem and conv outputs, the depthwise conv and the grouped conv's input
    residual = group_of(groups, "stem")
    assert {("stem", "weight", 0), ("conv", "weight", 0), ("stem_bn", "weight", 0), ("conv_bn", "weight", 0),
            ("depthwise", "weight", 0), ("depthwise_bn", "weight", 0), ("grouped", "weight", 1),
            ("conv", "weight", 1)} == {m for m in members(residual) if m[1] == "weight"}
    # the grouped conv (2 groups) is pruned one position in both conv groups at a time
    assert residual.num_units == 4 and residual.unit_channels == 2
    grouped = group_of(groups, "grouped")
    assert grouped.num_units == 6 and grouped.unit_channels == 2
    # concatenation: each branch owns its own slice of the mixing conv's input
    left = {(s.module, s.dim): s.grid for s in group_of(groups, "left").slices}
    right = {(s.module, s.dim): s.grid for s in group_of(groups, "right").slices}
    assert left[("mix", 1)].flatten().tolist() == list(range(6))
    assert right[("mix", 1)].flatten().tolist() == list(range(6, 10))
    # flatten into the linear layer: 4 positions (2x2 pooled) per channel
    mix = {(s.module, s.dim): s.grid for s in group_of(groups, "mix").slices}
    assert mix[("fc", 1)].shape == (6, 4) and mix[("fc", 1)][1].tolist() == [4, 5, 6, 7]


def test_groups_with_a_lost_index_mapping_are_left_out():
    class ConcatIntoLinear(nn.Module):  # Torch-Pruning loses the concat offsets before a flatten
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 3, 1), nn.Conv2d(1, 2, 1)
            self.fc = nn.Linear(5 * 4, 2)

        def forward(self, x):
            return self.fc(torch.cat([self.a(x), self.b(x)], 1).flatten(1))

    model = ConcatIntoLinear()
    groups = find_channel_groups(model, torch.zeros(1, 1, 2, 2))
    for group in groups:  # whatever survives is masked and compacted exactly
        for s in group.slices:
            if s.role == "producer" and s.dim == 0:
                assert s.grid.numel() == getattr(model.get_submodule(s.module), s.param).shape[0]


def test_output_channels_and_unsupported_layers_are_not_prunable():
    head = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 10, 1))
    names = [g.name for g in find_channel_groups(head, torch.zeros(1, 1, 8, 8))]
    assert names == ["0"]  # the last conv's channels are the network's output
    vit = timm.create_model("vit_tiny_patch16_224", in_chans=1, **TINY_VIT)
    assert find_channel_groups(vit, torch.zeros(1, 1, 16, 16)) == []
    assert [g.name for g in find_channel_groups(head, torch.zeros(1, 1, 8, 8), ignore=["0"])] == []


def small_vgg() -> nn.Module:
    """torchvision's VGG (features from its own `make_layers`, BN) with a small classifier."""
    from torchvision.models.vgg import VGG, make_layers

    model = VGG(make_layers([16, "M", 32, "M", 32, 32, "M"], batch_norm=True), num_classes=10)
    model.avgpool = nn.AdaptiveAvgPool2d(2)
    model.classifier = nn.Sequential(nn.Linear(32 * 4, 24), nn.ReLU(), nn.Linear(24, 10))
    return model


NETWORKS = {
    "coupled": (CoupledNet, (3, 8, 8)),
    "timm_test_resnet": (lambda: timm.create_model("test_resnet", in_chans=1, num_classes=10), (1, 16, 16)),
    "timm_mobilenetv2_050": (lambda: timm.create_model("mobilenetv2_050", in_chans=1, num_classes=10), (1, 16, 16)),
    "timm_regnetx_002": (lambda: timm.create_model("regnetx_002", in_chans=1, num_classes=10), (1, 16, 16)),
    "tv_resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (3, 16, 16)),
    "tv_mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10, width_mult=0.35), (3, 16, 16)),
    "tv_regnet_y_400mf": (lambda: torchvision.models.regnet_y_400mf(num_classes=10), (3, 16, 16)),
    "tv_vgg": (small_vgg, (3, 16, 16)),
}


@pytest.mark.parametrize("name", list(NETWORKS))
def test_masked_network_equals_compact_network_and_flops_match_the_counter(name):
    torch.manual_seed(0)
    build, shape = NETWORKS[name]
    model = build()
    x = torch.randn(2, *shape)
    plan = ChannelPlan.build(model, x[:1])
    masks = random_masks(plan)
    plan.transition(model, None, masks, {})
    model.eval()
    with torch.no_grad():
        masked = model(x)
    counted = plan.flops(masks)
    assert counted < plan.total_flops
    compact_network(model, plan, masks, x[:1])
    with torch.no_grad():
        compact = model(x)
    assert torch.allclose(masked, compact, atol=1e-5, rtol=1e-4)
    assert forward_flops(model, x[:1]) == counted  # FLOPs from the masks == the counter on the compact net
    assert plan.flops(plan.counts_of(masks)) == counted


def test_pruned_channels_come_back_with_their_most_recently_used_values():
    torch.manual_seed(0)
    model = CoupledNet()
    plan = ChannelPlan.build(model, torch.zeros(1, 3, 8, 8))
    index = {"stem": plan.groups.index(group_of(plan.groups, "stem")),
             "grouped": plan.groups.index(group_of(plan.groups, "grouped"))}
    with torch.no_grad():  # give the BN statistics non-trivial values
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    original = copy.deepcopy(model.state_dict())
    full = [torch.ones(g.num_units, dtype=torch.bool) for g in plan.groups]
    memory: dict[str, torch.Tensor] = {}
    # prune unit 1 of the stem group (input of `grouped`) and output unit 2 of `grouped`
    step1 = [m.clone() for m in full]
    step1[index["stem"]][1] = False
    step1[index["grouped"]][2] = False
    plan.transition(model, None, step1, memory)
    assert model.stem.weight[1].abs().sum() == 0 and model.stem_bn.weight[1] == 0
    assert model.grouped.weight[:, 1].abs().sum() == 0 and model.grouped.weight[2].abs().sum() == 0
    with torch.no_grad():  # training moves the live weights and the masked BN statistics drift
        model.grouped.weight.add_(1.0)
        model.stem_bn.running_mean.zero_()
    plan.apply_masks(model, step1)
    moved_live = model.grouped.weight[0, 0].clone()
    # regrow the stem unit first (grouped output 2 still pruned), then grouped output 2
    step2 = [m.clone() for m in step1]
    step2[index["stem"]][1] = True
    plan.transition(model, step1, step2, memory)
    plan.transition(model, step2, full, memory)
    state = model.state_dict()
    assert torch.equal(state["stem.weight"], original["stem.weight"])
    assert torch.equal(state["stem_bn.running_mean"][1], original["stem_bn.running_mean"][1])
    assert torch.equal(state["stem_bn.weight"], original["stem_bn.weight"])
    # elements pruned by both groups come back too: channel 2's row and position 1's column
    assert torch.equal(state["grouped.weight"][2], original["grouped.weight"][2])
    assert torch.equal(state["grouped.weight"][5, 1], original["grouped.weight"][5, 1])
    assert torch.equal(state["grouped.weight"][0, 0], moved_live)  # live weights keep their training


def test_group_scores_are_bn_gamma_and_the_producer_matrix_uses_memory():
    torch.manual_seed(0)
    model = CoupledNet()
    plan = ChannelPlan.build(model, torch.zeros(1, 3, 8, 8))
    index = {name: plan.groups.index(group_of(plan.groups, name)) for name in ("left", "right")}
    with torch.no_grad():
        model.right_bn.weight.copy_(torch.tensor([0.5, -2.0, 1.0, 0.0]))
    scores = plan.unit_scores(model)
    assert torch.allclose(scores[index["right"]], torch.tensor([0.5, 2.0, 1.0, 0.0], dtype=torch.float64))
    # a residual group scores each channel by its largest |gamma| over the coupled norms
    residual = plan.groups.index(group_of(plan.groups, "stem"))
    with torch.no_grad():
        model.conv_bn.weight.zero_()  # like the zero-initialised last BN of a residual block
        model.stem_bn.weight.copy_(torch.arange(8.0))
        model.depthwise_bn.weight.fill_(0.5)
    expected = torch.maximum(torch.arange(8.0).reshape(2, 4).T.mean(dim=1), torch.tensor(0.5)).double()
    assert torch.allclose(plan.unit_scores(model)[residual], expected)
    # `left` has no norm: its L1 scores are rescaled to the network's mean |gamma|
    assert scores[index["left"]].numel() == 6 and scores[index["left"]].min() > 0
    before = plan.producer_matrix(model, index["right"])
    assert before.shape == (12, 4)  # (C_in * 1 * 1) x C_out
    masks = [torch.ones(g.num_units, dtype=torch.bool) for g in plan.groups]
    masks[index["right"]][1] = False
    memory: dict[str, torch.Tensor] = {}
    plan.transition(model, None, masks, memory)
    assert plan.producer_matrix(model, index["right"])[:, 1].abs().sum() == 0  # live: zero
    assert torch.equal(plan.producer_matrix(model, index["right"], masks, memory), before)  # MRU values


# ------------------------------------------------------------------------------ compaction
@pytest.mark.parametrize("optimizer_class", [torch.optim.SGD, torch.optim.AdamW])
def test_optimizer_state_is_cut_to_the_kept_channels(optimizer_class):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", in_chans=1, num_classes=10)
    x = torch.randn(4, 1, 16, 16)
    kwargs = {"momentum": 0.9} if optimizer_class is torch.optim.SGD else {}
    optimizer = optimizer_class(model.parameters(), lr=0.01, **kwargs)
    model(x).sum().backward()
    optimizer.step()
    plan = ChannelPlan.build(model, x[:1])
    masks = random_masks(plan, seed=1)
    plan.transition(model, None, masks, {})
    old = dict(model.named_parameters())
    old_state = {name: {k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()}
                 for name, p in old.items()}
    keep = compact_network(model, plan, masks, x[:1])
    new = dict(model.named_parameters())
    assert remap_optimizer(optimizer, old, new, keep) == sum(new[n] is not old[n] for n in new)
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    buffer = "momentum_buffer" if optimizer_class is torch.optim.SGD else "exp_avg"
    name = "layer1.0.conv1.weight"
    expected = old_state[name][buffer]
    for dim, positions in keep[name].items():
        expected = expected.index_select(dim, positions)
    assert torch.equal(optimizer.state[new[name]][buffer], expected)
    assert optimizer.state[new[name]][buffer].shape == new[name].shape
    model(x).sum().backward()
    optimizer.step()  # the smaller network trains on


def test_compact_weights_load_into_a_fresh_dense_model_with_torch_only():
    torch.manual_seed(0)
    model = timm.create_model("mobilenetv2_050", in_chans=1, num_classes=10).eval()
    x = torch.randn(2, 1, 32, 32)
    plan = ChannelPlan.build(model, x[:1])
    masks = random_masks(plan, seed=2)
    plan.transition(model, None, masks, {})
    compact_network(model, plan, masks, x[:1])
    fresh = timm.create_model("mobilenetv2_050", in_chans=1, num_classes=10).eval()
    load_compact_state_dict(fresh, model.state_dict(), channel_config(model))
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    shapes = timm.create_model("mobilenetv2_050", in_chans=1, num_classes=10).eval()
    load_compact_state_dict(shapes, model.state_dict())  # sizes inferred from the tensor shapes
    with torch.no_grad():
        assert torch.equal(shapes(x), model(x))
    assert math.isclose(forward_flops(shapes, x[:1]), forward_flops(model, x[:1]))


def test_round_widths_to_a_multiple_keeps_bounds_and_order():
    counts = torch.tensor([61, 21, 3, 100, 7])
    sizes = torch.tensor([64, 64, 64, 100, 6])
    minimum = torch.tensor([4, 4, 4, 5, 1])
    rounded = round_widths(counts, 8, minimum, sizes)
    assert rounded.tolist() == [64, 24, 8, 100, 6]  # nearest multiple, the minimum rounded up, capped by size
    assert torch.equal(round_widths(counts, 1, minimum, sizes), counts)
    # non-decreasing in the counts, so bisection over the global ranking stays valid
    previous = None
    for c in range(0, 65):
        r = int(round_widths(torch.tensor([c]), 8, torch.tensor([4]), torch.tensor([64]))[0])
        assert previous is None or r >= previous
        previous = r


def test_allocation_with_a_multiple_meets_the_budget_with_rounded_widths():
    torch.manual_seed(0)
    scores = [torch.rand(64), torch.rand(128), torch.rand(256)]
    allocation = Allocation(scores, [4, 7, 13], multiple=8)
    cost = lambda counts: float((counts * torch.tensor([1.0, 2.0, 4.0])).sum())  # noqa: E731
    limit = 0.5 * cost(torch.tensor([64, 128, 256]))
    counts = allocation.counts(allocation.largest_within(cost, limit))
    assert all(int(c) % 8 == 0 for c in counts)
    assert cost(counts) <= limit and cost(counts) >= 0.95 * limit
