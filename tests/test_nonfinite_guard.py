"""`NonFiniteGuard` (callbacks/nonfinite_guard.py) on one process: a NaN loss skips its optimizer
step (weights, optimizer and technique state as they were), warns and counts; too many in a row stop
the run with a clear message; the CLI attaches it to every run. Under DDP: test_nonfinite_guard_ddp.py."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from conftest import CONFIGS, TINY_VIT, make_trainer
from stacktrain.callbacks import GradientQuantization, NonFiniteGuard, TokenDropout
from stacktrain.datamodules import DigitsDataModule
from stacktrain.errors import StackError
from stacktrain.lightning_modules import ImageClassifier

QUICKSTART = str(CONFIGS / "quickstart.yaml")


def digits(**kwargs: Any) -> DigitsDataModule:
    return DigitsDataModule(**{"batch_size": 16, **kwargs})


class NaNLossAt(ImageClassifier):
    """The tiny ViT whose loss is NaN at the global steps in ``nan_steps`` (a bad batch, an overflow)."""

    nan_steps: set[int] = set()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step in self.nan_steps else loss


def nan_model(steps: set[int]) -> NaNLossAt:
    NaNLossAt.nan_steps = set(steps)
    torch.manual_seed(0)
    return NaNLossAt("vit_tiny_patch16_224", in_chans=1, model_kwargs=dict(TINY_VIT))


class WeightsAtEachStep(Callback):
    """The flat weights at the start of every training batch, by global step."""

    def __init__(self) -> None:
        self.at: dict[int, torch.Tensor] = {}

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self.at[trainer.global_step] = torch.cat([p.detach().flatten() for p in pl_module.parameters()]).clone()


def train(tmp_path, model: Any, data: Any, callbacks: list[Callback], **kwargs: Any) -> Trainer:
    options = dict(max_steps=4, num_sanity_val_steps=0, limit_val_batches=0)
    options.update(kwargs)
    trainer = make_trainer(tmp_path, callbacks, **options)
    trainer.fit(model, datamodule=data)
    return trainer


def test_nan_loss_step_is_skipped_with_a_warning_and_a_count(tmp_path):
    """HANDLED: a NaN loss at step 1 skips that optimizer step (weights and AdamW state as they were),
    warns, counts, logs ``nonfinite/skipped_steps``, and the run goes on to its last step."""
    guard, weights = NonFiniteGuard(), WeightsAtEachStep()
    model = nan_model({1})
    with pytest.warns(UserWarning, match=r"non-finite loss and gradients at step 1: optimizer step skipped, "
                                         r"gradients not applied \(1 skipped so far, 1 in a row\)"):
        trainer = train(tmp_path, model, digits(), [guard, weights])
    assert trainer.global_step == 4 and guard.skipped_steps == 1 and guard.consecutive == 0
    assert float(trainer.callback_metrics["nonfinite/skipped_steps"]) == 1.0
    assert not torch.equal(weights.at[0], weights.at[1])  # step 0 trained
    assert torch.equal(weights.at[1], weights.at[2])  # step 1 was skipped
    assert not torch.equal(weights.at[2], weights.at[3])  # and training went on
    final = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert torch.isfinite(final).all()
    moments = [s["exp_avg"] for s in trainer.optimizers[0].state.values()]
    assert moments and all(torch.isfinite(m).all() for m in moments)
    assert guard.state_dict() == {"skipped_steps": 1, "consecutive": 0}


@pytest.mark.parametrize("compensation", ["error_feedback", "hypernet"])
def test_a_nan_step_in_a_stack_leaves_every_technique_finite(tmp_path, compensation):
    """HANDLED with techniques attached (TokenDropout + GradientQuantization): their after-step work
    runs on finite weights, and their state (error-feedback residuals, hypernetwork) stays finite."""
    guard = NonFiniteGuard()
    model = nan_model({1})
    techniques = [TokenDropout(keep_ratio=0.5), GradientQuantization(bits=4, compensation=compensation)]
    with pytest.warns(UserWarning, match="non-finite loss and gradients at step 1"):
        trainer = train(tmp_path, model, digits(), [guard, *techniques])
    assert trainer.global_step == 4 and guard.skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    states = [_tensors(technique.state_dict()) for technique in techniques]
    assert states[1], "GradientQuantization keeps tensors in its state"
    assert all(torch.isfinite(t.float()).all() for state in states for t in state)




def _tensors(state: Any) -> list[torch.Tensor]:
    if isinstance(state, torch.Tensor):
        return [state]
    if isinstance(state, dict):
        return [t for v in state.values() for t in _tensors(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors(v)]
    return []


def test_without_the_guard_a_nan_loss_poisons_every_weight(tmp_path):
    """Why the guard exists: plain Lightning applies the NaN gradient and AdamW spreads it to every weight."""
    model = nan_model({1})
    train(tmp_path, model, digits(), [])
    final = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    assert torch.isnan(final).all()


def test_a_run_that_keeps_producing_nan_stops_with_a_clear_message(tmp_path):
    guard = NonFiniteGuard(max_consecutive=2)
    model = nan_model(set(range(100)))
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(StackError) as info:
        train(tmp_path, model, digits(), [guard], max_steps=10)
    message = str(info.value)
    assert message.startswith("NonFiniteGuard: loss=nan loss and gradients were not finite for 3 optimizer steps in a row")
    assert "Fix: lower the learning rate" in message and "detect_anomaly" in message
    assert model.trainer.global_step == 2 and guard.skipped_steps == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_the_cli_attaches_the_guard_to_every_run(tmp_path):
    from stacktrain.cli import StackCLI

    cli = StackCLI(args=["--config", QUICKSTART, "--trainer.logger", "false",
                         "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert sum(isinstance(c, NonFiniteGuard) for c in cli.trainer.callbacks) == 1
    with pytest.raises(StackError, match=r"NonFiniteGuard: max_consecutive=-1 is out of range \[0, inf\]"):
        NonFiniteGuard(max_consecutive=-1)
