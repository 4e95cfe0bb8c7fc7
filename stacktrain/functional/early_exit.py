"""BoostNet: an early-exit network trained as an additive model, and budgeted early-exit policies.

Exit ``s`` has a head whose raw logits are ``f_s``. BoostNet's prediction at exit ``s`` is an ensemble
of the heads so far; in training, head ``s`` learns the residual of the *detached* earlier ensemble, so
deeper heads fix what earlier ones got wrong instead of all learning the same thing. Two forms:

* ``"reference"`` (the default, as SHI-Labs/Boosted-Dynamic-Networks trains and predicts):
  ``G_s = f_s + w * G_{s-1}`` (``G_0 = f_0``); head ``s`` trains on ``CE(f_s + w * G_{s-1}.detach())``.
  The head's own logits are not rescaled and an early head's share decays by ``w`` per later exit
  (``w = 0.5`` in the reference's scripts).
* ``"scaled"`` (stacktrain's first version): ``F_s = w * (f_s + F_{s-1})``; head ``s`` trains on
  ``CE(w * (f_s + F_{s-1}.detach()))``; with ``w = 1`` every head counts fully in every later exit.

The classic baseline ("independent") trains every head on ``CE(f_s)`` and predicts with ``f_s`` alone.

Backbone gradients are rescaled per exit (gradient equilibrium, as in the BoostNet code's MSDNet-GE):
the feature at exit ``i`` of ``N`` passes the head ``1/(N-i)`` of the gradient and the deeper path
``(N-i-1)/(N-i)``, so early stages are not swamped by the sum of all later losses.

Budgeted inference (MSDNet's protocol): a sample leaves at the first exit whose confidence (max
softmax of its prediction) reaches that exit's threshold. For a budget, the share of samples leaving
at exit ``k`` follows a geometric series ``p_k ~ q^k``; thresholds are fitted on validation data so
that those shares leave, and ``q`` is searched so the expected cost meets the budget.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from stacktrain.functional.early_exit_network import EarlyExitNetwork

__all__ = [
    "apply_early_exit",
    "DEFAULT_WEIGHT",
    "FORMS",
    "ensemble_step",
    "ensemble_predictions",
    "exit_losses",
    "GradientRescale",
    "split_gradient",
    "exit_proportions",
    "fit_thresholds",
    "assign_exits",
    "budgeted_accuracy",
    "fit_budget",
    "anytime_accuracy",
    "confidences",
]


#: The ensemble weight each form uses when none is given (the reference's scripts use 0.5).
DEFAULT_WEIGHT = {"reference": 0.5, "scaled": 1.0}
FORMS = tuple(DEFAULT_WEIGHT)


def apply_early_exit(
    model_name: str,
    num_classes: int,
    exits: Sequence[str | int] | None = None,
    *,
    head_hidden: int | None = 128,
    rescale_gradients: bool = True,
    **backbone_options: Any,
) -> EarlyExitNetwork:
    """A timm backbone (``model_name``) cut at ``exits`` (stage or block names, or indices; when None, the
    last four stages of a CNN or four evenly spaced blocks of a ViT) with one classifier head per exit: an `EarlyExitNetwork` whose
    forward returns every exit's logits (train it with `exit_losses`) and whose ``early_exit`` runs the
    budgeted inference loop. ``backbone_options`` are `StagedBackbone`'s (``in_chans``, ``pretrained``,
    ``model_kwargs``)."""
    from stacktrain.functional.early_exit_network import EarlyExitNetwork, StagedBackbone

    return EarlyExitNetwork(StagedBackbone(model_name, exits, **backbone_options), num_classes, head_hidden,
                            rescale_gradients)


def ensemble_step(logits: torch.Tensor, previous: torch.Tensor | None, weight: float,
                  form: str = "reference") -> torch.Tensor:
    """One exit's ensemble from its head's logits and the previous exit's ensemble (None at the first
    exit): ``logits + weight * previous`` ("reference") or ``weight * (logits + previous)`` ("scaled")."""
    if form == "reference":
        return logits if previous is None else logits + weight * previous
    if form == "scaled":
        return (logits if previous is None else logits + previous) * weight
    raise ValueError(f"unknown ensemble form {form!r}: use one of {FORMS}")


def _weights(count: int, weights: Sequence[float] | None, form: str) -> list[float]:
    if form not in DEFAULT_WEIGHT:
        raise ValueError(f"unknown ensemble form {form!r}: use one of {FORMS}")
    return list(weights) if weights is not None else [DEFAULT_WEIGHT[form]] * count


def ensemble_predictions(
    head_logits: Sequence[torch.Tensor], mode: str = "boost", weights: Sequence[float] | None = None,
    form: str = "reference",
) -> list[torch.Tensor]:
    """The prediction at every exit: the ``form``'s ensemble for "boost", ``f_s`` for "independent"."""
    if mode == "independent":
        return list(head_logits)
    predictions: list[torch.Tensor] = []
    previous: torch.Tensor | None = None
    for logits, weight in zip(head_logits, _weights(len(head_logits), weights, form)):
        previous = ensemble_step(logits, previous, weight, form)
        predictions.append(previous)
    return predictions


