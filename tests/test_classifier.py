"""ImageClassifier: timm models by name, local pretrained files, clear errors, optimizer plumbing."""

from __future__ import annotations

import pytest
import timm
import torch

from conftest import make_trainer
from stacktrain.datamodules import DigitsDataModule
from stacktrain.errors import StackError
from stacktrain.lightning_modules import ImageClassifier
from stacktrain.optim import build_scheduler, weight_decay_groups


def fit(model, data, tmp_path, **kwargs):
    options = dict(max_steps=2, limit_val_batches=1)
    options.update(kwargs)
    trainer = make_trainer(tmp_path, **options)
    trainer.fit(model, data)
    return trainer


def test_unknown_model_name_lists_the_closest_names():
    with pytest.raises(StackError) as info:
        ImageClassifier("resnet_18")
    message = str(info.value)
    assert "model.init_args.model_name='resnet_18' is not a timm model" in message
    assert "resnet18" in message.split("closest:")[1]


def test_bad_model_kwargs_name_the_key():
    with pytest.raises(StackError, match=r"model_kwargs=\{'embd_dim': 32\}.*embd_dim"):
        ImageClassifier("vit_tiny_patch16_224", model_kwargs={"embd_dim": 32})


def test_wrong_number_of_classes_fails_before_the_first_batch(tmp_path, tiny_vit_kwargs):
    model = ImageClassifier("vit_tiny_patch16_224", num_classes=7, in_chans=1, model_kwargs=tiny_vit_kwargs)
    with pytest.raises(StackError, match="predicts 7 classes but the data has 10.*num_classes: 10"):
        fit(model, DigitsDataModule(), tmp_path)
    assert model.trainer.global_step == 0


def test_wrong_channels_fail_before_the_first_batch(tmp_path):
    model = ImageClassifier("resnet18")
    with pytest.raises(StackError, match="takes 3-channel images but the data gives 1.*in_chans: 1"):
        fit(model, DigitsDataModule(), tmp_path)


def test_image_size_the_vit_cannot_take_is_rejected(tmp_path, tiny_vit_kwargs):
    model = ImageClassifier("vit_tiny_patch16_224", in_chans=1, model_kwargs=tiny_vit_kwargs)
    with pytest.raises(StackError, match=r"built for \(16, 16\) images but the data gives \(24, 24\).*img_size: 24"):
        fit(model, DigitsDataModule(image_size=24), tmp_path)
    dynamic = dict(tiny_vit_kwargs, patch_size=5, dynamic_img_size=True)
    model = ImageClassifier("vit_tiny_patch16_224", in_chans=1, model_kwargs=dynamic)
    with pytest.raises(StackError, match=r"patch size \(5, 5\) does not divide the image size \(16, 16\)"):
        fit(model, DigitsDataModule(), tmp_path)


def test_trains_and_tests_on_digits(tmp_path, tiny_vit_kwargs):
    model = ImageClassifier("vit_tiny_patch16_224", in_chans=1, model_kwargs=tiny_vit_kwargs)
    data = DigitsDataModule(batch_size=32)
    trainer = fit(model, data, tmp_path, max_steps=4)
    assert trainer.global_step == 4
    result = trainer.test(model, data, verbose=False)[0]
    assert set(result) == {"test/acc", "test/loss"}
    predictions = trainer.predict(model, data)
    assert predictions[0]["probs"].shape == (32, 10)
    assert sum(len(p["preds"]) for p in predictions) == 270  # the test split
    # test/acc is the accuracy of those predictions on the test split's labels
    preds = torch.cat([p["preds"] for p in predictions])
    labels = torch.cat([labels for _, labels in data.test_dataloader()])
    assert result["test/acc"] == pytest.approx(float((preds == labels).float().mean()), abs=1e-6)
    assert torch.allclose(predictions[0]["probs"].sum(-1), torch.ones(32))


def test_local_pretrained_file_is_loaded_with_timm_adapting_the_head(tmp_path):
    source = timm.create_model("resnet18", num_classes=5, in_chans=1)
    torch.save(source.state_dict(), tmp_path / "weights.pth")
    model = ImageClassifier("resnet18", num_classes=10, in_chans=1, pretrained=str(tmp_path / "weights.pth"))
    assert torch.equal(model.model.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert model.model.fc.out_features == 10  # new head for the new classes
    with pytest.raises(StackError, match="pretrained='.*missing.pth' does not exist"):
        ImageClassifier("resnet18", pretrained=str(tmp_path / "missing.pth"))


def test_scheduler_gets_the_length_of_training(tmp_path, tiny_vit_kwargs):
    from functools import partial

    model = ImageClassifier(
        "vit_tiny_patch16_224", in_chans=1, model_kwargs=tiny_vit_kwargs,
        optimizer=partial(torch.optim.AdamW, lr=1e-3),
        lr_scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=1e-3),
    )
    trainer = fit(model, DigitsDataModule(batch_size=64), tmp_path, max_steps=-1, max_epochs=2, limit_train_batches=3)
    scheduler = trainer.lr_scheduler_configs[0]
    assert scheduler.interval == "step"
    assert scheduler.scheduler.total_steps == 6
    assert trainer.global_step == 6


def test_build_scheduler_respects_an_explicit_length():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    from functools import partial

    cosine = build_scheduler(partial(torch.optim.lr_scheduler.CosineAnnealingLR, T_max=7), optimizer, 100)
    assert cosine.T_max == 7
    cosine = build_scheduler(torch.optim.lr_scheduler.CosineAnnealingLR, optimizer, 100)
    assert cosine.T_max == 100


def test_no_weight_decay_on_norms_biases_and_tokens(tiny_vit_kwargs):
    vit = timm.create_model("vit_tiny_patch16_224", **tiny_vit_kwargs)
    decay, no_decay = weight_decay_groups(vit)
    names = {id(p): n for n, p in vit.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "pos_embed", "norm.weight", "norm.bias", "blocks.0.attn.qkv.bias"} <= skipped
    assert {names[id(p)] for p in decay["params"]} >= {"blocks.0.attn.qkv.weight", "head.weight"}
    assert no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(vit.parameters()))


def test_one_cycle_with_a_one_step_warm_up_does_not_divide_by_zero():
    """pct_start * total_steps == 1 made torch's OneCycleLR divide by zero at its first step."""
    import functools

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([parameter], lr=0.1)
    factory = functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1, pct_start=0.01)
    scheduler = build_scheduler(factory, optimizer, 100)
    rates = []
    for _ in range(99):
        optimizer.step()
        scheduler.step()
        rates.append(scheduler.get_last_lr()[0])
    assert max(rates) == pytest.approx(0.1, rel=0.05) and rates[-1] < 1e-3
