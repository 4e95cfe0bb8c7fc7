"""Self-supervised pretraining of any timm ViT (or other timm backbone): `SimCLR`, `MoCoV3`, `DINO`.

They train on ``(views, labels)`` batches of `stacktrain.datamodules.MultiViewDataModule` (labels
unused) and report a weighted k-NN accuracy of the frozen backbone features every validation epoch,
``val/knn_acc`` (torchmetrics): the bank is the un-augmented training set, the queries the validation
set, both given by the same data module. The objectives are in `stacktrain.functional.contrastive`.

EMA teachers / momentum encoders are deep copies made at construction and frozen, so a technique that
looks for "the trainable ViT" (`stacktrain.callbacks.TokenDropout`) finds the student backbone and the
teacher keeps seeing full sequences. Teachers are updated at the start of each training step, from
the weights the previous optimizer step produced (the same sequence of updates as updating right
after each optimizer step).

Token dropout is asymmetric by default, as in the paper (Lin et al. 2024): ``token_dropout_views="one"``
sends the first global view through the student backbone with token dropout and the second with all of
its tokens (`stacktrain.functional.token_dropout.suspend_token_dropout`); patch scaling applies to both. The
two backbone calls' features are concatenated before the projector / head, so the heads (and their
BatchNorm) see the same batch as with one call. ``"both"`` drops tokens of every view in one backbone
call. With no token dropout in the backbone (no `TokenDropout`, or keep ratio 1) both settings make the
same single call.
"""

from __future__ import annotations

import abc
import copy
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from torchmetrics.classification import MulticlassAccuracy

from stacktrain.errors import StackError, require_choice, require_number
from stacktrain.functional.contrastive import (
    DINOHead,
    bn_mlp,
    cosine_momentum,
    dino_loss,
    ema_update,
    knn_predict,
    koleo_loss,
    moco_contrastive_loss,
    nt_xent_loss,
)
from stacktrain.functional.token_dropout import token_dropout_active, suspend_token_dropout
from stacktrain.lightning_modules.classifier import check_data_matches
from stacktrain.models import create_timm_model
from stacktrain.optim import configure_optimization, weight_decay_groups
from stacktrain.stack import compile_for_stack

__all__ = ["ContrastiveLearner", "SimCLR", "MoCoV3", "DINO", "TOKEN_DROPOUT_VIEWS"]

#: choices of ``token_dropout_views``
TOKEN_DROPOUT_VIEWS: tuple[str, ...] = ("one", "both")


