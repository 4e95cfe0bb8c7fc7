"""`stacktrain_vgg`, the benchmarks' BN VGG-style CNN, registered with timm."""

from __future__ import annotations

import timm
import torch

import stacktrain.models  # noqa: F401  (registers the model)


def test_widths_stages_and_classifier():
    model = timm.create_model("stacktrain_vgg", in_chans=1, num_classes=10, width=8)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [c.out_channels for c in convs] == [8, 8, 16, 16, 32]
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    assert model.forward_head(model.forward_features(torch.randn(2, 1, 32, 32)), pre_logits=True).shape == (2, 32)
    quarter = timm.create_model("stacktrain_vgg", in_chans=1, width=2)
    assert sum(p.numel() for p in quarter.parameters()) < sum(p.numel() for p in model.parameters()) / 8


def test_features_only_gives_one_point_per_stage():
    features = timm.create_model("stacktrain_vgg", features_only=True, in_chans=1, width=8, stage_convs=(1, 1, 2, 1))
    outputs = features(torch.randn(2, 1, 32, 32))
    assert [tuple(o.shape[1:]) for o in outputs] == [(8, 16, 16), (16, 8, 8), (32, 4, 4), (32, 4, 4)]
    assert features.feature_info.reduction() == [2, 4, 8, 8]
