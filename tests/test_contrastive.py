"""SimCLR / MoCo v3 / DINO: the objectives against hand computations, the multi-view data, and short
runs on the digits with the k-NN evaluation."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer, seed_everything
from torch import nn

from conftest import TINY_VIT, make_trainer
from stacktrain.callbacks import EfficiencyReport, TokenDropout
from stacktrain.datamodules import DigitsDataModule, MultiViewDataModule
from stacktrain.datamodules.multiview import RandomRotateShear
from stacktrain.errors import StackError
from stacktrain.functional.contrastive import (
    cosine_momentum,
    dino_loss,
    ema_update,
    knn_predict,
    koleo_loss,
    moco_contrastive_loss,
    nt_xent_loss,
)
from stacktrain.functional.token_dropout import ViTCostModel, apply_token_dropout
from stacktrain.lightning_modules import DINO, MoCoV3, SimCLR
from stacktrain.stack import FLOPS_PER_STEP, TOKENS_PER_SAMPLE

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
    with pytest.raises(StackError, match="degrees"):
        MultiViewDataModule(DigitsDataModule(), degrees=-5)


def test_rotate_shear_fills_with_the_background_and_keeps_the_stroke():
    image = torch.full((1, 16, 16), -0.8)
    image[:, 3:13, 7:9] = 2.0  # a vertical bar on the normalized background
    torch.manual_seed(0)
    turned = RandomRotateShear(degrees=45, shear=20)(image)
    assert turned.min() >= -0.8 - 1e-6  # corners filled with the background, not 0 (a grey frame)
    assert torch.allclose(turned[:, 0, :], torch.tensor(-0.8)) and torch.allclose(turned[:, -1, :], torch.tensor(-0.8))
    assert not torch.equal(turned, image)
    stroke = (turned - -0.8).sum() / (image - -0.8).sum()
    assert 0.8 < float(stroke) < 1.2  # the bar's ink is moved, not lost
    assert torch.equal(RandomRotateShear(0, 0)(image), image)


def test_koleo_loss_is_minus_the_mean_log_nearest_neighbour_distance():
    features = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 0.1]])
    unit = F.normalize(features, dim=1)
    distances = [float((unit[0] - unit[2]).norm()), float((unit[1] - unit[2]).norm()), float((unit[2] - unit[0]).norm())]
    assert float(koleo_loss(features)) == pytest.approx(-sum(math.log(d) for d in distances) / 3, rel=1e-5)
    # spread features cost less than nearly identical ones (a random small ViT's class tokens)
    torch.manual_seed(0)
    assert koleo_loss(torch.randn(16, 8)) < koleo_loss(torch.ones(16, 8) + 0.01 * torch.randn(16, 8))


def test_dino_options_train_and_bad_choices_are_refused():
    seed_everything(0)
    module = DINO(model_name="vit_tiny_patch16_224", in_chans=1, model_kwargs=VIT, out_dim=16, hidden_dim=32,
                  bottleneck_dim=16, head_batchnorm=True, freeze_head_steps=2,
                  koleo_weight=0.5)
    head_before = copy.deepcopy(module.head.state_dict())
    backbone_before = module.backbone.pos_embed.detach().clone()
    trainer = fit(module, MultiViewDataModule(DigitsDataModule(batch_size=32)), steps=2)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert float(trainer.callback_metrics["train/koleo"]) > 0
    # the frozen head keeps its weights (BatchNorm's running statistics are buffers, not weights)
    for name, value in module.head.state_dict().items():
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(value, head_before[name]), name
    # and the teacher's head, the EMA of an unchanging head, stays the same up to rounding
    assert torch.allclose(module.teacher_head.last_layer.parametrizations.weight.original1,
                          head_before["last_layer.parametrizations.weight.original1"], atol=1e-6)
    assert not torch.equal(module.backbone.pos_embed, backbone_before)  # the backbone trains
    with pytest.raises(StackError, match="koleo_weight"):
        DINO(model_name="vit_tiny_patch16_224", in_chans=1, model_kwargs=VIT, koleo_weight=-1.0)
    with pytest.raises(StackError, match="freeze_head_steps"):
        DINO(model_name="vit_tiny_patch16_224", in_chans=1, model_kwargs=VIT, freeze_head_steps=-1)


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


# --------------------------------------------------------------------------- asymmetric token dropout
def make_method(method: str, views: str, **kwargs):
    seed_everything(0)
    common = dict(model_name="vit_tiny_patch16_224", in_chans=1, token_dropout_views=views, **kwargs)
    if method == "simclr":
        return SimCLR(model_kwargs=VIT, hidden_dim=32, projection_dim=16, **common)
    if method == "mocov3":
        return MoCoV3(model_kwargs=VIT, hidden_dim=32, projection_dim=16, **common)
    return DINO(model_kwargs=dict(VIT, dynamic_img_size=True), out_dim=32, hidden_dim=32, bottleneck_dim=16, **common)


class StubTrainer:
    """What the objectives read from a Trainer: step, length, one process, a mean over one rank."""

    global_step = 0
    max_steps = 10
    world_size = 1

    class strategy:  # noqa: N801
        @staticmethod
        def reduce(tensor, reduce_op):
            return tensor


def views_of(method: str, batch: int = 4) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    views = [torch.randn(batch, 1, 16, 16, generator=generator) for _ in range(2)]
    if method == "dino":
        views += [torch.randn(batch, 1, 8, 8, generator=generator) for _ in range(2)]  # local crops
    return views


def objective_with_dropout(module, views, keep_ratio: float, patch_scale: int = 1):
    """The module's loss on ``views`` with token dropout installed in its student backbone (masks from a
    generator seeded 0), and the (batch, tokens) of every call of the student's and the teacher's first block."""
    compression = apply_token_dropout(module.backbone, patch_scaling=patch_scale > 1,
                                               generator=torch.Generator().manual_seed(0))
    compression.set(keep_ratio, patch_scale)
    module._trainer = StubTrainer()
    module.global_views = 2
    module.train()
    calls: dict[str, list[tuple[int, int]]] = {"student": [], "teacher": []}
    module.backbone.blocks[0].register_forward_pre_hook(lambda m, a: calls["student"].append(tuple(a[0].shape[:2])))
    teacher = getattr(module, "momentum_backbone", None) or getattr(module, "teacher_backbone", None)
    if teacher is not None:
        teacher.blocks[0].register_forward_pre_hook(lambda m, a: calls["teacher"].append(tuple(a[0].shape[:2])))
    loss = module.objective(list(views))
    return loss, calls, compression


def test_bad_token_dropout_views_is_refused_at_construction():
    with pytest.raises(StackError, match=r"SimCLR: token_dropout_views='two' is not one of \['one', 'both'\].*"
                                         r"Fix: use one of 'one', 'both'"):
        SimCLR(model_name="vit_tiny_patch16_224", in_chans=1, model_kwargs=VIT, token_dropout_views="two")
    assert make_method("dino", "one").hparams.token_dropout_views == "one"  # the default, saved with the module
    assert SimCLR(model_name="vit_tiny_patch16_224", in_chans=1, model_kwargs=VIT).token_dropout_views == "one"


@pytest.mark.parametrize("method", ["simclr", "mocov3", "dino"])
def test_one_view_is_dropped_and_the_other_keeps_every_token(method):
    """16 patch tokens (+ class token) per 16 px view, 4 per 8 px local crop; keep 0.5."""
    views = views_of(method)
    _, one, _ = objective_with_dropout(make_method(method, "one"), views, 0.5)
    _, both, _ = objective_with_dropout(make_method(method, "both"), views, 0.5)
    local_one, local_both = ([(8, 1 + 4)], [(8, 1 + 2)]) if method == "dino" else ([], [])
    assert one["student"] == [(4, 1 + 8), (4, 1 + 16)] + local_one  # view 0 dropped, view 1 full
    assert both["student"] == [(8, 1 + 8)] + local_both  # as before: one call, every view dropped
    teacher = [(8, 1 + 16)] if method != "simclr" else []
    assert one["teacher"] == both["teacher"] == teacher  # the momentum encoder / teacher: full sequences
    # patch scaling applies to both views: scale 2 makes 4 patch tokens, the dropped view keeps 2
    _, scaled, _ = objective_with_dropout(make_method(method, "one"), views, 0.5, patch_scale=2)
    assert scaled["student"][:2] == [(4, 1 + 2), (4, 1 + 4)]


@pytest.mark.parametrize("method", ["simclr", "mocov3", "dino"])
def test_one_and_both_agree_without_dropout_and_differ_with_it(method):
    views = views_of(method)
    losses = {}
    for keep in (1.0, 0.5):
        for setting in ("one", "both"):
            losses[keep, setting] = objective_with_dropout(make_method(method, setting), views, keep, 2)[0].item()
    assert losses[1.0, "one"] == pytest.approx(losses[1.0, "both"], rel=1e-6)
    assert abs(losses[0.5, "one"] - losses[0.5, "both"]) > 1e-3
    # no token dropout installed at all: the same single backbone call as "both"
    plain = {setting: make_method(method, setting) for setting in ("one", "both")}
    for module in plain.values():
        module._trainer, module.global_views = StubTrainer(), 2
    assert float(plain["one"].objective(list(views))) == pytest.approx(float(plain["both"].objective(list(views))),
                                                                        rel=1e-6)


def test_the_split_backbone_calls_feed_the_projector_one_batch():
    """SimCLR "one" at keep 0.5 equals the loss written by hand: view 0 through the dropping backbone,
    view 1 at keep 1, the features concatenated before the BatchNorm projector (projecting each view
    alone would change the BatchNorm statistics and the loss)."""
    views = views_of("simclr")
    loss, _, _ = objective_with_dropout(make_method("simclr", "one"), views, 0.5)
    module = make_method("simclr", "one")
    compression = apply_token_dropout(module.backbone, generator=torch.Generator().manual_seed(0))
    module.train()
    compression.set(0.5)
    dropped = module.backbone(views[0])
    compression.set(1.0)
    full = module.backbone(views[1])
    z1, z2 = module.projector(torch.cat((dropped, full))).chunk(2)
    assert float(loss) == pytest.approx(float(nt_xent_loss(z1, z2, module.temperature)), rel=1e-6)
    z1_apart, z2_apart = module.projector(dropped), module.projector(full)
    assert abs(float(nt_xent_loss(z1_apart, z2_apart, module.temperature)) - float(loss)) > 1e-3


@pytest.mark.parametrize("views", ["one", "both"])
def test_efficiency_report_counts_the_asymmetric_cost(views, tmp_path):
    """keep 0.5 on 16 patch tokens: "one" costs (cost(0.5) + cost(1)) / 2 of the full ViT step, "both"
    cost(0.5); the FLOPs line sums what the two backbone calls really ran."""
    module = SimCLR(model_name="vit_tiny_patch16_224", in_chans=1, model_kwargs=VIT, hidden_dim=32,
                    projection_dim=16, token_dropout_views=views)
    report = EfficiencyReport(dirpath=str(tmp_path))
    technique = TokenDropout(keep_ratio=0.5)
    trainer = make_trainer(tmp_path, [technique, report], max_steps=2, limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(module, MultiViewDataModule(DigitsDataModule(batch_size=16)))
    cost = ViTCostModel.from_vit(module.backbone)
    flops = report.lines[("token_dropout", FLOPS_PER_STEP)]
    tokens = report.lines[("token_dropout", TOKENS_PER_SAMPLE)]
    full, dropped = cost.training_flops(), cost.training_flops(0.5)
    expected = (dropped + full) / (2 * full) if views == "one" else dropped / full
    assert flops.count == 2 and flops.ratio == pytest.approx(expected, rel=1e-9)
    assert flops.baseline == pytest.approx(2 * 2 * 16 * full, rel=1e-9)  # 2 steps x 2 views x 16 images
    assert tokens.ratio == pytest.approx((9 + 17) / 34 if views == "one" else 9 / 17, rel=1e-9)
