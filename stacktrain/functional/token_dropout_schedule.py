"""Acceleration schedules (sequence compression as a function of training progress) and the math of
searching one from gradient measurements. Plain Python/torch, no Lightning.

A schedule maps training progress ``t = global_step / total_steps`` in [0, 1] to a compression
``(keep_ratio, patch_scale)``. It is either a list of phases (each ending at a fraction of training)
or a named shape of the keep ratio:

- ``constant``: ``keep_ratio`` (and ``patch_scale``) throughout;
- ``step``: ``keep_ratio`` and ``patch_scale`` until ``until``, then the full sequence;
- ``linear`` / ``cosine``: the keep ratio rises from ``keep_ratio`` at the start to 1 at ``until``
  (straight line / half cosine), full sequence after.

The search (`gradient_error_stats`, `cost_adjusted_error`, `dominated_candidates`, `falling_behind`,
`choose_phases`)
compares, at checkpoints of a training run, each candidate compression's gradient with the full-sequence
gradient on the same batches and picks, per stage, the candidate with the least cost-adjusted error,
compression never increasing over training and the full sequence in the final stage (optionally within
a compute budget).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from stacktrain.errors import StackError, require_choice, require_number
from stacktrain.functional.token_dropout import check_keep_ratio

__all__ = [
    "Phase",
    "AccelerationSchedule",
    "SHAPES",
    "first_step_at",
    "read_schedule_file",
    "write_schedule_file",
    "gradient_error_stats",
    "cost_adjusted_error",
    "dominated_candidates",
    "falling_behind",
    "choose_phases",
]

SHAPES: tuple[str, ...] = ("constant", "step", "linear", "cosine")


@dataclass(frozen=True)
class Phase:
    """Until ``end`` (fraction of training) train at ``keep_ratio`` and ``patch_scale``."""

    end: float
    keep_ratio: float = 1.0
    patch_scale: int = 1

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


class AccelerationSchedule:
    """Compression as a function of training progress; see the module docstring."""

    def __init__(
        self,
        *,
        shape: str | None = "constant",
        keep_ratio: float = 1.0,
        patch_scale: int = 1,
        until: float = 1.0,
        phases: Sequence[Phase | Mapping[str, Any]] | None = None,
        source: str = "TokenDropout",
        key: str = "schedule",
    ) -> None:
        if phases is not None:
            self.shape = None
            self.phases = _check_phases(phases, source=source, key=key)
            self.keep_ratio, self.patch_scale, self.until = 1.0, 1, 1.0
            return
        self.shape = require_choice(shape, key, SHAPES, source=source)
        self.keep_ratio = check_keep_ratio(keep_ratio, source=source)
        require_number(patch_scale, "patch_scale", source=source, low=1, integer=True)
        self.patch_scale = int(patch_scale)
        self.until = float(require_number(until, "until", source=source, low=0.0, high=1.0, low_inclusive=False))
        if self.shape in ("linear", "cosine") and self.patch_scale != 1:
            raise StackError(
                f"cannot ramp a whole-number patch scale along a {self.shape} shape", source=source,
                key="patch_scale", value=patch_scale,
                fix="use schedule: step (patch scale until `until`) or a list of phases, or patch_scale: 1",
            )
        self.phases = []

    # ------------------------------------------------------------------------------------------ use
    def at(self, progress: float) -> tuple[float, int]:
        """``(keep_ratio, patch_scale)`` at ``progress`` in [0, 1] (beyond the schedule: full sequence)."""
        if self.shape is None:
            for phase in self.phases:
                if progress < phase.end:
                    return phase.keep_ratio, phase.patch_scale
            return 1.0, 1
        if self.shape == "constant":
            return self.keep_ratio, self.patch_scale
        if progress >= self.until:
            return 1.0, 1
        if self.shape == "step":
            return self.keep_ratio, self.patch_scale
        fraction = progress / self.until
        if self.shape == "linear":
            return self.keep_ratio + (1.0 - self.keep_ratio) * fraction, 1
        return 1.0 - (1.0 - self.keep_ratio) * 0.5 * (1.0 + math.cos(math.pi * fraction)), 1

    @property
    def breakpoints(self) -> list[float]:
        """Progress points where the schedule changes course: every phase's end, or ``until`` of a
        non-constant shape (a jump for ``step`` and phases, a kink for ``linear``/``cosine``)."""
        if self.shape is None:
            return [p.end for p in self.phases]
        return [] if self.shape == "constant" else [self.until]

    @property
    def max_patch_scale(self) -> int:
        if self.shape is None:
            return max((p.patch_scale for p in self.phases), default=1)
        return self.patch_scale

    @property
    def patch_scales(self) -> list[int]:
        if self.shape is None:
            return sorted({p.patch_scale for p in self.phases})
        return [self.patch_scale]

    @property
    def is_noop(self) -> bool:
        """True when the schedule never compresses (then the technique installs nothing)."""
        if self.shape is None:
            return all(p.keep_ratio >= 1.0 and p.patch_scale == 1 for p in self.phases)
        return self.keep_ratio >= 1.0 and self.patch_scale == 1

    def mean_cost(self, relative_cost: Any, resolution: int = 1000) -> float:
        """Mean over training of ``relative_cost(keep_ratio, patch_scale)`` (midpoint rule)."""
        return sum(relative_cost(*self.at((i + 0.5) / resolution)) for i in range(resolution)) / resolution

    # ------------------------------------------------------------------------------------ state
    def as_dict(self) -> dict[str, Any]:
        if self.shape is None:
            return {"phases": [p.as_dict() for p in self.phases]}
        return {"shape": self.shape, "keep_ratio": self.keep_ratio, "patch_scale": self.patch_scale, "until": self.until}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "TokenDropout") -> AccelerationSchedule:
        if "phases" in data:
            return cls(phases=data["phases"], source=source)
        return cls(shape=data.get("shape", "constant"), keep_ratio=data.get("keep_ratio", 1.0),
                   patch_scale=data.get("patch_scale", 1), until=data.get("until", 1.0), source=source)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AccelerationSchedule) and self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        return f"AccelerationSchedule({self.as_dict()})"


def _check_phases(phases: Sequence[Phase | Mapping[str, Any]], *, source: str, key: str) -> list[Phase]:
    if not isinstance(phases, Sequence) or isinstance(phases, (str, bytes)) or not phases:
        raise StackError("must be a non-empty list of phases", source=source, key=key, value=phases,
                         fix="give phases like [{end: 0.6, keep_ratio: 0.5}, {end: 1.0, keep_ratio: 1.0}]")
    checked: list[Phase] = []
    previous_end = 0.0
    for index, item in enumerate(phases):
        where = f"{key}[{index}]"
        if isinstance(item, Phase):
            item = item.as_dict()
        if not isinstance(item, Mapping) or "end" not in item:
            raise StackError("must be a mapping with an 'end' (fraction of training)", source=source, key=where,
                             value=item, fix="write the phase as {end: 0.5, keep_ratio: 0.5, patch_scale: 1}")
        unknown = set(item) - {"end", "keep_ratio", "patch_scale"}
        if unknown:
            raise StackError(f"has unknown keys {sorted(unknown)}", source=source, key=where, value=dict(item),
                             fix="a phase has only end, keep_ratio and patch_scale")
        end = require_number(item["end"], f"{where}.end", source=source, low=0.0, high=1.0, low_inclusive=False)
        if end <= previous_end:
            raise StackError(f"must be after the previous phase's end ({previous_end})", source=source,
                             key=f"{where}.end", value=end, fix="list phases in training order with increasing ends")
        keep = check_keep_ratio(item.get("keep_ratio", 1.0), f"{where}.keep_ratio", source=source)
        scale = item.get("patch_scale", 1)
        if isinstance(scale, float) and scale.is_integer():
            scale = int(scale)  # YAML and CLI parsers may hand whole numbers over as floats
        require_number(scale, f"{where}.patch_scale", source=source, low=1, integer=True)
        checked.append(Phase(float(end), keep, int(scale)))
        previous_end = float(end)
    return checked


def first_step_at(progress: float, total: int) -> int:
    """The first step whose progress ``step / total`` reaches ``progress`` (the comparison the schedule
    makes), free of rounding in ``progress * total``."""
    step = math.ceil(progress * total)
    while step > 0 and (step - 1) / total >= progress:
        step -= 1
    while step / total < progress:
        step += 1
    return step


def read_schedule_file(path: str, *, source: str = "TokenDropout") -> tuple[AccelerationSchedule, dict[str, Any]]:
    """The schedule in a YAML file written by ``python -m stacktrain.search_schedule`` (its ``phases``),
    and the whole file's content (budget, measurements)."""
    import yaml

    from stacktrain.errors import require_existing_path

    require_existing_path(path, "schedule_file", source=source,
                          fix="run `python -m stacktrain.search_schedule --config X.yaml --out FILE` first")
    if not os.path.isfile(path):
        raise StackError("is a folder, not a schedule file", source=source, key="schedule_file", value=path,
                         fix="point to the YAML file written by python -m stacktrain.search_schedule")
    try:
        with open(path, encoding="utf-8") as handle:
            content = yaml.safe_load(handle)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        first = (str(error).strip().splitlines() or [""])[0]
        raise StackError(f"is not valid YAML ({type(error).__name__}: {first})", source=source,
                         key="schedule_file", value=path,
                         fix="point to the YAML file written by python -m stacktrain.search_schedule") from error
    if not isinstance(content, Mapping) or "phases" not in content:
        raise StackError("has no 'phases' list", source=source, key="schedule_file", value=path,
                         fix="point to a file written by python -m stacktrain.search_schedule")
    return AccelerationSchedule(phases=content["phases"], source=source, key=f"{path}:phases"), dict(content)


