"""``python train.py fit|validate|test|predict --config X.yaml``: stacktrain's LightningCLI.

What it adds to Lightning's CLI:

* subclass mode for the model and the data: any LightningModule / LightningDataModule by class
  path, ours or the user's own (modules in the current directory are importable);
  `stacktrain.datamodules.DigitsDataModule` is the default data;
* W&B loggers are started before training; one that cannot start is replaced by a CSV logger
  with a warning (`stacktrain.loggers.start_loggers`);
* the config is saved as ``config.yaml`` in the run directory (beside ``checkpoints/`` and the
  efficiency report), never over an earlier run's;
* an optimizer step with NaN/inf gradients is skipped with a warning and counted, and a run that
  keeps producing them stops (`stacktrain.callbacks.NonFiniteGuard`, added unless the config lists one);
* `StackError` is printed as one clear line (exit status 2) instead of a traceback
  (``STACKTRAIN_TRACEBACK=1`` shows the traceback);
* before the first batch: a ``--ckpt_path`` is checked (a readable checkpoint of the configured
  model: the config is never replaced by the checkpoint's hyperparameters), and every directory the
  run writes (logger ``save_dir``, checkpoint ``dirpath``, report ``dirpath``) must be writable;
* `RunGuard` (re-plans schedules when a resumed run is longer, writes a checkpoint on SIGTERM) and
  `ProgressLog` (progress lines with the whole run's ETA) are attached unless the config lists them;
* options are never abbreviated (``--trainer.max_epoch`` is an error, not ``max_epochs``);
* after ``fit`` it prints the final validation metrics and how many optimizer steps were skipped;
* exit statuses a scheduler can trust (`EXIT_STATUSES`).
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

# Before torch loads OpenMP: its threads spin while they wait for work, and on a machine where another
# process wants a core (a second job, W&B's service starting) each step then took up to 50x longer
# (measured on 2 cores: 35 ms alone; 0.3-1.0 s beside one busy process, 0.1 s with PASSIVE). Set
# OMP_WAIT_POLICY=ACTIVE yourself on a machine the run has to itself.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities.exceptions import SIGTERMException

from stacktrain.callbacks.nonfinite_guard import NonFiniteGuard
from stacktrain.callbacks.progress import ProgressLog
from stacktrain.callbacks.prune_regrow import PruneRegrow
from stacktrain.callbacks.run_guard import RunGuard
from stacktrain.errors import StackError
from stacktrain.loggers import start_loggers
from stacktrain.run_checks import (
    LIGHTNING_CKPT_NAMES,
    check_checkpoint_matches,
    load_checkpoint,
    output_dirs,
    require_writable_dir,
)
from stacktrain.stack import reject_duplicate_techniques, run_dir

__all__ = ["StackCLI", "RunDirSaveConfig", "main", "EXIT_STATUSES"]

EXIT_FINISHED, EXIT_REFUSED, EXIT_UNRELIABLE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 2, 3, 130, 143
#: What each exit status of ``train.py`` means (README "Exit statuses").
EXIT_STATUSES = {
    EXIT_FINISHED: "the run finished its plan (max_epochs / max_steps / max_time, or a stopping callback)",
    1: "an unexpected error (a traceback)",
    EXIT_REFUSED: "refused before the first batch, or stopped by NonFiniteGuard as diverged (one line: key, value, fix)",
    EXIT_UNRELIABLE: "finished its plan, but NonFiniteGuard skipped more than max_skipped_fraction of the steps",
    EXIT_INTERRUPTED: "stopped by Ctrl-C (SIGINT)",
    EXIT_TERMINATED: "stopped by SIGTERM after writing checkpoints/sigterm-epoch=E-step=S.ckpt",
}


class RunDirSaveConfig(SaveConfigCallback):
    """Saves the parsed config as ``config.yaml`` in the run directory (`stacktrain.stack.run_dir`)
    and into the loggers' hyperparameters; refuses to overwrite an earlier run's config."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved:
            return
        path = os.path.join(run_dir(trainer), self.config_filename) if trainer.is_global_zero else ""
        exists = trainer.strategy.broadcast(bool(path) and os.path.isfile(path))
        if exists and not self.overwrite:
            raise StackError(
                "already exists: this run directory belongs to an earlier run",
                source="stacktrain", key="config file", value=path,
                fix="give the logger a new version (or none), or move the earlier run away",
            )
        if trainer.is_global_zero:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            self.parser.save(self.config, path, skip_none=False, overwrite=self.overwrite, multifile=self.multifile)
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        self.already_saved = trainer.strategy.broadcast(self.already_saved)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if trainer.loggers:
            config = self.parser.dump(self.config, skip_none=False, format="json")
            for logger in trainer.loggers:
                logger.log_hyperparams({"stacktrain_config": config})


