"""Acceleration schedules (sequence compression as a function of training progress) and the math of
searching one from gradient measurements. Plain Python/torch, no Lightning.

A schedule maps training progress ``t = global_step / total_steps`` in [0, 1] to a compression
``(keep_ratio, patch_scale)``. It is either a list of phases (each ending at a fraction of training)
or a named shape of the keep ratio:

- ``constant``: ``keep_ratio`` (and ``patch_scale``) throughout;
- ``step``: ``keep_ratio`` and ``patch_scale`` until ``until``, then the full sequence;
- ``linear`` / ``cosine``: the keep ratio rises from ``keep_ratio`` at the start to 1 at ``until``
  (straight line / half cosine), full sequence after.

The search (`gradient_error_stats`, `cost_adjusted_error`, `choose_phases`) compares, at checkpoints of
training, each candidate compression's gradient with the full-sequence gradient on the same batches and
picks, per phase, the candidates with the least cost-adjusted error that fit the compute budget.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from stacktrain.errors import StackError, require_choice, require_number
from stacktrain.functional.token_drop import check_keep_ratio

__all__ = [
    "Phase",
    "AccelerationSchedule",
    "SHAPES",
    "read_schedule_file",
    "write_schedule_file",
    "gradient_error_stats",
    "cost_adjusted_error",
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


def choose_phases(
    progress: Sequence[float],
    errors: Sequence[Sequence[float]],
    costs: Sequence[float],
    candidates: Sequence[tuple[float, int]],
    budget: float,
    *,
    resolution: int = 2000,
) -> tuple[list[Phase], float]:
    """Pick one candidate per phase: the least total cost-adjusted error within the compute budget.

    ``progress`` are the measurement points (increasing, first 0, last 1); phase ``i`` runs from
    ``progress[i]`` to ``progress[i + 1]`` and its error for candidate ``c`` is the mean of
    ``errors[i][c]`` and ``errors[i + 1][c]``. The budget bounds the mean relative cost over training,
    ``sum_i width_i * costs[c_i] <= budget``. Exact multiple-choice knapsack by dynamic programming on
    costs rounded *up* to ``1/resolution`` (so the budget always holds). Adjacent phases with the same
    candidate are merged. Returns the phases and their mean relative cost.
    """
    points = [float(p) for p in progress]
    if len(points) < 2 or points[0] != 0.0 or points[-1] != 1.0 or any(b <= a for a, b in zip(points, points[1:])):
        raise ValueError(f"progress points must increase from 0 to 1, got {points}")
    widths = [b - a for a, b in zip(points, points[1:])]
    phase_errors = [[(errors[i][c] + errors[i + 1][c]) / 2 for c in range(len(candidates))] for i in range(len(widths))]
    capacity = int(math.floor(budget * resolution + 1e-9))
    weights = [[int(math.ceil(w * costs[c] * resolution - 1e-9)) for c in range(len(candidates))] for w in widths]
    cheapest = sum(min(row) for row in weights)
    if cheapest > capacity:
        minimum = sum(w * min(costs) for w in widths)
        raise StackError(
            f"cannot be met: even the cheapest candidate everywhere costs {minimum:.3f} of the full run",
            source="search_schedule", key="budget", value=budget,
            fix=f"raise --budget to at least {math.ceil(minimum * 100) / 100:.2f} or add cheaper candidates "
                "(smaller --keep-ratios, larger --patch-scales)",
        )
    infinity = math.inf
    best = [0.0] + [infinity] * capacity  # best[b]: least error so far using exactly b units
    choices: list[list[int]] = []
    for phase, width in enumerate(widths):
        new = [infinity] * (capacity + 1)
        picked = [-1] * (capacity + 1)
        for used, error in enumerate(best):
            if error == infinity:
                continue
            for c in range(len(candidates)):
                total = used + weights[phase][c]
                if total > capacity:
                    continue
                value = error + width * phase_errors[phase][c]
                if value < new[total] - 1e-15:
                    new[total], picked[total] = value, c
        best = new
        choices.append(picked)
    # backtrack from the best final budget use
    used = min(range(capacity + 1), key=lambda b: (best[b], b))
    chosen = [0] * len(widths)
    for phase in reversed(range(len(widths))):
        c = choices[phase][used]
        chosen[phase] = c
        used -= weights[phase][c]
    phases: list[Phase] = []
    for phase, c in enumerate(chosen):
        keep, scale = candidates[c]
        end = points[phase + 1]
        if phases and (phases[-1].keep_ratio, phases[-1].patch_scale) == (float(keep), int(scale)):
            phases[-1] = Phase(end, float(keep), int(scale))
        else:
            phases.append(Phase(end, float(keep), int(scale)))
    mean_cost = sum(w * costs[c] for w, c in zip(widths, chosen))
    return phases, mean_cost
