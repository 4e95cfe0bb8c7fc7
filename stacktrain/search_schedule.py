"""Search an acceleration schedule for `TokenDropout` by measuring gradient estimation error against cost
at checkpoints of a real training run.

    python -m stacktrain.search_schedule --config configs/simclr_token_dropout.yaml \\
        --out configs/schedules/simclr_digits.yaml [--checkpoints DIR] [--budget 0.4]

writes the schedule (YAML, for ``TokenDropout(schedule_file=...)``) and ``<out>.png`` (error against
cost at every checkpoint, and the chosen schedule).

The procedure (after Lin et al., NeurIPS 2024, "Accelerating Augmentation Invariance Pretraining"):

1. **Checkpoints of a real run.** `ProgressCheckpoints` saves the module's whole state (weights and
   buffers: EMA teachers, BatchNorm statistics, DINO's centre) at the first optimizer step at or after
   each fraction ``--points`` of an ordinary full-length training run (dense early: the error of a
   compression changes fastest in the first steps). Attach it to a baseline run you train anyway and
   pass its folder as ``--checkpoints``; without it the search trains the config's full-sequence run
   itself (its callbacks, loggers and validation left out) and reports that training's cost apart.
2. **Measurement** (`measure_checkpoints`). At each checkpoint, on ``--batches`` fixed training batches,
   the gradient of the module's training loss w.r.t. all trainable parameters: once at the full
   sequence and once per candidate ``(keep ratio, patch scale)`` with fresh random token masks. The
   module's state and the global RNG are restored after every gradient; the module's logging goes to
   a scratch collection. A candidate that another beats on cost, squared bias and variance at once is
   not measured again (`dominated_candidates`), nor, without a budget, one whose cost-adjusted error
   is above the full sequence's and rising (`falling_behind`); once only the full sequence is left,
   the remaining checkpoints cost nothing.
3. **Errors** (`gradient_error_stats`): squared bias and variance of each candidate's estimate against
   the full gradient, and the batch-to-batch variance of the full one; the cost-adjusted error
   ``(bias^2 + relative_cost x variance) / full variance`` (`cost_adjusted_error`; 1 for the full
   sequence). Costs are the FLOPs of the module's whole training step under each candidate.
4. **Choice** (`choose_phases`): per stage between checkpoints the candidate with the least
   cost-adjusted error, compression never increasing over training, the full sequence from the last
   checkpoint to the end; ``--budget`` (optional) caps the mean relative cost.

The schedule is in fractions of training, so it applies to the run it was measured on unchanged.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.connectors.logger_connector.result import _ResultCollection
from lightning.pytorch.utilities import rank_zero_info

from stacktrain.errors import StackError, require_number
from stacktrain.functional.flops import flop_counter
from stacktrain.functional.token_dropout import (
    PATCH_MODES,
    ViTCostModel,
    apply_token_dropout,
    check_keep_ratio,
    check_patch_scale,
    select_vit,
)
from stacktrain.functional.token_dropout_schedule import (
    AccelerationSchedule,
    choose_phases,
    cost_adjusted_error,
    dominated_candidates,
    falling_behind,
    first_step_at,
    gradient_error_stats,
    write_schedule_file,
)

__all__ = [
    "DEFAULT_POINTS",
    "ProgressCheckpoints",
    "load_progress_checkpoints",
    "GradientProbe",
    "logging_discarded",
    "at_global_step",
    "preserved_state",
    "make_candidates",
    "measure_checkpoints",
    "search_schedule",
    "load_config",
    "main",
]

#: Fractions of training to checkpoint at: dense early, where a compression's error changes fastest.
DEFAULT_POINTS = (0.0, 0.05, 0.15, 0.35, 0.7)
INDEX = "progress_checkpoints.yaml"
SOURCE = "search_schedule"
FULL = (1.0, 1)


def _check_points(points: Sequence[float], key: str = "--points", source: str = SOURCE) -> list[float]:
    """Checkpoint fractions: increasing, from 0, below 1 (the final stage is full, nothing to measure)."""
    checked = sorted({float(p) for p in points})
    if len(checked) < 2 or checked[0] != 0.0 or checked[-1] >= 1.0:
        raise StackError("must start at 0, stay below 1 and hold at least 2 fractions", source=source, key=key,
                         value=list(points), fix="give increasing fractions of training such as 0,0.05,0.15,0.35,0.7 "
                         "(the final stage after the last one is always the full sequence)")
    return checked


def _total_steps(trainer: Trainer) -> int:
    """Optimizer steps of the run, as `TokenDropout` and the contrastive modules count them."""
    total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
    return int(total) if total != float("inf") else 1


# ------------------------------------------------------------------------------------ checkpoints
class ProgressCheckpoints(Callback):
    """Saves ``pl_module.state_dict()`` (weights and buffers), the global step and the progress at the
    first optimizer step at or after each fraction ``points`` of training, into ``dirpath`` with an
    index (`load_progress_checkpoints`), and the run's CPU time at its end.

    Attach it to a training run you do anyway (a benchmark's baseline) so the schedule search reuses its
    checkpoints instead of training again. It draws no random numbers and changes nothing in the module,
    so the run ends exactly as it would without it; a few ``torch.save`` calls are its whole cost.
    """

    def __init__(self, points: Sequence[float] = DEFAULT_POINTS, dirpath: str = "progress_checkpoints") -> None:
        self.points = _check_points(points, key="points", source="ProgressCheckpoints")
        self.dirpath = str(dirpath)
        self.entries: list[dict[str, Any]] = []
        self._pending: list[tuple[float, int]] = []
        self._total = 0
        self._cpu_start = 0.0
        self._cpu_before = 0.0  # CPU seconds of the run before a resume
        self._resumed = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # rank 0's view, on every rank: a refusal on one rank alone would leave the others waiting
        taken = trainer.strategy.broadcast(os.path.exists(os.path.join(self.dirpath, INDEX)), src=0)
        if taken and not self._resumed:
            raise StackError("already holds progress checkpoints; they are never overwritten",
                             source="ProgressCheckpoints", key="dirpath", value=self.dirpath,
                             fix="give a new folder or move the old one away")
        self._total = _total_steps(trainer)
        done = {point for entry in self.entries for point in entry["points"]}
        self._pending = [(p, first_step_at(p, self._total)) for p in self.points if p not in done]
        self._cpu_start = time.process_time()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        due = [point for point, at in self._pending if at <= step]
        if not due:
            return
        self._pending = [(point, at) for point, at in self._pending if at > step]
        if trainer.is_global_zero:  # one copy: DDP keeps the module equal on every rank
            os.makedirs(self.dirpath, exist_ok=True)
            name = f"step-{step:07d}.pt"
            torch.save({"state_dict": pl_module.state_dict(), "global_step": step, "total_steps": self._total},
                       os.path.join(self.dirpath, name))
            self.entries.append({"points": due, "progress": step / self._total, "step": step, "file": name})
            self._write_index(complete=False)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.is_global_zero and self.entries:
            self._write_index(complete=True, cpu_seconds=self._cpu_seconds(), steps=trainer.global_step)

    def _cpu_seconds(self) -> float:
        return self._cpu_before + time.process_time() - self._cpu_start

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to go on writing the same index (stop-and-resume safe)."""
        return {"entries": [dict(e) for e in self.entries], "cpu_seconds": self._cpu_seconds()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.entries = [dict(e) for e in state_dict["entries"]]
        self._cpu_before = float(state_dict["cpu_seconds"])
        self._resumed = True

    def _write_index(self, complete: bool, **extra: Any) -> None:
        content = {"total_steps": self._total, "complete": complete, **extra, "checkpoints": self.entries}
        with open(os.path.join(self.dirpath, INDEX), "w", encoding="utf-8") as handle:
            handle.write("# written by stacktrain.search_schedule.ProgressCheckpoints, "
                         "read by load_progress_checkpoints\n")
            yaml.safe_dump(content, handle, sort_keys=False)


def _read_index(dirpath: str) -> dict[str, Any]:
    """The index `ProgressCheckpoints` keeps in ``dirpath`` (total steps, CPU seconds, entries)."""
    path = os.path.join(dirpath, INDEX)
    if not os.path.isfile(path):
        raise StackError(f"holds no {INDEX}", source=SOURCE, key="--checkpoints", value=dirpath,
                         fix="attach stacktrain.search_schedule.ProgressCheckpoints(dirpath=...) to a training "
                             "run first, or leave --checkpoints out to let the search train one")
    with open(path, encoding="utf-8") as handle:
        return dict(yaml.safe_load(handle) or {})


def load_progress_checkpoints(dirpath: str) -> list[tuple[float, int, str]]:
    """``(progress, global_step, file)`` of every checkpoint `ProgressCheckpoints` wrote into ``dirpath``,
    in training order."""
    found = []
    for entry in _read_index(dirpath).get("checkpoints") or []:
        path = os.path.join(dirpath, entry["file"])
        if not os.path.isfile(path):
            raise StackError(f"lists {entry['file']}, which is missing", source=SOURCE, key="--checkpoints",
                             value=dirpath, fix="point to the folder as ProgressCheckpoints left it")
        found.append((float(entry["progress"]), int(entry["step"]), path))
    return sorted(found)


# ------------------------------------------------------------------------------------ measuring
@contextmanager
def logging_discarded(pl_module: LightningModule) -> Iterator[None]:
    """``self.log`` calls of the module inside go to a scratch result collection, as if from its
    ``training_step``, and are dropped: the probe's forwards never reach the run's logs or progress
    bar, and no method of the module is replaced."""
    loop = pl_module.trainer.fit_loop.epoch_loop
    saved = loop._results, pl_module._current_fx_name
    loop._results = _ResultCollection(training=True)
    pl_module._current_fx_name = "training_step"
    try:
        yield
    finally:
        loop._results, pl_module._current_fx_name = saved


@contextmanager
def at_global_step(trainer: Trainer, step: int) -> Iterator[None]:
    """``trainer.global_step`` reads ``step`` inside, so the module's step-dependent schedules (EMA
    momentum, DINO's teacher temperature) are those of the checkpoint being measured."""
    progress = trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total
    saved = progress.completed
    progress.completed = int(step)
    try:
        yield
    finally:
        progress.completed = saved


@contextmanager
def preserved_state(pl_module: LightningModule) -> Iterator[Callable[[], None]]:
    """Yields ``restore()``, which puts the module's state_dict back as it was on entry; on exit the
    state, the parameters' ``.grad``, the training mode and the global RNG are restored exactly."""
    snapshot = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
    grads = [(p, p.grad) for p in pl_module.parameters()]
    was_training = pl_module.training

    def restore() -> None:
        pl_module.load_state_dict(snapshot)

    device = pl_module.device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        try:
            yield restore
        finally:
            restore()
            for parameter, grad in grads:
                parameter.grad = grad
            pl_module.train(was_training)


class GradientProbe:
    """Gradients of a module's training loss under candidate compressions, for a module inside a
    running fit (its ``training_step`` may read ``trainer.global_step`` and the strategy).

    It applies its own token dropout to the ViT (state_dict keys unchanged) until `close`."""

    def __init__(self, pl_module: LightningModule, candidates: Sequence[tuple[float, int]], *,
                 patch_mode: str = "flexi", vit_path: str | None = None, seed: int = 0) -> None:
        if not pl_module.automatic_optimization:
            raise StackError("needs a module with automatic optimization (training_step returns the loss)",
                             source=SOURCE, key="model", value=type(pl_module).__name__)
        self.module = pl_module
        self.candidates = [(float(k), int(s)) for k, s in candidates]
        self.seed = int(seed)
        _, vit = select_vit(pl_module, vit_path, source=SOURCE)
        self.generator = torch.Generator(device=pl_module.device)
        self.compression = apply_token_dropout(
            vit, patch_scaling=any(s > 1 for _, s in self.candidates), patch_mode=patch_mode,  # type: ignore[arg-type]
            generator=self.generator, source=SOURCE)
        self.params = [p for p in pl_module.parameters() if p.requires_grad]
        #: training-step FLOPs per candidate, from the first `measure` with ``count_flops``
        self.flops: dict[tuple[float, int], float] = {}

    def close(self) -> None:
        self.compression.remove()

    def _loss(self, batch: Any, candidate: tuple[float, int], rng_seed: int, mask_seed: int) -> torch.Tensor:
        self.compression.set(*candidate)
        self.generator.manual_seed(mask_seed)
        torch.manual_seed(rng_seed)  # model dropout and the like: equal for every candidate on a batch
        output = self.module.training_step(batch, 0)
        return output["loss"] if isinstance(output, dict) else output

    def _gradient(self, batch: Any, candidate: tuple[float, int], rng_seed: int, mask_seed: int,
                  count_flops: bool = False) -> torch.Tensor:
        """The flattened gradient, by ``.backward()`` (the flop counter's module hooks do not work under
        ``autograd.grad``); with ``count_flops``, the step's FLOPs go to ``self.flops[candidate]``."""
        for parameter in self.params:
            parameter.grad = None
        with flop_counter() if count_flops else nullcontext() as counter:
            self._loss(batch, candidate, rng_seed, mask_seed).backward()
        if counter is not None:
            self.flops[candidate] = float(counter.get_total_flops())
        gradient = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in self.params])
        for parameter in self.params:
            parameter.grad = None
        return gradient

    @property
    def relative_costs(self) -> list[float]:
        """FLOPs of the module's whole training step (forward and backward, teacher included) per
        candidate, relative to the full sequence, counted on the first batch of the first `measure`
        (``count_flops=True``): they depend on shapes only, so counting them again would be waste."""
        return [self.flops[c] / self.flops[FULL] for c in self.candidates]

    def measure(self, batches: Sequence[Any], alive: Sequence[int], round_seed: int,
                count_flops: bool = False) -> list[dict[str, float] | None]:
        """`gradient_error_stats` of the candidates numbered in ``alive`` (``None`` for the others)
        against the full sequence on ``batches``; the module's state, its gradients and the global RNG
        are as before. With ``count_flops`` the first batch's passes are also counted (`relative_costs`)."""
        rng_seeds = [self.seed * 100_000 + round_seed * 100 + index for index in range(len(batches))]
        stats: list[dict[str, float] | None] = [None] * len(self.candidates)
        with preserved_state(self.module) as restore, logging_discarded(self.module):
            self.module.train()
            full = []
            for index, (batch, rng_seed) in enumerate(zip(batches, rng_seeds)):
                full.append(self._gradient(batch, FULL, rng_seed, 0, count_flops and index == 0))
                restore()
            full_grads = torch.stack(full)
            for number in alive:
                candidate = self.candidates[number]
                if candidate == FULL:
                    stats[number] = gradient_error_stats(full_grads, full_grads)
                    continue
                grads = []
                for index, (batch, rng_seed) in enumerate(zip(batches, rng_seeds)):
                    grads.append(self._gradient(batch, candidate, rng_seed, rng_seed * 100 + number + 1,
                                                count_flops and index == 0))
                    restore()
                stats[number] = gradient_error_stats(full_grads, torch.stack(grads))
            self.compression.set(*FULL)
        return stats


