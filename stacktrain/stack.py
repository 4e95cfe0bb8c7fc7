"""The stack contract: the `Technique` base class, stack ordering and validation, cost reporting.

Every technique callback subclasses `Technique`, every technique in module form (a LightningModule
that is the technique: `BoostedEarlyExit`, `PromptTunedCLIP`) subclasses `ModuleTechnique`, and both
keep the contract of DESIGN.md:

1. it validates in ``setup`` (`Technique.setup_technique`) and raises `StackError` before any batch;
   which techniques cannot share a run is declared in one place, the ``conflicts`` mapping of
   `Technique` and `ModuleTechnique` (class name -> why), checked by `Technique.setup`;
2. it keeps all of its state in ``state_dict`` / ``load_state_dict``;
3. it is rank-consistent: schedules read ``trainer.global_step``; random decisions that must agree
   across ranks draw from `step_generator`, and every seed is mixed by
   `stacktrain.functional.seeding.mix_seed` (one stated exception: the quantizers' rounding noise keys
   its streams with `stacktrain.functional.grad_quant.noise_seed`, the hash its published figures were
   measured with); values shared between ranks go through one collective,
   `gather_per_rank` (every rank's value, by rank: rank 0's decision is its first element, a total
   its sum). Not technique decisions and so outside this rule: a model's own math across ranks
   (the contrastive losses' differentiable ``all_gather``, DINO's centre ``strategy.reduce``) and the
   run's plumbing (`StackCLI`'s and `ProgressCheckpoints`' ``strategy.broadcast``, `RunGuard`'s
   ``reduce_boolean_decision``), which use Lightning's public collectives;
4. it has one name ``<name>`` (``token_dropout``, ``prune_regrow``, ``grad_quant``, ``early_exit``,
   ``prompt_tuning``): its ``name`` attribute, its file, its functional core
   ``stacktrain.functional.<name>`` with ``apply_<name>``; it logs under that name
   (`Technique.log_metric` prefixes ``<name>/``), on the steps the loggers
   write (`is_logging_step`) when a value is costly to compute;
5. it reports what it saves to the `EfficiencySink` (the `EfficiencyReport` callback) through
   `report_cost` (`Technique.report_cost`, `ModuleTechnique.report_cost`) and nothing else;
6. it changes nothing it is not attached to;
7. it is order-independent: `arrange_stack` sorts the techniques of a run by `Technique.stack_order`,
   whatever order the user listed them in, and `Technique.on_after_optimizer_step` is dispatched in
   that order after every real optimizer step.

What techniques share, and nothing else (no technique reads another's attributes):

- ``conflicts`` (above);
- `notify_parameters_replaced`: a technique that replaces the model's parameters (PruneRegrow's
  compaction) tells the others (`Technique.on_parameters_replaced`,
  `ModuleTechnique.on_parameters_replaced`) instead of letting them poll shapes;
- `ModuleTechnique.step_flops_outside_vit`: the FLOPs a module's training step spends outside its
  ViT, which token dropout adds to both sides of its FLOPs line (`flops_outside_vit`);
- `TrainingSamples`: the data module protocol through which a module trains on a subset of the
  training split (PromptTunedCLIP's few-shot samples) instead of overwriting its attributes;
- `is_logging_step`: whether the loggers write this step (Lightning's rule, from public state);
- the cost quantities `FLOPS_PER_STEP`, `TOKENS_PER_SAMPLE`, `BYTES_PER_STEP`, `INFERENCE_FLOPS`,
  `INFERENCE_FLOPS_AVERAGE` and the `EfficiencySink` they are reported to.
"""

from __future__ import annotations

import math
import os
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol, runtime_checkable

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy, Strategy

from stacktrain.errors import StackError
from stacktrain.functional.seeding import mix_seed