class ContrastiveLearner(LightningModule, abc.ABC):
    """Shared part of the SSL modules: the backbone, the optimizer, the data checks and the k-NN evaluation.

    Args:
        model_name: any timm model (a ViT for token dropout), built with ``num_classes=0`` (features).
        in_chans: input channels (1 for grayscale digits).
        model_kwargs: more ``timm.create_model`` arguments (``img_size``, ``patch_size``, ``embed_dim``...).
        pretrained: a local weights file for the backbone.
        num_classes: classes of the labelled data, for the k-NN evaluation only.
        knn_k: neighbours of the k-NN evaluation.
        knn_temperature: temperature of the k-NN vote weights.
        optimizer: optimizer factory (default AdamW).
        lr_scheduler: optional scheduler factory (e.g. OneCycleLR: warmup + cosine).
        scheduler_interval: step the scheduler every optimizer "step" or every "epoch".
        compile: ``torch.compile`` the network (in place, in ``configure_model``, after the
            techniques' setup); a technique that cannot be compiled says so before the first batch.
        compile_options: keyword arguments of ``torch.compile`` (``backend``, ``mode``, ``dynamic``...).
        token_dropout_views: which global views token dropout (`stacktrain.callbacks.TokenDropout`)
            shortens. ``"one"`` (default, the paper's asymmetric dropout): the first view goes through the
            backbone with dropout, the other(s) with every token, in a second backbone call; patch scaling
            applies to all of them, and the cost report counts what ran (the dropped view at the keep
            ratio, the others at full length, all at the patch scale). ``"both"``: every global view
            dropped, in one backbone call. The dropped view is always view 0, not alternated: the
            global views are drawn independently from one augmentation distribution
            (`stacktrain.datamodules.MultiViewDataModule`) and the losses are symmetric in the views,
            so which one is dropped makes no difference in expectation, and the fixed choice is the
            simplest (nothing to derive from the step). A data module whose views came from different
            augmentations (BYOL-style) would tie dropout to one of them: alternate the view then.
    """

    #: global (full-size) views the objective needs per image
    required_views = 2

    def __init__(
        self,
        model_name: str = "vit_tiny_patch16_224",
        in_chans: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        pretrained: str | None = None,
        num_classes: int = 10,
        knn_k: int = 20,
        knn_temperature: float = 0.07,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
        compile: bool = False,
        compile_options: dict[str, Any] | None = None,
        token_dropout_views: Literal["one", "both"] = "one",
    ) -> None:
        super().__init__()
        source = type(self).__name__
        require_choice(token_dropout_views, "token_dropout_views", TOKEN_DROPOUT_VIEWS, source=source)
        require_number(num_classes, "num_classes", source=source, low=2, integer=True)
        require_number(knn_k, "knn_k", source=source, low=1, integer=True)
        require_number(knn_temperature, "knn_temperature", source=source, low=0.0, low_inclusive=False)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.backbone = create_timm_model(
            model_name, num_classes=0, in_chans=in_chans, pretrained=pretrained, model_kwargs=model_kwargs,
            source=source,
        )
        self.feature_dim = int(self.backbone.num_features)
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self.token_dropout_views = token_dropout_views
        self.knn_accuracy = MulticlassAccuracy(num_classes=num_classes, average="micro")
        self.global_views = 2
        self._features: dict[str, list[torch.Tensor]] = {}

    # ----------------------------------------------------------------------------------- checks
    def setup(self, stage: str) -> None:
        check_data_matches(self, self.backbone, self.hparams.num_classes, uses_classes="the k-NN evaluation expects")
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if datamodule is None or stage != "fit":
            return
        source = type(self).__name__
        self.global_views = int(getattr(datamodule, "global_views", 0))
        if self.global_views < self.required_views:
            raise StackError(
                f"needs {self.required_views} augmented views of each training image, but the data module "
                f"{type(datamodule).__name__} gives (images, labels) batches"
                + (f" with {self.global_views} views" if self.global_views else ""),
                source=source, key="data", value=type(datamodule).__name__,
                fix="wrap the data module: data: {class_path: stacktrain.datamodules.MultiViewDataModule, "
                    "init_args: {base: <your data module>, global_views: 2}}",
            )
        sizes = getattr(datamodule, "view_sizes", [])
        if len({tuple(s) for s in sizes}) > 1 and not _accepts_any_size(self.backbone):
            raise StackError(
                f"the data has views of several sizes {sorted({tuple(s) for s in sizes})} (multi-crop) but the "
                "backbone takes one image size",
                source=source, key="model.init_args.model_kwargs.dynamic_img_size", value=False,
                fix="set model.init_args.model_kwargs.dynamic_img_size: true (timm ViT), or local_views: 0",
            )

    def configure_model(self) -> None:
        """Compile the student backbone (the network that trains and that TokenDropout shortens) here, as
        Lightning recommends: after every ``setup`` and before the first batch."""
        if self.hparams.get("compile", False):
            compile_for_stack(self.backbone, self._trainer, self.hparams.get("compile_options"),
                              source=type(self).__name__)

    # ----------------------------------------------------------------------------------- training
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Backbone features (what the k-NN evaluation and downstream tasks use)."""
        return self.backbone(images)

    def encode_global_views(self, views: list[torch.Tensor]) -> torch.Tensor:
        """Student backbone features of the global ``views``, concatenated in view order (the rows of
        ``backbone(torch.cat(views))``). With ``token_dropout_views="one"`` and token dropout active,
        view 0 goes through the backbone with dropout and the rest in a second call without it (patch
        scaling on in both); otherwise one call."""
        if self.token_dropout_views == "both" or len(views) < 2 or not token_dropout_active(self.backbone):
            return self.backbone(torch.cat(views))
        dropped = self.backbone(views[0])
        with suspend_token_dropout(self.backbone):
            full = self.backbone(torch.cat(views[1:]))
        return torch.cat((dropped, full))

    @abc.abstractmethod
    def objective(self, views: list[torch.Tensor]) -> torch.Tensor:
        """The self-supervised loss of one batch of views (global views first)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        views, _ = batch
        loss = self.objective(list(views))
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        return loss

    def configure_optimizers(self) -> Any:
        return configure_optimization(self, self.optimizer_factory, self.scheduler_factory, self.scheduler_interval,
                                      params=weight_decay_groups(self))

    def total_steps(self) -> int:
        """Optimizer steps of the run (for momentum and temperature schedules)."""
        trainer = self.trainer
        if trainer.max_steps and trainer.max_steps > 0:
            return int(trainer.max_steps)
        total = trainer.estimated_stepping_batches
        return int(total) if total != float("inf") else 1

    def _gather(self, tensor: torch.Tensor, sync_grads: bool = False) -> tuple[torch.Tensor | None, int]:
        """All ranks' rows of ``tensor`` and this rank's offset in them (``None`` on one process)."""
        if self.trainer.world_size <= 1:
            return None, 0
        gathered = self.all_gather(tensor, sync_grads=sync_grads)
        return gathered.flatten(0, 1), self.trainer.global_rank * tensor.shape[0]

    # ----------------------------------------------------------------------------------- k-NN
    def _collect(self, batch: Any, dataloader_idx: int, loaders: int) -> None:
        images, labels = batch
        role = "bank" if loaders > 1 and dataloader_idx == 0 else "query"
        self._features.setdefault(role, []).append(self.backbone(images).float())
        self._features.setdefault(f"{role}_labels", []).append(labels)

    def validation_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(batch, dataloader_idx, len(self.trainer.num_val_batches))

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._collect(batch, dataloader_idx, len(self.trainer.num_test_batches))

    def on_validation_epoch_start(self) -> None:
        self._features = {}

    def on_test_epoch_start(self) -> None:
        self._features = {}

    def on_validation_epoch_end(self) -> None:
        self._log_knn("val")

    def on_test_epoch_end(self) -> None:
        self._log_knn("test")

    def _log_knn(self, prefix: str) -> None:
        features, self._features = self._features, {}
        if not features.get("query"):
            return
        queries, query_labels = torch.cat(features["query"]), torch.cat(features["query_labels"])
        exclude_self = "bank" not in features
        if exclude_self:
            rank_zero_warn(f"{type(self).__name__}: no feature bank loader; k-NN within the {prefix} set itself "
                           "(leave-one-out). Use MultiViewDataModule for the training-set bank.")
            bank, bank_labels = queries, query_labels
        else:
            bank, bank_labels = torch.cat(features["bank"]), torch.cat(features["bank_labels"])
        if self.trainer.world_size > 1:
            bank = self.all_gather(bank).flatten(0, 1)
            bank_labels = self.all_gather(bank_labels).flatten(0, 1)
            if exclude_self:
                exclude_self = False  # the local queries' rows are somewhere in the gathered bank
                rank_zero_warn("leave-one-out k-NN under DDP counts each query's own feature")
        scores = knn_predict(queries, bank, bank_labels, self.hparams.num_classes, self.hparams.knn_k,
                             self.hparams.knn_temperature,
                             exclude_self=exclude_self)
        self.knn_accuracy.update(scores.argmax(dim=1), query_labels)
        accuracy = self.knn_accuracy.compute()
        self.knn_accuracy.reset()
        self.log(f"{prefix}/knn_acc", accuracy, prog_bar=True)


