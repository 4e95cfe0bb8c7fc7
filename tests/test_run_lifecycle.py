"""A user's long run through `train.py` (issue 22): extending a run with ``--ckpt_path``, refusing a
checkpoint of another model or an unreadable one, unwritable output paths, exit statuses a scheduler
can trust (SIGTERM, Ctrl-C, skipped steps) and progress lines in a log file."""

from __future__ import annotations

import glob
import os
import re
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from conftest import CONFIGS, make_trainer, refused
from ddp_harness import assert_states_equal

from stacktrain.cli import main
from stacktrain.lightning_modules import ImageClassifier

QUICKSTART = str(CONFIGS / "quickstart.yaml")
TINY = '{"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "mlp_ratio": 2.0}'


def args_for(root: Path, *extra: str, config: str = QUICKSTART, epochs: int = 1) -> list[str]:
    """A few-step quickstart run (a tiny ViT, 4 batches an epoch), writing under ``root``."""
    return ["fit", "--config", config, "--trainer.logger", "false", "--trainer.default_root_dir", str(root),
            "--model.model_kwargs", TINY, "--trainer.max_epochs", str(epochs), "--trainer.limit_train_batches", "4",
            "--trainer.limit_val_batches", "1", "--trainer.enable_model_summary", "false", *extra]


