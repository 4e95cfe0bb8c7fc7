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
* after ``fit`` it prints the final validation metrics.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

from stacktrain.callbacks.nonfinite_guard import NonFiniteGuard
from stacktrain.errors import StackError
from stacktrain.loggers import start_loggers
from stacktrain.stack import reject_duplicate_techniques, run_dir

__all__ = ["StackCLI", "RunDirSaveConfig", "main"]


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

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.set_defaults({"data": {"class_path": "stacktrain.datamodules.DigitsDataModule"}})

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Any]) -> Trainer:
        # before Lightning's own check, which raises a RuntimeError about state keys
        listed = config.get("callbacks") or []
        reject_duplicate_techniques([*(listed if isinstance(listed, list) else [listed]), *callbacks])
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        trainer = super().instantiate_trainer(**kwargs)
        if not any(isinstance(c, NonFiniteGuard) for c in trainer.callbacks):
            trainer.callbacks.append(NonFiniteGuard())
        start_loggers(trainer)
        return trainer

    def after_fit(self) -> None:
        trainer = self.trainer
        if not trainer.is_global_zero:
            return
        shown = {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("val/")}
        summary = ", ".join(f"{k}={v:.4f}" for k, v in shown.items()) or "no validation metrics"
        print(f"stacktrain: fit finished after {trainer.global_step} steps: {summary}", flush=True)
        print(f"stacktrain: run directory: {run_dir(trainer)}", flush=True)


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


def main(args: list[str] | None = None) -> StackCLI:
    """Entry point of ``train.py`` and the ``stacktrain`` command."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # the user's own modules, as with `python -m`
    try:
        return StackCLI(args=args)
    except Exception as error:
        stack_error = _stack_error_in(error)
        if stack_error is None or os.environ.get("STACKTRAIN_TRACEBACK"):
            raise
        print(f"stacktrain: error: {stack_error}", file=sys.stderr)
        raise SystemExit(2) from None
