"""Attach stacktrain's techniques to an existing Lightning project: one line per callback.

The project below is a plain LightningModule with a plain torch DataLoader over scikit-learn's digits;
the only thing it takes from stacktrain is the callbacks. It trains two small models in sequence:

* a timm ViT with token dropout and 4-bit gradients::

      callbacks=[TokenDropout(keep_ratio=0.5), GradientQuantization(bits=4)]

* a small CNN whose channels are pruned and regrown under half its FLOPs, with 4-bit gradients::

      callbacks=[PruneRegrow(target_flops_ratio=0.5, update_unit="step"), GradientQuantization(bits=4)]

Run it (about a minute on one CPU core; ``--steps 3`` for a smoke test)::

    python examples/attach_to_existing.py [--steps 300]

Each technique logs under its own name (``token_dropout/keep_ratio``, ``grad_quant/rel_error_weights``,
``prune_regrow/flops_ratio`` ...) through the module's logger, like any ``self.log``.
"""

from __future__ import annotations

import argparse

import lightning.pytorch as pl
import timm
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from stacktrain.callbacks import GradientQuantization, PruneRegrow, TokenDropout


# ----------------------------------------------------------------------------- the existing project
def digits_loaders(batch_size: int = 64) -> tuple[DataLoader, DataLoader]:
    """sklearn's 8x8 digits, scaled to [0, 1] and resized to 16x16; 1,500 to train, the rest to validate."""
    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    labels = torch.tensor(digits.target)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    train, val = order[:1500], order[1500:]
    return (DataLoader(TensorDataset(images[train], labels[train]), batch_size=batch_size, shuffle=True),
            DataLoader(TensorDataset(images[val], labels[val]), batch_size=256))


class Classifier(pl.LightningModule):
    """Any classifier: cross-entropy, AdamW, accuracy on validation."""

    def __init__(self, net: nn.Module, lr: float = 3e-3) -> None:
        super().__init__()
        self.net = net
        self.lr = lr
        self.example_input_array = torch.zeros(1, 1, 16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        self.log("val/acc", (self(images).argmax(-1) == labels).float().mean(), prog_bar=True)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr, weight_decay=0.05)


def small_vit() -> nn.Module:
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, in_chans=1, img_size=16,
                             patch_size=4, embed_dim=64, depth=3, num_heads=4, mlp_ratio=2.0)


def small_cnn() -> nn.Module:
    def block(cin: int, cout: int) -> nn.Module:
        return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    return nn.Sequential(block(1, 32), block(32, 64), nn.MaxPool2d(2), block(64, 64), nn.MaxPool2d(2),
                         block(64, 128), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, 10))


def fit(net: nn.Module, callbacks: list[pl.Callback], steps: int, root: str) -> float:
    train, val = digits_loaders()
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, callbacks=callbacks, logger=False,
                         default_root_dir=root,  # the techniques' plots land here, not in the current directory
                         enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                         val_check_interval=min(steps, len(train)), num_sanity_val_steps=0)
    trainer.fit(Classifier(net), train, val)
    return float(trainer.callback_metrics["val/acc"])


# ----------------------------------------------------------------------------- adding the techniques
def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps per model")
    parser.add_argument("--root", default="runs/attach_to_existing", help="where the techniques write their plots")
    args = parser.parse_args(argv)
    pl.seed_everything(0)

    vit_accuracy = fit(small_vit(), [
        TokenDropout(keep_ratio=0.5),                       # drop half of the ViT's patch tokens in training
        GradientQuantization(bits=4),                       # 4-bit backward (and 4-bit DDP all-gather if asked)
    ], args.steps, args.root)

    prune = PruneRegrow(target_flops_ratio=0.5, update_unit="step", update_every=max(1, args.steps // 10))
    cnn_accuracy = fit(small_cnn(), [
        prune,                                              # CHEX: prune and regrow channels under half the FLOPs
        GradientQuantization(bits=4),
    ], args.steps, args.root)

    widths = prune.history[-1]["widths"] if prune.history else []
    print(f"ViT + TokenDropout + GradientQuantization: val/acc {vit_accuracy:.3f}")
    print(f"CNN + PruneRegrow + GradientQuantization: val/acc {cnn_accuracy:.3f}, "
          f"channels kept per layer {widths}, FLOPs ratio {prune.history[-1]['flops_ratio']:.2f}")
    return {"vit_acc": vit_accuracy, "cnn_acc": cnn_accuracy}


if __name__ == "__main__":
    main()
