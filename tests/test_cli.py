"""`python train.py ...`: the quickstart end to end, user modules by class path, errors, W&B."""

from __future__ import annotations

import glob
import json
import os
import re
import textwrap

import pytest
import torch

from conftest import CONFIGS, make_trainer, refused
from ddp_harness import check, offline_wandb_records, run_cli
from stacktrain.cli import main

QUICKSTART = str(CONFIGS / "quickstart.yaml")
FAST = ["--trainer.max_epochs", "1", "--trainer.limit_train_batches", "5", "--trainer.limit_val_batches", "2"]


def run_dir_from(stdout: str) -> str:
    match = re.search(r"stacktrain: run directory: (\S+)", stdout)
    assert match, stdout[-3000:]
    return match.group(1)


def test_quickstart_fit_end_to_end(tmp_path):
    result = check(run_cli(["fit", "--config", QUICKSTART, *FAST], workdir=tmp_path))
    assert re.search(r"stacktrain: fit finished after 5 steps: val/acc=0\.\d{4}, val/loss=", result.stdout)
    for noise in ("deprecated", "anonymous setting", "git root", "Tip:"):  # nothing a user can act on
        assert noise not in result.stderr, noise
    directory = tmp_path / run_dir_from(result.stdout)
    assert directory.parent == tmp_path / "runs" / "stacktrain"
    assert (directory / "config.yaml").read_text().count("vit_tiny_patch16_224") == 1
    assert "## Training time" in (directory / "efficiency.md").read_text()
    assert (directory / "efficiency.png").stat().st_size > 1000
    checkpoints = glob.glob(str(directory / "checkpoints" / "*.ckpt"))
    assert len(checkpoints) == 1
    # W&B logged offline, into the run's own folder.
    run_id = directory.name
    offline = glob.glob(str(tmp_path / "runs" / "wandb" / f"offline-run-*-{run_id}" / f"run-{run_id}.wandb"))
    assert len(offline) == 1 and os.path.getsize(offline[0]) > 0
    records = open(offline[0], "rb").read()
    for key in (b"val/acc", b"train/acc", b"efficiency/report", b"efficiency/plot", b"stacktrain_config"):
        assert key in records, key
    media = os.path.join(os.path.dirname(offline[0]), "files", "media")
    assert glob.glob(os.path.join(media, "table", "efficiency", "report_*.table.json"))
    assert glob.glob(os.path.join(media, "images", "efficiency", "plot_*.png"))


def test_print_config_shows_the_resolved_defaults(capsys):
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", QUICKSTART, "--print_config"])
    assert info.value.code == 0
    printed = capsys.readouterr().out
    assert "class_path: stacktrain.lightning_modules.ImageClassifier" in printed
    assert "class_path: stacktrain.callbacks.EfficiencyReport" in printed
    assert "max_lr: 0.003" in printed


def test_default_data_is_the_embedded_digits(capsys):
    with pytest.raises(SystemExit):
        main(["fit", "--model", "stacktrain.lightning_modules.ImageClassifier", "--print_config"])
    assert "class_path: stacktrain.datamodules.DigitsDataModule" in capsys.readouterr().out


USER_PROJECT = '''
import os
import torch
from lightning.pytorch import Callback, LightningDataModule, LightningModule
from torch.utils.data import DataLoader, TensorDataset


class TinyModel(LightningModule):
    def __init__(self, width: int = 4):
        super().__init__()
        self.layer = torch.nn.Linear(width, 2)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.layer(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class TinyData(LightningDataModule):
    def __init__(self, size: int = 16):
        super().__init__()
        self.size = size

    def train_dataloader(self):
        return DataLoader(TensorDataset(torch.randn(self.size, 4), torch.randint(0, 2, (self.size,))), batch_size=4)


class CountSteps(Callback):
    def __init__(self, path: str):
        self.path = path
        self.steps = 0

    def on_train_batch_end(self, *args):
        self.steps += 1

    def on_fit_end(self, trainer, pl_module):
        with open(self.path, "w") as handle:
            handle.write(str(self.steps))
'''


def test_users_own_model_data_and_callback_from_a_config(tmp_path):
    (tmp_path / "my_project.py").write_text(USER_PROJECT)
    (tmp_path / "mine.yaml").write_text(textwrap.dedent(f"""
        trainer:
          max_steps: 3
          logger: false
          enable_checkpointing: false
          callbacks:
            - class_path: my_project.CountSteps
              init_args:
                path: {tmp_path / "steps.txt"}
            - class_path: stacktrain.callbacks.EfficiencyReport
              init_args:
                dirpath: {tmp_path / "report"}
        model:
          class_path: my_project.TinyModel
          init_args:
            width: 4
        data:
          class_path: my_project.TinyData
    """))
    check(run_cli(["fit", "--config", "mine.yaml"], workdir=tmp_path))
    assert (tmp_path / "steps.txt").read_text() == "3"
    assert (tmp_path / "report" / "efficiency.md").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--model.model_name", "resnet_18"], "model.init_args.model_name='resnet_18' is not a timm model; closest: resnet18"),
        (["--data.batch_size", "-1"], "DigitsDataModule: data.init_args.batch_size=-1 is out of range"),
        (["--data.image_size", "24"], "built for (16, 16) images but the data gives (24, 24)"),
    ],
)
def test_bad_input_is_one_clear_line(tmp_path, capsys, args, message):
    err = refused(capsys, ["fit", "--config", QUICKSTART, "--trainer.logger", "false", "--trainer.default_root_dir",
                           str(tmp_path), *args])
    assert message in err


