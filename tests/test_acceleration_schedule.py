"""Acceleration schedules and the math of the schedule search (no Trainer)."""

from __future__ import annotations

import math

import pytest
import torch

from stacktrain.errors import StackError
from stacktrain.functional.acceleration_schedule import (
    AccelerationSchedule,
    Phase,
    choose_phases,
    cost_adjusted_error,
    gradient_error_stats,
    read_schedule_file,
    write_schedule_file,
)


def test_named_shapes():
    constant = AccelerationSchedule(shape="constant", keep_ratio=0.5, patch_scale=2)
    assert constant.at(0.0) == constant.at(0.99) == (0.5, 2)
    step = AccelerationSchedule(shape="step", keep_ratio=0.25, patch_scale=2, until=0.6)
    assert step.at(0.59) == (0.25, 2) and step.at(0.6) == (1.0, 1)
    linear = AccelerationSchedule(shape="linear", keep_ratio=0.5, until=0.5)
    assert linear.at(0.0) == (0.5, 1) and linear.at(0.25) == (0.75, 1) and linear.at(0.7) == (1.0, 1)
    cosine = AccelerationSchedule(shape="cosine", keep_ratio=0.5)
    assert cosine.at(0.0) == (0.5, 1) and cosine.at(0.5)[0] == pytest.approx(0.75) and cosine.at(1.0) == (1.0, 1)
    assert cosine.at(0.25)[0] < 0.625  # slow start of the half cosine
    assert AccelerationSchedule(shape="constant", keep_ratio=1.0).is_noop


def test_phases_and_their_validation():
    schedule = AccelerationSchedule(phases=[{"end": 0.6, "keep_ratio": 0.5, "patch_scale": 2}, {"end": 0.85, "keep_ratio": 0.75}])
    assert schedule.at(0.0) == (0.5, 2) and schedule.at(0.6) == (0.75, 1) and schedule.at(0.9) == (1.0, 1)
    assert schedule.max_patch_scale == 2 and schedule.patch_scales == [1, 2]
    assert schedule.mean_cost(lambda keep, scale: keep / scale**2) == pytest.approx(0.6 * 0.125 + 0.25 * 0.75 + 0.15)
    assert AccelerationSchedule.from_dict(schedule.as_dict()) == schedule
    bad = [
        ([{"end": 0.5}, {"end": 0.4}], "after the previous phase"),
        ([{"end": 0.5, "keep_ratio": 1.5}], r"schedule\[0\].keep_ratio=1.5"),
        ([{"end": 0.5, "keep_ratio": 0}], "out of range"),
        ([{"end": 1.2}], "out of range"),
        ([{"end": 0.5, "patch_scale": 1.5}], "integer"),
        ([{"end": 0.5, "keep": 0.5}], "unknown keys"),
        ([{"keep_ratio": 0.5}], "'end'"),
        ([], "non-empty list"),
    ]
    for phases, message in bad:
        with pytest.raises(StackError, match=message):
            AccelerationSchedule(phases=phases)
    with pytest.raises(StackError, match="did you mean 'cosine'"):
        AccelerationSchedule(shape="cosin")
    with pytest.raises(StackError, match="patch_scale=2.*linear"):
        AccelerationSchedule(shape="linear", keep_ratio=0.5, patch_scale=2)


def test_schedule_file_round_trip(tmp_path):
    schedule = AccelerationSchedule(phases=[Phase(0.3, 0.5, 2), Phase(1.0, 0.75, 1)])
    path = str(tmp_path / "schedule.yaml")
    write_schedule_file(path, schedule, "a header\nsecond line", budget=0.4, patch_mode="resolution")
    text = open(path).read()
    assert text.startswith("# a header\n# second line\nphases:")
    loaded, content = read_schedule_file(path)
    assert loaded == schedule and content["budget"] == 0.4 and content["patch_mode"] == "resolution"
    (tmp_path / "empty.yaml").write_text("budget: 1\n")
    with pytest.raises(StackError, match="has no 'phases'"):
        read_schedule_file(str(tmp_path / "empty.yaml"))
    with pytest.raises(StackError, match="does not exist"):
        read_schedule_file(str(tmp_path / "missing.yaml"))


def test_gradient_error_stats_separate_bias_from_variance():
    torch.manual_seed(0)
    batches, size = 400, 50
    true_gradient = torch.randn(size)
    full = true_gradient + 0.5 * torch.randn(batches, size)  # batch noise, variance 0.25 per coordinate
    bias = torch.zeros(size)
    bias[:5] = 1.0
    compressed = full + bias + 0.3 * torch.randn(batches, size)  # plus mask noise, variance 0.09
    stats = gradient_error_stats(full, compressed)
    reference = true_gradient.pow(2).sum().item()
    assert stats["bias2"] == pytest.approx(5.0 / reference, rel=0.1)
    assert stats["full_variance"] == pytest.approx(size * 0.25 / reference, rel=0.1)
    assert stats["variance"] == pytest.approx(size * (0.25 + 0.09) / reference, rel=0.1)
    same = gradient_error_stats(full, full)
    assert same["bias2"] == 0 and same["one_minus_cosine"] == pytest.approx(0, abs=1e-12) and same["relative_l2"] == 0
    assert cost_adjusted_error(same, 1.0) == pytest.approx(1.0)
    # half the cost, the same noise and no bias: twice as good per unit of compute
    assert cost_adjusted_error(dict(same, variance=same["full_variance"]), 0.5) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        gradient_error_stats(full[:1], compressed[:1])


def test_choose_phases_compresses_where_error_per_cost_is_low_within_the_budget():
    candidates = [(1.0, 1), (0.5, 1), (0.25, 1)]
    costs = [1.0, 0.5, 0.25]
    progress = [0.0, 0.25, 0.5, 0.75, 1.0]
    # early in training compression is cheap in error; later its bias dominates
    errors = [[1.0, 0.4, 0.3], [1.0, 0.5, 0.4], [1.0, 0.9, 1.5], [1.0, 1.3, 2.5], [1.0, 1.6, 3.0]]
    unconstrained, cost = choose_phases(progress, errors, costs, candidates, budget=1.0)
    assert unconstrained == [Phase(0.25, 0.25, 1), Phase(0.5, 0.5, 1), Phase(1.0, 1.0, 1)]
    assert cost == pytest.approx(0.25 * 0.25 + 0.25 * 0.5 + 0.5 * 1.0)
    tight, cost = choose_phases(progress, errors, costs, candidates, budget=0.4)
    assert cost <= 0.4
    assert tight[0].keep_ratio == 0.25 and tight[-1].end == 1.0
    # exhaustive check of the optimum under the budget
    best = math.inf
    for a in range(3):
        for b in range(3):
            for c in range(3):
                for d in range(3):
                    choice = [a, b, c, d]
                    if sum(0.25 * costs[i] for i in choice) > 0.4 + 1e-9:
                        continue
                    value = sum(0.25 * (errors[p][i] + errors[p + 1][i]) / 2 for p, i in enumerate(choice))
                    best = min(best, value)
    chosen = sum(0.25 * (errors[p][candidates.index(tight_candidate(tight, (p + 0.5) / 4))]
                         + errors[p + 1][candidates.index(tight_candidate(tight, (p + 0.5) / 4))]) / 2
                 for p in range(4))
    assert chosen == pytest.approx(best)
    with pytest.raises(StackError, match="budget=0.1 cannot be met.*at least 0.25"):
        choose_phases(progress, errors, costs, candidates, budget=0.1)


def tight_candidate(phases: list[Phase], progress: float) -> tuple[float, int]:
    return AccelerationSchedule(phases=phases).at(progress)