def _fixed_batches(trainer: Trainer, count: int, seed: int) -> list[Any]:
    """The first ``count`` batches of the run's training data (augmentations drawn from ``seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        iterator = iter(trainer.train_dataloader)
        batches = []
        for _ in range(count):
            try:
                batches.append(trainer.strategy.batch_to_device(next(iterator)))
            except StopIteration:
                break
    if len(batches) < 2:
        raise StackError("needs at least 2 training batches to measure gradient noise", source=SOURCE,
                         key="--batches", value=count, fix="give --batches 2 or more, with enough data for them")
    return batches


class _MeasureAtStart(Callback):
    """Runs `GradientProbe` on every checkpoint at the start of a fit, then stops it before any step:
    the fit only provides what the module's ``training_step`` expects (trainer, strategy, data)."""

    def __init__(self, checkpoints: Sequence[tuple[float, int, str]], total_steps: int | None,
                 candidates: Sequence[tuple[float, int]], batches: int, options: dict[str, Any]) -> None:
        self.checkpoints, self.total_steps, self.candidates = list(checkpoints), total_steps, list(candidates)
        self.batches, self.options = batches, options
        self.result: dict[str, Any] = {}

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        trainer.should_stop = True
        if self.total_steps is not None and self.total_steps != _total_steps(trainer):
            raise StackError(f"were written by a run of {self.total_steps} optimizer steps, but this config's run has "
                             f"{_total_steps(trainer)}", source=SOURCE, key="--checkpoints", value=self.options["dir"],
                             fix="pass the config and overrides (e.g. --trainer.max_epochs) of the run that wrote them")
        probe = GradientProbe(pl_module, self.candidates, patch_mode=self.options["patch_mode"],
                              vit_path=self.options["vit_path"], seed=self.options["seed"])
        try:
            batches = _fixed_batches(trainer, self.batches, self.options["seed"])
            self.result = {"batches": len(batches), "stats": [], "errors": []}
            self._measure_all(trainer, pl_module, probe, batches)
            self.result["relative_costs"] = probe.relative_costs
        finally:
            probe.close()

    def _measure_all(self, trainer: Trainer, pl_module: LightningModule, probe: GradientProbe,
                     batches: list[Any]) -> None:
        """Checkpoint after checkpoint, the candidates still worth measuring (all of them, FLOPs counted,
        at the first); once only the full sequence is left (its error is 1 by definition), the
        remaining checkpoints cost nothing."""
        full = self.candidates.index(FULL)
        alive = list(range(len(self.candidates)))
        for number, (_, step, path) in enumerate(self.checkpoints):
            stats: list[dict[str, float] | None] = [None] * len(self.candidates)
            if alive != [full]:
                saved = torch.load(path, map_location=pl_module.device, weights_only=True)
                pl_module.load_state_dict(saved["state_dict"])
                with at_global_step(trainer, step):
                    stats = probe.measure(batches, alive, number, count_flops=number == 0)
            costs = probe.relative_costs
            errors = [1.0 if c == full else None if s is None else cost_adjusted_error(s, costs[c])
                      for c, s in enumerate(stats)]
            gone: set[int] = set()
            if self.options["drop_dominated"]:
                gone |= dominated_candidates(stats, costs, [full])
            if self.options["drop_falling_behind"] and self.result["errors"]:
                gone |= falling_behind(self.result["errors"][-1], errors, [full])
            alive = [c for c in alive if c not in gone]
            self.result["stats"].append(stats)
            self.result["errors"].append(errors)
            measured = len(stats) - stats.count(None)
            rank_zero_info(f"search_schedule: step {step}: " + (f"measured {measured} candidates" if measured else
                                                                 "only the full sequence left, nothing to measure"))


