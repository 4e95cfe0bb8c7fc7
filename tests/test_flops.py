"""The shared FLOP counter: exact numbers on layers whose cost is known by hand."""

from __future__ import annotations

import torch
from torch import nn

from stacktrain.functional.flops import flop_counter, flops_by_module, forward_flops, training_flops


def test_linear_and_conv_flops_match_the_formulas():
    linear = nn.Linear(16, 8)
    assert forward_flops(linear, torch.randn(4, 16)) == 2 * 4 * 16 * 8
    conv = nn.Conv2d(3, 5, kernel_size=3, padding=1)
    assert forward_flops(conv, torch.randn(2, 3, 8, 8)) == 2 * 2 * 5 * 8 * 8 * 3 * 3 * 3


def test_training_flops_are_forward_plus_backward():
    linear = nn.Linear(16, 8)
    x = torch.randn(4, 16, requires_grad=True)
    total = training_flops(linear, lambda y: y.sum(), x)
    # forward (x @ W) + backward: grad wrt input and grad wrt weight, each the same size as forward
    assert total == 3 * 2 * 4 * 16 * 8
    assert linear.weight.grad is None


def test_flops_by_module_names_submodules():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    per_module = flops_by_module(model, torch.randn(3, 4))
    assert per_module["Global"] == 2 * 3 * (4 * 6 + 6 * 2)
    assert per_module["Sequential.0"] == 2 * 3 * 4 * 6 and per_module["Sequential.2"] == 2 * 3 * 6 * 2
    assert model.training


def test_cpu_fused_attention_is_counted():
    """On CPU, F.scaled_dot_product_attention runs a fused kernel that torch's registry leaves out;
    the shared counter adds it: QK^T and AV are 2 matmuls forward, 5 backward."""
    batch, heads, length, dim = 2, 3, 5, 4
    q, k, v = (torch.randn(batch, heads, length, dim, requires_grad=True) for _ in range(3))

    class Attention(nn.Module):
        def forward(self, q, k, v):
            return nn.functional.scaled_dot_product_attention(q, k, v)

    one_matmul = 2 * batch * heads * length * length * dim
    assert forward_flops(Attention(), q, k, v) == 2 * one_matmul
    assert training_flops(Attention(), lambda y: y.sum(), q, k, v) == 7 * one_matmul


def test_flop_counter_counts_multihead_attention_in_inference():
    attention = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    x = torch.zeros(2, 10, 32)
    with flop_counter() as training_count:
        attention(x, x, x, need_weights=False)
    with torch.no_grad(), flop_counter() as inference_count:
        attention(x, x, x, need_weights=False)
    assert inference_count.get_total_flops() == training_count.get_total_flops() > 0
    assert torch.backends.mha.get_fastpath_enabled()  # restored afterwards