def write_schedule_file(path: str, schedule: AccelerationSchedule, header: str, **content: Any) -> None:
    """Write ``schedule`` (its phases first, then ``content``) as YAML with a comment ``header``."""
    import yaml

    body = {"phases": [p.as_dict() for p in schedule.phases], **content}
    text = yaml.safe_dump(body, sort_keys=False, default_flow_style=None, width=110)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("".join(f"# {line}\n" for line in header.strip().splitlines()))
        handle.write(text)


# --------------------------------------------------------------------------------------- the search
def gradient_error_stats(full: torch.Tensor, compressed: torch.Tensor) -> dict[str, float]:
    """How a compressed-sequence gradient estimate differs from the full-sequence one.

    ``full`` and ``compressed`` are ``[B, P]``: one flattened gradient per measurement batch, the same
    batches in the same order (``compressed`` with fresh random masks per batch). With ``G`` the mean
    full gradient (the reference), everything is relative to ``|G|^2``:

    - ``one_minus_cosine`` and ``relative_l2``: per batch, ``1 - cos(g_c, g_f)`` and
      ``|g_c - g_f| / |g_f|``, averaged over batches;
    - ``bias2``: ``|E[g_c - g_f]|^2``, the systematic error that averaging more steps does not remove
      (an unbiased estimate: the noise of the sample mean is subtracted, floored at 0);
    - ``bias2_noise``: that subtracted noise, ``tr Cov(g_c - g_f) / B``: bias differences smaller than
      it are not resolved by these batches;
    - ``variance``: ``E|g_c - E g_c|^2`` over batches and masks, the noise of one compressed estimate;
    - ``full_variance``: the same for the full sequence (the ordinary batch-to-batch noise of SGD).
    """
    if full.shape != compressed.shape or full.ndim != 2 or full.shape[0] < 2:
        raise ValueError(f"need two [B, P] tensors with B >= 2, got {tuple(full.shape)} and {tuple(compressed.shape)}")
    full = full.double()
    compressed = compressed.double()
    batches = full.shape[0]
    reference = full.mean(0).pow(2).sum().clamp_min(1e-30)
    difference = compressed - full
    mean_difference = difference.mean(0)
    difference_noise = (difference - mean_difference).pow(2).sum(1).sum() / (batches - 1)
    bias2 = (mean_difference.pow(2).sum() - difference_noise / batches).clamp_min(0.0)
    variance = (compressed - compressed.mean(0)).pow(2).sum(1).sum() / (batches - 1)
    full_variance = (full - full.mean(0)).pow(2).sum(1).sum() / (batches - 1)
    cosine = torch.nn.functional.cosine_similarity(compressed, full, dim=1)
    relative_l2 = difference.norm(dim=1) / full.norm(dim=1).clamp_min(1e-30)
    return {
        "one_minus_cosine": float((1 - cosine).mean()),
        "relative_l2": float(relative_l2.mean()),
        "bias2": float(bias2 / reference),
        "bias2_noise": float(difference_noise / batches / reference),
        "variance": float(variance / reference),
        "full_variance": float(full_variance / reference),
    }


