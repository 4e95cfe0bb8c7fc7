"""`BoostedEarlyExit`: a timm backbone with exit heads, trained as BoostNet (or independently),
evaluated in anytime and budgeted-batch modes, predicting with a FLOPs budget by really exiting."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_warn

from stacktrain.errors import StackError, require_choice, require_number
from stacktrain.functional.early_exit import (
    DEFAULT_WEIGHT,
    FORMS,
    anytime_accuracy,
    apply_early_exit,
    budgeted_accuracy,
    confidences,
    ensemble_predictions,
    exit_losses,
    fit_budget,
)
from stacktrain.functional.early_exit_network import StagedBackbone
from stacktrain.models import check_input_shape
from stacktrain.optim import configure_optimization, weight_decay_groups
from stacktrain.stack import INFERENCE_FLOPS, ModuleTechnique, gather_per_rank, run_dir, unique_path

__all__ = ["BoostedEarlyExit"]


def _gather(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` (its last dimension may differ) from every rank, identically on all."""
    return torch.cat(gather_per_rank(tensor.cpu()), dim=-1)


class BoostedEarlyExit(ModuleTechnique):
    """Early-exit classifier on a timm backbone: BoostNet training, anytime and budgeted inference.

    Exit heads sit after chosen stages of the backbone (ResNet ``layer1..4``, ConvNeXt ``stages.N``,
    ViT ``blocks.N``; by name or index; default four spread over the backbone, the last at its end).
    With ``training="boost"`` (BoostNet) exit ``s`` predicts with the ensemble of heads ``1..s`` and
    its head learns the residual of the detached earlier ensemble; ``"independent"`` trains every head
    on its own (the classic baseline). The ensemble has the reference code's form by default
    (``G_s = f_s + w G_{s-1}``, ``w = 0.5``); see `stacktrain.functional.early_exit`.

    Validation logs every exit's accuracy (``val/acc_exit{k}``), the ensemble's (``val/acc_ensemble``)
    and fits one early-exit policy (confidence thresholds) per budget on the validation predictions;
    the policies live in buffers, so checkpoints carry them. Test logs anytime accuracy per exit and,
    for every budget, budgeted accuracy against the mean FLOPs actually spent (``test/acc_budget_<pct>``,
    ``test/flops_budget_<pct>``), with a plot in the run directory and W&B. ``predict`` runs the real
    early-exit loop at ``predict_budget``: samples that leave stop costing compute.

    Args:
        backbone: a timm model name (staged CNN or VisionTransformer).
        exits: exit points by name or index (see the error message for a backbone's points).
        num_classes: classes; must match the data.
        in_chans: input channels (1 for grayscale digits).
        backbone_kwargs: keyword arguments for ``timm.create_model`` (e.g. a ViT's img_size, depth).
        pretrained: local weights file for the backbone (timm's mechanism).
        training: "boost" (BoostNet) or "independent".
        ensemble: "reference" (``G_s = f_s + w G_{s-1}``, as SHI-Labs/Boosted-Dynamic-Networks) or
            "scaled" (``F_s = w (f_s + F_{s-1})``, stacktrain's first form).
        ensemble_weight: the ensemble's ``w`` (default 0.5 for "reference", 1.0 for "scaled").
        rescale_gradients: per-exit gradient equilibrium on the backbone.
        head_hidden: channels of the conv layer of intermediate CNN heads (0: linear heads).
        budgets: mean FLOPs per sample as fractions of the full network's (every stage and the last
            head, no intermediate heads), one exit policy fitted per budget.
        predict_budget: the budget ``predict`` uses (the closest fitted one not above it).
        input_shape: (C, H, W) of the images, when the data module does not tell (for FLOPs).
    """

    name = "early_exit"

    def __init__(
        self,
        backbone: str = "resnet18",
        exits: list[str | int] | None = None,
        num_classes: int = 10,
        in_chans: int | None = None,
        backbone_kwargs: dict[str, Any] | None = None,
        pretrained: str | None = None,
        training: Literal["boost", "independent"] = "boost",
        ensemble: Literal["reference", "scaled"] = "reference",
        ensemble_weight: float | None = None,
        rescale_gradients: bool = True,
        head_hidden: int = 128,
        budgets: Sequence[float] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 1.0),
        predict_budget: float = 0.5,
        input_shape: Sequence[int] | None = None,
        label_smoothing: float = 0.0,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["step", "epoch"] = "step",
    ) -> None:
        super().__init__()
        source = type(self).__name__
        require_choice(training, "model.init_args.training", ["boost", "independent"], source=source)
        require_number(num_classes, "model.init_args.num_classes", source=source, low=2, integer=True)
        require_choice(ensemble, "model.init_args.ensemble", list(FORMS), source=source)
        if ensemble_weight is not None:
            require_number(ensemble_weight, "model.init_args.ensemble_weight", source=source, low=0.0,
                           low_inclusive=False)
        require_number(head_hidden, "model.init_args.head_hidden", source=source, low=0, integer=True)
        if isinstance(budgets, (str, bytes)) or not isinstance(budgets, Sequence) or len(budgets) == 0:
            raise StackError("must be a non-empty list of FLOPs fractions", source=source,
                             key="model.init_args.budgets", value=budgets, fix="pass e.g. budgets: [0.3, 0.5, 1.0]")
        for budget in budgets:
            require_number(budget, "model.init_args.budgets", source=source, low=0.0, high=1.0, low_inclusive=False)
        budgets = sorted(float(b) for b in budgets)
        require_number(predict_budget, "model.init_args.predict_budget", source=source, low=0.0, high=1.0,
                       low_inclusive=False)
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.network = apply_early_exit(backbone, num_classes, exits, head_hidden=head_hidden or None,
                                        rescale_gradients=rescale_gradients, in_chans=in_chans, pretrained=pretrained,
                                        model_kwargs=backbone_kwargs, source=source)
        self.num_exits = self.network.num_exits
        self.exit_names = self.network.backbone.exit_names
        self.mode = training
        self.form = ensemble
        weight = DEFAULT_WEIGHT[ensemble] if ensemble_weight is None else float(ensemble_weight)
        self.weights = [weight] * self.num_exits
        self.optimizer_factory = optimizer
        self.scheduler_factory = lr_scheduler
        self.scheduler_interval = scheduler_interval
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        # Persistent buffers: checkpoints carry the measured costs and the fitted exit policies.
        self.register_buffer("segment_flops", torch.zeros(self.num_exits, dtype=torch.float64))
        self.register_buffer("head_flops", torch.zeros(self.num_exits, dtype=torch.float64))
        self.register_buffer("budgets", torch.tensor(budgets, dtype=torch.float64))
        self.register_buffer("thresholds", torch.full((len(budgets), self.num_exits), float("nan")))
        self._outputs: list[tuple[torch.Tensor, ...]] = []
        self._warned_budgets: set[float] = set()

    # ------------------------------------------------------------------------------------ costs
    @property
    def backbone(self) -> StagedBackbone:
        return self.network.backbone

    @property
    def exit_costs(self) -> torch.Tensor:
        """FLOPs per sample of leaving at each exit: every segment and head up to it."""
        return torch.cumsum(self.segment_flops, 0) + torch.cumsum(self.head_flops, 0)

    @property
    def full_flops(self) -> float:
        """FLOPs per sample of the plain network: every segment and the last head only."""
        return float(self.segment_flops.sum() + self.head_flops[-1])

    def measure_costs(self, image_shape: Sequence[int]) -> None:
        segments, heads = self.network.exit_costs(image_shape)
        self.segment_flops.copy_(segments)
        self.head_flops.copy_(heads)

    def setup(self, stage: str) -> None:
        from stacktrain.lightning_modules.classifier import check_data_matches

        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        shape = getattr(datamodule, "image_shape", None) or self.input_shape
        check_data_matches(self, self.network, self.hparams.num_classes)
        if shape is None:
            raise StackError(
                "is unknown, so the FLOPs of each exit cannot be measured", source=type(self).__name__,
                key="model.init_args.input_shape", value=None, fix="set input_shape: [C, H, W] or use a stacktrain data module",
            )
        check_input_shape(self.network, shape, source=type(self).__name__)
        self._cost_shape = tuple(int(v) for v in shape)
        if float(self.segment_flops.sum()) == 0.0:
            self.measure_costs(shape)

    def on_parameters_replaced(self, keep: Any) -> None:
        """A technique removed channels (PruneRegrow's compaction): measure the exits' FLOPs again, so
        exit policies, budgets, reports and checkpoints use the real costs."""
        shape = getattr(self, "_cost_shape", None)
        if shape is not None:
            self.measure_costs(shape)

    # ------------------------------------------------------------------------------------ model
    def forward(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Raw logits of every exit head."""
        return self.network(images)

    def predictions(self, head_logits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return ensemble_predictions(head_logits, self.mode, self.weights, self.form)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, labels = batch
        losses = exit_losses(self(images), labels, self.mode, self.weights, self.hparams.label_smoothing, self.form)
        loss = torch.stack(losses).sum()
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        for index, exit_loss in enumerate(losses):
            self.log(f"train/loss_exit{index}", exit_loss, on_step=True, on_epoch=False)
        return loss

    def _collect(self, batch: Any) -> tuple[list[torch.Tensor], torch.Tensor]:
        images, labels = batch
        head_logits = self(images)
        predictions = self.predictions(head_logits)
        confidence, predicted = confidences(predictions)
        ensemble = torch.stack([p.float().softmax(-1) for p in predictions]).mean(0).argmax(-1)
        self._outputs.append((confidence.cpu(), predicted.cpu(), labels.cpu(), ensemble.cpu()))
        return head_logits, labels

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        confidence = torch.cat([o[0] for o in self._outputs], dim=1).to(self.device)
        predicted = torch.cat([o[1] for o in self._outputs], dim=1).to(self.device)
        labels = torch.cat([o[2] for o in self._outputs]).to(self.device)
        ensemble = torch.cat([o[3] for o in self._outputs]).to(self.device)
        self._outputs = []
        return _gather(confidence).cpu(), _gather(predicted).cpu(), _gather(labels).cpu(), _gather(ensemble).cpu()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        head_logits, labels = self._collect(batch)
        losses = exit_losses(head_logits, labels, self.mode, self.weights, form=self.form)
        self.log("val/loss", torch.stack(losses).sum(), on_epoch=True, sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._collect(batch)

    def on_validation_epoch_start(self) -> None:
        self._outputs = []

    on_test_epoch_start = on_validation_epoch_start

    def _log_anytime(self, prefix: str, confidence, predicted, labels, ensemble) -> torch.Tensor:
        accuracy = anytime_accuracy(predicted, labels)
        # Gathered over ranks already: every rank logs the same values.
        for index, value in enumerate(accuracy):
            self.log(f"{prefix}/acc_exit{index}", float(value), sync_dist=True)
        self.log(f"{prefix}/acc", float(accuracy[-1]), prog_bar=True, sync_dist=True)
        ensemble_accuracy = float(accuracy[-1]) if self.mode == "boost" else float((ensemble == labels).float().mean())
        self.log(f"{prefix}/acc_ensemble", ensemble_accuracy, sync_dist=True)
        return accuracy

    def on_validation_epoch_end(self) -> None:
        if not self._outputs:
            return
        confidence, predicted, labels, ensemble = self._gathered()
        self._log_anytime("val", confidence, predicted, labels, ensemble)
        if self.trainer.sanity_checking:
            return
        costs = self.exit_costs.cpu()
        full = self.full_flops
        cheapest = float(costs[0]) / full
        for row, budget in enumerate(self.budgets.tolist()):
            if budget < cheapest and budget not in self._warned_budgets:
                self._warned_budgets.add(budget)
                rank_zero_warn(
                    f"BoostedEarlyExit: budget {budget:.2f} is below the cheapest exit policy ({cheapest:.2f} of the "
                    f"full network: every sample at the first exit); its policy spends {cheapest:.2f}"
                )
            thresholds = fit_budget(confidence, costs, budget * full)
            self.thresholds[row] = thresholds.to(self.thresholds)
            accuracy, cost, _ = budgeted_accuracy(confidence, predicted, labels, thresholds, costs)
            self.log(f"val/acc_budget_{round(budget * 100)}", accuracy, sync_dist=True)
            self.log(f"val/flops_budget_{round(budget * 100)}", cost / full, sync_dist=True)
        _, cost, _ = budgeted_accuracy(confidence, predicted, labels, self.policy(self.hparams.predict_budget), costs)
        self.report_cost(INFERENCE_FLOPS, baseline=full, actual=cost, unit="FLOP", replace=True)

    def policy(self, budget: float) -> torch.Tensor:
        """The fitted thresholds for the largest budget not above ``budget`` (the smallest if all are)."""
        budgets = self.budgets.tolist()
        if torch.isnan(self.thresholds).all():
            raise StackError(
                "has not been fitted: thresholds come from a validation pass", source=type(self).__name__,
                key="exit policy", value=None, fix="train with validation (or run trainer.validate) before budgeted inference",
            )
        row = max([i for i, b in enumerate(budgets) if b <= budget + 1e-9], default=0)
        return self.thresholds[row]

    def on_test_epoch_end(self) -> None:
        if not self._outputs:
            return
        confidence, predicted, labels, ensemble = self._gathered()
        self._log_anytime("test", confidence, predicted, labels, ensemble)
        if torch.isnan(self.thresholds).all():
            return
        costs, full = self.exit_costs.cpu(), self.full_flops
        curve = []
        for row, budget in enumerate(self.budgets.tolist()):
            accuracy, cost, shares = budgeted_accuracy(confidence, predicted, labels, self.thresholds[row].cpu(), costs)
            self.log(f"test/acc_budget_{round(budget * 100)}", accuracy, sync_dist=True)
            self.log(f"test/flops_budget_{round(budget * 100)}", cost / full, sync_dist=True)
            curve.append((budget, cost / full, accuracy))
        self.budget_curve = curve
        if self.trainer.is_global_zero:
            self._plot_curve(curve, anytime_accuracy(predicted, labels))

    def _plot_curve(self, curve: list[tuple[float, float, float]], anytime: torch.Tensor) -> None:
        from matplotlib.figure import Figure

        figure = Figure(figsize=(5, 4), dpi=100)
        axis = figure.subplots()
        axis.plot([c[1] for c in curve], [c[2] for c in curve], marker="o", label=f"budgeted ({self.mode})")
        exit_cost = (self.exit_costs / self.full_flops).tolist()
        axis.plot(exit_cost, anytime.tolist(), marker="s", linestyle="--", label="each exit (anytime)")
        axis.set_xlabel("mean FLOPs per sample / full network")
        axis.set_ylabel("test accuracy")
        axis.legend()
        axis.set_title(f"{self.hparams.backbone}: accuracy vs compute")
        figure.tight_layout()
        directory = run_dir(self.trainer)
        os.makedirs(directory, exist_ok=True)
        path = unique_path(os.path.join(directory, "early_exit_budget.png"))
        figure.savefig(path)
        self.budget_plot = path
        from lightning.pytorch.loggers import WandbLogger

        for logger in self.trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_table(key="early_exit/budget_curve", columns=["budget", "flops_ratio", "accuracy"],
                                 data=[list(c) for c in curve])
                logger.log_image(key="early_exit/budget_plot", images=[path])

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor]:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        thresholds = self.policy(self.hparams.predict_budget).to(images.device)
        predictions, exits, confidence = self.network.early_exit(images, thresholds, self.mode, self.weights, self.form)
        return {"preds": predictions, "exits": exits, "confidence": confidence,
                "flops": self.exit_costs.to(images.device)[exits]}

    def early_exit(self, images: torch.Tensor, budget: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(predictions, exit index)`` of the real early-exit loop at ``budget`` (default predict_budget)."""
        thresholds = self.policy(self.hparams.predict_budget if budget is None else budget).to(images.device)
        predictions, exits, _ = self.network.early_exit(images, thresholds, self.mode, self.weights, self.form)
        return predictions, exits

    def configure_optimizers(self) -> Any:
        return configure_optimization(self, self.optimizer_factory, self.scheduler_factory, self.scheduler_interval,
                                      params=weight_decay_groups(self))
