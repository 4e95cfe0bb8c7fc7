"""FLOPs measured with ``torch.utils.flop_counter`` (multiply-add = 2 FLOPs), the one counter every
technique uses, so that their cost models are checked against the same reference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["forward_flops", "training_flops", "flops_by_module", "flop_counter"]

_aten = torch.ops.aten
#: Ops that torch's registry does not count but that carry real matmul FLOPs. On CPU,
#: ``F.scaled_dot_product_attention`` (every timm ViT) runs the fused
#: ``_scaled_dot_product_flash_attention_for_cpu`` kernel, which torch 2.x leaves out of the count, so
#: attention would be missing from every CPU measurement. Same formulas as the CUDA kernels.


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_sdpa_backward_flop(grad_out_shape, query_shape, key_shape, value_shape, *args: Any, out_shape: Any = None,
                            **kwargs: Any) -> int:
    return sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


EXTRA_FLOP_FORMULAS: dict[Any, Callable[..., int]] = {}
if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu"):
    EXTRA_FLOP_FORMULAS[_aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flop
if hasattr(_aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
    EXTRA_FLOP_FORMULAS[_aten._scaled_dot_product_flash_attention_for_cpu_backward] = _cpu_sdpa_backward_flop


class _Counter(FlopCounterMode):
    """``FlopCounterMode`` with ``nn.MultiheadAttention``'s fused inference fast path turned off while
    counting: that path (``_native_multi_head_attention``, taken in eval mode without gradients, e.g.
    by open_clip's towers) is one op the counter has no formula for, so a frozen CLIP tower's
    attention and projections would count as zero. The slow path computes the same result."""

    def __enter__(self) -> _Counter:
        mha = getattr(torch.backends, "mha", None)
        self._fastpath = mha.get_fastpath_enabled() if mha is not None else None
        if mha is not None:
            mha.set_fastpath_enabled(False)
        return super().__enter__()

    def __exit__(self, *args: Any) -> Any:
        try:
            return super().__exit__(*args)
        finally:
            if self._fastpath is not None:
                torch.backends.mha.set_fastpath_enabled(self._fastpath)


def flop_counter() -> FlopCounterMode:
    """A ``FlopCounterMode`` that also counts the CPU attention kernels and ``nn.MultiheadAttention``
    in inference (use it as a context manager)."""
    return _Counter(display=False, custom_mapping=EXTRA_FLOP_FORMULAS)


def forward_flops(model: nn.Module, *inputs: Any, **kwargs: Any) -> int:
    """FLOPs of one forward pass of ``model`` on ``inputs`` (eval mode, no gradients)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), flop_counter() as counter:
            model(*inputs, **kwargs)
    finally:
        model.train(was_training)
    return int(counter.get_total_flops())


def training_flops(model: nn.Module, loss_fn: Callable[[Any], torch.Tensor], *inputs: Any) -> int:
    """FLOPs of one training step's forward and backward: ``loss_fn(model(*inputs)).backward()``."""
    with flop_counter() as counter:
        loss_fn(model(*inputs)).backward()
    model.zero_grad(set_to_none=True)
    return int(counter.get_total_flops())


def flops_by_module(model: nn.Module, *inputs: Any) -> dict[str, int]:
    """Forward FLOPs per submodule (flop-counter's module hierarchy, names relative to ``model``)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), flop_counter() as counter:
            model(*inputs)
    finally:
        model.train(was_training)
    flops: dict[str, int] = {}
    for name, per_op in counter.get_flop_counts().items():
        flops[name] = int(sum(per_op.values()))
    return flops
