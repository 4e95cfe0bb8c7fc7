"""`EfficiencyReport`: one table of what every technique in the run saved, plus measured step times."""

from __future__ import annotations

import datetime as _dt
import math
import os
import re
import time
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_info

from stacktrain.callbacks.nonfinite_guard import NonFiniteGuard
from stacktrain.stack import INFERENCE_FLOPS, INFERENCE_FLOPS_AVERAGE, CostLine, EfficiencySink, run_dir, unique_path

__all__ = ["EfficiencyReport"]

_PREFIXES = [(1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")]


def _human(value: float, unit: str) -> str:
    """``1.5e9, 'FLOP'`` -> ``'1.50 GFLOP'``; plain numbers keep three significant digits."""
    if not math.isfinite(value):
        return "n/a"
    for scale, prefix in _PREFIXES:
        if abs(value) >= scale and unit:
            return f"{value / scale:.3g} {prefix}{unit}"
    return f"{value:.3g} {unit}".strip()


def _slug(text: str) -> str:
    return re.sub(r"[^0-9a-zA-Z]+", "_", text).strip("_").lower()


class EfficiencyReport(EfficiencySink):
    """Collects what each technique reports (FLOPs per step, tokens per sample, bytes per step...)
    and times the training steps; at the end of ``fit`` writes ``efficiency.md`` and
    ``efficiency.png`` into the run directory (beside ``checkpoints/``) and logs both to the loggers.

    Ratios are actual cost over the cost without the technique. When several techniques report the
    same quantity, an "all techniques" row multiplies their ratios: each technique's baseline is the
    model as the other techniques leave it, so the savings compound. Existing files are never
    overwritten: a second report in the same directory gets a numbered name.

    Args:
        dirpath: where to write; default: the run directory (logger save_dir/name/version).
        filename: name of the Markdown report.
        plot_filename: name of the PNG plot.
    """

    def __init__(
        self, dirpath: str | None = None, filename: str = "efficiency.md", plot_filename: str = "efficiency.png"
    ) -> None:
        super().__init__()
        self.dirpath = dirpath
        self.filename = filename
        self.plot_filename = plot_filename
        self.steps = 0
        self.step_wall_s = 0.0
        self.step_cpu_s = 0.0
        self.fit_wall_s = 0.0
        #: per epoch: [epoch, steps, wall seconds, cpu seconds]
        self.epochs: list[list[float]] = []
        self.written: dict[str, str] = {}
        self._step_start: tuple[float, float] | None = None
        self._fit_start: float | None = None
        self._epoch: list[float] | None = None

    # ------------------------------------------------------------------------------ measurement
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._fit_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._epoch = [float(trainer.current_epoch), 0.0, 0.0, 0.0]

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_start = (time.perf_counter(), time.process_time())

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._step_start is None:
            return
        wall = time.perf_counter() - self._step_start[0]
        cpu = time.process_time() - self._step_start[1]
        self._step_start = None
        self.steps += 1
        self.step_wall_s += wall
        self.step_cpu_s += cpu
        if self._epoch is not None:
            self._epoch[1] += 1
            self._epoch[2] += wall
            self._epoch[3] += cpu

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._epoch is not None and self._epoch[1] > 0:
            self.epochs.append(self._epoch)
        self._epoch = None

    def _fit_wall_now(self) -> float:
        running = time.perf_counter() - self._fit_start if self._fit_start is not None else 0.0
        return self.fit_wall_s + running

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state.update(
            steps=self.steps,
            step_wall_s=self.step_wall_s,
            step_cpu_s=self.step_cpu_s,
            fit_wall_s=self._fit_wall_now(),
            epochs=[list(e) for e in self.epochs],
        )
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.steps = int(state_dict.get("steps", 0))
        self.step_wall_s = float(state_dict.get("step_wall_s", 0.0))
        self.step_cpu_s = float(state_dict.get("step_cpu_s", 0.0))
        self.fit_wall_s = float(state_dict.get("fit_wall_s", 0.0))
        self.epochs = [list(e) for e in state_dict.get("epochs", [])]

    # ------------------------------------------------------------------------------ the report
    def rows(self) -> list[CostLine]:
        """Every technique's line, then one combined line per quantity reported by several."""
        lines = sorted(self.lines.values(), key=lambda line: (line.quantity, line.technique))
        rows = list(lines)
        by_quantity: dict[str, list[CostLine]] = {}
        for line in lines:
            by_quantity.setdefault(line.quantity, []).append(line)
        for quantity, group in by_quantity.items():
            if len(group) < 2:
                continue
            ratio = math.prod(line.ratio for line in group)
            # without any technique: the largest of the baselines (the others are the model as some
            # technique already left it, e.g. early exits measured on the pruned network)
            per_step = max(line.baseline / max(line.count, 1) for line in group)
            rows.append(CostLine("all techniques", quantity, group[0].unit, per_step, per_step * ratio, 1))
        return rows

    def markdown(self, trainer: Trainer | None = None) -> str:
        out = ["# stacktrain efficiency report", ""]
        if trainer is not None:
            guard = next((c for c in getattr(trainer, "callbacks", []) if isinstance(c, NonFiniteGuard)), None)
            skipped = guard.skipped_steps if guard is not None else 0
            applied = f" ({skipped} skipped by NonFiniteGuard: non-finite gradients, not applied)" if skipped else ""
            out.append(
                f"{trainer.global_step} optimizer steps{applied}, {trainer.current_epoch} epochs; "
                f"written {_dt.datetime.now().isoformat(timespec='seconds')}."
            )
            out.append("")
        rows = self.rows()
        if rows:
            out += [
                "| technique | quantity | without it (per step) | with it (per step) | ratio | saved |",
                "|---|---|---|---|---|---|",
            ]
            for row in rows:
                count = max(row.count, 1)
                out.append(
                    f"| {row.technique} | {row.quantity} | {_human(row.baseline / count, row.unit)} | "
                    f"{_human(row.actual / count, row.unit)} | {row.ratio:.3f} | {100 * (1 - row.ratio):.1f}% |"
                )
            if any(row.quantity == INFERENCE_FLOPS for row in rows):
                out += ["", f"{INFERENCE_FLOPS}: of the network at the end of training, the one you get; "
                            f"lines \"{INFERENCE_FLOPS_AVERAGE}\" average over the training steps."]
        else:
            out.append("No technique reported a saving in this run.")
        out += ["", "## Training time", "", "| measured | value |", "|---|---|", f"| training steps timed | {self.steps} |"]
        if self.steps:
            out.append(f"| mean step wall time | {1000 * self.step_wall_s / self.steps:.2f} ms |")
            out.append(f"| mean step CPU time (process, all threads) | {1000 * self.step_cpu_s / self.steps:.2f} ms |")
        out.append(f"| fit wall time | {self._fit_wall_now():.1f} s |")
        return "\n".join(out) + "\n"

    def plot(self, path: str) -> None:
        from matplotlib.figure import Figure

        figure = Figure(figsize=(10, 4), dpi=100)
        left, right = figure.subplots(1, 2)
        rows = self.rows()
        if rows:
            labels = [f"{r.technique}\n{r.quantity}" for r in rows]
            ratios = [r.ratio for r in rows]
            left.barh(range(len(rows)), ratios, color=["#4c72b0" if r.technique != "all techniques" else "#dd8452" for r in rows])
            left.set_yticks(range(len(rows)), labels, fontsize=8)
            left.axvline(1.0, color="black", linewidth=1)
            left.set_xlim(0, max(1.05, max((r for r in ratios if math.isfinite(r)), default=1.0) * 1.05))
            left.invert_yaxis()
        else:
            left.text(0.5, 0.5, "no technique reported", ha="center", va="center")
        left.set_xlabel("cost with technique / without")
        left.set_title("what each technique saved")
        if self.epochs:
            right.plot([e[0] for e in self.epochs], [1000 * e[2] / e[1] for e in self.epochs], marker="o", label="wall")
            right.plot([e[0] for e in self.epochs], [1000 * e[3] / e[1] for e in self.epochs], marker=".", label="CPU")
            right.legend()
        right.set_xlabel("epoch")
        right.set_ylabel("mean training step (ms)")
        right.set_title("step time")
        figure.tight_layout()
        figure.savefig(path)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        directory = self.dirpath or run_dir(trainer)
        os.makedirs(directory, exist_ok=True)
        md_path = unique_path(os.path.join(directory, self.filename))
        png_path = unique_path(os.path.join(directory, self.plot_filename))
        text = self.markdown(trainer)
        with open(md_path, "w", encoding="utf-8") as handle:
            handle.write(text)
        self.plot(png_path)
        self.written = {"markdown": md_path, "plot": png_path}
        self._log(trainer, text, png_path)
        rank_zero_info(f"stacktrain: efficiency report written to {md_path}")

    def _log(self, trainer: Trainer, text: str, png_path: str) -> None:
        rows = self.rows()
        metrics = {f"efficiency/{_slug(r.technique)}/{_slug(r.quantity)}_ratio": r.ratio for r in rows}
        if self.steps:
            metrics["efficiency/step_wall_ms"] = 1000 * self.step_wall_s / self.steps
            metrics["efficiency/step_cpu_ms"] = 1000 * self.step_cpu_s / self.steps
        for logger in trainer.loggers:
            if metrics:
                logger.log_metrics(metrics, step=trainer.global_step)
            if isinstance(logger, WandbLogger):
                columns = ["technique", "quantity", "baseline_per_step", "actual_per_step", "ratio"]
                data = [[r.technique, r.quantity, r.baseline / max(r.count, 1), r.actual / max(r.count, 1), r.ratio] for r in rows]
                logger.log_table(key="efficiency/report", columns=columns, data=data)
                logger.log_image(key="efficiency/plot", images=[png_path])
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("efficiency/report", text, trainer.global_step)
