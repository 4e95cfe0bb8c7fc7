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

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from lightning.pytorch import Callback, Trainer

from conftest import CONFIGS, TINY_VIT, make_trainer
from stacktrain.callbacks import (
    EfficiencyReport,
    GradientQuantization,
    PruneRegrow,
    TokenDropout,
)
from stacktrain.datamodules import DigitsDataModule, ImageFolderDataModule, WebDatasetDataModule
from stacktrain.datamodules.make_shards import make_shards
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
    options = dict(max_steps=2, num_sanity_val_steps=0, limit_val_batches=1)
    options.update(trainer_kwargs)
    trainer = make_trainer(ctx.tmp, [*callbacks, NoTrainingBatch()], **options)
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


def all_shards_corrupt(ctx: SimpleNamespace) -> WebDatasetDataModule:
    """Two shards that are not tar files: nothing to train on, which no warning can make up for."""
    for index in range(2):
        write(ctx.tmp / f"train-{index:06d}.tar", bytes(range(256)) * 12)
    return WebDatasetDataModule(str(ctx.tmp / "train-{000000..000001}.tar"), num_classes=10, image_size=16,
                                channels=1, batch_size=4, epoch_length=16)


def schedule_search(ctx: SimpleNamespace, out: str) -> None:
    from stacktrain.search_schedule import search_schedule

    search_schedule(str(CONFIGS / "simclr_token_dropout.yaml"), 0.3, out)


def export(ctx: SimpleNamespace, checkpoint: str, out: str | None = None) -> None:
    from stacktrain import export_compact

    export_compact(checkpoint, out or str(ctx.tmp / "export"))


def quantized_communication_with_a_comm_hook() -> None:
    """A DDP strategy that already compresses its all-reduce cannot take GradientQuantization's
    communication hook too (checked in setup; a 1-process stand-in for the 2-process run)."""
    from lightning.pytorch.strategies import DDPStrategy
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import fp16_compress_hook

    trainer = SimpleNamespace(strategy=DDPStrategy(ddp_comm_hook=fp16_compress_hook))
    GradientQuantization(communication_bits=8).setup_technique(trainer, tiny_vit(), "fit")


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
    pytest.param(lambda c: fit(c, tiny_vit(), ImageFolderDataModule(write(c.tmp / "images", "not a folder"))),
                 "ImageFolderDataModule: data.init_args.root='{tmp}/images'", "is a file, not a folder",
                 id="image_folder-root-is-a-file"),
    pytest.param(lambda c: fit(c, tiny_vit(), ImageFolderDataModule(str(c.tmp))),
                 "ImageFolderDataModule: data.init_args.root='{tmp}'", "holds fewer than two class folders",
                 id="image_folder-root-empty"),
    pytest.param(lambda c: WebDatasetDataModule(str(c.tmp / "train-{000000..000009}.tar")),
                 "data.init_args.train_shards='{tmp}/train-{{000000..000009}}.tar'", "matches no shard file",
                 id="webdataset-pattern-matches-nothing"),
    pytest.param(lambda c: fit(c, tiny_vit(), all_shards_corrupt(c)),
                 "WebDatasetDataModule: shards=['{tmp}/train-000000.tar', '{tmp}/train-000001.tar']",
                 "yielded no readable sample", id="webdataset-every-shard-corrupt"),
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
    pytest.param(lambda c: quantized_communication_with_a_comm_hook(),
                 "GradientQuantization: communication_bits=8", "cannot replace the DDP communication hook",
                 id="grad_quant-communication_bits-with-a-ddp-comm-hook"),
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


def test_cli_wrong_type_is_named_by_the_config_parser(tmp_path, capsys):
    """Through a config, a value of the wrong type never reaches our code: the parser names the key
    and the value (exit status 2, no traceback)."""
    from stacktrain.cli import main

    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", QUICKSTART, "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path),
              "--model.init_args.num_classes", "ten"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert 'Parser key "num_classes"' in err and "Got value: ten" in err and "Traceback" not in err


# ------------------------------------------------------------------------------------ HANDLED
# (non-finite losses: tests/test_nonfinite_guard.py)
def train(tmp_path, model: Any, data: Any, callbacks: list[Callback], **kwargs: Any) -> Trainer:
    trainer = make_trainer(tmp_path, callbacks, **{"max_steps": 4, "num_sanity_val_steps": 0, "limit_val_batches": 0,
                                                   **kwargs})
    trainer.fit(model, datamodule=data)
    return trainer


