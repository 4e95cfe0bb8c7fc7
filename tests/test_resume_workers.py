"""Exact resume with data-loader workers, for every kind of training loader (issue 22, point 4):
the training loaders of all data modules come from one builder (`stateful_train_loader`), so the
multi-view loader of the contrastive configs tells an epoch's end on resume like the others."""

from __future__ import annotations

import pytest

from resume_harness import assert_resumed_exactly, stop_and_resume
from stacktrain.callbacks import ExactResume, TokenDropout
from stacktrain.datamodules import DigitsDataModule, MultiViewDataModule
from stacktrain.lightning_modules import SimCLR

VIT = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0)


@pytest.mark.parametrize("num_workers", [2])
def test_multi_view_resume_from_an_epochs_last_batch_is_exact(tmp_path, num_workers):
    """SimCLR + TokenDropout on two views of the digits, 4 full batches an epoch: stopped on epoch 0's
    last batch and resumed, the run goes on with epoch 1 from its first batch (with 2 workers it used
    to skip epoch 1 entirely, and every weight differed)."""
    runs = stop_and_resume(
        lambda: SimCLR(model_name="vit_tiny_patch16_224", in_chans=1, model_kwargs=VIT, hidden_dim=32),
        lambda: MultiViewDataModule(DigitsDataModule(batch_size=256, num_workers=num_workers)),
        lambda: [ExactResume(), TokenDropout(keep_ratio=0.5)],
        total=6, stop_at=4, root=tmp_path,
    )
    assert_resumed_exactly(runs)
    assert runs.resumed[1].current_epoch == runs.uninterrupted[1].current_epoch


def test_every_training_loader_knows_its_batch_size_and_drop_rule():
    from types import SimpleNamespace

    from stacktrain.datamodules.shapes import ShapesTextDataModule

    trainer = SimpleNamespace(world_size=1, global_rank=0)
    for data in (DigitsDataModule(batch_size=256), MultiViewDataModule(DigitsDataModule(batch_size=256)),
                 ShapesTextDataModule(train_size=300, batch_size=128)):
        data.trainer = trainer
        data.setup("fit")
        sampler = data.train_dataloader().sampler
        assert (sampler.batch_size, sampler.drop_incomplete_batch) == (data.batch_size, True), type(data).__name__
