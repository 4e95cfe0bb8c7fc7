"""Data modules: digits, image folders and CIFAR from local files, WebDataset shards."""

from __future__ import annotations

import os
import pickle
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ddp_harness import check, run_command
from stacktrain.datamodules import (
    DigitsDataModule,
    ImageFolderDataModule,
    WebDatasetDataModule,
    digits_splits,
)
from stacktrain.datamodules.make_shards import main as make_shards_main
from stacktrain.datamodules.make_shards import make_shards
from stacktrain.datamodules.webdataset import ShardStream, assign_shards
from stacktrain.errors import StackError

# ----------------------------------------------------------------------------------------- digits


def test_digits_split_is_fixed_stratified_and_complete():
    splits = digits_splits(seed=0)
    sizes = {name: len(labels) for name, (_, labels) in splits.items()}
    assert sizes == {"train": 1257, "val": 270, "test": 270}
    assert sum(sizes.values()) == 1797
    full = np.bincount(np.concatenate([labels for _, labels in splits.values()]), minlength=10)
    for _, labels in splits.values():
        counts = np.bincount(labels, minlength=10)
        expected = full * len(labels) / 1797
        assert np.abs(counts - expected).max() <= 1.5  # stratified: class proportions kept
    again = digits_splits(seed=0)
    assert np.array_equal(again["val"][0], splits["val"][0])
    other = digits_splits(seed=1)
    assert not np.array_equal(other["val"][0], splits["val"][0])
    images = np.concatenate([s[0] for s in splits.values()]).reshape(1797, -1)
    assert len({row.tobytes() for row in images}) > 1700  # held-out images are not copies of training ones


@pytest.mark.parametrize("size,channels", [(8, 1), (16, 1), (32, 3)])
def test_digits_shapes_and_normalization(size, channels):
    dm = DigitsDataModule(image_size=size, channels=channels, batch_size=16)
    dm.setup("fit")
    assert dm.image_shape == (channels, size, size) and dm.num_classes == 10
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (16, channels, size, size) and images.dtype == torch.float32
    assert labels.dtype == torch.int64
    train = dm.train_set.images
    assert abs(train.mean().item()) < 1e-4 and abs(train.std().item() - 1) < 1e-3
    if channels == 3:
        assert torch.equal(train[:, 0], train[:, 2])


def test_digits_augmentation_changes_only_training_images():
    dm = DigitsDataModule(augment=True, batch_size=8)
    dm.setup("fit")
    torch.manual_seed(0)
    augmented, _ = dm.train_set[0]
    assert not torch.equal(augmented, dm.train_set.images[0])
    assert torch.equal(dm.val_set[0][0], dm.val_set.images[0])


@pytest.mark.parametrize(
    "kwargs,key",
    [
        (dict(batch_size=-1), "data.init_args.batch_size=-1"),
        (dict(batch_size=0), "data.init_args.batch_size=0"),
        (dict(batch_size=2.5), "data.init_args.batch_size=2.5"),
        (dict(channels=2), "data.init_args.channels=2"),
        (dict(image_size=2), "data.init_args.image_size=2"),
        (dict(val_fraction=0.8), "data.init_args.val_fraction=0.8"),
        (dict(num_workers=-2), "data.init_args.num_workers=-2"),
    ],
)
def test_digits_rejects_bad_arguments(kwargs, key):
    with pytest.raises(StackError, match=key.replace(".", r"\.")) as info:
        DigitsDataModule(**kwargs)
    assert "Fix:" in str(info.value)


# ------------------------------------------------------------------------------- image folders


def _write_image_folder(root, per_class=6, classes=3, size=12):
    rng = np.random.default_rng(0)
    for c in range(classes):
        os.makedirs(os.path.join(root, f"class{c}"), exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(root, f"class{c}", f"{i}.png"))


def test_image_folder_single_tree_is_split_by_fraction(tmp_path):
    _write_image_folder(tmp_path / "flat", per_class=10)
    dm = ImageFolderDataModule(str(tmp_path / "flat"), image_size=16, batch_size=4, num_workers=0, val_fraction=0.2)
    dm.setup("fit")
    assert dm.class_names == ["class0", "class1", "class2"] and dm.num_classes == 3
    assert len(dm.train_set) == 24 and len(dm.val_set) == 6
    assert set(dm.train_set.indices).isdisjoint(dm.val_set.indices)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 16, 16) and dm.image_shape == (3, 16, 16)