def measure_checkpoints(
    model: LightningModule, datamodule: Any, settings: dict[str, Any], checkpoints: Sequence[tuple[float, int, str]],
    candidates: Sequence[tuple[float, int]], *, batches: int = 3, total_steps: int | None = None,
    patch_mode: str = "flexi", vit_path: str | None = None, seed: int = 0, drop_dominated: bool = True,
    drop_falling_behind: bool = False,
) -> dict[str, Any]:
    """Per checkpoint (rows), the `gradient_error_stats` (``stats``) and cost-adjusted ``errors`` of every
    candidate (columns) still measured there (``None`` where dropped), the candidates'
    ``relative_costs`` and the CPU seconds. Dropping: `dominated_candidates` (``drop_dominated``) and
    `falling_behind` (``drop_falling_behind``: only where no budget asks for cheap candidates).

    The module runs inside a fit of the config's length that stops before its first step, so
    ``total_steps`` (the run that wrote the checkpoints) must match it."""
    options = {"patch_mode": patch_mode, "vit_path": vit_path, "seed": seed, "drop_dominated": drop_dominated,
               "drop_falling_behind": drop_falling_behind,
               "dir": os.path.dirname(checkpoints[0][2]) if checkpoints else None}
    measuring = _MeasureAtStart(checkpoints, total_steps, candidates, batches, options)
    trainer = _trainer(settings, [measuring])
    start = time.process_time()
    trainer.fit(model, datamodule)
    return {**measuring.result, "cpu_seconds": time.process_time() - start}


