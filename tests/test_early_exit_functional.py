"""The early-exit technique's functional core: BoostNet's ensemble and losses, gradient equilibrium,
budgeted exit policies (`stacktrain.functional.early_exit`) and the staged network
(`stacktrain.functional.early_exit_network`). The Lightning module is tested in test_early_exit.py."""

from __future__ import annotations

import math

import pytest
import torch

from stacktrain.errors import StackError
from stacktrain.functional.early_exit import (
    apply_early_exit,
    assign_exits,
    budgeted_accuracy,
    ensemble_predictions,
    exit_losses,
    exit_proportions,
    fit_budget,
    fit_thresholds,
    split_gradient,
)
from stacktrain.functional.early_exit_network import StagedBackbone


def test_boosted_ensembles_follow_the_reference_form_by_default():
    f = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([[4.0, 2.0]])]
    boosted = ensemble_predictions(f, "boost")  # G_s = f_s + 0.5 G_{s-1} (SHI-Labs' forward, w = 0.5)
    assert [b.tolist() for b in boosted] == [[[1.0, 0.0]], [[0.5, 2.0]], [[4.25, 3.0]]]
    unweighted = ensemble_predictions(f, "boost", [1.0, 1.0, 1.0])
    assert [b.tolist() for b in unweighted] == [[[1.0, 0.0]], [[1.0, 2.0]], [[5.0, 4.0]]]
    scaled = ensemble_predictions(f, "boost", form="scaled")  # F_s = 1.0 (f_s + F_{s-1})
    assert [b.tolist() for b in scaled] == [[[1.0, 0.0]], [[1.0, 2.0]], [[5.0, 4.0]]]
    halved = ensemble_predictions(f, "boost", [0.5, 0.5, 0.5], form="scaled")
    assert halved[1].tolist() == [[0.25, 1.0]]  # 0.5 * (f1 + 0.5 * f0)
    assert [i.tolist() for i in ensemble_predictions(f, "independent")] == [x.tolist() for x in f]
    with pytest.raises(ValueError, match="ensemble form"):
        ensemble_predictions(f, "boost", form="averaged")


def test_boosting_loss_trains_each_head_on_the_residual_of_the_detached_ensemble():
    f0 = torch.tensor([[2.0, 0.0]], requires_grad=True)
    f1 = torch.tensor([[0.0, 1.0]], requires_grad=True)
    target = torch.tensor([1])
    cross_entropy = torch.nn.functional.cross_entropy
    losses = exit_losses([f0, f1], target, "boost")  # reference: CE(f1 + 0.5 * f0.detach())
    assert math.isclose(float(losses[1]), float(cross_entropy(f1 + 0.5 * f0, target)), rel_tol=1e-6)
    assert math.isclose(float(losses[0]), float(cross_entropy(f0, target)), rel_tol=1e-6)  # not rescaled
    losses[1].backward()
    assert f0.grad is None  # the earlier ensemble is a fixed offset for head 1
    assert f1.grad is not None and f1.grad.abs().sum() > 0
    scaled = exit_losses([f0, f1], target, "boost", [0.5, 0.5], form="scaled")  # CE(0.5 (f1 + 0.5 f0))
    assert math.isclose(float(scaled[1]), float(cross_entropy(0.5 * (f1 + 0.5 * f0), target)), rel_tol=1e-6)
    independent = exit_losses([f0, f1], target, "independent")
    assert math.isclose(float(independent[1]), float(cross_entropy(f1, target)), rel_tol=1e-6)


def test_training_offset_and_prediction_agree():
    """Head s trains on exactly the prediction exit s makes (the reference's forward_all and forward)."""
    f = [torch.randn(4, 3) for _ in range(4)]
    losses = exit_losses(f, torch.tensor([0, 1, 2, 0]), "boost", [0.3] * 4)
    predictions = ensemble_predictions(f, "boost", [0.3] * 4)
    for loss, prediction in zip(losses, predictions):
        expected = torch.nn.functional.cross_entropy(prediction, torch.tensor([0, 1, 2, 0]))
        assert math.isclose(float(loss), float(expected), rel_tol=1e-6)


def test_gradient_equilibrium_splits_the_backbone_gradient():
    features = torch.ones(3, requires_grad=True)
    for_head, for_next = split_gradient(features, exit_index=1, num_exits=4)
    (2.0 * for_head.sum() + 5.0 * for_next.sum()).backward()
    # remaining = 3: head gets 1/3 of its gradient, the deeper path 2/3 of its own
    assert torch.allclose(features.grad, torch.full((3,), 2.0 / 3 + 5.0 * 2 / 3))


