"""Search an acceleration schedule for `TokenDropout` by measuring gradient estimation error against cost.

    python -m stacktrain.search_schedule --config configs/simclr_token_dropout.yaml --budget 0.3 \\
        --out configs/schedules/simclr_digits.yaml

writes the schedule (YAML, for ``TokenDropout(schedule_file=...)``) and ``<out>.png`` (error against
cost at every checkpoint, and the chosen schedule).

The procedure (after Lin et al., NeurIPS 2024, "Accelerating Augmentation Invariance Pretraining"):

1. **Calibration run.** The config's model and data are trained at the full sequence for
   ``--calibration-fraction`` of the config's training length (the LR schedule shrinks with it, so the
   short run passes through the same phases: warm-up, peak, decay). Callbacks and loggers of the config
   are left out.
2. **Checkpoints.** At fractions ``--points`` of the calibration run (dense early: the error of a
   compression changes fastest in the first steps) the search measures, on ``--batches`` fixed training
   batches, the gradient of the module's training loss w.r.t. all trainable parameters: once at the
   full sequence, and once per candidate compression ``(keep ratio, patch scale)`` from
   ``--keep-ratios`` x ``--patch-scales`` with fresh random token masks per batch. The model state is
   restored before every measurement (EMA teachers, BatchNorm statistics and DINO's centre included),
   and the global RNG is the same for every candidate on a batch, so only the compression differs.
3. **Errors.** Per candidate and checkpoint (`gradient_error_stats`): ``1 - cos`` and relative L2 to the
   full-sequence gradient of the same batch, the squared bias (systematic error) and the variance of
   the compressed estimate, and the batch-to-batch variance of the full one.
4. **Cost.** The FLOPs of the module's whole training step (forward and backward, teacher included)
   under each candidate, from the shared FLOP counter, relative to the full sequence.
5. **Choice.** The cost-adjusted error ``(bias^2 + cost x variance) / full variance``
   (`cost_adjusted_error`: the mean squared error one unit of compute buys; 1 for the full sequence)
   is averaged over each phase's two end checkpoints; `choose_phases` then picks one candidate per phase
   minimising the summed error subject to the mean relative cost over training ``<= --budget``.

The schedule is in fractions of training, so it applies to the full-length run unchanged.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

from stacktrain.errors import StackError, require_number
from stacktrain.functional.acceleration_schedule import (
    AccelerationSchedule,
    choose_phases,
    cost_adjusted_error,
    gradient_error_stats,
    write_schedule_file,
)
from stacktrain.functional.flops import flop_counter
from stacktrain.functional.token_drop import (
    PATCH_MODES,
    SequenceCompression,
    ViTCostModel,
    check_keep_ratio,
    check_patch_scale,
    install_sequence_compression,
    select_vit,
)

__all__ = ["GradientProbe", "search_schedule", "main"]

DEFAULT_POINTS = (0.0, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
SOURCE = "search_schedule"


class GradientProbe(Callback):
    """Measures, during a full-sequence training run, every candidate compression's gradient error and
    cost at the given fractions of training (procedure in the module docstring)."""

    def __init__(
        self,
        points: Sequence[float],
        candidates: Sequence[tuple[float, int]],
        batches: int = 6,
        patch_mode: str = "flexi",
        vit_path: str | None = None,
        seed: int = 0,
    ) -> None:
        self.points = [float(p) for p in points]
        self.candidates = [(float(k), int(s)) for k, s in candidates]
        self.batches = int(batches)
        self.patch_mode = patch_mode
        self.vit_path = vit_path
        self.seed = int(seed)
        self.compression: SequenceCompression | None = None
        self.generator = torch.Generator()
        #: per point: {"progress", "step", "stats": [per candidate dict]}
        self.measurements: list[dict[str, Any]] = []
        self.relative_costs: list[float] = []
        self.vit_relative_costs: list[float] = []
        self.measure_seconds = 0.0
        self._steps: dict[int, float] = {}
        self._batches: list[Any] = []

    # ------------------------------------------------------------------------------------ hooks
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.compression is not None:
            return
        _, vit = select_vit(pl_module, self.vit_path, source=SOURCE)
        self.generator = torch.Generator(device=trainer.strategy.root_device)
        self.compression = install_sequence_compression(
            vit, patch_scaling=any(s > 1 for _, s in self.candidates), patch_mode=self.patch_mode,  # type: ignore[arg-type]
            generator=self.generator, source=SOURCE,
        )

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.compression is not None:
            self.compression.remove()
            self.compression = None

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not pl_module.automatic_optimization:
            raise StackError("needs a module with automatic optimization (training_step returns the loss)",
                             source=SOURCE, key="model", value=type(pl_module).__name__)
        total = int(trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches)
        self._steps = {}
        for point in self.points[:-1]:
            self._steps.setdefault(int(round(point * total)), point)
        loader = trainer.datamodule.train_dataloader() if trainer.datamodule is not None else trainer.train_dataloader
        iterator = iter(loader)
        self._batches = []
        for _ in range(self.batches):
            try:
                self._batches.append(trainer.strategy.batch_to_device(next(iterator)))
            except StopIteration:
                break
        if len(self._batches) < 2:
            raise StackError("needs at least 2 training batches to measure gradient noise", source=SOURCE,
                             key="--batches", value=self.batches, fix="use more data or a smaller batch size")
        self._measure_costs(pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        point = self._steps.pop(trainer.global_step, None)
        if point is not None:
            self._measure(trainer, pl_module, point)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._measure(trainer, pl_module, self.points[-1])

    # ------------------------------------------------------------------------------------ measuring
    def _gradient(self, pl_module: LightningModule, batch: Any, compression: tuple[float, int], rng_seed: int,
                  mask_seed: int) -> torch.Tensor:
        """The flattened gradient of the training loss on ``batch`` under ``compression``; the global RNG
        (model dropout) is seeded with ``rng_seed``, the token masks with ``mask_seed``."""
        assert self.compression is not None
        self.compression.set(*compression)
        self.generator.manual_seed(mask_seed)
        params = [p for p in pl_module.parameters() if p.requires_grad]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng_seed)
            output = pl_module.training_step(batch, 0)
        loss = output["loss"] if isinstance(output, dict) else output
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])

    def _silenced(self, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        pl_module.log = lambda *args, **kwargs: None  # type: ignore[method-assign]
        pl_module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
        return {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def _restore(self, pl_module: LightningModule, snapshot: dict[str, torch.Tensor], done: bool = False) -> None:
        pl_module.load_state_dict(snapshot)
        if done:
            del pl_module.log, pl_module.log_dict
            assert self.compression is not None
            self.compression.set(1.0, 1)
            for parameter in pl_module.parameters():
                parameter.grad = None

    def _measure_costs(self, pl_module: LightningModule) -> None:
        assert self.compression is not None
        snapshot = self._silenced(pl_module)
        flops = []
        for candidate in [(1.0, 1), *self.candidates]:
            self.compression.set(*candidate)
            with flop_counter() as counter:
                output = pl_module.training_step(self._batches[0], 0)
                (output["loss"] if isinstance(output, dict) else output).backward()
            flops.append(float(counter.get_total_flops()))
            for parameter in pl_module.parameters():
                parameter.grad = None
            self._restore(pl_module, snapshot)
        self._restore(pl_module, snapshot, done=True)
        self.relative_costs = [f / flops[0] for f in flops[1:]]
        cost_model = self.compression.cost_model
        self.vit_relative_costs = [cost_model.relative_cost(k, s, self.patch_mode) for k, s in self.candidates]

    def _measure(self, trainer: Trainer, pl_module: LightningModule, point: float) -> None:
        start = time.process_time()
        was_training = pl_module.training
        pl_module.train()
        snapshot = self._silenced(pl_module)
        try:
            full = []
            rng_seeds = [self.seed * 1000 + len(self.measurements) * 100 + index for index in range(len(self._batches))]
            for batch, rng_seed in zip(self._batches, rng_seeds):
                full.append(self._gradient(pl_module, batch, (1.0, 1), rng_seed, 0))
                self._restore(pl_module, snapshot)
            full_grads = torch.stack(full)
            stats = []
            for number, candidate in enumerate(self.candidates):
                if candidate == (1.0, 1):
                    stats.append(gradient_error_stats(full_grads, full_grads))
                    continue
                grads = []
                for batch, rng_seed in zip(self._batches, rng_seeds):
                    grads.append(self._gradient(pl_module, batch, candidate, rng_seed, rng_seed * 100 + number))
                    self._restore(pl_module, snapshot)
                stats.append(gradient_error_stats(full_grads, torch.stack(grads)))
        finally:
            self._restore(pl_module, snapshot, done=True)
            pl_module.train(was_training)
        self.measurements.append({"progress": point, "step": trainer.global_step, "stats": stats})
        self.measure_seconds += time.process_time() - start
        rank_zero_info(f"search_schedule: measured {len(self.candidates)} candidates at {point:.0%} of training "
                       f"(step {trainer.global_step})")


# ------------------------------------------------------------------------------------------ driver
def _load(config_path: str, overrides: Sequence[str]) -> tuple[LightningModule, Any, dict[str, Any]]:
    """The config's model and data module (its callbacks and loggers left out) and its trainer settings."""
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


