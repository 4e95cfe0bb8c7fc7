"""`GradientQuantization`: INT8/INT4 backward with stochastic rounding, MetaGrad hypernetwork or error
feedback compensation, and k-bit DDP gradient communication.

The math is in `stacktrain.functional.grad_quant` (gradient hooks, the DDP communication hook), on the
number formats of `stacktrain.functional.quantize`, and `stacktrain.functional.grad_quant_hypernet` (the
hypernetwork); this callback decides when to call them, keeps their state in checkpoints, logs under ``grad_quant/`` and reports the communicated
bytes to the `EfficiencyReport`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.strategies import DDPStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.nn.parallel import DistributedDataParallel

from stacktrain.errors import require_choice, require_number
from stacktrain.functional.grad_quant_hypernet import (
    HYPERNET_INPUTS,
    HYPERNET_KINDS,
    HYPERNET_TARGETS,
    HypernetCompensation,
    default_hidden,
    hypernet_parameter_names,
)
from stacktrain.functional.grad_quant import (
    ACTIVATION_LAYERS, TARGETS, CompressedCommState, GradientQuantizer, apply_grad_quant, noise_seed, quantized_allgather_hook,
)
from stacktrain.loggers import log_table_with_line
from stacktrain.stack import BYTES_PER_STEP, STACK_ORDER, Technique, gather_per_rank, is_logging_step

__all__ = ["GradientQuantization", "COMPENSATIONS"]

#: How the quantization error is compensated.
COMPENSATIONS = ("none", "error_feedback", "hypernet")

# Independent random streams drawn from one seed.
_BACKWARD_STREAM, _COMMUNICATION_STREAM = 1, 2


class GradientQuantization(Technique):
    """Quantize the backward pass (and, under DDP, the gradient communication) to k bits.

    ``Trainer(callbacks=[GradientQuantization(bits=4, compensation="hypernet")])``

    Args:
        bits: backward precision, 2..8 (``None``: leave the backward in full precision, e.g. to
            compress only the communication).
        targets: ``"weights"`` (every trainable parameter's gradient, one scale per tensor),
            ``"activations"`` (the gradient flowing into every Linear/Conv layer's backward, one
            scale per row) or ``"both"``.
        compensation: ``"none"``; ``"error_feedback"`` (each weight gradient's quantization residual
            is added to its next gradient); ``"hypernet"`` (MetaGrad: a shared element-wise
            hypernetwork maps each quantized gradient to the update, and the next loss, through the
            weights that update produced, trains the hypernetwork; see
            `stacktrain.functional.grad_quant_hypernet`).
        stochastic_rounding: unbiased stochastic rounding (default) or round to nearest.
        communication_bits: 8 or 4: under DDP, replace the fp32 gradient all-reduce by a k-bit
            all-gather (one scale per parameter) through a DDP communication hook that this callback
            registers itself, on gloo and NCCL alike. Without DDP there is nothing to send and it
            does nothing.
        hypernet: ``"mlp"`` (an RMS-normalised tanh MLP with a residual) or ``"linear"`` (MetaQuant's
            reported meta-network: bias-free 1 -> hidden -> 1 without a nonlinearity, a learned gain).
        hypernet_targets: ``"all"`` (every trainable tensor) or ``"weights"`` (MetaQuant's: the
            weights of Linear/Conv layers; biases, norms and position embeddings take the plain
            quantized step).
        hypernet_hidden: hidden width of the hypernetwork (default: 100 for ``linear``, MetaQuant's,
            16 for ``mlp``).
        hypernet_inputs: ``"gradient"`` or ``"gradient_and_weight"``.
        meta_lr: learning rate of the hypernetwork's Adam. MetaQuant uses 1e-3 (the config's and the
            benchmark's); 1e-2 did best of 1e-3, 1e-2 and 5e-2 in an earlier AdamW ViT setting.
            The hypernetwork is trained through the SGD update ``w - lr * H(g)``: use SGD (with
            momentum) for the model; Adam renormalises ``H(g)`` per coordinate and cancels a learned gain.
        seed: seed of the rounding noise and the hypernetwork's initialisation; default: drawn from
            torch's initial seed (``seed_everything``). Saved in checkpoints.

    Frozen parameters are ignored. Logs ``grad_quant/bits``, ``grad_quant/rel_error_weights`` and
    ``grad_quant/rel_error_activations`` (mean ``||Q(g) - g|| / ||g||`` over the step's quantized
    tensors), and with communication ``grad_quant/bytes_per_step`` and
    ``grad_quant/bytes_ratio`` (against an fp32 all-reduce), plus a W&B table and line plot of the
    bytes per step.
    """

    name = "grad_quant"
    stack_order = STACK_ORDER["grad_quant"]

    def __init__(
        self,
        bits: int | None = 4,
        targets: str = "both",
        compensation: str = "none",
        stochastic_rounding: bool = True,
        communication_bits: int | None = None,
        hypernet: str = "mlp",
        hypernet_targets: str = "all",
        hypernet_hidden: int | None = None,
        hypernet_inputs: str = "gradient",
        meta_lr: float = 1e-2,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.bits = bits
        self.targets = targets
        self.compensation = compensation
        self.stochastic_rounding = stochastic_rounding
        self.communication_bits = communication_bits
        self.hypernet_kind = hypernet
        self.hypernet_targets = hypernet_targets
        self.hypernet_hidden = hypernet_hidden
        self.hypernet_inputs = hypernet_inputs
        self.meta_lr = meta_lr
        self.seed = seed
        self.validate_settings()
        self.quantizer: GradientQuantizer | None = None
        self.hypernet: HypernetCompensation | None = None
        self.comm: CompressedCommState | None = None
        #: (global step, bytes sent by this rank, bytes of an fp32 all-reduce) per optimizer step
        self.bytes_history: list[list[int]] = []
        #: relative quantization error of the logged steps of this fit, per target
        self.error_log: dict[str, list[float]] = {"weights": [], "activations": []}
        self._params: dict[int, str] = {}
        self._hypernet_names: set[str] = set()
        self._loaded: dict[str, Any] | None = None
        self._step_reached = False
        self._step_taken = False
        self._step_bytes: tuple[int, int] | None = None
        self._rank = 0

    # ------------------------------------------------------------------------------- validation
    def validate_settings(self) -> None:
        """Raise `StackError` for any setting out of range (called at construction and in setup)."""
        source = type(self).__name__
        if self.bits is not None:
            require_number(self.bits, "bits", source=source, low=2, high=8, integer=True,
                           fix="use an integer number of bits from 2 to 8 (4 or 8), or null for a full-precision backward")
        require_choice(self.targets, "targets", TARGETS, source=source)
        require_choice(self.compensation, "compensation", COMPENSATIONS, source=source)
        if not isinstance(self.stochastic_rounding, bool):
            raise self.error("must be true or false", key="stochastic_rounding", value=self.stochastic_rounding,
                             fix="use true (unbiased) or false (round to nearest)")
        if self.communication_bits is not None and self.communication_bits not in (4, 8):
            raise self.error("is not a supported communication width", key="communication_bits",
                             value=self.communication_bits, fix="use 8 or 4, or null to keep the fp32 all-reduce")
        if not isinstance(self.hypernet_kind, str) or self.hypernet_kind not in HYPERNET_KINDS:
            raise self.error("is not a hypernetwork kind", key="hypernet", value=self.hypernet_kind,
                             fix=f"use one of {', '.join(HYPERNET_KINDS)} (linear: MetaQuant's meta-network)")
        require_choice(self.hypernet_targets, "hypernet_targets", HYPERNET_TARGETS, source=source)
        if self.hypernet_hidden is not None:
            require_number(self.hypernet_hidden, "hypernet_hidden", source=source, low=1, high=4096, integer=True)
        require_choice(self.hypernet_inputs, "hypernet_inputs", HYPERNET_INPUTS, source=source)
        require_number(self.meta_lr, "meta_lr", source=source, low=0.0, low_inclusive=False, high=1.0)
        if self.seed is not None:
            require_number(self.seed, "seed", source=source, low=0, integer=True)
        if self.compensation == "error_feedback" and (self.bits is None or self.targets == "activations"):
            raise self.error(
                "needs quantized weight gradients (its residuals are kept per parameter)",
                key="compensation", value=self.compensation,
                fix="set bits (2..8) and targets 'weights' or 'both', or use compensation 'none' or 'hypernet'",
            )
        if self.compensation == "hypernet" and self.bits is None and self.communication_bits is None:
            raise self.error(
                "has nothing to compensate: neither the backward (bits) nor the communication is quantized",
                key="compensation", value=self.compensation, fix="set bits or communication_bits, or compensation 'none'",
            )

    @property
    def active(self) -> bool:
        return self.quantizer is not None or self.comm is not None

    def setup_technique(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self.validate_settings()
        if stage != "fit":
            return
        self._detach()
        named = [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]
        if not named:
            raise self.error("has no trainable parameters, so there is no gradient to quantize", key="model",
                             value=type(pl_module).__name__, fix="unfreeze some parameters or remove GradientQuantization")
        if self.bits is not None and self.targets == "activations" and not any(
            isinstance(m, ACTIVATION_LAYERS) and any(p.requires_grad for p in m.parameters(False))
            for m in pl_module.modules()
        ):
            raise self.error(
                "found no trainable Linear/Conv layer whose output gradient it could quantize",
                key="targets", value=self.targets, fix="use targets 'weights' or 'both'",
            )
        if self.communication_bits is not None and isinstance(trainer.strategy, DDPStrategy):
            if getattr(trainer.strategy, "_ddp_comm_hook", None) is not None:
                raise self.error(
                    "cannot replace the DDP communication hook already given to the strategy",
                    key="communication_bits", value=self.communication_bits,
                    fix="remove ddp_comm_hook from the DDPStrategy or communication_bits from GradientQuantization",
                )
        if self.seed is None:
            self.seed = int(torch.initial_seed() % (2**31))
        self._params = {id(p): name for name, p in named}
        if self.bits is not None:
            self.quantizer = apply_grad_quant(
                pl_module, self.bits, self.targets, stochastic=self.stochastic_rounding,
                error_feedback=self.compensation == "error_feedback",
            )
        if self.compensation == "hypernet":
            self._hypernet_names = hypernet_parameter_names(pl_module, self.hypernet_targets)
            if not self._hypernet_names:
                raise self.error("found no trainable Linear/Conv weight for the hypernetwork", key="hypernet_targets",
                                 value=self.hypernet_targets, fix="use hypernet_targets 'all'")
            hidden = self.hypernet_hidden if self.hypernet_hidden is not None else default_hidden(self.hypernet_kind)
            self.hypernet = HypernetCompensation(hidden, self.hypernet_inputs, self.meta_lr, seed=self.seed,
                                                 kind=self.hypernet_kind)
        self._step_reached = self._step_taken = False

    def compile_problem(self) -> tuple[str, str, Any, str] | None:
        if self.bits is None or self.targets == "weights":
            return None  # weight-gradient hooks run after the compiled backward, on the parameters
        return (
            "activation gradients are quantized by a hook registered on every Linear/Conv output inside the "
            "forward, which splits the compiled graph at every layer",
            "targets", self.targets, "use targets: weights, or model.init_args.compile: false",
        )

    def _detach(self) -> None:
        if self.quantizer is not None:
            self.quantizer.remove()
        self.quantizer = None
        self.hypernet = None
        self.comm = None

    # ------------------------------------------------------------------------------- fit
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._rank = trainer.global_rank
        if self.active:
            self._follow_parameters(pl_module)
        if self.hypernet is not None:
            self.hypernet.to(pl_module.device)
        if self._loaded is not None:
            self._apply_loaded(pl_module.device)
        if self.communication_bits is not None:
            self._register_comm_hook(trainer)
        if self.active:
            rank_zero_info(
                f"stacktrain: grad_quant: backward {'fp32' if self.bits is None else f'{self.bits}-bit'} "
                f"({self.targets}), compensation {self.compensation}, communication "
                f"{'fp32' if self.comm is None else f'{self.comm.bits}-bit all-gather'}"
            )

    def _follow_parameters(self, pl_module: LightningModule) -> None:
        """Hook the model's current trainable parameters (their tensors may have been replaced since
        setup: a compacted checkpoint restored, or PruneRegrow's compaction)."""
        named = [(name, p) for name, p in pl_module.named_parameters() if p.requires_grad]
        current = {id(p): name for name, p in named}
        if current == self._params:
            return
        self._params = current
        if self.quantizer is not None:
            self.quantizer.apply(pl_module)  # removes the old hooks first; keeps the residuals

    def on_parameters_replaced(
        self, trainer: Trainer, pl_module: LightningModule, keep: Any
    ) -> None:
        """PruneRegrow compacted the model: hook the new (smaller) parameters, cut the per-parameter
        state (error-feedback residuals, the hypernetwork's last gradients) to the kept channels, and
        register the k-bit communication hook on the re-wrapped DDP model."""
        if self.quantizer is not None:
            self.quantizer.cut(keep)
        if self.hypernet is not None:
            self.hypernet.cut(keep)
        self._follow_parameters(pl_module)
        if self.comm is not None:
            self.comm = None
            self._register_comm_hook(trainer)

    def _register_comm_hook(self, trainer: Trainer) -> None:
        model = trainer.strategy.model
        if not isinstance(trainer.strategy, DDPStrategy) or trainer.world_size < 2:
            rank_zero_info("stacktrain: grad_quant: communication_bits has no effect without DDP on 2+ processes")
            return
        if not isinstance(model, DistributedDataParallel):
            raise self.error("expected the DDP-wrapped model at fit start", key="trainer.strategy",
                             value=type(model).__name__, fix="use strategy 'ddp'")
        self.comm = CompressedCommState(self.communication_bits, process_group=getattr(model, "process_group", None),
                                        stochastic=self.stochastic_rounding)
        self.comm.index_parameters(model.module)
        model.register_comm_hook(self.comm, quantized_allgather_hook)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_fit_end(trainer, pl_module)
        if trainer.is_global_zero and self.bytes_history:
            self._log_bytes_table(trainer)
        if self.quantizer is not None:
            self.quantizer.remove()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        super().on_exception(trainer, pl_module, exception)
        if self.quantizer is not None:
            self.quantizer.remove()

    # ------------------------------------------------------------------------------- per batch
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if not self.active:
            return
        # One key per micro-batch and rank: rounding noise is reproducible, differs across ranks, and
        # needs no saved generator state to resume exactly on every rank.
        key = (self.seed, self._rank, trainer.current_epoch, batch_idx)
        if self.quantizer is not None:
            self.quantizer.reseed(noise_seed(*key, _BACKWARD_STREAM))
            # Measuring the quantization error costs a few passes per tensor: only on logged steps
            # (the same test as Lightning's LearningRateMonitor).
            self.quantizer.track_error = is_logging_step(trainer)
            if self.quantizer.error_feedback:
                scaler = getattr(trainer.precision_plugin, "scaler", None)
                self.quantizer.loss_scale = float(scaler.get_scale()) if scaler is not None else 1.0
        if self.comm is not None:
            self.comm.reseed(noise_seed(*key, _COMMUNICATION_STREAM))

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> None:
        if not self.active:
            return
        self._step_reached = True
        if self.comm is not None:
            sent, fp32, _ = self.comm.take_counts()
            if fp32:
                self._step_bytes = (sent, fp32)
                self.bytes_history.append([int(trainer.global_step), int(sent), int(fp32)])
                self.report_cost(trainer, BYTES_PER_STEP, baseline=fp32, actual=sent, unit="B")
        if self.hypernet is not None:
            named = [
                (self._params[id(p)], p, float(group["lr"]))
                for group in optimizer.param_groups for p in group["params"]
                if id(p) in self._params and self._params[id(p)] in self._hypernet_names
            ]
            self.hypernet.transform(named)

    def on_after_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer) -> None:
        # Only after a step that really happened (not one that AMP's grad scaler skipped).
        self._step_taken = True
        if self.quantizer is not None:
            self.quantizer.commit()
        if self.hypernet is not None:
            self.hypernet.commit()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if not self.active or not self._step_reached:
            return
        if not self._step_taken:  # skipped: forget what this step's gradients would have changed
            if self.quantizer is not None:
                self.quantizer.rollback()
            if self.hypernet is not None:
                self.hypernet.rollback()
        self._step_reached = self._step_taken = False
        self._log_step(pl_module)

    def _log_step(self, pl_module: LightningModule) -> None:
        if self.quantizer is not None:
            self.log_metric(pl_module, "bits", float(self.quantizer.bits))
            for target in ("weights", "activations"):
                error = self.quantizer.mean_relative_error(target)
                if error is not None:
                    self.log_metric(pl_module, f"rel_error_{target}", error)
                    self.error_log[target].append(float(error))
            self.quantizer.reset_statistics()
        if self._step_bytes is not None:
            sent, fp32 = self._step_bytes
            self.log_metric(pl_module, "bytes_per_step", float(sent))
            self.log_metric(pl_module, "bytes_ratio", sent / fp32)
            self._step_bytes = None
        if self.hypernet is not None and self.hypernet.last_meta_grad_norm is not None:
            self.log_metric(pl_module, "hypernet_grad_norm", self.hypernet.last_meta_grad_norm)

    def _log_bytes_table(self, trainer: Trainer) -> None:
        columns = ["step", "bytes_sent", "fp32_allreduce_bytes"]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                log_table_with_line(logger, f"{self.name}/bytes_per_step", columns, self.bytes_history, x="step",
                                    y="bytes_sent", title="grad_quant: bytes sent per step (this rank)")

    # ------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "seed": self.seed,
            "bits": self.bits,
            "communication_bits": self.communication_bits,
            "compensation": self.compensation,
            "hypernet_kind": self.hypernet_kind,
            "bytes_history": [list(row) for row in self.bytes_history],
        }
        if self.quantizer is not None and self.quantizer.error_feedback:
            # residuals differ per rank: keep every rank's
            state["residuals_by_rank"] = gather_per_rank(self.quantizer.state_dict()["residuals"])
        if self.hypernet is not None:
            state["hypernet"] = self.hypernet.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks after setup and before the model moves to its device: keep the
        # state until fit starts, then put it where the model is.
        self.seed = int(state_dict["seed"])
        changed = [f"{key}: {state_dict[key]!r} -> {getattr(self, key)!r}"
                   for key in ("bits", "compensation", "communication_bits", "hypernet_kind")
                   if key in state_dict and state_dict[key] != getattr(self, key)]
        if changed:
            rank_zero_warn(f"stacktrain: grad_quant: resuming with other settings than the checkpoint's "
                           f"({'; '.join(changed)}); state that no longer applies is dropped")
        self.bytes_history = [list(row) for row in state_dict.get("bytes_history", [])]
        self._loaded = state_dict

    def _apply_loaded(self, device: torch.device) -> None:
        state, self._loaded = self._loaded, None
        if state is None:
            return
        if self.quantizer is not None and self.quantizer.error_feedback and state.get("residuals_by_rank"):
            per_rank = state["residuals_by_rank"]
            rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
            world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
            if world != len(per_rank):
                rank_zero_warn(f"stacktrain: grad_quant: the checkpoint holds error-feedback residuals of "
                               f"{len(per_rank)} processes and this run has {world}: rank r continues "
                               f"the residuals of saved rank r mod {len(per_rank)}")
            self.quantizer.load_state_dict({"residuals": per_rank[rank % len(per_rank)]})
        # a checkpoint from before `hypernet` existed holds the mlp kind
        if self.hypernet is not None and "hypernet" in state and state.get("hypernet_kind", "mlp") == self.hypernet_kind:
            self.hypernet.load_state_dict(state["hypernet"], device=device)