def test_image_folder_with_split_folders(tmp_path):
    for split, n in (("train", 5), ("val", 2), ("test", 3)):
        _write_image_folder(tmp_path / "tree" / split, per_class=n)
    dm = ImageFolderDataModule(str(tmp_path / "tree"), image_size=8, channels=1, batch_size=2, num_workers=0)
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (15, 6, 9)
    images, _ = next(iter(dm.val_dataloader()))
    assert images.shape == (2, 1, 8, 8)


def test_image_folder_missing_path_is_named(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(StackError, match=f"data.init_args.root='{missing}' does not exist"):
        ImageFolderDataModule(str(missing))


def _write_fake_cifar10(root, n_train=20, n_test=10):
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rng = np.random.default_rng(0)

    def batch(n):
        return {"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8), "labels": list(rng.integers(0, 10, n))}

    for i in range(1, 6):
        with open(os.path.join(folder, f"data_batch_{i}"), "wb") as handle:
            pickle.dump(batch(n_train // 5), handle)
    with open(os.path.join(folder, "test_batch"), "wb") as handle:
        pickle.dump(batch(n_test), handle)
    with open(os.path.join(folder, "batches.meta"), "wb") as handle:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, handle)


def test_cifar10_from_a_local_path(tmp_path, monkeypatch):
    from torchvision.datasets import cifar

    _write_fake_cifar10(tmp_path)
    # The files are fakes, so torchvision's md5 checks would reject them; everything else is real.
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: True)
    dm = ImageFolderDataModule(str(tmp_path), dataset="cifar10", batch_size=5, num_workers=0, val_fraction=0.2)
    dm.setup("fit")
    assert dm.num_classes == 10 and dm.image_shape == (3, 32, 32)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (16, 4, 10)
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (5, 3, 32, 32)


def test_cifar_without_files_says_how_to_download(tmp_path):
    with pytest.raises(StackError, match="no cifar-10-batches-py/ folder.*download: true"):
        ImageFolderDataModule(str(tmp_path), dataset="cifar10")


# ------------------------------------------------------------------------------ webdataset


@pytest.fixture(scope="module")
def digit_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    make_shards("digits", str(out), maxcount=128)
    return out


def test_make_shards_writes_all_splits_with_metadata(digit_shards):
    import json

    meta = json.loads((digit_shards / "dataset.json").read_text())
    assert meta["num_classes"] == 10 and meta["image_size"] == 8
    assert {k: v["samples"] for k, v in meta["splits"].items()} == {"train": 1257, "val": 270, "test": 270}
    assert len(meta["splits"]["train"]["shards"]) == 10
    with tarfile.open(digit_shards / "train-000000.tar") as archive:
        names = archive.getnames()
    assert sorted(names[:2]) == ["train00000000.cls", "train00000000.png"]


def test_make_shards_refuses_to_overwrite(digit_shards, capsys):
    before = (digit_shards / "train-000000.tar").read_bytes()
    assert make_shards_main(["digits", str(digit_shards)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (digit_shards / "train-000000.tar").read_bytes() == before


def test_make_shards_from_an_image_folder_as_a_module(tmp_path):
    for split, n in (("train", 4), ("val", 2)):
        _write_image_folder(tmp_path / "tree" / split, per_class=n)
    result = check(run_command(
        [sys.executable, "-m", "stacktrain.datamodules.make_shards", tmp_path / "tree", tmp_path / "out", "--maxcount", "5"],
        workdir=tmp_path,
    ))
    assert "train: 12 samples in 3 shards" in result.stdout
    dm = WebDatasetDataModule(str(tmp_path / "out" / "train-{000000..000002}.tar"), batch_size=4)
    assert dm.num_classes == 3 and dm.image_shape == (3, 12, 12) and dm.class_names == ["class0", "class1", "class2"]
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 12, 12)


def test_webdataset_module_reads_shards(digit_shards):
    dm = WebDatasetDataModule(
        str(digit_shards / "train-{000000..000009}.tar"), val_shards=str(digit_shards / "val-*.tar"),
        image_size=16, channels=1, batch_size=32,
    )
    assert dm.epoch_length == 1257 and dm.num_classes == 10 and dm.image_shape == (1, 16, 16)
    loader = dm.train_dataloader()
    assert len(loader) == 39
    batches = list(loader)
    assert len(batches) == 39 and all(b[0].shape == (32, 1, 16, 16) for b in batches)
    val = torch.cat([y for _, y in dm.val_dataloader()])
    assert len(val) == 270


def test_training_shards_are_partitioned_over_ranks_and_workers_each_epoch():
    urls = [f"shard-{i:02d}.tar" for i in range(13)]
    orders = []
    for epoch in range(3):
        parts = [
            assign_shards(urls, seed=5, epoch=epoch, rank=r, world_size=2, worker=w, num_workers=3)
            for r in range(2) for w in range(3)
        ]
        flat = [u for part in parts for u in part]
        assert sorted(flat) == urls  # a partition: every shard once
        assert min(map(len, parts)) >= 2
        orders.append(flat)
    assert orders[0] != orders[1]  # a new order every epoch
    assert assign_shards(urls, seed=5, epoch=1, rank=1, world_size=2, worker=0, num_workers=3) == \
        assign_shards(list(urls), seed=5, epoch=1, rank=1, world_size=2, worker=0, num_workers=3)


def test_every_rank_yields_the_same_number_of_samples(digit_shards):
    """Shards hold different numbers of samples, yet each rank yields exactly its quota, cycling
    over its own shards when they run out, so DDP ranks take the same number of steps."""
    urls = sorted(str(p) for p in digit_shards.glob("train-*.tar"))
    counts = []
    for rank in range(3):
        stream = ShardStream(urls, transform=lambda im: im, image_key="png", label_key="cls", train=True, rank=rank,
                             world_size=3, batch_size=10, samples_per_rank=419, shuffle_buffer=50)
        assert len(stream) == 410  # whole batches only
        counts.append(sum(1 for _ in stream))
    assert counts == [410, 410, 410]


def test_webdataset_rejects_more_ranks_than_shards(digit_shards):
    dm = WebDatasetDataModule(str(digit_shards / "val-{000000..000002}.tar"), image_size=8, channels=1, num_workers=4)
    with pytest.raises(StackError, match="fewer than ranks x workers"):
        dm.train_dataloader()


def test_shard_pattern_matching_nothing_is_rejected(tmp_path):
    pattern = str(tmp_path / "train-{000000..000009}.tar")
    with pytest.raises(StackError, match=r"train_shards=.* matches no shard file"):
        WebDatasetDataModule(pattern)


def test_corrupt_shard_is_skipped_with_a_warning_and_a_count(digit_shards, tmp_path):
    corrupt = tmp_path / "bad"
    corrupt.mkdir()
    for name in ("train-000000.tar", "train-000001.tar", "train-000002.tar"):
        (corrupt / name).write_bytes((digit_shards / name).read_bytes())
    data = (corrupt / "train-000001.tar").read_bytes()
    (corrupt / "train-000001.tar").write_bytes(data[: len(data) // 3] + b"\x00garbage" * 100)
    (corrupt / "dataset.json").write_bytes((digit_shards / "dataset.json").read_bytes())
    dm = WebDatasetDataModule(str(corrupt / "train-{000000..000002}.tar"), image_size=8, channels=1, batch_size=16,
                              epoch_length=256)
    with pytest.warns(UserWarning, match="skipped unreadable data"):
        labels = torch.cat([y for _, y in dm.train_dataloader()])
    assert len(labels) == 256  # the run goes on: other shards fill the epoch
    assert dm.skipped >= 1


def test_shards_without_metadata_need_num_classes(digit_shards, tmp_path):
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "a.tar").write_bytes((digit_shards / "train-000000.tar").read_bytes())
    with pytest.raises(StackError, match="num_classes=None is unknown"):
        WebDatasetDataModule(str(lone / "a.tar"))
    dm = WebDatasetDataModule(str(lone / "a.tar"), num_classes=10, image_size=8, channels=1, batch_size=16)
    assert dm.epoch_length == 128  # counted from the tar headers


def test_training_from_shards(digit_shards, tmp_path, tiny_vit_kwargs):
    from conftest import make_trainer

    from stacktrain.lightning_modules import ImageClassifier

    dm = WebDatasetDataModule(
        str(digit_shards / "train-{000000..000009}.tar"), val_shards=str(digit_shards / "val-{000000..000002}.tar"),
        image_size=16, channels=1, batch_size=32,
    )
    model = ImageClassifier("vit_tiny_patch16_224", in_chans=1, model_kwargs=tiny_vit_kwargs)
    trainer = make_trainer(tmp_path, max_epochs=1, limit_train_batches=6)
    trainer.fit(model, dm)
    assert trainer.global_step == 6
    # the logged accuracy is the model's on the validation shards (recounted here sample by sample)
    model.eval()
    with torch.no_grad():
        hits = [(model(images).argmax(-1) == labels) for images, labels in dm.val_dataloader()]
    assert sum(len(h) for h in hits) == 270  # every sample of the val shards (the digits' val split) once
    assert float(trainer.callback_metrics["val/acc"]) == pytest.approx(float(torch.cat(hits).float().mean()), abs=1e-6)
