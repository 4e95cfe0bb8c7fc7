"""BoostNet early exits: the boosting math, threshold fitting, staged timm backbones, the module,
real early-exit inference, DDP, exact resume and bad input."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from conftest import CONFIGS, make_trainer
from ddp_harness import assert_states_equal, assert_trained, check, load_rank_states, run_ddp
from resume_harness import assert_resumed_exactly, stop_and_resume
from stacktrain.datamodules import DigitsDataModule
from stacktrain.errors import StackError
from stacktrain.functional.boosting import (
    assign_exits,
    budgeted_accuracy,
    ensemble_predictions,
    exit_losses,
    exit_proportions,
    fit_budget,
    fit_thresholds,
    split_gradient,
)
from stacktrain.functional.exits import StagedBackbone
from stacktrain.functional.flops import forward_flops
from stacktrain.lightning_modules import BoostedEarlyExit

# ------------------------------------------------------------------------------ boosting math


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


# ------------------------------------------------------------------------------ staged backbones


def test_resnet_segments_add_up_to_the_backbone_flops():
    staged = StagedBackbone("resnet10t", in_chans=1)
    assert staged.exit_names == ["layer1", "layer2", "layer3", "layer4"]
    module = BoostedEarlyExit("resnet10t", in_chans=1, input_shape=(1, 32, 32))
    module.measure_costs((1, 32, 32))
    trunk = timm.create_model("resnet10t", features_only=True, in_chans=1)
    assert float(module.segment_flops.sum()) == forward_flops(trunk, torch.zeros(1, 1, 32, 32))
    costs = module.exit_costs
    assert torch.all(costs[1:] > costs[:-1])  # each exit costs more than the one before
    assert math.isclose(module.full_flops, float(module.segment_flops.sum() + module.head_flops[-1]))


def test_vit_segments_are_its_blocks_and_keep_token_dropout(tiny_vit_kwargs):
    kwargs = dict(tiny_vit_kwargs, depth=4)
    staged = StagedBackbone("vit_tiny_patch16_224", in_chans=1, model_kwargs=kwargs)
    assert staged.kind == "vit" and staged.exit_names == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    module = BoostedEarlyExit("vit_tiny_patch16_224", in_chans=1, backbone_kwargs=kwargs, input_shape=(1, 16, 16))
    module.measure_costs((1, 16, 16))
    reference = timm.create_model("vit_tiny_patch16_224", in_chans=1, num_classes=0, **kwargs)
    reference.norm = torch.nn.Identity()
    assert float(module.segment_flops.sum()) == forward_flops(reference, torch.zeros(1, 1, 16, 16))
    # The stem calls the ViT's own patch_drop: a token-dropout module put there shortens every block's input.
    vit = module.backbone.vit
    vit.patch_drop = timm.layers.PatchDropout(0.5, num_prefix_tokens=1)
    module.train()
    tokens = module.backbone.segments[0](torch.zeros(2, 1, 16, 16))
    assert tokens.shape[1] == 1 + 8


@pytest.mark.parametrize("name,points", [("convnext_atto", "stages.3"), ("vgg11", "features.20"), ("mobilenetv2_050", "blocks.6")])
def test_other_staged_cnns(name, points):
    staged = StagedBackbone(name, in_chans=1)
    assert staged.exit_names[-1] == points and len(staged.exit_names) == 4
    features = torch.zeros(2, 1, 32, 32)
    for segment in staged.segments:
        features = segment(features)
    assert features.shape[1] == staged.exit_channels[-1]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(exits=[1, 7]), "holds index 7, outside the backbone's 5 exit points"),
        (dict(exits=["layer2", "layr4"]), "names 'layr4', not an exit point of resnet10t (closest: layer4"),
        (dict(exits=["layer3", "layer2"]), "in the order of the backbone"),
        (dict(training="boosted"), "did you mean 'boost'"),
        (dict(budgets=[0.5, 1.5]), "budgets=1.5 is out of range"),
    ],
)
def test_bad_exit_settings_are_rejected(kwargs, message):
    with pytest.raises(StackError, match=None) as info:
        BoostedEarlyExit("resnet10t", in_chans=1, **kwargs)
    assert message in str(info.value) and "Fix:" in str(info.value)


def test_backbone_without_stages_is_rejected():
    with pytest.raises(StackError, match="mixer_s16_224' builds its features as FeatureGetterNet, which cannot be cut"):
        BoostedEarlyExit("mixer_s16_224")


# ------------------------------------------------------------------------------ module


def _trainer(tmp_path, **kwargs):
    options = dict(max_epochs=2, limit_train_batches=8, limit_val_batches=3)
    options.update(kwargs)
    return make_trainer(tmp_path, **options)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    torch.manual_seed(0)
    # resnet10t's first exit costs 0.56 of the network at 32 px, so budgets start above it
    module = BoostedEarlyExit("resnet10t", in_chans=1, budgets=[0.6, 0.7, 0.8, 1.0], predict_budget=0.7)
    data = DigitsDataModule(image_size=32, batch_size=64)
    trainer = _trainer(root, enable_checkpointing=True, max_epochs=3, limit_train_batches=10)
    trainer.fit(module, data)
    return module, data, trainer


def test_validation_fits_exit_policies_into_the_checkpoint(trained):
    module, data, trainer = trained
    assert not torch.isnan(module.thresholds).any()
    metrics = trainer.callback_metrics
    assert {f"val/acc_exit{i}" for i in range(4)} <= set(metrics) and "val/acc_ensemble" in metrics
    for budget in (60, 70, 80):
        assert float(metrics[f"val/flops_budget_{budget}"]) <= budget / 100 + 1e-6
    reloaded = BoostedEarlyExit.load_from_checkpoint(trainer.checkpoint_callback.best_model_path)
    assert torch.equal(reloaded.thresholds, module.thresholds)
    assert torch.equal(reloaded.segment_flops, module.segment_flops)


def test_real_early_exit_matches_the_simulated_policy_and_skips_compute(trained):
    module, data, _ = trained
    data.setup("test")
    images = data.test_set.images[:128]
    module.eval()
    seen = []
    handles = [seg.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0])) for seg in module.backbone.segments]
    predictions, exits = module.early_exit(images, budget=0.7)
    for handle in handles:
        handle.remove()
    from stacktrain.functional.boosting import confidences

    confidence, predicted = confidences(module.predictions(module(images)))
    expected_exits = assign_exits(confidence, module.policy(0.7))
    assert torch.equal(exits, expected_exits)
    assert torch.equal(predictions, predicted.gather(0, expected_exits[None])[0])
    remaining = [128 - int((exits < k).sum()) for k in range(4)]
    assert seen[: len(remaining)] == remaining[: len(seen)] and seen[0] == 128 and seen[-1] < 128
    mean_cost = float(module.exit_costs[exits].mean()) / module.full_flops
    assert mean_cost < 0.8


def test_test_reports_anytime_and_budgeted_accuracy_with_a_plot(trained, tmp_path):
    module, data, _ = trained
    trainer = _trainer(tmp_path)
    results = trainer.test(module, data, verbose=False)[0]
    assert {f"test/acc_exit{i}" for i in range(4)} <= set(results)
    assert results["test/flops_budget_60"] < results["test/flops_budget_100"]
    # Budget 1.0 is the plain network's cost; the last exit costs more (the early heads ran too), so
    # the fitted policy still lets confident samples out early.
    assert results["test/flops_budget_100"] <= 1.02 and results["test/acc"] == results["test/acc_exit3"]
    assert module.budget_plot.endswith("early_exit_budget.png")
    assert open(module.budget_plot, "rb").read(4) == b"\x89PNG"
    predictions = trainer.predict(module, data)
    assert {"preds", "exits", "flops"} <= set(predictions[0])


def test_data_mismatch_fails_before_training(tmp_path):
    module = BoostedEarlyExit("resnet10t", in_chans=1, num_classes=7)
    with pytest.raises(StackError, match="predicts 7 classes but the data has 10"):
        _trainer(tmp_path).fit(module, DigitsDataModule(image_size=32))
    assert module.trainer.global_step == 0


def test_resume_gives_identical_weights_and_exit_policy(tmp_path):
    runs = stop_and_resume(
        lambda: BoostedEarlyExit("resnet10t", in_chans=1, budgets=[0.5, 1.0]),
        lambda: DigitsDataModule(image_size=32, batch_size=64), list,
        total=12, stop_at=7, root=tmp_path, limit_train_batches=5, limit_val_batches=2,
    )
    assert_resumed_exactly(runs)
    assert not torch.isnan(runs.resumed[0].thresholds).any()  # fitted at the validation after step 10


@pytest.mark.ddp
def test_two_processes_end_with_identical_weights_and_policies(tmp_path):
    result = check(run_ddp(
        ["fit", "--config", str(CONFIGS / "early_exit_boosting.yaml"), "--trainer.logger", "false",
         "--model.backbone_kwargs", '{"width": 8, "stage_convs": [1, 1, 1, 1]}', "--data.train_size", "512",
         "--data.val_size", "128", "--data.test_size", "128", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "4",
         "--trainer.limit_val_batches", "2"],
        workdir=tmp_path, dump_dir=tmp_path / "ranks",
    ))
    rank0, rank1 = load_rank_states(tmp_path / "ranks", 2)
    assert rank0["global_step"] == 8
    assert_states_equal(rank0["model"], rank1["model"])
    assert_trained(rank0)  # identical because DDP synchronised the training, not because nothing ran
    assert not torch.isnan(rank0["model"]["thresholds"]).any()
    assert "val/acc=" in result.stdout


def test_ensemble_form_and_weight_defaults_and_errors():
    from stacktrain import StackError

    reference = BoostedEarlyExit("resnet10t", in_chans=1)
    assert reference.form == "reference" and reference.weights == [0.5] * reference.num_exits
    scaled = BoostedEarlyExit("resnet10t", in_chans=1, ensemble="scaled")
    assert scaled.weights == [1.0] * scaled.num_exits
    with pytest.raises(StackError, match="model.init_args.ensemble"):
        BoostedEarlyExit("resnet10t", in_chans=1, ensemble="average")
    with pytest.raises(StackError, match="ensemble_weight"):
        BoostedEarlyExit("resnet10t", in_chans=1, ensemble_weight=0.0)


def test_inference_copy_folds_batchnorm_and_predicts_the_same():
    torch.manual_seed(0)
    module = BoostedEarlyExit("stacktrain_vgg", in_chans=1, backbone_kwargs={"width": 8, "stage_convs": [1, 1, 1, 1]})
    module.eval()
    for norm in module.network.modules():  # non-trivial statistics, so folding them is visible
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
    fast = module.network.for_inference(channels_last=True)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in module.network.modules())  # the original is untouched
    images = torch.randn(16, 1, 32, 32)
    with torch.no_grad():
        expected = module.network.full_forward(images)
        got = fast.full_forward(images.contiguous(memory_format=torch.channels_last))
        assert torch.allclose(got, expected, atol=1e-4)
        thresholds = torch.tensor([0.0, float("inf"), float("inf"), float("-inf")])  # everyone leaves at exit 0
        _, exits, _ = fast.early_exit(images, thresholds, module.mode, module.weights, module.form)
    assert exits.tolist() == [0] * 16
