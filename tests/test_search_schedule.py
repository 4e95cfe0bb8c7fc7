"""The schedule search: checkpoints of a real run (`ProgressCheckpoints`), the gradient probe that leaves
the module as it found it, and `python -m stacktrain.search_schedule` from checkpoints and without."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from lightning.pytorch import Callback, seed_everything

from conftest import CONFIGS, TINY_VIT, make_trainer
from stacktrain.callbacks import TokenDropout
from stacktrain.datamodules import DigitsDataModule, MultiViewDataModule
from stacktrain.errors import StackError
from stacktrain.lightning_modules import DINO
from stacktrain.search_schedule import (
    GradientProbe,
    ProgressCheckpoints,
    _fixed_batches,
    load_progress_checkpoints,
    main,
    search_schedule,
)

TINY = json.dumps(dict(img_size=16, patch_size=2, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0))
#: SimCLR from its config at test size: 2 epochs of 6 batches = 12 optimizer steps.
SHORT = ["--trainer.max_epochs", "2", "--trainer.limit_train_batches", "6",
         "--model.init_args.model_kwargs", TINY, "--model.init_args.hidden_dim", "64"]
SIMCLR = str(CONFIGS / "simclr_token_dropout.yaml")


def tiny_dino(token_dropout_views: str = "one") -> DINO:
    """DINO: an EMA teacher and a centre buffer, both changed by every forward."""
    seed_everything(0)
    return DINO(model_name="vit_tiny_patch16_224", in_chans=1, model_kwargs=dict(TINY_VIT), out_dim=32, hidden_dim=32,
                bottleneck_dim=16, base_momentum=0.9, token_dropout_views=token_dropout_views)


def views() -> MultiViewDataModule:
    return MultiViewDataModule(DigitsDataModule(batch_size=16))


def state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class Snapshot(Callback):
    """The module's state when ``global_step`` first reads ``step`` (before that step's update)."""

    def __init__(self, step: int) -> None:
        self.step, self.state = step, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step and self.state is None:
            self.state = state(pl_module)


def test_progress_checkpoints_at_the_first_step_at_or_after_each_point_and_training_unchanged(tmp_path):
    folder = tmp_path / "ckpt"
    snapshot = Snapshot(6)
    with_checkpoints = tiny_dino()
    make_trainer(tmp_path, [ProgressCheckpoints((0.0, 0.1, 0.25, 0.5), str(folder)), snapshot],
                 max_steps=12, limit_val_batches=0).fit(with_checkpoints, views())
    without = tiny_dino()
    make_trainer(tmp_path, max_steps=12, limit_val_batches=0).fit(without, views())
    assert same_state(state(with_checkpoints), state(without))  # bit-identical training

    found = load_progress_checkpoints(str(folder))
    # 0.1 x 12 = 1.2 -> step 2; 0.25 x 12 = 3 -> step 3; 0.5 x 12 = 6 -> step 6
    assert [(progress, step) for progress, step, _ in found] == [(0.0, 0), (2 / 12, 2), (0.25, 3), (0.5, 6)]
    saved = torch.load(found[-1][2], weights_only=True)
    assert saved["global_step"] == 6 and saved["total_steps"] == 12
    assert "center" in saved["state_dict"] and any(k.startswith("teacher_backbone.") for k in saved["state_dict"])
    assert same_state(saved["state_dict"], snapshot.state)
    index = yaml.safe_load((folder / "progress_checkpoints.yaml").read_text())
    assert index["complete"] and index["steps"] == 12 and index["cpu_seconds"] > 0
    assert [entry["points"] for entry in index["checkpoints"]] == [[0.0], [0.1], [0.25], [0.5]]
    with pytest.raises(StackError, match="dirpath=.* already holds progress checkpoints"):
        make_trainer(tmp_path, [ProgressCheckpoints((0.0, 0.5), str(folder))], max_steps=2,
                     limit_val_batches=0).fit(tiny_dino(), views())
    with pytest.raises(StackError, match="points=.*must start at 0, stay below 1"):
        ProgressCheckpoints((0.0, 0.5, 1.0), str(folder))


class StopAt(Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            trainer.should_stop = True


def test_progress_checkpoints_go_on_after_a_resume(tmp_path):
    folder, points = tmp_path / "ckpt", (0.0, 0.1, 0.12, 0.25, 0.5)  # 0.1 and 0.12 of 12 steps: both step 2
    first = make_trainer(tmp_path, [ProgressCheckpoints(points, str(folder)), StopAt(4)], max_steps=12,
                         limit_val_batches=0)
    first.fit(tiny_dino(), views())
    assert [step for _, step, _ in load_progress_checkpoints(str(folder))] == [0, 2, 3]
    first.save_checkpoint(str(tmp_path / "stopped.ckpt"))
    make_trainer(tmp_path, [ProgressCheckpoints(points, str(folder))], max_steps=12, limit_val_batches=0).fit(
        tiny_dino(), views(), ckpt_path=str(tmp_path / "stopped.ckpt"))
    assert [step for _, step, _ in load_progress_checkpoints(str(folder))] == [0, 2, 3, 6]
    index = yaml.safe_load((folder / "progress_checkpoints.yaml").read_text())
    assert index["complete"] and index["steps"] == 12
    assert [entry["points"] for entry in index["checkpoints"]] == [[0.0], [0.1, 0.12], [0.25], [0.5]]


class Probing(Callback):
    """Measures with a `GradientProbe` at the start of a fit (as the search does) and keeps what it saw."""

    def on_train_start(self, trainer, pl_module):
        self.before, self.rng = state(pl_module), torch.get_rng_state()
        self.results = trainer.fit_loop.epoch_loop._results
        probe = GradientProbe(pl_module, [(1.0, 1), (0.5, 1), (0.25, 1)])
        try:
            batches = _fixed_batches(trainer, 3, seed=0)
            self.stats = probe.measure(batches, [0, 1, 2], round_seed=0, count_flops=True)
            self.again = probe.measure(batches, [0, 2], round_seed=0)  # not counted this time
            self.costs = probe.relative_costs
        finally:
            probe.close()
        self.after, self.rng_after = state(pl_module), torch.get_rng_state()
        self.logged = dict(trainer.fit_loop.epoch_loop._results)
        self.same_results = trainer.fit_loop.epoch_loop._results is self.results


def test_the_probe_measures_real_errors_and_leaves_the_module_and_its_logs_as_they_were(tmp_path):
    probing = Probing()
    module = tiny_dino()
    make_trainer(tmp_path, [probing], max_steps=1, limit_val_batches=0).fit(module, views())
    assert same_state(probing.before, probing.after) and torch.equal(probing.rng, probing.rng_after)
    assert probing.same_results and not probing.logged  # train/loss of the probe's forwards went nowhere
    full, half, quarter = probing.stats
    assert full["bias2"] == 0 and full["variance"] == pytest.approx(full["full_variance"])
    for stats in (half, quarter):
        assert stats["variance"] > 0 and stats["relative_l2"] > 0
    assert quarter["relative_l2"] > half["relative_l2"]  # dropping more tokens moves the gradient further
    # deterministic, counting FLOPs or not, and only the candidates asked for
    assert probing.again == [full, None, quarter]
    # the whole step's FLOPs: the EMA teacher and (default, asymmetric) the second view stay full
    assert probing.costs[0] == 1.0 and 0.5 < probing.costs[2] < probing.costs[1] < 0.9


def test_the_probe_costs_see_which_views_the_module_drops(tmp_path):
    costs = {}
    for views_dropped in ("one", "both"):
        probing = Probing()
        make_trainer(tmp_path, [probing], max_steps=1, limit_val_batches=0).fit(tiny_dino(views_dropped), views())
        costs[views_dropped] = probing.costs
    assert costs["both"][0] == costs["one"][0] == 1.0
    for dropped_both, dropped_one in zip(costs["both"][1:], costs["one"][1:]):
        assert 0.2 < dropped_both < dropped_one < 1.0


def phase_costs(written: dict) -> list[float]:
    costs = {(c["keep_ratio"], c["patch_scale"]): c["relative_cost"] for c in written["measurements"]["candidates"]}
    return [costs[(p["keep_ratio"], p["patch_scale"])] for p in written["phases"]]


@pytest.fixture(scope="module")
def searched(tmp_path_factory) -> tuple[dict, list[str], object]:
    """One search through the CLI that trains its own run (12 steps) with checkpoints."""
    folder = tmp_path_factory.mktemp("search")
    args = ["--config", SIMCLR, "--out", str(folder / "schedule.yaml"), "--keep-ratios", "1,0.5,0.25",
            "--patch-scales", "1,2", *SHORT]
    return main(args), args, folder


def test_search_trains_with_checkpoints_and_writes_a_monotone_schedule_ending_full(searched):
    content, args, folder = searched
    out = folder / "schedule.yaml"
    assert out.is_file() and out.with_suffix(".png").is_file()
    written = yaml.safe_load(out.read_text())
    assert written["budget"] is None and written["search"] == content["search"]
    measured = written["measurements"]
    # default points 0, 0.05, 0.15, 0.35, 0.7 of 12 steps
    assert measured["steps"] == [0, 1, 2, 5, 9] and measured["progress"][-1] == pytest.approx(0.75)
    costs = [c["relative_cost"] for c in measured["candidates"]]
    assert costs[0] == 1.0 and all(0.0 < c < 1.0 for c in costs[1:])
    for row in measured["cost_adjusted_error"]:
        assert row[0] == pytest.approx(1.0)  # the full sequence is the reference
    for column in zip(*measured["cost_adjusted_error"]):  # a dropped candidate is not measured again
        first_gap = column.index(None) if None in column else len(column)
        assert all(value is None for value in column[first_gap:])
    assert None in measured["cost_adjusted_error"][-1]  # some were dropped
    phases = written["phases"]
    assert phases[-1] == {"end": 1.0, "keep_ratio": 1.0, "patch_scale": 1} and phases[-2]["end"] <= 0.75
    assert phase_costs(written) == sorted(phase_costs(written))  # compression never increases
    assert written["expected_cost"] < 1.0  # this tiny run's early checkpoints favour compression
    search = written["search"]
    assert search["trained_here"] and search["cpu_seconds_training_here"] > 0 and search["batches"] == 3
    assert search["cost_ratio"] == pytest.approx(search["cpu_seconds"] / search["baseline_training_cpu_seconds"],
                                                 rel=1e-2)
    assert TokenDropout(schedule_file=str(out)).schedule.at(0.9) == (1.0, 1)
    with pytest.raises(SystemExit):  # never overwrites
        main(args)


def test_search_reuses_checkpoints_the_same_way_within_a_budget(searched, tmp_path):
    content, _, _ = searched
    checkpoints = content["search"]["checkpoints"]
    again = search_schedule(SIMCLR, None, str(tmp_path / "again.yaml"), checkpoints=checkpoints,
                            keep_ratios=(1.0, 0.5, 0.25), overrides=SHORT, plot=False)
    assert not again["search"]["trained_here"] and again["search"]["cpu_seconds_training_here"] is None
    assert again["measurements"] == content["measurements"]  # the same checkpoints, batches and masks
    assert again["search"]["baseline_training_cpu_seconds"] == content["search"]["baseline_training_cpu_seconds"]

    budget = 0.4  # the final quarter at full cost; the cheapest schedule costs 0.352 (asymmetric dropout)
    assert content["expected_cost"] > budget  # so the cap binds
    capped = search_schedule(SIMCLR, budget, str(tmp_path / "capped.yaml"), checkpoints=checkpoints,
                             keep_ratios=(1.0, 0.5, 0.25), overrides=SHORT, plot=False)
    capped_costs = phase_costs(yaml.safe_load((tmp_path / "capped.yaml").read_text()))
    assert capped["expected_cost"] <= budget and capped_costs == sorted(capped_costs)
    with pytest.raises(StackError, match="checkpoints=.*were written by a run of 12 optimizer steps.*has 18"):
        search_schedule(SIMCLR, None, str(tmp_path / "longer.yaml"), checkpoints=checkpoints,
                        overrides=[*SHORT, "--trainer.max_epochs", "3"], plot=False)


def test_bad_arguments_are_refused_before_any_training(tmp_path):
    with pytest.raises(StackError, match="patch-scales=3 does not divide"):
        search_schedule(SIMCLR, 0.3, str(tmp_path / "x.yaml"), patch_scales=(1, 3), overrides=SHORT)
    with pytest.raises(StackError, match="checkpoints=.* holds no progress_checkpoints.yaml"):
        search_schedule(SIMCLR, None, str(tmp_path / "x.yaml"), checkpoints=str(tmp_path))
    with pytest.raises(StackError, match="points=.*stay below 1"):
        search_schedule(SIMCLR, None, str(tmp_path / "x.yaml"), points=(0.0, 0.5, 1.0))
    with pytest.raises(StackError, match="batches=1"):
        search_schedule(SIMCLR, None, str(tmp_path / "x.yaml"), batches=1)
    assert not any(tmp_path.iterdir())
    (tmp_path / "x.checkpoints").mkdir()
    (tmp_path / "x.checkpoints" / "progress_checkpoints.yaml").write_text("checkpoints: []\n")
    with pytest.raises(StackError, match=r"x.checkpoints' already holds .* reuse them with --checkpoints"):
        search_schedule(SIMCLR, None, str(tmp_path / "x.yaml"))
