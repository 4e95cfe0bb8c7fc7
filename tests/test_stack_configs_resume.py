"""Exact resume of the stacks (configs/stack_vit.yaml, stack_cnn.yaml, stack_clip.yaml): N steps uninterrupted
vs. stopped at step k and resumed from the checkpoint give identical weights and technique state, on
one process (in-process, through tests/resume_harness.py) and on two (DDP, through train.py).

Each technique alone has its own resume test; these check that the techniques' states still resume
together: token dropout's schedule and generator beside the 4-bit gradients' residuals, and the early
exits beside prune-and-regrow's masks, a compaction (the smaller layers are rebuilt from the
checkpoint) and the quantizer's hypernetwork that follows the compacted parameters."""

from __future__ import annotations

import functools

import pytest
import torch
import yaml
from lightning.pytorch import LightningModule

from conftest import CONFIGS, TINY_VIT
from ddp_harness import assert_states_equal, check, load_rank_states, run_ddp
from resume_harness import assert_resumed_exactly, load_checkpoint_weights_only, stop_and_resume
from stacktrain.callbacks import ExactResume, GradientQuantization, PruneRegrow, TokenDropout
from stacktrain.datamodules import DigitsDataModule, ShapesDataModule
from stacktrain.lightning_modules import BoostedEarlyExit, ImageClassifier, PromptTunedCLIP

#: As the stack configs: AdamW and a OneCycleLR whose length comes from the trainer.
OPTIMIZER = functools.partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.05)
SCHEDULER = functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=3e-3, pct_start=0.15)


def digits() -> DigitsDataModule:
    return DigitsDataModule(image_size=16, channels=1, batch_size=32)


def technique(runs, kind):
    return next(c for c in runs.resumed[1].callbacks if isinstance(c, kind))


# ------------------------------------------------------------------------------- one process
@pytest.mark.parametrize("compensation", ["error_feedback", "hypernet"])
def test_vit_stack_resumes_exactly(tmp_path, compensation):
    """Stopped while tokens are dropped (the step schedule ends at 0.7 * 10 = step 7): the resumed run
    drops the same tokens, goes to the full sequence at the same step, and quantizes with the same
    residuals or hypernetwork."""
    runs = stop_and_resume(
        lambda: ImageClassifier("vit_tiny_patch16_224", num_classes=10, in_chans=1, model_kwargs=TINY_VIT,
                                optimizer=OPTIMIZER, lr_scheduler=SCHEDULER),
        digits,
        lambda: [TokenDropout(keep_ratio=0.5, schedule="step", until=0.7),
                 GradientQuantization(bits=4, targets="both", compensation=compensation), ExactResume()],
        total=10, stop_at=4, root=tmp_path, full_length=True,
    )
    assert_resumed_exactly(runs)
    saved = load_checkpoint_weights_only(runs.checkpoint)["callbacks"]
    assert {"TokenDropout", "GradientQuantization", "ExactResume"} <= set(saved)
    quant = technique(runs, GradientQuantization).state_dict()
    if compensation == "hypernet":
        assert quant["hypernet"]["optimizer"]["state"]  # the hypernetwork's Adam moments matched too
    else:
        assert any(r.abs().sum() > 0 for r in quant["residuals_by_rank"][0].values())


def cnn_module() -> BoostedEarlyExit:
    return BoostedEarlyExit(backbone="test_resnet", exits=["layer1", "layer2", "layer3", "layer4"], num_classes=10,
                            in_chans=1, head_hidden=16, budgets=[0.4, 0.6, 0.8, 1.0], predict_budget=0.6,
                            optimizer=OPTIMIZER, lr_scheduler=SCHEDULER)


@pytest.mark.parametrize("stop_at", [3, 7], ids=["during-exploration", "after-compaction"])
def test_cnn_stack_resumes_exactly(tmp_path, stop_at):
    """Exploration ends at 0.5 * 10 = step 5 and the network is compacted then. Stopped before, the
    resumed run explores with the same masks and regrow draws and compacts at the same step; stopped
    after, the smaller layers, their optimizer state and the hypernetwork's last gradients are rebuilt
    from the checkpoint."""
    runs = stop_and_resume(
        cnn_module, digits,
        lambda: [PruneRegrow(target_flops_ratio=0.5, update_every=2, update_unit="step", explore_until=0.5,
                             regrow_fraction=0.3, compact_after_explore=True),
                 GradientQuantization(bits=4, targets="both", compensation="hypernet"), ExactResume()],
        total=10, stop_at=stop_at, root=tmp_path, full_length=True,
    )
    assert_resumed_exactly(runs)
    saved = load_checkpoint_weights_only(runs.checkpoint)["callbacks"]
    assert saved["PruneRegrow"]["compacted"] == (stop_at > 5)
    prune = technique(runs, PruneRegrow)
    assert prune.compacted and prune.compacted_at == 5
    weights = dict(runs.resumed[0].named_parameters())
    previous = technique(runs, GradientQuantization).state_dict()["hypernet"]["previous"]
    assert previous and all(previous[name]["grad"].shape == weights[name].shape for name in previous)


