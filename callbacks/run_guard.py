"""`RunGuard`: what a scheduler and a resumed run need from a training run, in one thin callback
(`stacktrain.cli` attaches one to every run; the logic lives in `stacktrain.run_checks` and
`stacktrain.optim`):

* **extending a run**: a run resumed with a larger ``max_epochs`` / ``max_steps`` re-plans the
  learning-rate schedules whose length came from the trainer (`stacktrain.optim.replan_schedulers`),
  or stops with a one-line `StackError` before the first batch where a schedule cannot be re-planned;
* **SIGTERM** (what SLURM and other schedulers send): Lightning stops after the current batch; this
  callback then writes ``checkpoints/sigterm-epoch=E-step=S.ckpt`` (every rank takes part, rank 0
  writes) so that ``--ckpt_path`` resumes exactly there, and `stacktrain.cli` exits with status 143;
* it remembers how the run ended (``stopped_by``) for the CLI's exit status.
"""

from __future__ import annotations

import os
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

from stacktrain.optim import replan_schedulers
from stacktrain.stack import run_dir

__all__ = ["RunGuard"]


class RunGuard(Callback):
    """Re-plans schedules on an extended resume; writes a checkpoint when the run gets SIGTERM.

    Attributes:
        stopped_by: ``None`` while running or after a normal end; ``"SIGTERM"`` or ``"SIGINT"``.
        sigterm_checkpoint: the checkpoint written on SIGTERM (rank 0), else ``None``.
        replanned: one line per re-planned scheduler.
    """

    def __init__(self) -> None:
        self.stopped_by: str | None = None
        self.sigterm_checkpoint: str | None = None
        self.replanned: list[str] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.replanned = replan_schedulers(trainer)
        for line in self.replanned:
            rank_zero_info(f"stacktrain: resuming with a new length: {line}")

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.stopped_by = "SIGINT"
        if not isinstance(exception, SIGTERMException):
            return
        self.stopped_by = "SIGTERM"
        if trainer.state.fn != "fit" or trainer.global_step == 0:
            return
        directory = _checkpoint_dir(trainer)
        path = os.path.join(directory, f"sigterm-epoch={trainer.current_epoch}-step={trainer.global_step}.ckpt")
        trainer.save_checkpoint(path)  # collective: every rank is here (Lightning stops them together)
        if trainer.is_global_zero:
            self.sigterm_checkpoint = path
            print(f"stacktrain: SIGTERM: stopped at step {trainer.global_step}; checkpoint written: {path} "
                  f"(resume with --ckpt_path {path})", flush=True)


def _checkpoint_dir(trainer: Trainer) -> str:
    """Where the run's ModelCheckpoint writes (its ``dirpath``), else ``<run dir>/checkpoints``."""
    callback = trainer.checkpoint_callback
    dirpath = getattr(callback, "dirpath", None)
    return str(dirpath) if dirpath else os.path.join(run_dir(trainer), "checkpoints")