def _trainer(settings: dict[str, Any], callbacks: list[Callback]) -> Trainer:
    """A quiet one-device Trainer of the config's length and step settings, without validation."""
    length = ({"max_steps": settings["max_steps"]} if settings["max_steps"] and settings["max_steps"] > 0
              else {"max_epochs": settings["max_epochs"]})
    return Trainer(
        accelerator=settings["accelerator"], devices=1, callbacks=callbacks, logger=False, enable_checkpointing=False,
        limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=settings["gradient_clip_val"], accumulate_grad_batches=settings["accumulate_grad_batches"],
        limit_train_batches=settings["limit_train_batches"],
        **({"precision": settings["precision"]} if settings["precision"] else {}), **length,
    )


# ------------------------------------------------------------------------------------------ driver
def load_config(config_path: str, overrides: Sequence[str]) -> tuple[LightningModule, Any, dict[str, Any]]:
    """The config's model and data module (its callbacks and loggers left out) and its trainer settings, as
    ``train.py`` would build them with ``overrides`` (command-line style); what a benchmark or a search uses
    to train or probe a config without its loggers."""
    from stacktrain.cli import StackCLI

    with open(config_path, encoding="utf-8") as handle:
        config = yaml.safe_load(handle) or {}
    trainer_config = dict(config.get("trainer") or {})
    stripped = dict(config)
    stripped["trainer"] = {k: v for k, v in trainer_config.items() if k not in ("callbacks", "logger")}
    stripped["trainer"].update(logger=False, enable_checkpointing=False)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(stripped, handle)
        temporary = handle.name
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI reads only `args` here, not our own command line
    try:
        cli = StackCLI(args=["--config", temporary, *overrides], run=False, save_config_callback=None)
    finally:
        sys.argv = argv
        os.unlink(temporary)
    trainer = cli.trainer
    settings = {"max_epochs": trainer.max_epochs, "max_steps": trainer.max_steps,
                "gradient_clip_val": trainer.gradient_clip_val,
                "accumulate_grad_batches": trainer.accumulate_grad_batches,
                "limit_train_batches": trainer.limit_train_batches,
                "limit_val_batches": trainer.limit_val_batches,
                "accelerator": trainer_config.get("accelerator", "auto"),
                "precision": trainer_config.get("precision")}
    return cli.model, cli.datamodule, settings



