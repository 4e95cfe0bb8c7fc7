"""Exact resume of the stacks (configs/stack_vit.yaml, configs/stack_cnn.yaml): N steps uninterrupted
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

from conftest import CONFIGS, TINY_VIT
from ddp_harness import assert_states_equal, check, load_rank_states, run_ddp
from resume_harness import assert_resumed_exactly, load_checkpoint_weights_only, stop_and_resume
from stacktrain.callbacks import ExactResume, GradientQuantization, PruneRegrow, TokenDropout
from stacktrain.datamodules import DigitsDataModule
from stacktrain.lightning_modules import BoostedEarlyExit, ImageClassifier

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
