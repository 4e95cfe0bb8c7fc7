"""Offline CLIP: the embedded procedural shapes, image-text shards, CLIPPretraining (open_clip's
contrastive loss, also gathered across 2 DDP processes) and its weights file, the configs."""

from __future__ import annotations

import glob
import math

import open_clip
import pytest
import torch
from lightning.pytorch import Trainer

from conftest import CONFIGS, make_trainer
from ddp_harness import assert_states_equal, assert_trained, check, load_rank_states, run_ddp
from stacktrain.cli import main
from stacktrain.datamodules import ImageTextWebDataModule, ShapesDataModule, ShapesTextDataModule
from stacktrain.datamodules.make_image_text_shards import main as make_image_text_shards
from stacktrain.datamodules.shapes import SHAPES, ShapeSamples
from stacktrain.errors import StackError
from stacktrain.lightning_modules import CLIPPretraining


def fit(module, data, tmp_path, **kwargs) -> Trainer:
    options = dict(max_steps=3, num_sanity_val_steps=0)
    options.update(kwargs)
    trainer = make_trainer(tmp_path, **options)
    trainer.fit(module, data)
    return trainer


# ----------------------------------------------------------------------------------------- data


def test_every_sample_is_a_function_of_seed_split_epoch_and_index():
    stream = ShapeSamples(1000, seed=0, split=0, image_size=32, fresh_each_epoch=True)
    alone, params = stream.render([(0, 7)])
    in_a_batch, _ = stream.render([(0, 3), (1, 7), (0, 7)])
    assert torch.equal(alone[0], in_a_batch[2])  # the same sample whatever the batch around it
    assert not torch.equal(alone[0], in_a_batch[1])  # a fresh image in the next epoch
    assert stream[(0, 7)][1] == params["caption"][0]
    fixed = ShapeSamples(1000, seed=0, split=0, image_size=32)  # not fresh: the epoch is ignored
    assert torch.equal(fixed[(5, 7)][0], alone[0])
    other_seed = ShapeSamples(1000, seed=1, split=0, image_size=32)
    assert not torch.equal(other_seed[7][0], alone[0])
    _, many = stream.render(range(200))
    named = sum(SHAPES[s] in c for s, c in zip(many["shape"].tolist(), many["caption"]))
    assert 150 < named < 200  # captions name the shape, except where the word was dropped


def test_classification_view_has_named_balanced_classes_and_a_blur_shift():
    data = ShapesDataModule(train_size=300, val_size=50, test_size=50, classes=["star", "circle", "heart"])
    data.setup("fit")
    assert data.class_names == ["star", "circle", "heart"] and data.num_classes == 3
    assert data.image_shape == (3, 32, 32) and data.train_set.images.shape == (300, 3, 32, 32)
    counts = torch.bincount(data.train_set.labels, minlength=3)
    assert counts.min() > 70 and counts.sum() == 300
    sharp = ShapesDataModule(train_size=300, val_size=50, test_size=50, classes=["star", "circle", "heart"], blur=0)
    sharp.setup("fit")
    assert torch.equal(sharp.train_set.labels, data.train_set.labels)  # the same samples, blurred or not
    blurred_detail = (data.train_set.images[:, :, 1:] - data.train_set.images[:, :, :-1]).abs().mean()
    sharp_detail = (sharp.train_set.images[:, :, 1:] - sharp.train_set.images[:, :, :-1]).abs().mean()
    assert blurred_detail < 0.6 * sharp_detail
    with pytest.raises(StackError, match=r"classes=\['circle', 'blob'\] must name at least two different shapes; unknown"):
        ShapesDataModule(classes=["circle", "blob"])


def test_image_text_shards_hold_the_pretraining_pairs(tmp_path):
    assert make_image_text_shards(["shapes", str(tmp_path), "--train", "48", "--val", "16", "--maxcount", "24"]) == 0
    data = ImageTextWebDataModule(str(tmp_path / "train-{000000..000001}.tar"), str(tmp_path / "val-000000.tar"),
                                  batch_size=16, shuffle_buffer=0)
    assert data.epoch_length == 48 and data.image_shape == (3, 32, 32) and data.num_classes is None
    images, captions = next(iter(data.val_dataloader()))
    reference = ShapeSamples(16, seed=0, split=1, image_size=32)
    expected, params = reference.render(range(16))
    assert list(captions) == params["caption"]
    assert (images - expected).abs().max() < 0.02  # PNG keeps the pixels up to 8-bit rounding
    assert make_image_text_shards(["shapes", str(tmp_path)]) == 2  # never overwrites


# ------------------------------------------------------------------------------ pretraining