def test_top_level_optimizer_options_work(tmp_path):
    cli = main([
        "fit", "--config", QUICKSTART, "--optimizer", "SGD", "--optimizer.lr", "0.05",
        "--trainer.max_steps", "2", "--trainer.limit_val_batches", "1", "--trainer.logger", "false",
        "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(tmp_path),
    ])
    optimizer = cli.trainer.optimizers[0]
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["lr"] == 0.05
    assert cli.trainer.global_step == 2


def test_config_of_an_earlier_run_is_never_overwritten(tmp_path, capsys):
    args = ["fit", "--config", QUICKSTART, "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1",
            "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(tmp_path),
            "--trainer.logger.version", "fixed"]
    main(args)
    saved = tmp_path / "lightning_logs" / "fixed" / "config.yaml"
    before = saved.read_text()
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert saved.read_text() == before
    assert f"stacktrain: error: config file='{saved}' already exists" in capsys.readouterr().err  # one prefix


def test_wandb_failing_to_start_falls_back_to_csv(tmp_path):
    """Online mode with no account and no network: the run warns and goes on with a CSV logger."""
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "", "WANDB_BASE_URL": "http://127.0.0.1:9"}
    result = check(run_cli(["fit", "--config", QUICKSTART, *FAST], workdir=tmp_path, env=env))
    assert "W&B could not start" in result.stderr
    directory = tmp_path / run_dir_from(result.stdout)
    assert directory == tmp_path / "runs" / "stacktrain" / "version_0"
    metrics = (directory / "metrics.csv").read_text()
    assert "val/acc" in metrics and "train/acc" in metrics
    assert (directory / "efficiency.md").exists()


@pytest.mark.parametrize("stack", ["vit+token_dropout", "early_exit+prune_regrow+grad_quant"])
def test_wandb_offline_run_holds_every_techniques_keys(tmp_path, stack):
    """WANDB_MODE=offline (conftest): the run file holds each technique's panel group, the early-exit
    budget keys and table, and the efficiency table; in-process, a few steps."""

    from conftest import TINY_VIT
    from stacktrain.callbacks import EfficiencyReport, GradientQuantization, PruneRegrow, TokenDropout
    from stacktrain.datamodules import DigitsDataModule
    from stacktrain.lightning_modules import BoostedEarlyExit, ImageClassifier
    from stacktrain.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path))
    assert logger._offline
    if stack == "vit+token_dropout":
        model = ImageClassifier("vit_tiny_patch16_224", in_chans=1, model_kwargs=dict(TINY_VIT))
        callbacks = [TokenDropout(keep_ratio=0.5, schedule="step", until=0.5)]
        keys = [b"token_dropout/keep_ratio", b"token_dropout/tokens_per_sample",
                b"efficiency/token_dropout/tokens_sample_ratio", b"token_dropout/schedule_plot",
                b"token_dropout/schedule_image"]
    else:
        model = BoostedEarlyExit("test_resnet", exits=["layer1", "layer2", "layer3", "layer4"], in_chans=1,
                                 head_hidden=16, budgets=[0.5, 1.0])
        callbacks = [PruneRegrow(target_flops_ratio=0.6, update_every=2, update_unit="step"), GradientQuantization(bits=4)]
        keys = [b"prune_regrow/flops_ratio", b"prune_regrow/widths", b"prune_regrow/widths_heatmap", b"grad_quant/bits",
                b"val/acc_budget_50", b"val/flops_budget_50", b"test/acc_budget_100", b"early_exit/budget_curve",
                b"early_exit/budget_plot",
                b"efficiency/prune_regrow/train_flops_step_ratio"]
    trainer = make_trainer(None, [*callbacks, EfficiencyReport()], max_epochs=1, limit_train_batches=4, limit_val_batches=2, limit_test_batches=2, log_every_n_steps=1, num_sanity_val_steps=0, logger=logger)
    data = DigitsDataModule(batch_size=16)
    trainer.fit(model, data)
    if stack != "vit+token_dropout":
        trainer.test(model, data)
    logger.experiment.finish()
    keys += [b"efficiency/report", b"efficiency/step_wall_ms"]
    records = offline_wandb_records(tmp_path, keys)
    for key in keys:
        assert key in records, key
    media = tmp_path / "wandb" / "offline-run-*" / "files" / "media"
    assert glob.glob(str(media / "table" / "efficiency" / "*.json"))
    if stack == "vit+token_dropout":
        # the planned schedule of the 4 steps: half the 16 patches (+ class token) until half-way, then all
        (table,) = glob.glob(str(media / "table" / "token_dropout" / "schedule_[0-9]*.table.json"))
        content = json.loads(open(table).read())
        assert content["columns"] == ["step", "progress", "keep_ratio", "patch_scale", "tokens_per_sample"]
        assert content["data"] == [[0, 0.0, 0.5, 1, 9], [1, 0.25, 0.5, 1, 9], [2, 0.5, 1.0, 1, 17], [3, 0.75, 1.0, 1, 17]]
        assert glob.glob(str(media / "images" / "token_dropout" / "schedule_image_*.png"))
