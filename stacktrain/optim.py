"""Optimizer and LR-scheduler construction from LightningCLI's ``OptimizerCallable`` /
``LRSchedulerCallable`` arguments, shared by the LightningModules.

Schedulers that need the length of training get it from the trainer when the config leaves it
out: ``OneCycleLR(total_steps=...)``, ``CosineAnnealingLR(T_max=...)``, ``LinearLR(total_iters=...)``
and ``PolynomialLR(total_iters=...)`` receive the number of scheduler steps of the run
(optimizer steps when ``interval="step"``, epochs when ``interval="epoch"``).
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import math
import re
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from stacktrain.errors import StackError

#: Scheduler keywords that mean "length of the schedule" and are filled in from the trainer.
LENGTH_KEYWORDS = ("total_steps", "T_max", "total_iters")

#: scheduler -> (length keyword, length planned for this run, its length-dependent state); read by
#: `replan_schedulers` once a checkpoint's scheduler state (planned for another length) is loaded.
_PLANS: "weakref.WeakKeyDictionary[Any, tuple[str, int, dict[str, Any]]]" = weakref.WeakKeyDictionary()

#: Schedulers whose learning rate at a step is a closed form of (step, length): re-planned for a new
#: length from the checkpoint's step on. The others compute each rate from the previous one.
_REPLANNABLE = {torch.optim.lr_scheduler.OneCycleLR: ("total_steps", "_schedule_phases")}

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _target_class(factory: Callable[..., Any]) -> type | None:
    """The scheduler class a factory builds (a class, or jsonargparse's partial over one)."""
    if isinstance(factory, type):
        return factory
    if isinstance(factory, functools.partial):
        classes = [a for a in factory.args if isinstance(a, type)]
        if classes:
            return classes[-1]
        return _target_class(factory.func)
    return None


def build_scheduler(factory: Callable[..., Any], optimizer: torch.optim.Optimizer, length: int) -> Any:
    """Call ``factory(optimizer)``, passing ``length`` for a schedule-length keyword left unset."""
    cls = _target_class(factory)
    given = dict(factory.keywords) if isinstance(factory, functools.partial) else {}
    extra: dict[str, Any] = {}
    if cls is not None:
        params = inspect.signature(cls).parameters
        for name in LENGTH_KEYWORDS:
            if name in params and given.get(name) is None:
                extra[name] = int(length)
                break
    if cls is torch.optim.lr_scheduler.OneCycleLR:
        total = extra.get("total_steps", given.get("total_steps"))
        pct = given.get("pct_start", 0.3)
        if total and float(pct) * float(total) == 1.0:
            # OneCycleLR divides by its warm-up length in steps minus one: a warm-up of exactly one
            # step divides by zero at the first step. One and a half steps keeps the intended shape.
            extra["pct_start"] = 1.5 / float(total)
    scheduler = factory(optimizer, **extra)
    for name in LENGTH_KEYWORDS:
        if name in extra:
            kept = _REPLANNABLE.get(type(scheduler), (name,))
            _PLANS[scheduler] = (name, int(length), {k: copy.deepcopy(getattr(scheduler, k)) for k in kept})
    return scheduler


def replan_schedulers(trainer: Any) -> list[str]:
    """Give every scheduler whose length stacktrain filled in the length of *this* run, from the
    checkpoint's step on, when the run extends (or shortens) a checkpoint's plan; call it after the
    checkpoint is loaded and before the first batch (`stacktrain.callbacks.RunGuard` does).

    Lightning restores a scheduler's whole state, its length included: a run resumed with a larger
    ``max_epochs`` kept the first plan's length, and OneCycleLR raised "Tried to step 115 times"
    after its first batch. OneCycleLR is re-planned (its rate is a function of step and length: the
    run continues on the schedule it would have had, planned for the new length from the start);
    a scheduler whose rate is computed from the previous one cannot be, and raises `StackError`.
    Returns one line per re-planned scheduler."""
    lines = []
    for config in getattr(trainer, "lr_scheduler_configs", []):
        scheduler = config.scheduler
        plan = _PLANS.get(scheduler)
        if plan is None:
            continue
        name, length, state = plan
        loaded = getattr(scheduler, name, length)
        if loaded == length or scheduler.last_epoch >= length:
            continue  # the same plan, or a checkpoint already past this run's end (Lightning stops at once)
        if type(scheduler) not in _REPLANNABLE:
            raise StackError(
                f"was planned for {loaded} {config.interval}s by the checkpoint and cannot be re-planned for "
                f"this run's {length}", source=type(scheduler).__name__, key="trainer.max_epochs/max_steps",
                value=length, fix=f"resume with the checkpoint's length, or give the scheduler its length explicitly "
                                  f"(lr_scheduler.init_args.{name}: {length}), or use OneCycleLR")
        for key, value in state.items():
            setattr(scheduler, key, copy.deepcopy(value))
        with getattr(torch.optim.lr_scheduler, "_enable_get_lr_call", lambda _: contextlib.nullcontext())(scheduler):
            rates = scheduler.get_lr()  # OneCycleLR also sets the momentum of this step
        for group, rate in zip(scheduler.optimizer.param_groups, rates):
            group["lr"] = rate
        scheduler._last_lr = list(rates)
        lines.append(f"{type(scheduler).__name__} re-planned from {loaded} to {length} {config.interval}s "
                     f"at {config.interval} {scheduler.last_epoch}")
    return lines


def all_finite(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Whether every entry of every tensor is finite, as one boolean tensor (no host
    synchronisation until the caller reads it)."""
    return torch.stack([torch.isfinite(t).all() for t in tensors]).all()


def weight_decay_groups(model: nn.Module, exclude_norm_and_bias: bool = True) -> list[dict[str, Any]]:
    """Trainable parameters split into a decayed group and (norm weights, biases, 1-D tensors such
    as ViT position and class tokens) a group with ``weight_decay=0``."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            skip = exclude_norm_and_bias and (
                isinstance(module, _NORM_TYPES) or name == "bias" or param.ndim <= 1 or name.endswith("token")
                or "pos_embed" in name
            )
            (no_decay if skip else decay).append(param)
    groups = [{"params": decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def _build_optimizer(module: Any, optimizer: Callable[[Iterable[Any]], torch.optim.Optimizer],
                     params: Iterable[Any]) -> torch.optim.Optimizer:
    """``optimizer(params)``; torch's own checks of its arguments (``Invalid learning rate: -1``, a
    negative weight decay or beta) become a `StackError` naming the optimizer and the fix."""
    try:
        return optimizer(params)
    except ValueError as error:
        cls = _target_class(optimizer)
        name = cls.__name__ if cls is not None else "optimizer"
        match = re.search(r"Invalid (\w+)", str(error))
        key = {"learning": "lr", "epsilon": "eps"}.get(match.group(1), match.group(1)) if match else "init_args"
        raise StackError(f"is refused by {name} ({str(error).rstrip('.')})", source=type(module).__name__,
                         key=f"model.init_args.optimizer.init_args.{key}", value=_invalid_value(error),
                         fix="use a learning rate above 0 (e.g. lr: 0.001) and non-negative weight_decay, "
                             "betas in [0, 1), eps >= 0") from None


def _invalid_value(error: ValueError) -> Any:
    text = str(error).rsplit(":", 1)[-1].strip()
    try:
        return float(text)
    except ValueError:
        return text


def configure_optimization(
    module: Any,
    optimizer: Callable[[Iterable[Any]], torch.optim.Optimizer],
    lr_scheduler: Callable[[torch.optim.Optimizer], Any] | None,
    interval: str = "step",
    params: Iterable[Any] | None = None,
) -> Any:
    """What ``configure_optimizers`` returns: the optimizer and, if given, its scheduler stepped every
    ``interval`` ("step" or "epoch") with its length taken from ``module.trainer``."""
    opt = _build_optimizer(module, optimizer, params if params is not None else weight_decay_groups(module))
    if lr_scheduler is None:
        return opt
    trainer = module.trainer
    if interval == "step":
        length = trainer.estimated_stepping_batches
    else:
        length = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else math.inf
    if not math.isfinite(length):
        raise StackError(
            "needs the length of training, which is unknown (no max_epochs/max_steps, or data of unknown length)",
            source=type(module).__name__,
            key="lr_scheduler",
            value=_target_class(lr_scheduler).__name__ if _target_class(lr_scheduler) else repr(lr_scheduler),
            fix="set trainer.max_epochs or trainer.max_steps, or give the scheduler its length explicitly",
        )
    scheduler = build_scheduler(lr_scheduler, opt, int(length))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": scheduler, "interval": interval}}
