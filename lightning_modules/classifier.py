"""`ImageClassifier`: any timm model as a Lightning image classifier."""

from __future__ import annotations

from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from stacktrain.errors import StackError, require_number
from stacktrain.models import check_input_shape, create_timm_model
from stacktrain.optim import configure_optimization, weight_decay_groups
from stacktrain.stack import compile_for_stack

__all__ = ["ImageClassifier", "check_data_matches"]


def check_data_matches(module: LightningModule, model: nn.Module, num_classes: int,
                       uses_classes: str = "the model predicts") -> None:
    """Compare the model with the attached data module (``num_classes``, ``image_shape``) and raise
    `StackError` before training if they disagree. Data modules without these attributes are skipped.
    ``uses_classes`` says what needs ``num_classes`` in the message (e.g. a k-NN evaluation)."""
    trainer = module._trainer
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    if datamodule is None:
        return
    source = type(module).__name__
    data_classes = getattr(datamodule, "num_classes", None)
    if data_classes is not None and int(data_classes) != int(num_classes):
        raise StackError(
            f"{uses_classes} {num_classes} classes but the data has {data_classes}",
            source=source,
            key="model.init_args.num_classes",
            value=num_classes,
            fix=f"set model.init_args.num_classes: {data_classes}",
        )
    image_shape = getattr(datamodule, "image_shape", None)
    if image_shape is not None:
        check_input_shape(model, image_shape, source=source)


class ImageClassifier(LightningModule):
    """A timm model trained with cross-entropy; accuracy for train/val/test from torchmetrics.

    Batches are ``(images, labels)``. The optimizer and LR scheduler come from the config
    (LightningCLI ``OptimizerCallable`` / ``LRSchedulerCallable``); a scheduler that needs the
    length of training (OneCycleLR, CosineAnnealingLR, ...) gets it from the trainer.

    Args:
        model_name: any name from ``timm.list_models()``.
        num_classes: classes to predict; must match the data module.
        in_chans: input channels (1 for grayscale digits); timm's default (3) when None.
        model_kwargs: extra keyword arguments for ``timm.create_model`` (e.g. ``img_size``,
            ``patch_size``, ``embed_dim``, ``depth``, ``num_heads`` for a ViT).
        pretrained: a local weights file loaded with timm's mechanism (head and input
            channels adapted when they differ).
        label_smoothing: cross-entropy label smoothing.
        optimizer: optimizer factory (default AdamW).
        lr_scheduler: optional scheduler factory.
        scheduler_interval: step the scheduler every optimizer "step" or every "epoch".
        decay_norm_and_bias: also apply weight decay to norms, biases and tokens.
        compile: ``torch.compile`` the network (in place, in ``configure_model``, after the
            techniques' setup); a technique that cannot be compiled says so before the first batch.
        compile_options: keyword arguments of ``torch.compile`` (``backend``, ``mode``, ``dynamic``...).
    """

    def __init__(
        self,
        model_name: str = "resnet18",
        num_classes: int = 10,
        in_chans: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        pretrained: str | None = None,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        decay_norm_and_bias: bool = False,
        compile: bool = False,
        compile_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        source = type(self).__name__
        require_number(num_classes, "num_classes", source=source, low=2, integer=True)
        if in_chans is not None:
            require_number(in_chans, "in_chans", source=source, low=1, integer=True)
        require_number(label_smoothing, "label_smoothing", source=source, low=0.0, high=1.0, high_inclusive=False)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.model = create_timm_model(
            model_name, num_classes=num_classes, in_chans=in_chans, pretrained=pretrained,
            model_kwargs=model_kwargs, source=source,
        )
        self.criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self.train_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def setup(self, stage: str) -> None:
        check_data_matches(self, self.model, self.hparams.num_classes)

    def configure_model(self) -> None:
        """Compile here, as Lightning recommends: it runs after every ``setup`` (the techniques' modules
        and hooks are in place) and before the first batch."""
        if self.hparams.get("compile", False):
            compile_for_stack(self.model, self._trainer, self.hparams.get("compile_options"), source=type(self).__name__)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = self.criterion(logits, labels)
        self.train_acc(logits, labels)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _evaluate(self, batch: Any, metric: MulticlassAccuracy, prefix: str) -> None:
        images, labels = batch
        logits = self(images)
        metric(logits, labels)
        self.log(f"{prefix}/loss", self.criterion(logits, labels), on_epoch=True, sync_dist=True)
        self.log(f"{prefix}/acc", metric, on_epoch=True, prog_bar=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.val_acc, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, self.test_acc, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs = self(images).softmax(dim=-1)
        return {"probs": probs, "preds": probs.argmax(dim=-1)}

    def configure_optimizers(self) -> Any:
        groups = weight_decay_groups(self, exclude_norm_and_bias=not self.hparams.decay_norm_and_bias)
        return configure_optimization(
            self, self.optimizer_factory, self.scheduler_factory, self.scheduler_interval, params=groups
        )