def exit_losses(
    head_logits: Sequence[torch.Tensor],
    targets: torch.Tensor,
    mode: str = "boost",
    weights: Sequence[float] | None = None,
    label_smoothing: float = 0.0,
    form: str = "reference",
) -> list[torch.Tensor]:
    """One cross-entropy per exit. "boost": head ``s`` is trained on its exit's ensemble with the
    earlier ensemble detached (a fixed offset; see the module docstring); "independent": on ``f_s``."""
    if mode == "independent":
        return [F.cross_entropy(f, targets, label_smoothing=label_smoothing) for f in head_logits]
    losses: list[torch.Tensor] = []
    previous: torch.Tensor | None = None
    for logits, weight in zip(head_logits, _weights(len(head_logits), weights, form)):
        current = ensemble_step(logits, None if previous is None else previous.detach(), weight, form)
        losses.append(F.cross_entropy(current, targets, label_smoothing=label_smoothing))
        previous = current
    return losses


class GradientRescale(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``scale`` in backward."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor, scale: float) -> torch.Tensor:  # type: ignore[override]
        ctx.scale = scale
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad * ctx.scale, None


def split_gradient(features: torch.Tensor, exit_index: int, num_exits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(for_head, for_next_stage)`` views of the features at ``exit_index``: in backward, the
    backbone receives ``g_head / (N - i) + g_next * (N - i - 1) / (N - i)`` (gradient equilibrium)."""
    remaining = num_exits - exit_index
    shared = GradientRescale.apply(features, 1.0 / remaining)
    return shared, GradientRescale.apply(shared, float(remaining - 1))


def confidences(predictions: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(confidence, predicted class)`` per exit and sample, each ``[exits, samples]``."""
    probs = torch.stack([p.float().softmax(dim=-1) for p in predictions])
    confidence, predicted = probs.max(dim=-1)
    return confidence, predicted


def anytime_accuracy(predicted: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Accuracy of every exit on all samples (``predicted`` is ``[exits, samples]``)."""
    return (predicted == targets.unsqueeze(0)).float().mean(dim=1)


def exit_proportions(q: float, num_exits: int) -> torch.Tensor:
    """Shares of samples leaving at each exit, ``p_k ~ q^k`` (k = 1..N), summing to 1. ``q < 1``
    sends most samples out early, ``q > 1`` most to the end."""
    powers = torch.arange(1, num_exits + 1, dtype=torch.float64) * math.log(q)
    shares = torch.exp(powers - powers.max())
    return shares / shares.sum()


def fit_thresholds(confidence: torch.Tensor, proportions: torch.Tensor) -> torch.Tensor:
    """Per-exit thresholds such that, exit by exit, the share ``proportions[k]`` of all samples leaves
    at exit ``k`` (the most confident of those still present); the last exit takes the rest.

    ``confidence`` is ``[exits, samples]``; returns ``[exits]`` with ``-inf`` for the last exit.
    """
    num_exits, samples = confidence.shape
    thresholds = torch.full((num_exits,), float("inf"), dtype=confidence.dtype)
    thresholds[-1] = float("-inf")
    present = torch.ones(samples, dtype=torch.bool)
    for k in range(num_exits - 1):
        leaving = int(math.floor(samples * float(proportions[k])))
        candidates = confidence[k][present]
        if leaving > 0 and candidates.numel() > 0:
            leaving = min(leaving, candidates.numel())
            thresholds[k] = torch.topk(candidates, leaving).values[-1]
            present &= confidence[k] < thresholds[k]
    return thresholds


def assign_exits(confidence: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """The exit each sample leaves at: the first ``k`` with ``confidence[k] >= thresholds[k]``."""
    passes = confidence >= thresholds.to(confidence.dtype).unsqueeze(1)
    passes[-1] = True
    return passes.float().argmax(dim=0)


def budgeted_accuracy(
    confidence: torch.Tensor, predicted: torch.Tensor, targets: torch.Tensor, thresholds: torch.Tensor,
    exit_costs: torch.Tensor,
) -> tuple[float, float, torch.Tensor]:
    """``(accuracy, mean cost per sample, share leaving at each exit)`` of a threshold policy;
    ``exit_costs[k]`` is the cost of a sample that leaves at exit ``k`` (everything up to it)."""
    exits = assign_exits(confidence, thresholds)
    chosen = predicted.gather(0, exits.unsqueeze(0)).squeeze(0)
    accuracy = float((chosen == targets).float().mean())
    cost = float(exit_costs.to(torch.float64)[exits].mean())
    shares = torch.bincount(exits, minlength=confidence.shape[0]).double() / exits.numel()
    return accuracy, cost, shares


def fit_budget(confidence: torch.Tensor, exit_costs: torch.Tensor, budget: float, iterations: int = 60) -> torch.Tensor:
    """Thresholds whose mean cost per sample on ``confidence`` (validation data) is at most
    ``budget`` (same unit as ``exit_costs``), as close to it as the geometric family allows.

    The mean cost grows with ``q``; ``log q`` is bisected in [-12, 12].
    """
    costs = exit_costs.to(torch.float64)
    num_exits = confidence.shape[0]

    def cost_of(log_q: float) -> tuple[float, torch.Tensor]:
        thresholds = fit_thresholds(confidence, exit_proportions(math.exp(log_q), num_exits))
        exits = assign_exits(confidence, thresholds)
        return float(costs[exits].mean()), thresholds

    low, high = -12.0, 12.0
    low_cost, best = cost_of(low)
    if low_cost > budget:
        return best  # the cheapest policy of the family: everything that can leave early does
    high_cost, high_thresholds = cost_of(high)
    if high_cost <= budget:
        return high_thresholds
    for _ in range(iterations):
        middle = (low + high) / 2
        cost, thresholds = cost_of(middle)
        if cost <= budget:
            low, best = middle, thresholds
        else:
            high = middle
    return best
