"""`RunGuard`: what a scheduler and a resumed run need from a training run, in one thin callback
(`stacktrain.cli` attaches one to every run; the logic lives in `stacktrain.run_checks` and
`stacktrain.optim`):

* **extending a run**: a run resumed with a larger ``max_epochs`` / ``max_steps`` re-plans the
  learning-rate schedules whose length came from the trainer (`stacktrain.optim.replan_schedulers`),
  or stops with a one-line `StackError` before the first batch where a schedule cannot be re-planned;
* **SIGTERM** (what SLURM and other schedulers send): the run stops after the current training batch,
  writes ``checkpoints/sigterm-epoch=E-step=S.ckpt`` (every rank takes part, rank 0 writes) so that
  ``--ckpt_path`` resumes exactly there, and `stacktrain.cli` exits with status 143;
* it remembers how the run ended (``stopped_by``) for the CLI's exit status.

Why its own SIGTERM handling: Lightning's handler runs a collective (a broadcast) inside the signal
handler and each rank stops where the signal happens to find it, so under DDP the ranks could stop
at different points, and a checkpoint written then waited forever on a collective the other ranks
never reached. Here the handler only sets a flag; at the end of every training batch the ranks agree
on it (one boolean all-reduce: a signal to any rank stops all), and all stop at that same point.
"""

from __future__ import annotations

import os
import signal
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from stacktrain.optim import replan_schedulers
from stacktrain.stack import run_dir

__all__ = ["RunGuard"]


class RunGuard(Callback):
    """Re-plans schedules on an extended resume; stops on SIGTERM with a checkpoint.

    Attributes:
        stopped_by: ``None`` while running or after a normal end; ``"SIGTERM"`` or ``"SIGINT"``.
        sigterm_checkpoint: the checkpoint written on SIGTERM, else ``None``.
        replanned: one line per re-planned scheduler.
    """

    def __init__(self) -> None:
        self.stopped_by: str | None = None
        self.sigterm_checkpoint: str | None = None
        self.replanned: list[str] = []
        self._terminated = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.replanned = replan_schedulers(trainer)
        for line in self.replanned:
            rank_zero_info(f"stacktrain: resuming with a new length: {line}")
        self._terminated = False
        try:  # replaces Lightning's handler for this fit (its teardown restores the handlers before it)
            signal.signal(signal.SIGTERM, self._on_sigterm)
        except ValueError:  # not the main thread: Lightning's own handling stays
            pass

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._terminated = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        stop = self._terminated
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)  # any rank: every rank
        if stop:
            self._stop_with_checkpoint(trainer)

    def _stop_with_checkpoint(self, trainer: Trainer) -> None:
        self.stopped_by = "SIGTERM"
        path = os.path.join(_checkpoint_dir(trainer),
                            f"sigterm-epoch={trainer.current_epoch}-step={trainer.global_step}.ckpt")
        trainer.save_checkpoint(path)  # collective: every rank is at this same batch end
        self.sigterm_checkpoint = path
        if trainer.is_global_zero:
            print(f"stacktrain: SIGTERM: stopped at step {trainer.global_step}; checkpoint written: {path} "
                  f"(resume with --ckpt_path {path})", flush=True)
        raise SIGTERMException()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.stopped_by = "SIGINT"
        elif isinstance(exception, SIGTERMException):
            # also a SIGTERM Lightning caught itself (before training, in validation): no checkpoint
            # under DDP then, where the ranks may have stopped at different points
            self.stopped_by = "SIGTERM"


def _checkpoint_dir(trainer: Trainer) -> str:
    """Where the run's ModelCheckpoint writes (its ``dirpath``), else ``<run dir>/checkpoints``."""
    callback = trainer.checkpoint_callback
    dirpath = getattr(callback, "dirpath", None)
    return str(dirpath) if dirpath else os.path.join(run_dir(trainer), "checkpoints")
