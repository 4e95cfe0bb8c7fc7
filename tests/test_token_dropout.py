"""The `TokenDropout` callback on real runs: schedule by global step, full sequences in evaluation,
cost reports, errors before the first batch, exact resume, and 2-process DDP."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import Callback, LightningModule, Trainer, seed_everything
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from conftest import CONFIGS, make_trainer
from ddp_harness import check, load_rank_states, run_ddp
from resume_harness import assert_resumed_exactly, load_checkpoint_weights_only, stop_and_resume
from stacktrain.callbacks import EfficiencyReport, ExactResume, TokenDropout
from stacktrain.datamodules import DigitsDataModule, MultiViewDataModule
from stacktrain.errors import StackError
from stacktrain.functional.token_dropout import TokenDropoutLayer, ViTCostModel, apply_token_dropout
from stacktrain.lightning_modules import ImageClassifier, SimCLR
from stacktrain.stack import FLOPS_PER_STEP, TOKENS_PER_SAMPLE, run_dir

# 16 px / patch 2: 64 patch tokens + class token
VIT = dict(img_size=16, patch_size=2, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)
PHASES = [{"end": 0.3, "keep_ratio": 0.5, "patch_scale": 2}, {"end": 0.7, "keep_ratio": 0.75}]


def classifier(**kwargs: Any) -> ImageClassifier:
    return ImageClassifier("vit_tiny_patch16_224", in_chans=1, model_kwargs=dict(VIT, **kwargs))


def trainer(callbacks: list[Callback], **kwargs: Any) -> Trainer:
    return make_trainer(None, callbacks, **{"num_sanity_val_steps": 0, **kwargs})


class SequenceRecorder(Callback):
    """Records, per training step, the schedule the callback applied and the sequence length the first
    block really saw, and the lengths seen in validation."""

    def __init__(self, technique: TokenDropout) -> None:
        self.technique = technique
        self.train: dict[int, tuple[float, int, int]] = {}
        self.val_lengths: set[int] = set()
        self._length = 0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        blocks = self.technique.compression.vit.blocks
        blocks[0].register_forward_pre_hook(lambda module, args: setattr(self, "_length", args[0].shape[1]))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        last = self.technique.last
        self.train[last["step"]] = (last["keep_ratio"], last["patch_scale"], self._length)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.val_lengths.add(self._length)


def test_schedule_follows_the_global_step_and_evaluation_sees_full_sequences(tmp_path):
    seed_everything(0)
    technique = TokenDropout(schedule=PHASES)
    recorder = SequenceRecorder(technique)
    report = EfficiencyReport(dirpath=str(tmp_path))
    model = classifier()
    run = trainer([recorder, report, technique], max_steps=10, limit_val_batches=2, val_check_interval=5,
                  log_every_n_steps=1, logger=CSVLogger(tmp_path))
    run.fit(model, DigitsDataModule(batch_size=32))
    cost = technique.compression.cost_model if technique.compression else ViTCostModel.from_vit(model.model)
    expected = {}
    for step in range(10):
        keep, scale = technique.schedule.at(step / 10)
        expected[step] = (keep, scale, cost.sequence(keep, scale)[1])
    assert recorder.train == expected
    assert {v[:2] for v in expected.values()} == {(0.5, 2), (0.75, 1), (1.0, 1)}
    assert recorder.val_lengths == {65}
    assert run.callback_metrics["token_dropout/keep_ratio"] == 1.0
    assert run.callback_metrics["token_dropout/tokens_per_sample"] == 65
    # the report: FLOPs and tokens from the cost model, step by step
    flops = report.lines[("token_dropout", FLOPS_PER_STEP)]
    tokens = report.lines[("token_dropout", TOKENS_PER_SAMPLE)]
    relative = [cost.relative_cost(keep, scale) for keep, scale, _ in expected.values()]
    resample = sum(cost.resample_flops(scale, "flexi") for _, scale, _ in expected.values())
    assert flops.count == 10 and flops.ratio == pytest.approx((sum(relative) * 32 * cost.training_flops() + resample)
                                                              / (10 * 32 * cost.training_flops()))
    assert tokens.actual == sum(v[2] for v in expected.values()) and tokens.baseline == 10 * 65
    # after fit the model is as it was
    assert isinstance(model.model.patch_drop, nn.Identity) and model.model.dynamic_img_size is False
    assert "token_dropout" in Path(report.written["markdown"]).read_text()
    # the planned schedule drawn once at fit start, beside the logger's files
    assert (Path(run_dir(run)) / "token_dropout_schedule.png").stat().st_size > 1000


def planned(total_steps: int, points: int = 200, **settings: Any) -> tuple[TokenDropout, list[dict]]:
    """The planned schedule of a ``total_steps`` run, with the compression installed as at fit start."""
    technique = TokenDropout(**settings)
    technique.compression = apply_token_dropout(classifier().model,
                                                         patch_scaling=technique.schedule.max_patch_scale > 1)
    technique.total_steps = total_steps
    return technique, technique.planned_schedule(points)


def assert_rows_follow_the_schedule(technique: TokenDropout, rows: list[dict]) -> None:
    cost = technique.compression.cost_model
    for row in rows:
        keep_ratio, patch_scale = technique.compression_at(row["step"])
        assert (row["keep_ratio"], row["patch_scale"]) == (keep_ratio, patch_scale)
        assert row["tokens_per_sample"] == cost.sequence(keep_ratio, patch_scale)[1]
        assert row["progress"] == row["step"] / technique.total_steps


def test_planned_schedule_of_a_long_step_schedule_keeps_its_jump_sharp():
    technique, rows = planned(1000, points=50, schedule="step", keep_ratio=0.5, patch_scale=2, until=0.37)
    steps = [row["step"] for row in rows]
    assert steps[0] == 0 and steps[-1] == 999 and steps == sorted(set(steps))
    assert 50 <= len(rows) <= 50 + 2
    assert_rows_follow_the_schedule(technique, rows)
    # 16 px, patch 2 x scale 2: 16 patches, half kept, + the class token; then the full 64 + 1
    by_step = {row["step"]: row for row in rows}
    assert (by_step[369]["keep_ratio"], by_step[369]["tokens_per_sample"]) == (0.5, 9)
    assert (by_step[370]["keep_ratio"], by_step[370]["tokens_per_sample"]) == (1.0, 65)
    assert by_step[0]["tokens_per_sample"] == 9 and by_step[999]["tokens_per_sample"] == 65


def test_planned_schedule_has_both_sides_of_every_phase_end_and_every_step_of_a_short_run():
    # 0.07 * 100 is 7.000000000000001 in floating point: the second phase still starts at step 7
    phases = [{"end": 0.07, "keep_ratio": 0.5, "patch_scale": 2}, {"end": 0.57, "keep_ratio": 0.75}]
    technique, rows = planned(100, points=10, schedule=phases)
    steps = [row["step"] for row in rows]
    assert {6, 7, 56, 57} <= set(steps) and steps[0] == 0 and steps[-1] == 99
    assert len(rows) <= 10 + 2 * len(phases)
    assert_rows_follow_the_schedule(technique, rows)
    by_step = {row["step"]: (row["keep_ratio"], row["patch_scale"]) for row in rows}
    assert [by_step[s] for s in (6, 7, 56, 57)] == [(0.5, 2), (0.75, 1), (0.75, 1), (1.0, 1)]
    technique, rows = planned(7, schedule=PHASES)
    assert [row["step"] for row in rows] == list(range(7))
    assert_rows_follow_the_schedule(technique, rows)
    # a cosine ramp: its kink at `until` is a row, and the ratio only rises
    technique, rows = planned(5000, points=100, schedule="cosine", keep_ratio=0.25, until=0.5)
    assert {2499, 2500} <= {row["step"] for row in rows} and len(rows) <= 102
    ratios = [row["keep_ratio"] for row in rows]
    assert ratios[0] == 0.25 and ratios[-1] == 1.0 and ratios == sorted(ratios)
    assert TokenDropout().planned_schedule() == []  # before fit: nothing planned yet


def test_a_no_op_setting_installs_nothing():
    technique = TokenDropout(keep_ratio=1.0)
    model = classifier()
    trainer([technique], max_steps=2, limit_val_batches=0).fit(model, DigitsDataModule(batch_size=32))
    assert technique.compression is None and technique.last["step"] == -1
    assert not any(isinstance(m, TokenDropoutLayer) for m in model.modules())


class NoViT(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(256, 10))
        self.steps = 0

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.steps += 1
        images, labels = batch
        return nn.functional.cross_entropy(self.net(images), labels)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_a_model_without_a_vit_is_refused_before_the_first_batch():
    model = NoViT()
    run = trainer([TokenDropout(keep_ratio=0.5)], max_steps=3)
    with pytest.raises(StackError) as error:
        run.fit(model, DigitsDataModule(batch_size=32))
    message = str(error.value)
    assert message.startswith("TokenDropout: model='NoViT'") and "NoViT has no ViT" in message and "Fix:" in message
    assert model.steps == 0 and run.global_step == 0


def test_bad_keep_ratio_and_patch_scale_are_refused_before_the_first_batch():
    for bad in (0.0, 1.5, -1):
        with pytest.raises(StackError, match=rf"TokenDropout: keep_ratio={bad!r} is out of range \(0.0, 1.0\]"):
            TokenDropout(keep_ratio=bad)
    with pytest.raises(StackError, match=r"schedule\[1\].keep_ratio=2"):
        TokenDropout(schedule=[{"end": 0.5, "keep_ratio": 0.5}, {"end": 1.0, "keep_ratio": 2}])
    model = classifier()
    calls = []
    model.training_step = lambda *args: calls.append(1)  # type: ignore[method-assign]
    run = trainer([TokenDropout(keep_ratio=0.5, patch_scale=3)], max_steps=3)
    with pytest.raises(StackError, match=r"patch_scale=3 does not divide the image.*Fix: use a patch scale from \[1, 2, 4, 8\]"):
        run.fit(model, DigitsDataModule(batch_size=32))
    assert not calls and run.global_step == 0


def tiny_simclr() -> SimCLR:
    return SimCLR(model_name="vit_tiny_patch16_224", in_chans=1, model_kwargs=dict(VIT), hidden_dim=64,
                  projection_dim=32)


def test_stop_and_resume_continues_the_schedule_exactly(tmp_path):
    """SimCLR (BatchNorm projector, two views) stopped at step 5 of 12, inside the patch-scaled phase's
    successor, resumes with the same compression at every later step and the same final weights."""
    recorders: list[SequenceRecorder] = []

    def callbacks() -> list[Callback]:
        technique = TokenDropout(schedule=PHASES, seed=3)
        recorders.append(SequenceRecorder(technique))
        return [technique, recorders[-1], ExactResume()]

    runs = stop_and_resume(tiny_simclr, lambda: MultiViewDataModule(DigitsDataModule(batch_size=32)), callbacks,
                           total=12, stop_at=5, root=tmp_path, full_length=True)
    assert_resumed_exactly(runs)
    uninterrupted, stopped, resumed = recorders
    assert sorted(resumed.train) == list(range(5, 12))
    assert {step: uninterrupted.train[step] for step in range(5, 12)} == resumed.train
    assert {v[0] for v in uninterrupted.train.values()} == {0.5, 0.75, 1.0}
    assert not list(tmp_path.rglob("*.png"))  # without a logger no schedule plot is written
    state = load_checkpoint_weights_only(runs.checkpoint)
    saved = state["callbacks"]["TokenDropout"]
    assert saved["last"] == {"step": 4, "keep_ratio": 0.75, "patch_scale": 1}
    assert saved["schedule"]["phases"][0] == PHASES[0]


@pytest.mark.ddp
def test_two_processes_agree_on_the_schedule_and_weights_and_draw_different_masks(tmp_path):
    config = yaml.safe_load((CONFIGS / "simclr_token_dropout.yaml").read_text())
    config["trainer"].update(logger=False, max_steps=6, limit_val_batches=2, val_check_interval=6,
                             enable_checkpointing=False)
    config["trainer"]["callbacks"] = [
        {"class_path": "stacktrain.callbacks.TokenDropout", "init_args": {"schedule": PHASES}},
        {"class_path": "stacktrain.callbacks.EfficiencyReport", "init_args": {"dirpath": str(tmp_path / "report")}},
    ]
    config["model"]["init_args"].update(model_kwargs=VIT, hidden_dim=64, projection_dim=32)
    config["data"]["init_args"]["base"]["init_args"]["batch_size"] = 32
    path = tmp_path / "simclr_tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    result = check(run_ddp(["fit", "--config", str(path)], workdir=tmp_path, dump_dir=tmp_path / "ranks"))
    assert "val/knn_acc=" in result.stdout
    rank0, rank1 = load_rank_states(tmp_path / "ranks", 2)
    assert rank0["global_step"] == rank1["global_step"] == 6
    for key, value in rank0["model"].items():
        assert torch.equal(value, rank1["model"][key]), key
    first, second = rank0["techniques"]["TokenDropout"], rank1["techniques"]["TokenDropout"]
    assert first["last"] == second["last"] == {"step": 5, "keep_ratio": 1.0, "patch_scale": 1}  # 5/6 > 0.7
    assert not torch.equal(first["generator"], second["generator"])  # each rank its own masks
    assert "token_dropout" in (tmp_path / "report" / "efficiency.md").read_text()


def test_resuming_with_another_configured_schedule_continues_the_checkpoints_schedule():
    saved = TokenDropout(schedule=PHASES, seed=7).state_dict()
    technique = TokenDropout(keep_ratio=0.5)  # configured differently, no patch scaling installed
    model = classifier()
    technique._vit, technique._generator = model.model, torch.Generator()
    technique._install()
    assert not technique.compression.patch_scaling
    with pytest.warns(UserWarning, match="continuing the checkpoint's schedule"):
        technique.load_state_dict(saved)
    assert technique.schedule == TokenDropout(schedule=PHASES).schedule and technique.seed == 7
    assert technique.compression.patch_scaling  # the checkpoint's schedule needs patch scaling: put in
    technique.compression.set(0.5, 2)
