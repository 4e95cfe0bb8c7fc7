"""The measurement protocol of benchmarks/common.py (BENCHMARKS.md): paired-seed statistics, headroom
checks, the verdict vocabulary, the --data choice and the provenance that marks stale figures."""

from __future__ import annotations

import json
import math

import pytest

from benchmarks import common
from benchmarks.common import FAILS, HOLDS, NO_HEADROOM, WITHIN_NOISE


def test_paired_interval_matches_a_hand_computation():
    # diffs 0.03, 0.02, 0.04: mean 0.03, sd 0.01, t(0.975, 2) = 4.302653 -> half width 0.024841
    stats = common.paired([0.80, 0.82, 0.81], [0.83, 0.84, 0.85])
    assert stats["diffs"] == pytest.approx([0.03, 0.02, 0.04])
    assert stats["diff_mean"] == pytest.approx(0.03)
    assert stats["diff_low"] == pytest.approx(0.03 - 4.302653 * 0.01 / math.sqrt(3), abs=1e-6)
    assert stats["diff_high"] == pytest.approx(0.03 + 4.302653 * 0.01 / math.sqrt(3), abs=1e-6)
    assert stats["baseline_mean"] == pytest.approx(0.81) and stats["variant_mean"] == pytest.approx(0.84)


def test_paired_needs_the_same_seeds_on_both_sides():
    with pytest.raises(ValueError, match="same seeds"):
        common.paired([0.8, 0.9], [0.85])


def test_one_pair_has_no_interval_and_shows_nothing():
    stats = common.paired([0.80], [0.95])
    assert math.isnan(stats["diff_low"]) and common.compare(stats) == WITHIN_NOISE


@pytest.mark.parametrize("variant, claim, tolerance, expected", [
    ([0.83, 0.84, 0.85], "beats", 0.0, HOLDS),          # interval [0.005, 0.055] above zero
    ([0.83, 0.84, 0.85], "beats", 0.01, WITHIN_NOISE),  # ... but not above one point
    ([0.77, 0.78, 0.79], "beats", 0.0, FAILS),          # wholly below zero
    ([0.81, 0.80, 0.83], "beats", 0.0, WITHIN_NOISE),   # straddles zero
    ([0.801, 0.821, 0.811], "matches", 0.005, HOLDS),   # +0.1 point, no spread
    ([0.83, 0.84, 0.85], "matches", 0.001, FAILS),      # wholly above the tolerance
    ([0.79, 0.81, 0.80], "not_worse", 0.02, HOLDS),     # -1 point, no spread: above -2
    ([0.70, 0.72, 0.71], "not_worse", 0.02, FAILS),     # -10 points
])
def test_compare_verdicts(variant, claim, tolerance, expected):
    assert common.compare(common.paired([0.80, 0.82, 0.81], variant), claim, tolerance) == expected


def test_no_headroom_overrides_any_interval():
    stats = common.paired([0.80, 0.82, 0.81], [0.83, 0.84, 0.85])
    assert common.compare(stats, headroom_ok=False) == NO_HEADROOM
    assert common.meets_goal(0.3, 0.5, headroom_ok=False) == NO_HEADROOM
    with pytest.raises(ValueError, match="unknown claim"):
        common.compare(stats, "dominates")


def test_meets_goal_uses_the_interval_of_several_values():
    assert common.meets_goal(0.55, 0.6) == HOLDS and common.meets_goal(0.68, 0.6) == FAILS
    assert common.meets_goal([0.50, 0.52, 0.51], 0.6) == HOLDS
    assert common.meets_goal([0.40, 0.80, 0.60], 0.6) == WITHIN_NOISE  # the interval straddles the goal
    assert common.meets_goal([0.07, 0.08, 0.09], 0.05, at_most=False) == HOLDS
    assert common.meets_goal([0.01, 0.02, 0.015], 0.05, at_most=False) == FAILS


def test_headroom_flags_a_target_at_the_floor_and_a_saturated_baseline():
    # the SSL case of issue 16: DINO's k-NN target 0.40 against a random-init ViT at 0.44
    at_floor = common.headroom(0.40, floors={"random-init ViT k-NN": 0.44, "chance": 0.1})
    assert not at_floor["ok"] and "random-init ViT k-NN" in at_floor["reason"]
    saturated = common.headroom([0.985, 0.982], floors={"chance": 0.1})
    assert not saturated["ok"] and "ceiling" in saturated["reason"]
    fine = common.headroom([0.88, 0.90], floors={"chance": 0.1, "raw-pixel k-NN": 0.44})
    assert fine["ok"] and fine["reason"] == "" and len(fine["checks"]) == 3
    small_effect = common.headroom(0.88, floors={}, effects={"plain INT4 loses at least 3 points": (0.012, 0.03)})
    assert not small_effect["ok"] and "INT4" in small_effect["reason"]


def test_verdict_rows_take_only_the_vocabulary():
    row = common.verdict("claim", HOLDS, "0.5x")
    assert row == {"claim": "claim", "verdict": "holds", "figure": "0.5x", "reason": "", "paper": ""}
    with pytest.raises(ValueError, match="unknown verdict"):
        common.verdict("claim", "looks good", "0.5x")


def test_data_choice_builds_every_kind_and_refuses_a_missing_path(tmp_path):
    assert common.data_config("digits", batch_size=8)["class_path"].endswith("DigitsDataModule")
    cluttered = common.classification_data("cluttered", batch_size=8, image_size=16, small=True)
    assert cluttered.digit_size == (7, 10) and cluttered.render["fragment_size"] == 3
    (tmp_path / "cifar-10-batches-py").mkdir()
    assert common.data_config(str(tmp_path), batch_size=8)["init_args"]["dataset"] == "cifar10"
    with pytest.raises(SystemExit, match="not 'digits'"):
        common.data_config(str(tmp_path / "nowhere"), batch_size=8)


def test_provenance_marks_a_json_stale_when_its_code_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "REPOSITORY", tmp_path)
    code = tmp_path / "bench.py"
    code.write_text("x = 1\n")
    record = {"provenance": {"commit": "abc", "dirty": False, "code": common.code_digests(["bench.py"])}}
    assert common.staleness(record) == ""
    code.write_text("x = 2\n")
    assert "bench.py" in common.staleness(record) and "abc" in common.staleness(record)
    assert "before provenance" in common.staleness({"benchmark": "old"})
    during = {"provenance": dict(record["provenance"], changed_during_run=["bench.py"])}
    assert "while it was measured" in common.staleness(during)


def test_a_benchmark_json_records_its_commit_and_imported_code(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "STARTED", float("inf"))  # this test process may be older than an edit
    out = common.write_json("probe", {"value": 1}, str(tmp_path / "probe.json"))
    record = json.loads(out.read_text())
    assert "benchmarks/common.py" in record["provenance"]["code"]
    assert all(not name.startswith("/") for name in record["provenance"]["code"])
    assert common.staleness(record) == ""


def test_a_benchmark_scope_limits_the_code_its_staleness_follows():
    from benchmarks import early_exit

    scoped = common.imported_code(early_exit.SCOPE)
    assert "lightning_modules/early_exit.py" in scoped and "stacktrain/functional/early_exit.py" in scoped
    # imported through stacktrain.lightning_modules, but another technique's: not its concern
    assert "lightning_modules/contrastive.py" in common.imported_code()
    assert "lightning_modules/contrastive.py" not in scoped