def make_candidates(model: LightningModule, datamodule: Any, keep_ratios: Sequence[float], patch_scales: Sequence[int],
                    vit_path: str | None = None) -> list[tuple[float, int]]:
    """``keep_ratios x patch_scales`` (checked against the model's ViT and the data's image sizes before
    anything runs), the full sequence first."""
    for keep in keep_ratios:
        check_keep_ratio(keep, "--keep-ratios", source=SOURCE)
    _, vit = select_vit(model, vit_path, source=SOURCE)
    image_sizes = getattr(datamodule, "view_sizes", None) or (
        [tuple(datamodule.image_shape[-2:])] if getattr(datamodule, "image_shape", None) else [])
    patch_size = ViTCostModel.from_vit(vit).patch_size
    for scale in patch_scales:
        check_patch_scale(scale, image_sizes, patch_size, "--patch-scales", source=SOURCE)
    grid = [(float(k), int(s)) for s in sorted(set(patch_scales)) for k in sorted(set(keep_ratios), reverse=True)]
    return [FULL, *[c for c in grid if c != FULL]]


def _check_arguments(budget: float | None, out: str, batches: int, patch_mode: str, checkpoints: str | None) -> None:
    """Everything that can be refused before a model is built."""
    if budget is not None:
        require_number(budget, "--budget", source=SOURCE, low=0.0, low_inclusive=False,
                       fix="give the mean relative step cost over training, e.g. 0.4, or leave it out")
    require_number(batches, "--batches", source=SOURCE, low=2, integer=True,
                   fix="give at least 2 measurement batches (3 or 4 is enough)")
    if patch_mode not in PATCH_MODES:
        raise StackError("is not a patch scaling mode", source=SOURCE, key="--patch-mode", value=patch_mode,
                         fix=f"use one of {list(PATCH_MODES)}")
    if os.path.exists(out):
        raise StackError("already exists; the search never overwrites a schedule", source=SOURCE, key="--out",
                         value=out, fix="give a new file name or move the old file away")
    if checkpoints is not None:
        _read_index(checkpoints)
    elif os.path.exists(os.path.join(_own_checkpoints(out), INDEX)):
        raise StackError("already holds the checkpoints of an earlier search; they are never overwritten",
                         source=SOURCE, key="checkpoint folder", value=_own_checkpoints(out),
                         fix=f"reuse them with --checkpoints {_own_checkpoints(out)}, or move them away")


