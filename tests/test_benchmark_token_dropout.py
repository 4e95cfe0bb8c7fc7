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
    assert 0 < simclr["target_knn_acc"] <= 1 and simclr["schedule"] and simclr["schedule_expected_cost"] <= 0.3
    assert len(simclr["runs"]["baseline"]) == len(simclr["runs"]["accelerated"]) == 1
    assert payload["markdown"] == token_dropout.report(payload)  # the report rebuilds from the JSON alone
