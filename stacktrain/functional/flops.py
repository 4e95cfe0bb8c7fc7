"""FLOPs measured with ``torch.utils.flop_counter`` (multiply-add = 2 FLOPs), the one counter every
technique uses, so that their cost models are checked against the same reference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["forward_flops", "training_flops", "flops_by_module"]


def forward_flops(model: nn.Module, *inputs: Any, **kwargs: Any) -> int:
    """FLOPs of one forward pass of ``model`` on ``inputs`` (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs, **kwargs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def training_flops(model: nn.Module, loss_fn: Callable[[Any], torch.Tensor], *inputs: Any) -> int:
    """FLOPs of one training step's forward and backward: ``loss_fn(model(*inputs)).backward()``."""
    with FlopCounterMode(display=False) as counter:
        loss_fn(model(*inputs)).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def flops_by_module(model: nn.Module, *inputs: Any) -> dict[str, int]:
    """Forward FLOPs per submodule (flop-counter's module hierarchy, names relative to ``model``)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(*inputs)
    finally:
        model.train(was_training)
    flops: dict[str, int] = {}
    for name, per_op in counter.get_flop_counts().items():
        flops[name] = int(sum(per_op.values()))
    return flops