def search_schedule(
    config: str,
    budget: float,
    out: str,
    *,
    calibration_fraction: float = 0.25,
    points: Sequence[float] = DEFAULT_POINTS,
    keep_ratios: Sequence[float] = (1.0, 0.75, 0.5, 0.25),
    patch_scales: Sequence[int] = (1, 2),
    batches: int = 6,
    patch_mode: str = "flexi",
    vit_path: str | None = None,
    seed: int = 0,
    overrides: Sequence[str] = (),
    plot: bool = True,
) -> dict[str, Any]:
    """Run the search (module docstring) and write ``out`` (YAML) and ``<out stem>.png``; returns the
    file's content."""
    require_number(budget, "--budget", source=SOURCE, low=0.0, low_inclusive=False,
                   fix="give the compute budget as a fraction of the full-sequence run, e.g. 0.3")
    require_number(calibration_fraction, "--calibration-fraction", source=SOURCE, low=0.0, high=1.0,
                   low_inclusive=False)
    points = sorted({float(p) for p in points})
    if points[0] != 0.0 or points[-1] != 1.0 or len(points) < 2:
        raise StackError("must run from 0 to 1", source=SOURCE, key="--points", value=points,
                         fix="give increasing fractions starting at 0 and ending at 1, e.g. 0,0.05,0.2,0.5,1")
    if patch_mode not in PATCH_MODES:
        raise StackError("is not a patch scaling mode", source=SOURCE, key="--patch-mode", value=patch_mode,
                         fix=f"use one of {list(PATCH_MODES)}")
    for keep in keep_ratios:
        check_keep_ratio(keep, "--keep-ratios", source=SOURCE)
    if os.path.exists(out):
        raise StackError("already exists; the search never overwrites a schedule", source=SOURCE, key="--out",
                         value=out, fix="give a new file name or move the old file away")
    model, datamodule, settings = _load(config, overrides)
    _, vit = select_vit(model, vit_path, source=SOURCE)
    image_sizes = getattr(datamodule, "view_sizes", None) or (
        [tuple(datamodule.image_shape[-2:])] if getattr(datamodule, "image_shape", None) else [])
    patch_size = ViTCostModel.from_vit(vit).patch_size
    for scale in patch_scales:
        check_patch_scale(scale, image_sizes, patch_size, "--patch-scales", source=SOURCE)
    candidates = [(float(k), int(s)) for s in sorted(set(patch_scales)) for k in sorted(set(keep_ratios), reverse=True)]
    if (1.0, 1) not in candidates:
        candidates.insert(0, (1.0, 1))

    probe = GradientProbe(points, candidates, batches=batches, patch_mode=patch_mode, vit_path=vit_path, seed=seed)
    length: dict[str, Any] = {}
    if settings["max_steps"] and settings["max_steps"] > 0:
        length["max_steps"] = max(2, int(round(settings["max_steps"] * calibration_fraction)))
    else:
        epochs = settings["max_epochs"] if settings["max_epochs"] and settings["max_epochs"] > 0 else 1
        length["max_epochs"] = max(1, int(round(epochs * calibration_fraction)))
    trainer = Trainer(
        accelerator=settings["accelerator"], devices=1, callbacks=[probe], logger=False, enable_checkpointing=False,
        limit_val_batches=0, num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
        gradient_clip_val=settings["gradient_clip_val"], accumulate_grad_batches=settings["accumulate_grad_batches"],
        limit_train_batches=settings["limit_train_batches"],
        **({"precision": settings["precision"]} if settings["precision"] else {}), **length,
    )
    start = time.process_time()
    trainer.fit(model, datamodule)
    total_seconds = time.process_time() - start

    progress = [m["progress"] for m in probe.measurements]
    errors = [[cost_adjusted_error(s, cost) for s, cost in zip(m["stats"], probe.relative_costs)]
              for m in probe.measurements]
    phases, mean_cost = choose_phases(progress, errors, probe.relative_costs, candidates, budget)
    schedule = AccelerationSchedule(phases=phases, source=SOURCE)

    def table(key: str) -> list[list[float]]:
        return [[round(float(s[key]), 6) for s in m["stats"]] for m in probe.measurements]

    content = {
        "patch_mode": patch_mode,
        "budget": float(budget),
        "expected_cost": round(float(mean_cost), 4),
        "config": config,
        "calibration": {
            **length, "training_steps": int(trainer.global_step), "batches_measured": len(probe._batches),
            "cpu_seconds_total": round(total_seconds, 1), "cpu_seconds_measuring": round(probe.measure_seconds, 1),
        },
        "measurements": {
            "progress": progress,
            "steps": [m["step"] for m in probe.measurements],
            "candidates": [{"keep_ratio": k, "patch_scale": s, "relative_cost": round(c, 4),
                            "vit_relative_cost": round(v, 4)}
                           for (k, s), c, v in zip(candidates, probe.relative_costs, probe.vit_relative_costs)],
            "cost_adjusted_error": [[round(e, 6) for e in row] for row in errors],
            "one_minus_cosine": table("one_minus_cosine"),
            "relative_l2": table("relative_l2"),
            "bias2": table("bias2"),
            "variance": table("variance"),
            "full_variance": [round(float(m["stats"][0]["full_variance"]), 6) for m in probe.measurements],
        },
    }
    header = (
        "Acceleration schedule for stacktrain.callbacks.TokenDropout(schedule_file=...), written by\n"
        f"python -m stacktrain.search_schedule --config {config} --budget {budget}\n"
        "phases: until `end` (fraction of training) keep `keep_ratio` of the patch tokens at `patch_scale`.\n"
        "expected_cost: mean training-step FLOPs over training relative to the full sequence.\n"
        "measurements: per checkpoint (rows) and candidate (columns); cost_adjusted_error =\n"
        "(bias2 + relative_cost * variance) / full_variance, 1 for the full sequence."
    )
    directory = os.path.dirname(os.path.abspath(out))
    os.makedirs(directory, exist_ok=True)
    write_schedule_file(out, schedule, header, **content)
    if plot:
        plot_search(os.path.splitext(out)[0] + ".png", content, schedule)
    rank_zero_info(f"search_schedule: wrote {out}: {[p.as_dict() for p in phases]} (mean cost {mean_cost:.3f})")
    return content


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
    axis.set_title(f"schedule (mean cost {content['expected_cost']:.2f}, budget {content['budget']:g})", fontsize=8)
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
    parser = argparse.ArgumentParser(
        prog="python -m stacktrain.search_schedule", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2],
    )
    parser.add_argument("--config", required=True, help="the LightningCLI config of the run to accelerate")
    parser.add_argument("--budget", type=float, required=True,
                        help="mean training-step cost over training, relative to the full sequence (e.g. 0.3)")
    parser.add_argument("--out", required=True, help="the schedule YAML to write (and <stem>.png)")
    parser.add_argument("--calibration-fraction", type=float, default=0.25,
                        help="length of the calibration run relative to the config's (default 0.25)")
    parser.add_argument("--points", type=_floats, default=list(DEFAULT_POINTS),
                        help="checkpoints as fractions of training, comma-separated (default %(default)s)")
    parser.add_argument("--keep-ratios", type=_floats, default=[1.0, 0.75, 0.5, 0.25])
    parser.add_argument("--patch-scales", type=lambda t: [int(v) for v in t.split(",") if v.strip()], default=[1, 2])
    parser.add_argument("--batches", type=int, default=6, help="measurement batches per checkpoint")
    parser.add_argument("--patch-mode", default="flexi", choices=list(PATCH_MODES))
    parser.add_argument("--vit-path", default=None, help="attribute path of the ViT when the model has several")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plot", action="store_true")
    args, overrides = parser.parse_known_args(argv)
    try:
        return search_schedule(
            args.config, args.budget, args.out, calibration_fraction=args.calibration_fraction, points=args.points,
            keep_ratios=args.keep_ratios, patch_scales=args.patch_scales, batches=args.batches,
            patch_mode=args.patch_mode, vit_path=args.vit_path, seed=args.seed, overrides=overrides,
            plot=not args.no_plot,
        )
    except StackError as error:
        if os.environ.get("STACKTRAIN_TRACEBACK"):
            raise
        print(f"stacktrain: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
