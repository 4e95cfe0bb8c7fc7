"""What a user sees on bad input, for every technique and the CLI, as tables to read top to bottom.

Every bad input ends one of three ways:

* ``REJECTED``: a `StackError` before the first training batch, whose message names where
  (technique, module or data module), the key, the value it got, and the fix (``Fix: ...``);
* ``HANDLED``: the run goes on, with a warning and a count (a corrupt shard is skipped, a NaN step
  is skipped);
* ``NEVER OVERWRITTEN``: an existing file stays as it was: the writer refuses (`StackError`, or a
  flag such as ``overwrite=True`` / ``--overwrite`` is needed) or writes a numbered name beside it.

Narrower tests of the same checks live with each technique (tests/test_<technique>.py); these
tables are the one place that lists them all.
"""

from __future__ import annotations

import os
import textwrap
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from conftest import CONFIGS, TINY_VIT
from stacktrain.callbacks import (
    EfficiencyReport,
    GradientQuantization,
    NonFiniteGuard,
    PruneRegrow,
    TokenDropout,
)
from stacktrain.datamodules import DigitsDataModule, ImageFolderDataModule, WebDatasetDataModule
from stacktrain.datamodules.make_shards import make_shards
from stacktrain.errors import StackError
from stacktrain.lightning_modules import (
    BoostedEarlyExit,
    CLIPPretraining,
    ImageClassifier,
    PromptTunedCLIP,
    SimCLR,
)

QUICKSTART = str(CONFIGS / "quickstart.yaml")


# ------------------------------------------------------------------------------------ helpers
class NoTrainingBatch(Callback):
    """Fails the test if a training batch starts: the bad input must be rejected before."""

    def on_train_batch_start(self, trainer: Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        raise AssertionError("a training batch started: the bad input was not rejected before the first batch")


def fit(ctx: SimpleNamespace, model: Any, data: Any, callbacks: list[Callback] = (), **trainer_kwargs: Any) -> None:
    options = dict(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                   enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   limit_val_batches=1, default_root_dir=str(ctx.tmp))
    options.update(trainer_kwargs)
    trainer = Trainer(callbacks=[*callbacks, NoTrainingBatch()], **options)
    ctx.trainer = trainer
    trainer.fit(model, datamodule=data)


def digits(**kwargs: Any) -> DigitsDataModule:
    return DigitsDataModule(**{"batch_size": 16, **kwargs})


def tiny_vit(**kwargs: Any) -> ImageClassifier:
    return ImageClassifier("vit_tiny_patch16_224", in_chans=1, model_kwargs=dict(TINY_VIT), **kwargs)


def tiny_cnn(**kwargs: Any) -> ImageClassifier:
    return ImageClassifier("test_resnet", in_chans=1, **kwargs)


def write(path: Any, content: str | bytes) -> str:
    mode = "wb" if isinstance(content, bytes) else "w"
    with open(path, mode) as handle:
        handle.write(content)
    return str(path)


def garbage_file(ctx: SimpleNamespace, name: str = "weights.pth") -> str:
    return write(ctx.tmp / name, b"this is not a checkpoint\x00" * 8)


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory) -> Any:
    out = tmp_path_factory.mktemp("shards")
    make_shards("digits", str(out), maxcount=128)
    return out


@pytest.fixture(scope="module")
def micro_clip(tmp_path_factory) -> str:
    from stacktrain.functional.clip import create_clip_model

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "micro.pt"
    torch.save(create_clip_model("stacktrain-micro-clip").state_dict(), path)
    return str(path)


@pytest.fixture
def ctx(tmp_path, request) -> SimpleNamespace:
    """What a case may need: a fresh folder, and fixtures fetched only by the cases that use them."""
    return SimpleNamespace(tmp=tmp_path, fixture=request.getfixturevalue, trainer=None)


def prompt_tuning(ctx: SimpleNamespace, **kwargs: Any) -> PromptTunedCLIP:
    options = dict(model_name="stacktrain-micro-clip", pretrained=ctx.fixture("micro_clip"), n_ctx=4, shots=4)
    return PromptTunedCLIP(**{**options, **kwargs})


def shapes() -> Any:
    from stacktrain.datamodules import ShapesDataModule

    return ShapesDataModule(train_size=120, val_size=40, test_size=40, batch_size=8)


