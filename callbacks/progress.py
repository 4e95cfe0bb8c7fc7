"""`ProgressLog`: progress that a log file shows (nohup, SLURM, CI), and the whole run's ETA.

Lightning's progress bars draw nothing useful into a file (a Rich bar prints nothing between the
model summary and the end; a tqdm bar writes carriage returns), and their ETA is the epoch's. This
callback prints one line every ``every_n_seconds`` or ``every_n_steps`` (the first after
``first_after_seconds``), with the step, the loss, the throughput and the ETA of the *whole* run,
validation included. In a terminal it prints nothing and adds ``run ETA`` to the progress bar instead.
`stacktrain.cli` attaches one to every run unless the config lists one.
"""

from __future__ import annotations

import datetime as _dt
import math
import sys
import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from stacktrain.errors import require_number
from stacktrain.stack import batch_size_of

__all__ = ["ProgressLog", "format_progress"]


def _clock(seconds: float) -> str:
    return str(_dt.timedelta(seconds=int(round(seconds)))) if math.isfinite(seconds) else "n/a"


def format_progress(step: int, total: float, epoch: int, max_epochs: int | None, loss: float | None,
                    steps_per_s: float, samples_per_s: float, elapsed_s: float) -> str:
    """One progress line; the ETA is ``(total - step) / steps_per_s`` (the whole run's remaining steps)."""
    known = math.isfinite(total) and total > 0
    where = f"step {step}/{int(total)} ({100 * step / total:.0f}%)" if known else f"step {step}"
    where += f", epoch {epoch + 1}/{max_epochs}" if max_epochs and max_epochs > 0 else f", epoch {epoch + 1}"
    loss_text = f"loss {loss:.4f}" if loss is not None and math.isfinite(loss) else f"loss {loss}"
    eta = (total - step) / steps_per_s if known and steps_per_s > 0 else math.inf
    return (f"stacktrain: {where} | {loss_text} | {steps_per_s:.2f} steps/s, {samples_per_s:.0f} samples/s | "
            f"elapsed {_clock(elapsed_s)}, ETA {_clock(eta)} (whole run)")


def _loss_of(outputs: Any) -> float | None:
    loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
    return float(loss.detach()) if isinstance(loss, torch.Tensor) else None


class ProgressLog(Callback):
    """Prints progress lines when the output is not a terminal; whole-run ETA in the bar when it is.

    Args:
        every_n_seconds: print a line at least this often (0: never by time).
        every_n_steps: also print every this many optimizer steps (0: never by steps).
        first_after_seconds: the first line comes this long after training started (once 2 steps ran),
            so a new run shows its ETA within seconds.
        force: print lines even in a terminal (``None``: only when stdout is not a terminal).
    """

    def __init__(self, every_n_seconds: float = 30.0, every_n_steps: int = 0, first_after_seconds: float = 1.0,
                 force: bool | None = None) -> None:
        source = type(self).__name__
        require_number(every_n_seconds, "every_n_seconds", source=source, low=0)
        require_number(every_n_steps, "every_n_steps", source=source, low=0, integer=True)
        require_number(first_after_seconds, "first_after_seconds", source=source, low=0)
        self.every_n_seconds = float(every_n_seconds)
        self.every_n_steps = int(every_n_steps)
        self.first_after_seconds = float(first_after_seconds)
        self.force = force
        self.lines: list[str] = []
        self._start: tuple[float, int] | None = None
        self._last: tuple[float, int] | None = None
        self._samples = 0

    @property
    def prints_lines(self) -> bool:
        return self.force if self.force is not None else not sys.stdout.isatty()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start = (time.perf_counter(), trainer.global_step)
        self._last, self._samples = None, 0
        bar = trainer.progress_bar_callback
        if bar is not None and not self.prints_lines and not getattr(bar, "_stacktrain_eta", False):
            plain = bar.get_metrics

            def with_eta(trainer: Trainer, pl_module: LightningModule) -> dict[str, Any]:
                return {**plain(trainer, pl_module), "run ETA": self.eta_text(trainer)}

            bar.get_metrics, bar._stacktrain_eta = with_eta, True

    def rate(self, trainer: Trainer) -> float:
        """Optimizer steps per second of this process's training so far, validation included."""
        if self._start is None:
            return 0.0
        elapsed, steps = time.perf_counter() - self._start[0], trainer.global_step - self._start[1]
        return steps / elapsed if elapsed > 0 and steps > 0 else 0.0

    def eta_text(self, trainer: Trainer) -> str:
        rate = self.rate(trainer)
        total = trainer.estimated_stepping_batches
        return _clock((total - trainer.global_step) / rate) if rate > 0 and math.isfinite(total) else "n/a"

    def _due(self, now: float, step: int) -> bool:
        assert self._start is not None
        if step - self._start[1] < 2:
            return False
        if self._last is None:
            return now - self._start[0] >= self.first_after_seconds or (0 < self.every_n_steps <= step - self._start[1])
        by_time = self.every_n_seconds > 0 and now - self._last[0] >= self.every_n_seconds
        by_steps = self.every_n_steps > 0 and step - self._last[1] >= self.every_n_steps
        return by_time or by_steps

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._samples += batch_size_of(batch) * trainer.world_size
        now, step = time.perf_counter(), trainer.global_step
        if self._start is None or not trainer.is_global_zero or not self.prints_lines or not self._due(now, step):
            return
        self._last = (now, step)
        elapsed = now - self._start[0]
        line = format_progress(step, trainer.estimated_stepping_batches, trainer.current_epoch, trainer.max_epochs,
                               _loss_of(outputs), self.rate(trainer), self._samples / max(elapsed, 1e-9), elapsed)
        self.lines.append(line)
        print(line, flush=True)