def cost_adjusted_error(stats: Mapping[str, float], relative_cost: float) -> float:
    """Mean squared error of the gradient per unit of compute, relative to the full sequence's.

    With a fixed compute budget, a compression that costs ``c`` of a full step can average ``1/c`` as
    many estimates, which divides its variance by ``1/c`` but leaves its bias: the error per unit of
    compute is ``bias^2 + c * variance``. Divided by the full sequence's ``variance`` (bias 0, cost 1),
    the full sequence scores 1 and a compression scoring below 1 buys a better gradient per FLOP.
    """
    full_variance = max(stats["full_variance"], 1e-30)
    return (stats["bias2"] + relative_cost * stats["variance"]) / full_variance


def dominated_candidates(
    stats: Sequence[Mapping[str, float] | None],
    costs: Sequence[float],
    protected: Sequence[int] = (),
) -> set[int]:
    """Indices of candidates that another measured candidate beats, beyond measurement noise, at one
    checkpoint: not worth measuring at later checkpoints.

    ``B`` dominates ``A`` when ``B`` costs no more, has no more variance, and has *clearly* less squared
    bias: ``bias2_A - bias2_B`` exceeds both estimates' noise (``bias2_noise``), so that a bias that
    a few batches cannot resolve (early in training both are often floored at 0) drops nothing.
    Comparing bias and variance separately, not only their cost-adjusted sum, keeps the verdict
    valid whatever weight training later puts on each; and a cheaper ``B`` allows every later,
    lighter compression that ``A`` would, so the monotone choice loses no schedule it could need.
    ``None`` stats (not measured) neither dominate nor are dropped; ``protected`` (the full sequence)
    are never dropped.
    """
    measured = [i for i, s in enumerate(stats) if s is not None]
    dropped: set[int] = set()
    for a in measured:
        sa = stats[a]
        assert sa is not None
        for b in measured:
            sb = stats[b]
            assert sb is not None
            clearly_less_biased = sa["bias2"] - sb["bias2"] > sa.get("bias2_noise", 0.0) + sb.get("bias2_noise", 0.0)
            if (a not in protected and b != a and costs[b] <= costs[a] and sb["variance"] <= sa["variance"]
                    and clearly_less_biased):
                dropped.add(a)
                break
    return dropped