def test_exit_proportions_are_geometric():
    shares = exit_proportions(0.5, 4)
    assert math.isclose(float(shares.sum()), 1.0)
    assert torch.allclose(shares[1:] / shares[:-1], torch.full((3,), 0.5, dtype=torch.float64))
    assert exit_proportions(2.0, 3).argmax() == 2


def test_thresholds_send_the_asked_share_out_at_each_exit():
    torch.manual_seed(0)
    confidence = torch.rand(3, 1000)
    thresholds = fit_thresholds(confidence, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))
    exits = assign_exits(confidence, thresholds)
    counts = torch.bincount(exits, minlength=3).tolist()
    assert counts[0] == 500 and counts[1] == 300 and counts[2] == 200
    assert thresholds[-1] == float("-inf")


def test_budget_fitting_meets_the_budget():
    torch.manual_seed(1)
    confidence = torch.rand(4, 2000)
    costs = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    spent = []
    for budget in (1.5, 2.0, 2.5, 3.0):
        exits = assign_exits(confidence, fit_budget(confidence, costs, budget))
        spent.append(float(costs[exits].mean()))
        assert spent[-1] <= budget and spent[-1] >= budget - 0.05
    assert spent == sorted(spent)


def test_budgeted_accuracy_on_a_handmade_case():
    confidence = torch.tensor([[0.9, 0.2, 0.6], [1.0, 0.9, 0.3]])
    predicted = torch.tensor([[1, 0, 2], [1, 1, 1]])
    targets = torch.tensor([1, 1, 2])
    accuracy, cost, shares = budgeted_accuracy(confidence, predicted, targets, torch.tensor([0.5, -1.0]),
                                               torch.tensor([1.0, 3.0]))
    # sample 0 and 2 leave at exit 0 (both right), sample 1 at exit 1 (right)
    assert accuracy == 1.0 and math.isclose(cost, 5.0 / 3) and shares.tolist() == [2 / 3, 1 / 3]


def test_apply_early_exit_gives_one_head_per_exit_of_the_backbone():
    torch.manual_seed(0)
    network = apply_early_exit("resnet10t", 7, ["layer2", "layer4"], head_hidden=8, in_chans=1)
    assert network.backbone.exit_names == ["layer2", "layer4"] and len(network.heads) == 2
    logits = network(torch.randn(3, 1, 32, 32))
    assert [tuple(x.shape) for x in logits] == [(3, 7), (3, 7)]
    default = apply_early_exit("resnet10t", 7, in_chans=1)  # the last four stages of a CNN
    assert default.backbone.exit_names == ["layer1", "layer2", "layer3", "layer4"]


@pytest.mark.parametrize("name,points", [("convnext_atto", "stages.3"), ("vgg11", "features.20"), ("mobilenetv2_050", "blocks.6")])
def test_other_staged_cnns(name, points):
    staged = StagedBackbone(name, in_chans=1)
    assert staged.exit_names[-1] == points and len(staged.exit_names) == 4
    features = torch.zeros(2, 1, 32, 32)
    for segment in staged.segments:
        features = segment(features)
    assert features.shape[1] == staged.exit_channels[-1]


def test_vit_exit_heads_pool_as_the_vit_head_does():
    """A ViT that averages its patch tokens gets exit heads that average them too (the class token
    is left out); a class-token ViT's heads read the class token; other poolings are refused."""
    torch.manual_seed(0)
    kwargs = dict(img_size=16, patch_size=4, embed_dim=8, depth=2, num_heads=2, stem_channels=4, stem_layers=1)
    network = apply_early_exit("vit_convstem_tiny", 3, ["blocks.0", "blocks.1"], in_chans=1, model_kwargs=kwargs)
    head = network.heads[0]
    assert network.backbone.vit_pool == "avg" and head.pool == "avg"
    tokens = torch.randn(2, 17, 8)  # class token + 16 patch tokens
    expected = head.linear(head.norm(tokens)[:, 1:].mean(dim=1))
    assert torch.allclose(head(tokens), expected)
    tokens_changed = tokens.clone()
    tokens_changed[:, 0] += 5.0  # the class token does not reach an averaging head
    assert torch.allclose(head(tokens_changed), expected, atol=1e-6)

    token_network = apply_early_exit("vit_convstem_tiny", 3, ["blocks.1"], in_chans=1,
                                     model_kwargs=dict(kwargs, global_pool="token"))
    token_head = token_network.heads[0]
    assert token_head.pool == "token"
    assert torch.allclose(token_head(tokens), token_head.linear(token_head.norm(tokens)[:, 0]))

    with pytest.raises(StackError, match="global_pool"):
        StagedBackbone("vit_convstem_tiny", in_chans=1, model_kwargs=dict(kwargs, global_pool="max"))
