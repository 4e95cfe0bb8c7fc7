"""Acceleration schedules and the math of the schedule search (no Trainer)."""

from __future__ import annotations

import itertools

import pytest
import torch

from stacktrain.errors import StackError
from stacktrain.functional.token_dropout_schedule import (
    AccelerationSchedule,
    Phase,
    choose_phases,
    dominated_candidates,
    falling_behind,
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
    # the noise floor of bias2: g_c - g_f varies by the mask noise alone, 0.09 per coordinate, over B batches
    assert stats["bias2_noise"] == pytest.approx(size * 0.09 / batches / reference, rel=0.15)
    assert same["bias2"] == 0 and same["one_minus_cosine"] == pytest.approx(0, abs=1e-12) and same["relative_l2"] == 0
    # (bias^2 + cost x variance) / full variance, from the known parts: (5 + 0.5 * 50 * 0.34) / (50 * 0.25)
    assert cost_adjusted_error(stats, 0.5) == pytest.approx((5.0 + 0.5 * size * 0.34) / (size * 0.25), rel=0.1)
    assert cost_adjusted_error(same, 1.0) == pytest.approx(1.0)
    # half the cost, the same noise and no bias: twice as good per unit of compute
    assert cost_adjusted_error(dict(same, variance=same["full_variance"]), 0.5) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        gradient_error_stats(full[:1], compressed[:1])


CANDIDATES = [(1.0, 1), (0.5, 1), (0.25, 1)]
COSTS = [1.0, 0.5, 0.25]
CHECKPOINTS = [0.0, 0.25, 0.5, 0.75]  # final stage 0.75 -> 1 is the full sequence
# per checkpoint (rows) and candidate (columns); stage errors are the means of their two ends:
# stage 0: [1, 0.45, 0.35], stage 1: [1, 0.55, 0.65], stage 2: [1, 0.7, 1.2]
EARLY_COMPRESSION = [[1.0, 0.4, 0.3], [1.0, 0.5, 0.4], [1.0, 0.6, 0.9], [1.0, 0.8, 1.5]]


def test_choose_phases_takes_each_stages_best_and_ends_full():
    phases, cost = choose_phases(CHECKPOINTS, EARLY_COMPRESSION, COSTS, CANDIDATES)
    assert phases == [Phase(0.25, 0.25, 1), Phase(0.75, 0.5, 1), Phase(1.0, 1.0, 1)]
    assert cost == pytest.approx(0.25 * 0.25 + 0.5 * 0.5 + 0.25 * 1.0)
    # a budget that the unconstrained choice meets changes nothing
    assert choose_phases(CHECKPOINTS, EARLY_COMPRESSION, COSTS, CANDIDATES, budget=0.6) == (phases, cost)


def test_choose_phases_never_increases_compression():
    # stage bests are keep 0.5, then 0.25, then 0.5: heavier compression later is not allowed.
    # stage errors: [1, 0.5, 0.75], [1, 0.6, 0.4], [1, 0.7, 0.8]; the best monotone sum is 0.5 + 0.6 + 0.7
    errors = [[1.0, 0.4, 1.0], [1.0, 0.6, 0.5], [1.0, 0.6, 0.3], [1.0, 0.8, 1.3]]
    phases, cost = choose_phases(CHECKPOINTS, errors, COSTS, CANDIDATES)
    assert phases == [Phase(0.75, 0.5, 1), Phase(1.0, 1.0, 1)]
    assert cost == pytest.approx(0.75 * 0.5 + 0.25)
    # every monotone path by brute force: none has a lower summed error
    best = min(sum(0.25 * (errors[s][c] + errors[s + 1][c]) / 2 for s, c in enumerate(path))
               for path in itertools.product(range(3), repeat=3)
               if all(COSTS[b] >= COSTS[a] for a, b in zip(path, path[1:])))
    assert best == pytest.approx(0.25 * (0.5 + 0.6 + 0.7))


def test_choose_phases_respects_a_budget_or_says_what_it_needs():
    phases, cost = choose_phases(CHECKPOINTS, EARLY_COMPRESSION, COSTS, CANDIDATES, budget=0.45)
    assert phases == [Phase(0.75, 0.25, 1), Phase(1.0, 1.0, 1)] and cost == pytest.approx(0.4375) and cost <= 0.45
    with pytest.raises(StackError, match=r"budget=0.3 cannot be met.*costs 0.438.*at least 0.44"):
        choose_phases(CHECKPOINTS, EARLY_COMPRESSION, COSTS, CANDIDATES, budget=0.3)


def test_choose_phases_skips_candidates_not_measured_and_checks_its_input():
    errors = [row[:] for row in EARLY_COMPRESSION]
    for row in errors[1:]:
        row[1] = None  # keep 0.5 dropped after the first checkpoint
    phases, _ = choose_phases(CHECKPOINTS, errors, COSTS, CANDIDATES)
    assert phases == [Phase(0.5, 0.25, 1), Phase(1.0, 1.0, 1)]
    with pytest.raises(ValueError, match="below 1"):
        choose_phases([0.0, 0.5, 1.0], EARLY_COMPRESSION, COSTS, CANDIDATES)
    with pytest.raises(ValueError, match="full sequence"):
        choose_phases(CHECKPOINTS, EARLY_COMPRESSION, COSTS, [(0.75, 1), (0.5, 1), (0.25, 1)])


def test_dominated_candidates_need_to_lose_on_cost_variance_and_clearly_on_bias():
    def stats(bias2, variance, noise=0.05):
        return {"bias2": bias2, "variance": variance, "bias2_noise": noise}

    table = [
        stats(0.0, 1.0),             # 0: full sequence, cost 1: protected
        stats(0.2, 1.2),             # 1: cost 0.5
        stats(0.4, 1.3),             # 2: cost 0.6, bias 0.2 above 1's with noise 0.1: dropped
        stats(0.28, 1.3),            # 3: cost 0.6, bias 0.08 above 1's: within the noise, kept
        stats(0.6, 1.1),             # 4: cost 0.25, cheaper than 1 but more biased: kept
        None,                        # 5: not measured
        stats(0.5, 1.25, noise=0.4), # 6: cost 0.7, bias 0.3 above 1's but its own noise is 0.4: kept
        stats(0.45, 1.0),            # 7: cost 0.6, more biased than 1 but less variance: kept
    ]
    costs = [1.0, 0.5, 0.6, 0.6, 0.25, 0.1, 0.7, 0.6]
    assert dominated_candidates(table, costs, protected=[0]) == {2}
    # unprotected, the full sequence loses to a candidate no dearer, no noisier and clearly less biased
    full_last = [stats(0.3, 1.0), stats(0.0, 0.9)]
    assert dominated_candidates(full_last, [1.0, 0.9]) == {0} and not dominated_candidates(full_last, [1.0, 0.9], [0])




def test_falling_behind_drops_candidates_worse_than_full_and_getting_worse():
    previous = [1.0, 0.8, 1.4, 1.3, 1.1, None, 0.9]
    current = [1.0, 1.2, 1.5, 1.2, 1.3, 2.0, 1.26]
    # 1: rising but within the margin; 2: above 1.25 and rising: dropped; 3: above but falling;
    # 4: rising above 1.25: dropped; 5: not measured before; 6: 1.26 just past 1 + 0.25
    assert falling_behind(previous, current, protected=[0]) == {2, 4, 6}
    assert falling_behind(previous, current, protected=[0], margin=0.4) == {2}
    assert falling_behind([2.0, 1.0], [3.0, 1.0], protected=[0]) == set()  # the full sequence stays
