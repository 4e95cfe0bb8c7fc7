"""SimCLR / MoCo v3 / DINO: the objectives against hand computations, the multi-view data, and short
runs on the digits with the k-NN evaluation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from torch import nn

from conftest import TINY_VIT, make_trainer
from stacktrain.callbacks import TokenDropout
from stacktrain.datamodules import DigitsDataModule, MultiViewDataModule
from stacktrain.errors import StackError
from stacktrain.functional.contrastive import (
    cosine_momentum,
    dino_loss,
    ema_update,
    knn_predict,
    moco_contrastive_loss,
    nt_xent_loss,
)
from stacktrain.lightning_modules import DINO, MoCoV3, SimCLR

VIT = TINY_VIT


def test_nt_xent_matches_the_definition_and_its_distributed_form():
    torch.manual_seed(0)
    z1, z2 = torch.randn(4, 8), torch.randn(4, 8)
    temperature = 0.5
    z = F.normalize(torch.cat((z1, z2)), dim=1)
    expected = 0.0
    for i in range(8):
        positive = (i + 4) % 8
        others = [j for j in range(8) if j != i]
        logits = torch.stack([z[i] @ z[j] / temperature for j in others])
        expected += -(z[i] @ z[positive] / temperature - torch.logsumexp(logits, 0))
    assert nt_xent_loss(z1, z2, temperature) == pytest.approx(float(expected / 8), rel=1e-5)
    # rank 1 of 2: its rows sit at offset 4 of the gathered embeddings
    other1, other2 = torch.randn(4, 8), torch.randn(4, 8)
    gathered = nt_xent_loss(z1, z2, temperature, torch.cat((other1, z1)), torch.cat((other2, z2)), offset=4)
    full = nt_xent_loss(torch.cat((other1, z1)), torch.cat((other2, z2)), temperature)
    mine = nt_xent_loss(other1, other2, temperature, torch.cat((other1, z1)), torch.cat((other2, z2)), offset=0)
    assert float(gathered + mine) / 2 == pytest.approx(float(full), rel=1e-5)


def test_moco_dino_knn_and_ema_against_hand_computations():
    q, k = torch.eye(3), torch.eye(3)
    expected = -math.log(math.exp(1 / 0.2) / (math.exp(1 / 0.2) + 2)) * 0.4
    assert moco_contrastive_loss(q, k, 0.2) == pytest.approx(expected, rel=1e-5)
    # DINO: teacher and student agree -> the loss is the teacher's entropy; pairs skip the same view
    logits = torch.tensor([[2.0, 0.0, -1.0]])
    center = torch.zeros(1, 3)
    loss = dino_loss([logits, logits], [logits, logits], center, student_temperature=1.0, teacher_temperature=1.0)
    probabilities = logits.softmax(-1)
    assert loss == pytest.approx(float(-(probabilities * probabilities.log()).sum()), rel=1e-5)
    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    scores = knn_predict(torch.tensor([[1.0, 0.05]]), bank, torch.tensor([0, 0, 1]), num_classes=2, k=2)
    assert scores.argmax(1).item() == 0 and scores[0, 1] == 0
    left_out = knn_predict(bank, bank, torch.tensor([0, 0, 1]), num_classes=2, k=1, exclude_self=True)
    assert left_out.argmax(1).tolist() == [0, 0, 0]  # each point's nearest *other* point
    teacher, student = nn.Linear(2, 2), nn.Linear(2, 2)
    before = teacher.weight.detach().clone()
    ema_update(teacher, student, 0.9)
    assert torch.allclose(teacher.weight, 0.9 * before + 0.1 * student.weight)
    assert cosine_momentum(0, 10, 0.99) == pytest.approx(0.99) and cosine_momentum(10, 10, 0.99) == 1.0


def test_multi_view_batches_are_seeded_per_sample_and_evaluation_keeps_images_and_labels():
    data = MultiViewDataModule(DigitsDataModule(batch_size=8), global_views=2, local_views=2, local_size=8)
    data.setup("fit")
    assert data.view_sizes == [(16, 16), (16, 16), (8, 8), (8, 8)]
    loader = data.train_dataloader()
    views, labels = next(iter(loader))
    assert [tuple(v.shape) for v in views] == [(8, 1, 16, 16)] * 2 + [(8, 1, 8, 8)] * 2
    assert not torch.equal(views[0], views[1])
    again, _ = next(iter(data.train_dataloader()))
    assert all(torch.equal(a, b) for a, b in zip(views, again))
    bank, val = data.val_dataloader()
    images, labels = next(iter(val))
    assert images.shape == (8, 1, 16, 16) and labels.dtype == torch.int64
    assert len(bank.dataset) == 1257
    with pytest.raises(StackError, match="crop_scale"):
        MultiViewDataModule(DigitsDataModule(), crop_scale=(0.5, 0.2))


def fit(module, data, callbacks=(), steps=4) -> Trainer:
    trainer = make_trainer(None, callbacks, max_steps=steps, num_sanity_val_steps=0, limit_val_batches=3,
                           val_check_interval=steps)
    trainer.fit(module, data)
    return trainer


@pytest.mark.parametrize("method", ["simclr", "mocov3", "dino"])
def test_each_method_trains_with_token_dropout_and_reports_knn_accuracy(method):
    seed_everything(0)
    data_kwargs: dict = {}
    if method == "simclr":
        module = SimCLR(model_name="vit_tiny_patch16_224", in_chans=1, model_kwargs=VIT, hidden_dim=64)
    elif method == "mocov3":
        module = MoCoV3(model_name="vit_tiny_patch16_224", in_chans=1, model_kwargs=VIT, hidden_dim=64)
    else:
        module = DINO(model_name="vit_tiny_patch16_224", in_chans=1, model_kwargs=dict(VIT, dynamic_img_size=True),
                      out_dim=64, hidden_dim=32, bottleneck_dim=16, freeze_last_layer_steps=2)
        data_kwargs = dict(local_views=2, local_size=8)
    teacher = getattr(module, "momentum_backbone", None) or getattr(module, "teacher_backbone", None)
    teacher_before = teacher.pos_embed.detach().clone() if teacher is not None else None
    technique = TokenDropout(schedule=[{"end": 0.5, "keep_ratio": 0.5, "patch_scale": 2}])
    trainer = fit(module, MultiViewDataModule(DigitsDataModule(batch_size=32), **data_kwargs), [technique])
    # val/knn_acc is the k-NN accuracy of the trained backbone's features: the validation queries
    # against the bank of (un-augmented) training images, 3 batches of each, recounted here
    module.eval()
    with torch.no_grad():
        bank_loader, query_loader = trainer.datamodule.val_dataloader()
        embedded = [[(module.backbone(x).float(), y) for x, y in itertools.islice(loader, 3)]
                    for loader in (bank_loader, query_loader)]
    (bank, bank_labels), (queries, labels) = [(torch.cat([f for f, _ in e]), torch.cat([y for _, y in e]))
                                              for e in embedded]
    scores = knn_predict(queries, bank, bank_labels, 10, module.hparams.knn_k, module.hparams.knn_temperature)
    expected = float((scores.argmax(1) == labels).float().mean())
    assert float(trainer.callback_metrics["val/knn_acc"]) == pytest.approx(expected, abs=1e-6)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert technique.vit_name == "backbone"  # the student, not the frozen teacher
    if teacher is not None:
        assert not any(p.requires_grad for p in teacher.parameters())
        assert not torch.equal(teacher.pos_embed, teacher_before)  # the EMA moved it
        assert isinstance(teacher.patch_drop, nn.Identity)
    if method == "dino":
        assert module.center.abs().sum() > 0


def test_single_view_data_and_multi_crop_without_dynamic_size_are_refused_before_training():
    module = SimCLR(model_name="vit_tiny_patch16_224", in_chans=1, model_kwargs=VIT, hidden_dim=64)
    with pytest.raises(StackError, match="needs 2 augmented views.*MultiViewDataModule"):
        fit(module, DigitsDataModule(batch_size=32))
    dino = DINO(model_name="vit_tiny_patch16_224", in_chans=1, model_kwargs=VIT, out_dim=64, hidden_dim=32)
    with pytest.raises(StackError, match="dynamic_img_size"):
        fit(dino, MultiViewDataModule(DigitsDataModule(batch_size=32), local_views=2))
    assert dino.trainer.global_step == 0
    knn = SimCLR(model_name="vit_tiny_patch16_224", in_chans=1, model_kwargs=VIT, hidden_dim=64, num_classes=7)
    with pytest.raises(StackError, match="the k-NN evaluation expects 7 classes but the data has 10.*num_classes: 10"):
        fit(knn, MultiViewDataModule(DigitsDataModule(batch_size=32)))
    assert knn.trainer.global_step == 0
