"""The quickstart as 2 CPU processes under DDP (gloo): both ranks end with identical weights."""

from __future__ import annotations

import pytest

from conftest import CONFIGS
from ddp_harness import assert_states_equal, check, load_rank_states, run_ddp

pytestmark = pytest.mark.ddp


def test_quickstart_runs_as_two_processes_with_identical_weights(tmp_path):
    result = check(run_ddp(
        ["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--trainer.max_epochs", "1",
         "--trainer.limit_train_batches", "6", "--trainer.limit_val_batches", "2"],
        workdir=tmp_path, dump_dir=tmp_path / "ranks",
    ))
    assert "stacktrain: fit finished after 6 steps" in result.stdout
    rank0, rank1 = load_rank_states(tmp_path / "ranks", 2)
    assert rank0["global_step"] == rank1["global_step"] == 6
    assert_states_equal(rank0["model"], rank1["model"])
    # The weights really moved: identical because DDP synchronised them, not because nothing ran.
    from stacktrain.lightning_modules import ImageClassifier
    import torch

    torch.manual_seed(0)
    fresh = ImageClassifier("vit_tiny_patch16_224", in_chans=1, model_kwargs=dict(
        img_size=16, patch_size=4, embed_dim=96, depth=6, num_heads=4, mlp_ratio=2.0))
    assert not torch.equal(fresh.state_dict()["model.head.weight"], rank0["model"]["model.head.weight"])


def test_training_from_shards_on_two_processes(tmp_path):
    """Each rank reads its own shards (with a data-loader worker), both take the same number of
    steps, and DDP keeps their weights identical."""
    from stacktrain.datamodules.make_shards import make_shards

    make_shards("digits", str(tmp_path / "shards"), maxcount=100)
    result = check(run_ddp(
        ["fit", "--config", str(CONFIGS / "quickstart.yaml"), "--trainer.max_epochs", "2", "--trainer.logger", "false",
         "--data", "stacktrain.datamodules.WebDatasetDataModule",
         "--data.train_shards", str(tmp_path / "shards" / "train-{000000..000012}.tar"),
         "--data.val_shards", str(tmp_path / "shards" / "val-{000000..000002}.tar"),
         "--data.image_size", "16", "--data.channels", "1", "--data.batch_size", "32", "--data.num_workers", "1",
         "--data.epoch_length", "640"],
        workdir=tmp_path, dump_dir=tmp_path / "ranks",
    ))
    rank0, rank1 = load_rank_states(tmp_path / "ranks", 2)
    # 640 samples per epoch over 2 ranks, batch 32: 10 steps per epoch on each rank.
    assert rank0["global_step"] == rank1["global_step"] == 20
    assert_states_equal(rank0["model"], rank1["model"])
    assert "val/acc=" in result.stdout
