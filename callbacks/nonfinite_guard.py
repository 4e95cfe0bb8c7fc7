"""`NonFiniteGuard`: an optimizer step whose gradients hold NaN or inf is skipped, warned about and
counted, instead of silently writing NaN into every weight; a run that keeps producing them stops.

Why our own guard: plain PyTorch and Lightning apply a NaN gradient (AdamW turns its moments and
then every weight into NaN, and training goes on printing ``loss=nan``). Lightning's
``detect_anomaly`` is a debugging tool (autograd anomaly mode, several times slower) that raises on
the first NaN; AMP's ``GradScaler`` skips such steps only under fp16 mixed precision. This guard
gives every precision the GradScaler's behaviour: skip the step, keep the weights and the optimizer
state as they were, and go on. ``stacktrain.cli`` attaches one to every run; in your own Trainer add
``NonFiniteGuard()`` to the callbacks.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from stacktrain.errors import StackError, require_number
from stacktrain.optim import all_finite

__all__ = ["NonFiniteGuard"]


class NonFiniteGuard(Callback):
    """Skip optimizer steps with non-finite gradients; stop after too many in a row.

    The decision reads the gradients the optimizer is about to apply: under DDP they are already
    averaged over the ranks (a NaN on one rank is a NaN on all), so every rank skips the same steps.
    A skipped step applies nothing: the gradients are set to ``None``, which every torch optimizer
    skips, so weights and optimizer state stay as they were; the learning-rate schedule and
    ``global_step`` advance as they do when AMP's scaler skips a step. Techniques' after-step work
    still runs on those finite weights (PruneRegrow's mask updates on their step schedule;
    GradientQuantization leaves non-finite values out of its residuals and its hypernetwork). Each skip warns with the running count and logs
    ``nonfinite/skipped_steps``. Under fp16 AMP the ``GradScaler`` already skips these steps (and
    lowers its scale), so the guard leaves them to it.

    Args:
        max_consecutive: stop the run with a `StackError` when this many optimizer steps in a row
            had non-finite gradients (the run has diverged); 0 stops on the first one.
        max_skipped_fraction: a run that finishes having skipped more than this fraction of its
            optimizer steps is not the planned run: `stacktrain.cli` exits with status 3 (not 0),
            after the summary line that says how many were skipped.
    """

    def __init__(self, max_consecutive: int = 10, max_skipped_fraction: float = 0.1) -> None:
        require_number(max_consecutive, "max_consecutive", source=type(self).__name__, low=0, integer=True,
                       fix="use an integer such as 10 (0 stops on the first non-finite gradient)")
        require_number(max_skipped_fraction, "max_skipped_fraction", source=type(self).__name__, low=0.0, high=1.0)
        self.max_consecutive = max_consecutive
        self.max_skipped_fraction = float(max_skipped_fraction)
        self.skipped_steps = 0
        self.consecutive = 0
        #: whether the step's micro-batch losses were all finite, as a tensor: read only on a skip
        self._loss_finite: torch.Tensor | None = None

    def too_many_skipped(self, steps: int) -> bool:
        """Whether more than ``max_skipped_fraction`` of ``steps`` optimizer steps were skipped."""
        return self.skipped_steps > self.max_skipped_fraction * max(steps, 0)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        # Last among the callbacks, so that techniques reading the gradients before the step
        # (GradientQuantization's hypernetwork) still see them.
        callbacks = list(trainer.callbacks)
        if callbacks and callbacks[-1] is not self:
            trainer.callbacks = [c for c in callbacks if c is not self] + [self]

    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: torch.Tensor) -> None:
        finite = torch.isfinite(loss.detach()).all()
        self._loss_finite = finite if self._loss_finite is None else self._loss_finite & finite

    def on_before_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        loss_finite_flag, self._loss_finite = self._loss_finite, None
        if getattr(trainer.precision_plugin, "scaler", None) is not None:
            return  # AMP's GradScaler skips non-finite steps itself
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads or bool(all_finite(grads)):
            self.consecutive = 0
            return
        loss_finite = loss_finite_flag is None or bool(loss_finite_flag)
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                parameter.grad = None
        self.skipped_steps += 1
        self.consecutive += 1
        what = "loss and gradients" if not loss_finite else "gradients"
        if self.consecutive > self.max_consecutive:
            raise StackError(
                f"{what} were not finite for {self.consecutive} optimizer steps in a row "
                f"(last at step {trainer.global_step}): training has diverged",
                source=type(self).__name__, key="loss", value=math.nan,
                fix="lower the learning rate, clip gradients (trainer.gradient_clip_val: 1.0), check the data "
                    "for NaN/inf values; trainer.detect_anomaly: true finds the operation that produced the NaN",
            )
        rank_zero_warn(
            f"stacktrain: NonFiniteGuard: non-finite {what} at step {trainer.global_step}: optimizer step "
            f"skipped, gradients not applied ({self.skipped_steps} skipped so far, {self.consecutive} in a row)"
        )
        pl_module.log("nonfinite/skipped_steps", float(self.skipped_steps), on_step=True, on_epoch=False)

    def state_dict(self) -> dict[str, Any]:
        return {"skipped_steps": self.skipped_steps, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped_steps = int(state_dict.get("skipped_steps", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))
