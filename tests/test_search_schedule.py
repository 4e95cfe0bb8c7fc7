"""`python -m stacktrain.search_schedule`: a short real search on the digits writes a schedule that
`TokenDropout` loads, with its measurements and plot."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import CONFIGS
from stacktrain.callbacks import TokenDropout
from stacktrain.errors import StackError
from stacktrain.search_schedule import main

TINY = json.dumps(dict(img_size=16, patch_size=2, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0))


def test_search_writes_a_schedule_within_budget_with_measurements_and_plot(tmp_path):
    out = tmp_path / "schedule.yaml"
    args = ["--config", str(CONFIGS / "simclr_token_dropout.yaml"), "--budget", "0.6", "--out", str(out),
            "--calibration-fraction", "0.25", "--points", "0,0.3,1", "--keep-ratios", "1,0.5",
            "--patch-scales", "1,2", "--batches", "3", "--trainer.max_epochs", "4",
            "--model.init_args.model_kwargs", TINY, "--model.init_args.hidden_dim", "64"]
    content = main(args)
    assert out.is_file() and out.with_suffix(".png").is_file()
    written = yaml.safe_load(out.read_text())
    assert written["phases"] and written["budget"] == content["budget"] == 0.6
    assert written["expected_cost"] <= 0.6
    measured = written["measurements"]
    assert measured["progress"] == [0.0, 0.3, 1.0] and measured["steps"] == [0, 6, 19]
    assert [(c["keep_ratio"], c["patch_scale"]) for c in measured["candidates"]] == [(1.0, 1), (0.5, 1), (1.0, 2), (0.5, 2)]
    costs = [c["relative_cost"] for c in measured["candidates"]]
    assert costs[0] == 1.0 and costs[3] < costs[2] < costs[1] < 1.0
    for row in measured["cost_adjusted_error"]:
        assert row[0] == pytest.approx(1.0)  # the full sequence is the reference
    assert all(value > 0 for row in measured["relative_l2"] for value in row[1:])
    assert written["calibration"]["training_steps"] == 19
    technique = TokenDropout(schedule_file=str(out))
    assert technique.schedule.phases[-1].end == 1.0
    assert technique.schedule.mean_cost(lambda keep, scale: costs[[(1.0, 1), (0.5, 1), (1.0, 2), (0.5, 2)].index(
        (keep, scale))]) == pytest.approx(written["expected_cost"], abs=2e-3)
    with pytest.raises(SystemExit):  # never overwrites
        main(args)


def test_a_non_dividing_patch_scale_is_refused_before_any_training():
    from stacktrain.search_schedule import search_schedule

    with pytest.raises(StackError, match="patch-scales=3 does not divide"):
        search_schedule(str(CONFIGS / "simclr_token_dropout.yaml"), 0.3, "/nonexistent/x.yaml", patch_scales=(1, 3),
                        overrides=["--model.init_args.model_kwargs", TINY])