__all__ = [
    "StackError",
    "Technique",
    "ModuleTechnique",
    "TrainingSamples",
    "EfficiencySink",
    "CostLine",
    "arrange_stack",
    "techniques_of",
    "reject_duplicate_techniques",
    "notify_parameters_replaced",
    "report_cost",
    "run_dir",
    "unique_path",
    "step_generator",
    "gather_per_rank",
    "is_logging_step",
    "flops_outside_vit",
    "batch_size_of",
    "compile_for_stack",
    "is_compiled",
    "FLOPS_PER_STEP",
    "TOKENS_PER_SAMPLE",
    "BYTES_PER_STEP",
    "INFERENCE_FLOPS",
    "INFERENCE_FLOPS_AVERAGE",
]

# The quantities techniques report. Free-form names work too; these keep the report's rows aligned.
FLOPS_PER_STEP = "train FLOPs/step"
TOKENS_PER_SAMPLE = "tokens/sample"
BYTES_PER_STEP = "communicated bytes/step"
#: of the network at the end of training (what the user gets); a technique whose network changes
#: during training reports it with ``replace=True``, and its average over training as
#: `INFERENCE_FLOPS_AVERAGE`
INFERENCE_FLOPS = "inference FLOPs/sample"
INFERENCE_FLOPS_AVERAGE = "inference FLOPs/sample, average over training"


@dataclass
class CostLine:
    """Running totals of one quantity for one technique: what it cost against what it would have."""

    technique: str
    quantity: str
    unit: str = ""
    baseline: float = 0.0
    actual: float = 0.0
    count: int = 0

    @property
    def ratio(self) -> float:
        """Actual cost over baseline cost (below 1 means the technique saved)."""
        return self.actual / self.baseline if self.baseline else math.nan

    def as_dict(self) -> dict[str, Any]:
        return {
            "technique": self.technique,
            "quantity": self.quantity,
            "unit": self.unit,
            "baseline": self.baseline,
            "actual": self.actual,
            "count": self.count,
        }