class StackCLI(LightningCLI):
    """LightningCLI in subclass mode for model and data, with stacktrain's defaults (module doc)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("model_class", LightningModule)
        kwargs.setdefault("datamodule_class", LightningDataModule)
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("save_config_callback", RunDirSaveConfig)
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("allow_abbrev", False)  # `--trainer.max_epoch 5` must not mean max_epochs
        return super().init_parser(**kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"data": {"class_path": "stacktrain.datamodules.DigitsDataModule"}})

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` instead of Lightning's rebuilding the model from the checkpoint's
        hyperparameters (which silently trained the checkpoint's model, not the config's): a missing,
        truncated or foreign file, or a checkpoint of another model, is refused with one line."""
        self._checkpoint: tuple[str, dict[str, Any]] | None = None
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if not path or path in LIGHTNING_CKPT_NAMES:
            return
        checkpoint = load_checkpoint(str(path))
        configured = self.config[subcommand].get("model")
        if configured is None:  # no model in the config: the checkpoint's own (Lightning's behaviour)
            super()._parse_ckpt_path()
            return
        check_checkpoint_matches(str(path), checkpoint, configured, None, compaction_handled=False)
        self._checkpoint = (str(path), checkpoint)

    def _check_checkpoint_weights(self) -> None:
        """The checkpoint's weights fit the instantiated model (a PruneRegrow in the run resizes the
        model to a compacted checkpoint itself); the checkpoint is released afterwards."""
        if not getattr(self, "_checkpoint", None):
            return
        (path, checkpoint), self._checkpoint = self._checkpoint, None
        compaction = any(isinstance(c, PruneRegrow) for c in self.trainer.callbacks)
        check_checkpoint_matches(path, checkpoint, None, self.model.state_dict(), compaction_handled=compaction)

    before_fit = before_validate = before_test = before_predict = _check_checkpoint_weights

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Trainer:
        # before Lightning's own check, which raises a RuntimeError about state keys
        listed = config.get("callbacks") or []
        reject_duplicate_techniques([*(listed if isinstance(listed, list) else [listed]), *callbacks])
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        for kind in (NonFiniteGuard, RunGuard, ProgressLog):
            if not any(isinstance(c, kind) for c in trainer.callbacks):
                trainer.callbacks.append(kind())
        for key, path in output_dirs(trainer, checkpoints=self.subcommand == "fit"):
            require_writable_dir(path, key)  # before W&B starts there, and long before the first checkpoint
        start_loggers(trainer)
        return trainer

    def _run_subcommand(self, subcommand: str) -> None:
        """Lightning's run, with exit statuses a scheduler can trust (`EXIT_STATUSES`)."""
        try:
            super()._run_subcommand(subcommand)
        except SIGTERMException:
            raise SystemExit(EXIT_TERMINATED) from None
        except SystemExit as stop:
            guard = next((c for c in self.trainer.callbacks if isinstance(c, RunGuard)), None)
            if guard is not None and guard.stopped_by == "SIGINT":
                raise SystemExit(EXIT_INTERRUPTED) from None
            raise stop

    def after_fit(self) -> None:
        trainer = self.trainer
        guard = next((c for c in trainer.callbacks if isinstance(c, NonFiniteGuard)), None)
        skipped = guard.skipped_steps if guard is not None else 0
        if trainer.is_global_zero:
            shown = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")}
            summary = ", ".join(f"{k}={v:.4f}" for k, v in shown.items()) or "no validation metrics"
            skip_text = f" ({skipped} of them skipped by NonFiniteGuard: non-finite gradients)" if skipped else ""
            print(f"stacktrain: fit finished after {trainer.global_step} steps{skip_text}: {summary}", flush=True)
            print(f"stacktrain: run directory: {run_dir(trainer)}", flush=True)
        if guard is not None and guard.too_many_skipped(trainer.global_step):
            if trainer.is_global_zero:
                print(f"stacktrain: error: NonFiniteGuard skipped {skipped} of {trainer.global_step} optimizer steps "
                      f"(more than max_skipped_fraction={guard.max_skipped_fraction}): the weights are not those of "
                      f"the planned run (exit status {EXIT_UNRELIABLE})", file=sys.stderr, flush=True)
            raise SystemExit(EXIT_UNRELIABLE)


def _stack_error_in(error: BaseException) -> StackError | None:
    """The `StackError` behind ``error``: jsonargparse re-raises errors from ``__init__`` as its own."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, StackError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


#: Warnings every run printed that say nothing to its user (deprecations inside torchdata and Lightning).
_NOISE = (r"'set_vital' is deprecated", r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class _NoTips(logging.Filter):
    """Drops Lightning's advertisements ("💡 Tip: ... try installing litlogger") from the run's output."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_known_noise() -> None:
    for message in _NOISE:
        warnings.filterwarnings("ignore", message=message)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.pytorch"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTips) for f in logger.filters):
            logger.addFilter(_NoTips())


def main(args: list[str] | None = None) -> StackCLI:
    """Entry point of ``train.py`` and the ``stacktrain`` command."""
    quiet_known_noise()
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # the user's own modules, as with `python -m`
    try:
        return StackCLI(args=args)
    except Exception as error:
        stack_error = _stack_error_in(error)
        if stack_error is None or os.environ.get("STACKTRAIN_TRACEBACK"):
            raise
        message = str(stack_error)
        message = message[len("stacktrain: "):] if message.startswith("stacktrain: ") else message
        print(f"stacktrain: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_REFUSED) from None
