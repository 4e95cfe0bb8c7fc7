"""`TokenDropout`: scheduled random token dropout and patch scaling for the ViT inside any LightningModule.

The math is in `stacktrain.functional.token_dropout` (the modules put into the ViT, the cost model) and
`stacktrain.functional.token_dropout_schedule` (schedules); this callback decides when to compress.
"""

from __future__ import annotations

import math
import os
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from stacktrain.errors import StackError, require_number
from stacktrain.functional.token_dropout import (
    PATCH_MODES,
    TokenDropoutHandle,
    ViTCostModel,
    apply_token_dropout,
    check_patch_scale,
    select_vit,
)
from stacktrain.functional.token_dropout_schedule import AccelerationSchedule, first_step_at, read_schedule_file
from stacktrain.functional.seeding import mix_seed
from stacktrain.loggers import log_table_with_line
from stacktrain.stack import (
    FLOPS_PER_STEP,
    STACK_ORDER,
    TOKENS_PER_SAMPLE,
    Technique,
    flops_outside_vit,
    is_compiled,
    is_logging_step,
    run_dir,
    unique_path,
)

__all__ = ["TokenDropout"]


class TokenDropout(Technique):
    """Shortens the token sequence of a ViT during training: per-sample random token dropout (class and
    register tokens kept) and larger patches, on a schedule over training progress.

    The ViT is found in the LightningModule's module tree (a timm ``VisionTransformer`` or open_clip's
    visual ``VisionTransformer``; with several, the only trainable one, e.g. the student and not its EMA
    teacher), or given by ``vit_path`` (e.g. ``"backbone"``, ``"model.visual"``). Only training forwards
    are compressed: validation, test and predict always see the full sequence.

    Args:
        keep_ratio: fraction of patch tokens kept, in (0, 1] (the start value of ``linear``/``cosine``).
        patch_scale: patches ``patch_scale`` times larger in each direction (a whole number; the
            patch size times the scale must divide the image size).
        schedule: a named shape of the keep ratio over training progress (``constant``, ``step``,
            ``linear``, ``cosine``; see `stacktrain.functional.token_dropout_schedule`) or a list of
            phases ``[{end: 0.6, keep_ratio: 0.5, patch_scale: 2}, {end: 1.0, keep_ratio: 1.0}]``
            (``end`` is a fraction of training; after the last phase the sequence is full).
        until: where ``step``, ``linear`` and ``cosine`` reach the full sequence (fraction of training).
        schedule_file: a YAML schedule written by ``python -m stacktrain.search_schedule``; overrides
            ``schedule``.
        patch_mode: ``flexi`` (resize the patch kernel, FlexiViT) or ``resolution`` (downsample the
            image, same kernel).
        vit_path: dotted attribute path of the ViT in the module, when the search is ambiguous.
        seed: seed of the random token masks. Masks are drawn from this callback's own generator,
            reseeded every batch from (seed, rank, global step, batch index): ranks draw different
            masks, and a resumed run draws exactly the masks of the run that was never stopped.
        ordered: keep the kept tokens in their original order.

    Logs ``token_dropout/keep_ratio``, ``token_dropout/patch_scale`` and ``token_dropout/tokens_per_sample``
    every step, and once at fit start the planned schedule of the whole run (`planned_schedule`): when
    the run has a logger, the PNG ``token_dropout_schedule.png`` in the run directory and, to W&B, the
    table ``token_dropout/schedule``, its line plot ``token_dropout/schedule_plot`` and the image
    ``token_dropout/schedule_image``.

    Reports the training FLOPs per step and tokens per sample to `EfficiencyReport`. The ViT's FLOPs
    are counted forward and backward, or forward only when no gradient flows through it (a frozen
    tower, e.g. in `PromptTunedCLIP`: dropping its tokens still saves forward compute). A module whose
    training step also spends FLOPs outside the ViT says so through the stack contract
    (`stacktrain.stack.ModuleTechnique.step_flops_outside_vit`, FLOPs per step); they are added to
    both sides of the FLOPs line, so its ratio is over the whole step and compounds with the module's
    own line.
    """

    name = "token_dropout"
    stack_order = STACK_ORDER["token_dropout"]

    def __init__(
        self,
        keep_ratio: float = 0.5,
        patch_scale: int = 1,
        schedule: str | list[dict[str, int | float]] = "constant",
        until: float = 1.0,
        schedule_file: str | None = None,
        patch_mode: Literal["flexi", "resolution"] = "flexi",
        vit_path: str | None = None,
        seed: int = 0,
        ordered: bool = False,
    ) -> None:
        super().__init__()
        source = type(self).__name__
        if patch_mode not in PATCH_MODES:
            raise StackError("is not a patch scaling mode", source=source, key="patch_mode", value=patch_mode,
                             fix=f"use one of {list(PATCH_MODES)}")
        require_number(seed, "seed", source=source, integer=True)
        self.schedule_file = schedule_file
        if schedule_file is not None:
            self.schedule, content = read_schedule_file(schedule_file, source=source)
            patch_mode = content.get("patch_mode", patch_mode)
        elif isinstance(schedule, str):
            self.schedule = AccelerationSchedule(shape=schedule, keep_ratio=keep_ratio, patch_scale=patch_scale,
                                                 until=until, source=source)
        else:
            self.schedule = AccelerationSchedule(phases=schedule, source=source)
        self.patch_mode = patch_mode
        self.vit_path = vit_path
        self.seed = int(seed)
        self.ordered = ordered
        self.compression: TokenDropoutHandle | None = None
        self.vit_name: str | None = None
        self.total_steps: int | None = None
        self.last = {"step": -1, "keep_ratio": 1.0, "patch_scale": 1}
        self._generator: torch.Generator | None = None
        self._vit: torch.nn.Module | None = None
        self._logged = False
        #: under torch.compile, filled at train end: the sequence lengths the compiled ViT saw and the
        #: graphs compiled during the fit
        self.compiled_shapes: dict[str, Any] | None = None
        self._graphs_at_start = 0

    # ------------------------------------------------------------------------------------ set-up
    def setup_technique(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        source = type(self).__name__
        name, vit = select_vit(pl_module, self.vit_path, source=source)
        self.vit_name = name or type(vit).__name__
        geometry = ViTCostModel.from_vit(vit)
        for scale in self.schedule.patch_scales:
            check_patch_scale(scale, _image_sizes(trainer, geometry), geometry.patch_size, source=source)
        if stage != "fit" or self.compression is not None:
            return
        self._vit = vit
        self._generator = torch.Generator(device=trainer.strategy.root_device)
        self._generator.manual_seed(self.seed)
        self._install()

    def _install(self) -> None:
        """Put (or put back) the compression modules into the ViT for the current schedule."""
        if self.compression is not None:
            self.compression.remove()
            self.compression = None
        if self.schedule.is_noop or self._vit is None:
            return
        self.compression = apply_token_dropout(
            self._vit, patch_scaling=self.schedule.max_patch_scale > 1, patch_mode=self.patch_mode,  # type: ignore[arg-type]
            generator=self._generator, ordered=self.ordered, source=type(self).__name__,
        )

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        if self.compression is None:
            return
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else trainer.estimated_stepping_batches
        if not math.isfinite(total) or total <= 0:
            if self.schedule.shape == "constant":
                total = 1
            else:
                raise StackError(
                    "needs the length of training for its schedule, which is unknown", source=type(self).__name__,
                    key="trainer.max_epochs/max_steps", value=None,
                    fix="set trainer.max_epochs or trainer.max_steps, or use schedule: constant",
                )
        self.total_steps = int(total)
        self._logged = False
        self._graphs_at_start = _compiled_graphs()
        if trainer.is_global_zero and trainer.loggers and not trainer.fast_dev_run:  # fast_dev_run: dummy loggers
            self._log_planned_schedule(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Under torch.compile, say how many token-sequence shapes the compiled ViT saw and how many
        graphs the fit compiled: the dropout runs outside the graph and the blocks get a symbolic sequence
        length, so a schedule with many keep ratios does not compile once per ratio."""
        if self.compression is None or not is_compiled(pl_module):
            return
        lengths = sorted(self.compression.drop.sequence_lengths)
        graphs = _compiled_graphs() - self._graphs_at_start
        self.compiled_shapes = {"sequence_lengths": lengths, "graphs": graphs}
        rank_zero_info(
            f"TokenDropout: torch.compile: {len(lengths)} token-sequence lengths {lengths} ran through the compiled "
            f"ViT (one symbolic length after the second); {graphs} graphs compiled during this fit (the whole module's, eval included)"
        )

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self.compression is not None:
            self.compression.remove()
            self.compression = None
        if stage == "fit":
            self._vit = None

    # ------------------------------------------------------------------------------------ the plan
    def planned_schedule(self, points: int = 200) -> list[dict[str, float | int]]:
        """The compression this run will apply: one row (step, progress, keep_ratio, patch_scale,
        tokens_per_sample) for every step of a run of at most ``points`` steps; for a longer run,
        ``points`` evenly spaced steps (the first and the last included) plus the last step before and
        the first step from each of the schedule's breakpoints, so a jump stays sharp. Empty before
        fit start and for a schedule that compresses nothing."""
        if points < 2:
            raise ValueError(f"points must be at least 2 (the first and the last step), got {points}")
        if self.compression is None or self.total_steps is None:
            return []
        total = self.total_steps
        last = total - 1
        if total <= points:
            steps = set(range(total))
        else:
            steps = {round(i * last / (points - 1)) for i in range(points)}
            for progress in self.schedule.breakpoints:
                first = first_step_at(progress, total)
                steps.update(step for step in (first - 1, first) if 0 <= step <= last)
        cost = self.compression.cost_model
        rows: list[dict[str, float | int]] = []
        for step in sorted(steps):
            keep_ratio, patch_scale = self.compression_at(step)
            rows.append({"step": step, "progress": step / total, "keep_ratio": keep_ratio, "patch_scale": patch_scale,
                         "tokens_per_sample": cost.sequence(keep_ratio, patch_scale)[1]})
        return rows

    def _log_planned_schedule(self, trainer: Trainer) -> None:
        """Once per fit, on rank zero: the planned schedule as a PNG in the run directory and, to every
        W&B logger, as a table, a line plot of the keep ratio and the image."""
        rows = self.planned_schedule()
        if not rows:
            return
        path = unique_path(os.path.join(run_dir(trainer), "token_dropout_schedule.png"))
        self.plot_schedule(rows, path)
        columns = list(rows[0])
        data = [[row[column] for column in columns] for row in rows]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                log_table_with_line(logger, f"{self.name}/schedule", columns, data, x="step", y="keep_ratio",
                                    title="token_dropout: planned keep ratio per step")
                logger.log_image(key=f"{self.name}/schedule_image", images=[path])

    def plot_schedule(self, rows: list[dict[str, float | int]], path: str) -> None:
        """Keep ratio (left axis) and tokens per sample through the blocks (right axis) over the steps."""
        from matplotlib.figure import Figure

        steps = [row["step"] for row in rows]
        figure = Figure(figsize=(6, 3.5), dpi=100)
        axes = figure.subplots()
        axes.plot(steps, [row["keep_ratio"] for row in rows], color="tab:blue", label="keep ratio")
        axes.set_ylim(0, 1.05)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel("keep ratio", color="tab:blue")
        tokens = axes.twinx()
        tokens.plot(steps, [row["tokens_per_sample"] for row in rows], color="tab:orange", linestyle="--",
                    label="tokens per sample")
        tokens.set_ylim(0, None)
        tokens.set_ylabel("tokens per sample", color="tab:orange")
        axes.set_title(f"token_dropout: planned schedule ({self.total_steps} steps)")
        figure.tight_layout()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        figure.savefig(path)

    # ------------------------------------------------------------------------------------ per step
    def compression_at(self, step: int) -> tuple[float, int]:
        """The schedule's ``(keep_ratio, patch_scale)`` at optimizer step ``step`` of this run."""
        total = self.total_steps or 1
        return self.schedule.at(min(step / total, 1.0))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        compression = self.compression
        if compression is None:
            return
        step = trainer.global_step
        keep_ratio, patch_scale = self.compression_at(step)
        compression.set(keep_ratio, patch_scale)
        assert self._generator is not None
        self._generator.manual_seed(mix_seed(self.seed, trainer.global_rank, step, batch_idx))
        compression.drop.reset_counters()
        self.last = {"step": step, "keep_ratio": keep_ratio, "patch_scale": patch_scale}
        # pl_module.log costs ~0.3 ms a call: log on the steps the loggers write (Lightning's own rule,
        # as in its LearningRateMonitor) and at the first step, not on every step.
        if not self._logged or is_logging_step(trainer):
            self._logged = True
            tokens = compression.cost_model.sequence(keep_ratio, patch_scale)[1]
            self.log_metric(pl_module, "keep_ratio", keep_ratio)
            self.log_metric(pl_module, "patch_scale", float(patch_scale))
            self.log_metric(pl_module, "tokens_per_sample", float(tokens))

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        compression = self.compression
        if compression is None or compression.drop.samples == 0:
            return
        drop = compression.drop
        # The ratio must be over the whole step for the report to compound it with the module's own
        # line: a module whose step spends FLOPs outside this ViT (PromptTunedCLIP's text tower) says
        # how many (`ModuleTechnique.step_flops_outside_vit`), and they count on both sides.
        outside = flops_outside_vit(pl_module)
        self.report_cost(trainer, FLOPS_PER_STEP, baseline=drop.flops_full + outside, actual=drop.flops + outside,
                         unit="FLOP")
        self.report_cost(trainer, TOKENS_PER_SAMPLE, baseline=drop.tokens_full / drop.samples,
                         actual=drop.tokens / drop.samples)

    # ------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {
            "seed": self.seed,
            "schedule": self.schedule.as_dict(),
            "patch_mode": self.patch_mode,
            "last": dict(self.last),
            "generator": self._generator.get_state() if self._generator is not None else torch.empty(0, dtype=torch.uint8),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = AccelerationSchedule.from_dict(state_dict["schedule"])
        saved_differs = saved != self.schedule
        if saved_differs:
            rank_zero_warn(
                f"TokenDropout: the checkpoint's schedule {saved.as_dict()} differs from the configured "
                f"{self.schedule.as_dict()}; continuing the checkpoint's schedule so the run resumes exactly"
            )
            self.schedule = saved
        mode = state_dict.get("patch_mode", self.patch_mode)
        reinstall = saved_differs or mode != self.patch_mode
        self.seed = int(state_dict["seed"])
        self.patch_mode = mode
        self.last = dict(state_dict["last"])
        if reinstall and self._vit is not None:
            self._install()
        # The generator is reseeded from (seed, rank, step, batch) at every batch: no state to restore.


def _compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far (torch._dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _image_sizes(trainer: Trainer, geometry: ViTCostModel) -> list[tuple[int, int]]:
    """The image sizes the ViT will see in training: the data module's ``view_sizes`` (multi-crop),
    else its ``image_shape``, else the ViT's own input size."""
    datamodule = getattr(trainer, "datamodule", None)
    sizes = getattr(datamodule, "view_sizes", None)
    if sizes:
        return [tuple(int(v) for v in size) for size in sizes]  # type: ignore[misc]
    shape = getattr(datamodule, "image_shape", None)
    if shape is not None:
        return [(int(shape[-2]), int(shape[-1]))]
    size = geometry.image_size
    return [(int(size[0]), int(size[1]))] if size is not None else []
