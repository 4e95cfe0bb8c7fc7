"""Weights & Biases logging with stacktrain's defaults, and the fallback when W&B cannot start."""

from __future__ import annotations

import os
import warnings
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["WandbLogger", "start_loggers", "log_table_with_line"]

_ONLINE_MODES = ("online", "run")


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` with stacktrain's defaults: project ``stacktrain``, files under
    ``runs/``, and offline unless asked otherwise, so no account is needed (``wandb sync
    runs/wandb/offline-run-*`` uploads later).

    ``offline=None`` (the default) follows the environment: ``WANDB_MODE=online`` logs online,
    anything else offline. ``offline: false`` in a config always logs online.
    """

    def __init__(self, project: str = "stacktrain", save_dir: str = "runs", offline: bool | None = None, **kwargs: Any):
        if offline is None:
            offline = os.environ.get("WANDB_MODE", "offline").lower() not in _ONLINE_MODES
        elif offline is False and os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
            os.environ.pop("WANDB_MODE")  # the config asked for online explicitly
        super().__init__(project=project, save_dir=save_dir, offline=offline, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)  # W&B warns on every run that the setting does nothing
        settings = self._wandb_init.get("settings")
        if settings is None:  # git information from the current directory; W&B warned "git root runs does not exist"
            self._wandb_init["settings"] = {"git_root": os.getcwd()}


def start_loggers(trainer: Trainer) -> list[str]:
    """Start every W&B logger of ``trainer`` now (rank 0); any that fails to start (no network, no
    account in online mode, a broken install) is replaced by a ``CSVLogger`` in the same directory
    with a warning, so the run goes on. Returns the warnings issued."""
    issued: list[str] = []
    if rank_zero_only.rank != 0:
        return issued
    loggers: list[Logger] = []
    for logger in trainer.loggers:
        if isinstance(logger, _LightningWandbLogger):
            try:
                logger.experiment  # noqa: B018 - starts wandb
            except Exception as error:  # wandb raises many types (UsageError, CommError, timeouts)
                message = (
                    f"stacktrain: W&B could not start ({type(error).__name__}: {error}); "
                    f"logging to CSV under {logger.save_dir or 'runs'} instead"
                )
                warnings.warn(message, stacklevel=2)
                issued.append(message)
                loggers.append(CSVLogger(save_dir=logger.save_dir or "runs", name=str(logger._project or "stacktrain")))
                continue
        loggers.append(logger)
    trainer.loggers = loggers
    return issued


def log_table_with_line(
    logger: _LightningWandbLogger, key: str, columns: list[str], data: list[list[Any]], *, x: str, y: str, title: str
) -> None:
    """Log ``data`` to a W&B run as the table ``key`` and as a line plot of column ``y`` over column
    ``x`` under ``key + "_plot"`` (a chart W&B draws from the table, not an image)."""
    import wandb

    logger.log_table(key=key, columns=columns, data=data)
    plot = wandb.plot.line(wandb.Table(columns=columns, data=data), x, y, title=title)
    logger.experiment.log({f"{key}_plot": plot})