def test_pretraining_trains_both_towers_and_writes_open_clip_weights(tmp_path):
    torch.manual_seed(0)
    module = CLIPPretraining("stacktrain-micro-clip")
    initial = {k: v.clone() for k, v in module.model.state_dict().items()}
    with torch.no_grad():
        module.model.logit_scale.fill_(6.0)  # above ln(100): clamped after the step
    data = ShapesTextDataModule(train_size=64, val_size=32, batch_size=16)
    trainer = fit(module, data, tmp_path, max_steps=2, val_check_interval=2)
    assert trainer.global_step == 2
    weights = module.model.state_dict()
    assert not torch.equal(weights["visual.conv1.weight"], initial["visual.conv1.weight"])
    assert not torch.equal(weights["transformer.resblocks.0.mlp.c_fc.weight"],
                           initial["transformer.resblocks.0.mlp.c_fc.weight"])
    assert 4.5 < module.model.logit_scale.item() <= math.log(100.0)  # clamped after every step
    assert {"train/loss", "val/loss", "val/image_to_text_r1", "val/text_to_image_r1"} <= set(trainer.callback_metrics)
    # the weights file is a plain open_clip state_dict, loaded strictly by open_clip itself
    assert module.exported_weights == str(tmp_path / "open_clip_weights.pt")
    loaded = open_clip.create_model("stacktrain-micro-clip", pretrained=module.exported_weights)
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, weights[key]), key
    fit(CLIPPretraining("stacktrain-micro-clip"), data, tmp_path, max_steps=1, limit_val_batches=0)
    written = sorted(glob.glob(str(tmp_path / "open_clip_weights*.pt")))
    assert written == [str(tmp_path / "open_clip_weights-2.pt"), str(tmp_path / "open_clip_weights.pt")]  # kept


def test_pretraining_from_image_text_shards(tmp_path):
    make_image_text_shards(["shapes", str(tmp_path / "shards"), "--train", "64", "--val", "16", "--maxcount", "32"])
    data = ImageTextWebDataModule(str(tmp_path / "shards" / "train-{000000..000001}.tar"),
                                  str(tmp_path / "shards" / "val-000000.tar"), batch_size=16)
    module = CLIPPretraining("stacktrain-micro-clip", export_weights=None)
    initial = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = fit(module, data, tmp_path, max_steps=3, val_check_interval=3)
    assert trainer.global_step == 3
    # the shards' pairs trained both towers...
    final = module.state_dict()
    assert not torch.equal(final["model.visual.conv1.weight"], initial["model.visual.conv1.weight"])
    assert not torch.equal(final["model.transformer.resblocks.0.mlp.c_fc.weight"],
                           initial["model.transformer.resblocks.0.mlp.c_fc.weight"])
    # ...and retrieval was measured over the 16 validation pairs of the val shard
    recall = float(trainer.callback_metrics["val/image_to_text_r1"])
    assert recall * 16 == pytest.approx(round(recall * 16), abs=1e-4)
    assert module.exported_weights is None


def test_pretraining_errors_before_training(tmp_path):
    with pytest.raises(StackError, match=r"takes \(32, 32\) images but the data gives \(16, 16\)"):
        fit(CLIPPretraining("stacktrain-micro-clip"), ShapesTextDataModule(image_size=16, train_size=32,
                                                                           batch_size=16), tmp_path)
    with pytest.raises(StackError, match="model_name='tiny-clip' is not an open_clip model; closest: "):
        CLIPPretraining("tiny-clip")
    with pytest.raises(StackError, match="gives each process 8 samples per epoch, less than one batch of 16"):
        fit(CLIPPretraining("stacktrain-micro-clip"), ShapesTextDataModule(train_size=8, batch_size=16), tmp_path)


@pytest.mark.ddp
def test_pretraining_on_two_processes_gathers_features_and_keeps_ranks_identical(tmp_path):
    """open_clip's ClipLoss with local_loss + gather_with_grad across 2 gloo processes: both ranks end
    with the same weights, and rank 0 writes the weights file."""
    result = check(run_ddp(
        ["fit", "--config", str(CONFIGS / "clip_pretrain_tiny.yaml"), "--trainer.logger", "false",
         "--model.init_args.model_name", "stacktrain-micro-clip", "--trainer.max_steps", "2",
         "--trainer.val_check_interval", "2", "--data.init_args.train_size", "64", "--data.init_args.val_size", "32",
         "--data.init_args.batch_size", "16"],
        workdir=tmp_path, dump_dir=tmp_path / "ranks",
    ))
    assert "stacktrain: fit finished after 2 steps" in result.stdout and "val/image_to_text_r1=" in result.stdout
    rank0, rank1 = load_rank_states(tmp_path / "ranks", 2)
    assert_states_equal(rank0["model"], rank1["model"])
    assert_trained(rank0)  # both towers trained, identically on both ranks
    exported = glob.glob(str(tmp_path / "open_clip_weights.pt"))
    assert len(exported) == 1
    loaded = open_clip.create_model("stacktrain-micro-clip", pretrained=exported[0])
    assert torch.equal(loaded.visual.conv1.weight, rank0["model"]["model.visual.conv1.weight"])


@pytest.mark.parametrize("config", ["clip_pretrain_tiny.yaml", "prompt_tuning_noisy.yaml",
                                    "prompt_tuning_unsupervised.yaml"])
def test_shipped_configs_resolve(config, capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(CONFIGS / config), "--print_config"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: stacktrain.loggers.WandbLogger" in printed
    assert "stacktrain.callbacks.EfficiencyReport" in printed and "stacktrain.callbacks.ExactResume" in printed
    assert "model_name: stacktrain-tiny-clip" in printed
