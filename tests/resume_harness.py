"""Exact resume: N steps uninterrupted vs. stop at step k, checkpoint, resume to N.

Every technique's tests use it::

    runs = stop_and_resume(make_module, make_data, make_callbacks, total=20, stop_at=7, root=tmp_path)
    assert_resumed_exactly(runs)

The stopped run saves its checkpoint with ``ModelCheckpoint(every_n_train_steps=k)`` inside the
training loop, as a pre-empted job would have it; the resumed run starts from a different global
seed, so whatever matches comes from the checkpoint.

By default the stopped run is configured with ``max_steps=k``. Anything scheduled over the length
of training (LR schedules, technique schedules that read ``estimated_stepping_batches``) then sees
another run; ``same_length=True`` configures the stopped run with ``max_steps=N`` and interrupts it
after step k instead, as a pre-empted job is.
"""

from __future__ import annotations

import glob
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

from conftest import make_trainer
from ddp_harness import assert_states_equal, technique_states


@dataclass
class ResumeRuns:
    uninterrupted: tuple[LightningModule, Trainer]
    resumed: tuple[LightningModule, Trainer]
    checkpoint: str


def _trainer(max_steps: int, callbacks: list[Callback], root: str, **kwargs: Any) -> Trainer:
    options = dict(max_steps=max_steps, limit_val_batches=0, num_sanity_val_steps=0,
                   enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks))
    options.update(kwargs)
    return make_trainer(root, callbacks, **options)


class StopAt(Callback):
    """Stops a run configured for more steps once ``step`` optimizer steps are done."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class SignalAt(Callback):
    """Sends ``signal_name`` to this process after optimizer step ``step``, as a scheduler's SIGTERM
    or a Ctrl-C would arrive; under DDP to every rank, or to ``only_rank`` alone."""

    def __init__(self, step: int, signal_name: str = "SIGTERM", only_rank: int | None = None) -> None:
        self.step = step
        self.signal_name = signal_name
        self.only_rank = only_rank

    def on_train_batch_end(self, trainer: Trainer, *args: Any) -> None:
        if trainer.global_step == self.step and self.only_rank in (None, trainer.global_rank):
            os.kill(os.getpid(), getattr(signal, self.signal_name))


def stop_and_resume(
    make_module: Callable[[], LightningModule],
    make_data: Callable[[], LightningDataModule],
    make_callbacks: Callable[[], list[Callback]],
    *,
    total: int,
    stop_at: int,
    root: str | os.PathLike,
    full_length: bool = False,
    **trainer_kwargs: Any,
) -> ResumeRuns:
    """``full_length=True``: the stopped run is configured for all ``total`` steps and stopped at
    ``stop_at``, as a pre-empted job is (needed when schedules take their length from the trainer:
    OneCycleLR, a technique's T_max); by default it is configured for ``stop_at`` steps."""
    root = str(root)
    seed_everything(0)
    full_module = make_module()
    full = _trainer(total, make_callbacks(), root, **trainer_kwargs)
    full.fit(full_module, make_data())

    seed_everything(0)
    ckpt_dir = os.path.join(root, "stopped")
    saver = ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=stop_at, save_top_k=-1)
    if full_length:
        stopped = _trainer(total, [*make_callbacks(), saver, StopAt(stop_at)], root, **trainer_kwargs)
    else:
        stopped = _trainer(stop_at, [*make_callbacks(), saver], root, **trainer_kwargs)
    stopped.fit(make_module(), make_data())
    checkpoints = glob.glob(os.path.join(ckpt_dir, f"*step={stop_at}*.ckpt"))
    assert len(checkpoints) == 1, checkpoints

    seed_everything(12345)  # anything that matches must come from the checkpoint
    resumed_module = make_module()
    resumed = _trainer(total, make_callbacks(), root, **trainer_kwargs)
    resumed.fit(resumed_module, make_data(), ckpt_path=checkpoints[0])
    return ResumeRuns((full_module, full), (resumed_module, resumed), checkpoints[0])


def assert_resumed_exactly(runs: ResumeRuns) -> None:
    (full_module, full), (resumed_module, resumed) = runs.uninterrupted, runs.resumed
    assert full.global_step == resumed.global_step
    assert_states_equal(full_module.state_dict(), resumed_module.state_dict(), "weights")
    assert_states_equal(technique_states(full), technique_states(resumed), "technique state")


def load_checkpoint_weights_only(path: str) -> dict[str, Any]:
    """The checkpoint loads without unpickling arbitrary objects (``weights_only=True``)."""
    return torch.load(path, weights_only=True, map_location="cpu")
