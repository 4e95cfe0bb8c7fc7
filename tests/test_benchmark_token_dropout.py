"""benchmarks/token_dropout.py in its small mode writes its JSON (no timing or accuracy is asserted)."""

from __future__ import annotations

import json


def test_token_dropout_benchmark_small(tmp_path, monkeypatch):
    from benchmarks import ssl_runs, token_dropout

    out, runs = tmp_path / "token_dropout.json", str(tmp_path / "runs")
    token_dropout.main(["--small", "--out", str(out), "--runs-dir", runs])
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

    # asked again with the same runs folder, nothing trains or searches: every run and search is reused
    import stacktrain.search_schedule

    def refuse(*args, **kwargs):
        raise AssertionError("a stored run or search was recomputed")

    monkeypatch.setattr(ssl_runs.RunSpec, "run", refuse)
    monkeypatch.setattr(stacktrain.search_schedule, "search_schedule", refuse)
    again = tmp_path / "again.json"
    token_dropout.main(["--small", "--parts", "b", "--out", str(again), "--runs-dir", runs])
    reused = json.loads(again.read_text())["time_to_accuracy"]["simclr"]
    assert reused["final_knn_acc"] == simclr["final_knn_acc"] and reused["cpu_s"] == simclr["cpu_s"]
    assert reused["schedules"] == simclr["schedules"]


def test_data_overrides_keep_a_config_written_for_the_task():
    """``--data cluttered`` swaps the digits config's data module for the cluttered one; a config that
    already wraps the cluttered digits keeps its own settings (difficulty, augment) and only takes what
    the command line asks (another image size with its scaled digits, the smoke run's small sets)."""
    import types

    import yaml

    from benchmarks.token_dropout import overrides_for
    from conftest import CONFIGS

    def args(**given):
        return types.SimpleNamespace(**{**dict(data="digits", small=False, width=None, depth=None, patch_size=None,
                                               image_size=None), **given})

    digits = yaml.safe_load((CONFIGS / "simclr_token_dropout.yaml").read_text())
    assert overrides_for(digits, args()) == []
    swapped = overrides_for(digits, args(data="cluttered"))
    assert swapped[0] == "--data.init_args.base"
    assert json.loads(swapped[1])["class_path"] == "stacktrain.datamodules.ClutteredDigitsDataModule"
    cluttered = dict(digits, data={"class_path": digits["data"]["class_path"], "init_args": dict(
        digits["data"]["init_args"], base={"class_path": "stacktrain.datamodules.ClutteredDigitsDataModule",
                                           "init_args": {"batch_size": 64, "clutter": 4, "augment": True}})})
    assert overrides_for(cluttered, args(data="cluttered")) == []
    resized = overrides_for(cluttered, args(data="cluttered", image_size=24))
    assert resized[:6] == ["--data.init_args.base.init_args.digit_size", "[10, 15]",
                           "--data.init_args.base.init_args.fragment_size", "4",
                           "--data.init_args.base.init_args.image_size", "24"]


def test_stored_runs_are_keyed_by_what_decides_them(tmp_path):
    """A stored run is reused only for the same spec, config bytes, schedule file and measured code."""
    from benchmarks.ssl_runs import RunSpec, code_state
    from benchmarks.token_dropout import SCOPE

    code = code_state(SCOPE)

    config = tmp_path / "run.yaml"
    config.write_text("trainer: {max_epochs: 2}\n")
    spec = RunSpec(str(config), 0, ("--trainer.limit_train_batches", "4"), 2)
    key = spec.key(code)
    assert RunSpec(str(config), 0, ("--trainer.limit_train_batches", "4"), 2).key(code) == key
    assert RunSpec(str(config), 1, spec.overrides, 2).key(code) != key  # another seed
    assert RunSpec(str(config), 0, spec.overrides, 2, keep_ratio=0.5).key(code) != key
    schedule = tmp_path / "schedule.yaml"
    schedule.write_text("phases: [{end: 1.0, keep_ratio: 1.0, patch_scale: 1}]\n")
    scheduled = RunSpec(str(config), 0, spec.overrides, 2, schedule_file=str(schedule))
    first = scheduled.key(code)
    schedule.write_text("phases: [{end: 0.5, keep_ratio: 0.5, patch_scale: 1}, {end: 1.0, keep_ratio: 1.0, patch_scale: 1}]\n")
    assert scheduled.key(code) != first  # the schedule file's content, not only its path
    config.write_text("trainer: {max_epochs: 3}\n")
    assert spec.key(code) != key  # the config's content
    assert spec.key(code_state([*SCOPE, "stacktrain/errors.py"])) != spec.key(code)  # the measured code


def test_a_killed_run_continues_from_its_last_epoch_and_ends_the_same(tmp_path):
    """A run stopped after its first epoch (as a killed benchmark leaves it) and continued from its
    `EpochCheckpoint` draws the same data, augmentations and token masks as the uninterrupted run: the
    same k-NN curve, steps and progress checkpoint (taken after the resume), number for number."""
    from argparse import Namespace

    import torch
    import yaml
    from lightning.pytorch import Callback

    from benchmarks.ssl_runs import RunSpec, ssl_run
    from benchmarks.token_dropout import config_path, overrides_for
    from stacktrain.search_schedule import load_progress_checkpoints

    config = config_path("simclr", "digits")
    args = Namespace(data="digits", image_size=0, small=True, width=32, depth=2, patch_size=0)
    overrides = (*overrides_for(yaml.safe_load(open(config)), args), "--trainer.limit_train_batches", "3")

    def spec(folder: str) -> RunSpec:
        return RunSpec(config, 0, overrides, 3, keep_ratio=0.5, checkpoints=str(tmp_path / folder),
                       checkpoint_points=(0.0, 0.5))

    whole = spec("whole").run(str(tmp_path / "scratch"))

    class StopAfterFirstEpoch(Callback):
        def on_train_epoch_end(self, trainer, pl_module):
            trainer.should_stop = True

    resume = tmp_path / "run.ckpt"
    cut = spec("cut")
    first = ssl_run(config, 0, list(overrides), str(tmp_path / "scratch"), 3, technique=cut.technique(),
                    checkpoints=cut.checkpoints, checkpoint_points=cut.checkpoint_points, resume=str(resume),
                    callbacks=[StopAfterFirstEpoch()])
    assert len(first["curve"]) == 1 and resume.is_file()
    continued = cut.run(str(tmp_path / "scratch"), resume=str(resume))

    assert continued["steps"] == whole["steps"] == 9
    assert [p["knn_acc"] for p in continued["curve"]] == [p["knn_acc"] for p in whole["curve"]]
    assert len(continued["curve"]) == 3 and continued["cpu_s"] > first["cpu_s"]  # the first epoch's time is kept
    kept = [load_progress_checkpoints(str(tmp_path / folder)) for folder in ("whole", "cut")]
    assert [step for _, step, _ in kept[0]] == [step for _, step, _ in kept[1]]
    assert kept[1][-1][1] > 3  # the late checkpoint was taken after the resume
    late = [torch.load(entries[-1][2], weights_only=True)["state_dict"] for entries in kept]
    assert late[0].keys() == late[1].keys()
    assert all(torch.equal(late[0][name], late[1][name]) for name in late[0])  # after the resume: same weights
