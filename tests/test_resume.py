"""Exact stop-and-resume of a plain run: data order, weights, optimizer and RNG state."""

from __future__ import annotations

import torch

from resume_harness import assert_resumed_exactly, load_checkpoint_weights_only, stop_and_resume
from stacktrain.callbacks import EfficiencyReport, ExactResume
from stacktrain.datamodules import DigitsDataModule
from stacktrain.lightning_modules import ImageClassifier


def make_module(kwargs):
    return lambda: ImageClassifier("vit_tiny_patch16_224", in_chans=1, model_kwargs=kwargs)


def test_resume_mid_epoch_with_augmentation_and_dropout_is_exact(tmp_path, tiny_vit_kwargs):
    """Stop at step 7 (mid-epoch 0 of 19 steps), resume to 25 (into epoch 1): identical weights,
    with data augmentation (seeded per sample) and dropout (global RNG, saved by ExactResume)."""
    runs = stop_and_resume(
        make_module(dict(tiny_vit_kwargs, drop_rate=0.1)), lambda: DigitsDataModule(batch_size=64, augment=True),
        lambda: [ExactResume(), EfficiencyReport(dirpath=str(tmp_path / "report"))],
        total=25, stop_at=7, root=tmp_path,
    )
    assert_resumed_exactly(runs)
    state = load_checkpoint_weights_only(runs.checkpoint)
    assert "ExactResume" in state["callbacks"] and "EfficiencyReport" in "".join(state["callbacks"])


def test_resume_in_a_later_shortened_epoch_is_exact(tmp_path, tiny_vit_kwargs):
    """Epochs cut to 5 batches, stop at step 7 (inside epoch 1): the resumed run must continue epoch
    1's order, not replay epoch 0's (Lightning rebuilds the iterator before set_epoch)."""
    runs = stop_and_resume(
        make_module(tiny_vit_kwargs), lambda: DigitsDataModule(batch_size=64), list,
        total=12, stop_at=7, root=tmp_path, limit_train_batches=5,
    )
    assert_resumed_exactly(runs)


def test_augmentation_alone_resumes_exactly_without_rng_state(tmp_path, tiny_vit_kwargs):
    """Data-side randomness depends on (seed, epoch, sample) only: no RNG state is needed."""
    runs = stop_and_resume(
        make_module(tiny_vit_kwargs), lambda: DigitsDataModule(batch_size=64, augment=True), list,
        total=12, stop_at=7, root=tmp_path,
    )
    assert_resumed_exactly(runs)


def test_without_exact_resume_dropout_drifts(tmp_path, tiny_vit_kwargs):
    """The control: the global RNG is not in Lightning's checkpoint, so dropout masks differ."""
    runs = stop_and_resume(
        make_module(dict(tiny_vit_kwargs, drop_rate=0.1)), lambda: DigitsDataModule(batch_size=64), list,
        total=12, stop_at=7, root=tmp_path,
    )
    full, resumed = runs.uninterrupted[0], runs.resumed[0]
    assert not all(torch.equal(a, b) for a, b in zip(full.parameters(), resumed.parameters()))


def test_every_validation_starts_from_the_first_batch_after_resume(tmp_path, tiny_vit_kwargs):
    """A validation cut short by limit_val_batches must not resume mid-way after a restart."""
    seen: list[list[int]] = []

    class Recording(ImageClassifier):
        def on_validation_epoch_start(self):
            seen.append([])

        def validation_step(self, batch, batch_idx):
            seen[-1].append(int(batch[1][:8].sum()))
            return super().validation_step(batch, batch_idx)

    stop_and_resume(
        lambda: Recording("vit_tiny_patch16_224", in_chans=1, model_kwargs=tiny_vit_kwargs),
        lambda: DigitsDataModule(batch_size=64), list,
        total=12, stop_at=7, root=tmp_path, limit_train_batches=5, limit_val_batches=2,
    )
    # full run validates at 5 and 10, the stopped run at 5, the resumed run at 10: same batches each time
    assert len(seen) == 4 and all(s == seen[0] for s in seen)


def test_resume_from_an_epochs_last_batch_is_exact(tmp_path, tiny_vit_kwargs):
    """Stopped on the last batch of epoch 0, of a full epoch (4 batches, the incomplete fifth dropped)
    and of an epoch shortened by limit_train_batches: the resumed run goes on with epoch 1 from its
    first batch instead of skipping it."""
    for batch_size, limit, stop_at in ((256, 1.0, 4), (64, 5, 5)):
        runs = stop_and_resume(
            make_module(tiny_vit_kwargs), lambda: DigitsDataModule(batch_size=batch_size, augment=True), list,
            total=stop_at + 2, stop_at=stop_at, root=tmp_path / str(stop_at), limit_train_batches=limit,
        )
        assert_resumed_exactly(runs)


def _resuming_trainer(rank: int, world_size: int):
    """What ExactResume.on_train_start reads of a trainer that is not resuming a loader position."""
    from types import SimpleNamespace

    return SimpleNamespace(global_rank=rank, world_size=world_size,
                           fit_loop=SimpleNamespace(_combined_loader_states_to_load=None))


def test_each_rank_resumes_its_own_random_states():
    """The checkpoint holds every rank's states (gathered under DDP); rank r restores saved rank r's."""
    from stacktrain.callbacks.resume import collect_rng_state

    saved = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        saved.append(collect_rng_state())
    expected = [torch.rand(3, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    for rank in (0, 1):
        callback = ExactResume()
        callback.load_state_dict({"rng_by_rank": saved})
        torch.manual_seed(99)
        callback.on_train_start(_resuming_trainer(rank, 2), None)
        assert torch.equal(torch.rand(3), expected[rank])


def test_another_world_size_continues_from_rank_zero_offset_by_rank(recwarn):
    from stacktrain.callbacks.resume import collect_rng_state

    torch.manual_seed(1)
    rank0 = collect_rng_state()
    draws = []
    for rank in (0, 1, 2):
        callback = ExactResume()
        callback.load_state_dict({"rng_by_rank": [rank0, rank0]})  # saved by 2 processes, resumed on 3
        callback.on_train_start(_resuming_trainer(rank, 3), None)
        draws.append(torch.rand(3))
    assert torch.equal(draws[0], torch.rand(3, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(draws[1], draws[0]) and not torch.equal(draws[2], draws[1])
    assert any("holds the random-number states of 2 processes and this run has 3" in str(w.message) for w in recwarn)


def test_a_checkpoint_from_before_the_per_rank_states_still_resumes():
    from stacktrain.callbacks.resume import collect_rng_state

    torch.manual_seed(5)
    callback = ExactResume()
    callback.load_state_dict({"rng": collect_rng_state()})
    callback.on_train_start(_resuming_trainer(0, 1), None)
    assert torch.equal(torch.rand(3), torch.rand(3, generator=torch.Generator().manual_seed(5)))
