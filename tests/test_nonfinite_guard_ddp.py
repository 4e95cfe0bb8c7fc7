"""`NonFiniteGuard` under DDP: a NaN loss on one rank only makes every rank skip the same step."""

from __future__ import annotations

import pytest
import torch

from conftest import CONFIGS
from ddp_harness import assert_states_equal, assert_trained, load_rank_states, run_ddp
from stacktrain.lightning_modules import ImageClassifier

pytestmark = pytest.mark.ddp


class NaNLossOnRankOne(ImageClassifier):
    """The quickstart classifier whose loss is NaN at global step 1 on rank 1 only."""

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * float("nan") if self.global_step == 1 and self.global_rank == 1 else loss


def test_a_nan_loss_on_one_rank_is_skipped_on_every_rank(tmp_path):
    """...and the run, which skipped 1 of its 3 steps (more than max_skipped_fraction 0.1), exits with
    status 3 on both processes after saying so, not 0."""
    result = run_ddp(
        ["fit", "--config", str(CONFIGS / "quickstart.yaml"),
         "--model.class_path", "test_nonfinite_guard_ddp.NaNLossOnRankOne", "--trainer.max_steps", "3",
         "--trainer.limit_val_batches", "0", "--trainer.logger", "false", "--trainer.enable_checkpointing", "false"],
        workdir=tmp_path, dump_dir=tmp_path / "ranks",
    )
    assert result.returncode == 3, result.stderr[-3000:]
    assert "stacktrain: fit finished after 3 steps (1 of them skipped by NonFiniteGuard" in result.stdout
    assert "stacktrain: error: NonFiniteGuard skipped 1 of 3 optimizer steps" in result.stderr
    assert "non-finite loss and gradients at step 1: optimizer step skipped" not in result.stderr  # rank 0: loss finite
    assert "non-finite gradients at step 1: optimizer step skipped, gradients not applied (1 skipped so far" in result.stderr
    rank0, rank1 = load_rank_states(tmp_path / "ranks", 2)
    assert rank0["global_step"] == rank1["global_step"] == 3
    assert_states_equal(rank0["model"], rank1["model"])
    assert_trained(rank0)  # the 2 steps that were not skipped trained both ranks alike
    assert all(torch.isfinite(v).all() for v in rank0["model"].values() if v.is_floating_point())