def _own_checkpoints(out: str) -> str:
    """Where a search that trains its own run puts the checkpoints: beside ``out``."""
    return os.path.splitext(out)[0] + ".checkpoints"


def _train_with_checkpoints(model: LightningModule, datamodule: Any, settings: dict[str, Any],
                            points: Sequence[float], dirpath: str) -> float:
    """The config's full-sequence run with `ProgressCheckpoints` into ``dirpath``; its CPU seconds.
    Only when no checkpoints were given: then this training is part of the search's cost."""
    start = time.process_time()
    _trainer(settings, [ProgressCheckpoints(points, dirpath)]).fit(model, datamodule)
    return time.process_time() - start


def search_schedule(
    config: str,
    budget: float | None,
    out: str,
    *,
    checkpoints: str | None = None,
    points: Sequence[float] = DEFAULT_POINTS,
    keep_ratios: Sequence[float] = (1.0, 0.75, 0.5, 0.25),
    patch_scales: Sequence[int] = (1, 2),
    batches: int = 3,
    patch_mode: str = "flexi",
    vit_path: str | None = None,
    seed: int = 0,
    drop_dominated: bool = True,
    overrides: Sequence[str] = (),
    plot: bool = True,
) -> dict[str, Any]:
    """Measure on ``checkpoints`` (a `ProgressCheckpoints` folder of a run of this config; without it,
    train that run here into ``<out stem>.checkpoints/``), choose, and write ``out`` (YAML) and
    ``<out stem>.png``. Returns the file's content.

    ``budget``: optional cap on the mean relative step cost (``None``: the paper's rule alone).
    ``points``: where to checkpoint when the search trains its own run (ignored with ``checkpoints``).
    ``drop_dominated``: stop measuring `dominated_candidates` and, without a budget, candidates
    `falling_behind` the full sequence. ``overrides``: LightningCLI arguments for the config (with
    ``checkpoints``, those of the run that wrote them). ``content["search"]`` holds the search's own
    CPU seconds (up to writing the file; the plot after it is not counted), the CPU seconds of the
    training that wrote the checkpoints and their ratio ``cost_ratio``."""
    start = time.process_time()
    _check_arguments(budget, out, batches, patch_mode, checkpoints)
    points = _check_points(points)
    model, datamodule, settings = load_config(config, overrides)
    candidates = make_candidates(model, datamodule, keep_ratios, patch_scales, vit_path)
    training_seconds = None
    if checkpoints is None:
        checkpoints = _own_checkpoints(out)
        training_seconds = _train_with_checkpoints(model, datamodule, settings, points, checkpoints)
    index = _read_index(checkpoints)
    found = load_progress_checkpoints(checkpoints)
    measured = measure_checkpoints(model, datamodule, settings, found, candidates, batches=batches,
                                   total_steps=index.get("total_steps"), patch_mode=patch_mode, vit_path=vit_path,
                                   seed=seed, drop_dominated=drop_dominated,
                                   drop_falling_behind=drop_dominated and budget is None)
    errors = measured["errors"]
    phases, mean_cost = choose_phases([p for p, _, _ in found], errors, measured["relative_costs"], candidates, budget)
    schedule = AccelerationSchedule(phases=phases, source=SOURCE)
    search_seconds = time.process_time() - start - (training_seconds or 0.0)
    content = {"patch_mode": patch_mode, "budget": None if budget is None else float(budget),
               "expected_cost": round(float(mean_cost), 4), "config": config,
               "search": _search_cost(checkpoints, index, measured, search_seconds, training_seconds),
               "measurements": _measurement_tables(found, candidates, measured, errors)}
    _write(out, schedule, content, plot)
    return content


