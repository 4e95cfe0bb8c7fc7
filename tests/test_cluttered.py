"""`ClutteredDigitsDataModule`: disjoint source digits, samples as functions of (seed, split, epoch,
index), difficulty knobs that act, clear errors, and a training run on it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stacktrain import StackError
from stacktrain.datamodules import ClutteredDigitsDataModule
from stacktrain.datamodules.cluttered import _resized_digits, render_cluttered

SMALL = dict(train_size=96, val_size=32, test_size=48, batch_size=16)


def _data(**overrides) -> ClutteredDigitsDataModule:
    data = ClutteredDigitsDataModule(**{**SMALL, **overrides})
    data.setup("fit")
    return data


def test_splits_come_from_disjoint_source_digits():
    data = _data()
    pools = {name: {image.tobytes() for image in images} for name, (images, _) in data._pools.items()}
    assert not pools["train"] & pools["test"] and not pools["train"] & pools["val"] and not pools["val"] & pools["test"]
    assert sum(len(p) for p in pools.values()) > 1700  # (a handful of the 1,797 digits are pixel duplicates)
    assert data.train_set.images.shape == (96, 1, 32, 32) and data.test_set.images.shape == (48, 1, 32, 32)
    assert abs(float(data.train_set.images.mean())) < 1e-4  # normalized with the training split's statistics


def test_samples_are_a_function_of_data_seed_split_and_index():
    a, b = _data(), _data(seed=7)  # the training seed changes the order, not the images
    assert torch.equal(a.train_set.images, b.train_set.images) and torch.equal(a.test_set.images, b.test_set.images)
    more = _data(test_size=64)  # sample i does not depend on how many were drawn
    assert torch.allclose(more.test_set.images[:48] * more.std + more.mean, a.test_set.images * a.std + a.mean, atol=1e-5)
    other = _data(data_seed=1)
    assert not torch.equal(a.test_set.images, other.test_set.images)


def test_render_draws_everything_from_its_generator():
    images = (np.random.default_rng(0).random((5, 8, 8)) * 255).astype(np.uint8)
    resized = _resized_digits(images, range(14, 22))
    settings = dict(image_size=32, clutter=8, fragment_size=6, noise=0.25)
    first = render_cluttered(np.random.default_rng([0, 2, 0, 3]), 1, resized, **settings)
    again = render_cluttered(np.random.default_rng([0, 2, 0, 3]), 1, resized, **settings)
    assert np.array_equal(first, again) and first.shape == (32, 32) and first.dtype == np.float32
    clean = render_cluttered(np.random.default_rng(1), 1, resized, **dict(settings, clutter=0, noise=0.0))
    assert 14 * 14 <= np.count_nonzero(clean) <= 21 * 21  # only the digit: nothing outside its box
    assert np.count_nonzero(render_cluttered(np.random.default_rng(1), 1, resized, **dict(settings, noise=0.0))) \
        > np.count_nonzero(clean)  # the clutter adds pixels


def test_knobs_set_the_difficulty():
    """Raw-pixel nearest-neighbour accuracy falls as noise and clutter grow."""
    from stacktrain.functional.contrastive import knn_predict

    def raw_knn(**knobs) -> float:
        data = _data(train_size=600, test_size=300, **knobs)
        votes = knn_predict(data.test_set.images.flatten(1), data.train_set.images.flatten(1), data.train_set.labels,
                            10, k=20)
        return float((votes.argmax(1) == data.test_set.labels).float().mean())

    easy, hard = raw_knn(noise=0.0, clutter=0), raw_knn(noise=0.4, clutter=12)
    assert easy > hard + 0.1, (easy, hard)


def test_augment_rerenders_training_samples_per_epoch():
    from stacktrain.datamodules.base import SeededSamples

    data = _data(augment=True)
    samples = SeededSamples(data.train_set, seed=0, random=True)
    epoch0, again, epoch1 = samples[(0, 5)], samples[(0, 5)], samples[(1, 5)]
    assert torch.equal(epoch0[0], again[0]) and not torch.equal(epoch0[0], epoch1[0])
    assert epoch0[1] == epoch1[1] == data.train_set.labels[5]  # same source digit, new rendering
    assert epoch0[0].shape == (1, 32, 32)


@pytest.mark.parametrize("overrides, key", [
    (dict(digit_size=(14, 40)), "digit_size"),
    (dict(noise=-1.0), "noise"),
    (dict(train_size=0), "train_size"),
    (dict(test_fraction=0.9), "test_fraction"),
])
def test_bad_settings_raise_stack_errors(overrides, key):
    with pytest.raises(StackError, match=key):
        ClutteredDigitsDataModule(**overrides)


def test_a_classifier_learns_on_it(tmp_path):
    """A few epochs of the benchmarks' CNN leave chance well behind (the calibration has the real figures)."""
    from lightning.pytorch import seed_everything

    from conftest import make_trainer

    from stacktrain.lightning_modules import ImageClassifier

    seed_everything(0)
    data = ClutteredDigitsDataModule(train_size=1024, val_size=256, test_size=64, batch_size=64, noise=0.1, clutter=2)
    model = ImageClassifier("stacktrain_vgg", in_chans=1, model_kwargs={"width": 8})
    trainer = make_trainer(tmp_path, max_epochs=4)
    trainer.fit(model, data)
    assert float(trainer.callback_metrics["val/acc"]) > 0.25  # chance is 0.1