def _accepts_any_size(backbone: nn.Module) -> bool:
    return bool(getattr(backbone, "dynamic_img_size", False)) or not hasattr(backbone, "patch_embed")


class SimCLR(ContrastiveLearner):
    """SimCLR (Chen et al. 2020): both views through the backbone and a BN-MLP projector, NT-Xent loss.
    Under token dropout, by default view 0 is dropped and view 1 keeps its tokens
    (``token_dropout_views``); the projector sees both views' features in one batch either way.

    Args:
        projection_dim: output size of the projector.
        hidden_dim: hidden size of the projector.
        projector_layers: linear layers of the projector.
        temperature: NT-Xent temperature.
        gather_distributed: under DDP, use the other ranks' embeddings as negatives too (with gradients),
            so 2 processes x B behave like one process with 2B.
        **kwargs: `ContrastiveLearner` arguments (backbone, optimizer, k-NN).
    """

    def __init__(self, projection_dim: int = 128, hidden_dim: int = 512, projector_layers: int = 2,
                 temperature: float = 0.2, gather_distributed: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        require_number(temperature, "temperature", source="SimCLR", low=0.0, low_inclusive=False)
        self.projector = bn_mlp(self.feature_dim, hidden_dim, projection_dim, projector_layers)
        self.temperature = temperature
        self.gather_distributed = gather_distributed

    def objective(self, views: list[torch.Tensor]) -> torch.Tensor:
        z1, z2 = self.projector(self.encode_global_views(views[:2])).chunk(2)
        if self.gather_distributed:
            z1_all, offset = self._gather(z1, sync_grads=True)
            z2_all, _ = self._gather(z2, sync_grads=True)
            return nt_xent_loss(z1, z2, self.temperature, z1_all, z2_all, offset)
        return nt_xent_loss(z1, z2, self.temperature)


class MoCoV3(ContrastiveLearner):
    """MoCo v3 (Chen, Xie, He 2021): a query encoder (backbone, projector, predictor) against a momentum
    encoder (EMA of backbone and projector), symmetric InfoNCE, keys of all ranks as negatives.
    Under token dropout the query encoder's backbone takes view 0 dropped and view 1 full by default
    (``token_dropout_views``); the momentum encoder sees both full sequences, as without token dropout.

    Args:
        projection_dim: output size of projector and predictor.
        hidden_dim: hidden size of projector and predictor.
        temperature: InfoNCE temperature (0.2 for ViTs in the paper).
        base_momentum: EMA momentum at the start, rising to 1 along a half cosine.
        **kwargs: `ContrastiveLearner` arguments.
    """

    def __init__(self, projection_dim: int = 128, hidden_dim: int = 512, temperature: float = 0.2,
                 base_momentum: float = 0.99, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        require_number(temperature, "temperature", source="MoCoV3", low=0.0, low_inclusive=False)
        require_number(base_momentum, "base_momentum", source="MoCoV3", low=0.0, high=1.0)
        self.projector = bn_mlp(self.feature_dim, hidden_dim, projection_dim, layers=3, last_bn=True)
        self.predictor = bn_mlp(projection_dim, hidden_dim, projection_dim, layers=2, last_bn=False)
        self.momentum_backbone = _frozen_copy(self.backbone)
        self.momentum_projector = _frozen_copy(self.projector)
        self.temperature = temperature
        self.base_momentum = base_momentum

    def objective(self, views: list[torch.Tensor]) -> torch.Tensor:
        momentum = cosine_momentum(self.trainer.global_step, self.total_steps(), self.base_momentum)
        ema_update(self.momentum_backbone, self.backbone, momentum)
        ema_update(self.momentum_projector, self.projector, momentum)
        q1, q2 = self.predictor(self.projector(self.encode_global_views(views[:2]))).chunk(2)
        with torch.no_grad():
            k1, k2 = self.momentum_projector(self.momentum_backbone(torch.cat(views[:2]))).chunk(2)
        k1_all, offset = self._gather(k1)
        k2_all, _ = self._gather(k2)
        return (moco_contrastive_loss(q1, k2, self.temperature, k2_all, offset)
                + moco_contrastive_loss(q2, k1, self.temperature, k1_all, offset))


class DINO(ContrastiveLearner):
    """DINO (Caron et al. 2021): a student (backbone + DINO head) matches an EMA teacher's centred,
    sharpened outputs across views; multi-crop when the data module gives local views (the backbone
    then needs ``dynamic_img_size: true``).

    Under token dropout with ``token_dropout_views="one"`` (default) the student's global view 0 is
    dropped and the other global views and the local crops keep all of their tokens (patch scaling
    applies to all): the local crops are already short sequences (a quarter of the tokens at half the
    size), and the paper drops tokens of one view only. With ``"both"`` every student view, the local
    crops included, is dropped. The EMA teacher sees full global views either way.

    Args:
        out_dim: prototypes of the head's last layer.
        hidden_dim: hidden size of the head's MLP.
        bottleneck_dim: size before the prototypes.
        student_temperature: student softmax temperature.
        teacher_temperature: teacher softmax temperature (sharpening) after warm-up.
        warmup_teacher_temperature: teacher temperature at the start.
        teacher_temperature_warmup: fraction of training over which it rises linearly.
        center_momentum: EMA momentum of the centre of teacher outputs.
        base_momentum: teacher EMA momentum at the start, rising to 1 along a half cosine.
        freeze_last_layer_steps: optimizer steps during which the prototypes are not updated.
        head_batchnorm: BatchNorm in the head's hidden layers (the reference's ``use_bn``, `DINOHead`); for
            a small ViT it delays the collapse to a uniform teacher by ~50 steps but does not prevent it
            (``freeze_head_steps`` does).
        freeze_head_steps: optimizer steps during which the whole head (MLP and prototypes) keeps its
            random initialisation, the teacher's with it; ``freeze_last_layer_steps`` extended to the MLP, not in
            the reference. At small scale (a width-64 ViT, a few hundred steps) a trained head collapses within
            ~75 steps: its bottleneck output becomes the same for every image (the student's best answer to
            teacher targets that its other views cannot predict yet), the centred teacher turns uniform and
            the backbone gets no signal. A fixed random head cannot take that way out, so the loss can only
            fall by making the backbone's features of different views agree. More steps than the run's: fixed
            throughout.
        koleo_weight: weight of DINOv2's KoLeo regulariser (`koleo_loss`, 0.1 in DINOv2) on the student's
            backbone features of each global view; 0 for none (DINO). It spreads the class tokens, which
            for a small randomly initialised ViT are nearly the same for every image.
        **kwargs: `ContrastiveLearner` arguments.
    """

    def __init__(self, out_dim: int = 1024, hidden_dim: int = 512, bottleneck_dim: int = 128,
                 student_temperature: float = 0.1, teacher_temperature: float = 0.04,
                 warmup_teacher_temperature: float = 0.04, teacher_temperature_warmup: float = 0.0,
                 center_momentum: float = 0.9, base_momentum: float = 0.996, freeze_last_layer_steps: int = 0,
                 head_batchnorm: bool = False, freeze_head_steps: int = 0, koleo_weight: float = 0.0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        require_number(koleo_weight, "koleo_weight", source="DINO", low=0.0)
        require_number(freeze_head_steps, "freeze_head_steps", source="DINO", low=0, integer=True)
        for key, value in (("student_temperature", student_temperature), ("teacher_temperature", teacher_temperature),
                           ("warmup_teacher_temperature", warmup_teacher_temperature)):
            require_number(value, key, source="DINO", low=0.0, low_inclusive=False)
        require_number(teacher_temperature_warmup, "teacher_temperature_warmup", source="DINO", low=0.0, high=1.0)
        require_number(center_momentum, "center_momentum", source="DINO", low=0.0, high=1.0)
        require_number(base_momentum, "base_momentum", source="DINO", low=0.0, high=1.0)
        self.head = DINOHead(self.feature_dim, out_dim, hidden_dim, bottleneck_dim, batchnorm=head_batchnorm)
        self.teacher_backbone = _frozen_copy(self.backbone)
        self.teacher_head = _frozen_copy(self.head)
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.student_temperature = student_temperature
        self.teacher_temperature = teacher_temperature
        self.warmup_teacher_temperature = warmup_teacher_temperature
        self.teacher_temperature_warmup = teacher_temperature_warmup
        self.center_momentum = center_momentum
        self.base_momentum = base_momentum
        self.freeze_last_layer_steps = freeze_last_layer_steps
        self.koleo_weight = koleo_weight
        self.freeze_head_steps = freeze_head_steps

    def _encode_local_views(self, local: list[torch.Tensor]) -> torch.Tensor:
        """Student features of the local crops: with ``token_dropout_views="one"`` they keep every token
        (patch scaling still applies), with ``"both"`` they are dropped like the global views."""
        if self.token_dropout_views == "both":
            return self.backbone(torch.cat(local))
        with suspend_token_dropout(self.backbone):
            return self.backbone(torch.cat(local))

    def teacher_temperature_at(self, step: int) -> float:
        warmup = self.teacher_temperature_warmup * self.total_steps()
        if step >= warmup:
            return self.teacher_temperature
        return self.warmup_teacher_temperature + (self.teacher_temperature - self.warmup_teacher_temperature) * step / warmup

    def objective(self, views: list[torch.Tensor]) -> torch.Tensor:
        step = self.trainer.global_step
        momentum = cosine_momentum(step, self.total_steps(), self.base_momentum)
        ema_update(self.teacher_backbone, self.backbone, momentum)
        ema_update(self.teacher_head, self.head, momentum)
        n_global = self.global_views
        with torch.no_grad():
            teacher = self.teacher_head(self.teacher_backbone(torch.cat(views[:n_global]))).chunk(n_global)
        student_features = self.encode_global_views(views[:n_global])
        student = list(self.head(student_features).chunk(n_global))
        local = views[n_global:]
        if local:
            student += list(self.head(self._encode_local_views(local)).chunk(len(local)))
        loss = dino_loss(student, teacher, self.center, self.student_temperature, self.teacher_temperature_at(step))
        if self.koleo_weight > 0:
            # per global view, as DINOv2: the other view of the same image is not the nearest neighbour
            koleo = sum(koleo_loss(features) for features in student_features.chunk(n_global))
            self.log("train/koleo", koleo, on_step=True, on_epoch=False)
            loss = loss + self.koleo_weight * koleo
        self._update_center(torch.cat(teacher))
        return loss

    @torch.no_grad()
    def _update_center(self, teacher_output: torch.Tensor) -> None:
        batch_center = teacher_output.mean(dim=0, keepdim=True)
        batch_center = self.trainer.strategy.reduce(batch_center, reduce_op="mean")
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1 - self.center_momentum)

    def on_after_backward(self) -> None:
        step = self.trainer.global_step
        frozen = self.head if step < self.freeze_head_steps else (
            self.head.last_layer if step < self.freeze_last_layer_steps else None)
        if frozen is not None:
            for parameter in frozen.parameters():
                parameter.grad = None


def _frozen_copy(module: nn.Module) -> nn.Module:
    frozen = copy.deepcopy(module)
    for parameter in frozen.parameters():
        parameter.requires_grad = False
    return frozen