def _search_cost(checkpoints: str, index: dict[str, Any], measured: dict[str, Any], search_seconds: float,
                 training_seconds: float | None) -> dict[str, Any]:
    """Where the search measured and what it cost: its own CPU seconds (everything but a training it
    did itself) over the CPU seconds of the training that wrote the checkpoints, when the index has it."""
    baseline = index.get("cpu_seconds")
    return {"checkpoints": checkpoints, "trained_here": training_seconds is not None,
            "batches": measured["batches"], "cpu_seconds": round(search_seconds, 2),
            "cpu_seconds_measuring": round(measured["cpu_seconds"], 2),
            "cpu_seconds_training_here": None if training_seconds is None else round(training_seconds, 2),
            "baseline_training_cpu_seconds": None if baseline is None else round(float(baseline), 2),
            "cost_ratio": round(search_seconds / baseline, 4) if baseline else None}


def _measurement_tables(found: Sequence[tuple[float, int, str]], candidates: Sequence[tuple[float, int]],
                        measured: dict[str, Any], errors: list[list[float | None]]) -> dict[str, Any]:
    """Rows per checkpoint, columns per candidate (``None``: dropped as dominated before that point)."""
    def table(key: str) -> list[list[float | None]]:
        return [[None if s is None else round(float(s[key]), 6) for s in row] for row in measured["stats"]]

    return {
        "progress": [p for p, _, _ in found],  # exact step / total: the phase ends
        "steps": [step for _, step, _ in found],
        "candidates": [{"keep_ratio": k, "patch_scale": s, "relative_cost": round(c, 4)}
                       for (k, s), c in zip(candidates, measured["relative_costs"])],
        "cost_adjusted_error": [[None if e is None else round(e, 6) for e in row] for row in errors],
        "bias2": table("bias2"),
        "variance": table("variance"),
        "one_minus_cosine": table("one_minus_cosine"),
        "relative_l2": table("relative_l2"),
        "full_variance": [None if row[0] is None else round(float(row[0]["full_variance"]), 6)
                          for row in measured["stats"]],
    }


def _write(out: str, schedule: AccelerationSchedule, content: dict[str, Any], plot: bool) -> None:
    """The schedule file (phases first, for `TokenDropout(schedule_file=...)`) and its plot."""
    budget = "" if content["budget"] is None else f" --budget {content['budget']}"
    header = (
        "Acceleration schedule for stacktrain.callbacks.TokenDropout(schedule_file=...), written by\n"
        f"python -m stacktrain.search_schedule --config {content['config']}{budget}\n"
        "phases: until `end` (fraction of training) keep `keep_ratio` of the patch tokens at `patch_scale`.\n"
        "expected_cost: mean training-step FLOPs over training relative to the full sequence.\n"
        "search: where it measured and its own CPU seconds (cost_ratio: over the baseline training's).\n"
        "measurements: per checkpoint (rows) and candidate (columns); cost_adjusted_error =\n"
        "(bias2 + relative_cost * variance) / full_variance, 1 for the full sequence; null: dropped."
    )
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    write_schedule_file(out, schedule, header, **content)
    if plot:
        plot_search(os.path.splitext(out)[0] + ".png", content, schedule)
    rank_zero_info(f"search_schedule: wrote {out}: {[p.as_dict() for p in schedule.phases]} "
                   f"(mean cost {content['expected_cost']:.3f})")


