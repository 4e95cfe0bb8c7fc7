"""`TokenDropout`: scheduled random token dropout and patch scaling for the ViT inside any LightningModule.

The math is in `stacktrain.functional.token_drop` (the modules put into the ViT, the cost model) and
`stacktrain.functional.acceleration_schedule` (schedules); this callback decides when to compress.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn

from stacktrain.errors import StackError, require_number
from stacktrain.functional.acceleration_schedule import AccelerationSchedule, read_schedule_file
from stacktrain.functional.token_drop import (
    PATCH_MODES,
    SequenceCompression,
    check_patch_scale,
    install_sequence_compression,
    select_vit,
)
from stacktrain.stack import FLOPS_PER_STEP, STACK_ORDER, TOKENS_PER_SAMPLE, Technique

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
            ``linear``, ``cosine``; see `stacktrain.functional.acceleration_schedule`) or a list of
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
    every step; reports the training FLOPs per step and tokens per sample to `EfficiencyReport`. The
    ViT's FLOPs are counted forward and backward, or forward only when no gradient flows through it
    (a frozen tower, e.g. in `PromptTunedCLIP`: dropping its tokens still saves forward compute). A
    module whose training step also spends FLOPs outside the ViT says so with a
    ``step_flops_outside_vit`` attribute (FLOPs per step); they are added to both sides of the
    FLOPs line, so its ratio is over the whole step and compounds with the module's own line.
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
        self.compression: SequenceCompression | None = None
        self.vit_name: str | None = None
        self.total_steps: int | None = None
        self.last = {"step": -1, "keep_ratio": 1.0, "patch_scale": 1}
        self._generator: torch.Generator | None = None
        self._vit: torch.nn.Module | None = None
        self._logged = False

    # ------------------------------------------------------------------------------------ set-up
    def setup_technique(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        source = type(self).__name__
        name, vit = select_vit(pl_module, self.vit_path, source=source)
        self.vit_name = name or type(vit).__name__
        geometry_patch = _patch_size(vit)
        for scale in self.schedule.patch_scales:
            check_patch_scale(scale, _image_sizes(trainer, vit), geometry_patch, source=source)
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
        self.compression = install_sequence_compression(
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

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit" and self.compression is not None:
            self.compression.remove()
            self.compression = None
        if stage == "fit":
            self._vit = None

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
        self._generator.manual_seed(_mask_seed(self.seed, trainer.global_rank, step, batch_idx))
        compression.drop.reset_counters()
        self.last = {"step": step, "keep_ratio": keep_ratio, "patch_scale": patch_scale}
        # pl_module.log costs ~0.3 ms a call: log on the steps the loggers write (Lightning's own rule,
        # as in its LearningRateMonitor) and at the first step, not on every step.
        if not self._logged or getattr(trainer._logger_connector, "should_update_logs", True):
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
        # how many, and they count on both sides.
        outside = float(getattr(pl_module, "step_flops_outside_vit", 0.0) or 0.0)
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


def _mask_seed(seed: int, rank: int, step: int, batch_idx: int) -> int:
    return ((((seed * 1_000_003) + rank) * 1_000_033 + step) * 1_000_037 + batch_idx) % (2**63 - 1)


def _patch_size(vit: torch.nn.Module) -> tuple[int, int]:
    conv = vit.patch_embed.proj if hasattr(vit, "patch_embed") else vit.conv1
    return int(conv.kernel_size[0]), int(conv.kernel_size[1])


def _image_sizes(trainer: Trainer, vit: torch.nn.Module) -> list[tuple[int, int]]:
    """The image sizes the ViT will see in training: the data module's ``view_sizes`` (multi-crop),
    else its ``image_shape``, else the ViT's own input size."""
    datamodule = getattr(trainer, "datamodule", None)
    sizes = getattr(datamodule, "view_sizes", None)
    if sizes:
        return [tuple(int(v) for v in size) for size in sizes]  # type: ignore[misc]
    shape = getattr(datamodule, "image_shape", None)
    if shape is not None:
        return [(int(shape[-2]), int(shape[-1]))]
    embed = getattr(vit, "patch_embed", None)
    size = getattr(embed, "img_size", None) if embed is not None else getattr(vit, "image_size", None)
    return [tuple(int(v) for v in size)] if size is not None else []  # type: ignore[misc]
