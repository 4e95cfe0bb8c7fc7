"""stacktrain's functional API in plain PyTorch: no Trainer, no LightningModule, no callbacks.

Every technique's math lives in `stacktrain.functional` as plain torch functions and modules; this
script uses four of them in ordinary training loops on scikit-learn's digits:

1. token dropping: `apply_token_dropout` puts a token dropper (and patch scaling) into a timm
   ViT; ``dropout.set(keep_ratio, patch_scale)`` changes it between steps, eval sees every token;
2. gradient quantization: `fake_quantize` on one tensor, `apply_grad_quant` for a whole backward;
3. channel selection: `apply_prune_regrow` (a `ChannelPlan`: coupled channels from Torch-Pruning's
   dependency graph and the FLOPs of every layer), `explore_group` (CHEX prune and regrow),
   `compact_network` (remove them);
4. boosting ensemble: an `EarlyExitNetwork` from `apply_early_exit` trained with BoostNet's
   `exit_losses`, a confidence policy fitted for a FLOPs budget (`fit_budget`) and the real early-exit loop.

    python examples/functional_api.py [--steps 200]      # --steps 3 for a smoke test
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from stacktrain.functional.channel_selection import explore_group
from stacktrain.functional.compaction import compact_network
from stacktrain.functional.early_exit import (
    apply_early_exit, budgeted_accuracy, confidences, ensemble_predictions, exit_losses, fit_budget,
)
from stacktrain.functional.flops import forward_flops
from stacktrain.functional.grad_quant import apply_grad_quant
from stacktrain.functional.prune_regrow import apply_prune_regrow
from stacktrain.functional.quantize import fake_quantize, relative_error
from stacktrain.functional.token_dropout import apply_token_dropout


def digits() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """16x16 digits in [0, 1]: 1,500 to train, the rest to evaluate."""
    data = load_digits()
    images = F.interpolate(torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0, size=(16, 16),
                           mode="bilinear", align_corners=False)
    labels = torch.tensor(data.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    return images[order[:1500]], labels[order[:1500]], images[order[1500:]], labels[order[1500:]]


def batches(images: torch.Tensor, labels: torch.Tensor, steps: int, size: int = 64):
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        index = torch.randint(len(labels), (size,), generator=generator)
        yield images[index], labels[index]


def train(model: nn.Module, data, steps: int, loss_fn=None, lr: float = 3e-3, before_step=None) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    loss_fn = loss_fn or (lambda out, y: F.cross_entropy(out, y))
    model.train()
    for step, (images, labels) in enumerate(batches(data[0], data[1], steps)):
        if before_step is not None:
            before_step(step)
        optimizer.zero_grad()
        loss_fn(model(images), labels).backward()
        optimizer.step()


@torch.no_grad()
def accuracy(model: nn.Module, data) -> float:
    model.eval()
    return float((model(data[2]).argmax(-1) == data[3]).float().mean())


def token_dropping(data, steps: int) -> None:
    vit = timm.create_model("vit_tiny_patch16_224", num_classes=10, in_chans=1, img_size=16, patch_size=2,
                            embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0)
    dropout = apply_token_dropout(vit, patch_scaling=True)

    def schedule(step: int) -> None:
        # the first half: 8x8 -> 4x4 patch grid, then half of those 16 tokens; the second half: full
        dropout.set(*((0.5, 2) if step < steps // 2 else (1.0, 1)))

    train(vit, data, steps, before_step=schedule)
    cost = dropout.cost_model
    mean_cost = (cost.relative_cost(0.5, 2) * (steps // 2) + (steps - steps // 2)) / steps
    print(f"1. token dropping: tokens per training sample {cost.sequence(0.5, 2)[1]} instead of {cost.sequence()[1]} "
          f"for half of the steps, training FLOPs x{mean_cost:.2f}; val acc (full sequence) {accuracy(vit, data):.3f}")
    dropout.remove()  # the ViT is as it was (same state_dict keys throughout)


def quantization(data, steps: int) -> None:
    gradient = torch.randn(256, 64)
    for bits in (8, 4):
        error = relative_error(gradient, fake_quantize(gradient, bits, per_row=True))
        print(f"2. quantization: {bits}-bit, one scale per row, stochastic rounding: relative error {float(error):.3f}")
    model = nn.Sequential(nn.Flatten(), nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10))
    quantizer = apply_grad_quant(model, bits=4, targets="both")  # every backward through 4 bits
    train(model, data, steps)
    print(f"   MLP trained with a 4-bit backward: val acc {accuracy(model, data):.3f}, last relative error "
          f"weights {float(quantizer.mean_relative_error('weights')):.3f}")
    quantizer.remove()


def channel_selection(data, steps: int) -> None:
    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    cnn = nn.Sequential(block(1, 32), block(32, 64), nn.MaxPool2d(2), block(64, 64), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(64, 10))
    train(cnn, data, steps)
    example = torch.zeros(1, 1, 16, 16)
    plan = apply_prune_regrow(cnn, example)
    generator = torch.Generator().manual_seed(0)
    masks = []
    for index, group in enumerate(plan.groups):  # keep 40% of each group by CSS, regrow 10% by residual
        alive = torch.ones(group.num_units, dtype=torch.bool)
        keep = max(1, int(0.4 * group.num_units))
        masks.append(explore_group(plan.producer_matrix(cnn, index), alive, keep, keep + group.num_units // 10,
                                   generator))
    dense, dense_accuracy = forward_flops(cnn, example), accuracy(cnn, data)
    plan.apply_masks(cnn, masks)  # zero the pruned channels (training could go on like this)
    compact_network(cnn, plan, masks, example)  # ...or remove them, then fine-tune the smaller network
    train(cnn, data, max(1, steps // 2))
    print(f"3. channel selection: widths {[g.num_units for g in plan.groups]} -> {plan.widths(masks)}, "
          f"forward FLOPs {dense / 1e6:.2f}M -> {forward_flops(cnn, example) / 1e6:.2f}M; "
          f"val acc {dense_accuracy:.3f} dense, {accuracy(cnn, data):.3f} compacted and fine-tuned")


def boosting_ensemble(data, steps: int) -> None:
    network = apply_early_exit("test_resnet", 10, ["layer1", "layer2", "layer3", "layer4"], head_hidden=16, in_chans=1)
    train(network, data, steps, loss_fn=lambda logits, y: torch.stack(exit_losses(logits, y, "boost")).sum())
    segments, heads = network.exit_costs((1, 16, 16))
    exit_costs = torch.cumsum(segments, 0) + torch.cumsum(heads, 0)  # FLOPs of leaving at each exit
    full = float(segments.sum() + heads[-1])
    network.eval()
    with torch.no_grad():
        confidence, predicted = confidences(ensemble_predictions(network(data[2]), "boost"))
    thresholds = fit_budget(confidence, exit_costs, 0.8 * full)  # 80% of the full network's FLOPs
    acc, cost, shares = budgeted_accuracy(confidence, predicted, data[3], thresholds, exit_costs)
    predictions, exits, _ = network.early_exit(data[2], thresholds, "boost")  # really skips the work
    print(f"4. boosting ensemble: per-exit acc {[round(float((p == data[3]).float().mean()), 3) for p in predicted]}; "
          f"budget 0.8: acc {acc:.3f} at {cost / full:.2f} of the FLOPs, exits used {[round(s, 2) for s in shares.tolist()]}; "
          f"early-exit loop agrees: {bool((predictions == predicted.gather(0, exits[None])[0]).all())}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="training steps of each model")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    data = digits()
    token_dropping(data, args.steps)
    quantization(data, args.steps)
    channel_selection(data, args.steps)
    boosting_ensemble(data, args.steps)


if __name__ == "__main__":
    main()
