"""A small BatchNorm VGG-style CNN registered with timm as ``stacktrain_vgg``.

The benchmarks' CNN on the cluttered digits (BENCHMARKS.md, section 2): 3x3 conv + BN + ReLU
layers in stages, a 2x2 max-pool after every stage but the last, global average pooling and a
linear classifier. Its width matters on that task (a quarter of the width loses points), which is
what channel pruning, gradient quantization and early exits need to show an effect. Registered with
timm so that every module that takes a ``model_name`` builds it (``ImageClassifier``,
``BoostedEarlyExit`` through ``features_only``), with ``width`` and ``stage_convs`` as
``model_kwargs``::

    ImageClassifier(model_name="stacktrain_vgg", in_chans=1, model_kwargs={"width": 16})
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

__all__ = ["SmallVGG"]


class SmallVGG(nn.Module):
    """Stage ``i`` has ``stage_convs[i]`` conv layers of ``width * 2**min(i, 2)`` channels (default
    stages 2, 2, 1: widths w, w, 2w, 2w, 4w with two max-pools)."""

    def __init__(self, width: int = 32, stage_convs: Sequence[int] = (2, 2, 1), in_chans: int = 3,
                 num_classes: int = 10, drop_rate: float = 0.0, global_pool: str = "avg") -> None:
        super().__init__()
        if global_pool != "avg":
            raise ValueError(f"stacktrain_vgg pools by average only, got global_pool={global_pool!r}")
        self.num_classes = num_classes
        self.stages = nn.Sequential()
        self.feature_info: list[dict[str, Any]] = []
        channels, reduction = in_chans, 1
        for index, convs in enumerate(stage_convs):
            out = width * 2 ** min(index, 2)
            layers: list[nn.Module] = []
            for _ in range(convs):
                layers += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True)]
                channels = out
            if index < len(stage_convs) - 1:
                layers.append(nn.MaxPool2d(2))
                reduction *= 2
            self.stages.append(nn.Sequential(*layers))
            self.feature_info.append(dict(num_chs=channels, reduction=reduction, module=f"stages.{index}"))
        self.num_features = channels
        self.head_drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(channels, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int, global_pool: str = "avg") -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(x.mean(dim=(2, 3)))
        return x if pre_logits else self.fc(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


default_cfgs = generate_default_cfgs({
    "stacktrain_vgg": dict(num_classes=10, input_size=(3, 32, 32), pool_size=(8, 8), first_conv="stages.0.0",
                           classifier="fc", mean=(0.5,), std=(0.5,)),
})


@register_model
def stacktrain_vgg(pretrained: bool = False, **kwargs: Any) -> SmallVGG:
    """The benchmarks' BN VGG-style CNN (``width``, ``stage_convs``, ``in_chans``, ``num_classes``)."""
    stages = len(kwargs.get("stage_convs", (2, 2, 1)))
    return build_model_with_cfg(SmallVGG, "stacktrain_vgg", pretrained,
                                feature_cfg=dict(flatten_sequential=True, out_indices=tuple(range(stages))), **kwargs)