def plot_search(path: str, content: dict[str, Any], schedule: AccelerationSchedule) -> None:
    """Error against cost at every checkpoint (candidates chosen around it filled), and the schedule."""
    from matplotlib.figure import Figure

    measured = content["measurements"]
    progress = measured["progress"]
    candidates = measured["candidates"]
    costs = [c["relative_cost"] for c in candidates]
    panels = len(progress) + 1
    columns = min(5, panels)
    rows = math.ceil(panels / columns)
    figure = Figure(figsize=(3.2 * columns, 2.9 * rows), dpi=100)
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for index, point in enumerate(progress):
        axis = axes[index]
        chosen = {schedule.at(min(point, 1 - 1e-9)), schedule.at(max(point - 1e-9, 0.0))}
        for c, candidate in enumerate(candidates):
            key = (candidate["keep_ratio"], candidate["patch_scale"])
            error = measured["cost_adjusted_error"][index][c]
            if error is None:  # dropped as dominated at an earlier checkpoint
                continue
            marker = "s" if candidate["patch_scale"] > 1 else "o"
            axis.scatter([costs[c]], [max(error, 1e-4)], marker=marker, s=40,
                         facecolors="#dd8452" if key in chosen else "none", edgecolors="#4c72b0")
            axis.annotate(f"{candidate['keep_ratio']:g}/{candidate['patch_scale']}", (costs[c], max(error, 1e-4)),
                          fontsize=6, xytext=(3, 2), textcoords="offset points")
        axis.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        axis.set_yscale("log")
        axis.set_title(f"{point:.0%} of training (step {measured['steps'][index]})", fontsize=8)
        axis.set_xlabel("relative step cost", fontsize=7)
        axis.set_ylabel("cost-adjusted error", fontsize=7)
        axis.tick_params(labelsize=6)
    axis = axes[len(progress)]
    grid = [i / 400 for i in range(401)]
    axis.step(grid, [schedule.at(min(t, 1 - 1e-9))[0] for t in grid], where="post", label="keep ratio")
    axis.step(grid, [1 / schedule.at(min(t, 1 - 1e-9))[1] for t in grid], where="post", label="1 / patch scale")
    axis.set_ylim(0, 1.05)
    budget = "none" if content["budget"] is None else f"{content['budget']:g}"
    axis.set_title(f"schedule (mean cost {content['expected_cost']:.2f}, budget {budget})", fontsize=8)
    axis.set_xlabel("fraction of training", fontsize=7)
    axis.legend(fontsize=6)
    for extra in axes[len(progress) + 1:]:
        extra.set_visible(False)
    figure.suptitle("gradient error per unit of compute (markers: keep ratio / patch scale; filled: chosen)", fontsize=9)
    figure.tight_layout()
    figure.savefig(path)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """``python -m stacktrain.search_schedule``: the search's options, then any LightningCLI override of
    the config; a `StackError` ends it with exit code 2 and its message. Returns the file's content."""
    parser = argparse.ArgumentParser(
        prog="python -m stacktrain.search_schedule", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("--config", required=True, help="the LightningCLI config of the run to accelerate")
    parser.add_argument("--budget", type=float, default=None,
                        help="optional cap on the mean training-step cost over training, relative to the full "
                             "sequence (e.g. 0.4); default: the paper's rule alone")
    parser.add_argument("--out", required=True, help="the schedule YAML to write (and <stem>.png)")
    parser.add_argument("--checkpoints", default=None,
                        help="a folder written by ProgressCheckpoints during a run of this config (default: train "
                             "that run here into <out stem>.checkpoints/)")
    parser.add_argument("--points", type=_floats, default=list(DEFAULT_POINTS),
                        help="fractions of training to checkpoint at when training here (default %(default)s)")
    parser.add_argument("--keep-ratios", type=_floats, default=[1.0, 0.75, 0.5, 0.25])
    parser.add_argument("--patch-scales", type=lambda t: [int(v) for v in t.split(",") if v.strip()], default=[1, 2])
    parser.add_argument("--batches", type=int, default=3, help="measurement batches per checkpoint (default 3)")
    parser.add_argument("--patch-mode", default="flexi", choices=list(PATCH_MODES))
    parser.add_argument("--vit-path", default=None, help="attribute path of the ViT when the model has several")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-dominated", action="store_true",
                        help="measure every candidate at every checkpoint (default: drop dominated ones and, "
                             "without --budget, those falling behind the full sequence)")
    parser.add_argument("--no-plot", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    try:
        return search_schedule(
            args.config, args.budget, args.out, checkpoints=args.checkpoints, points=args.points,
            keep_ratios=args.keep_ratios, patch_scales=args.patch_scales, batches=args.batches,
            patch_mode=args.patch_mode, vit_path=args.vit_path, seed=args.seed,
            drop_dominated=not args.keep_dominated, overrides=overrides, plot=not args.no_plot,
        )
    except StackError as error:
        if os.environ.get("STACKTRAIN_TRACEBACK"):
            raise
        print(f"stacktrain: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