def test_clip_stack_resumes_exactly(tmp_path, micro_clip):
    """configs/stack_clip.yaml on a micro CLIP: the prompt, its SGD momentum, the noisy-label sample
    selection and the token masks of the frozen visual tower (no feature cache) continue exactly."""
    runs = stop_and_resume(
        lambda: PromptTunedCLIP("stacktrain-micro-clip", pretrained=micro_clip, n_ctx=4, shots=4, label_noise=0.25,
                                loss="gce", gce_q=0.5, cache_features=False,
                                optimizer=functools.partial(torch.optim.SGD, lr=0.002, momentum=0.9),
                                lr_scheduler=functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.002,
                                                               pct_start=0.01, div_factor=1.0)),
        lambda: ShapesDataModule(train_size=120, val_size=40, test_size=40, batch_size=8, blur=1.0),
        lambda: [TokenDropout(keep_ratio=0.5), ExactResume()],
        total=6, stop_at=3, root=tmp_path, full_length=True,
    )
    assert_resumed_exactly(runs)
    saved = load_checkpoint_weights_only(runs.checkpoint)
    assert {"TokenDropout", "ExactResume"} <= set(saved["callbacks"])
    assert list(saved["state_dict"]) == ["prompt.ctx"]


class LinearOnDigits(LightningModule):
    """A linear classifier whose OneCycleLR takes its length from the trainer, as the stack configs'."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(16 * 16, 10)
        self.label_sums: list[int] = []

    def training_step(self, batch, batch_idx):
        images, labels = batch
        self.label_sums.append(int(labels.sum()))
        return torch.nn.functional.cross_entropy(self.linear(images.flatten(1)), labels)

    def configure_optimizers(self):
        optimizer = OPTIMIZER(self.parameters())
        return {"optimizer": optimizer, "lr_scheduler": {"interval": "step", "scheduler": SCHEDULER(
            optimizer, total_steps=self.trainer.estimated_stepping_batches)}}


def test_the_loader_resumes_its_position_when_the_run_length_is_counted_before_the_restore(tmp_path):
    """With ``max_epochs`` set (as in every config), ``estimated_stepping_batches`` builds the training
    loader before the checkpoint is restored and Lightning drops the loader's saved position
    (Lightning-AI/pytorch-lightning#20550): the resumed run trained on the epoch's first batches again.
    ExactResume loads the position: the resumed run sees batches k+1.. of the uninterrupted run."""
    runs = stop_and_resume(LinearOnDigits, digits, lambda: [ExactResume()], total=6, stop_at=4, root=tmp_path,
                           full_length=True, max_epochs=3)
    assert runs.resumed[0].label_sums == runs.uninterrupted[0].label_sums[4:]
    assert_resumed_exactly(runs)


# ------------------------------------------------------------------------------- two processes
def cnn_stack_config(tmp_path, *, total: int, checkpoint_every: int):
    """configs/stack_cnn.yaml for ``total`` steps with exploration updates every 2 steps (compaction
    at 0.5 * total), a checkpoint every ``checkpoint_every`` steps, no logger and no validation."""
    config = yaml.safe_load((CONFIGS / "stack_cnn.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(logger=False, max_steps=total, limit_val_batches=0, num_sanity_val_steps=0,
                   enable_progress_bar=False, enable_checkpointing=True)
    explorer = next(c for c in trainer["callbacks"] if c["class_path"].endswith("PruneRegrow"))
    explorer["init_args"]["update_every"] = 2
    trainer["callbacks"].append({"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {
        "dirpath": str(tmp_path / "checkpoints"), "every_n_train_steps": checkpoint_every, "save_top_k": -1}})
    path = tmp_path / "stack_cnn_resume.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.ddp
def test_cnn_stack_on_two_processes_resumes_exactly_after_compaction(tmp_path):
    """Two DDP processes, 8 steps (compaction at step 4): the uninterrupted run writes a checkpoint at
    step 6, the very file a job stopped there leaves (the run is deterministic up to it); a second
    2-process run resumes from it with ``--ckpt_path`` and ends on every rank with the weights, the
    BatchNorm statistics and the technique state of the uninterrupted run. The resumed run rebuilds
    the compacted layers from the checkpoint and re-wraps them in DDP with 4-bit communication."""
    total, stop_at = 8, 6
    config = cnn_stack_config(tmp_path, total=total, checkpoint_every=stop_at)
    (tmp_path / "full").mkdir(), (tmp_path / "resumed").mkdir()
    check(run_ddp(["fit", "--config", str(config)], workdir=tmp_path / "full", dump_dir=tmp_path / "full" / "ranks"))
    checkpoint = next((tmp_path / "checkpoints").glob(f"*step={stop_at}*.ckpt"))
    saved = load_checkpoint_weights_only(str(checkpoint))
    assert saved["global_step"] == stop_at and saved["callbacks"]["PruneRegrow"]["compacted"]
    checkpoint = checkpoint.rename(tmp_path / "stopped.ckpt")  # the resumed run writes no step-6 file over it
    check(run_ddp(["fit", "--config", str(config), "--ckpt_path", str(checkpoint)], workdir=tmp_path / "resumed",
                  dump_dir=tmp_path / "resumed" / "ranks"))
    full, resumed = load_rank_states(tmp_path / "full" / "ranks", 2), load_rank_states(tmp_path / "resumed" / "ranks", 2)
    for rank in (0, 1):
        assert full[rank]["global_step"] == resumed[rank]["global_step"] == total
        assert_states_equal(full[rank]["model"], resumed[rank]["model"], f"rank {rank} weights")
        assert_states_equal(full[rank]["techniques"], resumed[rank]["techniques"], f"rank {rank} technique state")
    prune = resumed[0]["techniques"]["PruneRegrow"]
    assert prune["compacted"] and prune["compacted_at"] == total // 2
    # the 4-bit all-gather ran at every step of the resumed run too
    assert [row[0] for row in resumed[0]["techniques"]["GradientQuantization"]["bytes_history"]] == list(range(total))