@pytest.fixture(scope="module")
def four_step_checkpoint(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("first")
    main(args_for(root))
    (path,) = glob.glob(str(root / "checkpoints" / "*.ckpt"))
    assert path.endswith("epoch=0-step=4.ckpt")
    return path


# ------------------------------------------------------------------------------ 1. extending a run
def test_extending_a_run_continues_on_the_schedule_planned_for_the_new_length(tmp_path, four_step_checkpoint):
    """4 steps planned, then ``--trainer.max_epochs 2 --ckpt_path``: OneCycleLR used to raise "Tried to
    step 5 times" after the first batch; it is re-planned for 8 steps and ends where a run planned
    for 8 steps from the start ends."""
    longer = main(args_for(tmp_path / "longer", "--ckpt_path", four_step_checkpoint, epochs=2))
    planned = main(args_for(tmp_path / "planned", epochs=2))
    assert longer.trainer.global_step == planned.trainer.global_step == 8
    scheduler = longer.trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.total_steps == 8 and scheduler.last_epoch == 8
    assert scheduler.get_last_lr() == pytest.approx(planned.trainer.lr_scheduler_configs[0].scheduler.get_last_lr())


def test_a_schedule_that_cannot_be_replanned_is_refused_before_the_first_batch(tmp_path):
    """CosineAnnealingLR computes each rate from the previous one: a longer resumed run stops with a
    one-line error naming the key and the fix, before its first batch."""
    from functools import partial

    from lightning.pytorch.callbacks import ModelCheckpoint

    from stacktrain.callbacks import RunGuard
    from stacktrain.datamodules import DigitsDataModule
    from stacktrain.errors import StackError

    def run(steps: int, callbacks: list, **fit_kwargs: Any) -> ImageClassifier:
        module = ImageClassifier("vit_tiny_patch16_224", in_chans=1, model_kwargs=yaml.safe_load(TINY),
                                 lr_scheduler=partial(torch.optim.lr_scheduler.CosineAnnealingLR))
        make_trainer(str(tmp_path), [RunGuard(), *callbacks], max_steps=steps, limit_val_batches=0, enable_checkpointing=True).fit(module, DigitsDataModule(batch_size=64), **fit_kwargs)
        return module

    run(4, [ModelCheckpoint(dirpath=str(tmp_path), save_top_k=-1, every_n_train_steps=4)])
    (checkpoint,) = glob.glob(str(tmp_path / "*.ckpt"))
    with pytest.raises(StackError) as info:
        run(8, [], ckpt_path=checkpoint)
    assert str(info.value) == (
        "CosineAnnealingLR: trainer.max_epochs/max_steps=8 was planned for 4 steps by the checkpoint and cannot be "
        "re-planned for this run's 8. Fix: resume with the checkpoint's length, or give the scheduler its length "
        "explicitly (lr_scheduler.init_args.T_max: 8), or use OneCycleLR.")


# ------------------------------------------------------------------------------ 2. and 9. the checkpoint
def test_a_checkpoint_of_another_model_is_refused_saying_what_differs(tmp_path, capsys, four_step_checkpoint):
    err = refused(capsys, args_for(tmp_path, "--model.model_name", "vit_small_patch16_224",
                                   "--ckpt_path", four_step_checkpoint))
    assert "was trained with another model than the config's (model_name: config 'vit_small_patch16_224', " \
           "checkpoint 'vit_tiny_patch16_224')" in err
    assert not (tmp_path / "checkpoints").exists()


def test_weights_that_do_not_fit_are_refused_and_a_compacted_checkpoint_is_named(tmp_path, capsys,
                                                                                 four_step_checkpoint):
    checkpoint = torch.load(four_step_checkpoint, weights_only=True)
    checkpoint["state_dict"]["model.head.weight"] = torch.zeros(10, 16)
    checkpoint["hyper_parameters"].pop("model_kwargs")  # a model whose config does not say it all
    path = tmp_path / "narrow.ckpt"
    torch.save(checkpoint, path)
    err = refused(capsys, args_for(tmp_path, "--ckpt_path", str(path)))
    assert "does not fit the configured model's weights (shape: model.head.weight [10, 16] in the checkpoint, " \
           "[10, 32] in the model)" in err
    checkpoint["callbacks"]["PruneRegrow"] = {"compacted": True}
    torch.save(checkpoint, path)
    err = refused(capsys, args_for(tmp_path, "--ckpt_path", str(path)))
    assert "holds a network compacted by PruneRegrow (smaller layers) and this run has no PruneRegrow" in err


@pytest.mark.parametrize("kind", ["missing", "truncated", "garbage", "not a checkpoint"])
def test_an_unreadable_ckpt_path_is_one_line(tmp_path, capsys, four_step_checkpoint, kind):
    path = tmp_path / "x.ckpt"
    if kind == "truncated":
        path.write_bytes(Path(four_step_checkpoint).read_bytes()[:50_000])
    elif kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "not a checkpoint":
        torch.save({"weights": torch.zeros(2)}, path)
    err = refused(capsys, args_for(tmp_path, "--ckpt_path", str(path)))
    expected = {"missing": "does not exist", "truncated": "is not a readable checkpoint: truncated, corrupt",
                "garbage": "is not a readable checkpoint", "not a checkpoint": "is not a Lightning checkpoint"}[kind]
    assert f"ckpt_path='{path}' {expected}" in err


# ------------------------------------------------------------------------------ 3. paths the run writes
@pytest.mark.parametrize("option,key", [
    (["--trainer.default_root_dir", "{blocked}/run"], "trainer.default_root_dir"),
    (["--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", "{blocked}/logs"],
     "trainer.logger.init_args.save_dir (CSVLogger)"),
    (["--trainer.callbacks+", "lightning.pytorch.callbacks.ModelCheckpoint", "--trainer.callbacks.dirpath",
      "{blocked}/ckpt"], "ModelCheckpoint.dirpath"),
])
def test_an_unwritable_output_path_is_refused_before_the_first_batch(tmp_path, capsys, option, key):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a directory")
    argv = args_for(tmp_path) + [part.format(blocked=blocked) for part in option]
    err = refused(capsys, argv)
    assert f"stacktrain: error: {key}=" in err and f"cannot be created: {blocked} is a file" in err


def test_a_read_only_directory_is_refused(tmp_path, monkeypatch):
    """A directory that exists but takes no file (permissions, a read-only mount: simulated, since root
    may write anywhere) is found by a probe file, not by os.access."""
    from stacktrain import run_checks
    from stacktrain.errors import StackError

    def read_only(*args: Any, **kwargs: Any) -> Any:
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(run_checks.tempfile, "TemporaryFile", read_only)
    with pytest.raises(StackError) as info:
        run_checks.require_writable_dir(str(tmp_path / "logs"), "trainer.logger.init_args.save_dir")
    assert str(info.value) == (f"stacktrain: trainer.logger.init_args.save_dir='{tmp_path / 'logs'}' cannot be "
                               f"created: {tmp_path} is not writable. Fix: choose a directory you can write to, "
                               "or fix its permissions.")


# ------------------------------------------------------------------------------ 5. and 6. signals, progress
def test_sigterm_writes_a_checkpoint_exits_143_and_the_run_resumes_from_it(tmp_path, capsys):
    """Output to a file (captured: not a terminal): a progress line with the whole run's ETA from the
    second step on; SIGTERM after step 3 of 8: a checkpoint, exit status 143 (it was 0); resumed, the
    run finishes its 8 steps with the weights of a run that was never stopped."""
    progress = ["--trainer.callbacks+", "stacktrain.callbacks.ProgressLog", "--trainer.callbacks.every_n_steps", "2",
                "--trainer.callbacks.first_after_seconds", "0"]
    stop = ["--trainer.callbacks+", "resume_harness.SignalAt", "--trainer.callbacks.step", "3"]
    with pytest.raises(SystemExit) as info:
        main(args_for(tmp_path, *progress, *stop, epochs=2))
    assert info.value.code == 143
    out = capsys.readouterr().out
    checkpoint = tmp_path / "checkpoints" / "sigterm-epoch=0-step=3.ckpt"
    assert f"stacktrain: SIGTERM: stopped at step 3; checkpoint written: {checkpoint}" in out
    assert re.search(r"stacktrain: step 2/8 \(25%\), epoch 1/2 \| loss \d+\.\d{4} \| [\d.]+ steps/s, \d+ samples/s \| "
                     r"elapsed 0:00:\d\d, ETA \d:\d\d:\d\d \(whole run\)", out), out[-2000:]
    assert "fit finished" not in out
    resumed = main(args_for(tmp_path / "resumed", "--ckpt_path", str(checkpoint), epochs=2))
    assert resumed.trainer.global_step == 8
    assert "stacktrain: fit finished after 8 steps: val/acc=" in capsys.readouterr().out
    uninterrupted = main(args_for(tmp_path / "uninterrupted", epochs=2))
    assert_states_equal(uninterrupted.model.state_dict(), resumed.model.state_dict(), "weights")


def test_ctrl_c_exits_130(tmp_path):
    stop = ["--trainer.callbacks+", "resume_harness.SignalAt", "--trainer.callbacks.step", "2",
            "--trainer.callbacks.signal_name", "SIGINT"]
    handler = signal.getsignal(signal.SIGINT)
    # a process starts with Python's own Ctrl-C handler; an earlier test in this process (a Lightning
    # run) may have left another one installed
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(SystemExit) as info:
            main(args_for(tmp_path, *stop))
    finally:  # Lightning ignores SIGINT from the first Ctrl-C on
        signal.signal(signal.SIGINT, handler)
    assert info.value.code == 130


# ------------------------------------------------------------------------------ 7. skipped steps
class NaNLossFrom(ImageClassifier):
    """A classifier whose loss is NaN from optimizer step ``nan_from`` on, every other step."""

    def __init__(self, *args: Any, nan_from: int = 1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.nan_from = nan_from

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        step = self.trainer.global_step
        return loss * float("nan") if step >= self.nan_from and step % 2 else loss


def test_a_run_that_skipped_steps_says_so_and_exits_3_when_they_are_too_many(tmp_path, capsys):
    argv = args_for(tmp_path, "--model", "test_run_lifecycle.NaNLossFrom", "--model.nan_from", "1", epochs=2)
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 3
    out, err = capsys.readouterr()
    assert "stacktrain: fit finished after 8 steps (4 of them skipped by NonFiniteGuard: non-finite gradients)" in out
    assert "stacktrain: error: NonFiniteGuard skipped 4 of 8 optimizer steps (more than max_skipped_fraction=0.1)" in err
    report = (tmp_path / "efficiency.md").read_text()
    assert "8 optimizer steps (4 skipped by NonFiniteGuard: non-finite gradients, not applied)" in report
    # one skipped step in 8 is within a tolerance of one half: the run finishes with status 0
    cli = main(argv + ["--trainer.callbacks+", "stacktrain.callbacks.NonFiniteGuard",
                            "--trainer.callbacks.max_skipped_fraction", "0.5", "--model.nan_from", "7",
                            "--trainer.default_root_dir", str(tmp_path / "few")])
    assert cli.trainer.global_step == 8
    assert "(1 of them skipped by NonFiniteGuard" in capsys.readouterr().out


# ------------------------------------------------------------------------------ 10. options
def test_an_abbreviated_option_is_an_error_not_another_option(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(args_for(tmp_path, "--trainer.max_epoch", "5"))
    assert info.value.code == 2
    assert "unrecognized arguments: --trainer.max_epoch 5" in capsys.readouterr().err


# ------------------------------------------------------------------------------ 9. one-line errors
def test_a_negative_learning_rate_is_one_line(tmp_path, capsys):
    err = refused(capsys, args_for(tmp_path, "--model.optimizer.lr", "-1"))
    assert err == ("stacktrain: error: ImageClassifier: model.init_args.optimizer.init_args.lr=-1.0 is refused by "
                   "AdamW (Invalid learning rate: -1.0). Fix: use a learning rate above 0 (e.g. lr: 0.001) and "
                   "non-negative weight_decay, betas in [0, 1), eps >= 0.")


def test_an_image_folder_whose_class_folders_hold_no_image_is_one_line(tmp_path):
    from stacktrain.datamodules import ImageFolderDataModule
    from stacktrain.errors import StackError

    for name in ("cat", "dog"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("no image here")
    data = ImageFolderDataModule(root=str(tmp_path), image_size=16)
    with pytest.raises(StackError) as info:
        data.setup("fit")
    assert str(info.value).startswith(f"ImageFolderDataModule: data.init_args.root='{tmp_path}' has class folders "
                                      "without a single image: cat, dog. Fix: put images")


def test_in_a_terminal_the_bar_shows_the_whole_runs_eta_and_no_lines_are_printed(tmp_path, capsys):
    from lightning.pytorch.callbacks import TQDMProgressBar

    from stacktrain.callbacks import ProgressLog
    from stacktrain.datamodules import DigitsDataModule

    bar, progress = TQDMProgressBar(), ProgressLog(force=False, every_n_steps=1, first_after_seconds=0)
    module = ImageClassifier("vit_tiny_patch16_224", in_chans=1, model_kwargs=yaml.safe_load(TINY))
    trainer = make_trainer(str(tmp_path), [bar, progress], max_steps=4, limit_val_batches=0, enable_progress_bar=True)
    trainer.fit(module, DigitsDataModule(batch_size=64))
    metrics = bar.get_metrics(trainer, module)
    assert re.fullmatch(r"\d+:\d\d:\d\d", metrics["run ETA"]) and metrics["run ETA"] == "0:00:00"  # 4 of 4 done
    assert progress.lines == [] and "stacktrain: step" not in capsys.readouterr().out
