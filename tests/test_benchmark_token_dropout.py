"""benchmarks/token_dropout.py in its small mode writes its JSON (no timing or accuracy is asserted)."""

from __future__ import annotations

import json


def test_token_dropout_benchmark_small(tmp_path):
    from benchmarks import token_dropout

    out = tmp_path / "token_dropout.json"
    token_dropout.main(["--small", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["benchmark"] == "token_dropout"
    steps = payload["step_time"]
    assert steps["full sequence"]["cpu_ratio"] == 1.0
    assert {"TokenDropout keep 0.5", "timm patch_drop_rate 0.5", "TokenDropout patch scale 2 (flexi)"} <= set(steps)
    simclr = payload["time_to_accuracy"]["simclr"]
    assert 0 < simclr["target_knn_acc"] <= 1
    # both searches ran on the baseline's checkpoints, never increase compression and end full
    assert set(simclr["schedules"]) == {"paper rule", "budgeted"}
    for schedule in simclr["schedules"].values():
        assert schedule["search"]["trained_here"] is False
        assert schedule["phases"][-1]["keep_ratio"] == 1.0 and schedule["phases"][-1]["patch_scale"] == 1
    assert simclr["schedules"]["budgeted"]["expected_cost"] <= 0.4 + 1e-9
    # every variant on the same seeds; the constants' epochs spend the searched run's FLOPs
    variants = {"baseline", "searched schedule", "constant keep 0.5", "constant patch scale 2"}
    assert set(simclr["runs"]) == variants
    assert all([run["seed"] for run in runs] == [0, 1] for runs in simclr["runs"].values())
    assert simclr["budget_epochs"]["constant patch scale 2"] >= simclr["budget_epochs"]["constant keep 0.5"]
    assert simclr["equal_budget"]["constant keep 0.5"]["n"] == 2
    rows = {row["claim"]: row for row in token_dropout.verdicts(payload)}
    assert any(claim.startswith("simclr: the full-sequence baseline learns") for claim in rows)
    assert payload["markdown"] == token_dropout.report(payload)  # the report rebuilds from the JSON alone