class EfficiencySink(Callback):
    """Receives what techniques save. `stacktrain.callbacks.EfficiencyReport` is the implementation
    that writes the report; this base lives here so the core does not import the callbacks package."""

    def __init__(self) -> None:
        self.lines: dict[tuple[str, str], CostLine] = {}

    def record(
        self, technique: str, quantity: str, *, baseline: float, actual: float, unit: str = "", count: int = 1,
        replace: bool = False,
    ) -> None:
        """Add ``count`` observations whose totals are ``baseline`` (without the technique) and
        ``actual``; with ``replace``, they supersede what was recorded before (a re-measured value)."""
        if replace:
            self.lines.pop((technique, quantity), None)
        line = self.lines.setdefault((technique, quantity), CostLine(technique, quantity, unit))
        line.baseline += float(baseline)
        line.actual += float(actual)
        line.count += int(count)

    def state_dict(self) -> dict[str, Any]:
        return {"lines": [line.as_dict() for line in self.lines.values()]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.lines = {}
        for item in state_dict.get("lines", []):
            line = CostLine(**item)
            self.lines[(line.technique, line.quantity)] = line


class Technique(Callback):
    """Base class of every stacktrain technique callback.

    Subclasses set the class attributes below, implement `setup_technique` to find what they need
    in the model and reject what they cannot handle (raise `StackError`), and use `log_metric`,
    `report_cost` and `on_after_optimizer_step`. They do not override ``setup``.
    """

    #: Logging namespace and name in the efficiency report, e.g. ``"token_dropout"``.
    name: ClassVar[str] = "technique"
    #: Position in the stack where techniques touch the same thing; lower runs first. See
    #: `STACK_ORDER` for the project's techniques.
    stack_order: ClassVar[int] = 100
    #: Techniques (class names) this one cannot share a run with, and why.
    conflicts: ClassVar[Mapping[str, str]] = {}
    #: Whether two instances may be attached to one run.
    allow_multiple: ClassVar[bool] = False
    #: Strategies under which this technique is known to be correct.
    supported_strategies: ClassVar[tuple[type[Strategy], ...]] = (SingleDeviceStrategy, DDPStrategy)

    # ----------------------------------------------------------------------------------- contract
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        arrange_stack(trainer)
        self._validate_stack(trainer, pl_module)
        self.setup_technique(trainer, pl_module, stage)

    def setup_technique(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Find what the technique needs in ``pl_module``; raise `StackError` if it cannot apply."""

    def compile_problem(self) -> tuple[str, str, Any, str] | None:
        """Why the module this technique is attached to cannot be ``torch.compile``d with it, as
        ``(problem, key, value, fix)``; None when it can (the default). Asked by `compile_for_stack`
        before the first batch."""
        return None

    def on_after_optimizer_step(
        self, trainer: Trainer, pl_module: LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Called after every optimizer step that really happened, in stack order."""

    def on_parameters_replaced(
        self, trainer: Trainer, pl_module: LightningModule, keep: Mapping[str, Mapping[int, torch.Tensor]]
    ) -> None:
        """Called when another technique replaced the model's parameters mid-run (PruneRegrow's
        compaction: smaller tensors under the same names, DDP re-wrapped). ``keep`` gives, per
        parameter name, the positions kept along each shrunk dimension. Techniques holding hooks on
        parameters, per-parameter state or a DDP communication hook re-attach and cut them here."""

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _runtime(trainer).attach_optimizer_hooks(trainer, pl_module)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        _runtime(trainer).detach_optimizer_hooks()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        _runtime(trainer).detach_optimizer_hooks()

    # ----------------------------------------------------------------------------------- helpers
    def error(self, problem: str, *, key: str | None = None, value: Any = None, fix: str | None = None) -> StackError:
        """A `StackError` attributed to this technique (``raise self.error(...)``)."""
        if key is None:
            return StackError(problem, source=type(self).__name__, fix=fix)
        return StackError(problem, source=type(self).__name__, key=key, value=value, fix=fix)

    def log_metric(self, pl_module: LightningModule, key: str, value: Any, **kwargs: Any) -> None:
        """``pl_module.log`` under this technique's namespace (``<name>/<key>``), per step by default."""
        kwargs.setdefault("on_step", True)
        kwargs.setdefault("on_epoch", False)
        pl_module.log(f"{self.name}/{key}", value, **kwargs)

    def report_cost(
        self, trainer: Trainer, quantity: str, *, baseline: float, actual: float, unit: str = "", count: int = 1,
        replace: bool = False,
    ) -> None:
        """Tell the run's `EfficiencySink` (if any) what this step cost against its baseline."""
        report_cost(trainer, self.name, quantity, baseline=baseline, actual=actual, unit=unit, count=count,
                    replace=replace)

    def refresh_optimizer_hooks(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Re-attach the after-step dispatch, for techniques that rebuild the optimizers mid-run."""
        runtime = _runtime(trainer)
        runtime.detach_optimizer_hooks()
        runtime.attach_optimizer_hooks(trainer, pl_module)

    # ----------------------------------------------------------------------------------- checks
    def _validate_stack(self, trainer: Trainer, pl_module: LightningModule) -> None:
        me = type(self).__name__
        if not isinstance(trainer.strategy, self.supported_strategies):
            supported = ", ".join(s.__name__ for s in self.supported_strategies)
            raise StackError(
                f"is not supported (supported: {supported}); the technique would train wrongly",
                source=me,
                key="trainer.strategy",
                value=type(trainer.strategy).__name__,
                fix="use strategy 'ddp' (or a single device), or remove this technique from trainer.callbacks",
            )
        others = techniques_of(trainer)
        reject_duplicate_techniques(others)
        # A conflict may name another technique callback or a module-form technique (the model class),
        # and a module-form technique may name this callback: both declare ``conflicts``.
        present = {type(t).__name__ for t in others if t is not self}
        present |= {base.__name__ for base in type(pl_module).__mro__}
        for other, reason in self.conflicts.items():
            if other in present:
                raise StackError(
                    f"cannot share a run with {other}: {reason}",
                    source=me,
                    key="trainer.callbacks",
                    value=[type(t).__name__ for t in others],
                    fix=f"remove {me} or {other} from the run",
                )
        module_conflicts = pl_module.conflicts if isinstance(pl_module, ModuleTechnique) else {}
        if me in module_conflicts:
            raise StackError(
                f"cannot be attached to {type(pl_module).__name__}: {module_conflicts[me]}",
                source=me,
                key="model",
                value=type(pl_module).__name__,
                fix=f"remove {me} from trainer.callbacks or use another model",
            )


class ModuleTechnique(LightningModule):
    """Base class of the techniques in module form (the LightningModule is the technique:
    `BoostedEarlyExit`, `PromptTunedCLIP`): what they share with the callbacks of their stack is
    declared here, typed, instead of being attributes that callbacks look up by name."""

    #: Name in the efficiency report and the logging namespace, e.g. ``"early_exit"``.
    name: ClassVar[str] = "module_technique"
    #: Technique callbacks (class names) that cannot be attached to this module, and why; a subclass
    #: may compute it from its settings (a property). Checked by `Technique.setup`.
    conflicts: Mapping[str, str] = {}
    #: FLOPs per training step spent outside the ViT (e.g. PromptTunedCLIP's text tower): token
    #: dropout, shortening the ViT's sequence, adds them to both sides of its FLOPs line so its ratio
    #: is over the whole step and compounds with this module's own line. Set it before the first
    #: training batch when the step does such work; 0 means the step is the ViT's.
    step_flops_outside_vit: float = 0.0

    def report_cost(
        self, quantity: str, *, baseline: float, actual: float, unit: str = "", count: int = 1, replace: bool = False,
    ) -> None:
        """Tell the run's `EfficiencySink` (if any) what this step cost against its baseline."""
        report_cost(self.trainer, self.name, quantity, baseline=baseline, actual=actual, unit=unit, count=count,
                    replace=replace)

    def on_parameters_replaced(self, keep: Mapping[str, Mapping[int, torch.Tensor]]) -> None:
        """Called (through `notify_parameters_replaced`) when a technique replaced this module's
        parameters mid-run (PruneRegrow's compaction); ``keep`` as in `Technique.on_parameters_replaced`.
        Recompute here whatever depends on the parameters' shapes."""


def flops_outside_vit(pl_module: LightningModule) -> float:
    """`ModuleTechnique.step_flops_outside_vit` of ``pl_module``; 0 for a plain module (its step is its ViT's)."""
    return float(pl_module.step_flops_outside_vit) if isinstance(pl_module, ModuleTechnique) else 0.0


@runtime_checkable
class TrainingSamples(Protocol):
    """A data module whose training split a module may narrow to chosen samples (PromptTunedCLIP's
    few-shot or pseudo-labelled samples): `ImageDataModule` implements it."""

    train_set: Any

    def use_training_samples(self, dataset: Any) -> None:
        """Train on ``dataset`` (a view of ``train_set``) instead of the whole split."""


def is_logging_step(trainer: Trainer) -> bool:
    """Whether the loggers write the metrics of the current training step: every
    ``log_every_n_steps``-th optimizer step, and when the trainer is stopping. Lightning's own rule (its
    ``should_update_logs``, used by LearningRateMonitor), computed from public state; a technique
    computes a costly metric only then."""
    return (trainer.global_step + 1) % trainer.log_every_n_steps == 0 or trainer.should_stop


#: Where the project's techniques stand where they touch the same thing (DESIGN.md, contract 7).
#: Sequence transforms come first, then gradient transforms, then what rewrites weights after the
#: optimizer step: the hypernetwork update before the prune masks, so masked weights stay zero.
STACK_ORDER: dict[str, int] = {
    "token_dropout": 10,
    "grad_quant": 20,
    "prune_regrow": 30,
}


def report_cost(
    trainer: Trainer, technique: str, quantity: str, *, baseline: float, actual: float, unit: str = "",
    count: int = 1, replace: bool = False,
) -> None:
    """Record a cost against its baseline in every `EfficiencySink` of ``trainer``; for techniques in
    module form (callbacks use `Technique.report_cost`)."""
    for callback in trainer.callbacks:
        if isinstance(callback, EfficiencySink):
            callback.record(technique, quantity, baseline=baseline, actual=actual, unit=unit, count=count,
                            replace=replace)


def notify_parameters_replaced(
    trainer: Trainer, pl_module: LightningModule, keep: Mapping[str, Mapping[int, torch.Tensor]],
    source: Technique | None = None,
) -> None:
    """Tell every technique of ``trainer`` (but ``source``, which did it), in stack order, and then the
    module when it is a `ModuleTechnique`, that the model's parameters were replaced
    (`Technique.on_parameters_replaced`, `ModuleTechnique.on_parameters_replaced`)."""
    for technique in techniques_of(trainer):
        if technique is not source:
            technique.on_parameters_replaced(trainer, pl_module, keep)
    if isinstance(pl_module, ModuleTechnique):
        pl_module.on_parameters_replaced(keep)


def reject_duplicate_techniques(callbacks: list[Any]) -> None:
    """Raise `StackError` if a technique that does not allow several instances is in ``callbacks``
    twice. `Technique.setup` checks it; ``stacktrain.cli`` checks it before building the Trainer,
    whose own check (two stateful callbacks with one ``state_key``) is a RuntimeError."""
    techniques = [c for c in callbacks if isinstance(c, Technique)]
    for technique in techniques:
        if not technique.allow_multiple and sum(type(t) is type(technique) for t in techniques) > 1:
            me = type(technique).__name__
            raise StackError(
                "is attached more than once; two instances would fight over the same hook point",
                source=me,
                key="trainer.callbacks",
                value=[type(t).__name__ for t in techniques],
                fix=f"keep a single {me} in trainer.callbacks",
            )


def techniques_of(trainer: Trainer) -> list[Technique]:
    """The techniques attached to ``trainer``, in stack order once `arrange_stack` has run."""
    return [c for c in trainer.callbacks if isinstance(c, Technique)]


def arrange_stack(trainer: Trainer) -> None:
    """Sort the techniques in ``trainer.callbacks`` by `Technique.stack_order` (ties by name).

    Non-technique callbacks keep their positions; techniques are permuted among the slots they
    occupy. Idempotent. Every later hook (and `Technique.on_after_optimizer_step`) then runs in
    stack order, so ``[A, B]`` and ``[B, A]`` give the same run.
    """
    callbacks = list(trainer.callbacks)
    slots = [i for i, c in enumerate(callbacks) if isinstance(c, Technique)]
    ordered = sorted((callbacks[i] for i in slots), key=lambda t: (t.stack_order, t.name))
    if all(callbacks[i] is t for i, t in zip(slots, ordered)):
        return
    for i, technique in zip(slots, ordered):
        callbacks[i] = technique
    trainer.callbacks = callbacks


class _StackRuntime:
    """Per-trainer bookkeeping: the optimizer post-step hooks that dispatch to techniques in order."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def attach_optimizer_hooks(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.handles:
            return
        techniques = [
            t for t in techniques_of(trainer)
            if type(t).on_after_optimizer_step is not Technique.on_after_optimizer_step
        ]
        if not techniques:
            return
        trainer_ref = weakref.ref(trainer)

        def dispatch(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            live = trainer_ref()
            if live is None:
                return
            for technique in techniques:
                technique.on_after_optimizer_step(live, live.lightning_module, optimizer)

        for optimizer in trainer.optimizers:
            self.handles.append(optimizer.register_step_post_hook(dispatch))

    def detach_optimizer_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


_RUNTIMES: "weakref.WeakKeyDictionary[Trainer, _StackRuntime]" = weakref.WeakKeyDictionary()


def _runtime(trainer: Trainer) -> _StackRuntime:
    runtime = _RUNTIMES.get(trainer)
    if runtime is None:
        runtime = _RUNTIMES[trainer] = _StackRuntime()
    return runtime


def run_dir(trainer: Trainer) -> str:
    """The run's directory: where ModelCheckpoint puts ``checkpoints/`` and stacktrain writes its
    reports (``config.yaml``, ``efficiency.md``). Same rule as ModelCheckpoint; meaningful on rank 0."""
    if trainer.loggers:
        logger = trainer.loggers[0]
        save_dir = logger.save_dir if logger.save_dir is not None else trainer.default_root_dir
        version = logger.version
        version = version if isinstance(version, str) else f"version_{version}"
        return os.path.join(save_dir, str(logger.name), version)
    return trainer.default_root_dir


def unique_path(path: str) -> str:
    """``path`` if nothing is there yet, else ``stem-2.ext``, ``stem-3.ext``...: never overwrite."""
    if not os.path.exists(path):
        return path
    stem, ext = os.path.splitext(path)
    n = 2
    while os.path.exists(f"{stem}-{n}{ext}"):
        n += 1
    return f"{stem}-{n}{ext}"


def gather_per_rank(value: Any) -> list[Any]:
    """``value`` (any picklable object; tensors on the CPU) of every rank, by rank (``[value]`` without a
    process group): the one collective of the stack contract. Rank 0's decision applied everywhere is
    ``gather_per_rank(local)[0]``, a total over ranks ``sum(gather_per_rank(count))``, and per-rank
    state goes into checkpoints this way (a checkpoint is written by rank 0 alone; Lightning builds the
    checkpoint's state on every rank, which makes this call safe inside ``state_dict``). Every rank
    must call it, in the same order."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, value)
        return gathered
    return [value]


def step_generator(seed: int, step: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator that is identical on every rank for a given (seed, global step): random decisions
    that must agree across DDP ranks draw from it instead of the per-rank global RNG."""
    generator = torch.Generator(device=device)
    generator.manual_seed(mix_seed(seed, step))
    return generator


def batch_size_of(batch: Any) -> int:
    """Samples in a batch: the first dimension of its first tensor (in tuples, lists, dicts)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0]) if batch.ndim else 1
    if isinstance(batch, (list, tuple)) and batch:
        return batch_size_of(batch[0])
    if isinstance(batch, dict) and batch:
        return batch_size_of(next(iter(batch.values())))
    return 1


def is_compiled(module: torch.nn.Module) -> bool:
    """Whether ``module`` or one of its submodules was compiled in place (``nn.Module.compile``)."""
    return any(getattr(m, "_compiled_call_impl", None) is not None for m in module.modules())


def compile_for_stack(module: torch.nn.Module, trainer: Trainer | None, options: Mapping[str, Any] | None,
                      *, source: str) -> None:
    """``torch.compile`` ``module`` in place (``nn.Module.compile``: same parameters and state_dict keys,
    so checkpoints, the techniques' hooks and their module surgery keep working), after asking every
    technique of the run whether it can be compiled; the first that cannot raises a `StackError`
    before the first batch. Called from a LightningModule's ``configure_model``, which Lightning runs
    after the techniques' ``setup`` (where they install their modules and hooks). Idempotent."""
    if is_compiled(module):
        return
    for technique in techniques_of(trainer) if trainer is not None else []:
        problem = technique.compile_problem()
        if problem is not None:
            text, key, value, fix = problem
            raise StackError(f"cannot be compiled (model.init_args.compile: true): {text}",
                             source=type(technique).__name__, key=key, value=value, fix=fix)
    module.compile(**dict(options or {}))