def schedule_search(ctx: SimpleNamespace, out: str) -> None:
    from stacktrain.search_schedule import search_schedule

    search_schedule(str(CONFIGS / "simclr_token_dropout.yaml"), 0.3, out)


def export(ctx: SimpleNamespace, checkpoint: str, out: str | None = None) -> None:
    from stacktrain import export_compact

    export_compact(checkpoint, out or str(ctx.tmp / "export"))


def cli(ctx: SimpleNamespace, *args: str) -> None:
    """`python train.py fit ...` in this process; its one-line error is turned back into the StackError."""
    from stacktrain.cli import StackCLI

    StackCLI(args=["fit", "--config", QUICKSTART, "--trainer.logger", "false", "--trainer.max_steps", "2",
                   "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(ctx.tmp),
                   "--trainer.callbacks+=test_bad_inputs.NoTrainingBatch", *args])


# ------------------------------------------------------------------------------------ REJECTED
#: (what the user got wrong, how it is run, the "<source>: <key>=<value>" the message must start
#: with, and what it must say about the problem). ``{tmp}`` is the case's folder.
REJECTED: list[Any] = [
    # wrong types
    pytest.param(lambda c: TokenDropout(keep_ratio="half"),
                 "TokenDropout: keep_ratio='half'", "must be a number", id="token_dropout-keep_ratio-string"),
    pytest.param(lambda c: GradientQuantization(bits="4"),
                 "GradientQuantization: bits='4'", "must be an integer", id="grad_quant-bits-string"),
    pytest.param(lambda c: GradientQuantization(bits=4.0),
                 "GradientQuantization: bits=4.0", "must be an integer", id="grad_quant-bits-float"),
    pytest.param(lambda c: PruneRegrow(ignore="head"),
                 "PruneRegrow: ignore='head'", "must be a list of module names", id="prune_regrow-ignore-string"),
    pytest.param(lambda c: PruneRegrow(compact_after_explore="yes"),
                 "PruneRegrow: compact_after_explore='yes'", "must be true or false",
                 id="prune_regrow-compact_after_explore-string"),
    pytest.param(lambda c: ImageClassifier(18),
                 "ImageClassifier: model.init_args.model_name=18", "must be a model name",
                 id="classifier-model_name-int"),
    pytest.param(lambda c: BoostedEarlyExit("test_resnet", budgets=[]),
                 "BoostedEarlyExit: model.init_args.budgets=[]", "non-empty list", id="early_exit-budgets-empty"),
    pytest.param(lambda c: digits(batch_size=0),
                 "DigitsDataModule: data.init_args.batch_size=0", "out of range", id="digits-batch_size-0"),
    # out-of-range ratios and bits
    pytest.param(lambda c: TokenDropout(keep_ratio=1.5),
                 "TokenDropout: keep_ratio=1.5", "out of range (0.0, 1.0]", id="token_dropout-keep_ratio-1.5"),
    pytest.param(lambda c: TokenDropout(schedule=[{"end": 1.0, "keep_ratio": 0.0}]),
                 "TokenDropout: schedule[0].keep_ratio=0.0", "out of range", id="token_dropout-phase-keep_ratio-0"),
    pytest.param(lambda c: TokenDropout(schedule="cosin"),
                 "TokenDropout: schedule='cosin'", "did you mean 'cosine'", id="token_dropout-schedule-typo"),
    pytest.param(lambda c: PruneRegrow(target_flops_ratio=0.0),
                 "PruneRegrow: target_flops_ratio=0.0", "out of range (0.0, 1.0]", id="prune_regrow-flops_ratio-0"),
    pytest.param(lambda c: PruneRegrow(channel_sparsity=1.0),
                 "PruneRegrow: channel_sparsity=1.0", "out of range [0.0, 1.0)", id="prune_regrow-sparsity-1"),
    pytest.param(lambda c: PruneRegrow(target_flops_ratio=0.5, channel_sparsity=0.5),
                 "PruneRegrow: target_flops_ratio=0.5", "both set", id="prune_regrow-two-budgets"),
    pytest.param(lambda c: GradientQuantization(bits=1),
                 "GradientQuantization: bits=1", "out of range [2, 8]", id="grad_quant-bits-1"),
    pytest.param(lambda c: GradientQuantization(bits=16),
                 "GradientQuantization: bits=16", "out of range [2, 8]", id="grad_quant-bits-16"),
    pytest.param(lambda c: GradientQuantization(communication_bits=2),
                 "GradientQuantization: communication_bits=2", "not a supported communication width",
                 id="grad_quant-communication_bits-2"),
    pytest.param(lambda c: BoostedEarlyExit("test_resnet", predict_budget=1.5),
                 "BoostedEarlyExit: model.init_args.predict_budget=1.5", "out of range",
                 id="early_exit-predict_budget-1.5"),
    pytest.param(lambda c: BoostedEarlyExit("test_resnet", exits=["layer9"]),
                 "BoostedEarlyExit: model.init_args.exits=['layer9']", "not an exit point",
                 id="early_exit-unknown-exit"),
    pytest.param(lambda c: prompt_tuning(c, shots=0),
                 "PromptTunedCLIP: model.init_args.shots=0", "out of range", id="prompt_tuning-shots-0"),
    pytest.param(lambda c: SimCLR(model_name="vit_tiny_patch16_224", temperature=0.0),
                 "SimCLR: temperature=0.0", "out of range", id="simclr-temperature-0"),
    # missing and unreadable paths
    pytest.param(lambda c: tiny_cnn(pretrained=str(c.tmp / "missing.pth")),
                 "ImageClassifier: model.init_args.pretrained='{tmp}/missing.pth'", "does not exist",
                 id="classifier-pretrained-missing"),
    pytest.param(lambda c: tiny_cnn(pretrained=str(c.tmp)),
                 "ImageClassifier: model.init_args.pretrained='{tmp}'", "is a folder, not a weights file",
                 id="classifier-pretrained-folder"),
    pytest.param(lambda c: tiny_cnn(pretrained=garbage_file(c)),
                 "ImageClassifier: model.init_args.pretrained='{tmp}/weights.pth'", "cannot be loaded into test_resnet",
                 id="classifier-pretrained-garbage"),
    pytest.param(lambda c: BoostedEarlyExit("test_resnet", pretrained=str(c.tmp / "missing.pth")),
                 "BoostedEarlyExit: model.init_args.pretrained='{tmp}/missing.pth'", "does not exist",
                 id="early_exit-pretrained-missing"),
    pytest.param(lambda c: BoostedEarlyExit("test_resnet", pretrained=garbage_file(c)),
                 "BoostedEarlyExit: model.init_args.pretrained='{tmp}/weights.pth'", "cannot be loaded into test_resnet",
                 id="early_exit-pretrained-garbage"),
    pytest.param(lambda c: CLIPPretraining(model_name="stacktrain-micro-clip", pretrained=garbage_file(c, "clip.pt")),
                 "CLIPPretraining: model.init_args.pretrained='{tmp}/clip.pt'", "cannot be loaded into",
                 id="clip_pretraining-pretrained-garbage"),
    pytest.param(lambda c: TokenDropout(schedule_file=str(c.tmp / "schedule.yaml")),
                 "TokenDropout: schedule_file='{tmp}/schedule.yaml'", "does not exist",
                 id="token_dropout-schedule_file-missing"),
    pytest.param(lambda c: TokenDropout(schedule_file=str(c.tmp)),
                 "TokenDropout: schedule_file='{tmp}'", "is a folder", id="token_dropout-schedule_file-folder"),
    pytest.param(lambda c: TokenDropout(schedule_file=write(c.tmp / "schedule.yaml", "phases: [{end: 1.0")),
                 "TokenDropout: schedule_file='{tmp}/schedule.yaml'", "is not valid YAML",
                 id="token_dropout-schedule_file-not-yaml"),
    pytest.param(lambda c: TokenDropout(schedule_file=write(c.tmp / "schedule.yaml", "budget: 0.3\n")),
                 "TokenDropout: schedule_file='{tmp}/schedule.yaml'", "has no 'phases' list",
                 id="token_dropout-schedule_file-no-phases"),
    pytest.param(lambda c: ImageFolderDataModule(str(c.tmp / "images")),
                 "ImageFolderDataModule: data.init_args.root='{tmp}/images'", "does not exist",
                 id="image_folder-root-missing"),
    pytest.param(lambda c: WebDatasetDataModule(str(c.tmp / "train-{000000..000009}.tar")),
                 "data.init_args.train_shards='{tmp}/train-{{000000..000009}}.tar'", "matches no shard file",
                 id="webdataset-pattern-matches-nothing"),
    pytest.param(lambda c: export(c, str(c.tmp / "missing.ckpt")),
                 "export_compact: checkpoint='{tmp}/missing.ckpt'", "does not exist", id="export-checkpoint-missing"),
    pytest.param(lambda c: export(c, garbage_file(c, "run.ckpt")),
                 "export_compact: checkpoint='{tmp}/run.ckpt'", "cannot be read as a checkpoint",
                 id="export-checkpoint-garbage"),
    # a model lacking what a technique needs (checked in setup, before the first batch)
    pytest.param(lambda c: fit(c, tiny_cnn(), digits(), [TokenDropout()]),
                 "TokenDropout: ", "no ViT", id="token_dropout-on-a-cnn"),
    pytest.param(lambda c: fit(c, tiny_vit(), digits(), [PruneRegrow()]),
                 "PruneRegrow: model='ImageClassifier'", "has no prunable convolution", id="prune_regrow-on-a-vit"),
    pytest.param(lambda c: fit(c, tiny_vit().requires_grad_(False), digits(), [GradientQuantization()]),
                 "GradientQuantization: model='ImageClassifier'", "has no trainable parameters",
                 id="grad_quant-on-a-frozen-model"),
    pytest.param(lambda c: fit(c, tiny_vit(num_classes=7), digits()),
                 "ImageClassifier: ", "predicts 7 classes but the data has 10", id="classifier-wrong-num_classes"),
    pytest.param(lambda c: fit(c, tiny_vit(), digits(), [TokenDropout(patch_scale=3)]),
                 "TokenDropout: patch_scale=3", "does not divide", id="token_dropout-patch_scale-3"),
    # conflicting techniques and strategies
    pytest.param(lambda c: cli(c, "--trainer.callbacks+=stacktrain.callbacks.TokenDropout",
                               "--trainer.callbacks+=stacktrain.callbacks.TokenDropout"),
                 "TokenDropout: trainer.callbacks=['TokenDropout', 'TokenDropout']", "attached more than once",
                 id="cli-two-token_dropouts"),
    pytest.param(lambda c: fit(c, prompt_tuning(c, cache_features=True), shapes(), [TokenDropout()]),
                 "TokenDropout: model='PromptTunedCLIP'", "cannot be attached to PromptTunedCLIP",
                 id="token_dropout-on-cached-prompt-tuning"),
    # through the CLI (in-process; `python train.py` prints the same message as one line)
    pytest.param(lambda c: cli(c, "--trainer.callbacks+=stacktrain.callbacks.TokenDropout",
                               "--trainer.callbacks.schedule_file", str(c.tmp / "none.yaml")),
                 "TokenDropout: schedule_file='{tmp}/none.yaml'", "does not exist", id="cli-schedule_file-missing"),
    pytest.param(lambda c: cli(c, "--model.init_args.pretrained", str(c.tmp)),
                 "ImageClassifier: model.init_args.pretrained='{tmp}'", "is a folder", id="cli-pretrained-folder"),
]


@pytest.mark.parametrize("build, names, problem", REJECTED)
def test_rejected_before_the_first_batch(ctx, build: Callable[[SimpleNamespace], Any], names: str, problem: str):
    from stacktrain.cli import _stack_error_in

    with pytest.raises(Exception) as info:
        build(ctx)
    error = _stack_error_in(info.value)  # jsonargparse wraps the errors raised in __init__
    assert error is not None, f"not a StackError: {info.value!r}"
    message = str(error)
    expected = names.format(tmp=str(ctx.tmp))
    assert message.startswith(expected) or f": {expected}" in message, message
    assert problem in message, message
    # the key, the value it got, and the fix
    assert error.key and f"{error.key}={error.value!r}" in message, message
    assert error.fix and f"Fix: {error.fix.rstrip('.')}" in message, message
    if ctx.trainer is not None:
        assert ctx.trainer.global_step == 0
