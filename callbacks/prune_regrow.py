"""`PruneRegrow`: CHEX channel exploration from scratch (prune and regrow channels during training),
with optional physical compaction when exploration ends. The math is in
`stacktrain.functional.channel_selection` and `stacktrain.functional.compaction`."""

from __future__ import annotations

import math
import os
import time
from typing import Any, Literal

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

from stacktrain.errors import StackError, require_choice, require_number
from stacktrain.functional.channel_selection import ChannelPlan, cosine_regrow_fraction, mask_digest
from stacktrain.functional.prune_regrow import Budget, apply_prune_regrow, decide_masks
from stacktrain.functional.prune_regrow_meta import PRUNE_REGROW_META_VERSION, PruneRegrowMeta
from stacktrain.functional.compact_loader import config_from_state_dict, channel_config, resize_modules
from stacktrain.functional.compaction import compact_network, remap_optimizer
from stacktrain.functional.flops import forward_flops
from stacktrain.stack import (
    FLOPS_PER_STEP,
    INFERENCE_FLOPS,
    INFERENCE_FLOPS_AVERAGE,
    STACK_ORDER,
    Technique,
    batch_size_of,
    gather_per_rank,
    notify_parameters_replaced,
    run_dir,
    step_generator,
    unique_path,
)

__all__ = ["PruneRegrow"]

#: Training FLOPs of one sample = forward + backward (about twice the forward).
TRAIN_FLOPS_PER_FORWARD = 3


