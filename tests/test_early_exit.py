"""`BoostedEarlyExit`, the early-exit technique's Lightning module: exit costs of staged backbones, the
module, real early-exit inference, DDP, exact resume and bad input (the functional core is tested in
test_early_exit_functional.py)."""

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
from stacktrain.functional.early_exit import (
    assign_exits,
)
from stacktrain.functional.early_exit_network import BatchSlices, StagedBackbone
from stacktrain.functional.flops import forward_flops
from stacktrain.lightning_modules import BoostedEarlyExit

# ------------------------------------------------------------------------------ costs and settings


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
    from stacktrain.functional.early_exit import confidences

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


def test_inference_copy_folds_batchnorm_slices_the_first_stage_and_predicts_the_same():
    torch.manual_seed(0)
    module = BoostedEarlyExit("stacktrain_vgg", in_chans=1, backbone_kwargs={"width": 8, "stage_convs": [1, 1, 1, 1]})
    module.eval()
    for norm in module.network.modules():  # non-trivial statistics, so folding them is visible
        if isinstance(norm, torch.nn.BatchNorm2d):
            norm.running_mean.uniform_(-0.5, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
    fast = module.network.for_inference(channels_last=True, first_segment_rows=5)  # 16 rows: slices 5, 5, 5, 1
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fast.modules())
    assert isinstance(fast.backbone.segments[0], BatchSlices) and fast.backbone.segments[0].rows == 5
    assert not any(isinstance(m, BatchSlices) for m in fast.backbone.segments[1:])
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in module.network.modules())  # the original is untouched
    images = torch.randn(16, 1, 32, 32)
    with torch.no_grad():
        expected = module.network.full_forward(images)
        got = fast.full_forward(images.contiguous(memory_format=torch.channels_last))
        assert torch.allclose(got, expected, atol=1e-4)
        thresholds = torch.tensor([0.0, float("inf"), float("inf"), float("-inf")])  # everyone leaves at exit 0
        _, exits, _ = fast.early_exit(images, thresholds, module.mode, module.weights, module.form)
    assert exits.tolist() == [0] * 16