def falling_behind(
    previous: Sequence[float | None],
    current: Sequence[float | None],
    protected: Sequence[int] = (),
    margin: float = 0.25,
) -> set[int]:
    """Indices of candidates whose cost-adjusted error is above the full sequence's (1) by more than
    ``margin`` at this checkpoint and higher than at the previous one: not worth measuring later
    when no budget asks for cheap candidates.

    A compression's error per unit of compute grows as training converges (its bias comes to dominate
    the gradient noise; papers.md section 1), so a candidate already worse than the full sequence and
    getting worse would win a later stage only if its error fell by more than ``2 x margin`` right
    away: the next stage's error is the mean of this checkpoint's and the next. The margin keeps
    the noise of a few batches from dropping a candidate near 1. ``None`` entries (not measured)
    are left alone; ``protected`` (the full sequence) is never dropped.
    """
    return {
        c for c, (before, now) in enumerate(zip(previous, current))
        if c not in protected and before is not None and now is not None and now > 1.0 + margin and now > before
    }


def choose_phases(
    progress: Sequence[float],
    errors: Sequence[Sequence[float | None]],
    costs: Sequence[float],
    candidates: Sequence[tuple[float, int]],
    budget: float | None = None,
    *,
    resolution: int = 1000,
) -> tuple[list[Phase], float]:
    """The paper's rule: per stage the candidate with the least cost-adjusted error, compression never
    increasing over training, full sequences in the final stage.

    ``progress`` are the checkpoints (increasing, first 0, all below 1). Stage ``i`` runs from
    ``progress[i]`` to ``progress[i + 1]`` and its error for candidate ``c`` is the mean of
    ``errors[i][c]`` and ``errors[i + 1][c]`` (``None``: not measured there, so not available); the
    final stage, from the last checkpoint to 1, is the full sequence ``(1.0, 1)``, which must be a
    candidate. Among schedules whose relative cost never decreases from stage to stage, the one with
    the least width-weighted error is chosen (exactly, by dynamic programming); without a monotonicity
    conflict that is each stage's own best. ``budget`` (optional) caps the mean relative cost over
    training, final stage included; costs are rounded *up* to ``1/resolution`` so the cap always holds.
    Adjacent stages with the same candidate are merged. Returns the phases and their mean relative cost.
    """
    points = [float(p) for p in progress]
    if len(points) < 2 or points[0] != 0.0 or points[-1] >= 1.0 or any(b <= a for a, b in zip(points, points[1:])):
        raise ValueError(f"checkpoints must increase from 0 and stay below 1 (at least 2), got {points}")
    if (1.0, 1) not in [(float(k), int(s)) for k, s in candidates]:
        raise ValueError("the full sequence (1.0, 1) must be a candidate: it is the final stage")
    widths = [b - a for a, b in zip(points, points[1:])]
    final_width = 1.0 - points[-1]
    full = [(float(k), int(s)) for k, s in candidates].index((1.0, 1))
    stage_errors = [[_mean_of_ends(errors[i][c], errors[i + 1][c]) if costs[c] <= costs[full] else math.inf
                     for c in range(len(candidates))] for i in range(len(widths))]
    if budget is None:
        weights, capacity = [[0] * len(candidates) for _ in widths], 0
    else:
        weights = [[math.ceil(w * cost * resolution - 1e-9) for cost in costs] for w in widths]
        capacity = math.floor((budget - final_width) * resolution + 1e-9)
    chosen = _monotone_path(stage_errors, widths, costs, weights, capacity)
    if chosen is None:
        cheapest = _monotone_path(stage_errors, widths, costs, [[0] * len(costs) for _ in widths], 0,
                                  value=lambda width, c, error: width * costs[c])
        minimum = final_width + sum(w * costs[c] for w, c in zip(widths, cheapest or []))
        raise StackError(
            f"cannot be met: the cheapest schedule that never increases compression and ends at the full "
            f"sequence from {points[-1]:g} costs {minimum:.3f} of the full run",
            source="search_schedule", key="budget", value=budget,
            fix=f"raise --budget to at least {math.ceil(minimum * 100) / 100:.2f}, leave it out (the paper's rule "
                "alone), move the last checkpoint later or add cheaper candidates",
        )
    phases: list[Phase] = []
    for end, c in zip([*points[1:], 1.0], [*chosen, full]):
        keep, scale = float(candidates[c][0]), int(candidates[c][1])
        if phases and (phases[-1].keep_ratio, phases[-1].patch_scale) == (keep, scale):
            phases[-1] = Phase(end, keep, scale)
        else:
            phases.append(Phase(end, keep, scale))
    mean_cost = final_width * costs[full] + sum(w * costs[c] for w, c in zip(widths, chosen))
    return phases, mean_cost