class PruneRegrow(Technique):
    """CHEX: train a CNN from scratch under a FLOPs (or channel-sparsity) budget by repeatedly
    pruning and regrowing channels, then freeze the channel masks (and, optionally, remove the
    pruned channels physically so the rest of training runs faster).

    Every ``update_every`` epochs (or steps) until ``explore_until`` of training (T_max):

    1. each layer's width comes from one global ranking of BatchNorm ``|gamma|`` under the budget;
    2. inside a layer the channels to keep are chosen by column subset selection (leverage scores of
       the (C_in*k*k) x C_out weight; L1 norm where that cannot rank);
    3. a fraction ``delta_t = regrow_fraction * (1 + cos(pi t / T_max)) / 2`` of all channels is
       regrown on top of the budget, sampled with probability softmax(residual of the channel's
       weights after projection onto the kept channels); regrown channels get their most recently
       used weights and BatchNorm statistics back.

    Training starts from uniform widths ``regrow_fraction`` above the budget; the last update (at
    T_max) lands exactly on the budget. ``regrow_fraction=0`` is the paper's prune-only ablation: training
    starts dense and the same global allocation shrinks to the budget by T_max, nothing regrows. Masks are re-applied after every optimizer step. Coupled
    channels (residual adds, concatenations, depthwise and grouped convolutions, norms) are found
    with Torch-Pruning's ``DependencyGraph`` anywhere in the LightningModule; channels that are the
    module's outputs (classifier heads) are never pruned. Under DDP rank 0's decision applies on every rank.
    The update itself is `stacktrain.functional.prune_regrow.decide_masks` + ``ChannelPlan.transition``; its
    time is logged as ``prune_regrow/update_ms``.

    The network is traced on the first training batch when no input shape is known, so a
    LightningModule without ``forward`` whose ``training_step`` calls ``self.net(x)`` works: the one
    child module that holds the convolutions is traced (``module_name`` names it when there are several).

    Args:
        target_flops_ratio: forward FLOPs of the final network over the dense network's (default 0.5
            when ``channel_sparsity`` is not given).
        channel_sparsity: alternatively, the fraction of prunable channels to remove.
        update_every: how often to prune and regrow, in ``update_unit``.
        update_unit: "epoch" or "step" (optimizer steps).
        explore_until: fraction of training (T_max) after which the masks are frozen.
        regrow_fraction: delta_0, the fraction of all channels regrown at the start (cosine decay).
        criterion: "css" (column subset selection) or "l1" inside a layer.
        min_channel_ratio: every coupled group keeps at least this fraction of its channels.
        channel_multiple: round every group's allocated width to a multiple of this (1: no
            rounding). Kernels run widths like 56 or 64 faster than 61, so the compact network's
            time follows its FLOPs more closely; the budget still holds (the rounded widths are
            what is checked against it).
        compact_after_explore: remove the pruned channels physically at T_max (optimizer state cut
            to the kept channels, DDP re-wrapped), so the remaining steps are cheaper.
        ignore: module-name patterns (fnmatch) whose output channels are never pruned.
        input_shape: (C, H, W) of one input; default: the data module's ``image_shape``, the
            module's ``example_input_array``, or else the first training batch's first tensor.
        prune_residual: False leaves the residual streams whole (groups that several layers write,
            joined by adds), as the CHEX reference does; only the blocks' inner widths shrink.
        module_name: the submodule (attribute path, e.g. "net") to trace and prune; default: the
            LightningModule when it has a ``forward``, else its one child that holds convolutions.
        seed: seed of the regrow sampling (combined with the global step).
    """

    name = "prune_regrow"
    stack_order = STACK_ORDER["prune_regrow"]

    def __init__(
        self,
        target_flops_ratio: float | None = None,
        channel_sparsity: float | None = None,
        update_every: int = 1,
        update_unit: Literal["epoch", "step"] = "epoch",
        explore_until: float = 0.5,
        regrow_fraction: float = 0.3,
        criterion: Literal["css", "l1"] = "css",
        min_channel_ratio: float = 0.05,
        channel_multiple: int = 1,
        compact_after_explore: bool = False,
        ignore: list[str] | None = None,
        input_shape: list[int] | None = None,
        seed: int = 0,
        prune_residual: bool = True,
        module_name: str | None = None,
    ) -> None:
        super().__init__()
        source = type(self).__name__
        if target_flops_ratio is not None and channel_sparsity is not None:
            raise StackError(
                "and channel_sparsity are both set; the budget must be one or the other",
                source=source, key="target_flops_ratio", value=target_flops_ratio,
                fix="pass either target_flops_ratio (e.g. 0.5) or channel_sparsity (e.g. 0.5), not both",
            )
        if channel_sparsity is not None:
            require_number(channel_sparsity, "channel_sparsity", source=source, low=0.0, high=1.0, high_inclusive=False)
        else:
            target_flops_ratio = 0.5 if target_flops_ratio is None else target_flops_ratio
            require_number(target_flops_ratio, "target_flops_ratio", source=source, low=0.0, high=1.0,
                           low_inclusive=False)
        require_number(update_every, "update_every", source=source, low=1, integer=True)
        require_choice(update_unit, "update_unit", ("epoch", "step"), source=source)
        require_number(explore_until, "explore_until", source=source, low=0.0, high=1.0, low_inclusive=False)
        require_number(regrow_fraction, "regrow_fraction", source=source, low=0.0, high=1.0, high_inclusive=False)
        require_choice(criterion, "criterion", ("css", "l1"), source=source)
        require_number(min_channel_ratio, "min_channel_ratio", source=source, low=0.0, high=1.0, low_inclusive=False)
        require_number(seed, "seed", source=source, integer=True)
        require_number(channel_multiple, "channel_multiple", source=source, low=1, integer=True)
        if input_shape is not None and (
            not isinstance(input_shape, (list, tuple)) or not all(isinstance(v, int) and v > 0 for v in input_shape)
        ):
            raise StackError("must be a list of positive integers (C, H, W)", source=source, key="input_shape",
                             value=input_shape, fix="pass e.g. input_shape: [1, 16, 16]")
        if ignore is not None and (not isinstance(ignore, (list, tuple)) or not all(isinstance(v, str) for v in ignore)):
            raise StackError("must be a list of module names", source=source, key="ignore", value=ignore,
                             fix="pass e.g. ignore: [head, stem.conv] (names from model.named_modules())")
        if not isinstance(compact_after_explore, bool):
            raise StackError("must be true or false", source=source, key="compact_after_explore",
                             value=compact_after_explore, fix="use true to shrink the network once exploration ends")
        if not isinstance(prune_residual, bool):
            raise StackError("must be true or false", source=source, key="prune_residual", value=prune_residual,
                             fix="use false to keep the residual streams whole (the CHEX reference)")
        if module_name is not None and (not isinstance(module_name, str) or not module_name):
            raise StackError("must be the name of a submodule", source=source, key="module_name", value=module_name,
                             fix="pass e.g. module_name: net (a name from pl_module.named_children())")
        self.prune_residual = prune_residual
        self.module_name = module_name
        self.target_flops_ratio = target_flops_ratio
        self.channel_sparsity = channel_sparsity
        self.update_every = update_every
        self.update_unit = update_unit
        self.explore_until = explore_until
        self.regrow_fraction = regrow_fraction
        self.criterion = criterion
        self.min_channel_ratio = min_channel_ratio
        self.channel_multiple = int(channel_multiple)
        self.compact_after_explore = compact_after_explore
        self.ignore = list(ignore or [])
        self.input_shape = list(input_shape) if input_shape is not None else None
        self.seed = seed
        # set up in setup_technique
        self.plan: ChannelPlan | None = None
        self.example_shape: list[int] | None = None
        self.group_names: list[str] = []
        self.network = ""
        self.traced = ""  # the submodule whose channels are traced ("" = the LightningModule)
        self.module_class = ""
        self.dense_flops = 0
        self._hook_handle: Any = None
        # the state (state_dict)
        self.masks: list[torch.Tensor] | None = None
        self.memory: dict[str, torch.Tensor] = {}
        self.schedule: dict[str, int] | None = None
        self.last_update_step = -1
        self.history: list[dict[str, Any]] = []
        self.compacted = False
        self.compacted_at = -1
        self.compact_flops = 0
        self.layer_sizes: dict[str, dict[str, Any]] = {}
        # logging
        self._masked_flops = 0
        self._pending_widths = False
        self.update_ms: list[float] = []  # wall time of every update (decide + transition), not saved

    # --------------------------------------------------------------------------------- properties
    @property
    def active(self) -> bool:
        """False for a no-op budget (target_flops_ratio 1 or channel_sparsity 0): nothing to prune."""
        if self.channel_sparsity is not None:
            return self.channel_sparsity > 0
        return self.target_flops_ratio < 1.0

    def _budget(self) -> Budget:
        if self.channel_sparsity is not None:
            return Budget.sparsity(self.plan, self.channel_sparsity)
        return Budget.flops(self.plan, self.target_flops_ratio)

    def _net(self, pl_module: LightningModule) -> nn.Module:
        """The module whose channels are traced and masked."""
        return pl_module.get_submodule(self.traced) if self.traced else pl_module

    # --------------------------------------------------------------------------------- set-up
    def setup_technique(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.module_class = f"{type(pl_module).__module__}.{type(pl_module).__qualname__}"
        if self._hook_handle is None:
            self._hook_handle = pl_module.register_load_state_dict_pre_hook(_resize_for_compact_checkpoint)
        self.traced = _find_network(pl_module, self.module_name, type(self).__name__)
        example = self._example_input(trainer, pl_module)
        if example is not None and self.plan is None:
            self._build_plan(pl_module, example)  # before the first batch: bad budgets fail here

    def _build_plan(self, pl_module: LightningModule, example: torch.Tensor) -> None:
        """Trace the network on ``example`` (one sample) and check that the budget can be met."""
        source = type(self).__name__
        self.example_shape = list(example.shape)
        net = self._net(pl_module)
        try:
            plan = apply_prune_regrow(net, example, ignore=self.ignore, minimum_ratio=self.min_channel_ratio,
                                      prune_residual=self.prune_residual)
        except StackError:
            raise
        except Exception as error:  # the forward pass failed on the example input
            raise StackError(
                f"the network {self.traced or type(pl_module).__name__!r} failed on an input of shape "
                f"{tuple(example.shape)}: {error}",
                source=source, key="input_shape", value=self.input_shape,
                fix="pass input_shape: [C, H, W] matching the images the network takes, or module_name: <the "
                    "submodule training_step calls>",
            ) from error
        if not plan.groups:
            convs = [n for n, m in net.named_modules() if isinstance(m, nn.modules.conv._ConvNd)]
            raise StackError(
                f"has no prunable convolution channels ({len(convs)} convolution(s), none of them prunable: "
                "channel pruning needs convolutions whose outputs feed BatchNorm/convolution/linear layers, "
                "not LayerNorm/attention or the module's output)",
                source=source, key="model", value=type(pl_module).__name__,
                fix="use a CNN (e.g. model_name: resnet18, mobilenetv2_100, regnetx_002, vgg11_bn) or remove PruneRegrow",
            )
        self.plan = plan
        self.group_names = [g.name for g in plan.groups]
        self.dense_flops = plan.total_flops
        ancestor = _common_ancestor([s.module for g in plan.groups for s in g.slices])
        self.network = ".".join(p for p in (self.traced, ancestor) if p)
        self._masked_flops = plan.flops(self.masks) if self.masks is not None else plan.total_flops
        if self.active:
            self._check_reachable()

    def _check_reachable(self) -> None:
        budget, plan = self._budget(), self.plan
        minimum = budget.cost(torch.tensor(plan.minimum, dtype=torch.long))
        if minimum > budget.limit + 1e-12:
            key, value = (("channel_sparsity", self.channel_sparsity) if self.channel_sparsity is not None
                          else ("target_flops_ratio", self.target_flops_ratio))
            raise StackError(
                f"cannot be reached: with min_channel_ratio={self.min_channel_ratio} the smallest network "
                f"keeps {minimum:.3f} (layers that cannot be pruned count in full)",
                source=type(self).__name__, key=key, value=value,
                fix=f"use a budget of at least {minimum:.3f}, or lower min_channel_ratio",
            )

    def _example_input(self, trainer: Trainer, pl_module: LightningModule) -> torch.Tensor | None:
        """One zero sample of the network's input, when the settings, the model or the data module
        tell its shape; None: the first training batch will."""
        if self.input_shape is not None:
            return torch.zeros(1, *self.input_shape)
        example = getattr(pl_module, "example_input_array", None)
        if isinstance(example, torch.Tensor):
            return torch.zeros(1, *example.shape[1:], dtype=example.dtype)
        datamodule = getattr(trainer, "datamodule", None)
        shape = getattr(datamodule, "image_shape", None)
        if shape is not None:
            return torch.zeros(1, *[int(v) for v in shape])
        return None

    def _example_from_batch(self, batch: Any) -> torch.Tensor:
        tensor = _first_input(batch)
        if tensor is None:
            raise StackError(
                f"cannot find an image tensor in the first training batch ({type(batch).__name__}) to trace the "
                "network's channels and FLOPs",
                source=type(self).__name__, key="input_shape", value=None,
                fix="pass input_shape: [C, H, W] (e.g. [3, 32, 32])",
            )
        return torch.zeros(1, *tensor.shape[1:], dtype=tensor.dtype)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Plan exploration over this run's length. A run resumed with another length (``--ckpt_path``
        with a larger ``max_epochs`` / ``max_steps``) whose exploration is not over is re-planned: T_max
        becomes ``explore_until`` of the new length, so exploration covers the same fraction of the
        longer run (progress ``step / T_max`` continues from the checkpoint's step on the new length).
        Once exploration is over (masks final, or the network compacted) the masks stay as they are."""
        if not self.active:
            return
        total = trainer.estimated_stepping_batches
        if self.schedule is not None and (not math.isfinite(total) or int(total) == self.schedule["total_steps"]):
            return
        if self.schedule is not None and (self.compacted or trainer.global_step > self.schedule["t_max"]):
            self.schedule["total_steps"] = int(total)
            return
        previous = self.schedule
        self.schedule = None
        self._plan_schedule(trainer, total)
        if previous is not None:
            rank_zero_info(f"stacktrain: PruneRegrow: exploration re-planned for {self.schedule['total_steps']} steps "
                           f"(T_max {previous['t_max']} -> {self.schedule['t_max']}) at step {trainer.global_step}")

    def _plan_schedule(self, trainer: Trainer, total: float) -> None:
        if not math.isfinite(total):
            raise StackError(
                "needs the length of training to schedule exploration (T_max), which is unknown",
                source=type(self).__name__, key="trainer.max_steps", value=trainer.max_steps,
                fix="set trainer.max_epochs or trainer.max_steps",
            )
        total = int(total)
        if self.update_unit == "epoch":
            batches = trainer.num_training_batches
            if not math.isfinite(batches):
                raise StackError(
                    "counts epochs but the training data has no length", source=type(self).__name__,
                    key="update_unit", value=self.update_unit, fix="use update_unit: step",
                )
            per_epoch = max(1, math.ceil(int(batches) / trainer.accumulate_grad_batches))
            interval = self.update_every * per_epoch
        else:
            interval = self.update_every
        t_max = min(max(0, round(self.explore_until * total)), max(total - 1, 0))
        self.schedule = {"total_steps": total, "t_max": int(t_max), "interval": int(interval)}

    # --------------------------------------------------------------------------------- training
    def _due(self, step: int) -> bool:
        if self.masks is None:
            return True
        if self.schedule is None or step == self.last_update_step or step > self.schedule["t_max"]:
            return False
        return step > 0 and (step % self.schedule["interval"] == 0 or step == self.schedule["t_max"])

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.active or self.compacted:
            return
        if self.plan is None:  # no input shape was known: trace on the first real batch
            self._build_plan(pl_module, self._example_from_batch(batch))
        step = trainer.global_step
        if self._due(step) and step != self.last_update_step:
            self._update(trainer, pl_module, step)
        if (
            self.compact_after_explore and self.masks is not None and self.schedule is not None
            and step >= self.schedule["t_max"]
        ):
            self._compact(trainer, pl_module, step)

    def on_after_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if self.masks is not None and not self.compacted:
            self.plan.apply_masks(self._net(pl_module), self.masks)

    def _update(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        t_max = self.schedule["t_max"] if self.schedule is not None else 0
        delta = cosine_regrow_fraction(self.regrow_fraction, step, t_max)
        net = self._net(pl_module)
        start = time.perf_counter()
        # Every rank decides from its own (DDP-identical) weights and the step's generator; rank 0's
        # decision (`gather_per_rank`) is applied everywhere, and each rank records whether it agreed.
        local = decide_masks(net, self.plan, self.masks, self.memory, self._budget(), step=step, t_max=t_max,
                             regrow_fraction=self.regrow_fraction, generator=step_generator(self.seed, step),
                             criterion=self.criterion, multiple=self.channel_multiple)
        decided = time.perf_counter()
        masks = [m.clone() for m in gather_per_rank([m.cpu() for m in local])[0]]
        previous = self.masks
        regrown = 0 if previous is None else sum(int((n & ~o).sum()) for n, o in zip(masks, previous))
        moved = time.perf_counter()
        self.plan.transition(net, self.masks, masks, self.memory)
        # the update's own cost: deciding (allocation, CSS, regrow) and moving the weights, not the exchange between ranks
        self.update_ms.append(1000 * (decided - start + time.perf_counter() - moved))
        self.masks = masks
        self.last_update_step = step
        self._masked_flops = self.plan.flops(masks)
        self.history.append({
            "step": int(step),
            "delta": float(delta),
            "flops_ratio": float(self.plan.flops_ratio(masks)),
            "channel_sparsity": float(self.plan.channel_sparsity(masks)),
            "widths": self.plan.widths(masks),
            "regrown_units": regrown,
            "digest": mask_digest(masks),
            "local_digest": mask_digest(local),
        })
        self._pending_widths = True
        if trainer.is_global_zero:
            self._log_width_table(trainer)

    def _compact(self, trainer: Trainer, pl_module: LightningModule, step: int) -> None:
        """Remove the pruned channels; cut the optimizers' state; re-wrap DDP."""
        device = next(pl_module.parameters()).device
        example = torch.zeros(self.example_shape, device=device)
        dense_sizes = channel_config(pl_module)
        old = dict(pl_module.named_parameters())
        net = self._net(pl_module)
        # the dependency trace and the FLOPs count run the network once on a 1-sample example: eagerly,
        # or a compiled module would compile that trace (and recompile for every traced shape)
        with torch.compiler.set_stance("force_eager"):
            keep = compact_network(net, self.plan, self.masks, example)
        prefix = f"{self.traced}." if self.traced else ""
        keep = {prefix + key: value for key, value in keep.items()}
        new = dict(pl_module.named_parameters())
        for optimizer in trainer.optimizers:
            remap_optimizer(optimizer, old, new, keep)
        strategy = trainer.strategy
        from torch.nn.parallel import DistributedDataParallel

        if isinstance(strategy.model, DistributedDataParallel):
            strategy.model = pl_module  # re-wrap the smaller module, as DDPStrategy.setup does
            strategy.configure_ddp()
        self.refresh_optimizer_hooks(trainer, pl_module)
        # the other techniques (gradient hooks, per-parameter state, DDP comm hooks) follow the new tensors
        notify_parameters_replaced(trainer, pl_module, keep, source=self)
        self.layer_sizes = channel_config(pl_module, reference=dense_sizes)
        with torch.compiler.set_stance("force_eager"):
            self.compact_flops = forward_flops(net, example)
        self.compacted = True
        self.compacted_at = int(step)
        self.memory = {}
        rank_zero_info(
            f"PruneRegrow: compacted at step {step}: forward FLOPs {self.compact_flops / 1e6:.2f}M "
            f"= {self.compact_flops / max(self.dense_flops, 1):.3f} of dense"
        )

    # --------------------------------------------------------------------------------- reporting
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.plan is None and not self.compacted:
            return
        network = self.compact_flops if self.compacted else (self._masked_flops or self.dense_flops)
        self.log_metric(pl_module, "flops_ratio", network / max(self.dense_flops, 1))
        if self.history:
            self.log_metric(pl_module, "channel_sparsity", self.history[-1]["channel_sparsity"])
        if self._pending_widths and self.history:
            for name, width in zip(self.group_names, self.history[-1]["widths"]):
                self.log_metric(pl_module, f"width/{name}", float(width))
            if self.update_ms:
                self.log_metric(pl_module, "update_ms", self.update_ms[-1])
            self._pending_widths = False
        batch_size = batch_size_of(batch)
        training = self.compact_flops if self.compacted else self.dense_flops
        self.report_cost(trainer, FLOPS_PER_STEP, unit="FLOP",
                         baseline=TRAIN_FLOPS_PER_FORWARD * self.dense_flops * batch_size,
                         actual=TRAIN_FLOPS_PER_FORWARD * training * batch_size)
        # what the user gets: the network as it is now (at the end of fit, the final one)...
        self.report_cost(trainer, INFERENCE_FLOPS, unit="FLOP", baseline=self.dense_flops, actual=network, replace=True)
        # ...and, labelled as such, the average over training (wider while exploring)
        self.report_cost(trainer, INFERENCE_FLOPS_AVERAGE, unit="FLOP", baseline=self.dense_flops, actual=network)

    def _log_width_table(self, trainer: Trainer) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                rows = [[h["step"], *h["widths"]] for h in self.history]
                logger.log_table(key=f"{self.name}/widths", columns=["step", *self.group_names], data=rows)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        if not trainer.is_global_zero or not self.history:
            return
        path = unique_path(os.path.join(run_dir(trainer), "prune_regrow_widths.png"))
        self.plot_widths(path)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key=f"{self.name}/widths_heatmap", images=[path])

    def plot_widths(self, path: str) -> None:
        """Heatmap of every group's kept fraction of channels at each update."""
        from matplotlib.figure import Figure

        full = [g.channels for g in self.plan.groups] if self.plan is not None else None
        data = torch.tensor([h["widths"] for h in self.history], dtype=torch.float64).T
        if full is not None:
            data = data / torch.tensor(full, dtype=torch.float64)[:, None]
        figure = Figure(figsize=(max(6, 0.35 * data.shape[1] + 4), max(3, 0.22 * data.shape[0] + 1.5)), dpi=100)
        axes = figure.subplots()
        image = axes.imshow(data.numpy(), aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        axes.set_yticks(range(len(self.group_names)), self.group_names, fontsize=6)
        axes.set_xticks(range(len(self.history)), [str(h["step"]) for h in self.history], fontsize=6, rotation=90)
        axes.set_xlabel("optimizer step of the update")
        axes.set_title("prune_regrow: kept fraction of channels per coupled group")
        figure.colorbar(image, ax=axes)
        figure.tight_layout()
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        figure.savefig(path)

    # --------------------------------------------------------------------------------- state
    def meta(self) -> PruneRegrowMeta:
        """The run's metadata in the schema `export_compact` reads."""
        return PruneRegrowMeta(
            version=PRUNE_REGROW_META_VERSION, module_class=self.module_class, traced=self.traced, network=self.network,
            input_shape=list(self.example_shape or []), ignore=list(self.ignore), prune_residual=self.prune_residual,
            group_names=list(self.group_names), dense_flops=int(self.dense_flops), compacted=self.compacted,
            compacted_at=self.compacted_at, compact_flops=int(self.compact_flops),
            layer_sizes={k: dict(v) for k, v in self.layer_sizes.items()},
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            **self.meta().to_dict(),
            "masks": None if self.masks is None else [m.clone() for m in self.masks],
            "memory": {k: v.detach().clone() for k, v in self.memory.items()},
            "schedule": None if self.schedule is None else dict(self.schedule),
            "last_update_step": self.last_update_step,
            "history": [dict(h, widths=list(h["widths"])) for h in self.history],
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        meta = PruneRegrowMeta.from_dict(state_dict, source=type(self).__name__)
        names = list(meta.group_names)
        if self.group_names and names and names != self.group_names:
            raise StackError(
                "the checkpoint's channel groups do not match this model's (a different architecture?)",
                source=type(self).__name__, key="ckpt_path", value=names[:3],
                fix="resume with the model the checkpoint was trained with",
            )
        masks = state_dict.get("masks")
        self.masks = None if masks is None else [m.clone() for m in masks]
        self.memory = {k: v.clone() for k, v in state_dict.get("memory", {}).items()}
        self.schedule = None if state_dict.get("schedule") is None else dict(state_dict["schedule"])
        self.last_update_step = int(state_dict.get("last_update_step", -1))
        self.history = [dict(h, widths=list(h["widths"])) for h in state_dict.get("history", [])]
        self.compacted, self.compacted_at, self.compact_flops = meta.compacted, meta.compacted_at, meta.compact_flops
        self.layer_sizes = {k: dict(v) for k, v in meta.layer_sizes.items()}
        if self.plan is None:  # traced on the first batch: what the checkpoint knows until then
            self.group_names, self.dense_flops, self.network = names, meta.dense_flops, meta.network
            self.example_shape = list(meta.input_shape) or None
        if self.masks is not None and self.plan is not None:
            self._masked_flops = self.plan.flops(self.masks)


def _resize_for_compact_checkpoint(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load-state-dict pre-hook: a checkpoint written after compaction holds smaller layers; give the
    (dense) module those sizes before the weights load, so resuming and evaluating just work."""
    local = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix) and isinstance(v, torch.Tensor)}
    config = config_from_state_dict(module, local)
    if config:
        resize_modules(module, config, local)


def _convolutions(module: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.conv._ConvNd) for m in module.modules())


def _find_network(pl_module: LightningModule, module_name: str | None, source: str) -> str:
    """The submodule to trace: ``module_name``; else the LightningModule itself when it has a ``forward``;
    else its one child that holds convolutions (the ``self.net`` its ``training_step`` calls)."""
    children = {name: _convolutions(child) for name, child in pl_module.named_children()}
    found = ", ".join(f"{name} ({count} conv)" for name, count in children.items()) or "no submodules"
    if module_name is not None:
        try:
            pl_module.get_submodule(module_name)
        except AttributeError as error:
            raise StackError(f"is not a submodule of {type(pl_module).__name__} (it has: {found})", source=source,
                             key="module_name", value=module_name,
                             fix="pass the attribute that holds the network, e.g. module_name: net") from error
        return module_name
    if type(pl_module).forward not in (LightningModule.forward, nn.Module.forward):
        return ""
    holders = [name for name, count in children.items() if count]
    if len(holders) == 1:
        return holders[0]
    raise StackError(
        f"cannot tell which network to prune: {type(pl_module).__name__} has no forward and "
        f"{len(holders)} submodules hold convolutions (it has: {found})",
        source=source, key="module_name", value=None,
        fix="pass module_name: <the submodule training_step calls> (e.g. net), or give the module a forward",
    )


def _first_input(batch: Any) -> torch.Tensor | None:
    """The first floating-point tensor of at least 2 dims in ``batch`` (tensor, tuple, list or dict)."""
    if isinstance(batch, torch.Tensor):
        return batch if batch.is_floating_point() and batch.dim() >= 2 else None
    values = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (list, tuple)) else ()
    for value in values:
        found = _first_input(value)
        if found is not None:
            return found
    return None


def _common_ancestor(names: list[str]) -> str:
    parts = [name.split(".") for name in names if name]
    if not parts:
        return ""
    common = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    # the ancestor is a module, not a parameter's leaf: drop a full name shared by all
    if common and all(len(p) == len(common) for p in parts):
        common = common[:-1]
    return ".".join(common)

