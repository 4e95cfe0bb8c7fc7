"""Exact resume on 2 processes, for every technique alone and every stack config: in each of the two
DDP processes, N steps uninterrupted, then the same run stopped at step k (checkpoint written inside
the training loop, as a pre-empted job leaves it), then a run resumed from that checkpoint to N.

Launched once by tests/test_resume_ddp.py::

    python -m torch.distributed.run --nnodes 1 --nproc-per-node 2 ... tests/resume_ddp_driver.py \
        --out <dir> --clip <micro CLIP weights file>

All the fits run one after the other in the same process group (see tests/stack_matrix_driver.py for
why that works and why it is cheap). The technique runs are built in Python; the stack runs from
``configs/stack_*.yaml`` through `StackCLI` (``run=False``), with only the run length, the
checkpointing and (for stack_cnn and stack_clip) the sizes shortened.

The resumed run starts from another global seed, so whatever matches comes from the checkpoint. Each
rank writes ``rank<k>.json``: per scenario, the status, the global steps, and digests of the weights
(BatchNorm statistics included), of every technique's state and of the optimizer state, for the
uninterrupted and the resumed run; rank 0 also records whether the checkpoint loads with
``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import glob
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.pytorch import Callback, LightningDataModule, LightningModule, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))

from conftest import CONFIGS, TINY_VIT, make_trainer  # noqa: E402
from ddp_harness import drive, technique_states  # noqa: E402
from resume_harness import SignalAt, StopAt  # noqa: E402
from stack_matrix_driver import cnn_classifier, cnn_early_exit, digest, digits, prompt_tuned, shapes  # noqa: E402
from stacktrain.callbacks import ExactResume, GradientQuantization, PruneRegrow, RunGuard, TokenDropout  # noqa: E402
from stacktrain.cli import StackCLI  # noqa: E402
from stacktrain.datamodules import DigitsDataModule, MultiViewDataModule  # noqa: E402
from stacktrain.lightning_modules import ImageClassifier, SimCLR  # noqa: E402

#: Options that shorten a run without changing what it does, for the config-built stacks.
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary",
         "false", "--trainer.num_sanity_val_steps", "0", "--trainer.enable_checkpointing", "false"]


@dataclass
class Scenario:
    total: int
    stop_at: int
    #: (clip weights, total steps, workdir, seed) -> (module, data, trainer without the stop/checkpoint callbacks)
    build: Callable[[str, int, Path, int], tuple[LightningModule, LightningDataModule, Trainer]]
    #: the stopped run is planned for ``stop_at`` steps and resumed for ``total`` (extending a run): the
    #: resumed run is compared with one planned for ``total`` where the schedules must agree, not bitwise
    extend: bool = False
    #: the run is stopped by a SIGTERM to rank 0 alone after ``stop_at`` (`RunGuard` stops every rank there)
    sigterm: bool = False


# --------------------------------------------------------------------------- techniques alone (Python)
def python_run(module: Callable[[str], LightningModule], data: Callable[[], LightningDataModule],
               techniques: Callable[[], list[Callback]], **trainer_options: Any):
    def build(clip: str, total: int, workdir: Path, seed: int):
        seed_everything(seed, verbose=False)
        options = dict(limit_val_batches=0, num_sanity_val_steps=0)
        options.update(trainer_options)
        trainer = make_trainer(workdir, [*techniques(), ExactResume()], processes=2, max_steps=total, **options)
        return module(clip), data(), trainer
    return build


def vit_with_dropout(clip: str) -> ImageClassifier:
    # dropout draws from the global generator on each rank: ExactResume must restore every rank's state
    return ImageClassifier("vit_tiny_patch16_224", in_chans=1, model_kwargs={**TINY_VIT, "drop_rate": 0.1})


def simclr_one_cycle(clip: str) -> SimCLR:
    return SimCLR(model_name="vit_tiny_patch16_224", in_chans=1, model_kwargs=TINY_VIT, hidden_dim=32,
                  lr_scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=3e-3))


def two_views_two_workers() -> MultiViewDataModule:
    # 1257 digits: 628 per rank, 2 full batches of 256 an epoch (the rest dropped)
    return MultiViewDataModule(DigitsDataModule(batch_size=256, num_workers=2))


# --------------------------------------------------------------------------- stacks (their configs)
def config_run(name: str, edit: Callable[[dict], None] | None = None, *overrides: str):
    def build(clip: str, total: int, workdir: Path, seed: int):
        config = yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())
        if edit is not None:
            edit(config)
        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        extra = [item.replace("{clip}", clip) for item in overrides]
        cli = StackCLI(args=["--config", str(path), *QUIET, "--seed_everything", str(seed), "--trainer.max_steps",
                             str(total), "--trainer.default_root_dir", str(workdir), *extra],
                       run=False, save_config_callback=None)
        return cli.model, cli.datamodule, cli.trainer
    return build


def explore_every_two_steps(config: dict) -> None:
    explorer = next(c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("PruneRegrow"))
    explorer["init_args"]["update_every"] = 2


SCENARIOS: dict[str, Scenario] = {
    # the step schedule keeps half the tokens until step 0.7 * 6 = 4: stopped while tokens are dropped
    "TokenDropout": Scenario(6, 3, python_run(
        vit_with_dropout, digits, lambda: [TokenDropout(keep_ratio=0.5, schedule="step", until=0.7)])),
    # exploration updates at steps 0, 1, 2, compaction at 3: stopped mid-exploration, compacted after resume
    "PruneRegrow": Scenario(6, 2, python_run(
        lambda clip: cnn_classifier(), digits,
        lambda: [PruneRegrow(target_flops_ratio=0.5, update_every=1, update_unit="step", explore_until=0.5,
                             compact_after_explore=True)])),
    # every rank's error-feedback residuals and the 4-bit all-gather's seeded noise
    "GradientQuantization": Scenario(6, 3, python_run(
        lambda clip: cnn_classifier(), digits,
        lambda: [GradientQuantization(bits=4, targets="both", communication_bits=4,
                                      compensation="error_feedback")])),
    # validation every 2 steps fits the exit thresholds; the checkpoint at step 3 holds those of step 2
    "BoostedEarlyExit": Scenario(6, 3, python_run(
        lambda clip: cnn_early_exit(), digits, list, val_check_interval=2, check_val_every_n_epoch=None,
        limit_val_batches=1)),
    "PromptTunedCLIP": Scenario(6, 3, python_run(
        lambda clip: prompt_tuned(clip, label_noise=0.25, loss="gce"), shapes, list)),
    # the contrastive configs' loader with 2 workers, stopped on epoch 0's last batch: epoch 1 is not skipped
    "MultiViewWorkers": Scenario(4, 2, python_run(
        simclr_one_cycle, two_views_two_workers, lambda: [TokenDropout(keep_ratio=0.5), RunGuard()])),
    # planned for 2 steps, extended to 4: OneCycleLR and the token-dropout progress re-planned (2 workers)
    "ExtendedRun": Scenario(4, 2, python_run(
        simclr_one_cycle, two_views_two_workers,
        lambda: [TokenDropout(keep_ratio=0.5, schedule="step", until=0.5), RunGuard()]), extend=True),
    # SIGTERM to rank 0 alone after step 3: both ranks stop there, the checkpoint resumes exactly on both
    "SIGTERM": Scenario(6, 3, python_run(vit_with_dropout, digits, lambda: [RunGuard()]), sigterm=True),
    "stack_vit": Scenario(6, 3, config_run("stack_vit", None, "--trainer.limit_val_batches", "0")),
    # exploration updates at steps 0 and 2, compaction at 4 (after the resume)
    "stack_cnn": Scenario(8, 3, config_run("stack_cnn", explore_every_two_steps, "--trainer.limit_val_batches", "0")),
    "stack_clip": Scenario(6, 3, config_run(
        "stack_clip", None, "--model.init_args.model_name", "stacktrain-micro-clip", "--model.init_args.pretrained",
        "{clip}", "--model.init_args.n_ctx", "4", "--model.init_args.shots", "4", "--trainer.limit_val_batches", "0",
        "--data.init_args.train_size", "120", "--data.init_args.val_size", "40", "--data.init_args.test_size", "40",
        "--data.init_args.batch_size", "8")),
}


# --------------------------------------------------------------------------- the three runs
def end_state(trainer: Trainer, module: LightningModule) -> dict[str, Any]:
    techniques = technique_states(trainer)
    optimizer = trainer.optimizers[0].state_dict() if trainer.optimizers else {}
    return {
        "global_step": trainer.global_step,
        "weights": digest(module.state_dict()),
        "tensors": {k: digest(v)[:16] for k, v in module.state_dict().items()},
        "techniques": {name: {k: digest(v)[:16] for k, v in state.items()} for name, state in techniques.items()},
        "optimizer": digest(optimizer.get("state", {})),
        "lr": [group["lr"] for group in trainer.optimizers[0].param_groups] if trainer.optimizers else [],
    }


def run_scenario(name: str, clip: str, workdir: Path) -> dict[str, Any]:
    scenario = SCENARIOS[name]
    workdir.mkdir(parents=True, exist_ok=True)
    module, data, trainer = scenario.build(clip, scenario.total, workdir, 0)
    trainer.fit(module, data)
    uninterrupted = end_state(trainer, module)

    checkpoints = workdir / "stopped"
    module, data, trainer = scenario.build(clip, scenario.stop_at if scenario.extend else scenario.total, workdir, 0)
    if scenario.sigterm:
        trainer.callbacks.insert(0, SignalAt(scenario.stop_at, only_rank=0))  # before RunGuard: stops at this step
        try:
            trainer.fit(module, data)
        except SystemExit:  # Lightning's SIGTERMException
            pass
        checkpoints = workdir / "checkpoints"  # RunGuard's: <run dir>/checkpoints without a ModelCheckpoint
    else:
        trainer.callbacks.extend([ModelCheckpoint(dirpath=str(checkpoints), every_n_train_steps=scenario.stop_at,
                                                  save_top_k=-1), StopAt(scenario.stop_at)])
        trainer.fit(module, data)
    stopped_at = trainer.global_step
    (checkpoint,) = glob.glob(str(checkpoints / f"*step={scenario.stop_at}*.ckpt"))

    module, data, trainer = scenario.build(clip, scenario.total, workdir, 12345)
    trainer.fit(module, data, ckpt_path=checkpoint)
    result = {"stopped_at": stopped_at, "uninterrupted": uninterrupted, "resumed": end_state(trainer, module),
              "total": scenario.total}
    if trainer.is_global_zero:
        saved = torch.load(checkpoint, weights_only=True, map_location="cpu")
        result["checkpoint_step"] = saved["global_step"]
        result["checkpoint_callbacks"] = sorted(saved.get("callbacks", {}))
    return result


if __name__ == "__main__":
    drive(__doc__, list(SCENARIOS), lambda name, clip, runs: run_scenario(name, clip, runs / name))