def _mean_of_ends(start: float | None, end: float | None) -> float:
    if start is None or end is None or not math.isfinite(start) or not math.isfinite(end):
        return math.inf
    return (start + end) / 2


def _monotone_path(
    stage_errors: Sequence[Sequence[float]],
    widths: Sequence[float],
    costs: Sequence[float],
    weights: Sequence[Sequence[int]],
    capacity: int,
    value: Any = None,
) -> list[int] | None:
    """Candidates per stage minimising ``sum value(width, c, error)`` (default ``width * error``) over
    paths whose cost never decreases and whose summed ``weights`` stay within ``capacity``; ``None``
    when no such path exists. State: (last candidate, units used)."""
    value = value or (lambda width, c, error: width * error)
    states: dict[tuple[int, int], tuple[float, list[int]]] = {(-1, 0): (0.0, [])}
    for stage, width in enumerate(widths):
        following: dict[tuple[int, int], tuple[float, list[int]]] = {}
        for (last, used), (total, path) in states.items():
            for c in sorted(range(len(costs)), key=lambda i: costs[i]):
                error = stage_errors[stage][c]
                spent = used + weights[stage][c]
                if not math.isfinite(error) or spent > capacity or (last >= 0 and costs[c] < costs[last]):
                    continue
                candidate_total = total + value(width, c, error)
                if candidate_total < following.get((c, spent), (math.inf, []))[0] - 1e-15:
                    following[(c, spent)] = (candidate_total, [*path, c])
        states = following
    if not states:
        return None
    return min(states.values(), key=lambda item: item[0])[1]