def test_corrupt_shard_in_the_middle_is_skipped_with_a_warning_and_the_run_goes_on(digit_shards, tmp_path):
    """HANDLED: shard 2 of 5 is truncated; its samples are skipped, counted, and the epoch is filled
    from the other shards."""
    for index in range(5):
        name = f"train-{index:06d}.tar"
        data = (digit_shards / name).read_bytes()
        if index == 2:
            data = data[: len(data) // 3] + b"\x00garbage" * 100
        (tmp_path / name).write_bytes(data)
    (tmp_path / "dataset.json").write_bytes((digit_shards / "dataset.json").read_bytes())
    data = WebDatasetDataModule(str(tmp_path / "train-{000000..000004}.tar"), image_size=16, channels=1,
                                batch_size=16, epoch_length=160)
    with pytest.warns(UserWarning, match=r"WebDatasetDataModule: skipped unreadable data \(1 so far\)"):
        trainer = train(tmp_path, tiny_vit(), data, [], max_steps=-1, max_epochs=1)
    assert trainer.global_step == 10  # 160 samples / 16: the whole epoch despite the bad shard
    assert data.skipped >= 1


# ------------------------------------------------------------------------------------ NEVER OVERWRITTEN
def run_config_twice(c: SimpleNamespace) -> None:
    from stacktrain.cli import StackCLI

    StackCLI(args=["fit", "--config", QUICKSTART, "--trainer.max_steps", "2", "--trainer.enable_checkpointing", "false",
                   "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir", str(c.tmp),
                   "--trainer.logger.version", "fixed", "--trainer.callbacks+=test_bad_inputs.NoTrainingBatch"])


def efficiency_report(c: SimpleNamespace) -> None:
    report = EfficiencyReport(dirpath=str(c.tmp))
    report.on_fit_end(SimpleNamespace(is_global_zero=True, loggers=[], global_step=0, current_epoch=0), None)


def pretrain_clip(c: SimpleNamespace) -> None:
    from stacktrain.lightning_modules.clip_pretrain import pretrain_clip as run

    run(str(c.tmp / "clip.pt"), model_name="stacktrain-micro-clip", steps=2, batch_size=4)


def clip_export(c: SimpleNamespace) -> None:
    CLIPPretraining(model_name="stacktrain-micro-clip", export_weights=None).save_open_clip_weights(str(c.tmp / "clip.pt"))


#: (the writer, the file that already exists, and either the refusal the message must start with
#: or the numbered file written beside the existing one).
OVERWRITES: list[Any] = [
    pytest.param(run_config_twice, "lightning_logs/fixed/config.yaml",
                 "stacktrain: config file='{tmp}/lightning_logs/fixed/config.yaml' already exists", id="cli-run-config"),
    pytest.param(lambda c: export(c, garbage_file(c, "run.ckpt"), str(c.tmp)), "model.pt2",
                 "export_compact: out='{tmp}' already holds an export (model.pt2)", id="export_compact-out"),
    pytest.param(lambda c: schedule_search(c, str(c.tmp / "schedule.yaml")), "schedule.yaml",
                 "search_schedule: --out='{tmp}/schedule.yaml' already exists", id="search_schedule-out"),
    pytest.param(pretrain_clip, "clip.pt", "pretrain_clip: out_path='{tmp}/clip.pt' already exists",
                 id="pretrain_clip-out_path"),
    pytest.param(lambda c: make_shards("digits", str(c.tmp)), "train-000000.tar",
                 "make_shards: OUT='{tmp}' already holds 1 shard/metadata files", id="make_shards-out"),
    pytest.param(efficiency_report, "efficiency.md", "efficiency-2.md", id="efficiency-report"),
    pytest.param(clip_export, "clip.pt", "clip-2.pt", id="clip_pretraining-export"),
]


@pytest.mark.parametrize("writer, existing, outcome", OVERWRITES)
def test_no_existing_file_is_overwritten(ctx, writer: Callable[[SimpleNamespace], Any], existing: str, outcome: str):
    from stacktrain.cli import _stack_error_in

    path = ctx.tmp / existing
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"an earlier run's file")
    if "=" not in outcome:
        writer(ctx)  # written beside it under a numbered name
        assert (ctx.tmp / outcome).is_file()
    else:
        with pytest.raises(Exception) as info:
            writer(ctx)
        error = _stack_error_in(info.value)
        assert error is not None, repr(info.value)
        assert str(error).startswith(outcome.format(tmp=str(ctx.tmp))), str(error)
        assert error.fix and "Fix: " in str(error)
    assert path.read_bytes() == b"an earlier run's file"
